"""A small request's latency while large ones arrive: turns at the model against one request holding it, in one run.

A client sends one-text /predict requests one after another (a few seconds, bounded in count) while another keeps
legal large requests coming, one at a time (256 texts of 20,000 characters each, about 5 MB). The same requests
go to `bentoml serve` processes over one artifact, one after the other: the service as it ships (a large request
is split into turns of at most TUNESERVE_TURN_TOKENS that alternate with other requests', and one-turn requests
run beside a large request's turn), with ``--before REV`` the service as it was at commit REV (checked out beside,
in a temporary git worktree), and this service with turns as large as a whole request (TUNESERVE_TURN_TOKENS and
TUNESERVE_MAX_BATCH_SIZE over the request's size: the large request holds the model for its whole length, as before
turns). Each gets the one-text requests alone first. The figure that matters is the one-text p99 under load
against its p99 alone.

    python benchmarks/fairness.py runs/sentiment-lora/artifact --before HEAD
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import checkouts, shown, write_section  # noqa: E402
from benchmarks.serve_load import start_service, stop, wait_ready  # noqa: E402

SMALL = "A gentle, funny film that never lets its cast down."
WORDS = ("the plot was good and the acting was dull but the music carried every scene of it " * 300)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def small_requests(url: str, count: int, seconds: float) -> list[float]:
    """One-text requests one after another: each one's seconds (all must be answered with 200)."""
    import httpx

    times: list[float] = []
    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=120) as client:
        while len(times) < count and time.monotonic() < deadline:
            start = time.perf_counter()
            r = client.post(url + "/predict", json={"texts": [SMALL]})
            times.append(time.perf_counter() - start)
            if r.status_code != 200:
                sys.exit(f"one-text request answered {r.status_code}: {r.text[:300]}")
    return times


def measure(url: str, count: int, seconds: float, large_texts: int, large_chars: int) -> dict:
    import httpx

    httpx.post(url + "/predict", json={"texts": [SMALL]}, timeout=60)  # warm
    alone = small_requests(url, count, seconds)
    body = {"texts": [WORDS[:large_chars]] * large_texts}
    stop_large, large_times = threading.Event(), []

    def keep_sending() -> None:
        with httpx.Client(timeout=600) as client:
            while not stop_large.is_set():
                start = time.perf_counter()
                r = client.post(url + "/predict", json=body)
                large_times.append(time.perf_counter() - start)
                if r.status_code != 200:
                    sys.exit(f"large request answered {r.status_code}: {r.text[:300]}")

    sender = threading.Thread(target=keep_sending, daemon=True)
    sender.start()
    time.sleep(1.0)  # the first large request is in the server
    loaded = small_requests(url, count, seconds)
    stop_large.set()
    sender.join(600)
    return {"alone": alone, "loaded": loaded, "large": large_times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--requests", type=int, default=300, help="one-text requests per phase (at most)")
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds per phase (at most)")
    parser.add_argument("--large-texts", type=int, default=256)
    parser.add_argument("--large-chars", type=int, default=20_000)
    parser.add_argument("--also-turn-tokens", type=int, nargs="*", default=[],
                        help="also measure the service with turns of these many tokens")
    parser.add_argument("--before", help="also measure the service as it was at this commit (e.g. HEAD~1)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    base.update(TUNESERVE_ARTIFACT=str(Path(args.artifact).resolve()), TUNESERVE_ACCESS_LOG="false",
                TUNESERVE_MAX_TEXTS=str(max(256, args.large_texts)),
                TUNESERVE_MAX_BODY_BYTES=str(16 * 1024 * 1024))
    whole = str(args.large_texts * 1024)
    with tempfile.TemporaryDirectory() as scratch, checkouts(args.before, Path(scratch)) as trees:
        setups = {("turns (as shipped)" if label == "this checkout" else f"turns, {label}"): (root, {})
                  for label, root in trees.items()}
        for tokens in args.also_turn_tokens:
            setups[f"turns of {tokens} tokens"] = (ROOT, {"TUNESERVE_TURN_TOKENS": str(tokens)})
        setups["one turn per request"] = (ROOT, {"TUNESERVE_TURN_TOKENS": whole, "TUNESERVE_MAX_BATCH_SIZE": "1024"})
        results = {}
        for name, (root, extra) in setups.items():
            proc, url = start_service(sys.executable, {**base, **extra}, root)
            try:
                wait_ready(url, proc)
                results[name] = measure(url, args.requests, args.seconds, args.large_texts, args.large_chars)
            finally:
                stop(proc)
    rows = ["| service | one-text p50 alone | p99 alone | p50 under load | p99 under load | p99 ratio | "
            "one-text answered under load | large requests done (median s) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        alone99, loaded99 = percentile(r["alone"], 99), percentile(r["loaded"], 99)
        rows.append(f"| {name} | {1000 * statistics.median(r['alone']):.1f} ms | {1000 * alone99:.1f} ms | "
                    f"{1000 * statistics.median(r['loaded']):.1f} ms | {1000 * loaded99:.1f} ms | "
                    f"{loaded99 / alone99:.1f}x | {len(r['loaded'])} | {len(r['large'])} "
                    f"({statistics.median(r['large']) if r['large'] else float('nan'):.1f}) |")
    table = "\n".join(rows)
    print(table)
    if not args.no_write:
        command = (f"python benchmarks/fairness.py {shown(args.artifact)} --requests {args.requests} "
                   f"--seconds {args.seconds:g}" + (f" --before {args.before}" if args.before else "")
                   + (" --also-turn-tokens " + " ".join(map(str, args.also_turn_tokens)) if args.also_turn_tokens
                      else ""))
        body = (f"One-text `/predict` requests, one after another, alone and while large requests ({args.large_texts} "
                f"texts of {args.large_chars:,} characters, one at a time) keep arriving; the same artifact in "
                f"{len(results)} `bentoml serve` processes, one after the other in this run. As shipped, a request "
                "of one turn runs beside a large request's turn (a second pass at the model, from a second thread "
                "on the same session), so it waits for neither the large request nor its current turn; the large "
                "requests' own time is the last column.\n\n" + table)
        write_section("fairness", command, body)


if __name__ == "__main__":
    main()
