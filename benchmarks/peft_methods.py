"""peft methods side by side on the demo data: quality, trained parameters and training speed per method.

Trains the shipped LoRA config (vader:movie, all-MiniLM-L6-v2) once per method with `tuneserve train`, the same
data split, seed and step budget, and tabulates what each artifact's manifest records: test metrics beside the
TF-IDF baseline, trained parameters, training samples/s, and the export gate's verdict (every method's artifact is
exported and gated as any other). LoRA keeps the config's tuned learning rates; the other methods take their own
default (`train.lr: auto`) with the config's head_lr, full fine-tuning its own default for every weight.

    python benchmarks/peft_methods.py                                  # every method, 1 epoch each
    python benchmarks/peft_methods.py --epochs 3 --methods lora ia3 prompt
    python benchmarks/peft_methods.py --max-train-examples 2000 --no-export
    python benchmarks/peft_methods.py --reuse                          # tabulate the runs already made
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_quality import read, train

CONFIG = "configs/sentiment-lora.yaml"
# method -> overrides of the config (LoRA: the config as shipped)
METHODS = {
    "lora": [],
    "dora": ["lora.use_dora=true"],
    "rslora": ["lora.use_rslora=true"],
    "ia3": ["method=ia3", "train.lr=auto"],
    "prompt": ["method=prompt", "train.lr=auto"],
    "full": ["method=full", "train.lr=auto", "train.head_lr=null"],
}


def row(method: str, overrides: list[str], manifest: dict) -> str:
    test, validation, info = manifest["metrics"]["test"], manifest["metrics"]["validation"], manifest["training"]
    share = 100 * manifest["trainable_parameters"] / manifest["total_parameters"]
    export = manifest.get("export")
    fp32 = next((v for v in export["variants"] if v["name"] == "onnx"), None) if export else None
    if fp32:
        parity = fp32["parity"]
        int8 = export["int8"]
        kept = "off" if int8["requested"] == "off" else "kept" if int8["kept"] else "dropped"
        gate = f"passed (agreement {parity['label_agreement']:.4f}), int8 {kept}"
    else:
        gate = "not exported"
    shown = ", ".join(f"`{o}`" for o in overrides) or "as shipped"
    return (f"| {method} | {shown} | {manifest['trainable_parameters']:,} ({share:.2f}%) | {info['lr']:g} | "
            f"{validation['f1_macro']:.4f} | {test['accuracy']:.4f} | {test['f1_macro']:.4f} | "
            f"{manifest['baselines']['tfidf_logreg']['accuracy']:.4f} | {info['epochs_run']} ({info['best_step']} of "
            f"{info['steps']} steps) | {info['train_samples_per_second']:.0f} | {gate} | {info['seconds']:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--epochs", type=int, default=1, help="epochs per method (early stopping may end sooner)")
    parser.add_argument("--max-train-examples", type=int, help="train on a seeded sample of this many sentences")
    parser.add_argument("--no-export", action="store_true", help="skip the ONNX export and its gate")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a further override for every run (as tuneserve train --set)")
    parser.add_argument("--output-root", default="runs/bench-peft")
    parser.add_argument("--reuse", action="store_true", help="tabulate the existing artifacts without training")
    parser.add_argument("--write-to", type=Path, help="the Markdown file to write the table to (default BENCHMARKS.md)")
    args = parser.parse_args()

    from benchmarks._report import BENCHMARKS, write_section

    common = [f"train.epochs={args.epochs}", *args.overrides]
    if args.max_train_examples:
        common.append(f"data.max_train_examples={args.max_train_examples}")
    if args.no_export:
        common.append("export.onnx=false")
    rows = []
    for method in args.methods:
        output = Path(args.output_root) / method
        manifest = read(output) if args.reuse else train(args.config, output, *METHODS[method], *common)
        rows.append(row(method, METHODS[method], manifest))
        print(rows[-1], flush=True)
    table = "\n".join([
        ("| method | overrides | trained parameters | lr | validation F1 macro | test accuracy | test F1 macro | "
         "TF-IDF accuracy | epochs (best step) | train samples/s | ONNX gate | wall |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows])
    print("\n" + table)
    write_section("peft-methods", shlex.join(["python", "benchmarks/peft_methods.py", *sys.argv[1:]]),
                  f"## peft methods side by side (`{args.config}`, {' '.join(common)})\n\n"
                  "One run per method with the same split, seed and epochs; the test figures are those of the checkpoint "
                  "with the best validation F1. Trained parameters include the task head and pooler, which every method "
                  "trains; the share is of the whole model. Samples/s are training examples per second of training "
                  "time (evaluation and checkpoints excluded).\n\n" + table + "\n",
                  path=args.write_to or BENCHMARKS)


if __name__ == "__main__":
    main()
