"""The page at ``/``, in a real browser: Debian's Chromium driven by Playwright, against a real ``bentoml serve`` on
127.0.0.1. What the page shows must be what the API answers, under a Content-Security-Policy that lets it load and
call this service only, usable from a keyboard and without axe-core violations."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import GENERATION_NEW_TOKENS, make_entity_rows, make_rows
from tests.service.test_serve_process import start_server, stop, wait_ready

playwright = pytest.importorskip("playwright.sync_api", reason="the page's tests need playwright "
                                 "(in requirements/lock.txt)")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
AXE = "axe-core@4.14.1"
KEY = "page-test-key"
NARROW = {"width": 360, "height": 740}


@pytest.fixture(scope="module")
def browser():
    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def axe_source(tmp_path_factory) -> str:
    """axe-core's script, from the npm registry."""
    directory = tmp_path_factory.mktemp("axe")
    subprocess.run(["npm", "pack", AXE, "--silent"], cwd=directory, check=True, capture_output=True, timeout=120)
    with tarfile.open(next(directory.glob("axe-core-*.tgz"))) as archive:
        return archive.extractfile("package/axe.min.js").read().decode()


def served(artifact, tmp_path_factory, **env):
    proc, url, _ = start_server({"TUNESERVE_ARTIFACT": str(artifact), **env}, tmp_path_factory.mktemp("bentoml"))
    wait_ready(proc, url)
    return proc, url


@pytest.fixture(scope="module")
def classifier(artifacts, tmp_path_factory):
    # 25 examples per /evaluate request: the page posts a file of 60 rows as three parts of one evaluation
    proc, url = served(artifacts["classification"], tmp_path_factory, TUNESERVE_MAX_EXAMPLES="25")
    yield url
    stop(proc)


def snapshot(shown, name: str) -> None:
    """With TUNESERVE_SCREENSHOTS=DIR, a page (whole) or one part of it as shown, to DIR/NAME.png (the README's
    pictures are taken this way)."""
    directory = os.environ.get("TUNESERVE_SCREENSHOTS")
    if directory:
        whole = {"full_page": True} if hasattr(shown, "goto") else {}
        shown.screenshot(path=str(Path(directory) / f"{name}.png"), **whole)


def wait_until(page, expression: str, timeout: float = 30) -> None:
    """Poll a JavaScript expression until it is true. Playwright's wait_for_function evaluates its predicate with
    eval, which the page's Content-Security-Policy (rightly) refuses; page.evaluate goes through the DevTools
    protocol, which the policy does not cover."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"not true after {timeout} s: {expression}"
        time.sleep(0.1)


def stream_events(url: str, prompt: str) -> list[dict]:
    """The JSON events /generate streams for one prompt."""
    events = []
    with httpx.stream("POST", url + "/generate", json={"prompts": [prompt], "stream": True}, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                events.append(json.loads(line[5:]))
    return events


def open_page(browser, url: str, **context):
    """A new page at ``url``, with the browser's console errors (a CSP violation among them) collected."""
    page = browser.new_context(**context).new_page()
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url + "/")
    return page, errors


def test_the_page_shows_the_model_and_answers_as_predict_does(browser, classifier, artifacts):
    page, errors = open_page(browser, classifier)
    page.wait_for_selector("#model:not([hidden])")
    manifest = json.loads((artifacts["classification"] / "manifest.json").read_text())
    assert manifest["name"] in page.text_content("#title")
    assert page.locator("#metrics tbody tr").count() == len(manifest["metrics"]["test"])
    wait_until(page, "document.querySelectorAll('#plots img').length > 0 && "
                     "[...document.querySelectorAll('#plots img')].every(i => i.complete && i.naturalWidth > 0)")
    text = make_rows(1, 99)[0]["text"]
    page.fill("#text", text)
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")  # the Predict button, reached from the keyboard
    shown = page.locator("[data-testid=decision]").text_content()
    expected = httpx.post(classifier + "/predict", json={"texts": [text]}).json()["predictions"][0]["label"]
    assert shown == expected
    assert page.locator(".bars li").count() == len(manifest["labels"])
    snapshot(page.locator("#try"), "page-classification")
    headers = httpx.get(classifier + "/").headers
    assert "script-src 'self'" in headers["content-security-policy"] and "default-src 'none'" in headers[
        "content-security-policy"]
    assert errors == []


