"""Task metrics, computed with scikit-learn and scipy.

The task specs call these; the trainer, ``tuneserve evaluate`` and the service's ``/evaluate`` all go through
the spec, so a number means the same thing wherever it is reported. Inputs are targets and post-processed scores
(probabilities or values), never raw model outputs; memory is what those arrays take, nothing more.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class _OnFirstUse:
    """A module imported when one of its names is first used. scipy.stats and scikit-learn's metrics take about a
    second to import, which every start of the service would pay (it imports this module for its types) though
    only an evaluation uses them."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        module = importlib.import_module(self._name)
        self.__dict__.update(vars(module))  # later lookups find the names here, without this method
        return getattr(module, attribute)


stats = _OnFirstUse("scipy.stats")
skm = _OnFirstUse("sklearn.metrics")


@dataclass
class Evaluation:
    """Flat metrics (name -> number; undefined metrics are left out), plus per-class detail."""

    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]] | None = None
    confusion_matrix: list[list[int]] | None = None
    n: int = 0
    notes: list[str] = field(default_factory=list)
    # the labels (or entity types) macro averages are over: those present in the targets; None where no metric is one
    macro_over: list[str] | None = None
    # metric -> (low, high), filled by TaskSpec.assess (95% unless asked otherwise)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    # the examples the model answered worst, filled by core.report.assessed: {"by": what the loss is, "examples":
    # [{"index", "prediction", "loss"}]}; None for a task without a per-example loss
    worst: dict | None = None


# Metrics that are the share of examples with a yes/no outcome: their interval is exact (Clopper-Pearson) at any size.
PROPORTIONS = frozenset({"accuracy", "subset_accuracy", "exact_match"})
# The fewest examples a bootstrap interval is given for: below it, resamples repeat a handful of examples and the
# percentile interval is far too narrow (two correct answers would give [1, 1]); such metrics get no interval.
MIN_BOOTSTRAP = 20
RESAMPLES = 200


def intervals(metrics: dict[str, float], n: int, resampled: Callable[[np.ndarray], dict[str, np.ndarray]], *,
              level: float = 0.95, resamples: int = RESAMPLES, seed: int = 0
              ) -> tuple[dict[str, tuple[float, float]], list[str]]:
    """A ``level`` confidence interval for each metric of ``n`` examples, the same way for every task: exact
    binomial (Clopper-Pearson, scipy) for :data:`PROPORTIONS`, otherwise the percentile bootstrap (scipy) over
    examples, seeded (the same data gives the same intervals). ``resampled`` takes a (B, n) array of example
    indices, one resample a row, and gives each metric's B values (NaN where a resample leaves it undefined).

    Returns:
        metric -> (low, high), and notes on the metrics left without one.
    """
    found: dict[str, tuple[float, float]] = {}
    notes: list[str] = []
    for name in PROPORTIONS & metrics.keys():
        ci = stats.binomtest(round(metrics[name] * n), n).proportion_ci(level, method="exact")
        found[name] = (float(ci.low), float(ci.high))
    rest = sorted(metrics.keys() - PROPORTIONS)
    if not rest:
        return found, notes
    if n < MIN_BOOTSTRAP:
        notes.append(f"{n} examples: too few to bound {', '.join(rest)} (a bootstrap interval needs at least "
                     f"{MIN_BOOTSTRAP}); these figures can move a long way on other data")
        return found, notes

    def statistic(indices: np.ndarray, axis: int = -1) -> np.ndarray:
        values = resampled(np.atleast_2d(indices).astype(np.int64))
        return np.stack([np.asarray(values.get(name, np.full(len(np.atleast_2d(indices)), np.nan)), dtype=np.float64)
                         for name in rest])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a metric undefined in some resample: no interval, said below
        result = stats.bootstrap((np.arange(n),), statistic, vectorized=True, batch=50, n_resamples=resamples,
                                 confidence_level=level, method="percentile", random_state=seed)
    for name, low, high in zip(rest, result.confidence_interval.low, result.confidence_interval.high):
        if math.isfinite(low) and math.isfinite(high):
            found[name] = (float(low), float(high))
        else:
            notes.append(f"{name}: no interval (undefined in some resamples of these examples)")
    return found, notes


