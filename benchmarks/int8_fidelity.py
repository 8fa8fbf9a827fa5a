"""Does an exported variant agree with PyTorch on data the export gate never saw?

The gate judges each variant on the run's validation split. This benchmark runs the gate's own comparison
(``training.export.encoder.Judge``: decisions against PyTorch's, scores, the primary metric, batch invariance) on
the run's test split, which the gate never measures on, beside what the gate recorded, and pools the two: how
many decisions differ, and the lower end of the 95% Wilson interval of the agreement, i.e. the least agreement
that so many decisions show. Scoring models (classification, pairs, multi-label, regression, tokens, embeddings)
exported by `tuneserve export`:

    python benchmarks/int8_fidelity.py runs/sentiment-lora/artifact runs/ner-lora/artifact
    python benchmarks/int8_fidelity.py runs/sentiment-lora/artifact --search runs/sentiment-lora/artifact
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _default(field: str) -> float:
    from training.config import ExportConfig

    return ExportConfig.model_fields[field].default


GOAL = _default("int8_min_agreement")  # the agreement an int8 variant must keep
MAX_DROP = _default("int8_max_metric_drop")  # and the most of the primary metric it may lose
CONFIDENCE = _default("int8_confidence")  # at which confidence the held-out decisions must show GOAL


def _agreement(report: dict) -> tuple[int, int] | None:
    """(decisions, how many differ) of a parity report, None for a model whose outputs are values."""
    if report.get("decisions") is None:
        return None
    return int(report["decisions"]), int(report["disagreements"])


def _shown(counts: tuple[int, int] | None) -> str:
    from core.metrics import wilson_low

    if counts is None:
        return "—"
    decisions, differing = counts
    return (f"{(decisions - differing) / decisions:.2%}: {differing:,} of {decisions:,} differ "
            f"(≥ {wilson_low(decisions - differing, decisions):.2%})")


def _judged(artifact_dir: Path):
    """The manifest of an artifact this benchmark can judge: a scoring model whose gate measured on validation."""
    from core.manifest import read_manifest

    manifest = read_manifest(artifact_dir)
    if manifest.task.spec.writes:
        raise SystemExit(f"{artifact_dir}: a generation model; its decoders are judged by identical greedy outputs "
                         "(benchmarks/generation_quality.py), not here")
    if manifest.export.held_out != "validation":
        raise SystemExit(f"{artifact_dir}: its gate measured on the {manifest.export.held_out} split (the run had no "
                         "validation split): no split is left that the gate never saw")
    return manifest


def _judge(manifest, loaded, artifact_dir: Path, split: str):
    """The export gate's judge (PyTorch's scores as the reference) on one split of the run's data."""
    from training.export.base import held_out_from_config
    from training.export.encoder import Judge
    from training.inference import predict_logits

    held_out = held_out_from_config(manifest, artifact_dir, split=split)
    texts, pairs = manifest.task.spec.judged_inputs(held_out.texts, held_out.pairs, held_out.targets)
    return Judge(manifest, loaded.encoder, held_out, predict_logits(loaded, texts, pairs, batch_size=64))


def measure(artifact_dir: Path) -> list[dict]:
    """One row per exported variant of ``artifact_dir``: the gate's record beside the test split's comparison."""
    from training.inference import load_artifact

    manifest = _judged(artifact_dir)
    judge = _judge(manifest, load_artifact(artifact_dir), artifact_dir, "test")
    primary = manifest.primary_metric
    rows = []
    for variant in manifest.export.variants:
        if variant.name not in ("onnx", "onnx-int8"):
            continue  # the shared base's variant is judged by benchmarks/model_sets.py's runs
        report = judge.compare(artifact_dir / variant.path)
        gate, unseen = _agreement(variant.parity.model_dump()), _agreement(report)
        both = (gate[0] + unseen[0], gate[1] + unseen[1]) if gate and unseen else None
        rows.append({"artifact": str(artifact_dir), "name": manifest.name, "task": manifest.task.value,
                     "variant": variant.name, "method": variant.method or variant.precision, "gate": gate,
                     "test": unseen, "both": both, "examples": (variant.parity.examples, report["examples"]),
                     "metric": primary, "metric_delta": report["metric_delta"].get(primary),
                     "max_abs_diff": report["max_abs_diff"],
                     "invariant": not report["batch_invariance"]["decision_changes"]})
    return rows


