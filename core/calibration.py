"""Scores that mean what they say, and multi-label decisions fitted on validation.

Both are fitted on the validation split after training, recorded in the manifest, and applied by every backend
through :meth:`core.tasks.base.TaskSpec.scores` (the export gate and the self-test included), so a served 0.9 is
right about 90% of the time and the decisions the service makes are the ones the trainer measured.

- **Calibration** rescales the logits before softmax / sigmoid: ``logits * scale + bias``, one ``scale`` and
  ``bias`` per output. Single-label classification fits one temperature (Guo et al. 2017, "On Calibration of
  Modern Neural Networks": ``scale = 1 / T``, ``bias = 0``), which never changes the top class. Multi-label
  fits Platt scaling per label (a logistic regression on the label's logit), which can correct a label whose
  probabilities ``pos_weight`` inflated; a label with too few positives (or negatives) on validation to fit
  its own takes the pooled fit of all such labels.
- **Thresholds** (multi-label): one decision threshold per label, chosen on the calibrated validation
  probabilities for the primary metric by coordinate ascent from the best global threshold; a label with
  too few positives on validation keeps the global one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

# A label needs this many positive and negative validation examples to get its own Platt fit or threshold.
MIN_EXAMPLES_PER_LABEL = 8
BINS = 15  # equal-width confidence bins of the expected calibration error and the reliability diagram
THRESHOLD_GRID = np.round(np.arange(0.02, 0.99, 0.01), 2)
DECISION_METRICS = ("f1_micro", "f1_macro", "subset_accuracy", "hamming_loss")
# The temperature's range: on a validation split the model separates perfectly the likelihood keeps rising as T
# falls, and an unbounded fit would push every score to 0 or 1.
TEMPERATURE_RANGE = (0.25, 20.0)


@dataclass
class Decisions:
    """What turns a model's logits into its scores and decisions: the calibration and the multi-label threshold(s)."""
    calibration: Calibration | None = None
    threshold: float | np.ndarray = 0.5  # one, or one per label
    global_threshold: float | None = None  # per-label thresholds: the one labels too rare to fit their own got


class Calibration(BaseModel):
    """How logits become calibrated scores, and what it changed (in the manifest)."""

    method: Literal["temperature", "platt"] = Field(description="temperature (single-label) or per-label Platt "
                                                     "scaling (multi-label).")
    scale: list[float] = Field(description="Per output: calibrated logit = logit * scale + bias.")
    bias: list[float] = Field(description="Per output; see scale.")
    temperature: float | None = Field(None, description="temperature: the fitted T (scale = 1 / T).")
    pooled: list[str] = Field(default_factory=list, description="platt: labels too rare on validation for their "
                              "own fit, which share one.")
    fitted_on: str = Field("validation", description="The split it was fitted on.")
    examples: int = Field(description="Examples it was fitted on.")
    before: dict[str, dict[str, float]] = Field(description="split -> ece, brier, log_loss of the raw scores.")
    after: dict[str, dict[str, float]] = Field(description="split -> the same of the calibrated scores.")
    applied: bool = Field(True, description="Whether scores are calibrated with it: only where it lowered log loss "
                          "and did not raise ECE on the split it was fitted on; otherwise it is recorded as tried "
                          "and the raw scores are served.")


def apply(logits: np.ndarray, calibration: Calibration | None) -> np.ndarray:
    """Calibrated logits (the logits themselves when ``calibration`` is None or was not applied)."""
    if calibration is None or not calibration.applied:
        return logits
    return rescaled(logits, calibration)


def rescaled(logits: np.ndarray, calibration: Calibration) -> np.ndarray:
    """The logits as ``calibration`` rescales them, applied or not."""
    return np.asarray(logits, dtype=np.float64) * np.asarray(calibration.scale) + np.asarray(calibration.bias)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature in :data:`TEMPERATURE_RANGE` that minimises the negative log-likelihood of class ids
    ``targets``."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(targets))

    def nll(log_t: float) -> float:
        scaled = logits / np.exp(log_t)
        scaled = scaled - scaled.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(scaled).sum(axis=1)) - scaled[rows, targets]))

    return float(np.exp(minimize_scalar(nll, bounds=tuple(np.log(TEMPERATURE_RANGE)), method="bounded").x))


