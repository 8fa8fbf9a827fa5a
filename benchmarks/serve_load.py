"""Loopback load on the service against the server a user would write without tuneserve, in one run.

Single-sentence POST requests (real vader:movie sentences), bounded in count and time, at concurrency 1 and
32, against (a) `bentoml serve` of the service with the ONNX backend the artifact selects, and (b) a naive
FastAPI app calling a transformers `pipeline` in torch, one request at a time. Beside them, the same ONNX
backend in-process (batch 1 latency, throughput in calls of 32), the service's cold start to ready and its
resident memory. Run it on an exported artifact:

    make venv-serve   # the serving requirements alone, as in the Docker image
    python benchmarks/serve_load.py runs/sentiment-lora/artifact --service-python .venv-serve/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAIVE_APP = textwrap.dedent('''
    import os
    from fastapi import FastAPI
    from pydantic import BaseModel
    from transformers import pipeline

    classifier = pipeline("text-classification", model=os.environ["MODEL_DIR"], device=-1)
    app = FastAPI()

    class Item(BaseModel):
        texts: list[str]

    @app.post("/predict")
    async def predict(item: Item):
        return {"predictions": classifier(item.texts)}

    @app.get("/readyz")
    async def ready():
        return "ok"
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(python: str, env: dict, root: Path = ROOT) -> tuple[subprocess.Popen, str]:
    """`bentoml serve` of the service in ``root`` (this checkout) on a free loopback port, in its own process
    group."""
    port = free_port()
    proc = subprocess.Popen([python, "-m", "bentoml", "serve", ".", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> float:
    import httpx

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return time.monotonic() - start
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    sys.exit(f"{url} not ready after {timeout} s")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and its children."""
    import psutil

    parent = psutil.Process(pid)
    total = 0.0
    for p in [parent, *parent.children(recursive=True)]:
        times = p.cpu_times()
        total += times.user + times.system
    return total


def measured_load(url: str, server_pid: int, texts: list[str], concurrency: int, requests: int, seconds: float) -> dict:
    """load(), plus the CPU milliseconds per request spent by the server and by the load generator itself."""
    server0, client0 = tree_cpu_s(server_pid), time.process_time()
    result = asyncio.run(load(url, texts, concurrency, requests, seconds))
    result["server_cpu_ms"] = 1000 * (tree_cpu_s(server_pid) - server0) / result["requests"]
    result["client_cpu_ms"] = 1000 * (time.process_time() - client0) / result["requests"]
    return result


def tree_rss_mb(pid: int) -> float:
    import psutil

    parent = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)]) / 2**20


