"""Soak: minutes of mixed loopback load on a real `bentoml serve` of each artifact given, then SIGTERM under load.
Writes RELIABILITY.md.

Clients send the model's own route (/predict, /generate or /embed: 1-4 texts), /evaluate (labelled examples of the
artifact's own test split, read as `tuneserve evaluate` reads a file) and malformed requests (broken JSON, wrong
types, unknown labels, over-limit bodies, the pickle content type) back to back. Counted: valid requests that failed
(must be 0), malformed ones answered with anything but a 4xx (must be 0), 5xx, and the server's resident memory over
time (it must level off). Then a burst of /evaluate requests is in flight when the server gets SIGTERM: they must all
complete, new connections must be refused, and the exit code must be 0. The burst is sized to be answered within the
service's request timeout (TUNESERVE_TIMEOUT, 60 s): the requests queue for the model one after another, and one still
waiting at the timeout is answered 504 whether or not the server is stopping (`--shutdown-examples` sets the size).

    python benchmarks/soak.py ARTIFACT [ARTIFACT ...] --service-python .venv-serve/bin/python [--seconds 180]
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
from collections import Counter
from dataclasses import dataclass
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


@dataclass
class Row:
    text: str
    pair: str | None
    example: dict  # the row as /evaluate takes it


@dataclass
class Load:
    """What valid requests to one artifact look like: its route, and rows of its own test split."""

    name: str
    task: str
    route: str
    has_pair: bool
    rows: list[Row]
    evaluate_size: int  # examples per /evaluate of the mixed load
    shutdown_size: int  # examples per /evaluate in flight at SIGTERM

    @classmethod
    def of(cls, artifact: Path, shutdown_examples: int | None = None) -> Load:
        from core.manifest import read_manifest
        from training.data.reading import load_labelled

        manifest = read_manifest(artifact)
        spec = manifest.task.spec
        data = manifest.provenance.config["data"]
        split = load_labelled(manifest, data.get("test") or data["train"], drop_missing=True)
        rows = [Row(text, pair, posted(spec, text, pair, label))
                for text, pair, label in zip(split.texts, split.pairs or [None] * len(split), split.labels)]
        # A writer decodes every example: its /evaluate requests stay small (and within its token budget).
        evaluate_size, shutdown_size = (4, 4) if spec.writes else (min(50, len(rows)), min(200, len(rows)))
        shutdown_size = min(shutdown_examples or shutdown_size, len(rows))
        return cls(manifest.name, manifest.task.value, spec.route, manifest.has_pair, rows, evaluate_size,
                   shutdown_size)

    def request(self, rows: list[Row]) -> dict:
        """A valid body for the model's route."""
        if self.route == "/generate":
            return {"prompts": [r.text for r in rows]}
        body: dict = {"texts": [r.text for r in rows]}
        if self.has_pair:
            body["text_pairs"] = [r.pair for r in rows]
        return body


def posted(spec, text: str, pair: str | None, label) -> dict:
    """A labelled example as /evaluate takes it: the text, and the label under the task's field (a token model's
    words and tags as tokens and tags)."""
    from core.tasks.token import TaggedText

    if isinstance(label, TaggedText):
        return {"tokens": [label.text[s:e] for s, e in label.words], "tags": list(label.tags)}
    example = {"text": text, spec.label_key: label}
    if pair is not None:
        example["text_pair"] = pair
    return example


async def mixed_load(url: str, load: Load, seconds: float, concurrency: int, pid: int) -> dict:
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
                kind, path, body, ctype = "predict", load.route, json.dumps(
                    load.request(rng.sample(load.rows, rng.randint(1, 4)))).encode(), "application/json"
            elif roll < 0.9:
                kind, path, body, ctype = "evaluate", "/evaluate", json.dumps(
                    {"examples": [r.example for r in rng.sample(load.rows, load.evaluate_size)]}).encode(), \
                    "application/json"
            else:
                kind = "malformed"
                _, body, ctype = rng.choice(MALFORMED)
                path = "/evaluate" if b"examples" in body else load.route
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


