"""Two processes on the CPU (torchrun, gloo): DDP trains and the gathered metrics are exact."""

import json
import subprocess
import sys

import pytest

from core.manifest import read_manifest
from tests.conftest import torchrun_train
from tests.training.test_generation_train import pair_dir, tiny_llama  # noqa: F401 (fixtures)


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, tiny_model, data_dir):
    config = {
        "model": tiny_model, "method": "lora", "output_dir": str(tmp_path / "run"),
        # 60 test examples with eval batches of 16 do not split evenly over 2 processes:
        # gather_for_metrics must drop the samples DDP padding duplicated.
        "data": {"train": str(data_dir / "train.jsonl"), "validation": str(data_dir / "validation.jsonl"),
                 "test": str(data_dir / "test.jsonl")},
        "train": {"epochs": 1, "batch_size": 8, "eval_batch_size": 16, "max_length": 32},
        "export": {"onnx": False},
    }
    result = torchrun_train(config, tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    artifact = tmp_path / "run" / "artifact"
    manifest = read_manifest(artifact)
    assert manifest.training.num_processes == 2
    # 240 training examples, batch 8 per process, 2 processes -> 15 optimizer steps per epoch.
    assert manifest.training.steps_per_epoch == 15
    assert sum(row["support"] for row in manifest.per_class.values()) == 60

    out = tmp_path / "single.json"
    single = subprocess.run(
        [sys.executable, "-m", "training.cli", "evaluate", str(artifact), "--data", str(data_dir / "test.jsonl"),
         "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    report = json.loads(out.read_text())
    for name in ("accuracy", "f1_macro", "roc_auc", "log_loss"):
        assert report["metrics"][name] == pytest.approx(manifest.metrics["test"][name], abs=1e-5), name


@pytest.mark.slow
def test_torchrun_two_processes_fine_tune_a_language_model(tmp_path, tiny_llama, pair_dir):  # noqa: F811
    """Generation under DDP: the masked loss reduced over both processes, text written once, an artifact that
    PyTorch and the exported decoder agree on."""
    config = {
        "task": "generation", "model": tiny_llama, "method": "full", "output_dir": str(tmp_path / "run"),
        "data": {"train": str(pair_dir / "train.jsonl"), "validation": str(pair_dir / "validation.jsonl"),
                 "test": str(pair_dir / "test.jsonl"), "text": "input", "label": "target"},
        "train": {"epochs": 6, "batch_size": 8, "eval_batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0,
                  "max_length": 32},
        "generation": {"max_target_length": 8, "max_new_tokens": 6, "eval_examples": 8},
        "export": {"int8": "off"},
    }
    result = torchrun_train(config, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(tmp_path / "run" / "artifact")
    assert manifest.training.num_processes == 2
    # 160 training pairs, batch 8 per process, 2 processes -> 10 optimizer steps per epoch.
    assert manifest.training.steps_per_epoch == 10
    history = manifest.training.history["validation"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert manifest.metrics["test"]["rougeL"] > manifest.baselines["base_model"]["rougeL"] + 20
    assert manifest.export.parity["onnx"].output_agreement >= 0.95
