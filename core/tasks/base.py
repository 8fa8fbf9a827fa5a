"""The protocol every task spec implements, the task names and their registry, and the helpers task families share."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from core.calibration import Calibration
from core.calibration import apply as calibrated

if TYPE_CHECKING:
    from pydantic import BaseModel

    from core.encoding import Encoder
    from core.metrics import Evaluation


class Task(str, Enum):
    CLASSIFICATION = "classification"
    MULTILABEL = "multilabel"
    REGRESSION = "regression"
    TOKEN_CLASSIFICATION = "token_classification"
    GENERATION = "generation"
    EMBEDDING = "embedding"

    @property
    def spec(self) -> TaskSpec:
        """This task's spec (the registry lives in :func:`spec_for`)."""
        return spec_for(self)


# The registry: filled by core/tasks/__init__.py, which Python imports before any module of the package, so
# ``Task.X.spec`` always finds its spec while this module imports no spec.
SPECS: dict[Task, TaskSpec] = {}


def spec_for(task: Task | str) -> TaskSpec:
    """The spec of a task (by enum member or name)."""
    return SPECS[Task(task)]


# Metrics where smaller is better; every other metric is maximised.
LOWER_IS_BETTER = frozenset({"loss", "log_loss", "hamming_loss", "mse", "rmse", "mae", "perplexity"})


def is_better(metric: str, candidate: float, best: float | None) -> bool:
    """Whether ``candidate`` improves on ``best`` for ``metric`` (``best=None`` means no value yet)."""
    if best is None:
        return True
    return candidate < best if metric in LOWER_IS_BETTER else candidate > best


# The prefixes of the features of further texts an example carries, tokenized apart from its first (an embedding
# task's positive document and, optionally, its hard negative): the spec encodes them, the trainer's collator pads
# each on its own, the model reads them.
SECOND_TEXT = "positive_"
NEGATIVE_TEXT = "negative_"
TEXTS_APART = (SECOND_TEXT, NEGATIVE_TEXT)

# Largest score difference allowed between two batch arrangements of the same inputs on one backend (batch
# invariance: the export gate, the self-test and the tests hold every backend to it).
BATCH_INVARIANCE_TOLERANCE = 1e-5


def postprocess(logits: np.ndarray, kind: str) -> np.ndarray:
    """Turn raw model outputs into scores: class probabilities, label probabilities or values.

    Args:
        logits: array of shape (..., num_outputs).
        kind: ``softmax`` | ``sigmoid`` | ``identity`` as recorded in the manifest.

    Returns:
        float64 array of the same shape, except ``identity`` with one output per example, which gives (n,).
    """
    logits = np.asarray(logits, dtype=np.float64)
    if kind == "softmax":
        shifted = logits - logits.max(axis=-1, keepdims=True)
        exp = np.exp(shifted)
        return exp / exp.sum(axis=-1, keepdims=True)
    if kind == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    if kind == "identity":
        return logits[:, 0] if logits.ndim == 2 and logits.shape[1] == 1 else logits
    raise ValueError(f"unknown post-processing {kind!r}; expected softmax, sigmoid or identity")


class ModelRecord(Protocol):
    """What a spec reads of an artifact's record (:class:`core.manifest.Manifest` is one): specs depend on
    these fields, not on the manifest module, which itself depends on the specs."""

    labels: list[str] | None
    max_length: int
    thresholds: dict[str, float] | None
    aggregation: str | None
    prompt: Any
    decoding: dict[str, Any] | None
    examples: list[dict[str, str]] | None

    @property
    def has_pair(self) -> bool: ...

    @property
    def decision_threshold(self) -> float | np.ndarray: ...


class LabelError(ValueError):
    """A single label value is not acceptable; the caller adds where it was found."""


