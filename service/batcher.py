"""Requests that arrive together share a forward pass, and a large request takes turns with the others.

While one pass runs, new requests queue; when it ends, the next pass takes what is queued (up to
``max_batch_size`` texts and ``turn_tokens`` estimated tokens: the service's default is one full-length text), one
turn per request in rotation. A request larger than one turn is split into turns that alternate with the other
requests' (a one-text request waits for one turn of a 256-text request, not for all of it). A lone request runs at
once, so there is no batching window to wait out, and under load batches form by themselves. Nothing is dropped:
a request waits its turn. The backend sorts each pass by length, so mixed lengths cost little padding.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio.to_thread
import numpy as np

Forward = Callable[[list[str], list[str] | None], np.ndarray]


@dataclass
class _Job:
    texts: Sequence[str]
    pairs: Sequence[str] | None
    future: asyncio.Future = field(repr=False)


class PooledTurns(ABC):
    """Jobs queued while a pass runs share the next one; a subclass says which jobs go together (:meth:`_take`),
    runs a pass (:meth:`_run`, in a worker thread, so the event loop keeps answering) and how many outputs each
    job gets back (:meth:`_count`)."""

    def __init__(self, max_batch_size: int):
        self.max_batch_size = max_batch_size
        self._queue: list = []
        self._running = False
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # outputs per recent pass, for tests and benchmarks

    def _start(self) -> None:
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._drain())

    @abstractmethod
    def _take(self) -> list:
        """The next jobs to run together (at least one)."""

    @abstractmethod
    def _run(self, jobs: list) -> Sequence:
        """One pass over the jobs' inputs, outputs in order."""

    @abstractmethod
    def _count(self, job) -> int:
        """How many outputs of a pass belong to ``job``."""

    async def _drain(self) -> None:
        try:
            while self._queue:
                jobs = [j for j in self._take() if not j.future.done()]  # a request already gone needs no pass
                if not jobs:
                    continue
                try:
                    out = await anyio.to_thread.run_sync(self._run, jobs)
                except Exception as exc:  # the requests in this pass get the error; later ones still run
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(exc)
                    continue
                self.batch_sizes.append(sum(self._count(j) for j in jobs))
                start = 0
                for job in jobs:
                    if not job.future.done():
                        job.future.set_result(out[start:start + self._count(job)])
                    start += self._count(job)
        finally:
            self._running = False


class MicroBatcher(PooledTurns):
    """Pooled passes over a scoring model; ``cost`` estimates a text's (or pair's) tokens, ``turn_tokens`` bounds a
    pass's (None: texts alone bound it)."""

    def __init__(self, forward: Forward, max_batch_size: int, *, turn_tokens: int | None = None,
                 cost: Callable[[str, str | None], int] | None = None):
        super().__init__(max_batch_size)
        self.forward = forward
        self.turn_tokens = turn_tokens
        self.cost = cost or (lambda text, pair: 1)
        self._queue: list[deque[_Job]] = []  # one entry per request: its turns not yet taken, in order

    async def __call__(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> np.ndarray:
        """Raw outputs for ``texts``, computed together with whatever else is queued, in turns."""
        loop = asyncio.get_running_loop()
        turns = deque(_Job(texts[a:b], pairs[a:b] if pairs is not None else None, loop.create_future())
                      for a, b in self._turns(texts, pairs))
        futures = [job.future for job in turns]
        self._queue.append(turns)
        self._start()
        outputs = await asyncio.gather(*futures)
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def _turns(self, texts: Sequence[str], pairs: Sequence[str] | None) -> list[tuple[int, int]]:
        """Consecutive slices of a request, each within max_batch_size texts and turn_tokens (at least one text)."""
        bounds, start, size, tokens = [], 0, 0, 0
        for i, text in enumerate(texts):
            cost = self.cost(text, pairs[i] if pairs is not None else None)
            if size and (size + 1 > self.max_batch_size
                         or (self.turn_tokens is not None and tokens + cost > self.turn_tokens)):
                bounds.append((start, i))
                start, size, tokens = i, 0, 0
            size, tokens = size + 1, tokens + cost
        bounds.append((start, len(texts)))
        return bounds

    def _take(self) -> list[_Job]:
        """The next pass: the next turn of each request in rotation while they fit (texts with a second text and
        texts alone never share a pass); a request with turns left goes to the back of the rotation."""
        jobs: list[_Job] = []
        size = tokens = 0
        while self._queue:
            job = self._queue[0][0]
            cost = sum(self.cost(t, job.pairs[i] if job.pairs is not None else None) for i, t in enumerate(job.texts))
            if jobs and (size + len(job.texts) > self.max_batch_size or (job.pairs is not None) != paired
                         or (self.turn_tokens is not None and tokens + cost > self.turn_tokens)):
                break
            request = self._queue.pop(0)
            request.popleft()
            if request:
                self._queue.append(request)
            jobs.append(job)
            size, tokens, paired = size + len(job.texts), tokens + cost, job.pairs is not None
        return jobs

    def _run(self, jobs: list[_Job]) -> np.ndarray:
        texts = [t for j in jobs for t in j.texts]
        pairs = [p for j in jobs for p in j.pairs] if jobs[0].pairs is not None else None
        return self.forward(texts, pairs)

    def _count(self, job: _Job) -> int:
        return len(job.texts)