def each_resample(evaluate: Callable[[np.ndarray], dict[str, float]]) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A resample function for :func:`intervals` that runs ``evaluate(indices)`` on one resample at a time."""

    def resampled(indices: np.ndarray) -> dict[str, np.ndarray]:
        rows = [evaluate(row) for row in indices]
        names = {name for row in rows for name in row}
        return {name: np.asarray([row.get(name, np.nan) for row in rows], dtype=np.float64) for name in names}

    return resampled


def weights(indices: np.ndarray, n: int) -> np.ndarray:
    """How many times each of ``n`` values is drawn in each resample: (B, n) counts from (B, m) indices."""
    b = len(indices)
    return np.bincount((indices + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


def weighted_auc(scores: np.ndarray, positive: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC-AUC of ``scores`` (n,) for the boolean ``positive`` (n,) under each row of example weights ``w`` (B, n),
    ties counted half (as scikit-learn's ``roc_auc_score`` with ``sample_weight``); NaN where a row has no
    positive or no negative weight."""
    order = np.argsort(scores, kind="mergesort")
    ordered = scores[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    pos = np.add.reduceat(w[:, order] * positive[order], starts, axis=1)
    neg = np.add.reduceat(w[:, order] * ~positive[order], starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    total = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (pos * (below + 0.5 * neg)).sum(axis=1) / total, np.nan)


def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (scikit-learn's ``zero_division=0``)."""
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def classification_resampled(y: Any, proba: Any) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """:func:`classification_metrics`' figures for many resamples at once, from each resample's confusion matrix
    (the same definitions; tests hold them equal)."""
    y, proba = checked(y, proba)
    y = y.astype(np.int64)
    n, num_classes = proba.shape
    cell = y * num_classes + proba.argmax(axis=1)
    nll = -np.log(np.clip(proba[np.arange(n), y], 1e-15, 1.0))

    def resampled(indices: np.ndarray) -> dict[str, np.ndarray]:
        w = weights(indices, n)
        cm = weights(cell[indices], num_classes * num_classes).reshape(len(w), num_classes, num_classes)
        tp = np.diagonal(cm, axis1=1, axis2=2)
        support, predicted = cm.sum(axis=2), cm.sum(axis=1)
        p, r = ratio(tp, predicted), ratio(tp, support)
        f = ratio(2 * p * r, p + r)
        present = support > 0
        m = {"accuracy": tp.sum(axis=1) / n, "log_loss": w @ nll / n}
        for avg in ("micro", "weighted", "macro"):
            for name, x in (("precision", p), ("recall", r), ("f1", f)):
                m[f"{name}_{avg}"] = (m["accuracy"] if avg == "micro" else (x * support).sum(axis=1) / n
                                      if avg == "weighted" else (x * present).sum(axis=1) / present.sum(axis=1))
        if num_classes == 2:
            m["roc_auc"] = weighted_auc(proba[:, 1], y == 1, w)
        else:
            auc = np.stack([weighted_auc(proba[:, c], y == c, w) for c in range(num_classes)], axis=1)
            m["roc_auc"] = np.where(present.all(axis=1), auc.mean(axis=1), np.nan)
        return m

    return resampled


def take(values: Any, indices: np.ndarray) -> Any:
    """The rows ``indices`` of an array, or the items of a sequence."""
    if isinstance(values, np.ndarray):
        return values[indices]
    return [values[i] for i in indices]


def wilson_low(agreeing: int, n: int, level: float = 0.95) -> float:
    """The lower end of the Wilson score interval of ``agreeing`` out of ``n``: the least share the sample shows at
    ``level`` confidence (an export's agreement with PyTorch is measured on a sample of the decisions the model will
    make: 7 disagreements in 1,057 measure 99.34%, and show no more than 98.64%)."""
    if n <= 0:
        return 0.0
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = agreeing / n
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (p + z * z / (2 * n) - spread) / (1 + z * z / n)


def wilson_needed(minimum: float, level: float = 0.95) -> int | None:
    """The fewest decisions that can show ``minimum`` at ``level`` (:func:`wilson_low`), all of them agreeing: the
    bound of ``n`` out of ``n`` is ``n / (n + z²)``. 381 for 99% at 95%; None when no number can (``minimum`` of 1
    or more)."""
    if minimum >= 1:
        return None
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2)
    return max(1, math.ceil(minimum * z * z / (1 - minimum) - 1e-9))


def wilson_allowed(n: int, minimum: float, level: float = 0.95) -> int | None:
    """The most of ``n`` decisions that may differ while the agreement still shows ``minimum`` (:func:`wilson_low`);
    None when even none differing would not: 1,057 decisions show 99% with up to 4 differing, 380 never do."""
    if wilson_low(n, n, level) < minimum:
        return None
    allowed = 0
    while allowed < n and wilson_low(n - allowed - 1, n, level) >= minimum:
        allowed += 1
    return allowed


def joined(parts: Sequence[Any]) -> Any:
    """Targets or scores of several parts as one, in order: arrays stacked along their rows, sequences chained
    (what :func:`take` selects from)."""
    if all(isinstance(part, np.ndarray) for part in parts):
        return np.concatenate(parts)
    return [item for part in parts for item in part]


def checked(targets: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Targets and float64 scores of equal, non-zero length.

    Raises:
        ValueError: the lengths differ or there is nothing to score.
    """
    targets = np.asarray(targets)
    scores = np.asarray(scores, dtype=np.float64)
    if len(targets) != len(scores):
        raise ValueError(f"{len(targets)} targets but {len(scores)} predictions")
    if len(targets) == 0:
        raise ValueError("cannot evaluate zero examples")
    return targets, scores


def finished(result: Evaluation, n: int) -> Evaluation:
    """Record the example count and leave out metrics that are undefined (None, NaN, infinite)."""
    result.n = int(n)
    result.metrics = {k: float(v) for k, v in result.metrics.items() if v is not None and math.isfinite(v)}
    return result


def classification_metrics(y: Any, proba: Any, labels: list[str]) -> Evaluation:
    """Single-label metrics from class ids (n,) and class probabilities (n, C)."""
    y, proba = checked(y, proba)
    y = y.astype(np.int64)
    num_classes = proba.shape[1]
    ids = list(range(num_classes))
    pred = proba.argmax(axis=1)
    names = labels or [str(i) for i in ids]
    p, r, f, support = skm.precision_recall_fscore_support(y, pred, labels=ids, average=None, zero_division=0)
    m: dict[str, float] = {"accuracy": skm.accuracy_score(y, pred)}
    for avg in ("micro", "weighted"):
        m[f"precision_{avg}"], m[f"recall_{avg}"], m[f"f1_{avg}"], _ = skm.precision_recall_fscore_support(
            y, pred, labels=ids, average=avg, zero_division=0)
    present = support > 0
    m["precision_macro"], m["recall_macro"], m["f1_macro"] = p[present].mean(), r[present].mean(), f[present].mean()
    notes = macro_notes(names, present)
    if present.sum() < 2:
        notes.append("roc_auc undefined: only one class present in the targets")
    elif num_classes == 2:
        m["roc_auc"] = skm.roc_auc_score(y, proba[:, 1])
    elif present.all():
        m["roc_auc"] = skm.roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=ids)
    else:
        notes.append("roc_auc undefined: not every class is present in the targets")
    m["log_loss"] = skm.log_loss(y, np.clip(proba, 1e-15, 1.0), labels=ids)
    per_class = {
        names[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
        for i in ids
    }
    cm = skm.confusion_matrix(y, pred, labels=ids).tolist()
    return finished(Evaluation(metrics=m, per_class=per_class, confusion_matrix=cm, notes=notes,
                               macro_over=[names[i] for i in ids if present[i]]), len(y))


def macro_notes(names: list[str], present: np.ndarray, what: str = "labels") -> list[str]:
    """Say which labels macro averages leave out: those absent from the targets, whose scores would be 0 by
    convention and would drag the average down with nothing measured."""
    absent = [name for name, here in zip(names, present) if not here]
    if not absent:
        return []
    shown = ", ".join(absent[:10]) + (f" and {len(absent) - 10} more" if len(absent) > 10 else "")
    note = (f"macro averages are over the {int(present.sum())} {what} present in the targets; "
            f"{len(absent)} of the model's {len(names)} are absent: {shown}")
    return [note]


def multilabel_metrics(y: Any, proba: Any, labels: list[str], threshold: float, k: int = 5) -> Evaluation:
    """Multi-label metrics from multi-hot rows (n, L) and label probabilities (n, L); NDCG cut at ``k``."""
    y, proba = checked(y, proba)
    y = y.astype(np.int64)
    pred = (proba >= threshold).astype(np.int64)
    m: dict[str, float] = {
        "subset_accuracy": skm.accuracy_score(y, pred),
        "hamming_loss": skm.hamming_loss(y, pred),
        "f1_micro": skm.f1_score(y, pred, average="micro", zero_division=0),
    }
    names = labels or [str(j) for j in range(y.shape[1])]
    p, r, f, support = skm.precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    present = support > 0
    if present.any():
        m["f1_macro"] = f[present].mean()
    notes = macro_notes(names, present)
    # ROC-AUC per label is defined only where both outcomes occur; average over those labels.
    both = [j for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
    if both:
        m["roc_auc_macro"] = float(np.mean([skm.roc_auc_score(y[:, j], proba[:, j]) for j in both]))
        if len(both) < y.shape[1]:
            notes.append(f"roc_auc_macro averaged over {len(both)} of {y.shape[1]} labels (others single-valued)")
    else:
        notes.append("roc_auc_macro undefined: no label has both outcomes in the targets")
    has_positive = y.sum(axis=1) > 0
    if has_positive.any():
        m["ndcg"] = skm.ndcg_score(y[has_positive], proba[has_positive], k=min(k, y.shape[1]))
        m["lrap"] = skm.label_ranking_average_precision_score(y[has_positive], proba[has_positive])
    per_class = {
        names[j]: {"precision": float(p[j]), "recall": float(r[j]), "f1": float(f[j]), "support": int(support[j])}
        for j in range(y.shape[1])
    }
    return finished(Evaluation(metrics=m, per_class=per_class, notes=notes,
                               macro_over=[names[j] for j in range(len(names)) if present[j]]), len(y))


def multilabel_resampled(y: Any, proba: Any, threshold: float | np.ndarray, k: int = 5
                         ) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """:func:`multilabel_metrics`' figures for many resamples at once, from per-example counts and per-example
    ranking scores (the same definitions; tests hold them equal)."""
    from scipy.stats import rankdata
    from sklearn.metrics._ranking import _ndcg_sample_scores

    y, proba = checked(y, proba)
    y = y.astype(bool)
    n, num_labels = y.shape
    pred = proba >= threshold
    tp, fp, fn = (y & pred).astype(float), (~y & pred).astype(float), (y & ~pred).astype(float)
    exact = (y == pred).all(axis=1).astype(float)
    wrong = (y != pred).sum(axis=1).astype(float)
    has_positive = y.any(axis=1)
    ranked = y[has_positive]
    # per example: NDCG@k (scikit-learn's, ties averaged) and label ranking average precision
    ndcg = np.zeros(n)
    lrap = np.zeros(n)
    if has_positive.any():
        ndcg[has_positive] = _ndcg_sample_scores(ranked.astype(float), proba[has_positive], k=min(k, num_labels))
        rank = rankdata(-proba[has_positive], method="max", axis=1)
        among_relevant = rankdata(-np.where(ranked, proba[has_positive], -np.inf), method="max", axis=1)
        lrap[has_positive] = (ranked * among_relevant / rank).sum(axis=1) / ranked.sum(axis=1)

    def resampled(indices: np.ndarray) -> dict[str, np.ndarray]:
        w = weights(indices, n)
        tps, fps, fns = w @ tp, w @ fp, w @ fn
        present = (tps + fns) > 0
        f = ratio(2 * tps, 2 * tps + fps + fns)
        ranked_weight = w @ has_positive
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = np.stack([weighted_auc(proba[:, j], y[:, j], w) for j in range(num_labels)], axis=1)
            defined = ~np.isnan(auc).all(axis=1)
            return {
                "subset_accuracy": w @ exact / n,
                "hamming_loss": w @ wrong / (n * num_labels),
                "f1_micro": ratio(2 * tps.sum(axis=1), (2 * tps + fps + fns).sum(axis=1)),
                "f1_macro": np.where(present.any(axis=1), (f * present).sum(axis=1) / present.sum(axis=1), np.nan),
                "roc_auc_macro": np.where(defined, np.nanmean(np.where(defined[:, None], auc, 0.0), axis=1), np.nan),
                "ndcg": np.where(ranked_weight > 0, w @ ndcg / ranked_weight, np.nan),
                "lrap": np.where(ranked_weight > 0, w @ lrap / ranked_weight, np.nan),
            }

    return resampled


def regression_metrics(y: Any, pred: Any) -> Evaluation:
    """Regression metrics from true values (n,) and predicted values (n,)."""
    y, pred = checked(y, pred)
    mse = skm.mean_squared_error(y, pred)
    m: dict[str, float] = {
        "mse": mse,
        "rmse": math.sqrt(mse),
        "mae": skm.mean_absolute_error(y, pred),
    }
    notes: list[str] = []
    if len(y) >= 2:
        m["r2"] = skm.r2_score(y, pred)
    if len(y) >= 2 and np.ptp(y) > 0 and np.ptp(pred) > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m["pearson"] = stats.pearsonr(y, pred).statistic
            m["spearman"] = stats.spearmanr(y, pred).statistic
    else:
        notes.append("pearson/spearman undefined: targets or predictions are constant")
    return finished(Evaluation(metrics=m, notes=notes), len(y))


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge_per_example(references: Sequence[str], predictions: Sequence[str],
                      types: Sequence[str] = ROUGE_TYPES) -> dict[str, np.ndarray]:
    """Each prediction's ROUGE F1 (0-100) of each type against its reference, stemmed as :func:`generation_metrics`
    scores them."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    per_example = {name: np.zeros(len(references)) for name in types}
    for i, (reference, prediction) in enumerate(zip(references, predictions)):
        for name, score in scorer.score(str(reference), str(prediction)).items():
            per_example[name][i] = 100 * score.fmeasure
    return per_example


def generation_metrics(references: Any, predictions: Any) -> Evaluation:
    """Text-generation metrics of generated texts against one reference each, all on a 0-100 scale but exact match
    and lengths: corpus BLEU and chrF (sacrebleu, its default tokenisation), mean ROUGE-1/2/L/Lsum F-measure
    (rouge-score, Porter stemming; Lsum splits sentences on newlines), exact match after whitespace normalisation,
    and mean word counts of predictions and references. Nothing is downloaded at run time."""
    import sacrebleu
    from rouge_score import rouge_scorer

    references, predictions = [str(r) for r in references], [str(p) for p in predictions]
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} generations")
    if not references:
        raise ValueError("cannot evaluate zero examples")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    rouge = {name: 0.0 for name in ROUGE_TYPES}
    for reference, prediction in zip(references, predictions):
        for name, score in scorer.score(reference, prediction).items():
            rouge[name] += score.fmeasure
    normal = [" ".join(p.split()) == " ".join(r.split()) for p, r in zip(predictions, references)]
    m: dict[str, float] = {name: 100 * total / len(references) for name, total in rouge.items()}
    m["bleu"] = sacrebleu.corpus_bleu(predictions, [references]).score
    m["chrf"] = sacrebleu.corpus_chrf(predictions, [references]).score
    m["exact_match"] = float(np.mean(normal))
    m["words"] = float(np.mean([len(p.split()) for p in predictions]))
    m["reference_words"] = float(np.mean([len(r.split()) for r in references]))
    return finished(Evaluation(metrics=m), len(references))


def generation_resampled(references: Any, predictions: Any) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """:func:`generation_metrics`' figures for many resamples at once: ROUGE, exact match and lengths per example,
    BLEU and chrF from summed sentence statistics (sacrebleu's own route for its paired bootstrap; tests hold the
    figures equal)."""
    import sacrebleu

    references, predictions = [str(r) for r in references], [str(p) for p in predictions]
    n = len(references)
    per_example = rouge_per_example(references, predictions)
    per_example["exact_match"] = np.asarray([" ".join(p.split()) == " ".join(r.split())
                                             for p, r in zip(predictions, references)], dtype=float)
    per_example["words"] = np.asarray([len(p.split()) for p in predictions], dtype=float)
    per_example["reference_words"] = np.asarray([len(r.split()) for r in references], dtype=float)
    corpus = {"bleu": sacrebleu.BLEU(), "chrf": sacrebleu.CHRF()}
    sentence_stats = {name: np.asarray(metric._extract_corpus_statistics(predictions, [references]), dtype=float)
                      for name, metric in corpus.items()}

    def resampled(indices: np.ndarray) -> dict[str, np.ndarray]:
        w = weights(indices, n)
        m = {name: w @ values / n for name, values in per_example.items()}
        for name, metric in corpus.items():
            m[name] = np.asarray([metric._compute_score_from_stats(row).score for row in w @ sentence_stats[name]])
        return m

    return resampled
