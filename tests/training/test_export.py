"""ONNX export and its parity gate, on tiny models of every task; registration in the BentoML store."""

import subprocess
import sys

import numpy as np
import onnx
import pytest

from core.errors import ArtifactError
from core.manifest import ExportRecord, Manifest, read_manifest
from core.tasks import Task
from core.onnx_runner import OnnxModel, check_external_data
from training.export import encoder as export_module
from training.export import int8 as quantize_module
from training.config import load_config
from training.export import ExportError, export_artifact
from training.inference import load_artifact, predict_logits
from training.run import train


def _train(base_config, **changes):
    base_config.update(changes)
    base_config["export"] = {"onnx": True, "int8_confidence": 0}  # 60 validation examples: the measured agreement
    base_config["train"]["epochs"] = 3
    return train(load_config(raw=base_config))


@pytest.mark.parametrize("task, method, label", [
    ("classification", "full", "label"),
    ("classification", "lora", "label"),
    ("multilabel", "lora", "topics"),
    ("multilabel", "full", "topics"),
    ("regression", "full", "score"),
    ("regression", "lora", "score"),
])
def test_export_passes_the_gate_for_every_task_and_method(base_config, task, method, label):
    base_config["data"]["label"] = label
    result = _train(base_config, task=task, method=method)
    art = result.artifact_dir
    section = read_manifest(art).export.model_dump(mode="json", exclude_none=True)
    assert (art / "onnx" / "model.onnx").is_file()
    # readable by every user (a server may run as another, as the Docker image's does): safetensors writes its files
    # 0600 and a staging directory is 0700
    unreadable = [str(p.relative_to(art)) for p in (art, *art.rglob("*")) if p.stat().st_mode & 0o044 != 0o044]
    assert not unreadable, unreadable
    variants = {v["name"]: v for v in section["variants"]}
    assert variants["onnx"]["files"] == ["onnx/model.onnx"] and variants["onnx"]["precision"] == "fp32"
    fp32 = variants["onnx"]["parity"]
    assert fp32["examples"] == 60 and fp32["max_abs_diff"] < 1e-3
    if task == "regression":  # values within a tenth of their spread count as agreeing
        assert fp32["agreement_noun"] == "value" and fp32["label_agreement"] >= 0.999
        assert abs(fp32["metric_delta"]["r2"]) < 1e-3
    else:
        assert fp32["label_agreement"] >= 0.999
    if task == "multilabel":
        assert set(fp32["label_agreement_per_label"]) == set(read_manifest(art).labels)
    assert section["graph"]["fusions"].get("Attention") == 2  # two encoder layers fused
    # Residual Add + LayerNormalization stay apart, in the file and in the CPU session that runs it.
    assert "SkipLayerNormalization" in section["graph"]["not_fused"]
    OnnxModel(art / "onnx" / "model.onnx", save_optimized=art / "session.onnx")
    ran = {n.op_type for n in onnx.load(str(art / "session.onnx")).graph.node}
    assert "LayerNormalization" in ran and "SkipLayerNormalization" not in ran
    assert len(section["selftest"]) == 8
    # int8 is either kept with a passing report or dropped with the reason.
    int8 = section["int8"]
    assert int8["kept"] == (art / "onnx" / "model.int8.onnx").is_file() == ("onnx-int8" in variants)
    assert int8["kept"] or int8["reason"]
    # The ONNX model reproduces the LoRA-merged PyTorch model's labels.
    loaded = load_artifact(art)
    texts = ["a superb plot", "dull and tedious acting", "the music was lovely"]
    ort = OnnxModel(art / "onnx" / "model.onnx").logits(loaded.encoder, texts, task=loaded.manifest.task)
    assert np.allclose(ort, predict_logits(loaded, texts), atol=1e-4)


