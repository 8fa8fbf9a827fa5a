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


# -- macro averages over the labels present, intervals, drift -------------------------------------------------------

LABELS10 = [f"l{i}" for i in range(10)]


def _classifier_outputs(n: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    proba = rng.dirichlet(np.ones(classes), n)
    proba[np.arange(n), y] += 0.3
    proba[:20] = np.round(proba[:20], 1) + 0.01  # ties, which AUC counts half
    return y, proba / proba.sum(axis=1, keepdims=True)


def test_two_correct_answers_out_of_ten_labels_are_not_a_collapse():
    proba = np.full((2, 10), 0.02)
    proba[0, 3], proba[1, 7] = 0.82, 0.82
    result = Task.CLASSIFICATION.spec.assess(np.array([3, 7]), proba, LABELS10)
    # macro averages over the two labels posted, not over ten with eight zeros
    assert result.metrics["f1_macro"] == 1.0 and result.macro_over == ["l3", "l7"]
    assert any("8 of the model's 10 are absent" in note for note in result.notes)
    # two of two correct: the exact interval says how little that shows
    low, high = result.intervals["accuracy"]
    assert low == pytest.approx(0.158, abs=1e-3) and high == 1.0
    # a bootstrap of two examples would be [1, 1]: no interval, and a note says why
    assert "f1_macro" not in result.intervals
    assert any("2 examples: too few to bound" in note for note in result.notes)


def test_intervals_are_seeded_and_narrow_as_the_sample_grows():
    spec = Task.CLASSIFICATION.spec
    widths = []
    for n in (100, 2000):
        y, proba = _classifier_outputs(n, 3)
        first, again = spec.assess(y, proba, ["a", "b", "c"]), spec.assess(y, proba, ["a", "b", "c"])
        assert first.intervals == again.intervals
        for name, (low, high) in first.intervals.items():
            assert low <= first.metrics[name] <= high, name
        widths.append(first.intervals["f1_macro"][1] - first.intervals["f1_macro"][0])
    assert widths[1] < widths[0] / 3  # about 1/sqrt(20) as wide


def _same_as_evaluate(spec, targets, scores, labels=None, threshold=0.5, n_resamples=6):
    """The task's fast resampling gives evaluate()'s figures on each resample."""
    from core.metrics import take
    from core.tasks.base import TaskSpec

    n = len(targets)
    indices = np.random.default_rng(1).integers(0, n, (n_resamples, n))
    fast = spec.resampled(targets, scores, labels, threshold=threshold)(indices)
    slow = TaskSpec.resampled(spec, targets, scores, labels, threshold=threshold)(indices)
    assert set(fast) == set(slow)
    for name in slow:
        np.testing.assert_allclose(fast[name], slow[name], rtol=1e-9, atol=1e-12, err_msg=name)
    checked = spec.evaluate(take(targets, indices[0]), take(scores, indices[0]), labels, threshold=threshold)
    assert {k: fast[k][0] for k in checked.metrics} == pytest.approx(checked.metrics)


@pytest.mark.parametrize("classes", [2, 4])
def test_classification_resampling_matches_evaluate(classes):
    y, proba = _classifier_outputs(60, classes)
    _same_as_evaluate(Task.CLASSIFICATION.spec, y, proba, [str(i) for i in range(classes)])


@pytest.mark.parametrize("threshold", [0.5, np.linspace(0.3, 0.7, 6)])
def test_multilabel_resampling_matches_evaluate(threshold):
    rng = np.random.default_rng(0)
    y = (rng.random((50, 6)) < 0.2).astype(int)
    proba = np.clip(y * 0.4 + rng.random((50, 6)) * 0.6, 0, 1)
    proba[:10] = np.round(proba[:10], 1)
    _same_as_evaluate(Task.MULTILABEL.spec, y, proba, list("abcdef"), threshold=threshold)


def test_entity_resampling_matches_seqeval():
    from core.metrics import take
    from core.tasks.token import tag_metrics, tag_resampled

    rng = np.random.default_rng(0)
    labels = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    gold = [rng.choice(7, size=rng.integers(1, 12), p=[.6, .1, .05, .1, .05, .05, .05]) for _ in range(40)]
    predicted = [np.where(rng.random(len(g)) < 0.8, g, rng.integers(0, 7, len(g))) for g in gold]
    indices = rng.integers(0, 40, (4, 40))
    fast = tag_resampled(gold, predicted, labels)(indices)
    for row in range(4):
        expected = tag_metrics(take(gold, indices[row]), take(predicted, indices[row]), labels).metrics
        assert {k: fast[k][row] for k in expected} == pytest.approx(expected, abs=1e-12)


def test_generation_resampling_matches_corpus_scores():
    from core.metrics import generation_metrics, generation_resampled, take

    rng = np.random.default_rng(0)
    words = "the cat sat on a mat while dogs bark at night".split()
    references = [" ".join(rng.choice(words, rng.integers(3, 10))) for _ in range(30)]
    predictions = [r if i % 5 == 0 else " ".join(rng.choice(words, rng.integers(1, 10)))
                   for i, r in enumerate(references)]
    indices = rng.integers(0, 30, (3, 30))
    fast = generation_resampled(references, predictions)(indices)
    for row in range(3):
        expected = generation_metrics(take(references, indices[row]), take(predictions, indices[row])).metrics
        assert {k: fast[k][row] for k in expected} == pytest.approx(expected, abs=1e-9)


def test_weighted_auc_is_scikit_learns_with_sample_weights():
    from sklearn.metrics import roc_auc_score

    from core.metrics import weighted_auc

    rng = np.random.default_rng(0)
    scores = np.round(rng.random(40), 1)  # many ties
    positive = rng.random(40) < 0.4
    w = rng.integers(0, 3, (5, 40)).astype(float)
    expected = [roc_auc_score(positive, scores, sample_weight=row) for row in w]
    np.testing.assert_allclose(weighted_auc(scores, positive, w), expected, rtol=1e-12)


def test_the_wilson_lower_bound_of_an_agreement():
    from core.metrics import wilson_low

    # 7 disagreements in 1,057 measure 99.34% and show no more than 98.64% at 95% (the demo's int8 export)
    assert wilson_low(1050, 1057) == pytest.approx(0.98640, abs=1e-5)
    # no disagreement at all shows 99% only from 381 decisions on: n / (n + z^2)
    assert wilson_low(380, 380) < 0.99 <= wilson_low(381, 381)
    assert wilson_low(60, 60) == pytest.approx(60 / (60 + 1.959964**2))
    assert wilson_low(0, 0) == 0.0 and wilson_low(0, 10) == pytest.approx(0.0, abs=1e-12)
    # how many may differ while 99% is still shown
    from core.metrics import wilson_allowed

    assert (wilson_allowed(380, 0.99), wilson_allowed(381, 0.99), wilson_allowed(1057, 0.99)) == (None, 0, 4)
    for n in (381, 1057, 5000):
        k = wilson_allowed(n, 0.99)
        assert wilson_low(n - k, n) >= 0.99 > wilson_low(n - k - 1, n)
    for agreeing, n in ((1050, 1057), (59, 60), (3, 4)):  # scipy's Wilson interval, the same figure
        from scipy import stats

        low = stats.binomtest(agreeing, n).proportion_ci(0.95, method="wilson").low
        assert wilson_low(agreeing, n) == pytest.approx(low, rel=1e-9)
