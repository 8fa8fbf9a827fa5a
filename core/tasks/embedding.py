"""Sentence embeddings for semantic search: a text in, a unit vector out; a query's relevant document is nearest.

Training data are (query, positive document) pairs: ``data.text`` names the query column, ``data.label`` the
positive's, and ``data.negative`` optionally a hard negative's, which the loss adds to the batch's wrong answers.
A model's outputs are one vector per text, (n, d); for labelled pairs, the query's and the positive's stacked,
(n, 2, d) (:meth:`EmbeddingSpec.run` with the positives as the second texts, what
:meth:`EmbeddingSpec.judged_inputs` gives). :meth:`EmbeddingSpec.scores` L2-normalises every vector, so a dot product
is a cosine similarity. The pooling that makes one vector of a text's token states is the base model's own, read from
its sentence-transformers files (:func:`read_pooling`).

Evaluation is retrieval within a split: the corpus is the split's unique positive texts (and, in training, the
documents of ``data.corpus``), each query is relevant to the document equal to its positive, and documents are
ranked by dot product (:func:`retrieval_metrics`: NDCG@10, MRR@10, recall@1/@10, MAP). The baseline is BM25 over
the same corpus; the base model's zero-shot embeddings, the baseline that matters most, need torch and are added by
the trainer.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, Field

from core.calibration import Calibration
from core.metrics import Evaluation, checked, finished
from core.tasks.base import NEGATIVE_TEXT, SECOND_TEXT, LabelError, ModelRecord, ScoringSpec, Task, rounded

if TYPE_CHECKING:
    from core.encoding import Encoder

# Rank cut of the @k metrics (NDCG, MRR and the wider recall).
TOP_K = 10
WORD = re.compile(r"\w+")
POOLINGS = ("mean", "cls", "max")
# sentence-transformers' Pooling config keys, in the order they are looked for
_POOLING_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}


def read_pooling(model_dir: str | Path) -> str | None:
    """The pooling a model was trained with, from its sentence-transformers files (``modules.json`` naming a Pooling
    module whose ``config.json`` sets one mode); None when the directory has none.

    Raises:
        ValueError: the files ask for a pooling mode this project does not implement (e.g. mean_sqrt_len).
    """
    model_dir = Path(model_dir)
    modules = model_dir / "modules.json"
    if not modules.is_file():
        return None
    for module in json.loads(modules.read_text()):
        if module.get("type", "").endswith("Pooling"):
            config = json.loads((model_dir / module.get("path", "") / "config.json").read_text())
            chosen = [mode for key, mode in _POOLING_KEYS.items() if config.get(key)]
            if len(chosen) != 1 or any(config.get(k) for k in config if k.startswith("pooling_mode_") and
                                       k not in _POOLING_KEYS):
                raise ValueError(f"{module['path']}/config.json: pooling {config} is not one of mean, cls, max")
            return chosen[0]
    return None


def pooling_files(pooling: str, width: int) -> dict[str, Any]:
    """sentence-transformers' files for a Transformer + Pooling + Normalize model (relative path -> JSON), so that
    a published model loads in sentence-transformers too and :func:`read_pooling` reads its pooling back."""
    return {
        "modules.json": [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                         {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                         {"idx": 2, "name": "2", "path": "2_Normalize",
                          "type": "sentence_transformers.models.Normalize"}],
        "1_Pooling/config.json": {"word_embedding_dimension": width,
                                  **{key: mode == pooling for key, mode in _POOLING_KEYS.items()},
                                  "pooling_mode_mean_sqrt_len_tokens": False},
    }


def text_id(text: str) -> int:
    """A stable 56-bit id of a text: training batches carry their positives' ids, so that two examples with the same
    positive count as relevant to each other's query (and are not each other's negatives)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "big")


class Embedding(BaseModel):
    embedding: list[float] = Field(description="The text's embedding, L2-normalised (dot product = cosine).")
    truncated: bool = Field(False, description="The text is longer than the model reads: only its first "
                            "max_length tokens were scored (GET /metadata gives max_length).")


def normalise(vectors: Any) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float64 (a zero row stays zero rather than becoming NaN)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def ranked(similarity: np.ndarray) -> np.ndarray:
    """Per query, the rank (0 = first) of every document: by descending similarity, ties by corpus index."""
    n, m = similarity.shape
    order = np.lexsort((np.broadcast_to(np.arange(m), (n, m)), -similarity), axis=1)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(m), (n, m)), axis=1)
    return ranks


