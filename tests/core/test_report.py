"""What /evaluate and `tuneserve evaluate` answer: intervals, like-for-like training figures, drift."""

import numpy as np
import pytest

from core.manifest import Manifest
from core.report import assessed, report
from core.tasks import Task

LABELS = ["a", "b", "c", "d"]


def _manifest(test: dict, per_class: dict | None = None) -> Manifest:
    return Manifest(name="m", task=Task.CLASSIFICATION, problem_type="single_label_classification", labels=LABELS,
                    text_fields=["text"], label_field="label", max_length=64, postprocess="softmax", base_model="x",
                    method="full", trainable_parameters=1, total_parameters=2, metrics={"test": test},
                    baselines={}, primary_metric="f1_macro", per_class=per_class)


def _outputs(n: int, correct: float, classes: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n examples of the given classes, a share ``correct`` of them answered right with probability 0.7."""
    rng = np.random.default_rng(seed)
    y = rng.choice(classes, n)
    answer = np.where(rng.random(n) < correct, y, (y + 1) % len(LABELS))
    proba = np.full((n, len(LABELS)), 0.1)
    proba[np.arange(n), answer] = 0.7
    return y, proba


def test_drift_is_flagged_only_where_the_interval_excludes_the_training_figure():
    manifest = _manifest({"accuracy": 0.9, "f1_macro": 0.9, "log_loss": 0.5})
    # 400 examples at about 60% accuracy: far below training's 90%, beyond doubt
    body = report(manifest, assessed(manifest, *_outputs(400, 0.6, [0, 1, 2, 3])))
    assert {"accuracy", "f1_macro"} <= set(body["drift"])
    assert body["intervals"]["accuracy"][1] < 0.9
    # 10 examples at the same rate: a worse figure, but one ten examples cannot tell from chance
    small = report(manifest, assessed(manifest, *_outputs(10, 0.7, [0, 1, 2, 3], seed=3)))
    assert small["metrics"]["accuracy"] < 0.9 and small["drift"] == []
    low, high = small["intervals"]["accuracy"]
    assert low < 0.5 and high >= 0.9
    assert "f1_macro" not in small["intervals"]


def test_training_macro_figures_are_recomputed_over_the_labels_posted():
    per_class = {"a": {"precision": 0.9, "recall": 0.95, "f1": 0.92, "support": 50},
                 "b": {"precision": 0.8, "recall": 0.7, "f1": 0.75, "support": 50},
                 "c": {"precision": 0.3, "recall": 0.2, "f1": 0.24, "support": 50},
                 "d": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 50}}
    manifest = _manifest({"accuracy": 0.6, "f1_macro": 0.6025, "precision_macro": 0.625}, per_class)
    body = report(manifest, assessed(manifest, *_outputs(200, 0.85, [0, 1])))
    assert body["macro_over"] == ["a", "b"]
    assert body["training_metrics"]["f1_macro"] == pytest.approx((0.92 + 0.75) / 2)
    assert body["training_metrics"]["precision_macro"] == pytest.approx((0.9 + 0.8) / 2)
    assert body["training_metrics"]["accuracy"] == 0.6  # not an average over labels: as recorded
    assert body["delta"]["f1_macro"] == pytest.approx(body["metrics"]["f1_macro"] - (0.92 + 0.75) / 2)
    assert any("recomputed over the 2 labels present here" in note for note in body["notes"])
    # with every label posted, the recorded figure stands
    full = report(manifest, assessed(manifest, *_outputs(200, 0.85, [0, 1, 2, 3])))
    assert full["training_metrics"]["f1_macro"] == 0.6025
