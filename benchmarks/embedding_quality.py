"""Quality of the shipped sentence-embedding config (manpages:debian): retrieval beside BM25 and the base model.

Runs `tuneserve train` on the config as a user would (export included) and tabulates what the artifact's manifest
recorded: each test query (a man page's NAME summary) ranking the test split's DESCRIPTION paragraphs, for the
fine-tuned model, for all-MiniLM-L6-v2 before fine-tuning (zero-shot) and for BM25, and the export gate's figures.
With ``--seeds``, the config is also run at those seeds (export off; each seed its own split of the pages), and the
table reports the spread of the margins over both baselines.

    python benchmarks/embedding_quality.py [--output-root runs/bench]
    python benchmarks/embedding_quality.py --reuse --seeds 43 44   # the existing run, and two more seeds
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT = ["configs/manpages-search.yaml"]
METRIC = "ndcg@10"
SHOWN = ("ndcg@10", "mrr@10", "recall@1", "recall@10", "map")


def _spread(values: list[float]) -> str:
    return f"{statistics.mean(values):+.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:+.3f}"


def main() -> None:
    from benchmarks._report import write_section
    from benchmarks.train_quality import config_runs, quality_parser

    args = quality_parser(__doc__, DEFAULT).parse_args()
    rows, gate, summary = [], [], []
    for config in args.configs:
        manifest, runs = config_runs(args, config)
        for seed, run in runs:
            info, n = run["training"], run["training"]["examples"]
            for name, metrics in (("fine-tuned", run["metrics"]["test"]), *run["baselines"].items()):
                cells = " | ".join(f"{metrics[m]:.3f}" for m in SHOWN)
                rows.append(f"| {config} | {seed} | {n['train']}/{n['validation']}/{n['test']} | {name} | {cells} | "
                            + (f"{info['epochs_run']} ({info['best_step']} of {info['steps']} steps), "
                               f"{info['seconds']:.0f} s |" if name == "fine-tuned" else " |"))
                print(rows[-1], flush=True)
        tuned = [r["metrics"]["test"][METRIC] for _, r in runs]
        over = {b: [t - r["baselines"][b][METRIC] for t, (_, r) in zip(tuned, runs)] for b in ("base_model", "bm25")}
        summary.append(f"| {config} | {len(runs)} | {statistics.mean(tuned):.3f} | "
                       f"{_spread(over['base_model'])} (min {min(over['base_model']):+.3f}) | "
                       f"{_spread(over['bm25'])} (min {min(over['bm25']):+.3f}) |")
        export = manifest.get("export") or {}
        for variant in export.get("variants", []):
            report = variant["parity"]
            gate.append(f"| {config} | {variant['name']} | {report['examples']} | {report['cosine_min']:.5f} | "
                        f"{report['metrics_torch'][METRIC]:.4f} | {report['metrics_onnx'][METRIC]:.4f} | "
                        f"{report['metric_delta'][METRIC]:+.4f} | {report['batch_invariance']['max_abs_diff']:.1e} |")
        if export.get("int8") and not export["int8"]["kept"]:
            gate.append(f"| {config} | onnx-int8 | dropped: {(export['int8'].get('reason') or '')[:200]} | | | | | |")
    table = "\n".join([
        "| config | seed | train/val/test pages | ranker | " + " | ".join(SHOWN) + " | epochs (best step), wall |",
        "|---" * (5 + len(SHOWN)) + "|", *rows])
    table += f"\n\nOver the seeds ({METRIC}, mean ± sd):\n\n" + "\n".join([
        "| config | runs | fine-tuned | over the base model | over BM25 |", "|---|---|---|---|---|", *summary])
    if gate:
        table += "\n\nExport gate (each ONNX variant against PyTorch, validation pages):\n\n" + "\n".join([
            (f"| config | variant | queries | lowest cosine | {METRIC}, PyTorch | {METRIC}, ONNX | change | "
             "max diff across batchings |"), "|---|---|---|---|---|---|---|---|", *gate])
    print("\n" + table)
    write_section("embedding-quality", " ".join(["python benchmarks/embedding_quality.py", *sys.argv[1:]]),
                  "## Quality of the sentence-embedding config (manpages:debian)\n\n"
                  "Each Debian man page's NAME summary (the query) and its DESCRIPTION paragraph (the document), split "
                  "70/10/20 by the run's seed. Each test query ranks every test page's paragraph (the corpus is the "
                  "test split's unique paragraphs); the base model is all-MiniLM-L6-v2 before fine-tuning, BM25 is "
                  "rank-bm25's Okapi BM25 on lower-cased words, both on the same queries and corpus.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
