"""Loading and checking labelled data.

Files are read with the ``datasets`` library (csv, tsv, jsonl, json, parquet), demo sets come from
:mod:`training.data.demo`. Every row is checked before anything is trained; an error names the split,
the file, the row (counted from 1, header excluded) and the column.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import difflib
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from sklearn.model_selection import train_test_split

from core.errors import DataError
from core.prompting import split_conversation
from core.tasks import Task
from core.tasks.base import LabelError
from training.config import DataConfig
from training.data.demo import demo_path, is_demo

logger = logging.getLogger(__name__)

CONLL_SUFFIXES = (".conll", ".iob", ".bio")
BUILDERS = {".csv": ("csv", {}), ".tsv": ("csv", {"sep": "\t"}), ".jsonl": ("json", {}), ".json": ("json", {}),
            ".parquet": ("parquet", {})}
OTHER_FILE_SUFFIXES = (*CONLL_SUFFIXES, ".txt", ".ndjson", ".jsonlines", ".xlsx", ".xls", ".gz", ".zip", ".arrow")
ACCEPTED = ("accepted: .jsonl or .json (one JSON object per line, or one JSON array of objects), .csv or .tsv "
            "(a header row, then the same number of fields on every row), .parquet (a Parquet table)")


@dataclass
class Split:
    """One split, checked: texts, optional second texts, parsed labels and their targets."""

    name: str
    source: str
    texts: list[str]
    pairs: list[str] | None
    labels: list[Any]
    rows: list[int] = field(default_factory=list)  # 1-based row numbers in the source, for error messages
    targets: np.ndarray | None = None
    system: str | None = None  # generation from chat conversations: their system turn
    negatives: list[str] | None = None  # embeddings: a hard negative document per example (data.negative)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: np.ndarray | list[int]) -> Split:
        pick = [int(i) for i in index]
        return Split(
            name=self.name, source=self.source,
            texts=[self.texts[i] for i in pick],
            pairs=[self.pairs[i] for i in pick] if self.pairs is not None else None,
            labels=[self.labels[i] for i in pick], rows=[self.rows[i] for i in pick],
            targets=self.targets[pick] if self.targets is not None else None, system=self.system,
            negatives=[self.negatives[i] for i in pick] if self.negatives is not None else None,
        )


@dataclass
class Dataset:
    train: Split
    validation: Split
    test: Split
    labels: list[str] | None
    hashes: dict[str, str]
    system: str | None = None  # generation from chat conversations: the system turn they share
    augmentation: dict | None = None  # what data.augment added to train (its rows follow the originals)
    corpus: list[str] | None = None  # embeddings: documents every held-out query ranks too (data.corpus), unique

    @property
    def original_train(self) -> Split:
        """The training split without the rows augmentation added."""
        if self.augmentation is None:
            return self.train
        return self.train.subset(range(self.augmentation["examples"]))


def read_table(source: str, where: str) -> tuple[dict[str, list], str]:
    """Read a data source into columns. Returns ``(columns, resolved path or name)``.

    Files are first checked with the standard library (:func:`check_file`), so that a file in the wrong
    format is reported by its line or row, in one message, before ``datasets`` sees it.
    """
    import datasets

    datasets.disable_progress_bars()
    path = demo_path(source) if is_demo(source) else Path(source)
    try:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in BUILDERS)
            if not files:
                raise DataError(f"{where} ({path}): directory holds no csv, tsv, jsonl, json or parquet file")
            suffixes = {p.suffix.lower() for p in files}
            if len(suffixes) > 1:
                raise DataError(f"{where} ({path}): mixes file types {sorted(suffixes)}; keep one format per directory")
            for file in files:
                check_file(file, where)
            builder, kwargs = BUILDERS[files[0].suffix.lower()]
            with _quiet_datasets():
                table = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", **kwargs)
        elif path.exists() or path.suffix.lower() in BUILDERS or _looks_like_a_file(source):
            if not path.is_file():
                raise DataError(f"{where}: file {path} does not exist{_near_miss(path)}")
            if path.suffix.lower() not in BUILDERS:
                raise DataError(f"{where} ({path}): unsupported file type; use one of {sorted(BUILDERS)}")
            check_file(path, where)
            builder, kwargs = BUILDERS[path.suffix.lower()]
            with _quiet_datasets():
                table = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
        else:
            name, _, split = source.partition(":")
            with _quiet_datasets():
                table = datasets.load_dataset(name, split=split or "train")
            path = Path(source)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable input; report them all the same way
        accepted = f"; {ACCEPTED}" if path.suffix.lower() in BUILDERS or path.is_dir() else ""
        raise DataError(f"{where} ({source}): cannot read it: {_root_message(exc)[:300]}{accepted}") from None
    return table.to_dict(), str(path)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence the ``datasets`` loggers: a failure is reported once, as a DataError, not also as their ERROR line."""
    library = logging.getLogger("datasets")
    level = library.level
    library.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        library.setLevel(level)


