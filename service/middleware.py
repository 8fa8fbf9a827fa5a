"""ASGI middleware in front of the API: bearer-token auth, JSON-only bodies, and a request-size limit.

Pure ASGI (no body re-parsing) so that each check costs next to nothing and runs before BentoML reads
the request. Health and metrics routes stay open for probes.
"""

from __future__ import annotations

import hmac
import json

# Routes that carry data: these need the key (when one is set) and take JSON bodies only.
API_PATHS = frozenset({"/predict", "/evaluate", "/generate", "/embed", "/rank", "/metadata"})


async def reject(send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"error": message}).encode()
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
    return scope["path"].rstrip("/") in API_PATHS


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

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

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

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _field_path(loc) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


class ValidationErrorShapeMiddleware:
    """Give request-validation errors one documented shape: ``{"error": "<field>: <problem>", "detail": "..."}``.

    BentoML answers a body that fails its pydantic model with ``detail`` as a list, where its own OpenAPI
    schema promises a string; clients (and schema checkers) get the promised shape, naming the field.
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
            if message["type"] == "http.response.start" and message["status"] == 400:
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
                problems = data.get("detail") if isinstance(data, dict) else None
                if isinstance(problems, list) and problems:
                    lines = [f"{_field_path(p.get('loc', []))}: {p.get('msg', 'invalid')}" for p in problems]
                    body = json.dumps({"error": lines[0] if len(lines) == 1 else f"{lines[0]} (and {len(lines) - 1} more)",
                                       "detail": "; ".join(lines)}).encode()
            except (ValueError, AttributeError):
                pass
            headers = [(k, v) for k, v in start_message.get("headers", []) if k.lower() != b"content-length"]
            await send({**start_message, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, capture)
