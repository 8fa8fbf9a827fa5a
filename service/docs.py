"""The API's own documentation: ``/docs.json`` and a page at ``/docs`` that loads nothing from another host.

BentoML 1.4 answers ``/`` with its stock Swagger UI page (a Google Tag Manager script, BentoML's title, and a
description whose badges are images on third-party hosts) and ``/docs.json`` with a document titled after the
service class, version "None", that leaves out the routes of mounted Starlette apps such as ``/metadata``. The
routes here are mounted at the root ahead of BentoML's own, so they answer instead: BentoML's document,
completed (``/metadata``, the answers the middleware gives, the bearer key, example bodies) and described from
the artifact's manifest, and an HTML page rendered from that document on the server: inline style, no script,
and a Content-Security-Policy that lets the browser fetch nothing else.
"""

from __future__ import annotations

import copy
import html
import json
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from core.manifest import Manifest
from core.tasks import Task, is_better, model_routes
from service.middleware import API_PATHS
from service.settings import Settings

MODEL_TAG, PROBE_TAG = "Model", "Probes"

PROBES = {
    "/livez": "Liveness: 200 while the server process answers.",
    "/healthz": "The same as /livez, for probes that still ask this path.",
    "/readyz": "Readiness: 200 once the model is loaded and has reproduced, for a few held-out inputs, the outputs "
               "PyTorch gave at export; not 200 before that.",
    "/metrics": "Prometheus metrics (text format): requests, their status and duration per route.",
}

METADATA = {
    "get": {
        "tags": [MODEL_TAG],
        "operationId": "tuneserve__metadata",
        "parameters": [{"name": "model", "in": "query", "required": False, "schema": {"type": "string"},
                        "description": "The served model, by name (optional where the service serves one)."}],
        "x-model-errors": True,
        "description": "What the artifact records about the model: task, labels, base model, method, test metrics "
                       "beside the baselines, the export's parity report, the backend serving it, versions and "
                       "request limits.",
        "responses": {"200": {"description": "The model's metadata", "content": {"application/json": {"schema": {
            "type": "object", "title": "Metadata", "required": ["model", "name", "task", "backend"],
            "properties": {
                "model": {"type": "string", "description": "The model served, as name:version."},
                "name": {"type": "string"},
                "task": {"type": "string", "enum": [t.value for t in Task]},
                "labels": {"type": "array", "items": {"type": "string"}, "nullable": True,
                           "description": "Labels in the model's order; null for regression."},
                "base_model": {"type": "string"},
                "method": {"type": "string"},
                "primary_metric": {"type": "string"},
                "metrics": {"type": "object", "description": "Split -> metric -> value, measured at training."},
                "baselines": {"type": "object", "description": "Baseline -> test metric -> value."},
                "backend": {"type": "string", "description": "onnx-int8 | onnx | torch-cuda | torch-cpu"},
                "versions": {"type": "object"},
                "limits": {"type": "object"},
            }}}}}},
    },
}

MODELS = {
    "get": {
        "tags": [MODEL_TAG],
        "operationId": "tuneserve__models",
        "description": "The models this service serves, each with its task, labels, test metric beside its best "
                       "baseline, backend and base model; a request names one in its `model` field.",
        "responses": {"200": {"description": "The models served", "content": {"application/json": {"schema": {
            "type": "object", "title": "Models", "required": ["models"],
            "properties": {"models": {"type": "array", "items": {
                "type": "object", "required": ["name", "model", "task", "backend"],
                "properties": {
                    "name": {"type": "string", "description": "What a request's `model` field names."},
                    "model": {"type": "string", "description": "The model as name:version."},
                    "task": {"type": "string", "enum": [t.value for t in Task]},
                    "labels": {"type": "array", "items": {"type": "string"}, "nullable": True},
                    "primary_metric": {"type": "string"},
                    "test": {"type": "number", "nullable": True, "description": "The primary metric on the test split."},
                    "best_baseline": {"type": "object", "nullable": True,
                                      "description": "The best baseline on the primary metric: name, value, beaten."},
                    "backend": {"type": "string"},
                    "base_model": {"type": "string"},
                    "method": {"type": "string"},
                }}}}}}}}},
    },
    "post": {
        "tags": [MODEL_TAG],
        "operationId": "tuneserve__add_model",
        "description": "Add a model while serving (needs TUNESERVE_API_KEY set; 403 otherwise): it is loaded and "
                       "self-tested while the others keep answering.",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "title": "AddModel", "required": ["source"], "additionalProperties": False,
            "properties": {"source": {"type": "string", "description": "An artifact directory or a store tag."},
                           "name": {"type": "string", "description": "The name requests use (default: the "
                                                                     "config's name, else the directory's)."}}}}}},
        "responses": {"201": {"description": "Added: {\"added\": the model as GET /models lists it}",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                      **{str(code): {"description": text, "content": {"application/json": {
                          "schema": {"$ref": "#/components/schemas/Error"}}}}
                         for code, text in ((400, "Not a source: no such directory, or a malformed body"),
                                            (403, "No API key is set: the set cannot change"),
                                            (409, "A model of that name is served, or the limit is reached"),
                                            (422, "The source is not a model that can be served: why, in one line"))}},
    },
}

