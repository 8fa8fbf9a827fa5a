"""Model backends behind small protocols: ONNX Runtime (CPU, or CUDA where present) and PyTorch.

A scoring backend turns texts into raw model outputs (logits); everything else (post-processing, labels,
metrics) comes from core/ as recorded in the artifact. A generation backend continues prompts (token ids built
by core/ as in training) into texts. The ONNX backends need no torch; torch is imported only when a torch
backend is chosen. An encoder-decoder generation model (T5, BART: its config.json says ``is_encoder_decoder``) has no
ONNX export and is served by PyTorch, on a CPU too.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from core.encoding import Encoder
from core.errors import ArtifactError, ConfigError
from core.manifest import MODEL_DIR, Manifest
from core.shared_base import STORED_BASE_FILE
from core.tasks.generation import DECODER_ONLY, GeneratedText, Layout, Prompter, layout

logger = logging.getLogger(__name__)
SHARED_BACKEND = "onnx-shared"  # a model over a base graph shared with other models (core/shared_base.py)
served_log = logging.getLogger("bentoml.tuneserve")  # the service's log, where the backend choice is told


class Backend(Protocol):
    name: str  # onnx-int8 | onnx | torch-cuda | torch-cpu

    def logits(self, texts: Sequence[str], pairs: Sequence[str] | None) -> Any:
        """Raw outputs in input order, as the task's spec shapes them (an array (len(texts), num_outputs) for
        sequence tasks, one TokenOutput per text for token classification)."""
        ...


class GenerationBackend(Protocol):
    name: str  # onnx | torch-cuda | torch-cpu
    tokenizer: Any  # the artifact's tokenizer, which builds the prompts (core.tasks.generation.prompt_for)
    max_positions: int | None  # the model's position limit (prompt and new tokens), where its config states one
    per_prompt_seeds: bool  # whether ``seed`` may be one seed per prompt (so that pooled requests keep their draws)
    layout: Layout  # where the ids go: a decoder-only model continues its prompt, an encoder-decoder model answers it

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: Any = None, stop: Sequence[str] = ()) -> list[GeneratedText]:
        """Continue each prompt (token ids); temperature 0 is greedy decoding."""
        ...

    def stream(self, prompt: list[int], *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, stop: Sequence[str] = ()) -> Generator[str, None, GeneratedText]:
        """Continue one prompt, yielding its text in pieces; the return value is the whole generation. Closing the
        generator stops decoding."""
        ...


def cpu_threads() -> int:
    """CPU cores this process may run on (respects affinity masks, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_tokenizer(artifact_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(artifact_dir / MODEL_DIR)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{artifact_dir}: cannot load the tokenizer from {MODEL_DIR}/ "
                            f"({str(exc).splitlines()[0][:300]})") from None


def while_loading(load: Callable[[], Any], build: Callable[[], Any]) -> tuple[Any, Any]:
    """``build()`` on this thread while ``load()`` runs on another; returns both results, or raises the build's
    error (else the load's) once both have ended.

    A backend opens its ONNX Runtime session (``build``: C++ that releases the GIL) while its tokenizer loads
    (``load``: transformers' import and the tokenizer's files), so that the two take the two cores a model starts on:
    the int8 decoder's start went from about 2.9 s to 1.7 s (BENCHMARKS.md, cold start).
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="tuneserve-load") as pool:  # leaving waits for the load
        loading = pool.submit(load)
        built = build()
        return loading.result(), built


_ENCODERS: dict[tuple, tuple[Any, Any]] = {}  # tokenizer files' hash -> (tokenizer, its lock), shared by models
_ENCODERS_LOCK = threading.Lock()
_NOT_TOKENIZER = {"config.json", "generation_config.json"}


def scoring_encoder(artifact_dir: Path, manifest: Manifest, *, file_alone: bool = True) -> Encoder:
    """The artifact's tokenizer with its settings. Models whose tokenizer files are identical (fine-tunes of one
    base) share one tokenizer, about 10 MB each (BENCHMARKS.md, model sets), and the lock its calls take: a fast
    tokenizer must not be called from two threads at once, and each call sets the truncation it needs.

    With ``file_alone`` (the ONNX backends), an artifact whose export found that its ``tokenizer.json`` alone encodes
    as its transformers tokenizer does (``export.tokenizer``) is read by the tokenizers library, without importing
    transformers (core/tokenizer_file.py); else, and for the torch backend, by transformers' ``AutoTokenizer``."""
    import hashlib
    import json

    model_dir = artifact_dir / MODEL_DIR
    record = (manifest.export.tokenizer if manifest.export is not None else None) or {}
    alone = file_alone and bool(record.get("reproduces"))
    digest = hashlib.sha256(f"alone={alone} inputs={record.get('inputs') if alone else None}".encode())
    try:
        digest.update(str(json.loads((model_dir / "config.json").read_text()).get("model_type")).encode())
        for path in sorted(model_dir.iterdir()):
            if path.is_file() and path.name not in _NOT_TOKENIZER and path.suffix not in (".safetensors", ".bin"):
                digest.update(path.name.encode() + b"\0" + path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{artifact_dir}: cannot read {MODEL_DIR}/ ({exc})") from None
    with _ENCODERS_LOCK:
        if digest.hexdigest() not in _ENCODERS:
            tokenizer = (_tokenizer_file(artifact_dir, record["inputs"]) if alone else load_tokenizer(artifact_dir))
            _ENCODERS[digest.hexdigest()] = (tokenizer, threading.RLock())
        tokenizer, lock = _ENCODERS[digest.hexdigest()]
    return Encoder.from_manifest(tokenizer, manifest, lock=lock)


def _tokenizer_file(artifact_dir: Path, inputs: list[str]):
    from core.tokenizer_file import TokenizerFile

    try:
        return TokenizerFile.load(artifact_dir / MODEL_DIR, inputs)
    except Exception as exc:  # the tokenizers library raises its own Exception for a file it cannot parse
        raise ArtifactError(f"{artifact_dir}: cannot load the tokenizer from {MODEL_DIR}/ "
                            f"({str(exc).splitlines()[0][:300]})") from None


class OnnxBackend:
    """ONNX Runtime over the artifact's exported graph (fp32 or the int8 variant the export gate kept)."""

    def __init__(self, artifact_dir: Path, manifest: Manifest, *, int8: bool, threads: int, batch_size: int):
        from core.onnx_runner import OnnxModel, check_external_data

        path = graph_file(artifact_dir, manifest, "onnx-int8" if int8 else "onnx")
        check_external_data(path)

        def build() -> OnnxModel:
            try:
                return OnnxModel(path, threads=threads, providers=_onnx_providers(), spinning=False)
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types for a bad file
                raise ArtifactError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:300]})") from None

        self.encoder, self.model = while_loading(lambda: scoring_encoder(artifact_dir, manifest), build)
        self.task = manifest.task
        self.batch_size = batch_size
        self.name = "onnx-int8" if int8 else "onnx"
        self.provider = self.model.session.get_providers()[0]

    def logits(self, texts: Sequence[str], pairs: Sequence[str] | None) -> np.ndarray:
        return self.model.logits(self.encoder, texts, pairs, task=self.task, batch_size=self.batch_size)


