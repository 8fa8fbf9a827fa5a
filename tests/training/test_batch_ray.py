"""``tuneserve batch --engine ray`` and ``tuneserve evaluate --engine ray`` on a local Ray cluster of 2 CPUs: the
same answers and metrics as the local engine, resumed by file, and a killed actor's work redone without a row lost
or written twice."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import make_rows, write_jsonl
from training.batch import BatchOptions, run_batch

ray = pytest.importorskip("ray", reason="the Ray engine's tests need tuneserve[batch] (in requirements/lock.txt)")


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module (about 8 s to start); the engine leaves a running one running."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def answers(output) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted(output.glob("part-*.parquet")))


def run(artifact, source, output, **options):
    return run_batch(BatchOptions(artifact=str(artifact), input=str(source), output=str(output), progress=False,
                                  **options))


def test_ray_gives_the_local_answers_and_resumes_by_file(cluster, artifacts, tmp_path):
    artifact = artifacts["classification"]
    (tmp_path / "in").mkdir()
    for k in range(3):
        rows = [{"id": f"{k}-{i}", **r} for i, r in enumerate(make_rows(150, 20 + k))]
        lines = [json.dumps(r) for r in rows]
        lines[7] = json.dumps({"id": f"{k}-7", "text": None})
        (tmp_path / "in" / f"part{k}.jsonl").write_text("\n".join(lines) + "\n")
    pattern = f"{tmp_path}/in/*.jsonl"
    local = run(artifact, pattern, tmp_path / "local", id="id")
    on_ray = run(artifact, pattern, tmp_path / "ray", id="id", engine="ray")
    assert (on_ray.rows, on_ray.errors, on_ray.shards) == (local.rows, local.errors, 3) == (447, 3, 3)
    a, b = answers(tmp_path / "local"), answers(tmp_path / "ray")
    assert a["id"].to_pylist() == b["id"].to_pylist() and a["row"].to_pylist() == b["row"].to_pylist()
    assert a["label"].to_pylist() == b["label"].to_pylist()
    assert np.abs(np.array(a["score"]) - np.array(b["score"])).max() < 1e-5
    errors = (tmp_path / "ray" / "_errors.jsonl").read_text().splitlines()
    assert [json.loads(e)["id"] for e in errors] == ["0-7", "1-7", "2-7"]

    # a job stopped after its first file: started again, it answers the other two files only
    first = tmp_path / "ray" / "part-00000-000000.parquet"
    for later in ("part-00001-000000.parquet", "part-00002-000000.parquet"):
        (tmp_path / "ray" / later).unlink()
    written = first.stat().st_mtime_ns
    again = run(artifact, pattern, tmp_path / "ray", id="id", engine="ray")
    assert again.resumed == 1 and first.stat().st_mtime_ns == written
    assert answers(tmp_path / "ray").equals(b)


def actor_pids(name: str) -> list[int]:
    """Processes whose title (Ray sets it to the actor's class) names ``name``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                title = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::") and name in title:
                pids.append(int(entry))
    return pids


def test_a_killed_actor_is_replaced_and_no_row_is_lost_or_doubled(cluster, artifacts, tmp_path):
    artifact = artifacts["classification"]
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": i, **r} for i, r in enumerate(make_rows(8000, 31))])
    killed = []

    def kill_an_actor() -> None:
        """SIGKILL the process of an answering actor (its title names the class) once it has started work; one that
        ended before the signal (a fast machine finishes a small job quickly) is passed over for the next."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for pid in actor_pids("RayAnswerer"):
                time.sleep(0.3)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed.append(pid)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_an_actor)
    killer.start()
    summary = run(artifact, source, tmp_path / "out", id="id", engine="ray", batch_size=16)
    killer.join()
    assert killed, "no actor was seen to kill"
    table = answers(tmp_path / "out")
    assert summary.rows == 8000 and table["id"].to_pylist() == list(range(8000))


def test_ray_reads_a_saved_dataset_and_embeds_as_the_local_engine_does(cluster, embedding_artifact, tmp_path):
    import datasets

    from tests.conftest import make_pairs

    queries = [{"query": p["query"]} for p in make_pairs(40, 9)]
    datasets.Dataset.from_list(queries).save_to_disk(str(tmp_path / "saved"))
    run(embedding_artifact, tmp_path / "saved", tmp_path / "local")
    run(embedding_artifact, tmp_path / "saved", tmp_path / "ray", engine="ray")
    local, on_ray = answers(tmp_path / "local"), answers(tmp_path / "ray")
    assert local["row"].to_pylist() == on_ray["row"].to_pylist() == list(range(1, 41))
    assert np.abs(np.array(local["embedding"].to_pylist()) - np.array(on_ray["embedding"].to_pylist())).max() < 1e-5


def test_evaluate_on_ray_gives_the_local_metrics(cluster, artifacts, tmp_path, capsys):
    from training.cli import main

    artifact = artifacts["classification"]
    data = write_jsonl(tmp_path / "labelled.jsonl", make_rows(300, 41))
    assert main(["evaluate", str(artifact), "--data", str(data), "--output", str(tmp_path / "local.json")]) == 0
    assert main(["evaluate", str(artifact), "--data", str(data), "--engine", "ray",
                 "--output", str(tmp_path / "ray.json")]) == 0
    local = json.loads((tmp_path / "local.json").read_text())
    on_ray = json.loads((tmp_path / "ray.json").read_text())
    assert on_ray["n"] == local["n"] == 300
    for name, value in local["metrics"].items():
        assert on_ray["metrics"][name] == pytest.approx(value, abs=1e-9), name