def test_an_uploaded_file_gets_the_metrics_evaluate_gives(browser, classifier, tmp_path):
    rows = make_rows(60, 98)
    lines = ["text,label"] + [f'"{r["text"]}",{r["label"]}' for r in rows]
    (tmp_path / "labelled.csv").write_text("\n".join(lines) + "\n")
    page, errors = open_page(browser, classifier)
    page.wait_for_selector("#evaluate:not([hidden])")
    page.set_input_files("#file", str(tmp_path / "labelled.csv"))
    page.wait_for_selector("#eval-metrics")
    # the service takes 25 examples per request: the page posted three parts of one evaluation, and shows the
    # report of all 60 rows (tests/service/test_evaluate_parts.py: the same report as one request's)
    examples = [{"text": r["text"], "label": r["label"]} for r in rows]
    for index, at in enumerate((0, 25, 50)):
        part = {"id": "page-test-file", "index": index, "last": at == 50}
        expected = httpx.post(classifier + "/evaluate", json={"examples": examples[at:at + 25], "part": part}).json()
    assert expected["n"] == 60 and page.text_content("#report > p") == "60 examples"
    for name, value in expected["metrics"].items():
        assert page.text_content(f"[data-metric={name}]") == f"{value:.4f}", name
    assert page.locator(".heatmap tbody td").count() == len(expected["confusion_matrix"]) ** 2
    # the worst examples, worst first, each with its row's text, truth and the model's answer
    worst = expected["worst"]["examples"]
    shown = page.eval_on_selector_all("#worst tbody tr", "rs => rs.map(r => [...r.children].map(c => c.textContent))")
    assert [row[:4] for row in shown] == [[str(w["index"] + 1), rows[w["index"]]["text"], rows[w["index"]]["label"],
                                           w["prediction"]] for w in worst]
    snapshot(page.locator("#evaluate"), "page-evaluate")

    (tmp_path / "bad.csv").write_text("text,mood\nfine,happy\n")
    page.set_input_files("#file", str(tmp_path / "bad.csv"))
    page.wait_for_selector("#evaluate-error:not([hidden])")
    assert page.text_content("#evaluate-error") == "bad.csv: row 1: no label"
    assert errors == []


def test_the_page_and_its_files_weigh_at_most_250_kb(classifier):
    page = httpx.get(classifier + "/")
    files = re.findall(r'(?:src|href)="(/ui/[^"]+)"', page.text)
    assert {"/ui/app.js", "/ui/app.css"} <= set(files)
    sizes = {path: len(httpx.get(classifier + path).content) for path in files}
    assert len(page.content) + sum(sizes.values()) <= 250_000, sizes


def narrow(page) -> None:
    """The page as shown is readable at 360 px: nothing wider than the window, so nothing to scroll sideways."""
    assert page.evaluate("window.innerWidth") == 360
    assert page.evaluate("document.scrollingElement.scrollWidth") <= 360


def test_no_accessibility_violations_and_readable_at_360_pixels(browser, classifier, axe_source):
    page, _ = open_page(browser, classifier, viewport=NARROW)
    page.wait_for_selector("#model:not([hidden])")
    page.fill("#text", "a fine film")
    page.click("#run")
    page.wait_for_selector("[data-testid=decision]")
    page.evaluate(axe_source)  # run through the DevTools protocol: the page's CSP does not apply to it
    result = page.evaluate("axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa']}})")
    assert [(v["id"], [n["target"] for n in v["nodes"]]) for v in result["violations"]] == []
    narrow(page)


def test_with_an_api_key_the_page_asks_once_and_sends_it_as_a_header(browser, artifacts, tmp_path_factory):
    proc, url = served(artifacts["classification"], tmp_path_factory, TUNESERVE_API_KEY=KEY)
    try:
        page, _ = open_page(browser, url)
        page.wait_for_selector("#key-panel:not([hidden])")
        assert page.locator("#model").is_hidden()
        page.fill("#key", "wrong")
        page.press("#key", "Enter")
        page.wait_for_selector("#key-error:not([hidden])")
        assert "refused" in page.text_content("#key-error")
        sent = []
        page.on("request", lambda request: sent.append((request.url, request.headers.get("authorization"))))
        page.fill("#key", KEY)
        page.press("#key", "Enter")
        page.wait_for_selector("#model:not([hidden])")
        assert (f"{url}/metadata", f"Bearer {KEY}") in sent
        assert all(KEY not in u for u, _ in sent)  # never in a URL
        page.reload()  # the key stays for the tab
        page.wait_for_selector("#model:not([hidden])")
    finally:
        stop(proc)