class SharedBases:
    """The shared base graphs this process has open, one per base identity (core/shared_base.py)."""

    def __init__(self, threads: int):
        self.threads = threads
        self.open: dict[str, Any] = {}

    def get(self, identity: str, graph: Path):
        from core.shared_base import SharedBase

        if identity not in self.open:
            from core.onnx_runner import check_external_data

            check_external_data(graph)
            self.open[identity] = SharedBase(graph, identity, threads=self.threads, spinning=False,
                                             providers=_onnx_providers())
        return self.open[identity]


def _onnx_providers() -> list[str]:
    import onnxruntime as ort

    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]


class SharedBaseBackend:
    """A model over a base graph it shares with the other models served: its own adapter and head, the base's
    session (core/shared_base.py). Its rows join the other models' in the base's passes."""

    name = SHARED_BACKEND

    def __init__(self, artifact_dir: Path, manifest: Manifest, bases: SharedBases, *, batch_size: int):
        from core.shared_base import Adapter

        graph, adapter_file = shared_files(artifact_dir, manifest)
        variant = manifest.export.variant(SHARED_BACKEND)
        adapter = Adapter.load(adapter_file)
        if adapter.base != variant.base:
            raise ArtifactError(f"{artifact_dir}: {adapter_file.name} was made for other base weights than the "
                                "manifest records")
        self.shared = bases.get(variant.base, graph)
        self.key = str(artifact_dir.resolve())
        self.shared.add(self.key, adapter)
        self.model = self.shared.model_for(self.key)
        self.encoder = scoring_encoder(artifact_dir, manifest)
        self.task, self.batch_size = manifest.task, batch_size
        self.provider = self.shared.model.session.get_providers()[0]

    def logits(self, texts: Sequence[str], pairs: Sequence[str] | None) -> np.ndarray:
        return self.model.logits(self.encoder, texts, pairs, task=self.task, batch_size=self.batch_size)

    def close(self) -> None:
        """Take this model's adapter out of the shared base (its batches still queued get AdapterRemoved)."""
        self.shared.remove(self.key)


