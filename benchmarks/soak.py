"""Soak: minutes of mixed loopback load on a real `bentoml serve`, then SIGTERM under load. Writes RELIABILITY.md.

Clients send /predict (1-4 texts), /evaluate (50 labelled examples) and malformed requests (broken JSON,
wrong types, unknown labels, over-limit bodies, the pickle content type) back to back. Counted: valid
requests that failed (must be 0), malformed ones answered with anything but a 4xx (must be 0), 5xx, and the
server's resident memory over time (it must level off). Then a burst of /evaluate requests is in flight when
the server gets SIGTERM: they must all complete, new connections must be refused, and the exit code must be 0.

    python benchmarks/soak.py runs/sentiment-lora/artifact --service-python .venv-serve/bin/python [--seconds 180]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serve_load import start_service, tree_rss_mb, wait_ready  # noqa: E402

MALFORMED = [
    ("broken JSON", b'{"texts": ["unfinished', "application/json"),
    ("wrong type", b'{"texts": [1, 2]}', "application/json"),
    ("unknown label", b'{"examples": [{"text": "fine", "label": "so-so"}]}', "application/json"),
    ("too many texts", json.dumps({"texts": ["x"] * 300}).encode(), "application/json"),
    ("pickle body", b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00N.", "application/vnd.bentoml+pickle"),
    ("over the size limit", b'{"texts": ["' + b"a" * (9 * 2**20) + b'"]}', "application/json"),
]


async def mixed_load(url: str, texts: list[str], examples: list[dict], seconds: float, concurrency: int,
                     pid: int) -> dict:
    import aiohttp

    counts = {"predict": 0, "evaluate": 0, "malformed": 0, "valid_failed": 0, "malformed_not_4xx": 0, "5xx": 0}
    memory: list[tuple[float, float]] = []
    rng = random.Random(0)
    start = time.perf_counter()
    deadline = start + seconds

    async def client(session) -> None:
        while time.perf_counter() < deadline:
            roll = rng.random()
            if roll < 0.8:
                kind, path, body, ctype = "predict", "/predict", json.dumps(
                    {"texts": rng.sample(texts, rng.randint(1, 4))}).encode(), "application/json"
            elif roll < 0.9:
                kind, path, body, ctype = "evaluate", "/evaluate", json.dumps(
                    {"examples": rng.sample(examples, 50)}).encode(), "application/json"
            else:
                kind = "malformed"
                _, body, ctype = rng.choice(MALFORMED)
                path = "/evaluate" if b"examples" in body else "/predict"
            try:
                async with session.post(url + path, data=body, headers={"content-type": ctype}) as response:
                    await response.read()
                    status = response.status
            except aiohttp.ClientError:
                status = 0  # connection dropped
            counts[kind] += 1
            counts["5xx"] += status >= 500
            if kind == "malformed":
                counts["malformed_not_4xx"] += not 400 <= status < 500
            else:
                counts["valid_failed"] += status != 200

    async def sample_memory() -> None:
        while time.perf_counter() < deadline:
            memory.append((time.perf_counter() - start, tree_rss_mb(pid)))
            await asyncio.sleep(5)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(sample_memory(), *(client(session) for _ in range(concurrency)))
    counts["seconds"] = time.perf_counter() - start
    counts["memory"] = memory
    return counts


async def sigterm_under_load(url: str, proc: subprocess.Popen, examples: list[dict], n: int) -> dict:
    import aiohttp

    body = json.dumps({"examples": examples[:2000]}).encode()
    async with aiohttp.ClientSession() as session:
        async def one():
            async with session.post(url + "/evaluate", data=body, headers={"content-type": "application/json"}) as r:
                await r.read()
                return r.status

        tasks = [asyncio.ensure_future(one()) for _ in range(n)]
        await asyncio.sleep(1.0)  # in flight
        os.killpg(proc.pid, signal.SIGTERM)
        statuses = await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.5)
        try:
            async with session.post(url + "/predict", json={"texts": ["after shutdown"]}) as r:
                after = f"answered {r.status}"
        except aiohttp.ClientError as exc:
            after = f"refused ({type(exc).__name__})"
    code = await asyncio.get_running_loop().run_in_executor(None, lambda: proc.wait(60))
    return {"statuses": statuses, "after": after, "exit_code": code}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--service-python", default=sys.executable)
    args = parser.parse_args()

    from benchmarks._report import write_section
    from training.data.demo import demo_path

    rows = [json.loads(line) for line in demo_path("vader:movie").read_text().splitlines()]
    labelled = [{"text": r["text"], "label": r["polarity"]} for r in rows if r.get("polarity")]
    texts = [r["text"] for r in rows]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    env.update(TUNESERVE_ARTIFACT=str(Path(args.artifact).resolve()), TUNESERVE_ACCESS_LOG="false")
    proc, url = start_service(args.service_python, env)
    try:
        wait_ready(url, proc)
        soak = asyncio.run(mixed_load(url, texts, labelled, args.seconds, args.concurrency, proc.pid))
        shutdown = asyncio.run(sigterm_under_load(url, proc, labelled, 8))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    memory = soak["memory"]
    rss = [m for _, m in memory]
    half = len(rss) // 2
    completed = sum(1 for s in shutdown["statuses"] if s == 200)
    body = f"""## Soak: mixed load, then SIGTERM under load

{soak['seconds']:.0f} s of loopback load from {args.concurrency} clients on the ONNX service (`{args.service_python}`):
80% /predict of 1-4 sentences, 10% /evaluate of 50 labelled sentences, 10% malformed requests
({", ".join(name for name, _, _ in MALFORMED)}).

| requests | /predict | /evaluate | malformed | valid requests failed | malformed not answered 4xx | 5xx |
|---|---|---|---|---|---|---|
| {soak['predict'] + soak['evaluate'] + soak['malformed']} | {soak['predict']} | {soak['evaluate']} | {soak['malformed']} | {soak['valid_failed']} | {soak['malformed_not_4xx']} | {soak['5xx']} |

Resident memory of the server's process tree (sampled every 5 s): {rss[0]:.0f} MB at the start, {max(rss):.0f} MB
at the peak, {rss[-1]:.0f} MB at the end; mean of the first half {sum(rss[:half]) / max(half, 1):.0f} MB, of the
second half {sum(rss[half:]) / max(len(rss) - half, 1):.0f} MB.

Shutdown: 8 /evaluate requests of 2,000 sentences each were in flight when the server got SIGTERM:
{completed} of 8 completed with 200; a request sent after that was {shutdown['after']}; exit code
{shutdown['exit_code']}.
"""
    print(body)
    write_section("soak", "python benchmarks/soak.py " + " ".join(sys.argv[1:]), body, path=ROOT / "RELIABILITY.md")


if __name__ == "__main__":
    main()
