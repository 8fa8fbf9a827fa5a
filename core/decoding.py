"""Decoding text from an exported causal language model with ONNX Runtime: no torch.

The graph is a decoder with its key/value cache as flat inputs and outputs (``training/export/decoder.py``
writes one): ``input_ids``, ``attention_mask``, ``position_ids`` and ``past_key_values.{i}.key`` / ``.value`` in,
``logits`` and ``present.{i}.key`` / ``.value`` out. The first step runs the left-padded prompts against an
empty cache; each later step runs one token per row against the cache the previous step returned. Position ids
come from the attention mask as transformers computes them in ``generate`` (``cumsum(mask) - 1``, 0 on padding),
so greedy decoding reproduces ``model.generate(do_sample=False)`` token for token.

Prompts are left-padded to a multiple of :data:`PAD_MULTIPLE` tokens, the same whether a prompt is decoded alone or
pooled with others, and only prompts padded to the same width share a batch. A row's numbers then depend on its own
padding only, never on its batch-mates: padding changes the order in which attention sums add their terms (3e-5 on
SmolLM2's fp32 logits), and 8-bit kernels that quantise activations at run time turn that into changes of up to 0.55
that alter greedy answers, so a row padded for a longer batch-mate would not write what it writes alone.

A row stops at an end-of-sequence token (kept in its token ids, not in its text), at a stop string (cut from
its text) or after ``max_new_tokens``; finished rows leave the batch, so a long answer does not make the short
ones pay. Text is decoded incrementally (the window of recent tokens that vLLM and TGI decode), which is what lets
stop strings end a row as soon as they appear and lets :meth:`OnnxDecoder.stream` send text as it is written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import ArtifactError
from core.tasks.generation import GeneratedText

PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
STREAM_EVERY = 4  # tokens between streamed chunks
PAD_MULTIPLE = 32  # prompts are left-padded to a multiple of this many tokens, alone or pooled
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass(frozen=True)
class Generated(GeneratedText):
    """A :class:`~core.tasks.generation.GeneratedText` that also carries the generated token ids (with the
    end-of-sequence token when the model ended it)."""

    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy at temperature 0; otherwise sampled from the softmax of the logits
    divided by ``temperature``, restricted to the ``top_k`` most likely tokens (0: all) and then to the smallest set
    whose probability reaches ``top_p``, in the order transformers applies them."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or positive, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (no limit) or positive, not {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def pick(self, logits: np.ndarray, rngs: Sequence[np.random.Generator] | None) -> np.ndarray:
        """The next token of each row of ``logits`` ([rows, vocab]); ``rngs`` has one generator per row."""
        if self.greedy:
            return logits.argmax(axis=-1)
        scores = logits.astype(np.float64) / self.temperature
        if 0 < self.top_k < scores.shape[-1]:
            kth = np.partition(scores, -self.top_k, axis=-1)[:, -self.top_k, None]
            scores = np.where(scores < kth, -np.inf, scores)
        chosen = np.empty(len(scores), dtype=np.int64)
        for row, (values, rng) in enumerate(zip(scores, rngs)):
            order = np.argsort(-values, kind="stable")
            probs = np.exp(values[order] - values[order[0]])
            probs /= probs.sum()
            if self.top_p < 1:
                # Keep the most likely tokens up to and including the one that reaches top_p (at least one).
                keep = int(np.searchsorted(np.cumsum(probs), self.top_p)) + 1
                probs = probs[:keep] / probs[:keep].sum()
            cdf = np.cumsum(probs)
            chosen[row] = order[min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(cdf) - 1)]
        return chosen


class _Detokenizer:
    """Text of a growing list of token ids, a piece at a time, equal once joined to decoding them all at once.

    Each new token is decoded together with a few before it (a token's text can depend on its neighbours, and a
    character can span tokens); text is released only when it does not end in an incomplete character.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context
        self.read = 0  # end of the ids whose text has been released

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the very end)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class _Row:
    """One prompt's generation while it runs."""

    def __init__(self, tokenizer: Any, eos: frozenset[int], stop: tuple[str, ...], max_new_tokens: int):
        self.detokenizer = _Detokenizer(tokenizer)
        self.eos, self.stop, self.max_new_tokens = eos, stop, max_new_tokens
        self.longest_stop = max((len(s) for s in stop), default=0)
        self.ids: list[int] = []
        self.text = ""
        self.finish: str | None = None

    def push(self, token: int) -> None:
        self.ids.append(int(token))
        if token in self.eos:
            self.finish = "stop"
            self.text += self.detokenizer.flush()
            return
        searched = max(0, len(self.text) - self.longest_stop + 1)
        self.text += self.detokenizer.push(token)
        if self.stop:
            found = [at for at in (self.text.find(s, searched) for s in self.stop) if at >= 0]
            if found:
                self.text = self.text[:min(found)]
                self.finish = "stop"
                return
        if len(self.ids) >= self.max_new_tokens:
            self.finish = "length"
            self.text += self.detokenizer.flush()

    def settled(self) -> str:
        """The text that no later token can change: all of it once finished, else all but what could still
        turn out to begin a stop string."""
        if self.finish or not self.stop:
            return self.text
        return self.text[:max(0, len(self.text) - self.longest_stop + 1)]

    def result(self) -> Generated:
        return Generated(self.text, self.finish or "length", len(self.ids), tuple(self.ids))


