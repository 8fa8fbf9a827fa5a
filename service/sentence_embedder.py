"""A sentence-embedding model in PyTorch: a transformer with the pooling its base model was trained with.

What the service's torch backend runs and the trainer trains (training/recipe/sentence_embedder.py adds the loss);
the exported ONNX graph is this module traced, pooling and normalisation included. Only the torch backend (when it
loads a model) and the trainer import it: the ONNX CPU path, which runs without torch, never does.

:class:`SentenceEmbedder` wraps the transformer (a plain ``AutoModel``, or the peft model around it) and returns,
for a batch of texts, their pooled and L2-normalised vectors as ``logits`` (n, d); given each text's positive
document too (``positive_input_ids``, ...), both, stacked (n, 2, d), which is what the loss and the retrieval metrics
read (core/tasks/embedding.py); with a hard negative per text (``negative_input_ids``, ...) in training, (n, 3, d).
The pooling (mean, cls or max) comes from the base model's own sentence-transformers files, and the published model
carries them again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from core.tasks.embedding import POOLINGS, read_pooling


@dataclass
class EmbedderOutput(ModelOutput):
    logits: torch.Tensor | None = None  # (n, d), or (n, 2, d) with positives, (n, 3, d) with hard negatives too


def pooling_of(model_dir: str | Path) -> str:
    """The model's pooling, or mean pooling where its directory records none.

    Raises:
        ValueError: its sentence-transformers files ask for a pooling this project does not implement.
    """
    return read_pooling(model_dir) or "mean"


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per sequence from its token states (padding left out)."""
    if pooling == "cls":
        return hidden[:, 0]
    keep = mask.unsqueeze(-1).to(hidden.dtype)
    if pooling == "max":
        return hidden.masked_fill(keep == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    return (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1e-9)


class SentenceEmbedder(nn.Module):
    """A transformer, pooled and normalised: texts in, unit vectors out."""

    def __init__(self, encoder: nn.Module, pooling: str):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
        self.encoder = encoder
        self.pooling = pooling

    @property
    def config(self):
        return self.encoder.config

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return F.normalize(pool(hidden, attention_mask, self.pooling).float(), dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                positive_input_ids: torch.Tensor | None = None, positive_attention_mask: torch.Tensor | None = None,
                positive_token_type_ids: torch.Tensor | None = None,
                negative_input_ids: torch.Tensor | None = None, negative_attention_mask: torch.Tensor | None = None,
                negative_token_type_ids: torch.Tensor | None = None, **_: Any) -> EmbedderOutput:
        vectors = self.embed(input_ids, attention_mask, token_type_ids)
        if positive_input_ids is None:
            return EmbedderOutput(vectors)
        stacked = [vectors, self.embed(positive_input_ids, positive_attention_mask, positive_token_type_ids)]
        if negative_input_ids is not None:
            stacked.append(self.embed(negative_input_ids, negative_attention_mask, negative_token_type_ids))
        return EmbedderOutput(torch.stack(stacked, dim=1))

    def save_pretrained(self, directory, **kwargs) -> None:
        """The transformer's (an adapter's, for a peft model) files."""
        self.encoder.save_pretrained(directory, **kwargs)
