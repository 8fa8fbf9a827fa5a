"""Hyperparameter search (`tuneserve tune`) on the tiny model: the search section, trials judged on validation
only, pruning, failed trials, resuming, two workers on a real PostgreSQL server, and the best run's artifact."""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml

from core.errors import ConfigError
from core.manifest import read_manifest
from training.recipe import loop as train_module
from training.cli import main
from training.config import load_config
from training.search import BEST_CONFIG, HISTORY_PLOT, IMPORTANCE_PLOT, open_storage, run_search

COMPLETE, PRUNED, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL


@pytest.fixture
def search_config(base_config) -> dict:
    """Two quick epochs per trial, learning rate and epochs searched."""
    base_config["train"].update(epochs=2, batch_size=32)
    base_config["search"] = {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}, "train.epochs": {"low": 1, "high": 2}}
    return base_config


@pytest.fixture
def evaluated_splits(monkeypatch) -> list[str]:
    """The splits the training loop scores (the real evaluation runs; its description is recorded)."""
    seen = []
    real = train_module.run_evaluation

    def recording(model, dataloader, accelerator, cfg, labels, loss_fn, desc, *args, **kwargs):
        seen.append(desc)
        return real(model, dataloader, accelerator, cfg, labels, loss_fn, desc, *args, **kwargs)

    monkeypatch.setattr(train_module, "run_evaluation", recording)
    return seen


# -- the search section -----------------------------------------------------------------------------------

def test_a_search_space_keeps_integers_and_leaves_train_alone(search_config):
    search_config["search"]["lora.r"] = {"choices": [4, 8]}
    cfg = load_config(raw=search_config)
    assert [cfg.search_kind(p) for p in cfg.search] == ["float", "int", "choices"]
    assert isinstance(cfg.search["train.epochs"].low, int) and cfg.search["lora.r"].choices == [4, 8]
    # A float field given integer bounds still draws floats.
    assert load_config(raw={**search_config, "search": {"train.weight_decay": {"low": 0, "high": 1}}}
                       ).search_kind("train.weight_decay") == "float"
    # What train runs is the config without its search section.
    without = {k: v for k, v in search_config.items() if k != "search"}
    assert cfg.model_dump(exclude={"search"}) == load_config(raw=without).model_dump(exclude={"search"})


@pytest.mark.parametrize("search, message", [
    ({"train.lrr": {"low": 1e-4, "high": 1e-3}}, r"'search.train.lrr': unknown config key 'train.lrr'"),
    ({"trian.lr": {"low": 1e-4, "high": 1e-3}}, r"'search.trian.lr': unknown config key 'trian'"),
    ({"train": {"low": 1, "high": 2}}, r"'search.train': train is a section"),
    ({"train.epochs": {"low": 0, "high": 3}}, r"'search.train.epochs': 0 is not a valid train.epochs: .*must be 'auto' or a positive number"),
    ({"train.warmup_ratio": {"low": 0.1, "high": 1.5}}, r"'search.train.warmup_ratio': 1.5 is not a valid .*less than 1"),
    ({"lora.r": {"choices": [8, -4]}}, r"'search.lora.r': -4 is not a valid lora.r"),
    ({"method": {"choices": ["lora", "prefix"]}}, r"'search.method': 'prefix' is not a valid method"),
    ({"train.epochs": {"low": 1.0, "high": 3}}, r"'search.train.epochs': train.epochs takes integers"),
    ({"method": {"low": 1, "high": 2}}, r"'search.method': method is not a number"),
    ({"train.lr": {"low": 1e-4}}, r"'search.train.lr': give either low and high, or choices"),
    ({"train.lr": {"low": 0, "high": 1e-3, "log": True}}, r"'search.train.lr': a log range needs low > 0"),
    ({"train.lr": {"low": 1e-3, "high": 1e-4}}, r"'search.train.lr': low 0.001 is above high"),
    ({"train.lr": {"low": 1e-4, "high": 1e-3, "lg": True}}, r"'search.train.lr.lg': unknown key \(did you mean "
                                                             r"'search.train.lr.log'\?\)"),
    ({"output_dir": {"choices": ["a", "b"]}}, r"'search.output_dir': tune sets output_dir itself"),
])
def test_search_errors_name_the_path(base_config, search, message):
    with pytest.raises(ConfigError, match=message):
        load_config(raw={**base_config, "search": search})


