"""Registering an artifact in the BentoML model store, so that `bentoml build` can package it."""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from pathlib import Path

from core.errors import ArtifactError
from core.manifest import MODEL_DIR, read_manifest
from core.onnx_runner import check_external_data
from core.cpu_files import onnx_serving_files
from core.shared_base import STORED_BASE_FILE, STORED_BASE_PREFIX
from training.export.shared import VARIANT as SHARED_VARIANT

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")
# The store label that holds an entry's content hash: an unchanged artifact is registered once.
CONTENT_LABEL = "content_sha256"


def _files(artifact_dir: Path, onnx_only: bool = False) -> list[Path]:
    """What registration copies: every file of the artifact but those in temporary dot-directories of an
    interrupted export, or with ``onnx_only`` what the ONNX backend loads (core/cpu_files.py)."""
    if onnx_only:
        try:
            return [artifact_dir / relative for relative in onnx_serving_files(artifact_dir)]
        except ValueError as exc:
            raise ArtifactError(str(exc)) from None
    files = []
    for entry in sorted(item for item in artifact_dir.iterdir() if not item.name.startswith(".")):
        files += [p for p in entry.rglob("*") if p.is_file()] if entry.is_dir() else [entry]
    return files


def content_hash(artifact_dir: str | Path, files: list[Path] | None = None) -> str:
    """sha256 over the relative path, size and bytes of every file registration would copy (``files``, default
    the whole artifact), in sorted order."""
    artifact_dir = Path(artifact_dir)
    files = _files(artifact_dir) if files is None else files
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(artifact_dir).as_posix()):
        # Length-prefixed fields: no two different artifacts feed the same byte stream.
        relative = path.relative_to(artifact_dir).as_posix().encode()
        digest.update(len(relative).to_bytes(8, "big") + relative + path.stat().st_size.to_bytes(8, "big"))
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _stored_with(name: str, digest: str):
    """The store entries of ``name`` (newest first) and the newest one holding ``digest`` (None if none)."""
    import bentoml

    try:
        models = sorted(bentoml.models.list(name), key=lambda m: m.info.creation_time, reverse=True)
    except bentoml.exceptions.NotFound:
        return [], None
    return models, next((m for m in models if m.info.labels.get(CONTENT_LABEL) == digest), None)


def register(artifact_dir: str | Path, name: str | None = None, *, onnx_only: bool = False) -> str:
    """Copy an artifact into the BentoML model store and return its tag (``name:version``).

    With ``onnx_only`` only what the ONNX Runtime backend loads is stored (manifest, card, tokenizer, the ONNX file
    the ``auto`` backend serves), under ``<name>-onnx`` by default: the model a CPU bento packages, without the
    PyTorch weights. A GPU bento needs the whole artifact. The base graph of an ``onnx-shared`` variant (90 MB for
    MiniLM, the same for every LoRA model over that base) is then stored once, in its own entry
    (``tuneserve-base-<identity>``), which the model's entry names in ``onnx/shared/base.store-tag``: a bento of
    several models over one base packages it once.

    An artifact already stored under ``name`` with the same content (hash of its files, kept in the entry's
    ``content_sha256`` label) is not copied again: its tag is returned. The store entry is written by
    ``bentoml.models.create``, which keeps it only if the copy completes: a crash leaves earlier entries untouched.

    Raises:
        ArtifactError: the artifact is incomplete, or the name is not a valid BentoML model name.
    """
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    name = (name or (f"{manifest.name}-onnx" if onnx_only else manifest.name)).lower()
    if not _NAME.match(name):
        raise ArtifactError(f"--name {name!r}: use lower-case letters, digits, '.', '_' and '-' (BentoML model names)")
    if not onnx_only and not (artifact_dir / MODEL_DIR / "model.safetensors").is_file():
        raise ArtifactError(f"{artifact_dir}: {MODEL_DIR}/model.safetensors is missing")
    files = _files(artifact_dir, onnx_only)
    backends = [] if onnx_only else ["torch"]
    for variant in manifest.export.variants if manifest.export else []:
        if not onnx_only or artifact_dir / variant.path in files:
            missing = [f for f in variant.files if not (artifact_dir / f).is_file()]
            if missing:
                raise ArtifactError(f"{artifact_dir}: the manifest lists {', '.join(missing)}, which is missing")
            check_external_data(artifact_dir / variant.path)
            backends.append(variant.name)
    labels = {"task": manifest.task.value, "method": manifest.method, "backends": ",".join(backends),
              "source": "tuneserve"}
    metadata = {"primary_metric": manifest.primary_metric, "test_metrics": manifest.metrics.get("test", {}),
                "base_model": manifest.base_model, "int8_kept": bool(manifest.export and manifest.export.int8.kept)}
    if manifest.labels is not None:  # regression and generation models have none (BentoML's metadata refuses null)
        metadata["labels"] = manifest.labels
    shared = manifest.export.variant(SHARED_VARIANT) if onnx_only and manifest.export else None
    pointer = {}
    if shared is not None:
        graph = [artifact_dir / f for f in (shared.path, f"{shared.path}.data") if (artifact_dir / f).is_file()]
        base_tag = _store(f"{STORED_BASE_PREFIX}{shared.base[:16]}", artifact_dir, graph,
                          {"source": "tuneserve", "kind": "shared base graph"}, {"base_identity": shared.base})
        files = [f for f in files if f not in graph]
        pointer = {Path(shared.path).with_name(STORED_BASE_FILE): base_tag + "\n"}
        metadata["shared_base_model"] = base_tag
    return _store(name, artifact_dir, files, labels, metadata, pointer)


def _store(name: str, artifact_dir: Path, files: list[Path], labels: dict, metadata: dict,
           written: dict[Path, str] | None = None) -> str:
    """Copy ``files`` (and ``written``: relative path -> text) into a new store entry ``name``, or return the tag of
    the newest entry of that name that holds the same content (both)."""
    import bentoml

    digest = content_hash(artifact_dir, files)
    if written:  # a model's pointer to its base entry: a base stored again under a new tag makes a new entry
        digest = hashlib.sha256((digest + "".join(f"\0{k}\0{v}" for k, v in sorted(written.items()))).encode()).hexdigest()
    models, same = _stored_with(name, digest)
    if same is not None:
        if same.tag != models[0].tag:
            logger.warning("%s is already in the store as %s, but %s is newer and is what %s:latest serves; "
                           "serve %s by its tag", artifact_dir, same.tag, models[0].tag, name, same.tag)
        else:
            logger.info("%s is already in the store as %s (same content); nothing copied", artifact_dir, same.tag)
        return str(same.tag)
    with bentoml.models.create(name, labels={**labels, CONTENT_LABEL: digest}, metadata=metadata) as model:
        for path in files:
            target = Path(model.path) / path.relative_to(artifact_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        for relative, text in (written or {}).items():
            (Path(model.path) / relative).parent.mkdir(parents=True, exist_ok=True)
            (Path(model.path) / relative).write_text(text)
    return str(model.tag)
