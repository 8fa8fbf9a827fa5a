"""Property-based fuzzing of a running service from its OpenAPI schema (schemathesis), at length, for each artifact
given (one server each). Writes RELIABILITY.md.

The test suite runs a short version of this on tiny models of every task (tests/service/test_fuzz.py); this one
serves real artifacts with auth on, lets schemathesis generate many more requests, and records the counts:

    python benchmarks/fuzz.py ARTIFACT [ARTIFACT ...] --service-python .venv-serve/bin/python [--max-examples 500]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serve_load import start_service, wait_ready  # noqa: E402

KEY = "fuzz-key"
# No 5xx; status codes, content types, headers and bodies as documented. Left out: whether every schema-valid
# body is accepted and every schema-violating one refused (the schema cannot say which label field a task needs).
EXCLUDED = "positive_data_acceptance,negative_data_rejection"


def fuzz_one(artifact: str, args: argparse.Namespace) -> dict:
    from core.manifest import read_manifest

    manifest = read_manifest(artifact)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    env.update(TUNESERVE_ARTIFACT=str(Path(artifact).resolve()), TUNESERVE_API_KEY=KEY,
               TUNESERVE_MAX_CONCURRENCY="64", TUNESERVE_ACCESS_LOG="false")
    proc, url = start_service(args.service_python, env)
    started = time.perf_counter()
    try:
        wait_ready(url, proc)
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "junit.xml"
            # The service's own timeout (60 s) answers a request schemathesis waits for: its 504 is documented.
            done = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", f"{url}/docs.json", "--url", url,
                                   "--checks", "all", "--exclude-checks", EXCLUDED, "--max-examples",
                                   str(args.max_examples), "--seed", "1", "--request-timeout", "70",
                                   "--max-response-time", "65",
                                   "-H", f"Authorization: Bearer {KEY}",
                                   "--report", "junit", "--report-junit-path", str(report)],
                                  capture_output=True, text=True, cwd=tmp)
            suites = ET.parse(report).getroot()
        alive = proc.poll() is None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    failures = done.stdout.find("=== FAILURES ===")
    print(done.stdout[failures - 40:failures + 6000] if failures >= 0 else done.stdout[-3000:])
    summary = re.search(r"(\d+) generated, (\d+) passed", done.stdout)
    operations = {case.get("name", "").split(" ")[0] + " " + case.get("name", "").split(" ")[-1]
                  for case in suites.iter("testcase")}
    failed = sorted({case.get("name", "") for case in suites.iter("testcase")
                     if case.find("failure") is not None or case.find("error") is not None})
    return {"name": manifest.name, "task": manifest.task.value, "generated": int(summary.group(1)) if summary else None,
            "operations": len(operations), "failed": failed, "exit": done.returncode, "alive": alive,
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", metavar="ARTIFACT")
    parser.add_argument("--max-examples", type=int, default=500, help="per operation and test phase")
    parser.add_argument("--service-python", default=sys.executable)
    parser.add_argument("--section", default="fuzz", help="the RELIABILITY.md section to write (one table per run)")
    args = parser.parse_args()

    from benchmarks._report import shown, write_section

    results = [fuzz_one(artifact, args) for artifact in args.artifacts]
    lines = "\n".join(
        f"| {r['name']} ({r['task']}) | {r['operations']} | {r['generated']} | {r['exit']} | "
        f"{len(r['failed'])}{' (' + ', '.join(r['failed']) + ')' if r['failed'] else ''} | "
        f"{'up' if r['alive'] else 'DOWN'} | {r['seconds']:.0f} s |" for r in results)
    body = f"""## Fuzzing the running service (schemathesis)

schemathesis generated requests from each service's own OpenAPI schema (/docs.json), with the API key sent and
`--max-examples {args.max_examples}` per operation and phase; checks: every check but
{EXCLUDED.replace(",", " and ")}. One server per model, served by `auto` (`{shown(args.service_python)}`).

| model (task) | operations | requests generated | exit code | failing operations | server afterwards | wall |
|---|---|---|---|---|---|---|
{lines}
"""
    print(body)
    write_section(args.section, "python benchmarks/fuzz.py " + " ".join(sys.argv[1:]), body, path=ROOT / "RELIABILITY.md")


if __name__ == "__main__":
    main()
