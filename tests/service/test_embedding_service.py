"""The service over a sentence-embedding model: /embed, /rank and /evaluate, their limits, and the routes it does not
answer."""

from __future__ import annotations

import numpy as np
import pytest

from core.manifest import read_manifest
from tests.conftest import make_pairs


def test_embed_gives_unit_vectors_and_truncates_on_request(serve, embedding_artifact):
    client = serve(embedding_artifact)
    body = client.post("/embed", json={"texts": ["copy files", "kill processes with a tool"]}).json()
    vectors = np.asarray(body["embeddings"])
    assert vectors.shape == (2, 32) and body["dimensions"] == 32 and body["truncated"] == []
    long = client.post("/embed", json={"texts": ["copy files", "copy files " * 300]}).json()
    assert long["truncated"] == [1]  # the second text is longer than the model reads
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert body["backend"] in ("onnx", "onnx-int8")
    short = np.asarray(client.post("/embed", json={"texts": ["copy files"], "dimensions": 8}).json()["embeddings"])
    np.testing.assert_allclose(short[0], vectors[0, :8] / np.linalg.norm(vectors[0, :8]), atol=1e-5)
    too_wide = client.post("/embed", json={"texts": ["copy files"], "dimensions": 33})
    assert too_wide.status_code == 400 and "dimensions: 33 is more than the model's 32" in too_wide.json()["error"]
    # The same text gives the same vector whatever shares its pass.
    alone = np.asarray(client.post("/embed", json={"texts": ["copy files"]}).json()["embeddings"][0])
    np.testing.assert_allclose(alone, vectors[0], atol=1e-5)


def test_rank_orders_candidates_by_cosine_and_keeps_top_k(serve, embedding_artifact):
    client = serve(embedding_artifact)
    candidates = ["utility to copy files into directories", "kill processes of users", "mount disks", "sort lines"]
    ranked = client.post("/rank", json={"query": "copy files", "candidates": candidates}).json()["results"]
    vectors = np.asarray(client.post("/embed", json={"texts": ["copy files", *candidates]}).json()["embeddings"])
    expected = vectors[1:] @ vectors[0]
    assert [r["index"] for r in ranked] == list(np.argsort(-expected, kind="stable"))
    assert [r["score"] for r in ranked] == pytest.approx(sorted(expected, reverse=True), abs=1e-5)
    assert [r["text"] for r in ranked] == [candidates[r["index"]] for r in ranked]
    top = client.post("/rank", json={"query": "copy files", "candidates": candidates, "top_k": 2}).json()["results"]
    assert top == ranked[:2]


def test_limits_and_the_routes_of_other_kinds_of_model(serve, embedding_artifact, artifacts):
    client = serve(embedding_artifact, max_texts=3, max_chars=40)
    many = client.post("/rank", json={"query": "copy", "candidates": ["a", "b", "c", "d"]})
    assert many.status_code == 400 and "candidates" in many.text
    long = client.post("/embed", json={"texts": ["x" * 41]})
    assert long.status_code == 400 and "texts" in long.text and "40" in long.text
    empty = client.post("/rank", json={"query": "copy", "candidates": []})
    assert empty.status_code == 400 and "candidates" in empty.text
    predict = client.post("/predict", json={"texts": ["copy files"]})
    assert predict.status_code == 404 and "POST /embed" in predict.json()["error"]
    # /evaluate ranks every query against every distinct positive: the corpus has a limit of its own
    ranked = serve(embedding_artifact, max_corpus=3)
    pairs = [{"query": f"query {i}", "positive": f"document {i % 4}"} for i in range(8)]
    over = ranked.post("/evaluate", json={"examples": pairs})
    assert over.status_code == 400
    assert over.json()["error"].startswith("examples: 4 distinct documents to rank")
    assert "TUNESERVE_MAX_CORPUS" in over.text
    assert ranked.post("/evaluate", json={"examples": pairs[:3] * 2}).status_code == 200  # 6 examples, 3 documents
    assert ranked.get("/metadata").json()["limits"]["max_corpus"] == 3
    evaluate = ranked.get("/docs.json").json()["paths"]["/evaluate"]["post"]
    assert "At most 3 distinct documents" in evaluate["description"]
    # it reads two texts per example (the query and its positive): those count against the example limit
    reads = serve(embedding_artifact, max_examples=10)
    many = reads.post("/evaluate", json={"examples": pairs[:6]})
    assert many.status_code == 400 and "reads 12 texts" in many.text and "at most 5 examples" in many.text
    assert reads.post("/evaluate", json={"examples": pairs[:5]}).status_code == 200
    classifier = serve(artifacts["classification"])
    assert "max_corpus" not in classifier.get("/metadata").json()["limits"]
    for route, body in (("/embed", {"texts": ["a"]}), ("/rank", {"query": "a", "candidates": ["b"]})):
        answer = classifier.post(route, json=body)
        assert answer.status_code == 404 and "does not embed text" in answer.json()["error"]


