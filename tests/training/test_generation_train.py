"""Generation from end to end on a tiny random Llama: prompts, masked loss, evaluation by loss and by written text
beside the base model, retrieval and copying, and the artifact."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from core.manifest import read_manifest
from tests.conftest import CHATML, byte_level_bpe, crash_after_first_checkpoint, write_jsonl
from training.config import load_config
from training.run import train

WORDS = ["copy", "move", "list", "remove", "print", "sort", "files", "lines", "names", "disks", "users", "bytes"]


def make_pairs(n: int, seed: int) -> list[dict]:
    """'the tool to copy files and more' -> 'copy files': the summary is two words of the input."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        verb, noun = rng.choice(WORDS[:6]), rng.choice(WORDS[6:])
        filler = " ".join(rng.sample(WORDS, 3))
        rows.append({"input": f"this tool will {verb} {noun} , then {filler}", "target": f"{verb} {noun}"})
    return rows


def build_tiny_llama(directory: Path) -> str:
    """A 2-layer Llama with a byte-level tokenizer over the pairs' words and a ChatML template, saved in
    ``directory``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    corpus = [r["input"] + " " + r["target"] for r in make_pairs(200, 0)] + ["system user assistant"]
    tokenizer = byte_level_bpe(corpus, ["<|im_start|>", "<|im_end|>"], chat_template=CHATML, eos_token="<|im_end|>",
                               pad_token="<|im_end|>")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pairs")
    for split, (n, seed) in {"train": (160, 1), "validation": (24, 2), "test": (24, 3)}.items():
        write_jsonl(directory / f"{split}.jsonl", make_pairs(n, seed))
    return directory


def _config(model: str, data, output, **changes) -> dict:
    raw = {"task": "generation", "model": model, "method": "lora", "output_dir": str(output),
           "data": {"train": str(data / "train.jsonl"), "validation": str(data / "validation.jsonl"),
                    "test": str(data / "test.jsonl"), "text": "input", "label": "target"},
           "train": {"epochs": 6, "batch_size": 16, "eval_batch_size": 16, "lr": 1e-2, "warmup_ratio": 0.0,
                     "max_length": 32},
           "generation": {"max_target_length": 8, "max_new_tokens": 6, "eval_examples": 8},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
    raw.update(changes)
    return raw


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_tiny_llama_learns_to_summarise_and_the_artifact_says_how_well(tiny_llama, pair_dir, tmp_path, method,
                                                                          store):
    result = train(load_config(raw=_config(tiny_llama, pair_dir, tmp_path / "run", method=method,
                                           **({"train": {"epochs": 6, "batch_size": 16, "eval_batch_size": 16,
                                                         "lr": 3e-3, "warmup_ratio": 0.0, "max_length": 32}}
                                              if method == "full" else {}))))
    manifest = read_manifest(result.artifact_dir)
    history = manifest.training.history["validation"]
    assert history[-1]["loss"] < history[0]["loss"]  # the masked loss goes down
    test = manifest.metrics["test"]
    assert {"loss", "perplexity", "rougeL", "bleu", "chrf", "exact_match"} <= set(test)
    assert set(manifest.baselines) == {"base_model", "copy_input", "retrieval"}
    assert manifest.primary_metric == "rougeL" and manifest.prompt.style == "chat"
    assert manifest.decoding == {"max_new_tokens": 6, "num_beams": 1, "do_sample": False}
    assert len(manifest.examples) == 5 and {"input", "reference", "base_model", "fine_tuned"} == set(manifest.examples[0])
    # The fine-tuned model writes what it was taught far better than the random model it started from.
    assert test["rougeL"] > manifest.baselines["base_model"]["rougeL"] + 20
    assert manifest.training.truncation["train"] == {"inputs_cut": 0, "targets_cut": 0}
    saved = json.loads((result.artifact_dir / "model" / "generation_config.json").read_text())
    assert saved["max_new_tokens"] == 6
    assert (result.artifact_dir / "report" / "metrics_vs_baselines.png").is_file()
    # Exported with its key/value cache and gated on greedy outputs against PyTorch's.
    parity = manifest.export.parity["onnx"]
    assert parity.output_agreement >= 0.95 and parity.examples == 24
    assert parity.batch_invariance.decision_changes == 0
    assert (result.artifact_dir / manifest.export.variant("onnx").path).is_file() and len(manifest.export.selftest) == 4
    assert "Every variant against PyTorch" in (result.artifact_dir / "README.md").read_text()
    # The decoder with int8 weights, gated on its metric and on writing the same alone as batched.
    quantised = manifest.export.int8
    assert quantised.kept and quantised.attempts[0].method.startswith("weight-only int8")
    assert manifest.export.parity["onnx-int8"].metric_delta["rougeL"] >= -1.0
    assert manifest.export.parity["onnx-int8"].batch_invariance.decision_changes == 0
    assert (result.artifact_dir / manifest.export.variant("onnx-int8").path).is_file()
    # Both are stored as ONNX Runtime runs them (its RMSNorm fusion done), the unfused exports not published.
    import onnx
    for name in ("onnx", "onnx-int8"):
        graph = onnx.load(result.artifact_dir / manifest.export.variant(name).path, load_external_data=False).graph
        assert "SimplifiedLayerNormalization" in {node.op_type for node in graph.node}
    assert sorted(p.name for p in (result.artifact_dir / "onnx").iterdir()) == [
        "model.int8.onnx", "model.int8.onnx.data", "model.onnx", "model.onnx.data"]
    # A CPU deployment carries the quantised decoder with its weights file, and no PyTorch weights.
    from core.cpu_files import onnx_serving_files

    files = onnx_serving_files(result.artifact_dir)
    assert {"onnx/model.int8.onnx", "onnx/model.int8.onnx.data", "model/tokenizer.json"} <= set(files)
    assert not any(f.endswith(".safetensors") or f == "onnx/model.onnx" for f in files)
    assert (result.artifact_dir / "onnx" / "model.int8.onnx.data").stat().st_mode & 0o777 == 0o644
    # ... which is what `tuneserve register --onnx-only` stores (make demo serves it from the model store).
    import bentoml

    from training.publish.register import register

    stored = bentoml.models.get(register(result.artifact_dir, onnx_only=True))
    assert sorted(str(p.relative_to(stored.path)) for p in Path(stored.path).rglob("*") if p.is_file()
                  and p.name != "model.yaml") == sorted(files)
    assert stored.info.labels["backends"] == "onnx-int8" and "labels" not in stored.info.metadata


def test_generation_options_are_checked(tiny_llama, pair_dir, tmp_path):
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="generation.* only applies to task: generation"):
        load_config(raw={**_config(tiny_llama, pair_dir, tmp_path), "task": "classification",
                         "data": {"train": str(pair_dir / "train.jsonl")}})
    with pytest.raises(ConfigError, match="beam search .* or sampling"):
        load_config(raw=_config(tiny_llama, pair_dir, tmp_path, generation={"num_beams": 2, "do_sample": True}))
    with pytest.raises(ConfigError, match="only with do_sample"):
        load_config(raw=_config(tiny_llama, pair_dir, tmp_path, generation={"temperature": 0.7}))
    with pytest.raises(ConfigError, match="exactly once"):
        load_config(raw=_config(tiny_llama, pair_dir, tmp_path, generation={"template": "Summarize:"}))


def test_the_command_line_writes_and_scores_with_the_served_backend(tiny_llama, pair_dir, tmp_path):
    import subprocess
    import sys

    result = train(load_config(raw=_config(tiny_llama, pair_dir, tmp_path / "run")))
    manifest = read_manifest(result.artifact_dir)
    texts = [manifest.export.selftest[0].text, manifest.export.selftest[1].text]

    def tuneserve(*args):
        return subprocess.run([sys.executable, "-m", "training.cli", *args], capture_output=True, text=True, timeout=300)

    done = tuneserve("predict", str(result.artifact_dir), *texts)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "backend: onnx" in done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    # The exported decoder writes PyTorch's greedy answers, recorded at export.
    assert [line["text"] for line in lines] == [s.decision for s in manifest.export.selftest[:2]]
    assert lines[0]["input"] == texts[0] and lines[0]["finish_reason"] in ("stop", "length")
    report = tmp_path / "report.json"
    done = tuneserve("evaluate", str(result.artifact_dir), "--data", str(pair_dir / "test.jsonl"), "--text", "input",
                     "--label", "target", "--output", str(report))
    assert done.returncode == 0, done.stderr[-2000:]
    assert {"rougeL", "bleu", "exact_match"} <= set(json.loads(report.read_text())["metrics"])


def test_a_quantised_decoder_that_loses_metric_is_dropped_with_its_reason(tiny_llama, pair_dir, tmp_path,
                                                                          monkeypatch):
    import training.export.decoder
    from training.export import ExportError, export_artifact

    result = train(load_config(raw=_config(tiny_llama, pair_dir, tmp_path / "run", export={"onnx": False})))
    assert read_manifest(result.artifact_dir).export is None
    # No decoder can lose less than nothing: the int8 one fails its gate.
    monkeypatch.setattr(training.export.decoder, "MAX_QUANTIZED_DROP", -1.0)
    with pytest.raises(ExportError, match="--int8 on, but the int8 decoder fails its gate: rougeL drops by"):
        export_artifact(result.artifact_dir, int8="on")
    assert read_manifest(result.artifact_dir).export is None and not (result.artifact_dir / "onnx").exists()

    export_artifact(result.artifact_dir, int8="auto")
    manifest = read_manifest(result.artifact_dir)
    assert not manifest.export.int8.kept and "rougeL drops by" in manifest.export.int8.reason
    assert manifest.export.variant("onnx-int8") is None and "onnx-int8" not in manifest.export.parity
    assert sorted(p.name for p in (result.artifact_dir / "onnx").iterdir()) == ["model.onnx", "model.onnx.data"]
    # Served on a CPU, `auto` is then the fp32 decoder.
    from service.backends import choose_backend

    backend = choose_backend(result.artifact_dir, manifest, backend="auto", device="cpu", threads=1, batch_size=8)
    assert backend.name == "onnx"


def test_generation_reads_input_and_target_columns_unless_told_otherwise(tiny_llama, pair_dir, tmp_path):
    raw = _config(tiny_llama, pair_dir, tmp_path)
    raw["data"] = {"train": str(pair_dir / "train.jsonl")}
    cfg = load_config(raw=raw)
    assert (cfg.data.text, cfg.data.label) == ("input", "target")
    raw["data"].update(text="prompt", label="completion")
    assert (load_config(raw=raw).data.text, load_config(raw=raw).data.label) == ("prompt", "completion")
    classifier = load_config(raw={"model": tiny_llama, "data": {"train": str(pair_dir / "train.jsonl")}})
    assert (classifier.data.text, classifier.data.label) == ("text", "label")


def test_a_generation_run_resumed_after_a_crash_ends_like_an_uninterrupted_one(tiny_llama, pair_dir, tmp_path,
                                                                                monkeypatch):
    import numpy as np
    from safetensors.torch import load_file


    def config(name: str):
        raw = _config(tiny_llama, pair_dir, tmp_path / name)
        raw["train"].update(epochs=2, save_every="epoch")
        raw["export"] = {"onnx": False}
        return load_config(raw=raw)

    expected = train(config("straight"))
    crash_after_first_checkpoint(monkeypatch, config("interrupted"))
    base_answers = tmp_path / "interrupted" / "base_answers.json"
    written = base_answers.read_text()  # the base model's answers, kept beside the checkpoints
    assert not (tmp_path / "interrupted" / "artifact").exists()
    resumed = train(config("interrupted"), resume=True)

    assert base_answers.read_text() == written
    for split in ("validation", "test"):
        assert resumed.metrics[split] == pytest.approx(expected.metrics[split], abs=1e-6)
    for name, figures in expected.baselines.items():
        assert resumed.baselines[name] == pytest.approx(figures, abs=1e-6)
    assert [g.text for g in resumed.test_scores] == [g.text for g in expected.test_scores]
    a = load_file(str(expected.artifact_dir / "model" / "model.safetensors"))
    b = load_file(str(resumed.artifact_dir / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert read_manifest(resumed.artifact_dir).training.steps == read_manifest(expected.artifact_dir).training.steps


def _conversation(row: dict, system: str | None = "Name what the tool does.") -> dict:
    turns = [{"role": "user", "content": row["input"]}, {"role": "assistant", "content": row["target"]}]
    return {"messages": ([{"role": "system", "content": system}] if system else []) + turns}


def test_chat_conversations_train_with_their_system_turn_in_the_prompt(tiny_llama, pair_dir, tmp_path):
    from transformers import AutoTokenizer

    from core.prompting import render_prompt
    from training.data.reading import load_dataset

    data = tmp_path / "chats"
    for split in ("train", "validation", "test"):
        rows = [json.loads(line) for line in (pair_dir / f"{split}.jsonl").read_text().splitlines()]
        write_jsonl(data / f"{split}.jsonl", [_conversation(r) for r in rows])
    raw = _config(tiny_llama, data, tmp_path / "run", export={"onnx": False})
    raw["data"].update(text="messages")
    del raw["data"]["label"]
    cfg = load_config(raw=raw)
    loaded = load_dataset(cfg.data, cfg.task, cfg.train.seed)
    plain = load_dataset(load_config(raw=_config(tiny_llama, pair_dir, tmp_path / "x")).data, cfg.task, cfg.train.seed)
    assert loaded.system == "Name what the tool does."
    assert loaded.test.texts == plain.test.texts and loaded.test.labels == plain.test.labels  # user turn -> answer

    result = train(cfg)
    manifest = read_manifest(result.artifact_dir)
    assert manifest.prompt.style == "chat" and manifest.prompt.system == "Name what the tool does."
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    prompt = render_prompt(manifest.prompt, tokenizer, "this tool will sort files")
    assert prompt.index("Name what the tool does.") < prompt.index("this tool will sort files")
    assert {"rougeL", "loss"} <= set(manifest.metrics["test"])


@pytest.mark.parametrize("rows, message", [
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}],
     "row 1, column 'messages': conversation: expected a user turn and the assistant's answer"),
    ([{"messages": [{"role": "user", "content": "a"}]}], "row 1, column 'messages': conversation: the last message "
                                                          "must be the assistant's"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}], r"conversation\[1\].role"),
    ([{"messages": [{"role": "system", "content": "s1"}, {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"}]},
      {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
     "system turns differ \\(row 1: 's1', row 2: None\\)"),
])
def test_malformed_conversations_are_named_by_row(tiny_llama, tmp_path, rows, message):
    from core.errors import DataError
    from training.data.reading import load_split

    path = write_jsonl(tmp_path / "chats.jsonl", rows)
    cfg = load_config(raw={"task": "generation", "model": tiny_llama, "data": {"train": str(path), "text": "messages"}})
    with pytest.raises(DataError, match=message):
        load_split(str(path), "train", cfg.data, cfg.task)


def test_a_system_turn_in_the_data_must_agree_with_the_config(tiny_llama):
    from transformers import AutoTokenizer

    from core.errors import ConfigError

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    generation = load_config(raw={"task": "generation", "model": tiny_llama, "data": {"train": "x.jsonl"},
                                  "generation": {"system": "Be brief."}}).generation
    assert generation.prompt_format(tokenizer, "Be brief.").system == "Be brief."
    with pytest.raises(ConfigError, match="differs from the training conversations' system turn 'Be terse.'"):
        generation.prompt_format(tokenizer, "Be terse.")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_lm_head_runs_from_the_first_target_only_and_the_loss_is_unchanged(tiny_llama, family):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from core.tasks import Task
    from training.recipe.generation_eval import causal_lm_logits, keeps_logits
    from training.recipe.torch_tasks import IGNORE_INDEX, torch_task

    torch.manual_seed(0)
    if family == "llama":
        model, targets = AutoModelForCausalLM.from_pretrained(tiny_llama), ["q_proj", "v_proj"]
    else:
        vocab = AutoModelForCausalLM.from_pretrained(tiny_llama).config.vocab_size
        model, targets = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2,
                                                    n_positions=64)), ["c_attn"]
    model = get_peft_model(model.eval(), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=targets,
                                                    lora_dropout=0.0))  # eval: no dropout, two passes alike
    assert keeps_logits(model)
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 20))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 14:18], labels[1, 12:20], labels[2, 16:19] = ids[0, 14:18], ids[1, 12:20], ids[2, 16:19]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    seen = []
    model.get_base_model().lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    loss = torch_task(Task.GENERATION).make_loss(None, 0, "none", 0.0)

    full = loss(model(**batch).logits, labels)
    logits, kept = causal_lm_logits(model, batch, labels)
    assert seen == [20, 9] and logits.shape[1] == kept.shape[1] == 9  # from position 11, which predicts token 12
    torch.testing.assert_close(loss(logits, kept), full)
    full.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    loss(logits, kept).backward()
    for before, after in zip(grads, [p.grad for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(after, before)
    everything = torch.full_like(labels, IGNORE_INDEX)  # no target in the batch: every position, as before
    assert causal_lm_logits(model, batch, everything)[0].shape[1] == 20
