"""What a CPU deployment of an artifact carries: the files the ONNX Runtime backend loads, and nothing else.

The manifest, the model card, the tokenizer (with the model's config.json, which names its type) and the ONNX file
the ``auto`` backend serves on a CPU (the quantised variant when the export gate kept it, otherwise fp32), with its
external weights file when it has one, and the report plots (the service's page shows them). The PyTorch weights
and the adapter stay out. Standard library only, so that a bare Python can run it (the
Dockerfile's first stage does: ``python core/cpu_files.py ARTIFACT OUT``).

ARTIFACT may also be a directory whose sub-directories are artifacts, a set of models for one service
(``TUNESERVE_MODELS``): each one's files go to OUT/NAME, and a file identical to one already copied (the base graph
that LoRA models over one base each carry) becomes a relative symbolic link to it, so that the image holds it once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

MANIFEST_FILE = "manifest.json"
CARD_FILE = "README.md"
MODEL_DIR = "model"
REPORT_DIR = "report"  # the report plots (training/publish/plots.py)
# Model-directory files that hold weights; everything else there (tokenizer, vocabulary, config) is kept.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


def onnx_serving_files(artifact_dir: str | Path) -> list[str]:
    """Paths (relative to ``artifact_dir``) a CPU deployment needs, in a stable order.

    Raises:
        ValueError: the artifact has no ONNX export, or a file its manifest lists is missing.
    """
    artifact_dir = Path(artifact_dir)
    manifest = json.loads((artifact_dir / MANIFEST_FILE).read_text())
    export = manifest.get("export") or {}
    served = _served_files(export, artifact_dir)
    if not served and export.get("reason"):  # exported without ONNX, on purpose: PyTorch serves it
        raise ValueError(f"{artifact_dir}: no ONNX export to serve on a CPU ({export['reason']})")
    if not served:
        raise ValueError(f"{artifact_dir}: no ONNX export to serve on a CPU; run `tuneserve export` first")
    files = [MANIFEST_FILE, CARD_FILE, *served]
    files += sorted(f"{MODEL_DIR}/{p.name}" for p in (artifact_dir / MODEL_DIR).iterdir()
                    if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES))
    files += sorted(f"{REPORT_DIR}/{p.name}" for p in (artifact_dir / REPORT_DIR).glob("*.png"))
    missing = [f for f in files if not (artifact_dir / f).is_file()]
    if missing:
        raise ValueError(f"{artifact_dir}: {', '.join(missing)} missing; the artifact is incomplete")
    return files


def _served_files(export: dict, artifact_dir: Path) -> list[str]:
    """The files of the variant the ``auto`` backend serves on a CPU (int8 where the gate kept it, else fp32), with
    the weights a graph keeps outside itself (a quantised decoder's; any graph over protobuf's 2 GB), and those of a
    variant over a shared base, which ``auto`` serves in a set of models over that base."""
    if "variants" in export:  # manifest version 4: a list of the variants that passed their gate
        by_name = {v["name"]: v for v in export["variants"]}
        chosen = by_name.get("onnx-int8") or by_name.get("onnx")
        shared = by_name.get("onnx-shared")  # what serving it beside other models over its base needs
        return (list(chosen["files"]) if chosen else []) + (list(shared["files"]) if shared else [])
    onnx = export.get("onnx") or {}  # versions 1 to 3 named the two files by field
    chosen = onnx.get("int8") or onnx.get("fp32")
    if not chosen:
        return []
    return [chosen] + ([f"{chosen}.data"] if (artifact_dir / f"{chosen}.data").is_file() else [])


def copy_onnx_serving_files(artifact_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy :func:`onnx_serving_files` into ``out_dir`` (created; it must not exist yet) and return them."""
    artifact_dir, out_dir = Path(artifact_dir), Path(out_dir)
    files = onnx_serving_files(artifact_dir)
    out_dir.mkdir(parents=True)
    for relative in files:
        (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(artifact_dir / relative, out_dir / relative)
    return files


def copy_serving_set(source: str | Path, out_dir: str | Path) -> list[str]:
    """Copy one artifact's serving files into ``out_dir``, or, for a directory of artifacts, each one's into
    ``out_dir/NAME`` (NAME: its directory's name) with identical files stored once. Returns the paths written
    (relative to ``out_dir``; a linked one ends with `` -> TARGET``).

    Raises:
        ValueError: ``source`` is neither an artifact nor a directory holding one, or an artifact lacks its files.
    """
    source, out_dir = Path(source), Path(out_dir)
    if (source / MANIFEST_FILE).is_file():
        return copy_onnx_serving_files(source, out_dir)
    artifacts = sorted(p for p in source.iterdir() if (p / MANIFEST_FILE).is_file()) if source.is_dir() else []
    if not artifacts:
        raise ValueError(f"{source}: neither an artifact ({MANIFEST_FILE}) nor a directory of artifacts")
    out_dir.mkdir(parents=True)
    written, seen = [], {}  # (size, sha256) -> the first copy
    for artifact in artifacts:
        for relative in copy_onnx_serving_files(artifact, out_dir / artifact.name):
            path = out_dir / artifact.name / relative
            with path.open("rb") as f:
                key = (path.stat().st_size, hashlib.file_digest(f, "sha256").hexdigest())
            if key in seen:
                path.unlink()
                path.symlink_to(os.path.relpath(seen[key], path.parent))
                written.append(f"{artifact.name}/{relative} -> {seen[key].relative_to(out_dir)}")
            else:
                seen[key] = path
                written.append(f"{artifact.name}/{relative}")
    return written


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python core/cpu_files.py ARTIFACT|DIRECTORY-OF-ARTIFACTS OUT")
    try:
        copied = copy_serving_set(sys.argv[1], sys.argv[2])
    except (OSError, ValueError) as exc:
        sys.exit(f"serving files: {exc}")
    print("\n".join(copied))
