"""Serving an encoder-decoder generation model (a tiny T5 trained with LoRA in the module): a real `bentoml serve` on
127.0.0.1 chooses PyTorch on the CPU (the artifact has no ONNX export) and says why in its log, passes the self-test,
and answers /generate (the decoder's text only, stop strings, streaming) and /evaluate as the trainer scored."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from core.manifest import read_manifest
from tests.service.test_serve_process import start_server, stop, wait_ready
from tests.training.test_seq2seq_train import pair_dir, seq2seq_config, tiny_t5  # noqa: F401 (fixtures)

TIMEOUT = 30  # seconds, for every HTTP call


@pytest.fixture(scope="module")
def artifact(tiny_t5, pair_dir, tmp_path_factory) -> Path:  # noqa: F811 (the fixtures imported above)
    from training.config import load_config
    from training.run import train

    output = tmp_path_factory.mktemp("seq2seq-run")
    return train(load_config(raw=seq2seq_config(tiny_t5, pair_dir, output, "lora", 3e-2, epochs=3))).artifact_dir


def test_a_t5_artifact_is_served_by_pytorch_and_answers_generate_and_evaluate(artifact, pair_dir,  # noqa: F811
                                                                              tmp_path):
    manifest = read_manifest(artifact)
    samples = manifest.export.selftest
    proc, url, log = start_server({"TUNESERVE_ARTIFACT": str(artifact)}, tmp_path / "bentoml")
    try:
        wait_ready(proc, url)
        text = log.read_text()
        assert ("backend auto: torch on cpu, because the artifact has no ONNX export: encoder-decoder models are "
                "served by PyTorch") in text
        assert f"self-test passed on {len(samples)} examples" in text

        # the texts PyTorch wrote at export, pooled in one request: the decoder's text, not the prompt
        r = httpx.post(url + "/generate", json={"prompts": [s.text for s in samples]}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["backend"] == "torch-cpu"
        assert [g["text"] for g in body["generations"]] == [s.decision for s in samples]
        assert all(g["finish_reason"] in ("stop", "length") and 0 < g["tokens"] <= manifest.decoding["max_new_tokens"]
                   for g in body["generations"])
        assert not any(g["text"].startswith("summarize") for g in body["generations"])

        # a stop string cuts the text where it begins
        sample = next(s for s in samples if len(s.decision) > 1)
        stop_at = sample.decision[1:]
        r = httpx.post(url + "/generate", json={"prompts": [sample.text], "stop": [stop_at]}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        cut = r.json()["generations"][0]
        assert cut["text"] == sample.decision[:1] and cut["finish_reason"] == "stop"

        # streamed: the same text, then why it finished
        events = []
        with httpx.stream("POST", url + "/generate", json={"prompts": [sample.text], "stream": True},
                          timeout=TIMEOUT) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith("data: "):
                    data = line[len("data: "):]
                    events.append(data if data == "[DONE]" else json.loads(data))
        assert "".join(e["text"] for e in events if isinstance(e, dict) and "text" in e) == sample.decision
        assert events[-1] == "[DONE]" and events[-2]["finish_reason"] in ("stop", "length")

        # /evaluate on the examples the trainer scored gives the trainer's figures
        rows = [json.loads(line) for line in (pair_dir / "test.jsonl").read_text().splitlines()]
        examples = [{"input": row["input"], "reference": row["target"]} for row in rows[:8]]
        r = httpx.post(url + "/evaluate", json={"examples": examples}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        assert r.json()["metrics"]["rougeL"] == pytest.approx(manifest.metrics["test"]["rougeL"], abs=1e-9)
        assert r.json()["backend"] == "torch-cpu"
        assert httpx.get(url + "/metadata", timeout=TIMEOUT).json()["backend"] == "torch-cpu"
    finally:
        stop(proc)
