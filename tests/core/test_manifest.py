import json

import pytest

from core.errors import ArtifactError
from core.manifest import SCHEMA_VERSION, Manifest, read_manifest, write_manifest
from core.tasks import Task


def _manifest(**changes) -> Manifest:
    fields = dict(name="m", task=Task.CLASSIFICATION, problem_type="single_label_classification", labels=["a", "b"],
                  text_fields=["text"], label_field="label", max_length=64, postprocess="softmax", base_model="x",
                  method="full", trainable_parameters=1, total_parameters=2, metrics={"test": {"accuracy": 1.0}},
                  baselines={}, primary_metric="f1_macro")
    fields.update(changes)
    return Manifest(**fields)


def test_round_trip(tmp_path):
    write_manifest(_manifest(), tmp_path)
    assert read_manifest(tmp_path).labels == ["a", "b"]


@pytest.mark.parametrize("mutate, message", [
    (lambda raw: raw.update(schema_version=99), "schema_version 99"),
    (lambda raw: raw.pop("task"), "field 'task'"),
    (lambda raw: raw.update(labels=["a", "a"]), "repeat"),
])
def test_bad_manifests_are_refused(tmp_path, mutate, message):
    write_manifest(_manifest(), tmp_path)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    mutate(raw)
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match=message):
        read_manifest(tmp_path)


def test_missing_and_unreadable(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable"):
        read_manifest(tmp_path)


def test_sections_are_typed(tmp_path):
    write_manifest(_manifest(provenance={"seed": 3, "config": {"method": "full"}}), tmp_path)
    manifest = read_manifest(tmp_path)
    assert manifest.schema_version == SCHEMA_VERSION and manifest.provenance.seed == 3 and manifest.export is None
    raw = json.loads((tmp_path / "manifest.json").read_text())
    raw["provenance"]["seed"] = "forty-two"
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="field 'provenance.seed'"):
        read_manifest(tmp_path)


def test_a_version_1_manifest_still_loads_or_says_how_to_re_export(tmp_path):
    raw = _manifest().model_dump(mode="json")
    raw.update(schema_version=1, training={}, export={}, provenance={"seed": 1, "data_hashes": {}})
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    manifest = read_manifest(tmp_path)
    assert manifest.schema_version == SCHEMA_VERSION and manifest.training is None and manifest.export is None
    raw["export"] = {"onnx": {"fp32": "onnx/model.onnx"}}  # a section this release cannot read
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match=r"field 'export.graph.opset'.*re-export the artifact with `tuneserve export"):
        read_manifest(tmp_path)


V3_EXPORT = {
    "onnx": {"fp32": "onnx/model.onnx", "int8": "onnx/model.int8.onnx", "opset": 17, "held_out": "validation",
             "optimizer": "onnxruntime.transformers (bert)", "fusions": {"Attention": 6}},
    "backend": "onnx",
    "parity": {name: {"examples": 10, "metrics_torch": {"f1_macro": 0.9}, "metrics_onnx": {"f1_macro": 0.9},
                      "metric_delta": {"f1_macro": 0.0}, "label_agreement": agreement}
               for name, agreement in (("onnx", 1.0), ("onnx-int8", 0.99))},
    "int8": {"requested": "auto", "kept": True, "method": "smoothquant", "attempts": []},
    "selftest": [],
}


def test_a_version_3_export_section_reads_as_generic_variants(tmp_path):
    """Version 3 named the two ONNX files by field; version 4 lists variants, and a version-3 artifact still loads
    (and still deploys: the CPU file list reads both layouts)."""
    from core.cpu_files import onnx_serving_files

    raw = _manifest().model_dump(mode="json")
    raw.update(schema_version=3, export=V3_EXPORT)
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    (tmp_path / "README.md").write_text("card")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "onnx").mkdir()
    for name in ("model.onnx", "model.int8.onnx", "model.int8.onnx.data"):
        (tmp_path / "onnx" / name).write_bytes(b"x")
    export = read_manifest(tmp_path).export
    assert [(v.name, v.files, v.precision) for v in export.variants] == [
        ("onnx", ["onnx/model.onnx"], "fp32"), ("onnx-int8", ["onnx/model.int8.onnx", "onnx/model.int8.onnx.data"], "int8")]
    assert export.variant("onnx-int8").method == "smoothquant" and export.variant("onnx-int8").parity.label_agreement == 0.99
    assert export.held_out == "validation" and export.graph.fusions == {"Attention": 6}
    assert export.parity["onnx"].label_agreement == 1.0
    assert onnx_serving_files(tmp_path) == ["manifest.json", "README.md", "onnx/model.int8.onnx",
                                            "onnx/model.int8.onnx.data", "model/config.json"]
    # Written back, it is a version-4 manifest whose export names its variants, not fields.
    write_manifest(read_manifest(tmp_path), tmp_path)
    rewritten = json.loads((tmp_path / "manifest.json").read_text())
    assert rewritten["schema_version"] == 4 and "onnx" not in rewritten["export"]
    assert onnx_serving_files(tmp_path)[2:4] == ["onnx/model.int8.onnx", "onnx/model.int8.onnx.data"]