def test_export_refuses_when_the_training_data_changed_on_disk(base_config, tmp_path):
    import shutil

    for split in ("train", "validation", "test"):  # private copies: this test edits one
        shutil.copy(base_config["data"][split], tmp_path / f"{split}.jsonl")
        base_config["data"][split] = str(tmp_path / f"{split}.jsonl")
    result = train(load_config(raw=base_config))  # export off: exported later, as `tuneserve export` does
    with open(base_config["data"]["validation"], "a") as fh:
        fh.write('{"text": "one more sentence", "label": "positive", "topics": ["plot"], "score": 1.0}\n')
    with pytest.raises(ExportError, match=r"data this model was trained on changed on disk since training \(validation: "):
        export_artifact(result.artifact_dir, int8="off")
    assert not (result.artifact_dir / "onnx").exists()


def test_a_corrupted_weight_fails_the_gate_and_keeps_the_previous_export(base_config, monkeypatch):
    result = _train(base_config)
    art = result.artifact_dir
    before = (art / "onnx" / "model.onnx").read_bytes()
    manifest_before = (art / "manifest.json").read_text()
    real_optimize = export_module._optimize

    def corrupt(raw, out, config):
        stats = real_optimize(raw, out, config)
        model = onnx.load(str(out))
        for tensor in model.graph.initializer:
            if "classifier" in tensor.name and tensor.dims and len(tensor.dims) == 2:
                weights = onnx.numpy_helper.to_array(tensor)
                tensor.CopyFrom(onnx.numpy_helper.from_array(-weights, tensor.name))  # flips every decision
        onnx.save(model, str(out))
        return stats

    monkeypatch.setattr(export_module, "_optimize", corrupt)
    with pytest.raises(ExportError, match="ONNX fp32 does not match PyTorch.*label agreement"):
        export_artifact(art)
    assert (art / "onnx" / "model.onnx").read_bytes() == before
    assert (art / "manifest.json").read_text() == manifest_before
    assert not list(art.glob(".onnx-*"))


def test_int8_on_fails_when_no_variant_keeps_quality(base_config):
    result = _train(base_config)
    with pytest.raises(ExportError, match="--int8 on, but no int8 variant kept quality"):
        export_artifact(result.artifact_dir, int8="on", max_int8_drop=-1.0)  # every variant fails its metric check
    # the earlier export is left as it was
    assert read_manifest(result.artifact_dir).export == ExportRecord.model_validate(result.export)


def test_the_int8_gate_judges_what_the_decisions_show_at_its_confidence():
    """7 of 1,057 differing measure 99.34% but show only 98.64% at 95%: the gate allows 4 there, and says so."""
    manifest = Manifest(name="m", task=Task.CLASSIFICATION, problem_type="single_label_classification",
                        labels=["negative", "positive"], text_fields=["text"], label_field="label", max_length=64,
                        postprocess="softmax", base_model="x", method="lora", trainable_parameters=1,
                        total_parameters=2, metrics={}, baselines={}, primary_metric="f1_macro")
    report = {"label_agreement": 1 - 5 / 1057, "decisions": 1057, "disagreements": 5, "metric_delta": {}}
    failure = export_module.gate_failure(manifest, report, 0.99, 0.005, confidence=0.95)
    assert failure and "5 of 1,057 decisions differ" in failure and "at most 4 may differ" in failure
    four = {**report, "label_agreement": 1 - 4 / 1057, "disagreements": 4}
    assert export_module.gate_failure(manifest, four, 0.99, 0.005, confidence=0.95) is None
    assert export_module.gate_failure(manifest, report, 0.99, 0.005, confidence=0) is None  # the measured 99.53%
    small = {"label_agreement": 1.0, "decisions": 380, "disagreements": 0, "metric_delta": {}}
    assert "381 or more can (a larger validation split)" in export_module.gate_failure(manifest, small, 0.99, 0.005,
                                                                                       0.95)


def _multilabel_manifest(labels: list[str], thresholds: dict[str, float] | None) -> Manifest:
    return Manifest(name="m", task=Task.MULTILABEL, problem_type="multi_label_classification", labels=labels,
                    text_fields=["text"], label_field="tags", max_length=64, postprocess="sigmoid", base_model="x",
                    method="lora", trainable_parameters=1, total_parameters=2, metrics={}, baselines={},
                    primary_metric="f1_micro", thresholds=thresholds)