def test_evaluate_ranks_the_posted_positives_as_training_scored_its_test_split(serve, embedding_artifact):
    client = serve(embedding_artifact)
    manifest = read_manifest(embedding_artifact)
    rows = make_pairs(60, 3)  # the test split the trainer scored
    body = client.post("/evaluate", json={"examples": rows}).json()
    assert body["n"] == 60 and set(body["metrics"]) == set(manifest.task.spec.metric_names)
    assert body["notes"][0].startswith("corpus of ")
    # The metrics are those of the served vectors, computed as the trainer computes them.
    texts = [r["query"] for r in rows] + [r["positive"] for r in rows]
    vectors = np.asarray(client.post("/embed", json={"texts": texts}).json()["embeddings"])
    expected = manifest.task.spec.evaluate([r["positive"] for r in rows], np.stack([vectors[:60], vectors[60:]], 1))
    assert body["metrics"] == pytest.approx(expected.metrics, abs=1e-6)
    # The served backend agrees with the PyTorch model the trainer measured, within what the export gate allowed.
    assert body["metrics"]["ndcg@10"] == pytest.approx(manifest.metrics["test"]["ndcg@10"], abs=0.01)
    missing = client.post("/evaluate", json={"examples": [{"query": "copy files"}]})
    assert missing.status_code == 400 and "examples[0].positive" in missing.json()["error"]
    both = client.post("/evaluate", json={"examples": [{"query": "a", "text": "b", "positive": "c"}]})
    assert both.status_code == 400 and "not both" in both.json()["error"]


def test_the_command_line_embeds_and_evaluates_as_the_service(serve, embedding_artifact, tmp_path, capsys):
    import json

    from tests.conftest import write_jsonl
    from training.cli import main

    client = serve(embedding_artifact)
    served = client.post("/embed", json={"texts": ["copy files"]}).json()
    assert main(["predict", str(embedding_artifact), "copy files"]) == 0
    printed = json.loads(capsys.readouterr().out.strip())
    assert printed["text"] == "copy files"
    np.testing.assert_allclose(printed["embedding"], served["embeddings"][0], atol=1e-4)  # printed with 4 digits
    rows = make_pairs(40, 7)
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert main(["evaluate", str(embedding_artifact), "--data", str(tmp_path / "pairs.jsonl"),
                 "--output", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    posted = client.post("/evaluate", json={"examples": rows}).json()
    assert report["metrics"] == pytest.approx(posted["metrics"], abs=1e-6) and report["n"] == 40


def test_a_real_server_embeds_with_the_torch_backend_as_onnx_does(serve, embedding_artifact, tmp_path):
    """`bentoml serve` on 127.0.0.1 over the artifact with the torch backend (the transformer with its pooling, as
    the trainer ran it): the same vectors as the ONNX graph, /rank and the routes in the API document."""
    import httpx

    from tests.service.test_serve_process import start_server, stop, wait_ready

    env = {"TUNESERVE_ARTIFACT": str(embedding_artifact), "TUNESERVE_BACKEND": "torch", "TUNESERVE_DEVICE": "cpu"}
    proc, url, log = start_server(env, tmp_path / "bentoml")
    try:
        wait_ready(proc, url)
        texts = ["copy files", "kill processes with a tool", "mount disks of users"]
        served = httpx.post(url + "/embed", json={"texts": texts}, timeout=30).json()
        assert served["backend"] == "torch-cpu"
        onnx = serve(embedding_artifact, backend="onnx").post("/embed", json={"texts": texts}).json()
        assert onnx["backend"] == "onnx"
        np.testing.assert_allclose(served["embeddings"], onnx["embeddings"], atol=1e-4)
        ranked = httpx.post(url + "/rank", json={"query": texts[0], "candidates": texts[1:]}, timeout=30)
        assert ranked.status_code == 200 and len(ranked.json()["results"]) == 2
        paths = httpx.get(url + "/docs.json", timeout=30).json()["paths"]
        assert {"/embed", "/rank", "/evaluate"} <= set(paths)
        assert "404" in str(paths["/predict"]["post"]["responses"].keys())  # documented as not for this model
    finally:
        stop(proc)
    assert "self-test passed" in log.read_text()
