"""The API's own docs in-process, for every task: /docs.json titled and completed, the page at / rendered from it."""

from __future__ import annotations

import re

import jsonschema_rs
import pytest

from core.manifest import read_manifest
from service.docs import render_page


@pytest.mark.parametrize("name", ["classification", "multilabel", "regression", "pair", "token"])
def test_every_task_gets_its_own_title_routes_and_working_examples(artifacts, serve, name):
    manifest = read_manifest(artifacts[name])
    client = serve(artifacts[name], backend="onnx")
    spec = client.get("/docs.json").json()
    assert spec["info"]["title"] == f"{manifest.name} ({manifest.task.value})"
    assert spec["info"]["version"].startswith(manifest.provenance.created)
    assert "/metadata" in spec["paths"] and "401" not in spec["paths"]["/predict"]["post"]["responses"]
    # a GET has no body to refuse
    assert not {"413", "415"} & set(spec["paths"]["/metadata"]["get"]["responses"])
    for path in ("/predict", "/evaluate"):
        example = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["example"]
        r = client.post(path, json=example)
        assert r.status_code == 200, (path, example, r.text)
        # the answer is what this model's schema says, and the schema holds only what this task fills
        schema = spec["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        jsonschema_rs.validate({**schema, "components": spec["components"]}, r.json())
    tables = {"per_class", "confusion_matrix"}
    evaluated = spec["paths"]["/evaluate"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert tables & set(evaluated["properties"]) == set(manifest.task.spec.evaluation_tables)
    assert tables & set(r.json()) == set(manifest.task.spec.evaluation_tables)
    predictions = spec["paths"]["/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert predictions["properties"]["predictions"]["items"]["$ref"].endswith(
        "/" + manifest.task.spec.prediction_model.__name__)
    page = client.get("/docs").text
    served = [(path, method) for path, item in spec["paths"].items() for method, op in item.items()
              if not op.get("x-other-kind-of-model")]
    for path, method in served:
        assert f"{method.upper()} {path}</code>" in page
    # routes of other kinds of model are named once, not documented; the route that runs this model comes first
    others = [path for path, item in spec["paths"].items() for op in item.values() if op.get("x-other-kind-of-model")]
    assert others and all(f"POST {path}</code>" not in page for path in others)
    assert "answer 404 here: " + ", ".join(f"<code>{path}</code>" for path in others) in page
    first = manifest.task.spec.route
    assert page.index(f"POST {first}</code>") < min(page.index(f"{m.upper()} {p}</code>") for p, m in served
                                                     if p != first)
    # the examples are this model's own held-out inputs, not a generic film review
    text = manifest.export.selftest[0].text
    example = spec["paths"][first]["post"]["requestBody"]["content"]["application/json"]["example"]
    assert text in str(example) or manifest.task.spec.writes or first == "/embed"
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(https?:)?//""", page)


def test_with_an_api_key_the_docs_say_so_and_leave_the_figures_to_metadata(artifacts, serve):
    art = artifacts["classification"]
    manifest = read_manifest(art)
    spec = serve(art, backend="onnx", api_key="k3y").get("/docs.json").json()
    described = spec["info"]["description"]
    assert "Authorization: Bearer" in described and "Labels: " in described
    assert f"{manifest.metrics['test'][manifest.primary_metric]:.4f}" not in described and "onnx backend" not in described
    assert spec["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    for path in ("/predict", "/evaluate", "/metadata"):
        operation = next(iter(spec["paths"][path].values()))
        assert operation["security"] == [{"bearer": []}] and "401" in operation["responses"], path
    assert "security" not in spec["paths"]["/readyz"]["get"]


def test_the_page_escapes_what_it_shows():
    spec = {"openapi": "3.0.2", "info": {"title": "<script>x()</script>", "version": "1", "description": "a & b"},
            "paths": {"/p": {"get": {"description": "<img src=//evil>", "responses": {"200": {"description": "ok"}}}}}}
    page = render_page(spec)
    assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;x()&lt;/script&gt;" in page and "a &amp; b" in page
