"""Export: ONNX fp32 (graph-optimised), int8 only where it keeps quality, and a parity gate that proves it.

Every variant is run over the held-out split with the shared encoding and compared with PyTorch at the
task level (label agreement, score differences, metric change); the report goes into the manifest under
``export``. An fp32 export that disagrees fails; an int8 variant that loses quality is dropped, and the
manifest says why. Files are written to a temporary directory and swapped into ``artifact/onnx`` only
when the gate has passed, so a failed export leaves the previous one intact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.encoding import Encoder
from core.errors import TuneserveError
from core.manifest import MANIFEST_FILE, MODEL_DIR, SCHEMA_VERSION, ExportRecord, Manifest, read_manifest
from core.onnx_runner import OnnxModel, check_external_data
from core.tasks.base import BATCH_INVARIANCE_TOLERANCE
from training.card import write_card
from training.files import swap_into_place
from training.quantize import CALIBRATION_EXAMPLES, SENSITIVITY_PROBE, activation_ranges, search_int8

logger = logging.getLogger(__name__)

ONNX_DIR = "onnx"
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
OPSET = 17
FP32_MIN_AGREEMENT = 0.999
# HF model types whose graphs onnxruntime.transformers' BERT optimizer knows how to fuse.
BERT_LIKE = {"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "mpnet"}
SELFTEST_EXAMPLES = 8
# Batch invariance in the gate: held-out examples in a seeded shuffle cut into batches of mixed lengths (as the
# service pools concurrent requests), and the first ones run alone.
POOLED_BATCH = 32
ALONE_EXAMPLES = 48


class ExportError(TuneserveError):
    """The exported model does not match PyTorch closely enough."""


@dataclass
class HeldOut:
    """The examples the gate measures on (validation, or test when there is none), and the training texts whose
    activations calibrate int8 (the held-out texts themselves when none are given)."""
    texts: list[str]
    pairs: list[str] | None
    targets: np.ndarray
    name: str
    calibration_texts: list[str] | None = None
    calibration_pairs: list[str] | None = None

    @classmethod
    def from_splits(cls, held_out, train) -> HeldOut:
        """From the run's data splits: ``held_out`` is measured on, an even spread of ``train`` calibrates."""
        rows = np.unique(np.linspace(0, len(train.texts) - 1, min(CALIBRATION_EXAMPLES, len(train.texts))).astype(int))
        return cls(held_out.texts, held_out.pairs, held_out.targets, held_out.name,
                   [train.texts[i] for i in rows], [train.pairs[i] for i in rows] if train.pairs else None)

    def calibration(self) -> tuple[str, list[str], list[str] | None]:
        if self.calibration_texts:
            return "train", self.calibration_texts, self.calibration_pairs
        count = min(CALIBRATION_EXAMPLES, len(self.texts))
        return self.name, self.texts[:count], self.pairs[:count] if self.pairs else None


def held_out_from_config(manifest: Manifest, artifact_dir: Path) -> HeldOut:
    """Reload the run's validation split (test when validation is empty) exactly as training carved it."""
    from training.config import Config
    from training.data import load_dataset

    cfg = Config.model_validate(manifest.provenance.config)
    data = load_dataset(cfg.data, cfg.task, cfg.train.seed)
    recorded = manifest.provenance.data_hashes
    changed = sorted(name for name, digest in data.hashes.items() if name in recorded and recorded[name] != digest)
    if changed:
        sources = {"train": cfg.data.train, "validation": cfg.data.validation or cfg.data.train,
                   "test": cfg.data.test or cfg.data.train}
        raise ExportError(f"{artifact_dir}: the data this model was trained on changed on disk since training ({', '.join(f'{n}: {sources[n]}' for n in changed)}): "
                          "the gate would measure on other examples than the held-out ones. Restore the data, or "
                          "retrain (`tuneserve train` exports after training)")
    return HeldOut.from_splits(data.validation if len(data.validation) else data.test, data.train)


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


