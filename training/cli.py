"""The ``tuneserve`` command line: train, tune, evaluate, export, register, predict, config, data.

Errors a user can act on (bad config, bad data, a broken artifact) are printed as one message and
exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from core.errors import ConfigError, TuneserveError


def _table(columns: dict[str, dict[str, float]], names: list[str]) -> str:
    heads = list(columns)
    width = max([len(n) for n in names] + [6])
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{h:>14}" for h in heads)]
    for name in names:
        cells = [columns[h].get(name) for h in heads]
        if all(c is None for c in cells):
            continue
        lines.append(f"{name:<{width}}  " + "  ".join(f"{'—':>14}" if c is None else f"{c:>14.4f}" for c in cells))
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.data.reading import check_sources
    from training.recipe.bases import check_model

    cfg = load_config(args.config, args.set)
    check_sources(cfg.data)  # before torch and transformers load: a missing file is said in about a second
    check_model(cfg.model)
    from training.run import train

    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    _print_run(cfg, result)
    return 0


def _print_run(cfg, result) -> None:
    """Test metrics beside the baselines, the artifact, the export and the verdict of a finished run."""
    from core.manifest import read_manifest
    from core.verdict import compare_with_baselines

    if result.artifact_dir is None:  # not the main process
        return
    print(f"\ntest metrics ({len(result.test_targets)} examples) beside the baselines:")
    print(_table({"model": result.metrics["test"], **result.baselines}, [*cfg.task.spec.metric_names, "loss"]))
    print(f"\nartifact: {result.artifact_dir}")
    if result.export:
        _print_export(result.export)
    verdict = compare_with_baselines(cfg.primary_metric, result.metrics["test"][cfg.primary_metric], result.baselines)
    if verdict and not verdict.beats:  # last, where it cannot scroll away
        diagnosis = read_manifest(result.artifact_dir).diagnosis
        print(f"\nWARNING: {verdict.message}; {diagnosis}.")


def cmd_tune(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.search import run_search, train_best

    cfg = load_config(args.config, args.set)
    search = run_search(cfg, trials=args.trials, timeout=args.timeout, seed=args.seed, storage=args.storage,
                        study_name=args.study_name, pruner=args.pruner)
    record = search.record
    states = ", ".join(f"{n} {state.lower()}" for state, n in record["trials"].items())
    print(f"\nstudy {record['name']}: {sum(record['trials'].values())} trials ({states}), "
          f"validation {record['metric']} ({record['direction']})")
    if search.best_config is None:
        print("no trial completed: no best configuration")
        return 1
    print(f"best: trial {record['best_trial']}, validation {record['metric']} {record['best_value']:.4f}")
    importances = record["importances"] or {}
    for path, value in record["best_params"].items():
        share = f"  (importance {importances[path]:.2f})" if path in importances else ""
        print(f"  {path}: {value}{share}")
    print(f"best configuration: {search.best_config}")
    for plot in search.plots:
        print(f"plot: {plot}")
    if args.train_best:
        print("\ntraining the best configuration (the test split is scored now, once)")
        _print_run(load_config(search.best_config), train_best(search.best_config, record, search.labels))
    return 0


def _print_export(section: dict) -> None:
    from training.publish.card import int8_gate_text

    variants = {v["name"]: v for v in section["variants"]}
    if "onnx" not in variants:
        print(f"onnx: not exported ({section.get('reason')}); served by {section.get('backend')}")
        return
    graph = section["graph"]
    fusions = ", ".join(f"{k} {v}" for k, v in graph.get("fusions", {}).items()) or graph.get("note", "none")
    print(f"onnx: {variants['onnx']['files'][0]} (fusions: {fusions})")
    for variant, report in ((name, v["parity"]) for name, v in variants.items()):
        noun = report.get("agreement_noun", "label")
        figures = [f"{name} {report[key]:.4%}" for key, name in (("label_agreement", f"{noun} agreement"),
                                                                  ("output_agreement", "identical greedy outputs"))
                   if report.get(key) is not None]
        if report.get("agreement_low") is not None:
            figures[0] += (f" ({report['disagreements']:,} of {report['decisions']:,} decisions differ; at least "
                           f"{report['agreement_low']:.2%} at 95% confidence)")
        if report.get("max_abs_diff") is not None:
            figures.append(f"max |score diff| {report['max_abs_diff']:.2e}")
        print(f"  parity {variant}: {', '.join(figures)} on {report['examples']} {section['held_out']} examples")
    int8 = section["int8"]
    gate = int8_gate_text(int8.get("gate"))
    if gate:
        print(f"  int8 gate: {gate}")
    if int8["kept"]:
        print(f"  int8 kept ({int8['method']}): {variants['onnx-int8']['files'][0]}")
    elif int8["requested"] != "off":
        print(f"  int8 dropped: {int8['reason']}")


def cmd_export(args: argparse.Namespace) -> int:
    from training.export import export_artifact

    section = export_artifact(args.artifact, int8=args.int8)
    _print_export(section)
    return 0


def _backend(args: argparse.Namespace, manifest=None):
    """The artifact's manifest (read here unless given) and the backend the service would answer with
    (``--backend``, default ``auto``)."""
    from core.manifest import read_manifest
    from service.backends import choose_backend

    manifest = manifest or read_manifest(args.artifact)
    backend = choose_backend(Path(args.artifact), manifest, backend=args.backend, device="auto", threads=None,
                             batch_size=args.batch_size)
    print(f"backend: {backend.name}", file=sys.stderr)
    return manifest, backend


def cmd_evaluate(args: argparse.Namespace) -> int:
    from core.manifest import read_manifest
    from core.report import assessed, report
    from training.batch.answers import model_scores
    from training.data.reading import load_labelled

    # the data first: a mistake in the file is reported before seconds of loading the model
    manifest = read_manifest(args.artifact)
    split = load_labelled(manifest, args.data, text=args.text, text_pair=args.text_pair, label=args.label,
                          drop_missing=args.drop_missing_labels)
    # what the model reads to be judged (an embedding model: the positives too, which it ranks)
    texts, pairs = manifest.task.spec.judged_inputs(split.texts, split.pairs, split.targets)
    if args.engine == "ray":
        from training.batch.on_ray import ray_scores

        scores, backend_name = ray_scores(args.artifact, manifest, texts, pairs, backend=args.backend,
                                          address=args.ray_address, workers=args.workers, batch_size=args.batch_size)
    else:
        manifest, backend = _backend(args, manifest)
        scores, backend_name = model_scores(manifest, backend, texts, pairs), backend.name
    result = report(manifest, assessed(manifest, split.targets, scores))
    print(f"{args.data}: {result['n']} examples, backend {backend_name}")
    print(_table({"this data": result["metrics"], **_bounds(result["intervals"]),
                  "at training (test)": result["training_metrics"]}, list(manifest.task.spec.metric_names)))
    drift = ", ".join(result["drift"]) or "none"
    print(f"drift (the 95% interval excludes the training figure): {drift}")
    for note in result["notes"]:
        print(f"note: {note}")
    if args.output:
        Path(args.output).write_text(json.dumps({"backend": backend_name, **result}, indent=2, allow_nan=False)
                                     + "\n")
        print(f"written to {args.output}")
    return 0


def _bounds(intervals: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """The 95% intervals as two table columns."""
    return {"95% low": {k: v[0] for k, v in intervals.items()}, "95% high": {k: v[1] for k, v in intervals.items()}}


def cmd_predict(args: argparse.Namespace) -> int:
    from training.batch.answers import model_scores

    pairs = args.pair if args.pair else None
    # before the model loads, as training refuses them: a blank text has nothing to score
    for name, given in (("text", args.texts), ("--pair", pairs or [])):
        blank = next((i for i, text in enumerate(given) if not text.strip()), None)
        if blank is not None:
            raise TuneserveError(f"{name} {blank + 1}: empty or only whitespace; give the text to score")
    manifest, backend = _backend(args)
    if manifest.has_pair and (pairs is None or len(pairs) != len(args.texts)):
        raise TuneserveError(f"this model takes text pairs: give --pair once per text ({len(args.texts)} times)")
    scores = model_scores(manifest, backend, args.texts, pairs, args.max_new_tokens)
    field = "input" if hasattr(backend, "generate") else "text"  # a generation's own text is under "text"
    predictions = manifest.task.spec.shape(manifest, scores, ndigits=4)
    if not hasattr(backend, "generate") and not manifest.task.spec.windows:  # as /predict says it
        for prediction, cut in zip(predictions, backend.encoder.truncated(args.texts, pairs)):
            prediction["truncated"] = cut
    for text, prediction in zip(args.texts, predictions):
        print(json.dumps({field: text, **prediction}, ensure_ascii=False))
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from training.batch import BatchOptions, run_batch

    summary = run_batch(BatchOptions(
        artifact=args.artifact, input=args.input, output=args.output, engine=args.engine,
        ray_address=args.ray_address, backend=args.backend, batch_size=args.batch_size, workers=args.workers,
        num_gpus=args.num_gpus, text=args.text, pair=args.pair, id=args.id, keep=args.keep,
        output_format=args.format, shard_rows=args.shard_rows, max_errors=args.max_errors,
        truncation=not args.no_truncation, max_new_tokens=args.max_new_tokens, overwrite=args.overwrite,
        progress=not args.quiet))
    print(summary.line())
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from training.data.demo import demo_fields, demo_path

    source = demo_path(args.name)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / source.name
    shutil.copyfile(source, target)
    with target.open() as fh:
        rows = sum(1 for _ in fh)
    print(f"{args.name}: {rows} rows written to {target} (fields: {demo_fields(args.name)})")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from training.config import load_config, reference_table

    if args.reference:
        print(reference_table())
        return 0
    if not args.config:
        raise TuneserveError("give a config file to check, or --reference for the table of every key")
    cfg = load_config(args.config, args.set)
    checked = _check_config(cfg)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip())
    for line in checked:  # YAML comments: the output stays a config
        print(f"# checked: {line}")
    return 0


def _check_config(cfg) -> list[str]:
    """What a config needs that can be checked without training, one line each: every data file read, its
    columns, texts and labels checked; the model found. Raises the first problem (DataError, ConfigError)."""
    from training.data.reading import load_split
    from training.recipe.bases import check_model

    lines = [f"model: {check_model(cfg.model)}"]
    for name in ("train", "validation", "test"):
        if source := getattr(cfg.data, name):
            split = load_split(source, name, cfg.data, cfg.task)
            lines.append(f"data.{name}: {len(split):,} examples ({split.source})")
    return lines


def cmd_register(args: argparse.Namespace) -> int:
    from training.publish.register import register

    if args.name and len(args.artifact) > 1:
        raise ConfigError(f"--name names one model; {len(args.artifact)} artifacts were given (each is stored under "
                          "its own name)")
    tags = [register(artifact, args.name, onnx_only=args.onnx_only) for artifact in args.artifact]
    print("\n".join(tags))
    if len(tags) > 1:
        print(f"serve them in one process: TUNESERVE_MODELS={','.join(tags)} bentoml serve", file=sys.stderr)
    return 0


def _backend_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=["auto", "onnx-int8", "onnx", "torch"], default="auto",
                        help="what answers, as in the service: auto = torch on a GPU, else the int8 ONNX model "
                             "the export gate kept, else ONNX fp32 (default: auto; the backend is printed)")


def _add_batch_parser(sub) -> None:
    """`tuneserve batch` and its options."""
    p = sub.add_parser("batch", help="answer files too big for memory (JSONL, CSV/TSV, Parquet, a glob, a saved "
                                     "dataset) into Parquet shards, resumably, here or on Ray Data")
    p.add_argument("artifact", help="artifact directory (OUTPUT_DIR/artifact)")
    p.add_argument("--input", required=True, metavar="PATH_OR_GLOB",
                   help="a file, a glob of files (quote it), a directory of files, or a datasets save_to_disk "
                        "directory")
    p.add_argument("--output", required=True, metavar="DIR", help="directory for the shards, the job file and the "
                   "errors; the same command on it again resumes the job")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this machine; ray: Ray Data (a local cluster, or --ray-address)")
    p.add_argument("--ray-address", metavar="ADDR", help="the Ray cluster to run on (default: start one here)")
    p.add_argument("--workers", type=int, help="processes (local, default 1) or actors (ray, default one per 4 CPUs) "
                   "each with its own model")
    p.add_argument("--num-gpus", type=float, help="ray: GPUs per actor; the actors run torch on them")
    p.add_argument("--text", help="text column (default: as at training)")
    p.add_argument("--pair", help="second text column, for pair models (default: as at training)")
    p.add_argument("--id", help="a column copied to each answer and error, to join them back")
    p.add_argument("--keep", action="append", default=[], metavar="COLUMN",
                   help="a column to pass through (repeatable)")
    p.add_argument("--format", choices=["parquet", "jsonl"], default="parquet", help="output format (default parquet)")
    p.add_argument("--shard-rows", type=int, default=50_000,
                   help="local: input rows per shard, the unit written at once and resumed (default 50000); on "
                        "ray a shard is one input file")
    p.add_argument("--max-errors", type=int, metavar="N", help="stop once more than N rows were bad (default: never)")
    p.add_argument("--no-truncation", action="store_true",
                   help="a text longer than the model reads is a bad row, not cut (the service cuts it and says so)")
    p.add_argument("--max-new-tokens", type=int, help="generation models: most tokens to write (default: the "
                   "artifact's decoding); greedy")
    p.add_argument("--batch-size", type=int, default=64, help="texts the model reads at once (default 64)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an output directory holding another "
                   "job's shards (they are removed; other files are left alone)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _backend_option(p)
    p.set_defaults(func=cmd_batch)


def _add_tune_parser(sub) -> None:
    p = sub.add_parser("tune", help="search the config's search: section with Optuna, on the validation split")
    p.add_argument("config", help="run configuration (YAML) with a search: section")
    p.add_argument("--trials", type=int, help="trials this process runs (several processes on one study add up)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="start no new trial after this many seconds")
    p.add_argument("--seed", type=int, help="sampler seed (default: train.seed)")
    p.add_argument("--storage", metavar="URL", help="Optuna storage shared by workers: postgresql://user@host/db, "
                   "sqlite:///file.db or a journal file (default: OUTPUT_DIR/study.journal; a study resumes there)")
    p.add_argument("--study-name", help="study name (default: the run name)")
    p.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median",
                   help="stop weak trials from their validation metric at each evaluation (default: median)")
    p.add_argument("--train-best", action="store_true",
                   help="then train the best configuration into OUTPUT_DIR/artifact (test split scored once)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value, e.g. --set train.epochs=1 (repeatable)")
    p.set_defaults(func=cmd_tune)


def build_parser() -> argparse.ArgumentParser:
    from training.data.demo import DEMO_SETS

    parser = argparse.ArgumentParser(prog="tuneserve", description="Fine-tune a transformer, measure it, serve it.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune, evaluate against baselines and write the artifact")
    p.add_argument("config", help="run configuration (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value, e.g. --set train.epochs=1 (repeatable)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    mode.add_argument("--overwrite", action="store_true",
                      help="start afresh although output_dir holds checkpoints of an earlier run")
    p.set_defaults(func=cmd_train)

    _add_tune_parser(sub)

    p = sub.add_parser("evaluate", help="score an artifact on labelled data with the training metrics")
    p.add_argument("artifact", help="artifact directory (OUTPUT_DIR/artifact)")
    p.add_argument("--data", required=True, help="labelled file (csv, tsv, jsonl, json, parquet) or demo set")
    p.add_argument("--output", help="write the full report as JSON here")
    p.add_argument("--text", help="text column (default: as at training)")
    p.add_argument("--text-pair", help="second text column (default: as at training)")
    p.add_argument("--label", help="label column (default: as at training)")
    p.add_argument("--drop-missing-labels", action="store_true", help="skip rows with no label instead of failing")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="where the model runs: this process, or a pool of Ray actors (the metrics are the same)")
    p.add_argument("--ray-address", metavar="ADDR", help="the Ray cluster to run on (default: start one here)")
    p.add_argument("--workers", type=int, help="ray: actors, each with its own model (default: one per 4 CPUs)")
    _backend_option(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="export an artifact to ONNX (fp32, int8 if it keeps quality) behind a parity gate")
    p.add_argument("artifact", help="artifact directory (OUTPUT_DIR/artifact)")
    p.add_argument("--int8", choices=["auto", "on", "off"], default="auto",
                   help="auto: keep int8 only if it passes the gate; on: fail if it cannot; off: skip")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("register", help="copy artifacts into the BentoML model store and print their tags")
    p.add_argument("artifact", nargs="+", help="artifact directories (OUTPUT_DIR/artifact); several register a set "
                                               "that one service serves (TUNESERVE_MODELS)")
    p.add_argument("--name", help="model name in the store (default: the artifact's name, plus -onnx with --onnx-only)")
    p.add_argument("--onnx-only", action="store_true",
                   help="store only what the ONNX backend loads (no PyTorch weights): the model of a CPU bento")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("predict", help="print predictions for a few texts")
    p.add_argument("artifact", help="artifact directory (OUTPUT_DIR/artifact)")
    p.add_argument("texts", nargs="+", help="texts to classify")
    p.add_argument("--pair", action="append", help="second text, once per text, for pair models")
    p.add_argument("--max-new-tokens", type=int, help="generation models: most tokens to write (default: the "
                   "artifact's decoding); greedy")
    p.add_argument("--batch-size", type=int, default=64)
    _backend_option(p)
    p.set_defaults(func=cmd_predict)

    _add_batch_parser(sub)

    p = sub.add_parser("config", help="check a config without training (every data file read and checked, the "
                                      "model found) and print it with every default filled in")
    p.add_argument("config", nargs="?", help="run configuration (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a value")
    p.add_argument("--reference", action="store_true", help="print the table of every key, its default and meaning")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("data", help="write a demo data set as JSONL")
    p.add_argument("name", help=" | ".join(DEMO_SETS))
    p.add_argument("--output", required=True, help="directory to write <name>.jsonl into")
    p.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our own progress at INFO; libraries (onnxruntime's quantizer logs on the root logger) at WARNING.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for ours in ("training", "core", "bentoml.tuneserve"):  # the last: the backend choice, as the service logs it
        logging.getLogger(ours).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except TuneserveError as exc:
        print(f"tuneserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tuneserve {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
