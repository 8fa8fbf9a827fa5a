"""Export: ONNX fp32 (graph-optimised), int8 only where it keeps quality, and a parity gate that proves it.

Every variant is run over the held-out split with the shared encoding and compared with PyTorch at the
task level (label agreement, score differences, metric change); the report goes into the manifest under
``export``. An fp32 export that disagrees fails; an int8 variant that loses quality is dropped, and the
manifest says why. Files are written to a temporary directory and swapped into ``artifact/onnx`` only
when the gate has passed, so a failed export leaves the previous one intact.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import TuneserveError
from core.encoding import Encoder
from core.manifest import MANIFEST_FILE, MODEL_DIR, Manifest, read_manifest
from core.onnx_runner import OnnxModel, check_external_data
from training.files import swap_into_place

logger = logging.getLogger(__name__)

ONNX_DIR = "onnx"
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
OPSET = 17
FP32_MIN_AGREEMENT = 0.999
# HF model types whose graphs onnxruntime.transformers' BERT optimizer knows how to fuse.
BERT_LIKE = {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "mpnet"}
SELFTEST_EXAMPLES = 8
# Ops that dynamic quantization can turn into integer kernels.
INT8_OPS = ("MatMul", "Gemm", "Attention", "EmbedLayerNormalization")
# Held-out examples, those closest to another decision, on which each node's int8 damage is measured.
SENSITIVITY_PROBE = 256
# Activation smoothing before int8 (see smooth_graph): the strengths measured, how many of them (least damage
# first) go to the gate, and the held-out examples whose activation ranges set the scales.
SMOOTHING_ALPHAS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
SMOOTHING_TRIES = 3
CALIBRATION_EXAMPLES = 512


class ExportError(TuneserveError):
    """The exported model does not match PyTorch closely enough."""


@dataclass
class HeldOut:
    texts: list[str]
    pairs: list[str] | None
    targets: np.ndarray
    name: str


def held_out_from_config(manifest: Manifest) -> HeldOut:
    """Reload the run's validation split (test when validation is empty) exactly as training carved it."""
    from training.config import Config
    from training.data import load_dataset

    cfg = Config.model_validate(manifest.provenance["config"])
    data = load_dataset(cfg.data, cfg.task, cfg.train.seed)
    split = data.validation if len(data.validation) else data.test
    return HeldOut(split.texts, split.pairs, split.targets, split.name)


def selftest_examples(manifest: Manifest, scores: np.ndarray, count: int) -> list[int]:
    """Indices of examples a faithful copy of the model must reproduce: the most clearly decided ones,
    taken in turn from each predicted label so that every label the model gives is exercised."""
    spec = manifest.task.spec
    decisions = spec.decide(manifest, scores)
    by_decision: dict[str, list[int]] = {}
    for i in np.argsort(-spec.margins(manifest, scores), kind="stable"):
        by_decision.setdefault(str(decisions[i]), []).append(int(i))
    queues = list(by_decision.values())
    picked: list[int] = []
    while len(picked) < min(count, len(scores)):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return picked


def _take(scores, rows: np.ndarray):
    """Some examples' scores (an array's rows, or a list's items)."""
    return scores[rows] if isinstance(scores, np.ndarray) else [scores[int(i)] for i in rows]


def _gate(manifest: Manifest, report: dict, min_agreement: float, max_drop: float) -> str | None:
    """Why a variant fails (None when it passes)."""
    primary = manifest.primary_metric
    drop = manifest.task.spec.metric_drop(primary, report)
    if "label_agreement" in report and report["label_agreement"] < min_agreement:
        return f"label agreement {report['label_agreement']:.4f} < {min_agreement}"
    if drop > max_drop:
        return f"{primary} drops by {drop:.4f} (> {max_drop})"
    return None


def _export_fp32(model, encoder: Encoder, manifest: Manifest, path: Path) -> None:
    import torch

    sample = encoder.encode(["an example sentence", "a second, longer example sentence for the export"],
                            ["a pair", "another pair"] if manifest.has_pair else None, padding="longest",
                            return_tensors="pt")
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in sample]
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["logits"] = dict(manifest.task.spec.logits_axes)
    with torch.no_grad():
        torch.onnx.export(model, (), str(path), kwargs={n: sample[n] for n in names}, input_names=names,
                          output_names=["logits"], dynamic_axes=axes, opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)


