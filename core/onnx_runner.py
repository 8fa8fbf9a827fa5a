"""Running an exported ONNX model with ONNX Runtime (no torch): shared by the export gate and serving."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.encoding import Encoder

# Graph fusions a CPU session must not apply. ONNX Runtime would fuse each residual Add and LayerNormalization into
# SkipLayerNormalization, whose CPU kernel is a scalar loop: about 6x slower than its vectorised LayerNormalization
# on a batch of 800 tokens x 384, and 8% of a whole batch-32 run of MiniLM (BENCHMARKS.md). CUDA's fused kernel is
# the fast one there, so sessions with CUDA keep the fusion.
CPU_DISABLED_FUSIONS = ("SkipLayerNormFusion",)


def open_session(path: str | os.PathLike, *, threads: int | None = None, providers: Sequence[str] | None = None,
                 spinning: bool = True, disabled_optimizers: Sequence[str] = (), save_optimized: str | os.PathLike | None = None):
    """An ONNX Runtime session over the graph at ``path``.

    Args:
        threads: intra-op threads (None: ONNX Runtime's default, one per core).
        providers: execution providers (default: the CPU).
        spinning: let idle threads busy-wait between runs (faster for one caller; a server wants False).
        disabled_optimizers: graph fusions the session must not apply.
        save_optimized: write the graph as the session runs it, after its own fusions, to this file.

    ONNX Runtime releases the GIL while it builds the session, so another thread can load a tokenizer meanwhile.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if save_optimized:
        options.optimized_model_filepath = str(save_optimized)
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        # By default idle intra-op threads busy-wait for the next run; in a server that CPU is needed to
        # read and answer requests between runs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]),
                                disabled_optimizers=list(disabled_optimizers))


class OnnxModel:
    """An ONNX Runtime session over a sequence-classification graph with ``logits`` as its output."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, providers: Sequence[str] | None = None,
                 spinning: bool = True, save_optimized: str | os.PathLike | None = None):
        """Open a session (:func:`open_session`)."""
        self.path = Path(path)
        providers = list(providers or ["CPUExecutionProvider"])
        disabled = [] if "CUDAExecutionProvider" in providers else list(CPU_DISABLED_FUSIONS)
        self.session = open_session(path, threads=threads, providers=providers, spinning=spinning,
                                    disabled_optimizers=disabled, save_optimized=save_optimized)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, batch) -> np.ndarray:
        """Logits of one padded batch (token ids as NumPy arrays)."""
        return self.session.run(["logits"], {name: np.asarray(batch[name], dtype=np.int64) for name in self.input_names})[0]

    def logits(self, encoder: Encoder, texts: Sequence[str], pairs: Sequence[str] | None = None, *, task,
               batch_size: int = 64, by_length: bool = True) -> Any:
        """Raw outputs in input order, as the task's spec runs the model (batches formed by length unless
        ``by_length`` is False)."""
        return task.spec.run(self.forward, encoder, texts, pairs, batch_size=batch_size, return_tensors="np",
                             by_length=by_length)


def check_external_data(model_path: str | os.PathLike) -> None:
    """Refuse an ONNX file whose external-data locations leave its directory (absolute, ``..``, symlinks).

    Raises:
        ArtifactError: naming the tensor and the location.
    """
    import onnx

    from core.errors import ArtifactError

    model_path = Path(model_path)
    base = model_path.parent.resolve()
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a corrupt file
        raise ArtifactError(f"{model_path}: not a readable ONNX model ({exc})") from None
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = base / location
        if (not location or Path(location).is_absolute() or ".." in Path(location).parts or target.is_symlink()
                or not target.resolve().is_relative_to(base)):
            raise ArtifactError(f"{model_path}: tensor {tensor.name!r} keeps its data at {location!r}, outside the "
                                "model's directory; refusing to load it")
