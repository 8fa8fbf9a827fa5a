"""Hyperparameter search against the hand-tuned config on vader:movie, and the wall time pruning saves.

Runs `tuneserve tune` on configs/sentiment-lora-search.yaml twice with the same seed and trial budget, once with
the median pruner and once without (each a fresh study in its own output directory), then trains the pruned
study's best config with `tuneserve train` (the only time the search's test split is scored) and sets it beside
configs/sentiment-lora.yaml, the config tuned by hand (read from train_quality.py's run when it exists).

    python benchmarks/search.py [--trials 12] [--output-root runs/bench]
    python benchmarks/search.py --reuse            # tabulate the runs already there
    python benchmarks/search.py --dry-run          # print the table, leave BENCHMARKS.md as it is
    python benchmarks/search.py --trials 6 --set data.max_train_examples=2000   # a bounded run, every run alike

Both studies draw trial N from seed + N; once the pruner stops a trial, TPE sees another history and the two
searches part ways, so the best values differ by more than pruning alone.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(*command: str) -> float:
    """Run a `tuneserve` command from the repository root; its wall time in seconds."""
    print(f"tuneserve {' '.join(command)} ...", flush=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "training.cli", *command], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"tuneserve {command[0]} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def study_figures(output: Path) -> dict:
    """Trials by state, the best validation value, and the trials' own time summed, from the study's journal."""
    import optuna

    from training.search import open_storage

    storage = open_storage(None, ROOT / output)
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    trials, best = study.get_trials(), study.best_trial
    states = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    seconds = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials if t.datetime_complete)
    return {"states": states, "best": best.value, "best_trial": best.number, "params": best.params,
            "trial_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sentiment-lora-search.yaml")
    parser.add_argument("--hand-tuned", default="configs/sentiment-lora.yaml")
    parser.add_argument("--trials", type=int, default=12, help="trials per study (the fixed budget)")
    parser.add_argument("--output-root", default="runs/bench")
    parser.add_argument("--reuse", action="store_true", help="tabulate the studies and artifacts already there")
    parser.add_argument("--dry-run", action="store_true", help="print the table without writing BENCHMARKS.md")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every run: the hand-tuned config, both studies and the winner")
    args = parser.parse_args()
    sets = [arg for item in args.overrides for arg in ("--set", item)]

    from benchmarks._report import write_section
    from training.config import load_config

    root = Path(args.output_root)
    hand = root / Path(args.hand_tuned).stem
    if not (args.reuse and (ROOT / hand / "artifact" / "manifest.json").is_file()):
        run("train", args.hand_tuned, "--overwrite", "--set", f"output_dir={hand}", *sets)
    hand_manifest = json.loads((ROOT / hand / "artifact" / "manifest.json").read_text())
    metric = hand_manifest["primary_metric"]

    studies, walls = {}, {}
    for pruner in ("median", "none"):
        output = root / f"{Path(args.config).stem}-{pruner}"
        wall_file = ROOT / output / "wall_seconds.json"
        if not args.reuse:
            shutil.rmtree(ROOT / output, ignore_errors=True)  # a fresh study: the budget is exactly --trials
            wall = run("tune", args.config, "--trials", str(args.trials), "--pruner", pruner,
                       "--set", f"output_dir={output}", *sets)
            wall_file.write_text(json.dumps({"seconds": wall}))
        walls[pruner] = json.loads(wall_file.read_text())["seconds"]
        studies[pruner] = study_figures(output)
    winner = root / f"{Path(args.config).stem}-median"
    if not (args.reuse and (ROOT / winner / "artifact" / "manifest.json").is_file()):
        run("train", str(winner / "best.yaml"), "--overwrite", *sets)  # the test split, scored once
    best_manifest = json.loads((ROOT / winner / "artifact" / "manifest.json").read_text())

    def counts(states: dict) -> str:
        return f"{states['COMPLETE']}/{states['PRUNED']}/{states['FAIL']}"

    rows = [f"| {args.hand_tuned} (by hand) | 1 | — | {hand_manifest['metrics']['validation'][metric]:.4f} | "
            f"{hand_manifest['training']['seconds']:.0f} s (one run) | "
            f"{hand_manifest['metrics']['test'][metric]:.4f} |"]
    for pruner, name in (("median", "median pruner"), ("none", "no pruner")):
        study = studies[pruner]
        test = f"{best_manifest['metrics']['test'][metric]:.4f}" if pruner == "median" else "not scored"
        rows.append(f"| {args.config}, {name} | {args.trials} | {counts(study['states'])} | {study['best']:.4f} "
                    f"(trial {study['best_trial']}) | {walls[pruner]:.0f} s ({study['trial_seconds']:.0f} s in trials) | "
                    f"{test} |")
    saved = 1 - walls["median"] / walls["none"]
    params = ", ".join(f"`{k}` {v:.4g}" if isinstance(v, float) else f"`{k}` {v}"
                       for k, v in studies["median"]["params"].items())
    table = "\n".join([
        f"| run | trials | complete/pruned/failed | best validation {metric} | wall | test {metric} |",
        "|---|---|---|---|---|---|", *rows])
    search_cfg = load_config(ROOT / args.config)
    body = (f"## Hyperparameter search ({search_cfg.data.train}, {args.trials} trials) against the hand-tuned config\n\n"
            f"Each study is a fresh `tuneserve tune` with the TPE sampler (seed {search_cfg.train.seed} + trial "
            f"number), judged on validation `{metric}`; only the pruned study's best configuration is trained again "
            f"and scored on the test split (once). The hand-tuned config's validation and test figures are of its "
            f"best checkpoint. The search took {walls['median']:.0f} s with the median pruner and {walls['none']:.0f} s "
            f"without: {saved:.0%} of the wall time saved."
            + (f" Every run with {', '.join(f'`{o}`' for o in args.overrides)}." if args.overrides else "")
            + f"\n\n{table}\n\n"
            f"Best configuration found (median pruner): {params}.\n")
    print("\n" + body)
    if not args.dry_run:
        write_section("search", shlex.join(["python", "benchmarks/search.py", *sys.argv[1:]]), body)


if __name__ == "__main__":
    main()