def _root_message(exc: BaseException) -> str:
    """The first line of the innermost cause: ``datasets`` wraps the useful message in a generic one.

    Only explicit causes (``raise ... from``) are followed: an exception's context can be a later fallback's failure.
    """
    while exc.__cause__ is not None and str(exc.__cause__).strip():
        exc = exc.__cause__
    text = str(exc).strip()
    text = text.splitlines()[0] if text else type(exc).__name__
    return re.sub(r"\.? in row \d+\.?$", "", text)  # pyarrow counts rows from 0 within a block: no help to a user


def check_sources(data_cfg) -> None:
    """Every configured data file exists, checked in microseconds before a run sets anything up (reading and
    checking the rows comes later, with the run).

    Raises:
        DataError: naming the key and the missing file, with a close sibling's name where there is one.
    """
    for name in ("train", "validation", "test", "corpus"):
        source = getattr(data_cfg, name, None)
        if not source or is_demo(source):
            continue
        path = Path(source)
        if not path.exists() and (path.suffix.lower() in BUILDERS or _looks_like_a_file(source)):
            raise DataError(f"data.{name}: file {path} does not exist{_near_miss(path)}")


def _looks_like_a_file(source: str) -> bool:
    """A source that is meant as a path, not a Hub data set id: it would otherwise go to the Hub and its retries."""
    name = source.partition(":")[0]
    suffix = Path(name).suffix.lower()
    file_like = suffix in OTHER_FILE_SUFFIXES or difflib.get_close_matches(suffix, BUILDERS, n=1, cutoff=0.6)
    return source.startswith((".", "/", "~")) or "\\" in source or name.count("/") > 1 or bool(file_like)


def _near_miss(path: Path) -> str:
    """' (did you mean NAME?)' for a sibling whose name is close to a file that does not exist."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return f" (no directory {parent})"
    siblings = [p for p in parent.iterdir() if p.is_file() or p.is_dir()]
    stems = {p.stem: p.name for p in siblings if p.suffix == path.suffix}
    close = [p.name for p in siblings if p.stem == path.stem]  # the same name with another type
    close = close or [stems[m] for m in difflib.get_close_matches(path.stem, stems, n=1, cutoff=0.6)]  # a typo
    close = close or difflib.get_close_matches(path.name, [p.name for p in siblings], n=1, cutoff=0.9)
    return f" (did you mean {parent / close[0]}?)" if close else ""


def check_file(path: Path, where: str) -> None:
    """Check that a data file parses as its extension's format, and report the first line or row that does not.

    Only the standard library is used: a JSON decoder for .jsonl/.json, the csv module for .csv/.tsv, the
    magic bytes for .parquet. A file is read line by line and nothing is kept, except a JSON document that is
    not JSON lines (an array, or objects over several lines), which is parsed whole as ``datasets`` does.

    Raises:
        DataError: ``WHERE (FILE): cannot read it: WHAT, at which line or row; what is accepted``.
    """

    def fail(problem: str) -> NoReturn:
        raise DataError(f"{where} ({path}): cannot read it: {problem}; {ACCEPTED}")

    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        fail("the file is empty")
    if suffix == ".parquet":
        _check_parquet(path, fail)
    elif suffix in (".jsonl", ".json"):
        _check_json(path, fail)
    elif suffix in (".csv", ".tsv"):
        _check_delimited(path, "\t" if suffix == ".tsv" else ",", fail)


def _lines(path: Path, fail: Callable[[str], NoReturn]) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 file (line ends kept, a leading BOM dropped)."""
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, 1):
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                fail(f"line {number} is not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1}); "
                     "save the file as UTF-8")


