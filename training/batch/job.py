"""A batch job's output directory: the job file that says what it holds, the shards written exactly once, and the
errors file.

Layout of ``--output DIR``::

    _tuneserve_job.json          the artifact (its manifest's hash), the inputs (path, size, mtime), the options
    part-00000-000000.parquet    input file 0, shard 0: one row per answered input row, in input order
    part-00000-000001.parquet    ...
    _errors/part-00000-000001.jsonl   the bad rows of that shard: file, row, reason (and id)
    _errors.jsonl                every bad row of the job, merged when it ends

A shard is written to a hidden temporary name and renamed when whole, after its errors file: a shard file that
exists is finished, and a job started again with the same command skips it. Names starting with ``_`` or ``.`` are
what Parquet readers skip, so ``pandas.read_parquet(DIR)`` reads the answers alone, in input order.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pyarrow as pa

from core.errors import DataError, TuneserveError
from core.manifest import MANIFEST_FILE, Manifest
from training.batch.answers import ANSWERED, BAD, REASON, STATUS

JOB_FILE = "_tuneserve_job.json"
ERRORS_DIR = "_errors"
ERRORS_FILE = "_errors.jsonl"
JOB_VERSION = 1
SHARD = re.compile(r"^part-(\d{5})-(\d{6})\.(parquet|jsonl)$")
ROW = "row"  # the output column: the row's number in its input file, from 1


class JobError(TuneserveError):
    """The output directory cannot take this job (it holds something else, or another job's shards)."""


def manifest_hash(artifact: str | Path) -> str:
    return hashlib.sha256((Path(artifact) / MANIFEST_FILE).read_bytes()).hexdigest()


def shard_name(file_index: int, shard: int, output_format: str) -> str:
    return f"part-{file_index:05d}-{shard:06d}.{output_format}"


@dataclass
class Job:
    """One job's output directory and what identifies the job (``record``, kept in the job file)."""

    out: Path
    record: dict[str, Any]
    output_format: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def done(self, file_index: int, shard: int) -> bool:
        return (self.out / shard_name(file_index, shard, self.output_format)).is_file()

    def finished_shards(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if SHARD.match(p.name))

    def writer(self, file_index: int, shard: int, source: str) -> ShardWriter:
        return ShardWriter(self, file_index, shard, source)

    def errors(self) -> int:
        """Bad rows so far, in finished shards."""
        directory = self.out / ERRORS_DIR
        if not directory.is_dir():
            return 0
        return sum(_lines(p) for p in directory.glob("part-*.jsonl") if self.done(*_indices(p.name)))

    def merge_errors(self) -> int:
        """Write every finished shard's bad rows to :data:`ERRORS_FILE` (in input order); returns their count."""
        directory = self.out / ERRORS_DIR
        parts = sorted(p for p in directory.glob("part-*.jsonl") if self.done(*_indices(p.name))) \
            if directory.is_dir() else []
        count = 0
        tmp = self.out / f".{ERRORS_FILE}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as merged:
            for part in parts:
                text = part.read_text(encoding="utf-8")
                merged.write(text)
                count += text.count("\n")
        os.replace(tmp, self.out / ERRORS_FILE)
        return count

    def rows_of(self, file_index: int) -> int:
        """Input rows a finished shard of one file covers (its answers and its bad rows)."""
        shards = [p for p in self.finished_shards() if _indices(p.name)[0] == file_index]
        errors = [self.out / ERRORS_DIR / p.name.replace(".parquet", ".jsonl") for p in shards]
        return self.rows_in(shards) + sum(_lines(p) for p in errors if p.exists())

    def rows_in(self, shards: list[Path]) -> int:
        import pyarrow.parquet as pq

        if self.output_format == "parquet":
            return sum(pq.ParquetFile(p).metadata.num_rows for p in shards)
        return sum(_lines(p) for p in shards)

    def answered_rows(self) -> int:
        """Rows in the finished shards."""
        return self.rows_in(self.finished_shards())


def _indices(name: str) -> tuple[int, int]:
    file_index, shard = name.split(".")[0].split("-")[1:3]
    return int(file_index), int(shard)


def _lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


def open_job(out: str | Path, record: dict[str, Any], output_format: str, *, overwrite: bool,
             metadata: dict[str, Any]) -> Job:
    """The output directory made ready for the job: new, or this same job's to resume (its finished shards kept).

    With ``overwrite``, the shards, errors and job file of an earlier job there are removed first (nothing else
    is); without it, a directory holding anything else, or another job's shards, is refused.

    Raises:
        JobError: saying what the directory holds, or what changed since the job there started.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise JobError(f"--output {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    job = Job(out, {"tuneserve_batch_job": JOB_VERSION, **record}, output_format, metadata)
    job_file = out / JOB_FILE
    ours = [p for p in out.iterdir() if SHARD.match(p.name) or p.name in (JOB_FILE, ERRORS_DIR, ERRORS_FILE)
            or p.name.startswith(".part-") or p.name.startswith(f".{ERRORS_FILE}")]
    foreign = sorted(p.name for p in out.iterdir() if p not in ours)
    if overwrite:
        _remove(ours)
    elif job_file.is_file():
        try:
            earlier = json.loads(job_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise JobError(f"--output {out}: {JOB_FILE} is unreadable ({exc}); give another --output, or "
                           "--overwrite") from None
        changed = _differences(earlier, job.record)
        if changed:
            raise JobError(f"--output {out} holds another job's shards ({'; '.join(changed)}); the same command "
                           "resumes a job, so give another --output, or --overwrite to start this one there")
        if foreign:
            raise JobError(f"--output {out}: holds files that are not this job's ({', '.join(foreign[:5])}); move "
                           "them, or give another --output")
    elif ours or foreign:
        shown = ", ".join((foreign or [p.name for p in ours])[:5])
        raise JobError(f"--output {out}: not empty and not a tuneserve batch job's ({shown}); give an empty or new "
                       "directory, or --overwrite to write there")
    for stale in out.glob(".part-*.tmp-*"):  # a shard being written when an earlier run was killed
        stale.unlink()
    if not job_file.is_file():  # first, so that whatever is written next belongs to a job
        tmp = out / f".{JOB_FILE}.tmp"
        tmp.write_text(json.dumps(job.record, indent=2) + "\n")
        os.replace(tmp, job_file)
    (out / ERRORS_DIR).mkdir(exist_ok=True)
    return job


def _remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            for part in path.iterdir():
                part.unlink()
            path.rmdir()
        else:
            path.unlink()


def _differences(earlier: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two job records, in words."""
    changed = []
    if earlier.get("manifest_sha256") != now.get("manifest_sha256") or earlier.get("artifact") != now.get("artifact"):
        changed.append(f"the artifact differs: {earlier.get('artifact')} (manifest sha256 "
                       f"{str(earlier.get('manifest_sha256'))[:12]}) then, {now.get('artifact')} "
                       f"({str(now.get('manifest_sha256'))[:12]}) now")
    before = {f["path"]: f for f in earlier.get("inputs", [])}
    after = {f["path"]: f for f in now.get("inputs", [])}
    if list(before) != list(after):
        changed.append(f"the inputs differ: {len(before)} files then, {len(after)} now")
    else:
        for path, was in before.items():
            if was != after[path]:
                changed.append(f"input {path} changed since (size {was.get('size')} -> {after[path].get('size')}, "
                               "or modified)")
    for key in sorted(set(earlier) | set(now)):
        if key not in ("artifact", "manifest_sha256", "inputs") and earlier.get(key) != now.get(key):
            changed.append(f"{key} was {json.dumps(earlier.get(key))}, now {json.dumps(now.get(key))}")
    return changed


def job_metadata(artifact: str | Path, manifest: Manifest, backend: str) -> dict[str, Any]:
    """What each output file says of the model that wrote it."""
    return {"model": manifest.name, "task": manifest.task.value, "model_created": manifest.provenance.created,
            "base_model": manifest.base_model, "method": manifest.method, "backend": backend,
            "artifact": str(artifact), "manifest_sha256": manifest_hash(artifact),
            "tuneserve_version": version("tuneserve")}


class ShardWriter:
    """One shard, written to a hidden temporary file and renamed when :meth:`commit` is called."""

    def __init__(self, job: Job, file_index: int, shard: int, source: str):
        self.job, self.source = job, source
        self.name = shard_name(file_index, shard, job.output_format)
        self.tmp = job.out / f".{self.name}.tmp-{os.getpid()}"
        self.errors: list[dict[str, Any]] = []
        self._parquet = None
        self._jsonl = None

    def add(self, answered: pa.Table, first_row: int) -> None:
        """Write a chunk's answered rows and keep its bad ones (rows numbered from ``first_row``)."""
        import pyarrow.compute as pc

        numbers = pa.array(range(first_row, first_row + answered.num_rows), pa.int64())
        status = answered[STATUS]
        table = answered.drop_columns([STATUS, REASON])
        table = table.add_column(0, ROW, numbers).filter(pc.equal(status, ANSWERED))
        bad = answered.add_column(0, ROW, numbers).filter(pc.equal(status, BAD))
        id_column = self.job.record["columns"].get("id")
        for row in bad.select([ROW, REASON, *([id_column] if id_column else [])]).to_pylist():
            self.errors.append({"file": self.source, "row": row[ROW], "reason": row[REASON],
                                **({"id": row[id_column]} if id_column else {})})
        self._write(table)

    def _write(self, table: pa.Table) -> None:
        if self.job.output_format == "jsonl":
            if self._jsonl is None:
                self._jsonl = open(self.tmp, "w", encoding="utf-8")
            for row in table.to_pylist():
                self._jsonl.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            return
        import pyarrow.parquet as pq

        if self._parquet is None:
            schema = table.schema.with_metadata({"tuneserve": json.dumps({**self.job.metadata, "input": self.source})})
            self._parquet = pq.ParquetWriter(self.tmp, schema)
        elif table.schema != self._parquet.schema.remove_metadata():
            try:
                table = table.cast(self._parquet.schema.remove_metadata())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
                raise DataError(f"--input {self.source}: a column changes type part-way through the file "
                                f"({table.schema} after {self._parquet.schema.remove_metadata()}); pass only "
                                "columns of one type with --keep and --id") from None
        self._parquet.write_table(table)

    def commit(self) -> None:
        """Close the shard and give it its name: its errors first, then the shard (whose name marks it finished)."""
        if self._parquet is not None:
            self._parquet.close()
        if self._jsonl is not None:
            self._jsonl.close()
        errors = self.job.out / ERRORS_DIR / self.name.replace(".parquet", ".jsonl")
        if self.errors:
            tmp = errors.with_name(f".{errors.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(json.dumps(e, ensure_ascii=False, default=str) + "\n" for e in self.errors),
                           encoding="utf-8")
            os.replace(tmp, errors)
        elif errors.exists():
            errors.unlink()
        if not self.tmp.exists():
            raise JobError(f"{self.name}: nothing was written")  # a shard always gets at least its schema
        os.replace(self.tmp, self.job.out / self.name)

    def abort(self) -> None:
        for handle in (self._parquet, self._jsonl):
            if handle is not None:
                handle.close()
        self.tmp.unlink(missing_ok=True)


class Errors:
    """Bad rows counted against ``--max-errors`` (those of shards finished earlier included)."""

    def __init__(self, job: Job, limit: int | None):
        self.count, self.limit = job.errors(), limit

    def add(self, writer: ShardWriter) -> None:
        self.count += len(writer.errors)
        if self.limit is not None and self.count > self.limit:
            raise JobError(f"{self.count:,} bad rows, over --max-errors {self.limit:,}: stopped after shard "
                           f"{writer.name} (finished shards are kept; see _errors/ for the reasons)")
