"""Registering an artifact in the BentoML model store, so that `bentoml build` can package it."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from core.errors import ArtifactError
from core.manifest import MODEL_DIR, read_manifest
from core.onnx_runner import check_external_data

_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")


def register(artifact_dir: str | Path, name: str | None = None) -> str:
    """Copy an artifact into the BentoML model store and return its tag (``name:version``).

    The store entry is written by ``bentoml.models.create``, which keeps it only if the copy completes:
    a crash leaves earlier entries untouched.

    Raises:
        ArtifactError: the artifact is incomplete, or the name is not a valid BentoML model name.
    """
    import bentoml

    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    name = (name or manifest.name).lower()
    if not _NAME.match(name):
        raise ArtifactError(f"--name {name!r}: use lower-case letters, digits, '.', '_' and '-' (BentoML model names)")
    if not (artifact_dir / MODEL_DIR / "model.safetensors").is_file():
        raise ArtifactError(f"{artifact_dir}: {MODEL_DIR}/model.safetensors is missing")
    backends = ["torch"]
    for key, backend in (("fp32", "onnx"), ("int8", "onnx-int8")):
        relative = getattr(manifest.export.onnx, key) if manifest.export else None
        if relative:
            if not (artifact_dir / relative).is_file():
                raise ArtifactError(f"{artifact_dir}: the manifest lists {relative}, which is missing")
            check_external_data(artifact_dir / relative)
            backends.append(backend)
    labels = {"task": manifest.task.value, "method": manifest.method, "backends": ",".join(backends),
              "source": "tuneserve"}
    metadata = {"primary_metric": manifest.primary_metric, "test_metrics": manifest.metrics.get("test", {}),
                "labels": manifest.labels, "base_model": manifest.base_model,
                "int8_kept": bool(manifest.export and manifest.export.int8.kept)}
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        for item in artifact_dir.iterdir():
            if item.name.startswith("."):  # temporary directories of an interrupted export
                continue
            target = Path(model.path) / item.name
            shutil.copytree(item, target) if item.is_dir() else shutil.copy2(item, target)
    return str(model.tag)
