"""Every backend answers each input the same whatever shares its batch: property tests over random batch compositions,
sizes and padding, for every task."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.manifest import read_manifest
from core.tasks.base import BATCH_INVARIANCE_TOLERANCE
from service.backends import choose_backend
from tests.conftest import make_entity_rows, make_rows

# Inputs of mixed lengths: short, typical, and longer than the tiny models' 32 tokens (cut, or split into windows).
POOL = [row["text"] for row in make_rows(10, seed=11)] + ["great", "a " * 40 + "superb film"]
TOKEN_POOL = [row["text"] for row in make_entity_rows(8, seed=11)] + [
    "Alice met Bob in Paris", "In Tokyo , Carol works for Globex and Dave works for Acme Corp in Madrid ."]


@pytest.mark.parametrize("backend_name", ["onnx-int8", "onnx", "torch"])
@pytest.mark.parametrize("task", ["classification", "multilabel", "regression", "pair", "token"])
def test_each_input_gets_the_same_answer_in_any_batch(artifacts, task, backend_name):
    artifact = artifacts[task]
    manifest = read_manifest(artifact)
    assert manifest.export.variant("onnx-int8"), f"the {task} fixture's export kept no int8 variant to test"
    backend = choose_backend(artifact, manifest, backend=backend_name, device="cpu", threads=1, batch_size=4)
    spec = manifest.task.spec
    texts = TOKEN_POOL if task == "token" else POOL
    pairs = [f"a note about item {i}" for i in range(len(texts))] if manifest.has_pair else None

    def answer(rows: list[int]):
        return spec.scores(backend.logits([texts[i] for i in rows], [pairs[i] for i in rows] if pairs else None))

    alone = [answer([i])[0] for i in range(len(texts))]
    alone_decisions = [spec.decide(manifest, [a])[0] for a in alone]

    @settings(max_examples=20, deadline=None, derandomize=True)
    @given(rows=st.lists(st.integers(0, len(texts) - 1), min_size=1, max_size=12),
           batch_size=st.integers(1, 8))
    def check(rows, batch_size):
        backend.batch_size = batch_size  # how the pooled call is cut: other batch-mates, other padding
        pooled = answer(rows)
        decisions = spec.decide(manifest, pooled)
        for position, i in enumerate(rows):
            moved = np.abs(spec.flat([pooled[position]]) - spec.flat([alone[i]])).max()
            assert moved <= BATCH_INVARIANCE_TOLERANCE, (texts[i], rows, batch_size, moved)
            if spec.has_labels:  # a regression's decision is its score, bounded above
                assert decisions[position] == alone_decisions[i], (texts[i], rows, batch_size)

    check()


@pytest.mark.parametrize("backend_name", ["onnx-int8", "onnx", "torch"])
@pytest.mark.parametrize("task", ["classification", "token"])
def test_two_passes_at_once_give_the_answers_of_one_at_a_time(artifacts, task, backend_name):
    # the service runs a large request's turn and the one-turn requests' lane side by side (service/batcher.py):
    # one backend, called from two threads at once, its session's threads shared between them
    artifact = artifacts[task]
    manifest = read_manifest(artifact)
    backend = choose_backend(artifact, manifest, backend=backend_name, device="cpu", threads=2, batch_size=4)
    spec = manifest.task.spec
    texts = TOKEN_POOL if task == "token" else POOL
    large, small = texts * 3, texts[:3]
    alone = {tuple(rows): spec.flat(spec.scores(backend.logits(rows, None))) for rows in (large, small)}
    start = threading.Barrier(2)

    def repeatedly(rows: list[str]) -> list[np.ndarray]:
        start.wait()
        return [spec.flat(spec.scores(backend.logits(rows, None))) for _ in range(6)]

    with ThreadPoolExecutor(2) as pool:
        at_once = {tuple(rows): pool.submit(repeatedly, rows) for rows in (large, small)}
        for rows, future in at_once.items():
            for got in future.result():
                assert np.abs(got - alone[rows]).max() <= BATCH_INVARIANCE_TOLERANCE, (task, backend_name)
