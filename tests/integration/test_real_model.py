"""The real bundled all-MiniLM-L6-v2 on real movie-review sentences."""

from pathlib import Path

import pytest

from core.manifest import read_manifest
from training.config import load_config
from training.train import train

CONFIG = Path(__file__).parents[2] / "configs" / "sentiment-lora.yaml"


@pytest.mark.slow
def test_lora_on_600_movie_sentences_beats_the_majority_baseline(tmp_path):
    cfg = load_config(CONFIG, [
        "data.max_train_examples=600", "data.max_eval_examples=300", "train.epochs=1", "train.batch_size=16",
        "train.lr=1e-3", f"output_dir={tmp_path / 'run'}",
    ])
    result = train(cfg)
    test = result.metrics["test"]
    majority = result.baselines["majority"]["accuracy"]
    assert result.test.n == 300
    assert test["accuracy"] >= majority + 0.15, (test, result.baselines)
    assert test["roc_auc"] >= 0.8
    manifest = read_manifest(result.artifact_dir)
    assert manifest.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert manifest.trainable_parameters < 0.05 * manifest.total_parameters
    assert (result.artifact_dir / "adapter" / "adapter_model.safetensors").is_file()