def search(artifact_dir: Path) -> list[dict]:
    """The export's int8 search (``training.export.int8.search_int8``) rerun on ``artifact_dir``'s fp32 graph, each
    variant judged on validation as the gate judges it and measured on test too; which variant each gate would keep:
    the lower end of its 95% Wilson interval (the export's gate), or the measured agreement alone, each against the export's
    default thresholds."""
    import shutil
    import tempfile

    from training.export.encoder import FP32_FILE, gate_failure
    from training.export.int8 import calibrate_activations, search_int8
    from training.inference import load_artifact

    manifest = _judged(artifact_dir)
    if manifest.export.parity["onnx"].decisions is None:
        raise SystemExit(f"{artifact_dir}: its outputs are values, not decisions; the search compares decisions")
    loaded = load_artifact(artifact_dir)
    primary = manifest.primary_metric
    judges = {split: _judge(manifest, loaded, artifact_dir, split) for split in ("validation", "test")}
    _, calibration_texts, calibration_pairs = judges["validation"].held_out.calibration()
    attempts: list[dict] = []

    def judge(candidate: Path) -> tuple[str | None, dict]:
        reports = {split: j.compare(candidate) for split, j in judges.items()}
        validation = reports["validation"]
        counts = {split: _agreement(r) for split, r in reports.items()}
        point = gate_failure(manifest, validation, GOAL, MAX_DROP) is None
        bound = gate_failure(manifest, validation, GOAL, MAX_DROP, CONFIDENCE) is None
        attempts.append({"validation": counts["validation"], "test": counts["test"], "point": point, "bound": bound,
                         "test_delta": reports["test"]["metric_delta"].get(primary)})
        # the search goes on as the export's gate decides: the variants the measured agreement keeps come first
        return (None if bound else f"not shown at {CONFIDENCE:.0%}"), validation

    with tempfile.TemporaryDirectory() as scratch:
        fp32 = Path(scratch) / FP32_FILE
        shutil.copyfile(artifact_dir / "onnx" / FP32_FILE, fp32)

        def calibrate(graph: Path, out: Path):
            return calibrate_activations(graph, out, loaded.encoder, calibration_texts, calibration_pairs,
                                         task=manifest.task)

        report, _ = search_int8(fp32, Path(scratch) / "model.int8.onnx", metric=primary,
                                damage=judges["validation"].damage, judge=judge, calibrate=calibrate)
        for attempt, record in zip(attempts, report["attempts"]):
            attempt["method"] = record["method"]
        # the floor the int8 weights set: each weight matrix on int8 per output channel, activations in fp32
        for rounding, moments in (("to nearest", None), ("by GPTQ", calibrate(fp32, Path(scratch) / "c.onnx").moments)):
            weights_only(fp32, Path(scratch) / "weights.onnx", moments)
            judge(Path(scratch) / "weights.onnx")
            attempts[-1]["method"] = (f"int8 weights alone, rounded {rounding}, activations fp32 (the weights' floor; "
                                      "not a variant the export makes)")
    return attempts


