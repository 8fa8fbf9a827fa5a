"""The encoder exporter: ONNX fp32 (graph-optimised), int8 only where it keeps quality, and a parity gate that proves it.

Every variant is run over the held-out split with the shared encoding and compared with PyTorch at the
task level (label agreement, score differences, metric change); the report goes into the manifest under
``export``. An fp32 export that disagrees fails; an int8 variant that loses quality is dropped, and the
manifest says why. Files are written to a temporary directory and swapped into ``artifact/onnx`` only
when the gate has passed, so a failed export leaves the previous one intact.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from core.encoding import Encoder
from core.manifest import MODEL_DIR, Manifest
from core.metrics import take, wilson_allowed, wilson_low, wilson_needed
from core.onnx_runner import OnnxModel, check_external_data
from core.shared_base import SharedModel
from core.tasks.base import BATCH_INVARIANCE_TOLERANCE
from training.export.base import OPSET, ExportError, HeldOut, variant
from training.export.int8 import SENSITIVITY_PROBE, ActivationStats, calibrate_activations, search_int8
from training.export.shared import VARIANT as SHARED_VARIANT
from training.export.shared import export_shared, shared_files
from training.export.tokenizer import tokenizer_file_record

logger = logging.getLogger(__name__)

FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
FP32_MIN_AGREEMENT = 0.999
# HF model types whose graphs onnxruntime.transformers' BERT optimizer knows how to fuse.
BERT_LIKE = {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "mpnet"}
SELFTEST_EXAMPLES = 8
# Batch invariance in the gate: held-out examples in a seeded shuffle cut into batches of mixed lengths (as the
# service pools concurrent requests), and the first ones run alone.
POOLED_BATCH = 32
ALONE_EXAMPLES = 48


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


# A graph file to open, or a model already open (a model over a shared base: core/shared_base.py).
Candidate = Path | SharedModel


def _opened(candidate: Candidate):
    if isinstance(candidate, SharedModel):
        return candidate
    check_external_data(candidate)
    return OnnxModel(candidate)


def gate_failure(manifest: Manifest, report: dict, min_agreement: float, max_drop: float,
                 confidence: float = 0.0) -> str | None:
    """Why a variant fails (None when it passes). ``confidence``: the level at which the report's decisions must
    show ``min_agreement`` (the lower end of the agreement's Wilson interval; 0: the measured agreement)."""
    invariance = report.get("batch_invariance")
    if invariance and (invariance["decision_changes"] or invariance["max_abs_diff"] > BATCH_INVARIANCE_TOLERANCE):
        return (f"outputs depend on the batch: {invariance['decision_changes']} decision(s) change and scores move by "
                f"up to {invariance['max_abs_diff']:.2e} (> {BATCH_INVARIANCE_TOLERANCE:g}) between "
                f"{' / '.join(invariance['arrangements'])}")
    primary = manifest.primary_metric
    drop = manifest.task.spec.metric_drop(primary, report)
    if "label_agreement" in report:
        failure = agreement_failure(report, min_agreement, confidence)
        if failure:
            return failure
    if "cosine_min" in report and report["cosine_min"] < min_agreement:  # embeddings: each vector's direction
        return f"cosine to PyTorch's vectors down to {report['cosine_min']:.4f} (< {min_agreement})"
    if drop > max_drop:
        if primary not in (report.get("metric_delta_cross_fitted") or {}):
            return f"{primary} drops by {drop:.4f} (> {max_drop})"
        as_fitted = manifest.task.spec.metric_drop(primary, {"metric_delta": report["metric_delta"]})
        return (f"{primary} drops by {drop:.4f} (> {max_drop}) with the thresholds fitted on the other half of the "
                f"split, each half in turn (by {as_fitted:.4f} at the thresholds fitted on it)")
    return None


def _agreement_name(report: dict) -> str:
    """What a report's ``label_agreement`` counts: labels, or (regression) values within the report's tolerance."""
    if report.get("agreement_noun") == "value":
        return f"value agreement (within {report['value_tolerance']:.3g})"
    return "label agreement"


def agreement_failure(report: dict, min_agreement: float, confidence: float) -> str | None:
    """Why a report's label agreement does not show ``min_agreement`` at ``confidence`` (None when it does), with
    how many of its decisions may differ."""
    agreement, decisions = report["label_agreement"], report.get("decisions")
    what = _agreement_name(report)
    if not confidence or not decisions:
        return f"{what} {agreement:.4f} < {min_agreement}" if agreement < min_agreement else None
    differing = report["disagreements"]
    if wilson_low(decisions - differing, decisions, confidence) >= min_agreement:
        return None
    allowed = wilson_allowed(decisions, min_agreement, confidence)
    if allowed is None:
        needed = wilson_needed(min_agreement, confidence)
        return (f"{decisions:,} decisions cannot show {min_agreement:.2%} agreement at {confidence:.0%} confidence "
                f"even with none differing ({differing} differ)"
                + (f"; {needed:,} or more can (a larger validation split)" if needed else "")
                + ", or export.int8_confidence: 0 judges the measured agreement")
    return (f"{what} {agreement:.4f} ({differing} of {decisions:,} decisions differ) shows only "
            f"{wilson_low(decisions - differing, decisions, confidence):.4f} at {confidence:.0%} confidence, under "
            f"{min_agreement}: at most {allowed} may differ")


class Judge:
    """A candidate graph run over the held-out examples and held against PyTorch's scores on them."""

    def __init__(self, manifest: Manifest, encoder: Encoder, held_out: HeldOut, reference: np.ndarray):
        self.manifest, self.encoder, self.held_out = manifest, encoder, held_out
        self.spec = manifest.task.spec
        # what the model reads to be judged (sentence embeddings: the positives too)
        self.texts, self.pairs = self.spec.judged_inputs(held_out.texts, held_out.pairs, held_out.targets)
        self.scores = self.spec.scores(reference, manifest.calibration)
        self.pooled = np.random.default_rng(0).permutation(len(held_out.texts))
        self.alone = np.arange(min(ALONE_EXAMPLES, len(held_out.texts)))
        # the examples nearest to another decision: where quantization shows first
        self.probe = np.argsort(self.spec.margins(manifest, self.scores), kind="stable")[:SENSITIVITY_PROBE]

    def run(self, candidate: Candidate, rows: np.ndarray | None = None, **arrangement):
        """The candidate's calibrated scores on the held-out examples (``rows``: some of them)."""
        texts, pairs = self.texts, self.pairs
        if rows is not None:
            texts = [texts[i] for i in rows]
            pairs = [pairs[i] for i in rows] if pairs else None
        logits = _opened(candidate).logits(self.encoder, texts, pairs, task=self.manifest.task, **arrangement)
        return self.spec.scores(logits, self.manifest.calibration)

    def compare(self, path: Candidate) -> dict:
        """The variant against PyTorch, and against itself batched as the service pools requests."""
        spec, manifest = self.spec, self.manifest
        candidate = self.run(path)
        report = spec.compare(manifest, self.scores, candidate, self.held_out.targets)
        if self.held_out.name == "validation":  # the split a model's decision thresholds are fitted on
            refit = spec.cross_fitted_delta(manifest, self.scores, candidate, self.held_out.targets)
            if refit is not None:
                report["metric_delta_cross_fitted"] = refit
        shuffled = self.run(path, self.pooled, batch_size=POOLED_BATCH, by_length=False)
        report["batch_invariance"] = spec.invariance(manifest, candidate, {
            f"shuffled batches of {POOLED_BATCH} (mixed lengths)": take(shuffled, np.argsort(self.pooled)),
            f"the first {len(self.alone)} alone": self.run(path, self.alone, batch_size=1)})
        return report

    def damage(self, path: Path) -> float:
        """Mean score change on the examples nearest to another decision."""
        changed = self.spec.flat(self.run(path, self.probe))
        return float(np.mean(np.abs(changed - self.spec.flat(take(self.scores, self.probe)))))

    def selftest(self, variants: dict[str, Candidate]) -> list[dict]:
        """A few inputs with PyTorch's outputs and each kept variant's own (``variants``: name -> graph), for a
        serving backend to reproduce before it reports ready: a variant is held to its own outputs, tightly."""
        held_out, scores = self.held_out, self.scores
        decisions = self.spec.decide(self.manifest, scores)
        rows = selftest_examples(self.manifest, scores, SELFTEST_EXAMPLES)
        texts = [held_out.texts[i] for i in rows]
        pairs = [held_out.pairs[i] for i in rows] if held_out.pairs else None
        own = {name: self.spec.scores(_opened(candidate).logits(self.encoder, texts, pairs, task=self.manifest.task),
                                      self.manifest.calibration)
               for name, candidate in variants.items()}
        return [{"text": texts[k], "text_pair": pairs[k] if pairs else None, "scores": self.spec.record(scores[i]),
                 "decision": decisions[i], "variants": {name: self.spec.record(got[k]) for name, got in own.items()}}
                for k, i in enumerate(rows)]


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


def export_encoder(artifact_dir: Path, manifest: Manifest, held_out: HeldOut, tmp: Path, *, int8: str = "auto",
                   min_int8_agreement: float = 0.99, max_int8_drop: float = 0.005, int8_confidence: float = 0.95
                   ) -> dict:
    """Export a scoring model's graph into ``tmp``, gate fp32 and search int8; return the ``export`` section.

    Raises:
        ExportError: fp32 disagrees with PyTorch, or ``int8="on"`` and no int8 variant passes.
    """
    from training.inference import load_artifact, predict_logits

    loaded = load_artifact(artifact_dir)
    texts, pairs = manifest.task.spec.judged_inputs(held_out.texts, held_out.pairs, held_out.targets)
    reference = predict_logits(loaded, texts, pairs, batch_size=64)
    graph = _write_fp32(artifact_dir, loaded.encoder, manifest, tmp)
    judge = Judge(manifest, loaded.encoder, held_out, reference)
    parity = {"onnx": judge.compare(tmp / FP32_FILE)}
    logger.info("ONNX fp32: label agreement with PyTorch %s, largest score difference %.2e, batch invariance %.1e",
                parity["onnx"].get("label_agreement", "n/a"), parity["onnx"]["max_abs_diff"],
                parity["onnx"]["batch_invariance"]["max_abs_diff"])
    failure = gate_failure(manifest, parity["onnx"], FP32_MIN_AGREEMENT, 0.001)
    if failure:
        raise ExportError(f"{artifact_dir}: ONNX fp32 does not match PyTorch on {held_out.name} "
                          f"({len(held_out.targets)} examples): {failure}; nothing was written")
    int8_report = {"requested": int8, "kept": False, "attempts": []}
    if int8 != "off":
        decisions = parity["onnx"].get("decisions")
        gate = {"min_agreement": min_int8_agreement, "confidence": int8_confidence, "max_metric_drop": max_int8_drop,
                "decisions": decisions, "allowed_differing": (wilson_allowed(decisions, min_int8_agreement,
                                                                             int8_confidence) if decisions else None)}
        unreachable = agreement_failure({"label_agreement": 1.0, "decisions": decisions, "disagreements": 0},
                                        min_int8_agreement, int8_confidence) if decisions else None
        if unreachable:  # not even a variant that agrees on every decision would pass: nothing to search
            int8_report = {"kept": False, "attempts": [], "reason": f"no int8 variant can pass: {unreachable}"}
            int8_parity = None
        else:
            int8_report, int8_parity = _search_int8(judge, tmp, min_int8_agreement, max_int8_drop, int8_confidence)
        int8_report.update(requested=int8, gate=gate)
        if int8_parity is not None:
            parity["onnx-int8"] = int8_parity
        elif int8 == "on":
            raise ExportError(f"{artifact_dir}: --int8 on, but {int8_report['reason']}")
    for leftover in tmp.iterdir():  # intermediates of the search are not part of the artifact
        if leftover.name not in (FP32_FILE, INT8_FILE):
            leftover.unlink()
    variants = [variant("onnx", tmp, FP32_FILE, "fp32", parity["onnx"])]
    if "onnx-int8" in parity:
        variants.append(variant("onnx-int8", tmp, INT8_FILE, "int8", parity["onnx-int8"], int8_report["method"]))
    runnable: dict[str, Candidate] = {v["name"]: tmp / Path(v["files"][0]).name for v in variants}
    shared_parity, why_not_shared, shared = export_shared(
        artifact_dir, manifest, tmp, judge,
        lambda report: gate_failure(manifest, report, min_int8_agreement, max_int8_drop))
    if shared_parity is not None:
        variants.append({"name": SHARED_VARIANT, "runtime": "onnxruntime", "files": shared_files(), "precision": "fp32",
                         "method": f"{manifest.method} over a shared base", "base": shared.base, "gate": "passed",
                         "parity": shared_parity})
        runnable[SHARED_VARIANT] = shared.model_for(manifest.name)
    tokenizer = tokenizer_file_record(artifact_dir, manifest, loaded.encoder, list(texts),
                                      list(pairs) if pairs is not None else None)
    return {"backend": "onnx", "held_out": held_out.name, "graph": {"opset": OPSET, **graph}, "variants": variants,
            "int8": int8_report, "shared_base": {"kept": shared_parity is not None, "reason": why_not_shared},
            "tokenizer": tokenizer, "selftest": judge.selftest(runnable)}


def _write_fp32(artifact_dir: Path, encoder: Encoder, manifest: Manifest, tmp: Path) -> dict:
    """The checked, graph-optimised fp32 file in ``tmp``; returns what the optimizer did."""
    import onnx.checker

    from training.recipe.torch_tasks import load_task_model

    # Eager attention exports as plain MatMul/Softmax, which the optimizer can fuse into Attention. What the task puts
    # around the transformer is part of the graph (sentence embeddings: pooling and normalisation).
    eager = load_task_model(manifest.task, str(artifact_dir / MODEL_DIR), attn_implementation="eager").eval()
    raw = tmp / "model.raw.onnx"
    _export_fp32(eager, encoder, manifest, raw)
    onnx.checker.check_model(str(raw))
    graph = _optimize(raw, tmp / FP32_FILE, eager.config)
    raw.unlink()
    return graph


def _search_int8(judge: Judge, tmp: Path, min_agreement: float, max_drop: float,
                 confidence: float) -> tuple[dict, dict | None]:
    """The most quantized int8 variant that passes the gate (training/export/int8.py), calibrated on training texts:
    its agreement with PyTorch shown at ``confidence`` on the held-out decisions."""
    manifest = judge.manifest
    split, texts, pairs = judge.held_out.calibration()

    def calibrate(fp32: Path, scratch: Path) -> ActivationStats:
        return calibrate_activations(fp32, scratch, judge.encoder, texts, pairs, task=manifest.task)

    def passes(candidate: Path) -> tuple[str | None, dict]:
        report = judge.compare(candidate)
        return gate_failure(manifest, report, min_agreement, max_drop, confidence), report

    report, parity = search_int8(tmp / FP32_FILE, tmp / INT8_FILE, calibrate=calibrate, damage=judge.damage,
                                 judge=passes, metric=manifest.primary_metric)
    report["calibration"] = {"split": split, "examples": len(texts),
                             "activation_scales": "fixed (min/max over real tokens)",
                             "weight_rounding": "GPTQ (on the calibration examples' second moments)"}
    return report, parity
