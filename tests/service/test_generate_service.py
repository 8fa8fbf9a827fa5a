"""Serving a generation model: a tiny Llama trained and exported in the module, served by a real `bentoml serve` on
127.0.0.1. /generate (inputs, messages, raw prompts, sampling), its 400s naming the field, streaming as server-sent
events, a client that leaves mid-stream, /evaluate, the docs, and the self-test that refuses a manifest whose
recorded texts were tampered with; in-process, the batcher that pools concurrent requests and the event stream that
stops decoding when its client disconnects."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from core.manifest import read_manifest
from core.prompting import render_prompt
from tests.service.test_serve_process import exits_at_once, start_server, stop, wait_ready
from tests.conftest import GENERATION_NEW_TOKENS as DEFAULT_NEW_TOKENS

TIMEOUT = 30  # seconds, for every HTTP call


@pytest.fixture(scope="module")
def artifact(generation_artifact) -> Path:
    return generation_artifact


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    proc, url, log = start_server({"TUNESERVE_ARTIFACT": str(artifact)}, tmp_path_factory.mktemp("bentoml"))
    try:
        wait_ready(proc, url)
        yield proc, url, log
    finally:
        stop(proc)


def _generate(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/generate", json=body, timeout=TIMEOUT)


def _texts(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [g["text"] for g in response.json()["generations"]]


def _events(url: str, body: dict) -> tuple[str, list]:
    """The content type and the decoded data of each server-sent event of a streamed /generate."""
    events = []
    with httpx.stream("POST", url + "/generate", json={**body, "stream": True}, timeout=TIMEOUT) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
        return response.headers["content-type"], events


def test_generate_writes_the_texts_pytorch_wrote_at_export(server, artifact):
    _, url, _ = server
    manifest = read_manifest(artifact)
    samples = manifest.export.selftest
    r = _generate(url, {"prompts": [s.text for s in samples]})
    assert _texts(r) == [s.decision for s in samples]
    body = r.json()
    assert body["backend"] == "onnx-int8" and body["model"] == f"{manifest.name}:local"
    assert all(g["finish_reason"] in ("stop", "length") and 0 < g["tokens"] <= DEFAULT_NEW_TOKENS
               for g in body["generations"])
    # a model that writes text has no /predict; the answer says where to go
    r = httpx.post(url + "/predict", json={"texts": ["x"]}, timeout=TIMEOUT)
    assert r.status_code == 404 and "/generate" in r.json()["error"]
    metadata = httpx.get(url + "/metadata", timeout=TIMEOUT).json()
    assert metadata["task"] == "generation" and metadata["labels"] is None
    assert metadata["generation"]["prompt"]["style"] == "chat" and metadata["generation"]["max_new_tokens"] == DEFAULT_NEW_TOKENS
    assert metadata["limits"]["max_new_tokens"] == 4 * DEFAULT_NEW_TOKENS
    assert metadata["selftest"]["identical"] == metadata["selftest"]["texts"] == 2 * len(samples)
    # the docs describe it as a generation model, and their example bodies work
    spec = httpx.get(url + "/docs.json", timeout=TIMEOUT).json()
    assert "writes a text for each input" in spec["info"]["description"] and "Labels" not in spec["info"]["description"]
    assert "404" in spec["paths"]["/predict"]["post"]["responses"]
    assert "text/event-stream" in spec["paths"]["/generate"]["post"]["responses"]["200"]["content"]
    for path in ("/generate", "/evaluate"):
        example = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["example"]
        assert httpx.post(url + path, json=example, timeout=TIMEOUT).status_code == 200, (path, example)
    assert "POST /generate" in httpx.get(url + "/docs", timeout=TIMEOUT).text


def test_messages_and_raw_prompts_reach_the_same_prompt(server, artifact):
    from transformers import AutoTokenizer

    _, url, _ = server
    manifest = read_manifest(artifact)
    sample = manifest.export.selftest[0]
    # the artifact's prompt is one user turn holding the input: the same conversation, or the same prompt built by
    # hand and sent raw, gives the same text
    r = _generate(url, {"messages": [[{"role": "user", "content": sample.text}]]})
    assert _texts(r) == [sample.decision]
    rendered = render_prompt(manifest.prompt, AutoTokenizer.from_pretrained(artifact / "model"), sample.text)
    assert _texts(_generate(url, {"prompts": [rendered], "raw": True})) == [sample.decision]
    # the raw flag is honoured: the rendered prompt put in the template again is another prompt
    wrapped = _generate(url, {"prompts": [rendered], "max_new_tokens": 8})
    assert wrapped.status_code == 200
    # stop strings cut the text where they begin
    first = sample.decision.split()[0]
    cut = _generate(url, {"prompts": [sample.text], "stop": [first[1:]]}).json()["generations"][0]
    assert cut == {"text": first[:1], "finish_reason": "stop", "tokens": cut["tokens"]}


@pytest.mark.parametrize("body, words", [
    ({"prompts": ["x"], "max_new_tokens": 257}, "max_new_tokens: 257 is over this model's cap of 256"),
    ({"prompts": ["x"], "max_new_tokens": 100_000}, "max_new_tokens"),
    ({"prompts": ["x"], "max_new_tokens": 250}, "prompts[0]: 10 prompt tokens and max_new_tokens 250 exceed"),
    ({"prompts": ["x"], "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompts": ["x"], "temperature": -1}, "temperature"),
    ({"prompts": ["x"], "temperature": 2.5}, "temperature"),
    ({"prompts": ["x"], "top_p": 0}, "top_p"),
    ({"prompts": ["x"], "top_k": -1}, "top_k"),
    ({"prompts": ["x"], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompts": ["x"], "stop": [""]}, "stop[0]"),
    ({"prompts": ["x"], "seed": -3}, "seed"),
    ({"prompts": []}, "prompts"),
    ({"prompts": [""], "raw": True}, "prompts[0]: empty or only whitespace; give the text to score"),
    ({"prompts": ["x", 3]}, "prompts[1]"),
    ({}, "prompts: give prompts or messages"),
    ({"prompts": ["x"], "messages": [[{"role": "user", "content": "x"}]]}, "prompts: give prompts or messages"),
    ({"messages": [[{"role": "user", "content": "x"}]], "raw": True}, "raw"),
    ({"messages": [[{"role": "robot", "content": "x"}]]}, "messages[0][0].role"),
    ({"messages": [[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]]},
     "messages[0]: the last message must be the user's"),
    ({"messages": [[]]}, "messages[0]"),
    ({"prompts": ["x", "y"], "stream": True}, "stream: streams one prompt at a time"),
    ({"prompts": ["x"], "stream": "yes"}, "stream"),
])
def test_bad_generate_requests_get_400_naming_the_field(server, body, words):
    _, url, _ = server
    r = _generate(url, body)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"], r.json()


def test_streaming_sends_the_same_text_in_chunks(server, artifact):
    _, url, _ = server
    text = read_manifest(artifact).export.selftest[1].text
    for body in ({"prompts": [text], "max_new_tokens": 64},  # greedy
                 {"prompts": [text], "max_new_tokens": 64, "temperature": 1.5, "top_k": 50, "seed": 1}):
        whole = _generate(url, body).json()["generations"][0]
        media, events = _events(url, body)
        assert media.startswith("text/event-stream")
        *chunks, final, done = events
        assert done == "[DONE]" and final == {"finish_reason": whole["finish_reason"], "tokens": whole["tokens"]}
        assert all(set(c) == {"text"} and c["text"] for c in chunks)
        assert "".join(c["text"] for c in chunks) == whole["text"]
        assert len(chunks) >= whole["tokens"] // 4 - 1  # a chunk every 4 tokens, give or take a held-back character
    # a seed gives the same sample every time; no seed gives fresh draws
    sampled = {"prompts": [text] * 4, "max_new_tokens": 64, "temperature": 2.0, "seed": 7}
    assert _texts(_generate(url, sampled)) == _texts(_generate(url, sampled))


def test_a_client_that_leaves_mid_stream_does_not_break_the_server(server, artifact):
    proc, url, log = server
    sample = read_manifest(artifact).export.selftest[0]
    # a long sample (the seed that writes the most of a few), so that the client leaves well before its end
    body = {"prompts": [sample.text], "max_new_tokens": 200, "temperature": 2.0}
    lengths = {seed: _generate(url, {**body, "seed": seed}).json()["generations"][0]["tokens"] for seed in range(20)}
    seed = max(lengths, key=lengths.get)
    assert lengths[seed] >= 60, lengths
    for _ in range(3):
        with httpx.stream("POST", url + "/generate", json={**body, "seed": seed, "stream": True},
                          timeout=TIMEOUT) as response:
            assert response.status_code == 200
            assert next(response.iter_lines()).startswith("data: ")  # the first chunk, then hang up
    r = _generate(url, {"prompts": [sample.text]})
    assert r.status_code == 200 and _texts(r) == [sample.decision]
    assert httpx.get(url + "/readyz", timeout=TIMEOUT).status_code == 200 and proc.poll() is None
    # the server saw the clients go and stopped decoding for them (on a loaded machine a stream may now and then
    # end before its client's hang-up reaches the server; test_a_stream_stops_decoding_... checks the mechanism)
    deadline = time.monotonic() + 10
    while "stream closed before its end" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    stopped = [int(n) for n in re.findall(r"decoding stopped after (\d+) chunks", log.read_text())]
    assert stopped and max(stopped) < lengths[seed] // 4, stopped
    assert "Traceback" not in log.read_text()


def test_evaluate_scores_generations_as_the_trainer_did(server, artifact):
    _, url, _ = server
    manifest = read_manifest(artifact)
    rows = [json.loads(line) for line in (artifact.parent.parent / "test.jsonl").read_text().splitlines()]
    # the trainer scored the first generation.eval_examples test examples, greedily: the same examples give its figures
    examples = [{"input": r["input"], "reference": r["target"]} for r in rows[:8]]
    r = httpx.post(url + "/evaluate", json={"examples": examples}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["n"] == 8 and {"rougeL", "rouge1", "bleu", "chrf", "exact_match"} <= set(body["metrics"])
    assert body["training_metrics"]["rougeL"] == manifest.metrics["test"]["rougeL"]
    # The served backend is the quantised decoder the gate kept: its own greedy generations, scored in process.
    from service.backends import choose_backend

    assert body["backend"] == "onnx-int8"
    backend = choose_backend(artifact, manifest, backend="onnx-int8", device="cpu", threads=1, batch_size=8)
    prompts = backend.prompter.all([e["input"] for e in examples])
    generations = backend.generate(prompts, max_new_tokens=DEFAULT_NEW_TOKENS)
    expected = manifest.task.spec.evaluate([e["reference"] for e in examples], generations).metrics
    assert body["metrics"]["rougeL"] == pytest.approx(expected["rougeL"], abs=1e-9)
    assert body["delta"]["rougeL"] == pytest.approx(expected["rougeL"] - manifest.metrics["test"]["rougeL"], abs=1e-9)
    r = httpx.post(url + "/evaluate", json={"examples": [{"input": "x"}]}, timeout=TIMEOUT)
    assert r.status_code == 400 and "examples[0].reference" in r.json()["error"]
    # what a writer's /evaluate holds is what its schema says: no tables a generation model never fills
    assert not {"per_class", "confusion_matrix"} & set(body)
    spec = httpx.get(url + "/docs.json", timeout=TIMEOUT).json()
    evaluated = spec["paths"]["/evaluate"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert not {"per_class", "confusion_matrix"} & set(evaluated["properties"])


def test_a_writers_requests_are_bounded_by_a_token_budget(server):
    _, url, _ = server
    budget = 8192  # TUNESERVE_MAX_REQUEST_TOKENS's default: prompt tokens plus max_new_tokens per prompt
    # 120 prompts' new tokens fit (120 x 64 = 7,680); with their prompts' tokens they do not
    examples = [{"input": "this tool will copy files", "reference": "copy files"}] * 120
    r = httpx.post(url + "/evaluate", json={"examples": examples}, timeout=TIMEOUT)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error.startswith("examples: 120 prompts of ") and f"120 x {DEFAULT_NEW_TOKENS} new tokens" in error
    assert "TUNESERVE_MAX_REQUEST_TOKENS" in error and "tuneserve evaluate" in error
    # the advice holds: as many examples as it says fit are answered
    fits = int(re.search(r"send at most (\d+) per request", error).group(1))
    assert 0 < fits < 120
    r = httpx.post(url + "/evaluate", json={"examples": examples[:fits]}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["n"] == fits
    r = _generate(url, {"prompts": ["this tool will copy files"] * 120})
    assert r.status_code == 400 and r.json()["error"].startswith("prompts: 120 prompts of ")
    # so many prompts that their new tokens alone are over the budget are refused before any is read
    for path, body in (("/evaluate", {"examples": examples * 80}), ("/generate", {"prompts": ["copy files"] * 256})):
        r = httpx.post(url + path, json=body, timeout=TIMEOUT)
        error, count = r.json()["error"], len(next(iter(body.values())))
        assert r.status_code == 400 and f"{count} prompts x up to {DEFAULT_NEW_TOKENS} new tokens = " in error
        assert f"= {count * DEFAULT_NEW_TOKENS:,} tokens before their prompts are read" in error
        assert f"send at most {budget // DEFAULT_NEW_TOKENS} per request" in error and "tuneserve evaluate" in error
    # with fewer new tokens each, as many prompts fit
    r = _generate(url, {"prompts": ["this tool will copy files"] * 200, "max_new_tokens": 1})
    assert r.status_code == 200 and all(g["tokens"] == 1 for g in r.json()["generations"])
    assert httpx.get(url + "/metadata", timeout=TIMEOUT).json()["limits"]["max_request_tokens"] == budget
    spec = httpx.get(url + "/docs.json", timeout=TIMEOUT).json()
    for path in ("/generate", "/evaluate"):
        assert f"At most {budget:,} tokens per request" in spec["paths"][path]["post"]["description"]


def test_a_tampered_selftest_text_keeps_the_service_from_starting(artifact, tmp_path):
    tampered = tmp_path / "artifact"
    shutil.copytree(artifact, tampered)
    raw = json.loads((tampered / "manifest.json").read_text())
    raw["export"]["selftest"][1]["decision"] += " and more"
    (tampered / "manifest.json").write_text(json.dumps(raw))
    status, seconds, text = exits_at_once({"TUNESERVE_ARTIFACT": str(tampered)}, tmp_path / "bentoml", seconds=90)
    assert status == 2, (status, text[-3000:])
    assert "for example 1" in text and "self-test: backend onnx-int8 writes" in text and "and more" in text


# ---- in-process ---------------------------------------------------------------------------------------------

def test_concurrent_requests_share_a_batch_and_keep_their_answers(artifact):
    from core.tasks.generation import GeneratedText
    from service.backends import choose_backend
    from service.generation import Decoding, GenerationBatcher
    from service.selftest import run_generation_selftest

    manifest = read_manifest(artifact)
    backend = choose_backend(artifact, manifest, backend="onnx", device="cpu", threads=1, batch_size=8)
    prompts = backend.prompter.all([s.text for s in manifest.export.selftest])
    batcher = GenerationBatcher(backend, max_batch_size=4)
    greedy, sampled = Decoding(DEFAULT_NEW_TOKENS), Decoding(32, temperature=1.5, top_p=0.9)

    async def together():
        return await asyncio.gather(batcher([prompts[0]], greedy), batcher(prompts[1:3], greedy),
                                    batcher(prompts[:2], sampled, 5), batcher(prompts[2:], sampled, 6),
                                    batcher(prompts + prompts[:1], greedy))

    pooled = asyncio.run(together())
    # a 5-prompt request goes in parts of 4 and 1; the greedy requests (and that 1) share a batch, the sampled ones
    # (same options, their own seeds) another
    assert list(batcher.batch_sizes) == [4, 4, 4], batcher.batch_sizes
    alone = [backend.generate([prompts[0]], **greedy.kwargs()), backend.generate(prompts[1:3], **greedy.kwargs()),
             backend.generate(prompts[:2], seed=5, **sampled.kwargs()),
             backend.generate(prompts[2:], seed=6, **sampled.kwargs()),
             backend.generate(prompts + prompts[:1], **greedy.kwargs())]
    assert [[g.text for g in r] for r in pooled] == [[g.text for g in r] for r in alone]
    # PyTorch through transformers' generate reproduces the recorded texts as well, and cuts at stop strings alike
    torch_backend = choose_backend(artifact, manifest, backend="torch", device="cpu", threads=1, batch_size=8)
    assert torch_backend.name == "torch-cpu"
    assert run_generation_selftest(torch_backend, manifest)["identical"] == 2 * len(prompts)
    stop = Decoding(DEFAULT_NEW_TOKENS, stop=("e", "s "))
    assert torch_backend.generate(prompts, **stop.kwargs()) == [
        GeneratedText(g.text, g.finish_reason, g.tokens) for g in backend.generate(prompts, **stop.kwargs())]


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_a_stream_stops_decoding_when_its_client_disconnects(spec_version):
    from service.generation import EventStream, stream_events

    steps, closed = [], []

    def decode():
        try:
            for i in range(200):
                time.sleep(0.005)
                steps.append(i)
                yield f"t{i} "
        finally:
            closed.append(True)

    async def run():
        first_sent = asyncio.Event()

        async def receive():
            await first_sent.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.body" and message.get("body"):
                if first_sent.is_set() and spec_version == "2.4":
                    raise OSError("the client went away")  # what a spec-2.4 server does instead of the message
                first_sent.set()

        scope = {"type": "http", "asgi": {"spec_version": spec_version}}
        try:
            await EventStream(stream_events(decode()))(scope, receive, send)
        except Exception as exc:  # starlette's ClientDisconnect under spec 2.4
            assert spec_version == "2.4", exc

    asyncio.run(run())
    assert closed == [True] and len(steps) < 20
