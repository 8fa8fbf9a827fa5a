"""A model that scores text, behind the service's routes: its start-up self-test, concurrent requests pooled into
shared forward passes, and the scores /predict, /embed, /rank and /evaluate answer with (the HTTP side stays in
service/service.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import anyio.to_thread
import numpy as np

from core.manifest import Manifest
from core.metrics import Evaluation
from core.report import assessed
from core.shared_base import AdapterRemoved
from service.batcher import MicroBatcher
from service.requests import RequestError
from service.selftest import run_selftest
from service.settings import Settings


class ModelRemoved(RequestError):
    """The request's model was removed from the service before its turn (404)."""

    status = 404


class NonFiniteOutputs(ArithmeticError):
    """The model gave NaN or infinite outputs: a broken model, not a bad request."""


def token_estimate(max_length: int):
    """A text's (or pair's) tokens as the model reads them, estimated from characters (about 4 a token in English,
    never more than max_length): what a turn at the model is measured in, before anything is tokenized."""

    def cost(text: str, pair: str | None) -> int:
        return min(max_length, (len(text) + len(pair or "")) // 4 + 2)

    return cost


class Scorer:
    """A scoring backend checked at start-up (the constructor raises unless the self-test passes) and pooled."""

    def __init__(self, backend: Any, manifest: Manifest, settings: Settings):
        self.manifest, self.spec, self.settings = manifest, manifest.task.spec, settings
        self.selftest = run_selftest(backend, manifest, half_precision=getattr(backend, "half_precision", False))
        self.batcher = MicroBatcher(backend.logits, settings.max_batch_size,
                                    turn_tokens=settings.turn_tokens or manifest.max_length,
                                    cost=token_estimate(manifest.max_length))
        self.encoder = backend.encoder

    @property
    def measured(self) -> str:
        """What the self-test measured, for the start-up log line."""
        return f"max diff {self.selftest['max_abs_diff']:.2g}"

    async def scores(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> Any:
        """Post-processed scores of texts (and their pairs), computed with whatever else is queued.

        Raises:
            NonFiniteOutputs: the model's outputs are not all finite.
            ModelRemoved: the model was removed from the service meanwhile.
        """
        try:
            outputs = await self.batcher(texts, pairs)
        except AdapterRemoved:
            raise ModelRemoved(f"model: {self.manifest.name!r} was removed while this request waited") from None
        scores = self.spec.scores(outputs, self.manifest.calibration)
        if not np.all(np.isfinite(self.spec.flat(scores))):
            raise NonFiniteOutputs(f"{self.manifest.name} gave non-finite outputs")
        return scores

    async def evaluate(self, texts: Sequence[str], pairs: Sequence[str] | None, targets: Any) -> Evaluation:
        """The task's metrics on labelled examples with their 95% intervals, with the trainer's code (an embedding
        model ranks the positives too: :meth:`core.tasks.base.TaskSpec.judged_inputs`).

        Raises:
            as :meth:`judge`.
        """
        scores = await self.judge(texts, pairs, targets)
        # the intervals' resampling is CPU work: off the event loop, so other requests keep being answered
        return await anyio.to_thread.run_sync(assessed, self.manifest, targets, scores)

    async def judge(self, texts: Sequence[str], pairs: Sequence[str] | None, targets: Any) -> Any:
        """The model's scores for labelled examples, what :func:`core.report.assessed` compares with their targets.

        Raises:
            RequestError: the examples hold more documents to rank than the service's limit, or the model would
                read more texts to judge them than TUNESERVE_MAX_EXAMPLES.
            NonFiniteOutputs: the model's outputs are not all finite.
        """
        corpus = self.spec.ranked_corpus(targets)
        if corpus is not None and corpus > self.settings.max_corpus:
            raise RequestError(f"examples: {corpus:,} distinct documents to rank, over this service's limit of "
                               f"{self.settings.max_corpus:,} per request (TUNESERVE_MAX_CORPUS; every query is "
                               "ranked against every document); post fewer examples, or score a whole file offline "
                               "with `tuneserve evaluate ARTIFACT --data FILE` (a smaller corpus is an easier one: "
                               "figures of different corpus sizes do not compare)")
        n = len(texts)
        texts, pairs = self.spec.judged_inputs(texts, pairs, targets)
        limit, read = self.settings.max_examples, self.spec.texts_read(texts, pairs)
        if read > limit:
            raise RequestError(f"examples: the model reads {read:,} texts to judge these {n:,} examples, over the "
                               f"limit of {limit:,} texts per request "
                               f"(TUNESERVE_MAX_EXAMPLES); post at most {n * limit // read:,} examples per "
                               "request, or score a whole file with `tuneserve evaluate ARTIFACT --data FILE`")
        return await self.scores(texts, pairs)

    async def scores_and_truncation(self, texts: Sequence[str], pairs: Sequence[str] | None) -> tuple:
        """:meth:`scores` and :meth:`truncated` (None for a model that reads long texts in windows). When the model
        is idle, the tokens are counted in a second worker thread while the pass runs, so that a lone request does
        not wait for one more hop to a thread after its pass; under load, after it, so that the counting threads do
        not contend with the passes (BENCHMARKS.md, where a request's time goes)."""
        if self.spec.windows:
            return await self.scores(texts, pairs), None
        if self.batcher.busy:
            scores = await self.scores(texts, pairs)
            return scores, await self.truncated(texts, pairs)
        return tuple(await asyncio.gather(self.scores(texts, pairs), self.truncated(texts, pairs)))

    async def truncated(self, texts: Sequence[str], pairs: Sequence[str] | None) -> list[bool]:
        """Whether each text (or pair) is longer than the model reads (its first max_length tokens)."""
        return await anyio.to_thread.run_sync(self.encoder.truncated, texts, pairs)

    def limits(self) -> dict:
        return {"max_corpus": self.settings.max_corpus} if self.spec.ranked_corpus([]) is not None else {}

    def metadata(self) -> dict | None:
        return None
