"""Task definitions: what a model outputs and how raw outputs become scores.

A task fixes three things that training and serving must never disagree on:
the Hugging Face ``problem_type``, how logits are post-processed into scores, and which metric
early stopping watches by default.
"""

from __future__ import annotations

from enum import Enum

import numpy as np


class Task(str, Enum):
    CLASSIFICATION = "classification"
    MULTILABEL = "multilabel"
    REGRESSION = "regression"

    @property
    def problem_type(self) -> str:
        return {
            Task.CLASSIFICATION: "single_label_classification",
            Task.MULTILABEL: "multi_label_classification",
            Task.REGRESSION: "regression",
        }[self]

    @property
    def postprocess(self) -> str:
        """Name of the function that turns logits into scores (recorded in the manifest)."""
        return {Task.CLASSIFICATION: "softmax", Task.MULTILABEL: "sigmoid", Task.REGRESSION: "identity"}[self]

    @property
    def default_metric(self) -> str:
        return {Task.CLASSIFICATION: "f1_macro", Task.MULTILABEL: "f1_micro", Task.REGRESSION: "r2"}[self]


# Metrics where smaller is better; every other metric is maximised.
LOWER_IS_BETTER = frozenset({"loss", "log_loss", "hamming_loss", "mse", "rmse", "mae"})


def is_better(metric: str, candidate: float, best: float | None) -> bool:
    """Whether ``candidate`` improves on ``best`` for ``metric`` (``best=None`` means no value yet)."""
    if best is None:
        return True
    return candidate < best if metric in LOWER_IS_BETTER else candidate > best


def postprocess(logits: np.ndarray, kind: str) -> np.ndarray:
    """Turn raw model outputs into scores: class probabilities, label probabilities or values.

    Args:
        logits: array of shape (n, num_outputs).
        kind: ``softmax`` | ``sigmoid`` | ``identity`` as recorded in the manifest.

    Returns:
        float64 array; shape (n, num_outputs), except ``identity`` with one output, which gives (n,).
    """
    logits = np.asarray(logits, dtype=np.float64)
    if kind == "softmax":
        shifted = logits - logits.max(axis=-1, keepdims=True)
        exp = np.exp(shifted)
        return exp / exp.sum(axis=-1, keepdims=True)
    if kind == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    if kind == "identity":
        return logits[:, 0] if logits.ndim == 2 and logits.shape[1] == 1 else logits
    raise ValueError(f"unknown post-processing {kind!r}; expected softmax, sigmoid or identity")
