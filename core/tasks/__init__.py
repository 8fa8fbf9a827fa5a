"""Tasks as plug-ins: one module per task family, each a :class:`~core.tasks.base.TaskSpec`.

A task spec owns everything training and serving must never disagree on: how labels are read and
checked, the label vocabulary, how raw outputs become scores and decisions, how a decision is shaped as
JSON, which metrics and baselines apply, how two backends are compared, and the request and response
models of the HTTP API. ``Task.X.spec`` is the one way in; nothing outside this package (and the
torch-side registry in ``training/tasks.py``) branches on the task.

Adding a task: write a module here with a ``TaskSpec`` subclass, add its name to :class:`Task` and its
spec to ``_SPECS`` below, and add its torch side (model class, peft task type, loss, collator) to
``training/tasks.py``.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from core.tasks.base import TaskSpec


class Task(str, Enum):
    CLASSIFICATION = "classification"
    MULTILABEL = "multilabel"
    REGRESSION = "regression"
    TOKEN_CLASSIFICATION = "token_classification"
    GENERATION = "generation"

    @property
    def spec(self) -> TaskSpec:
        """This task's spec (the registry lives in :func:`spec_for`)."""
        return spec_for(self)


_SPECS: dict[Task, TaskSpec] = {}


def spec_for(task: Task | str) -> TaskSpec:
    """The spec of a task (by enum member or name)."""
    if not _SPECS:
        from core.tasks.generation import GenerationSpec
        from core.tasks.sequence import ClassificationSpec, MultiLabelSpec, RegressionSpec
        from core.tasks.token import TokenClassificationSpec

        _SPECS.update({Task.CLASSIFICATION: ClassificationSpec(), Task.MULTILABEL: MultiLabelSpec(),
                       Task.REGRESSION: RegressionSpec(), Task.TOKEN_CLASSIFICATION: TokenClassificationSpec(),
                       Task.GENERATION: GenerationSpec()})
    return _SPECS[Task(task)]


# Metrics where smaller is better; every other metric is maximised.
LOWER_IS_BETTER = frozenset({"loss", "log_loss", "hamming_loss", "mse", "rmse", "mae", "perplexity"})


def is_better(metric: str, candidate: float, best: float | None) -> bool:
    """Whether ``candidate`` improves on ``best`` for ``metric`` (``best=None`` means no value yet)."""
    if best is None:
        return True
    return candidate < best if metric in LOWER_IS_BETTER else candidate > best


def postprocess(logits: np.ndarray, kind: str) -> np.ndarray:
    """Turn raw model outputs into scores: class probabilities, label probabilities or values.

    Args:
        logits: array of shape (..., num_outputs).
        kind: ``softmax`` | ``sigmoid`` | ``identity`` as recorded in the manifest.

    Returns:
        float64 array of the same shape, except ``identity`` with one output per example, which gives (n,).
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