REMOVE_MODEL = {
    "delete": {
        "tags": [MODEL_TAG],
        "operationId": "tuneserve__remove_model",
        "description": "Stop serving a model (needs TUNESERVE_API_KEY set; 403 otherwise); requests waiting for it get "
                       "404.",
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": {"description": "Removed: {\"removed\": name}",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                      **{str(code): {"description": text, "content": {"application/json": {
                          "schema": {"$ref": "#/components/schemas/Error"}}}}
                         for code, text in ((400, "The only model served cannot be removed"),
                                            (403, "No API key is set: the set cannot change"),
                                            (404, "No model of that name is served"))}},
    },
}

METHODS = {"full": "full fine-tuning", "lora": "LoRA adapters, merged", "freeze": "frozen encoder, trained head",
           "ia3": "IA3 scaling vectors, merged", "prompt": "prompt tuning, its virtual tokens in the vocabulary"}

# Headers of the page: the browser may apply its inline style and fetch nothing (no script, font, image or frame).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class About:
    """What the documents say about the model being served."""

    manifest: Manifest
    model_tag: str
    backend: str
    provider: str | None
    tuneserve_version: str | None
    settings: Settings


# What a request naming its model (several served) may get beside its own answers.
MODEL_ERRORS = {400: "Bad request (with several models served: no model named)",
                404: "No model of that name is served (GET /models lists them)",
                503: "The model named is being added; try again after Retry-After seconds"}


def middleware_responses(settings: Settings, body: bool = True) -> dict[int, str]:
    """The answers that layers in front of the API methods give, which BentoML's document cannot know
    (``body``: for a method that takes a request body)."""
    return {
        **({401: "Missing or wrong API key"} if settings.api_key is not None else {}),
        **({413: "Request body over the size limit", 415: "Body is not application/json"} if body else {}),
        **({429: "Too many requests at once"} if settings.max_concurrency else {}),
        504: "The request took longer than the timeout",
    }


def model_version(about: About) -> str:
    """The store tag's version, or when the artifact was created for an artifact directory served as is."""
    version = about.model_tag.rpartition(":")[2]
    if version == "local":
        version = about.manifest.provenance.created or version
    return version if about.tuneserve_version is None else f"{version} (tuneserve {about.tuneserve_version})"


def _figure(value: float) -> str:
    return f"{value:.4f}"


