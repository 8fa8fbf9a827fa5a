"""Quality of the shipped configs on vader:movie: test metrics beside the baselines.

Runs `tuneserve train` on each config (in full, as a user would) and tabulates the test metrics recorded in
each artifact's manifest, with the TF-IDF baseline scored on the same test split. With `--seeds`, each
trained config is also run with those seeds (the seed draws the data split, the new head, dropout and batch
order) and a second table gives the spread, so one seed's luck is not read as a property of the config.

    python benchmarks/train_quality.py [--configs configs/sentiment-lora.yaml ...] [--output-root runs/bench]
    python benchmarks/train_quality.py --reuse configs/sentiment-full.yaml   # retrain the others only
    python benchmarks/train_quality.py --configs configs/sentiment-lora.yaml --seeds 43 44
    python benchmarks/train_quality.py --reuse --seeds 43 44 45 --seeded configs/sentiment-lora.yaml
    python benchmarks/train_quality.py --section train-quality-rerun --title "after the task plug-ins"

A reused config reads its seeded runs where they exist and trains the missing ones.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT = ["configs/sentiment-lora.yaml", "configs/sentiment-full.yaml", "configs/sentiment-regression.yaml"]


def train(config: str, output: Path, *overrides: str) -> dict:
    """Run `tuneserve train` and return the manifest it wrote."""
    print(f"training {config} {' '.join(overrides)} ...", flush=True)
    sets = [arg for item in (f"output_dir={output}", *overrides) for arg in ("--set", item)]
    done = subprocess.run([sys.executable, "-m", "training.cli", "train", config, "--overwrite", *sets],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{config} failed:\n{done.stderr[-3000:]}")
    return read(output)


def read(output: Path) -> dict:
    return json.loads((ROOT / output / "artifact" / "manifest.json").read_text())


def main_metric(manifest: dict) -> str:
    return "r2" if manifest["task"] == "regression" else "accuracy"


def quality_parser(doc: str, default: list[str]) -> argparse.ArgumentParser:
    """The options the quality benchmarks share: which configs, where their runs go, reuse and seeds."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=default)
    parser.add_argument("--output-root", default="runs/bench")
    parser.add_argument("--reuse", nargs="*", metavar="CONFIG",
                        help="tabulate the existing artifacts of these configs (all, when none is named) without training")
    parser.add_argument("--seeds", nargs="*", type=int, default=[],
                        help="further seeds to train each config with (ONNX export off); a reused config shows "
                             "its earlier runs with these seeds where they exist and trains the others")
    return parser


def is_reused(args: argparse.Namespace, config: str) -> bool:
    return args.reuse is not None and (not args.reuse or config in args.reuse)


def config_runs(args: argparse.Namespace, config: str) -> tuple[dict, list[tuple[int, dict]]]:
    """A config's run at its own seed (trained, or read back with --reuse) and its runs at ``args.seeds``."""
    output = Path(args.output_root) / Path(config).stem
    reused = is_reused(args, config)
    manifest = read(output) if reused else train(config, output)
    return manifest, seeded_runs(config, output, manifest, args.seeds, reused)


def seeded_runs(config: str, output: Path, manifest: dict, seeds: list[int], reused: bool) -> list[tuple[int, dict]]:
    """The run at the config's seed, then one per further seed: read back where a reused config has it, else
    trained (export off)."""
    runs = [(manifest["provenance"]["seed"], manifest)]
    for seed in seeds:
        path = Path(f"{output}-seed{seed}")
        done = reused and (ROOT / path / "artifact" / "manifest.json").is_file()
        runs.append((seed, read(path) if done else train(config, path, f"train.seed={seed}", "export.onnx=false")))
    return runs


def main() -> None:
    parser = quality_parser(__doc__, DEFAULT)
    parser.add_argument("--seeded", nargs="*", metavar="CONFIG",
                        help="give --seeds to these configs only (default: every config)")
    parser.add_argument("--section", default="train-quality",
                        help="BENCHMARKS.md section to write (another name keeps the main table as it is)")
    parser.add_argument("--title", help="what this run checks, added to the section's heading")
    args = parser.parse_args()

    from benchmarks._report import write_section

    rows, spread = [], []
    for config in args.configs:
        output = Path(args.output_root) / Path(config).stem
        reused = is_reused(args, config)
        manifest = read(output) if reused else train(config, output)
        test, base, info = manifest["metrics"]["test"], manifest["baselines"], manifest["training"]
        metric = main_metric(manifest)
        if metric == "r2":
            values = (test["r2"], base["tfidf_ridge"]["r2"], base["mean"]["r2"])
            extra = f"RMSE {test['rmse']:.3f}, Spearman {test['spearman']:.3f}"
        else:
            values = (test["accuracy"], base["tfidf_logreg"]["accuracy"], base["majority"]["accuracy"])
            extra = f"F1 macro {test['f1_macro']:.4f}, ROC-AUC {test['roc_auc']:.4f}"
        n = info["examples"]
        rows.append(f"| {config} | {manifest['method']} | {n['train']}/{n['validation']}/{n['test']} | {metric} | {values[0]:.4f} | {values[1]:.4f} | {values[2]:.4f} | "
                    f"{extra} | {info['epochs_run']} ({info['best_step']} of {info['steps']} steps) | "
                    f"{info['train_samples_per_second']:.0f} | {info['seconds']:.0f} s |")
        print(rows[-1], flush=True)
        seeds = args.seeds if args.seeded is None or config in args.seeded else []
        if seeds:
            runs = seeded_runs(config, output, manifest, seeds, reused)
            tests = [m["metrics"]["test"][metric] for _, m in runs]
            vals = [m["metrics"]["validation"][metric] for _, m in runs]
            tfidf = [m["baselines"]["tfidf_ridge" if metric == "r2" else "tfidf_logreg"][metric] for _, m in runs]
            spread.append(f"| {config} | {metric} | {', '.join(str(s) for s, _ in runs)} | "
                          f"{', '.join(f'{v:.4f}' for v in vals)} | {', '.join(f'{v:.4f}' for v in tests)} | "
                          f"{statistics.mean(vals):.4f} | {statistics.mean(tests):.4f} ± {statistics.stdev(tests):.4f} | "
                          f"{', '.join(f'{v:.4f}' for v in tfidf)} | {statistics.mean(tfidf):.4f} |")
            print(spread[-1], flush=True)
    table = "\n".join([
        "| config | method | train/val/test | metric | model (test) | TF-IDF baseline | majority / mean | more | epochs (best step) | train samples/s | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|", *rows])
    if spread:
        table += "\n\nThe same configs over several seeds (each seed its own split, head, dropout and batch order):\n\n" + "\n".join([
            "| config | metric | seeds | validation | test | validation mean | test mean ± sd | TF-IDF test | TF-IDF mean |",
            "|---|---|---|---|---|---|---|---|---|", *spread])
    print("\n" + table)
    write_section(args.section, shlex.join(["python", "benchmarks/train_quality.py", *sys.argv[1:]]),
                  f"## Quality of the shipped configs (vader:movie){', ' + args.title if args.title else ''}\n\n"
                  "Validation and test are carved from vader:movie (10% each, seeded, stratified for classification, which "
                  "drops the 37 sentences rated exactly 0). Baselines are fitted on the same training split and scored on "
                  "the same test split. The test metric is that of the checkpoint with the best validation metric.\n\n"
                  + table + "\n")


if __name__ == "__main__":
    main()