def retrieval_metrics(relevance: np.ndarray, similarity: np.ndarray) -> dict[str, float]:
    """Ranking metrics of queries over one corpus: the means over queries of :func:`retrieval_per_query`.

    Returns:
        ``ndcg@10``, ``mrr@10``, ``recall@1``, ``recall@10`` and ``map``, each a mean over queries in [0, 1].
    """
    return {name: float(values.mean()) for name, values in retrieval_per_query(relevance, similarity).items()}


def retrieval_per_query(relevance: np.ndarray, similarity: np.ndarray) -> dict[str, np.ndarray]:
    """Each query's ranking metrics over one corpus.

    Args:
        relevance: (queries, documents), 1 where a document is relevant to a query; every query needs one.
        similarity: (queries, documents), higher = nearer. Ties rank by corpus index (:func:`ranked`); the
            scikit-learn metrics see that strict order, so they agree with MRR and recall.

    Returns:
        ``ndcg@10``, ``mrr@10``, ``recall@1``, ``recall@10`` and ``map``: one value per query, in [0, 1].

    Raises:
        ValueError: the shapes differ, there is nothing to rank, or a query has no relevant document.
    """
    from sklearn.metrics._ranking import _ndcg_sample_scores

    relevance = np.asarray(relevance, dtype=np.int64)
    similarity = np.asarray(similarity, dtype=np.float64)
    if relevance.shape != similarity.shape or relevance.ndim != 2 or relevance.size == 0:
        raise ValueError(f"relevance {relevance.shape} and similarity {similarity.shape} must be one non-empty "
                         "(queries, documents) shape")
    if not relevance.any(axis=1).all():
        raise ValueError("every query needs at least one relevant document")
    ranks = ranked(similarity)
    strict = (relevance.shape[1] - ranks).astype(np.float64)  # the tie-broken order as scores
    first = np.where(relevance > 0, ranks, relevance.shape[1]).min(axis=1)  # rank of the first relevant document
    # scikit-learn's ndcg_score is the mean of these (one document: 1 by definition)
    ndcg = (_ndcg_sample_scores(relevance, strict, k=TOP_K) if relevance.shape[1] > 1
            else np.ones(len(relevance)))
    return {
        "ndcg@10": ndcg,
        "mrr@10": np.where(first < TOP_K, 1.0 / (first + 1), 0.0),
        "recall@1": (first < 1).astype(np.float64),
        "recall@10": (first < TOP_K).astype(np.float64),
        "map": average_precision(relevance, ranks),
    }


