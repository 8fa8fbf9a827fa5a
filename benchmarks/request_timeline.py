"""Where a request's time goes: one-sentence /predict requests at concurrency 1, split into stages by timestamps.

The service is served by `bentoml serve` as it is, with its middleware, auth and metrics, from a small entry module
this script writes (``timed_service.py``, beside nothing of the project) that imports the service and adds clocks
without changing what runs: an ASGI layer outside the service's own middleware and one inside it, and wrappers
around the scorer's call and the batcher's pass. Each request's stamps are written to a file by the worker
Beside the stages:

- the same backend called in this process with one sentence (the model alone, the issue's reference);
- two floors of the HTTP stack on the same machine: a BentoML service that returns a constant (BentoML's own
  middleware, tracing, metrics, uvicorn) and a bare Starlette app on uvicorn (loopback and HTTP parsing alone).

With ``--before REV`` the service of commit REV (a temporary worktree) is measured too, the two taken in turn:

    python benchmarks/request_timeline.py runs/sentiment-lora/artifact --python .venv-serve/bin/python --before HEAD
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import checkouts, shown, write_section  # noqa: E402
from benchmarks.serve_load import free_port, load, stop, wait_ready  # noqa: E402

TIMED_SERVICE = textwrap.dedent(r'''
    """The tuneserve service with clocks at the stages of a request (benchmarks/request_timeline.py)."""
    import json
    import os
    import time

    from service.batcher import MicroBatcher
    from service.scorer import Scorer
    from service.service import Tuneserve

    STAMPS = []
    now = time.perf_counter


    def current():
        return STAMPS[-1] if STAMPS else {}


    class Outside:
        """Outside the service's middleware: the request as BentoML hands it on, and the time spent in BentoML's
        and uvicorn's part of sending the answer."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http" or scope["path"] != "/predict":
                return await self.app(scope, receive, send)
            stamps = {"outside": now(), "send": 0.0}
            STAMPS.append(stamps)

            async def timed(message):
                start = now()
                await send(message)
                stamps["send"] += now() - start

            await self.app(scope, receive, timed)
            stamps["done"] = now()
            if len(STAMPS) >= 100:  # written by the worker as it goes (a stopped worker runs no exit hooks)
                with open(os.environ["TIMELINE_OUT"], "a") as out:
                    out.writelines(json.dumps(row) + "\n" for row in STAMPS)
                STAMPS.clear()


    class Inside:
        """Inside the service's middleware: where BentoML's route starts, and when the answer is handed out."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http" or scope["path"] != "/predict":
                return await self.app(scope, receive, send)
            stamps = current()
            stamps["inside"] = now()

            async def timed(message):
                if message["type"] == "http.response.start":
                    stamps["answer"] = now()
                await send(message)

            await self.app(scope, receive, timed)


    def wrapped(method, before, after):
        def call(*args, **kwargs):
            current()[before] = now()
            out = method(*args, **kwargs)
            current()[after] = now()
            return out
        return call


    scores = Scorer.scores


    async def timed_scores(self, texts, pairs=None):
        current()["scores"] = now()
        out = await scores(self, texts, pairs)
        current()["scored"] = now()
        return out


    Scorer.scores = timed_scores
    MicroBatcher._run = wrapped(MicroBatcher._run, "pass", "passed")
    Tuneserve.middlewares.insert(0, (Outside, {}))
    Tuneserve.add_asgi_middleware(Inside)

''')

FLOOR_BENTOML = textwrap.dedent('''
    import bentoml
    from pydantic import BaseModel


    class Out(BaseModel):
        predictions: list[dict]


    @bentoml.service(workers=1)
    class Floor:
        @bentoml.api
        async def predict(self, texts: list[str]) -> Out:
            return Out(predictions=[{"label": "positive", "score": 0.5} for _ in texts])
''')

FLOOR_STARLETTE = textwrap.dedent('''
    import json

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route


    async def predict(request):
        texts = json.loads(await request.body())["texts"]
        return JSONResponse({"predictions": [{"label": "positive", "score": 0.5} for _ in texts]})


    app = Starlette(routes=[Route("/predict", predict, methods=["POST"]),
                            Route("/readyz", lambda request: JSONResponse("ok"))])
''')

# (label, first stamp, second stamp): the stages of a request, in order
STAGES = [
    ("the service's middleware (auth, JSON only, body limit, error shape), in", "outside", "inside"),
    ("BentoML's route: the body read and validated into arguments, the request checked", "inside", "scores"),
    ("hand-off to the model's worker thread", "scores", "pass"),
    ("the model: tokenizer and ONNX Runtime", "pass", "passed"),
    ("hand-off back to the event loop, scores post-processed", "passed", "scored"),
    ("labels, truncation flags, response model, JSON", "scored", "answer"),
]


def served(python: str, root: Path, target: str, cwd: Path, env: dict, texts: list[str], requests: int,
           seconds: float) -> tuple[float, Path | None]:
    """p50 (ms) of one-sentence requests at concurrency 1 to ``bentoml serve target`` (or uvicorn for a bare app)."""
    port = free_port()
    stamps = cwd / f"stamps-{port}.jsonl"
    env = {**env, "PYTHONPATH": str(root), "TIMELINE_OUT": str(stamps)}
    if target.endswith(":app"):
        command = [python, "-m", "uvicorn", target, "--port", str(port), "--http", "httptools", "--loop", "uvloop",
                   "--no-access-log"]
    else:
        command = [python, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        asyncio.run(load(url, texts, 1, 200, 10))  # warm-up, not counted
        p50 = asyncio.run(load(url, texts, 1, requests, seconds))["p50_ms"]
    finally:
        stop(proc)
    return p50, stamps if stamps.exists() else None


def stages(path: Path | None, skip: int = 200) -> dict[str, float]:
    """Median milliseconds of each stage over the requests after the warm-up."""
    if path is None:
        sys.exit("the timed service answered but wrote no stamps; `bentoml serve .` with the same settings shows "
                 "what its worker says")
    rows = [r for r in map(json.loads, path.read_text().splitlines()[skip:])
            if all(k in r for _, a, b in STAGES for k in (a, b))]
    out = {label: 1000 * statistics.median(r[b] - r[a] for r in rows) for label, a, b in STAGES}
    out["sending: BentoML's send middleware (metrics, tracing) and uvicorn"] = 1000 * statistics.median(
        r["send"] for r in rows)
    out["in the service's process, from the outer layer to the answer sent"] = 1000 * statistics.median(
        r["done"] - r["outside"] for r in rows)
    out["requests timed"] = len(rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs `bentoml serve`")
    parser.add_argument("--before", help="also measure the service of this commit")
    parser.add_argument("--rounds", type=int, default=2, help="starts of each server, taken in turn")
    parser.add_argument("--requests", type=int, default=2000, help="most requests per start")
    parser.add_argument("--seconds", type=float, default=20, help="longest load per start")
    args = parser.parse_args()

    from benchmarks._report import latency_and_throughput
    from core.manifest import read_manifest
    from service.backends import choose_backend
    from training.data.demo import demo_path

    artifact = Path(args.artifact).absolute()
    python = str(Path(args.python).absolute())  # the servers start in a scratch directory (not resolved: a venv)
    manifest = read_manifest(artifact)
    rows = [json.loads(line) for line in demo_path("vader:movie").read_text().splitlines()]
    texts = [r["text"] for r in rows[-2000:]]  # as benchmarks/serve_load.py: held-out-like sentences
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    env.update(TUNESERVE_ARTIFACT=str(artifact), TUNESERVE_ACCESS_LOG="false")

    backend = choose_backend(artifact, manifest, backend="auto", device="auto", threads=None, batch_size=32)
    in_process = []

    def reference() -> None:
        in_process.append(latency_and_throughput(lambda batch: backend.logits(batch, None), texts, 500, 32)[0])
        print(f"in-process batch 1: {in_process[-1]:.2f} ms", flush=True)

    results: dict[str, list[float]] = {}
    timelines: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as directory, checkouts(args.before, Path(directory)) as trees:
        scratch = Path(directory)
        env["BENTOML_HOME"] = str(scratch / "bentoml")
        (scratch / "timed_service.py").write_text(TIMED_SERVICE)
        (scratch / "floor_bentoml.py").write_text(FLOOR_BENTOML)
        (scratch / "floor_starlette.py").write_text(FLOOR_STARLETTE)
        reference()
        for _ in range(args.rounds):
            for label, root in trees.items():
                p50, stamps = served(python, root, "timed_service:Tuneserve", scratch, env, texts,
                                     args.requests, args.seconds)
                results.setdefault(f"tuneserve ({label})", []).append(p50)
                timelines.setdefault(label, []).append(stages(stamps))
                print(label, f"{p50:.2f} ms", timelines[label][-1], flush=True)
            for label, target in (("a BentoML service returning a constant", "floor_bentoml:Floor"),
                                  ("a bare Starlette app on uvicorn", "floor_starlette:app")):
                results.setdefault(label, []).append(served(python, ROOT, target, scratch, env, texts,
                                                            args.requests, args.seconds)[0])
                print(label, f"{results[label][-1]:.2f} ms", flush=True)
        reference()

    reference_ms = statistics.mean(in_process)
    lines = [f"One-sentence POST /predict requests at concurrency 1 (keep-alive, aiohttp, {args.requests:,} requests "
             f"or {args.seconds:.0f} s per start, after 200 not counted), `bentoml serve` under "
             f"{shown(Path(args.python).parent.parent)} with the service's middleware and BentoML's metrics on "
             f"(access log off); {args.rounds} starts of each server, taken in turn. The in-process reference is "
             f"the backend `auto` picks ({backend.name}) called with one sentence in the benchmark's process, "
             f"before and after the servers: {in_process[0]:.2f} and {in_process[-1]:.2f} ms.", "",
             "| server | p50 per start (ms) | p50, mean (ms) | over in-process batch 1 |", "|---|---:|---:|---:|"]
    for label, values in results.items():
        mean = statistics.mean(values)
        over = f"{mean - reference_ms:+.2f} ms" if label.startswith("tuneserve") else "(no model)"
        lines.append(f"| {label} | {', '.join(f'{v:.2f}' for v in values)} | {mean:.2f} | {over} |")
    lines += ["", "Where the service's time goes (ms: each start's median over its timed requests, the mean of the "
                  "starts):", "",
              "| stage | " + " | ".join(timelines) + " |", "|---|" + "---:|" * len(timelines)]
    labels = list(next(iter(timelines.values()))[0])
    for stage in labels:
        cells = []
        for runs in timelines.values():
            values = [run[stage] for run in runs]
            cells.append(f"{sum(values):,}" if stage == "requests timed" else f"{statistics.mean(values):.3f}")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    body = "\n".join(lines)
    print(body)
    command = "python benchmarks/request_timeline.py " + " ".join(sys.argv[1:])
    write_section("request-timeline", command, body)


if __name__ == "__main__":
    main()
