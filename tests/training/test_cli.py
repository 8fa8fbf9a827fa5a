"""The command line as a user runs it: one subprocess per command, real files, real exit codes."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from core.manifest import read_manifest


def tuneserve(*args, cwd=None, timeout=300):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "training.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, data_dir):
    """One run through `tuneserve train`, shared by the tests below."""
    directory = tmp_path_factory.mktemp("cli")
    config = {
        "model": tiny_model, "method": "full", "output_dir": str(directory / "run"),
        "data": {"train": str(data_dir / "train.jsonl"), "validation": str(data_dir / "validation.jsonl"),
                 "test": str(data_dir / "test.jsonl")},
        "train": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0, "max_length": 32},
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = tuneserve("train", str(path), "--set", "train.seed=7")
    assert result.returncode == 0, result.stderr[-2000:]
    return directory / "run" / "artifact", result.stdout


def test_train_prints_metrics_beside_baselines(trained):
    artifact, stdout = trained
    header = next(line for line in stdout.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "model", "majority", "tfidf_logreg"]
    assert any(line.startswith("accuracy") for line in stdout.splitlines())
    assert read_manifest(artifact).provenance.seed == 7  # the --set override reached the run


def test_evaluate_reproduces_the_recorded_test_metrics(trained, data_dir, tmp_path):
    artifact, _ = trained
    out = tmp_path / "report.json"
    result = tuneserve("evaluate", str(artifact), "--data", str(data_dir / "test.jsonl"), "--output", str(out),
                       "--backend", "torch")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    recorded = read_manifest(artifact).metrics["test"]
    assert report["n"] == 60 and report["backend"] == "torch-cpu"
    assert report["metrics"]["accuracy"] == pytest.approx(recorded["accuracy"])
    assert report["metrics"]["f1_macro"] == pytest.approx(recorded["f1_macro"])
    assert abs(report["delta"]["accuracy"]) < 1e-9
    assert len(report["confusion_matrix"]) == 2
    assert report["drift"] == [] and set(report["intervals"]) == set(report["metrics"])
    assert "drift (the 95% interval excludes the training figure): none" in result.stdout
    assert "95% low" in result.stdout


def test_predict_prints_one_json_line_per_text(trained):
    artifact, _ = trained
    result = tuneserve("predict", str(artifact), "a superb and lovely film", "dreadful, tedious acting")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["label"] for line in lines] == ["positive", "negative"]
    assert all(0.5 <= line["score"] <= 1 for line in lines)
    blank = tuneserve("predict", str(artifact), "fine", "  ")
    assert blank.returncode == 2 and blank.stderr.strip().endswith("text 2: empty or only whitespace; give the text "
                                                                    "to score"), blank.stderr[-2000:]


def test_the_command_line_answers_with_the_backend_the_service_would_choose(trained, data_dir, tmp_path):
    artifact, _ = trained
    export = read_manifest(artifact).export
    served = "onnx-int8" if export.variant("onnx-int8") else "onnx"  # `auto` on a machine without a GPU
    texts = ["a superb and lovely film", "dreadful, tedious acting"]
    answers = {}
    for backend in ("auto", served, "torch"):
        result = tuneserve("predict", str(artifact), *texts, "--backend", backend)
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"backend: {served if backend == 'auto' else 'torch-cpu' if backend == 'torch' else served}" in result.stderr
        answers[backend] = [json.loads(line) for line in result.stdout.splitlines()]
    assert answers["auto"] == answers[served]  # the same answer as the service's backend, to the printed digit
    assert [a["label"] for a in answers["auto"]] == [a["label"] for a in answers["torch"]]
    out = tmp_path / "report.json"
    result = tuneserve("evaluate", str(artifact), "--data", str(data_dir / "test.jsonl"), "--output", str(out))
    assert result.returncode == 0 and f"backend {served}" in result.stdout
    assert json.loads(out.read_text())["backend"] == served


def test_errors_are_one_line_without_traceback(trained, tmp_path):
    artifact, _ = trained
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine", "label": "neutral"}) + "\n")
    result = tuneserve("evaluate", str(artifact), "--data", str(bad))
    assert result.returncode == 2
    assert f"--data ({bad}): row 1, column 'label': label 'neutral' never appears in the training data" in result.stderr
    assert "Traceback" not in result.stderr
    # the data is read before the model loads (which would print the backend chosen), and nothing comes before the error
    assert "backend:" not in result.stderr and result.stderr.startswith("tuneserve evaluate: error: --data (")

    config = tmp_path / "c.yaml"
    config.write_text("data: {train: x.csv}\ntrain: {epochz: 1}\n")
    result = tuneserve("train", str(config))
    assert result.returncode == 2 and "'train.epochz': unknown key" in result.stderr and "Traceback" not in result.stderr

    result = tuneserve("evaluate", str(tmp_path), "--data", str(bad))
    assert result.returncode == 2 and "no manifest.json" in result.stderr


def test_data_command_writes_the_demo_set(tmp_path):
    result = tuneserve("data", "vader:tweets", "--output", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "tweets.jsonl").read_text().splitlines()]
    assert len(rows) == 4200
    assert set(rows[0]) == {"id", "text", "rating", "polarity"} and -4 <= rows[0]["rating"] <= 4


def test_evaluate_can_skip_unlabelled_rows(trained, data_dir, tmp_path):
    artifact, _ = trained
    rows = [json.loads(line) for line in (data_dir / "test.jsonl").read_text().splitlines()]
    rows[3]["label"] = None
    path = tmp_path / "partly.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refused = tuneserve("evaluate", str(artifact), "--data", str(path))
    assert refused.returncode == 2 and "row 4, column 'label': missing label (--drop-missing-labels" in refused.stderr
    out = tmp_path / "r.json"
    done = tuneserve("evaluate", str(artifact), "--data", str(path), "--drop-missing-labels", "--output", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(out.read_text())["n"] == 59


def test_config_checks_the_data_and_the_model_without_training(tiny_model, data_dir, tmp_path, capsys):
    from training.cli import main

    config = tmp_path / "c.yaml"
    raw = {"model": tiny_model, "output_dir": str(tmp_path / "run"),
           "data": {"train": str(data_dir / "train.jsonl"), "test": str(data_dir / "test.jsonl")}}
    config.write_text(yaml.safe_dump(raw))
    done = tuneserve("config", str(config))  # as a user runs it
    assert done.returncode == 0, done.stderr[-2000:]
    assert yaml.safe_load(done.stdout)["data"]["train"] == raw["data"]["train"]  # still a config
    assert f"# checked: model: {tiny_model}" in done.stdout
    assert f"# checked: data.train: 240 examples ({data_dir / 'train.jsonl'})" in done.stdout
    assert "# checked: data.test: 60 examples" in done.stdout and not (tmp_path / "run").exists()

    for changes, message in (
            ({"model": "minlm"}, "model: 'minlm' is not a known alias or a local directory; did you mean 'minilm'"),
            ({"data": {**raw["data"], "test": str(data_dir / "tset.jsonl")}},
             "data.test: file " + str(data_dir / "tset.jsonl") + " does not exist (did you mean"),
            ({"data": {**raw["data"], "text": "txt"}}, "column 'txt' not found (did you mean 'text'?)")):
        config.write_text(yaml.safe_dump({**raw, **changes}))
        assert main(["config", str(config)]) == 2
        stderr = capsys.readouterr().err
        assert message in stderr and stderr.startswith("tuneserve config: error: "), stderr  # nothing before it


def test_train_reports_a_missing_data_file_before_loading_anything(tmp_path):
    config = tmp_path / "tickets.yaml"
    config.write_text("task: classification\nmodel: minilm\ndata:\n  train: tickets.csv\n")
    result = tuneserve("train", str(config))
    assert result.returncode == 2
    # the error alone, with nothing set up before it
    assert result.stdout == "" and result.stderr.strip() == ("tuneserve train: error: data.train: file tickets.csv "
                                                            "does not exist")
    # and torch never imported to say it (its import alone takes seconds)
    probe = subprocess.run([sys.executable, "-c", "import sys; from training.cli import main; "
                            f"status = main(['train', {str(config)!r}]); print(status, 'torch' in sys.modules)"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert probe.stdout.split() == ["2", "False"], probe.stdout + probe.stderr[-2000:]


def test_a_model_that_loses_to_its_baseline_is_told_why_and_what_to_change(tmp_path, tiny_model, data_dir):
    """A learning rate far too low: the loss stays flat, the last line says so and names the setting, and the
    manifest and the card carry the same text."""
    config = {
        "model": tiny_model, "method": "full", "output_dir": str(tmp_path / "run"),
        "data": {"train": str(data_dir / "train.jsonl"), "validation": str(data_dir / "validation.jsonl"),
                 "test": str(data_dir / "test.jsonl")},
        "train": {"epochs": 2, "batch_size": 8, "lr": 1e-9, "warmup_ratio": 0.0, "max_length": 32,
                  "early_stopping": {"patience": None}},
    }
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump(config))
    result = tuneserve("train", str(path))
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    manifest = read_manifest(tmp_path / "run" / "artifact")
    assert manifest.beats_baselines is False
    assert manifest.diagnosis.startswith("likeliest reason: the training loss barely fell")
    assert manifest.diagnosis.endswith("try --set train.lr=3.0e-09")
    assert last.startswith("WARNING: the model does NOT beat its best baseline")
    assert last.endswith(manifest.diagnosis + ".")
    card = (tmp_path / "run" / "artifact" / "README.md").read_text()
    assert "the training loss barely fell" in card and "`--set train.lr=3.0e-09`" not in card
    assert "try --set train.lr=3.0e-09" in card