def test_multilabel_thresholds_fitted_on_the_split_are_not_held_against_a_variant():
    """Thresholds fitted to PyTorch's validation scores make every flip near them look like a loss there. The gate
    judges micro-F1 with each half's thresholds fitted on the other half: noise that a variant adds, in either
    direction, then costs about nothing, and a variant that is worse is still caught."""
    from core.calibration import fit_thresholds

    rng = np.random.default_rng(0)
    labels = [f"tag{j}" for j in range(6)]
    targets = rng.random((400, 6)) < 0.2
    reference = 1 / (1 + np.exp(-(2.5 * (targets - 0.5) + rng.normal(0, 1.2, targets.shape))))
    fitted = dict(zip(labels, fit_thresholds(reference, targets, "f1_micro")[1]))
    manifest = _multilabel_manifest(labels, fitted)
    spec = manifest.task.spec
    as_fitted, refit = [], []
    for seed in range(20):  # small, symmetric changes of the scores, as int8 makes
        candidate = np.clip(reference + np.random.default_rng(seed).normal(0, 0.02, reference.shape), 0, 1)
        as_fitted.append(spec.compare(manifest, reference, candidate, targets)["metric_delta"]["f1_micro"])
        refit.append(spec.cross_fitted_delta(manifest, reference, candidate, targets)["f1_micro"])
    assert np.mean(as_fitted) < -0.005  # on the split the thresholds were fitted on, noise always loses
    assert abs(np.mean(refit)) < 0.3 * abs(np.mean(as_fitted))
    assert spec.cross_fitted_delta(manifest, reference, reference, targets) == {"f1_micro": 0.0}
    worse = reference.copy()
    worse[:, :3] = rng.permutation(worse[:, :3])  # half the labels' scores scrambled across examples
    assert spec.cross_fitted_delta(manifest, reference, worse, targets)["f1_micro"] < -0.05
    # fixed thresholds were fitted on nothing: the change as measured stands
    assert spec.cross_fitted_delta(_multilabel_manifest(labels, None), reference, worse, targets) is None

    report = {"label_agreement": 0.999, "metric_delta": {"f1_micro": -0.012},
              "metric_delta_cross_fitted": {"f1_micro": -0.001}}
    assert export_module.gate_failure(manifest, report, 0.99, 0.005) is None
    report["metric_delta_cross_fitted"] = {"f1_micro": -0.009}
    assert export_module.gate_failure(manifest, report, 0.99, 0.005) == (
        "f1_micro drops by 0.0090 (> 0.005) with the thresholds fitted on the other half of the split, each half in "
        "turn (by 0.0120 at the thresholds fitted on it)")


def test_a_regression_variant_is_held_to_agreeing_values_not_only_to_r2():
    """Values that move by more than a tenth of the spread of PyTorch's count as differing, and the gate judges them
    as it judges labels; R² alone hardly moves for noise of that size."""
    manifest = Manifest(name="m", task=Task.REGRESSION, problem_type="regression", labels=None, text_fields=["text"],
                        label_field="score", max_length=64, postprocess="identity", base_model="x", method="lora",
                        trainable_parameters=1, total_parameters=2, metrics={}, baselines={}, primary_metric="r2")
    rng = np.random.default_rng(0)
    targets = rng.normal(0, 2, 1000)
    reference = targets + rng.normal(0, 1, 1000)  # sd about 2.24: values within 0.224 agree
    candidate = reference + np.where(np.arange(1000) < 30, 0.5, 0.01)  # 30 values move by 0.5
    report = manifest.task.spec.compare(manifest, reference, candidate, targets)
    assert report["decisions"] == 1000 and report["disagreements"] == 30
    assert report["value_tolerance"] == pytest.approx(0.1 * reference.std())
    assert abs(report["metric_delta"]["r2"]) < 0.01
    failure = export_module.gate_failure(manifest, report, 0.99, 0.005, confidence=0.95)
    assert failure.startswith(f"value agreement (within {report['value_tolerance']:.3g}) 0.9700 (30 of 1,000 "
                              "decisions differ)"), failure


