import numpy as np
import pytest

from core.tasks import Task, is_better, postprocess
from core.tasks.base import LabelError


def parse_label(task, value, delimiter=None):
    return task.spec.parse_label(value, delimiter)


def test_postprocess_matches_definitions():
    logits = np.array([[1.0, 2.0, 3.0]])
    soft = postprocess(logits, "softmax")
    assert soft.sum() == pytest.approx(1.0)
    assert soft[0, 2] == pytest.approx(np.exp(3) / np.exp([1, 2, 3]).sum())
    assert postprocess(np.array([[0.0]]), "sigmoid")[0, 0] == pytest.approx(0.5)
    assert postprocess(np.array([[1.5], [-2.0]]), "identity").tolist() == [1.5, -2.0]
    with pytest.raises(ValueError):
        postprocess(logits, "tanh")


def test_is_better_knows_direction():
    assert is_better("loss", 0.1, 0.2) and not is_better("loss", 0.3, 0.2)
    assert is_better("f1_macro", 0.9, 0.8) and is_better("r2", -1.0, None)


def test_parse_labels_per_task():
    assert parse_label(Task.CLASSIFICATION, 1) == "1"
    assert parse_label(Task.CLASSIFICATION, 2.0) == "2"
    assert parse_label(Task.CLASSIFICATION, " pos ") == "pos"
    assert parse_label(Task.MULTILABEL, "a|b", "|") == ["a", "b"]
    assert parse_label(Task.MULTILABEL, ["x"]) == ["x"]
    assert parse_label(Task.REGRESSION, "2.5") == 2.5
    for task, value, message in [
        (Task.CLASSIFICATION, 1.5, "not an integer"),
        (Task.CLASSIFICATION, "", "empty"),
        (Task.MULTILABEL, "a|b", "label_delimiter"),
        (Task.MULTILABEL, ["a", "a"], "repeats"),
        (Task.REGRESSION, "high", "not a number"),
        (Task.REGRESSION, float("nan"), "not finite"),
        (Task.REGRESSION, None, "missing"),
    ]:
        with pytest.raises(LabelError, match=message):
            parse_label(task, value, None)


def test_label_set_order_and_targets():
    assert Task.CLASSIFICATION.spec.label_set(["10", "2", "1"]) == ["1", "2", "10"]
    assert Task.MULTILABEL.spec.label_set([["b"], ["a", "c"]]) == ["a", "b", "c"]
    assert Task.REGRESSION.spec.label_set([1.0, 2.0]) is None
    assert Task.MULTILABEL.spec.to_targets([["c"], ["a", "b"]], ["a", "b", "c"]).tolist() == [[0, 0, 1], [1, 1, 0]]
    with pytest.raises(LabelError, match="unknown label"):
        Task.CLASSIFICATION.spec.to_targets(["z"], ["a", "b"])
