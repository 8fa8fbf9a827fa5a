"""Nothing in the project deserializes code: no pickle loading, no remote code, and planted pickles are ignored."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("core", "training", "service", "benchmarks") for p in (ROOT / d).rglob("*.py")]

FORBIDDEN = {
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"),
    "pickle / dill / cloudpickle loading": re.compile(r"\b(c?pickle|dill|cloudpickle)\.loads?\("),
    "trust_remote_code=True": re.compile(r"trust_remote_code\s*=\s*True"),
    "numpy allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "yaml.load (use yaml.safe_load)": re.compile(r"\byaml\.load\("),
}


def test_the_sources_are_found():
    assert len(SOURCES) > 30 and any(p.name == "service.py" for p in SOURCES)


@pytest.mark.parametrize("what", FORBIDDEN)
def test_no_source_file_loads_code(what):
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in SOURCES
                 for i, line in enumerate(p.read_text().splitlines(), 1) if FORBIDDEN[what].search(line)]
    assert not offenders, f"{what}: {offenders}"


class _Exploit:
    """Unpickling this creates the marker file: proof that something unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_the_planted_payload_does_act_when_unpickled(tmp_path):
    import pickle

    marker = tmp_path / "control"
    _plant(tmp_path, marker)
    pickle.loads((tmp_path / "pytorch_model.bin").read_bytes())  # the control: this is what loading must avoid
    assert marker.exists()


def _plant(directory: Path, marker: Path) -> None:
    import pickle

    for name in ("pytorch_model.bin", "training_args.bin", "model.pt"):
        (directory / name).write_bytes(pickle.dumps(_Exploit(marker)))


def test_planted_pickles_in_an_artifact_are_never_loaded(base_config, tmp_path):
    from core.errors import ArtifactError
    from core.manifest import read_manifest
    from service.backends import TorchBackend
    from training.config import load_config
    from training.inference import load_artifact
    from training.run import train

    art = train(load_config(raw=base_config)).artifact_dir
    marker = tmp_path / "unpickled"
    _plant(art / "model", marker)
    load_artifact(art)  # reads model.safetensors and ignores the pickles beside it
    TorchBackend(art, read_manifest(art), device="cpu", threads=1, batch_size=8)
    assert not marker.exists()

    (art / "model" / "model.safetensors").unlink()  # now only pickles are left: refused, not loaded
    with pytest.raises(ArtifactError, match="model.safetensors is missing"):
        load_artifact(art)
    with pytest.raises(ArtifactError, match="model.safetensors is missing"):
        TorchBackend(art, read_manifest(art), device="cpu", threads=1, batch_size=8)
    assert not marker.exists()
    shutil.rmtree(art)
