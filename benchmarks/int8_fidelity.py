"""Does an exported variant agree with PyTorch on data the export gate never saw?

The gate judges each variant on the run's validation split. This benchmark runs the gate's own comparison
(``training.export.encoder.Judge``: decisions against PyTorch's, scores, the primary metric, batch invariance) on
the run's test split, which the gate never measures on, beside what the gate recorded, and pools the two: how
many decisions differ, and the lower end of the 95% Wilson interval of the agreement, i.e. the least agreement
that so many decisions show. Scoring models (classification, pairs, multi-label, regression, tokens, embeddings)
exported by `tuneserve export`:

    python benchmarks/int8_fidelity.py runs/sentiment-lora/artifact runs/ner-lora/artifact
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL = 0.99  # the agreement an int8 variant must keep (export.int8_min_agreement's default)


def _agreement(report) -> tuple[int, int] | None:
    """(decisions, how many differ) of a parity report (a dict or the manifest's record), None for values."""
    get = report.get if isinstance(report, dict) else lambda key: getattr(report, key, None)
    if get("decisions") is None:
        return None
    return int(get("decisions")), int(get("disagreements"))


def _shown(counts: tuple[int, int] | None) -> str:
    from core.metrics import wilson_low

    if counts is None:
        return "—"
    decisions, differing = counts
    return (f"{(decisions - differing) / decisions:.2%}: {differing:,} of {decisions:,} differ "
            f"(≥ {wilson_low(decisions - differing, decisions):.2%})")


def measure(artifact_dir: Path) -> list[dict]:
    """One row per exported variant of ``artifact_dir``: the gate's record beside the test split's comparison."""
    from core.manifest import read_manifest
    from training.export.base import held_out_from_config
    from training.export.encoder import Judge
    from training.inference import load_artifact, predict_logits

    manifest = read_manifest(artifact_dir)
    if manifest.task.spec.writes:
        raise SystemExit(f"{artifact_dir}: a generation model; its decoders are judged by identical greedy outputs "
                         "(benchmarks/generation_quality.py), not here")
    loaded = load_artifact(artifact_dir)
    test = held_out_from_config(manifest, artifact_dir, split="test")
    texts, pairs = manifest.task.spec.judged_inputs(test.texts, test.pairs, test.targets)
    judge = Judge(manifest, loaded.encoder, test, predict_logits(loaded, texts, pairs, batch_size=64))
    primary = manifest.primary_metric
    rows = []
    for variant in manifest.export.variants:
        if variant.name not in ("onnx", "onnx-int8"):
            continue  # the shared base's variant is judged by benchmarks/model_sets.py's runs
        report = judge.compare(artifact_dir / variant.path)
        gate, unseen = _agreement(variant.parity), _agreement(report)
        both = (gate[0] + unseen[0], gate[1] + unseen[1]) if gate and unseen else None
        rows.append({"artifact": str(artifact_dir), "name": manifest.name, "task": manifest.task.value,
                     "variant": variant.name, "method": variant.method or variant.precision, "gate": gate,
                     "test": unseen, "both": both, "examples": (variant.parity.examples, report["examples"]),
                     "metric": primary, "metric_delta": report["metric_delta"].get(primary),
                     "max_abs_diff": report["max_abs_diff"],
                     "invariant": not report["batch_invariance"]["decision_changes"]})
    return rows


def table(rows: list[dict]) -> str:
    from core.metrics import wilson_low

    lines = ["| model | task | variant | examples (validation / test) | validation: the gate's figure | "
             "test: never seen by the gate | both | ≥ 99% shown (95%) | primary metric change on test | "
             "max score diff on test |", "|---" * 10 + "|"]
    for r in rows:
        shown = "—"
        if r["both"]:
            decisions, differing = r["both"]
            shown = "yes" if wilson_low(decisions - differing, decisions) >= GOAL else "no"
        delta = f"{r['metric_delta']:+.4f} ({r['metric']})" if r["metric_delta"] is not None else "—"
        lines.append(f"| {r['name']} | {r['task']} | {r['variant']} ({r['method']}) | "
                     f"{r['examples'][0]:,} / {r['examples'][1]:,} | {_shown(r['gate'])} | {_shown(r['test'])} | "
                     f"{_shown(r['both'])} | {shown} | {delta} | {r['max_abs_diff']:.2e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    from training.export.base import library_noise_to_log

    with library_noise_to_log():
        rows = [row for artifact in args.artifacts for row in measure(artifact)]
    text = table(rows)
    print(text)
    if not args.no_write:
        from benchmarks._report import write_section

        body = ("Each exported variant against the PyTorch model it was exported from, by the export gate's own "
                "comparison: on the validation split (the gate's record in the manifest), on the test split (which "
                "the gate never measures on), and on both together. Decisions: examples (classification), labels of "
                "each example (multi-label) or sub-tokens (tokens); `≥`: the lower end of the 95% Wilson interval "
                "of the agreement, the least that so many decisions show. A sample shows 99% only from 381 "
                "decisions on, and then with none differing.\n\n" + text)
        write_section("int8-fidelity", "python benchmarks/int8_fidelity.py " + " ".join(map(str, args.artifacts)),
                      body)


if __name__ == "__main__":
    main()
