"""The service in-process (Service.to_asgi() + TestClient): every endpoint, task and error."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from core.manifest import read_manifest
from core.tasks import postprocess
from tests.conftest import make_rows
from training.inference import load_artifact, predict_logits


def _rows(n=40, seed=7):
    return make_rows(n, seed)


def test_predict_classification_matches_pytorch(artifacts, serve):
    art = artifacts["classification"]
    client = serve(art, backend="onnx")
    texts = ["a superb plot", "dull and tedious acting", "the music was lovely"]
    r = client.post("/predict", json={"texts": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["backend"] == "onnx" and body["model"].endswith(":local")
    manifest = read_manifest(art)
    # the scores are calibrated: the softmax of the logits divided by the temperature fitted on validation
    temperature = manifest.calibration.temperature
    assert manifest.calibration.method == "temperature" and temperature > 0
    expected = postprocess(predict_logits(load_artifact(art), texts) / temperature, manifest.postprocess)
    for prediction, row in zip(body["predictions"], expected):
        assert prediction["label"] == manifest.labels[int(row.argmax())]
        assert prediction["score"] == pytest.approx(float(row.max()), abs=1e-4)
        assert set(prediction["scores"]) == set(manifest.labels)
        assert list(prediction["scores"].values()) == sorted(prediction["scores"].values(), reverse=True)
    top1 = client.post("/predict", json={"texts": texts, "top_k": 1}).json()["predictions"]
    assert all(len(p["scores"]) == 1 and list(p["scores"]) == [p["label"]] for p in top1)


def test_multilabel_and_regression_predictions(artifacts, serve):
    manifest = read_manifest(artifacts["multilabel"])
    client = serve(artifacts["multilabel"], backend="onnx")
    prediction = client.post("/predict", json={"texts": ["the plot and the music"]}).json()["predictions"][0]
    assert set(prediction["scores"]) == set(manifest.labels)
    assert prediction["labels"] == [n for n, p in prediction["scores"].items() if p >= manifest.thresholds[n]]
    logits = predict_logits(load_artifact(artifacts["multilabel"]), ["the plot and the music"])[0]
    platt = manifest.calibration  # per label: sigmoid(logit * scale + bias)
    expected = 1 / (1 + np.exp(-(logits * np.array(platt.scale) + np.array(platt.bias))))
    assert np.allclose(list(prediction["scores"].values()), expected, atol=1e-4)

    art = artifacts["regression"]
    client = serve(art, backend="onnx")
    texts = ["a superb plot", "dull and tedious acting"]
    values = [p["value"] for p in client.post("/predict", json={"texts": texts}).json()["predictions"]]
    assert np.allclose(values, predict_logits(load_artifact(art), texts)[:, 0], atol=1e-4)


def test_pair_model_needs_pairs_and_a_single_text_model_refuses_them(artifacts, serve):
    client = serve(artifacts["pair"], backend="onnx")
    r = client.post("/predict", json={"texts": ["good film"]})
    assert r.status_code == 400 and "text_pairs" in r.json()["error"]
    r = client.post("/predict", json={"texts": ["good film", "bad film"], "text_pairs": ["a note"]})
    assert r.status_code == 400 and "1 items for 2 texts" in r.json()["error"]
    r = client.post("/predict", json={"texts": ["good film"], "text_pairs": ["a note about the plot"]})
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] in ("negative", "positive")

    single = serve(artifacts["classification"], backend="onnx")
    r = single.post("/predict", json={"texts": ["good"], "text_pairs": ["x"]})
    assert r.status_code == 400 and "single texts" in r.json()["error"]


@pytest.mark.parametrize("body, status, words", [
    ({"texts": []}, 400, "texts: List should have at least 1 item"),
    ({"texts": ["ok", 3]}, 400, "texts"),
    ({"texts": "not a list"}, 400, "texts"),
    ({}, 400, "texts"),
    ({"texts": ["x"] * 5}, 400, "limit is 4"),
    ({"texts": ["x" * 101]}, 400, "limit is 100"),
    ({"texts": ["ok"], "top_k": 0}, 400, "top_k"),
])
def test_bad_predict_requests_get_400_naming_the_field(artifacts, serve, body, status, words):
    client = serve(artifacts["classification"], backend="onnx", max_texts=4, max_chars=100)
    r = client.post("/predict", json=body)
    assert r.status_code == status, r.text
    assert words in r.text


def test_unicode_and_nul_get_answers_and_empty_texts_are_refused_by_index(artifacts, serve):
    client = serve(artifacts["classification"], backend="onnx")
    texts = ["\x00\x00", "great 😀 film", "فيلم رائع", "\u202egood\u202c"]
    r = client.post("/predict", json={"texts": texts})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == len(texts)
    for blank in ("", " \n\t\u3000"):
        r = client.post("/predict", json={"texts": ["fine", blank]})
        assert r.status_code == 400 and r.json()["error"] == "texts[1]: empty or only whitespace; give the text to score"
    r = client.post("/predict", content=b'{"texts": ["\xff\xfe"]}', headers={"content-type": "application/json"})
    assert r.status_code == 400


def test_evaluate_matches_the_trainers_metrics_on_the_test_split(artifacts, serve):
    art = artifacts["classification"]
    manifest = read_manifest(art)
    rows = [json.loads(line) for line in (art.parent.parent / "test.jsonl").read_text().splitlines()]
    client = serve(art, backend="torch", device="cpu")
    r = client.post("/evaluate", json={"examples": [{"text": x["text"], "label": x["label"]} for x in rows]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["n"] == 60 and body["backend"] == "torch-cpu"
    trained = manifest.metrics["test"]
    assert set(body["metrics"]) == set(trained) - {"loss"}  # the trainer also records its loss
    for name, value in body["metrics"].items():
        assert value == pytest.approx(trained[name], abs=1e-6), name
        assert body["delta"][name] == pytest.approx(0.0, abs=1e-6)
    assert body["training_metrics"] == pytest.approx(manifest.metrics["test"])
    assert np.array(body["confusion_matrix"]).sum() == 60
    assert set(body["per_class"]) == set(manifest.labels)
    # every metric has its 95% interval, and the split the figures came from shows no drift from them
    assert set(body["intervals"]) == set(body["metrics"])
    for name, (low, high) in body["intervals"].items():
        assert low <= body["metrics"][name] <= high, name
    assert body["drift"] == []

    # two examples of one label: macro figures over that label, an honest interval, nothing called drift
    first = next(x for x in rows if x["label"] == manifest.labels[0])
    second = next(x for x in rows if x["label"] == manifest.labels[0] and x is not first)
    r = client.post("/evaluate", json={"examples": [{"text": x["text"], "label": x["label"]} for x in (first, second)]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["n"] == 2 and body["macro_over"] == [manifest.labels[0]] and body["drift"] == []
    assert body["intervals"]["accuracy"][1] - body["intervals"]["accuracy"][0] > 0.8
    assert "f1_macro" not in body["intervals"]
    assert any("too few to bound" in note for note in body["notes"])


def test_evaluate_other_tasks_and_bad_labels(artifacts, serve):
    rows = _rows()
    multi = serve(artifacts["multilabel"], backend="onnx")
    r = multi.post("/evaluate", json={"examples": [{"text": x["text"], "labels": x["topics"]} for x in rows]})
    assert r.status_code == 200 and {"f1_micro", "hamming_loss"} <= set(r.json()["metrics"])
    reg = serve(artifacts["regression"], backend="onnx")
    r = reg.post("/evaluate", json={"examples": [{"text": x["text"], "label": x["score"]} for x in rows]})
    assert r.status_code == 200 and {"mse", "r2"} <= set(r.json()["metrics"])
    assert not {"confusion_matrix", "per_class"} & set(r.json())  # a regression model fills neither table

    client = serve(artifacts["classification"], backend="onnx", max_examples=50)
    examples = [{"text": x["text"], "label": x["label"]} for x in rows]
    r = client.post("/evaluate", json={"examples": examples[:3] + [{"text": "x", "label": "meh"},
                                                                    {"text": "y", "label": "so-so"}]})
    assert r.status_code == 400 and "'meh'" in r.text and "'so-so'" in r.text
    r = client.post("/evaluate", json={"examples": [{"text": "x"}]})
    assert r.status_code == 400 and "examples[0].label" in r.json()["error"]
    r = client.post("/evaluate", json={"examples": examples * 2})
    assert r.status_code == 400 and "limit is 50" in r.json()["error"]
    r = client.post("/evaluate", json={"examples": [{"text": "x", "label": "positive", "extra": 1}]})
    assert r.status_code == 400 and "extra" in r.text


def test_metadata_docs_and_probes(artifacts, serve):
    art = artifacts["classification"]
    client = serve(art, backend="onnx")
    meta = client.get("/metadata")
    assert meta.status_code == 200, meta.text
    body = meta.json()
    manifest = read_manifest(art)
    assert body["task"] == "classification" and body["labels"] == manifest.labels
    assert body["backend"] == "onnx" and body["parity"]["onnx"]["label_agreement"] >= 0.999
    assert body["execution_provider"] == "CPUExecutionProvider"
    assert body["selftest"]["examples"] == 8 and body["metrics"]["test"] == manifest.metrics["test"]
    assert "onnxruntime" in body["versions"]["serving"]
    spec = client.get("/docs.json").json()
    assert {"/predict", "/evaluate"} <= set(spec["paths"])
    # what the middleware answers is documented too
    assert {"400", "413", "415", "504"} <= set(spec["paths"]["/predict"]["post"]["responses"])
    # (/metrics needs the Prometheus set-up of a real server: tested in test_serve_process.py)
    assert client.get("/readyz").status_code == 200 and client.get("/livez").status_code == 200


def test_auto_backend_picks_int8_when_the_artifact_kept_it(artifacts, serve):
    art = artifacts["classification"]
    kept = bool(read_manifest(art).export.variant("onnx-int8"))
    client = serve(art)
    assert client.post("/predict", json={"texts": ["fine"]}).json()["backend"] == ("onnx-int8" if kept else "onnx")


def test_pickle_and_other_media_types_are_refused(artifacts, serve, tmp_path):
    import pickle

    client = serve(artifacts["classification"], backend="onnx")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    r = client.post("/predict", content=pickle.dumps(Exploit()),
                    headers={"content-type": "application/vnd.bentoml+pickle"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    assert not marker.exists()
    r = client.post("/predict", content=b"texts=a", headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415


def test_concurrent_requests_share_forward_passes(artifacts, serve):
    from concurrent.futures import ThreadPoolExecutor

    import bentoml

    client = serve(artifacts["classification"], backend="onnx")
    texts = [r["text"] for r in _rows(48)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda t: client.post("/predict", json={"texts": [t]}).json(), texts))
    alone = client.post("/predict", json={"texts": texts}).json()["predictions"]
    for answer, expected in zip(answers, alone):
        assert answer["predictions"][0]["label"] == expected["label"]
        assert answer["predictions"][0]["score"] == pytest.approx(expected["score"], abs=1e-5)
    # Single-text requests that arrived together were run as one forward pass.
    assert max(bentoml.get_current_service().batcher.batch_sizes) > 1


@pytest.mark.parametrize("body", [
    b'{"texts": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",              # deeply nested
    b'{"texts": ["ok"], "top_k": 1' + b"0" * 5000 + b"}",                  # a 5000-digit number
    b'{"texts": ["ok"], "top_k": 1e999}',                                  # overflows to infinity
    b'{"texts": ["ok"], "top_k": NaN}',                                     # not JSON
    b'{"texts": ["ok"]',                                                    # truncated
    b'\xef\xbb\xbf{"texts": ["ok"]}',                                       # byte-order mark
    b'{"texts": ["ok"], "texts": ["twice"]}',                              # duplicate key
], ids=["nested", "huge-int", "huge-float", "nan", "truncated", "bom", "duplicate-key"])
def test_hostile_bodies_get_an_answer_not_a_crash(artifacts, serve, body):
    client = serve(artifacts["classification"], backend="onnx")
    r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code in (200, 400), r.text
    assert "error" in r.json() if r.status_code == 400 else len(r.json()["predictions"]) == 1
    assert client.post("/predict", json={"texts": ["still serving"]}).status_code == 200


def test_the_self_test_refuses_a_lying_manifest_and_a_backend_that_disagrees(artifacts, tmp_path):
    import shutil

    from core.errors import ArtifactError
    from service.backends import OnnxBackend
    from service.selftest import OWN_TOLERANCE, run_selftest

    art = tmp_path / "artifact"
    shutil.copytree(artifacts["classification"], art)
    manifest = read_manifest(art)
    backend = OnnxBackend(art, manifest, int8=False, threads=1, batch_size=8)
    passed = run_selftest(backend, manifest)
    assert passed["examples"] == 8
    # held to its own outputs recorded at export, tightly: not to PyTorch's at the widest gap the gate saw
    assert all("onnx" in sample.variants for sample in manifest.export.selftest)
    assert passed["tolerance"] == OWN_TOLERANCE and passed["max_abs_diff"] < OWN_TOLERANCE

    class Drifting:
        name = "onnx"

        def logits(self, texts, pairs):  # a few thousandths off its own export-time scores
            out = backend.logits(texts, pairs)
            out[:, 0] += 0.05
            return out

    with pytest.raises(ArtifactError, match="away from its own scores at export|at export it predicted"):
        run_selftest(Drifting(), manifest)

    lying = manifest.model_copy(update={"labels": list(reversed(manifest.labels))})
    with pytest.raises(ArtifactError, match="do not belong to this model"):
        run_selftest(backend, lying)

    class Disagreeing:
        name = "onnx"

        def logits(self, texts, pairs):
            return -backend.logits(texts, pairs)  # every decision flipped

    with pytest.raises(ArtifactError, match="predicts"):
        run_selftest(Disagreeing(), manifest)

    class BatchDependent:
        name = "onnx"

        def logits(self, texts, pairs):  # what dynamic int8 does: each input's numbers move with its batch-mates
            out = backend.logits(texts, pairs)
            out[:, 0] += 1e-4 * (len(texts) - 1)  # within the score tolerance, but not the same alone
            return out

    with pytest.raises(ArtifactError, match="depend on the batch"):
        run_selftest(BatchDependent(), manifest)
    no_samples = manifest.model_copy(update={"export": manifest.export.model_copy(update={"selftest": []})})
    with pytest.raises(ArtifactError, match="no self-test examples"):
        run_selftest(backend, no_samples)


def test_each_answer_says_when_its_text_was_longer_than_the_model_reads(artifacts, serve):
    manifest = read_manifest(artifacts["classification"])
    client = serve(artifacts["classification"], backend="onnx")
    long = "a fine film " * manifest.max_length  # three words a repeat: far past max_length tokens
    r = client.post("/predict", json={"texts": ["a fine film", long, long * 20]})
    assert r.status_code == 200, r.text
    answers = r.json()["predictions"]
    assert [a["truncated"] for a in answers] == [False, True, True]
    # what the model reads of a long text is its beginning: the same answer however much more follows
    assert answers[1]["scores"] == answers[2]["scores"]


def test_truncation_is_the_same_counted_beside_a_lone_pass_or_after_a_busy_one(artifacts):
    """An idle model counts a request's tokens in a second thread while its pass runs; a busy one after the pass."""
    from service.backends import OnnxBackend
    from service.scorer import Scorer
    from service.settings import Settings

    directory = artifacts["classification"]
    manifest = read_manifest(directory)
    scorer = Scorer(OnnxBackend(directory, manifest, int8=False, threads=1, batch_size=8), manifest, Settings())
    texts = ["a fine film", "a fine film " * manifest.max_length]

    async def alone_and_busy():
        assert not scorer.batcher.busy
        alone = await scorer.scores_and_truncation(texts, None)
        other = asyncio.ensure_future(scorer.scores(["a dull film"] * 64))  # another request keeps the model busy
        await asyncio.sleep(0)
        assert scorer.batcher.busy
        busy = await scorer.scores_and_truncation(texts, None)
        await other
        return alone, busy

    (scores, cut), (busy_scores, busy_cut) = asyncio.run(alone_and_busy())
    assert cut == busy_cut == [False, True]
    np.testing.assert_allclose(busy_scores, scores, atol=1e-6)


