"""``tuneserve batch``: every row answered once, in order, typed, from every input format; bad rows kept apart with
their reasons; a killed job resumed to the same output; an output directory that is not this job's refused."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.errors import ConfigError, DataError
from core.manifest import read_manifest
from tests.conftest import make_entity_rows, make_rows, write_jsonl
from training.batch import BatchOptions, run_batch
from training.batch.job import ERRORS_FILE, JOB_FILE, JobError


def run(artifact: Path, input: Path | str, output: Path, **options) -> object:
    return run_batch(BatchOptions(artifact=str(artifact), input=str(input), output=str(output), progress=False,
                                  **options))


def answers(output: Path) -> pa.Table:
    """The job's answers: its shards in order (what ``pandas.read_parquet(output)`` reads)."""
    return pa.concat_tables(pq.read_table(p) for p in sorted(output.glob("part-*.parquet")))


def expected_scores(artifact: Path, texts: list[str]) -> np.ndarray:
    """What the backend the service picks answers for these texts, in one call."""
    from service.backends import choose_backend

    manifest = read_manifest(artifact)
    backend = choose_backend(artifact, manifest, backend="auto", device="cpu", threads=None, batch_size=64)
    return manifest.task.spec.scores(backend.logits(texts, None), manifest.calibration)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [{"id": f"r{i}", "text": r["text"], "label": r["label"], "n": i} for i, r in enumerate(make_rows(230, 7))]


def test_every_row_answered_once_in_order_typed_with_the_bad_ones_apart(artifacts, rows, tmp_path):
    artifact = artifacts["classification"]
    lines = [json.dumps(r) for r in rows]
    # bad rows among them: no text, a number, blank text, not JSON, not an object; and a blank line (skipped)
    lines[3] = json.dumps({"id": "r3", "label": "x"})
    lines[10] = json.dumps({"id": "r10", "text": 5})
    lines[50] = json.dumps({"id": "r50", "text": "   "})
    lines[120] = "{not json"
    lines[121] = "[1, 2]"
    lines[200] = ""
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    summary = run(artifact, source, tmp_path / "out", shard_rows=100, id="id", keep=["n"])

    table = answers(tmp_path / "out")
    bad = {4, 11, 51, 121, 122}
    good = [i for i in range(1, 231) if i not in bad and i != 201]
    assert table["row"].to_pylist() == good  # one row per answered input row, in input order, across 3 shards
    assert table["id"].to_pylist() == [f"r{i - 1}" for i in good]
    assert table["n"].to_pylist() == [i - 1 for i in good]
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*")) == [
        "part-00000-000000.parquet", "part-00000-000001.parquet", "part-00000-000002.parquet"]
    assert summary.rows == len(good) and summary.errors == 5 and summary.shards == 3

    manifest = read_manifest(artifact)
    assert table.schema.field("label").type == pa.string()
    assert table.schema.field("scores").type == pa.struct([(n, pa.float64()) for n in manifest.labels])
    assert table.schema.field("truncated").type == pa.bool_()
    scores = expected_scores(artifact, [rows[i - 1]["text"] for i in good])
    got = np.array([[s[n] for n in manifest.labels] for s in table["scores"].to_pylist()])
    assert np.abs(got - scores).max() < 1e-5
    assert table["label"].to_pylist() == [manifest.labels[j] for j in scores.argmax(1)]
    meta = json.loads(table.schema.metadata[b"tuneserve"])
    assert meta["model"] == manifest.name and meta["backend"] == summary.backend
    assert meta["manifest_sha256"] == json.loads((tmp_path / "out" / JOB_FILE).read_text())["manifest_sha256"]

    errors = [json.loads(line) for line in (tmp_path / "out" / ERRORS_FILE).read_text().splitlines()]
    assert [(e["row"], e.get("id")) for e in errors] == [(4, "r3"), (11, "r10"), (51, "r50"), (121, None),
                                                         (122, None)]
    reasons = [e["reason"] for e in errors]
    assert "missing" in reasons[0] and "expected a string, got a number" in reasons[1]
    assert "empty or only whitespace" in reasons[2] and "not valid JSON" in reasons[3]
    assert "expected a JSON object, got an array" in reasons[4]
    assert all(e["file"] == str(source) for e in errors)


