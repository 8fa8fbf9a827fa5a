"""Exported tiny artifacts of each task, and a client for the service running in-process over one of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_entity_rows, make_rows, write_jsonl


def _train_exported(tiny_model: str, directory: Path, **changes) -> Path:
    from training.config import load_config
    from training.run import train

    raw = {
        "model": tiny_model,
        "data": {"train": str(directory / "train.jsonl"), "validation": str(directory / "validation.jsonl"),
                 "test": str(directory / "test.jsonl")},
        "method": "full",
        "train": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0, "max_length": 32},
        "output_dir": str(directory / "run"),
    }
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            raw.setdefault(section, {})[field] = value
        else:
            raw[key] = value
    return train(load_config(raw=raw)).artifact_dir


@pytest.fixture(scope="session")
def artifacts(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """name -> exported artifact directory: classification, multilabel, regression, a text-pair model, and a token
    (entity) model whose windows are short enough that longer sentences are split."""
    built = {}
    for name, changes in {
        "classification": {"task": "classification", "data.label": "label"},
        "multilabel": {"task": "multilabel", "data.label": "topics"},
        "regression": {"task": "regression", "data.label": "score"},
        "pair": {"task": "classification", "data.label": "label", "data.text_pair": "pair"},
    }.items():
        directory = tmp_path_factory.mktemp(name)
        for split, (n, seed) in {"train": (240, 1), "validation": (60, 2), "test": (60, 3)}.items():
            rows = make_rows(n, seed)
            for row in rows:
                row["pair"] = "a note about the " + row["topics"][0]
            write_jsonl(directory / f"{split}.jsonl", rows)
        built[name] = _train_exported(tiny_model, directory, **changes)
    directory = tmp_path_factory.mktemp("token")
    for split, (n, seed) in {"train": (240, 1), "validation": (60, 2), "test": (60, 3)}.items():
        write_jsonl(directory / f"{split}.jsonl", make_entity_rows(n, seed))
    built["token"] = _train_exported(tiny_model, directory, **{
        "task": "token_classification", "data.text": "tokens", "data.label": "tags",
        "train": {"epochs": 12, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0, "max_length": 12, "stride": 4,
                  "early_stopping": {"patience": None}}})
    return built


@pytest.fixture(scope="session")
def asgi_app():
    """The service's ASGI app, built once: BentoML registers its Prometheus metrics when an app is built."""
    from service import service as service_module

    return service_module.Tuneserve.to_asgi()


@pytest.fixture
def serve(asgi_app, monkeypatch):
    """serve(artifact_dir, **settings) -> a TestClient whose start-up builds a service instance over the artifact."""
    from starlette.testclient import TestClient

    from service import service as service_module
    from service.settings import Settings

    clients = []

    def start(artifact: Path, **settings) -> TestClient:
        monkeypatch.setattr(service_module, "SETTINGS", Settings(artifact=artifact, **settings))
        client = TestClient(asgi_app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture(scope="session")
def embedding_artifact(tiny_model, tmp_path_factory) -> Path:
    """An exported sentence-embedding model: queries and the documents they look for (tests/conftest.py)."""
    from tests.conftest import make_pairs

    directory = tmp_path_factory.mktemp("embedding")
    for split, (n, seed) in {"train": (320, 1), "validation": (60, 2), "test": (60, 3)}.items():
        write_jsonl(directory / f"{split}.jsonl", make_pairs(n, seed))
    return _train_exported(tiny_model, directory, task="embedding", **{
        "train": {"epochs": 4, "batch_size": 32, "lr": 1e-3, "warmup_ratio": 0.0, "max_length": 32}})


# The generation artifact's max_new_tokens; requests may ask for up to 4 times as many.
GENERATION_NEW_TOKENS = 64


@pytest.fixture(scope="session")
def generation_artifact(tmp_path_factory) -> Path:
    """An exported tiny Llama that writes two words of its input (tests/training/test_generation_train.py), fine-tuned
    for a few seconds: enough for the model to answer in a few tokens and end, mostly."""
    from tests.training.test_generation_train import build_tiny_llama, make_pairs

    data = tmp_path_factory.mktemp("generation-data")
    for split, (n, seed) in {"train": (96, 1), "validation": (16, 2), "test": (16, 3)}.items():
        write_jsonl(data / f"{split}.jsonl", make_pairs(n, seed))
    return _train_exported(build_tiny_llama(tmp_path_factory.mktemp("tiny-llama")), data, task="generation", **{
        "data": {"train": str(data / "train.jsonl"), "validation": str(data / "validation.jsonl"),
                 "test": str(data / "test.jsonl"), "text": "input", "label": "target"},
        "train": {"epochs": 3, "batch_size": 16, "eval_batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0,
                  "max_length": 32},
        "generation": {"max_target_length": 8, "max_new_tokens": GENERATION_NEW_TOKENS, "eval_examples": 8}})