def test_int8_is_not_searched_when_the_split_cannot_show_the_agreement(base_config):
    """The tiny run's 60 validation examples cannot show 99% at 95% confidence even if every one agrees: int8 is
    not kept, without trying a variant, and the report says how many would do."""
    result = _train(base_config)
    # not given, the thresholds are the run's config's (`tuneserve export` passes none): here confidence 0
    searched = export_artifact(result.artifact_dir)["int8"]
    assert searched["gate"]["confidence"] == 0 and searched["attempts"]
    int8 = export_artifact(result.artifact_dir, int8_confidence=0.95)["int8"]
    assert not int8["kept"] and int8["attempts"] == []
    assert "60 decisions cannot show 99.00% agreement at 95% confidence" in int8["reason"]
    assert "381 or more" in int8["reason"] and "export.int8_confidence: 0" in int8["reason"]
    assert int8["gate"] == {"min_agreement": 0.99, "confidence": 0.95, "max_metric_drop": 0.005, "decisions": 60,
                            "allowed_differing": None}


def test_int8_report_lists_every_variant_tried(base_config):
    result = _train(base_config)
    section = export_artifact(result.artifact_dir, max_int8_drop=-1.0)  # every variant fails: all are tried
    int8 = section["int8"]
    methods = [a["method"] for a in int8["attempts"]]
    damage = {float(a): d for a, d in int8["smoothing"]["damage"].items()}
    assert sorted(damage) == list(quantize_module.SMOOTHING_ALPHAS)
    least = sorted(damage, key=damage.__getitem__)
    assert methods[:2] == ["per-tensor", "per-channel"]
    assert methods[2:5] == [f"per-channel, smoothed (alpha {a:g})" for a in least[:3]]
    assert methods[5:] == [f"per-channel, smoothed (alpha {least[0]:g}), the {k} most sensitive of 11 nodes in fp32"
                           for k in (1, 2, 4, 8)]
    # Activation scales are calibrated on training texts (all of the tiny set), never on the examples the gate judges.
    trained_on = read_manifest(result.artifact_dir).training.examples["train"]
    assert int8["calibration"]["split"] == "train" and int8["calibration"]["examples"] == trained_on
    assert not int8["kept"] and not (result.artifact_dir / "onnx" / "model.int8.onnx").exists()
    assert all(not a["passed"] and "drops by" in a["reason"] for a in int8["attempts"])
    assert int8["calibration"]["weight_rounding"].startswith("GPTQ")


def _drive(attempts, passes):
    """Run the int8 ladder against a gate that passes the variants ``passes`` accepts; return what was tried."""
    tried = []
    try:
        name, options = next(attempts)
        while True:
            tried.append((name, options))
            name, options = attempts.send(passes(name, options))
    except StopIteration:
        return tried


@pytest.mark.parametrize("needed, expected", [
    (6, [1, 2, 4, 8, 6, 5]),  # doubles until 8 passes, then bisects down to 6
    (1, [1]),
    (3, [1, 2, 4, 3]),
    (20, [1, 2, 4, 8, 16]),  # 32 would keep all 27 in fp32: nothing passes
])
def test_int8_ladder_finds_the_fewest_fp32_nodes_that_pass(needed, expected):
    calls = []
    ranked = [f"n{i}" for i in range(27)]

    def rank(alpha):
        calls.append(alpha)
        return ranked

    def passes(name, options):
        return len(options.get("nodes_to_exclude", [])) >= needed

    tried = _drive(quantize_module.int8_attempts(lambda: [0.9, 0.5, 0.7, 0.8], rank), passes)
    assert [name for name, _ in tried[:5]] == ["per-tensor", "per-channel", "per-channel, smoothed (alpha 0.9)",
                                               "per-channel, smoothed (alpha 0.5)", "per-channel, smoothed (alpha 0.7)"]
    assert calls == [0.9]  # ranked once, on the least-damage smoothed graph, which every later variant uses
    assert [len(options["nodes_to_exclude"]) for _, options in tried[5:]] == expected
    assert all(options["nodes_to_exclude"] == ranked[:len(options["nodes_to_exclude"])] and options["smooth"] == 0.9
               for _, options in tried[5:])


