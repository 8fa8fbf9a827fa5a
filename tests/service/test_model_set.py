"""Several models in one service (TUNESERVE_MODELS): each request names its model, and each model answers as it
does when served alone."""

from __future__ import annotations

import pytest

from core.errors import ArtifactError, ConfigError
from core.manifest import read_manifest
from service.models import ModelSet, ServedModel, sources
from service.settings import Settings


@pytest.fixture(scope="module")
def three(artifacts) -> str:
    return (f"sentiment={artifacts['classification']}, tags={artifacts['token']},"
            f"topics={artifacts['multilabel']}")


def test_each_request_names_its_model_and_gets_that_models_answer(artifacts, serve, three):
    alone = serve(artifacts["classification"], backend="onnx")
    texts = ["a superb plot", "dull and tedious acting"]
    expected = alone.post("/predict", json={"texts": texts}).json()["predictions"]
    tagged_alone = serve(artifacts["token"], backend="onnx").post(
        "/predict", json={"texts": ["alice met bob in paris"]}).json()["predictions"]
    client = serve(models=three, backend="onnx")

    listed = client.get("/models").json()["models"]
    assert [(m["name"], m["task"]) for m in listed] == [
        ("sentiment", "classification"), ("tags", "token_classification"), ("topics", "multilabel")]
    manifest = read_manifest(artifacts["classification"])
    assert listed[0]["labels"] == manifest.labels and listed[0]["backend"] == "onnx"
    assert listed[0]["test"] == manifest.metrics["test"][manifest.primary_metric]
    assert listed[0]["best_baseline"]["name"] in manifest.baselines

    body = client.post("/predict", json={"texts": texts, "model": "sentiment"}).json()
    assert body["model"] == "sentiment:local" and body["predictions"] == expected
    tagged = client.post("/predict", json={"texts": ["alice met bob in paris"], "model": "tags"}).json()
    assert tagged["predictions"] == tagged_alone and "entities" in tagged["predictions"][0]
    topics = client.post("/predict", json={"texts": texts, "model": "topics"}).json()["predictions"]
    assert all("labels" in p for p in topics)
    rows = [{"text": t, "label": p["label"]} for t, p in zip(texts, expected)]
    evaluated = client.post("/evaluate", json={"examples": rows, "model": "sentiment"}).json()
    assert evaluated["model"] == "sentiment:local" and evaluated["metrics"]["accuracy"] == 1.0
    assert client.get("/metadata", params={"model": "tags"}).json()["task"] == "token_classification"
    assert client.get("/card", params={"model": "topics"}).status_code == 200

    # without a name, or with a wrong one, nothing is guessed
    unnamed = client.post("/predict", json={"texts": texts})
    assert unnamed.status_code == 400 and unnamed.json()["field"] == "model"
    assert "sentiment, tags, topics" in unnamed.json()["error"]
    for response in (client.post("/predict", json={"texts": texts, "model": "sentimnet"}),
                     client.post("/evaluate", json={"examples": rows, "model": "sentimnet"}),
                     client.get("/metadata", params={"model": "sentimnet"}),
                     client.get("/report", params={"model": "sentimnet"})):
        assert response.status_code == 404, response.text
        assert response.json()["field"] == "model" and "served: sentiment, tags, topics" in response.json()["error"]
    assert client.get("/metadata").status_code == 400
    # a route the named model has no use for
    wrong = client.post("/embed", json={"texts": texts, "model": "tags"})
    assert wrong.status_code == 404 and wrong.json()["error"].startswith("/embed: tags is a token_classification")


def test_the_models_setting_names_directories_tags_and_directories_of_artifacts(artifacts, tmp_path):
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    (shelf / "b-tags").symlink_to(artifacts["token"])
    (shelf / "a-sentiment").symlink_to(artifacts["classification"])
    (shelf / "notes").mkdir()  # not an artifact: passed over
    found = sources(Settings(models=f"{shelf}, topics={artifacts['multilabel']}, sentiment-lora-onnx:latest"))
    assert [(s.directory.name if s.directory else None, s.tag, s.name) for s in found] == [
        ("a-sentiment", None, None), ("b-tags", None, None), (artifacts["multilabel"].name, None, "topics"),
        (None, "sentiment-lora-onnx:latest", None)]

    refused = {
        "  , ": "no model named",
        f"{tmp_path / 'nosuch'}": "no such directory",
        f"{shelf / 'notes'}": "no artifact in it",
        f"all={shelf}": "NAME= names one model",
    }
    for value, message in refused.items():
        with pytest.raises(ConfigError, match=message):
            sources(Settings(models=value))
    with pytest.raises(ConfigError, match="names 2 models, over TUNESERVE_MAX_MODELS=1"):
        sources(Settings(models=str(shelf), max_models=1))
    with pytest.raises(ConfigError, match="both set"):
        sources(Settings(models=str(shelf), artifact=artifacts["token"]))

    # two models of one name cannot be told apart by a request
    twins = [ServedModel("run", "run:local", artifacts[k], read_manifest(artifacts[k]), None, None, 0.0)
             for k in ("classification", "token")]
    with pytest.raises(ArtifactError, match="two models are named 'run'.*NAME=SOURCE"):
        ModelSet.of(twins)