def shared_base_of(manifest: Manifest) -> str | None:
    """The identity of the base weights the artifact's ``onnx-shared`` variant runs over (None: it has none)."""
    variant = manifest.export.variant(SHARED_BACKEND) if manifest.export else None
    return variant.base if variant else None


def shared_files(artifact_dir: Path, manifest: Manifest) -> tuple[Path, Path]:
    """The shared base graph and the adapter file of the ``onnx-shared`` variant, checked to exist.

    Raises:
        ArtifactError: the export kept no such variant (saying why), or a file is missing.
    """
    export = manifest.export
    variant = export.variant(SHARED_BACKEND) if export else None
    if variant is None:
        why = (export.shared_base or {}).get("reason") if export else None
        raise ArtifactError(f"{artifact_dir}: the manifest lists no variant over a shared base"
                            f"{f' ({why})' if why else ' (export it again with this version)'}; "
                            "serve it with TUNESERVE_BACKEND=auto, onnx or onnx-int8")
    graph, adapter = (artifact_dir / f for f in variant.files)
    if not graph.is_file() and (pointer := graph.with_name(STORED_BASE_FILE)).is_file():
        graph = stored_base_graph(pointer.read_text().strip(), artifact_dir) / variant.files[0]
    for path in (graph, adapter):
        if not path.is_file():
            shown = path.relative_to(artifact_dir) if path.is_relative_to(artifact_dir) else path
            raise ArtifactError(f"{artifact_dir}: the manifest lists {shown}, which is missing")
    return graph, adapter


def stored_base_graph(tag: str, artifact_dir: Path) -> Path:
    """The directory of the store entry ``tag`` that holds a model's base graph (registered apart from the model,
    training/publish/register.py).

    Raises:
        ArtifactError: no such entry in the model store (or in the bento).
    """
    import bentoml

    try:
        return Path(bentoml.models.get(tag).path)
    except (bentoml.exceptions.BentoMLException, ValueError) as exc:
        raise ArtifactError(f"{artifact_dir}: its base graph is stored apart, as {tag}, which the model store does "
                            f"not hold ({str(exc).splitlines()[0]}); register the artifact again") from None


