"""Does data augmentation help? configs/sentiment-lora.yaml on vader:movie with and without data.augment.

Trains the shipped config (as `tuneserve train` does) at each training-set size, without augmentation and with
EDA's four operations (WordNet synonyms, synonym insertion, swap, deletion) at the same share of words each, over
several seeds (each seed its own split, head, dropout, batch order and augmented copies). Validation and test
are the config's own splits, never augmented; the TF-IDF baseline learns from the original training rows.
Small training sets are a seeded sample of the training split (data.max_train_examples); EDA's paper found
augmentation helps most there, with more copies the smaller the set.

    python benchmarks/augmentation.py                                # full size and 500 examples, seeds 42 43 44
    python benchmarks/augmentation.py --sizes 500 --seeds 42 --copies 500=8
    python benchmarks/augmentation.py --reuse                        # tabulate the runs already on disk
    python benchmarks/augmentation.py --seeds-at full=42 --reuse     # the full size with one seed only
    python benchmarks/augmentation.py --sizes 60 --seeds 42 --set train.epochs=1 --set data.max_eval_examples=64

``--set`` overrides go to every run (a smoke test with them writes its own section, ``augmentation-smoke``).
Cost on 2 CPU cores: a full-size run takes about 6 minutes without augmentation (BENCHMARKS.md, sentiment-lora)
and about twice that with one copy (twice the training rows; augmenting the 8,454 sentences takes about 30 s, and
the first use fetches WordNet once); the defaults, 12 runs, take about 1.5 hours.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = "configs/sentiment-lora.yaml"
OPERATIONS = ("synonym", "insert", "swap", "delete")


def _copies(values: list[str]) -> dict[str, int]:
    out = {}
    for item in values:
        size, _, count = item.partition("=")
        if not count.isdigit():
            raise SystemExit(f"--copies {item!r}: expected SIZE=COUNT (e.g. 500=4, full=1)")
        out[size] = int(count)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["full", "500"],
                        help="training-set sizes: 'full' (the config's whole training split) or a number of examples")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--seeds-at", nargs="*", default=[], metavar="SIZE=SEED,SEED",
                        help="other seeds at one size (e.g. full=42: one full-size pair, the full size being slow)")
    parser.add_argument("--share", type=float, default=0.1, help="each operation's share of a text's words")
    parser.add_argument("--copies", nargs="*", default=["full=1", "500=4"],
                        help="augmented copies per example at each size (SIZE=COUNT; 1 where not named)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--output-root", default="runs/bench-augment")
    parser.add_argument("--reuse", action="store_true", help="read runs already on disk; train only the missing ones")
    args = parser.parse_args()

    from benchmarks._report import write_section
    from benchmarks.train_quality import read, train

    copies = _copies(args.copies)
    seeds_at = {}
    for item in args.seeds_at:
        size, _, seeds = item.partition("=")
        try:
            seeds_at[size] = [int(seed) for seed in seeds.split(",")]
        except ValueError:
            raise SystemExit(f"--seeds-at {item!r}: expected SIZE=SEED,SEED (e.g. full=42)") from None
    rows = []
    for size in args.sizes:
        if size != "full" and not size.isdigit():
            raise SystemExit(f"--sizes {size!r}: 'full' or a number of training examples")
        n_copies = copies.get(size, 1)
        sized = [] if size == "full" else [f"data.max_train_examples={size}"]
        variants = {"none": [], "eda": [f"data.augment.{op}={args.share}" for op in OPERATIONS]
                    + [f"data.augment.copies={n_copies}"]}
        results, seeds = {}, seeds_at.get(size, args.seeds)
        for variant, augment in variants.items():
            runs = []
            for seed in seeds:
                output = Path(args.output_root) / f"{size}-{variant}-seed{seed}"
                done = args.reuse and (ROOT / output / "artifact" / "manifest.json").is_file()
                overrides = [*sized, *augment, f"train.seed={seed}", "export.onnx=false", *args.set]
                runs.append(read(output) if done else train(CONFIG, output, *overrides))
            results[variant] = runs
        for variant, runs in results.items():
            tests = [m["metrics"]["test"]["accuracy"] for m in runs]
            vals = [m["metrics"]["validation"]["accuracy"] for m in runs]
            tfidf = [m["baselines"]["tfidf_logreg"]["accuracy"] for m in runs]
            info = [m["training"] for m in runs]
            added = [i.get("augmentation", {}).get("rows_added", 0) for i in info]
            spread = f" ± {statistics.stdev(tests):.4f}" if len(tests) > 1 else ""
            label = "none" if variant == "none" else f"EDA, {args.share:g} of words per operation, {n_copies} cop{'y' if n_copies == 1 else 'ies'}"
            rows.append(f"| {size} ({info[0]['examples']['train'] - added[0]}) | {label} | {statistics.mean(added):.0f} | "
                        f"{', '.join(str(s) for s in seeds)} | {', '.join(f'{v:.4f}' for v in tests)} | "
                        f"{statistics.mean(tests):.4f}{spread} | {statistics.mean(vals):.4f} | {statistics.mean(tfidf):.4f} | "
                        f"{statistics.mean(i['seconds'] for i in info):.0f} s |")
            print(rows[-1], flush=True)
        gain = [a["metrics"]["test"]["accuracy"] - b["metrics"]["test"]["accuracy"]
                for a, b in zip(results["eda"], results["none"])]
        rows.append(f"| {size} | **EDA − none, per seed** | | | {', '.join(f'{g:+.4f}' for g in gain)} | "
                    f"**{statistics.mean(gain):+.4f}** | | | |")
    table = "\n".join([
        "| training examples | augmentation | rows added | seeds | test accuracy per seed | test mean ± sd | "
        "validation mean | TF-IDF test mean | wall per run |",
        "|---|---|---|---|---|---|---|---|---|", *rows])
    print("\n" + table)
    smoke = bool(args.set)
    write_section("augmentation-smoke" if smoke else "augmentation",
                  shlex.join(["python", "benchmarks/augmentation.py", *sys.argv[1:]]),
                  f"## Data augmentation on vader:movie ({CONFIG}){' — smoke test, not a measurement' if smoke else ''}\n\n"
                  "Each size trains without augmentation and with EDA's four operations (WordNet synonym replacement, "
                  "insertion of a WordNet synonym, swap of neighbours, deletion; `data.augment`), seed by seed: a seed "
                  "gives both runs the same split, training sample and head initialisation (augmentation leaves the "
                  "global random state as it found it). Validation and test (1,057 sentences each unless overridden) are "
                  "never augmented; the TF-IDF baseline learns from the original training rows. Accuracy is that of the "
                  "checkpoint with the best validation metric.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