class OnnxDecoder:
    """Greedy or seeded sampling decoding over an ONNX Runtime session of a decoder with a key/value cache.

    Args:
        graph: the ONNX file, or an ONNX Runtime session already open on it (whose own threads, providers and
            spinning then hold).
        tokenizer: anything with ``decode(ids, skip_special_tokens=True)`` (a ``tokenizers.Tokenizer`` or a
            transformers tokenizer); it turns generated ids into text.
        eos_token_ids: the token ids that end a generation.
        threads: ONNX Runtime's intra-op threads (None: its default, one per core).
        providers: execution providers (default: the CPU).
        spinning: let idle threads busy-wait between runs (faster for one caller; a server wants False).

    Raises:
        ArtifactError: the graph lacks an input or output decoding needs, or its cache has no fixed head shape.
    """

    def __init__(self, graph: Any, tokenizer: Any, eos_token_ids: int | Iterable[int], *,
                 threads: int | None = None, providers: Sequence[str] | None = None, spinning: bool = True):
        from core.onnx_runner import open_session

        opened = not isinstance(graph, (str, os.PathLike))
        self.session = graph if opened else open_session(graph, threads=threads, providers=providers, spinning=spinning)
        where = "" if opened else f"{graph}: "
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset([eos_token_ids] if isinstance(eos_token_ids, int) else map(int, eos_token_ids))

        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n in ("input_ids", "attention_mask") if n not in inputs] + \
                  [n for n in ("logits",) if n not in outputs]
        past = sorted(((int(m[1]), m[2], name) for name in inputs if (m := PAST.fullmatch(name))),
                      key=lambda p: (p[0], p[1] != "key"))
        if not past:
            missing.append("past_key_values.{i}.key/value")
        self.past_names = [name for _, _, name in past]
        self.present_names = [f"present.{layer}.{kind}" for layer, kind, _ in past]
        missing += [n for n in self.present_names if n not in outputs]
        if missing:
            raise ArtifactError(f"{where}not a decoder graph with a key/value cache; it lacks {', '.join(missing)}")
        shape = inputs[self.past_names[0]].shape  # [batch, kv heads, past, head dim]
        if len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])):
            raise ArtifactError(f"{where}cache input {self.past_names[0]} has shape {shape}; expected "
                                "[batch, kv_heads, past, head_dim] with fixed heads and head dim")
        self.kv_heads, self.head_dim = shape[1], shape[3]
        self.cache_dtype = _DTYPES.get(inputs[self.past_names[0]].type, np.float32)
        self.uses_position_ids = "position_ids" in inputs
        self.output_names = ["logits", *self.present_names]

    @property
    def num_layers(self) -> int:
        return len(self.past_names) // 2

    def generate(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | Sequence[int | None] | None = None,
                 stop: Sequence[str] = ()) -> list[Generated]:
        """Continue each prompt (token ids, any lengths; prompts of one padded width run as one batch).

        Args:
            prompt_ids: one list of token ids per prompt.
            max_new_tokens: the most tokens each generation may take.
            temperature, top_p, top_k: see :class:`Sampling`; temperature 0 is greedy and ignores the others.
            seed: sampling's seed: one int for the call (row ``i`` draws from child ``i`` of
                ``numpy.random.SeedSequence(seed)``), or one per prompt (so that a batcher pooling separate
                requests gives each the draws it would get alone); None draws fresh entropy.
            stop: strings that end a generation; the text is cut where the first one begins.

        Returns:
            One :class:`Generated` per prompt, in order.
        """
        sampling = Sampling(temperature, top_p, top_k)
        seeds = _seeds(seed, len(prompt_ids))
        results: list[Generated | None] = [None] * len(prompt_ids)
        for width in sorted({padded_width(len(p)) for p in prompt_ids}):  # one batch per padded width
            members = [i for i, p in enumerate(prompt_ids) if padded_width(len(p)) == width]
            rows: list[_Row] = []
            for rows in self._decode([prompt_ids[i] for i in members], max_new_tokens, sampling,
                                     [seeds[i] for i in members] if seeds else None, stop):
                pass
            for i, row in zip(members, rows):
                results[i] = row.result()
        return results

    def stream(self, prompt_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: Sequence[str] = (),
               every: int = STREAM_EVERY) -> Generator[str, None, Generated]:
        """Continue one prompt, yielding its text in pieces (every ``every`` tokens, and at the end).

        The pieces join to the text :meth:`generate` returns for the same arguments; the generator's return value
        (``StopIteration.value``, or ``result = yield from ...``) is that :class:`Generated`. Closing the generator
        early stops decoding.
        """
        if every < 1:
            raise ValueError(f"every must be at least 1 token, not {every}")
        sent = 0
        row = None
        for step, rows in enumerate(self._decode([prompt_ids], max_new_tokens, Sampling(temperature, top_p, top_k),
                                                 _seeds(seed, 1), stop), start=1):
            row = rows[0]
            if row.finish or step % every == 0:
                text = row.settled()
                if len(text) > sent:
                    yield text[sent:]
                    sent = len(text)
        return row.result()

    def _decode(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling,
                seeds: Sequence | None, stop: Sequence[str]) -> Iterator[list[_Row]]:
        """Run the batch (prompts of one padded width; ``seeds``: one per prompt, for sampling) step by step,
        yielding every row's state after each step (the last yield has them all finished)."""
        prompts = [list(map(int, p)) for p in prompt_ids]
        if not prompts:
            return
        if any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        stop = tuple(s for s in stop if s)
        rngs = None if sampling.greedy else [np.random.default_rng(s) for s in seeds]
        rows = [_Row(self.tokenizer, self.eos_token_ids, stop, max_new_tokens) for _ in prompts]

        # The prompts, left-padded; the first step runs them against an empty cache.
        width = padded_width(max(map(len, prompts)))
        input_ids = np.zeros((len(prompts), width), dtype=np.int64)
        mask = np.zeros((len(prompts), width), dtype=np.int64)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
        empty = np.zeros((len(prompts), self.kv_heads, 0, self.head_dim), dtype=self.cache_dtype)
        past = [empty] * len(self.past_names)
        active = np.arange(len(prompts))  # rows still running, in batch order

        while True:
            feed = {"input_ids": input_ids, "attention_mask": mask, **dict(zip(self.past_names, past))}
            if self.uses_position_ids:
                positions = np.clip(mask.cumsum(axis=1) - 1, 0, None)
                feed["position_ids"] = positions[:, -input_ids.shape[1]:]
            logits, *past = self.session.run(self.output_names, feed)
            tokens = sampling.pick(logits[:, -1, :], [rngs[i] for i in active] if rngs else None)
            for i, token in zip(active, tokens):
                rows[i].push(int(token))
            yield rows
            running = np.array([rows[i].finish is None for i in active])
            if not running.any():
                return
            if not running.all():  # finished rows leave the batch
                active, tokens, mask = active[running], tokens[running], mask[running]
                past = [p[running] for p in past]
            input_ids = tokens[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((len(active), 1), dtype=np.int64)], axis=1)


def padded_width(length: int) -> int:
    """The width a prompt of ``length`` tokens is left-padded to."""
    return -(-length // PAD_MULTIPLE) * PAD_MULTIPLE


def _seeds(seed: int | Sequence[int | None] | None, count: int) -> list:
    """One seed per prompt (each a ``SeedSequence`` or an int or None for fresh entropy): row ``i`` of a call with one
    int draws from child ``i`` of ``numpy.random.SeedSequence(seed)``."""
    if seed is None or isinstance(seed, (int, np.integer)):
        return list(np.random.SeedSequence(seed).spawn(count))
    if len(seed) != count:
        raise ValueError(f"{len(seed)} seeds for {count} prompts")
    return list(seed)
