"""Quality of the shipped generation config (manpages:debian): ROUGE-L beside the base model and the baselines.

Runs `tuneserve train` on the config as a user would (export included) and tabulates what the artifact's manifest
recorded: the test metrics of the fine-tuned model (the checkpoint with the best validation loss) beside the base
model's own answers before fine-tuning (same prompt, same decoding), retrieval (the target of the most similar
training input) and copying the input, and the export gate's figures. With ``--seeds``, the config is also run at
those seeds (export off; each seed its own split of the pages, LoRA initialisation, dropout and batch order), and
the spread of the margins over the base model and retrieval is what the table reports.

    python benchmarks/generation_quality.py [--output-root runs/bench]
    python benchmarks/generation_quality.py --reuse --seeds 43 44   # the existing run, and two more seeds
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT = ["configs/summarize-lora.yaml"]
METRIC = "rougeL"


def _spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def main() -> None:
    from benchmarks._report import write_section
    from benchmarks.train_quality import config_runs, quality_parser

    args = quality_parser(__doc__, DEFAULT).parse_args()
    rows, gate, summary = [], [], []
    for config in args.configs:
        manifest, runs = config_runs(args, config)
        for seed, run in runs:
            test, base, info = run["metrics"]["test"], run["baselines"], run["training"]
            n = info["examples"]
            rows.append(f"| {config} | {seed} | {n['train']}/{n['validation']}/{n['test']} | "
                        f"**{test[METRIC]:.1f}** | {base['base_model'][METRIC]:.1f} | {base['retrieval'][METRIC]:.1f} | "
                        f"{base['copy_input'][METRIC]:.1f} | {test['rouge1']:.1f} / {test['rouge2']:.1f} | "
                        f"{test['bleu']:.1f} | {test['chrf']:.1f} | {test['exact_match']:.3f} | "
                        f"{test['loss']:.3f} | {info['epochs_run']} ({info['best_step']} of {info['steps']} steps) | "
                        f"{info['seconds']:.0f} s |")
            print(rows[-1], flush=True)
        over_base = [r["metrics"]["test"][METRIC] - r["baselines"]["base_model"][METRIC] for _, r in runs]
        over_retrieval = [r["metrics"]["test"][METRIC] - r["baselines"]["retrieval"][METRIC] for _, r in runs]
        summary.append(f"| {config} | {len(runs)} | {_spread([r['metrics']['test'][METRIC] for _, r in runs])} | "
                       f"{_spread(over_base)} (min {min(over_base):+.1f}) | "
                       f"{_spread(over_retrieval)} (min {min(over_retrieval):+.1f}) |")
        export = manifest.get("export") or {}
        for variant, report in ((v["name"], v["parity"]) for v in export.get("variants", [])):
            gate.append(f"| {config} | {variant} | {report['examples']} | {report['output_agreement']:.0%} | "
                        f"{report['metrics_torch'][METRIC]:.1f} | {report['metrics_onnx'][METRIC]:.1f} | "
                        f"{report['metric_delta'][METRIC]:+.2f} | {report['batch_invariance']['decision_changes']} |")
        if export.get("int8") and not export["int8"]["kept"]:
            gate.append(f"| {config} | onnx-int8 | dropped: {(export['int8'].get('reason') or '')[:200]} | | | | | |")
    table = "\n".join([
        ("| config | seed | train/val/test pages | fine-tuned ROUGE-L | base model | retrieval | copy input | "
         "ROUGE-1 / 2 | BLEU | chrF | exact match | test loss | epochs (best step) | wall |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", *rows])
    table += "\n\nOver the seeds (mean ± sd, ROUGE-L points):\n\n" + "\n".join([
        "| config | runs | fine-tuned | over the base model | over retrieval |", "|---|---|---|---|---|", *summary])
    if gate:
        table += "\n\nExport gate (greedy outputs of each ONNX decoder against PyTorch's, validation pages):\n\n" + "\n".join([
            ("| config | variant | examples | identical outputs | ROUGE-L, PyTorch | ROUGE-L, ONNX | change | "
             "changed alone vs batched |"), "|---|---|---|---|---|---|---|---|", *gate])
    print("\n" + table)
    write_section("generation-quality", " ".join(["python benchmarks/generation_quality.py", *sys.argv[1:]]),
                  "## Quality of the generation config (manpages:debian)\n\n"
                  "Each Debian man page's DESCRIPTION paragraph (input) and its NAME line's summary (target), split "
                  "80/10/10 by the run's seed. Generation metrics are computed on the first `generation.eval_examples` "
                  "test pages, greedy; the test loss covers every test page. Baselines use the same prompt, pages and "
                  "decoding.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
