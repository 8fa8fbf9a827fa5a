"""The artifact manifest: a versioned, self-describing record of a trained model.

``manifest.json`` sits next to the weights and holds everything needed to use the model without
the training code: task, ordered labels, text fields, max length, post-processing, base model,
method, metrics beside baselines, and provenance. It is plain JSON: reading it runs no code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.calibration import Calibration
from core.errors import ArtifactError
from core.prompting import PromptFormat
from core.tasks import Task

SCHEMA_VERSION = 4
# version 1: the same fields, its sections untyped dicts (empty when absent); version 2: no calibration or per-label
# thresholds (a reader that ignored them would serve other scores and decisions than were measured: hence 3);
# version 3: the export section named its ONNX files by field (onnx.fp32, onnx.int8) beside parity reports by variant,
# so that a new runtime meant a new field (version 4: a list of variants; older sections are read into it).
READABLE_VERSIONS = (1, 2, 3, 4)
MANIFEST_FILE = "manifest.json"
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"


class _Section(BaseModel):
    # Known fields are typed; a field a later release adds is kept, not refused, so that older readers still load.
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class TrainingRecord(_Section):
    """How the run went: steps, the best checkpoint, speed, and the validation history."""

    epochs_run: int
    steps: int
    best_step: int
    stopped_early: bool
    stopped_because: str | None = Field(None, description="Why training ended: patience (early stopping), epochs "
                                        "(the last one), max_steps or max_minutes.")
    still_improving: bool | None = Field(None, description="The validation metric was at its best at the last "
                                         "evaluation, still improving when training ended.")
    steps_per_epoch: int
    num_processes: int = 1
    mixed_precision: str = Field("no", description="no | fp16 | bf16: what the weights were trained in.")
    device: str
    lr: float
    head_lr: float | None = Field(None, description="The task head's and pooler's learning rate (null: lr).")
    seconds: float
    train_seconds: float
    train_samples_per_second: float
    examples: dict[str, int] = Field(description="Examples per split.")
    windows: dict[str, dict[str, int]] = Field(default_factory=dict,
                                               description="Token tasks: texts split into windows, per split.")
    truncation: dict[str, dict[str, int]] = Field(default_factory=dict, description="Generation: inputs and targets "
                                                  "cut to their token budgets, per split.")
    history: dict[str, list[dict[str, Any]]] = Field(description="train_loss per step; validation metrics per evaluation.")
    lora_target_modules: list[str] | None = None
    head_modules: list[str] = Field(default_factory=list)
    tracking: dict[str, Any] = Field(default_factory=dict, description="Where the experiment trackers of "
                                     "train.report_to logged the run (tensorboard: its directory, relative to the "
                                     "output directory; mlflow: tracking_uri, experiment_id, run_id).")


class Provenance(_Section):
    """What it takes to reproduce the run."""

    seed: int | None = None
    determinism: dict[str, Any] = Field(default_factory=dict)
    created: str | None = None
    packages: dict[str, str] = Field(default_factory=dict)
    data_hashes: dict[str, str] = Field(default_factory=dict, description="sha256 of each split's source file(s).")
    git_sha: str | None = None
    config: dict[str, Any] = Field(default_factory=dict, description="The resolved run configuration.")
    base_model_origin: dict[str, Any] | None = Field(
        None, description="A bundled base model made on first use (a GGUF file dequantised, an encoder-decoder "
                          "warm-started): where its weights came from, and in 'note' what that means for quality.")


class GraphRecord(_Section):
    """How the exported graph was made: opset, and what the graph optimizer fused."""

    opset: int
    optimizer: str | None = None
    fusions: dict[str, int] = Field(default_factory=dict)
    not_fused: dict[str, str] = Field(default_factory=dict)
    note: str | None = None


class BatchInvariance(_Section):
    """One variant's outputs for the same inputs batched differently (pooled turns of mixed lengths, alone)."""

    arrangements: list[str]
    max_abs_diff: float
    decision_changes: int


