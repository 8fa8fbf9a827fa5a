"""Quality of the shipped NER configs (wnut16:tweets): entity F1 beside the all-O and memorisation baselines,
LoRA against full fine-tuning, and the export gate's figures.

Runs `tuneserve train` on each config as a user would (export included) and tabulates what each artifact's
manifest recorded:

    python benchmarks/ner_quality.py [--configs configs/ner-lora.yaml configs/ner-full.yaml] [--output-root runs/bench]
    python benchmarks/ner_quality.py --reuse          # tabulate the existing artifacts only
    python benchmarks/ner_quality.py --reuse configs/ner-lora.yaml   # train the others only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT = ["configs/ner-lora.yaml", "configs/ner-full.yaml"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT)
    parser.add_argument("--output-root", default="runs/bench")
    parser.add_argument("--reuse", nargs="*", metavar="CONFIG",
                        help="tabulate the existing artifacts of these configs (all, when none is named) without training")
    args = parser.parse_args()

    from benchmarks._report import write_section
    from benchmarks.train_quality import read, train

    rows, gate, f1 = [], [], {}
    for config in args.configs:
        output = Path(args.output_root) / Path(config).stem
        reused = args.reuse is not None and (not args.reuse or config in args.reuse)
        manifest = read(output) if reused else train(config, output)
        test, val, base, info = (manifest["metrics"]["test"], manifest["metrics"]["validation"], manifest["baselines"],
                                 manifest["training"])
        f1[manifest["method"]] = test["f1"]
        n = info["examples"]
        rows.append(f"| {config} | {manifest['method']} | {n['train']}/{n['validation']}/{n['test']} | "
                    f"{val['f1']:.4f} | **{test['f1']:.4f}** | {test['precision']:.4f} / {test['recall']:.4f} | "
                    f"{test['f1_macro']:.4f} | {test['token_accuracy']:.4f} | {base['memorisation']['f1']:.4f} | "
                    f"{base['all_o']['f1']:.4f} ({base['all_o']['token_accuracy']:.4f} word acc.) | "
                    f"{info['epochs_run']} ({info['best_step']} of {info['steps']} steps) | {info['seconds']:.0f} s |")
        print(rows[-1], flush=True)
        export = manifest.get("export") or {}
        for variant, report in (export.get("parity") or {}).items():
            gate.append(f"| {config} | {variant} | {report['examples']} texts, {report['tokens']} tokens | "
                        f"{report['label_agreement']:.4%} | {report['entity_agreement']:.2%} | "
                        f"{report['metric_delta']['f1']:+.4f} | {report['max_abs_diff']:.2e} |")
        if export.get("int8") and not export["int8"]["kept"]:
            gate.append(f"| {config} | onnx-int8 | dropped: {export['int8'].get('reason', '')[:200]} | | | | |")
        per_type = sorted(manifest["per_class"].items(), key=lambda kv: -kv[1]["support"])
        print("  per type: " + ", ".join(f"{k} {v['f1']:.2f} (n={int(v['support'])})" for k, v in per_type))
    table = "\n".join([
        "| config | method | train/val/test tweets | validation F1 | test entity F1 | precision / recall | macro F1 | "
        "word accuracy | memorisation F1 | all-O F1 | epochs (best step) | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows])
    if {"lora", "full"} <= f1.keys():
        table += f"\n\nLoRA minus full fine-tuning: {100 * (f1['lora'] - f1['full']):+.2f} points of test entity F1."
    if gate:
        table += "\n\nExport gate on the validation tweets (ONNX against PyTorch):\n\n" + "\n".join([
            "| config | variant | held out | token-label agreement | texts with identical entities | entity F1 change | max score diff |",
            "|---|---|---|---|---|---|---|", *gate])
    print("\n" + table)
    write_section("ner-quality", " ".join(["python benchmarks/ner_quality.py", *sys.argv[1:]]),
                  "## Quality of the NER configs (wnut16:tweets)\n\n"
                  "The 2,394 WNUT 2016 training tweets (human-annotated; 10 entity types), split 80/10/10 by the config's "
                  "seed. Entity F1 is seqeval's, strict IOB2, micro-averaged over types; the test figure is that of the "
                  "checkpoint with the best validation F1. Baselines are fitted on the same training split.\n\n"
                  + table + "\n")


if __name__ == "__main__":
    main()
