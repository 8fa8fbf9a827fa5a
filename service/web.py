"""The service's page for people: at ``/``, the model (its metrics beside the baselines, the report plots, the card),
a box to try it and a file to evaluate it on, in plain HTML, CSS and JavaScript from ``service/web/`` (no build
step). Everything the page shows comes from the API (``/metadata``, ``/predict``, ``/generate``, ``/rank``,
``/evaluate``) and from ``/report`` and ``/card``, which the API key guards like the API; the page and its two files
do not need the key. A Content-Security-Policy lets the page load and call this service only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from core.cpu_files import CARD_FILE, REPORT_DIR
from service.requests import RequestError

WEB_DIR = Path(__file__).parent / "web"
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/ui/app.css": ("app.css", "text/css; charset=utf-8"), "/ui/icon.svg": ("icon.svg", "image/svg+xml")}
# The page may load and call this service only: no other host, no inline script or style, no plug-ins.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
# The paths under the API key (beside the API's own): what the artifact says beyond /metadata.
GUARDED_PREFIXES = ("/report", "/card")


def plots(directory: Path) -> list[str]:
    report = directory / REPORT_DIR
    return sorted(p.name for p in report.glob("*.png")) if report.is_dir() else []


def card_html(directory: Path) -> str:
    """The model card (markdown) as HTML: tables and code kept, raw HTML in it shown as text."""
    from markdown_it import MarkdownIt

    path = directory / CARD_FILE
    text = path.read_text(encoding="utf-8") if path.is_file() else "*This artifact has no model card.*"
    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def _refused(exc: RequestError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=getattr(exc, "status", 400))  # shaped by the middleware


def web_routes(artifact_dir: Callable[[str | None], Path]) -> list[Route]:
    """The page, its script and style, the list of report plots, each plot, and the card; ``artifact_dir`` gives the
    directory of the model a request names in ``?model=`` (raising RequestError for one not served)."""
    files = {path: ((WEB_DIR / name).read_bytes(), media) for path, (name, media) in STATIC.items()}

    def static(path: str) -> Callable:
        body, media = files[path]

        async def serve(request: Request) -> Response:
            return Response(body, media_type=media, headers=HEADERS)

        return serve

    def directory_of(request: Request) -> Path:
        return artifact_dir(request.query_params.get("model"))

    async def report(request: Request) -> JSONResponse:
        try:
            return JSONResponse({"plots": plots(directory_of(request))})
        except RequestError as exc:
            return _refused(exc)

    async def plot(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            directory = directory_of(request)
        except RequestError as exc:
            return _refused(exc)
        if name not in plots(directory):  # only a listed file: nothing else of the disk is reachable
            return JSONResponse({"error": f"no report plot named {name}", "field": None}, status_code=404)
        return FileResponse(directory / REPORT_DIR / name, media_type="image/png", headers=HEADERS)

    async def card(request: Request) -> JSONResponse:
        try:
            return JSONResponse({"html": card_html(directory_of(request))})
        except RequestError as exc:
            return _refused(exc)

    return [*(Route(path, static(path), methods=["GET"]) for path in STATIC),
            Route("/report", report, methods=["GET"]), Route("/report/{name}", plot, methods=["GET"]),
            Route("/card", card, methods=["GET"])]