def _load_torch_model(artifact_dir: Path, manifest: Manifest, *, device: str, threads: int):
    """The artifact's PyTorch model on ``device``, in eval mode, and whether it runs in half precision.

    On CUDA the weights are loaded in the half precision the model was trained in (half the memory; the self-test
    bounds the difference); on the CPU in fp32, with ``threads`` threads.
    """
    import torch
    import transformers

    model_dir = artifact_dir / MODEL_DIR
    if not (model_dir / "model.safetensors").is_file():
        raise ArtifactError(f"{artifact_dir}: {MODEL_DIR}/model.safetensors is missing")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("TUNESERVE_DEVICE=cuda, but torch sees no CUDA device")
    # For the small encoder every precision is launch-bound at 4-5 ms per batch of 32 on an H100 (BENCHMARKS.md,
    # CUDA sections); half precision halves the memory.
    dtype = torch.float32
    if device == "cuda":
        trained = manifest.training.mixed_precision if manifest.training else "no"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(trained, torch.float32)
    else:
        torch.set_num_threads(threads)
    auto_model = manifest.task.spec.auto_model
    if manifest.task.spec.writes:  # a decoder-only or an encoder-decoder language model: its Auto class
        auto_model = generation_layout(artifact_dir).auto_model
    try:
        model = getattr(transformers, auto_model).from_pretrained(model_dir, use_safetensors=True, dtype=dtype)
        if manifest.task.spec.pools:  # sentence embeddings: the transformer with its own pooling
            from service.sentence_embedder import SentenceEmbedder, pooling_of

            model = SentenceEmbedder(model, pooling_of(model_dir))
    except Exception as exc:  # OSError, ValueError, SafetensorError, ...: a file that is not what it says
        raise ArtifactError(f"{artifact_dir}: cannot load {MODEL_DIR}/ ({str(exc).splitlines()[0][:300]})") from None
    return model.to(device).eval(), dtype != torch.float32


class TorchBackend:
    """transformers on CUDA in the precision the model was trained with, or on the CPU in fp32."""

    def __init__(self, artifact_dir: Path, manifest: Manifest, *, device: str, threads: int, batch_size: int):
        import torch

        self.model, self.half_precision = _load_torch_model(artifact_dir, manifest, device=device, threads=threads)
        self.encoder = scoring_encoder(artifact_dir, manifest, file_alone=False)
        self.spec = manifest.task.spec
        self.batch_size = batch_size
        self.device = device
        self.name = f"torch-{device}"
        self._torch = torch

    def logits(self, texts: Sequence[str], pairs: Sequence[str] | None) -> np.ndarray:
        def forward(batch) -> np.ndarray:
            with self._torch.inference_mode():
                return self.model(**batch.to(self.device)).logits.float().cpu().numpy()

        return self.spec.run(forward, self.encoder, texts, pairs, batch_size=self.batch_size, return_tensors="pt")


def _model_config(artifact_dir: Path) -> dict:
    """The model's config.json, read as JSON (no model code); empty when it is missing or unreadable."""
    import json

    try:
        config = json.loads((artifact_dir / MODEL_DIR / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _max_positions(artifact_dir: Path) -> int | None:
    """``max_position_embeddings`` of the model's config.json, if it states one."""
    value = _model_config(artifact_dir).get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def generation_layout(artifact_dir: Path) -> Layout:
    """Where a generation model's ids go, as its config.json says (``is_encoder_decoder``: T5, BART, ...)."""
    return layout(_model_config(artifact_dir).get("is_encoder_decoder") is True)


def _eos_token_id(tokenizer: Any, artifact_dir: Path) -> int:
    # The token the trainer taught the model to end with (training appends tokenizer.eos_token_id to every target).
    if tokenizer.eos_token_id is None:
        raise ArtifactError(f"{artifact_dir}: the tokenizer in {MODEL_DIR}/ has no end-of-sequence token")
    return int(tokenizer.eos_token_id)


class OnnxGenerationBackend:
    """The exported decoder with its key/value cache, run step by step by :class:`core.decoding.OnnxDecoder`
    (no torch): greedy or seeded sampling, stop strings, streaming; finished rows leave the batch."""

    per_prompt_seeds = True
    layout = DECODER_ONLY  # the export covers decoder-only models

    def __init__(self, artifact_dir: Path, manifest: Manifest, *, threads: int, int8: bool = False):
        import onnxruntime as ort

        from core.decoding import OnnxDecoder
        from core.onnx_runner import check_external_data, open_session

        path = graph_file(artifact_dir, manifest, "onnx-int8" if int8 else "onnx")
        check_external_data(path)
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]

        def build():
            try:
                return open_session(path, threads=threads, providers=providers, spinning=False)
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types for a bad file
                raise ArtifactError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:300]})") from None

        self.tokenizer, session = while_loading(lambda: load_tokenizer(artifact_dir), build)
        self.prompter = Prompter.from_manifest(self.tokenizer, manifest)
        eos = _eos_token_id(self.tokenizer, artifact_dir)
        try:
            self.decoder = OnnxDecoder(session, self.tokenizer, eos)
        except ArtifactError as exc:  # a graph that is no decoder with a cache
            raise ArtifactError(f"{path}: {exc}") from None
        self.max_positions = _max_positions(artifact_dir)
        self.name = "onnx-int8" if int8 else "onnx"
        self.provider = self.decoder.session.get_providers()[0]

    def generate(self, prompts: list[list[int]], **decoding: Any) -> list[GeneratedText]:
        return self.decoder.generate(prompts, **decoding)

    def stream(self, prompt: list[int], **decoding: Any) -> Generator[str, None, GeneratedText]:
        return self.decoder.stream(prompt, **decoding)


