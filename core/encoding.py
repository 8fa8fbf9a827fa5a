"""The one text-encoding function. Training, evaluation, export and serving all call it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def encode(
    tokenizer: Any,
    texts: Sequence[str],
    text_pairs: Sequence[str] | None = None,
    *,
    max_length: int,
    padding: bool | str = False,
    return_tensors: str | None = None,
) -> Any:
    """Tokenize texts (and optional second texts) exactly as the model was trained.

    Truncation is ``longest_first`` so that a long pair shortens its longer side first. No padding by
    default: batches are padded dynamically by the collator (training) or the backend (serving).

    Args:
        tokenizer: a Hugging Face tokenizer loaded from the base model or the artifact.
        texts: the first text of each example.
        text_pairs: the second text of each example, for pair tasks; ``None`` otherwise.
        max_length: tokens kept per example, special tokens included (from the artifact's manifest).
        padding: passed to the tokenizer (``"longest"`` for a ready-to-run batch).
        return_tensors: ``None`` for lists, ``"np"`` or ``"pt"`` for arrays.

    Returns:
        The tokenizer's ``BatchEncoding``.
    """
    if text_pairs is not None and len(text_pairs) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(text_pairs)} text pairs")
    return tokenizer(
        list(texts),
        list(text_pairs) if text_pairs is not None else None,
        truncation="longest_first",
        max_length=max_length,
        padding=padding,
        return_tensors=return_tensors,
    )