async def load(url: str, texts: list[str], concurrency: int, requests: int, seconds: float) -> dict:
    """`concurrency` clients each sending one sentence per request, back to back, until the count or time is up."""
    import aiohttp

    latencies: list[float] = []
    failures = 0
    sent = 0
    deadline = time.perf_counter() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal sent, failures
        while sent < requests and time.perf_counter() < deadline:
            text = texts[sent % len(texts)]
            sent += 1
            start = time.perf_counter()
            async with session.post(url + "/predict", json={"texts": [text]}) as response:
                await response.read()
                if response.status != 200:
                    failures += 1
            latencies.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"requests": len(latencies), "failures": failures, "throughput": len(latencies) / elapsed,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * statistics.quantiles(latencies, n=100)[98] if len(latencies) > 100 else float("nan")}


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--requests", type=int, default=1500, help="most requests per load run")
    parser.add_argument("--seconds", type=float, default=60, help="longest load run")
    parser.add_argument("--n", type=int, default=300, help="sentences for in-process batch-1 latency")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment of the service (e.g. TUNESERVE_THREADS=1)")
    parser.add_argument("--also-env", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="also serve with these settings, in the same run (rows of their own; the targets read "
                             "the service as configured by --env alone)")
    parser.add_argument("--skip-naive", action="store_true", help="measure the service only")
    parser.add_argument("--service-python", default=sys.executable,
                        help="interpreter that runs `bentoml serve` (e.g. .venv-serve/bin/python: no torch)")
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    artifact = Path(args.artifact).resolve()

    from benchmarks._report import latency_and_throughput, write_section
    from core.manifest import read_manifest
    from service.backends import choose_backend
    from training.data.demo import demo_path

    manifest = read_manifest(artifact)
    rows = [json.loads(line) for line in demo_path("vader:movie").read_text().splitlines()]
    texts = [r["text"] for r in rows[-2000:]]  # the file's tail: held-out-like sentences of mixed length

    def in_process() -> dict:
        """The reference: the backend the service picks with TUNESERVE_BACKEND=auto, called in this process."""
        backend = choose_backend(artifact, manifest, backend="auto", device="auto", threads=None, batch_size=32)

        def logits(batch: list[str]):
            return backend.logits(batch, None)

        # Calls of 32 sentences as they come: what a pooled turn of 32 concurrent requests gives the model.
        p50, throughput = latency_and_throughput(logits, texts, args.n, 1024, call_size=32)
        # One call on all 1,024, which the backend sorts by length first: an offline best case no server sees.
        start = time.perf_counter()
        logits(texts[:1024])
        offline = 1024 / (time.perf_counter() - start)
        print(f"in-process {manifest.name}: batch 1 p50 {p50:.2f} ms, calls of 32 {throughput:.0f}/s, "
              f"1024 sorted {offline:.0f}/s", flush=True)
        return {"p50_ms": p50, "throughput": throughput, "offline": offline}

    # Measured before and after the servers, which run in between: this machine's speed drifts by a third
    # between minutes, and the targets compare the service with the mean of the two.
    inproc_runs = [in_process()]

    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    results = {}
    env_service = {**env, "TUNESERVE_ARTIFACT": str(artifact), "TUNESERVE_BACKEND": "auto",
                   **dict(item.split("=", 1) for item in args.env)}

    def serve(key: str, settings: dict) -> tuple[float, str, float, float]:
        """The service under load at concurrency 1 and 32 (results[(key, c)]): cold start, backend, RSS before and
        after."""
        service, url = start_service(args.service_python, {**env_service, **settings})
        try:
            cold = wait_ready(url, service)
            backend_name = __import__("httpx").get(url + "/metadata").json()["backend"]
            rss_start = tree_rss_mb(service.pid)
            asyncio.run(load(url, texts, 8, 200, 20))  # warm-up, not counted
            for concurrency in (1, 32):
                results[(key, concurrency)] = measured_load(url, service.pid, texts, concurrency, args.requests,
                                                            args.seconds)
                print(key, concurrency, results[(key, concurrency)], flush=True)
            return cold, backend_name, rss_start, tree_rss_mb(service.pid)
        finally:
            stop(service)

    cold, backend_name, rss_start, rss_end = serve("service", {})
    variants = {", ".join(variant.split(",")): dict(item.split("=", 1) for item in variant.split(","))
                for variant in args.also_env}
    for label, settings in variants.items():
        serve(label, settings)

    if args.skip_naive:
        inproc_runs.append(in_process())
        print(f"cold start {cold:.2f} s, RSS {rss_start:.0f} -> {rss_end:.0f} MB (naive server skipped; nothing written)")
        return
    naive_load(artifact, env, texts, args.requests, args.seconds, results)
    inproc_runs.append(in_process())
    table = section(results, list(variants), inproc_runs, backend_name, cold, (rss_start, rss_end), args)
    print(table)
    write_section("serve-load", "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]), table)


def naive_load(artifact: Path, env: dict, texts: list[str], requests: int, seconds: float, results: dict) -> None:
    """The naive FastAPI + pipeline server under load at concurrency 1 and 32 (results[("naive", c)])."""
    naive_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"tuneserve-naive-{os.getpid()}"
    naive_dir.mkdir(exist_ok=True)
    (naive_dir / "naive_app.py").write_text(NAIVE_APP)
    port = free_port()
    naive = subprocess.Popen([sys.executable, "-m", "uvicorn", "naive_app:app", "--host", "127.0.0.1", "--port", str(port),
                              "--log-level", "warning"], cwd=naive_dir, env={**env, "MODEL_DIR": str(artifact / "model")},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, naive)
        asyncio.run(load(url, texts, 8, 100, 20))
        for concurrency in (1, 32):
            results[("naive", concurrency)] = measured_load(url, naive.pid, texts, concurrency, requests, seconds)
            print("naive", concurrency, results[("naive", concurrency)], flush=True)
    finally:
        stop(naive)


def section(results: dict, variants: list[str], inproc_runs: list[dict], backend_name: str, cold: float,
            rss: tuple[float, float], args: argparse.Namespace) -> str:
    """BENCHMARKS.md's section: the rows of every server, the in-process reference and the targets (which read the
    service as configured by --env)."""
    from benchmarks._report import shown

    inproc = {key: statistics.mean(r[key] for r in inproc_runs) for key in ("p50_ms", "throughput", "offline")}
    before, after = (f"{r['throughput']:.0f}" for r in inproc_runs)
    rss_start, rss_end = rss

    def row(name: str, concurrency: int, r: dict) -> str:
        return (f"| {name} | {concurrency} | {r['requests']} | {r['failures']} | {r['throughput']:.0f} /s | "
                f"{r['p50_ms']:.2f} ms | {r['p99_ms']:.1f} ms | {r['server_cpu_ms']:.1f} ms | {r['client_cpu_ms']:.1f} ms |")

    servers = [("service", f"tuneserve ({backend_name})"), *((label, f"tuneserve, {label}") for label in variants),
               ("naive", "naive (torch pipeline)")]
    rows = "\n".join(row(name, c, results[(key, c)]) for key, name in servers for c in (1, 32))
    s1, s32 = results[("service", 1)], results[("service", 32)]
    n32 = results[("naive", 32)]
    return f"""## Serving under load: the service against a naive FastAPI + transformers pipeline server

Single-sentence requests over loopback (aiohttp clients on the same 2 cores), at most {args.requests} requests or
{args.seconds:.0f} s per row; the service ran `bentoml serve` with TUNESERVE_BACKEND=auto, which chose
**{backend_name}**, under `{shown(args.service_python)}`. In-process figures are that backend called directly in the benchmark's process,
before and after the servers ran (calls of 32 sentences: {before} and {after} /s); the table and the targets use their mean.
Batch 32 in-process means calls of 32 sentences in the order they come, as a pooled turn of 32 concurrent requests
reaches the model. One call on all 1,024 sentences, which the backend sorts by length before cutting batches of 32
(less padding than any server can get from 32 concurrent requests), gave {inproc['offline']:.0f} /s; the service at
concurrency 32 reaches {100 * s32['throughput'] / inproc['offline']:.0f}% of that.

| server | concurrency | requests | failed | throughput | p50 | p99 | server CPU per request | client CPU per request |
|---|---|---|---|---|---|---|---|---|
{rows}
| {backend_name} in-process | batch 1 / calls of 32 | | | {inproc['throughput']:.0f} /s (calls of 32) | {inproc['p50_ms']:.2f} ms (batch 1) | | | |

| target | measured | met |
|---|---|---|
| concurrency 32: ≥ 3x the naive server | {s32['throughput'] / n32['throughput']:.2f}x | {'yes' if s32['throughput'] >= 3 * n32['throughput'] else 'no'} |
| concurrency 32: ≥ 70% of in-process batch 32 (calls of 32) | {100 * s32['throughput'] / inproc['throughput']:.0f}% | {'yes' if s32['throughput'] >= 0.7 * inproc['throughput'] else 'no'} |
| concurrency 1: p50 within 3 ms of in-process batch 1 | +{s1['p50_ms'] - inproc['p50_ms']:.2f} ms | {'yes' if s1['p50_ms'] - inproc['p50_ms'] <= 3 else 'no'} |
| cold start to ready ≤ 5 s | {cold:.2f} s | {'yes' if cold <= 5 else 'no'} |
| resident memory ≤ 600 MB (server process tree) | {rss_start:.0f} MB after start, {rss_end:.0f} MB after the load | {'yes' if max(rss_start, rss_end) <= 600 else 'no'} |
"""

if __name__ == "__main__":
    main()