class ParityReport(_Section):
    """One exported variant against PyTorch on the held-out split, at the task level."""

    examples: int
    tokens: int | None = Field(None, description="Token tasks: sub-tokens compared.")
    max_abs_diff: float | None = Field(None, description="Largest score difference (null for generation).")
    mean_abs_diff: float | None = None
    metrics_torch: dict[str, float]
    metrics_onnx: dict[str, float]
    metric_delta: dict[str, float]
    label_agreement: float | None = None
    label_agreement_per_label: dict[str, float] | None = None
    decisions: int | None = Field(None, description="Decisions label_agreement is over: examples, labels of each "
                                  "example (multi-label) or sub-tokens.")
    disagreements: int | None = Field(None, description="Decisions that differ from PyTorch's.")
    agreement_low: float | None = Field(None, description="The lower end of the 95% Wilson interval of "
                                        "label_agreement: the least agreement these decisions show.")
    entity_agreement: float | None = Field(None, description="Token tasks: texts whose entities are identical.")
    batch_invariance: BatchInvariance | None = None
    output_agreement: float | None = Field(None, description="Generation: share of greedy outputs identical to "
                                           "PyTorch's.")


class Int8Attempt(_Section):
    method: str
    passed: bool
    reason: str | None = None
    label_agreement: float | None = None
    metric_delta: float | None = None


class Int8Report(_Section):
    requested: str
    kept: bool
    attempts: list[Int8Attempt] = Field(default_factory=list)
    method: str | None = None
    smoothing_alpha: float | None = None
    fp32_nodes: list[str] = Field(default_factory=list)
    reason: str | None = None
    smoothing: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = Field(None, description="The examples whose activation ranges fix the "
                                               "int8 variant's activation scales, and how its weights were rounded.")
    gate: dict[str, Any] | None = Field(None, description="What a variant had to show: the agreement, at which "
                                        "confidence, over how many held-out decisions, and so how many may differ.")


class SelftestExample(_Section):
    """An input and PyTorch's scores and decision for it, for a serving backend to reproduce at start-up."""

    text: str
    text_pair: str | None = None
    scores: Any
    decision: Any
    variants: dict[str, Any] = Field(default_factory=dict, description="Each exported variant's own scores for it "
                                     "(variant name -> scores): what that variant must reproduce when served.")


class ExportVariant(_Section):
    """One exported variant that passed its gate: what runs it, its files, its precision, and its parity report. A
    new runtime or an adapter file is a new entry here, not a new field."""

    name: str = Field(description="The backend that serves it (onnx, onnx-int8).")
    runtime: str = Field(description="What runs the files (onnxruntime).")
    files: list[str] = Field(min_length=1, description="Its files, relative to the artifact: the graph first, then "
                             "any weights kept outside it.")
    precision: str = Field(description="fp32 | int8.")
    method: str | None = Field(None, description="How a quantised variant was made.")
    base: str | None = Field(None, description="A variant over a shared base: the identity (sha256) of the base "
                             "weights it needs; models of one identity share one graph when served together.")
    gate: Literal["passed"] = Field("passed", description="The gate's outcome: only variants that pass are kept "
                                    "(int8 attempts that failed are in the int8 report).")
    parity: ParityReport = Field(description="Against PyTorch on the held-out split, at the task level.")

    @property
    def path(self) -> str:
        """The graph file, relative to the artifact."""
        return self.files[0]


class ExportRecord(_Section):
    backend: Literal["onnx", "torch"] = Field("onnx", description="What serves the model on a CPU: ONNX Runtime, "
                                              "or PyTorch where there is no ONNX export.")
    reason: str | None = Field(None, description="Why there is no ONNX export, where there is none.")
    held_out: str | None = Field(None, description="The split the gate measured on.")
    graph: GraphRecord | None = Field(None, description="How the graph was made; null without an ONNX export.")
    variants: list[ExportVariant] = Field(default_factory=list, description="Every variant that passed its gate "
                                          "(empty without an ONNX export).")
    int8: Int8Report
    shared_base: dict[str, Any] | None = Field(None, description="Whether a variant over a shared base was kept "
                                               "(kept) and why not (reason).")
    tokenizer: dict[str, Any] | None = Field(None, description="Whether the artifact's tokenizer.json alone, run by "
                                             "the tokenizers library, encodes as its transformers tokenizer does "
                                             "(reproduces, the texts checked, the input names; else the reason): a "
                                             "server of the ONNX graph then reads texts without transformers.")
    selftest: list[SelftestExample]

    def variant(self, name: str) -> ExportVariant | None:
        """The kept variant a backend of that name serves (None: there is none)."""
        return next((v for v in self.variants if v.name == name), None)

    @property
    def parity(self) -> dict[str, ParityReport]:
        """Variant name -> its parity report."""
        return {v.name: v.parity for v in self.variants}


