"""The shared-base exporter: a model's LoRA adapter (or, for a frozen encoder, none) and head in the runtime's format,
beside the base encoder's graph that takes each row's adapter as inputs (core/shared_base.py), gated against the
model's own PyTorch outputs like every other variant.

Many models trained over one base are then served by one session of that graph: each costs its factors and head,
not a copy of the base. Only models whose encoder is the base plus low-rank updates can share it: LoRA (not DoRA, not
per-layer ranks) and a fully frozen encoder; BERT-like encoders whose heads core/shared_base.py computes. Any other
model gets no such variant, and the export report says why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np

from core.manifest import ADAPTER_DIR, MODEL_DIR, Manifest
from core.shared_base import (
    ADAPTER_FILE,
    ADAPTER_INPUT,
    BASE_FILE,
    HIDDEN_OUTPUT,
    SHARED_DIR,
    Adapter,
    SharedBase,
)
from training.export.base import ONNX_DIR, OPSET

logger = logging.getLogger(__name__)

VARIANT = "onnx-shared"
# The architectures whose heads the shared base computes, and the head each has.
HEAD_OF = {"BertForSequenceClassification": "pooled", "BertForTokenClassification": "tokens"}
SHARED_MODEL_TYPES = ("bert",)


def not_shareable(artifact_dir: Path, manifest: Manifest) -> str | None:
    """Why the model cannot share a base (None: it can)."""
    config = json.loads((artifact_dir / MODEL_DIR / "config.json").read_text())
    architecture = (config.get("architectures") or ["?"])[0]
    if config.get("model_type") not in SHARED_MODEL_TYPES or architecture not in HEAD_OF:
        return f"{architecture} ({config.get('model_type')}): the shared base computes the heads of {', '.join(HEAD_OF)}"
    settings = manifest.provenance.config
    if manifest.method == "freeze":
        if (settings.get("freeze") or {}).get("layers") is not None:
            return "freeze.layers trains part of the encoder: the model is not its base plus a head"
        return None
    if manifest.method != "lora":
        return f"method {manifest.method}: only LoRA adapters and a frozen encoder leave the base weights as they are"
    adapter_config = artifact_dir / ADAPTER_DIR / "adapter_config.json"
    if not adapter_config.is_file():  # an artifact written before adapters were kept beside the merged model
        return f"no {ADAPTER_DIR}/adapter_config.json: the LoRA factors were not kept (train it again to share a base)"
    peft_config = json.loads(adapter_config.read_text())
    if peft_config.get("use_dora"):
        return "DoRA rescales each weight's columns, which a low-rank side path cannot express"
    if peft_config.get("rank_pattern") or peft_config.get("alpha_pattern"):
        return "per-layer ranks or alphas (rank_pattern, alpha_pattern) are not supported by the shared base"
    return None


def base_identity(model) -> str:
    """sha256 over the base encoder's weights (names and bytes, in name order): models over equal identities
    share a graph."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith("pooler."):  # not part of the shared graph; a head trains its own copy
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def _adapted_layers(model) -> list[str]:
    from training.recipe.modeling import _encoder_linear_layers

    return _encoder_linear_layers(model, [])


