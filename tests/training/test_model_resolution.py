"""`model:` that is not a bundled alias or a local directory fails at once, saying which mistake it is: a path
that does not exist, a near-miss of an alias, a Hub that cannot be reached or is switched off, or a Hub that
has no such model. The Hub is never the real one here: a closed port or a local stand-in answers."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from core.errors import ConfigError
from training.cli import main
from training.recipe.bases import resolve_model

BUNDLED = ("minilm = sentence-transformers/all-MiniLM-L6-v2, smollm2 = HuggingFaceTB/SmolLM2-135M-Instruct, "
           "minilm2minilm = an encoder-decoder warm-started from sentence-transformers/all-MiniLM-L6-v2")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An online Hub at HF_ENDPOINT (set by the test) with an empty download cache."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    return monkeypatch


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def stand_in_hub(hub):
    """A local HTTP server answering the model-info API: 200 for ``org/known``, 404 RepoNotFound otherwise."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # http.server's naming
            known = self.path.split("?")[0] == "/api/models/org/known"
            body = json.dumps({"id": "org/known"} if known else {"error": "Repository not found"}).encode()
            self.send_response(200 if known else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if not known:
                self.send_header("X-Error-Code", "RepoNotFound")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hub.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    yield server
    server.shutdown()
    server.server_close()


def _message(name: str) -> str:
    with pytest.raises(ConfigError) as caught:
        resolve_model(name)
    message = str(caught.value)
    assert message.startswith("model: ") and "\n" not in message
    return message


def test_aliases_and_local_directories_resolve_without_the_hub(tiny_model, hub):
    hub.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    bundled = resolve_model("minilm")
    assert (Path(bundled) / "config.json").is_file()
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == bundled  # the bundled model's own Hub id
    assert resolve_model(tiny_model) == tiny_model


@pytest.mark.parametrize("name", ["minlm", "MiniLM", "mini"])
def test_a_near_miss_of_an_alias_is_suggested(name, hub):
    hub.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")  # not consulted: the suggestion comes first
    message = _message(name)
    assert f"{name!r} is not a known alias or a local directory; did you mean 'minilm' (the bundled " \
           "sentence-transformers/all-MiniLM-L6-v2)?" in message
    assert f"accepted: a bundled alias ({BUNDLED}), a local model directory, or a Hub model id" in message


def test_a_path_that_does_not_exist_says_no_such_directory(tmp_path):
    for name in (str(tmp_path / "models" / "mine"), "./no-such-model", "~/no-such-model"):
        assert f"model: no such directory {name!r}" in _message(name)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    assert "is a file; give the directory that holds the model" in _message(str(weights))


def test_offline_hub_is_told_apart_from_a_typo(hub):
    hub.setenv("HF_HUB_OFFLINE", "1")
    message = _message("sentence-transformers/all-MiniLM-L6-v3")
    assert "the Hub is switched off (HF_HUB_OFFLINE)" in message
    assert "did you mean 'minilm' (the bundled sentence-transformers/all-MiniLM-L6-v2)?" in message
    assert message.endswith(f"offline, use a local model directory or a bundled alias: {BUNDLED}")


def test_unreachable_hub_says_so_and_lists_what_works_offline(hub):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    hub.setenv("HF_ENDPOINT", endpoint)
    message = _message("org/some-model")
    assert "'org/some-model' is not a local directory" in message
    assert f"and not in the Hub cache, and the Hub ({endpoint}) cannot be reached (" in message
    assert message.endswith(f"offline, use a local model directory or a bundled alias: {BUNDLED}")
    assert "did you mean" not in message


def test_a_model_the_hub_does_not_have_is_not_found(stand_in_hub):
    endpoint = f"http://127.0.0.1:{stand_in_hub.server_port}"
    message = _message("sentence-transformers/all-MiniLM-L6-v3")
    assert f"the Hub ({endpoint}) has no model by that name (or it is private and no token is set)" in message
    assert "did you mean 'minilm'" in message and "cannot be reached" not in message
    assert resolve_model("org/known") == "org/known"  # the Hub knows it: transformers downloads it


def test_a_cached_hub_model_loads_offline_from_the_cache(hub, tmp_path):
    from huggingface_hub import constants

    snapshot = tmp_path / "hub-cache" / "models--org--cached" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abc")
    assert constants.HF_HUB_CACHE == str(tmp_path / "hub-cache")
    hub.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert resolve_model("org/cached") == str(snapshot)
    hub.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("org/cached") == str(snapshot)


def test_train_with_a_mistyped_model_prints_one_line(base_config, hub, tmp_path, capfd):
    hub.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    for model, expected in (("minlm", "did you mean 'minilm'"),
                            ("sentence-transformers/all-MiniLM-L6-v3", "cannot be reached")):
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(dict(base_config, model=model)))
        assert main(["train", str(config)]) == 2
        stderr = capfd.readouterr().err
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, stderr
        assert lines[0].startswith(f"tuneserve train: error: model: '{model}'") and expected in lines[0]
        assert "Traceback" not in stderr and "Retrying" not in stderr