@contextlib.contextmanager
def library_noise_to_log() -> Iterator[None]:
    """Keep an export's output to its own progress and results.

    Library warnings raised inside go to this module's log once each: at DEBUG those known not to matter here
    (torch's tracer and ONNX exporter on code paths the traced graph does not take, deprecations, onnxruntime's advice
    to pre-process a graph before quantizing, which its transformer optimizer has already done), at WARNING any other.
    Weight-loading progress bars are off.
    """
    from transformers.utils import logging as hf_logging

    advice: list[str] = []

    class _PreProcessingAdvice(logging.Filter):  # onnxruntime's quantizer logs it on the root logger, every call
        def filter(self, record: logging.LogRecord) -> bool:
            if record.getMessage().startswith("Please consider"):
                advice.append(record.getMessage())
                return False
            return True

    advice_filter = _PreProcessingAdvice()
    logging.getLogger().addFilter(advice_filter)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        logging.getLogger().removeFilter(advice_filter)
        if bars:
            hf_logging.enable_progress_bar()
    if advice:
        logger.debug("onnxruntime's quantizer advised pre-processing %d time(s) (%s); the graph was already optimized",
                     len(advice), advice[0][:80])
    seen: set[tuple[str, str]] = set()
    for warning in caught:
        key = (warning.category.__name__, str(warning.message))
        if key in seen:
            continue
        seen.add(key)
        benign = (warning.category.__name__ == "TracerWarning" or issubclass(warning.category, (DeprecationWarning, FutureWarning))
                  or f"{os.sep}torch{os.sep}onnx{os.sep}" in warning.filename)
        logger.log(logging.DEBUG if benign else logging.WARNING, "%s: %s (%s:%d)", warning.category.__name__,
                   str(warning.message).splitlines()[0], warning.filename, warning.lineno)


def _gate(manifest: Manifest, report: dict, min_agreement: float, max_drop: float) -> str | None:
    """Why a variant fails (None when it passes)."""
    invariance = report.get("batch_invariance")
    if invariance and (invariance["decision_changes"] or invariance["max_abs_diff"] > BATCH_INVARIANCE_TOLERANCE):
        return (f"outputs depend on the batch: {invariance['decision_changes']} decision(s) change and scores move by "
                f"up to {invariance['max_abs_diff']:.2e} (> {BATCH_INVARIANCE_TOLERANCE:g}) between "
                f"{' / '.join(invariance['arrangements'])}")
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
    with library_noise_to_log():
        return _export(Path(artifact_dir), int8, held_out, min_int8_agreement, max_int8_drop)


