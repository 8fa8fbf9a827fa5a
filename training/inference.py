"""Running a published artifact with PyTorch: what ``tuneserve evaluate`` and ``predict`` use."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from core.encoding import Encoder
from core.errors import ArtifactError
from core.manifest import MODEL_DIR, Manifest, read_manifest
from training.recipe.torch_tasks import load_task_model, model_task


@dataclass
class LoadedArtifact:
    directory: Path
    manifest: Manifest
    model: torch.nn.Module
    tokenizer: object

    @property
    def encoder(self) -> Encoder:
        return Encoder.from_manifest(self.tokenizer, self.manifest)


def load_artifact(directory: str | Path, device: str = "cpu") -> LoadedArtifact:
    """Load manifest, tokenizer and safetensors weights of an artifact (nothing is unpickled)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    model_dir = directory / MODEL_DIR
    if not (model_dir / "model.safetensors").is_file():
        raise ArtifactError(f"{directory}: {MODEL_DIR}/model.safetensors is missing")
    try:
        model = load_task_model(manifest.task, str(model_dir), model_task(manifest.task, str(model_dir)),
                                use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # OSError, ValueError, SafetensorError, ...: a file that is not what it says
        raise ArtifactError(f"{directory}: cannot load {MODEL_DIR}/ ({str(exc).splitlines()[0][:300]})") from None
    model.to(device).eval()
    return LoadedArtifact(directory, manifest, model, tokenizer)


@torch.no_grad()
def predict_logits(artifact: LoadedArtifact, texts: Sequence[str], pairs: Sequence[str] | None = None, *,
                   batch_size: int = 64, progress: bool = False):
    """Raw model outputs in input order, as the task's spec runs the model (batches formed by length)."""
    device = next(artifact.model.parameters()).device

    def forward(batch) -> np.ndarray:
        return artifact.model(**batch.to(device)).logits.float().cpu().numpy()

    return artifact.manifest.task.spec.run(forward, artifact.encoder, texts, pairs, batch_size=batch_size,
                                           return_tensors="pt", progress=progress)


def predict_scores(artifact: LoadedArtifact, texts: Sequence[str], pairs: Sequence[str] | None = None, **kwargs) -> np.ndarray:
    return artifact.manifest.task.spec.scores(predict_logits(artifact, texts, pairs, **kwargs),
                                               artifact.manifest.calibration)
