"""From scores to predictions: the one place that decides labels and shapes them for people and clients.

The command line's ``predict``, the service's ``/predict`` and its start-up self-test all call these, so a
label is decided the same way wherever a model runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from core.manifest import Manifest
from core.tasks import Task


def decide(manifest: Manifest, scores: np.ndarray) -> list[Any]:
    """The predicted label of each example: a class name, a list of label names, or a value.

    Args:
        manifest: the artifact's manifest (task, label order, threshold).
        scores: post-processed model outputs, shape (n, C) or (n,) for regression.
    """
    if manifest.task is Task.REGRESSION:
        return [float(v) for v in np.reshape(scores, (len(scores), -1))[:, 0]]
    if manifest.task is Task.CLASSIFICATION:
        return [manifest.labels[int(i)] for i in np.argmax(scores, axis=1)]
    return [[name for name, p in zip(manifest.labels, row) if p >= manifest.decision_threshold] for row in scores]


def margins(manifest: Manifest, scores: np.ndarray) -> np.ndarray:
    """How far each example is from a different decision (0 for regression, which has no decision).

    Classification: top score minus the runner-up. Multi-label: the smallest distance of any label's
    score from the threshold. Used to pick self-test examples whose label a faithful copy must reproduce.
    """
    if manifest.task is Task.REGRESSION:
        return np.zeros(len(scores))
    if manifest.task is Task.CLASSIFICATION:
        top2 = np.sort(scores, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    return np.min(np.abs(scores - manifest.decision_threshold), axis=1)


def shape(manifest: Manifest, scores: np.ndarray, *, top_k: int | None = None,
          ndigits: int | None = None) -> list[dict[str, Any]]:
    """One JSON-ready dict per example.

    Classification: ``{"label", "score", "scores": {label: p}}`` with ``scores`` limited to the ``top_k``
    most likely labels (all when ``None``), most likely first. Multi-label: ``{"labels", "scores"}``.
    Regression: ``{"value"}``.
    """
    def num(x: float) -> float:
        return round(float(x), ndigits) if ndigits is not None else float(x)

    decided = decide(manifest, scores)
    out: list[dict[str, Any]] = []
    for i, decision in enumerate(decided):
        if manifest.task is Task.REGRESSION:
            out.append({"value": num(decision)})
        elif manifest.task is Task.CLASSIFICATION:
            order = np.argsort(-scores[i], kind="stable")[:top_k]
            out.append({"label": decision, "score": num(scores[i].max()),
                        "scores": {manifest.labels[j]: num(scores[i][j]) for j in order}})
        else:
            out.append({"labels": decision, "scores": {n: num(p) for n, p in zip(manifest.labels, scores[i])}})
    return out