async def sigterm_under_load(url: str, proc: subprocess.Popen, load: Load, n: int) -> dict:
    import aiohttp

    body = json.dumps({"examples": [r.example for r in load.rows[:load.shutdown_size]]}).encode()
    async with aiohttp.ClientSession() as session:
        async def one():
            async with session.post(url + "/evaluate", data=body, headers={"content-type": "application/json"}) as r:
                await r.read()
                return r.status

        tasks = [asyncio.ensure_future(one()) for _ in range(n)]
        await asyncio.sleep(1.0)  # in flight
        os.killpg(proc.pid, signal.SIGTERM)
        stopped = time.perf_counter()
        statuses = await asyncio.gather(*tasks, return_exceptions=True)
        drained = time.perf_counter() - stopped
        await asyncio.sleep(0.5)
        try:
            async with session.post(url + load.route, json=load.request(load.rows[:1])) as r:
                after = f"answered {r.status}"
        except aiohttp.ClientError as exc:
            after = f"refused ({type(exc).__name__})"
    code = await asyncio.get_running_loop().run_in_executor(None, lambda: proc.wait(60))
    return {"statuses": [s if isinstance(s, int) else type(s).__name__ for s in statuses], "after": after,
            "exit_code": code, "drained": drained}


def soak_one(artifact: str, args: argparse.Namespace) -> dict:
    load = Load.of(Path(artifact), args.shutdown_examples)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    env.update(TUNESERVE_ARTIFACT=str(Path(artifact).resolve()), TUNESERVE_ACCESS_LOG="false")
    proc, url = start_service(args.service_python, env)
    try:
        wait_ready(url, proc)
        soak = asyncio.run(mixed_load(url, load, args.seconds, args.concurrency, proc.pid))
        shutdown = asyncio.run(sigterm_under_load(url, proc, load, 8))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return {"load": load, "soak": soak, "shutdown": shutdown}


def row(result: dict) -> tuple[str, str]:
    """A line of the load table and one of the shutdown table."""
    load, soak, shutdown = result["load"], result["soak"], result["shutdown"]
    rss = [m for _, m in soak["memory"]]
    half = len(rss) // 2
    total = soak["predict"] + soak["evaluate"] + soak["malformed"]
    answers = ", ".join(f"{n} × {status}" for status, n in Counter(shutdown["statuses"]).most_common())
    return (f"| {load.name} ({load.task}) | {total} | {soak['predict']} {load.route} | {soak['evaluate']} of "
            f"{load.evaluate_size} | {soak['malformed']} | {soak['valid_failed']} | {soak['malformed_not_4xx']} | "
            f"{soak['5xx']} | {rss[0]:.0f} / {max(rss):.0f} / {rss[-1]:.0f} MB | "
            f"{sum(rss[:half]) / max(half, 1):.0f} / {sum(rss[half:]) / max(len(rss) - half, 1):.0f} MB |",
            f"| {load.name} ({load.task}) | 8 of {load.shutdown_size} examples | {answers} | "
            f"{shutdown['drained']:.1f} s | {shutdown['after']} | {shutdown['exit_code']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", metavar="ARTIFACT")
    parser.add_argument("--seconds", type=float, default=180, help="of mixed load, per artifact")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--service-python", default=sys.executable)
    parser.add_argument("--shutdown-examples", type=int, default=None,
                        help="examples per /evaluate in flight at SIGTERM (default 200; 4 for a model that writes)")
    parser.add_argument("--section", default="soak", help="the RELIABILITY.md section to write (one table per run)")
    args = parser.parse_args()

    from benchmarks._report import shown, write_section

    lines = [row(soak_one(artifact, args)) for artifact in args.artifacts]
    heading = (f"SIGTERM with {args.shutdown_examples:,}-example requests in flight" if args.shutdown_examples
               else "mixed load, then SIGTERM under load")
    body = f"""## Soak: {heading}

{args.seconds:.0f} s of loopback load from {args.concurrency} clients on each model's service, served by `auto`
(`{shown(args.service_python)}`): 80% the model's own route with 1-4 texts of its test split, 10% /evaluate of labelled
examples of its test split, 10% malformed requests ({", ".join(name for name, _, _ in MALFORMED)}). Memory: the
resident memory of the server's process tree, sampled every 5 s (start / peak / end; mean of the first / second half).

| model (task) | requests | to the model's route | /evaluate (examples each) | malformed | valid requests failed | malformed not answered 4xx | 5xx | memory | halves |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(load for load, _ in lines)}

Shutdown: 8 /evaluate requests in flight when the server got SIGTERM (their answers, and the time from SIGTERM to the
last); then one request to the model's route.

| model (task) | in flight | answers | drained in | the request after | exit code |
|---|---|---|---|---|---|
{chr(10).join(shutdown for _, shutdown in lines)}
"""
    print(body)
    write_section(args.section, "python benchmarks/soak.py " + " ".join(sys.argv[1:]), body, path=ROOT / "RELIABILITY.md")


if __name__ == "__main__":
    main()