def _snippet(line: str, limit: int = 60) -> str:
    text = line.strip()
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _looks_like(line: str) -> str | None:
    """What format one line of text resembles, as a hint for a file named with the wrong extension."""
    text = line.strip()
    if text.startswith("{"):
        return "JSON lines (name the file .jsonl)"
    if text.startswith("["):
        return "JSON (name the file .json)"
    if text.startswith("PAR1"):
        return "Parquet (name the file .parquet)"
    if "\t" in text:
        return "TSV (name the file .tsv)"
    if "," in text:
        return "CSV (name the file .csv)"
    return None


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


class _DuplicateField(ValueError):
    pass


def _unique_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object hook for json: pyarrow refuses an object that names a field twice, so refuse it here first."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateField(key)
        seen.add(key)
    return dict(pairs)


def _check_json(path: Path, fail: Callable[[str], NoReturn]) -> None:
    """JSON lines, pretty-printed objects one after another, or one JSON array of objects: what ``datasets`` reads."""
    first = None
    for number, line in _lines(path, fail):
        if not line.strip():
            continue
        if first is None:
            first = number
            if line.lstrip().startswith(("[", "{")) and not _is_json_object(line):
                _check_json_document(path, fail)  # an array, or objects spread over several lines each
                return
        try:
            value = json.loads(line, object_pairs_hook=_unique_fields)
        except _DuplicateField as exc:
            fail(f"line {number} names the field {str(exc)!r} twice: {_snippet(line)}")
        except json.JSONDecodeError as exc:
            hint = _looks_like(line) if number == first else None
            if hint and not hint.startswith("JSON"):
                fail(f"line {number} is not a JSON object: {_snippet(line)} looks like {hint}")
            fail(f"line {number} is not a JSON object ({exc.msg} at column {exc.colno}): {_snippet(line)}")
        if not isinstance(value, dict):
            fail(f"line {number} is {_kind(value)}, not a JSON object: {_snippet(line)}")
    if first is None:
        fail("the file holds only blank lines")


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _check_json_document(path: Path, fail: Callable[[str], NoReturn]) -> None:
    """One JSON array of objects, or JSON objects one after another whatever their layout."""
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        for _ in _lines(path, fail):  # fails naming the line that is not UTF-8
            pass
        raise
    decoder = json.JSONDecoder(object_pairs_hook=_unique_fields)
    position, values = 0, 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position == len(text):
            break
        line = text.count("\n", 0, position) + 1
        try:
            value, position = decoder.raw_decode(text, position)
        except _DuplicateField as exc:
            fail(f"the object that starts on line {line} names the field {str(exc)!r} twice")
        except json.JSONDecodeError as exc:
            fail(f"not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")
        values += 1
        if isinstance(value, list):
            if values > 1 or text[position:].strip():
                fail(f"line {line}: a JSON array must be the whole file")
            if not value:
                fail("the JSON array is empty: no rows")
            for index, row in enumerate(value, 1):
                if not isinstance(row, dict):
                    fail(f"item {index} of the JSON array is {_kind(row)}, not an object: {_snippet(json.dumps(row))}")
        elif not isinstance(value, dict):
            fail(f"line {line} holds {_kind(value)}, not a JSON object")


