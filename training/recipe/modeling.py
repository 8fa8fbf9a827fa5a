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
from training.recipe.bases import resolve_model
from training.recipe.torch_tasks import TorchTask, auto_model_class, model_task

logger = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"\.(?:layer|layers|h|block)\.(\d+)\.")
# train.dropout's knobs and the config fields that hold them, across architectures (each one a model has is set).
DROPOUT_FIELDS = {
    "hidden": ("hidden_dropout_prob", "hidden_dropout", "resid_pdrop", "embd_pdrop", "dropout_rate", "dropout"),
    "attention": ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop"),
    "classifier": ("classifier_dropout", "seq_classif_dropout"),
}
PEFT_METHODS = ("lora", "ia3", "prompt")  # trained through peft: an adapter/ directory beside the merged model
PROMPT_TOKEN = "<prompt_{}>"  # the virtual tokens of prompt tuning, once folded into the artifact's vocabulary


@dataclass
class BuiltModel:
    model: nn.Module
    tokenizer: object
    base_path: str
    head_modules: list[str]
    target_modules: list[str] | None
    trainable_parameters: int
    total_parameters: int
    torch_task: TorchTask  # the task's torch side for this model (encoder-decoder or not: training/recipe/torch_tasks.py)


def load_tokenizer(path: str):
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:  # GPT-2-like tokenizers: pad with EOS
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
    torch_side = model_task(cfg.task, path)
    num_labels = cfg.task.spec.num_outputs(labels)
    kwargs = dict(num_labels=num_labels) if num_labels else {}  # a language model keeps its own head
    if cfg.task.spec.hf_problem_type:  # transformers accepts only its sequence-level problem types
        kwargs["problem_type"] = cfg.task.spec.hf_problem_type
    if labels is not None:
        kwargs.update(id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    kwargs.update(dropout_overrides(cfg, path))
    try:
        model, info = auto_model_class(cfg.task, torch_side).from_pretrained(path, output_loading_info=True, **kwargs)
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model: cannot load {cfg.model!r} ({str(exc).splitlines()[0][:300]})") from None
    # A model the task wraps (sentence embeddings: pooling) has no head; BERT's pooler feeds nothing there.
    heads = [] if torch_side.wrap else _head_modules(model, set(info.get("missing_keys", ())))
    total = sum(p.numel() for p in model.parameters())
    target_modules = None

    if cfg.method in PEFT_METHODS:
        from peft import get_peft_model

        peft_config, target_modules = _peft_config(cfg, model, heads, torch_side, path)
        try:
            model = get_peft_model(model, peft_config)
        except ValueError as exc:
            raise ConfigError(f"{'method' if cfg.method == 'prompt' else cfg.method + '.target_modules'}: {exc}") from None
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
    if torch_side.wrap:
        model = torch_side.wrap(model, path, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("model: %s, method %s, %s of %s parameters trainable (%.2f%%)", cfg.model, cfg.method,
                f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return BuiltModel(model, tokenizer, path, heads, target_modules, trainable, total, torch_side)


def dropout_overrides(cfg: Config, path: str) -> dict[str, float]:
    """The model config fields that ``train.dropout`` sets for the model at ``path`` (applied before loading, so the
    dropout modules are built with them).

    Raises:
        ConfigError: a rate is set that the model's config has no field for.
    """
    chosen = {knob: rate for knob, rate in cfg.train.dropout.model_dump().items() if rate is not None}
    if not chosen:
        return {}
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(path)
    overrides = {}
    for knob, rate in chosen.items():
        fields = [f for f in DROPOUT_FIELDS[knob] if hasattr(model_config, f)]
        if not fields:
            raise ConfigError(f"train.dropout.{knob}: {cfg.model!r} ({model_config.model_type}) has no such dropout in "
                              f"its config (none of {', '.join(DROPOUT_FIELDS[knob])}); leave it null")
        overrides.update(dict.fromkeys(fields, rate))
    return overrides


def _peft_config(cfg: Config, model: PreTrainedModel, heads: list[str], torch_side: TorchTask, path: str):
    """The peft config of ``cfg.method`` (lora, ia3, prompt), with the task head and pooler trained and saved
    whole (``modules_to_save``), and the adapted module names the manifest records (None for prompt tuning).

    Raises:
        ConfigError: no module to adapt was found, or prompt tuning would push inputs past the model's positions.
    """
    import peft

    task_type = peft.TaskType[torch_side.peft_task_type]
    if cfg.method == "lora":
        targets = cfg.lora.target_modules
        if targets == "auto":
            targets = _encoder_linear_layers(model, heads)
            if not targets:
                raise ConfigError(f"lora.target_modules: found no encoder linear layers in {cfg.model!r}; list them by name")
        recorded = sorted({t.rsplit(".", 1)[-1] for t in targets}) if cfg.lora.target_modules == "auto" else list(targets)
        return peft.LoraConfig(
            task_type=task_type, r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=targets, use_dora=cfg.lora.use_dora, use_rslora=cfg.lora.use_rslora,
            modules_to_save=list(heads),  # a copy: peft appends its defaults to it
        ), recorded
    if cfg.method == "ia3":
        auto = peft.utils.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(model.config.model_type)
        targets = auto if cfg.ia3.target_modules == "auto" else cfg.ia3.target_modules
        if targets is None:
            raise ConfigError(f"ia3.target_modules: peft has no default for {model.config.model_type!r} models; "
                              "list the modules to rescale (and ia3.feedforward_modules) by name")
        feedforward = cfg.ia3.feedforward_modules
        if feedforward == "auto":
            feedforward = peft.utils.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model.config.model_type, [])
            feedforward = [f for f in feedforward if f in targets]  # with listed targets, only the ones among them
        if not set(feedforward) <= set(targets):
            raise ConfigError(f"ia3.feedforward_modules: {sorted(set(feedforward) - set(targets))} are not among "
                              f"ia3.target_modules {list(targets)}")
        return peft.IA3Config(task_type=task_type, target_modules=list(targets), feedforward_modules=list(feedforward),
                              modules_to_save=list(heads)), list(targets)
    positions = getattr(model.config, "max_position_embeddings", None)
    virtual = cfg.prompt.num_virtual_tokens
    if positions is not None and cfg.train.max_length + virtual > positions:
        raise ConfigError(f"prompt.num_virtual_tokens: {virtual} virtual tokens before inputs of up to "
                          f"train.max_length {cfg.train.max_length} tokens exceed the {positions} positions of "
                          f"{cfg.model!r}; lower one of them")
    init = peft.PromptTuningInit.TEXT if cfg.prompt.init_text else peft.PromptTuningInit.RANDOM
    return peft.PromptTuningConfig(
        task_type=task_type, num_virtual_tokens=virtual, prompt_tuning_init=init,
        prompt_tuning_init_text=cfg.prompt.init_text, tokenizer_name_or_path=path if cfg.prompt.init_text else None,
        modules_to_save=list(heads),
    ), None


def decays(name: str, param: nn.Parameter) -> bool:
    """Whether weight decay (and the L1 penalty) applies: not to biases and normalisation weights."""
    return not (param.ndim < 2 or "norm" in name.lower())


def l1_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trained weights ``train.l1`` penalises: those weight decay applies to (:func:`decays`)."""
    return [p for n, p in model.named_parameters() if p.requires_grad and decays(n, p)]


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
        key = (in_head(name), not decays(name, param))
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


def merged_model(model: nn.Module, tokenizer):
    """A plain transformers model and its tokenizer: LoRA, DoRA and IA3 weights merged in, or prompt tuning's virtual
    tokens folded into the vocabulary (:func:`fold_prompt`). The peft model itself is left unusable.

    Returns:
        ``(model, tokenizer)``; the tokenizer is the one given unless prompt tuning changed it.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model, tokenizer
    # The trained head copies in place of their wrappers first: peft's IA3 unloading expects every wrapped module to
    # have a weight of its own, which BERT's pooler (a dense layer inside a module) has not.
    _unwrap_modules_to_save(model.get_base_model())
    if model.active_peft_config.is_prompt_learning:
        return fold_prompt(model, tokenizer)
    return model.merge_and_unload(), tokenizer


def _unwrap_modules_to_save(model: nn.Module) -> None:
    from peft.utils import ModulesToSaveWrapper

    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.unload_and_optionally_merge_module(False, False, None))


def fold_prompt(model, tokenizer):
    """A prompt-tuned peft model as a plain transformers model and tokenizer that compute the same outputs.

    peft puts the trained prompt embeddings before each input's token embeddings (attention mask 1, token type 0,
    positions counted from the first of them). Here they become ``num_virtual_tokens`` new special tokens
    (``<prompt_0>`` ...) whose word embeddings are the trained ones, and the tokenizer's post-processor puts them
    before its own special tokens. The artifact then needs no peft, and ONNX export, the gate and every backend run
    it as any other model (its inputs are ``num_virtual_tokens`` tokens longer: the manifest's max_length says so).
    The tokenizer is saved as a plain fast tokenizer, since some tokenizer classes rebuild their post-processor
    on loading.
    """
    import copy

    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    prompt = model.get_prompt_embedding_to_save(model.active_adapter)
    base = model.get_base_model()
    _unwrap_modules_to_save(base)  # the trained head copies in place of their wrappers

    tokenizer = copy.deepcopy(tokenizer)
    virtual = [PROMPT_TOKEN.format(i) for i in range(len(prompt))]
    templates = {pair: _template(tokenizer, virtual, pair) for pair in (False, True)}
    tokenizer.add_tokens(virtual, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(virtual)
    embeddings = base.get_input_embeddings()
    if max(ids) >= embeddings.num_embeddings:
        base.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
        embeddings = base.get_input_embeddings()
    with torch.no_grad():
        embeddings.weight[ids] = prompt.to(embeddings.weight.dtype)
    specials = {part.split(":")[0] for t in templates.values() for part in t.split() if not part.startswith("$")}
    backend = tokenizer.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single=templates[False], pair=templates[True],
        special_tokens=[(t, tokenizer.convert_tokens_to_ids(t)) for t in sorted(specials)])
    folded = PreTrainedTokenizerFast(
        tokenizer_object=backend, model_input_names=list(tokenizer.model_input_names),
        padding_side=tokenizer.padding_side, truncation_side=tokenizer.truncation_side,
        model_max_length=tokenizer.model_max_length,
        **{k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                                              "cls_token", "mask_token") if getattr(tokenizer, k, None) is not None})
    return base, folded


def _template(tokenizer, virtual: list[str], pair: bool) -> str:
    """The tokenizer's own special-token template (as ``TemplateProcessing`` writes it), read off an encoded example,
    with ``virtual`` tokens first (token type 0, as peft gives them)."""
    encoded = tokenizer("a", "b") if pair else tokenizer("a")
    ids = encoded["input_ids"]
    types = encoded.get("token_type_ids") or [0] * len(ids)
    parts, previous = [f"{t}:0" for t in virtual], None
    for i, sequence in enumerate(encoded.sequence_ids()):
        if sequence is None:
            parts.append(f"{tokenizer.convert_ids_to_tokens(ids[i])}:{types[i]}")
        elif sequence != previous:
            parts.append(f"{'$A' if sequence == 0 else '$B'}:{types[i]}")
        previous = sequence
    return " ".join(parts)


def save_tokenizer_and_model(model: PreTrainedModel, tokenizer, directory: Path) -> None:
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
