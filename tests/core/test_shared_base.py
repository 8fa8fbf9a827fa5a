"""Models over one shared base graph (core/shared_base.py): each answers as its own merged model does, whatever
other models' rows share its pass."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from core.encoding import Encoder
from core.errors import ArtifactError
from core.manifest import read_manifest
from core.onnx_runner import OnnxModel
from core.shared_base import Adapter, SharedBase
from core.tasks.base import BATCH_INVARIANCE_TOLERANCE
from service.backends import load_tokenizer, shared_files
from tests.conftest import make_entity_rows, make_rows


def _texts(name: str, n: int, seed: int) -> list[str]:
    rows = (make_entity_rows if name == "tags" else make_rows)(n, seed)
    return [" ".join(r["tokens"]) if name == "tags" else r["text"] for r in rows]


def test_every_shareable_artifact_gets_a_variant_over_one_base_and_others_say_why_not(shared_artifacts, artifacts):
    bases = set()
    for name, directory in shared_artifacts.items():
        export = read_manifest(directory).export
        variant = export.variant("onnx-shared")
        assert variant is not None and export.shared_base == {"kept": True, "reason": None}, (name, export.shared_base)
        assert variant.parity.label_agreement == 1.0 and variant.parity.max_abs_diff < 1e-4
        assert all("onnx-shared" in s.variants for s in export.selftest)
        bases.add(variant.base)
    assert len(bases) == 1  # one base identity: the tiny BERT's weights
    full = read_manifest(artifacts["classification"]).export
    assert full.variant("onnx-shared") is None and "method full" in full.shared_base["reason"]


def test_a_row_gets_its_own_models_answer_whatever_shares_its_pass(shared_artifacts):
    """Random mixes of models, batch sizes and padding, from threads that meet in the base's passes: every answer
    equals the model's own merged graph's, labels identical and scores within the batch-invariance tolerance."""
    manifests = {n: read_manifest(d) for n, d in shared_artifacts.items()}
    graph = shared_files(shared_artifacts["sentiment"], manifests["sentiment"])[0]
    shared = SharedBase(graph, manifests["sentiment"].export.variant("onnx-shared").base, threads=1)
    encoders, merged = {}, {}
    for name, directory in shared_artifacts.items():
        shared.add(name, Adapter.load(shared_files(directory, manifests[name])[1]))
        encoders[name] = Encoder.from_manifest(load_tokenizer(directory), manifests[name])
        merged[name] = OnnxModel(directory / manifests[name].export.variant("onnx").path, threads=1)

    rng = np.random.default_rng(0)
    jobs = []
    for k in range(24):
        name = list(shared_artifacts)[rng.integers(3)]
        texts = _texts(name, int(rng.integers(1, 9)), seed=100 + k)
        jobs.append((name, texts, int(rng.integers(1, 5))))
    results: dict[int, object] = {}

    def work(i: int) -> None:
        name, texts, batch_size = jobs[i]
        results[i] = shared.model_for(name).logits(encoders[name], texts, task=manifests[name].task,
                                                   batch_size=batch_size)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == len(jobs)
    assert max(models for _, models in shared.passes) > 1  # rows of different models shared passes
    for i, (name, texts, _) in enumerate(jobs):
        m = manifests[name]
        alone = merged[name].logits(encoders[name], texts, task=m.task, batch_size=1)
        got, want = m.task.spec.scores(results[i], m.calibration), m.task.spec.scores(alone, m.calibration)
        assert m.task.spec.decide(m, got) == m.task.spec.decide(m, want), (name, texts)
        assert np.abs(m.task.spec.flat(got) - m.task.spec.flat(want)).max() <= BATCH_INVARIANCE_TOLERANCE


def test_an_adapter_for_other_base_weights_or_layers_is_refused(shared_artifacts, tmp_path):
    manifest = read_manifest(shared_artifacts["sentiment"])
    graph, adapter_file = shared_files(shared_artifacts["sentiment"], manifest)
    adapter = Adapter.load(adapter_file)
    shared = SharedBase(graph, adapter.base, threads=1)
    other = Adapter(adapter.factors, adapter.head_kind, adapter.head, "0" * 64)
    with pytest.raises(ArtifactError, match="other base weights"):
        shared.add("other", other)
    foreign = Adapter({**adapter.factors, "lora_A.embeddings.word_embeddings": np.zeros((4, 2), np.float32)},
                      adapter.head_kind, adapter.head, adapter.base)
    with pytest.raises(ArtifactError, match="does not adapt"):
        shared.add("foreign", foreign)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="cannot read the adapter"):
        Adapter.load(tmp_path / "broken.safetensors")
    assert "other" not in shared and "foreign" not in shared


def test_adding_replacing_and_removing_adapters_leaves_the_others_answers_alone(shared_artifacts):
    manifests = {n: read_manifest(d) for n, d in shared_artifacts.items()}
    graph = shared_files(shared_artifacts["tags"], manifests["tags"])[0]
    adapters = {n: Adapter.load(shared_files(d, manifests[n])[1]) for n, d in shared_artifacts.items()}
    shared = SharedBase(graph, adapters["tags"].base, threads=1)
    encoders = {n: Encoder.from_manifest(load_tokenizer(d), manifests[n]) for n, d in shared_artifacts.items()}
    texts = {n: _texts(n, 6, seed=7) for n in shared_artifacts}

    def answers(name):
        return shared.model_for(name).logits(encoders[name], texts[name], task=manifests[name].task)

    shared.add("tags", adapters["tags"])  # rank 4
    shared.add("topics", adapters["topics"])  # no factors: a frozen encoder
    before = {n: answers(n) for n in ("tags", "topics")}
    shared.add("sentiment", adapters["sentiment"])  # rank 8: every stack widens
    shared.add("sentiment", adapters["sentiment"])  # replaced in place of itself
    widened = {n: answers(n) for n in ("tags", "topics")}
    first = answers("sentiment")
    shared.remove("tags")  # the rank-4 row goes; sentiment's row moves up
    assert "tags" not in shared and np.array_equal(answers("sentiment"), first)
    shared.remove("sentiment")  # back to rank 1
    for name in ("tags", "topics"):  # a wider stack (zero-padded) changes nothing
        spec = manifests[name].task.spec
        assert np.abs(spec.flat(widened[name]) - spec.flat(before[name])).max() < 1e-5
    assert np.abs(answers("topics") - before["topics"]).max() < 1e-5


def test_a_lora_artifact_without_its_factors_says_why_it_cannot_share_a_base(shared_artifacts, tmp_path):
    import shutil

    from training.export.shared import not_shareable

    copy = tmp_path / "artifact"
    shutil.copytree(shared_artifacts["sentiment"], copy, ignore=shutil.ignore_patterns("onnx"))
    assert not_shareable(copy, read_manifest(copy)) is None
    shutil.rmtree(copy / "adapter")  # as an artifact written before adapters were kept
    assert "adapter/adapter_config.json" in not_shareable(copy, read_manifest(copy))