def average_precision(relevance: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Each query's average precision over a strict ranking (0 = first): the precision at each relevant
    document's rank, averaged over its relevant documents; scikit-learn's ``average_precision_score`` for untied
    scores, for all queries at once (per query, its checks cost milliseconds)."""
    relevant_ranks = np.sort(np.where(relevance > 0, ranks, np.inf), axis=1)
    found = np.isfinite(relevant_ranks)
    precision = np.arange(1, relevance.shape[1] + 1) / (np.where(found, relevant_ranks, 0) + 1)
    return (precision * found).sum(axis=1) / found.sum(axis=1)


def corpus_of(positives: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The unique positive texts (in order of first occurrence), the example index standing for each, and the
    (examples, documents) relevance matrix: example i is relevant to the document equal to its positive."""
    index: dict[str, int] = {}
    for i, text in enumerate(positives):
        index.setdefault(text, i)
    corpus = list(index)
    column = {text: j for j, text in enumerate(corpus)}
    relevance = np.zeros((len(positives), len(corpus)), dtype=np.int64)
    relevance[np.arange(len(positives)), [column[t] for t in positives]] = 1
    return corpus, np.fromiter(index.values(), dtype=np.int64, count=len(corpus)), relevance


def widened(corpus: list[str], relevance: np.ndarray, keys: Sequence[str]) -> tuple[list[str], np.ndarray, list[int]]:
    """A corpus with further documents (``keys``: texts, or the ids standing for them) that no query is relevant
    to: the corpus and relevance matrix widened, and the indices into ``keys`` of the documents added (a key
    already in the corpus, or repeated, is that document)."""
    known, new = set(corpus), []
    for j, key in enumerate(keys):
        if str(key) not in known:
            known.add(str(key))
            new.append(j)
    return corpus + [str(keys[j]) for j in new], np.pad(relevance, ((0, 0), (0, len(new)))), new


def bm25_words(text: str) -> list[str]:
    """The words BM25 counts: lower-cased ``\\w+`` runs."""
    return WORD.findall(text.lower())


class EmbeddingSpec(ScoringSpec):
    """A unit vector per text; queries and their positive documents nearest each other."""

    task = Task.EMBEDDING
    problem_type = "sentence_embedding"
    postprocess = "identity"
    default_metric = "ndcg@10"
    metric_names = ("ndcg@10", "mrr@10", "recall@1", "recall@10", "map")
    has_labels = False
    label_noun = "positive documents"
    label_key = "positive"
    pipeline_tag = "sentence-similarity"
    plot = "retrieval"
    auto_model = "AutoModel"
    logits_axes = {0: "batch"}
    does = "embeds texts as unit vectors for semantic search"
    # no new head: the pooled body is the model, at one rate; until validation stops improving, which matched 3
    # epochs at the same cost on the sets tried (BENCHMARKS.md, defaults-embedding-auto)
    head_lr_factor = 1.0
    routes = ("/embed", "/rank")
    kind = "a model that embeds text"
    usage = ("POST /embed to embed texts, POST /rank to order documents by similarity to a query, POST /evaluate "
             "to score it on query and positive pairs, GET /metadata for everything its artifact records.")
    example_text = "How do I copy a file to another directory?"
    default_columns = ("query", "positive")
    options = frozenset({"embedding", "negative", "corpus"})
    pools = True

    # -- labels ---------------------------------------------------------------------------------------
    def parse_label(self, value: Any, delimiter: str | None = None) -> str:
        """The positive document's text.

        Raises:
            LabelError: it is missing, not a string, or blank.
        """
        if value is None:
            raise LabelError("missing positive document")
        if not isinstance(value, str):
            raise LabelError(f"a positive document must be a text, not {type(value).__name__}")
        if not value.strip():
            raise LabelError("empty positive document text")
        return value

    def label_set(self, values: Iterable[Any]) -> None:
        return None

    def unknown_labels(self, value: Any, labels: Sequence[str]) -> list[str]:
        return []

    def to_targets(self, values: Sequence[Any], labels: Sequence[str] | None) -> np.ndarray:
        return np.asarray(list(values), dtype=object)

    def num_outputs(self, labels: Sequence[str] | None) -> int:
        """0: the embedding's width is the model's, not the data's."""
        return 0

    def encode_training(self, encoder: Encoder, texts: Sequence[str], pairs: Sequence[str] | None, targets: Any,
                        labels: Sequence[str] | None, *, negatives: Sequence[str] | None = None, **options: Any
                        ) -> tuple[dict[str, list], Any, dict]:
        """Queries and positives tokenized apart (``positive_*`` features), and hard negatives where given
        (``negative_*``). Each example's target is its positive's :func:`text_id`, or with negatives the pair
        ``[positive id, negative id]``, so that the loss never counts a query's own positive as a negative."""
        features = dict(encoder.encode(texts))
        features.update({SECOND_TEXT + k: v for k, v in encoder.encode([str(t) for t in targets]).items()})
        ids = [text_id(str(t)) for t in targets]
        if negatives is None:
            return features, ids, {}
        features.update({NEGATIVE_TEXT + k: v for k, v in encoder.encode(list(negatives)).items()})
        return features, [[i, text_id(n)] for i, n in zip(ids, negatives)], {}

    def run(self, forward: Callable[[Any], np.ndarray], encoder: Encoder, texts: Sequence[str],
            pairs: Sequence[str] | None = None, **kwargs: Any) -> np.ndarray:
        """One vector per text, (n, d); with ``pairs`` (the positives), each text's and its pair's, (n, 2, d)."""
        from core.encoding import run_in_length_batches

        vectors = run_in_length_batches(forward, encoder, texts, None, **kwargs)
        if pairs is None:
            return vectors
        return np.stack([vectors, run_in_length_batches(forward, encoder, pairs, None, **kwargs)], axis=1)

    def judged_inputs(self, texts: Sequence[str], pairs: Sequence[str] | None, targets: Any
                      ) -> tuple[Sequence[str], Sequence[str] | None]:
        """The model reads the positives too: retrieval metrics rank them."""
        return texts, [str(t) for t in targets]

    # -- scores ---------------------------------------------------------------------------------------
    def scores(self, logits: Any, calibration: Calibration | None = None) -> np.ndarray:
        """Every vector L2-normalised, as float64, in the outputs' shape (no calibration applies)."""
        return normalise(logits)

    def split(self, scores: Any) -> tuple[np.ndarray, np.ndarray]:
        """The query vectors and the positive vectors of labelled pairs' outputs (a training batch's hard
        negatives, a third vector per example, are for the loss: retrieval ranks the split's positives).

        Raises:
            ValueError: the outputs are not (n, 2, d) or (n, 3, d).
        """
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim != 3 or scores.shape[1] not in (2, 3) or scores.shape[2] == 0:
            raise ValueError(f"embedding outputs of labelled pairs must be (n, 2, d), query then positive; "
                             f"got {scores.shape}")
        return scores[:, 0], scores[:, 1]

    @staticmethod
    def training_key(text: str) -> str:
        """What stands for a document in training batches' targets (its :func:`text_id`), as :meth:`positives`
        reads it: the key a data.corpus document is ranked under beside a split's positives."""
        return str(text_id(text))

    @staticmethod
    def positives(targets: Any) -> list[str]:
        """Each example's positive, as a text or the id that stands for it (training batches with hard negatives
        carry ``[positive id, negative id]`` pairs)."""
        targets = np.asarray(targets, dtype=object)
        return [str(t) for t in (targets[:, 0] if targets.ndim == 2 else targets)]

    def vectors(self, scores: Any) -> np.ndarray:
        """Each example's own vector, (n, d): the text's, or the query's of a labelled pair."""
        scores = np.asarray(scores, dtype=np.float64)
        return scores[:, 0] if scores.ndim == 3 else scores

    def record(self, score: Any) -> list[float]:
        """One example's own vector as JSON (a labelled pair's: its query's, what the text alone gives)."""
        score = np.asarray(score, dtype=np.float64)
        return (score[0] if score.ndim == 2 else score).tolist()

    def flat(self, scores: Any) -> np.ndarray:
        """The scores as one (n, -1) float array (every vector of each example)."""
        scores = np.asarray(scores, dtype=np.float64)
        return scores.reshape(len(scores), -1)

    # -- metrics and baselines ------------------------------------------------------------------------
    def evaluate(self, targets: Any, scores: Any, labels: Sequence[str] | None = None, *,
                 threshold: Any = None, documents: tuple[Sequence[str], Any] | None = None) -> Evaluation:
        """Retrieval over the split's unique positives (the first example with a text gives its vector), and over
        ``documents`` too where given: ``(keys, vectors)``, each key a document's text or the id standing for it
        as the targets' do (data.corpus; one equal to a positive is that positive)."""
        targets, scores = checked(targets, scores)
        queries, positives = self.split(scores)
        corpus, stands_for, relevance = corpus_of(self.positives(targets))
        vectors = positives[stands_for]
        note = f"corpus of {len(corpus)} unique positive documents"
        if documents is not None:
            keys, extra = documents
            positives_only = len(corpus)
            corpus, relevance, new = widened(corpus, relevance, keys)
            vectors = np.concatenate([vectors, np.asarray(extra, dtype=np.float64)[new].reshape(len(new), -1)])
            note = f"corpus of {len(corpus)} documents: {positives_only} positives and {len(new)} more from data.corpus"
        similarity = normalise(queries) @ normalise(vectors).T
        return finished(Evaluation(metrics=retrieval_metrics(relevance, similarity), notes=[note]), len(targets))

    def resampled(self, targets: Any, scores: Any, labels: Sequence[str] | None = None, *, threshold: Any = None):
        """Resamples of the queries, ranked over the whole split's corpus (the queries are the sample; the corpus
        stays what was ranked), each metric the mean of its per-query values."""
        from core.metrics import weights

        targets, scores = checked(targets, scores)
        queries, positives = self.split(scores)
        _, stands_for, relevance = corpus_of(self.positives(targets))
        per_query = retrieval_per_query(relevance, normalise(queries) @ normalise(positives[stands_for]).T)
        n = len(targets)
        return lambda indices: {name: weights(indices, n) @ values / n for name, values in per_query.items()}

    def texts_read(self, texts: Sequence[str], pairs: Sequence[str] | None) -> int:
        """Queries and their positives are encoded apart: two texts per example."""
        return len(texts) + len(pairs or ())

    def ranked_corpus(self, targets: Any) -> int:
        """The unique positives: every query is ranked against all of them."""
        return len({str(t) for t in targets})

    def baselines(self, train: tuple, test: tuple, labels: Sequence[str] | None, *, threshold: float | None = 0.5,
                  seed: int = 0, validation: tuple | None = None, metric: str | None = None,
                  documents: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
        """BM25 (Okapi; lower-cased ``\\w+`` words) ranking the test split's unique positives (and ``documents``,
        data.corpus, where given) for each test query; nothing is fitted on ``train``."""
        from rank_bm25 import BM25Okapi

        queries, _, positives = test
        corpus, _, relevance = corpus_of([str(p) for p in positives])
        if documents is not None:
            corpus, relevance, _ = widened(corpus, relevance, documents)
        bm25 = BM25Okapi([bm25_words(doc) for doc in corpus])
        similarity = np.stack([bm25.get_scores(bm25_words(str(q))) for q in queries]).astype(np.float64)
        return {"bm25": retrieval_metrics(relevance, similarity)}

    # -- decisions ------------------------------------------------------------------------------------
    def decide(self, manifest: ModelRecord, scores: Any) -> list[list[float]]:
        """Each example's query vector: what a prediction is."""
        return self.vectors(scores).tolist()

    def shape(self, manifest: ModelRecord, scores: Any, *, top_k: int | None = None,
              ndigits: int | None = None) -> list[dict[str, Any]]:
        return [{"embedding": [rounded(x, ndigits) for x in row]} for row in self.vectors(scores)]

    @property
    def prediction_model(self) -> type[BaseModel]:
        return Embedding

    # -- parity between two backends ------------------------------------------------------------------
    def compare(self, manifest: ModelRecord, reference: Any, candidate: Any, targets: Any) -> dict:
        """Vector differences, cosine agreement and both sides' retrieval metrics (no labels or threshold)."""
        ref_metrics = self.evaluate(targets, reference).metrics
        new_metrics = self.evaluate(targets, candidate).metrics
        diff = np.abs(self.flat(reference) - self.flat(candidate))
        return {"examples": int(len(reference)),
                "max_abs_diff": float(diff.max()) if diff.size else 0.0,
                "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
                "metrics_torch": ref_metrics, "metrics_onnx": new_metrics,
                "metric_delta": {k: new_metrics[k] - v for k, v in ref_metrics.items() if k in new_metrics},
                **self.agreement(manifest, reference, candidate)}

    def agreement(self, manifest: ModelRecord, reference: Any, candidate: Any) -> dict:
        """Cosine similarity of each query and positive vector between the two backends: the lowest and the mean."""
        a = np.asarray(reference, dtype=np.float64).reshape(-1, np.shape(reference)[-1])
        b = np.asarray(candidate, dtype=np.float64).reshape(-1, np.shape(candidate)[-1])
        cosine = np.sum(normalise(a) * normalise(b), axis=1)
        if not cosine.size:
            return {"cosine_min": 1.0, "cosine_mean": 1.0}
        return {"cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean())}

    # -- documentation --------------------------------------------------------------------------------
    def describe(self, manifest: ModelRecord) -> list[str]:
        return ["Embeddings are L2-normalised: the dot product of two is their cosine similarity."]

    def example_label(self, manifest: ModelRecord) -> Any:
        return "Use cp SOURCE DEST to copy a file."

    def request_examples(self, manifest: ModelRecord) -> dict[str, dict]:
        shown = (getattr(manifest, "examples", None) or [{}])[0]
        query = shown.get("query") or self.example_text
        positive = shown.get(self.label_key) or self.example_label(manifest)
        return {self.route: {"texts": [query]},
                "/evaluate": {"examples": [{"query": query, self.label_key: positive}]}}
