"""Export a causal language model's decoder to ONNX with its key/value cache, for decoding without torch.

The graph takes ``input_ids``, ``attention_mask``, ``position_ids`` and the cache as flat tensors
(``past_key_values.{i}.key`` / ``.value``, each ``[batch, kv_heads, past, head_dim]``) and returns ``logits`` and
the grown cache (``present.{i}.key`` / ``.value``, ``[batch, kv_heads, past + sequence, head_dim]``). One graph
serves both the prompt (a zero-length past) and every later step (one new token per row), for batches of
left-padded prompts: :class:`core.decoding.OnnxDecoder` runs it.

optimum-onnx, the usual route, pins transformers below the version this project pins, so this is
``torch.onnx.export`` (the TorchScript exporter) of a small wrapper that turns the flat tensors into a
``DynamicCache`` and back.

Encoder-decoder models (T5, BART) are not exported: their artifact's export section says so (``"onnx": null``,
``"backend": "torch"`` and the reason) and still records PyTorch's greedy answers for the service's start-up
self-test.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

OPSET = 17
# Eager attention: with ONNX Runtime on 2 threads, a random model of SmolLM2-135M's shape exported both ways decodes
# at 16 tokens/s at batch 1 (eager) against 15 (sdpa), 56 against 51 tokens/s in total at batch 8, and reads a
# 64-token prompt in 0.28 s against 0.30 s. The sdpa graph computes the same with about 20 more nodes per layer
# (shape arithmetic, a NaN guard on the attention weights) and gains nothing; eager is also what the encoder export
# uses (training/export.py), whose graphs ONNX Runtime's optimizer fuses only in that form.
ATTENTION = "eager"
# The trace's example: enough to keep every dimension symbolic (batch, new tokens and past all differ and exceed 1).
TRACE_BATCH, TRACE_NEW, TRACE_PAST = 2, 3, 4


def _cache_wrapper(model, num_layers: int, all_logits: bool):
    """A module with flat tensors in and out around ``model`` (a transformers causal LM)."""
    import torch
    from transformers import DynamicCache

    class DecoderWithCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(num_layers)])
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True, logits_to_keep=0 if all_logits else 1)
            presents = []
            for layer in out.past_key_values.layers:
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    return DecoderWithCache()


def cache_shape(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder's cache, from its transformers config."""
    config = config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def export_decoder(model_dir: str | os.PathLike, out_path: str | os.PathLike, *, attention: str = ATTENTION,
                   all_logits: bool = False) -> Path:
    """Export the causal LM saved in ``model_dir`` to ``out_path`` (ONNX, opset 17, fp32).

    Args:
        model_dir: a transformers model directory (Llama family, GPT-2, and others whose layers take a
            ``DynamicCache``).
        out_path: the ONNX file to write (large models get their weights in a ``.data`` file beside it).
        attention: ``"eager"`` or ``"sdpa"``, the attention implementation traced.
        all_logits: return logits for every input position (``[batch, sequence, vocab]``) rather than for the last
            one only (``[batch, 1, vocab]``), which is all decoding needs and spares the prompt's output
            projection.

    Returns:
        The path written.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from training.export import library_noise_to_log

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation=attention,
                                                 dtype=torch.float32)
    model.eval()
    num_layers, kv_heads, head_dim = cache_shape(model.config)
    wrapper = _cache_wrapper(model, num_layers, all_logits)

    # Row 0 is left-padded by one position in the past, so the traced mask is a real one: were the example all
    # ones, a shortcut that drops the mask could be traced in.
    total = TRACE_PAST + TRACE_NEW
    attention_mask = torch.ones(TRACE_BATCH, total, dtype=torch.int64)
    attention_mask[0, 0] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, TRACE_PAST:]
    input_ids = torch.randint(0, model.config.get_text_config(decoder=True).vocab_size, (TRACE_BATCH, TRACE_NEW))
    past = [torch.randn(TRACE_BATCH, kv_heads, TRACE_PAST, head_dim) for _ in range(2 * num_layers)]

    past_names = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present_names = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    dynamic_axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
                    "position_ids": {0: "batch", 1: "sequence"},
                    "logits": {0: "batch", 1: "sequence"} if all_logits else {0: "batch"}}
    dynamic_axes |= {name: {0: "batch", 2: "past"} for name in past_names}
    dynamic_axes |= {name: {0: "batch", 2: "total"} for name in present_names}

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), library_noise_to_log():
        torch.onnx.export(wrapper, (input_ids, attention_mask, position_ids, *past), str(out_path), dynamo=False,
                          opset_version=OPSET, input_names=["input_ids", "attention_mask", "position_ids", *past_names],
                          output_names=["logits", *present_names], dynamic_axes=dynamic_axes)
    logger.info("exported %s (%d layers, %d kv heads of %d, %s attention) to %s", model.config.model_type,
                num_layers, kv_heads, head_dim, attention, out_path)
    return out_path


# The gate: greedy outputs of the exported decoder against PyTorch's on held-out inputs.
GATE_EXAMPLES = 32
# fp32: nearly every greedy output token-identical. Rounding differences decide near-ties between two tokens, after
# which greedy outputs part: on SmolLM2 fine-tuned on man pages, 30 of 32 outputs were identical and ROUGE-L the same.
MIN_OUTPUT_AGREEMENT = 0.9
MAX_METRIC_DROP = 0.5  # points of the primary metric (0-100 scale)
SELFTEST_EXAMPLES = 4
NOT_EXPORTED_ENCODER_DECODER = ("encoder-decoder models are served by PyTorch: ONNX export of their decoder with "
                                "cache is not available yet")


def _selftest(texts: list[str], generations: list) -> list[dict]:
    """A few inputs and the texts PyTorch wrote for them, for a serving backend to reproduce at start-up."""
    return [{"text": t, "text_pair": None, "scores": None, "decision": g.text}
            for t, g in list(zip(texts, generations))[:SELFTEST_EXAMPLES]]


def _torch_only_section(model_dir: Path, manifest, texts: list[str], greedy: dict) -> dict:
    """The export section of a model that PyTorch serves: no ONNX files, why, and PyTorch's greedy answers."""
    from transformers import AutoTokenizer

    from training.generate import generate
    from training.tasks import auto_model_class, model_task

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = auto_model_class(manifest.task, model_task(manifest.task, str(model_dir))).from_pretrained(model_dir)
    answers = generate(model.eval(), tokenizer, manifest.prompt, texts[:SELFTEST_EXAMPLES], greedy,
                       max_input_tokens=manifest.max_length)
    logger.info("not exported to ONNX: %s", NOT_EXPORTED_ENCODER_DECODER)
    return {"onnx": None, "backend": "torch", "reason": NOT_EXPORTED_ENCODER_DECODER, "parity": {},
            "int8": {"requested": "off", "kept": False, "reason": NOT_EXPORTED_ENCODER_DECODER},
            "selftest": _selftest(texts, answers)}


