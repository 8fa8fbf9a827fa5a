"""Offline jobs: ``tuneserve batch`` answers files too big for memory with an artifact's model, on this machine
(:mod:`training.batch.local`) or on Ray Data (:mod:`training.batch.on_ray`), giving the service's answers as typed
columns (:mod:`training.batch.answers`) in shards written exactly once (:mod:`training.batch.job`).

Everything the command can check is checked before a model loads: the artifact, the inputs and their columns,
the output directory (new, or this same job's to resume), and Ray where it is asked for.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from core.errors import ConfigError
from core.manifest import read_manifest
from training.batch.answers import Answerer, Answering, Columns, answer_schema
from training.batch.inputs import (
    LINE,
    check_columns,
    check_text_types,
    find_inputs,
    known_rows,
    line_count,
)
from training.batch.job import (
    ERRORS_FILE,
    ROW,
    Errors,
    job_metadata,
    manifest_hash,
    open_job,
)
from training.batch.local import default_threads, run_local

# Rows a worker answers at a time: the model sorts them by length into batches of --batch-size.
STEP = 1024


@dataclass
class BatchOptions:
    """A job, as ``tuneserve batch`` takes it."""

    artifact: str
    input: str
    output: str
    engine: str = "local"
    ray_address: str | None = None
    backend: str = "auto"
    batch_size: int = 64
    workers: int | None = None
    num_gpus: float | None = None
    text: str | None = None
    pair: str | None = None
    id: str | None = None
    keep: list[str] = field(default_factory=list)
    output_format: str = "parquet"
    shard_rows: int = 50_000
    max_errors: int | None = None
    truncation: bool = True
    max_new_tokens: int | None = None
    overwrite: bool = False
    progress: bool = True


@dataclass
class Summary:
    rows: int
    errors: int
    shards: int
    resumed: int
    seconds: float
    backend: str
    output: str

    def line(self) -> str:
        rate = f"{self.rows / self.seconds:,.0f} rows/s" if self.seconds > 0 else "-"
        resumed = f" ({self.resumed} finished before this run)" if self.resumed else ""
        errors = f", {self.errors:,} bad rows (in {ERRORS_FILE})" if self.errors else ", no bad rows"
        return (f"batch: {self.rows:,} rows answered{errors}; {self.shards} shards{resumed} in {self.output}; "
                f"{self.seconds:,.1f} s, {rate}, backend {self.backend}")


def job_columns(manifest, options: BatchOptions) -> Columns:
    """The columns the job reads, defaulting to the artifact's text fields.

    Raises:
        ConfigError: a second text for a model of single texts (or none for a pair model), or an output column
            named twice.
    """
    text = options.text or manifest.text_fields[0]
    pair = options.pair or (manifest.text_fields[1] if manifest.has_pair else None)
    if pair is not None and not manifest.has_pair:
        raise ConfigError(f"--pair {pair}: {manifest.name} reads single texts; leave it out")
    columns = Columns(text, pair, options.id, tuple(options.keep))
    answers = answer_schema(manifest).names
    passed = [c for c in ([options.id] if options.id else []) + list(options.keep)]
    for name in passed:
        if name == ROW or name in answers:
            raise ConfigError(f"--keep/--id {name}: the output has a column of that name already "
                              f"({', '.join([ROW, *answers])}); rename it in the input")
    return columns


def run_batch(options: BatchOptions) -> Summary:
    """Run (or resume) a batch job; returns what it did.

    Raises:
        TuneserveError: a mistake in the command, the inputs or the output directory (before any model loads), a
            file unreadable part-way, or more bad rows than ``max_errors``.
    """
    from service.backends import auto_backend, check_backend

    started = time.perf_counter()
    if options.engine not in ("local", "ray"):
        raise ConfigError(f"--engine {options.engine}: use local or ray")
    if options.num_gpus and options.engine != "ray":
        raise ConfigError("--num-gpus is for --engine ray (GPUs per actor); here, --backend auto runs torch on a GPU "
                          "when torch sees one")
    if options.shard_rows < 1 or options.batch_size < 1:
        raise ConfigError("--shard-rows and --batch-size: give a positive number")
    artifact = Path(options.artifact).resolve()
    manifest = read_manifest(artifact)
    columns = job_columns(manifest, options)
    files = find_inputs(options.input)
    check_columns(files, columns.named)
    for file in files:
        check_text_types(file, columns.texts)
    if options.engine == "ray":
        from training.batch.on_ray import ray_module

        ray_module()
    backend, device = options.backend, "auto"
    if options.num_gpus:  # GPU actors run the model with torch
        backend, device = ("torch" if backend == "auto" else backend), "cuda"
    elif backend == "auto":
        backend, device, _ = auto_backend(artifact, manifest, device)
    check_backend(artifact, manifest, backend=backend)
    answering = Answering(backend=backend, device=device, batch_size=options.batch_size,
                          truncation=options.truncation, max_new_tokens=options.max_new_tokens)
    record = {"artifact": str(artifact), "manifest_sha256": manifest_hash(artifact),
              "inputs": [f.fingerprint for f in files], "columns": {**columns.__dict__, "keep": list(columns.keep)},
              "engine": options.engine, "shard": "file" if options.engine == "ray" else options.shard_rows,
              "output_format": options.output_format, "backend": backend, "truncation": options.truncation,
              "max_new_tokens": options.max_new_tokens}
    job = open_job(options.output, record, options.output_format, overwrite=options.overwrite,
                   metadata=job_metadata(artifact, manifest, backend))
    resumed = len(job.finished_shards())
    errors = Errors(job, options.max_errors)
    if options.max_errors is not None and errors.count > options.max_errors:
        raise ConfigError(f"--max-errors {options.max_errors}: the shards written already hold {errors.count:,} bad "
                          "rows; raise it to go on")
    with _progress(files, options.progress) as progress:
        if options.engine == "ray":
            from training.batch.on_ray import run_ray

            run_ray(job, files, str(artifact), columns, answering, address=options.ray_address,
                    workers=options.workers, num_gpus=options.num_gpus,
                    errors=errors, progress=progress)
        else:
            workers = options.workers or 1
            answering.threads = default_threads(workers)
            make = partial(Answerer, str(artifact), columns, files[0].format, answering)
            run_local(job, files, make, columns=columns.read if files[0].format != "jsonl" else [LINE],
                      text_columns=list(columns.texts.values()), step=min(STEP, options.shard_rows),
                      shard_rows=options.shard_rows, workers=workers, errors=errors, progress=progress)
    return Summary(rows=job.answered_rows(), errors=job.merge_errors(), shards=len(job.finished_shards()),
                   resumed=resumed, seconds=time.perf_counter() - started, backend=backend, output=str(job.out))


def _progress(files, shown: bool):
    """A progress bar over the inputs' rows (counted from metadata, or from lines for CSV and JSON Lines)."""
    from tqdm import tqdm

    # counting a text file's lines reads it once more: only for a bar that is shown
    total = sum((known_rows(f) if known_rows(f) is not None else line_count(f)) for f in files) if shown else None
    return tqdm(total=total, unit="rows", unit_scale=True, disable=not shown, file=sys.stderr, dynamic_ncols=True,
                smoothing=0.1, desc="batch")
