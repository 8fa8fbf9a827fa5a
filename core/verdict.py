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
