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
    with pytest.raises(ArtifactError, match=r"field 'export.onnx.opset'.*re-export the artifact with `tuneserve export"):
        read_manifest(tmp_path)
