"""Many LoRA fine-tunes in one service: memory and speed of a set over one shared base, in one run.

From one exported LoRA artifact with a variant over a shared base (runs/sentiment-lora/artifact after `make demo`),
it makes N models: directories that link the artifact's files, each with its own manifest (its own name) and its own
copy of the adapter file, so each model loads its own factors and head (the factors are equal: what is measured
here, memory and time, does not depend on their values). Then, against real `bentoml serve` processes on 127.0.0.1:

- memory: the resident memory of one process serving 1, 8 and 32 models over the shared base, of one process serving
  the same number of merged int8 graphs, and of one process per model (one process's memory times N);
- speed: single-sentence requests (real vader sentences) at concurrency 32 spread evenly over 8 models of the set,
  and at concurrency 1, against one merged int8 model serving all the traffic alone.

    python benchmarks/model_sets.py runs/sentiment-lora/artifact
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.batch_jobs import sentences  # noqa: E402
from benchmarks.serve_load import start_service, stop, tree_rss_mb, wait_ready  # noqa: E402

ADAPTER = "onnx/shared/adapter.safetensors"


def make_models(artifact: Path, directory: Path, count: int) -> list[Path]:
    """``count`` models that link the artifact's files, each with its own manifest and adapter file."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    if not any(v["name"] == "onnx-shared" for v in manifest["export"]["variants"]):
        sys.exit(f"{artifact}: no variant over a shared base; export it again (`tuneserve export {artifact}`)")
    models = []
    for i in range(count):
        model = directory / f"m{i:02d}"
        for source in artifact.rglob("*"):
            if source.is_dir():
                continue
            target = model / source.relative_to(artifact)
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.name == "manifest.json":
                target.write_text(json.dumps({**manifest, "name": f"m{i:02d}"}))
            elif str(source.relative_to(artifact)) == ADAPTER:
                target.write_bytes(source.read_bytes())
            else:
                target.symlink_to(source.resolve())
        models.append(model)
    return models


def serve(env: dict, timeout: float = 600) -> tuple:
    proc, url = start_service(sys.executable, {**os.environ, "TUNESERVE_ACCESS_LOG": "false", **env})
    return proc, url, wait_ready(url, proc, timeout)


KEY = "benchmark-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def warm(url: str, names: list[str | None], text: str) -> None:
    import httpx

    for name in names:
        body = {"texts": [text], **({"model": name} if name else {})}
        response = httpx.post(url + "/predict", json=body, timeout=60, headers=AUTH)
        response.raise_for_status()


async def load(url: str, texts: list[str], names: list[str | None], concurrency: int, seconds: float) -> dict:
    """``concurrency`` clients, each sending one sentence per request back to back, the k-th request to model
    ``names[k % len(names)]``, until the time is up."""
    import aiohttp

    latencies: list[float] = []
    finished: list[float] = []  # when each request was answered (perf_counter)
    failures, sent = 0, 0
    deadline = time.perf_counter() + seconds

    async def client(session) -> None:
        nonlocal sent, failures
        while time.perf_counter() < deadline:
            k = sent
            sent += 1
            body = {"texts": [texts[k % len(texts)]]}
            if names[k % len(names)]:
                body["model"] = names[k % len(names)]
            start = time.perf_counter()
            async with session.post(url + "/predict", json=body, headers=AUTH) as response:
                await response.read()
                failures += response.status != 200
            latencies.append(time.perf_counter() - start)
            finished.append(time.perf_counter())

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"requests": len(latencies), "failures": failures, "throughput": len(latencies) / elapsed,
            "p50_ms": 1000 * statistics.median(latencies), "finished": finished}


