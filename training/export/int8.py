"""int8 for an exported graph: quantization with calibrated activation scales, error-compensating weight rounding,
activation smoothing, and the search for the most quantized variant that keeps quality.

Every variant is built by onnxruntime's dynamic quantizer (its integer kernels: MatMulInteger, QAttention, ...)
and then has its run-time activation scales replaced by scales calibrated on training examples
(:func:`freeze_scales`), so that an input's outputs never depend on the other inputs of its batch, and its int8
weights rounded so that each layer's output on the calibration examples stays closest to fp32's
(:func:`round_weights`, GPTQ) rather than each weight to its own value. The search tries the fastest variants first (whole graph per tensor, then per channel), then smoothed graphs
(SmoothQuant), then keeps the nodes that hurt most in fp32, as few as will pass. Whether a variant passes is the
caller's judgement (the export gate: task-level parity with PyTorch on held-out data).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.encoding import Encoder

logger = logging.getLogger(__name__)

# Ops that dynamic quantization can turn into integer kernels.
INT8_OPS = ("MatMul", "Gemm", "Attention", "EmbedLayerNormalization")
# Held-out examples, those closest to another decision, on which each node's int8 damage is measured.
SENSITIVITY_PROBE = 256
# Activation smoothing before int8 (see smooth_graph): the strengths measured, how many of them (least damage
# first) go to the gate, and the training examples whose activation ranges set smoothing and the int8 scales.
SMOOTHING_ALPHAS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
SMOOTHING_TRIES = 3
CALIBRATION_EXAMPLES = 512
# GPTQ's damping of the inputs' second moment (a fraction of its mean diagonal) and the rows rounded per block.
ROUNDING_DAMPING = 0.01
ROUNDING_BLOCK = 128
# An input's second moment steers the rounding only when measured on this many token rows per channel: from fewer
# GPTQ fits the calibration examples, not the inputs. (A pooled input, one row per example, is never measured: 512
# rows for 384 channels made the jokes model's pooler and classifier lose micro-F1.)
ROUNDING_MIN_ROWS = 8


@dataclass
class ActivationStats:
    """What one pass over the calibration examples measured of the activations int8 quantizes, by tensor name:
    each one's per-channel smallest and largest value over real tokens (``ranges``: smoothing strengths and the
    fixed activation scales) and, for the inputs of weight matrices, its second moment ``E[x xᵀ]`` (``moments``:
    how the weights are rounded, :func:`round_weights`)."""

    ranges: dict[str, tuple[np.ndarray, np.ndarray]]
    moments: dict[str, np.ndarray]

    def __or__(self, other: ActivationStats) -> ActivationStats:
        return ActivationStats({**self.ranges, **other.ranges}, {**self.moments, **other.moments})


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


def calibrated_tensors(graph) -> list[str]:
    """The float activations that dynamic quantization would quantize: the non-constant inputs of MatMul, Gemm
    and Attention nodes (both inputs of a MatMul of two activations)."""
    constants = {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    names: list[str] = []
    for node in graph.node:
        inputs = node.input[:2] if node.op_type == "MatMul" else node.input[:1]
        if node.op_type in ("MatMul", "Gemm", "Attention"):
            names += [n for n in inputs if n and n not in constants and n not in names]
    return names


def weight_inputs(graph) -> set[str]:
    """The activations that meet a weight matrix: the first input of each MatMul, Gemm or Attention node whose
    second is a 2-D initializer."""
    weights = {t.name for t in graph.initializer if len(t.dims) == 2}
    return {n.input[0] for n in graph.node
            if n.op_type in ("MatMul", "Gemm", "Attention") and len(n.input) > 1 and n.input[1] in weights
            and n.input[0] not in weights}


def calibrate_activations(fp32: Path, scratch: Path, encoder: Encoder, texts: Sequence[str],
                          pairs: Sequence[str] | None, *, task) -> ActivationStats:
    """Run ``fp32`` over ``texts`` and measure, over their real (not padding) tokens, each activation int8
    quantizes: its per-channel range, and the second moment of the token rows that meet a weight matrix."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(fp32))
    names = calibrated_tensors(model.graph)
    if not names:
        return ActivationStats({}, {})
    with_weight = weight_inputs(model.graph)
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    onnx.save(model, str(scratch))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor addressable
    session = ort.InferenceSession(str(scratch), options, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    ranges: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    sums: dict[str, np.ndarray] = {}
    rows_seen: dict[str, int] = {}

    def forward(batch) -> np.ndarray:
        logits, *activations = session.run(["logits", *names], {n: np.asarray(batch[n], dtype=np.int64) for n in inputs})
        real = np.asarray(batch["attention_mask"]).astype(bool)
        for name, value in zip(names, activations):
            if value.ndim == 3 and value.shape[:2] == real.shape:  # (batch, sequence, channels): real tokens only
                rows = value[real]
                low, high = rows.min(axis=0), rows.max(axis=0)
                if name in with_weight:
                    sums[name] = sums.get(name, 0) + rows.T.astype(np.float64) @ rows
                    rows_seen[name] = rows_seen.get(name, 0) + len(rows)
            else:  # attention heads' products in unfused graphs, pooled inputs: one range, padding included
                low, high = value.min(keepdims=True).ravel(), value.max(keepdims=True).ravel()
            if name in ranges:
                low, high = np.minimum(ranges[name][0], low), np.maximum(ranges[name][1], high)
            ranges[name] = (low, high)
        return logits

    task.spec.run(forward, encoder, texts, pairs, batch_size=64, return_tensors="np")
    session = None  # close the graph's file before removing it (forward's cell holds it otherwise)
    scratch.unlink()
    return ActivationStats(ranges, {name: total / rows_seen[name] for name, total in sums.items()
                                    if rows_seen[name] >= ROUNDING_MIN_ROWS * len(total)})


def freeze_scales(int8: Path, ranges: dict[str, tuple[np.ndarray, np.ndarray]]) -> int:
    """Make a dynamically quantized graph batch-invariant: each DynamicQuantizeLinear becomes a QuantizeLinear whose
    scale and zero point come from calibrated ranges (static quantization, the mode SmoothQuant was made for).

    Dynamic quantization computes one scale per tensor at run time, over the whole batch, padding included, so an
    input's outputs depend on the other inputs of its batch. With fixed scales every input's integer arithmetic is
    its own; values outside the calibrated range saturate. The kernels (MatMulInteger, QAttention) stay as they are.
    Rewrites ``int8`` in place and returns the number of scales fixed.

    Raises:
        ValueError: a quantized activation has no calibrated range.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(int8))
    nodes, fixed = [], []
    for node in model.graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
            continue
        if node.input[0] not in ranges:
            raise ValueError(f"{int8}: no calibrated range for {node.input[0]!r}, which int8 quantizes")
        low, high = ranges[node.input[0]]
        # DynamicQuantizeLinear's own arithmetic (uint8, the range widened to include 0), on the calibrated range.
        low, high = min(0.0, float(np.min(low))), max(0.0, float(np.max(high)))
        scale = (high - low) / 255 or 1.0
        zero_point = int(np.clip(np.rint(-low / scale), 0, 255))
        quantized, scale_name, zero_point_name = node.output
        fixed += [numpy_helper.from_array(np.array(scale, dtype=np.float32), scale_name),
                  numpy_helper.from_array(np.array(zero_point, dtype=np.uint8), zero_point_name)]
        nodes.append(onnx.helper.make_node("QuantizeLinear", [node.input[0], scale_name, zero_point_name], [quantized],
                                           name=f"{node.name}_static"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(fixed)
    onnx.save(model, str(int8))
    return len(fixed) // 2


def smooth_graph(fp32: Path, out: Path, calibration: ActivationStats, alpha: float) -> ActivationStats:
    """Move activation outliers into the weights before int8 (SmoothQuant, Xiao et al. 2023).

    For each smoothable node, ``x @ W == (x / s) @ (s[:, None] * W)`` with ``s_j = max|x_j|^alpha /
    max|W_j|^(1 - alpha)``: a Mul node divides the input channels by ``s`` and the weight rows are multiplied
    by it. The fp32 function is unchanged, but per-tensor activation scales are no longer set by a few
    outlier channels. Returns the calibration of the smoothed inputs it creates (ranges divided by ``s``, second
    moments by ``s sᵀ``; every other activation keeps its own).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(fp32))
    weights = {t.name: t for t in model.graph.initializer}
    targets = set(smoothable_nodes(model.graph))
    nodes, scales, created = [], [], ActivationStats({}, {})
    for i, node in enumerate(model.graph.node):
        if i in targets and node.input[0] in calibration.ranges:
            w = numpy_helper.to_array(weights[node.input[1]])
            low, high = calibration.ranges[node.input[0]]
            act = np.maximum(np.maximum(np.abs(low), np.abs(high)), 1e-5)
            s = np.clip(act ** alpha / np.maximum(np.abs(w).max(axis=1), 1e-5) ** (1 - alpha), 1e-3, 1e3)
            weights[node.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32),
                                                                    node.input[1]))
            scales.append(numpy_helper.from_array((1 / s).astype(np.float32), f"{node.name}_smooth_scale"))
            nodes.append(onnx.helper.make_node("Mul", [node.input[0], scales[-1].name], [f"{node.name}_smoothed"],
                                               name=f"{node.name}_smooth"))
            created.ranges[f"{node.name}_smoothed"] = (low / s, high / s)
            if node.input[0] in calibration.moments:
                created.moments[f"{node.name}_smoothed"] = calibration.moments[node.input[0]] / np.outer(s, s)
            node.input[0] = f"{node.name}_smoothed"
        nodes.append(node)
    model.graph.initializer.extend(scales)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(out))
    return created