@pytest.mark.parametrize("passing, expected", [
    ("per-channel", ["per-tensor", "per-channel"]),
    ("per-channel, smoothed (alpha 0.5)", ["per-tensor", "per-channel", "per-channel, smoothed (alpha 0.9)",
                                           "per-channel, smoothed (alpha 0.5)"]),
])
def test_int8_ladder_ranks_nodes_only_when_whole_graph_quantization_fails(passing, expected):
    def rank(alpha):
        raise AssertionError("ranked although a whole-graph variant passed")

    def smoothing():
        if passing == "per-channel":
            raise AssertionError("smoothing measured although plain per-channel passed")
        return [0.9, 0.5, 0.7]

    tried = _drive(quantize_module.int8_attempts(smoothing, rank), lambda name, options: name == passing)
    assert [name for name, _ in tried] == expected


def test_int8_ladder_without_smoothable_nodes_ranks_the_plain_graph():
    tried = _drive(quantize_module.int8_attempts(lambda: [], lambda alpha: ["a", "b", "c"]),
                   lambda name, options: len(options.get("nodes_to_exclude", [])) >= 1)
    assert [name for name, _ in tried] == ["per-tensor", "per-channel", "per-channel, the 1 most sensitive of 3 nodes in fp32"]
    assert tried[-1][1] == {"per_channel": True, "smooth": None, "nodes_to_exclude": ["a"]}


def _outlier_matmul(path, weights):
    """A graph ``logits = x @ weights`` (``weights``: input channels x outputs)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"], name="proj")], "proj",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weights.shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", weights.shape[1]])],
        [numpy_helper.from_array(weights, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def test_smoothing_keeps_the_fp32_function_and_rescues_int8_from_an_outlier_channel(tmp_path):
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    weights = rng.normal(size=(8, 4)).astype(np.float32)
    x = rng.normal(size=(256, 8)).astype(np.float32)
    x[:, 3] *= 100  # one activation channel dwarfs the rest, as in transformer layers
    plain, smoothed = tmp_path / "plain.onnx", tmp_path / "smoothed.onnx"
    _outlier_matmul(plain, weights)
    measured = quantize_module.ActivationStats({"x": (x.min(axis=0), x.max(axis=0))}, {"x": x.T @ x / len(x)})
    created = quantize_module.smooth_graph(plain, smoothed, measured, alpha=0.5)
    assert list(created.ranges) == ["proj_smoothed"]  # the smoothed input's range: the input's, divided channel by channel
    assert created.ranges["proj_smoothed"][1][3] < x[:, 3].max() / 10
    s = x[:, 3].max() / created.ranges["proj_smoothed"][1][3]  # and its second moment, by the same scales
    assert np.isclose(created.moments["proj_smoothed"][3, 3], (x[:, 3] ** 2).mean() / s ** 2)
    graph = onnx.load(str(smoothed)).graph
    assert [n.op_type for n in graph.node] == ["Mul", "MatMul"]

    def run(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    exact = x @ weights
    assert np.allclose(run(smoothed), exact, rtol=1e-4, atol=1e-3)
    errors = {}
    for name, path in (("plain", plain), ("smoothed", smoothed)):
        quantize_module._quantize(path, tmp_path / f"{name}.int8.onnx", per_channel=True)
        errors[name] = np.abs(run(tmp_path / f"{name}.int8.onnx") - exact).mean()
    assert errors["smoothed"] < 0.7 * errors["plain"], errors  # measured: 0.72 against 1.31


def test_fixed_activation_scales_make_int8_independent_of_the_batch(tmp_path):
    """Dynamic int8 scales each batch by its own largest value, so one row's output moves with its batch-mates;
    with scales fixed from calibration (freeze_scales) a row gives the same output in any batch."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    weights = rng.normal(size=(8, 4)).astype(np.float32)
    calibration = rng.normal(size=(256, 8)).astype(np.float32)
    row = calibration[:1]
    loud = 20 * rng.normal(size=(3, 8)).astype(np.float32)  # a batch-mate with a much larger range
    plain, dynamic = tmp_path / "plain.onnx", tmp_path / "dynamic.onnx"
    _outlier_matmul(plain, weights)
    quantize_module._quantize(plain, dynamic, per_channel=True)
    frozen = tmp_path / "frozen.onnx"
    frozen.write_bytes(dynamic.read_bytes())
    assert quantize_module.freeze_scales(frozen, {"x": (calibration.min(axis=0), calibration.max(axis=0))}) == 1
    assert "DynamicQuantizeLinear" not in {n.op_type for n in onnx.load(str(frozen)).graph.node}

    def first_row(path, batch):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": batch})[0][0]

    pooled = np.concatenate([row, loud])
    assert np.abs(first_row(dynamic, row) - first_row(dynamic, pooled)).max() > 1e-2
    assert np.array_equal(first_row(frozen, row), first_row(frozen, pooled))
    assert np.abs(first_row(frozen, row) - row @ weights).max() < 0.1  # and still close to fp32
    with pytest.raises(ValueError, match="no calibrated range for 'x'"):
        quantize_module.freeze_scales(dynamic, {})


