"""What a batch job reads: the input files a path, glob or directory names, checked before a model loads, and each
file read as a stream of chunks (never whole), in its own order.

A chunk is an Arrow table of the raw rows: the named columns of a Parquet, CSV/TSV or Hugging Face dataset file,
or, for JSON Lines, each line as it stands (``line``), parsed where the model runs (:func:`parse_lines`), so that
a line that is not JSON, or a value of the wrong type, is one bad row and not a failed job. Rows are counted from 1
in their file: data rows of a table (header excluded), lines of a JSON Lines file (blank lines count, and are
skipped).
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from core.errors import DataError

# File formats by suffix; a directory holding a Hugging Face dataset (``save_to_disk``) is the format "hf".
FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
           ".json": "jsonl"}
ACCEPTED = ".parquet, .csv, .tsv, .jsonl (.ndjson, or .json with one object per line), or a Hugging Face dataset " \
           "directory (datasets' save_to_disk)"
LINE = "line"  # the one column of a JSON Lines chunk
READ_BLOCK = 1 << 20  # bytes a CSV reader parses at a time


@dataclass(frozen=True)
class InputFile:
    """One input: its path, format and fingerprint (what a resumed job checks has not changed)."""

    path: str
    format: str
    size: int
    mtime_ns: int

    @property
    def fingerprint(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "size": self.size, "mtime_ns": self.mtime_ns}


def find_inputs(pattern: str) -> list[InputFile]:
    """The files a path, a glob or a directory names, in sorted order.

    Raises:
        DataError: nothing matches, a file's type is not one read here, or the files mix formats.
    """
    path = Path(pattern)
    if path.is_dir() and _is_hf_dataset(path):
        paths = [path]
    elif path.is_dir():
        paths = sorted(p for p in path.iterdir() if p.suffix.lower() in FORMATS and not p.name.startswith((".", "_")))
        if not paths:
            raise DataError(f"--input {pattern}: the directory holds no input file; accepted: {ACCEPTED}")
    elif glob.has_magic(pattern):
        paths = [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if not Path(p).is_dir()
                 or _is_hf_dataset(Path(p))]
        if not paths:
            raise DataError(f"--input {pattern}: no file matches")
    elif path.is_file():
        paths = [path]
    else:
        raise DataError(f"--input {pattern}: no such file or directory")
    files = []
    for p in paths:
        fmt = "hf" if p.is_dir() else FORMATS.get(p.suffix.lower())
        if fmt is None:
            raise DataError(f"--input {p}: unsupported file type {p.suffix or '(none)'}; accepted: {ACCEPTED}")
        stat = (p / "state.json" if fmt == "hf" else p).stat()
        files.append(InputFile(str(p), fmt, _size(p) if fmt == "hf" else stat.st_size, stat.st_mtime_ns))
    formats = sorted({f.format for f in files})
    if len(formats) > 1:
        raise DataError(f"--input {pattern}: mixes formats {formats}; give one format per job")
    return files


def _is_hf_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def hf_data_files(path: str) -> list[Path]:
    """The Arrow files of a dataset saved with ``save_to_disk``, in order."""
    state = json.loads((Path(path) / "state.json").read_text())
    return [Path(path) / entry["filename"] for entry in state.get("_data_files", [])]


def table_schema(file: InputFile) -> pa.Schema | None:
    """The schema of a table file (read from its metadata or header alone), None for JSON Lines (each line says).

    Raises:
        DataError: the file cannot be read as its format.
    """
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if file.format == "parquet":
            return pq.read_schema(file.path)
        if file.format in ("csv", "tsv"):
            with pacsv.open_csv(file.path, parse_options=csv_parse_options(file), read_options=pacsv.ReadOptions(
                    block_size=READ_BLOCK)) as reader:
                return reader.schema
        if file.format == "hf":
            files = hf_data_files(file.path)
            if not files:
                return pa.schema([])
            with pa.memory_map(str(files[0])) as source:
                return pa.ipc.open_stream(source).schema
    except (OSError, pa.ArrowException, ValueError, KeyError) as exc:
        raise DataError(f"--input {file.path}: cannot read it as {file.format}: {str(exc).splitlines()[0][:300]}") \
            from None
    return None


def first_keys(file: InputFile, lines: int = 1000) -> set[str]:
    """The keys of the JSON objects among a JSON Lines file's first lines (a column none of them has is missing)."""
    keys: set[str] = set()
    try:
        with open(file.path, encoding="utf-8") as handle:
            for i, line in enumerate(handle):
                if i >= lines:
                    break
                try:
                    value = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:
                    continue
                if isinstance(value, dict):
                    keys.update(value)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--input {file.path}: cannot read it: {exc}") from None
    return keys


def check_columns(files: Sequence[InputFile], needed: dict[str, str]) -> None:
    """Every file has every needed column (``{option: column}``), before anything runs.

    Raises:
        DataError: naming the file, the column, the option that names it and the columns the file has.
    """
    for file in files:
        schema = table_schema(file)
        have = set(schema.names) if schema is not None else first_keys(file)
        for option, column in needed.items():
            if column not in have:
                shown = ", ".join(sorted(have)[:20]) or "none"
                where = "" if schema is not None else " (in its first 1,000 lines)"
                raise DataError(f"--input {file.path}: no column {column!r}{where}, which {option} names; "
                                f"its columns: {shown}")


def csv_parse_options(file: InputFile):
    import pyarrow.csv as pacsv

    return pacsv.ParseOptions(delimiter="\t" if file.format == "tsv" else ",", newlines_in_values=True)