def export_generation_artifact(artifact_dir: Path, texts: list[str], references: list, held_out_name: str,
                               tmp: Path) -> dict:
    """Export a generation artifact's decoder into ``tmp`` and gate it; return the manifest's ``export`` section.
    An encoder-decoder model is not exported (its section says why, with ``"onnx": null``) and writes nothing to
    ``tmp``.

    Raises:
        ExportError: the exported decoder's greedy outputs differ from PyTorch's too often, or lose metric.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.decoding import OnnxDecoder
    from core.manifest import MODEL_DIR, read_manifest
    from core.tasks.generation import prompt_for
    from training.export import ExportError
    from training.generate import generate
    from training.tasks import is_encoder_decoder

    manifest = read_manifest(artifact_dir)
    greedy = {"max_new_tokens": manifest.decoding["max_new_tokens"], "num_beams": 1, "do_sample": False}
    if is_encoder_decoder(str(artifact_dir / MODEL_DIR)):
        return _torch_only_section(artifact_dir / MODEL_DIR, manifest, texts, greedy)
    spec = manifest.task.spec
    tokenizer = AutoTokenizer.from_pretrained(artifact_dir / MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(artifact_dir / MODEL_DIR, attn_implementation=ATTENTION).eval()
    count = min(GATE_EXAMPLES, len(texts))
    texts, references = texts[:count], list(references[:count])
    reference = generate(model, tokenizer, manifest.prompt, texts, greedy, max_input_tokens=manifest.max_length)
    path = export_decoder(artifact_dir / MODEL_DIR, tmp / "model.onnx")
    decoder = OnnxDecoder(path, tokenizer, tokenizer.eos_token_id)
    prompts = [prompt_for(tokenizer, manifest.prompt, t, manifest.max_length)[0] for t in texts]
    onnx = decoder.generate(prompts, greedy["max_new_tokens"])
    alone = [decoder.generate([p], greedy["max_new_tokens"])[0] for p in prompts[:8]]
    report = spec.compare(manifest, reference, onnx, references)
    changed = sum(a.text != b.text for a, b in zip(alone, onnx))
    report["batch_invariance"] = {"arrangements": [f"the first {len(alone)} alone"], "max_abs_diff": 0.0,
                                  "decision_changes": changed}
    primary = manifest.primary_metric
    drop = -report["metric_delta"].get(primary, 0.0)
    if report["output_agreement"] < MIN_OUTPUT_AGREEMENT or drop > MAX_METRIC_DROP or changed:
        raise ExportError(f"{artifact_dir}: the ONNX decoder's greedy outputs match PyTorch's on "
                          f"{report['output_agreement']:.0%} of {count} {held_out_name} examples (needs "
                          f"{MIN_OUTPUT_AGREEMENT:.0%}), {primary} changes by {-drop:+.2f}, {changed} output(s) differ "
                          "between alone and batched; nothing was written")
    return {
        "onnx": {"fp32": "onnx/model.onnx", "int8": None, "opset": OPSET, "held_out": held_out_name,
                 "note": "decoder with key/value cache (core/decoding.py runs it)"},
        "parity": {"onnx": report},
        "int8": {"requested": "off", "kept": False, "reason": "int8 of generation models is not available yet"},
        "selftest": _selftest(texts, reference),
    }
