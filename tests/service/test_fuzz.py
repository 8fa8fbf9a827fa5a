"""Property-based fuzzing of the running service from its own OpenAPI schema (schemathesis), for every task the suite
builds a model of: each against its own real `bentoml serve`, with the same checks."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from tests.service.test_serve_process import KEY, start_server, stop, wait_ready

# Checks that the API must pass for any input: no 5xx, status codes, content types, headers and bodies as the
# schema documents them. Left out: whether the server accepts every schema-valid body and rejects every
# schema-violating one: the schema cannot say that a classification model needs `label` and not `labels`.
EXCLUDED = "positive_data_acceptance,negative_data_rejection"

# Examples per operation: fewer where each request costs more (a writer decodes, a token model windows).
# Classification, the demo's task, gets the most; benchmarks/fuzz.py runs hundreds per model.
TASKS = {"classification": 60, "multilabel": 25, "regression": 25, "pair": 25, "token": 25, "embedding": 25,
         "generation": 15}
# The service answers within its own timeout, a 504 at worst; the client allows twice that before it calls a response
# too slow, so a request the service cuts off at its limit on a busy machine is not taken for one it never cut off.
SERVICE_TIMEOUT = 20  # seconds
CLIENT_LIMIT = 2 * SERVICE_TIMEOUT
OPERATIONS = 9  # /predict, /evaluate, /generate, /embed, /rank, /metadata, /healthz, /livez, /readyz (and /metrics)


@pytest.fixture
def artifact_of(request):
    """task -> its artifact, building only the fixtures the test asks for."""
    def get(task: str):
        if task in ("embedding", "generation"):
            return request.getfixturevalue(f"{task}_artifact")
        return request.getfixturevalue("artifacts")[task]

    return get


def _failures(suites: ET.Element) -> str:
    """Each failing operation and what failed, its reproducing request cut short: a request of thousands of examples
    would otherwise push the reason out of the message."""
    found = []
    for case in suites.iter("testcase"):
        for failure in [*case.iter("failure"), *case.iter("error")]:
            found.append(f"{case.get('name')}: {(failure.get('message') or '')[:500]} {(failure.text or '')[:1500]}")
    return "\n".join(found) + "\n"


@pytest.mark.parametrize("task", list(TASKS))
def test_schemathesis_finds_no_server_error_and_no_response_off_schema(task, artifact_of, tmp_path):
    env = {"TUNESERVE_ARTIFACT": str(artifact_of(task)), "TUNESERVE_API_KEY": KEY,
           # a writer's budget small enough that a fuzzed /evaluate or /generate decodes for a second, not minutes
           "TUNESERVE_MAX_REQUEST_TOKENS": "512",
           # a request at the largest documented size may take longer than schemathesis waits by default (10 s): the
           # service answers it, or gives its documented 504, before the client gives up
           "TUNESERVE_TIMEOUT": str(SERVICE_TIMEOUT),
           **({"TUNESERVE_BACKEND": "onnx"} if task != "generation" else {})}
    proc, url, log = start_server(env, tmp_path / "bentoml")
    try:
        wait_ready(proc, url)
        report = tmp_path / "junit.xml"
        done = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", f"{url}/docs.json", "--url", url,
                               "--checks", "all", "--exclude-checks", EXCLUDED, "--max-examples", str(TASKS[task]),
                               "--seed", "1", "--request-timeout", str(CLIENT_LIMIT + 10),
                               "--max-response-time", str(CLIENT_LIMIT), "-H", f"Authorization: Bearer {KEY}",
                               "--report", "junit", "--report-junit-path", str(report),
                               # adding and removing models is the same code for every task: fuzzed with the first
                               *([] if task == next(iter(TASKS)) else ["--exclude-path-regex", "^/models"])],
                              capture_output=True, text=True, timeout=600, cwd=tmp_path)
        suites = ET.parse(report).getroot()
        assert done.returncode == 0, _failures(suites) + done.stdout[-2000:]
        cases = sum(int(s.get("tests", 0)) for s in suites.iter("testsuite"))
        failures = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites.iter("testsuite"))
        assert failures == 0, _failures(suites) + done.stdout[-2000:]
        assert cases >= OPERATIONS  # every operation was exercised
        assert "generated" in done.stdout
        assert proc.poll() is None  # and the server is still up
    finally:
        stop(proc)