def export_base_graph(model, path: Path) -> list[str]:
    """Write the base encoder with a low-rank side path on every encoder linear layer, its factors graph inputs;
    returns the adapted layers."""
    import torch
    from torch import nn

    class RowLoRA(nn.Module):
        def __init__(self, linear: nn.Linear):
            super().__init__()
            self.linear, self.factors = linear, None

        def forward(self, x):
            a, b = self.factors
            return self.linear(x) + torch.matmul(torch.matmul(x, a), b)

    layers = _adapted_layers(model)
    slots = []
    for name in layers:
        owner, _, attribute = name.rpartition(".")
        slot = RowLoRA(getattr(model.get_submodule(owner), attribute))
        setattr(model.get_submodule(owner), attribute, slot)
        slots.append(slot)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids, adapter, *factors):
            for i, slot in enumerate(slots):
                slot.factors = (factors[2 * i][adapter], factors[2 * i + 1][adapter])
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    rank, adapters, batch, length = 2, 2, 2, 7
    generator = torch.Generator().manual_seed(0)
    factors, names, axes = [], [], {}
    for name, slot in zip(layers, slots):
        width_in, width_out = slot.linear.in_features, slot.linear.out_features
        factors += [torch.randn(adapters, width_in, rank, generator=generator),
                    torch.randn(adapters, rank, width_out, generator=generator)]
        names += [f"lora_A.{name}", f"lora_B.{name}"]
        axes[f"lora_A.{name}"], axes[f"lora_B.{name}"] = {0: "adapters", 2: "rank"}, {0: "adapters", 1: "rank"}
    ids = torch.randint(5, 100, (batch, length), generator=generator)
    tokens = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    inputs = ["input_ids", "attention_mask", "token_type_ids", ADAPTER_INPUT]
    axes.update({n: {0: "batch", 1: "sequence"} for n in inputs[:3]})
    axes[ADAPTER_INPUT], axes[HIDDEN_OUTPUT] = {0: "batch"}, {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(Shared().eval(), (*tokens.values(), torch.tensor([0, 1]), *factors), str(path),
                          input_names=inputs + names, output_names=[HIDDEN_OUTPUT], dynamic_axes=axes,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    return layers


def adapter_of(artifact_dir: Path, manifest: Manifest, base: str) -> Adapter:
    """The model's factors (peft's adapter, transposed, B scaled) and head (from the merged model) in the shared
    base's format."""
    from safetensors import safe_open

    factors: dict[str, np.ndarray] = {}
    if manifest.method == "lora":
        peft_config = json.loads((artifact_dir / ADAPTER_DIR / "adapter_config.json").read_text())
        alpha, rslora = peft_config["lora_alpha"], peft_config.get("use_rslora", False)
        with safe_open(str(artifact_dir / ADAPTER_DIR / "adapter_model.safetensors"), "np") as f:
            for key in f.keys():
                if ".lora_A." not in key:
                    continue
                layer = key.split(".", 3)[3].split(".lora_A.")[0]  # base_model.model.<prefix>.<layer>.lora_A.weight
                a, b = f.get_tensor(key), f.get_tensor(key.replace(".lora_A.", ".lora_B."))
                rank = a.shape[0]
                scaling = alpha / (math.sqrt(rank) if rslora else rank)
                factors[f"lora_A.{layer}"] = a.T.astype(np.float32)
                factors[f"lora_B.{layer}"] = (b.T * scaling).astype(np.float32)
    config = json.loads((artifact_dir / MODEL_DIR / "config.json").read_text())
    kind = HEAD_OF[config["architectures"][0]]
    prefix = "bert."
    names = {"head.classifier.weight": "classifier.weight", "head.classifier.bias": "classifier.bias"}
    if kind == "pooled":
        names.update({"head.pooler.weight": f"{prefix}pooler.dense.weight", "head.pooler.bias": f"{prefix}pooler.dense.bias"})
    with safe_open(str(artifact_dir / MODEL_DIR / "model.safetensors"), "np") as f:
        head = {ours: f.get_tensor(theirs).astype(np.float32) for ours, theirs in names.items()}
    return Adapter(factors, kind, head, base)


def export_shared(artifact_dir: Path, manifest: Manifest, tmp: Path, judge, gate) -> tuple[dict | None, str | None, SharedBase | None]:
    """Stage the shared-base variant in ``tmp/shared`` and gate it (``judge``: the encoder exporter's; ``gate``:
    report -> why it fails or None). Returns its parity report, why there is none, and the loaded base (for the
    self-test)."""
    from transformers import AutoModel

    from training.recipe.bases import resolve_model

    reason = not_shareable(artifact_dir, manifest)
    if reason:
        return None, reason, None
    base_model = AutoModel.from_pretrained(resolve_model(manifest.base_model), attn_implementation="eager").eval()
    identity = base_identity(base_model)
    directory = tmp / SHARED_DIR
    directory.mkdir()
    export_base_graph(base_model, directory / BASE_FILE)
    adapter = adapter_of(artifact_dir, manifest, identity)
    adapter.save(directory / ADAPTER_FILE)
    shared = SharedBase(directory / BASE_FILE, identity)
    shared.add(manifest.name, Adapter.load(directory / ADAPTER_FILE))
    report = judge.compare(shared.model_for(manifest.name))
    failure = gate(report)
    logger.info("ONNX over a shared base: label agreement with PyTorch %s, largest score difference %.2e%s",
                report.get("label_agreement", "n/a"), report["max_abs_diff"], f" (not kept: {failure})" if failure else "")
    if failure:
        return None, failure, None
    return report, None, shared


def shared_files() -> list[str]:
    return [f"{ONNX_DIR}/{SHARED_DIR}/{BASE_FILE}", f"{ONNX_DIR}/{SHARED_DIR}/{ADAPTER_FILE}"]
