"""Token classification: a tag per word (named entities or any per-token tagging), entities out.

Training data comes as tokens with tags (CoNLL files, JSONL lists) or as text with character spans; both
become a :class:`TaggedText`: the text, its words as character spans, and one BIO tag per word. Words of
span data are cut by :data:`WORD` (runs of letters and digits, single punctuation marks: how BERT-style
pre-tokenizers split), so a span's words do not depend on the model.

The model sees sub-tokens. Training labels the first sub-token of each word (or all of them) and ignores the
rest; a text longer than the model's window is cut into overlapping windows (``stride`` sub-tokens shared),
so no word is dropped. A backend returns, per text, the character offsets of its sub-tokens and their
logits (:class:`TokenOutput`, windows merged); words and entities are read off those offsets, with the
aggregation strategies of transformers' token-classification pipeline (``first``, ``max``, ``simple``).
Metrics are seqeval's entity-level precision, recall and F1 in strict IOB2 mode, plus word accuracy.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, Field

from core.calibration import Calibration
from core.calibration import apply as calibrated
from core.metrics import Evaluation, finished, macro_notes
from core.tasks.base import LabelError, ModelRecord, Task, ScoringSpec, postprocess, rounded

if TYPE_CHECKING:
    from core.encoding import Encoder

WORD = re.compile(r"\w+|[^\w\s]")
OUTSIDE = "O"
IGNORE = -100  # the target of sub-tokens that are not scored (PyTorch's cross-entropy ignore_index)
SCHEMES = ("auto", "bio", "iob1", "bioes")
AGGREGATIONS = ("first", "max", "simple")


def entity_types(labels: Iterable[str]) -> list[str]:
    """The entity types of a tag set (``B-PER``, ``I-PER`` -> ``PER``), sorted."""
    return sorted({label[2:] for label in labels if label[:2] in ("B-", "I-")})


@dataclass
class TaggedText:
    """One example: its text, its words as ``(start, end)`` character spans, one IOB2 tag per word."""

    text: str
    words: list[tuple[int, int]]
    tags: list[str]
    tag_ids: np.ndarray | None = None  # the tags as ids of the artifact's label order (set by to_targets)


@dataclass
class TokenOutput:
    """A backend's output for one text: sub-token character offsets (k, 2) and their logits or scores (k, T)."""

    text: str
    offsets: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets)


class Entity(BaseModel):
    start: int = Field(description="Character offset where the entity starts in the text.")
    end: int = Field(description="Character offset just past the entity.")
    label: str = Field(description="Entity type.")
    score: float = Field(description="Mean probability of the entity's tags.")
    text: str = Field(description="The covered text.")


class TokenPrediction(BaseModel):
    entities: list[Entity] = Field(description="Entities found in the text, in order.")


class EntitySpan(BaseModel):
    """A true entity in a posted example (``/evaluate``)."""

    start: int = Field(ge=0, description="Character offset where the entity starts.")
    end: int = Field(ge=1, description="Character offset just past the entity.")
    label: str = Field(min_length=1, description="Entity type.")


# -- reading tags and spans --------------------------------------------------------------------------------

def split_words(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in WORD.finditer(text)]


