"""Loading and checking labelled data.

Files are read with the ``datasets`` library (csv, tsv, jsonl, json, parquet), demo sets come from
:mod:`training.demo_data`. Every row is checked before anything is trained; an error names the split,
the file, the row (counted from 1, header excluded) and the column.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from core.errors import DataError
from core.tasks.base import LabelError
from core.tasks import Task
from training.config import DataConfig
from training.demo_data import demo_path, is_demo

logger = logging.getLogger(__name__)

CONLL_SUFFIXES = (".conll", ".iob", ".bio")
BUILDERS = {".csv": ("csv", {}), ".tsv": ("csv", {"sep": "\t"}), ".jsonl": ("json", {}), ".json": ("json", {}),
            ".parquet": ("parquet", {})}


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

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: np.ndarray | list[int]) -> Split:
        pick = [int(i) for i in index]
        return Split(
            name=self.name, source=self.source,
            texts=[self.texts[i] for i in pick],
            pairs=[self.pairs[i] for i in pick] if self.pairs is not None else None,
            labels=[self.labels[i] for i in pick], rows=[self.rows[i] for i in pick],
            targets=self.targets[pick] if self.targets is not None else None,
        )


@dataclass
class Dataset:
    train: Split
    validation: Split
    test: Split
    labels: list[str] | None
    hashes: dict[str, str]


def read_table(source: str, where: str) -> tuple[dict[str, list], str]:
    """Read a data source into columns. Returns ``(columns, resolved path or name)``."""
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
            builder, kwargs = BUILDERS[files[0].suffix.lower()]
            table = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", **kwargs)
        elif path.exists() or path.suffix.lower() in BUILDERS:
            if not path.is_file():
                raise DataError(f"{where}: file {path} does not exist")
            if path.suffix.lower() not in BUILDERS:
                raise DataError(f"{where} ({path}): unsupported file type; use one of {sorted(BUILDERS)}")
            builder, kwargs = BUILDERS[path.suffix.lower()]
            table = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
        else:
            name, _, split = source.partition(":")
            table = datasets.load_dataset(name, split=split or "train")
            path = Path(source)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable input; report them all the same way
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{where} ({source}): cannot read it: {message[:300]}") from None
    return table.to_dict(), str(path)


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
    """Read one source and check its columns, texts and label values (not yet the label set)."""
    where = f"data.{split}"
    path = demo_path(source) if is_demo(source) else Path(source)
    if cfg.format == "conll" or (path.suffix.lower() in CONLL_SUFFIXES and path.is_file()):
        columns, resolved = read_conll(path, where, cfg.tag_column, (cfg.text, cfg.label)), str(path)
    else:
        columns, resolved = read_table(source, where)
    spec = task.spec
    options = {"label_delimiter": cfg.label_delimiter, "tag_scheme": cfg.tag_scheme, "repair_tags": cfg.repair_tags}
    wanted = [cfg.text, cfg.label] + ([cfg.text_pair] if cfg.text_pair else [])
    for column in wanted:
        if column not in columns:
            raise DataError(f"{where} ({resolved}): column '{column}' not found; columns are {sorted(columns)}")
    n = len(columns[cfg.text])
    if n == 0:
        raise DataError(f"{where} ({resolved}): no rows")
    drop = cfg.drop_missing_labels if drop_missing is None else drop_missing
    texts, pairs, labels, rows, dropped = [], [] if cfg.text_pair else None, [], [], 0
    for i in range(n):
        row = i + 1
        raw_label = columns[cfg.label][i]
        if drop and (raw_label is None or (isinstance(raw_label, str) and not raw_label.strip())):
            dropped += 1
            continue
        for column, bucket in ((cfg.text, texts), (cfg.text_pair, pairs)):
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
            raise DataError(f"{where} ({resolved}): row {row}, column '{cfg.label}': {exc}") from None
        labels.append(label)
        rows.append(row)
    if dropped:
        logger.info("%s: dropped %d of %d rows with no label (data.drop_missing_labels)", where, dropped, n)
    if not texts:
        raise DataError(f"{where} ({resolved}): no labelled rows left")
    return Split(name=split, source=resolved, texts=texts, pairs=pairs, labels=labels, rows=rows)


def attach_targets(split: Split, task: Task, labels: list[str] | None, label_column: str) -> None:
    """Map a split's labels through the training label set; a label training never saw is an error."""
    spec = task.spec
    if labels is not None:
        for value, row in zip(split.labels, split.rows):
            unknown = spec.unknown_labels(value, labels)
            if unknown:
                raise DataError(
                    f"data.{split.name} ({split.source}): row {row}, column '{label_column}': label "
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
    keep, carved = train_test_split(index, test_size=fraction, random_state=seed,
                                    stratify=task.spec.stratify_key(split.labels))
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
    for split in (train, validation, test):
        attach_targets(split, task, labels, cfg.label)
    hashes = {s.name: h for s in (train, validation, test) if (h := file_hash(s.source))}
    logger.info("data: %d train, %d validation, %d test examples%s", len(train), len(validation), len(test),
                f"; labels {labels}" if labels else "")
    return Dataset(train=train, validation=validation, test=test, labels=labels, hashes=hashes)
