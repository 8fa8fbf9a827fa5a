"""The Ray engine: Ray Data reads the inputs (``read_parquet``, ``read_csv``, ``read_text`` for JSON Lines, a
Hugging Face dataset from disk), maps each chunk onto a pool of actors that each hold the artifact's model
(:class:`RayAnswerer`: an ONNX session on CPUs, torch on a GPU with ``--num-gpus``), and streams the answers back in
input order (``preserve_order``) to the shard writer the local engine uses, so that the job file, the shards, the
errors and resuming are the same on both engines.

On Ray a shard is a whole input file (Ray splits and reads the files itself): a resumed job skips the files
whose shard is written. Give many files to resume at a finer grain.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from core.errors import ConfigError, DataError
from core.manifest import Manifest, read_manifest
from training.batch.answers import Answerer, Answering, Columns, model_scores
from training.batch.inputs import (
    LINE,
    InputFile,
    csv_convert_options,
    csv_parse_options,
)
from training.batch.job import Job

PATH = "path"  # the column Ray Data's include_paths adds
TEXT, PAIR, SCORES = "text", "pair", "scores"
STEP = 1024  # texts an actor scores at a time


def ray_module():
    """Ray, or an error that says how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ConfigError("--engine ray needs Ray Data, which is not installed here: pip install 'tuneserve[batch]' "
                          "(or 'ray[data]==2.60.0')") from None
    return ray


class RayAnswerer:
    """A Ray Data actor: one :class:`Answerer`, loaded once, answering the batches Ray hands it."""

    def __init__(self, artifact: str, columns: Columns, input_format: str, answering: Answering, path: str):
        self.answerer = Answerer(artifact, columns, input_format, answering)
        self.path = path

    def __call__(self, batch: pa.Table) -> pa.Table:
        paths = batch[PATH] if PATH in batch.column_names else pa.array([self.path] * batch.num_rows, pa.string())
        raw = batch.drop_columns([PATH]) if PATH in batch.column_names else batch
        if "text" in raw.column_names and self.answerer.format == "jsonl":  # read_text's column holds the line
            raw = raw.rename_columns([LINE if n == "text" else n for n in raw.column_names])
        return self.answerer(raw).append_column(PATH, paths)


class Cluster:
    """A Ray connection: to the cluster at ``address``, or a local one started here (and stopped on exit)."""

    def __init__(self, address: str | None):
        self.ray = ray_module()
        self.started = False
        if not self.ray.is_initialized():
            if address:
                self.ray.init(address=address, log_to_driver=False)
            else:
                self.ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            self.started = True

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.ray.shutdown()

    def cpus(self) -> float:
        return float(self.ray.cluster_resources().get("CPU", 1))


