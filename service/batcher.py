"""Requests that arrive together share a forward pass.

While one pass runs, new requests queue; when it ends, the next pass takes everything queued (up to
``max_batch_size`` texts, in arrival order). A lone request runs at once, so there is no batching window
to wait out, and under load batches form by themselves. Nothing is dropped: a request waits its turn.
The backend sorts each pass by length, so mixed lengths cost little padding.
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
    def __init__(self, forward: Forward, max_batch_size: int):
        super().__init__(max_batch_size)
        self.forward = forward

    async def __call__(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> np.ndarray:
        """Raw outputs for ``texts``, computed together with whatever else is queued."""
        job = _Job(texts, pairs, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._start()
        return await job.future

    def _take(self) -> list[_Job]:
        """The next jobs to run together: at least one, then more while they fit in max_batch_size."""
        jobs = [self._queue.pop(0)]
        size = len(jobs[0].texts)
        paired = jobs[0].pairs is not None  # texts with a second text and texts alone never share a pass
        while (self._queue and size + len(self._queue[0].texts) <= self.max_batch_size
               and (self._queue[0].pairs is not None) == paired):
            size += len(self._queue[0].texts)
            jobs.append(self._queue.pop(0))
        return jobs

    def _run(self, jobs: list[_Job]) -> np.ndarray:
        texts = [t for j in jobs for t in j.texts]
        pairs = [p for j in jobs for p in j.pairs] if jobs[0].pairs is not None else None
        return self.forward(texts, pairs)

    def _count(self, job: _Job) -> int:
        return len(job.texts)
