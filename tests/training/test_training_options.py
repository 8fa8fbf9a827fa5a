"""Options of the classic fine-tuning recipe: an L1 penalty, dropout rates, and peft methods beside LoRA (IA3,
prompt tuning, DoRA, rsLoRA), each merged (or folded) into a plain model that exports through the same gate."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from core.encoding import Encoder
from core.errors import ConfigError
from core.manifest import read_manifest
from training.config import DEFAULT_LR, load_config
from training.recipe.dropout import CpuDropout, use_cpu_dropout
from training.inference import load_artifact, predict_scores
from training.recipe.modeling import build_model, dropout_overrides, merged_model
from training.run import train

METHODS = {  # name -> config changes
    "ia3": {"method": "ia3"},
    "prompt": {"method": "prompt", "prompt": {"num_virtual_tokens": 4}},
    "dora": {"method": "lora", "lora": {"use_dora": True}},
    "rslora": {"method": "lora", "lora": {"use_rslora": True}},
}


@pytest.mark.parametrize("raw, message", [
    ({"method": "full", "lora": {"use_dora": True}}, "lora.use_dora only applies to method: lora"),
    ({"method": "ia3", "lora": {"use_rslora": True}}, "lora.use_rslora only applies to method: lora"),
    ({"method": "lora", "prompt": {"num_virtual_tokens": 4}}, r"prompt.\* only applies to method: prompt"),
    ({"method": "prompt", "ia3": {"target_modules": ["key"]}}, r"ia3.\* only applies to method: ia3"),
    ({"method": "lora", "freeze": {"layers": 2}}, "freeze.layers only applies to method: freeze"),
    ({"method": "prompt", "task": "token_classification"}, "method: prompt applies to classification"),
    ({"method": "prompt", "prompt": {"num_virtual_tokens": 0}}, "'prompt.num_virtual_tokens'"),
    ({"train": {"l1": -1}}, "'train.l1'"),
    ({"train": {"dropout": {"hidden": 1.0}}}, "'train.dropout.hidden'"),
    ({"train": {"dropout": {"atention": 0.1}}}, "'train.dropout.atention': unknown key"),
])
def test_method_options_are_checked_and_named(raw, message):
    with pytest.raises(ConfigError, match=message):
        load_config(raw={"data": {"train": "x"}, **raw})


def test_each_method_has_its_default_learning_rate():
    for method in ("full", "lora", "freeze", "ia3", "prompt"):
        assert load_config(raw={"data": {"train": "x"}, "method": method}).lr == DEFAULT_LR[method]
    assert DEFAULT_LR["prompt"] > DEFAULT_LR["ia3"] > DEFAULT_LR["lora"]


@pytest.mark.parametrize("name", list(METHODS))
def test_merged_or_folded_model_computes_what_the_peft_model_computes(base_config, name):
    """Adapters set to random values (not their identity start), then merged: the plain model and its tokenizer
    give the peft model's logits on padded text pairs."""
    cfg = load_config(raw={**base_config, **METHODS[name]})
    built = build_model(cfg, ["negative", "positive"])
    torch.manual_seed(0)
    with torch.no_grad():
        for param in built.model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.5)
    model = built.model.eval()
    texts, pairs = ["a great plot", "dull acting and the music was awful, honestly"], ["superb", "a bit tedious"]
    batch = Encoder(built.tokenizer, cfg.train.max_length).encode(texts, pairs, padding="longest", return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits
    plain, tokenizer = merged_model(model, built.tokenizer)
    assert type(plain).__name__ == "BertForSequenceClassification"  # no peft layer left
    virtual = cfg.prompt.num_virtual_tokens if cfg.method == "prompt" else 0
    batch = Encoder(tokenizer, cfg.train.max_length + virtual).encode(texts, pairs, padding="longest",
                                                                      return_tensors="pt")
    with torch.no_grad():
        got = plain.eval()(**batch).logits
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)
    assert not torch.allclose(expected[0], expected[1])  # the inputs do reach the head