def _check_delimited(path: Path, sep: str, fail: Callable[[str], NoReturn]) -> None:
    """A header, then rows of as many fields; rows are counted as ``datasets`` counts them (blank lines skipped)."""
    other, kind = (",", "CSV (name the file .csv)") if sep == "\t" else ("\t", "TSV (name the file .tsv)")
    sep_name = "tab" if sep == "\t" else "comma"
    limit = csv.field_size_limit()
    csv.field_size_limit(1 << 30)  # a long text is not an error here; pandas reads it
    reader = csv.reader((line for _, line in _lines(path, fail)), delimiter=sep)
    header, row = None, 0
    try:
        for fields in reader:
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # a blank line: pandas skips it
            if header is None:
                header = fields
                hint = _looks_like(sep.join(fields))
                if hint and hint.startswith(("JSON", "Parquet")):
                    fail(f"line {reader.line_num}, the header, looks like {hint}: {_snippet(sep.join(fields))}")
                if len(fields) == 1 and other in fields[0]:
                    fail(f"line {reader.line_num}, the header, has no {sep_name}; it looks like {kind}: "
                         f"{_snippet(fields[0])}")
                continue
            row += 1
            if len(fields) != len(header):
                unclosed = " (a quote that is never closed?)" if any("\n" in f for f in fields) else ""
                fail(f"row {row} (line {reader.line_num}) has {len(fields)} field(s), the header has {len(header)} "
                     f"({sep.join(header)!r}){unclosed}")
    except csv.Error as exc:
        fail(f"line {reader.line_num}: {exc}")
    finally:
        csv.field_size_limit(limit)
    if header is None:
        fail("the file holds only blank lines")


def _check_parquet(path: Path, fail: Callable[[str], NoReturn]) -> None:
    with path.open("rb") as fh:
        head = fh.read(4)
        fh.seek(max(path.stat().st_size - 4, 0))
        tail = fh.read(4)
    if head != b"PAR1" or tail != b"PAR1" or path.stat().st_size < 12:
        with path.open("rb") as fh:
            first = fh.readline(200).decode("utf-8", errors="replace")
        hint = _looks_like(first)
        fail("not a Parquet file (it does not begin and end with the PAR1 marker)"
             + (f": its first line {_snippet(first)} looks like {hint}" if hint else ""))


def read_conll(path: Path, where: str, tag_column: int, columns: tuple[str, str]) -> dict[str, list]:
    """A CoNLL-style file as columns of token lists and tag lists.

    One token per line with its tag in ``tag_column`` (whitespace-separated), a blank line between sentences,
    ``-DOCSTART-`` lines skipped.

    Raises:
        DataError: naming the line that has no such column.
    """
    tokens_col, tags_col = columns
    out: dict[str, list] = {tokens_col: [], tags_col: []}
    tokens: list[str] = []
    tags: list[str] = []

    def close() -> None:
        if tokens:
            out[tokens_col].append(list(tokens))
            out[tags_col].append(list(tags))
            tokens.clear()
            tags.clear()

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{where} ({path}): cannot read it ({exc})") from None
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            close()
            continue
        if fields[0] == "-DOCSTART-":
            close()
            continue
        try:
            tag = fields[tag_column]
        except IndexError:
            raise DataError(f"{where} ({path}): line {number}: {len(fields)} column(s), no tag column {tag_column} "
                            "(data.tag_column)") from None
        if len(fields) < 2:
            raise DataError(f"{where} ({path}): line {number}: expected a token and its tag, got {line!r}")
        tokens.append(fields[0])
        tags.append(tag)
    close()
    return out


