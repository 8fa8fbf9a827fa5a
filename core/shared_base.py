"""Many fine-tuned models over one base graph: each row of a batch with its own LoRA adapter (no torch).

The base encoder's graph (written by training/export/shared.py) takes, beside the token ids, an adapter index per
row and, for every linear layer of the encoder, the stacked low-rank factors of the adapters loaded: ``lora_A.<layer>``
of shape (K, in, R) and ``lora_B.<layer>`` of shape (K, R, out), B already scaled by alpha / r. Row i computes
``x @ W + (x @ A[k_i]) @ B[k_i]``, so requests for different models share one pass and a row's answer does not
depend on its batch-mates'. An adapter of lower rank is padded with zeros to R, and a layer an adapter leaves alone
holds zeros: both exact. A model trained with a frozen encoder has zeros everywhere. Each model's head (BERT's pooler
and classifier on the first token, or a classifier per token) runs in NumPy on its own rows' hidden states.

A model's adapter file (``onnx/shared/adapter.safetensors``) holds its factors under the graph's input names, its
head under ``head.*``, and in its metadata the head's kind and the identity of the base weights it was trained on;
models over one base identity share one session.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.encoding import Encoder
from core.errors import ArtifactError

SHARED_DIR = "shared"
BASE_FILE = "base.onnx"
ADAPTER_FILE = "adapter.safetensors"
# In a model store entry registered without its base graph (training/publish/register.py), this file beside where the
# graph would be holds the store tag of the entry that has it: the models over one base store it once.
STORED_BASE_FILE = "base.store-tag"
STORED_BASE_PREFIX = "tuneserve-base-"  # that entry's name: the prefix and the base identity's first 16 digits
ADAPTER_INPUT = "adapter"  # the graph's input: each row's index into the stacked factors
HIDDEN_OUTPUT = "hidden"
FACTOR_PREFIXES = ("lora_A.", "lora_B.")
# The heads the shared base knows: BERT's pooler (dense + tanh on the first token) then the classifier; a classifier
# on every token. The tensors each needs, as the adapter file names them.
HEADS = {"pooled": ("head.pooler.weight", "head.pooler.bias", "head.classifier.weight", "head.classifier.bias"),
         "tokens": ("head.classifier.weight", "head.classifier.bias")}


_BLAS = None


def _one_blas_thread():
    """NumPy's matrix products on one thread. OpenBLAS's idle threads spin for a while after each product, taking the
    cores ONNX Runtime's next pass needs: with its default threads the heads made the passes about twice as slow."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


