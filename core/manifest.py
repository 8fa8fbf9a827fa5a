"""The artifact manifest: a versioned, self-describing record of a trained model.

``manifest.json`` sits next to the weights and holds everything needed to use the model without
the training code: task, ordered labels, text fields, max length, post-processing, base model,
method, metrics beside baselines, and provenance. It is plain JSON: reading it runs no code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import ArtifactError
from core.tasks import Task

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"


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
    threshold: float | None = Field(None, description="Multi-label decision threshold.")
    base_model: str
    method: str
    trainable_parameters: int
    total_parameters: int
    metrics: dict[str, dict[str, float]] = Field(description="'validation' and 'test': metric name -> value.")
    baselines: dict[str, dict[str, float]] = Field(description="Baseline name -> test metrics.")
    primary_metric: str
    per_class: dict[str, dict[str, float]] | None = None
    confusion_matrix: list[list[int]] | None = None
    training: dict[str, Any] = Field(default_factory=dict, description="Epochs run, steps, best epoch, timings.")
    provenance: dict[str, Any] = Field(default_factory=dict)
    export: dict[str, Any] = Field(default_factory=dict)

    @property
    def has_pair(self) -> bool:
        return len(self.text_fields) == 2

    @property
    def decision_threshold(self) -> float:
        """The multi-label threshold a label's probability must reach (0.5 where the manifest records none)."""
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
    if version != SCHEMA_VERSION:
        raise ArtifactError(f"{path}: schema_version {version!r} is not supported (this version reads {SCHEMA_VERSION})")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ArtifactError(f"{path}: field '{where}': {first['msg']}") from None
    if manifest.task.spec.has_labels and not manifest.labels:
        raise ArtifactError(f"{path}: a {manifest.task.value} manifest must list its labels")
    if manifest.labels is not None and len(set(manifest.labels)) != len(manifest.labels):
        raise ArtifactError(f"{path}: labels repeat a name: {manifest.labels}")
    return manifest