class TorchGenerationBackend:
    """transformers' ``generate`` over the artifact's PyTorch weights, as the trainer decodes (batches padded as the
    model reads them, the tokenizer's end-of-sequence token, only the new tokens kept: a decoder-only model's
    continuation, an encoder-decoder model's decoder output): on CUDA in the precision the model was trained in, on
    the CPU in fp32.

    Sampling is seeded through torch's global generator, so one seed covers a whole call (``per_prompt_seeds`` is
    False: sampled requests are not pooled), and :meth:`stream` sends the text in one piece when it is done.
    """

    per_prompt_seeds = False

    def __init__(self, artifact_dir: Path, manifest: Manifest, *, device: str, threads: int):
        import torch

        self.model, self.half_precision = _load_torch_model(artifact_dir, manifest, device=device, threads=threads)
        self.tokenizer = load_tokenizer(artifact_dir)
        self.prompter = Prompter.from_manifest(self.tokenizer, manifest)
        self.eos = _eos_token_id(self.tokenizer, artifact_dir)
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos
        self.max_positions = _max_positions(artifact_dir)
        self.layout = generation_layout(artifact_dir)
        self.device = device
        self.name = f"torch-{device}"
        self._torch = torch
        self._seeded = threading.Lock()  # the global generator: one sampled call at a time

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop: Sequence[str] = ()) -> list[GeneratedText]:
        torch = self._torch
        if not prompts:
            return []
        padded, mask = self.layout.pad_prompts(prompts, self.pad)
        input_ids = torch.tensor(padded, device=self.device)
        mask = torch.tensor(mask, device=self.device)
        options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "num_beams": 1, "do_sample": temperature > 0,
                                   "pad_token_id": self.pad, "eos_token_id": self.eos}
        if temperature > 0:
            options.update(temperature=temperature, top_p=top_p, top_k=top_k)
        stop = [s for s in stop if s]
        if stop:
            options.update(stop_strings=stop, tokenizer=self.tokenizer)
        with self._seeded, torch.inference_mode():
            if temperature > 0 and seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, **options)
        return [self._result(self.layout.new_tokens(row, len(padded[0])), stop) for row in out.tolist()]

    def _result(self, row: list[int], stop: Sequence[str]) -> GeneratedText:
        ended = self.eos in row
        kept = row[:row.index(self.eos)] if ended else row
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        found = [at for at in (text.find(s) for s in stop) if at >= 0]
        if found:  # generate stopped at the token that completed the string; the rest of the row is padding
            while kept and kept[-1] == self.pad:
                kept = kept[:-1]
            return GeneratedText(text[:min(found)], "stop", len(kept))
        return GeneratedText(text, "stop" if ended else "length", len(kept) + ended)

    def stream(self, prompt: list[int], **decoding: Any) -> Generator[str, None, GeneratedText]:
        result = self.generate([prompt], **decoding)[0]
        if result.text:
            yield result.text
        return result


