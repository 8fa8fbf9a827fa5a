"""The minimal config against its best baseline on real data sets: does a newcomer's first run win?

For each data set and seed, `tuneserve train` runs the smallest config the README teaches (``task``, ``model:
minilm``, or ``smollm2`` for generation, ``data``, ``method: lora``, nothing else), with ONNX export off; the seed
draws the split, the new head, dropout and batch order. Each run's manifest gives the test value of the task's
primary metric, the best of its baselines on the same split (fitted on the same training rows), the epoch the run
stopped at and why, and the diagnosis the tool printed when the model lost. ``--variant NAME=KEY=VALUE,...`` trains
the same sets and seeds with settings on top, side by side: how a candidate default is judged.

    python benchmarks/defaults.py --sets wnut16:tweets jokes:one-liners --seeds 42 43 44
    python benchmarks/defaults.py --sets wnut16:tweets --variant "head 1e-2=train.head_lr=1e-2" --reuse
    python benchmarks/defaults.py --max-train 2000      # every known set, training rows capped
    python benchmarks/defaults.py --sets conll03:en jokes:one-liners --max-train conll03:en=1000
    python benchmarks/defaults.py --sets wnut16:tweets --variant "auto=train.epochs=auto" --no-defaults

A run already in ``--output-root`` is read back with ``--reuse`` instead of trained again.
Each run writes the BENCHMARKS.md section of its sets' task families (``defaults-<families>``); ``--section``
names another, so that a sweep of more sets of the same families keeps the earlier table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import write_section  # noqa: E402

# The registry data sets of the sweep: the ``data`` section a user would write for each, and its task.
SETS: dict[str, tuple[str, dict]] = {
    "vader:movie": ("classification", {"label": "polarity", "drop_missing_labels": True}),
    "vader:amazon": ("classification", {"label": "polarity", "drop_missing_labels": True}),
    "vader:nyt": ("classification", {"label": "polarity", "drop_missing_labels": True}),
    "vader:tweets": ("classification", {"label": "polarity", "drop_missing_labels": True}),
    "vader:movie/rating": ("regression", {"label": "rating"}),
    "vader:amazon/rating": ("regression", {"label": "rating"}),
    "vader:nyt/rating": ("regression", {"label": "rating"}),
    "vader:tweets/rating": ("regression", {"label": "rating"}),
    "wnut16:tweets": ("token_classification", {"text": "tokens", "label": "tags"}),
    "conll03:en": ("token_classification", {"text": "tokens", "label": "tags"}),
    "usaddress:labeled": ("token_classification", {"text": "tokens", "label": "tags"}),
    "jokes:one-liners": ("multilabel", {"label": "labels"}),
    "foldoc:computing": ("multilabel", {"label": "labels"}),
    "movies:genres": ("multilabel", {"label": "labels"}),
    # retrieval: the query column finds its document (text: the query, label: the document)
    "manpages:debian/search": ("embedding", {"text": "target", "label": "input"}),
    "foldoc:computing/terms": ("embedding", {"text": "id", "label": "text"}),
    "wordnet:glosses": ("embedding", {"text": "words", "label": "text"}),
    # generation over SmolLM2: summarise a man page, define the words, name the computing term defined
    "manpages:debian/summary": ("generation", {"text": "input", "label": "target"}),
    "wordnet:glosses/define": ("generation", {"text": "words", "label": "text"}),
    "foldoc:computing/name": ("generation", {"text": "text", "label": "id"}),
}
# The bundled base model of each task family (the README's minimal configs).
MODELS = {"generation": "smollm2"}


def minimal_config(name: str, output: Path) -> dict:
    """The config a newcomer writes for ``name`` (``set[/view]``): the task, the base model, the data, LoRA."""
    task, data = SETS[name]
    return {"task": task, "model": MODELS.get(task, "minilm"), "data": {"train": name.split("/")[0], **data},
            "method": "lora", "output_dir": str(output)}


def run(name: str, seed: int, settings: list[str], output: Path, reuse: bool, max_train: int | None,
        max_eval: int | None) -> dict:
    """The manifest of one run: read back with ``reuse`` where it exists, else trained."""
    manifest = output / "artifact" / "manifest.json"
    if reuse and manifest.exists():
        return json.loads(manifest.read_text())
    sets = [f"train.seed={seed}", "export.onnx=false", *settings]
    if max_train:
        sets.append(f"data.max_train_examples={max_train}")
    if max_eval:
        sets.append(f"data.max_eval_examples={max_eval}")
    with tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / f"{name.replace(':', '-').replace('/', '-')}.yaml"
        config.write_text(yaml.safe_dump(minimal_config(name, output), sort_keys=False))
        print(f"training {name} seed {seed} {' '.join(settings)} ...", flush=True)
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "training.cli", "train", str(config), "--overwrite",
                               *[a for s in sets for a in ("--set", s)]], cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{name} seed {seed} failed:\n{done.stderr[-3000:]}")
        print(f"  done in {time.monotonic() - start:.0f} s", flush=True)
    return json.loads(manifest.read_text())


def outcome(manifest: dict) -> dict:
    """What a run shows: the primary metric on test, the best baseline there, and how training ended."""
    from core.manifest import Manifest
    from core.verdict import baseline_verdict

    verdict = baseline_verdict(Manifest.model_validate(manifest))
    training = manifest["training"]
    return {"metric": verdict.metric, "model": verdict.model, "baseline": verdict.baseline,
            "baseline_value": verdict.baseline_value, "beats": verdict.beats, "lower": verdict.lower_is_better,
            "epochs": training["epochs_run"], "why": training.get("stopped_because") or "",
            "rising": bool(training.get("still_improving")), "seconds": training.get("seconds") or 0.0,
            "diagnosis": manifest.get("diagnosis") or ""}


def table(results: dict[tuple[str, str], list[dict]]) -> str:
    lines = ["| data set | task | setting | metric | model, per seed | mean | best baseline | baseline mean | "
             "wins (mean) | epochs (stopped by) | minutes per run | the tool's advice where it lost |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (name, variant), outs in results.items():
        model = statistics.mean(o["model"] for o in outs)
        base = statistics.mean(o["baseline_value"] for o in outs)
        wins = (model < base) if outs[0]["lower"] else (model > base)
        # the tool's advice where the model lost (the reason's figures differ per run; the advice is what counts)
        advice = [o["diagnosis"].rpartition("; try ")[2] for o in outs if not o["beats"] and o["diagnosis"]]
        said = "; ".join(f"try {a} ({advice.count(a)} of {len(outs)})" for a in dict.fromkeys(advice))
        ended = ", ".join(f"{o['epochs']} ({o['why']}{', rising' if o['rising'] else ''})" for o in outs)
        lines.append(
            f"| {name} | {SETS[name][0]} | {variant} | {outs[0]['metric']} | "
            f"{', '.join(format(o['model'], '.3f') for o in outs)} | **{model:.3f}** | {outs[0]['baseline']} | "
            f"{base:.3f} | "
            f"{sum(o['beats'] for o in outs)}/{len(outs)} ({'yes' if wins else 'no'}) | {ended} | "
            f"{statistics.mean(o['seconds'] for o in outs) / 60:.1f} | {said or '—'} |")
    return "\n".join(lines)


def per_set(given: list[str], sets: list[str]) -> dict[str, int]:
    """``[SET=]N`` items as a cap per set: ``N`` alone caps every set."""
    caps = {}
    for item in given:
        name, _, number = item.rpartition("=")
        for each in ([name] if name else sets):
            caps[each] = int(number)
    return caps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE,...",
                        help="also train with these settings (comma-separated --set items) under NAME")
    parser.add_argument("--variant-on", nargs="+", choices=list(SETS), metavar="SET",
                        help="train the variants on these sets only (default: every set)")
    parser.add_argument("--max-train", nargs="+", default=[], metavar="[SET=]N",
                        help="cap the training rows (data.max_train_examples) of every set, or of the sets named")
    parser.add_argument("--max-eval", nargs="+", default=[], metavar="[SET=]N",
                        help="cap the validation and test rows (data.max_eval_examples), as --max-train")
    parser.add_argument("--output-root", default="runs/defaults")
    parser.add_argument("--reuse", action="store_true", help="read back runs already in --output-root")
    parser.add_argument("--no-defaults", action="store_true",
                        help="train the variants only (the defaults of the same sets and seeds: an earlier table)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--section", help="the BENCHMARKS.md section to write (default: defaults-<the sets' task "
                                          "families>): a sweep of other sets of the same families keeps the first")
    args = parser.parse_args()
    caps, eval_caps = per_set(args.max_train, args.sets), per_set(args.max_eval, args.sets)
    variants = {} if args.no_defaults else {"defaults": []}
    for given in args.variant:
        label, _, settings = given.partition("=")
        variants[label] = [s for s in settings.split(",") if s]
    if not variants:
        parser.error("--no-defaults trains the variants only: name at least one --variant")
    results: dict[tuple[str, str], list[dict]] = {}
    for name in args.sets:
        for label, settings in variants.items():
            if settings and args.variant_on and name not in args.variant_on:
                continue
            slug = "".join(c if c.isalnum() else "-" for c in f"{name}-{label}")
            results[(name, label)] = [
                outcome(run(name, seed, settings, ROOT / args.output_root / f"{slug}-{seed}", args.reuse,
                            caps.get(name), eval_caps.get(name))) for seed in args.seeds]
            print(table({(name, label): results[(name, label)]}).splitlines()[-1], flush=True)
    text = table(results)
    print(text)
    if not args.no_write:
        command = ("python benchmarks/defaults.py --sets " + " ".join(args.sets) + " --seeds "
                   + " ".join(map(str, args.seeds)) + "".join(f" --variant '{v}'" for v in args.variant)
                   + (" --variant-on " + " ".join(args.variant_on) if args.variant_on else "")
                   + (" --no-defaults" if args.no_defaults else "")
                   + (" --max-train " + " ".join(args.max_train) if args.max_train else "")
                   + (" --max-eval " + " ".join(args.max_eval) if args.max_eval else "")
                   + (f" --section {args.section}" if args.section else ""))
        settings = "; ".join(f"{label}: {', '.join(s)}" for label, s in variants.items() if s)
        body = ("The minimal config (`task`, `model` (minilm; smollm2 for generation), `data`, `method: lora`; export "
                "off) on each data set, "
                f"one run per seed ({', '.join(map(str, args.seeds))}; each seed its own split), test values of the "
                "task's primary metric against the best of the baselines fitted on the same training rows"
                + ("; training rows capped: " + ", ".join(f"{n} at {c:,}" for n, c in caps.items()) if caps else "")
                + ("; validation and test rows capped: " + ", ".join(f"{n} at {c:,}" for n, c in eval_caps.items())
                   if eval_caps else "")
                + (f". Settings tried on top: {settings}" if settings else "")
                + ("; the defaults themselves are not rerun here (their rows: the earlier table of these sets)"
                   if args.no_defaults else "") + ".\n\n" + text)
        # one section per group of task families, so that sweeping one family keeps the others' tables
        write_section(args.section or "-".join(["defaults", *sorted({SETS[name][0] for name in args.sets})]), command,
                      body)


if __name__ == "__main__":
    main()