def weights_only(fp32: Path, out: Path, moments: dict | None = None) -> None:
    """``fp32`` with every 2-D weight of a MatMul, Gemm or Attention node put on int8 (symmetric, one scale per
    output channel) and stored as float again: what int8 weights alone cost, whatever the activations. Each weight
    rounded to nearest, or by GPTQ on its input's second moment (``moments``, by activation name) as the export
    does."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from training.export.int8 import gptq_round

    model = onnx.load(str(fp32))
    weights = {t.name: t for t in model.graph.initializer if len(t.dims) == 2}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm", "Attention") and len(node.input) > 1 and node.input[1] in weights:
            w = numpy_helper.to_array(weights[node.input[1]])
            transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
            w = w.T if transposed else w  # as x @ w
            scale = np.abs(w).max(axis=0) / 127
            scale[scale == 0] = 1.0
            if moments is not None and node.input[0] in moments:
                q = gptq_round(w, scale, moments[node.input[0]]) * scale
            else:
                q = np.round(w / scale) * scale
            weights[node.input[1]].CopyFrom(
                numpy_helper.from_array((q.T if transposed else q).astype(np.float32), node.input[1]))
    onnx.save(model, str(out))


def search_table(name: str, attempts: list[dict]) -> str:
    from core.metrics import wilson_allowed

    decisions = attempts[0]["validation"][0]
    allowed = wilson_allowed(decisions, GOAL, CONFIDENCE)
    lets = (f"at most {allowed:,} of its {decisions:,} validation decisions may differ" if allowed is not None
            else f"its {decisions:,} validation decisions cannot show {GOAL:.0%} even with none differing")
    lines = [f"The int8 search on {name}, in the order the export tries its variants (it stops at the first the "
             f"gate keeps: {GOAL:.0%} shown at {CONFIDENCE:.0%} confidence, so {lets}), then the floor that int8 "
             "weights alone set:", "",
             f"| variant | validation (the gate) | test | would pass on the measured agreement (≥ {GOAL:.0%}) | "
             f"passes the gate (≥ {GOAL:.0%} at {CONFIDENCE:.0%}) | primary metric change on test |", "|---" * 6 + "|"]
    for a in attempts:
        delta = f"{a['test_delta']:+.4f}" if a["test_delta"] is not None else "—"
        lines.append(f"| {a['method']} | {_shown(a['validation'])} | {_shown(a['test'])} | "
                     f"{'yes' if a['point'] else 'no'} | {'yes' if a['bound'] else 'no'} | {delta} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    from core.metrics import wilson_low

    lines = ["| model | task | variant | examples (validation / test) | validation: the gate's figure | "
             "test: never seen by the gate | both | ≥ 99% shown (95%) | primary metric change on test | "
             "max score diff on test |", "|---" * 10 + "|"]
    for r in rows:
        shown = "—"
        if r["both"]:
            decisions, differing = r["both"]
            shown = "yes" if wilson_low(decisions - differing, decisions, CONFIDENCE) >= GOAL else "no"
        delta = f"{r['metric_delta']:+.4f} ({r['metric']})" if r["metric_delta"] is not None else "—"
        lines.append(f"| {r['name']} | {r['task']} | {r['variant']} ({r['method']}) | "
                     f"{r['examples'][0]:,} / {r['examples'][1]:,} | {_shown(r['gate'])} | {_shown(r['test'])} | "
                     f"{_shown(r['both'])} | {shown} | {delta} | {r['max_abs_diff']:.2e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--search", nargs="+", type=Path, default=[], metavar="ARTIFACT",
                        help="also rerun these artifacts' int8 search, every variant measured on validation and test")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    from training.export.base import library_noise_to_log

    with library_noise_to_log():
        rows = [row for artifact in args.artifacts for row in measure(artifact)]
        text = table(rows)
        text += "".join("\n\n" + search_table(str(artifact), search(artifact)) for artifact in args.search)
    print(text)
    if not args.no_write:
        from benchmarks._report import write_section

        body = ("Each exported variant against the PyTorch model it was exported from, by the export gate's own "
                "comparison: on the validation split (the gate's record in the manifest), on the test split (which "
                "the gate never measures on), and on both together. Decisions: examples (classification), labels of "
                "each example (multi-label) or sub-tokens (tokens); `≥`: the lower end of the 95% Wilson interval "
                "of the agreement, the least that so many decisions show. A sample shows 99% only from 381 "
                "decisions on, and then with none differing.\n\n" + text)
        write_section("int8-fidelity", "python benchmarks/int8_fidelity.py " + " ".join(map(str, args.artifacts))
                      + (" --search " + " ".join(map(str, args.search)) if args.search else ""), body)


if __name__ == "__main__":
    main()
