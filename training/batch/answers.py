"""A model answering chunks of raw rows, as the service answers /predict, /embed or /generate: the backend ``auto``
picks (:func:`service.backends.choose_backend`), the same scores and shapes (each task spec's ``shape``), typed
Arrow columns for them, and a reason for every row it cannot answer.

One :class:`Answerer` lives in each worker: the local engine's process (or each of its ``--workers``), or each
actor of a Ray Data pool. Its output has one row per input row, in order: :data:`STATUS` says whether the row was
answered, is bad (:data:`REASON` says why) or is a blank line (skipped), so that whoever writes the shards numbers
the rows without knowing where they were answered.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel

from core.manifest import Manifest, read_manifest
from training.batch.inputs import LINE, parse_lines, text_problem

STATUS, REASON = "_status", "_reason"
ANSWERED, BAD, BLANK = 0, 1, 2


@dataclass(frozen=True)
class Columns:
    """Which input columns a job reads: the text (and second text), the id and the columns passed through."""

    text: str
    pair: str | None = None
    id: str | None = None
    keep: tuple[str, ...] = ()

    @property
    def read(self) -> list[str]:
        return list(dict.fromkeys([self.text, *([self.pair] if self.pair else []), *([self.id] if self.id else []),
                                   *self.keep]))

    @property
    def named(self) -> dict[str, str]:
        """``{option: column}`` of every column the job reads (what each input file must have)."""
        return {**self.texts, **({"--id": self.id} if self.id else {}), **{f"--keep {c}": c for c in self.keep}}

    @property
    def texts(self) -> dict[str, str]:
        """``{option: column}`` of the columns that must hold text."""
        return {"--text": self.text, **({"--pair": self.pair} if self.pair else {})}


@dataclass
class Answering:
    """How a job answers: the backend, the batch the model runs, the threads, whether a text too long for the model
    is cut (as the service cuts it, saying so in ``truncated``) or is a bad row, and generation's token budget."""

    backend: str = "auto"
    device: str = "auto"
    batch_size: int = 64
    threads: int | None = None
    truncation: bool = True
    max_new_tokens: int | None = None


def model_scores(manifest: Manifest, backend: Any, texts: Sequence[str], pairs: Sequence[str] | None,
                 max_new_tokens: int | None = None) -> Any:
    """The task's scores of texts (and pairs) from a backend, as the service computes them: post-processed scores of a
    scoring model, or the greedy generations of a model that writes text (prompts built as in training, with the
    artifact's prompt format)."""
    spec = manifest.task.spec
    if not spec.writes:
        return spec.scores(backend.logits(texts, pairs), manifest.calibration)
    prompts = backend.prompter.all(texts)
    return spec.scores(backend.generate(prompts, max_new_tokens=max_new_tokens or manifest.decoding["max_new_tokens"]))


def arrow_type(annotation: Any, labels: Sequence[str] | None) -> pa.DataType:
    """The Arrow type of a prediction field, from its pydantic annotation: strings (and literals of strings),
    numbers, flags, lists (a list of floats is a float32 vector), nested models as structs, and a mapping from label
    to score as a struct with a field per label of the model."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return arrow_type(next(a for a in args if a is not type(None)), labels)
    if annotation is str or origin is typing.Literal:
        return pa.string()
    if annotation is bool:
        return pa.bool_()
    if annotation is int:
        return pa.int64()
    if annotation is float:
        return pa.float64()
    if origin is list:
        inner = args[0]
        return pa.list_(pa.float32() if inner is float else arrow_type(inner, labels))
    if origin is dict:
        value = arrow_type(args[1], labels)
        return pa.struct([(name, value) for name in labels]) if labels else pa.map_(pa.string(), value)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pa.struct([(name, arrow_type(f.annotation, labels)) for name, f in annotation.model_fields.items()])
    raise TypeError(f"no Arrow type for a prediction field of type {annotation!r}")


def answer_schema(manifest: Manifest) -> pa.Schema:
    """The columns of an answer, in the order of the task's prediction model (what /predict or /generate says)."""
    model = manifest.task.spec.prediction_model
    return pa.schema([(name, arrow_type(f.annotation, manifest.labels)) for name, f in model.model_fields.items()])