def test_entities_are_marked_at_their_characters(browser, artifacts, tmp_path_factory):
    proc, url = served(artifacts["token"], tmp_path_factory)
    try:
        text = "Zoë 🙂 " + " ".join(make_entity_rows(1, 4)[0]["tokens"])
        expected = httpx.post(url + "/predict", json={"texts": [text]}).json()["predictions"][0]["entities"]
        page, errors = open_page(browser, url, viewport=NARROW)
        page.wait_for_selector("#try:not([hidden])")
        page.fill("#text", text)
        page.click("#run")
        page.wait_for_selector("[data-testid=decision]")
        narrow(page)
        marks = page.eval_on_selector_all("[data-testid=decision] mark",
                                          "ms => ms.map(m => [m.firstChild.textContent, m.dataset.label])")
        assert marks == [[e["text"], e["label"]] for e in expected] and expected
        snapshot(page.locator("#try"), "page-entities")
        assert errors == []
    finally:
        stop(proc)


def test_a_generation_is_shown_as_it_streams_and_stop_ends_its_decoding(browser, generation_artifact,
                                                                        tmp_path_factory):
    proc, url, log = start_server({"TUNESERVE_ARTIFACT": str(generation_artifact)}, tmp_path_factory.mktemp("bentoml"))
    try:
        wait_ready(proc, url)
        page, errors = open_page(browser, url, viewport=NARROW)
        page.wait_for_selector("#try:not([hidden])")
        page.fill("#text", "alpha beta gamma delta")
        page.click("#run")
        wait_until(page, "/after [0-9]+ tokens/.test(document.querySelector('#answer .note')?.textContent)")
        tokens = int(re.search(r"after (\d+) tokens", page.text_content("#answer .note")).group(1))
        text = page.text_content("[data-testid=decision]")
        expected = httpx.post(url + "/generate", json={"prompts": ["alpha beta gamma delta"]}).json()["generations"][0]
        assert (text, tokens) == (expected["text"], expected["tokens"])
        # shown as it streams: each text event of the stream is added to the page as it is read, one node each
        events = stream_events(url, "alpha beta gamma delta")
        assert page.evaluate("document.querySelector('[data-testid=decision]').childNodes.length") == len(
            [e for e in events if "text" in e]) >= 1
        snapshot(page.locator("#try"), "page-generation")
        assert page.locator("#stop").is_hidden() and errors == []
        narrow(page)

        # Stop, while a long sample is written: the page shows "stopped" and the server stops decoding for it
        body = {"prompts": ["alpha beta gamma delta"], "max_new_tokens": 200, "temperature": 2.0}
        lengths = {seed: httpx.post(url + "/generate", json={**body, "seed": seed}).json()["generations"][0]["tokens"]
                   for seed in range(12)}
        seed = max(lengths, key=lengths.get)
        assert lengths[seed] >= 60, lengths
        page.click("#options-box summary")  # the decoding options, the model's own default shown in the box
        assert page.get_attribute("#max-new-tokens", "placeholder") == str(GENERATION_NEW_TOKENS)
        page.fill("#max-new-tokens", "200")
        page.fill("#temperature", "2")
        page.fill("#seed", str(seed))
        # Run, and press Stop as soon as the first text is shown, from inside the page: a click through Playwright
        # waits for the button to stop moving, which it does not while text streams in above it. A MutationObserver,
        # watching before Run is clicked, presses it in the microtask after the first text is added, before the page
        # reads the stream on: polling on a timer can miss the whole stream when a busy machine delays the timer.
        # The tiny model writes its 200 tokens in a fraction of a second, so on a busy machine the server can finish
        # the whole stream before the browser's abort reaches it; that is no stop to judge, and Stop is pressed again
        # (a server that ignored a client going away would finish every time and fail here)
        press_stop = """() => new Promise((resolve) => {
            const press = () => {
                const out = document.querySelector('[data-testid=decision]');
                const stop = document.getElementById('stop');
                if (!out || out.childNodes.length === 0 || stop.hidden) return false;
                stop.click();
                return true;
            };
            const observer = new MutationObserver(() => {
                if (press()) { observer.disconnect(); resolve(true); }
            });
            observer.observe(document.getElementById('answer'), {childList: true, subtree: true});
            document.getElementById('run').click();
            setTimeout(() => { observer.disconnect(); resolve(false); }, 30000);
        })"""
        stopped = []
        for _ in range(3):
            seen = len(re.findall(r"decoding stopped after \d+ chunks", log.read_text()))
            assert page.evaluate(press_stop), "the stream ended before Stop could be pressed"
            wait_until(page, "document.querySelector('#answer .note').textContent === 'stopped'")
            deadline = time.monotonic() + 10
            while len(re.findall(r"decoding stopped after \d+ chunks", log.read_text())) == seen \
                    and time.monotonic() < deadline:
                time.sleep(0.1)
            stopped = [int(n) for n in re.findall(r"decoding stopped after (\d+) chunks", log.read_text())][seen:]
            if stopped:
                break
        assert stopped and stopped[-1] < lengths[seed], (stopped, lengths[seed])
        assert page.locator("#stop").is_hidden() and errors == []
    finally:
        stop(proc)


