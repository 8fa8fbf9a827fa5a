"""A real `bentoml serve` process on 127.0.0.1: endpoints, limits, auth, probes, shutdown, a broken artifact."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_rows

ROOT = Path(__file__).resolve().parents[2]
KEY = "s3cret-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict, bentoml_home: Path, python: str = sys.executable,
                 attempts: int = 3, bento: str = ".") -> tuple[subprocess.Popen, str, Path]:
    """Start ``bentoml serve`` (of this checkout, or of ``bento``: a bento's directory) on a free port and return
    once it holds the port (or has exited).

    ``free_port`` releases the port before the server binds it, so another process can take it in between; the
    server then exits with "Could not bind" and is started again on a fresh port."""
    bentoml_home.mkdir(parents=True, exist_ok=True)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    full_env.update(BENTOML_HOME=str(bentoml_home), **env)
    for _ in range(attempts):
        port = free_port()
        log = bentoml_home / f"serve-{port}.log"
        with log.open("w") as out:
            proc = subprocess.Popen([python, "-m", "bentoml", "serve", bento, "--host", "127.0.0.1", "--port", str(port)],
                                    cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and "listening on" not in log.read_text():
            time.sleep(0.2)
        if "Could not bind" not in log.read_text():
            return proc, f"http://127.0.0.1:{port}", log
        stop(proc)
    raise AssertionError(f"no free port held after {attempts} attempts; last log: {log}")


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 90) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server not ready after {timeout} s")


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


@pytest.fixture(scope="module")
def server(artifacts, tmp_path_factory):
    env = {"TUNESERVE_ARTIFACT": str(artifacts["classification"]), "TUNESERVE_BACKEND": "torch",
           "TUNESERVE_DEVICE": "cpu", "TUNESERVE_API_KEY": KEY, "TUNESERVE_MAX_BODY_BYTES": "65536"}
    proc, url, log = start_server(env, tmp_path_factory.mktemp("bentoml"))
    try:
        wait_ready(proc, url)
        yield proc, url, log
    finally:
        stop(proc)


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_endpoints_auth_limits_and_probes(server):
    proc, url, log = server
    r = httpx.post(url + "/predict", json={"texts": ["a superb plot", "dull"]}, headers=AUTH)
    assert r.status_code == 200 and r.json()["backend"] == "torch-cpu" and len(r.json()["predictions"]) == 2
    assert httpx.get(url + "/metadata", headers=AUTH).json()["task"] == "classification"
    # auth: missing or wrong key -> 401 on data routes; probes and metrics stay open
    assert httpx.post(url + "/predict", json={"texts": ["x"]}).status_code == 401
    assert httpx.post(url + "/predict", json={"texts": ["x"]}, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(url + "/metadata").status_code == 401
    for probe in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(url + probe).status_code == 200, probe
    assert "bentoml_service_request_duration_seconds" in httpx.get(url + "/metrics").text
    # bad input -> 400 naming the field
    r = httpx.post(url + "/predict", json={"texts": [1]}, headers=AUTH)
    assert r.status_code == 400 and "texts" in r.text
    # ... and one line in the server log, not a traceback
    deadline = time.monotonic() + 10
    while "Refused /predict" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "Refused /predict [POST] (HTTP 400)" in log.read_text() and "Traceback" not in log.read_text()
    # size limit -> 413, announced or chunked, and the server keeps answering
    big = json.dumps({"texts": ["word " * 20_000]}).encode()
    assert httpx.post(url + "/predict", content=big, headers={**AUTH, "content-type": "application/json"}).status_code == 413

    def chunks():
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    r = httpx.post(url + "/predict", content=chunks(), headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413 and "65536" in r.json()["error"]
    assert httpx.post(url + "/predict", json={"texts": ["still fine"]}, headers=AUTH).status_code == 200
    # pickle is refused
    r = httpx.post(url + "/predict", content=b"\x80\x04N.", headers={**AUTH, "content-type": "application/vnd.bentoml+pickle"})
    assert r.status_code == 415
    assert proc.poll() is None


def test_evaluate_matches_tuneserve_evaluate(server, artifacts, tmp_path):
    _, url, _ = server
    art = artifacts["classification"]
    data = art.parent.parent / "test.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    r = httpx.post(url + "/evaluate", json={"examples": [{"text": x["text"], "label": x["label"]} for x in rows]},
                   headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    out = tmp_path / "eval.json"
    done = subprocess.run([sys.executable, "-m", "training.cli", "evaluate", str(art), "--data", str(data),
                           "--output", str(out), "--backend", "torch"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    cli = json.loads(out.read_text())
    served = r.json()["metrics"]
    assert served and set(served) <= set(cli["metrics"])
    for name, value in served.items():
        assert value == pytest.approx(cli["metrics"][name], abs=1e-6), name


def test_sigterm_lets_requests_in_flight_finish(artifacts, tmp_path):
    proc, url, _ = start_server({"TUNESERVE_ARTIFACT": str(artifacts["classification"]), "TUNESERVE_BACKEND": "onnx"},
                                tmp_path / "bentoml")
    try:
        wait_ready(proc, url)
        examples = [{"text": r["text"], "label": r["label"]} for r in make_rows(3000, seed=5)]
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(httpx.post, url + "/evaluate", json={"examples": examples}, timeout=120)
                       for _ in range(4)]
            time.sleep(0.5)  # the requests are in the server
            os.killpg(proc.pid, signal.SIGTERM)
            statuses = [f.result().status_code for f in futures]
        assert statuses == [200] * 4
        assert proc.wait(60) == 0
    finally:
        stop(proc)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _reverse_labels(art: Path) -> None:
    raw = json.loads((art / "manifest.json").read_text())
    raw["labels"] = list(reversed(raw["labels"]))
    (art / "manifest.json").write_text(json.dumps(raw))


def exits_at_once(env: dict, bentoml_home: Path, *, seconds: float = 60) -> tuple[int, float, str]:
    """Start a server that must refuse to: its exit status, the seconds it lived, and its log."""
    started = time.monotonic()
    proc, _, log = start_server(env, bentoml_home)
    try:
        status = proc.wait(seconds)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise AssertionError(f"still running after {seconds} s; the log ends:\n{log.read_text()[-3000:]}") from None
    return status, time.monotonic() - started, log.read_text()


def _refused(text: str, reason: str) -> None:
    """One line says why, once: no traceback, no worker started again."""
    lines = [line for line in text.splitlines() if line.startswith("tuneserve: cannot start: ")]
    assert len(lines) == 1 and reason in lines[0], text[-3000:]
    assert "Traceback" not in text, text[-3000:]


@pytest.mark.parametrize("backend, damage, reason", [
    ("onnx", lambda art: _truncate(art / "onnx" / "model.onnx"), "not a readable ONNX model"),
    ("torch", lambda art: _truncate(art / "model" / "model.safetensors"), "cannot load model/"),
    ("onnx", _reverse_labels, "do not belong to this model"),
    ("onnx", lambda art: shutil.rmtree(art), "TUNESERVE_ARTIFACT="),
    ("onnx", lambda art: (art / "onnx" / "model.onnx").unlink(), "lists onnx/model.onnx, which is missing"),
], ids=["truncated-onnx", "truncated-safetensors", "manifest-lies-about-labels", "missing", "missing-graph"])
def test_a_broken_artifact_stops_the_server_at_once_with_one_line(artifacts, tmp_path, backend, damage, reason):
    """Files that cannot be read are found before any worker starts; a model that loads but fails its self-test
    stops the server from its worker. Either way: exit status 2 in seconds, not a worker restarted for ever."""
    broken = tmp_path / "artifact"
    shutil.copytree(artifacts["classification"], broken)
    damage(broken)
    status, seconds, text = exits_at_once({"TUNESERVE_ARTIFACT": str(broken), "TUNESERVE_BACKEND": backend,
                                           "TUNESERVE_DEVICE": "cpu"}, tmp_path / "bentoml")
    assert status == 2 and seconds < 45, (status, seconds, text[-3000:])
    _refused(text, reason)


@pytest.mark.parametrize("env, reason", [
    ({"TUNESERVE_BACKEND": "nonsense"}, "TUNESERVE_BACKEND: Input should be 'auto', 'onnx', 'onnx-int8', 'onnx-shared' or 'torch'"),
    ({"TUNESERVE_MAX_TEXTS": "many"}, "TUNESERVE_MAX_TEXTS: "),
    ({"TUNESERVE_MODEL": "nosuch:latest"}, "TUNESERVE_MODEL=nosuch:latest: not in the BentoML store"),
    ({"TUNESERVE_MODELS": "tags=./nosuch/artifact"}, "TUNESERVE_MODELS: tags=./nosuch/artifact: no such directory"),
    ({}, "no model to serve: TUNESERVE_MODEL defaults to sentiment-lora-onnx:latest"),
], ids=["backend", "limit", "unknown-tag", "missing-directory-in-a-set", "nothing-configured"])
def test_a_wrong_setting_stops_the_server_before_any_worker(artifacts, tmp_path, env, reason):
    if "TUNESERVE_BACKEND" in env or "TUNESERVE_MAX_TEXTS" in env:
        env = {**env, "TUNESERVE_ARTIFACT": str(artifacts["classification"])}
    status, seconds, text = exits_at_once(env, tmp_path / "bentoml")  # an empty store
    assert status == 2 and seconds < 30, (status, seconds, text[-3000:])
    _refused(text, reason)
    if not env:  # says how to get a model
        assert all(way in text for way in ("make demo", "tuneserve register", "TUNESERVE_ARTIFACT"))
    assert "listening on" not in text  # the port never opened


def test_concurrency_limit_gives_429_timeouts_give_504_and_probes_keep_answering(artifacts, tmp_path):
    proc, url, _ = start_server({"TUNESERVE_ARTIFACT": str(artifacts["classification"]), "TUNESERVE_BACKEND": "onnx",
                                 "TUNESERVE_MAX_CONCURRENCY": "2", "TUNESERVE_TIMEOUT": "0.5"}, tmp_path / "bentoml")
    try:
        wait_ready(proc, url)
        # /evaluate of 8,000 long examples takes well over the 0.5 s timeout on the tiny model
        slow = {"examples": [{"text": ("the plot was good and the acting was dull " * 12), "label": "positive"}] * 8000}
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(httpx.post, url + "/evaluate", json=slow, timeout=120) for _ in range(5)]
            time.sleep(0.3)
            probes = [httpx.get(url + p, timeout=5).status_code for p in ("/readyz", "/livez") for _ in range(3)]
            statuses = sorted(f.result().status_code for f in futures)
        assert probes == [200] * 6
        assert statuses.count(429) >= 1 and set(statuses) <= {429, 504} and statuses.count(504) >= 1, statuses
        # the server recovers: the next request is answered
        for _ in range(50):
            r = httpx.post(url + "/predict", json={"texts": ["fine"]}, timeout=30)
            if r.status_code == 200:
                break
            time.sleep(0.2)
        assert r.status_code == 200
    finally:
        stop(proc)