@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_trains_exports_through_the_gate_and_predicts(base_config, name):
    base_config.update(METHODS[name])
    base_config["train"].update(epochs=1, lr=3e-2 if name == "prompt" else 3e-3)
    base_config["export"] = {"onnx": True, "int8": "off"}
    result = train(load_config(raw=base_config))
    art = result.artifact_dir
    manifest = read_manifest(art)
    assert manifest.method == base_config["method"]
    assert manifest.provenance.config[manifest.method] == load_config(raw=base_config).model_dump(mode="json")[manifest.method]
    assert 0 < manifest.trainable_parameters < manifest.total_parameters / 10  # full fine-tuning trains them all
    assert "classifier" in manifest.training.head_modules
    adapted = {"ia3": ["key", "value", "output.dense"], "prompt": None}.get(name, ["dense", "key", "query", "value"])
    assert getattr(manifest.training, f"{manifest.method}_target_modules", None) == adapted
    # The adapter is saved with the head; model/ is a plain transformers checkpoint.
    adapter = load_file(str(art / "adapter" / "adapter_model.safetensors"))
    assert any("classifier" in key for key in adapter)
    merged = load_file(str(art / "model" / "model.safetensors"))
    assert not any(part in key for key in merged for part in ("lora_", "ia3_", "prompt_encoder", "modules_to_save"))
    adapter_config = json.loads((art / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == {"ia3": "IA3", "prompt": "PROMPT_TUNING"}.get(name, "LORA")
    if name == "dora":
        assert adapter_config["use_dora"] and any("lora_magnitude_vector" in key for key in adapter)
    if name == "rslora":
        assert adapter_config["use_rslora"]
    # The artifact reloads without peft and gives the trainer's test scores; ONNX passes the gate.
    loaded = load_artifact(art)
    rows = [json.loads(line) for line in Path(base_config["data"]["test"]).read_text().splitlines()]
    scores = predict_scores(loaded, [r["text"] for r in rows])  # in input order; the trainer's in its loader's (by length)
    assert np.allclose(np.sort(scores[:, 1]), np.sort(result.test_scores[:, 1]), atol=2e-6)
    parity = manifest.export.parity["onnx"]
    assert manifest.export.backend == "onnx" and (art / "onnx" / "model.onnx").is_file()
    assert parity.label_agreement >= 0.999 and parity.max_abs_diff < 1e-3
    # Both of the service's backends pass the start-up self-test: nothing there knows about the method.
    from service.backends import choose_backend
    from service.selftest import run_selftest

    for backend in ("onnx", "torch"):
        served = choose_backend(art, manifest, backend=backend, device="cpu", threads=1, batch_size=8)
        assert run_selftest(served, manifest)
    if name == "prompt":  # the virtual tokens are the tokenizer's now, ahead of its own
        assert manifest.max_length == base_config["train"]["max_length"] + 4
        ids = loaded.tokenizer("a great plot")["input_ids"]
        assert loaded.tokenizer.convert_ids_to_tokens(ids[:5]) == [f"<prompt_{i}>" for i in range(4)] + ["[CLS]"]
    # The cards say what was trained.
    assert {"ia3": "by IA3 (", "prompt": "by prompt tuning ("}.get(name, "by LoRA adapters") in (art / "README.md").read_text()
    assert {"ia3": "IA3 adapter", "prompt": "soft prompt"}.get(name, "LoRA adapter") in (art / "adapter" / "README.md").read_text()


def _l1(weights: dict) -> float:
    return float(sum(np.abs(w).sum() for k, w in weights.items() if w.ndim >= 2 and "norm" not in k.lower()))


def test_l1_shrinks_the_trained_weights_and_stays_out_of_the_logged_loss(base_config, tmp_path):
    base_config["train"].update(epochs=1, weight_decay=0.0)
    runs = {}
    for l1 in (0.0, 1e-3):
        raw = {**base_config, "output_dir": str(tmp_path / f"l1-{l1}"), "train": {**base_config["train"], "l1": l1}}
        runs[l1] = train(load_config(raw=raw)).artifact_dir
    norms = {l1: _l1(load_file(str(art / "model" / "model.safetensors"))) for l1, art in runs.items()}
    assert norms[1e-3] < 0.8 * norms[0.0], norms
    history = {l1: read_manifest(art).training.history for l1, art in runs.items()}
    # Same seed, same first batch, same starting weights: the first logged loss is the task's alone in both runs
    # (with the penalty it would be larger by 1e-3 times the weights' L1 norm, over 900 here).
    assert history[1e-3]["train_loss"][0]["loss"] == pytest.approx(history[0.0]["train_loss"][0]["loss"], abs=1e-6)
    assert read_manifest(runs[1e-3]).provenance.config["train"]["l1"] == 1e-3


def test_dropout_rates_reach_the_config_the_modules_and_the_artifact(base_config):
    base_config["train"].update(epochs=1, dropout={"hidden": 0.3, "attention": 0.2, "classifier": 0.4})
    cfg = load_config(raw=base_config)
    built = build_model(cfg, ["negative", "positive"])
    config = built.model.config
    assert (config.hidden_dropout_prob, config.attention_probs_dropout_prob, config.classifier_dropout) == (0.3, 0.2, 0.4)
    use_cpu_dropout(built.model)  # as the trainer does on a CPU: the chosen rates carry over
    model = built.model
    assert isinstance(model.bert.embeddings.dropout, CpuDropout) and model.bert.embeddings.dropout.p == 0.3
    assert model.bert.encoder.layer[0].attention.self.dropout.p == 0.2
    assert model.bert.encoder.layer[1].output.dropout.p == 0.3
    assert isinstance(model.dropout, CpuDropout) and model.dropout.p == 0.4
    art = train(cfg).artifact_dir
    saved = json.loads((art / "model" / "config.json").read_text())
    assert (saved["hidden_dropout_prob"], saved["attention_probs_dropout_prob"], saved["classifier_dropout"]) == (0.3, 0.2, 0.4)
    assert read_manifest(art).provenance.config["train"]["dropout"] == {"hidden": 0.3, "attention": 0.2, "classifier": 0.4}


def test_a_dropout_the_model_does_not_have_is_named(tmp_path, base_config):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2).save_pretrained(tmp_path / "llama")
    base_config["model"] = str(tmp_path / "llama")
    base_config["train"]["dropout"] = {"attention": 0.1}
    assert dropout_overrides(load_config(raw=base_config), base_config["model"]) == {"attention_dropout": 0.1}
    base_config["train"]["dropout"] = {"attention": 0.1, "hidden": 0.2}
    with pytest.raises(ConfigError, match=r"train.dropout.hidden: .*\(llama\) has no such dropout"):
        dropout_overrides(load_config(raw=base_config), base_config["model"])


def test_prompt_init_text_starts_the_virtual_tokens_from_its_words(base_config):
    base_config.update(method="prompt", prompt={"num_virtual_tokens": 7, "init_text": "great or awful"})
    built = build_model(load_config(raw=base_config), ["negative", "positive"])
    ids = built.tokenizer("great or awful")["input_ids"]  # as peft tokenizes it: [CLS] great or awful [SEP]
    words = built.model.get_base_model().get_input_embeddings().weight[ids].detach()
    prompt = built.model.get_prompt_embedding_to_save("default")
    assert len(ids) == 5 and torch.equal(prompt[:5], words) and torch.equal(prompt[5:], words[:2])  # repeated to length


def test_prompt_tokens_must_fit_the_models_positions(base_config):
    base_config.update(method="prompt", prompt={"num_virtual_tokens": 100})  # the tiny model has 128 positions
    base_config["train"]["max_length"] = 32
    with pytest.raises(ConfigError, match="prompt.num_virtual_tokens: 100 virtual tokens .* exceed the 128 positions"):
        build_model(load_config(raw=base_config), ["negative", "positive"])


def test_the_diagnosis_hears_of_a_threshold_only_where_the_config_fixed_one_for_multilabel():
    from training.publish.artifact import fixed_threshold

    def config(task, **train):
        return load_config(raw={"task": task, "data": {"train": "x.jsonl"}, "train": train})

    assert fixed_threshold(config("multilabel", threshold=0.5)) == 0.5
    assert fixed_threshold(config("multilabel")) is None  # auto: one per label, fitted on validation
    assert fixed_threshold(config("classification", threshold=0.5)) is None  # a task that decides by argmax
