"""Encoder-decoder models (T5, BART) for task: generation, chosen from the model's config: the encoder reads the
prompt, the decoder learns the target; evaluation writes the decoder's text only; the export records that PyTorch
serves the model (no ONNX yet) with PyTorch's answers for the self-test; `tuneserve predict` and `evaluate` answer
with the torch backend. Tiny models built from configs, with BPE tokenizers trained here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from core.manifest import read_manifest
from tests.conftest import byte_level_bpe, write_jsonl
from tests.training.test_generation_train import make_pairs
from training.config import load_config
from training.run import train


def bpe_tokenizer(specials: list[str], template: str, **tokens: str):
    """A byte-level BPE tokenizer trained on the task's words, whose post-processor adds ``template``'s special
    tokens (T5: ``$A </s>``; BART: ``<s> $A </s>``), as the real models' tokenizers do."""
    corpus = [r["input"] + " " + r["target"] for r in make_pairs(200, 0)]
    return byte_level_bpe(corpus, specials, template=template, **tokens)


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> str:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    directory = tmp_path_factory.mktemp("tiny-t5")
    # T5's conventions: pad 0, end of sequence 1, and the decoder starts from the pad token.
    tokenizer = bpe_tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>", pad_token="<pad>", eos_token="</s>",
                              unk_token="<unk>")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5ForConditionalGeneration(config).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def tiny_bart(tmp_path_factory) -> str:
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    directory = tmp_path_factory.mktemp("tiny-bart")
    tokenizer = bpe_tokenizer(["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s>", bos_token="<s>", pad_token="<pad>",
                              eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=64, dropout=0.0, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                        decoder_start_token_id=2, forced_eos_token_id=None)
    BartForConditionalGeneration(config).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("seq2seq-pairs")
    for split, (n, seed) in {"train": (40, 1), "validation": (12, 2), "test": (12, 3)}.items():
        write_jsonl(directory / f"{split}.jsonl", make_pairs(n, seed))
    return directory


def seq2seq_config(model: str, data, output, method: str, lr: float, epochs: int = 2) -> dict:
    return {"task": "generation", "model": model, "method": method, "output_dir": str(output),
            "data": {"train": str(data / "train.jsonl"), "validation": str(data / "validation.jsonl"),
                     "test": str(data / "test.jsonl"), "text": "input", "label": "target"},
            "train": {"epochs": epochs, "batch_size": 8, "eval_batch_size": 16, "lr": lr, "warmup_ratio": 0.0,
                      "max_length": 32},
            "generation": {"template": "summarize: {input}", "max_target_length": 8, "max_new_tokens": 6,
                           "eval_examples": 8},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}


def _train_loss(model_dir: str, pair_dir) -> float:
    """The model's own loss (transformers computes it from labels) over the training split, encoded by the trainer's
    function for an encoder-decoder model."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from core.prompting import PromptFormat
    from core.tasks.generation import encode_example

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    fmt = PromptFormat(style="plain", template="summarize: {input}")
    losses = []
    for row in (json.loads(line) for line in (pair_dir / "train.jsonl").read_text().splitlines()):
        example = encode_example(tokenizer, fmt, row["input"], row["target"], max_input_tokens=32,
                                 max_target_tokens=8, encoder_decoder=True)
        with torch.no_grad():
            losses.append(model(input_ids=torch.tensor([example.input_ids]),
                                labels=torch.tensor([example.labels])).loss.item())
    return sum(losses) / len(losses)


def test_encoder_decoder_examples_put_the_prompt_in_the_encoder_and_the_target_in_the_labels(tiny_t5):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from core.prompting import PromptFormat
    from core.tasks import Task
    from core.tasks.generation import encode_example
    from training.recipe.batching import Collator
    from training.recipe.torch_tasks import IGNORE_INDEX, model_task

    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    fmt = PromptFormat(style="plain", template="summarize: {input}")
    example = encode_example(tokenizer, fmt, "this tool will copy files , then sort", "copy files",
                             max_input_tokens=32, max_target_tokens=8, encoder_decoder=True)
    # the encoder's input is the plain prompt with T5's closing </s>; the labels are the target and </s>, no prompt
    assert tokenizer.decode(example.input_ids) == "summarize: this tool will copy files , then sort</s>"
    assert example.labels == tokenizer("copy files", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    cut = encode_example(tokenizer, fmt, "copy", "copy files " * 10, max_input_tokens=32, max_target_tokens=8,
                         encoder_decoder=True)
    assert cut.target_cut and len(cut.labels) == 8 and tokenizer.eos_token_id not in cut.labels

    torch_side = model_task(Task.GENERATION, tiny_t5)
    assert (torch_side.peft_task_type, torch_side.encoder_decoder, torch_side.shifts_labels) == ("SEQ_2_SEQ_LM", True,
                                                                                                  False)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5).eval()
    examples = [encode_example(tokenizer, fmt, r["input"], r["target"], max_input_tokens=32, max_target_tokens=8,
                               encoder_decoder=True) for r in make_pairs(4, 9)]
    collate = Collator(tokenizer, Task.GENERATION, decoder_inputs=model.prepare_decoder_input_ids_from_labels)
    batch = collate([{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
                     for e in examples])
    # labels padded to the longest target (not the prompt), the decoder's inputs start from T5's start token (pad 0)
    assert batch["labels"].shape[1] == max(len(e.labels) for e in examples) < batch["input_ids"].shape[1]
    assert (batch["labels"] == IGNORE_INDEX).any() and (batch["decoder_input_ids"][:, 0] == 0).all()
    labels = batch.pop("labels")
    with torch.no_grad():
        ours = torch_side.make_loss(None, 0, "none", 0.0)(model(**batch).logits, labels)
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    assert torch.allclose(ours, theirs)  # no shift: the decoder's logits line up with the labels


def test_a_tiny_t5_learns_with_lora_and_is_served_by_pytorch(tiny_t5, pair_dir, tmp_path):
    result = train(load_config(raw=seq2seq_config(tiny_t5, pair_dir, tmp_path / "run", "lora", 3e-2, epochs=3)))
    artifact = result.artifact_dir
    manifest = read_manifest(artifact)
    assert manifest.prompt.style == "plain" and manifest.prompt.template == "summarize: {input}"
    # LoRA on every linear layer of the blocks: T5's attention (q, k, v, o, with cross-attention) and feed-forward
    assert {"q", "k", "v", "o", "wi", "wo"} <= set(manifest.training.lora_target_modules)
    history = manifest.training.history["validation"]
    assert len(history) == 3 and history[-1]["loss"] < history[0]["loss"]
    assert _train_loss(str(artifact / "model"), pair_dir) < _train_loss(tiny_t5, pair_dir) - 1.0
    assert set(manifest.baselines) == {"base_model", "copy_input", "retrieval"}
    assert "AutoModelForSeq2SeqLM" in (artifact / "adapter" / "README.md").read_text()
    # The export section: no ONNX, PyTorch serves it, and why; PyTorch's greedy answers for the self-test.
    export = manifest.export
    assert export.variant("onnx") is None and export.backend == "torch" and "encoder-decoder" in export.reason
    assert export.parity == {} and not (artifact / "onnx").exists()
    assert len(export.selftest) == 4 and all(s.decision and s.decision == s.decision.strip() for s in export.selftest)
    assert "Not exported to ONNX: encoder-decoder models are served by PyTorch" in (artifact / "README.md").read_text()
    # Evaluation wrote the decoder's text only: never the prompt it was given.
    assert all(not row["fine_tuned"].startswith("summarize") for row in manifest.examples)

    def tuneserve(*args):
        return subprocess.run([sys.executable, "-m", "training.cli", *args], check=False, capture_output=True,
                              text=True, timeout=300)

    texts = [s.text for s in export.selftest[:2]]
    done = tuneserve("predict", str(artifact), *texts)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "backend: torch-cpu" in done.stderr and "because the artifact has no ONNX export" in done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["text"] for line in lines] == [s.decision for s in export.selftest[:2]]
    assert all(line["finish_reason"] in ("stop", "length") and line["tokens"] > 0 for line in lines)
    done = tuneserve("predict", str(artifact), "--backend", "onnx", texts[0])
    assert done.returncode == 2 and "no ONNX export (encoder-decoder models are served by PyTorch" in done.stderr
    report = tmp_path / "report.json"
    done = tuneserve("evaluate", str(artifact), "--data", str(pair_dir / "test.jsonl"), "--text", "input",
                     "--label", "target", "--output", str(report))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(report.read_text())["metrics"]["rougeL"] == pytest.approx(manifest.metrics["test"]["rougeL"],
                                                                                  abs=1e-6)


def test_a_tiny_bart_learns_with_full_fine_tuning(tiny_bart, pair_dir, tmp_path):
    from transformers import AutoTokenizer

    result = train(load_config(raw=seq2seq_config(tiny_bart, pair_dir, tmp_path / "run", "full", 1e-2, epochs=3)))
    manifest = read_manifest(result.artifact_dir)
    assert manifest.method == "full" and manifest.training.lora_target_modules is None
    assert _train_loss(str(result.artifact_dir / "model"), pair_dir) < _train_loss(tiny_bart, pair_dir) - 1.0
    assert manifest.export.variant("onnx") is None and manifest.export.backend == "torch"
    # the answers the self-test holds are the decoder's text, without BART's <s> or the prompt
    tokenizer = AutoTokenizer.from_pretrained(result.artifact_dir / "model")
    for sample in manifest.export.selftest:
        assert "<s>" not in sample.decision and not sample.decision.startswith("summarize")
        assert len(tokenizer(sample.decision, add_special_tokens=False)["input_ids"]) <= manifest.decoding["max_new_tokens"]