def test_a_set_of_models_gets_a_picker_and_every_call_names_the_picked_model(browser, shared_artifacts, axe_source,
                                                                             tmp_path_factory):
    models = f"{shared_artifacts['sentiment']},{shared_artifacts['tags']}"
    proc, url, _ = start_server({"TUNESERVE_MODELS": models}, tmp_path_factory.mktemp("bentoml"))
    try:
        wait_ready(proc, url)
        page, errors = open_page(browser, url)
        page.wait_for_selector("#model:not([hidden])")
        assert page.locator("#picker option").all_text_contents() == ["sentiment (classification)",
                                                                     "tags (token classification)"]
        assert "sentiment" in page.text_content("#title")
        text = make_rows(1, 99)[0]["text"]
        page.fill("#text", text)
        page.click("#run")
        expected = httpx.post(url + "/predict", json={"texts": [text], "model": "sentiment"}).json()["predictions"][0]
        wait_until(page, "document.querySelector('[data-testid=decision]') !== null")
        assert page.locator("[data-testid=decision]").text_content() == expected["label"]

        page.select_option("#picker", "tags")  # the page follows the model picked
        wait_until(page, "document.querySelector('#title').textContent.startsWith('tags')")
        assert page.locator("#answer").inner_html() == ""
        page.fill("#text", "alice met bob in paris")
        page.click("#run")
        wait_until(page, "document.querySelector('p.entities[data-testid=decision]') !== null")
        entities = httpx.post(url + "/predict", json={"texts": ["alice met bob in paris"], "model": "tags"}).json()
        assert page.locator("p.entities mark").count() == len(entities["predictions"][0]["entities"])
        page.evaluate(axe_source)
        result = page.evaluate("axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa']}})")
        assert result["violations"] == [], [v["id"] for v in result["violations"]]
        assert errors == []
    finally:
        stop(proc)


def test_every_other_task_answers_as_its_api_and_reads_at_360_pixels(browser, artifacts, embedding_artifact, axe_source,
                                                                        tmp_path_factory):
    """Multi-label, regression, a pair model and an embedding model, served as one set and picked in turn: the page
    shows each one's decision as its route gives it, without accessibility violations, 360 px wide."""
    names = ("multilabel", "regression", "pair")
    models = ",".join([f"{name}={artifacts[name]}" for name in names] + [f"embedding={embedding_artifact}"])
    proc, url, _ = start_server({"TUNESERVE_MODELS": models}, tmp_path_factory.mktemp("bentoml"))
    row = make_rows(1, 97)[0]
    try:
        wait_ready(proc, url)
        page, errors = open_page(browser, url, viewport=NARROW)
        page.wait_for_selector("#model:not([hidden])")
        for name in (*names, "embedding"):
            if name != "multilabel":  # the first is picked to begin with
                page.select_option("#picker", name)
                wait_until(page, f"document.querySelector('#title').textContent.startsWith('{name}')")
            page.fill("#text", row["text"])
            if name == "pair":
                page.fill("#pair", "a note about the weather")
            if name == "embedding":
                page.fill("#candidates", "a small cat\nthe weather today\na fine film")
            page.click("#run")
            wait_until(page, "document.querySelector('[data-testid=decision]') !== null")
            decision = page.text_content("[data-testid=decision]")
            if name == "embedding":
                answer = httpx.post(url + "/rank", json={"query": row["text"], "model": name, "candidates": [
                    "a small cat", "the weather today", "a fine film"]}).json()["results"]
                assert page.eval_on_selector_all("[data-testid=decision] li", "ls => ls.map(l => l.textContent)") == [
                    f"{r['score']:.3f} {r['text']}" for r in answer]
            else:
                body = {"texts": [row["text"]], "model": name}
                if name == "pair":
                    body["text_pairs"] = ["a note about the weather"]
                answer = httpx.post(url + "/predict", json=body).json()["predictions"][0]
                expected = {"multilabel": "".join(answer.get("labels", [])) or "none",
                            "regression": f"{answer.get('value', 0):.4f}", "pair": answer.get("label")}[name]
                assert decision == expected, name
            narrow(page)
            page.evaluate(axe_source)
            result = page.evaluate("axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa']}})")
            assert result["violations"] == [], (name, [v["id"] for v in result["violations"]])
            snapshot(page.locator("#try"), f"page-{name}")
            page.evaluate("document.querySelectorAll('[data-testid=decision]').forEach(n => n.remove())")
        assert errors == []
    finally:
        stop(proc)
