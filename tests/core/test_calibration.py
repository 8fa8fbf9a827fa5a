"""Calibration (temperature, per-label Platt) and multi-label thresholds fitted on validation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.calibration import (MIN_EXAMPLES_PER_LABEL, decision_metric, apply, calibration_metrics, fit_calibration, fit_thresholds,
                              fit_temperature, measure)
from core.errors import ArtifactError
from core.manifest import Manifest, read_manifest, write_manifest
from core.metrics import multilabel_metrics
from core.tasks import Task, postprocess


def _overconfident(n: int, classes: int, temperature: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose true class probabilities are softmax(logits / temperature): a model that is too sure."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(n, classes))
    truth = postprocess(logits / temperature, "softmax")
    targets = np.array([rng.choice(classes, p=row) for row in truth])
    return logits, targets


def test_temperature_is_recovered_and_lowers_calibration_error():
    logits, targets = _overconfident(20_000, 4, temperature=2.5)
    assert fit_temperature(logits, targets) == pytest.approx(2.5, rel=0.05)
    calibration = fit_calibration(logits[:10_000], targets[:10_000], "softmax", list("abcd"))
    measure(calibration, "test", logits[10_000:], targets[10_000:], "softmax")
    before, after = calibration.before["test"], calibration.after["test"]
    assert after["ece"] < before["ece"] / 3 and after["brier"] < before["brier"] and after["log_loss"] < before["log_loss"]
    assert calibration.applied  # it helped validation
    # a temperature never changes the top class
    raw, calibrated = postprocess(logits, "softmax"), postprocess(apply(logits, calibration), "softmax")
    assert (raw.argmax(1) == calibrated.argmax(1)).all() and not np.allclose(raw, calibrated)


def test_a_calibration_that_does_not_help_validation_is_recorded_and_not_applied():
    # a model that is already calibrated: the fitted temperature is about 1, and on some draws it raises ECE
    candidates = []
    for seed in range(20):
        logits, targets = _overconfident(300, 3, temperature=1.0, seed=seed)
        calibration = fit_calibration(logits, targets, "softmax", list("abc"))
        before, after = calibration.before["validation"], calibration.after["validation"]
        assert calibration.applied == (after["log_loss"] <= before["log_loss"] and after["ece"] <= before["ece"])
        if not calibration.applied:
            candidates.append((logits, calibration))
    assert candidates, "no draw where the fitted temperature raised ECE"
    logits, calibration = candidates[0]
    np.testing.assert_array_equal(apply(logits, calibration), logits)  # served: the raw scores
    spec = Task.CLASSIFICATION.spec
    np.testing.assert_allclose(spec.scores(logits, calibration), postprocess(logits, "softmax"))


def test_platt_per_label_and_pooled_for_rare_labels():
    rng = np.random.default_rng(1)
    n = 6000
    logits = rng.normal(0, 2, size=(n, 3))
    # label 0: probability sigmoid(0.5 * logit - 1); label 1: well calibrated; label 2: almost never positive
    truth = 1 / (1 + np.exp(-np.stack([0.5 * logits[:, 0] - 1, logits[:, 1], logits[:, 2] - 9], axis=1)))
    targets = (rng.random((n, 3)) < truth).astype(np.float32)
    targets[:, 2] = 0
    targets[: MIN_EXAMPLES_PER_LABEL - 1, 2] = 1  # too few positives for a fit of its own
    calibration = fit_calibration(logits, targets, "sigmoid", ["a", "b", "rare"])
    assert calibration.method == "platt" and calibration.pooled == ["rare"]
    assert calibration.scale[0] == pytest.approx(0.5, abs=0.08) and calibration.bias[0] == pytest.approx(-1, abs=0.15)
    assert calibration.scale[1] == pytest.approx(1.0, abs=0.1) and calibration.bias[1] == pytest.approx(0, abs=0.1)
    after = calibration.after["validation"]
    assert after["ece"] < calibration.before["validation"]["ece"] and after["brier"] <= calibration.before["validation"]["brier"]


def test_calibration_metrics_of_a_perfect_and_an_overconfident_model():
    targets = np.array([0, 1, 1, 0])
    perfect = np.eye(2)[targets]
    assert calibration_metrics(perfect, targets, "softmax") == pytest.approx({"ece": 0.0, "brier": 0.0, "log_loss": 0.0}, abs=1e-9)
    wrong = np.eye(2)[1 - targets] * 0.98 + 0.01  # 99% sure, always wrong
    figures = calibration_metrics(wrong, targets, "softmax")
    assert figures["ece"] == pytest.approx(0.99) and figures["brier"] == pytest.approx(2 * 0.99 ** 2)


def test_thresholds_fit_each_label_and_keep_the_global_one_for_rare_labels():
    rng = np.random.default_rng(2)
    n = 2000
    targets = (rng.random((n, 3)) < [0.3, 0.3, 0.002]).astype(np.float32)
    # label 0's positives score around 0.3 (a 0.5 threshold misses them), label 1's around 0.8
    scores = np.clip(np.stack([
        np.where(targets[:, 0] == 1, 0.32, 0.12) + rng.normal(0, 0.04, n),
        np.where(targets[:, 1] == 1, 0.80, 0.55) + rng.normal(0, 0.04, n),
        rng.random(n) * 0.6,
    ], axis=1), 0, 1)
    global_t, thresholds, own = fit_thresholds(scores, targets, "f1_micro")
    assert own.tolist() == [True, True, targets[:, 2].sum() >= MIN_EXAMPLES_PER_LABEL]
    assert 0.15 < thresholds[0] < 0.3 and 0.55 < thresholds[1] < 0.8
    if not own[2]:
        assert thresholds[2] == global_t
    fitted = multilabel_metrics(targets, scores, list("abc"), thresholds).metrics
    fixed = multilabel_metrics(targets, scores, list("abc"), 0.5).metrics
    assert fitted["f1_micro"] > fixed["f1_micro"] + 0.2 and fitted["hamming_loss"] < fixed["hamming_loss"]
    # a ranking metric does not depend on thresholds: fitted for f1_micro then
    assert np.array_equal(fit_thresholds(scores, targets, "lrap")[1], thresholds)
    with pytest.raises(ValueError, match="choose one of"):
        decision_metric("roc_auc_macro", targets.astype(bool), scores >= 0.5)


def _multilabel_manifest(**changes) -> Manifest:
    fields = dict(name="m", task=Task.MULTILABEL, problem_type="multi_label_classification", labels=["a", "b"],
                  text_fields=["text"], label_field="labels", max_length=32, postprocess="sigmoid", threshold=0.4,
                  thresholds={"a": 0.3, "b": 0.7}, base_model="x", method="lora", trainable_parameters=1,
                  total_parameters=2, metrics={}, baselines={}, primary_metric="f1_micro")
    return Manifest(**{**fields, **changes})


def test_manifest_thresholds_decide_each_label(tmp_path):
    manifest = _multilabel_manifest()
    spec = manifest.task.spec
    scores = np.array([[0.35, 0.65], [0.25, 0.75]])
    assert spec.decide(manifest, scores) == [["a"], ["b"]]
    assert spec.shape(manifest, scores)[0]["labels"] == ["a"]
    write_manifest(manifest, tmp_path)
    assert read_manifest(tmp_path).decision_threshold.tolist() == [0.3, 0.7]


@pytest.mark.parametrize("change, message", [
    ({"thresholds": {"a": 0.3}}, "thresholds name other labels"),
    ({"calibration": {"method": "platt", "scale": [1.0], "bias": [0.0], "examples": 3, "before": {}, "after": {}}},
     "1 scales and 1 biases for 2 labels"),
])
def test_manifest_rejects_decisions_for_other_labels(tmp_path, change, message):
    write_manifest(_multilabel_manifest(), tmp_path)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    raw.update(change)
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match=message):
        read_manifest(tmp_path)


def test_spec_scores_apply_the_calibration():
    manifest = _multilabel_manifest(calibration={"method": "platt", "scale": [2.0, 0.5], "bias": [0.0, -1.0],
                                                 "examples": 3, "before": {}, "after": {}})
    logits = np.array([[1.0, 2.0]])
    expected = 1 / (1 + np.exp(-np.array([[2.0, 0.0]])))
    assert np.allclose(manifest.task.spec.scores(logits, manifest.calibration), expected)
    assert np.allclose(manifest.task.spec.scores(logits), 1 / (1 + np.exp(-logits)))
