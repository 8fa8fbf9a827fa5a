"""Labelled data scored after training, set beside the figures recorded at training: what ``/evaluate`` answers and
``tuneserve evaluate`` prints and writes, from one function so the two cannot disagree.

Every metric comes with a 95% interval (:meth:`core.tasks.base.TaskSpec.assess`). The training figure it is compared
with is like for like: where the posted targets hold only some of the model's labels, macro averages are over those
labels, and the training figure is recomputed over the same labels from the per-label test figures the artifact
records. A metric drifts only when its interval excludes that figure: a difference the sample cannot tell from
chance is not reported as one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from core.manifest import Manifest
    from core.metrics import Evaluation

# macro metric -> the per-label figure it averages
MACRO_OF = {"precision_macro": "precision", "recall_macro": "recall", "f1_macro": "f1"}


# how many of the worst-answered examples an evaluation lists
WORST = 10


def assessed(manifest: Manifest, targets: Any, scores: Any) -> Evaluation:
    """The task's metrics of ``scores`` against ``targets``, each with its 95% interval, and the examples it
    answered worst."""
    evaluation = manifest.task.spec.assess(targets, scores, manifest.labels, threshold=manifest.decision_threshold)
    evaluation.worst = worst_examples(manifest, targets, scores)
    return evaluation


def worst_examples(manifest: Manifest, targets: Any, scores: Any, k: int = WORST) -> dict | None:
    """The ``k`` examples of highest loss (the task's :meth:`~core.tasks.base.TaskSpec.losses`), worst first: each
    one's index among the examples, the model's decision and the loss; None for a task without a loss."""
    from core.metrics import take

    spec = manifest.task.spec
    losses = spec.losses(targets, scores, threshold=manifest.decision_threshold)
    if losses is None:
        return None
    order = np.argsort(-losses, kind="stable")[:k]
    decisions = spec.decide(manifest, take(scores, order))
    return {"by": spec.loss_name, "examples": [{"index": int(i), "prediction": decision, "loss": float(losses[i])}
                                               for i, decision in zip(order, decisions)]}


def training_figures(manifest: Manifest, evaluation: Evaluation) -> tuple[dict[str, float], list[str]]:
    """The test metrics recorded at training, with macro averages recomputed over the labels the evaluation averages
    over where those differ from the labels of the training test split.

    Returns:
        metric -> figure, and notes saying which figures were recomputed.
    """
    recorded = {k: float(v) for k, v in (manifest.metrics.get("test") or {}).items() if math.isfinite(v)}
    per_label = manifest.per_class or {}
    if evaluation.macro_over is None or not per_label:
        return recorded, []
    measured = {label for label, row in per_label.items() if row.get("support", 0) > 0}
    here = [label for label in evaluation.macro_over if label in measured]
    if set(here) == measured or not here:
        return recorded, []
    notes = []
    for metric, figure in MACRO_OF.items():
        if metric in recorded and all(figure in per_label[label] for label in here):
            was = recorded[metric]
            recorded[metric] = float(np.mean([per_label[label][figure] for label in here]))
            notes.append(f"training {metric} recomputed over the {len(here)} labels present here: "
                         f"{recorded[metric]:.4f} (recorded over all {len(measured)}: {was:.4f})")
    return recorded, notes


def report(manifest: Manifest, evaluation: Evaluation) -> dict:
    """The evaluation beside training: ``n``, ``metrics``, ``intervals`` (metric -> [low, high]), the like-for-like
    ``training_metrics``, ``delta`` (metrics minus training's), ``drift`` (metrics whose interval excludes the
    training figure), ``macro_over``, the tables the task fills (its spec's ``evaluation_tables``) and ``notes``."""
    metrics = {k: float(v) for k, v in evaluation.metrics.items() if math.isfinite(v)}
    training, notes = training_figures(manifest, evaluation)
    bounds = {k: [float(low), float(high)] for k, (low, high) in evaluation.intervals.items() if k in metrics}
    drift = [k for k in metrics if k in bounds and k in training
             and not bounds[k][0] <= training[k] <= bounds[k][1]]
    tables = {
        "per_class": {label: {k: float(v) for k, v in row.items() if math.isfinite(v)}
                      for label, row in (evaluation.per_class or {}).items()} or None,
        "confusion_matrix": (np.asarray(evaluation.confusion_matrix).tolist()
                             if evaluation.confusion_matrix is not None else None),
    }
    return {
        "n": int(evaluation.n),
        "metrics": metrics,
        "intervals": bounds,
        "training_metrics": training,
        "delta": {k: metrics[k] - training[k] for k in metrics if k in training},
        "drift": drift,
        **({"macro_over": list(evaluation.macro_over)} if evaluation.macro_over is not None else {}),
        **({"worst": evaluation.worst} if evaluation.worst is not None else {}),
        **{name: table for name, table in tables.items()
           if name in manifest.task.spec.evaluation_tables and table is not None},
        "notes": (list(evaluation.notes) + notes
                  + [f"{k} left out: not finite" for k in evaluation.metrics if k not in metrics]),
    }