def test_every_input_format_gives_the_same_answers(artifacts, rows, tmp_path):
    import datasets
    import pandas as pd

    artifact = artifacts["classification"]
    frame = pd.DataFrame(rows[:90])
    frame.to_csv(tmp_path / "in.csv", index=False)
    frame.to_csv(tmp_path / "in.tsv", index=False, sep="\t")
    frame.to_parquet(tmp_path / "in.parquet")
    (tmp_path / "many").mkdir()
    for k in range(3):
        write_jsonl(tmp_path / "many" / f"part{k}.jsonl", rows[k * 30:(k + 1) * 30])
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "saved"))

    reference = None
    for name, source in {"csv": "in.csv", "tsv": "in.tsv", "parquet": "in.parquet", "glob": "many/*.jsonl",
                         "hf": "saved"}.items():
        run(artifact, tmp_path / source if name != "glob" else f"{tmp_path}/{source}", tmp_path / name, id="id")
        table = answers(tmp_path / name).select(["id", "label", "score"]).to_pylist()
        reference = reference or table
        assert len(table) == 90, name
        assert [r["id"] for r in table] == [r["id"] for r in reference], name
        assert [r["label"] for r in table] == [r["label"] for r in reference], name
        assert np.allclose([r["score"] for r in table], [r["score"] for r in reference], atol=1e-6), name
    assert len(list((tmp_path / "glob").glob("part-*.parquet"))) == 3  # a shard per input file at least


