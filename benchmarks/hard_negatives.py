"""Do hard negatives help the shipped sentence-embedding config? The same splits trained with in-batch negatives
alone and with a BM25-mined hard negative per query (data.negative), side by side.

For each seed, the man pages are split as `configs/manpages-search.yaml` splits them at that seed; within each split,
each query's hard negative is the paragraph BM25 ranks highest among the split's other paragraphs (mined within the
split, so no test paragraph reaches training). Both runs read the same three files; ONNX export is off.

    python benchmarks/hard_negatives.py [--seeds 42 43] [--output-root runs/bench]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = "configs/manpages-search.yaml"
SHOWN = ("ndcg@10", "mrr@10", "recall@1", "recall@10")


def mined(queries: list[str], positives: list[str]) -> list[str]:
    """Each query's hard negative: BM25's best paragraph among the split's others (never one equal to its own)."""
    import numpy as np
    from rank_bm25 import BM25Okapi

    from core.tasks.embedding import bm25_words

    corpus = list(dict.fromkeys(positives))
    bm25 = BM25Okapi([bm25_words(doc) for doc in corpus])
    negatives = []
    for query, positive in zip(queries, positives):
        scores = bm25.get_scores(bm25_words(query))
        order = np.argsort(-scores, kind="stable")
        negatives.append(next(corpus[j] for j in order if corpus[j] != positive))
    return negatives


def write_splits(seed: int, directory: Path) -> dict[str, int]:
    """The config's splits at ``seed``, each with its mined negatives, as JSONL files; their sizes."""
    from training.config import load_config
    from training.data.reading import load_dataset

    cfg = load_config(ROOT / CONFIG, overrides=[f"train.seed={seed}"])
    data = load_dataset(cfg.data, cfg.task, seed)
    directory.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split in (data.train, data.validation, data.test):
        positives = [str(p) for p in split.labels]
        rows = [{cfg.data.text: q, cfg.data.label: p, "negative": n}
                for q, p, n in zip(split.texts, positives, mined(split.texts, positives))]
        (directory / f"{split.name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        sizes[split.name] = len(rows)
    return sizes


def main() -> None:
    from benchmarks._report import write_section
    from benchmarks.train_quality import train

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43])
    parser.add_argument("--output-root", default="runs/bench")
    args = parser.parse_args()
    rows, gains = [], []
    for seed in args.seeds:
        directory = Path(args.output_root) / f"hard-negatives-data-{seed}"
        sizes = write_splits(seed, ROOT / directory)
        files = [f"data.{name}={directory / f'{name}.jsonl'}" for name in ("train", "validation", "test")]
        results = {}
        for label, extra in (("in-batch negatives", []), ("+ BM25 hard negative", ["data.negative=negative"])):
            output = Path(args.output_root) / f"hard-negatives-{seed}-{'with' if extra else 'without'}"
            run = train(CONFIG, output, *files, *extra, f"train.seed={seed}", "export.onnx=false")
            results[label] = run
            test, info = run["metrics"]["test"], run["training"]
            rows.append(f"| {seed} | {sizes['train']}/{sizes['validation']}/{sizes['test']} | {label} | "
                        + " | ".join(f"{test[m]:.3f}" for m in SHOWN)
                        + f" | {run['baselines']['base_model']['ndcg@10']:.3f}"
                        f" | {run['baselines']['bm25']['ndcg@10']:.3f}"
                        f" | {info['epochs_run']} ({info['best_step']} of {info['steps']} steps), "
                        f"{info['train_seconds']:.0f} s |")
            print(rows[-1], flush=True)
        with_, without = (results[k]["metrics"]["test"]["ndcg@10"] for k in ("+ BM25 hard negative",
                                                                              "in-batch negatives"))
        gains.append(with_ - without)
    spread = f"{statistics.mean(gains):+.3f}" + (f" ± {statistics.stdev(gains):.3f}" if len(gains) > 1 else "")
    table = "\n".join([
        "| seed | train/val/test pages | negatives | " + " | ".join(SHOWN)
        + " | base model ndcg@10 | BM25 ndcg@10 | epochs (best step), training time |",
        "|---" * (6 + len(SHOWN)) + "|", *rows])
    table += (f"\n\nTest NDCG@10 with the hard negative minus without, per seed: "
              f"{', '.join(f'{g:+.3f}' for g in gains)} (mean {spread}).")
    print("\n" + table)
    write_section("hard-negatives", " ".join(["python benchmarks/hard_negatives.py", *sys.argv[1:]]),
                  "## Hard negatives for sentence embeddings (manpages:debian)\n\n"
                  "The shipped config (LoRA, batch 32, in-batch negatives) against the same config with a hard "
                  "negative per query (`data.negative`): for each query, the paragraph BM25 ranks highest among its "
                  "split's other paragraphs. Same splits, same seed, export off; each test query ranks the test "
                  "split's paragraphs.\n\n" + table + "\n")


if __name__ == "__main__":
    main()