def test_every_4xx_has_one_body_shape_and_unknown_fields_are_refused_on_every_route(artifacts, serve):
    client = serve(artifacts["classification"], backend="onnx")
    cases = [
        ("/predict", {"texts": ["fine", ""]}, "texts[1]"),  # the route's own check
        ("/predict", {"texts": "not a list"}, "texts"),  # the schema's
        ("/predict", {"texts": ["fine"], "top_k": 0}, "top_k"),
        ("/predict", {"txts": ["fine"]}, "txts"),  # unknown: refused, with the close name
        ("/evaluate", {"examples": [{"text": "fine", "label": "positive"}], "extra": 1}, "extra"),
        ("/evaluate", {"examples": [{"text": "fine", "label": "nonsense"}]}, "examples"),
        ("/generate", {"prompts": ["hi"]}, None),  # not this model's route
    ]
    for path, body, field in cases:
        r = client.post(path, json=body)
        assert 400 <= r.status_code < 500, (path, body, r.status_code)
        answer = r.json()
        assert set(answer) <= {"error", "field", "detail"} and answer["field"] == field, (body, answer)
        assert isinstance(answer["error"], str) and "\n" not in answer["error"] and answer["error"], answer
        assert not answer["error"].startswith(":"), answer
    r = client.post("/predict", json={"txts": ["fine"]})
    assert r.json()["error"] == "txts: unknown field; did you mean texts? this route takes model, text_pairs, texts, top_k"
    bad_json = client.post("/predict", content=b'{"texts": [', headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["field"] in (None, "body"), bad_json.text
    assert not bad_json.json()["error"].startswith(":"), bad_json.text