# The variants a version-3 export section named by field: (its backend name, the field, the precision).
_V3_VARIANTS = (("onnx", "fp32", "fp32"), ("onnx-int8", "int8", "int8"))


def upgrade_export(section: dict, directory: Path) -> dict:
    """A version-1 to -3 export section in the layout of version 4 (its files read from ``directory``)."""
    onnx, parity, int8 = section.get("onnx"), section.get("parity") or {}, section.get("int8") or {}
    variants = []
    for name, field, precision in _V3_VARIANTS if onnx else ():
        path = onnx.get(field)
        if path and name in parity:
            files = [path] + ([f"{path}.data"] if (directory / f"{path}.data").is_file() else [])
            variants.append({"name": name, "runtime": "onnxruntime", "files": files, "precision": precision,
                             "method": int8.get("method") if field == "int8" else None, "parity": parity[name]})
    graph = {k: v for k, v in onnx.items() if k not in ("fp32", "int8", "held_out")} if onnx else None
    return {"backend": section.get("backend", "onnx"), "reason": section.get("reason"),
            "held_out": onnx.get("held_out") if onnx else None, "graph": graph, "variants": variants,
            "int8": int8, "selftest": section.get("selftest", [])}


class StudyRecord(_Section):
    """The hyperparameter search (``tuneserve tune --train-best``) that chose this run's configuration."""

    name: str = Field(description="The Optuna study's name.")
    metric: str = Field(description="The validation metric the search optimised (the test split was not scored).")
    direction: Literal["minimize", "maximize"]
    sampler: str
    pruner: str
    trials: dict[str, int] = Field(description="Trials by state (COMPLETE, PRUNED, FAIL, ...).")
    best_trial: int
    best_value: float = Field(description="The best trial's validation value.")
    best_params: dict[str, Any] = Field(description="Config path -> the value the best trial used.")
    importances: dict[str, float] | None = Field(None, description="Config path -> importance (Optuna's "
                                                 "get_param_importances; null with fewer than 2 complete trials).")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    schema_version: int = Field(SCHEMA_VERSION, description="Version of this manifest's layout.")
    name: str = Field(description="Short model name (used as the BentoML model name).")
    task: Task
    problem_type: str = Field(description="Hugging Face problem_type of the saved model.")
    labels: list[str] | None = Field(description="Ordered label names; null for regression.")
    text_fields: list[str] = Field(description="Column names of the input text(s): [text] or [text, text_pair].")
    label_field: str
    max_length: int = Field(description="Tokens kept per example (special tokens included).")
    stride: int | None = Field(None, description="Token tasks: tokens two windows of a long text share.")
    aggregation: str | None = Field(None, description="Token tasks: how sub-token scores become word tags "
                                    "(first | max | simple).")
    postprocess: str = Field(description="softmax | sigmoid | identity, applied to the logits.")
    threshold: float | None = Field(None, description="Multi-label decision threshold (the global one where "
                                    "thresholds holds per-label ones).")
    thresholds: dict[str, float] | None = Field(None, description="Multi-label: each label's decision threshold, "
                                                "fitted on validation (labels too rare to fit have the global one).")
    calibration: Calibration | None = Field(None, description="How logits are rescaled before postprocess, fitted on "
                                            "validation, with calibration error and Brier score before and after.")
    base_model: str
    method: str
    trainable_parameters: int
    total_parameters: int
    metrics: dict[str, dict[str, float]] = Field(description="'validation' and 'test': metric name -> value.")
    baselines: dict[str, dict[str, float]] = Field(description="Baseline name -> test metrics.")
    primary_metric: str
    beats_baselines: bool | None = Field(None, description="Whether the test primary metric is strictly better than "
                                         "every baseline's (null when no baseline reports it).")
    diagnosis: str | None = Field(None, description="When the model does not beat its best baseline: the likeliest "
                                  "reason, read from the run's own history, and the one setting to try.")
    per_class: dict[str, dict[str, float]] | None = None
    prompt: PromptFormat | None = Field(None, description="Generation: how an input becomes the prompt (the "
                                        "service renders it with the same function).")
    decoding: dict[str, Any] | None = Field(None, description="Generation: the decoding evaluation used, and the "
                                            "served defaults (transformers generate arguments).")
    examples: list[dict[str, str]] | None = Field(None, description="Generation: test inputs with the reference, "
                                                  "the base model's answer and the fine-tuned model's.")
    confusion_matrix: list[list[int]] | None = None
    training: TrainingRecord | None = Field(None, description="Epochs run, steps, best step, timings, history.")
    provenance: Provenance = Field(default_factory=Provenance)
    export: ExportRecord | None = Field(None, description="The ONNX export and its gate; null until exported.")
    study: StudyRecord | None = Field(None, description="The hyperparameter search that chose the configuration; "
                                      "null for a run configured by hand.")

    @property
    def has_pair(self) -> bool:
        return len(self.text_fields) == 2

    @property
    def decision_threshold(self) -> float | np.ndarray:
        """The multi-label threshold a label's probability must reach: per label (in label order) where the
        manifest holds fitted ones, else one for all (0.5 where the manifest records none)."""
        if self.thresholds is not None:
            return np.asarray([self.thresholds[name] for name in self.labels or []])
        return self.threshold if self.threshold is not None else 0.5