def _torch_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("torch") is not None


# Where a GPU driver shows itself: NVIDIA's, WSL2's GPU paravirtualisation, AMD's ROCm (which torch also calls cuda).
_GPU_DRIVER_FILES = ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/dxg", "/dev/kfd")


def _cuda_available() -> bool:
    """Whether torch sees a CUDA device. On Linux torch is asked only where a GPU driver shows itself: importing it
    to hear "no" took about 0.7 s of a CPU server's start where torch is installed (BENCHMARKS.md, cold start)."""
    if sys.platform.startswith("linux") and not any(os.path.exists(p) for p in _GPU_DRIVER_FILES):
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def graph_file(artifact_dir: Path, manifest: Manifest, name: str) -> Path:
    """The ONNX file the ``onnx`` or ``onnx-int8`` backend loads, checked to exist (nothing is loaded).

    Raises:
        ArtifactError: the manifest lists no such variant (saying why, and what to use instead), or its file is
            missing.
    """
    export = manifest.export
    if export is None or export.variant("onnx") is None:
        if export is not None and export.reason:
            raise ArtifactError(f"{artifact_dir}: the manifest lists no ONNX export ({export.reason}); "
                                "use TUNESERVE_BACKEND=torch (or auto)")
        raise ArtifactError(f"{artifact_dir}: the manifest lists no ONNX export; run `tuneserve export`")
    variant = export.variant(name)
    if variant is None:
        what = "quantised decoder" if manifest.task.spec.writes else "int8 variant"
        why = export.int8.reason if export.int8 is not None and export.int8.reason else "int8 was off"
        raise ArtifactError(f"{artifact_dir}: the manifest lists no {what} (the export gate did not keep it: {why}); "
                            "use TUNESERVE_BACKEND=onnx (or auto)")
    path = artifact_dir / variant.path
    if not path.is_file():
        raise ArtifactError(f"{artifact_dir}: the manifest lists {variant.path}, which is missing")
    return path


def check_backend(artifact_dir: Path, manifest: Manifest, *, backend: str) -> None:
    """What :func:`choose_backend` will need, checked without loading a model or importing torch, so that the
    serving process can refuse to start at once: the graph file of an ONNX backend, torch for the torch backend
    (or for an artifact only PyTorch serves), the weights torch loads.

    Raises:
        ArtifactError: the artifact lacks what the backend needs.
        ConfigError: torch is asked for but not installed.
    """
    if backend in ("onnx", "onnx-int8"):
        graph_file(artifact_dir, manifest, backend)
        return
    if backend == SHARED_BACKEND:
        shared_files(artifact_dir, manifest)
        return
    onnx = manifest.export is not None and manifest.export.variant("onnx") is not None
    if backend == "auto" and onnx:  # what serves it without a GPU: the int8 variant the gate kept, else fp32
        graph_file(artifact_dir, manifest, "onnx-int8" if manifest.export.variant("onnx-int8") else "onnx")
        return
    if not _torch_installed():
        if backend == "torch":
            raise ConfigError("TUNESERVE_BACKEND=torch, but torch is not installed here; use onnx or onnx-int8")
        raise ArtifactError(f"{artifact_dir}: no ONNX export to serve without torch, which is not installed here "
                            f"({manifest.export.reason if manifest.export else 'run `tuneserve export`'})")
    weights = artifact_dir / MODEL_DIR / "model.safetensors"
    if not weights.is_file():
        raise ArtifactError(f"{artifact_dir}: {MODEL_DIR}/model.safetensors is missing (the torch backend loads it)")


