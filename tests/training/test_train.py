"""The training loop on a tiny model: learning, every task and method, the artifact, resume, failure."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from core.errors import TrainingError
from core.manifest import read_manifest
from tests.conftest import crash_after_first_checkpoint
from training.recipe.checkpoint import latest_checkpoint, list_checkpoints, read_state
from training.config import load_config
from training.inference import load_artifact, predict_scores
from training.run import train


def test_full_finetune_learns_and_publishes_a_complete_artifact(base_config):
    base_config["train"]["epochs"] = 3
    result = train(load_config(raw=base_config))
    art = result.artifact_dir
    assert result.metrics["test"]["accuracy"] >= 0.9  # the sentiment word decides the label
    assert result.metrics["test"]["accuracy"] > result.baselines["majority"]["accuracy"] + 0.3
    for name in ("manifest.json", "README.md", "model/model.safetensors", "model/config.json",
                 "model/tokenizer.json", "report/curves.png", "report/confusion_matrix.png"):
        assert (art / name).is_file(), name
    assert not list(art.rglob("*.bin")) and not list(art.rglob("*.pkl"))  # nothing to unpickle
    manifest = read_manifest(art)
    assert manifest.labels == ["negative", "positive"] and manifest.postprocess == "softmax"
    assert set(manifest.metrics) == {"validation", "test"} and set(manifest.baselines) == {"majority", "tfidf_logreg"}
    assert manifest.provenance.seed == 42 and "transformers" in manifest.provenance.packages
    assert manifest.provenance.config["method"] == "full" and manifest.provenance.data_hashes["train"].startswith("sha256:")
    assert "| accuracy |" in (art / "README.md").read_text()
    # The saved model reproduces the test metric the trainer reported.
    loaded = load_artifact(art)
    rows = [json.loads(line) for line in open(base_config["data"]["test"])]
    scores = predict_scores(loaded, [r["text"] for r in rows])
    accuracy = np.mean([manifest.labels[i] == r["label"] for i, r in zip(scores.argmax(1), rows)])
    assert accuracy == pytest.approx(result.metrics["test"]["accuracy"])


def test_lora_multilabel_saves_adapter_and_merged_model(base_config):
    base_config.update(task="multilabel", method="lora")
    base_config["data"]["label"] = "topics"
    base_config["train"]["epochs"] = 1
    result = train(load_config(raw=base_config))
    art = result.artifact_dir
    manifest = read_manifest(art)
    assert manifest.task.value == "multilabel" and manifest.postprocess == "sigmoid"
    # train.threshold auto: per-label thresholds and Platt scaling, both fitted on validation
    assert set(manifest.thresholds) == set(manifest.labels) and 0 < manifest.threshold < 1
    assert manifest.calibration.method == "platt" and set(manifest.calibration.after) == {"validation", "test"}
    assert (art / "report" / "reliability.png").is_file()
    assert {"f1_micro", "hamming_loss", "lrap", "ndcg"} <= set(manifest.metrics["test"])
    assert (art / "adapter" / "adapter_model.safetensors").is_file()
    heads = manifest.training.head_modules
    assert "classifier" in heads and len(set(heads)) == len(heads) and manifest.training.lora_target_modules
    merged = load_file(str(art / "model" / "model.safetensors"))
    assert not any("lora" in key for key in merged)  # merged: a plain transformers checkpoint
    assert manifest.trainable_parameters < manifest.total_parameters / 2


def test_calibration_is_fitted_on_the_best_evaluations_logits_without_another_validation_pass(base_config,
                                                                                                monkeypatch):
    """Two evaluations (one per epoch), then the test split: the calibration reuses the validation logits the best
    evaluation computed. (A resumed run whose best step came before the interruption computes them again; the resume
    tests check that it ends as an uninterrupted run does.)"""
    import training.recipe.loop

    passes = []
    real = training.recipe.loop.run_evaluation

    def counted(model, dataloader, accelerator, cfg, labels, loss_fn, desc, decisions=None):
        passes.append(desc)
        return real(model, dataloader, accelerator, cfg, labels, loss_fn, desc, decisions)

    monkeypatch.setattr(training.recipe.loop, "run_evaluation", counted)
    result = train(load_config(raw=base_config))
    assert passes == ["validation", "validation", "test"]
    manifest = read_manifest(result.artifact_dir)
    assert manifest.calibration.method == "temperature" and set(manifest.calibration.after) == {"validation", "test"}


def test_adapter_reload_matches_merged_model(base_config):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base_config.update(method="lora")
    base_config["train"]["epochs"] = 1
    art = train(load_config(raw=base_config)).artifact_dir
    manifest = read_manifest(art)
    base = AutoModelForSequenceClassification.from_pretrained(
        base_config["model"], num_labels=2, id2label=dict(enumerate(manifest.labels)),
        label2id={n: i for i, n in enumerate(manifest.labels)})
    adapted = PeftModel.from_pretrained(base, art / "adapter").eval()
    merged = load_artifact(art)
    texts = ["a great plot", "dull acting and the music was awful", "honestly quite superb"]
    batch = merged.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(adapted(**batch).logits, merged.model(**batch).logits, atol=1e-4)


def test_regression_with_frozen_encoder(base_config):
    base_config.update(task="regression", method="freeze")
    base_config["data"]["label"] = "score"
    result = train(load_config(raw=base_config))
    manifest = read_manifest(result.artifact_dir)
    assert manifest.labels is None and manifest.postprocess == "identity"
    assert {"mse", "mae", "r2", "pearson", "spearman"} <= set(manifest.metrics["test"])
    assert set(manifest.baselines) == {"mean", "tfidf_ridge"}
    assert (result.artifact_dir / "report" / "predicted_vs_true.png").is_file()
    head = sum(p for p in [manifest.trainable_parameters])
    assert head < 0.01 * manifest.total_parameters  # only the pooler and the head train


def test_freeze_bottom_layers_only(base_config):
    from training.recipe.modeling import build_model

    base_config.update(method="freeze", freeze={"layers": 1})
    built = build_model(load_config(raw=base_config), ["negative", "positive"])
    trainable = {n for n, p in built.model.named_parameters() if p.requires_grad}
    assert any(".layer.1." in n for n in trainable) and not any(".layer.0." in n for n in trainable)
    assert not any("embeddings" in n for n in trainable) and any(n.startswith("classifier") for n in trainable)


def test_early_stopping_and_checkpoint_pruning(base_config):
    base_config["train"].update(epochs=6, lr=1e-9, eval_every=5, save_every=5, keep_checkpoints=2,
                                early_stopping={"metric": "loss", "patience": 1})
    result = train(load_config(raw=base_config))
    manifest = read_manifest(result.artifact_dir)
    assert manifest.training.stopped_early is True
    assert manifest.training.epochs_run < 6
    assert len(list_checkpoints(base_config["output_dir"])) == 2


@pytest.mark.parametrize("save_every", ["epoch", 7], ids=["after-epoch-1", "mid-epoch"])
def test_resume_after_an_interruption_ends_like_an_uninterrupted_run(base_config, tmp_path, monkeypatch, save_every):
    base_config["train"]["save_every"] = save_every
    straight = dict(base_config, output_dir=str(tmp_path / "straight"))
    expected = train(load_config(raw=straight))

    interrupted = dict(base_config, output_dir=str(tmp_path / "interrupted"))
    crash_after_first_checkpoint(monkeypatch, load_config(raw=interrupted))
    assert not (tmp_path / "interrupted" / "artifact").exists()
    resumed = train(load_config(raw=interrupted), resume=True)

    assert resumed.metrics["test"] == pytest.approx(expected.metrics["test"], abs=1e-6)
    a = load_file(str(expected.artifact_dir / "model" / "model.safetensors"))
    b = load_file(str(resumed.artifact_dir / "model" / "model.safetensors"))
    assert all(np.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_non_finite_loss_stops_without_touching_the_previous_artifact(base_config, tmp_path):
    good = train(load_config(raw=base_config))
    before = (good.artifact_dir / "model" / "model.safetensors").read_bytes()
    rows = [dict(r, score=1e30) for r in map(json.loads, open(base_config["data"]["train"]))]
    path = tmp_path / "huge.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad = dict(base_config, task="regression")
    bad["data"] = dict(base_config["data"], train=str(path), label="score")
    with pytest.raises(TrainingError, match="loss became inf.*No artifact was published"):
        train(load_config(raw=bad), overwrite=True)
    assert (good.artifact_dir / "model" / "model.safetensors").read_bytes() == before
    assert read_manifest(good.artifact_dir).task.value == "classification"


def test_resume_without_checkpoint_is_a_clear_error(base_config):
    with pytest.raises(TrainingError, match="no checkpoint under"):
        train(load_config(raw=base_config), resume=True)


def test_a_fresh_run_never_mixes_with_an_earlier_runs_checkpoints(base_config):
    base_config["train"]["epochs"] = 1
    train(load_config(raw=base_config))
    with pytest.raises(TrainingError, match="pass --resume to continue it, or --overwrite"):
        train(load_config(raw=base_config))
    base_config["train"]["epochs"] = 2
    result = train(load_config(raw=base_config), overwrite=True)
    assert [p.name for p in list_checkpoints(base_config["output_dir"])] == ["step-00000015", "step-00000030"]
    assert read_manifest(result.artifact_dir).training.steps == 30


def test_overwrite_with_data_that_fails_its_checks_deletes_nothing(base_config, tmp_path):
    from core.errors import DataError
    from tests.conftest import make_rows, write_jsonl

    base_config["train"]["epochs"] = 1
    train(load_config(raw=base_config))
    before = [p.name for p in list_checkpoints(base_config["output_dir"])]
    rows = make_rows(240, seed=1)
    rows[3]["text"] = "\u200b"  # tokenizes to nothing
    bad = dict(base_config, data=dict(base_config["data"], train=str(write_jsonl(tmp_path / "bad.jsonl", rows))))
    with pytest.raises(DataError, match="tokenize to nothing"):
        train(load_config(raw=bad), overwrite=True)
    assert [p.name for p in list_checkpoints(base_config["output_dir"])] == before == ["step-00000015"]


def test_text_pairs_reach_the_model_as_segment_pairs(base_config, tmp_path):
    from tests.conftest import make_rows, write_jsonl

    def pairs(n, seed):
        rows = make_rows(n, seed)
        # The label depends on the second text only: a model that ignored it could not learn this.
        return [{"premise": "the reviewer wrote this", "hypothesis": r["text"], "label": r["label"]} for r in rows]

    files = {split: write_jsonl(tmp_path / f"{split}.jsonl", pairs(n, i))
             for i, (split, n) in enumerate([("train", 240), ("validation", 60), ("test", 60)])}
    base_config["data"] = {**{k: str(v) for k, v in files.items()}, "text": "premise", "text_pair": "hypothesis"}
    base_config["train"].update(epochs=6, early_stopping={"patience": None})
    result = train(load_config(raw=base_config))
    manifest = read_manifest(result.artifact_dir)
    assert manifest.text_fields == ["premise", "hypothesis"] and manifest.has_pair
    assert result.metrics["test"]["accuracy"] >= 0.9
    loaded = load_artifact(result.artifact_dir)
    scores = predict_scores(loaded, ["the reviewer wrote this"] * 2, ["superb and lovely", "dull and tedious"])
    assert [manifest.labels[i] for i in scores.argmax(1)] == ["positive", "negative"]


def _fingerprint(checkpoint) -> dict:
    return {p.relative_to(checkpoint).as_posix(): p.read_bytes() for p in sorted(checkpoint.rglob("*")) if p.is_file()}


def test_an_exception_mid_save_keeps_the_previous_checkpoint_and_resume_continues(base_config, monkeypatch):
    from accelerate import Accelerator

    base_config["train"].update(epochs=3, save_every="epoch", keep_checkpoints=3)
    real_save_state = Accelerator.save_state
    calls, snapshot = [], {}

    def fail_on_second_save(self, output_dir, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            snapshot.update(_fingerprint(latest_checkpoint(base_config["output_dir"])))
        real_save_state(self, output_dir, **kwargs)
        if len(calls) == 2:  # the files are written, the checkpoint is not yet complete
            raise OSError("disk full (simulated) while saving a checkpoint")

    monkeypatch.setattr(Accelerator, "save_state", fail_on_second_save)
    with pytest.raises(OSError, match="disk full"):
        train(load_config(raw=base_config))
    saved = list_checkpoints(base_config["output_dir"])
    assert [p.name for p in saved] == ["step-00000015"]  # epoch 1; the half-written epoch-2 save is not one
    assert _fingerprint(saved[0]) == snapshot  # byte for byte as it was before the failed save began
    monkeypatch.setattr(Accelerator, "save_state", real_save_state)
    resumed = train(load_config(raw=base_config), resume=True)
    assert read_manifest(resumed.artifact_dir).training.steps == 45
    assert [p.name for p in list_checkpoints(base_config["output_dir"])][-1] == "step-00000045"
    assert not any(p.name.startswith(".tmp") for p in (Path(base_config["output_dir"]) / "checkpoints").iterdir())


KILL_DURING_SECOND_SAVE = """
import os, signal, sys
from accelerate import Accelerator
real = Accelerator.save_state
calls = []
def save_state(self, output_dir, **kwargs):
    calls.append(output_dir)
    if len(calls) == 2:
        real(self, output_dir, **kwargs)  # model and optimizer files written, state file and rename not yet
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, output_dir, **kwargs)
Accelerator.save_state = save_state
from training.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_a_checkpoint_save_loses_nothing(base_config, tmp_path):
    import subprocess
    import sys

    import yaml

    base_config["train"].update(epochs=3, save_every="epoch", keep_checkpoints=3)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(base_config))
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SECOND_SAVE, "train", str(config)],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    root = Path(base_config["output_dir"]) / "checkpoints"
    assert [p.name for p in list_checkpoints(base_config["output_dir"])] == ["step-00000015"]
    assert any(p.name.startswith(".tmp-step-") for p in root.iterdir())  # the interrupted save, ignored
    state = read_state(root / "step-00000015")
    assert state.step == 15
    resumed = subprocess.run([sys.executable, "-m", "training.cli", "train", str(config), "--resume"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert read_manifest(Path(base_config["output_dir"]) / "artifact").training.steps == 45


def test_two_runs_with_the_same_seed_give_identical_weights(base_config, tmp_path):
    import hashlib

    hashes = []
    for name in ("a", "b"):
        result = train(load_config(raw=dict(base_config, output_dir=str(tmp_path / name))))
        hashes.append(hashlib.sha256((result.artifact_dir / "model" / "model.safetensors").read_bytes()).hexdigest())
    assert hashes[0] == hashes[1]
    assert read_manifest(result.artifact_dir).provenance.determinism["seed"] == base_config["train"].get("seed", 42)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_head_lr_gives_the_head_and_pooler_their_own_rate(base_config, method):
    from training.recipe.modeling import build_model, optimizer_groups

    base_config.update(method=method)
    built = build_model(load_config(raw=base_config), ["negative", "positive"])
    names = {id(p): n for n, p in built.model.named_parameters()}
    groups = optimizer_groups(built.model, 0.01, built.head_modules, head_lr=1e-4)
    head = {names[id(p)] for g in groups if g.get("lr") == 1e-4 for p in g["params"]}
    rest = {names[id(p)] for g in groups if "lr" not in g for p in g["params"]}
    assert head and all(".classifier." in f".{n}" or ".pooler." in n for n in head)
    assert not any(".classifier." in f".{n}" or ".pooler." in n for n in rest)
    assert head | rest == {n for n, p in built.model.named_parameters() if p.requires_grad}
    assert all(g["weight_decay"] == 0.0 for g in groups if all(p.ndim < 2 for p in g["params"]))
    # Without head_lr every trainable parameter takes the optimizer's rate.
    assert all("lr" not in g for g in optimizer_groups(built.model, 0.01, built.head_modules))