def write_manifest(manifest: Manifest, directory: str | os.PathLike) -> Path:
    path = Path(directory) / MANIFEST_FILE
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2, allow_nan=False) + "\n")
    return path


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """Read and validate ``manifest.json`` of an artifact directory.

    Raises:
        ArtifactError: the directory or manifest is missing, unreadable, of an unknown schema
            version, or does not validate.
    """
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: not an artifact directory (it does not exist)")
    if not path.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST_FILE}; is this the artifact/ directory of a run?")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: unreadable manifest ({exc})") from None
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version not in READABLE_VERSIONS:
        raise ArtifactError(f"{path}: schema_version {version!r} is not supported (this version reads "
                            f"{', '.join(map(str, READABLE_VERSIONS))})")
    if version == 1:  # the same fields; an absent section was an empty dict
        raw = {**raw, **{k: None for k in ("training", "export") if raw.get(k) == {}}}
    if version < 4 and isinstance(raw.get("export"), dict) and isinstance(raw["export"].get("onnx", {}), (dict, type(None))):
        raw = {**raw, "export": upgrade_export(raw["export"], directory)}
    raw = {**raw, "schema_version": SCHEMA_VERSION}
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        hint = (f" (a version-{version} manifest this release cannot read: re-export the artifact with `tuneserve "
                f"export {directory}`, or retrain it)") if version < SCHEMA_VERSION else ""
        raise ArtifactError(f"{path}: field '{where}': {first['msg']}{hint}") from None
    if manifest.task.spec.has_labels and not manifest.labels:
        raise ArtifactError(f"{path}: a {manifest.task.value} manifest must list its labels")
    if manifest.labels is not None and len(set(manifest.labels)) != len(manifest.labels):
        raise ArtifactError(f"{path}: labels repeat a name: {manifest.labels}")
    if manifest.thresholds is not None and set(manifest.thresholds) != set(manifest.labels or []):
        raise ArtifactError(f"{path}: thresholds name other labels than labels: {sorted(manifest.thresholds)}")
    if manifest.calibration is not None and not (
            len(manifest.calibration.scale) == len(manifest.calibration.bias) == len(manifest.labels or [])):
        raise ArtifactError(f"{path}: calibration has {len(manifest.calibration.scale)} scales and "
                            f"{len(manifest.calibration.bias)} biases for {len(manifest.labels or [])} labels")
    return manifest