def _correlated_inputs(rng, rows, channels):
    """Activations whose channels move together, as a layer norm's outputs do: what GPTQ's rounding exploits."""
    mixing = rng.normal(size=(channels, channels)) / np.sqrt(channels) + np.eye(channels)
    return (rng.normal(size=(rows, channels)) @ mixing).astype(np.float32)


def test_gptq_rounding_keeps_a_layers_outputs_closer_than_rounding_each_weight(tmp_path):
    """round_weights swaps the quantizer's int8 weights for GPTQ's on the same scales: the graph keeps its kernels,
    and its outputs on inputs like the calibration's move less from fp32's than with round-to-nearest weights."""
    import onnxruntime as ort
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    weights = rng.normal(size=(64, 16)).astype(np.float32)
    weights[0] *= 10  # one input's weights dwarf the rest, as after smoothing: they set every column's grid
    inputs = _correlated_inputs(rng, 2048 + 512, 64)
    calibration, unseen = inputs[:2048], inputs[2048:]  # the same distribution, other rows
    plain = tmp_path / "plain.onnx"
    _outlier_matmul(plain, weights)
    nearest, rounded = tmp_path / "nearest.onnx", tmp_path / "gptq.onnx"
    quantize_module._quantize(plain, nearest, per_channel=True)
    quantize_module.freeze_scales(nearest, {"x": (calibration.min(axis=0), calibration.max(axis=0))})
    rounded.write_bytes(nearest.read_bytes())
    cache = {}
    assert quantize_module.round_weights(rounded, plain, {"x": calibration.T @ calibration / len(calibration)},
                                         cache) == 1
    assert len(cache) == 1

    def initializers(path):
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}

    before, after = initializers(nearest), initializers(rounded)
    assert np.array_equal(before["w_scale"], after["w_scale"])  # same grid, same kernels
    assert [n.op_type for n in onnx.load(str(nearest)).graph.node] == [n.op_type for n in onnx.load(str(rounded)).graph.node]
    changed = before["w_quantized"] != after["w_quantized"]
    assert changed.any() and np.abs(before["w_quantized"].astype(int) - after["w_quantized"]).max() <= 2

    def error(path):
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": unseen})[0]
        return float(np.mean((got - unseen @ weights) ** 2))

    assert error(rounded) < 0.8 * error(nearest), (error(rounded), error(nearest))  # measured: 0.063 against 0.095


def test_smoothing_skips_weights_that_two_nodes_share(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="a"), helper.make_node("MatMul", ["h", "w"], ["y"], name="b")],
        "tied", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")])
    assert quantize_module.smoothable_nodes(graph) == []


def test_sensitivity_ranking_quantizes_each_node_alone(base_config, tmp_path):
    art = _train(base_config).artifact_dir
    fp32 = art / "onnx" / "model.onnx"
    candidates = quantize_module.quantizable_nodes(fp32)
    assert len(candidates) == 1 + 2 * 4 + 2  # embeddings; per layer Attention + 3 MatMul; pooler and classifier
    damage = {name: float(i % 3) + i / 100 for i, name in enumerate(candidates)}  # an arbitrary order
    seen = []

    def error(path):
        integer = [n.name for n in onnx.load(str(path)).graph.node
                   if n.op_type in ("MatMulInteger", "QAttention", "QEmbedLayerNormalization")]
        quantized = [c for c in candidates if any(name.startswith(c) for name in integer)]
        seen.append(quantized)
        return damage[quantized[0]]

    def quantize(options, target):
        quantize_module._quantize(fp32, target, **options)

    ranked = quantize_module.rank_by_sensitivity(candidates, quantize, tmp_path / "probe.onnx", error)
    assert sorted(q[0] for q in seen) == sorted(candidates) and all(len(q) == 1 for q in seen)
    assert ranked == sorted(candidates, key=damage.__getitem__, reverse=True)
    assert not (tmp_path / "probe.onnx").exists()


