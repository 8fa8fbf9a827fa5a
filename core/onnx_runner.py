"""Running an exported ONNX model with ONNX Runtime (no torch): shared by the export gate and serving."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.encoding import encode


class OnnxModel:
    """An ONNX Runtime session over a sequence-classification graph with ``logits`` as its output."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None, providers: Sequence[str] | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
        self.input_names = [i.name for i in self.session.get_inputs()]

    def logits(self, tokenizer, texts: Sequence[str], pairs: Sequence[str] | None = None, *, max_length: int,
               batch_size: int = 64) -> np.ndarray:
        """Raw outputs in input order; batches are formed by length to cut padding."""
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out: np.ndarray | None = None
        for start in range(0, len(texts), batch_size):
            pick = order[start:start + batch_size]
            batch = encode(tokenizer, [texts[i] for i in pick], [pairs[i] for i in pick] if pairs is not None else None,
                           max_length=max_length, padding="longest", return_tensors="np")
            feeds = {name: batch[name].astype(np.int64) for name in self.input_names}
            logits = self.session.run(["logits"], feeds)[0]
            if out is None:
                out = np.zeros((len(texts), logits.shape[1]), dtype=np.float32)
            out[pick] = logits
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)


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
