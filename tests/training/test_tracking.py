"""Experiment tracking (train.report_to): the logs, read back with each tracker's own reader, hold the manifest's values."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from core.errors import ConfigError
from core.manifest import read_manifest
from tests.conftest import torchrun_train
from training.recipe import checkpoint as checkpoint_module
from training.config import load_config
from training.recipe.tracking import RunLabels, create_parent_run, flatten
from training.run import train


@pytest.fixture(autouse=True)
def _no_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store: under the output directory


def _f32(value: float) -> float:
    return float(np.float32(value))  # tensorboard stores scalars as float32


def test_tensorboard_and_mlflow_hold_the_manifests_values(base_config):
    from mlflow import MlflowClient
    from tbparse import SummaryReader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base_config["train"].update(epochs=1, eval_every=5, report_to=["tensorboard", "mlflow"])
    result = train(load_config(raw=base_config))
    output_dir = Path(base_config["output_dir"])
    manifest = read_manifest(result.artifact_dir)
    history, tracking = manifest.training.history, manifest.training.tracking
    assert [v["step"] for v in history["validation"]] == [5, 10, 15]
    expected_params = {**flatten(manifest.provenance.config), "train.lr": manifest.training.lr}
    assert expected_params["train.report_to"] == '["tensorboard", "mlflow"]' and expected_params["name"] == "null"
    final = {**{f"test/{k}": v for k, v in manifest.metrics["test"].items()},
             **{f"baseline/{b}/{k}": v for b, m in manifest.baselines.items() for k, v in m.items()}}
    assert "test/accuracy" in final and "baseline/majority/accuracy" in final

    # tensorboard: its event files under OUTPUT_DIR/logs
    assert tracking["tensorboard"] == "logs/run"
    reader = SummaryReader(str(output_dir / tracking["tensorboard"]))
    scalars = {(row.tag, row.step): row.value for row in reader.scalars.itertuples()}
    for entry in history["train_loss"]:  # every optimizer step
        assert scalars["train/loss", entry["step"]] == _f32(entry["loss"])
        assert scalars["train/lr", entry["step"]] == _f32(entry["lr"])
    assert sorted(step for tag, step in scalars if tag == "train/loss") == list(range(1, manifest.training.steps + 1))
    for evaluation in history["validation"]:
        for name in manifest.metrics["validation"]:
            assert scalars[f"validation/{name}", evaluation["step"]] == _f32(evaluation[name])
    for tag, value in final.items():
        assert scalars[tag, manifest.training.steps] == _f32(value)
    hparams = dict(zip(reader.hparams.tag, reader.hparams.value))
    assert hparams == {k: float(v) if isinstance(v, (bool, int, float)) else v for k, v in expected_params.items()}
    images = EventAccumulator(str(output_dir / tracking["tensorboard"]), size_guidance={"images": 0})
    plots = sorted((result.artifact_dir / "report").glob("*.png"))
    assert {p.stem for p in plots} == {"curves", "confusion_matrix", "reliability"}
    assert set(images.Reload().Tags()["images"]) == {f"report/{p.stem}" for p in plots}

    # MLflow: the SQLite store under OUTPUT_DIR, values as doubles
    record = tracking["mlflow"]
    assert record["tracking_uri"] == f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"
    client = MlflowClient(record["tracking_uri"])
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "run"
    assert run.data.params == {k: str(v) for k, v in expected_params.items()}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [
        (e["step"], e["loss"]) for e in history["train_loss"]]
    for name in manifest.metrics["validation"]:
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"validation/{name}")] == [
            (v["step"], v[name]) for v in history["validation"]]
        assert run.data.metrics[f"best_validation/{name}"] == manifest.metrics["validation"][name]
    assert {k: run.data.metrics[k] for k in final} == final
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "report")) == [f"report/{p.name}" for p in plots]
    copy = client.download_artifacts(run.info.run_id, "manifest.json", str(output_dir / "downloaded"))
    assert json.loads(Path(copy).read_text()) == json.loads((result.artifact_dir / "manifest.json").read_text())
    assert (output_dir / "mlartifacts").is_dir()


def wandb_records(path: Path):
    """The records of a wandb run file (``run-ID.wandb``), decoded with wandb's own protobuf schema.

    The file is a 7-byte header (``:W&B``, magic, version) and then LevelDB's log format: 32 KiB blocks of
    chunks, each with a 7-byte header (CRC, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4), holding one
    ``wandb_internal_pb2.Record`` per record. (wandb 0.31 reads it in its Go core only.)
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, offset, pending = 32768, 7, b""
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        pending += data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def trackio_run(store: Path, project: str, run: str) -> dict:
    """A trackio run's logs and config, read by trackio's own storage in a process whose ``TRACKIO_DIR`` is
    ``store`` (trackio fixes its directory at import)."""
    reader = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
              "print(json.dumps({'logs': S.get_logs(sys.argv[1], sys.argv[2]), "
              "'config': S.get_run_config(sys.argv[1], sys.argv[2])}))")
    done = subprocess.run([sys.executable, "-c", reader, project, run], capture_output=True, text=True, check=True,
                          env=dict(os.environ, TRACKIO_DIR=str(store)))
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_wandb_and_trackio_offline_hold_the_manifests_values(base_config, tmp_path):
    base_config["train"].update(epochs=1, eval_every=5, report_to=["wandb", "trackio"])
    path = tmp_path / "sentiment.yaml"  # the run is named by its config file
    path.write_text(yaml.safe_dump(base_config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "TRACKIO_"))}
    done = subprocess.run([sys.executable, "-m", "training.cli", "train", str(path)], capture_output=True, text=True,
                          env=dict(env, TRACKIO_DIR=str(tmp_path / "trackio")), timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    output_dir = Path(base_config["output_dir"])
    manifest = read_manifest(output_dir / "artifact")
    history, tracking, steps = manifest.training.history, manifest.training.tracking, manifest.training.steps
    expected_params = {**flatten(manifest.provenance.config), "train.lr": manifest.training.lr}
    final = {**{f"test/{k}": v for k, v in manifest.metrics["test"].items()},
             **{f"baseline/{b}/{k}": v for b, m in manifest.baselines.items() for k, v in m.items()}}
    plots = sorted(p.stem for p in (output_dir / "artifact" / "report").glob("*.png"))
    assert plots == ["confusion_matrix", "curves", "reliability"]

    def by_step(rows: list[dict]) -> dict[int, dict]:
        merged: dict[int, dict] = {}
        for row in rows:
            merged.setdefault(int(row["step"]), {}).update(row)
        return merged

    def check(logged: dict[int, dict]) -> None:
        for entry in history["train_loss"]:
            assert (logged[entry["step"]]["train/loss"], logged[entry["step"]]["train/lr"]) == (entry["loss"], entry["lr"])
        for evaluation in history["validation"]:
            for name in manifest.metrics["validation"]:
                assert logged[evaluation["step"]][f"validation/{name}"] == evaluation[name]
        assert {k: logged[steps][k] for k in final} == final
        assert sorted(k.split("/")[1] for k in logged[steps] if k.startswith("report/")) == plots

    # wandb: offline by default, its run file under OUTPUT_DIR/wandb
    record = tracking["wandb"]
    assert record["mode"] == "offline" and record["project"] == "sentiment"
    run_file, = output_dir.glob(f"wandb/offline-run-*-{record['run_id']}/run-{record['run_id']}.wandb")
    records = {}
    for r in wandb_records(run_file):
        records.setdefault(r.WhichOneof("record_type"), []).append(r)
    run, = records["run"]
    assert (run.run.run_id, run.run.project, run.run.display_name) == (record["run_id"], "sentiment", "sentiment")
    config = {item.key: json.loads(item.value_json) for r in records["config"] for item in r.config.update}
    assert {k: config[k] for k in expected_params} == expected_params
    logged = by_step([{"step": r.history.step.num,
                       **{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}}
                      for r in records["history"]])
    check({step: {("/".join(k.split("/")[:2]) if k.startswith("report/") else k): v for k, v in row.items()}
           for step, row in logged.items()})
    for name in plots:
        image, = logged[steps][f"report/{name}/filenames"]
        assert (run_file.parent / "files" / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert records["exit"][0].exit.exit_code == 0

    # trackio: its local store (TRACKIO_DIR), project and run named as the manifest says
    assert tracking["trackio"] == {"project": "sentiment", "run_name": "sentiment"}
    stored = trackio_run(tmp_path / "trackio", "sentiment", "sentiment")
    assert {k: stored["config"][k] for k in expected_params} == expected_params
    check(by_step(stored["logs"]))
    for name in plots:
        media = stored["logs"][-1][f"report/{name}"]
        assert media["_type"] == "trackio.image"
        assert (tmp_path / "trackio" / "media" / media["file_path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_report_to_nothing_is_logged(base_config):
    base_config["train"]["epochs"] = 1
    result = train(load_config(raw=base_config))
    output_dir = Path(base_config["output_dir"])
    assert read_manifest(result.artifact_dir).training.tracking == {}
    assert not {"logs", "mlflow.db", "mlartifacts", "mlruns", "wandb"} & {p.name for p in output_dir.iterdir()}


def test_trials_are_child_runs_and_a_failed_trial_leaves_the_next_one_a_clean_start(base_config, tmp_path,
                                                                                    monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # a store named by the user keeps MLflow's own artifact default: ./mlruns
    store = f"sqlite:///{tmp_path / 'study.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # one store for the whole search
    parent = create_parent_run(tmp_path / "study", "sentiment-search", "search")
    base_config["train"].update(epochs=1, report_to=["mlflow", "wandb"])

    def trial(number: int) -> tuple:
        raw = dict(base_config, output_dir=str(tmp_path / f"trial-{number}"))
        return load_config(raw=raw), RunLabels(experiment="sentiment-search", run_name=f"trial-{number}",
                                              parent_run_id=parent, tags={"optuna.trial": str(number)})

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash in trial 0")

    real_save = checkpoint_module.save_checkpoint
    monkeypatch.setattr("training.recipe.loop.save_checkpoint", crash)
    cfg, labels = trial(0)
    cfg.train.save_every = 1  # crash at the first optimizer step
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, labels=labels)
    assert os.environ["MLFLOW_TRACKING_URI"] == store
    monkeypatch.setattr("training.recipe.loop.save_checkpoint", real_save)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # now the trial names its store itself
    cfg, labels = trial(1)
    labels.mlflow_tracking_uri = store
    result = train(cfg, labels=labels)
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the process's MLflow set-up is given back
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("sentiment-search")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"search", "trial-0", "trial-1"}
    assert runs["trial-0"].info.status == "FAILED" and runs["trial-1"].info.status == "FINISHED"
    for name in ("trial-0", "trial-1"):
        assert runs[name].data.tags["mlflow.parentRunId"] == parent
    assert runs["trial-1"].data.tags["optuna.trial"] == "1"
    assert runs["trial-1"].data.metrics["test/f1_macro"] == result.metrics["test"]["f1_macro"]
    assert read_manifest(result.artifact_dir).training.tracking["mlflow"]["run_id"] == runs["trial-1"].info.run_id
    for number, exit_code in ((0, 1), (1, 0)):  # wandb: the crashed run ends with exit code 1
        run_file, = (tmp_path / f"trial-{number}").glob("wandb/offline-run-*/run-*.wandb")
        exits = [r.exit.exit_code for r in wandb_records(run_file) if r.WhichOneof("record_type") == "exit"]
        assert exits == [exit_code]
    assert not (tmp_path / "trial-1" / "mlflow.db").exists()
    assert (tmp_path / "mlruns").is_dir()


@pytest.mark.parametrize("value, message", [
    (["tensorbord"], (r"'train.report_to': unknown tracker\(s\) \['tensorbord'\]; accepted: tensorboard, mlflow, "
                      r"wandb, trackio")),
    ("comet", r"'train.report_to': unknown tracker\(s\) \['comet'\]"),
    (3, "'train.report_to'"),
])
def test_an_unknown_tracker_is_a_config_error_naming_the_field(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(raw={"data": {"train": "x"}, "train": {"report_to": value}})


def test_report_to_takes_one_name_or_a_list_without_repeats():
    assert load_config(raw={"data": {"train": "x"}, "train": {"report_to": "mlflow"}}).train.report_to == ["mlflow"]
    both = load_config(raw={"data": {"train": "x"}}, overrides=["train.report_to=[mlflow, tensorboard, mlflow]"])
    assert both.train.report_to == ["mlflow", "tensorboard"]
    assert load_config(raw={"data": {"train": "x"}}).train.report_to == []


def test_a_tracker_without_its_package_names_what_to_install(base_config, monkeypatch):
    monkeypatch.setattr("accelerate.utils.is_wandb_available", lambda: False)  # as where wandb is not installed
    base_config["train"]["report_to"] = ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match=r"train.report_to: wandb is not installed \(pip install wandb\)"):
        train(load_config(raw=base_config))
    assert not Path(base_config["output_dir"]).exists()  # refused before any work


@pytest.mark.slow
def test_under_torchrun_only_the_main_process_logs(tmp_path, base_config):
    from mlflow import MlflowClient
    from tbparse import SummaryReader

    base_config["train"].update(epochs=1, batch_size=8, report_to=["tensorboard", "mlflow"])
    done = torchrun_train(base_config, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    output_dir = Path(base_config["output_dir"])
    manifest = read_manifest(output_dir / "artifact")
    assert manifest.training.num_processes == 2 and manifest.training.steps == 15
    tracking = manifest.training.tracking
    scalars = SummaryReader(str(output_dir / tracking["tensorboard"])).scalars
    assert sorted(scalars[scalars.tag == "train/loss"].step) == list(range(1, 16))  # each step once: one writer
    client = MlflowClient(tracking["mlflow"]["tracking_uri"])
    runs = client.search_runs([tracking["mlflow"]["experiment_id"]])
    assert [r.info.run_id for r in runs] == [tracking["mlflow"]["run_id"]]
    assert runs[0].data.metrics["test/accuracy"] == manifest.metrics["test"]["accuracy"]
