"""The embedding task's torch-free side: labels, normalisation, retrieval metrics, BM25, shapes and backend parity."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from core.tasks.base import LabelError
from core.tasks.embedding import Embedding, EmbeddingSpec, normalise, retrieval_metrics

SPEC = EmbeddingSpec()


def pairs(queries, positives) -> np.ndarray:
    """Model outputs of labelled pairs: each query vector stacked on its positive's, (n, 2, d)."""
    return np.stack([np.asarray(queries, float), np.asarray(positives, float)], axis=1)


def test_positive_documents_must_be_non_empty_texts():
    assert SPEC.parse_label("cp copies files") == "cp copies files"
    assert SPEC.parse_example("how to copy", "cp copies files") == ("how to copy", "cp copies files")
    with pytest.raises(LabelError, match="missing positive document"):
        SPEC.parse_label(None)
    with pytest.raises(LabelError, match="must be a text, not int"):
        SPEC.parse_label(3)
    with pytest.raises(LabelError, match="empty positive document"):
        SPEC.parse_label(" \t\n")
    assert SPEC.label_set(["a", "b"]) is None and SPEC.num_outputs(None) == 0
    targets = SPEC.to_targets(["a", "b"], None)
    assert targets.dtype == object and targets.tolist() == ["a", "b"]


def test_scores_normalise_every_vector_and_keep_zero_vectors_zero():
    scores = SPEC.scores(pairs([[3, 4], [1, 0]], [[0, 0], [0, 2]]).astype(np.float32))
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, [[[0.6, 0.8], [0.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])
    np.testing.assert_allclose(SPEC.scores(np.array([[3.0, 4.0]])), [[0.6, 0.8]])  # texts alone: (n, d)
    queries, positives = SPEC.split(scores)
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0)
    np.testing.assert_array_equal(positives[0], [0.0, 0.0])  # a zero vector is not turned into NaN
    np.testing.assert_allclose(np.linalg.norm(normalise(np.random.default_rng(0).normal(size=(5, 7))), axis=1), 1.0)
    with pytest.raises(ValueError, match=r"\(n, 2, d\)"):
        SPEC.split(np.ones((2, 3)))


def test_evaluate_on_a_hand_made_case():
    # Documents A, B, C are the unit axes; q0 and q1 find theirs first, q2 finds A (0.8) before its C (0.6).
    scores = SPEC.scores(pairs([[1, 0, 0], [0.6, 0.8, 0], [0.8, 0, 0.6]], np.eye(3)))
    result = SPEC.evaluate(["A", "B", "C"], scores)
    first_ranks = [1, 1, 2]
    expected = {
        "ndcg@10": np.mean([1 / math.log2(r + 1) for r in first_ranks]),  # one relevant doc: IDCG = 1
        "mrr@10": np.mean([1 / r for r in first_ranks]),  # 5/6
        "recall@1": 2 / 3,
        "recall@10": 1.0,
        "map": 5 / 6,  # one relevant document: AP = 1 / its rank
    }
    assert result.metrics == pytest.approx(expected)
    assert set(result.metrics) == set(SPEC.metric_names)
    assert result.n == 3 and result.per_class is None and result.confusion_matrix is None
    assert result.notes == ["corpus of 3 unique positive documents"]
    with pytest.raises(ValueError, match="2 targets but 3 predictions"):
        SPEC.evaluate(["A", "B"], scores)


