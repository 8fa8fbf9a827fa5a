"""Sequence-level tasks: one text (or text pair) in, one vector out.

Single-label classification (softmax over classes), multi-label classification (a sigmoid per label,
decided at the manifest's threshold) and regression (one value). They share the encoder, the Hugging Face
``AutoModelForSequenceClassification`` head and a TF-IDF baseline; they differ in labels, post-processing,
metrics and the JSON a prediction takes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from core.calibration import DECISION_METRICS, decision_metric, fit_thresholds
from core.metrics import (
    Evaluation,
    classification_metrics,
    classification_resampled,
    multilabel_metrics,
    multilabel_resampled,
    regression_metrics,
)
from core.tasks.base import LabelError, ModelRecord, Task, ScoringSpec, rounded, scalar_class

# TF-IDF features of the bag-of-words baselines: word uni- and bigrams, sublinear counts.
TFIDF = dict(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=200_000)
# Regression: another backend's value agrees with PyTorch's when it moves by at most this share of the standard
# deviation of PyTorch's values on the same examples (for a rating model of spread 1.6: 0.16), so that an int8
# variant is held, as a classifier's is, to agreeing on 99% of its inputs, not only to keeping R².
VALUE_TOLERANCE = 0.1


def joined(texts: Sequence[str], pairs: Sequence[str] | None) -> list[str]:
    """One string per example for a bag-of-words model (pairs joined by a separator word)."""
    return list(texts) if pairs is None else [f"{a} [SEP] {b}" for a, b in zip(texts, pairs)]


def _label_index(values: Sequence[Any], labels: Sequence[str]) -> dict[str, int]:
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted({name for v in values for name in (v if isinstance(v, list) else [v])} - index.keys())
    if unknown:
        raise LabelError(f"unknown label(s) {unknown}; the model knows {list(labels)}")
    return index


class ClassPrediction(BaseModel):
    label: str = Field(description="The most likely class.")
    score: float = Field(description="Its probability.")
    scores: dict[str, float] = Field(description="Class probabilities, most likely first (top_k of them).")
    truncated: bool = Field(False, description="The text (or pair) is longer than the model reads: only its first "
                            "max_length tokens were scored (GET /metadata gives max_length).")


class MultiLabelPrediction(BaseModel):
    labels: list[str] = Field(description="Labels whose probability reaches the model's threshold.")
    scores: dict[str, float] = Field(description="Probability of every label.")
    truncated: bool = Field(False, description="The text (or pair) is longer than the model reads: only its first "
                            "max_length tokens were scored (GET /metadata gives max_length).")


class RegressionPrediction(BaseModel):
    value: float = Field(description="The predicted value.")
    truncated: bool = Field(False, description="The text (or pair) is longer than the model reads: only its first "
                            "max_length tokens were scored (GET /metadata gives max_length).")


class ClassificationSpec(ScoringSpec):
    """One class per text (or pair), from softmax probabilities."""
    does = "gives each text{pair} one of its labels, with the probability of each"

    task = Task.CLASSIFICATION
    problem_type = hf_problem_type = "single_label_classification"
    postprocess = "softmax"
    default_metric = "f1_macro"
    metric_names = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_micro", "recall_micro",
                    "f1_micro", "precision_weighted", "recall_weighted", "f1_weighted", "roc_auc", "log_loss")
    plot = "confusion"
    evaluation_tables = ("per_class", "confusion_matrix")
    label_noun = "classes"
    options = frozenset({"label_smoothing", "calibrate", "augment"})

    def parse_label(self, value: Any, delimiter: str | None = None) -> str:
        if value is None:
            raise LabelError("missing label")
        return scalar_class(value)

    def to_targets(self, values: Sequence[Any], labels: Sequence[str] | None) -> np.ndarray:
        index = _label_index(values, labels or [])
        return np.asarray([index[v] for v in values], dtype=np.int64)

    def stratify_key(self, values: Sequence[Any]) -> np.ndarray | None:
        keys = np.asarray(values, dtype=object).astype(str)
        _, counts = np.unique(keys, return_counts=True)
        return keys if counts.min() >= 2 else None

    def evaluate(self, targets, scores, labels=None, *, threshold: float = 0.5) -> Evaluation:
        return classification_metrics(targets, scores, list(labels or []))

    def resampled(self, targets, scores, labels=None, *, threshold: float = 0.5):
        return classification_resampled(targets, scores)

    loss_name = "cross-entropy: -ln of the probability given to the true label"

    def losses(self, targets, scores, *, threshold: float = 0.5) -> np.ndarray:
        truth = np.asarray(scores, dtype=np.float64)[np.arange(len(targets)), np.asarray(targets, dtype=np.int64)]
        return -np.log(np.clip(truth, 1e-12, 1.0))

    def baselines(self, train, test, labels, *, threshold: float | None = 0.5, seed: int = 0, **_: Any
                  ) -> dict[str, dict[str, float]]:
        from sklearn.dummy import DummyClassifier
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        num_classes = len(labels or [])
        y_train, y_test = train[2], test[2]

        def full_proba(proba: np.ndarray, classes: np.ndarray) -> np.ndarray:
            """Place a classifier's columns at their class ids (a class absent from training gets 0)."""
            full = np.zeros((proba.shape[0], num_classes))
            full[:, classes.astype(int)] = proba
            return full

        majority = DummyClassifier(strategy="prior").fit(np.zeros((len(y_train), 1)), y_train)
        model = make_pipeline(TfidfVectorizer(**TFIDF), LogisticRegression(max_iter=2000, C=4.0, random_state=seed))
        model.fit(joined(train[0], train[1]), y_train)
        return {
            "majority": self.evaluate(y_test, full_proba(majority.predict_proba(np.zeros((len(y_test), 1))),
                                                         majority.classes_), labels).metrics,
            "tfidf_logreg": self.evaluate(y_test, full_proba(model.predict_proba(joined(test[0], test[1])),
                                                             model.classes_), labels).metrics,
        }

    def decide(self, manifest: ModelRecord, scores) -> list[str]:
        return [manifest.labels[int(i)] for i in np.argmax(scores, axis=1)]

    def margins(self, manifest: ModelRecord, scores) -> np.ndarray:
        top2 = np.sort(scores, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]

    def shape(self, manifest: ModelRecord, scores, *, top_k=None, ndigits=None) -> list[dict[str, Any]]:
        out = []
        for row, label in zip(scores, self.decide(manifest, scores)):
            order = np.argsort(-row, kind="stable")[:top_k]
            out.append({"label": label, "score": rounded(row.max(), ndigits),
                        "scores": {manifest.labels[j]: rounded(row[j], ndigits) for j in order}})
        return out

    @property
    def prediction_model(self) -> type[BaseModel]:
        return ClassPrediction

    def agreement(self, manifest: ModelRecord, reference, candidate) -> dict:
        return {"label_agreement": float(np.mean(np.argmax(reference, 1) == np.argmax(candidate, 1))),
                "decisions": len(reference)}