def load_split(
    source: str, split: str, cfg: DataConfig, task: Task, *, drop_missing: bool | None = None
) -> Split:
    """Read one source and check its columns, texts and label values (not yet the label set).

    ``split`` names it in messages: a split of the config (``train`` for ``data.train``), or the command line's
    option (``--data``), whose column options messages then name (``--text`` rather than ``data.text``)."""
    where = _where(split)
    path = demo_path(source) if is_demo(source) else Path(source)
    if cfg.format == "conll" or (path.suffix.lower() in CONLL_SUFFIXES and path.is_file()):
        columns, resolved = read_conll(path, where, cfg.tag_column, (cfg.text, cfg.label)), str(path)
    else:
        columns, resolved = read_table(source, where)
    spec = task.spec
    system = None
    if spec.writes and cfg.label not in columns and _holds_lists(columns.get(cfg.text)):
        columns, system = _conversations(columns, cfg.text, cfg.label, f"{where} ({resolved})")
    options = {"label_delimiter": cfg.label_delimiter, "tag_scheme": cfg.tag_scheme, "repair_tags": cfg.repair_tags}
    wanted = {"text": cfg.text, "label": cfg.label, **({"text_pair": cfg.text_pair} if cfg.text_pair else {}),
              **({"negative": cfg.negative} if cfg.negative else {})}
    for role, column in wanted.items():
        _require_column(columns, column, f"{where} ({resolved})", _key(split, role), role.replace("_", " "))
    n = len(columns[cfg.text])
    if n == 0:
        raise DataError(f"{where} ({resolved}): no rows")
    drop = cfg.drop_missing_labels if drop_missing is None else drop_missing
    texts, pairs, labels, rows, dropped = [], [] if cfg.text_pair else None, [], [], 0
    negatives = [] if cfg.negative else None
    for i in range(n):
        row = i + 1
        raw_label = columns[cfg.label][i]
        if drop and (raw_label is None or (isinstance(raw_label, str) and not raw_label.strip())):
            dropped += 1
            continue
        for column, bucket in ((cfg.text, texts), (cfg.text_pair, pairs), (cfg.negative, negatives)):
            if column is None:
                continue
            value = columns[column][i]
            tokens = isinstance(value, list) and spec.accepts_token_lists and column == cfg.text
            if not isinstance(value, str) and not tokens:
                raise DataError(f"{where} ({resolved}): row {row}, column '{column}': expected text, got {value!r}")
            if not (value if tokens else value.strip()):
                raise DataError(f"{where} ({resolved}): row {row}, column '{column}': empty text")
            bucket.append(value)
        try:
            texts[-1], label = spec.parse_example(texts[-1], raw_label, options)
        except LabelError as exc:
            missing = raw_label is None or (isinstance(raw_label, str) and not raw_label.strip())
            hint = f" ({_key(split, 'drop_missing_labels')} skips rows without one)" if missing else ""
            raise DataError(f"{where} ({resolved}): row {row}, column '{cfg.label}': {exc}{hint}") from None
        labels.append(label)
        rows.append(row)
    if dropped:
        logger.info("%s: dropped %d of %d rows with no label (%s)", where, dropped, n,
                    _key(split, "drop_missing_labels"))
    if not texts:
        raise DataError(f"{where} ({resolved}): no labelled rows left")
    return Split(name=split, source=resolved, texts=texts, pairs=pairs, labels=labels, rows=rows, system=system,
                 negatives=negatives)


def _holds_lists(values: list | None) -> bool:
    return bool(values) and isinstance(next((v for v in values if v is not None), None), list)


