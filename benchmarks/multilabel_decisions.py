"""Multi-label decisions on real data: the shipped multi-label config with every default, against its TF-IDF
baseline, and what each decision setting does.

Trains the config (a real multi-label set from a package registry) as a user would, then the same run with the
settings the defaults replaced, each at the same seed, split and epochs (export off):

- the defaults: automatic ``pos_weight``, per-label thresholds fitted on validation, Platt scaling;
- ``train.class_weights: none``: no ``pos_weight`` (is the automatic default worth keeping?);
- ``train.threshold: 0.5`` and ``train.calibrate: false``: the decisions before thresholds were fitted.

Every row reads the test figures from the run's manifest (the TF-IDF baseline's thresholds are fitted on validation
like the model's where ``train.threshold`` is ``auto``, and fixed at the same number otherwise), and ``always
nothing`` is the Hamming loss of predicting no label at all.

    python benchmarks/multilabel_decisions.py [--configs configs/jokes-multilabel.yaml] [--output-root runs/bench]
        [--seeds 43 44] [--seeded defaults]

``--seeded`` names the settings (by the first word of their name: defaults, no, threshold) that the further
seeds apply to; all of them when not given. A run already on disk is read back with ``--reuse``.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT = ["configs/jokes-multilabel.yaml"]
VARIANTS = {
    "defaults (pos_weight auto, thresholds fitted, Platt)": (),
    "no pos_weight (class_weights: none)": ("train.class_weights=none",),
    "threshold 0.5, no calibration": ("train.threshold=0.5", "train.calibrate=false"),
    "threshold 0.5, no calibration, no pos_weight": ("train.threshold=0.5", "train.calibrate=false",
                                                     "train.class_weights=none"),
}
SHOWN = ("f1_micro", "f1_macro", "hamming_loss", "subset_accuracy", "roc_auc_macro", "lrap")


def main() -> None:
    from benchmarks._report import write_section
    from benchmarks.train_quality import quality_parser, read, train

    parser = quality_parser(__doc__, DEFAULT)
    parser.add_argument("--seeded", nargs="*", metavar="SETTING",
                        help="the settings the further seeds apply to (default: all)")
    args = parser.parse_args()
    rows, wins = [], {}
    for config in args.configs:
        for name, overrides in VARIANTS.items():
            seeded = args.seeded is None or name.split()[0] in args.seeded
            for seed in [None, *(args.seeds if seeded else [])]:
                slug = name.split(" (")[0].replace(" ", "-").replace(",", "").replace(".", "")
                output = Path(args.output_root) / f"{Path(config).stem}-{slug}" / (f"seed{seed}" if seed else "shipped")
                extra = (*overrides, "export.onnx=false", *((f"train.seed={seed}",) if seed else ()))
                manifest = read(output) if args.reuse is not None and (ROOT / output / "artifact").is_dir() \
                    else train(config, output, *extra)
                test, tfidf = manifest["metrics"]["test"], manifest["baselines"]["tfidf_logreg"]
                prior = manifest["baselines"]["majority"]
                positives = sum(c["support"] for c in manifest["per_class"].values())
                cells = " | ".join(f"{test[m]:.3f} ({tfidf[m]:.3f})" for m in SHOWN)
                n = manifest["training"]["examples"]
                nothing = positives / (n["test"] * len(manifest["labels"]))
                calibration = manifest.get("calibration")
                ece = (f"{calibration['before']['test']['ece']:.3f} → {calibration['after']['test']['ece']:.3f}"
                       if calibration else "—")
                rows.append(f"| {config} | {name} | {seed or manifest['provenance']['seed']} | {cells} | "
                            f"{nothing:.3f} | {prior['f1_micro']:.3f} | {ece} |")
                beats = test["f1_micro"] > tfidf["f1_micro"] and test["hamming_loss"] < tfidf["hamming_loss"]
                wins.setdefault(name, []).append((test["f1_micro"] - tfidf["f1_micro"],
                                                  tfidf["hamming_loss"] - test["hamming_loss"], beats))
                print(rows[-1], flush=True)
    header = " | ".join(f"{m} (TF-IDF)" for m in SHOWN)
    columns = f"| config | setting | seed | {header} | Hamming, always nothing | label priors, micro-F1 | ECE before → after (test) |"
    table = "\n".join([columns, "|---" * (6 + len(SHOWN)) + "|", *rows])
    summary = ["| setting | runs | micro-F1 over TF-IDF | Hamming loss under TF-IDF | beats TF-IDF on both |",
               "|---|---|---|---|---|"]
    for name, results in wins.items():
        f1 = [r[0] for r in results]
        hamming = [r[1] for r in results]
        spread = (lambda v: f"{statistics.mean(v):+.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:+.3f}")
        summary.append(f"| {name} | {len(results)} | {spread(f1)} | {spread(hamming)} | "
                       f"{sum(r[2] for r in results)}/{len(results)} |")
    body = (table + "\n\nAgainst the TF-IDF baseline of the same run (positive: the model is better):\n\n"
            + "\n".join(summary))
    print("\n" + body)
    write_section("multilabel-decisions", " ".join(["python benchmarks/multilabel_decisions.py", *sys.argv[1:]]),
                  "## Multi-label decisions on real data\n\n"
                  "Test figures of the model, with its TF-IDF + one-vs-rest logistic regression baseline (same split) "
                  "in brackets. Hamming loss and ECE: lower is better.\n\n" + body + "\n")


if __name__ == "__main__":
    main()
