"""The training side of sentence embeddings: the multiple-negatives ranking loss over in-batch negatives, and the
model the loop trains (service/sentence_embedder.py: the transformer, pooled and normalised, that the service's
torch backend runs and the export traces)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.errors import ConfigError
from service.sentence_embedder import SentenceEmbedder, pooling_of


def sentence_embedder(model, path: str, cfg) -> SentenceEmbedder:
    """``model`` with its pooling: the config's, or (``auto``) the one the model's own files record.

    Raises:
        ConfigError: the model's sentence-transformers files ask for a pooling this project does not implement.
    """
    try:
        pooling = pooling_of(path) if cfg is None or cfg.embedding.pooling == "auto" else cfg.embedding.pooling
    except (ValueError, OSError) as exc:
        raise ConfigError(f"model: {exc}; set embedding.pooling") from None
    return SentenceEmbedder(model, pooling)


def ranking_loss(scale: float):
    """Multiple-negatives ranking loss: each query against every positive of the batch, its own the right answer
    (cross-entropy over ``scale`` x cosine similarities). Another example's positive that is the same text as the
    query's own is not counted as a negative."""

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        queries, positives = logits[:, 0].float(), logits[:, 1].float()
        similarity = scale * queries @ positives.T
        same = (labels[:, None] == labels[None, :]) & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        similarity = similarity.masked_fill(same, torch.finfo(similarity.dtype).min)
        return F.cross_entropy(similarity, torch.arange(len(labels), device=logits.device))

    return loss
