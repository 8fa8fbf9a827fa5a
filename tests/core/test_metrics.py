import math

import numpy as np
import pytest

from core.tasks import Task


def test_binary_classification_against_hand_computed_values():
    # targets: 1 1 0 0 1; predictions (argmax): 1 0 0 1 1 -> TP=2 FN=1 TN=1 FP=1
    y = np.array([1, 1, 0, 0, 1])
    p1 = np.array([0.9, 0.4, 0.2, 0.6, 0.8])
    scores = np.stack([1 - p1, p1], axis=1)
    result = Task.CLASSIFICATION.spec.evaluate(y, scores, ["neg", "pos"])
    m = result.metrics
    assert m["accuracy"] == pytest.approx(3 / 5)
    # class pos: precision 2/3, recall 2/3; class neg: precision 1/2, recall 1/2
    assert m["f1_macro"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["precision_weighted"] == pytest.approx((2 / 3 * 3 + 1 / 2 * 2) / 5)
    # AUC: positives {0.9,0.4,0.8} vs negatives {0.2,0.6}: pairs won 2+1+2 = 5 of 6
    assert m["roc_auc"] == pytest.approx(5 / 6)
    expected_log_loss = -np.mean([math.log(0.9), math.log(0.4), math.log(0.8), math.log(0.8), math.log(0.4)])
    assert m["log_loss"] == pytest.approx(expected_log_loss)
    assert result.confusion_matrix == [[1, 1], [1, 2]]
    assert result.per_class["pos"]["support"] == 3


def test_multiclass_auc_is_skipped_with_a_note_when_a_class_is_absent():
    y = np.array([0, 1, 0, 1])
    scores = np.full((4, 3), 1 / 3)
    result = Task.CLASSIFICATION.spec.evaluate(y, scores, ["a", "b", "c"])
    assert "roc_auc" not in result.metrics
    assert any("roc_auc" in note for note in result.notes)


def test_multilabel_metrics():
    y = np.array([[1, 0, 1], [0, 1, 0]])
    proba = np.array([[0.9, 0.2, 0.4], [0.1, 0.8, 0.3]])
    m = Task.MULTILABEL.spec.evaluate(y, proba, ["a", "b", "c"]).metrics
    # predictions: [1,0,0], [0,1,0] -> one of six cells wrong
    assert m["hamming_loss"] == pytest.approx(1 / 6)
    assert m["subset_accuracy"] == pytest.approx(0.5)
    # micro: TP=2, FP=0, FN=1 -> F1 = 4/5
    assert m["f1_micro"] == pytest.approx(0.8)
    assert m["roc_auc_macro"] == pytest.approx(1.0)
    assert m["lrap"] == pytest.approx(1.0)  # every true label is ranked above every false one
    assert m["ndcg"] == pytest.approx(1.0)


def test_regression_metrics():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    pred = np.array([1.5, 2.0, 2.5, 5.0])
    m = Task.REGRESSION.spec.evaluate(y, pred).metrics
    assert m["mse"] == pytest.approx((0.25 + 0 + 0.25 + 1) / 4)
    assert m["rmse"] == pytest.approx(math.sqrt(1.5 / 4))
    assert m["mae"] == pytest.approx(2 / 4)
    assert m["r2"] == pytest.approx(1 - 1.5 / 5)
    assert m["spearman"] == pytest.approx(1.0)


def test_constant_predictions_leave_correlations_out():
    result = Task.REGRESSION.spec.evaluate(np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 2.0]))
    assert "pearson" not in result.metrics and result.notes
    assert result.metrics["r2"] == pytest.approx(0.0)


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError, match="2 targets but 3"):
        Task.REGRESSION.spec.evaluate(np.zeros(2), np.zeros(3))
