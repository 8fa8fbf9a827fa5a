"""/evaluate's worst examples, and evaluations posted in parts: the last part is answered with the report one request
holding every example gives (figures, intervals and worst examples alike); a part that does not continue its
evaluation gets 409 saying why."""

from __future__ import annotations

import math

import pytest

from tests.conftest import make_entity_rows, make_rows

ROWS = make_rows(45, 97)


def examples_of(task: str) -> list[dict]:
    if task == "token":
        return [{"tokens": r["tokens"], "tags": r["tags"]} for r in make_entity_rows(45, 96)]
    key = {"classification": ("label", "label"), "multilabel": ("labels", "topics"), "regression": ("label", "score")}
    field, column = key[task]
    return [{"text": r["text"], field: r[column]} for r in ROWS]


def in_parts(client, examples: list[dict], sizes: list[int], evaluation: str = "evaluation-1") -> list[dict]:
    answers, at = [], 0
    for index, size in enumerate(sizes):
        part = {"id": evaluation, "index": index, "last": index == len(sizes) - 1}
        r = client.post("/evaluate", json={"examples": examples[at:at + size], "part": part})
        assert r.status_code == 200, r.text
        answers.append(r.json())
        at += size
    assert at == len(examples)
    return answers


def without_parts(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("notes", "part")}


@pytest.mark.parametrize("task", ["classification", "multilabel", "regression", "token"])
def test_an_evaluation_in_parts_gets_the_report_of_one_request(artifacts, serve, task):
    client = serve(artifacts[task], backend="onnx")
    examples = examples_of(task)
    whole = client.post("/evaluate", json={"examples": examples}).json()
    answers = in_parts(client, examples, [20, 20, 5])
    last = answers[-1]
    assert without_parts(last) == without_parts(whole)
    assert last["part"] == {"id": "evaluation-1", "index": 2, "last": True, "examples": 45}
    assert any("posted in 3 parts" in note for note in last["notes"])
    # the parts before it: their own figures, no intervals, and how many examples are held so far
    first = answers[0]
    assert first["n"] == 20 and first["intervals"] == {} and first["part"]["examples"] == 20
    assert answers[1]["part"]["examples"] == 40
    # the worst examples: the highest losses, worst first, indexed among all the examples
    worst = whole["worst"]["examples"]
    assert len(worst) == 10 and [w["loss"] for w in worst] == sorted((w["loss"] for w in worst), reverse=True)
    assert all(0 <= w["index"] < 45 and math.isfinite(w["loss"]) for w in worst)


def test_the_worst_examples_are_those_given_the_least_probability_of_their_label(artifacts, serve):
    client = serve(artifacts["classification"], backend="onnx")
    examples = examples_of("classification")
    body = client.post("/evaluate", json={"examples": examples}).json()
    predictions = client.post("/predict", json={"texts": [e["text"] for e in examples]}).json()["predictions"]
    losses = [-math.log(p["scores"][e["label"]]) for p, e in zip(predictions, examples)]
    expected = sorted(range(len(examples)), key=lambda i: -losses[i])[:10]
    assert body["worst"]["by"].startswith("cross-entropy")
    assert [w["index"] for w in body["worst"]["examples"]] == expected
    for w in body["worst"]["examples"]:
        assert w["prediction"] == predictions[w["index"]]["label"]
        assert w["loss"] == pytest.approx(losses[w["index"]], rel=1e-4)


def test_a_part_that_does_not_continue_its_evaluation_gets_409(artifacts, serve, embedding_artifact):
    client = serve(artifacts["classification"], backend="onnx", max_parted_examples=50)
    examples = examples_of("classification")

    def post(part, rows=examples[:10]):
        return client.post("/evaluate", json={"examples": rows, "part": part})

    r = post({"id": "never-begun", "index": 1, "last": True})
    assert r.status_code == 409 and "no evaluation 'never-begun'" in r.json()["error"]
    assert post({"id": "evaluation-2", "index": 0, "last": False}).status_code == 200
    r = post({"id": "evaluation-2", "index": 0, "last": False})
    assert r.status_code == 409 and "already open" in r.json()["error"]
    r = post({"id": "evaluation-2", "index": 2, "last": False})
    assert r.status_code == 409 and "expects part 1 next" in r.json()["error"]
    r = post({"id": "evaluation-2", "index": 1, "last": True}, examples[:41])
    assert r.status_code == 409 and "51 examples" in r.json()["error"] and "limit of 50" in r.json()["error"]
    r = post({"id": "evaluation-2", "index": 1, "last": True})  # the refused part did not end it
    assert r.status_code == 200 and r.json()["n"] == 20
    r = post({"id": "evaluation-2", "index": 2, "last": True})  # ended: its id is free and unknown again
    assert r.status_code == 409
    r = post({"id": "short", "index": 0, "last": True})
    assert r.status_code == 400 and "part.id" in r.text

    ranker = serve(embedding_artifact, backend="onnx")
    r = ranker.post("/evaluate", json={"examples": [{"query": "a cat", "positive": "a small cat"}],
                                       "part": {"id": "evaluation-3", "index": 0, "last": True}})
    assert r.status_code == 400 and "cannot be posted in parts" in r.json()["error"]
