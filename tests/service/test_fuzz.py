"""Property-based fuzzing of the running service from its own OpenAPI schema (schemathesis)."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET

from tests.service.test_serve_process import KEY, start_server, stop, wait_ready

# Checks that the API must pass for any input: no 5xx, status codes, content types, headers and bodies as the
# schema documents them. Left out: whether the server accepts every schema-valid body and rejects every
# schema-violating one: the schema cannot say that a classification model needs `label` and not `labels`.
EXCLUDED = "positive_data_acceptance,negative_data_rejection"


def test_schemathesis_finds_no_server_error_and_no_response_off_schema(artifacts, tmp_path):
    env = {"TUNESERVE_ARTIFACT": str(artifacts["classification"]), "TUNESERVE_BACKEND": "onnx", "TUNESERVE_API_KEY": KEY}
    proc, url, log = start_server(env, tmp_path / "bentoml")
    try:
        wait_ready(proc, url)
        report = tmp_path / "junit.xml"
        done = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", f"{url}/docs.json", "--url", url,
                               "--checks", "all", "--exclude-checks", EXCLUDED, "--max-examples", "100",
                               "--seed", "1", "-H", f"Authorization: Bearer {KEY}", "--report", "junit",
                               "--report-junit-path", str(report)],
                              capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-4000:]
        suites = ET.parse(report).getroot()
        cases = sum(int(s.get("tests", 0)) for s in suites.iter("testsuite"))
        assert cases >= 6  # every operation was exercised
        assert "generated" in done.stdout
        assert proc.poll() is None  # and the server is still up
    finally:
        stop(proc)
