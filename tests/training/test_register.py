"""Registration in the BentoML store: an unchanged artifact is stored once, a changed one gets a new version."""

import logging
import shutil
from pathlib import Path

import pytest

from tests.conftest import tiny_run_config
from training.publish import register as register_module
from training.config import load_config
from training.publish.register import CONTENT_LABEL, content_hash, register
from training.run import train


@pytest.fixture(scope="module")
def trained(tiny_model, data_dir, tmp_path_factory):
    # Exported (fp32 only, for speed): an --onnx-only registration needs the ONNX file.
    raw = tiny_run_config(tiny_model, data_dir, tmp_path_factory.mktemp("run") / "run", export={"int8": "off"},
                          train={"epochs": 1, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0, "max_length": 32})
    return train(load_config(raw=raw)).artifact_dir


@pytest.fixture
def artifact(trained, tmp_path):
    """A private copy that a test may change."""
    return shutil.copytree(trained, tmp_path / "artifact")


def _stored(name: str) -> list[str]:
    import bentoml

    try:
        return sorted(str(m.tag) for m in bentoml.models.list(name))
    except bentoml.exceptions.NotFound:
        return []


def test_the_same_artifact_registered_twice_is_one_model(artifact, store, monkeypatch):
    import bentoml

    first = register(artifact, "sentiment")
    assert bentoml.models.get(first).path.startswith(str(store))
    copies = []
    monkeypatch.setattr(register_module.shutil, "copy2", lambda *a, **k: copies.append(a))
    assert register(artifact, "sentiment") == first
    assert copies == []  # nothing copied the second time
    assert _stored("sentiment") == [first]
    assert bentoml.models.get(first).info.labels[CONTENT_LABEL] == content_hash(artifact)


def test_a_changed_artifact_gets_a_new_version(artifact, store, caplog):
    import bentoml

    first = register(artifact, "sentiment")
    original = (artifact / "README.md").read_text()
    (artifact / "README.md").write_text(original + "\nEdited.\n")
    second = register(artifact, "sentiment")
    assert second != first and _stored("sentiment") == sorted([first, second])
    assert Path(bentoml.models.get(second).path_of("README.md")).read_text().endswith("Edited.\n")
    # Back to the first content: that version is returned, with a warning that `:latest` is the other one.
    (artifact / "README.md").write_text(original)
    with caplog.at_level(logging.WARNING, logger="training.publish.register"):
        assert register(artifact, "sentiment") == first
    assert "sentiment:latest" in caplog.text and len(_stored("sentiment")) == 2
    # The same content under another name is another model.
    other = register(artifact, "sentiment-copy")
    assert other.startswith("sentiment-copy:") and _stored("sentiment-copy") == [other]


def test_content_hash_covers_paths_and_bytes_but_not_temporary_directories(artifact):
    digest = content_hash(artifact)
    (artifact / ".onnx-tmp").mkdir()
    (artifact / ".onnx-tmp" / "half.onnx").write_bytes(b"partial")  # an interrupted export's leftovers
    assert content_hash(artifact) == digest
    (artifact / "report" / "curves.png").rename(artifact / "report" / "curves2.png")  # same bytes, other path
    assert content_hash(artifact) != digest
    (artifact / "report" / "curves2.png").rename(artifact / "report" / "curves.png")
    assert content_hash(artifact) == digest
    model = artifact / "model" / "config.json"
    model.write_bytes(model.read_bytes() + b" ")
    assert content_hash(artifact) != digest


def test_a_crash_while_copying_a_changed_artifact_leaves_the_store_as_it_was(artifact, store, monkeypatch):
    first = register(artifact, "sentiment")
    (artifact / "README.md").write_text("changed\n")
    real_copy = register_module.shutil.copy2
    copied = []

    def crash_mid_copy(src, dst, *args, **kwargs):
        if len(copied) == 3:
            raise OSError("disk full (simulated)")
        copied.append(real_copy(src, dst, *args, **kwargs))

    monkeypatch.setattr(register_module.shutil, "copy2", crash_mid_copy)
    with pytest.raises(OSError, match="simulated"):
        register(artifact, "sentiment")
    assert len(copied) == 3 and _stored("sentiment") == [first]
    monkeypatch.setattr(register_module.shutil, "copy2", real_copy)
    second = register(artifact, "sentiment")  # the failed attempt left no entry that could be taken for it
    assert second != first and _stored("sentiment") == sorted([first, second])


def test_an_onnx_only_registration_holds_what_the_onnx_backend_loads_and_no_pytorch_weights(artifact, store):
    import bentoml

    from core.manifest import read_manifest
    from core.cpu_files import onnx_serving_files

    tag = register(artifact, onnx_only=True)
    manifest = read_manifest(artifact)
    assert tag.startswith(f"{manifest.name.lower()}-onnx:")
    stored = Path(bentoml.models.get(tag).path)
    held = sorted(p.relative_to(stored).as_posix() for p in stored.rglob("*") if p.is_file() and p.name != "model.yaml")
    assert held == sorted(onnx_serving_files(artifact))
    served = (manifest.export.variant("onnx-int8") or manifest.export.variant("onnx")).path
    assert served in held and not any(h.endswith(".safetensors") or h.startswith("adapter/") for h in held)
    assert bentoml.models.get(tag).info.labels["backends"] == ("onnx-int8" if manifest.export.variant("onnx-int8") else "onnx")
    assert register(artifact, onnx_only=True) == tag  # unchanged: one model


def test_lora_models_over_one_base_store_it_once_and_a_lost_base_entry_is_named(shared_artifacts, tmp_path, store):
    import bentoml

    from core.errors import ArtifactError
    from core.manifest import read_manifest
    from service.backends import shared_files

    tags = {name: register(shutil.copytree(shared_artifacts[name], tmp_path / name), name, onnx_only=True)
            for name in ("sentiment", "tags")}
    [base] = _stored(next(m.tag.name for m in bentoml.models.list() if m.tag.name.startswith("tuneserve-base-")))
    for tag in tags.values():
        entry = Path(bentoml.models.get(tag).path)
        assert not (entry / "onnx" / "shared" / "base.onnx").exists()
        assert (entry / "onnx" / "shared" / "base.store-tag").read_text().strip() == base
        assert bentoml.models.get(tag).info.metadata["shared_base_model"] == base
        graph, adapter = shared_files(entry, read_manifest(entry))
        assert graph == Path(bentoml.models.get(base).path) / "onnx" / "shared" / "base.onnx" and adapter.is_file()
    assert register(tmp_path / "sentiment", "sentiment", onnx_only=True) == tags["sentiment"]  # nothing new stored
    assert len(_stored(base.partition(":")[0])) == 1

    bentoml.models.delete(base)
    entry = Path(bentoml.models.get(tags["tags"]).path)
    with pytest.raises(ArtifactError, match=f"base graph is stored apart, as {base}, which the model store does not hold"):
        shared_files(entry, read_manifest(entry))
