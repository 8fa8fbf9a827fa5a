"""Simple baselines scored on the same test split with the same metrics as the model.

A fine-tuned transformer is only worth serving if it clearly beats what a few lines of
scikit-learn achieve: the majority class (the mean, for regression) and TF-IDF features with a
linear model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.dummy import DummyClassifier, DummyRegressor
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline

from core.metrics import evaluate
from core.tasks import Task


def _join(texts: Sequence[str], pairs: Sequence[str] | None) -> list[str]:
    return list(texts) if pairs is None else [f"{a} [SEP] {b}" for a, b in zip(texts, pairs)]


def _multilabel_prior(y_train: np.ndarray, n: int) -> np.ndarray:
    return np.tile(y_train.mean(axis=0), (n, 1))


def score_baselines(
    task: Task,
    train: tuple[Sequence[str], Sequence[str] | None, np.ndarray],
    test: tuple[Sequence[str], Sequence[str] | None, np.ndarray],
    labels: Sequence[str] | None,
    *,
    threshold: float = 0.5,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Fit each baseline on ``train`` and score it on ``test``.

    Args:
        task: the task.
        train, test: ``(texts, text_pairs or None, targets)`` with targets as :func:`core.labels.to_targets` gives.
        labels: ordered label names.
        threshold: multi-label decision threshold, as for the model.
        seed: random state for solvers that use one.

    Returns:
        ``{"majority" | "mean": metrics, "tfidf_logreg" | "tfidf_ridge": metrics}``.
    """
    x_train, x_test = _join(train[0], train[1]), _join(test[0], test[1])
    y_train, y_test = train[2], test[2]
    tfidf = dict(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=200_000)
    results: dict[str, dict[str, float]] = {}
    if task is Task.CLASSIFICATION:
        num_classes = len(labels or [])
        majority = DummyClassifier(strategy="prior").fit(np.zeros((len(y_train), 1)), y_train)
        results["majority"] = evaluate(task, y_test, _full_proba(majority.predict_proba(np.zeros((len(y_test), 1))), majority.classes_, num_classes), labels).metrics
        model = make_pipeline(TfidfVectorizer(**tfidf), LogisticRegression(max_iter=2000, C=4.0, random_state=seed))
        model.fit(x_train, y_train)
        results["tfidf_logreg"] = evaluate(task, y_test, _full_proba(model.predict_proba(x_test), model.classes_, num_classes), labels).metrics
    elif task is Task.MULTILABEL:
        results["majority"] = evaluate(task, y_test, _multilabel_prior(y_train, len(y_test)), labels, threshold=threshold).metrics
        model = make_pipeline(
            TfidfVectorizer(**tfidf),
            OneVsRestClassifier(LogisticRegression(max_iter=2000, C=4.0, random_state=seed)),
        )
        model.fit(x_train, y_train)
        results["tfidf_logreg"] = evaluate(task, y_test, model.predict_proba(x_test), labels, threshold=threshold).metrics
    else:
        mean = DummyRegressor(strategy="mean").fit(np.zeros((len(y_train), 1)), y_train)
        results["mean"] = evaluate(task, y_test, mean.predict(np.zeros((len(y_test), 1)))).metrics
        model = make_pipeline(TfidfVectorizer(**tfidf), Ridge(alpha=1.0))
        model.fit(x_train, y_train)
        results["tfidf_ridge"] = evaluate(task, y_test, model.predict(x_test)).metrics
    return results


def _full_proba(proba: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Place a classifier's columns at their class ids (a class absent from training gets 0)."""
    full = np.zeros((proba.shape[0], num_classes))
    full[:, classes.astype(int)] = proba
    return full
