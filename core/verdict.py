"""Whether a trained model beats its baselines on the primary metric (the end-of-training log, the card)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.tasks import LOWER_IS_BETTER, is_better

if TYPE_CHECKING:
    from core.manifest import Manifest


@dataclass(frozen=True)
class BaselineVerdict:
    """The model's test score on ``metric`` against the best baseline's."""

    metric: str
    model: float
    baseline: str  # name of the best baseline (the first of equals)
    baseline_value: float
    beats: bool  # strictly better than every baseline; a tie does not beat

    @property
    def lower_is_better(self) -> bool:
        return self.metric in LOWER_IS_BETTER

    @property
    def message(self) -> str:
        """One line for the log: the verdict with both figures."""
        figures = f"test {self.metric} {self.model:.4f} against {self.baseline_value:.4f} for baseline {self.baseline}"
        if self.beats:
            return f"the model beats its best baseline: {figures}"
        return (f"the model does NOT beat its best baseline: {figures} "
                f"({'lower' if self.lower_is_better else 'higher'} is better)")


def compare_with_baselines(metric: str, value: float, baselines: dict[str, dict[str, float]]) -> BaselineVerdict | None:
    """The best baseline on ``metric`` and whether ``value`` beats it.

    Returns:
        None when no baseline reports ``metric``.
    """
    best_name, best_value = None, None
    for name, metrics in baselines.items():
        if metric in metrics and (best_value is None or is_better(metric, metrics[metric], best_value)):
            best_name, best_value = name, metrics[metric]
    if best_name is None:
        return None
    return BaselineVerdict(metric=metric, model=value, baseline=best_name, baseline_value=best_value,
                           beats=is_better(metric, value, best_value))


def baseline_verdict(manifest: Manifest) -> BaselineVerdict | None:
    """Whether the model beats its best baseline on the test primary metric.

    Returns:
        None when the manifest has no test value of the primary metric or no baseline reports it.
    """
    value = manifest.metrics.get("test", {}).get(manifest.primary_metric)
    if value is None:
        return None
    return compare_with_baselines(manifest.primary_metric, value, manifest.baselines)


@dataclass(frozen=True)
class Diagnosis:
    """The likeliest reason a model lost to its baseline, read from its own run, and the one setting to try."""

    reason: str
    override: str  # ``key=value`` for ``--set``, or advice where no single setting applies

    @property
    def message(self) -> str:
        """One line: the reason, then what to try."""
        setting = "=" in self.override and " " not in self.override
        return f"likeliest reason: {self.reason}; try {'--set ' if setting else ''}{self.override}"


# A quarter of the logged training losses: the first and the last are compared.
_LOSS_WINDOW = 4
# The last quarter's mean loss above this share of the first quarter's: the loss did not really fall; above the
# first's divided by it, it rose.
_FLAT_LOSS = 0.9
# The last evaluation's gain over the one before, relative to the metric's size, that counts as still improving.
_STILL_RISING = 0.005


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def diagnose(verdict: BaselineVerdict, history: dict[str, list[dict]] | None, per_class: dict[str, dict] | None,
             *, method: str, cap: tuple[str, float], lr: float, stopped_early: bool,
             head_lr: float | None = None, threshold: float | None = None) -> Diagnosis:
    """Why the model did not beat ``verdict``'s baseline, in the order of what the run's history shows first:
    a training loss that did not fall (the learning rate), a validation metric still improving at the last
    evaluation (too few epochs), classes or tags that were never found (a new head far behind the body), else the
    baseline's own strength (more data, or full fine-tuning).

    Args:
        history: the manifest's ``training.history`` (``train_loss`` per logged step, ``validation`` per evaluation).
        per_class: the test split's per-class (per-type, per-label) figures, where the task has them.
        cap: the setting that ended the run and its value (``("train.epochs", 3)``, ``("train.max_steps", 500)``):
            the one to raise when the model was still improving.
        lr: the learning rate the run used (the body's).
        stopped_early: early stopping ended the run (its patience ran out).
        head_lr: the task head's learning rate, where it had its own (None: lr).
        threshold: the one decision threshold every label was held to (multi-label), where the config fixed it
            (None: fitted per label, or a task without one).
    """
    history = history or {}
    losses = [float(e["loss"]) for e in history.get("train_loss", []) if e.get("loss") is not None]
    if len(losses) >= 2 * _LOSS_WINDOW:
        quarter = max(len(losses) // _LOSS_WINDOW, 1)
        first, last = _mean(losses[:quarter]), _mean(losses[-quarter:])
        if last * _FLAT_LOSS > first:
            return Diagnosis(f"the training loss rose ({first:.3g} -> {last:.3g}): the learning rate is too high",
                             f"train.lr={lr / 3:.1e}")
        if last >= _FLAT_LOSS * first:
            return Diagnosis(f"the training loss barely fell ({first:.3g} -> {last:.3g}): the learning rate is too "
                             "low to move the model", f"train.lr={lr * 3:.1e}")
    metric = verdict.metric
    values = [float(e[metric]) for e in history.get("validation", []) if e.get(metric) is not None]
    if values and not stopped_early:
        gain = (values[-1] - values[-2]) if len(values) > 1 else None
        if gain is not None and verdict.lower_is_better:
            gain = -gain
        best_last = all(not is_better(metric, v, values[-1]) for v in values)
        if best_last and (gain is None or gain > _STILL_RISING * max(abs(values[-1]), 1e-3)):
            seen = f"{values[-2]:.4f} -> {values[-1]:.4f}" if len(values) > 1 else f"{values[-1]:.4f}, one evaluation"
            key, value = cap
            raised = max(2 * value, value + 2) if isinstance(value, int) else 2 * value
            return Diagnosis(f"validation {metric} was still improving when training stopped ({seen})",
                             f"{key}={raised:g}")
    missed = sorted(name for name, figures in (per_class or {}).items()
                    if figures.get("support", 0) > 0 and figures.get("recall", 1.0) == 0.0)
    if missed:
        shown = ", ".join(missed[:5]) + (f" and {len(missed) - 5} more" if len(missed) > 5 else "")
        if threshold is not None:
            return Diagnosis(f"{len(missed)} of {len(per_class)} labels were never predicted on the test split "
                             f"({shown}) at the fixed threshold {threshold:g}: a rare label's probability seldom "
                             "reaches it, where a threshold fitted per label on validation would find it",
                             "train.threshold=auto")
        return Diagnosis(f"{len(missed)} of {len(per_class)} classes were never found on the test split ({shown}): "
                         "the new head lags behind the pretrained body",
                         f"train.head_lr={max(3 * (head_lr or lr), 10 * lr, 1e-3):.1e}")
    if method != "full":
        return Diagnosis(f"the {verdict.baseline} baseline does better from the training words alone, and "
                         f"{method} adapts only part of the model", "method=full")
    return Diagnosis(f"the {verdict.baseline} baseline does better from the training words alone",
                     "more training data, or a larger base model")
