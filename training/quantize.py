"""int8 for an exported graph: dynamic quantization, activation smoothing, and the search for the most
quantized variant that keeps quality.

The search tries the fastest variants first (whole graph per tensor, then per channel), then smoothed graphs
(SmoothQuant), then keeps the nodes that hurt most in fp32, as few as will pass. Whether a variant passes is the
caller's judgement (the export gate: task-level parity with PyTorch on held-out data).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Generator, Sequence
from pathlib import Path

import numpy as np

from core.encoding import Encoder

# Ops that dynamic quantization can turn into integer kernels.
INT8_OPS = ("MatMul", "Gemm", "Attention", "EmbedLayerNormalization")
# Held-out examples, those closest to another decision, on which each node's int8 damage is measured.
SENSITIVITY_PROBE = 256
# Activation smoothing before int8 (see smooth_graph): the strengths measured, how many of them (least damage
# first) go to the gate, and the held-out examples whose activation ranges set the scales.
SMOOTHING_ALPHAS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
SMOOTHING_TRIES = 3
CALIBRATION_EXAMPLES = 512


def _quantize(fp32: Path, out: Path, **options) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(fp32, out, weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT}, **options)


def quantizable_nodes(fp32: Path) -> list[str]:
    """The nodes dynamic quantization can turn into integer kernels, named as the quantizer names them
    (it rewrites a Gemm as a MatMul called ``<name>_MatMul`` plus an Add before quantizing)."""
    import onnx

    graph = onnx.load(str(fp32), load_external_data=False).graph
    return [f"{n.name}_MatMul" if n.op_type == "Gemm" else n.name for n in graph.node if n.op_type in INT8_OPS]


def smoothable_nodes(graph) -> list[int]:
    """Positions of the MatMul and Attention nodes whose weight (input 1) is a 2-D initializer used by that node
    alone."""
    weights = {t.name: t for t in graph.initializer if len(t.dims) == 2}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    return [i for i, n in enumerate(graph.node) if n.op_type in ("MatMul", "Attention") and len(n.input) > 1
            and n.input[1] in weights and uses[n.input[1]] == 1 and n.input[0] not in weights]


def activation_ranges(fp32: Path, scratch: Path, encoder: Encoder, texts: Sequence[str], pairs: Sequence[str] | None,
                      *, task) -> dict[str, np.ndarray]:
    """Per-channel largest magnitude of the activations entering each smoothable node, over ``texts``."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(fp32))
    names = sorted({model.graph.node[i].input[0] for i in smoothable_nodes(model.graph)})
    if not names:
        return {}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    onnx.save(model, str(scratch))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor addressable
    session = ort.InferenceSession(str(scratch), options, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    ranges: dict[str, np.ndarray] = {}

    def forward(batch) -> np.ndarray:
        logits, *activations = session.run(["logits", *names], {n: np.asarray(batch[n], dtype=np.int64) for n in inputs})
        for name, value in zip(names, activations):
            peak = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            ranges[name] = np.maximum(ranges[name], peak) if name in ranges else peak
        return logits

    task.spec.run(forward, encoder, texts, pairs, batch_size=64, return_tensors="np")
    del session
    scratch.unlink()
    return ranges


def smooth_graph(fp32: Path, out: Path, ranges: dict[str, np.ndarray], alpha: float) -> int:
    """Move activation outliers into the weights before int8 (SmoothQuant, Xiao et al. 2023).

    For each smoothable node, ``x @ W == (x / s) @ (s[:, None] * W)`` with ``s_j = max|x_j|^alpha /
    max|W_j|^(1 - alpha)``: a Mul node divides the input channels by ``s`` and the weight rows are multiplied
    by it. The fp32 function is unchanged, but per-tensor activation scales are no longer set by a few
    outlier channels. Returns the number of nodes smoothed.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(fp32))
    weights = {t.name: t for t in model.graph.initializer}
    targets = set(smoothable_nodes(model.graph))
    nodes, scales = [], []
    for i, node in enumerate(model.graph.node):
        if i in targets and node.input[0] in ranges:
            w = numpy_helper.to_array(weights[node.input[1]])
            act = np.maximum(ranges[node.input[0]], 1e-5)
            s = np.clip(act ** alpha / np.maximum(np.abs(w).max(axis=1), 1e-5) ** (1 - alpha), 1e-3, 1e3)
            weights[node.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32),
                                                                    node.input[1]))
            scales.append(numpy_helper.from_array((1 / s).astype(np.float32), f"{node.name}_smooth_scale"))
            nodes.append(onnx.helper.make_node("Mul", [node.input[0], scales[-1].name], [f"{node.name}_smoothed"],
                                               name=f"{node.name}_smooth"))
            node.input[0] = f"{node.name}_smoothed"
        nodes.append(node)
    model.graph.initializer.extend(scales)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(out))
    return len(scales)


def rank_by_sensitivity(fp32: Path, scratch: Path, error: Callable[[Path], float]) -> list[str]:
    """The graph's quantizable nodes, the most sensitive first.

    Each node is quantized alone (per-channel) and ranked by ``error``, the damage that graph does.
    """
    damage = {}
    for node in quantizable_nodes(fp32):
        _quantize(fp32, scratch, per_channel=True, nodes_to_quantize=[node])
        damage[node] = error(scratch)
    scratch.unlink(missing_ok=True)
    return sorted(damage, key=damage.__getitem__, reverse=True)


def int8_attempts(smoothing: Callable[[], list[float]],
                  rank: Callable[[float | None], list[str]]) -> Generator[tuple[str, dict], bool, None]:
    """Dynamic-quantization variants, the most quantized (fastest) first.

    Send back whether each variant passed the gate. Whole-graph per-tensor, then per-channel; then
    per-channel on smoothed graphs (``smoothing()``: strengths, least damage first; the first
    ``SMOOTHING_TRIES``). If none passes, the nodes that hurt most when quantized alone (``rank(alpha)``, on
    the least-damage smoothed graph) are kept in fp32: 1, 2, 4, ... of them until a variant passes, then a
    bisection towards the fewest fp32 nodes that pass. The last variant that passed is the one to keep.
    ``options["smooth"]`` names the smoothing strength a variant is quantized from (None: unsmoothed).
    """
    if (yield "per-tensor", {"per_channel": False, "smooth": None}):
        return
    if (yield "per-channel", {"per_channel": True, "smooth": None}):
        return
    alphas = smoothing()
    for alpha in alphas[:SMOOTHING_TRIES]:
        if (yield f"per-channel, smoothed (alpha {alpha:g})", {"per_channel": True, "smooth": alpha}):
            return
    alpha = alphas[0] if alphas else None
    ranked = rank(alpha)
    smoothed = f", smoothed (alpha {alpha:g})" if alpha is not None else ""

    def keep_fp32(k: int) -> tuple[str, dict]:
        return (f"per-channel{smoothed}, the {k} most sensitive of {len(ranked)} nodes in fp32",
                {"per_channel": True, "smooth": alpha, "nodes_to_exclude": ranked[:k]})

    failed, k = 0, 1
    while not (yield keep_fp32(k)):
        failed, k = k, 2 * k
        if k >= len(ranked):
            return
    passed = k
    while passed - failed > 1:
        middle = (failed + passed) // 2
        if (yield keep_fp32(middle)):
            passed = middle
        else:
            failed = middle


def search_int8(fp32: Path, out: Path, *, calibrate: Callable[[Path, Path], dict[str, np.ndarray]],
                damage: Callable[[Path], float], judge: Callable[[Path], tuple[str | None, dict]],
                metric: str) -> tuple[dict, dict | None]:
    """Find the most quantized int8 variant of ``fp32`` that ``judge`` passes and write it to ``out``.

    Args:
        fp32: the fp32 graph.
        out: where the kept int8 graph goes (scratch files are written beside it).
        calibrate: ``(fp32, scratch path) -> per-channel activation ranges`` on held-out inputs (for smoothing).
        damage: how much a candidate graph moves the scores of the examples nearest to another decision.
        judge: ``candidate -> (why it fails or None, its parity report)``.
        metric: the primary metric, whose change each attempt records.

    Returns:
        The int8 report (attempts, the kept method or why none was kept) and the kept variant's parity report
        (None when none passed).
    """
    work = out.parent
    report: dict = {"kept": False, "attempts": []}
    kept_parity = None

    @functools.cache
    def calibration() -> dict[str, np.ndarray]:
        return calibrate(fp32, work / "calibration.onnx")

    @functools.lru_cache(maxsize=1)  # one smoothed graph on disk at a time
    def smoothed(alpha: float) -> Path:
        smooth_graph(fp32, work / "smoothed.onnx", calibration(), alpha)
        return work / "smoothed.onnx"

    def source(alpha: float | None) -> Path:
        """The fp32 graph a variant is quantized from."""
        return fp32 if alpha is None else smoothed(alpha)

    def quantize(options: dict, target: Path) -> None:
        options = dict(options)
        _quantize(source(options.pop("smooth")), target, **options)

    def smoothing() -> list[float]:
        if not calibration():
            return []
        probe_file = work / "probe.onnx"
        measured = {}
        for alpha in SMOOTHING_ALPHAS:
            quantize({"per_channel": True, "smooth": alpha}, probe_file)
            measured[alpha] = damage(probe_file)
        probe_file.unlink()
        report["smoothing"] = {"damage": {f"{a:g}": d for a, d in measured.items()}}
        return sorted(measured, key=measured.__getitem__)

    def rank(alpha: float | None) -> list[str]:
        return rank_by_sensitivity(source(alpha), work / "probe.onnx", damage)

    attempts = int8_attempts(smoothing, rank)
    name, options = next(attempts)
    while True:
        candidate = work / "candidate.int8.onnx"
        quantize(options, candidate)
        failure, parity = judge(candidate)
        report["attempts"].append({"method": name, "passed": failure is None, "reason": failure,
                                   "label_agreement": parity.get("label_agreement"),
                                   "metric_delta": parity["metric_delta"].get(metric)})
        if failure is None:  # each variant that passes is more quantized than the one before
            os.replace(candidate, out)
            kept_parity = parity
            report.update(kept=True, method=name, smoothing_alpha=options["smooth"],
                          fp32_nodes=options.get("nodes_to_exclude", []))
        else:
            candidate.unlink()
        try:
            name, options = attempts.send(failure is None)
        except StopIteration:
            break
    if not report["kept"]:
        report["reason"] = "no int8 variant kept quality: " + "; ".join(
            f"{a['method']}: {a['reason']}" for a in report["attempts"])
    return report, kept_parity