def _conversations(columns: dict[str, list], column: str, label: str, where: str) -> tuple[dict[str, list], str | None]:
    """Generation from chat conversations (a column of message lists): each becomes the user's turn as the input
    and the assistant's answer as the target; their system turn, which they must share, is returned."""
    inputs, answers, systems = [], [], {}
    for row, messages in enumerate(columns[column], start=1):
        try:
            system, user, answer = split_conversation(messages)
        except ValueError as exc:
            raise DataError(f"{where}: row {row}, column '{column}': {exc}") from None
        systems.setdefault(system, row)
        inputs.append(user)
        answers.append(answer)
    if len(systems) > 1:
        (first, a), (second, b) = list(systems.items())[:2]
        raise DataError(f"{where}: column '{column}': the conversations' system turns differ (row {a}: {first!r}, "
                        f"row {b}: {second!r}); the prompt format holds one system turn for every input")
    return {**columns, column: inputs, label: answers}, next(iter(systems))


def _where(split: str) -> str:
    """How a message names a split's source: its config key (``data.train``), or the command line's ``--data``."""
    return split if split.startswith("--") else f"data.{split}"


def _key(split: str, name: str) -> str:
    """The setting that would fix a message about ``split``: ``data.text`` in a config, ``--text`` on the command
    line."""
    return f"--{name.replace('_', '-')}" if split.startswith("--") else f"data.{name}"


def attach_targets(split: Split, task: Task, labels: list[str] | None, label_column: str) -> None:
    """Map a split's labels through the training label set; a label training never saw is an error."""
    spec = task.spec
    if labels is not None:
        for value, row in zip(split.labels, split.rows):
            unknown = spec.unknown_labels(value, labels)
            if unknown:
                raise DataError(
                    f"{_where(split.name)} ({split.source}): row {row}, column '{label_column}': label "
                    f"{unknown[0]!r} never appears in the training data (known labels: {labels})"
                )
    split.targets = spec.to_targets(split.labels, labels)


def _check_label_set(task: Task, labels: list[str], split: Split, column: str) -> None:
    if len(labels) < 2:
        raise DataError(f"data.train ({split.source}): column '{column}' has {len(labels)} {task.spec.label_noun} "
                        f"({labels}); {task.value} needs at least two")


def _carve(split: Split, fraction: float, task: Task, seed: int, name: str) -> tuple[Split, Split]:
    """Split off a seeded fraction of ``split``, stratified where the task gives keys to stratify by."""
    index = np.arange(len(split))
    try:
        keep, carved = train_test_split(index, test_size=fraction, random_state=seed,
                                        stratify=task.spec.stratify_key(split.labels))
    except ValueError as error:  # too few rows to leave some on both sides
        raise DataError(f"cannot set {fraction:.0%} of {len(split)} training rows apart as the {name} split "
                        f"({error}); give more rows, or data.{name} as a file of its own") from None
    rest, part = split.subset(np.sort(keep)), split.subset(np.sort(carved))
    part.name = name
    return rest, part


def _sample(split: Split, limit: int | None, seed: int) -> Split:
    if limit is None or len(split) <= limit:
        return split
    rng = np.random.default_rng(seed)
    return split.subset(np.sort(rng.choice(len(split), size=limit, replace=False)))


def file_hash(path: str) -> str | None:
    p = Path(path)
    files = sorted(x for x in p.iterdir() if x.is_file()) if p.is_dir() else [p] if p.is_file() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _require_column(columns: dict[str, list], column: str, where: str, key: str, role: str) -> None:
    """Raises DataError when ``column`` is missing, with the closest column's name and the key that names it."""
    if column not in columns:
        close = difflib.get_close_matches(column, list(columns), n=1, cutoff=0.6)
        guess = f" (did you mean '{close[0]}'?)" if close else ""
        raise DataError(f"{where}: column '{column}' not found{guess}; columns are {sorted(columns)}; {key} names "
                        f"the {role} column")


def read_corpus(cfg: DataConfig) -> list[str]:
    """The documents of ``data.corpus``, each once, in file order.

    Raises:
        DataError: the file cannot be read, lacks the ``data.corpus_text`` column, or has a blank document (by row).
    """
    where = "data.corpus"
    columns, resolved = read_table(cfg.corpus, where)
    _require_column(columns, cfg.corpus_text, f"{where} ({resolved})", "data.corpus_text", "document")
    documents = columns[cfg.corpus_text]
    for row, value in enumerate(documents, start=1):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where} ({resolved}): row {row}, column '{cfg.corpus_text}': expected a document's "
                            f"text, got {value!r}")
    if not documents:
        raise DataError(f"{where} ({resolved}): no rows")
    return list(dict.fromkeys(documents))


