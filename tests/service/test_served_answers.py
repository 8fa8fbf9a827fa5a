"""A real `bentoml serve` process: its own API docs (nothing loaded from another host), and one answer per input
whether it is asked through /predict or /evaluate, alone or beside other clients' requests."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from core.manifest import read_manifest
from tests.conftest import make_rows
from tests.service.test_serve_process import start_server, stop, wait_ready

TIMEOUT = 30  # seconds, for every call to the server


@pytest.fixture(scope="module")
def served(artifacts, tmp_path_factory):
    """The classification artifact served by its int8 variant if the export kept one, else by the fp32 ONNX model."""
    art = artifacts["classification"]
    manifest = read_manifest(art)
    backend = "onnx-int8" if manifest.export.variant("onnx-int8") else "onnx"
    proc, url, _ = start_server({"TUNESERVE_ARTIFACT": str(art), "TUNESERVE_BACKEND": backend},
                                tmp_path_factory.mktemp("bentoml"))
    try:
        wait_ready(proc, url)
        yield url, manifest, backend
    finally:
        stop(proc)


def _predict(url: str, texts: list[str]) -> list[dict]:
    r = httpx.post(url + "/predict", json={"texts": texts}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def test_the_docs_are_the_models_own_and_load_nothing_from_another_host(served):
    url, manifest, backend = served
    spec = httpx.get(url + "/docs.json", timeout=TIMEOUT).json()
    info = spec["info"]
    assert manifest.name in info["title"] and manifest.task.value in info["title"]
    assert info["version"] not in (None, "", "None")
    test_metric = manifest.metrics["test"][manifest.primary_metric]
    for fact in [*manifest.labels, manifest.primary_metric, f"{test_metric:.4f}", backend]:
        assert fact in info["description"], fact
    assert "BentoML" not in info["description"] and "contact" not in info
    assert {"/predict", "/evaluate", "/metadata", "/livez", "/readyz", "/metrics"} <= set(spec["paths"])
    assert {"413", "415", "504"} <= set(spec["paths"]["/predict"]["post"]["responses"])

    page = httpx.get(url + "/docs", timeout=TIMEOUT)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    html = page.text
    title = re.search(r"<title>(.*?)</title>", html, re.DOTALL).group(1)
    assert manifest.name in title and manifest.task.value in title
    assert "googletagmanager" not in html.lower() and "swagger" not in html.lower()
    links = re.findall(r"""\b(?:src|href|action)\s*=\s*["']?([^"'\s>]+)""", html, re.IGNORECASE)
    assert links and not [link for link in links if re.match(r"(?i)(https?:)?//", link)], links
    assert not re.search(r"<(script|iframe|img|object|embed)\b", html, re.IGNORECASE)
    assert "@import" not in html and "url(" not in html  # nor from the style sheet
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if operation.get("x-other-kind-of-model"):  # named once, not documented
                assert f"<code>{path}</code>" in html and f"{method.upper()} {path}</code>" not in html, path
            else:
                assert f"{method.upper()} {path}</code>" in html, (method, path)
    assert info["description"].splitlines()[0] in html.replace("&#x27;", "'")

    # the example bodies the document shows are ones the server accepts
    for path in ("/predict", "/evaluate"):
        example = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["example"]
        assert httpx.post(url + path, json=example, timeout=TIMEOUT).status_code == 200, path


def test_accuracy_from_predict_in_batches_equals_evaluate_at_once(served):
    url, manifest, backend = served
    rows = make_rows(133, seed=21)
    predicted = []
    for start in range(0, len(rows), 7):
        predictions = _predict(url, [row["text"] for row in rows[start:start + 7]])
        assert all(p["label"] in manifest.labels for p in predictions)
        predicted += [p["label"] for p in predictions]
    truth = [row["label"] for row in rows]
    r = httpx.post(url + "/evaluate", json={"examples": [{"text": row["text"], "label": row["label"]} for row in rows]},
                   timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["backend"] == backend and body["n"] == len(rows)
    assert body["metrics"]["accuracy"] == pytest.approx(np.mean([p == t for p, t in zip(predicted, truth)]), abs=1e-12)
    index = {label: i for i, label in enumerate(manifest.labels)}
    confusion = np.zeros((len(index), len(index)), dtype=int)
    for t, p in zip(truth, predicted):
        confusion[index[t], index[p]] += 1
    assert body["confusion_matrix"] == confusion.tolist()


def test_concurrent_clients_get_the_answers_they_get_alone(served):
    url, _, backend = served
    clients, rounds = 8, 3
    # each client its own batch: 2 to 6 texts of various lengths, a few shared with other clients
    batches = [[row["text"] for row in make_rows(2 + i % 5, seed=100 + i)] + (["the plot was good"] if i % 3 == 0 else [])
               for i in range(clients)]
    alone = [_predict(url, batch) for batch in batches]
    barrier = threading.Barrier(clients, timeout=TIMEOUT)

    def client(i: int) -> list[list[dict]]:
        answers = []
        for _ in range(rounds):
            barrier.wait()  # every client posts at the same moment, so that their texts share forward passes
            answers.append(_predict(url, batches[i]))
        return answers

    with ThreadPoolExecutor(clients) as pool:
        together = [f.result(timeout=rounds * TIMEOUT + 10) for f in [pool.submit(client, i) for i in range(clients)]]
    worst = 0.0
    for i in range(clients):
        for answer in together[i]:
            assert [p["label"] for p in answer] == [p["label"] for p in alone[i]], (backend, i)
            for p, q in zip(answer, alone[i]):
                assert p["scores"].keys() == q["scores"].keys()
                worst = max(worst, *(abs(p["scores"][k] - q["scores"][k]) for k in p["scores"]))
    assert worst <= 1e-5, f"{backend}: scores moved by up to {worst:.3g} with other clients' texts in the batch"


def test_a_batch_job_answers_as_predict_does(served, artifacts, tmp_path):
    """`tuneserve batch` over a file and the served /predict over the same rows: the same labels, scores and flags."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.conftest import write_jsonl
    from training.batch import BatchOptions, run_batch

    url, _, backend = served
    texts = [r["text"] for r in make_rows(150, 23)] + [" ".join(["long"] * 80)]  # the last is cut at 32 tokens
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    summary = run_batch(BatchOptions(artifact=str(artifacts["classification"]), input=str(source),
                                     output=str(tmp_path / "out"), backend="auto", shard_rows=64, progress=False))
    assert summary.backend == backend  # what `auto` picks here is what the server was told to use
    rows = pa.concat_tables(pq.read_table(p) for p in sorted((tmp_path / "out").glob("part-*.parquet"))).to_pylist()
    served_answers = [p for i in range(0, len(texts), 50) for p in _predict(url, texts[i:i + 50])]
    assert [r["label"] for r in rows] == [p["label"] for p in served_answers]
    assert [r["truncated"] for r in rows] == [p["truncated"] for p in served_answers] and rows[-1]["truncated"]
    for row, answer in zip(rows, served_answers):
        assert row["score"] == pytest.approx(answer["score"], abs=1e-5)
        assert row["scores"] == pytest.approx(answer["scores"], abs=1e-5)