def test_unknown_architecture_exports_plain_onnx(base_config, monkeypatch):
    monkeypatch.setattr(export_module, "BERT_LIKE", set())
    section = _train(base_config).export
    assert section["graph"]["optimizer"] is None and "plain ONNX" in section["graph"]["note"]
    assert section["variants"][0]["parity"]["label_agreement"] >= 0.999


@pytest.mark.parametrize("location", ["/etc/passwd", "../outside.bin", "link.bin"])
def test_external_data_outside_the_model_directory_is_refused(tmp_path, location):
    from onnx import TensorProto, helper

    (tmp_path / "outside.bin").write_bytes(b"\0" * 16)
    inner = tmp_path / "model"
    inner.mkdir()
    (inner / "link.bin").symlink_to(tmp_path / "outside.bin")
    tensor = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4)
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["logits"])], "g", [],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [4])], [tensor])
    path = inner / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ArtifactError, match="outside the model's directory"):
        check_external_data(path)


def test_register_puts_the_artifact_in_the_bentoml_store(base_config, store):
    art = _train(base_config).artifact_dir  # `store`: a private store, for the subprocesses too
    done = subprocess.run([sys.executable, "-m", "training.cli", "register", str(art), "--name", "sentiment-tiny"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    tag = done.stdout.strip().splitlines()[-1]
    assert tag.startswith("sentiment-tiny:")
    listed = subprocess.run([sys.executable, "-m", "bentoml", "models", "list", "-o", "json"], capture_output=True,
                            text=True, timeout=120)
    assert tag in listed.stdout
    import bentoml

    model = bentoml.models.get(tag)
    assert model.info.labels["task"] == "classification" and "onnx" in model.info.labels["backends"].split(",")
    assert read_manifest(model.path).export.parity["onnx"].label_agreement >= 0.999


def test_register_refuses_a_bad_name_and_an_incomplete_artifact(base_config, tmp_path):
    from training.publish.register import register

    art = _train(base_config).artifact_dir
    with pytest.raises(ArtifactError, match="BentoML model names"):
        register(art, "Bad Name!")
    (art / "onnx" / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="lists onnx/model.onnx, which is missing"):
        register(art, "ok")


def test_int8_fidelity_is_judged_again_on_the_test_split_the_gate_never_saw(artifacts):
    """benchmarks/int8_fidelity.py: the gate's own comparison on the test split, beside the gate's record."""
    from benchmarks.int8_fidelity import measure, table
    from core.metrics import wilson_low

    decisions_per_example = {"classification": 1, "multilabel": len(read_manifest(artifacts["multilabel"]).labels)}
    for name in ("classification", "multilabel", "token"):
        manifest = read_manifest(artifacts[name])
        rows = measure(artifacts[name])
        assert [r["variant"] for r in rows] == [v.name for v in manifest.export.variants
                                               if v.name in ("onnx", "onnx-int8")]
        for row in rows:
            recorded = manifest.export.variant(row["variant"]).parity
            assert row["gate"] == (recorded.decisions, recorded.disagreements)
            assert row["examples"] == (60, 60)  # the validation split, then the test split (tests/conftest.py)
            decisions, differing = row["test"]
            if name in decisions_per_example:
                assert decisions == 60 * decisions_per_example[name]
            else:  # sub-tokens, several per sentence
                assert decisions > 60
            assert row["both"] == (recorded.decisions + decisions, recorded.disagreements + differing)
        fp32 = rows[0]
        assert fp32["test"][1] <= 0.001 * fp32["test"][0] and fp32["invariant"]  # fp32 agrees on unseen data too
        decisions, differing = fp32["both"]
        assert f"(≥ {wilson_low(decisions - differing, decisions):.2%})" in table(rows)