def _platt(logit: np.ndarray, outcome: np.ndarray) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegression

    # Mild regularisation (C=1) keeps the slope finite where validation separates the label perfectly.
    model = LogisticRegression(C=1.0).fit(logit.reshape(-1, 1), outcome)
    return float(model.coef_[0, 0]), float(model.intercept_[0])


def fit_platt(logits: np.ndarray, targets: np.ndarray, labels: Sequence[str]) -> tuple[list[float], list[float], list[str]]:
    """Per-label Platt scaling of multi-label logits against multi-hot ``targets``.

    Returns:
        ``(scale, bias, pooled)``: per label, and the labels that share the pooled fit.
    """
    logits, targets = np.asarray(logits, dtype=np.float64), np.asarray(targets).astype(np.int64)
    positives = targets.sum(axis=0)
    own = (positives >= MIN_EXAMPLES_PER_LABEL) & (len(targets) - positives >= MIN_EXAMPLES_PER_LABEL)
    scale, bias = np.ones(logits.shape[1]), np.zeros(logits.shape[1])
    for j in np.flatnonzero(own):
        scale[j], bias[j] = _platt(logits[:, j], targets[:, j])
    rare = np.flatnonzero(~own)
    if len(rare):
        pooled_t = targets[:, rare].ravel()
        if 0 < pooled_t.sum() < len(pooled_t):
            scale[rare], bias[rare] = _platt(logits[:, rare].ravel(), pooled_t)
    return scale.tolist(), bias.tolist(), [labels[j] for j in rare]


def calibration_metrics(scores: np.ndarray, targets: np.ndarray, kind: str) -> dict[str, float]:
    """Expected calibration error (top-label confidence for single-label, every label's probability for
    multi-label; 15 equal-width bins), Brier score and log loss."""
    scores = np.clip(np.asarray(scores, dtype=np.float64), 1e-12, 1 - 1e-12)
    if kind == "softmax":
        onehot = np.eye(scores.shape[1])[np.asarray(targets, dtype=np.int64)]
        confidence, correct = scores.max(axis=1), (scores.argmax(axis=1) == targets).astype(np.float64)
        brier = float(np.mean(np.sum((scores - onehot) ** 2, axis=1)))
        log_loss = float(-np.mean(np.log(scores[np.arange(len(targets)), targets])))
    else:
        outcome = np.asarray(targets, dtype=np.float64)
        confidence, correct = scores.ravel(), outcome.ravel()
        brier = float(np.mean((scores - outcome) ** 2))
        log_loss = float(-np.mean(outcome * np.log(scores) + (1 - outcome) * np.log(1 - scores)))
    _, mean_conf, accuracy, counts = reliability(confidence, correct)
    ece = float(np.sum(counts * np.abs(mean_conf - accuracy)) / max(counts.sum(), 1))
    return {"ece": ece, "brier": brier, "log_loss": log_loss}


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin: its centre, mean confidence, observed frequency and count (empty bins
    have zeros)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    counts = np.bincount(which, minlength=bins).astype(np.float64)
    safe = np.maximum(counts, 1)
    mean_conf = np.bincount(which, weights=confidence, minlength=bins) / safe
    accuracy = np.bincount(which, weights=correct, minlength=bins) / safe
    return (edges[:-1] + edges[1:]) / 2, mean_conf, accuracy, counts


