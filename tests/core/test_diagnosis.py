"""A model that loses to its baseline is told the likeliest reason from its own run, and the one setting to try."""

import pytest

from core.verdict import compare_with_baselines, diagnose

LOSING = compare_with_baselines("f1_macro", 0.40, {"majority": {"f1_macro": 0.33}, "tfidf_logreg": {"f1_macro": 0.70}})


def _history(losses, validation, metric="f1_macro"):
    return {"train_loss": [{"step": i + 1, "loss": v, "lr": 1e-3} for i, v in enumerate(losses)],
            "validation": [{"step": 10 * (i + 1), metric: v} for i, v in enumerate(validation)]}


FALLING = [2.0, 1.8, 1.5, 1.2, 1.0, 0.8, 0.7, 0.6]
SETTLED = [0.55, 0.62, 0.63, 0.63]  # best before the end


@pytest.mark.parametrize(("losses", "validation", "per_class", "method", "stopped", "reason", "override"), [
    ([1.0, 1.01, 0.99, 1.0, 0.98, 0.99, 0.97, 0.98], SETTLED, None, "lora", False,
     "the training loss barely fell (1 -> 0.975)", "--set train.lr=3.0e-03"),
    ([1.0, 1.1, 1.3, 1.6, 2.0, 2.6, 3.1, 3.5], SETTLED, None, "lora", False,
     "the training loss rose", "--set train.lr=3.3e-04"),
    (FALLING, [0.01, 0.46, 0.50], None, "lora", False,
     "validation f1_macro was still improving when training stopped (0.4600 -> 0.5000)", "--set train.epochs=6"),
    (FALLING, [0.42], None, "lora", False, "(0.4200, one evaluation)", "--set train.epochs=6"),
    (FALLING, [0.46, 0.50], {"a": {"recall": 0.9, "support": 5}, "b": {"recall": 0.0, "support": 4},
                             "c": {"recall": 0.0, "support": 0}}, "lora", True,
     "1 of 3 classes were never found on the test split (b)", "--set train.head_lr=1.0e-02"),
    (FALLING, SETTLED, {"a": {"recall": 0.8, "support": 5}}, "lora", False,
     "the tfidf_logreg baseline does better from the training words alone, and lora adapts",
     "--set method=full"),
    (FALLING, SETTLED, None, "full", False, "the tfidf_logreg baseline does better",
     "more training data, or a larger base model"),
])
def test_the_likeliest_reason_comes_from_the_runs_own_history(losses, validation, per_class, method, stopped, reason,
                                                              override):
    diagnosis = diagnose(LOSING, _history(losses, validation), per_class, method=method, cap=("train.epochs", 3), lr=1e-3,
                         stopped_early=stopped)
    assert reason in diagnosis.reason and diagnosis.message.endswith(f"try {override}")
    assert diagnosis.message.startswith("likeliest reason: ")


def test_a_head_that_already_had_its_own_rate_is_told_to_go_faster_still():
    per_class = {"a": {"recall": 0.9, "support": 5}, "b": {"recall": 0.0, "support": 4}}
    diagnosis = diagnose(LOSING, _history(FALLING, [0.46, 0.50]), per_class, method="lora", cap=("train.epochs", 3),
                         lr=5e-4, stopped_early=True, head_lr=5e-3)
    assert diagnosis.override == "train.head_lr=1.5e-02"


def test_a_lower_is_better_metric_still_falling_is_still_improving():
    losing = compare_with_baselines("mse", 1.2, {"mean": {"mse": 1.5}, "tfidf_ridge": {"mse": 0.9}})
    diagnosis = diagnose(losing, _history(FALLING, [2.0, 1.5, 1.2], "mse"), None, method="lora",
                         cap=("train.max_minutes", 7.5), lr=5e-4, stopped_early=False)
    assert "still improving" in diagnosis.reason and diagnosis.override == "train.max_minutes=15"
    settled = diagnose(losing, _history(FALLING, [2.0, 1.1, 1.2], "mse"), None, method="lora",
                       cap=("train.epochs", 2), lr=5e-4, stopped_early=False)
    assert "still improving" not in settled.reason


def test_labels_never_predicted_at_a_fixed_threshold_are_told_to_fit_one_per_label():
    per_label = {"drama": {"recall": 0.8, "support": 50}, "western": {"recall": 0.0, "support": 3},
                 "musical": {"recall": 0.0, "support": 2}}
    fixed = diagnose(LOSING, _history(FALLING, SETTLED), per_label, method="lora", cap=("train.epochs", 3), lr=5e-4,
                     stopped_early=True, head_lr=5e-3, threshold=0.5)
    assert fixed.reason.startswith("2 of 3 labels were never predicted on the test split (musical, western) at the "
                                   "fixed threshold 0.5")
    assert fixed.override == "train.threshold=auto"
    # with thresholds fitted per label, the same misses point at the head
    fitted = diagnose(LOSING, _history(FALLING, SETTLED), per_label, method="lora", cap=("train.epochs", 3), lr=5e-4,
                      stopped_early=True, head_lr=5e-3)
    assert fitted.override.startswith("train.head_lr=")