def test_models_over_one_base_share_its_graph_and_each_answers_as_alone(shared_artifacts, serve):
    import concurrent.futures

    texts = {"sentiment": ["a superb plot", "dull and tedious acting", "the music was lovely"],
             "tags": ["alice met bob in paris", "bob went home"], "topics": ["the plot and the music"]}
    alone = {name: serve(directory, backend="onnx").post("/predict", json={"texts": texts[name]}).json()["predictions"]
             for name, directory in shared_artifacts.items()}
    client = serve(models=",".join(str(d) for d in shared_artifacts.values()))
    listed = client.get("/models").json()["models"]
    assert [m["name"] for m in listed] == list(shared_artifacts)
    assert {m["backend"] for m in listed} == {"onnx-shared"} and len({m["shared_base"] for m in listed}) == 1

    def ask(name: str) -> tuple[str, list]:
        response = client.post("/predict", json={"texts": texts[name], "model": name})
        assert response.status_code == 200, response.text
        return name, response.json()["predictions"]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, [name for name in shared_artifacts for _ in range(4)]))
    for name, predictions in answers:
        for got, want in zip(predictions, alone[name]):
            if "entities" in want:
                assert [(e["start"], e["end"], e["label"]) for e in got["entities"]] == [
                    (e["start"], e["end"], e["label"]) for e in want["entities"]]
                assert [e["score"] for e in got["entities"]] == pytest.approx([e["score"] for e in want["entities"]], abs=1e-4)
            else:
                assert got.get("label") == want.get("label") and got.get("labels") == want.get("labels")
                assert list(got["scores"].values()) == pytest.approx(list(want["scores"].values()), abs=1e-4)


def test_models_are_added_and_removed_while_the_others_keep_answering(shared_artifacts, serve, tmp_path):
    import concurrent.futures

    key = {"Authorization": "Bearer k"}
    from service.middleware import _api_path

    # the key guards the routes that change the set (the in-process app is built before the key is set)
    assert _api_path({"path": "/models"}) and _api_path({"path": "/models/tags"})
    # (one in-process service at a time: the routes mounted beside BentoML's answer for the latest one started)
    alone = serve(shared_artifacts["topics"], backend="onnx").post("/predict", json={"texts": ["the plot and the music"]})
    client = serve(models=f"{shared_artifacts['sentiment']},{shared_artifacts['tags']}", api_key="k")

    def ask(_) -> int:
        return client.post("/predict", json={"texts": ["a superb plot"], "model": "sentiment"}, headers=key).status_code

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        during = pool.map(ask, range(40))
        added = client.post("/models", json={"source": str(shared_artifacts["topics"])}, headers=key)
        statuses = list(during)
    assert added.status_code == 201, added.text
    assert added.json()["added"]["name"] == "topics" and added.json()["added"]["backend"] == "onnx-shared"
    assert statuses == [200] * 40  # every request to another model was answered meanwhile
    answer = client.post("/predict", json={"texts": ["the plot and the music"], "model": "topics"}, headers=key)
    assert answer.json()["predictions"][0]["labels"] == alone.json()["predictions"][0]["labels"]

    again = client.post("/models", json={"source": str(shared_artifacts["topics"])}, headers=key)
    assert again.status_code == 409 and "served already" in again.json()["error"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    refused = client.post("/models", json={"source": str(broken)}, headers=key)
    assert refused.status_code == 422 and refused.json()["field"] == "source"
    assert "\n" not in refused.json()["error"]
    missing = client.post("/models", json={"source": str(tmp_path / "nosuch")}, headers=key)
    assert missing.status_code == 400 and "no such directory" in missing.json()["error"]
    assert client.post("/models", json={"source": "x", "colour": 1}, headers=key).status_code == 400

    assert client.delete("/models/tags", headers=key).json() == {"removed": "tags"}
    gone = client.post("/predict", json={"texts": ["alice met bob"], "model": "tags"}, headers=key)
    assert gone.status_code == 404 and "served: sentiment, topics" in gone.json()["error"]
    assert client.delete("/models/tags", headers=key).status_code == 404
    assert [m["name"] for m in client.get("/models", headers=key).json()["models"]] == ["sentiment", "topics"]
    assert ask(0) == 200

    locked = serve(models=str(shared_artifacts["sentiment"]))  # no API key: nobody may change the set
    assert locked.post("/models", json={"source": str(shared_artifacts["topics"])}).status_code == 403
    capped = serve(models=str(shared_artifacts["sentiment"]), api_key="k", max_models=1)
    full = capped.post("/models", json={"source": str(shared_artifacts["topics"])}, headers=key)
    assert full.status_code == 409 and "TUNESERVE_MAX_MODELS=1" in full.json()["error"]


def test_a_registered_set_is_served_by_a_real_server_from_the_store(shared_artifacts, tmp_path):
    """`tuneserve register A B --onnx-only`, then `bentoml serve` with TUNESERVE_MODELS naming the store tags: the
    service declares each as a model of its own (what `bentoml build` packages) and serves them over one base."""
    import subprocess
    import sys

    import httpx

    from tests.service.test_serve_process import start_server, stop, wait_ready

    home = tmp_path / "bentoml"
    env = {**__import__("os").environ, "BENTOML_HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "training.cli", "register", str(shared_artifacts["sentiment"]),
                           str(shared_artifacts["tags"]), "--onnx-only"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    tags = done.stdout.split()
    assert [t.split(":")[0] for t in tags] == ["sentiment-onnx", "tags-onnx"]
    assert f"TUNESERVE_MODELS={','.join(tags)}" in done.stderr
    proc, url, _ = start_server({"TUNESERVE_MODELS": ",".join(tags)}, home)
    try:
        wait_ready(proc, url)
        listed = httpx.get(url + "/models").json()["models"]
        assert [(m["name"], m["model"], m["backend"]) for m in listed] == [
            ("sentiment", tags[0], "onnx-shared"), ("tags", tags[1], "onnx-shared")]
        answer = httpx.post(url + "/predict", json={"texts": ["alice met bob"], "model": "tags"}).json()
        assert answer["model"] == tags[1] and "entities" in answer["predictions"][0]
    finally:
        stop(proc)
