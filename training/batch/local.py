"""The local engine: one process reads each input as a stream, and the model runs in it, or in ``--workers``
processes each with its own session; the chunks' answers come back in order and are written shard by shard."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import pyarrow as pa

from training.batch.answers import Answerer
from training.batch.inputs import InputFile, read_chunks
from training.batch.job import Errors, Job


def numbered_chunks(file: InputFile, columns: list[str], text_columns: list[str], *, step: int, shard_rows: int
                    ) -> Iterator[tuple[int, pa.Table]]:
    """The file's chunks with the number of their first row (from 1); a chunk never crosses a shard's end."""
    first = 1
    for piece in read_chunks(file, columns, shard_rows, text_columns=text_columns):
        for start in range(0, piece.num_rows, step):
            chunk = piece.slice(start, step)
            yield first, chunk
            first += chunk.num_rows


# The answerer of this worker process (the local engine's pool builds one per process).
_WORKER: Answerer | None = None


def _start_worker(make: Callable[[], Answerer]) -> None:
    global _WORKER
    _WORKER = make()


def _answer_in_worker(chunk: pa.Table) -> pa.Table:
    return _WORKER(chunk)


def run_local(job: Job, files: list[InputFile], make: Callable[[], Answerer], *, columns: list[str],
              text_columns: list[str], step: int, shard_rows: int, workers: int, errors: Errors,
              progress: Any) -> None:
    """Answer every unfinished shard of every file; finished shards are read past, not answered again."""
    pool = None
    if workers > 1:
        # spawn, not fork: ONNX Runtime's threads do not survive a fork
        pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_worker,
                                   initargs=(make,))

        def answer(chunk: pa.Table) -> Future:
            return pool.submit(_answer_in_worker, chunk)
    else:
        answerer = make()

        def answer(chunk: pa.Table) -> Future:
            future: Future = Future()
            future.set_result(answerer(chunk))
            return future

    pending: deque[tuple[int, int, int, InputFile, Future]] = deque()
    state: dict[str, Any] = {"key": None, "writer": None}

    def drain(limit: int) -> None:
        """Write the answers of the oldest chunks until at most ``limit`` are in flight (in input order)."""
        while len(pending) > limit:
            file_index, shard, first, file, future = pending.popleft()
            answered = future.result()
            if state["key"] != (file_index, shard):
                finish()
                state["key"], state["writer"] = (file_index, shard), job.writer(file_index, shard, file.path)
            state["writer"].add(answered, first)
            progress.update(answered.num_rows)

    def finish() -> None:
        writer = state["writer"]
        if writer is not None:
            writer.commit()
            state["writer"] = None
            errors.add(writer)

    try:
        for file_index, file in enumerate(files):
            for first, chunk in numbered_chunks(file, columns, text_columns, step=step, shard_rows=shard_rows):
                shard = (first - 1) // shard_rows
                if job.done(file_index, shard):
                    progress.update(chunk.num_rows)
                    continue
                pending.append((file_index, shard, first, file, answer(chunk)))
                drain(2 * workers)
        drain(0)
        finish()
    except BaseException:
        if state["writer"] is not None:
            state["writer"].abort()
        for *_, future in pending:
            future.cancel()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def default_threads(workers: int) -> int:
    """Threads per worker process: the cores shared out."""
    return max(1, (os.cpu_count() or 1) // workers)