async def hot_add(url: str, texts: list[str], names: list[str], newcomer: Path) -> dict:
    """Add ``newcomer`` (POST /models) while 8 clients keep asking the others: seconds to its first answer, and the
    requests answered (and failed) meanwhile."""
    import httpx

    traffic = asyncio.create_task(load(url, texts, names, 8, 12))
    await asyncio.sleep(3)
    async with httpx.AsyncClient(timeout=120, headers=AUTH) as client:
        started = time.perf_counter()
        added = await client.post(url + "/models", json={"source": str(newcomer)})
        first = await client.post(url + "/predict", json={"texts": [texts[0]], "model": newcomer.name})
        answered = time.perf_counter()
    during = await traffic
    meanwhile = sum(started <= t <= answered for t in during["finished"])
    return {"status": (added.status_code, first.status_code), "seconds": answered - started, "answered": meanwhile,
            "failures": during["failures"], "requests": during["requests"]}


def in_process(artifact: Path, texts: list[str]) -> dict[str, tuple[float, float]]:
    """The graphs alone, without HTTP: p50 ms of one sentence, and sentences/s in calls of 32, for the shared base
    (one adapter) and the model's merged fp32 and int8 graphs, each with 2 threads."""
    from benchmarks._report import latency_and_throughput
    from core.encoding import Encoder
    from core.manifest import read_manifest
    from core.onnx_runner import OnnxModel
    from core.shared_base import Adapter, SharedBase
    from service.backends import load_tokenizer

    manifest = read_manifest(artifact)
    encoder = Encoder.from_manifest(load_tokenizer(artifact), manifest)
    adapter = Adapter.load(artifact / ADAPTER)
    shared = SharedBase(artifact / "onnx/shared/base.onnx", adapter.base, threads=2, spinning=False)
    shared.add("model", adapter)
    graphs = {"shared base (fp32) + adapter": shared.model_for("model"),
              "merged fp32": OnnxModel(artifact / "onnx/model.onnx", threads=2, spinning=False),
              "merged int8": OnnxModel(artifact / "onnx/model.int8.onnx", threads=2, spinning=False)}
    return {name: latency_and_throughput(
        lambda batch, g=graph: g.logits(encoder, batch, task=manifest.task, batch_size=8), texts, 200, 1024,
        call_size=32) for name, graph in graphs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--counts", default="1,8,32", help="set sizes whose memory is measured")
    parser.add_argument("--spread", type=int, default=8, help="models the load is spread over")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each load run")
    parser.add_argument("--no-write", action="store_true", help="print the table; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    texts = sentences()[:4000]

    graphs = in_process(args.artifact.resolve(), texts)
    print({name: (round(p50, 2), round(rate, 1)) for name, (p50, rate) in graphs.items()}, flush=True)
    with tempfile.TemporaryDirectory(prefix="model-sets-") as scratch:
        models = make_models(args.artifact.resolve(), Path(scratch), max(counts + [args.spread + 1]))
        memory = {}
        for backend in ("onnx-shared", "onnx-int8"):
            for n in counts:
                proc, url, ready_s = serve({"TUNESERVE_MODELS": ",".join(str(m) for m in models[:n]),
                                            "TUNESERVE_BACKEND": backend})
                try:
                    warm(url, [m.name for m in models[:n]], texts[0])
                    memory[backend, n] = (tree_rss_mb(proc.pid), ready_s)
                finally:
                    stop(proc)
                print(f"{backend} x{n}: {memory[backend, n][0]:.0f} MB, ready in {ready_s:.1f} s", flush=True)

        speed = {}
        runs = {"one merged int8 model": ({"TUNESERVE_ARTIFACT": str(models[0]), "TUNESERVE_BACKEND": "onnx-int8"},
                                          [None]),
                f"{args.spread} models over the shared base": (
                    {"TUNESERVE_MODELS": ",".join(str(m) for m in models[:args.spread])},
                    [m.name for m in models[:args.spread]])}
        for label, (env, names) in runs.items():
            proc, url, _ = serve({**env, "TUNESERVE_API_KEY": KEY})
            try:
                warm(url, names, texts[0])
                asyncio.run(load(url, texts, names, 32, 3))  # warm-up
                speed[label] = {c: asyncio.run(load(url, texts, names, c, args.seconds)) for c in (32, 1)}
            finally:
                stop(proc)
            print(label, {c: (round(r["throughput"], 1), round(r["p50_ms"], 2), r["failures"])
                          for c, r in speed[label].items()}, flush=True)
        proc, url, _ = serve({"TUNESERVE_MODELS": ",".join(str(m) for m in models[:args.spread]),
                              "TUNESERVE_API_KEY": KEY})
        try:
            names = [m.name for m in models[:args.spread]]
            warm(url, names, texts[0])
            added = asyncio.run(hot_add(url, texts, names, models[args.spread]))
        finally:
            stop(proc)
        print("hot add", added, flush=True)

    one = memory["onnx-int8", 1][0]
    rows = ["| models | one process, shared base (MB) | one process, merged int8 graphs (MB) | a process per model (MB) |",
            "|---:|---:|---:|---:|"]
    for n in counts:
        rows.append(f"| {n} | {memory['onnx-shared', n][0]:.0f} | {memory['onnx-int8', n][0]:.0f} | {n * one:.0f} |")
    low, high = min(counts), max(counts)
    per_adapter = (memory["onnx-shared", high][0] - memory["onnx-shared", low][0]) / (high - low)
    per_graph = (memory["onnx-int8", high][0] - memory["onnx-int8", low][0]) / (high - low)
    base_label, set_label = list(speed)
    alone, spread = speed[base_label], speed[set_label]
    body = "\n".join([
        "Many LoRA fine-tunes of MiniLM in one service (`TUNESERVE_MODELS`): the models are copies of one LoRA "
        "artifact, each with its own manifest and its own adapter file, served by real `bentoml serve` processes "
        "(resident memory of the server's process tree after each model answered once).",
        "", *rows, "",
        f"Each added model over the shared base costs {per_adapter:.1f} MB ({100 * per_adapter / one:.1f}% of a "
        f"process of its own, {one:.0f} MB); each added merged int8 graph in one process costs {per_graph:.1f} MB. "
        f"Ready in {memory['onnx-shared', high][1]:.1f} s with {high} models over the shared base, "
        f"{memory['onnx-int8', high][1]:.1f} s with {high} merged int8 graphs.",
        "",
        "| served | concurrency 32: requests/s | p50 (ms) | concurrency 1: p50 (ms) | failures |",
        "|---|---:|---:|---:|---:|",
        *(f"| {label} | {r[32]['throughput']:.1f} | {r[32]['p50_ms']:.1f} | {r[1]['p50_ms']:.2f} | "
          f"{r[32]['failures'] + r[1]['failures']} |" for label, r in speed.items()),
        "",
        f"Spread evenly over {args.spread} models, the set serves {spread[32]['throughput'] / alone[32]['throughput']:.2f}x "
        f"the requests per second of one merged int8 model serving all the traffic alone, and a lone request takes "
        f"{spread[1]['p50_ms'] - alone[1]['p50_ms']:+.2f} ms at the median.",
        "",
        f"Hot add: while 8 clients kept asking the {args.spread} models, a {args.spread + 1}th was added with "
        f"`POST /models` (status {added['status'][0]}) and gave its first answer {added['seconds']:.2f} s after the "
        f"request; {added['answered']} requests to the others were answered meanwhile, and "
        f"{added['failures']} of the {added['requests']} requests of the run failed.",
        "",
        "The graphs alone, in one process without HTTP (2 threads):",
        "",
        "| graph | one sentence: p50 (ms) | calls of 32: sentences/s |",
        "|---|---:|---:|",
        *(f"| {name} | {p50:.2f} | {rate:.0f} |" for name, (p50, rate) in graphs.items()),
        "",
        "The shared base runs in fp32 with a low-rank side path on each of the 36 linear layers of MiniLM's blocks, "
        "and ONNX Runtime's optimizer cannot fuse attention across them; the merged model's int8 graph is the one a "
        "single model serves. Most of the gap to one merged int8 model is that difference of graphs (an int8 base "
        "with fp32 side paths would close it; not built yet). Models over one base share one tokenizer; what each "
        "adds is its factors (about 2 MB at rank 8), its head and its objects.",
    ])
    print(body)
    if not args.no_write:
        from benchmarks._report import write_section

        write_section("model-sets", "python benchmarks/model_sets.py " + " ".join(sys.argv[1:]), body)


if __name__ == "__main__":
    main()