def pool_size(cpus: float, workers: int | None, num_gpus: float | None) -> tuple[int, float, int]:
    """Actors, CPUs each reserves, and ONNX threads each runs: ``workers`` actors (default: one per 4 CPUs, at least
    one), sharing all but one CPU, which stays free for Ray's read tasks (a pool that takes every CPU starves them)."""
    workers = workers or max(1, int(cpus // 4))
    reserve = max(0.25, (cpus - 1) / workers) if cpus > 1 else 0.5
    threads = max(1, int(cpus // workers))
    return workers, reserve, threads if not num_gpus else 1


def read(ray: Any, files: list[InputFile], columns: Columns) -> Any:
    """A Ray dataset of the files' raw rows, each with the path of its file."""
    paths = [f.path for f in files]
    fmt = files[0].format
    if fmt == "parquet":
        return ray.data.read_parquet(paths, columns=columns.read, include_paths=True)
    if fmt in ("csv", "tsv"):
        return ray.data.read_csv(paths, include_paths=True, parse_options=csv_parse_options(files[0]),
                                 convert_options=csv_convert_options(columns.read, columns.texts.values()),
                                 file_extensions=None)
    if fmt == "jsonl":
        return ray.data.read_text(paths, include_paths=True, drop_empty_lines=False, file_extensions=None)
    import datasets

    if len(files) > 1:
        raise DataError("--engine ray reads one Hugging Face dataset directory per job")
    return ray.data.from_huggingface(datasets.load_from_disk(files[0].path)).select_columns(columns.read)


def answered_batches(cluster: Cluster, files: list[InputFile], artifact: str, columns: Columns, answering: Answering,
                     *, workers: int | None, num_gpus: float | None) -> Iterator[pa.Table]:
    """The answers of every row of ``files``, in input order, each batch with the path of its rows' file."""
    ray = cluster.ray
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    size, reserve, threads = pool_size(cluster.cpus(), workers, num_gpus)
    answering = Answering(**{**answering.__dict__, "threads": answering.threads or threads,
                             "device": "cuda" if num_gpus else answering.device})
    dataset = read(ray, files, columns).map_batches(
        RayAnswerer, fn_constructor_args=(artifact, columns, files[0].format, answering, files[0].path),
        compute=ray.data.ActorPoolStrategy(size=size), batch_size=STEP, batch_format="pyarrow",
        num_cpus=reserve, **({"num_gpus": num_gpus} if num_gpus else {}))
    yield from dataset.iter_batches(batch_format="pyarrow", batch_size=None)


def run_ray(job: Job, files: list[InputFile], artifact: str, columns: Columns, answering: Answering, *,
            address: str | None, workers: int | None, num_gpus: float | None, errors: Any,
            progress: Any) -> None:
    """Answer every input file whose shard is not written yet, on Ray; each file's answers become its shard."""
    import pyarrow.compute as pc

    index = {_key(f.path): i for i, f in enumerate(files)}
    todo = [f for i, f in enumerate(files) if not job.done(i, 0)]
    for i, f in enumerate(files):
        if job.done(i, 0):
            progress.update(job.rows_of(i))
    if not todo:
        return
    writer, current, rows = None, None, 0
    with Cluster(address) as cluster:
        try:
            for batch in answered_batches(cluster, todo, artifact, columns, answering, workers=workers,
                                          num_gpus=num_gpus):
                for path, run in _runs(batch, pc):
                    if path != current:
                        if writer is not None:
                            writer.commit()
                            errors.add(writer)
                        current, rows = path, 0
                        writer = job.writer(index[_key(path)], 0, files[index[_key(path)]].path)
                    writer.add(run, rows + 1)
                    rows += run.num_rows
                    progress.update(run.num_rows)
            if writer is not None:
                writer.commit()
                errors.add(writer)
        except BaseException as exc:
            if writer is not None:
                writer.abort()
            if type(exc).__module__.startswith("ray"):
                raise DataError(f"the Ray job failed: {str(exc).strip().splitlines()[-1][:400]}") from None
            raise


class RayScorer:
    """A Ray Data actor giving the task's scores (what metrics are computed from) of the texts it is handed."""

    def __init__(self, artifact: str, answering: Answering):
        from service.backends import choose_backend

        self.manifest = read_manifest(artifact)
        self.backend = choose_backend(Path(artifact), self.manifest, backend=answering.backend,
                                      device=answering.device, threads=answering.threads,
                                      batch_size=answering.batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pairs = batch[PAIR].tolist() if PAIR in batch else None
        scores = model_scores(self.manifest, self.backend, batch[TEXT].tolist(), pairs)
        column = np.empty(len(scores), dtype=object)
        column[:] = list(scores)
        return {SCORES: column}


def ray_scores(artifact: str, manifest: Manifest, texts: Sequence[str], pairs: Sequence[str] | None, *, backend: str,
               address: str | None, workers: int | None, batch_size: int) -> tuple[Any, str]:
    """The task's scores of texts (and pairs), in order, computed by a pool of Ray actors; and the backend's name."""
    from service.backends import auto_backend

    ray = ray_module()
    device = "auto"
    if backend == "auto":
        backend, device, _ = auto_backend(Path(artifact), manifest, device)
    with Cluster(address) as cluster:
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        size, reserve, threads = pool_size(cluster.cpus(), workers, None)
        table = pa.table({TEXT: list(texts), **({PAIR: list(pairs)} if pairs is not None else {})})
        chunks = [table.slice(i, STEP) for i in range(0, table.num_rows, STEP)]
        answering = Answering(backend=backend, device=device, batch_size=batch_size, threads=threads)
        dataset = ray.data.from_arrow(chunks).map_batches(
            RayScorer, fn_constructor_args=(artifact, answering), compute=ray.data.ActorPoolStrategy(size=size),
            batch_size=STEP, batch_format="numpy", num_cpus=reserve)
        rows = [row for batch in dataset.iter_batches(batch_format="numpy", batch_size=None) for row in batch[SCORES]]
    if rows and isinstance(rows[0], (np.ndarray, np.generic, float)):
        return np.stack(rows), backend
    return rows, backend


def _key(path: str) -> str:
    return os.path.realpath(path.removeprefix("local://"))


def _runs(batch: pa.Table, pc: Any) -> Iterator[tuple[str, pa.Table]]:
    """Consecutive rows of one file: (its path, the rows without the path column)."""
    paths = batch[PATH].to_pylist()
    start = 0
    for end in range(1, len(paths) + 1):
        if end == len(paths) or paths[end] != paths[start]:
            yield paths[start], batch.slice(start, end - start).drop_columns([PATH])
            start = end
