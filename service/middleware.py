"""ASGI middleware in front of the API: bearer-token auth, JSON-only bodies, a request-size limit, unknown fields
refused, and one error body for every 4xx: ``{"error": "<one line>", "field": "<path or null>"}``.

Pure ASGI (no body re-parsing) so that each check costs next to nothing and runs before BentoML reads
the request. Health and metrics routes stay open for probes.
"""

from __future__ import annotations

import difflib
import hmac
import json
import re

from core.tasks import model_routes
from service.web import GUARDED_PREFIXES

# Routes that carry data: these need the key (when one is set) and take JSON bodies only.
API_PATHS = frozenset({*model_routes(), "/evaluate", "/metadata", "/models"})


# The field an error message starts with ("texts[1]: empty ..." -> "texts[1]"), as the service's messages do.
_LEADING_FIELD = re.compile(r"^([A-Za-z_]\w*(?:\[\d+\]|\.[A-Za-z_]\w*)*): ")


def error_body(message: str, field: str | None = None, **details) -> dict:
    """The one shape of a 4xx body: the message, the field it is about (from the message's leading ``path: `` when
    not given; null when about no field), and details only where they add something."""
    if field is None and (match := _LEADING_FIELD.match(message)):
        field = match.group(1)
    return {"error": message, "field": field, **details}


async def reject(send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None,
                 field: str | None = None) -> None:
    body = json.dumps(error_body(message, field)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or []:
        if key.lower() == name:
            return value
    return None


def _api_path(scope) -> bool:
    path = scope["path"].rstrip("/")
    return path in API_PATHS or path.startswith((*GUARDED_PREFIXES, "/models/"))


class BearerAuthMiddleware:
    """``Authorization: Bearer <key>`` on the API routes (constant-time comparison); 401 otherwise."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = b"Bearer " + api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _api_path(scope):
            given = _header(scope, b"authorization") or b""
            if not hmac.compare_digest(given, self.expected):
                return await reject(send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                    [(b"www-authenticate", b"Bearer")])
        await self.app(scope, receive, send)


class JsonOnlyMiddleware:
    """POST bodies of the API routes must be JSON: other media types (BentoML's pickle type among them,
    which would deserialize code) are refused with 415 before anything reads the body."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and _api_path(scope):
            media = (_header(scope, b"content-type") or b"application/json").split(b";")[0].strip().lower()
            if media != b"application/json":
                return await reject(send, 415, f"content type {media.decode('latin-1')!r} is not accepted; "
                                               "send application/json")
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, whether announced by Content-Length or sent chunked.

    The body is read here (up to the limit) and replayed to the app, so an oversized upload is cut off
    before any of it is parsed, and the server stays healthy.
    """

    def __init__(self, app, max_bytes: int, fields: dict[str, frozenset[str]] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.fields = fields or {}  # route -> the top-level fields its body may have; others are refused

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"request body over the limit of {self.max_bytes} bytes"
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await reject(send, 400, "Content-Length is not a number")
            if int(declared) > self.max_bytes:
                return await reject(send, 413, too_large)
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                return await reject(send, 413, too_large)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False
        known = self.fields.get(scope["path"].rstrip("/")) if scope["method"] == "POST" else None
        if known is not None and (unknown := _unknown_field(body, known)):
            return await reject(send, 400, unknown[1], field=unknown[0])

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _unknown_field(body: bytes, known: frozenset[str]) -> tuple[str, str] | None:
    """The first top-level field of a JSON object body that the route does not take, with the message; None where
    there is none (a body that is not a JSON object is left for the route's own validation to refuse)."""
    try:
        data = json.loads(body) if body else {}
    except (ValueError, RecursionError):  # not JSON, or nested past the parser: the route's validation says so
        return None
    if not isinstance(data, dict):
        return None
    for name in data:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            return name, f"{name}: unknown field; {hint}this route takes {', '.join(sorted(known))}"
    return None


def _field_path(loc) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


class ErrorShapeMiddleware:
    """Give every 4xx answer of the API routes one documented shape (:func:`error_body`).

    BentoML answers a body that fails its pydantic model with ``detail`` as a list (and bad JSON with an empty
    field path), where its own OpenAPI schema promises a string; the routes answer ``{"error": ...}``. Both become
    ``{"error": "<field>: <problem>", "field": "<field>"}``, with ``detail`` listing every problem where there are
    several.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not _api_path(scope):
            return await self.app(scope, receive, send)
        start: dict | None = None
        chunks: list[bytes] = []

        async def capture(message):
            nonlocal start
            if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
                start = message
                return
            if start is None:
                return await send(message)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                await send_reshaped(start, b"".join(chunks))

        async def send_reshaped(start_message, body: bytes):
            try:
                data = json.loads(body)
            except ValueError:
                data = None
            headers = [(k, v) for k, v in start_message.get("headers", []) if k.lower() != b"content-length"]
            if isinstance(data, dict):
                body = json.dumps(_reshaped(data)).encode()
            elif data is None:  # the router's plain "Not Found" (a path it cannot match) or "Method Not Allowed"
                what = body.decode(errors="replace").strip() or "Not Found"
                body = json.dumps(error_body(f"{what.lower()}: {scope['method']} {scope['path']!r}")).encode()
                headers = [(k, v) for k, v in headers if k.lower() != b"content-type"]
                headers.append((b"content-type", b"application/json"))
            await send({**start_message, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, capture)


def _reshaped(data: dict) -> dict:
    """A 4xx body in the one shape: from BentoML's validation ``detail`` list, or from a route's ``error``."""
    problems = data.get("detail")
    if isinstance(problems, list) and problems and all(isinstance(p, dict) for p in problems):
        paths = [_field_path(p.get("loc", [])) or "body" for p in problems]
        lines = [f"{path}: {p.get('msg', 'invalid')}" for path, p in zip(paths, problems)]
        if len(lines) == 1:
            return error_body(lines[0], paths[0])
        return error_body(f"{lines[0]} (and {len(lines) - 1} more)", paths[0], detail="; ".join(lines))
    if isinstance(data.get("error"), str):
        return {**error_body(data["error"], data.get("field")),
                **{k: v for k, v in data.items() if k not in ("error", "field", "detail")}}
    if isinstance(problems, str):
        return error_body(problems.strip().lstrip(": ") or "bad request")
    return data
