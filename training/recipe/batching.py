"""Tokenized examples, length-grouped batches and dynamic padding.

Padding tokens are wasted work: batches are padded only to their own longest example, and examples of
similar length are batched together (seeded, so a run and its resumption see the same order).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from core.encoding import Encoder
from core.tasks import Task
from core.tasks.base import TEXTS_APART
from training.recipe.torch_tasks import IGNORE_INDEX, torch_task


class EncodedSplit(torch.utils.data.Dataset):
    """Token ids per example plus the target; padding happens later, per batch."""

    def __init__(self, features: dict[str, list[list[int]]], targets: Any):
        self.features = features
        self.targets = targets
        self.stats: dict[str, int] = {}
        self.lengths = [len(ids) for ids in features["input_ids"]]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict:
        item = {key: values[i] for key, values in self.features.items()}
        item["labels"] = self.targets[i]
        return item


def encode_split(encoder: Encoder, task: Task, texts: Sequence[str], pairs: Sequence[str] | None, targets: Any,
                 labels: Sequence[str] | None, *, desc: str, disable: bool = False, chunk: int = 2048,
                 negatives: Sequence[str] | None = None, **options: Any) -> EncodedSplit:
    """Tokenize a split in chunks (with a progress bar) as the task's spec encodes training examples.

    ``options`` go to the spec (``label_all_tokens`` for token tasks), and so do ``negatives`` (an embedding's hard
    negative per example) where given. The spec's counts (texts split into windows, for example) are summed in
    ``EncodedSplit.stats``.
    """
    features: dict[str, list] = {}
    encoded_targets: list = []
    stats: dict[str, int] = {}
    for start in tqdm(range(0, len(texts), chunk), desc=f"tokenize {desc}", unit="chunk", disable=disable, leave=False):
        stop = start + chunk
        extra = {"negatives": negatives[start:stop]} if negatives is not None else {}
        part, part_targets, part_stats = task.spec.encode_training(
            encoder, texts[start:stop], pairs[start:stop] if pairs is not None else None, targets[start:stop], labels,
            **extra, **options)
        for key, values in part.items():
            features.setdefault(key, []).extend(values)
        encoded_targets.extend(part_targets)
        for key, value in part_stats.items():
            stats[key] = stats.get(key, 0) + value
    if isinstance(targets, np.ndarray) and targets.dtype != object:  # numbers stay an array of the targets' shape;
        # texts (generation's, an embedding's positives) became what the spec made of them: token ids, text ids
        encoded_targets = np.asarray(encoded_targets, dtype=targets.dtype).reshape(-1, *targets.shape[1:])
    split = EncodedSplit(features, encoded_targets)
    split.stats = stats
    return split


def without_content(tokenizer, split: EncodedSplit) -> list[int]:
    """Indices of examples that tokenize to special tokens alone (e.g. text of zero-width or control characters)."""
    special = set(tokenizer.all_special_ids)
    return [i for i, ids in enumerate(split.features["input_ids"]) if all(t in special for t in ids)]


class LengthGroupedBatchSampler:
    """Seeded batches of indices; with ``group_by_length``, each batch holds examples of similar length.

    The data is shuffled, cut into mega-batches of ``batch_size * 50`` examples, each mega-batch is sorted
    by length and cut into batches, and the batches are shuffled (the idea of transformers'
    ``LengthGroupedSampler``). Without ``shuffle`` the batches follow length order (for evaluation).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 group_by_length: bool = True, mega_batch_factor: int = 50):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.mega = batch_size * mega_batch_factor
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        n = len(self.lengths)
        if not self.shuffle:
            order = np.argsort(-self.lengths, kind="stable") if self.group_by_length else np.arange(n)
            yield from (order[i:i + self.batch_size].tolist() for i in range(0, n, self.batch_size))
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n)
        if self.group_by_length:
            chunks = [order[i:i + self.mega] for i in range(0, n, self.mega)]
            order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks])
        batches = [order[i:i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]
        if self.group_by_length:
            # The last batch is the only short one; keep it last so batch shapes stay predictable.
            head = [batches[i] for i in rng.permutation(len(batches) - 1)] if len(batches) > 1 else []
            batches = head + batches[-1:]
        yield from batches


class Collator:
    """Pads a list of examples to the longest one and stacks the targets with the task's dtype.

    With ``decoder_inputs`` (encoder-decoder models: the model's ``prepare_decoder_input_ids_from_labels``, as
    transformers' ``DataCollatorForSeq2Seq`` uses it), the labels are the decoder's: padded to the longest target,
    and shifted right by the model into the batch's ``decoder_input_ids``.
    """

    def __init__(self, tokenizer, task: Task, pad_to_multiple_of: int | None = None,
                 decoder_inputs: Callable[..., torch.Tensor] | None = None):
        self.tokenizer = tokenizer
        self.dtype = torch_task(task).target_dtype
        self.pads_targets = torch_task(task).pads_targets
        self.pad_to_multiple_of = pad_to_multiple_of
        self.decoder_inputs = decoder_inputs

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        targets = [e.pop("labels") for e in examples]
        # Texts encoded apart (an embedding task's positive, ``positive_*``, and hard negative, ``negative_*``) are
        # each padded to their own longest.
        apart = {prefix: [{k[len(prefix):]: e.pop(k) for k in list(e) if k.startswith(prefix)} for e in examples]
                 for prefix in TEXTS_APART}
        batch = self.tokenizer.pad(examples, padding="longest", pad_to_multiple_of=self.pad_to_multiple_of,
                                   return_tensors="pt")
        for prefix, texts in apart.items():
            if any(texts):
                padded = self.tokenizer.pad(texts, padding="longest", pad_to_multiple_of=self.pad_to_multiple_of,
                                            return_tensors="pt")
                batch.update({prefix + k: v for k, v in padded.items()})
        if self.pads_targets:  # one target per token: pad to the batch's (or the decoder's) length, ignored
            length = batch["input_ids"].shape[1]
            if self.decoder_inputs is not None:
                length = max(len(t) for t in targets)
                multiple = self.pad_to_multiple_of or 1
                length = -(-length // multiple) * multiple
            targets = [list(t) + [IGNORE_INDEX] * (length - len(t)) for t in targets]
        batch["labels"] = torch.as_tensor(np.asarray(targets), dtype=self.dtype)
        if self.decoder_inputs is not None:
            batch["decoder_input_ids"] = self.decoder_inputs(labels=batch["labels"])
        return dict(batch)
