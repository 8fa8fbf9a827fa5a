"""Quality of the shipped configs on vader:movie: test metrics beside the baselines.

Runs `tuneserve train` on each config (in full, as a user would) and tabulates the test metrics recorded in
each artifact's manifest, with the TF-IDF baseline scored on the same test split.

    python benchmarks/train_quality.py [--configs configs/sentiment-lora.yaml ...] [--output-root runs/bench]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT = ["configs/sentiment-lora.yaml", "configs/sentiment-full.yaml", "configs/sentiment-regression.yaml"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT)
    parser.add_argument("--output-root", default="runs/bench")
    parser.add_argument("--reuse", action="store_true", help="tabulate existing artifacts without training")
    args = parser.parse_args()

    from benchmarks._report import write_section

    rows = []
    for config in args.configs:
        output = Path(args.output_root) / Path(config).stem
        if not args.reuse:
            print(f"training {config} ...", flush=True)
            done = subprocess.run([sys.executable, "-m", "training.cli", "train", config, "--overwrite",
                                   "--set", f"output_dir={output}"],
                                  cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{config} failed:\n{done.stderr[-3000:]}")
        manifest = json.loads((ROOT / output / "artifact" / "manifest.json").read_text())
        test, base, info = manifest["metrics"]["test"], manifest["baselines"], manifest["training"]
        if manifest["task"] == "regression":
            main_metric, values = "r2", (test["r2"], base["tfidf_ridge"]["r2"], base["mean"]["r2"])
            extra = f"RMSE {test['rmse']:.3f}, Spearman {test['spearman']:.3f}"
        else:
            main_metric, values = "accuracy", (test["accuracy"], base["tfidf_logreg"]["accuracy"], base["majority"]["accuracy"])
            extra = f"F1 macro {test['f1_macro']:.4f}, ROC-AUC {test['roc_auc']:.4f}"
        n = info["examples"]
        rows.append(f"| {config} | {manifest['method']} | {n['train']}/{n['validation']}/{n['test']} | {main_metric} | {values[0]:.4f} | {values[1]:.4f} | {values[2]:.4f} | "
                    f"{extra} | {info['epochs_run']} ({info['best_step']} of {info['steps']} steps) | "
                    f"{info['train_samples_per_second']:.0f} | {info['seconds']:.0f} s |")
        print(rows[-1], flush=True)
    table = "\n".join([
        "| config | method | train/val/test | metric | model (test) | TF-IDF baseline | majority / mean | more | epochs (best step) | train samples/s | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|", *rows])
    print("\n" + table)
    write_section("train-quality", "python benchmarks/train_quality.py",
                  "## Quality of the shipped configs (vader:movie)\n\n"
                  "Validation and test are carved from vader:movie (10% each, seeded, stratified for classification, which "
                  "drops the 37 sentences rated exactly 0). Baselines are fitted on the same training split and scored on "
                  "the same test split. The test metric is that of the checkpoint with the best validation metric.\n\n"
                  + table + "\n")


if __name__ == "__main__":
    main()