def _optimize(raw: Path, out: Path, config) -> dict:
    """Fuse attention, LayerNorm and GELU for BERT-like graphs; copy the graph unchanged otherwise."""
    if config.model_type not in BERT_LIKE:
        shutil.copyfile(raw, out)
        return {"optimizer": None, "note": f"no graph optimizer for model type {config.model_type!r}; plain ONNX exported"}
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("bert")
    options.enable_skip_layer_norm = False  # slower on CPU than Add + LayerNormalization (core.onnx_runner)
    optimized = optimizer.optimize_model(str(raw), model_type="bert", num_heads=config.num_attention_heads,
                                         hidden_size=config.hidden_size, opt_level=0, optimization_options=options)
    optimized.save_model_to_file(str(out))
    fusions = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    return {"optimizer": "onnxruntime.transformers (bert)", "fusions": fusions,
            "not_fused": {"SkipLayerNormalization": "ONNX Runtime's CPU kernel for it is slower than Add + "
                                                    "LayerNormalization; CUDA sessions fuse them when they start"}}


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


def export_artifact(artifact_dir: str | os.PathLike, *, int8: str = "auto", held_out: HeldOut | None = None,
                    min_int8_agreement: float = 0.99, max_int8_drop: float = 0.005) -> dict:
    """Export an artifact to ONNX, gate every variant against PyTorch, record the report in the manifest.

    Args:
        artifact_dir: the artifact directory.
        int8: ``auto`` keeps int8 if it passes the gate, ``on`` fails the export if no int8 variant passes,
            ``off`` skips it.
        held_out: examples for the gate; reloaded from the run's config when not given.
        min_int8_agreement: label agreement an int8 variant must reach.
        max_int8_drop: largest drop of the primary metric (absolute; 0.005 = 0.5 points) int8 may cause.

    Returns:
        The ``export`` section written to the manifest.

    Raises:
        ExportError: fp32 disagrees with PyTorch, or ``int8="on"`` and no int8 variant passes.
    """
    import onnx
    import onnx.checker
    from training.inference import load_artifact, predict_logits
    from training.tasks import auto_model_class

    artifact_dir = Path(artifact_dir)
    loaded = load_artifact(artifact_dir)
    manifest, encoder = loaded.manifest, loaded.encoder
    held_out = held_out or held_out_from_config(manifest)
    reference = predict_logits(loaded, held_out.texts, held_out.pairs, batch_size=64)

    tmp = artifact_dir / f".{ONNX_DIR}-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        # Eager attention exports as plain MatMul/Softmax, which the optimizer can fuse into Attention.
        eager = auto_model_class(manifest.task).from_pretrained(artifact_dir / MODEL_DIR, attn_implementation="eager").eval()
        raw = tmp / "model.raw.onnx"
        _export_fp32(eager, encoder, manifest, raw)
        onnx.checker.check_model(str(raw))
        graph = _optimize(raw, tmp / FP32_FILE, eager.config)
        raw.unlink()

        def run(path: Path, rows: np.ndarray | None = None) -> np.ndarray:
            check_external_data(path)
            texts, pairs = held_out.texts, held_out.pairs
            if rows is not None:
                texts = [texts[i] for i in rows]
                pairs = [pairs[i] for i in rows] if pairs else None
            return OnnxModel(path).logits(encoder, texts, pairs, task=manifest.task)

        spec = manifest.task.spec
        scores = spec.scores(reference)

        def compare(candidate: np.ndarray) -> dict:
            return spec.compare(manifest, scores, spec.scores(candidate), held_out.targets)

        parity = {"onnx": compare(run(tmp / FP32_FILE))}
        failure = _gate(manifest, parity["onnx"], FP32_MIN_AGREEMENT, 0.001)
        if failure:
            raise ExportError(f"{artifact_dir}: ONNX fp32 does not match PyTorch on {held_out.name} "
                              f"({len(held_out.targets)} examples): {failure}; nothing was written")

        probe = np.argsort(spec.margins(manifest, scores), kind="stable")[:SENSITIVITY_PROBE]

        def damage(path: Path) -> float:  # mean score change on the examples nearest to another decision
            changed = spec.flat(spec.scores(run(path, probe)))
            return float(np.mean(np.abs(changed - spec.flat(_take(scores, probe)))))

        int8_report: dict = {"requested": int8, "kept": False, "attempts": []}
        if int8 != "off":
            calibration_count = min(CALIBRATION_EXAMPLES, len(held_out.texts))

            @functools.cache
            def calibration() -> dict[str, np.ndarray]:
                pairs = held_out.pairs[:calibration_count] if held_out.pairs else None
                return activation_ranges(tmp / FP32_FILE, tmp / "calibration.onnx", encoder,
                                         held_out.texts[:calibration_count], pairs, task=manifest.task)

            @functools.lru_cache(maxsize=1)  # one smoothed graph on disk at a time
            def smoothed(alpha: float) -> Path:
                smooth_graph(tmp / FP32_FILE, tmp / "smoothed.onnx", calibration(), alpha)
                return tmp / "smoothed.onnx"

            def source(alpha: float | None) -> Path:
                """The fp32 graph a variant is quantized from."""
                return tmp / FP32_FILE if alpha is None else smoothed(alpha)

            def quantize(options: dict, out: Path) -> None:
                options = dict(options)
                _quantize(source(options.pop("smooth")), out, **options)

            def smoothing() -> list[float]:
                if not calibration():
                    return []
                probe_file = tmp / "probe.onnx"
                measured = {}
                for alpha in SMOOTHING_ALPHAS:
                    quantize({"per_channel": True, "smooth": alpha}, probe_file)
                    measured[alpha] = damage(probe_file)
                probe_file.unlink()
                int8_report["smoothing"] = {"calibration_examples": calibration_count,
                                            "damage": {f"{a:g}": d for a, d in measured.items()}}
                return sorted(measured, key=measured.__getitem__)

            def rank(alpha: float | None) -> list[str]:
                return rank_by_sensitivity(source(alpha), tmp / "probe.onnx", damage)

            attempts = int8_attempts(smoothing, rank)
            name, options = next(attempts)
            while True:
                candidate = tmp / "candidate.int8.onnx"
                quantize(options, candidate)
                report = compare(run(candidate))
                failure = _gate(manifest, report, min_int8_agreement, max_int8_drop)
                int8_report["attempts"].append({"method": name, "passed": failure is None, "reason": failure,
                                                "label_agreement": report.get("label_agreement"),
                                                "metric_delta": report["metric_delta"].get(manifest.primary_metric)})
                if failure is None:  # each variant that passes is more quantized than the one before
                    os.replace(candidate, tmp / INT8_FILE)
                    parity["onnx-int8"] = report
                    int8_report.update(kept=True, method=name, smoothing_alpha=options["smooth"],
                                       fp32_nodes=options.get("nodes_to_exclude", []))
                else:
                    candidate.unlink()
                try:
                    name, options = attempts.send(failure is None)
                except StopIteration:
                    break
            if not int8_report["kept"]:
                int8_report["reason"] = "no int8 variant kept quality: " + "; ".join(
                    f"{a['method']}: {a['reason']}" for a in int8_report["attempts"])
                if int8 == "on":
                    raise ExportError(f"{artifact_dir}: --int8 on, but {int8_report['reason']}")

        # A few inputs with PyTorch's outputs, for a serving backend to reproduce before it reports ready.
        decisions = spec.decide(manifest, scores)
        selftest = [{"text": held_out.texts[i], "text_pair": held_out.pairs[i] if held_out.pairs else None,
                     "scores": spec.record(scores[i]), "decision": decisions[i]}
                    for i in selftest_examples(manifest, scores, SELFTEST_EXAMPLES)]
        section = {
            "onnx": {"fp32": f"{ONNX_DIR}/{FP32_FILE}", "int8": f"{ONNX_DIR}/{INT8_FILE}" if int8_report["kept"] else None,
                     "opset": OPSET, "held_out": held_out.name, **graph},
            "parity": parity,
            "int8": int8_report,
            "selftest": selftest,
        }
        # Publish: the onnx/ directory first, then the manifest that points at it (both atomic renames).
        swap_into_place(tmp, artifact_dir / ONNX_DIR)
        raw_manifest = json.loads((artifact_dir / MANIFEST_FILE).read_text())
        raw_manifest["export"] = section
        staged = artifact_dir / f".{MANIFEST_FILE}.tmp"
        staged.write_text(json.dumps(raw_manifest, indent=2, allow_nan=False) + "\n")
        os.replace(staged, artifact_dir / MANIFEST_FILE)
        read_manifest(artifact_dir)  # still valid
        return section
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
