"""Model backends behind one small protocol: ONNX Runtime (CPU, or CUDA where present) and PyTorch.

A backend turns texts into raw model outputs (logits); everything else (post-processing, labels, metrics)
comes from core/ as recorded in the artifact. The ONNX backend needs no torch; torch is imported only when
the torch backend is chosen.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from core.encoding import Encoder
from core.errors import ArtifactError, ConfigError
from core.manifest import MODEL_DIR, Manifest

logger = logging.getLogger(__name__)


class Backend(Protocol):
    name: str  # onnx-int8 | onnx | torch-cuda | torch-cpu

    def logits(self, texts: Sequence[str], pairs: Sequence[str] | None) -> Any:
        """Raw outputs in input order, as the task's spec shapes them (an array (len(texts), num_outputs) for
        sequence tasks, one TokenOutput per text for token classification)."""
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


class OnnxBackend:
    """ONNX Runtime over the artifact's exported graph (fp32 or the int8 variant the export gate kept)."""

    def __init__(self, artifact_dir: Path, manifest: Manifest, *, int8: bool, threads: int, batch_size: int):
        import onnxruntime as ort

        from core.onnx_runner import OnnxModel, check_external_data

        relative = (manifest.export.onnx.int8 if int8 else manifest.export.onnx.fp32) if manifest.export else None
        if not relative:
            what = "int8 variant (the export gate dropped it or int8 was off)" if int8 else "ONNX export"
            raise ArtifactError(f"{artifact_dir}: the manifest lists no {what}; run `tuneserve export`")
        path = artifact_dir / relative
        if not path.is_file():
            raise ArtifactError(f"{artifact_dir}: the manifest lists {relative}, which is missing")
        check_external_data(path)
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        try:
            self.model = OnnxModel(path, threads=threads, providers=providers, spinning=False)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types for a bad file
            raise ArtifactError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:300]})") from None
        self.encoder = Encoder.from_manifest(load_tokenizer(artifact_dir), manifest)
        self.task = manifest.task
        self.batch_size = batch_size
        self.name = "onnx-int8" if int8 else "onnx"
        self.provider = self.model.session.get_providers()[0]

    def logits(self, texts: Sequence[str], pairs: Sequence[str] | None) -> np.ndarray:
        return self.model.logits(self.encoder, texts, pairs, task=self.task, batch_size=self.batch_size)


class TorchBackend:
    """transformers on CUDA in the precision the model was trained with, or on the CPU in fp32."""

    def __init__(self, artifact_dir: Path, manifest: Manifest, *, device: str, threads: int, batch_size: int):
        import torch
        import transformers

        model_dir = artifact_dir / MODEL_DIR
        if not (model_dir / "model.safetensors").is_file():
            raise ArtifactError(f"{artifact_dir}: {MODEL_DIR}/model.safetensors is missing")
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("TUNESERVE_DEVICE=cuda, but torch sees no CUDA device")
        # On CUDA the weights are loaded in the half precision the model was trained in (half the memory; the
        # self-test bounds the difference). For this small encoder every precision is launch-bound at 4-5 ms
        # per batch of 32 on an H100 (BENCHMARKS.md, CUDA sections).
        dtype = torch.float32
        if device == "cuda":
            trained = manifest.training.mixed_precision if manifest.training else "no"
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(trained, torch.float32)
        else:
            torch.set_num_threads(threads)
        self.half_precision = dtype != torch.float32
        try:
            model = getattr(transformers, manifest.task.spec.auto_model).from_pretrained(model_dir, use_safetensors=True, dtype=dtype)
        except Exception as exc:  # OSError, ValueError, SafetensorError, ...: a file that is not what it says
            raise ArtifactError(f"{artifact_dir}: cannot load {MODEL_DIR}/ ({str(exc).splitlines()[0][:300]})") from None
        self.model = model.to(device).eval()
        self.encoder = Encoder.from_manifest(load_tokenizer(artifact_dir), manifest)
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


def _torch_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("torch") is not None


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def choose_backend(artifact_dir: Path, manifest: Manifest, *, backend: str, device: str, threads: int | None,
                   batch_size: int) -> Backend:
    """Build the backend the settings ask for.

    ``auto``: torch on CUDA when torch and a GPU are present, otherwise ONNX int8 if the export gate kept it,
    otherwise ONNX fp32; torch on the CPU for an artifact that was never exported (where torch is installed).

    Raises:
        ArtifactError: the artifact lacks what the chosen backend needs.
        ConfigError: torch was asked for but is not installed, or CUDA was asked for but is absent.
    """
    threads = threads or cpu_threads()
    if backend == "auto":
        if device != "cpu" and _cuda_available():
            backend, device = "torch", "cuda"
        elif manifest.export is None and _torch_installed():  # never exported: PyTorch is all there is
            backend, device = "torch", "cpu"
        else:
            backend = "onnx-int8" if manifest.export and manifest.export.onnx.int8 else "onnx"
    if backend == "torch":
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ConfigError("TUNESERVE_BACKEND=torch, but torch is not installed here; use onnx or onnx-int8") from None
        device = device if device != "auto" else ("cuda" if _cuda_available() else "cpu")
        return TorchBackend(artifact_dir, manifest, device=device, threads=threads, batch_size=batch_size)
    return OnnxBackend(artifact_dir, manifest, int8=backend == "onnx-int8", threads=threads, batch_size=batch_size)
