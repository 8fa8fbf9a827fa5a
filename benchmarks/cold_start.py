"""Cold start: from `bentoml serve` to the first answer of /readyz, and where the time goes.

Each artifact is started ``--runs`` times by the service as it is in this checkout and, with ``--before REV``, by
the service as it was at commit REV (checked out beside, in a temporary git worktree), the two taken in turn so
that a busy moment of the machine hits both.

Every line the server logs is stamped with the moment it arrives, which splits a start into: BentoML's main process
(interpreter, BentoML, the service module imported to read its configuration) until it says it listens; the
worker's start until it logs the model it serves (which says how long the model's load and self-test took); and the
rest until /readyz answers. Beside them, ``import service.service`` timed in a fresh interpreter. Run it on exported
artifacts (an encoder classifier; a generation model is started with its int8 decoder). An artifact given as
``NOW,BEFORE`` is served from NOW by this checkout and from BEFORE (the same model as the earlier commit exported
it) by the earlier one, for changes of the export:

    python benchmarks/cold_start.py runs/sentiment-lora/artifact [runs/summarize-lora/artifact] --runs 5 --before HEAD
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import checkouts, shown, write_section  # noqa: E402
from benchmarks.serve_load import free_port  # noqa: E402

LISTENING = re.compile(r"listening on")
SERVING = re.compile(r"serving \S+ \(\S+\) as .* self-test passed .* in (\d+\.\d+) s")


def environment(artifact: Path, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    env.update(TUNESERVE_ARTIFACT=str(artifact.absolute()), BENTOML_HOME=str(home), TUNESERVE_ACCESS_LOG="false")
    return env


def one_start(python: str, artifact: Path, root: Path, home: Path, timeout: float = 120) -> dict[str, float]:
    """Seconds from launch to: the main process listening, the model served (and its load + self-test), ready,
    for the service in the checkout at ``root``."""
    import httpx

    port = free_port()
    start = time.monotonic()
    proc = subprocess.Popen([python, "-m", "bentoml", "serve", ".", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=root, env=environment(artifact, home), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    stamps: dict[str, float] = {}

    def read() -> None:
        for line in proc.stdout:
            if "listening" not in stamps and LISTENING.search(line):
                stamps["listening"] = time.monotonic() - start
            match = SERVING.search(line)
            if match and "served" not in stamps:
                stamps["served"] = time.monotonic() - start
                stamps["load_and_selftest"] = float(match.group(1))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        while time.monotonic() - start < timeout:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode} before it was ready")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    stamps["ready"] = time.monotonic() - start
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        else:
            raise SystemExit(f"not ready after {timeout} s")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    reader.join(timeout=5)
    missing = {"listening", "served"} - set(stamps)
    if missing:
        raise SystemExit(f"the server's log lacks the lines that mark {sorted(missing)}")
    return stamps


def import_seconds(python: str, root: Path) -> float:
    """A fresh interpreter that imports ``service.service`` and exits, start to end (the best of three)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([python, "-c", "import service.service"], cwd=root, env=env, capture_output=True, check=True)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", help="artifact directories, each NOW or NOW,BEFORE")
    parser.add_argument("--runs", type=int, default=5, help="starts per artifact and arrangement")
    parser.add_argument("--python", action="append", help="an interpreter that runs the service (repeat for "
                        "several, e.g. .venv/bin/python and .venv-serve/bin/python; default: this one)")
    parser.add_argument("--before", help="also start the service as it was at this commit (e.g. HEAD~1)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--section", default="cold-start", help="the BENCHMARKS.md section to write")
    args = parser.parse_args()

    pythons = [str(Path(p).absolute()) for p in args.python or [sys.executable]]  # run from either checkout
    with tempfile.TemporaryDirectory() as directory, checkouts(args.before, Path(directory)) as trees:
        home = Path(directory) / "bentoml"
        rows, imports = [], []
        for python in pythons:
            where = shown(Path(python).parent.parent)  # the virtual environment
            seconds = {label: import_seconds(python, root) for label, root in trees.items()}
            imports.append(f"{where}: " + ", ".join(f"{s:.2f} s ({label})" for label, s in seconds.items()))
            print(imports[-1], flush=True)
            for given in args.artifacts:
                now, _, before = given.partition(",")
                served = {label: Path(before if before and root != ROOT else now) for label, root in trees.items()}
                runs: dict[str, list[dict]] = {label: [] for label in trees}
                for _ in range(args.runs):
                    for label, root in trees.items():
                        runs[label].append(one_start(python, served[label], root, home))
                        print(where, shown(served[label]), label, runs[label][-1], flush=True)
                for label in trees:
                    median = {k: statistics.median(r[k] for r in runs[label]) for k in runs[label][0]}
                    rows.append((where, shown(served[label]), label, median, min(r["ready"] for r in runs[label])))

    lines = ["| environment | artifact | service | main process listening | worker: interpreter, imports "
             "| model load + self-test | then ready | ready (median) | ready (best) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for where, artifact, label, m, best in rows:
        worker = m["served"] - m["listening"] - m["load_and_selftest"]
        lines.append(f"| {where} | {artifact} | {label} | {m['listening']:.2f} s | {worker:.2f} s "
                     f"| {m['load_and_selftest']:.2f} s | {m['ready'] - m['served']:.2f} s | **{m['ready']:.2f} s** "
                     f"| {best:.2f} s |")
    table = "\n".join(lines)
    body = (f"Medians of {args.runs} starts per row, the services taken in turn. A fresh interpreter that imports the "
            f"service and exits: {'; '.join(imports)}.\n\n{table}")
    print(body)
    if not args.no_write:
        command = ("python benchmarks/cold_start.py " + " ".join(",".join(map(shown, a.split(","))) for a in args.artifacts)
                   + "".join(f" --python {shown(p)}" for p in pythons) + f" --runs {args.runs}"
                   + (f" --before {args.before}" if args.before else "")
                   + (f" --section {args.section}" if args.section != "cold-start" else ""))
        write_section(args.section, command, body)


if __name__ == "__main__":
    main()