def test_tune_without_a_search_section_or_a_budget_says_what_to_add(search_config, monkeypatch):
    with pytest.raises(ConfigError, match="no search section"):
        run_search(load_config(raw={k: v for k, v in search_config.items() if k != "search"}), trials=1)
    with pytest.raises(ConfigError, match="give --trials or --timeout"):
        run_search(load_config(raw=search_config))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="one process per trial"):
        run_search(load_config(raw=search_config), trials=1)


# -- studies --------------------------------------------------------------------------------------------

def test_a_study_writes_the_best_config_and_plots_and_never_scores_the_test_split(search_config, evaluated_splits):
    cfg = load_config(raw=search_config)
    result = run_search(cfg, trials=3, pruner="none", seed=0)
    out = Path(cfg.output_dir)
    trials = result.study.get_trials()
    assert [t.state for t in trials] == [COMPLETE] * 3
    assert evaluated_splits and set(evaluated_splits) == {"validation"}
    assert len({t.params["train.lr"] for t in trials}) == 3 and all(t.params["train.epochs"] in (1, 2) for t in trials)
    for trial in trials:  # each trial a run of its own, its checkpoints and weights cleaned, no artifact
        trial_dir = out / "trials" / f"{trial.number:03d}"
        assert sorted(p.name for p in trial_dir.iterdir()) == ["config.yaml"]
        ran = load_config(trial_dir / "config.yaml")
        assert ran.train.lr == trial.params["train.lr"] and not ran.search
    assert not (out / "artifact").exists()
    assert result.study.direction == optuna.study.StudyDirection.MAXIMIZE  # f1_macro
    best = load_config(result.best_config)
    assert result.best_config == out / BEST_CONFIG and not best.search
    assert (best.train.lr, best.train.epochs) == (result.study.best_params["train.lr"],
                                                  result.study.best_params["train.epochs"])
    assert best.output_dir == str(out) and best.model == cfg.model and best.train.batch_size == 32
    assert result.study.best_value == max(t.value for t in trials)
    record = result.record
    assert record["trials"] == {"COMPLETE": 3} and record["best_value"] == result.study.best_value
    assert set(record["importances"]) == {"train.lr", "train.epochs"}
    assert sum(record["importances"].values()) == pytest.approx(1.0)
    for name in (HISTORY_PLOT, IMPORTANCE_PLOT):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_a_weak_trial_is_pruned_before_its_end(search_config, evaluated_splits, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    search_config["train"].update(epochs=3, batch_size=16, report_to=["mlflow"])
    search_config["search"] = {"train.lr": {"low": 1e-9, "high": 3e-3, "log": True}}
    cfg = load_config(raw=search_config)
    study = optuna.create_study(storage=open_storage(None, Path(cfg.output_dir)), study_name=cfg.run_name,
                                direction="maximize")
    study.enqueue_trial({"train.lr": 3e-3})  # learns the sentiment word
    study.enqueue_trial({"train.lr": 1e-9})  # learns nothing: below the first trial's median at once
    result = run_search(cfg, trials=2, pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    first, second = result.study.get_trials()
    assert (first.state, second.state) == (COMPLETE, PRUNED)
    assert list(first.intermediate_values) == [1, 2, 3]  # reported at each evaluation
    evaluations = len(second.intermediate_values)
    assert evaluations < 3  # stopped before its last evaluation
    assert max(second.intermediate_values.values()) < first.value
    assert evaluated_splits == ["validation"] * (3 + evaluations)
    assert not (Path(cfg.output_dir) / "trials" / "001" / "checkpoints").exists()
    client = MlflowClient(f"sqlite:///{(Path(cfg.output_dir) / 'mlflow.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name(result.study.study_name).experiment_id])
    assert {r.info.run_name: r.info.status for r in runs} == {"search": "FINISHED", "trial-000": "FINISHED",
                                                               "trial-001": "KILLED"}  # stopped, not failed


def test_a_crashing_trial_is_recorded_as_failed_and_the_study_goes_on(search_config, tmp_path):
    search_config["search"] = {"data.train": {"choices": [str(tmp_path / "missing.jsonl"), search_config["data"]["train"]]}}
    cfg = load_config(raw=search_config)
    study = optuna.create_study(storage=open_storage(None, Path(cfg.output_dir)), study_name=cfg.run_name,
                                direction="maximize")
    study.enqueue_trial({"data.train": str(tmp_path / "missing.jsonl")})
    study.enqueue_trial({"data.train": search_config["data"]["train"]})
    result = run_search(cfg, trials=2, pruner="none")
    failed, complete = result.study.get_trials()
    assert (failed.state, complete.state) == (FAIL, COMPLETE)
    assert failed.user_attrs["error"].startswith("DataError: data.train: file") and "missing.jsonl" in failed.user_attrs["error"]
    assert result.record["trials"] == {"FAIL": 1, "COMPLETE": 1} and result.record["importances"] is None
    assert load_config(result.best_config).data.train == search_config["data"]["train"]
    assert (Path(cfg.output_dir) / HISTORY_PLOT).is_file() and not (Path(cfg.output_dir) / IMPORTANCE_PLOT).exists()


def test_a_study_resumes_from_its_storage(search_config, tmp_path):
    cfg = load_config(raw=search_config)
    storage = f"sqlite:///{tmp_path / 'study.db'}"  # a database URL, as for PostgreSQL
    first = run_search(cfg, trials=2, pruner="none", storage=storage)
    again = run_search(cfg, trials=2, pruner="none", storage=storage)  # as a new process would: same storage
    numbers = [t.number for t in again.study.get_trials()]
    assert numbers == [0, 1, 2, 3] and again.record["trials"] == {"COMPLETE": 4}
    assert first.study.study_name == again.study.study_name
    assert sorted(p.name for p in (Path(cfg.output_dir) / "trials").iterdir()) == ["000", "001", "002", "003"]
    params = [t.params["train.lr"] for t in again.study.get_trials()]
    assert len(set(params)) == 4  # trial N draws from seed + N: no repeat after a restart


def test_a_study_interrupted_mid_trial_goes_on_where_it_stopped(search_config, monkeypatch):
    from training import search as search_module

    real, calls = search_module.train, []

    def interrupted_in_second_trial(cfg, **kwargs):
        calls.append(cfg.output_dir)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second trial trains
        return real(cfg, **kwargs)

    cfg = load_config(raw=search_config)
    monkeypatch.setattr(search_module, "train", interrupted_in_second_trial)
    with pytest.raises(KeyboardInterrupt):
        run_search(cfg, trials=3, pruner="none")
    monkeypatch.setattr(search_module, "train", real)
    again = run_search(cfg, trials=2, pruner="none")
    assert [t.state for t in again.study.get_trials()] == [COMPLETE, FAIL, COMPLETE, COMPLETE]  # none left RUNNING
    assert again.record["trials"] == {"COMPLETE": 3, "FAIL": 1}


def test_tune_command_trains_the_best_into_an_artifact_that_records_the_study(search_config, tmp_path, capsys):
    search_config["search"] = {"train.lr": {"low": 1e-3, "high": 1e-2, "log": True},
                               "train.batch_size": {"choices": [16, 32]}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(search_config))
    code = main(["tune", str(path), "--trials", "2", "--pruner", "hyperband", "--seed", "3", "--train-best",
                 "--set", "train.epochs=1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "study search: 2 trials (2 complete), validation f1_macro (maximize)" in out
    manifest = read_manifest(tmp_path / "run" / "artifact")
    study = manifest.study
    assert study.name == "search"  # named by its config file
    assert study.trials == {"COMPLETE": 2} and study.metric == "f1_macro"
    assert study.pruner == "hyperband"  # one evaluation per trial: nothing for it to stop
    assert set(study.best_params) == {"train.lr", "train.batch_size"} and set(study.importances) == set(study.best_params)
    assert manifest.provenance.config["train"]["lr"] == study.best_params["train.lr"]
    assert manifest.provenance.config["train"]["epochs"] == 1  # --set reached the trials and the best config
    assert not manifest.provenance.config["search"]
    # The best trial's validation value is the trained model's own: same config, same seed.
    assert manifest.metrics["validation"]["f1_macro"] == pytest.approx(study.best_value)
    assert "test" in manifest.metrics
    card = (tmp_path / "run" / "artifact" / "README.md").read_text()
    assert "## Hyperparameter search" in card and "`search` (2 trials: 2 complete" in card
    assert f"| `train.batch_size` | {study.best_params['train.batch_size']} |" in card
    assert "test metrics" in out and "best configuration:" in out


def test_trials_report_to_mlflow_as_children_of_the_search_run(search_config, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    search_config["train"]["report_to"] = ["mlflow"]
    cfg = load_config(raw=search_config)
    result = run_search(cfg, trials=2, pruner="none")
    store = f"sqlite:///{(Path(cfg.output_dir) / 'mlflow.db').resolve()}"  # the study's own, shared by its trials
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(result.study.study_name)
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"search", "trial-000", "trial-001"}
    parent = runs["search"]
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial"] == str(result.study.best_trial.number)
    assert parent.data.metrics["best_validation/f1_macro"] == pytest.approx(result.study.best_value)
    for trial in result.study.get_trials():
        run = runs[f"trial-{trial.number:03d}"]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
        logged = client.get_metric_history(run.info.run_id, "validation/f1_macro")
        assert [m.value for m in logged] == pytest.approx(list(trial.intermediate_values.values()))
        assert not any(name.startswith("test/") for name in run.data.metrics)  # trials never score the test split


# -- several workers on one PostgreSQL study ------------------------------------------------------------

def _postgres_bin() -> Path | None:
    try:
        out = subprocess.run(["pg_config", "--bindir"], check=False, capture_output=True, text=True, timeout=10)
        candidates = [Path(out.stdout.strip())] if out.returncode == 0 else []
    except OSError:
        candidates = []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return next((c for c in candidates if (c / "initdb").is_file() and (c / "pg_ctl").is_file()), None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def postgres():
    """A PostgreSQL server of our own on 127.0.0.1 (a fresh cluster in a temporary directory); its URL.

    PostgreSQL refuses to run as root: under root the server's commands run as the system's postgres user."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not installed")
    as_user = {}
    root = Path(tempfile.mkdtemp(prefix="tuneserve-pg-"))
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")  # the PostgreSQL packages create this user
        except KeyError:
            pytest.fail("running as root, and there is no 'postgres' user to run the test's server as")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_user = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
    data, port = root / "data", _free_port()

    def run(*command):
        return subprocess.run([str(bindir / command[0]), *command[1:]], check=True, capture_output=True, text=True,
                              timeout=120, cwd=root, **as_user)

    pid = None
    try:
        run("initdb", "-D", str(data), "-U", "tune", "--auth=trust", "-E", "UTF8")
        run("pg_ctl", "-D", str(data), "-l", str(root / "log"), "-w", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start")
        pid = int((data / "postmaster.pid").read_text().split()[0])
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "tune", "study")
        yield f"postgresql://tune@127.0.0.1:{port}/study"
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGINT)  # fast shutdown of the server we started
            for _ in range(300):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_one_postgresql_study(search_config, tmp_path, postgres):
    search_config["train"]["epochs"] = 1
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(search_config))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "training.cli", "tune", str(path), "--storage", postgres,
               "--study-name", "shared", "--pruner", "none"]
    workers = [subprocess.Popen([*command, "--trials", str(n)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env) for n in (2, 3)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
    study = optuna.load_study(study_name="shared", storage=open_storage(postgres, tmp_path))
    trials = study.get_trials()
    assert len(trials) == 2 + 3
    assert sorted(t.number for t in trials) == list(range(5))  # none lost, none run twice
    assert all(t.state == COMPLETE for t in trials)  # nothing left RUNNING
    assert len({t.params["train.lr"] for t in trials}) == 5  # the workers proposed different trials
    assert sorted(Counter(t.user_attrs["worker"] for t in trials).values()) == [2, 3]
    assert sorted(p.name for p in (tmp_path / "run" / "trials").iterdir()) == ["000", "001", "002", "003", "004"]
    assert load_config(tmp_path / "run" / BEST_CONFIG).train.lr == study.best_params["train.lr"]