def test_retrieval_metrics_with_two_relevant_documents_cuts_and_ties():
    # Relevant documents at ranks 1 and 3 of 4.
    two = retrieval_metrics(np.array([[1, 0, 1, 0]]), np.array([[0.9, 0.8, 0.7, 0.1]]))
    assert two["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)))
    assert two["map"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert two["mrr@10"] == 1 and two["recall@1"] == 1
    # The relevant document 11th of 12: outside every @10 metric, but MAP still sees it.
    far = retrieval_metrics(np.eye(12, dtype=int)[[10]], -np.arange(12.0)[None, :])
    assert far["ndcg@10"] == 0 and far["mrr@10"] == 0 and far["recall@10"] == 0
    assert far["map"] == pytest.approx(1 / 11)
    # Ties rank by corpus index: the relevant second document is second, not averaged with the first.
    tied = retrieval_metrics(np.array([[0, 1, 0]]), np.zeros((1, 3)))
    assert tied["mrr@10"] == 0.5 and tied["ndcg@10"] == pytest.approx(1 / math.log2(3)) and tied["map"] == 0.5
    with pytest.raises(ValueError, match="relevant document"):
        retrieval_metrics(np.array([[0, 0]]), np.array([[1.0, 2.0]]))


def test_duplicate_positives_are_one_document_relevant_to_both_queries():
    # q0 and q1 share positive "D"; the second copy's vector points away and must not stand for the document.
    scores = SPEC.scores(pairs([[1, 0], [0.9, 0.1], [0, 1]], [[1, 0], [-1, 0], [0, 1]]))
    result = SPEC.evaluate(["D", "D", "E"], scores)
    assert result.notes == ["corpus of 2 unique positive documents"]
    assert result.metrics["recall@1"] == 1 and result.metrics["ndcg@10"] == pytest.approx(1)
    # Had the second copy's vector stood for D, q0 would find E first; kept apart (X), it is q1's, ranked last.
    worse = SPEC.evaluate(["D", "X", "E"], scores)
    assert worse.notes == ["corpus of 3 unique positive documents"] and worse.metrics["recall@1"] < 1


def test_bm25_ranks_by_word_overlap_better_than_chance():
    documents = ["cp copies files and directories", "rm removes files", "ls lists directory contents",
                 "mkdir makes a new directory", "grep searches text for patterns", "tar packs files into archives"]
    queries = ["how do I copy directories", "remove a file with rm", "list contents of a folder",
               "make new folder", "search text patterns", "pack an archive with tar"]
    test = (queries, None, SPEC.to_targets(documents, None))
    train = (["unused"], None, SPEC.to_targets(["unused"], None))
    bm25 = SPEC.baselines(train, test, None, validation=None, metric="ndcg@10")
    assert set(bm25) == {"bm25"} and set(bm25["bm25"]) == set(SPEC.metric_names)
    assert bm25["bm25"]["recall@1"] == 1 and bm25["bm25"]["ndcg@10"] == pytest.approx(1)
    rng = np.random.default_rng(0)
    chance = np.mean([retrieval_metrics(np.eye(6, dtype=int), rng.random((6, 6)))["ndcg@10"] for _ in range(50)])
    assert bm25["bm25"]["ndcg@10"] > chance + 0.2


def test_predictions_are_the_query_vectors():
    scores = SPEC.scores(pairs([[3, 4], [0, 2]], [[1, 0], [0, 1]]))
    assert SPEC.decide(None, scores) == [[0.6, 0.8], [0.0, 1.0]]
    shaped = SPEC.shape(None, SPEC.scores(pairs([[1, 2]], [[1, 0]])), ndigits=3)
    assert shaped == [{"embedding": [0.447, 0.894]}]
    assert Embedding.model_validate(shaped[0]).embedding == [0.447, 0.894]
    np.testing.assert_array_equal(SPEC.margins(None, scores), [0.0, 0.0])
    assert SPEC.flat(scores).shape == (2, 4)
    assert SPEC.decide(None, SPEC.scores(np.array([[0.0, 3.0]]))) == [[0.0, 1.0]]  # texts alone
    examples = SPEC.request_examples(None)
    assert set(examples) == {"/embed", "/evaluate"} and examples["/embed"]["texts"] == [SPEC.example_text]
    assert set(examples["/evaluate"]["examples"][0]) == {"query", "positive"}


def test_compare_identical_and_perturbed_backends():
    rng = np.random.default_rng(1)
    reference = SPEC.scores(rng.normal(size=(8, 2, 8)))
    targets = SPEC.to_targets([f"doc {i % 6}" for i in range(8)], None)
    same = SPEC.compare(None, reference, reference.copy(), targets)
    assert same["examples"] == 8 and same["max_abs_diff"] == 0 and same["mean_abs_diff"] == 0
    assert same["cosine_min"] == pytest.approx(1) and same["cosine_mean"] == pytest.approx(1)
    assert same["metrics_torch"] == same["metrics_onnx"] and set(same["metric_delta"].values()) == {0.0}
    assert SPEC.metric_drop("ndcg@10", same) == 0
    nudged = SPEC.scores(reference + rng.normal(scale=0.01, size=reference.shape))
    near = SPEC.compare(None, reference, nudged, targets)
    assert 0.99 < near["cosine_min"] < 1 and near["cosine_min"] <= near["cosine_mean"] < 1
    assert 0 < near["mean_abs_diff"] <= near["max_abs_diff"]
    assert SPEC.metric_drop("ndcg@10", near) == pytest.approx(-near["metric_delta"]["ndcg@10"])


def test_pooling_is_read_from_sentence_transformers_files_and_written_back(tmp_path):
    from core.tasks.embedding import pooling_files, read_pooling, text_id

    assert read_pooling(tmp_path) is None  # a plain transformers directory
    for relative, content in pooling_files("cls", 8).items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(json.dumps(content))
    assert read_pooling(tmp_path) == "cls"
    config = json.loads((tmp_path / "1_Pooling" / "config.json").read_text())
    config.update(pooling_mode_cls_token=False, pooling_mode_mean_sqrt_len_tokens=True)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not one of mean, cls, max"):
        read_pooling(tmp_path)
    assert text_id("cp copies files") == text_id("cp copies files") != text_id("cp copies file")


def test_the_model_reads_positives_as_second_texts_and_runs_each_text_alone():
    texts, seconds = SPEC.judged_inputs(["q0", "q1"], None, SPEC.to_targets(["d0", "d1"], None))
    assert list(texts) == ["q0", "q1"] and seconds == ["d0", "d1"]


def test_average_precision_is_scikit_learns_on_a_strict_ranking():
    from sklearn.metrics import average_precision_score

    from core.tasks.embedding import average_precision, ranked

    rng = np.random.default_rng(0)
    similarity = rng.random((40, 12))
    relevance = (rng.random((40, 12)) < 0.25).astype(np.int64)
    relevance[np.arange(40), rng.integers(0, 12, 40)] = 1  # every query has one
    ranks = ranked(similarity)
    strict = (12 - ranks).astype(np.float64)
    expected = [average_precision_score(r, s) for r, s in zip(relevance, strict)]
    np.testing.assert_allclose(average_precision(relevance, ranks), expected, rtol=1e-12)


def test_resampled_queries_give_the_split_figures_when_every_query_is_drawn_once():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(50, 2, 16))
    vectors[:, 1] += vectors[:, 0]
    targets = [f"doc {i % 45}" for i in range(50)]
    spec = EmbeddingSpec()
    expected = spec.evaluate(targets, vectors).metrics
    once = spec.resampled(targets, vectors)(np.arange(50)[None])
    assert {k: once[k][0] for k in expected} == pytest.approx(expected, abs=1e-12)
    assert set(spec.assess(targets, vectors).intervals) == set(expected)
