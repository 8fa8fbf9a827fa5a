"""Sentence embeddings end to end on the tiny BERT: in-batch-negative training, retrieval metrics beside BM25 and the
untrained base model, the published pooling, and the ONNX export gated on retrieval and cosine."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import make_pairs, tiny_run_config, write_jsonl
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
