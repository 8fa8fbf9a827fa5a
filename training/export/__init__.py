"""Export: a registry of exporters over one shared base (training/export/base.py).

Each exporter turns an artifact's PyTorch model into files another runtime runs, gates every variant against
PyTorch on held-out data at the task level, and returns the manifest's ``export`` section; the base stages its
files and publishes them atomically. A model that scores text has its encoder graph exported
(:mod:`training.export.encoder`, with the int8 search of :mod:`training.export.int8`); a model that writes text
has its decoder with a key/value cache exported (:mod:`training.export.decoder`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from core.manifest import Manifest, read_manifest
from training.export.base import (
    ExportError,
    HeldOut,
    held_out_from_config,
    library_noise_to_log,
    publish,
    staging,
)
from training.export.decoder import export_decoder_artifact
from training.export.encoder import export_encoder

__all__ = ["EXPORTERS", "ExportError", "HeldOut", "export_artifact", "exporter_for", "held_out_from_config"]

# An exporter: (artifact_dir, manifest, held_out, staging directory, int8 options) -> the manifest's export section.
Exporter = Callable[..., dict]
EXPORTERS: dict[str, Exporter] = {"encoder": export_encoder, "decoder": export_decoder_artifact}


def exporter_for(manifest: Manifest) -> Exporter:
    """The exporter of an artifact's model: its decoder for a model that writes, its encoder for one that scores."""
    return EXPORTERS["decoder" if manifest.task.spec.writes else "encoder"]


def _int8_gate(manifest, **given: float | None) -> dict[str, float]:
    """The int8 gate's thresholds (``export.*`` names): those given, else the run's config's, else the defaults."""
    from training.config import ExportConfig

    recorded = manifest.provenance.config.get("export") or {}
    return {name: value if value is not None else recorded.get(name, ExportConfig.model_fields[name].default)
            for name, value in given.items()}


def export_artifact(artifact_dir: str | os.PathLike, *, int8: str = "auto", held_out: HeldOut | None = None,
                    min_int8_agreement: float | None = None, max_int8_drop: float | None = None,
                    int8_confidence: float | None = None) -> dict:
    """Export an artifact, gate every variant against PyTorch, record the report in the manifest.

    Args:
        artifact_dir: the artifact directory.
        int8: ``auto`` keeps int8 if it passes the gate, ``on`` fails the export if no int8 variant passes,
            ``off`` skips it.
        held_out: examples for the gate; reloaded from the run's config when not given.
        min_int8_agreement: label agreement an int8 variant must reach (scoring models).
        max_int8_drop: largest drop of the primary metric (absolute; 0.005 = 0.5 points) int8 may cause (scoring
            models; a decoder's int8 has its own budget in points, training/export/decoder.py).
        int8_confidence: the confidence at which the held-out decisions must show ``min_int8_agreement`` (0: the
            measured agreement). Each of the three, when not given, is the run's config's (``export.*``).

    Returns:
        The ``export`` section written to the manifest.

    Raises:
        ExportError: fp32 disagrees with PyTorch, or ``int8="on"`` and no int8 variant passes.
    """
    artifact_dir = Path(artifact_dir)
    with library_noise_to_log():
        manifest = read_manifest(artifact_dir)
        held_out = held_out or held_out_from_config(manifest, artifact_dir)
        gate = _int8_gate(manifest, int8_min_agreement=min_int8_agreement, int8_max_metric_drop=max_int8_drop,
                          int8_confidence=int8_confidence)
        with staging(artifact_dir) as tmp:
            section = exporter_for(manifest)(artifact_dir, manifest, held_out, tmp, int8=int8,
                                             min_int8_agreement=gate["int8_min_agreement"],
                                             max_int8_drop=gate["int8_max_metric_drop"],
                                             int8_confidence=gate["int8_confidence"])
            return publish(artifact_dir, tmp, section)
