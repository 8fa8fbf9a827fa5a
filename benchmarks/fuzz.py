"""Property-based fuzzing of a running service from its OpenAPI schema (schemathesis), at length. Writes RELIABILITY.md.

The test suite runs a short version of this (tests/service/test_fuzz.py); this one serves a real artifact
with auth and a concurrency limit on, lets schemathesis generate many more requests, and records the count:

    python benchmarks/fuzz.py runs/sentiment-lora/artifact --service-python .venv-serve/bin/python [--max-examples 500]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serve_load import start_service, wait_ready  # noqa: E402

KEY = "fuzz-key"
# No 5xx; status codes, content types, headers and bodies as documented. Left out: whether every schema-valid
# body is accepted and every schema-violating one refused (the schema cannot say which label field a task needs).
EXCLUDED = "positive_data_acceptance,negative_data_rejection"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--max-examples", type=int, default=500, help="per operation and test phase")
    parser.add_argument("--service-python", default=sys.executable)
    args = parser.parse_args()

    from benchmarks._report import write_section

    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    env.update(TUNESERVE_ARTIFACT=str(Path(args.artifact).resolve()), TUNESERVE_API_KEY=KEY,
               TUNESERVE_MAX_CONCURRENCY="64", TUNESERVE_ACCESS_LOG="false")
    proc, url = start_service(args.service_python, env)
    try:
        wait_ready(url, proc)
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "junit.xml"
            done = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", f"{url}/docs.json", "--url", url,
                                   "--checks", "all", "--exclude-checks", EXCLUDED, "--max-examples",
                                   str(args.max_examples), "--seed", "1", "-H", f"Authorization: Bearer {KEY}",
                                   "--report", "junit", "--report-junit-path", str(report)],
                                  capture_output=True, text=True, cwd=tmp)
            suites = ET.parse(report).getroot()
        alive = proc.poll() is None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    summary = re.search(r"(\d+) generated, (\d+) passed", done.stdout)
    generated = int(summary.group(1)) if summary else None
    operations = sorted({case.get("name", "").split(" ")[0] + " " + case.get("name", "").split(" ")[-1]
                         for case in suites.iter("testcase")})
    failures = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites.iter("testsuite"))
    body = f"""## Fuzzing the running service (schemathesis)

schemathesis generated **{generated}** requests from the service's own OpenAPI schema (/docs.json) across
{len(operations)} operations, with the API key sent and `--max-examples {args.max_examples}`; checks: every check but
{EXCLUDED.replace(",", " and ")}. Result: exit code {done.returncode}, {failures} failing operations; the server was
{"still up" if alive else "DOWN"} afterwards.
"""
    print(done.stdout[-3000:])
    print(body)
    write_section("fuzz", "python benchmarks/fuzz.py " + " ".join(sys.argv[1:]), body, path=ROOT / "RELIABILITY.md")


if __name__ == "__main__":
    main()