def _export(artifact_dir: Path, int8: str, held_out: HeldOut | None, min_int8_agreement: float,
            max_int8_drop: float) -> dict:
    import onnx
    import onnx.checker

    from training.inference import load_artifact, predict_logits
    from training.tasks import auto_model_class

    if "generation" in read_manifest(artifact_dir).task.spec.options:
        return _export_generation(artifact_dir, read_manifest(artifact_dir), held_out, int8)
    loaded = load_artifact(artifact_dir)
    manifest, encoder = loaded.manifest, loaded.encoder
    held_out = held_out or held_out_from_config(manifest, artifact_dir)
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

        def run(path: Path, rows: np.ndarray | None = None, **arrangement) -> np.ndarray:
            check_external_data(path)
            texts, pairs = held_out.texts, held_out.pairs
            if rows is not None:
                texts = [texts[i] for i in rows]
                pairs = [pairs[i] for i in rows] if pairs else None
            return OnnxModel(path).logits(encoder, texts, pairs, task=manifest.task, **arrangement)

        spec = manifest.task.spec
        scores = spec.scores(reference, manifest.calibration)
        pooled = np.random.default_rng(0).permutation(len(held_out.texts))
        alone = np.arange(min(ALONE_EXAMPLES, len(held_out.texts)))

        def compare(path: Path) -> dict:
            """The variant against PyTorch, and against itself batched as the service pools requests."""
            candidate = spec.scores(run(path), manifest.calibration)
            report = spec.compare(manifest, scores, candidate, held_out.targets)
            shuffled = spec.scores(run(path, pooled, batch_size=POOLED_BATCH, by_length=False), manifest.calibration)
            report["batch_invariance"] = spec.invariance(manifest, candidate, {
                f"shuffled batches of {POOLED_BATCH} (mixed lengths)": _take(shuffled, np.argsort(pooled)),
                f"the first {len(alone)} alone": spec.scores(run(path, alone, batch_size=1), manifest.calibration)})
            return report

        parity = {"onnx": compare(tmp / FP32_FILE)}
        logger.info("ONNX fp32: label agreement with PyTorch %s, largest score difference %.2e, batch invariance %.1e",
                    parity["onnx"].get("label_agreement", "n/a"), parity["onnx"]["max_abs_diff"],
                    parity["onnx"]["batch_invariance"]["max_abs_diff"])
        failure = _gate(manifest, parity["onnx"], FP32_MIN_AGREEMENT, 0.001)
        if failure:
            raise ExportError(f"{artifact_dir}: ONNX fp32 does not match PyTorch on {held_out.name} "
                              f"({len(held_out.targets)} examples): {failure}; nothing was written")

        probe = np.argsort(spec.margins(manifest, scores), kind="stable")[:SENSITIVITY_PROBE]

        def damage(path: Path) -> float:  # mean score change on the examples nearest to another decision
            changed = spec.flat(spec.scores(run(path, probe), manifest.calibration))
            return float(np.mean(np.abs(changed - spec.flat(_take(scores, probe)))))

        def judge(candidate: Path) -> tuple[str | None, dict]:
            report = compare(candidate)
            return _gate(manifest, report, min_int8_agreement, max_int8_drop), report

        calibration_split, calibration_texts, calibration_pairs = held_out.calibration()

        def calibrate(fp32: Path, scratch: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
            return activation_ranges(fp32, scratch, encoder, calibration_texts, calibration_pairs, task=manifest.task)

        int8_report: dict = {"requested": int8, "kept": False, "attempts": []}
        if int8 != "off":
            int8_report, int8_parity = search_int8(tmp / FP32_FILE, tmp / INT8_FILE, calibrate=calibrate,
                                                   damage=damage, judge=judge, metric=manifest.primary_metric)
            int8_report["requested"] = int8
            int8_report["calibration"] = {"split": calibration_split, "examples": len(calibration_texts),
                                          "activation_scales": "fixed (min/max over real tokens)"}
            if int8_parity is not None:
                parity["onnx-int8"] = int8_parity
            elif int8 == "on":
                raise ExportError(f"{artifact_dir}: --int8 on, but {int8_report['reason']}")
        for leftover in tmp.iterdir():  # intermediates of the search are not part of the artifact
            if leftover.name not in (FP32_FILE, INT8_FILE):
                leftover.unlink()

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
        return _publish(artifact_dir, tmp, section)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(artifact_dir: Path, tmp: Path, section: dict) -> dict:
    """The onnx/ directory first, then the manifest that points at it (both atomic renames), then the card."""
    ExportRecord.model_validate(section)  # the section is what the manifest's schema says
    if section["onnx"] is not None:  # a model served by PyTorch has no onnx/ directory (the section says why)
        swap_into_place(tmp, artifact_dir / ONNX_DIR)
    raw_manifest = json.loads((artifact_dir / MANIFEST_FILE).read_text())
    raw_manifest["export"] = section
    raw_manifest["schema_version"] = SCHEMA_VERSION  # a version-1 artifact is upgraded by its re-export
    staged = artifact_dir / f".{MANIFEST_FILE}.tmp"
    staged.write_text(json.dumps(raw_manifest, indent=2, allow_nan=False) + "\n")
    os.replace(staged, artifact_dir / MANIFEST_FILE)
    write_card(artifact_dir, read_manifest(artifact_dir))  # still valid; the card gains the export's results
    return section


def _export_generation(artifact_dir: Path, manifest: Manifest, held_out: HeldOut | None, quantize: str) -> dict:
    """A generation model: its decoder with a key/value cache, and one with 8-bit weights, gated on greedy outputs
    (export_generation.py)."""
    from training.export_generation import export_generation_artifact

    held_out = held_out or held_out_from_config(manifest, artifact_dir)
    tmp = artifact_dir / f".{ONNX_DIR}-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        section = export_generation_artifact(artifact_dir, held_out.texts, held_out.targets, held_out.name, tmp,
                                             quantize=quantize)
        return _publish(artifact_dir, tmp, section)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