def test_worker_processes_give_the_answers_of_one(artifacts, rows, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", rows * 3)
    run(artifacts["classification"], source, tmp_path / "one", shard_rows=100)
    run(artifacts["classification"], source, tmp_path / "two", shard_rows=100, workers=2)
    one, two = answers(tmp_path / "one"), answers(tmp_path / "two")
    assert one["row"].to_pylist() == two["row"].to_pylist() == list(range(1, 691))
    assert one["label"].to_pylist() == two["label"].to_pylist()
    assert np.abs(np.array(one["score"]) - np.array(two["score"])).max() < 1e-5


def test_a_job_killed_mid_way_resumes_to_the_same_output(artifacts, tmp_path):
    artifact = artifacts["classification"]
    write_jsonl(tmp_path / "in.jsonl", make_rows(3000, 11))
    command = [sys.executable, "-m", "training.cli", "batch", str(artifact), "--input", str(tmp_path / "in.jsonl"),
               "--shard-rows", "200", "--batch-size", "16", "-q"]
    whole = subprocess.run([*command, "--output", str(tmp_path / "whole")], capture_output=True, text=True,
                           timeout=300)
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    process = subprocess.Popen([*command, "--output", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(out.glob("part-*.parquet"))) < 4 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert 4 <= len(finished) < 15, "the job was not killed part-way"

    again = subprocess.run([*command, "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"({len(finished)} finished before this run)" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name in finished} == finished
    assert not list(out.glob(".*tmp*"))
    assert answers(out).equals(answers(tmp_path / "whole"))


def test_an_output_directory_that_is_not_this_jobs_is_refused_and_nothing_deleted(artifacts, rows, tmp_path):
    artifact = artifacts["classification"]
    source = write_jsonl(tmp_path / "in.jsonl", rows[:40])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(JobError, match="not empty and not a tuneserve batch job's \\(notes.txt"):
        run(artifact, source, out)
    (out / "notes.txt").unlink()
    run(artifact, source, out)
    write_jsonl(source, rows[:41])  # the input changed since
    with pytest.raises(JobError, match=r"input .*in.jsonl changed since"):
        run(artifact, source, out)
    with pytest.raises(JobError, match=r'another job.s shards .*"keep": \[\]\}, now .*"keep": \["n"\]'):
        run(artifact, source, out, keep=["n"])  # options are part of the job as well
    with pytest.raises(JobError, match="the artifact differs"):
        run(artifacts["pair"], source, out, pair="text")
    (out / "notes.txt").write_text("mine")
    run(artifact, source, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert len(answers(out)) == 41


def test_mistakes_in_the_command_fail_at_once_naming_what_is_wrong(artifacts, rows, tmp_path):
    artifact = artifacts["classification"]
    source = write_jsonl(tmp_path / "in.jsonl", rows[:20])
    pd_source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": [1, 2], "body": ["a", "b"]}), pd_source)
    with pytest.raises(DataError, match=r"in.parquet: no column 'txt'.*which --text names; its columns: body, text"):
        run(artifact, pd_source, tmp_path / "a", text="txt")
    with pytest.raises(DataError, match=r"column 'text' \(--text\) holds int64, not text"):
        run(artifact, pd_source, tmp_path / "b")
    with pytest.raises(DataError, match="no column 'title' \\(in its first 1,000 lines\\)"):
        run(artifact, source, tmp_path / "c", keep=["title"])
    with pytest.raises(DataError, match="no file matches"):
        run(artifact, f"{tmp_path}/nothing-*.jsonl", tmp_path / "d")
    with pytest.raises(ConfigError, match="--pair body: .* reads single texts"):
        run(artifact, source, tmp_path / "e", pair="body")
    with pytest.raises(ConfigError, match="--keep/--id label: the output has a column of that name"):
        run(artifact, source, tmp_path / "f", keep=["label"])
    assert not (tmp_path / "a").exists()  # refused before anything was written


def test_max_errors_stops_the_job_and_keeps_what_is_finished(artifacts, rows, tmp_path):
    lines = [json.dumps(r) if i % 10 else "{" for i, r in enumerate(rows[:100])]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(JobError, match="over --max-errors 3: stopped after shard part-00000-000001"):
        run(artifacts["classification"], source, tmp_path / "out", shard_rows=20, max_errors=3)
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) == 2


def test_no_truncation_makes_a_text_too_long_for_the_model_a_bad_row(artifacts, rows, tmp_path):
    long = " ".join(["word"] * 200)
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "a fine day"}, {"text": long}])
    run(artifacts["classification"], source, tmp_path / "cut")
    assert answers(tmp_path / "cut")["truncated"].to_pylist() == [False, True]
    summary = run(artifacts["classification"], source, tmp_path / "refused", truncation=False)
    assert summary.errors == 1 and answers(tmp_path / "refused")["row"].to_pylist() == [1]
    error = json.loads((tmp_path / "refused" / ERRORS_FILE).read_text())
    assert error["row"] == 2 and "more tokens than the 32 the model reads" in error["reason"]


def test_every_task_answers_in_typed_columns(artifacts, embedding_artifact, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": " ".join(r["tokens"])} for r in make_entity_rows(12, 5)])
    run(artifacts["token"], source, tmp_path / "token", text="text")
    table = answers(tmp_path / "token")
    entity = pa.struct([("start", pa.int64()), ("end", pa.int64()), ("label", pa.string()), ("score", pa.float64()),
                        ("text", pa.string())])
    assert table.schema.field("entities").type == pa.list_(entity)
    assert sum(len(e) for e in table["entities"].to_pylist()) > 0

    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": r["text"]} for r in make_rows(12, 3)])
    run(artifacts["multilabel"], texts, tmp_path / "multilabel")
    assert answers(tmp_path / "multilabel").schema.field("labels").type == pa.list_(pa.string())
    run(artifacts["regression"], texts, tmp_path / "regression")
    assert answers(tmp_path / "regression").schema.field("value").type == pa.float64()

    queries = write_jsonl(tmp_path / "queries.jsonl", [{"query": r["text"]} for r in make_rows(12, 3)])
    run(embedding_artifact, queries, tmp_path / "embedding", output_format="jsonl")
    lines = [json.loads(line) for line in next((tmp_path / "embedding").glob("part-*.jsonl")).read_text().splitlines()]
    vectors = np.array([line["embedding"] for line in lines])
    assert vectors.shape[0] == 12 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_generation_writes_what_predict_writes(generation_artifact, tmp_path, capsys):
    from training.cli import main

    inputs = ["alpha beta gamma", "delta epsilon"]
    source = write_jsonl(tmp_path / "in.jsonl", [{"input": text} for text in inputs])
    run(generation_artifact, source, tmp_path / "out", max_new_tokens=8)
    table = answers(tmp_path / "out")
    assert table.column_names == ["row", "text", "finish_reason", "tokens"]
    assert main(["predict", str(generation_artifact), *inputs, "--max-new-tokens", "8"]) == 0
    predicted = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert table.select(["text", "finish_reason", "tokens"]).to_pylist() == [
        {k: p[k] for k in ("text", "finish_reason", "tokens")} for p in predicted]


def test_ray_missing_says_what_to_install(artifacts, rows, tmp_path, monkeypatch):
    source = write_jsonl(tmp_path / "in.jsonl", rows[:5])
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'tuneserve\[batch\]'"):
        run(artifacts["classification"], source, tmp_path / "out", engine="ray")
    assert not (tmp_path / "out").exists()
