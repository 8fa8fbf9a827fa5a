"""A client for the service running in-process over an exported artifact (tests/conftest.py builds one of each task)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def asgi_app():
    """The service's ASGI app, built once: BentoML registers its Prometheus metrics when an app is built."""
    from service import service as service_module

    return service_module.Tuneserve.to_asgi()


@pytest.fixture
def serve(asgi_app, monkeypatch):
    """serve(artifact_dir, **settings) -> a TestClient whose start-up builds a service instance over the artifact
    (or over the models a ``models=`` setting names)."""
    from starlette.testclient import TestClient

    from service import service as service_module
    from service.settings import Settings

    clients = []

    def start(artifact: Path | None = None, **settings) -> TestClient:
        monkeypatch.setattr(service_module, "SETTINGS", Settings(artifact=artifact, **settings))
        client = TestClient(asgi_app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)