def gptq_round(weight: np.ndarray, scale: np.ndarray, moment: np.ndarray) -> np.ndarray:
    """The int8 values (symmetric, on the grid ``scale``: one per output channel, or one) that ``weight``, used as
    ``x @ weight``, is stored as: rounded one input row at a time, the largest inputs first, each row's rounding
    error spread over the rows not yet rounded so that ``x @ (q * scale)`` stays closest to ``x @ weight`` for
    inputs of second moment ``moment`` (GPTQ, Frantar et al. 2023). At 8 bits rounding each weight to its nearest
    value already keeps the weights close; what GPTQ removes is the error that adds up in each output over hundreds
    of inputs.
    """
    w = weight.astype(np.float64)
    h = moment.astype(np.float64)
    rows = len(w)
    order = np.argsort(-np.diag(h), kind="stable")
    w, h = w[order], h[np.ix_(order, order)]
    h[np.diag_indices(rows)] += ROUNDING_DAMPING * max(float(np.mean(np.diag(h))), 1e-12)
    try:  # the inverse second moment's Cholesky factor: row i's share of the error each later row takes
        u = np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:  # not positive definite even damped: round to nearest
        return np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
    q = np.empty_like(w)
    for start in range(0, rows, ROUNDING_BLOCK):
        end = min(start + ROUNDING_BLOCK, rows)
        block, errors = w[start:end].copy(), np.empty((end - start, w.shape[1]))
        for i in range(end - start):
            q[start + i] = np.clip(np.rint(block[i] / scale), -127, 127)
            errors[i] = (block[i] - q[start + i] * scale) / u[start + i, start + i]
            block[i + 1:] -= np.outer(u[start + i, start + i + 1:end], errors[i])
        w[end:] -= u[start:end, end:].T @ errors
    return q[np.argsort(order)].astype(np.int8)


