"""Inference speed of an exported artifact: PyTorch against ONNX Runtime fp32 and int8, same inputs, one process.

Batch 1 latency (p50 over single sentences, the runners taking turns) and batch 32 throughput (best of
alternating passes) on texts from the end of the artifact's own demo set (vader:movie sentences, wnut16 tweets),
with label agreement against PyTorch (per token for a token model). Run it on an artifact exported by
`tuneserve export`:

    python benchmarks/export_speed.py runs/sentiment-lora/artifact [--n 300]
    python benchmarks/export_speed.py runs/ner-lora/artifact
    python benchmarks/export_speed.py runs/manpages-search/artifact   # sentence embeddings: the queries' texts
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WARMUP = 5  # untimed batch-1 runs at the start of each runner's turn
PAUSE = 0.2  # seconds between turns, for the previous runner's threads to stop spinning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--n", type=int, default=300, help="sentences for batch-1 latency; batch 32 uses 4x as many")
    parser.add_argument("--passes", type=int, default=3, help="batch-32 passes per runner; the fastest is kept")
    parser.add_argument("--also", nargs="+", default=[], metavar="LABEL=GRAPH",
                        help="other ONNX graphs of the same model timed beside the artifact's (an earlier export's "
                             "int8 file, say)")
    args = parser.parse_args()

    import torch

    from benchmarks._report import matmul_gflops, write_section
    from core.onnx_runner import OnnxModel
    from training.data.demo import demo_path
    from training.inference import load_artifact, predict_logits

    artifact = load_artifact(args.artifact)
    manifest = artifact.manifest
    import json

    data = manifest.provenance.config["data"]
    rows = [json.loads(line) for line in demo_path(data["train"]).read_text().splitlines()]
    column = [r[data["text"]] for r in rows[-4 * args.n:]]  # the file's tail: real texts of mixed length
    texts = [" ".join(t) if isinstance(t, list) else t for t in column]
    spec = manifest.task.spec
    runners = {"torch eager fp32": lambda batch: predict_logits(artifact, batch, batch_size=32)}
    threads = torch.get_num_threads()
    graphs = {label: Path(args.artifact) / variant.path
              for label, variant in (("ORT fp32 (fused)", manifest.export.variant("onnx")),
                                     ("ORT int8", manifest.export.variant("onnx-int8"))) if variant}
    graphs.update(dict(also.split("=", 1) for also in args.also))
    for label, graph in graphs.items():
        model = OnnxModel(graph, threads=threads)
        runners[label] = (lambda m: lambda batch: m.logits(artifact.encoder, batch, task=manifest.task,
                                                             batch_size=32))(model)
    tokens = sum(len(ids) for ids in artifact.tokenizer(texts, truncation=True, max_length=manifest.max_length)["input_ids"])
    params = sum(p.numel() for n, p in artifact.model.named_parameters() if "embeddings" not in n)
    peak = matmul_gflops()

    latencies, passes, outputs = time_side_by_side(runners, texts, args.n, args.passes)
    reference = outputs["torch eager fp32"]
    results = {}
    for name in runners:
        seconds = min(passes[name])
        results[name] = {"p50_ms": 1000 * statistics.median(latencies[name]), "per_s": len(texts) / seconds,
                         "gflops": 2 * params * tokens / seconds / 1e9,
                         "agreement": _agreement(spec.agreement(manifest, spec.scores(reference),
                                                                spec.scores(outputs[name])))}
        print(name, results[name], flush=True)

    table = results_table(results, peak, pools=manifest.task.spec.pools)
    print("\n" + table)
    int8 = manifest.export.int8.model_dump()
    run_dir = Path(args.artifact).resolve().parent.name  # configs/<run_dir>.yaml made it
    body = (f"Artifact of `{run_dir}` ({manifest.task.value}, all-MiniLM-L6-v2, {manifest.method}), exported by "
            f"`tuneserve export`. Batch 1: p50 over {args.n} single texts, the runners taking turns in blocks of 10, each turn after "
            f"a {PAUSE:g} s pause and {WARMUP} untimed sentences; batch 32: "
            f"{len(texts)} sentences ({tokens:,} tokens) in length-sorted batches, best of {args.passes} alternating "
            f"passes. Both runtimes with {threads} threads. Measured fp32 matmul rate: {peak:.0f} GFLOP/s; "
            f"GFLOP/s counts 2 x {params / 1e6:.1f}M non-embedding parameters x real tokens. int8 variant: "
            f"{int8.get('method') or 'none kept (' + str(int8.get('reason')) + ')'}."
            + ("".join(f" Timed beside them: {label} (`{graph}`)." for label, graph in graphs.items()
                       if label not in ("ORT fp32 (fused)", "ORT int8")))
            + f"\n\n{table}\n")
    section = "export-speed" if run_dir == "sentiment-lora" else f"export-speed-{run_dir}"
    write_section(section, shlex.join(["python", "benchmarks/export_speed.py", *sys.argv[1:]]),
                  f"## Inference: PyTorch vs ONNX Runtime (fp32, int8), {run_dir}\n\n" + body)


def time_side_by_side(runners: dict, texts: list[str], n: int, rounds: int) -> tuple[dict, dict, dict]:
    """Each runner's batch-1 latencies over the first ``n`` texts, its batch-32 pass times over all of them
    (``rounds`` passes) and its outputs of the last pass."""
    # Side by side: blocks of 10 sentences, every runner in turn on each block (batch 1), then whole passes in
    # turn (batch 32), so that a noisy neighbour on the machine slows all runners alike. After a runner's turn its
    # idle threads keep spinning and tax the next runner on these 2 cores (without a pause the first three
    # sentences of a turn took 2-3x the rest), so each turn starts after a pause and WARMUP untimed sentences:
    # every runner is timed in the steady state a server running only that runtime would see.
    for run in runners.values():
        run(texts[:8])  # warm up
    latencies: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for block, first in enumerate(range(0, n, 10)):
        for name in names[block % len(names):] + names[:block % len(names)]:
            time.sleep(PAUSE)
            for text in texts[first:first + WARMUP]:
                runners[name]([text])
            for text in texts[first:min(first + 10, n)]:
                start = time.perf_counter()
                runners[name]([text])
                latencies[name].append(time.perf_counter() - start)
    passes: dict[str, list[float]] = {name: [] for name in runners}
    outputs = {}
    for _ in range(rounds):
        for name, run in runners.items():
            time.sleep(PAUSE)
            run(texts[:32])  # untimed, as at batch 1
            start = time.perf_counter()
            outputs[name] = run(texts)
            passes[name].append(time.perf_counter() - start)
    return latencies, passes, outputs


def results_table(results: dict, peak: float, *, pools: bool) -> str:
    """The Markdown table of each runner's figures, against PyTorch's (the first runner)."""
    base = results["torch eager fp32"]
    measure = "lowest cosine to torch" if pools else "label agreement"
    lines = [f"| runner | batch 1 p50 | vs torch | batch 32 throughput | vs torch | GFLOP/s (batch 32) | {measure} |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        agreement = f"{r['agreement']:.4f}" if pools else f"{r['agreement']:.2%}"
        lines.append(f"| {name} | {r['p50_ms']:.1f} ms | {base['p50_ms'] / r['p50_ms']:.2f}x | {r['per_s']:.0f} /s | "
                     f"{r['per_s'] / base['per_s']:.2f}x | {r['gflops']:.0f} ({r['gflops'] / peak:.0%} of peak) | "
                     f"{agreement} |")
    return "\n".join(lines)


def _agreement(report: dict) -> float:
    """Label agreement with torch; for an embedding model, the lowest cosine of a vector to torch's."""
    return report["label_agreement"] if "label_agreement" in report else report["cosine_min"]


if __name__ == "__main__":
    main()
