"""Quality of the shipped NER configs (wnut16:tweets): entity F1 beside the all-O and memorisation baselines,
LoRA against full fine-tuning, and the export gate's figures.

Runs `tuneserve train` on each config as a user would (export included) and tabulates what each artifact's
manifest recorded:

    python benchmarks/ner_quality.py [--configs configs/ner-lora.yaml configs/ner-full.yaml] [--output-root runs/bench]
    python benchmarks/ner_quality.py --reuse          # tabulate the existing artifacts only
    python benchmarks/ner_quality.py --reuse configs/ner-lora.yaml   # train the others only
    python benchmarks/ner_quality.py --reuse --seeds 43   # and each config at seed 43 too (export off)

A reused config reads its seeded runs where they exist and trains the missing ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT = ["configs/ner-lora.yaml", "configs/ner-full.yaml"]


def main() -> None:
    from benchmarks._report import write_section
    from benchmarks.train_quality import is_reused, quality_parser, read, seeded_runs, train

    args = quality_parser(__doc__, DEFAULT).parse_args()

    rows, gate, f1, spread = [], [], {}, []
    for config in args.configs:
        output = Path(args.output_root) / Path(config).stem
        reused = is_reused(args, config)
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
        for variant, report in ((v["name"], v["parity"]) for v in export.get("variants", [])):
            gate.append(f"| {config} | {variant} | {report['examples']} texts, {report['tokens']} tokens | "
                        f"{report['label_agreement']:.4%} | {report['entity_agreement']:.2%} | "
                        f"{report['metric_delta']['f1']:+.4f} | {report['max_abs_diff']:.2e} |")
        if export.get("int8") and not export["int8"]["kept"]:
            gate.append(f"| {config} | onnx-int8 | dropped: {export['int8'].get('reason', '')[:200]} | | | | |")
        runs = seeded_runs(config, output, manifest, args.seeds, reused)
        if args.seeds:
            vals = [m["metrics"]["validation"]["f1"] for _, m in runs]
            tests = [m["metrics"]["test"]["f1"] for _, m in runs]
            memo = [m["baselines"]["memorisation"]["f1"] for _, m in runs]
            row = (f"| {config} | {', '.join(str(s) for s, _ in runs)} | {', '.join(f'{v:.4f}' for v in vals)} | "
                   f"{', '.join(f'{v:.4f}' for v in tests)} | {sum(vals) / len(vals):.4f} | "
                   f"{sum(tests) / len(tests):.4f} | {', '.join(f'{v:.4f}' for v in memo)} |")
            spread.append((manifest["method"], dict(zip([s for s, _ in runs], tests)), row))
        per_type = sorted(manifest["per_class"].items(), key=lambda kv: -kv[1]["support"])
        print("  per type: " + ", ".join(f"{k} {v['f1']:.2f} (n={int(v['support'])})" for k, v in per_type))
    table = "\n".join([
        "| config | method | train/val/test tweets | validation F1 | test entity F1 | precision / recall | macro F1 | "
        "word accuracy | memorisation F1 | all-O F1 | epochs (best step) | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|", *rows])
    if {"lora", "full"} <= f1.keys():
        table += f"\n\nLoRA minus full fine-tuning: {100 * (f1['lora'] - f1['full']):+.2f} points of test entity F1."
    if spread:
        table += "\n\nThe same configs over several seeds (each seed its own split of the tweets, head, dropout and batch order):\n\n" + "\n".join([
            "| config | seeds | validation F1 | test F1 | validation mean | test mean | memorisation test F1 |",
            "|---|---|---|---|---|---|---|", *(row for _, _, row in spread)])
        by_method = {method: tests for method, tests, _ in spread}
        if {"lora", "full"} <= by_method.keys():
            common = sorted(by_method["lora"].keys() & by_method["full"].keys())
            diffs = [100 * (by_method["lora"][s] - by_method["full"][s]) for s in common]
            table += ("\n\nLoRA minus full, test entity F1 per seed (" + ", ".join(map(str, common)) + "): "
                      + ", ".join(f"{d:+.2f}" for d in diffs) + f" points; mean {sum(diffs) / len(diffs):+.2f}.")
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
