"""Cold start: from `bentoml serve` to the first answer of /readyz, and where the time goes.

Each artifact is started ``--runs`` times in each of two arrangements, taken in turn so that a busy moment of the
machine hits both:

- **as shipped**: scipy.stats and scikit-learn's metrics are imported when an evaluation first uses them;
- **eager**: the same service with those two imported as the interpreter starts (a ``sitecustomize.py`` on
  PYTHONPATH), as the service imported them before.

Every line the server logs is stamped with the moment it arrives, which splits a start into: BentoML's main process
(interpreter, BentoML, the service module imported to read its configuration) until it says it listens; the
worker's start until it logs the model it serves (which says how long the model's load and self-test took); and the
rest until /readyz answers. Beside them, ``import service.service`` timed in a fresh interpreter. Run it on exported
artifacts (an encoder classifier; a generation model is started with its int8 decoder):

    python benchmarks/cold_start.py runs/sentiment-lora/artifact [runs/summarize-lora/artifact] --runs 5
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

from benchmarks._report import shown, write_section  # noqa: E402
from benchmarks.serve_load import free_port  # noqa: E402

EAGER = "import scipy.stats, sklearn.metrics\n"
LISTENING = re.compile(r"listening on")
SERVING = re.compile(r"serving \S+ \(\S+\) as .* self-test passed .* in (\d+\.\d+) s")


def environment(artifact: Path, eager: bool, eager_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    env.update(TUNESERVE_ARTIFACT=str(artifact), BENTOML_HOME=str(eager_dir / "bentoml"), TUNESERVE_ACCESS_LOG="false")
    if eager:
        env["PYTHONPATH"] = str(eager_dir)  # its sitecustomize.py imports the two as the interpreter starts
    return env


def one_start(python: str, artifact: Path, eager: bool, eager_dir: Path, timeout: float = 120) -> dict[str, float]:
    """Seconds from launch to: the main process listening, the model served (and its load + self-test), ready."""
    import httpx

    port = free_port()
    start = time.monotonic()
    proc = subprocess.Popen([python, "-m", "bentoml", "serve", ".", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, env=environment(artifact, eager, eager_dir), stdout=subprocess.PIPE,
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


def import_seconds(python: str, eager: bool, eager_dir: Path) -> float:
    """A fresh interpreter that imports ``service.service`` and exits, start to end (the best of three)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    if eager:
        env["PYTHONPATH"] = str(eager_dir)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([python, "-c", "import service.service"], cwd=ROOT, env=env, capture_output=True, check=True)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--runs", type=int, default=5, help="starts per artifact and arrangement")
    parser.add_argument("--python", action="append", help="an interpreter that runs the service (repeat for "
                        "several, e.g. .venv/bin/python and .venv-serve/bin/python; default: this one)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    pythons = args.python or [sys.executable]
    with tempfile.TemporaryDirectory() as directory:
        eager_dir = Path(directory)
        (eager_dir / "sitecustomize.py").write_text(EAGER)
        rows, imports = [], []
        for python in pythons:
            where = shown(Path(python).parent.parent)  # the virtual environment
            seconds = {eager: import_seconds(python, eager, eager_dir) for eager in (False, True)}
            imports.append(f"{where}: {seconds[False]:.2f} s (eager: {seconds[True]:.2f} s)")
            print(imports[-1], flush=True)
            for artifact in args.artifacts:
                runs: dict[bool, list[dict]] = {False: [], True: []}
                for _ in range(args.runs):
                    for eager in (False, True):
                        runs[eager].append(one_start(python, artifact, eager, eager_dir))
                        print(where, shown(artifact), "eager" if eager else "shipped", runs[eager][-1], flush=True)
                for eager in (False, True):
                    median = {k: statistics.median(r[k] for r in runs[eager]) for k in runs[eager][0]}
                    rows.append((where, shown(artifact), eager, median, min(r["ready"] for r in runs[eager])))

    lines = ["| environment | artifact | scipy, scikit-learn | main process listening | worker: interpreter, "
             "imports | model load + self-test | then ready | ready (median) | ready (best) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for where, artifact, eager, m, best in rows:
        worker = m["served"] - m["listening"] - m["load_and_selftest"]
        lines.append(f"| {where} | {artifact} | {'imported at start (before)' if eager else 'on first use'} "
                     f"| {m['listening']:.2f} s | {worker:.2f} s | {m['load_and_selftest']:.2f} s "
                     f"| {m['ready'] - m['served']:.2f} s | **{m['ready']:.2f} s** | {best:.2f} s |")
    table = "\n".join(lines)
    body = (f"Medians of {args.runs} starts per row, the two arrangements taken in turn. A fresh interpreter that "
            f"imports the service and exits: {'; '.join(imports)}.\n\n{table}")
    print(body)
    if not args.no_write:
        command = ("python benchmarks/cold_start.py " + " ".join(shown(a) for a in args.artifacts)
                   + "".join(f" --python {shown(p)}" for p in pythons) + f" --runs {args.runs}")
        write_section("cold-start", command, body)


if __name__ == "__main__":
    main()