class MultiLabelSpec(ScoringSpec):
    """Any number of labels per text: each label's sigmoid probability against the manifest's threshold."""
    does = "gives each text{pair} every label whose probability reaches {threshold}, with all the probabilities"

    def describe(self, manifest: ModelRecord) -> list[str]:
        lines = super().describe(manifest)
        if manifest.thresholds is not None:
            lines.append("Thresholds, fitted on validation: "
                         + ", ".join(f"{name} {t:g}" for name, t in manifest.thresholds.items()) + ".")
        return lines

    task = Task.MULTILABEL
    problem_type = hf_problem_type = "multi_label_classification"
    postprocess = "sigmoid"
    default_metric = "f1_micro"
    metric_names = ("subset_accuracy", "hamming_loss", "f1_micro", "f1_macro", "roc_auc_macro", "ndcg", "lrap")
    label_key = "labels"
    plot = "per_label"
    evaluation_tables = ("per_class",)
    options = frozenset({"label_delimiter", "threshold", "calibrate", "augment"})

    def example_label(self, manifest) -> Any:
        return (manifest.labels or [])[:1]

    def parse_label(self, value: Any, delimiter: str | None = None) -> list[str]:
        if value is None:
            raise LabelError("missing label")
        if isinstance(value, str):
            if delimiter is None:
                raise LabelError(f"multi-label value {value!r} is a string; give a list per row or set data.label_delimiter")
            value = [part for part in value.split(delimiter) if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise LabelError(f"multi-label value {value!r} is not a list of labels")
        names = [scalar_class(v) for v in value]
        if len(set(names)) != len(names):
            raise LabelError(f"multi-label value {value!r} repeats a label")
        return names

    def to_targets(self, values: Sequence[Any], labels: Sequence[str] | None) -> np.ndarray:
        index = _label_index(values, labels or [])
        multi_hot = np.zeros((len(values), len(labels or [])), dtype=np.float32)
        for row, names in enumerate(values):
            multi_hot[row, [index[n] for n in names]] = 1.0
        return multi_hot

    def evaluate(self, targets, scores, labels=None, *, threshold: float = 0.5) -> Evaluation:
        return multilabel_metrics(targets, scores, list(labels or []), threshold)

    def resampled(self, targets, scores, labels=None, *, threshold: float = 0.5):
        return multilabel_resampled(targets, scores, threshold)

    loss_name = "binary cross-entropy summed over the labels"

    def losses(self, targets, scores, *, threshold: float = 0.5) -> np.ndarray:
        p = np.clip(np.asarray(scores, dtype=np.float64), 1e-12, 1 - 1e-12)
        y = np.asarray(targets, dtype=np.float64)
        return -(y * np.log(p) + (1 - y) * np.log1p(-p)).sum(axis=1)

    def baselines(self, train, test, labels, *, threshold: float | None = 0.5, seed: int = 0,
                  validation: tuple | None = None, metric: str | None = None) -> dict[str, dict[str, float]]:
        """``threshold`` None: each baseline's per-label thresholds are fitted on ``validation`` for ``metric``,
        as the model's are (a fixed threshold would leave the baselines' rare labels undecided)."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.multiclass import OneVsRestClassifier
        from sklearn.pipeline import make_pipeline

        y_train, y_test = train[2], test[2]
        model = make_pipeline(TfidfVectorizer(**TFIDF),
                              OneVsRestClassifier(LogisticRegression(max_iter=2000, C=4.0, random_state=seed)))
        model.fit(joined(train[0], train[1]), y_train)

        def scored(predict) -> dict[str, float]:
            fitted = threshold
            if fitted is None:
                fitted = fit_thresholds(predict(validation), validation[2], metric or self.default_metric)[1]
            return self.evaluate(y_test, predict(test), labels, threshold=fitted).metrics

        return {
            "majority": scored(lambda split: np.tile(y_train.mean(axis=0), (len(split[2]), 1))),
            "tfidf_logreg": scored(lambda split: model.predict_proba(joined(split[0], split[1]))),
        }

    def decide(self, manifest: ModelRecord, scores) -> list[list[str]]:
        thresholds = np.broadcast_to(manifest.decision_threshold, (len(manifest.labels),))
        return [[name for name, p, t in zip(manifest.labels, row, thresholds) if p >= t] for row in scores]

    def margins(self, manifest: ModelRecord, scores) -> np.ndarray:
        return np.min(np.abs(scores - manifest.decision_threshold), axis=1)

    def shape(self, manifest: ModelRecord, scores, *, top_k=None, ndigits=None) -> list[dict[str, Any]]:
        return [{"labels": labels, "scores": {n: rounded(p, ndigits) for n, p in zip(manifest.labels, row)}}
                for row, labels in zip(scores, self.decide(manifest, scores))]

    @property
    def prediction_model(self) -> type[BaseModel]:
        return MultiLabelPrediction

    def cross_fitted_delta(self, manifest: ModelRecord, reference, candidate, targets) -> dict[str, float] | None:
        metric = manifest.primary_metric
        if manifest.thresholds is None or metric not in DECISION_METRICS:  # fixed thresholds, or a ranking metric
            return None
        reference, candidate = np.asarray(reference, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
        targets = np.asarray(targets).astype(bool)
        halves = np.array_split(np.random.default_rng(0).permutation(len(targets)), 2)
        decided = {"reference": np.zeros_like(targets), "candidate": np.zeros_like(targets)}
        for half, other in zip(halves, halves[::-1]):
            thresholds = fit_thresholds(reference[other], targets[other], metric)[1]
            decided["reference"][half] = reference[half] >= thresholds
            decided["candidate"][half] = candidate[half] >= thresholds
        change = decision_metric(metric, targets, decided["candidate"]) - decision_metric(metric, targets,
                                                                                          decided["reference"])
        return {metric: -change if metric == "hamming_loss" else change}  # decision_metric negates the loss

    def agreement(self, manifest: ModelRecord, reference, candidate) -> dict:
        threshold = manifest.decision_threshold
        same = (np.asarray(reference) >= threshold) == (np.asarray(candidate) >= threshold)
        return {"label_agreement": float(same.mean()), "decisions": int(same.size),
                "label_agreement_per_label": {n: float(v) for n, v in zip(manifest.labels, same.mean(axis=0))}}


class RegressionSpec(ScoringSpec):
    """One value per text (or pair)."""
    does = "predicts a number ({label_field}) for each text{pair}"

    task = Task.REGRESSION
    problem_type = hf_problem_type = "regression"
    postprocess = "identity"
    default_metric = "r2"
    metric_names = ("mse", "rmse", "mae", "r2", "pearson", "spearman")
    has_labels = False
    plot = "regression"
    options = frozenset({"augment"})

    def example_label(self, manifest) -> Any:
        return 0.0

    def parse_label(self, value: Any, delimiter: str | None = None) -> float:
        if value is None:
            raise LabelError("missing label")
        if isinstance(value, bool):
            raise LabelError(f"regression target {value!r} is not a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise LabelError(f"regression target {value!r} is not a number") from None
        if not math.isfinite(number):
            raise LabelError(f"regression target {value!r} is not finite")
        return number

    def label_set(self, values: Iterable[Any]) -> None:
        return None

    def unknown_labels(self, value: Any, labels: Sequence[str]) -> list[str]:
        return []

    def to_targets(self, values: Sequence[Any], labels: Sequence[str] | None) -> np.ndarray:
        return np.asarray(values, dtype=np.float32)

    def num_outputs(self, labels: Sequence[str] | None) -> int:
        return 1

    def evaluate(self, targets, scores, labels=None, *, threshold: float = 0.5) -> Evaluation:
        return regression_metrics(targets, np.reshape(np.asarray(scores, dtype=np.float64), -1))

    loss_name = "absolute error"

    def losses(self, targets, scores, *, threshold: float = 0.5) -> np.ndarray:
        return np.abs(np.reshape(np.asarray(scores, dtype=np.float64), -1) - np.asarray(targets, dtype=np.float64))

    def baselines(self, train, test, labels, *, threshold: float | None = 0.5, seed: int = 0, **_: Any
                  ) -> dict[str, dict[str, float]]:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import make_pipeline

        y_train, y_test = train[2], test[2]
        model = make_pipeline(TfidfVectorizer(**TFIDF), Ridge(alpha=1.0)).fit(joined(train[0], train[1]), y_train)
        return {
            "mean": self.evaluate(y_test, np.full(len(y_test), float(np.mean(y_train)))).metrics,
            "tfidf_ridge": self.evaluate(y_test, model.predict(joined(test[0], test[1]))).metrics,
        }

    def decide(self, manifest: ModelRecord, scores) -> list[float]:
        return [float(v) for v in np.reshape(scores, (len(scores), -1))[:, 0]]

    def shape(self, manifest: ModelRecord, scores, *, top_k=None, ndigits=None) -> list[dict[str, Any]]:
        return [{"value": rounded(v, ndigits)} for v in self.decide(manifest, scores)]

    @property
    def prediction_model(self) -> type[BaseModel]:
        return RegressionPrediction

    def agreement(self, manifest: ModelRecord, reference, candidate) -> dict:
        reference, candidate = np.ravel(np.asarray(reference, dtype=np.float64)), np.ravel(np.asarray(candidate))
        tolerance = max(VALUE_TOLERANCE * float(np.std(reference)), 1e-4)  # the floor: fp32's own rounding
        same = np.abs(candidate - reference) <= tolerance
        return {"label_agreement": float(same.mean()) if same.size else 1.0, "decisions": int(same.size),
                "agreement_noun": "value", "value_tolerance": tolerance}