def description(about: About) -> str:
    """Plain-text lines: what the model does, its labels, test metric and baselines, backend, how to call it.

    With an API key set, the measured figures and the backend are left to /metadata, which needs the key.
    """
    m, private = about.manifest, about.settings.api_key is not None
    pair = " (or pair of texts)" if m.has_pair else ""
    threshold = "its threshold" if m.thresholds is not None else f"{m.decision_threshold:g}"
    does = m.task.spec.does.format(pair=pair, threshold=threshold, label_field=m.label_field)
    method = METHODS.get(m.method, m.method)
    lines = [f"{m.name} {does}; fine-tuned from {m.base_model} ({method})."]
    lines += m.task.spec.describe(m)
    test = m.metrics.get("test", {})
    if not private and m.primary_metric in test:
        line = f"Test {m.primary_metric}: {_figure(test[m.primary_metric])}"
        scored = {name: figures[m.primary_metric] for name, figures in m.baselines.items()
                  if m.primary_metric in figures}
        best = None
        for name, value in scored.items():
            if best is None or is_better(m.primary_metric, value, scored[best]):
                best = name
        if best is not None:
            line += f" (best baseline, {best}: {_figure(scored[best])})"
        lines.append(line + ".")
    if not private:
        provider = f" on {about.provider}" if about.provider else ""
        lines.append(f"Served by the {about.backend} backend{provider}.")
    lines.append(f"Model {about.model_tag}" + (f", served by tuneserve {about.tuneserve_version}."
                                               if about.tuneserve_version else "."))
    use = _use_route(m)
    lines.append(m.task.spec.usage)
    if private:
        lines.append(f"{use}, /evaluate and /metadata need the header 'Authorization: Bearer <key>'.")
    return "\n".join(lines)


def _use_route(m: Manifest) -> str:
    """The route that runs the model: /generate for a model that writes text, /predict for the others."""
    return m.task.spec.route


def _examples(about: About) -> dict[str, dict]:
    """A valid request body for each API method of this model."""
    return about.manifest.task.spec.request_examples(about.manifest)