def round_weights(int8: Path, source: Path, moments: dict[str, np.ndarray], cache: dict | None = None) -> int:
    """Replace the int8 weights the quantizer rounded to nearest in ``int8`` by :func:`gptq_round`'s, on the same
    scales, for every MatMulInteger and QAttention whose input's second moment was calibrated; ``source`` is the
    fp32 graph ``int8`` was quantized from. The kernels and scales stay as they are, so speed does too. ``cache``
    keeps rounded weights between variants quantized from the same ``source``. Rewrites ``int8`` in place and
    returns the number of weights rounded."""
    import onnx
    from onnx import numpy_helper

    fp32 = onnx.load(str(source)).graph
    float_weights = {t.name: t for t in fp32.initializer}
    transposed = {n.input[1] for n in fp32.node if n.op_type == "Gemm"
                  and any(a.name == "transB" and a.i for a in n.attribute)}  # the quantizer stores B as in × out
    model = onnx.load(str(int8))
    initializers = {t.name: t for t in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    cache = {} if cache is None else cache
    rounded = 0
    for node in model.graph.node:
        if node.op_type not in ("MatMulInteger", "QAttention"):
            continue
        name = node.input[1]
        base = name.removesuffix("_quantized")
        quantizer = producers.get(node.input[0])
        if (base not in float_weights or f"{base}_scale" not in initializers or quantizer is None
                or quantizer.op_type != "QuantizeLinear" or quantizer.input[0] not in moments):
            continue
        scale = numpy_helper.to_array(initializers[f"{base}_scale"])
        if np.any(numpy_helper.to_array(initializers[f"{base}_zero_point"]) != 0):
            continue  # asymmetric weights: left as the quantizer rounded them
        weight = numpy_helper.to_array(float_weights[base])
        weight = weight.T if base in transposed else weight
        if weight.shape != tuple(initializers[name].dims):
            continue
        key = (base, scale.tobytes())
        if key not in cache:
            cache[key] = gptq_round(weight, scale, moments[quantizer.input[0]])
        initializers[name].CopyFrom(numpy_helper.from_array(cache[key], name))
        rounded += 1
    onnx.save(model, str(int8))
    return rounded


def rank_by_sensitivity(nodes: Sequence[str], quantize: Callable[[dict, Path], None], scratch: Path,
                        error: Callable[[Path], float]) -> list[str]:
    """``nodes``, the most sensitive first: each is quantized alone (per-channel) and ranked by ``error``, the
    damage that graph does."""
    damage = {}
    for node in nodes:
        quantize({"per_channel": True, "nodes_to_quantize": [node]}, scratch)
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


def search_int8(fp32: Path, out: Path, *, calibrate: Callable[[Path, Path], ActivationStats],
                damage: Callable[[Path], float], judge: Callable[[Path], tuple[str | None, dict]],
                metric: str) -> tuple[dict, dict | None]:
    """Find the most quantized int8 variant of ``fp32`` that ``judge`` passes and write it to ``out``.

    Args:
        fp32: the fp32 graph.
        out: where the kept int8 graph goes (scratch files are written beside it).
        calibrate: ``(fp32, scratch path) -> its activations' calibration`` (:func:`calibrate_activations`), which sets
            smoothing strengths, every variant's fixed activation scales and how its weights are rounded.
        damage: how much a candidate graph moves the scores of the examples nearest to another decision.
        judge: ``candidate -> (why it fails or None, its parity report)``.
        metric: the primary metric, whose change each attempt records.

    Returns:
        The int8 report (attempts, the kept method or why none was kept) and the kept variant's parity report
        (None when none passed).
    """
    work = out.parent
    report: dict = {"kept": False, "attempts": []}

    rounded: dict[float | None, dict] = {}  # GPTQ's weights, by smoothing strength (see round_weights)

    @functools.cache
    def calibration() -> ActivationStats:
        return calibrate(fp32, work / "calibration.onnx")

    @functools.lru_cache(maxsize=1)  # one smoothed graph on disk at a time
    def smoothed(alpha: float) -> tuple[Path, ActivationStats]:
        return work / "smoothed.onnx", calibration() | smooth_graph(fp32, work / "smoothed.onnx", calibration(), alpha)

    def source(alpha: float | None) -> tuple[Path, ActivationStats]:
        """The fp32 graph a variant is quantized from, and its activations' calibration."""
        return (fp32, calibration()) if alpha is None else smoothed(alpha)

    def quantize(options: dict, target: Path) -> None:
        options = dict(options)
        alpha = options.pop("smooth", None)
        graph, measured = source(alpha)
        _quantize(graph, target, **options)
        freeze_scales(target, measured.ranges)
        round_weights(target, graph, measured.moments, rounded.setdefault(alpha, {}))

    def smoothing() -> list[float]:
        import onnx

        if not smoothable_nodes(onnx.load(str(fp32), load_external_data=False).graph):
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
        return rank_by_sensitivity(quantizable_nodes(source(alpha)[0]),
                                   lambda options, target: quantize({**options, "smooth": alpha}, target),
                                   work / "probe.onnx", damage)

    kept_parity = _try_in_turn(int8_attempts(smoothing, rank), quantize, judge, work, out, metric, report)
    if not report["kept"]:
        report["reason"] = "no int8 variant kept quality: " + "; ".join(
            f"{a['method']}: {a['reason']}" for a in report["attempts"])
    return report, kept_parity


def _try_in_turn(attempts: Generator, quantize: Callable[[dict, Path], None],
                 judge: Callable[[Path], tuple[str | None, dict]], work: Path, out: Path, metric: str,
                 report: dict) -> dict | None:
    """Quantize and judge each variant :func:`int8_attempts` offers, telling it whether the last one passed; the
    last variant that passes is moved to ``out``. Records every attempt in ``report``; returns the kept variant's
    parity report (None when none passed)."""
    kept_parity = None
    name, options = next(attempts)
    while True:
        candidate = work / "candidate.int8.onnx"
        quantize(options, candidate)
        failure, parity = judge(candidate)
        report["attempts"].append({"method": name, "passed": failure is None, "reason": failure,
                                   "label_agreement": parity.get("label_agreement"),
                                   "metric_delta": parity["metric_delta"].get(metric)})
        logger.info("int8 %s: %s", name, "passes the gate" if failure is None else f"fails ({failure})")
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
    return kept_parity