def csv_convert_options(columns: Sequence[str], text_columns: Sequence[str]):
    """The columns a CSV reader keeps, the text ones read as strings (a "42" stays text, an empty field is "")."""
    import pyarrow.csv as pacsv

    return pacsv.ConvertOptions(include_columns=list(columns), column_types={c: pa.string() for c in text_columns},
                                strings_can_be_null=False)


def read_chunks(file: InputFile, columns: Sequence[str], rows: int, *, text_columns: Sequence[str] = ()
                ) -> Iterator[pa.Table]:
    """The file's rows in order, ``rows`` at a time (the last chunk may hold fewer), ``columns`` only (a JSON Lines
    file: its raw lines, column :data:`LINE`). ``text_columns`` are read as strings (a CSV's "42" stays text).

    Raises:
        DataError: the file stops being readable part-way (naming it).
    """
    try:
        yield from _rebatched(_batches(file, list(dict.fromkeys(columns)), text_columns), rows)
    except (OSError, pa.ArrowException, UnicodeDecodeError) as exc:
        raise DataError(f"--input {file.path}: cannot read it as {file.format}: {str(exc).splitlines()[0][:300]}") \
            from None


def _batches(file: InputFile, columns: list[str], text_columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if file.format == "parquet":
        yield from pq.ParquetFile(file.path).iter_batches(batch_size=8192, columns=columns)
    elif file.format in ("csv", "tsv"):
        with pacsv.open_csv(file.path, read_options=pacsv.ReadOptions(block_size=READ_BLOCK, use_threads=False),
                            parse_options=csv_parse_options(file),
                            convert_options=csv_convert_options(columns, text_columns)) as reader:
            yield from reader
    elif file.format == "hf":
        for path in hf_data_files(file.path):
            with pa.memory_map(str(path)) as source:
                for batch in pa.ipc.open_stream(source):
                    yield batch.select(columns)
    else:
        with open(file.path, encoding="utf-8") as handle:
            lines: list[str] = []
            for line in handle:
                lines.append(line)
                if len(lines) == 8192:
                    yield pa.record_batch({LINE: pa.array(lines, pa.string())})
                    lines = []
            if lines:
                yield pa.record_batch({LINE: pa.array(lines, pa.string())})


def _rebatched(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Record batches regrouped into tables of exactly ``rows`` rows (the last one: what is left)."""
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in batches:
        while batch.num_rows:
            take = min(rows - held, batch.num_rows)
            pending.append(batch.slice(0, take))
            held += take
            batch = batch.slice(take)
            if held == rows:
                yield pa.Table.from_batches(pending)
                pending, held = [], 0
    if held:
        yield pa.Table.from_batches(pending)


def known_rows(file: InputFile) -> int | None:
    """The file's row count where its metadata says it (Parquet, a Hugging Face dataset), else None."""
    import pyarrow.parquet as pq

    if file.format == "parquet":
        return pq.ParquetFile(file.path).metadata.num_rows
    if file.format == "hf":
        state = json.loads((Path(file.path) / "dataset_info.json").read_text())
        splits = state.get("splits") or {}
        counts = [s.get("num_examples") for s in splits.values()]
        return sum(counts) if counts and all(c is not None for c in counts) else None
    return None


def line_count(file: InputFile) -> int:
    """Lines of a text file (a CSV's header and a JSON Lines file's blank lines included): a row count for progress."""
    if file.format == "hf":
        return 0
    with open(file.path, "rb") as handle:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    return max(0, lines - (1 if file.format in ("csv", "tsv") else 0))


# -- rows -------------------------------------------------------------------------------------------------------


def parse_lines(lines: Sequence[str | None], columns: Sequence[str]) -> tuple[dict[str, list], list[str | None],
                                                                             list[bool]]:
    """JSON Lines rows as columns: the values of ``columns`` per line (None where absent), the reason a line is
    bad (None where it is not), and whether it is blank (skipped: neither answered nor an error)."""
    values: dict[str, list] = {c: [] for c in columns}
    errors: list[str | None] = []
    blank: list[bool] = []
    for line in lines:
        row: Any = None
        error = None
        is_blank = not (line or "").strip()
        if not is_blank:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                error = f"not valid JSON ({exc.msg} at character {exc.pos})"
            else:
                if not isinstance(row, dict):
                    error = f"expected a JSON object, got {_json_type(row)}"
                    row = None
        for c in columns:
            values[c].append(row.get(c) if isinstance(row, dict) else None)
        errors.append(error)
        blank.append(is_blank)
    return values, errors, blank


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(value), "a number")


def text_problem(option: str, column: str, value: Any) -> str | None:
    """Why a row's text value cannot be read (None when it can): missing, not a string, or blank."""
    if value is None:
        return f"{column} ({option}): missing; the row has no text"
    if not isinstance(value, str):
        return f"{column} ({option}): expected a string, got {_json_type(value)} ({json.dumps(value)[:40]})"
    if not value.strip():
        return f"{column} ({option}): empty or only whitespace; nothing to read"
    return None


def check_text_types(file: InputFile, columns: dict[str, str]) -> None:
    """A Parquet file's or dataset's text columns hold strings (a number column named by --text is a mistake in the
    command, not in a row; CSV reads them as strings, and JSON Lines is checked row by row).

    Raises:
        DataError: naming the file, the column and its type.
    """
    if file.format not in ("parquet", "hf"):
        return
    schema = table_schema(file)
    for option, column in columns.items():
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
            raise DataError(f"--input {file.path}: column {column!r} ({option}) holds {kind}, not text")
