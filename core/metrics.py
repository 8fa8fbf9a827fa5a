"""Task metrics, computed with scikit-learn and scipy.

The task specs call these; the trainer, ``tuneserve evaluate`` and the service's ``/evaluate`` all go through
the spec, so a number means the same thing wherever it is reported. Inputs are targets and post-processed scores
(probabilities or values), never raw model outputs; memory is what those arrays take, nothing more.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats
from sklearn import metrics as skm


@dataclass
class Evaluation:
    """Flat metrics (name -> number; undefined metrics are left out), plus per-class detail."""

    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]] | None = None
    confusion_matrix: list[list[int]] | None = None
    n: int = 0
    notes: list[str] = field(default_factory=list)


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
    m: dict[str, float] = {"accuracy": skm.accuracy_score(y, pred)}
    for avg in ("macro", "micro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(y, pred, labels=ids, average=avg, zero_division=0)
        m[f"precision_{avg}"], m[f"recall_{avg}"], m[f"f1_{avg}"] = p, r, f
    notes: list[str] = []
    present = np.unique(y)
    if len(present) < 2:
        notes.append("roc_auc undefined: only one class present in the targets")
    elif num_classes == 2:
        m["roc_auc"] = skm.roc_auc_score(y, proba[:, 1])
    elif len(present) == num_classes:
        m["roc_auc"] = skm.roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=ids)
    else:
        notes.append("roc_auc undefined: not every class is present in the targets")
    m["log_loss"] = skm.log_loss(y, np.clip(proba, 1e-15, 1.0), labels=ids)
    p, r, f, support = skm.precision_recall_fscore_support(y, pred, labels=ids, average=None, zero_division=0)
    names = labels or [str(i) for i in ids]
    per_class = {
        names[i]: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
        for i in ids
    }
    cm = skm.confusion_matrix(y, pred, labels=ids).tolist()
    return finished(Evaluation(metrics=m, per_class=per_class, confusion_matrix=cm, notes=notes), len(y))


def multilabel_metrics(y: Any, proba: Any, labels: list[str], threshold: float, k: int = 5) -> Evaluation:
    """Multi-label metrics from multi-hot rows (n, L) and label probabilities (n, L); NDCG cut at ``k``."""
    y, proba = checked(y, proba)
    y = y.astype(np.int64)
    pred = (proba >= threshold).astype(np.int64)
    m: dict[str, float] = {
        "subset_accuracy": skm.accuracy_score(y, pred),
        "hamming_loss": skm.hamming_loss(y, pred),
        "f1_micro": skm.f1_score(y, pred, average="micro", zero_division=0),
        "f1_macro": skm.f1_score(y, pred, average="macro", zero_division=0),
    }
    notes: list[str] = []
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
    p, r, f, support = skm.precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    names = labels or [str(j) for j in range(y.shape[1])]
    per_class = {
        names[j]: {"precision": float(p[j]), "recall": float(r[j]), "f1": float(f[j]), "support": int(support[j])}
        for j in range(y.shape[1])
    }
    return finished(Evaluation(metrics=m, per_class=per_class, notes=notes), len(y))


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