def join_tokens(tokens: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """The text of a token list (tokens joined by single spaces) and each token's character span."""
    words, position = [], 0
    for token in tokens:
        words.append((position, position + len(token)))
        position += len(token) + 1
    return " ".join(tokens), words


def _split_tag(tag: str) -> tuple[str, str | None]:
    if tag == OUTSIDE:
        return OUTSIDE, None
    prefix, sep, kind = tag.partition("-")
    if not sep or prefix not in {"B", "I", "E", "S"} or not kind:
        raise LabelError(f"tag {tag!r} is not O or B-/I-/E-/S- followed by a type")
    return prefix, kind


def normalise_tags(tags: Sequence[str], scheme: str = "auto", repair: bool = False) -> list[str]:
    """Tags in IOB2 (BIO): every entity starts with B-.

    Args:
        tags: one tag per word, in ``scheme``.
        scheme: ``bio``, ``iob1`` (I- starts an entity unless it continues one of the same type), ``bioes``,
            or ``auto`` (BIOES when an E- or S- tag appears, else BIO).
        repair: turn an I- tag that continues no entity into B- instead of failing (BIO only).

    Raises:
        LabelError: a malformed tag, or in BIO an I- tag with nothing to continue (naming its position).
    """
    parts = [_split_tag(t.strip() if isinstance(t, str) else t) for t in tags]
    if scheme == "auto":
        scheme = "bioes" if any(p in ("E", "S") for p, _ in parts) else "bio"
    out: list[str] = []
    previous: tuple[str, str | None] = (OUTSIDE, None)
    for i, (prefix, kind) in enumerate(parts):
        if prefix == OUTSIDE:
            out.append(OUTSIDE)
        elif scheme == "bioes":
            out.append(f"{'B' if prefix in ('B', 'S') else 'I'}-{kind}")
        elif prefix in ("E", "S"):
            raise LabelError(f"tag {i + 1} ({prefix}-{kind}) is a BIOES tag in {scheme.upper()} data")
        elif prefix == "B":
            out.append(f"B-{kind}")
        else:  # I-
            continues = previous[0] != OUTSIDE and previous[1] == kind
            if continues:
                out.append(f"I-{kind}")
            elif scheme == "iob1" or repair:
                out.append(f"B-{kind}")
            else:
                raise LabelError(f"tag {i + 1} (I-{kind}) continues no {kind} entity; fix it, set data.tag_scheme: "
                                 "iob1 if the data is IOB1, or data.repair_tags: true to start an entity there")
        previous = (prefix, kind)
    return out


def tags_from_spans(text: str, spans: Sequence[Any]) -> tuple[list[tuple[int, int]], list[str]]:
    """Words of ``text`` and their BIO tags from character spans ``[{"start", "end", "label"}, ...]``.

    A word belongs to a span when the word starts inside it.

    Raises:
        LabelError: a span is malformed, out of range, overlaps another, or covers no word.
    """
    words = split_words(text)
    tags = [OUTSIDE] * len(words)
    starts = [w[0] for w in words]
    taken: list[tuple[int, int]] = []
    for n, span in enumerate(spans):
        if isinstance(span, BaseModel):
            span = span.model_dump()
        if not isinstance(span, dict) or not {"start", "end", "label"} <= span.keys():
            raise LabelError(f"entity {n}: expected an object with start, end and label, got {span!r}")
        start, end, label = span["start"], span["end"], span["label"]
        if not (isinstance(start, int) and isinstance(end, int)) or isinstance(start, bool) or isinstance(end, bool):
            raise LabelError(f"entity {n}: start and end must be integers, got {start!r} and {end!r}")
        if not isinstance(label, str) or not label.strip() or "-" in label.strip()[:2]:
            raise LabelError(f"entity {n}: label {label!r} must be a non-empty type name such as PER")
        if not 0 <= start < end <= len(text):
            raise LabelError(f"entity {n} ({start}..{end}) lies outside the text (length {len(text)})")
        clash = next((t for t in taken if t[0] < end and start < t[1]), None)
        if clash:
            raise LabelError(f"entity {n} ({start}..{end}) overlaps another entity ({clash[0]}..{clash[1]})")
        taken.append((start, end))
        first = bisect.bisect_left(starts, start)
        covered = [i for i in range(first, len(words)) if words[i][0] < end]
        if not covered:
            raise LabelError(f"entity {n} ({start}..{end}, {text[start:end]!r}) covers no word")
        for k, i in enumerate(covered):
            tags[i] = f"{'B' if k == 0 else 'I'}-{label.strip()}"
    return words, tags


def entities_of(tags: Sequence[str]) -> list[tuple[int, int, str]]:
    """IOB2 word tags to ``(first word, last word + 1, type)`` (an I- of another type starts a new entity)."""
    found: list[list] = []
    for i, tag in enumerate(tags):
        prefix, kind = _split_tag(tag) if tag != OUTSIDE else (OUTSIDE, None)
        if prefix == OUTSIDE:
            continue
        if prefix == "I" and found and found[-1][1] == i and found[-1][2] == kind:
            found[-1][1] = i + 1
        else:
            found.append([i, i + 1, kind])
    return [tuple(e) for e in found]


# -- from sub-tokens to words --------------------------------------------------------------------------

def word_of_tokens(words: Sequence[tuple[int, int]], offsets: np.ndarray) -> np.ndarray:
    """For each sub-token (by its character offsets), the index of the word it starts in (-1: none)."""
    starts = np.asarray([w[0] for w in words], dtype=np.int64)
    ends = np.asarray([w[1] for w in words], dtype=np.int64)
    if len(offsets) == 0 or len(starts) == 0:
        return np.full(len(offsets), -1, dtype=np.int64)
    index = np.searchsorted(starts, offsets[:, 0], side="right") - 1
    ok = (index >= 0) & (offsets[:, 0] < ends[np.clip(index, 0, None)])
    return np.where(ok, index, -1)


def word_scores(words: Sequence[tuple[int, int]], output: TokenOutput, aggregation: str = "first") -> np.ndarray:
    """Per-word scores (n_words, T) from sub-token scores: the first sub-token's (``first``, ``simple``) or
    those of the sub-token whose best tag is most probable (``max``). A word with no sub-token (the model's
    tokenizer dropped it) scores as certain O."""
    num_tags = output.values.shape[1] if output.values.ndim == 2 else 1
    out = np.zeros((len(words), num_tags))
    out[:, 0] = 1.0  # O, the first tag of every label order
    owner = word_of_tokens(words, output.offsets)
    best = np.full(len(words), -1.0)
    seen = np.zeros(len(words), dtype=bool)
    for k, w in enumerate(owner):
        if w < 0:
            continue
        peak = float(output.values[k].max())
        if not seen[w] or (aggregation == "max" and peak > best[w]):
            out[w], best[w], seen[w] = output.values[k], peak, True
    return out


# -- the spec ----------------------------------------------------------------------------------------------

def _ids(target: Any) -> np.ndarray:
    return np.asarray(target.tag_ids if isinstance(target, TaggedText) else target, dtype=np.int64)


class TokenClassificationSpec(ScoringSpec):
    """A tag per word; entities with character offsets out."""
    does = "finds the entities in each text, with their types and character offsets"

    windows = True  # long texts are read in overlapping windows (Encoder.windows): nothing is cut
    task = Task.TOKEN_CLASSIFICATION
    problem_type = "token_classification"
    hf_problem_type = None
    postprocess = "softmax"
    default_metric = "f1"
    metric_names = ("f1", "precision", "recall", "f1_macro", "token_accuracy")
    label_noun = "tags"
    label_key = "entities"
    pipeline_tag = "token-classification"
    plot = "confusion"
    evaluation_tables = ("per_class", "confusion_matrix")
    auto_model = "AutoModelForTokenClassification"
    logits_axes = {0: "batch", 1: "sequence"}
    options = frozenset({"tag_scheme", "repair_tags", "label_all_tokens", "stride", "aggregation"})
    accepts_token_lists = True

    # -- labels ---------------------------------------------------------------------------------------
    example_text = "Ana flew from Oslo to see Acme Corp"

    def describe(self, manifest) -> list[str]:
        types = entity_types(manifest.labels or [])
        return [f"Entity types: {', '.join(types)} (tags {', '.join(manifest.labels or [])})."]

    def example_label(self, manifest) -> Any:
        return []

    def parse_example(self, text: Any, label: Any, options: dict | None = None) -> tuple[str, TaggedText]:
        """A text (or token list) and its tags (or entity spans) as a :class:`TaggedText`.

        Raises:
            LabelError: tokens and tags of different length, a malformed tag, a stray I- tag, a bad span.
        """
        options = options or {}
        if label is None:
            raise LabelError("missing label")
        if isinstance(text, (list, tuple)):
            if not isinstance(label, (list, tuple)):
                raise LabelError(f"expected a list of tags (one per token), got {type(label).__name__}")
            tokens = [t for t in text]
            if len(tokens) != len(label):
                raise LabelError(f"{len(tokens)} tokens but {len(label)} tags")
            bad = next((i for i, t in enumerate(tokens) if not isinstance(t, str) or not t.strip() or t != t.strip()
                        or any(c.isspace() for c in t)), None)
            if bad is not None:
                raise LabelError(f"token {bad + 1} ({tokens[bad]!r}) is empty or holds whitespace")
            if any(not isinstance(t, str) for t in label):
                raise LabelError("tags must be strings")
            joined, words = join_tokens(tokens)
            tags = normalise_tags(label, options.get("tag_scheme", "auto"), options.get("repair_tags", False))
            return joined, TaggedText(joined, words, tags)
        if isinstance(label, (list, tuple)) and all(isinstance(s, (dict, BaseModel)) for s in label):
            words, tags = tags_from_spans(text, label)
            return text, TaggedText(text, words, tags)
        raise LabelError("expected a list of entity spans ({start, end, label}) for a text, or a list of tags "
                         "for a list of tokens")

    def parse_label(self, value: Any, delimiter: str | None = None) -> Any:
        raise LabelError("token labels are read with their text (parse_example)")

    def label_set(self, values: Iterable[TaggedText]) -> list[str]:
        """O first, then B- and I- of every entity type seen, by type."""
        kinds = sorted({t[2:] for v in values for t in v.tags if t != OUTSIDE})
        return [OUTSIDE] + [f"{p}-{k}" for k in kinds for p in ("B", "I")]

    def unknown_labels(self, value: TaggedText, labels: Sequence[str]) -> list[str]:
        known = set(labels)
        return [t for t in value.tags if t not in known]

    def to_targets(self, values: Sequence[TaggedText], labels: Sequence[str] | None) -> list[TaggedText]:
        index = {name: i for i, name in enumerate(labels or [])}
        unknown = sorted({t for v in values for t in v.tags} - index.keys())
        if unknown:
            raise LabelError(f"unknown tag(s) {unknown}; the model knows {list(labels or [])}")
        for v in values:
            v.tag_ids = np.asarray([index[t] for t in v.tags], dtype=np.int64)
        return list(values)

    # -- encoding -------------------------------------------------------------------------------------
    def encode_training(self, encoder: Encoder, texts: Sequence[str], pairs, targets: Sequence[TaggedText],
                        labels: Sequence[str], *, label_all_tokens: bool = False
                        ) -> tuple[dict[str, list], list[list[int]], dict]:
        """Sub-token features and per-sub-token labels, long texts cut into overlapping windows.

        Returns:
            ``(features, labels, stats)``: one row per window; labels hold :data:`IGNORE` where nothing is
            scored; ``stats`` counts the texts that were split into windows.
        """
        index = {name: i for i, name in enumerate(labels)}
        inside = {i: index.get("I-" + n[2:], i) for i, n in enumerate(labels) if n.startswith("B-")}
        batch = encoder.windows(texts)
        features: dict[str, list] = {k: batch[k] for k in batch if k in ("input_ids", "attention_mask", "token_type_ids")}
        rows: list[list[int]] = []
        for row, sample in enumerate(batch["overflow_to_sample_mapping"]):
            target = targets[sample]
            offsets = np.asarray(batch["offset_mapping"][row], dtype=np.int64).reshape(-1, 2)
            special = offsets[:, 1] <= offsets[:, 0]
            owner = word_of_tokens(target.words, offsets)
            labels = [IGNORE] * len(offsets)
            for k, w in enumerate(owner):
                if special[k] or w < 0:
                    continue
                first = offsets[k, 0] == target.words[w][0]
                if first or label_all_tokens:
                    tag = int(target.tag_ids[w])
                    if not first:  # a later sub-token of a B- word continues the entity
                        tag = inside.get(tag, tag)
                    labels[k] = tag
            rows.append(labels)
        windows = np.bincount(batch["overflow_to_sample_mapping"], minlength=len(texts))
        return features, rows, {"texts_split_into_windows": int((windows > 1).sum()), "windows": int(len(rows))}

    def run(self, forward: Callable[[Any], np.ndarray], encoder: Encoder, texts: Sequence[str],
            pairs: Sequence[str] | None = None, *, batch_size: int, return_tensors: str,
            progress: bool = False, by_length: bool = True) -> list[TokenOutput]:
        """Per text, its sub-tokens' offsets and logits; windows of one text merged (overlaps averaged)."""
        if pairs is not None:
            raise ValueError("token classification takes single texts")
        batch = encoder.windows(texts)
        offsets = [np.asarray(o, dtype=np.int64).reshape(-1, 2) for o in batch["offset_mapping"]]
        owner = list(batch["overflow_to_sample_mapping"])
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch]
        order = (np.argsort([-len(ids) for ids in batch["input_ids"]], kind="stable") if by_length
                 else np.arange(len(batch["input_ids"])))
        starts = range(0, len(order), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="predict", unit="batch", leave=False)
        merged: list[dict[tuple[int, int], list[np.ndarray]]] = [{} for _ in texts]
        for start in starts:
            pick = order[start:start + batch_size]
            rows = encoder.tokenizer.pad({k: [batch[k][i] for i in pick] for k in keys}, padding="longest",
                                         return_tensors=return_tensors)
            logits = np.asarray(forward(rows), dtype=np.float32)
            for r, i in enumerate(pick):
                for k, (s, e) in enumerate(offsets[i]):
                    if e > s:
                        merged[owner[i]].setdefault((int(s), int(e)), []).append(logits[r, k])
        out = []
        for text, spans in zip(texts, merged):
            keys_sorted = sorted(spans)
            values = [np.mean(spans[k], axis=0) for k in keys_sorted]
            width = logits.shape[-1] if len(order) else 0
            out.append(TokenOutput(text, np.asarray(keys_sorted, dtype=np.int64).reshape(-1, 2),
                                   np.asarray(values, dtype=np.float32).reshape(-1, width)))
        return out

    # -- scores and decisions ---------------------------------------------------------------------------
    def scores(self, logits: Any, calibration: Calibration | None = None) -> list[Any]:
        """Tag probabilities: per :class:`TokenOutput`, or per array of word logits (the training loop)."""
        return [TokenOutput(o.text, o.offsets, postprocess(calibrated(o.values, calibration), "softmax"))
                if isinstance(o, TokenOutput) else postprocess(calibrated(o, calibration), "softmax") for o in logits]

    def flat(self, scores: Sequence[TokenOutput]) -> np.ndarray:
        parts = [o.values for o in scores if len(o)]
        return np.concatenate(parts) if parts else np.zeros((0, 0))

    def record(self, score: TokenOutput) -> dict:
        return {"offsets": score.offsets.tolist(), "values": score.values.tolist()}

    def from_record(self, text: str, record: dict) -> TokenOutput:
        return TokenOutput(text, np.asarray(record["offsets"], dtype=np.int64).reshape(-1, 2),
                           np.asarray(record["values"], dtype=np.float64))

    def entities(self, manifest: ModelRecord, output: TokenOutput, aggregation: str | None = None) -> list[dict]:
        """Entities of one text with character offsets, label, score (mean of its tags' probabilities), text."""
        aggregation = aggregation or manifest.aggregation or "first"
        labels = manifest.labels
        if aggregation == "simple":  # sub-tokens grouped by their own tags, across word boundaries
            units = [(int(s), int(e)) for s, e in output.offsets]
            probs = output.values
        else:
            units = split_words(output.text)
            probs = word_scores(units, output, aggregation)
        if not len(units):
            return []
        best = probs.argmax(axis=1)
        found = []
        for first, last, kind in entities_of([labels[i] for i in best]):
            start, end = units[first][0], units[last - 1][1]
            found.append({"start": start, "end": end, "label": kind,
                          "score": float(np.mean(probs[np.arange(first, last), best[first:last]])),
                          "text": output.text[start:end]})
        return found

    def decide(self, manifest: ModelRecord, scores: Sequence[TokenOutput]) -> list[list[dict]]:
        return [[{k: e[k] for k in ("start", "end", "label")} for e in self.entities(manifest, o)] for o in scores]

    def margins(self, manifest: ModelRecord, scores: Sequence[TokenOutput]) -> np.ndarray:
        out = []
        for o in scores:
            if not len(o):
                out.append(0.0)
                continue
            top2 = np.sort(o.values, axis=1)[:, -2:]
            out.append(float((top2[:, 1] - top2[:, 0]).min()))
        return np.asarray(out)

    def shape(self, manifest: ModelRecord, scores: Sequence[TokenOutput], *, top_k=None, ndigits=None) -> list[dict]:
        return [{"entities": [{**e, "score": rounded(e["score"], ndigits)} for e in self.entities(manifest, o)]} for o in scores]

    @property
    def prediction_model(self) -> type[BaseModel]:
        return TokenPrediction

    # -- metrics ----------------------------------------------------------------------------------------
    def word_level(self, targets: Sequence[Any], scores: Sequence[Any]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Gold tag ids and predicted word scores per example, whether scores are per word already (the
        training loop) or per sub-token (:class:`TokenOutput`, read off with the ``first`` strategy)."""
        if len(targets) != len(scores):
            raise ValueError(f"{len(targets)} targets but {len(scores)} predictions")
        if len(targets) == 0:
            raise ValueError("cannot evaluate zero examples")
        gold, predicted = [], []
        for target, score in zip(targets, scores):
            if isinstance(score, TokenOutput):
                score = word_scores(target.words, score, "first")
            gold.append(_ids(target))
            predicted.append(np.asarray(score))
        return gold, predicted

    def evaluate(self, targets, scores, labels=None, *, threshold: float = 0.5) -> Evaluation:
        return tag_metrics(*self.word_tags(targets, scores), list(labels or []))

    def resampled(self, targets, scores, labels=None, *, threshold: float = 0.5):
        return tag_resampled(*self.word_tags(targets, scores), list(labels or []))

    def word_tags(self, targets, scores) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Each text's gold tag ids and predicted tag ids, one per word."""
        gold, predicted = self.word_level(targets, scores)
        return gold, [p.argmax(axis=1) if len(p) else np.zeros(0, dtype=np.int64) for p in predicted]

    loss_name = "words given a wrong tag"

    def losses(self, targets, scores, *, threshold: float = 0.5) -> np.ndarray:
        return np.asarray([int(np.sum(g != p)) for g, p in zip(*self.word_tags(targets, scores))], dtype=np.float64)

    def agreement(self, manifest: ModelRecord, reference, candidate) -> dict:
        a, b = self.flat(reference), self.flat(candidate)
        return {"tokens": int(len(a)),
                "label_agreement": float(np.mean(a.argmax(1) == b.argmax(1))) if len(a) else 1.0,
                "entity_agreement": float(np.mean([x == y for x, y in zip(self.decide(manifest, reference),
                                                                         self.decide(manifest, candidate))]))}

    # -- baselines ------------------------------------------------------------------------------------
    def baselines(self, train, test, labels, *, threshold: float | None = 0.5, seed: int = 0, **_: Any
                  ) -> dict[str, dict[str, float]]:
        """All-O, and memorisation: each word's most frequent tag in training (O for unseen words)."""
        labels = list(labels or [])
        outside = labels.index(OUTSIDE)
        counts: dict[str, dict[int, int]] = {}
        for example in train[2]:
            for (s, e), tag in zip(example.words, example.tag_ids):
                word = example.text[s:e]
                counts.setdefault(word, {}).setdefault(int(tag), 0)
                counts[word][int(tag)] += 1
        memory = {w: max(c, key=lambda t: (c[t], -t)) for w, c in counts.items()}
        gold = [_ids(t) for t in test[2]]
        all_o = [np.full(len(g), outside) for g in gold]
        remembered = [np.asarray([memory.get(t.text[s:e], outside) for s, e in t.words], dtype=np.int64)
                      for t in test[2]]
        return {"all_o": tag_metrics(gold, all_o, labels).metrics,
                "memorisation": tag_metrics(gold, [repair_bio(p, labels) for p in remembered], labels).metrics}


def repair_bio(ids: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    """Word tags as a baseline predicts them, made valid IOB2 (an I- that continues nothing becomes B-)."""
    tags = normalise_tags([labels[i] for i in ids], "bio", repair=True)
    index = {n: i for i, n in enumerate(labels)}
    return np.asarray([index.get(t, int(i)) for t, i in zip(tags, ids)], dtype=np.int64)


def tag_resampled(gold: Sequence[np.ndarray], predicted: Sequence[np.ndarray], labels: list[str]
                  ) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """:func:`tag_metrics`' figures for many resamples of the texts at once, from each text's entity counts per
    type (seqeval's strict IOB2 entities; tests hold the figures equal)."""
    from seqeval.scheme import IOB2, Entities

    from core.metrics import ratio, weights

    types = entity_types(labels)
    column = {t: j for j, t in enumerate(types)}
    n = len(gold)
    true = np.zeros((n, len(types)))
    found = np.zeros((n, len(types)))
    hit = np.zeros((n, len(types)))
    gold_entities = Entities([[labels[i] for i in g] for g in gold], IOB2).entities
    predicted_entities = Entities([[labels[i] for i in p] for p in predicted], IOB2).entities
    for row, (want, got) in enumerate(zip(gold_entities, predicted_entities)):
        want, got = {e.to_tuple() for e in want}, {e.to_tuple() for e in got}
        for counts, entities in ((true, want), (found, got), (hit, want & got)):
            for entity in entities:
                counts[row, column[entity[1]]] += 1
    correct = np.asarray([np.sum(g == p) for g, p in zip(gold, predicted)], dtype=float)
    words = np.asarray([len(g) for g in gold], dtype=float)

    def resampled(indices: np.ndarray) -> dict[str, np.ndarray]:
        w = weights(indices, n)
        t, f, h = w @ true, w @ found, w @ hit
        precision, recall = ratio(h.sum(axis=1), f.sum(axis=1)), ratio(h.sum(axis=1), t.sum(axis=1))
        per_type = ratio(2 * ratio(h, f) * ratio(h, t), ratio(h, f) + ratio(h, t))
        present = t > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "f1": ratio(2 * precision * recall, precision + recall),
                "precision": precision,
                "recall": recall,
                "f1_macro": np.where(present.any(axis=1), (per_type * present).sum(axis=1) / present.sum(axis=1),
                                     np.nan),
                "token_accuracy": np.where(w @ words > 0, w @ correct / (w @ words), np.nan),
            }

    return resampled


def tag_metrics(gold: Sequence[np.ndarray], predicted: Sequence[np.ndarray], labels: list[str]) -> Evaluation:
    """Entity-level precision, recall, F1 (seqeval, strict IOB2), per entity type, word accuracy, tag confusion."""
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2
    from sklearn.metrics import confusion_matrix

    y_true = [[labels[i] for i in g] for g in gold]
    y_pred = [[labels[i] for i in p] for p in predicted]
    flat_gold = np.concatenate(gold) if gold else np.zeros(0, dtype=np.int64)
    flat_pred = np.concatenate(predicted) if predicted else np.zeros(0, dtype=np.int64)
    # One report: seqeval finds the entities of every sequence again for each score it is asked for, which dominated
    # the time of a large evaluation; the report's micro and macro rows are seqeval's precision, recall and F1 scores.
    report = classification_report(y_true, y_pred, output_dict=True, mode="strict", scheme=IOB2, zero_division=0)
    micro = report["micro avg"]
    per_type = {k: {"precision": float(v["precision"]), "recall": float(v["recall"]), "f1": float(v["f1-score"]),
                    "support": int(v["support"])}
                for k, v in report.items() if not k.endswith(" avg")}
    # the macro average over the entity types present in the targets (seqeval's counts a type only predicted as 0)
    types = entity_types(labels)
    present = np.asarray([per_type.get(t, {}).get("support", 0) > 0 for t in types], dtype=bool)
    m = {
        "f1": float(micro["f1-score"]),
        "precision": float(micro["precision"]),
        "recall": float(micro["recall"]),
        "f1_macro": float(np.mean([per_type[t]["f1"] for t, here in zip(types, present) if here]))
        if present.any() else None,
        "token_accuracy": float(np.mean(flat_gold == flat_pred)) if len(flat_gold) else None,
    }
    notes = macro_notes(types, present, "entity types")
    if not present.any():
        notes.append("no entity in the targets: precision, recall and F1 are 0 by convention")
    cm = confusion_matrix(flat_gold, flat_pred, labels=list(range(len(labels)))).tolist()
    return finished(Evaluation(metrics=m, per_class=per_type, confusion_matrix=cm, notes=notes,
                               macro_over=[t for t, here in zip(types, present) if here]), len(gold))