def auto_backend(artifact_dir: Path, manifest: Manifest, device: str) -> tuple[str, str, str]:
    """What ``auto`` picks, without loading anything: (backend, device, why). Torch on CUDA when torch and a GPU are
    present; otherwise ONNX int8 if the export gate kept it, else ONNX fp32; torch on the CPU for an artifact that
    was never exported (where torch is installed) or whose export section says PyTorch serves it.

    Raises:
        ArtifactError: only PyTorch serves the artifact, and torch is not installed here.
    """
    torch_only = manifest.export is not None and manifest.export.variant("onnx") is None
    if device != "cpu" and _cuda_available():
        return "torch", "cuda", "torch sees a CUDA device"
    if torch_only:
        if not _torch_installed():
            raise ArtifactError(f"{artifact_dir}: no ONNX export ({manifest.export.reason}); serving it needs "
                                "torch, which is not installed here")
        return "torch", "cpu", f"the artifact has no ONNX export: {manifest.export.reason}"
    if manifest.export is None and _torch_installed():  # never exported: PyTorch is all there is
        return "torch", "cpu", "the artifact was never exported to ONNX"
    backend = "onnx-int8" if manifest.export and manifest.export.variant("onnx-int8") else "onnx"
    return backend, device, ("the quantised variant passed the export gate" if backend == "onnx-int8"
                             else "ONNX Runtime runs the exported fp32 graph without a GPU")


def choose_backend(artifact_dir: Path, manifest: Manifest, *, backend: str, device: str, threads: int | None,
                   batch_size: int, bases: SharedBases | None = None) -> Backend | GenerationBackend:
    """Build the backend the settings ask for: a :class:`GenerationBackend` for a model that writes text
    (its spec ``writes``), a scoring :class:`Backend` otherwise.

    ``auto``: torch on CUDA when torch and a GPU are present, otherwise ONNX int8 if the export gate kept it,
    otherwise ONNX fp32; torch on the CPU for an artifact that was never exported (where torch is installed), or
    whose export section says PyTorch serves it (an encoder-decoder generation model: no ONNX export yet). For a
    decoder-only generation model, ``onnx-int8`` is its quantised decoder (8-bit weights,
    training/export/decoder.py). With ``bases`` (a set of models, some over one base), ``auto`` serves a model
    that has an ``onnx-shared`` variant over the base it shares with others (:class:`SharedBaseBackend`). The
    choice and its reason go to the service's log.

    Raises:
        ArtifactError: the artifact lacks what the chosen backend needs (an artifact only PyTorch serves, where torch
            is not installed).
        ConfigError: torch was asked for but is not installed, or CUDA was asked for but is absent.
    """
    threads = threads or cpu_threads()
    shareable = bases is not None and manifest.export is not None and manifest.export.variant(SHARED_BACKEND)
    if backend == "auto" and shareable and not (device != "cpu" and _cuda_available()):
        served_log.info("backend auto: %s, because the model shares its base with other models served",
                        SHARED_BACKEND)
        backend = SHARED_BACKEND
    if backend == SHARED_BACKEND:
        return SharedBaseBackend(artifact_dir, manifest, bases or SharedBases(threads), batch_size=batch_size)
    if backend == "auto":
        backend, device, why = auto_backend(artifact_dir, manifest, device)
        served_log.info("backend auto: %s%s, because %s", backend, f" on {device}" if backend == "torch" else "", why)
    generation = manifest.task.spec.writes
    if backend == "torch":
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ConfigError("TUNESERVE_BACKEND=torch, but torch is not installed here; use onnx or onnx-int8") from None
        device = device if device != "auto" else ("cuda" if _cuda_available() else "cpu")
        if generation:
            return TorchGenerationBackend(artifact_dir, manifest, device=device, threads=threads)
        return TorchBackend(artifact_dir, manifest, device=device, threads=threads, batch_size=batch_size)
    if generation:
        return OnnxGenerationBackend(artifact_dir, manifest, threads=threads, int8=backend == "onnx-int8")
    return OnnxBackend(artifact_dir, manifest, int8=backend == "onnx-int8", threads=threads, batch_size=batch_size)