def api_document(base: dict, about: About) -> dict:
    """BentoML's OpenAPI document (``Service.openapi_spec.asdict()``), titled, described and completed."""
    spec = copy.deepcopy(base)
    m = about.manifest
    spec["info"] = {"title": f"{m.name} ({m.task.value})", "version": model_version(about),
                    "description": description(about)}
    spec["tags"] = [{"name": MODEL_TAG, "description": "Predictions, evaluation and the model's metadata."},
                    {"name": PROBE_TAG, "description": "Health probes and metrics (no key needed)."}]
    paths = spec.setdefault("paths", {})
    paths["/metadata"] = copy.deepcopy(METADATA)
    paths["/models"] = copy.deepcopy(MODELS)
    paths["/models/{name}"] = copy.deepcopy(REMOVE_MODEL)
    for path, text in PROBES.items():
        for operation in paths.get(path, {}).values():
            operation.update(description=text, tags=[PROBE_TAG])
    components = spec.setdefault("components", {})
    components.setdefault("schemas", {})["Error"] = {
        "type": "object", "title": "Error", "required": ["error", "field"],
        "properties": {"error": {"type": "string", "title": "Message", "description": "One line: what was wrong."},
                       "field": {"anyOf": [{"type": "string"}, {"type": "null"}], "title": "Field",
                                 "description": "The request field at fault (texts[1], examples[0].label), or null."},
                       "detail": {"type": "string", "title": "Detail",
                                  "description": "Every problem, where there are several."}}}
    if about.settings.api_key is not None:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    examples = _examples(about)
    for path, item in paths.items():
        if path.rstrip("/") not in API_PATHS and not path.startswith("/models/"):
            continue
        for operation in item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            operation["tags"] = [MODEL_TAG]
            takes_model = operation.pop("x-model-errors", False) or ("requestBody" in operation and path != "/models")
            if takes_model:
                for status, text in MODEL_ERRORS.items():
                    operation["responses"].setdefault(str(status), {
                        "description": text,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
            parted = {409: "A part that does not continue its evaluation (`part`): never begun, out of order, idle, "
                           "or over the limit"} if path == "/evaluate" else {}
            for status, text in {**parted, **middleware_responses(about.settings, body="requestBody" in operation)}.items():
                operation["responses"].setdefault(str(status), {
                    "description": text,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
            if about.settings.api_key is not None:
                operation["security"] = [{"bearer": []}]
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None and path in examples:
                body["example"] = examples[path]
            if path in ROUTES_BY_KIND:
                _describe_use_route(path, operation, m)
            _narrow_to_task(path, operation, m, about.settings)
    return spec


def _ok_schema(operation: dict) -> dict:
    """The JSON schema of an operation's 200 answer (empty when it has none)."""
    return _response(operation, 200).get("content", {}).get("application/json", {}).get("schema", {})


def _narrow_to_task(path: str, operation: dict, m: Manifest, settings: Settings) -> None:
    """What this model's answers hold, not what any model's could: /predict's predictions are the task's own kind,
    /evaluate's tables are those the task fills (the others are absent from the answer too), and a writer's routes
    state its token budget."""
    spec = m.task.spec
    properties = _ok_schema(operation).get("properties", {})
    if path == "/predict" and path in spec.routes and "predictions" in properties:
        properties["predictions"]["items"] = {"$ref": f"#/components/schemas/{spec.prediction_model.__name__}"}
    if path == "/evaluate":
        for table in ("per_class", "confusion_matrix"):
            if table not in spec.evaluation_tables:
                properties.pop(table, None)
        if spec.loss_name is None:
            properties.pop("worst", None)
    if path == "/evaluate" and spec.ranked_corpus([]) is not None:
        operation["description"] = " ".join(filter(None, [operation.get("description"), (
            f"At most {settings.max_corpus:,} distinct documents (positives) per request: each query is ranked "
            "against all of them.")]))
    if spec.writes and path in ("/generate", "/evaluate"):
        budget = (f"At most {settings.max_request_tokens:,} tokens per request: the prompts' tokens plus "
                  "max_new_tokens for each; a larger request gets 400 saying how many prompts fit.")
        operation["description"] = " ".join(filter(None, [operation.get("description"), budget]))


# Marks an operation of another kind of model in the API document (the page lists only this model's routes).
OTHER_KIND = "x-other-kind-of-model"
# The routes that run a model: each answers for its kind of model only (404 for the others).
ROUTES_BY_KIND = model_routes()


def _response(operation: dict, status: int) -> dict:
    """The response entry of ``status`` (BentoML's document keys responses by int, the ones added here by str)."""
    responses = operation.setdefault("responses", {})
    key = next((k for k in responses if str(k) == str(status)), str(status))
    return responses.setdefault(key, {})


def _describe_use_route(path: str, operation: dict, m: Manifest) -> None:
    use = _use_route(m)
    if path not in m.task.spec.routes:
        operation["description"] = f"For {ROUTES_BY_KIND[path]}; this model answers it with 404: use POST {use}."
        operation[OTHER_KIND] = True  # the page names it once instead of documenting it
        _response(operation, 404).update(description=f"Not for this model: use {use}", content={
            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}})
        return
    if path == "/generate":
        # The schema of one event, as a server-sent events client parses it (its fields; data is the payload).
        _response(operation, 200).setdefault("content", {})["text/event-stream"] = {"schema": {
            "type": "object", "required": ["data"],
            "description": 'With "stream": true: server-sent events, data: {"text": chunk} per chunk, then data: '
                           '{"finish_reason", "tokens"}, then data: [DONE].',
            "properties": {"event": {"type": "string", "enum": ["message"]},
                           "data": {"type": "string", "description": 'A JSON object, or [DONE] at the end.'}}}}


# ---- the page ------------------------------------------------------------------------------------------------

_LIMITS = {"minItems": "at least {} item(s)", "maxItems": "at most {} items", "minLength": "at least {} characters",
           "maxLength": "at most {} characters", "minimum": "at least {}", "maximum": "at most {}",
           "exclusiveMinimum": "over {}", "exclusiveMaximum": "under {}"}

_STYLE = """
body{font:15px/1.5 system-ui,sans-serif;margin:0 auto;max-width:60rem;padding:1rem 2rem;color:#1d2430}
h1{margin-bottom:.2rem}h2{border-bottom:1px solid #d8dde6;padding-bottom:.2rem;margin-top:2.2rem}
.version{color:#5b6575;margin-top:0}code,pre{font:13px/1.4 ui-monospace,monospace}
pre{background:#f4f6f9;padding:.6rem .8rem;overflow-x:auto;border-radius:4px}
section.op{border:1px solid #d8dde6;border-radius:6px;padding:.2rem 1rem .8rem;margin:1rem 0}
.method{display:inline-block;min-width:3.5rem;text-align:center;border-radius:3px;color:#fff;font-size:13px;
padding:.05rem .4rem;margin-right:.5rem}.post{background:#2f7d4f}.get{background:#2d5f9a}
table{border-collapse:collapse;width:100%;margin:.4rem 0}th,td{text-align:left;vertical-align:top;
padding:.25rem .5rem;border-bottom:1px solid #e6e9ef}th{font-weight:600}.muted{color:#5b6575}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _type(schema: dict) -> str:
    """A schema's type in a few words: ``array of string``, ``ClassPrediction | TokenPrediction``."""
    if "$ref" in schema:
        return _ref_name(schema["$ref"])
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return " | ".join(_type(s) for s in schema[key])
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    kind = schema.get("type", "any")
    if kind == "array":
        kind = f"array of {_type(schema.get('items', {}))}"
    elif kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        kind = f"object of {_type(schema['additionalProperties'])}"
    return kind + (" | null" if schema.get("nullable") else "")


def _limits(schema: dict, each: str = "") -> list[str]:
    found = [each + text.format(schema[key]) for key, text in _LIMITS.items() if key in schema]
    for variant in schema.get("anyOf", []):
        found += _limits(variant, each)
    if isinstance(schema.get("items"), dict):
        found += _limits(schema["items"], "each ")
    return found


def _fields(schema: dict, components: dict) -> str:
    """A table of an object schema's fields (a reference is followed once)."""
    if "$ref" in schema:
        schema = components.get(_ref_name(schema["$ref"]), {})
    properties = schema.get("properties")
    if not properties:
        return f"<p><code>{_e(_type(schema))}</code></p>"
    required = set(schema.get("required", []))
    rows = []
    for name, field in properties.items():
        notes = _limits(field)
        if "default" in field and field["default"] is not None:
            notes.append(f"default {json.dumps(field['default'])}")
        meaning = " ".join(filter(None, [field.get("description", ""), f"({'; '.join(notes)})" if notes else ""]))
        rows.append(f"<tr><td><code>{_e(name)}</code></td><td><code>{_e(_type(field))}</code></td>"
                    f"<td>{'yes' if name in required else ''}</td><td>{_e(meaning)}</td></tr>")
    return ("<table><tr><th>field</th><th>type</th><th>required</th><th>meaning</th></tr>"
            + "".join(rows) + "</table>")


def _refs(value: object) -> set[str]:
    if isinstance(value, dict):
        found = {_ref_name(value["$ref"])} if isinstance(value.get("$ref"), str) else set()
        return found.union(*(_refs(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_refs(v) for v in value))
    return set()


def _reachable(spec: dict) -> list[str]:
    """The component schemas that the paths use, directly or through other components, in document order."""
    components = spec.get("components", {}).get("schemas", {})
    seen, todo = set(), _refs(spec.get("paths", {}))
    while todo:
        name = todo.pop()
        if name in seen or name not in components:
            continue
        seen.add(name)
        todo |= _refs(components[name])
    return [name for name in components if name in seen]


def _curl(path: str, method: str, example: object | None, secured: bool) -> str:
    parts = [f'curl -s "$URL{path}"']
    if secured:
        parts.append("-H 'Authorization: Bearer <key>'")
    if method == "post":
        parts.append("-H 'Content-Type: application/json'")
        parts.append("-d '" + json.dumps(example).replace("'", "'\\''") + "'")
    return " \\\n     ".join(parts)


def _anchor(path: str, method: str) -> str:
    return f"{method}-{path.strip('/').replace('/', '-') or 'root'}"


def _operation(path: str, method: str, operation: dict, components: dict) -> str:
    heading = f'<h3><span class="method {_e(method)}">{_e(method.upper())}</span><code>{_e(path)}</code></h3>'
    out = [f'<section class="op" id="{_e(_anchor(path, method))}">{heading}']
    if operation.get("description"):
        out.append(f"<p>{_e(operation['description'])}</p>")
    secured = bool(operation.get("security"))
    if secured:
        out.append("<p>Needs the header <code>Authorization: Bearer &lt;key&gt;</code>.</p>")
    body = operation.get("requestBody", {}).get("content", {}).get("application/json")
    if body is not None:
        out.append("<h4>Request body (application/json)</h4>" + _fields(body.get("schema", {}), components))
    example = body.get("example") if body is not None else None
    if method == "get" or example is not None:
        out.append(f"<pre>{_e(_curl(path, method, example, secured))}</pre>")
    rows = []
    for status, response in operation.get("responses", {}).items():
        schema = next(iter(response.get("content", {}).values()), {}).get("schema")
        named = schema and ("$ref" in schema or "properties" not in schema)  # an inline object gets its own table
        shown = f"<code>{_e(_type(schema))}</code>" if named else ""
        rows.append(f"<tr><td>{_e(status)}</td><td>{_e(response.get('description', ''))}</td><td>{shown}</td></tr>")
    if rows:
        out.append("<h4>Responses</h4><table><tr><th>status</th><th>meaning</th><th>body</th></tr>"
                   + "".join(rows) + "</table>")
    ok = next(iter(operation.get("responses", {}).get("200", {}).get("content", {}).values()), {}).get("schema")
    if ok and "properties" in ok:
        out.append("<h4>200 body</h4>" + _fields(ok, components))
    out.append("</section>")
    return "".join(out)


def render_page(spec: dict) -> str:
    """The whole HTML page, from an OpenAPI document: every route, its body, answers and a curl line."""
    info, components = spec.get("info", {}), spec.get("components", {}).get("schemas", {})
    every = [(path, method, op) for path, item in spec.get("paths", {}).items()
             for method, op in item.items() if isinstance(op, dict) and "responses" in op]
    others = [path for path, _, op in every if op.get(OTHER_KIND)]
    # this model's routes, the one that runs it first; routes of other kinds of model are only named
    operations = sorted((o for o in every if not o[2].get(OTHER_KIND)),
                        key=lambda o: (o[0] not in ROUTES_BY_KIND, o[0] != "/evaluate"))
    tags = [t["name"] for t in spec.get("tags", [])]
    tags += sorted({tag for _, _, op in operations for tag in op.get("tags", []) if tag not in tags})
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           '<link rel="icon" href="data:,">', f"<title>{_e(info.get('title', 'API'))}</title>",
           f"<style>{_STYLE}</style></head><body>",
           f"<h1>{_e(info.get('title', 'API'))}</h1>",
           (f'<p class="version">Version {_e(info.get("version", ""))} · OpenAPI {_e(spec.get("openapi", ""))} '
            'document: <a href="docs.json">docs.json</a></p>')]
    out += [f"<p>{_e(line)}</p>" for line in info.get("description", "").splitlines() if line.strip()]
    out.append('<p class="muted">In the commands below, <code>$URL</code> is this server\'s address.</p>')
    if others:
        out.append(f'<p class="muted">Routes for other kinds of model answer 404 here: '
                   f'{", ".join(f"<code>{_e(path)}</code>" for path in others)}.</p>')
    out.append("<ul>" + "".join(
        f'<li><a href="#{_e(_anchor(path, method))}">'
        f"<code>{_e(method.upper())} {_e(path)}</code></a></li>" for path, method, _ in operations) + "</ul>")
    for tag in tags:
        members = [o for o in operations if (o[2].get("tags") or [""])[0] == tag]
        if members:
            out.append(f"<h2>{_e(tag)}</h2>")
            out += [_operation(path, method, op, components) for path, method, op in members]
    untagged = [o for o in operations if not o[2].get("tags")]
    if untagged:
        out.append("<h2>Other routes</h2>")
        out += [_operation(path, method, op, components) for path, method, op in untagged]
    names = _reachable(spec)
    if names:
        out.append("<h2>Schemas</h2>")
        for name in names:
            out.append(f'<h3 id="schema-{_e(name)}">{_e(name)}</h3>')
            if components[name].get("description"):
                out.append(f"<p>{_e(components[name]['description'])}</p>")
            out.append(_fields(components[name], components))
    out.append("</body></html>")
    return "\n".join(out)


def docs_routes(document: Callable[[], dict]) -> list[Route]:
    """``GET /docs.json`` and ``GET /docs``, both from ``document()`` (the completed OpenAPI document)."""

    async def docs_json(request: Request) -> JSONResponse:
        return JSONResponse(document())

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(render_page(document()), headers=PAGE_HEADERS)

    return [Route("/docs", page, methods=["GET"]), Route("/docs.json", docs_json, methods=["GET"])]
