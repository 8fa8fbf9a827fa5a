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
    (cross-entropy over ``scale`` x cosine similarities). With hard negatives (logits (n, 3, d), labels
    ``[positive id, negative id]`` per example), every negative of the batch is a further wrong answer for every
    query, as in sentence-transformers' MultipleNegativesRankingLoss on triplets. A document that is the same text
    as the query's own positive (another example's positive or negative) is never counted as a wrong answer."""

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        queries = logits[:, 0].float()
        documents = logits[:, 1:].float().transpose(0, 1).reshape(-1, logits.shape[-1])  # positives, then negatives
        ids = labels.reshape(len(labels), -1)
        own, document_ids = ids[:, 0], ids.T.reshape(-1)
        similarity = scale * queries @ documents.T
        right = torch.arange(len(labels), device=logits.device)
        same = own[:, None] == document_ids[None, :]
        same[right, right] = False
        similarity = similarity.masked_fill(same, torch.finfo(similarity.dtype).min)
        return F.cross_entropy(similarity, right)

    return loss
