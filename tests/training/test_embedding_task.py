"""Sentence embeddings end to end on the tiny BERT: in-batch-negative training, retrieval metrics beside BM25 and the
untrained base model, the published pooling, and the ONNX export gated on retrieval and cosine."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import make_pairs, tiny_run_config, with_hard_negatives, write_jsonl
from core.errors import ConfigError
from core.manifest import read_manifest
from core.tasks import Task
from core.tasks.embedding import read_pooling
from training.config import load_config
from training.run import train

@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pairs")
    for name, n, seed in (("train", 320, 1), ("validation", 60, 2), ("test", 60, 3)):
        write_jsonl(directory / f"{name}.jsonl", make_pairs(n, seed))
    return directory


def _config(tiny_model, pairs_dir, tmp_path, method="full", **train):
    raw = tiny_run_config(tiny_model, pairs_dir, tmp_path / "run", task="embedding", method=method)
    raw["train"].update({"epochs": 4, "batch_size": 32, "lr": 1e-3, **train})
    raw["export"] = {"onnx": True}
    return load_config(raw=raw)


def test_the_task_reads_query_and_positive_columns_by_default(tiny_model, pairs_dir, tmp_path):
    cfg = _config(tiny_model, pairs_dir, tmp_path)
    assert cfg.task == Task.EMBEDDING and (cfg.data.text, cfg.data.label) == ("query", "positive")
    assert cfg.primary_metric == "ndcg@10" and cfg.loss_options == {"scale": 20.0}
    with pytest.raises(ConfigError, match=r"embedding\.\* only applies to task: embedding"):
        load_config(raw={**tiny_run_config(tiny_model, pairs_dir, tmp_path), "embedding": {"scale": 10}})


def test_a_blank_positive_is_named_by_file_row_and_column(tiny_model, pairs_dir, tmp_path):
    from core.errors import DataError
    from training.data.reading import load_dataset

    rows = make_pairs(40, 9)
    rows[6]["positive"] = "  "
    write_jsonl(tmp_path / "bad.jsonl", rows)
    cfg = _config(tiny_model, pairs_dir, tmp_path)
    cfg.data.train = str(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match=r"bad.jsonl.*(row|line) 7.*positive"):
        load_dataset(cfg.data, cfg.task, 0)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_training_beats_the_untrained_model_and_the_export_keeps_retrieval(tiny_model, pairs_dir, tmp_path, method):
    result = train(_config(tiny_model, pairs_dir, tmp_path, method, lr=1e-3 if method == "full" else 5e-3))
    test, baselines = result.metrics["test"], result.baselines
    assert set(baselines) == {"base_model", "bm25"} and set(test) >= {"ndcg@10", "mrr@10", "recall@1", "recall@10", "map"}
    # The random tiny BERT ranks little; in-batch negatives teach it which words matter.
    assert test["ndcg@10"] > baselines["base_model"]["ndcg@10"] + 0.1
    manifest = read_manifest(result.artifact_dir)
    assert manifest.task == Task.EMBEDDING and manifest.labels is None
    assert read_pooling(result.artifact_dir / "model") == "mean"  # the published model says how it pools
    fp32 = manifest.export.variant("onnx")
    assert fp32.parity.cosine_min >= 0.999 and abs(fp32.parity.metric_delta["ndcg@10"]) <= 0.005
    assert fp32.parity.batch_invariance.max_abs_diff < 1e-5
    int8 = manifest.export.variant("onnx-int8")
    if int8 is not None:
        assert -int8.parity.metric_delta["ndcg@10"] <= 0.005
    sample = manifest.export.selftest[0]
    assert len(sample.scores) == 32 and np.linalg.norm(sample.scores) == pytest.approx(1, abs=1e-5)
    assert (result.artifact_dir / "report" / "metrics_vs_baselines.png").is_file()
    assert json.loads((result.artifact_dir / "model" / "modules.json").read_text())[1]["path"] == "1_Pooling"


@pytest.fixture(scope="module")
def triplets_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("triplets")
    for name, n, seed in (("train", 320, 1), ("validation", 60, 2), ("test", 60, 3)):
        write_jsonl(directory / f"{name}.jsonl", with_hard_negatives(make_pairs(n, seed), seed))
    return directory


def test_hard_negatives_are_wrong_answers_for_every_query_unless_they_are_its_positive():
    import torch
    import torch.nn.functional as F

    from training.recipe.sentence_embedder import ranking_loss

    torch.manual_seed(0)
    vectors = F.normalize(torch.randn(3, 3, 8), dim=-1)  # (query, positive, negative) for 3 examples
    ids = torch.tensor([[1, 10], [2, 20], [3, 30]])
    loss = ranking_loss(20.0)
    documents = torch.cat([vectors[:, 1], vectors[:, 2]])
    expected = F.cross_entropy(20.0 * vectors[:, 0] @ documents.T, torch.arange(3))
    assert float(loss(vectors, ids)) == pytest.approx(float(expected), rel=1e-6)
    assert float(loss(vectors, ids)) > float(loss(vectors[:, :2], ids[:, 0]))  # more wrong answers, higher loss
    # Example 1's negative is example 0's positive text: no wrong answer for example 0, still one for the others.
    same = ids.clone()
    same[1, 1] = 1
    logits = 20.0 * vectors[:, 0] @ documents.T
    logits[0, 4] = torch.finfo(logits.dtype).min
    assert float(loss(vectors, same)) == pytest.approx(float(F.cross_entropy(logits, torch.arange(3))), rel=1e-6)


def test_a_batch_with_hard_negatives_embeds_them_apart_for_the_loss(tiny_model, triplets_dir, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from core.encoding import Encoder
    from service.sentence_embedder import SentenceEmbedder
    from training.data.reading import load_dataset
    from training.recipe.batching import Collator, encode_split

    raw = tiny_run_config(tiny_model, triplets_dir, tmp_path / "run", task="embedding")
    raw["data"]["negative"] = "negative"
    cfg = load_config(raw=raw)
    data = load_dataset(cfg.data, cfg.task, 0)
    assert data.train.negatives is not None and len(data.train.negatives) == len(data.train) == 320
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    split = data.validation
    encoded = encode_split(Encoder(tokenizer, 32, 8), cfg.task, split.texts, split.pairs, split.targets, None,
                           desc="validation", disable=True, negatives=split.negatives)
    batch = Collator(tokenizer, cfg.task)([encoded[i] for i in range(8)])
    assert batch["labels"].shape == (8, 2) and batch["negative_input_ids"].shape[0] == 8
    # each text padded to its own longest: the negatives' width is theirs, not the queries'
    assert batch["negative_attention_mask"][:, -1].any() and batch["attention_mask"][:, -1].any()
    model = SentenceEmbedder(AutoModel.from_pretrained(tiny_model), "mean").eval()
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert logits.shape == (8, 3, 32)
    alone = model(input_ids=batch["negative_input_ids"], attention_mask=batch["negative_attention_mask"]).logits
    assert np.allclose(logits[:, 2].detach().numpy(), alone.detach().numpy(), atol=1e-6)
    # evaluation ranks the split's positives, hard negatives or not
    spec = cfg.task.spec
    with_negatives = spec.evaluate(batch["labels"].numpy(), logits.detach().numpy())
    without = spec.evaluate(batch["labels"][:, 0].numpy(), logits[:, :2].detach().numpy())
    assert with_negatives.metrics == without.metrics


def test_training_with_hard_negatives_beats_the_untrained_model(tiny_model, triplets_dir, tmp_path):
    raw = tiny_run_config(tiny_model, triplets_dir, tmp_path / "run", task="embedding")
    raw["data"]["negative"] = "negative"
    raw["train"].update({"epochs": 4, "batch_size": 32, "lr": 1e-3})
    result = train(load_config(raw=raw))
    assert result.metrics["test"]["ndcg@10"] > result.baselines["base_model"]["ndcg@10"] + 0.1
    assert read_manifest(result.artifact_dir).provenance.config["data"]["negative"] == "negative"


@pytest.mark.parametrize(("change", "error", "message"), [
    ({"task": "classification"}, "ConfigError", r"data\.negative only applies to task: embedding"),
    ({"negative": "hard"}, "DataError", r"column 'hard' not found.*data\.negative names the negative column"),
    ({"blank_row": 5}, "DataError", r"train\.jsonl.*row 5, column 'negative': empty text"),
])
def test_hard_negative_mistakes_name_the_key_or_the_row(tiny_model, triplets_dir, tmp_path, change, error, message):
    import core.errors
    from training.data.reading import load_dataset

    rows = with_hard_negatives(make_pairs(40, 9), 9)
    if "blank_row" in change:
        rows[change["blank_row"] - 1]["negative"] = " "
    directory = tmp_path / "data"
    for name in ("train", "validation", "test"):
        write_jsonl(directory / f"{name}.jsonl", rows)
    raw = tiny_run_config(tiny_model, directory, tmp_path / "run", task=change.get("task", "embedding"))
    raw["data"]["negative"] = change.get("negative", "negative")
    with pytest.raises(getattr(core.errors, error), match=message):
        cfg = load_config(raw=raw)
        load_dataset(cfg.data, cfg.task, 0)



def test_a_corpus_file_adds_documents_every_held_out_query_ranks(tiny_model, pairs_dir, tmp_path):
    """The same run with 150 more documents (one of them a test positive again) in data.corpus: the model and
    BM25 rank more distractors, so neither can rank better; both are told the same corpus."""
    from core.tasks.embedding import EmbeddingSpec

    documents = [{"text": row["positive"]} for row in make_pairs(150, 11)]
    documents.append({"text": [json.loads(line) for line in (pairs_dir / "test.jsonl").open()][0]["positive"]})
    write_jsonl(tmp_path / "corpus.jsonl", documents)
    runs = {}
    for name, corpus in (("alone", None), ("corpus", str(tmp_path / "corpus.jsonl"))):
        raw = tiny_run_config(tiny_model, pairs_dir, tmp_path / name, task="embedding")
        raw["train"].update({"epochs": 2, "batch_size": 32, "lr": 1e-3})
        if corpus:
            raw["data"]["corpus"] = corpus
        runs[name] = train(load_config(raw=raw))
    alone, widened = runs["alone"], runs["corpus"]
    assert widened.metrics["test"]["ndcg@10"] <= alone.metrics["test"]["ndcg@10"]
    assert widened.baselines["bm25"]["ndcg@10"] < alone.baselines["bm25"]["ndcg@10"]
    assert widened.baselines["base_model"]["ndcg@10"] < alone.baselines["base_model"]["ndcg@10"]
    # what evaluate does with documents: a document equal to a positive is that positive, the rest are appended
    spec = EmbeddingSpec()
    vectors = np.eye(3)[[[0, 0], [1, 1]]]  # two queries, each its own positive's direction
    documents = (["b-doc", spec.training_key("x")], np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    result = spec.evaluate(np.array(["a-doc", "b-doc"]), vectors, documents=documents)
    assert result.notes == ["corpus of 3 documents: 2 positives and 1 more from data.corpus"]
    assert result.metrics["recall@1"] == 1.0


@pytest.mark.parametrize(("change", "error", "message"), [
    ({"task": "classification"}, "ConfigError", r"data\.corpus only applies to task: embedding"),
    ({"corpus_text": "body"}, "DataError", r"data\.corpus .*column 'body' not found.*data\.corpus_text names"),
    ({"blank": True}, "DataError", r"data\.corpus .*row 3, column 'text'"),
])
def test_corpus_mistakes_name_the_key_or_the_row(tiny_model, pairs_dir, tmp_path, change, error, message):
    import core.errors
    from training.data.reading import load_dataset

    documents = [{"text": "a document"}, {"text": "another one"}, {"text": " " if change.get("blank") else "third"}]
    write_jsonl(tmp_path / "corpus.jsonl", documents)
    raw = tiny_run_config(tiny_model, pairs_dir, tmp_path / "run", task=change.get("task", "embedding"))
    raw["data"].update(corpus=str(tmp_path / "corpus.jsonl"), corpus_text=change.get("corpus_text", "text"))
    with pytest.raises(getattr(core.errors, error), match=message):
        cfg = load_config(raw=raw)
        load_dataset(cfg.data, cfg.task, 0)