class Answerer:
    """An artifact's model behind a callable that answers a chunk of raw rows (a Ray Data actor class as it is)."""

    def __init__(self, artifact: str, columns: Columns, input_format: str, answering: Answering):
        from service.backends import choose_backend

        self.directory = Path(artifact)
        self.manifest = read_manifest(self.directory)
        self.spec = self.manifest.task.spec
        self.columns, self.format, self.answering = columns, input_format, answering
        self.backend = choose_backend(self.directory, self.manifest, backend=answering.backend,
                                      device=answering.device, threads=answering.threads,
                                      batch_size=answering.batch_size)
        self.schema = answer_schema(self.manifest)

    def __call__(self, chunk: pa.Table) -> pa.Table:
        values, reasons, blank = self._values(chunk)
        status = [BLANK if b else BAD if r else ANSWERED for r, b in zip(reasons, blank)]
        for option, column in self.columns.texts.items():
            for i, value in enumerate(values[column]):
                if status[i] == ANSWERED and (problem := text_problem(option, column, value)):
                    status[i], reasons[i] = BAD, problem
        good = [i for i, s in enumerate(status) if s == ANSWERED]
        texts = [values[self.columns.text][i] for i in good]
        pairs = [values[self.columns.pair][i] for i in good] if self.columns.pair else None
        answers, too_long = self.answer(texts, pairs) if good else ([], [])
        rows: list[dict] = [{} for _ in status]
        for i, answer, long in zip(good, answers, too_long):
            if long:
                status[i], reasons[i] = BAD, long
            else:
                rows[i] = answer
        out = {STATUS: pa.array(status, pa.int8()), REASON: pa.array(reasons, pa.string())}
        for name in dict.fromkeys([*([self.columns.id] if self.columns.id else []), *self.columns.keep]):
            out[name] = values[name] if isinstance(values[name], pa.ChunkedArray) else pa.array(values[name])
        answered = pa.Table.from_pylist(rows, schema=self.schema)
        return pa.table({**out, **{name: answered[name] for name in self.schema.names}})

    def _values(self, chunk: pa.Table) -> tuple[dict[str, Any], list[str | None], list[bool]]:
        """The chunk's columns (Python lists of the text columns, Arrow columns of the others) with a reason per bad
        row and a flag per blank line."""
        if self.format == "jsonl":
            return parse_lines(chunk[LINE].to_pylist(), self.columns.read)
        values: dict[str, Any] = {name: chunk[name] for name in self.columns.read}
        for column in self.columns.texts.values():
            values[column] = chunk[column].to_pylist()
        return values, [None] * chunk.num_rows, [False] * chunk.num_rows

    def answer(self, texts: list[str], pairs: list[str] | None) -> tuple[list[dict], list[str | None]]:
        """Each text's answer as the service shapes it, and for each a reason it is a bad row instead (too long for
        the model where truncation is off), or None."""
        if self.spec.writes:
            return self._generate(texts)
        encoder = self.backend.encoder
        cut = [False] * len(texts) if self.spec.windows else encoder.truncated(texts, pairs)
        reason = (f"{self.columns.text}: more tokens than the {self.manifest.max_length} the model reads "
                  "(--no-truncation)")
        too_long = [reason if c and not self.answering.truncation else None for c in cut]
        keep = [i for i, reason in enumerate(too_long) if reason is None]
        if len(keep) < len(texts):
            texts = [texts[i] for i in keep]
            pairs = [pairs[i] for i in keep] if pairs is not None else None
        answers: list[dict] = [{} for _ in too_long]
        if keep:
            scores = self.spec.scores(self.backend.logits(texts, pairs), self.manifest.calibration)
            if not np.all(np.isfinite(self.spec.flat(scores))):
                raise ArithmeticError(f"{self.manifest.name} gave non-finite outputs")
            for i, shaped in zip(keep, self.spec.shape(self.manifest, scores)):
                answers[i] = {**shaped, **({} if self.spec.windows else {"truncated": cut[i]})}
        return answers, too_long

    def _generate(self, texts: list[str]) -> tuple[list[dict], list[str | None]]:
        from core.tasks.generation import prompt_for

        prompter = self.backend.prompter
        prompts, too_long = [], []
        for text in texts:
            ids, cut = prompt_for(prompter.tokenizer, prompter.fmt, text, prompter.max_input_tokens)
            prompts.append(ids)
            too_long.append(f"{self.columns.text}: longer than the {prompter.max_input_tokens} input tokens the "
                            "model reads (--no-truncation)" if cut and not self.answering.truncation else None)
        keep = [i for i, reason in enumerate(too_long) if reason is None]
        max_new_tokens = self.answering.max_new_tokens or self.manifest.decoding["max_new_tokens"]
        answers: list[dict] = [{} for _ in texts]
        if keep:
            generated = self.backend.generate([prompts[i] for i in keep], max_new_tokens=max_new_tokens)
            for i, shaped in zip(keep, self.spec.shape(self.manifest, generated)):
                answers[i] = shaped
        return answers, too_long
