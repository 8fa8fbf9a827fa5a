"""Requests that arrive together share a forward pass, and a large request takes turns with the others.

While one pass runs, new requests queue; when it ends, the next pass takes what is queued (up to
``max_batch_size`` texts and ``turn_tokens`` estimated tokens: the service's default is one full-length text), one
turn per request in rotation. A request larger than one turn is split into turns that alternate with the other
requests'. A request that fits in one turn does not wait for a large request's turn at all: while such a turn
runs, a second lane runs the queued one-turn requests beside it (a pass never mixes the two kinds), so a one-text
request is answered in about its own time while 256-text requests keep the model busy (BENCHMARKS.md, fairness).
A lone request runs at once, so there is no batching window to wait out, and under load batches form by
themselves. Nothing is dropped: a request waits its turn. The backend sorts each pass by length, so mixed lengths
cost little padding.
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
    part: bool = False  # one turn of a request larger than a turn


class PooledTurns(ABC):
    """Jobs queued while a pass runs share the next one; a subclass says which jobs go together (:meth:`_take`),
    runs a pass (:meth:`_run`, in a worker thread, so the event loop keeps answering) and how many outputs each
    job gets back (:meth:`_count`)."""

    def __init__(self, max_batch_size: int):
        self.max_batch_size = max_batch_size
        self._queue: list = []
        self._running = False
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # outputs per recent pass, for tests and benchmarks
        self._tasks: set[asyncio.Task] = set()  # the loop keeps only weak references to its tasks

    @property
    def busy(self) -> bool:
        """A pass is running or requests are queued."""
        return self._running or bool(self._queue)

    def _start(self) -> None:
        if not self._running:
            self._running = True
            self._spawn(self._drain())

    def _spawn(self, work) -> None:
        """Run ``work`` as a task of the running loop, held until it ends."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
                await self._pass(self._take())
        finally:
            self._running = False

    async def _pass(self, jobs: list) -> None:
        """One pass over the jobs in a worker thread (so the event loop keeps answering); each job gets its
        outputs, or the pass's error (later passes still run)."""
        jobs = [j for j in jobs if not j.future.done()]  # a request already gone needs no pass
        if not jobs:
            return
        try:
            out = await anyio.to_thread.run_sync(self._run, jobs)
        except Exception as exc:
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        self.batch_sizes.append(sum(self._count(j) for j in jobs))
        start = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(out[start:start + self._count(job)])
            start += self._count(job)


class MicroBatcher(PooledTurns):
    """Pooled passes over a scoring model; ``cost`` estimates a text's (or pair's) tokens, ``turn_tokens`` bounds a
    pass's (None: texts alone bound it). ``forward`` is called from two threads at once while a large request's
    turn and the one-turn requests' lane run side by side: it must be thread-safe (ONNX Runtime sessions are; the
    service's backends hold the tokenizer's lock to encode)."""

    def __init__(self, forward: Forward, max_batch_size: int, *, turn_tokens: int | None = None,
                 cost: Callable[[str, str | None], int] | None = None):
        super().__init__(max_batch_size)
        self.forward = forward
        self.turn_tokens = turn_tokens
        self.cost = cost or (lambda text, pair: 1)
        self._queue: list[deque[_Job]] = []  # one entry per request: its turns not yet taken, in order
        self._large_turn = False  # the pass under way holds turns of requests larger than a turn
        self._second_lane = False  # the one-turn requests' lane is running

    async def __call__(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> np.ndarray:
        """Raw outputs for ``texts``, computed together with whatever else is queued, in turns."""
        loop = asyncio.get_running_loop()
        bounds = self._turns(texts, pairs)
        turns = deque(_Job(texts[a:b], pairs[a:b] if pairs is not None else None, loop.create_future(),
                           part=len(bounds) > 1) for a, b in bounds)
        futures = [job.future for job in turns]
        self._queue.append(turns)
        self._start()
        if len(bounds) == 1 and self._large_turn:
            self._start_second_lane()
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

    async def _pass(self, jobs: list[_Job]) -> None:
        """A pass of the main lane; while it holds turns of large requests, the queued one-turn requests run
        beside it."""
        self._large_turn = bool(jobs) and jobs[0].part
        try:
            if self._large_turn:
                self._start_second_lane()
            await super()._pass(jobs)
        finally:
            self._large_turn = False

    def _start_second_lane(self) -> None:
        if not self._second_lane and any(not request[0].part for request in self._queue):
            self._second_lane = True
            self._spawn(self._drain_one_turn_requests())

    async def _drain_one_turn_requests(self) -> None:
        """The second lane: pooled passes of the queued one-turn requests, while a large request's turn runs."""
        try:
            while self._large_turn:
                jobs = self._take(one_turn_only=True)
                if not jobs:
                    break
                await super()._pass(jobs)
        finally:
            self._second_lane = False

    def _take(self, one_turn_only: bool = False) -> list[_Job]:
        """The next pass: the next turn of each request in rotation while they fit; a request with turns left goes
        to the back of the rotation. A pass holds turns of large requests or one-turn requests, not both, and texts
        with a second text and texts alone never share one."""
        jobs: list[_Job] = []
        size = tokens = 0
        i = 0
        while i < len(self._queue):
            job = self._queue[i][0]
            if one_turn_only and job.part:
                i += 1
                continue
            cost = sum(self.cost(t, job.pairs[k] if job.pairs is not None else None) for k, t in enumerate(job.texts))
            if jobs and (size + len(job.texts) > self.max_batch_size or (job.pairs is not None) != (jobs[0].pairs is not None)
                         or job.part != jobs[0].part
                         or (self.turn_tokens is not None and tokens + cost > self.turn_tokens)):
                break
            request = self._queue.pop(i)
            request.popleft()
            if request:
                self._queue.append(request)
            jobs.append(job)
            size, tokens = size + len(job.texts), tokens + cost
        return jobs

    def _run(self, jobs: list[_Job]) -> np.ndarray:
        texts = [t for j in jobs for t in j.texts]
        pairs = [p for j in jobs for p in j.pairs] if jobs[0].pairs is not None else None
        return self.forward(texts, pairs)

    def _count(self, job: _Job) -> int:
        return len(job.texts)
