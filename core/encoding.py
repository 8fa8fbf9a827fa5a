"""The one way texts become token ids. Training, evaluation, export and serving all go through it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np


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


# Texts longer than this many characters per token the model reads are cut (at a whitespace) before tokenizing: a
# 20,000-character text read as 128 tokens is tokenized as its first 2,048 characters. English averages 4 to 5
# characters a token; a text whose cut holds fewer tokens than the model reads is tokenized whole instead.
CHARS_PER_TOKEN = 16
# Texts counted per hold of the tokenizer: counting a large request's tokens does not keep a pass from encoding.
COUNT_SLICE = 8


def readable_prefix(text: str, max_chars: int) -> str:
    """``text`` cut at its last whitespace within ``max_chars`` (whole when shorter, or with no whitespace there:
    a cut never splits a word, so the tokens of the prefix are the first tokens of the whole text)."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars].rsplit(None, 1)
    return head[0] if len(head) == 2 and head[0] else text


@dataclass(frozen=True)
class Encoder:
    """A tokenizer with the settings an artifact was trained with: built once, from the manifest.

    Attributes:
        tokenizer: the artifact's (or base model's) Hugging Face tokenizer.
        max_length: tokens kept per example, special tokens included.
        stride: tokens two windows of a long text share (token tasks; see :meth:`windows`).
    """

    tokenizer: Any
    max_length: int
    stride: int = 0
    # A fast tokenizer is not to be called from two threads at once ("Already borrowed"): the service encodes a
    # pass in one thread while it counts another request's tokens in another.
    lock: Any = field(default_factory=threading.RLock, compare=False, repr=False)

    @classmethod
    def from_manifest(cls, tokenizer: Any, manifest: Any, lock: Any = None) -> Encoder:
        """``lock``: the tokenizer's, where other encoders share it (each encoder's own by default)."""
        if lock is None:
            return cls(tokenizer, manifest.max_length, manifest.stride or 0)
        return cls(tokenizer, manifest.max_length, manifest.stride or 0, lock)

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None, *, padding: bool | str = False,
               return_tensors: str | None = None) -> Any:
        """:func:`encode` with this encoder's tokenizer and length, long texts cut first (:meth:`cut`)."""
        with self.lock:
            return encode(self.tokenizer, self.cut(texts), self.cut(pairs) if pairs is not None else None,
                          max_length=self.max_length, padding=padding, return_tensors=return_tensors)

    def cut(self, texts: Sequence[str]) -> list[str]:
        """Each text as the model reads it: a text over ``max_length * CHARS_PER_TOKEN`` characters cut at a
        whitespace, where the cut still holds at least ``max_length`` tokens (so the tokens kept after truncation
        are the same as the whole text's), else whole. Tokenizing stays bounded whatever the text's length."""
        limit = self.max_length * CHARS_PER_TOKEN
        out = list(texts)
        heads = {i: readable_prefix(text, limit) for i, text in enumerate(out) if len(text) > limit}
        heads = {i: head for i, head in heads.items() if len(head) < len(out[i])}
        if heads:
            for (i, head), count in zip(heads.items(), self.token_counts(list(heads.values()))):
                if count >= self.max_length:
                    out[i] = head
        return out

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text, special tokens left out, nothing truncated."""
        counts: list[int] = []
        for start in range(0, len(texts), COUNT_SLICE):  # the lock is let go between slices: passes go on
            with self.lock:
                counts += self.tokenizer(list(texts[start:start + COUNT_SLICE]), add_special_tokens=False,
                                         return_length=True)["length"]
        return counts

    def truncated(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[bool]:
        """Whether the model reads less than the whole of each text (or pair): more tokens than ``max_length``,
        special tokens included."""
        first = self.token_counts(self.cut(texts))
        second = self.token_counts(self.cut(pairs)) if pairs is not None else [0] * len(first)
        special = self.tokenizer.num_special_tokens_to_add(pair=pairs is not None)
        return [a + b + special > self.max_length for a, b in zip(first, second)]

    def windows(self, texts: Sequence[str]) -> Any:
        """Each text as one or more windows of at most ``max_length`` tokens, neighbours sharing ``stride``
        tokens, with character offsets (``offset_mapping``) and the text each window comes from
        (``overflow_to_sample_mapping``). Nothing is truncated away."""
        with self.lock:
            return self.tokenizer(list(texts), truncation=True, max_length=self.max_length, stride=self.stride,
                                  return_overflowing_tokens=True, return_offsets_mapping=True)


def run_in_length_batches(
    forward: Callable[[Any], np.ndarray],
    encoder: Encoder,
    texts: Sequence[str],
    text_pairs: Sequence[str] | None = None,
    *,
    batch_size: int,
    return_tensors: str,
    progress: bool = False,
    by_length: bool = True,
) -> np.ndarray:
    """Encode and run examples in batches of similar length (less padding); outputs come back in input order.

    Args:
        forward: maps one encoded batch to its outputs, shape (batch, num_outputs).
        encoder: the tokenizer and length the model was trained with.
        texts, text_pairs: as for :func:`encode`.
        batch_size: examples per forward call.
        return_tensors: ``"np"`` or ``"pt"``, what ``forward`` takes.
        progress: show a progress bar.
        by_length: sort by length before cutting batches; False keeps the given order (batches of mixed lengths,
            as the export gate checks that every input's outputs are independent of its batch).
    """
    starts = range(0, len(texts), batch_size)
    if progress:  # a disabled bar still costs about 70 µs per call, 2% of a batch-1 int8 run
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="predict", unit="batch", leave=False)
    order = np.argsort([-len(t) for t in texts], kind="stable") if by_length else np.arange(len(texts))
    out: np.ndarray | None = None
    for start in starts:
        pick = order[start:start + batch_size]
        batch = encoder.encode([texts[i] for i in pick], [text_pairs[i] for i in pick] if text_pairs is not None else None,
                               padding="longest", return_tensors=return_tensors)
        outputs = np.asarray(forward(batch), dtype=np.float32)
        if out is None:
            out = np.zeros((len(texts), outputs.shape[1]), dtype=np.float32)
        out[pick] = outputs
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)