def fit_calibration(logits: np.ndarray, targets: np.ndarray, kind: str, labels: Sequence[str]) -> Calibration:
    """Fit on validation logits: a temperature for ``softmax`` outputs, per-label Platt scaling for ``sigmoid``.
    The before/after figures hold the split it was fitted on; add others with :func:`measure`."""
    logits = np.asarray(logits, dtype=np.float64)
    if kind == "softmax":
        temperature = fit_temperature(logits, np.asarray(targets, dtype=np.int64))
        calibration = Calibration(method="temperature", scale=[1.0 / temperature] * logits.shape[1],
                                  bias=[0.0] * logits.shape[1], temperature=temperature, examples=len(logits),
                                  before={}, after={})
    elif kind == "sigmoid":
        scale, bias, pooled = fit_platt(logits, targets, labels)
        calibration = Calibration(method="platt", scale=scale, bias=bias, pooled=pooled, examples=len(logits),
                                  before={}, after={})
    else:
        raise ValueError(f"no calibration for {kind!r} outputs")
    measure(calibration, "validation", logits, targets, kind)
    before, after = calibration.before["validation"], calibration.after["validation"]
    # applied only where it helps the split it was fitted on: a calibration that makes scores worse there would
    # weaken the claim that a served probability means what it says
    calibration.applied = (after["log_loss"] <= before["log_loss"] and after["ece"] <= before["ece"]
                           and (after["log_loss"], after["ece"]) != (before["log_loss"], before["ece"]))
    return calibration


def measure(calibration: Calibration, split: str, logits: np.ndarray, targets: np.ndarray, kind: str) -> None:
    """Record the calibration figures of ``split`` before and after ``calibration``."""
    squash = _softmax if kind == "softmax" else _sigmoid
    logits = np.asarray(logits, dtype=np.float64)
    calibration.before[split] = calibration_metrics(squash(logits), targets, kind)
    calibration.after[split] = calibration_metrics(squash(rescaled(logits, calibration)), targets, kind)


# -- multi-label thresholds ------------------------------------------------------------------------------------
def decision_metric(metric: str, targets: np.ndarray, pred: np.ndarray) -> float:
    """``metric`` of multi-hot decisions (higher is better; Hamming loss negated), as core.metrics computes it."""
    tp = (pred & targets).sum(axis=0).astype(np.float64)
    fp = (pred & ~targets).sum(axis=0).astype(np.float64)
    fn = (~pred & targets).sum(axis=0).astype(np.float64)
    if metric == "f1_micro":
        denominator = 2 * tp.sum() + fp.sum() + fn.sum()
        return float(2 * tp.sum() / denominator) if denominator else 0.0
    if metric == "f1_macro":
        denominator = 2 * tp + fp + fn
        return float(np.mean(np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)))
    if metric == "subset_accuracy":
        return float(np.mean((pred == targets).all(axis=1)))
    if metric == "hamming_loss":
        return -float(np.mean(pred != targets))
    raise ValueError(f"thresholds cannot be fitted for {metric!r}; choose one of {list(DECISION_METRICS)}")


def fit_thresholds(scores: np.ndarray, targets: np.ndarray, metric: str) -> tuple[float, np.ndarray, np.ndarray]:
    """Decision thresholds for multi-label ``scores`` that maximise ``metric`` on these examples.

    A ranking metric (ROC-AUC, NDCG, LRAP) does not depend on the thresholds: fit for f1_micro then. Ties go
    to the threshold nearest 0.5, so that a flat stretch does not move a threshold to its edge.

    Returns:
        ``(global_threshold, per_label, own)``: the best single threshold; per label, its threshold (the global
        one where the label has fewer than :data:`MIN_EXAMPLES_PER_LABEL` positives); and which labels got
        their own.
    """
    metric = metric if metric in DECISION_METRICS else "f1_micro"
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets).astype(bool)
    order = np.argsort(np.abs(THRESHOLD_GRID - 0.5), kind="stable")  # nearest 0.5 first: wins ties
    grid = THRESHOLD_GRID[order]
    global_t = float(grid[np.argmax([decision_metric(metric, targets, scores >= t) for t in grid])])
    thresholds = np.full(scores.shape[1], global_t)
    own = targets.sum(axis=0) >= MIN_EXAMPLES_PER_LABEL
    pred = scores >= thresholds
    for _ in range(2):  # coordinate ascent: a second pass settles labels whose best moved with the others
        for j in np.flatnonzero(own):
            values = []
            for t in grid:
                pred[:, j] = scores[:, j] >= t
                values.append(decision_metric(metric, targets, pred))
            thresholds[j] = grid[int(np.argmax(values))]
            pred[:, j] = scores[:, j] >= thresholds[j]
    return global_t, thresholds, own