def scalar_class(value: Any) -> str:
    """A class name from a string or an integer (``2.0`` counts as ``2``; ``True`` as ``true``)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return str(int(value))
        raise LabelError(f"class label {value!r} is not an integer or a string")
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise LabelError("empty label")
        return value
    raise LabelError(f"class label {value!r} has type {type(value).__name__}; expected a string or an integer")


def rounded(x: float, ndigits: int | None) -> float:
    """A score for JSON: a float, rounded when ``ndigits`` is given (the command line prints 4 digits)."""
    return round(float(x), ndigits) if ndigits is not None else float(x)


def ordered_names(names: Iterable[str]) -> list[str]:
    """Numeric order if every name is an integer, else sorted: the label order an artifact records."""
    seen = set(names)

    def is_int(name: str) -> bool:
        try:
            int(name)
        except ValueError:
            return False
        return True

    return sorted(seen, key=int) if all(is_int(n) for n in seen) else sorted(seen)


class TaskSpec(ABC):
    """What one task family must define. Subclasses set the class attributes and implement the abstract methods
    (a spec that misses one cannot be instantiated); the other methods have defaults a family may override.

    Scores are post-processed model outputs (``postprocess`` applied to logits); targets are what
    :meth:`to_targets` returns. Methods that need the artifact's label order or threshold take its manifest.
    """

    task: ClassVar[Task]
    problem_type: ClassVar[str]  # Hugging Face config.problem_type of the saved model
    postprocess: ClassVar[str]  # softmax | sigmoid | identity
    default_metric: ClassVar[str]  # the primary metric; what early stopping watches by default
    early_stopping_metric: ClassVar[str | None] = None  # what early stopping watches when not default_metric
    metric_names: ClassVar[tuple[str, ...]]  # in the order tables show them
    has_labels: ClassVar[bool] = True  # whether the task has a label vocabulary
    label_noun: ClassVar[str] = "distinct labels"  # what error messages call the label vocabulary
    label_key: ClassVar[str] = "label"  # the field of a posted example that holds its truth
    pipeline_tag: ClassVar[str] = "text-classification"  # the Hugging Face model card's pipeline tag
    plot: ClassVar[str]  # which report plot the artifact gets: confusion | per_label | regression
    # Which tables beside the metrics an evaluation fills (``per_class``, ``confusion_matrix``): /evaluate's response
    # and its documented schema hold these and no others.
    evaluation_tables: ClassVar[tuple[str, ...]] = ()
    auto_model: ClassVar[str] = "AutoModelForSequenceClassification"  # the transformers class of the model
    hf_problem_type: ClassVar[str | None] = None  # config.problem_type handed to transformers (None: none)
    logits_axes: ClassVar[dict[int, str]] = {0: "batch"}  # dynamic axes of the exported graph's logits
    # What the model does, for the API docs' first line ({pair}: " (or pair of texts)" for pair models).
    does: ClassVar[str]
    # The service routes that run the model (routes of other kinds of model answer 404); the first is :attr:`route`.
    routes: ClassVar[tuple[str, ...]] = ("/predict",)
    # The kind of model its routes serve, for the API docs of another kind's model ("For a model that ...").
    kind: ClassVar[str] = "a model that scores or labels text"
    # How to call the model, for the API docs.
    usage: ClassVar[str] = ("POST /predict to use it, POST /evaluate to score it on labelled examples, GET /metadata "
                            "for everything its artifact records.")
    example_text: ClassVar[str] = "A gorgeous, moving film."  # the API docs' example input
    # The input and truth columns data.text and data.label name when a config leaves them out.
    default_columns: ClassVar[tuple[str, str]] = ("text", "label")
    accepts_token_lists: ClassVar[bool] = False  # whether an input may be a list of tokens instead of a text
    # Config options that only some tasks accept (data.label_delimiter, train.label_smoothing, train.threshold,
    # data.augment: word-level augmentation, for tasks whose labels are not aligned to the words).
    options: ClassVar[frozenset[str]] = frozenset()
    writes: ClassVar[bool]  # set by the two kinds below: ScoringSpec (False) and WritingSpec (True)
    # The model's token states are pooled into one vector per text, as its sentence-transformers files say (the
    # torch side wraps the transformer with that pooling; the exported graph includes it).
    pools: ClassVar[bool] = False
    # A long text is read in overlapping windows (nothing cut away); otherwise the model reads its first max_length
    # tokens and each answer says when it was cut (``truncated``).
    windows: ClassVar[bool] = False
    # What :meth:`losses` measures, for the worst examples an evaluation lists (None: the task lists none).
    loss_name: ClassVar[str | None] = None
    # Training defaults of this task, where a config leaves them out (chosen on real data sets: BENCHMARKS.md,
    # defaults): settings of the config's train section, and the task head's learning rate as a multiple of the
    # body's (a head starts from random weights while the body is pretrained; 1: one rate for all).
    train_defaults: ClassVar[dict[str, Any]] = {}
    head_lr_factor: ClassVar[float] = 1.0

    # -- labels ---------------------------------------------------------------------------------------
    def parse_example(self, text: Any, label: Any, options: dict | None = None) -> tuple[str, Any]:
        """An input text and its parsed label (``options``: the data config's task options, such as
        ``label_delimiter``).

        Raises:
            LabelError: the label is missing or malformed.
        """
        return text, self.parse_label(label, (options or {}).get("label_delimiter"))

    @abstractmethod
    def parse_label(self, value: Any, delimiter: str | None = None) -> Any:
        """Normalise one raw label.

        Raises:
            LabelError: the value is missing or not of the kind the task needs.
        """
        ...

    def label_set(self, values: Iterable[Any]) -> list[str] | None:
        """The ordered label names seen in training data (``None`` for tasks without labels)."""
        names: list[str] = []
        for value in values:
            names.extend(value if isinstance(value, list) else [value])
        return ordered_names(names)

    @abstractmethod
    def to_targets(self, values: Sequence[Any], labels: Sequence[str] | None) -> np.ndarray:
        """Encode parsed labels as model targets.

        Raises:
            LabelError: a label is not in ``labels``; the message lists the unknown ones.
        """
        ...

    def unknown_labels(self, value: Any, labels: Sequence[str]) -> list[str]:
        """The names in one parsed label that ``labels`` does not hold."""
        known = set(labels)
        return [name for name in (value if isinstance(value, list) else [value]) if name not in known]

    def num_outputs(self, labels: Sequence[str] | None) -> int:
        return len(labels or [])

    def stratify_key(self, values: Sequence[Any]) -> np.ndarray | None:
        """Per-example keys to stratify carved splits by (``None``: a plain random split)."""
        return None

    # -- encoding -----------------------------------------------------------------------------------------
    def encode_training(self, encoder: Encoder, texts: Sequence[str], pairs: Sequence[str] | None, targets: Any,
                        labels: Sequence[str] | None, **options: Any) -> tuple[dict[str, list], Any, dict]:
        """Token ids of each training example and its target (``(features, targets, stats)``)."""
        return dict(encoder.encode(texts, pairs)), targets, {}

    def run(self, forward: Callable[[Any], np.ndarray], encoder: Encoder, texts: Sequence[str],
            pairs: Sequence[str] | None = None, *, batch_size: int, return_tensors: str, progress: bool = False,
            by_length: bool = True) -> Any:
        """Encode texts, call ``forward`` (a model on one padded batch) and return raw outputs in input order
        (batches cut after sorting by length, or in the given order when ``by_length`` is False)."""
        from core.encoding import run_in_length_batches

        return run_in_length_batches(forward, encoder, texts, pairs, batch_size=batch_size,
                                     return_tensors=return_tensors, progress=progress, by_length=by_length)

    @property
    def route(self) -> str:
        """The route that runs the model (the first of :attr:`routes`)."""
        return self.routes[0]

    def judged_inputs(self, texts: Sequence[str], pairs: Sequence[str] | None, targets: Any
                      ) -> tuple[Sequence[str], Sequence[str] | None]:
        """What the model reads to be judged on labelled examples (the export gate, ``/evaluate``): the texts and
        their pairs; a family whose metrics need the model's view of the targets too says so here."""
        return texts, pairs

    def texts_read(self, texts: Sequence[str], pairs: Sequence[str] | None) -> int:
        """How many texts the model encodes for these inputs (a pair is one input, read together)."""
        return len(texts)

    def ranked_corpus(self, targets: Any) -> int | None:
        """How many documents an evaluation of these targets ranks each query against (its cost grows with queries
        times documents); ``None`` for a task that ranks nothing."""
        return None

    def flat(self, scores: Any) -> np.ndarray:
        """Scores as one 2-D array (for score differences between backends)."""
        scores = np.asarray(scores, dtype=np.float64)
        return scores.reshape(len(scores), -1)

    def record(self, score: Any) -> Any:
        """One example's scores as JSON (the self-test examples in the manifest)."""
        return np.atleast_1d(score).tolist()

    def from_record(self, text: str, record: Any) -> Any:
        """One example's scores back from :meth:`record`."""
        return np.asarray(record, dtype=np.float64)

    # -- metrics and baselines --------------------------------------------------------------------------
    @abstractmethod
    def evaluate(self, targets: Any, scores: Any, labels: Sequence[str] | None = None, *,
                 threshold: float | np.ndarray = 0.5) -> Evaluation:
        """Metrics of ``scores`` against ``targets`` (``threshold``: multi-label decisions, one or per label)."""
        ...

    def assess(self, targets: Any, scores: Any, labels: Sequence[str] | None = None, *,
               threshold: float | np.ndarray = 0.5, level: float = 0.95) -> Evaluation:
        """:meth:`evaluate`, with a ``level`` confidence interval for every metric (:func:`core.metrics.intervals`:
        the same method for every task) and notes on those it cannot bound."""
        from core.metrics import intervals

        evaluation = self.evaluate(targets, scores, labels, threshold=threshold)
        evaluation.intervals, notes = intervals(evaluation.metrics, evaluation.n,
                                                self.resampled(targets, scores, labels, threshold=threshold),
                                                level=level)
        evaluation.notes.extend(notes)
        return evaluation

    def resampled(self, targets: Any, scores: Any, labels: Sequence[str] | None = None, *,
                  threshold: float | np.ndarray = 0.5) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
        """The metrics of many resamples of the examples (:meth:`assess` bootstraps with it): given (B, n) example
        indices, each metric's B values. By default :meth:`evaluate` on each resample in turn; a task whose
        metrics are costly to recompute gives a faster function with the same figures."""
        from core.metrics import each_resample, take

        return each_resample(lambda rows: self.evaluate(take(targets, rows), take(scores, rows), labels,
                                                        threshold=threshold).metrics)

    @abstractmethod
    def baselines(self, train: tuple, test: tuple, labels: Sequence[str] | None, *, threshold: float | None = 0.5,
                  seed: int = 0, validation: tuple | None = None, metric: str | None = None
                  ) -> dict[str, dict[str, float]]:
        """Fit each simple baseline on ``train`` and score it on ``test`` with :meth:`evaluate` (``validation``
        and ``metric``: where a task fits its decisions on validation, the baselines' are fitted the same way)."""
        ...

    def losses(self, targets: Any, scores: Any, *, threshold: float | np.ndarray = 0.5) -> np.ndarray | None:
        """How badly the model answered each example, higher worse (:attr:`loss_name` says how), for the worst
        examples an evaluation lists; None for a task that lists none."""
        return None

    # -- decisions ------------------------------------------------------------------------------------
    def scores(self, logits: Any, calibration: Calibration | None = None) -> Any:
        """Post-processed outputs, as :meth:`evaluate` and :meth:`shape` take them (``calibration``: the manifest's,
        which rescales the logits first)."""
        return postprocess(calibrated(logits, calibration), self.postprocess)

    @abstractmethod
    def decide(self, manifest: ModelRecord, scores: Any) -> list[Any]:
        """The decision for each example, as a plain JSON value."""
        ...

    def margins(self, manifest: ModelRecord, scores: Any) -> np.ndarray:
        """How far each example is from a different decision (0 where the task has no decision)."""
        return np.zeros(len(scores))

    @abstractmethod
    def shape(self, manifest: ModelRecord, scores: Any, *, top_k: int | None = None,
              ndigits: int | None = None) -> list[dict[str, Any]]:
        """One JSON-ready prediction per example, in the task's :attr:`prediction_model` shape."""
        ...

    @property
    @abstractmethod
    def prediction_model(self) -> type[BaseModel]:
        """The pydantic model of one prediction in ``/predict``'s response."""
        ...

    # -- parity between two backends ------------------------------------------------------------------
    def compare(self, manifest: ModelRecord, reference: Any, candidate: Any, targets: Any) -> dict:
        """Task-level comparison of two backends' scores on the same examples (the export gate and the
        self-test read it): score differences, decision agreement, and the metrics of both."""
        ref_metrics = self.evaluate(targets, reference, manifest.labels, threshold=manifest.decision_threshold).metrics
        new_metrics = self.evaluate(targets, candidate, manifest.labels, threshold=manifest.decision_threshold).metrics
        diff = np.abs(self.flat(reference) - self.flat(candidate))
        report = {
            "examples": int(len(reference)),
            "max_abs_diff": float(diff.max()) if diff.size else 0.0,
            "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
            "metrics_torch": ref_metrics,
            "metrics_onnx": new_metrics,
            "metric_delta": {k: new_metrics[k] - v for k, v in ref_metrics.items() if k in new_metrics},
        }
        report.update(self.agreement(manifest, reference, candidate))
        decisions = report.get("tokens", report.get("decisions"))
        if "label_agreement" in report and decisions:
            from core.metrics import wilson_low

            agreeing = round(report["label_agreement"] * decisions)
            report.update(decisions=int(decisions), disagreements=int(decisions - agreeing),
                          agreement_low=wilson_low(agreeing, decisions))
        return report

    def agreement(self, manifest: ModelRecord, reference: Any, candidate: Any) -> dict:
        """Decision agreement between two sets of scores (``label_agreement`` in [0, 1]); empty for tasks
        whose outputs are values."""
        return {}

    def invariance(self, manifest: ModelRecord, reference: Any, arranged: dict[str, Any]) -> dict:
        """How far a backend's outputs move when the same inputs are batched differently.

        Args:
            reference: scores of some examples in one arrangement (the export's length-sorted batches).
            arranged: arrangement name -> the scores of the first examples of ``reference`` run that way.

        Returns:
            ``{"arrangements", "max_abs_diff", "decision_changes"}`` (the largest score difference and the number of
            examples whose decision differs, over every arrangement); :data:`BATCH_INVARIANCE_TOLERANCE` bounds the
            difference of a backend that serves every input the same whatever its batch.
        """
        worst, changed = 0.0, 0
        decided = self.decide(manifest, reference)
        for scores in arranged.values():
            count = len(scores)
            head = reference[:count]
            worst = max(worst, float(np.abs(self.flat(head) - self.flat(scores)).max(initial=0.0)))
            if self.has_labels:
                changed += sum(a != b for a, b in zip(decided[:count], self.decide(manifest, scores)))
        return {"arrangements": list(arranged), "max_abs_diff": worst, "decision_changes": int(changed)}

    # -- documentation ----------------------------------------------------------------------------------
    def describe(self, manifest: ModelRecord) -> list[str]:
        """Lines for the API docs, after the one that says what the model does: what its outputs can be."""
        return [f"Labels: {', '.join(manifest.labels)}."] if manifest.labels else []

    def example_label(self, manifest: ModelRecord) -> Any:
        """A valid truth for a posted example of this model (the API docs' /evaluate example)."""
        return manifest.labels[0] if manifest.labels else None

    def example_input(self, manifest: ModelRecord) -> tuple[str, str | None]:
        """A text (and second text) of this model's own kind: its first self-test input where the export recorded
        one (a held-out example), else the task's generic example."""
        export = getattr(manifest, "export", None)
        if export is not None and export.selftest:
            first = export.selftest[0]
            return first.text, first.text_pair if manifest.has_pair else None
        return self.example_text, "A second text." if manifest.has_pair else None

    def request_examples(self, manifest: ModelRecord) -> dict[str, dict]:
        """A valid request body for each route of this model (the API docs' examples)."""
        text, pair = self.example_input(manifest)
        predict: dict = {"texts": [text]}
        example: dict = {"text": text}
        if pair is not None:
            predict["text_pairs"] = [pair]
            example["text_pair"] = pair
        example[self.label_key] = self.example_label(manifest)
        return {self.route: predict, "/evaluate": {"examples": [example]}}

    def cross_fitted_delta(self, manifest: ModelRecord, reference: Any, candidate: Any, targets: Any
                           ) -> dict[str, float] | None:
        """For a model whose decisions were fitted on these very examples (multi-label thresholds fitted on the
        validation split): the primary metric's change with the decisions fitted on the other half of the examples,
        each half in turn. Fitted to PyTorch's scores on the same examples, the model's own decisions make any change
        of those scores look like a loss (every flip of a decision near a fitted threshold undoes a choice made for
        that example); fitted on the other half, they judge both backends as unseen data would. None: nothing was
        fitted (the change as measured is unbiased)."""
        return None

    def metric_drop(self, metric: str, report: dict) -> float:
        """How much worse ``metric`` got in a :meth:`compare` report (positive = worse); the cross-fitted change
        where the report has one (:meth:`cross_fitted_delta`)."""
        delta = {**report["metric_delta"], **(report.get("metric_delta_cross_fitted") or {})}
        drop = -delta.get(metric, 0.0)
        return -drop if metric in LOWER_IS_BETTER else drop


class ScoringSpec(TaskSpec, ABC):
    """A model that scores text: one forward pass gives raw outputs (logits, vectors), post-processing makes them
    scores, and scores become decisions (classification, multi-label, regression, tokens, embeddings). Served by
    /predict (or its own routes), exported as one encoder graph."""

    writes = False
    # A new head on a pretrained body: 3 epochs at one rate stop while validation is still rising, with the head
    # behind (BENCHMARKS.md, defaults: three registry sets of each task with a head, 3 seeds each). Train until
    # validation stops improving, the head at ten times the body's rate (embeddings, with no head: one rate).
    train_defaults = {"epochs": "auto"}
    head_lr_factor = 10.0


class WritingSpec(TaskSpec, ABC):
    """A model that writes text: its outputs are texts decoded token by token, scored against reference texts
    (generation). Served by /generate, exported as a decoder with its key/value cache."""

    writes = True
    routes = ("/generate",)
    kind = "a model that writes text"
