"""What every exporter shares: the held-out examples a gate measures on, the staging directory, the atomic
publish, the export's own error, and the handling of library noise.

An exporter (:mod:`training.export.encoder`, :mod:`training.export.decoder`) writes its files into a staging
directory and returns the manifest's ``export`` section; :func:`publish` then swaps the files into
``artifact/onnx`` and the section into the manifest, in that order, so a failed export leaves the previous one
intact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import TuneserveError
from core.manifest import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    ExportRecord,
    Manifest,
    read_manifest,
)
from training.export.int8 import CALIBRATION_EXAMPLES
from training.files import swap_into_place
from training.publish.card import write_card

logger = logging.getLogger(__name__)

ONNX_DIR = "onnx"
OPSET = 17


class ExportError(TuneserveError):
    """The exported model does not match PyTorch closely enough."""


@dataclass
class HeldOut:
    """The examples the gate measures on (validation, or test when there is none), and the training texts whose
    activations calibrate int8 (the held-out texts themselves when none are given)."""
    texts: list[str]
    pairs: list[str] | None
    targets: np.ndarray
    name: str
    calibration_texts: list[str] | None = None
    calibration_pairs: list[str] | None = None

    @classmethod
    def from_splits(cls, held_out, train) -> HeldOut:
        """From the run's data splits: ``held_out`` is measured on, an even spread of ``train`` calibrates."""
        rows = np.unique(np.linspace(0, len(train.texts) - 1, min(CALIBRATION_EXAMPLES, len(train.texts))).astype(int))
        return cls(held_out.texts, held_out.pairs, held_out.targets, held_out.name,
                   [train.texts[i] for i in rows], [train.pairs[i] for i in rows] if train.pairs else None)

    def calibration(self) -> tuple[str, list[str], list[str] | None]:
        if self.calibration_texts:
            return "train", self.calibration_texts, self.calibration_pairs
        count = min(CALIBRATION_EXAMPLES, len(self.texts))
        return self.name, self.texts[:count], self.pairs[:count] if self.pairs else None


def held_out_from_config(manifest: Manifest, artifact_dir: Path, split: str = "validation") -> HeldOut:
    """Reload the run's validation split (test when validation is empty) exactly as training carved it; ``split="test"``:
    its test split, which the gate never measures on (what int8 fidelity is checked on afterwards)."""
    from training.config import Config
    from training.data.reading import load_dataset

    cfg = Config.model_validate(manifest.provenance.config)
    data = load_dataset(cfg.data, cfg.task, cfg.train.seed)
    recorded = manifest.provenance.data_hashes
    changed = sorted(name for name, digest in data.hashes.items() if name in recorded and recorded[name] != digest)
    if changed:
        sources = {"train": cfg.data.train, "validation": cfg.data.validation or cfg.data.train,
                   "test": cfg.data.test or cfg.data.train}
        raise ExportError(f"{artifact_dir}: the data this model was trained on changed on disk since training ({', '.join(f'{n}: {sources[n]}' for n in changed)}): "
                          "the gate would measure on other examples than the held-out ones. Restore the data, or "
                          "retrain (`tuneserve train` exports after training)")
    if split == "test":
        return HeldOut.from_splits(data.test, data.train)
    return HeldOut.from_splits(data.validation if len(data.validation) else data.test, data.train)


@contextlib.contextmanager
def library_noise_to_log() -> Iterator[None]:
    """Keep an export's output to its own progress and results.

    Library warnings raised inside go to this module's log once each: at DEBUG those known not to matter here
    (torch's tracer and ONNX exporter on code paths the traced graph does not take, deprecations, onnxruntime's advice
    to pre-process a graph before quantizing, which its transformer optimizer has already done), at WARNING any other.
    Weight-loading progress bars are off.
    """
    from transformers.utils import logging as hf_logging

    advice: list[str] = []

    class _PreProcessingAdvice(logging.Filter):  # onnxruntime's quantizer logs it on the root logger, every call
        def filter(self, record: logging.LogRecord) -> bool:
            if record.getMessage().startswith("Please consider"):
                advice.append(record.getMessage())
                return False
            return True

    advice_filter = _PreProcessingAdvice()
    logging.getLogger().addFilter(advice_filter)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        logging.getLogger().removeFilter(advice_filter)
        if bars:
            hf_logging.enable_progress_bar()
    if advice:
        logger.debug("onnxruntime's quantizer advised pre-processing %d time(s) (%s); the graph was already optimized",
                     len(advice), advice[0][:80])
    seen: set[tuple[str, str]] = set()
    for warning in caught:
        key = (warning.category.__name__, str(warning.message))
        if key in seen:
            continue
        seen.add(key)
        benign = (warning.category.__name__ == "TracerWarning" or issubclass(warning.category, (DeprecationWarning, FutureWarning))
                  or f"{os.sep}torch{os.sep}onnx{os.sep}" in warning.filename)
        logger.log(logging.DEBUG if benign else logging.WARNING, "%s: %s (%s:%d)", warning.category.__name__,
                   str(warning.message).splitlines()[0], warning.filename, warning.lineno)


def variant(name: str, tmp: Path, file: str, precision: str, parity: dict, method: str | None = None) -> dict:
    """The manifest's entry for a variant that passed its gate: the graph ``file`` staged in ``tmp`` and the weights
    file kept beside it, if any, named as they will be under ``artifact/onnx``."""
    files = [file] + [p.name for p in sorted(tmp.glob(f"{file}.data"))]
    return {"name": name, "runtime": "onnxruntime", "files": [f"{ONNX_DIR}/{f}" for f in files],
            "precision": precision, "method": method, "gate": "passed", "parity": parity}


@contextlib.contextmanager
def staging(artifact_dir: Path) -> Iterator[Path]:
    """An empty directory beside ``artifact/onnx`` for an exporter's files, removed whatever happens."""
    tmp = artifact_dir / f".{ONNX_DIR}-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(artifact_dir: Path, tmp: Path, section: dict) -> dict:
    """The onnx/ directory first, then the manifest that points at it (both atomic renames), then the card."""
    ExportRecord.model_validate(section)  # the section is what the manifest's schema says
    if section["variants"]:  # a model served by PyTorch has no onnx/ directory (the section says why)
        swap_into_place(tmp, artifact_dir / ONNX_DIR)
    raw_manifest = json.loads((artifact_dir / MANIFEST_FILE).read_text())
    raw_manifest["export"] = section
    raw_manifest["schema_version"] = SCHEMA_VERSION  # a version-1 artifact is upgraded by its re-export
    staged = artifact_dir / f".{MANIFEST_FILE}.tmp"
    staged.write_text(json.dumps(raw_manifest, indent=2, allow_nan=False) + "\n")
    os.replace(staged, artifact_dir / MANIFEST_FILE)
    write_card(artifact_dir, read_manifest(artifact_dir))  # still valid; the card gains the export's results
    return section