def load_dataset(cfg: DataConfig, task: Task, seed: int) -> Dataset:
    """Load and check all three splits, carving validation/test from train when they are not given.

    Raises:
        DataError: naming split, file, row and column of the first problem found.
    """
    train = load_split(cfg.train, "train", cfg, task)
    test = load_split(cfg.test, "test", cfg, task) if cfg.test else None
    validation = load_split(cfg.validation, "validation", cfg, task) if cfg.validation else None
    labels = task.spec.label_set(train.labels)
    if labels is not None:
        _check_label_set(task, labels, train, cfg.label)
    if test is None:
        train, test = _carve(train, cfg.test_size, task, seed, "test")
    if validation is None:
        train, validation = _carve(train, cfg.validation_size / (1 - cfg.test_size), task, seed + 1, "validation")
    train = _sample(train, cfg.max_train_examples, seed)
    validation = _sample(validation, cfg.max_eval_examples, seed)
    test = _sample(test, cfg.max_eval_examples, seed)
    augmentation = None
    if cfg.augment.enabled:  # the training split only, once validation and test are set apart
        train, augmentation = _augment(train, cfg, seed)
    for split in (train, validation, test):
        attach_targets(split, task, labels, cfg.label)
    hashes = {s.name: h for s in (train, validation, test) if (h := file_hash(s.source))}
    logger.info("data: %d train, %d validation, %d test examples%s", len(train), len(validation), len(test),
                f"; labels {labels}" if labels else "")
    systems = {s.name: s.system for s in (train, validation, test)}
    if len(set(systems.values())) > 1:
        raise DataError(f"the conversations' system turns differ between splits ({systems}); the prompt format holds "
                        "one system turn for every input")
    corpus = read_corpus(cfg) if cfg.corpus else None
    if corpus is not None:
        logger.info("data.corpus: %d documents beside each held-out split's positives", len(corpus))
    return Dataset(train=train, validation=validation, test=test, labels=labels, hashes=hashes, system=train.system,
                   augmentation=augmentation, corpus=corpus)


def _augment(train: Split, cfg: DataConfig, seed: int) -> tuple[Split, dict]:
    """``train`` followed by its augmented copies (each with its example's label and source row)."""
    from training.data.augment import augment_texts  # nlpaug loads only when augmentation is on

    added = augment_texts(train.texts, train.pairs, cfg.augment, seed)
    copies = train.subset(added.origin)
    logger.info("data.augment: %d augmented rows added to %d training examples", len(copies), len(train))
    return Split(name=train.name, source=train.source, texts=train.texts + added.texts,
                 pairs=train.pairs + added.pairs if train.pairs is not None else None,
                 labels=train.labels + copies.labels, rows=train.rows + copies.rows), added.record


def load_labelled(manifest, path: str, *, text: str | None = None, text_pair: str | None = None,
                  label: str | None = None, drop_missing: bool = False) -> Split:
    """A labelled file read as an artifact reads it: its columns (each overridable), its label set and label
    delimiter; what `tuneserve evaluate` scores and the soak benchmark posts."""
    cfg = DataConfig(train=path, text=text or manifest.text_fields[0],
                     text_pair=text_pair or (manifest.text_fields[1] if manifest.has_pair else None),
                     label=label or manifest.label_field,
                     label_delimiter=manifest.provenance.config.get("data", {}).get("label_delimiter"),
                     drop_missing_labels=drop_missing)
    split = load_split(path, "--data", cfg, manifest.task)
    attach_targets(split, manifest.task, manifest.labels, cfg.label)
    return split