@dataclass(frozen=True)
class Adapter:
    """One model's part of a shared base: its low-rank factors by graph input, its head, the base it needs."""

    factors: dict[str, np.ndarray]  # "lora_A.<layer>" (in, r) and "lora_B.<layer>" (r, out), B scaled
    head_kind: str
    head: dict[str, np.ndarray]
    base: str  # identity of the base weights (a sha256)

    @property
    def rank(self) -> int:
        return max((a.shape[1] for name, a in self.factors.items() if name.startswith("lora_A.")), default=0)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.factors.values(), *self.head.values()))

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """The head over a batch's hidden states (batch, sequence, width), on one BLAS thread."""
        h = self.head
        with _one_blas_thread():
            if self.head_kind == "pooled":
                pooled = np.tanh(hidden[:, 0] @ h["head.pooler.weight"].T + h["head.pooler.bias"])
                return pooled @ h["head.classifier.weight"].T + h["head.classifier.bias"]
            return hidden @ h["head.classifier.weight"].T + h["head.classifier.bias"]

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.numpy import save_file

        tensors = {**{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.factors.items()},
                   **{k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.head.items()}}
        save_file(tensors, str(path), metadata={"head": self.head_kind, "base": self.base})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Adapter:
        """Raises:
            ArtifactError: the file is unreadable, or its head is of an unknown kind or incomplete."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "np") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, SafetensorError) as exc:
            raise ArtifactError(f"{path}: cannot read the adapter ({exc})") from None
        kind = metadata.get("head")
        if kind not in HEADS or not metadata.get("base"):
            raise ArtifactError(f"{path}: the adapter's metadata names no known head ({kind!r}) or no base")
        missing = [k for k in HEADS[kind] if k not in tensors]
        if missing:
            raise ArtifactError(f"{path}: the adapter's {kind} head lacks {', '.join(missing)}")
        return cls({k: v for k, v in tensors.items() if k.startswith(FACTOR_PREFIXES)}, kind,
                   {k: v for k, v in tensors.items() if k.startswith("head.")}, metadata["base"])


class AdapterRemoved(LookupError):
    """The adapter a batch asked for was removed before its pass ran."""


@dataclass
class _Stacks:
    """The adapters a pass sees: their order and their factors stacked (replaced whole, never changed in place)."""

    index: dict[str, int] = field(default_factory=dict)
    feeds: dict[str, np.ndarray] = field(default_factory=dict)
    rank: int = 1


@dataclass
class _Submission:
    batch: dict[str, np.ndarray]
    key: str
    result: Any = None
    error: BaseException | None = None
    done: bool = False


class SharedBase:
    """One ONNX Runtime session over a base encoder, and the adapters of the models that share it.

    Calls from several threads (each model's pooled passes) meet here: while one pass runs, the others queue, and
    the next pass takes them all, each row with its own adapter.
    """

    def __init__(self, graph: str | os.PathLike, base: str, *, threads: int | None = None,
                 providers: Sequence[str] | None = None, spinning: bool = True):
        from core.onnx_runner import OnnxModel

        self.graph, self.base = Path(graph), base
        try:
            self.model = OnnxModel(graph, threads=threads, providers=providers, spinning=spinning)
        except Exception as exc:  # onnxruntime raises its own types for a bad file
            raise ArtifactError(f"{graph}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:300]})") from None
        inputs = {i.name: i for i in self.model.session.get_inputs()}
        # (in, out) of each adapted layer, from the graph's own input shapes
        self.layers = {name.removeprefix("lora_A."): (inputs[name].shape[1], inputs[f"lora_B.{name[7:]}"].shape[2])
                       for name in inputs if name.startswith("lora_A.")}
        self.token_inputs = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in inputs]
        self._stacks = _Stacks()
        self._adapters: dict[str, Adapter] = {}  # heads (the factors are in the stacks)
        self._ranks: dict[str, int] = {}
        self._changes = threading.Lock()
        self._queue: list[_Submission] = []
        self._turn = threading.Condition()
        self._running = False
        self.passes: deque[tuple[int, int]] = deque(maxlen=1000)  # (rows, models) of recent passes, for tests

    def __contains__(self, key: str) -> bool:
        return key in self._stacks.index

    def add(self, key: str, adapter: Adapter) -> None:
        """Make an adapter routable under ``key`` (replacing one of that key).

        Raises:
            ArtifactError: it was trained on other base weights, or adapts a layer the base graph does not have.
        """
        if adapter.base != self.base:
            raise ArtifactError(f"{key}: trained on other base weights (identity {adapter.base[:12]}) than the shared "
                                f"base served here ({self.base[:12]})")
        foreign = sorted({n.split(".", 1)[1] for n in adapter.factors} - set(self.layers))
        if foreign:
            raise ArtifactError(f"{key}: adapts {', '.join(foreign[:3])}, which the shared base graph does not adapt")
        with self._changes:
            self._stacks = self._restacked(key, adapter)
            # the factors live on in the stacks alone; the head is kept for this model's answers
            self._adapters = {**self._adapters, key: Adapter({}, adapter.head_kind, adapter.head, adapter.base)}
            self._ranks = {**self._ranks, key: adapter.rank}

    def remove(self, key: str) -> None:
        with self._changes:
            self._stacks = self._restacked(key, None)
            self._adapters = {k: a for k, a in self._adapters.items() if k != key}
            self._ranks = {k: r for k, r in self._ranks.items() if k != key}

    def _restacked(self, key: str, adapter: Adapter | None) -> _Stacks:
        """The stacks with ``key``'s row replaced by ``adapter``'s factors (None: without ``key``), copied from the
        current ones: a pass under way keeps the stacks it took."""
        old = self._stacks
        kept = [k for k in old.index if k != key]
        keys = kept + ([key] if adapter is not None else [])
        ranks = [self._ranks[k] for k in kept] + ([adapter.rank] if adapter is not None else [])
        rank, carried = max(ranks + [1]), min(old.rank, max(ranks + [1]))
        rows = [old.index[k] for k in kept]
        feeds = {}
        for layer, (width_in, width_out) in self.layers.items():
            a = np.zeros((max(len(keys), 1), width_in, rank), np.float32)
            b = np.zeros((max(len(keys), 1), rank, width_out), np.float32)
            if rows:
                a[:len(rows), :, :carried] = old.feeds[f"lora_A.{layer}"][rows, :, :carried]
                b[:len(rows), :carried, :] = old.feeds[f"lora_B.{layer}"][rows, :carried, :]
            if adapter is not None and f"lora_A.{layer}" in adapter.factors:
                own_a, own_b = adapter.factors[f"lora_A.{layer}"], adapter.factors[f"lora_B.{layer}"]
                a[len(rows), :, :own_a.shape[1]] = own_a
                b[len(rows), :own_b.shape[0], :] = own_b
            feeds[f"lora_A.{layer}"], feeds[f"lora_B.{layer}"] = a, b
        return _Stacks({k: i for i, k in enumerate(keys)}, feeds, rank)

    def hidden(self, batch: dict[str, np.ndarray], key: str) -> np.ndarray:
        """The hidden states of one padded batch under one model's adapter, computed in a pass with whatever other
        models' batches are queued.

        Raises:
            AdapterRemoved: no adapter of that key is loaded (it was removed meanwhile).
        """
        mine = _Submission({n: np.asarray(batch[n], dtype=np.int64) for n in self.token_inputs}, key)
        with self._turn:
            self._queue.append(mine)
            while not mine.done and self._running:
                self._turn.wait()
            if not mine.done:  # no pass under way: this thread runs the next one, for everything queued
                self._running, taken, self._queue = True, self._queue, []
        if not mine.done:
            try:
                self._run(taken)
            finally:
                with self._turn:
                    self._running = False
                    self._turn.notify_all()
        if mine.error is not None:
            raise mine.error
        return mine.result

    def _run(self, taken: list[_Submission]) -> None:
        stacks = self._stacks  # one snapshot for the whole pass
        runnable = []
        for s in taken:
            if s.key in stacks.index:
                runnable.append(s)
            else:
                s.error, s.done = AdapterRemoved(f"no adapter {s.key!r} is loaded (it was removed)"), True
        if not runnable:
            return
        width = max(s.batch["input_ids"].shape[1] for s in runnable)
        feed = {name: np.concatenate([np.pad(s.batch[name], ((0, 0), (0, width - s.batch[name].shape[1])))
                                      for s in runnable]) for name in self.token_inputs}
        feed[ADAPTER_INPUT] = np.concatenate([np.full(len(s.batch["input_ids"]), stacks.index[s.key], np.int64)
                                             for s in runnable])
        try:
            hidden = self.model.session.run([HIDDEN_OUTPUT], {**feed, **stacks.feeds})[0]
        except Exception as exc:  # every batch in the pass gets the error
            for s in runnable:
                s.error, s.done = exc, True
            return
        self.passes.append((len(feed[ADAPTER_INPUT]), len({s.key for s in runnable})))
        start = 0
        for s in runnable:
            rows, own = s.batch["input_ids"].shape
            s.result, s.done = hidden[start:start + rows, :own], True
            start += rows

    def model_for(self, key: str) -> SharedModel:
        return SharedModel(self, key)


@dataclass(frozen=True)
class SharedModel:
    """One model over a shared base: the interface of :class:`core.onnx_runner.OnnxModel` (logits of texts)."""

    base: SharedBase
    key: str

    @property
    def adapter(self) -> Adapter:
        return self.base._adapters[self.key]

    def forward(self, batch) -> np.ndarray:
        return self.adapter.logits(self.base.hidden(batch, self.key)).astype(np.float32, copy=False)

    def logits(self, encoder: Encoder, texts: Sequence[str], pairs: Sequence[str] | None = None, *, task,
               batch_size: int = 64, by_length: bool = True) -> Any:
        return task.spec.run(self.forward, encoder, texts, pairs, batch_size=batch_size, return_tensors="np",
                             by_length=by_length)

