"""The CUDA paths on a GPU machine: mixed-precision training and the torch serving backend, side by side.

Trains configs/sentiment-lora.yaml in fp32, bf16 and fp16 (and configs/sentiment-full.yaml in bf16) on
vader:movie, then serves the bf16 LoRA artifact with the service's TorchBackend on CUDA (start-up self-test,
batch-1 latency, batch-32 throughput) beside ONNX Runtime on the same machine's CPU. Needs a CUDA device:

    python benchmarks/cuda_paths.py [--model PATH] [--data FILE] [--epochs 3] [--runs config:precision,...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help="base model alias or path")
    parser.add_argument("--data", default="vader:movie", help="training data (a demo set or a JSONL file)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--n", type=int, default=300, help="sentences for batch-1 latency; batch 32 uses 4x as many")
    parser.add_argument("--output", default="runs/cuda", help="where the runs go")
    parser.add_argument("--serving-only", action="store_true",
                        help="train only sentiment-lora:bf16 and write only the serving table")
    parser.add_argument("--runs", default="sentiment-lora:no,sentiment-lora:bf16,sentiment-lora:fp16,sentiment-full:bf16",
                        help="config:precision pairs to train; the serving part uses sentiment-lora:bf16")
    args = parser.parse_args()

    import torch

    from benchmarks._report import latency_and_throughput, write_section
    from core.manifest import read_manifest
    from service.backends import OnnxBackend, TorchBackend, cpu_threads
    from service.selftest import run_selftest

    if not torch.cuda.is_available():
        sys.exit("cuda_paths.py needs a CUDA device")
    gpu = torch.cuda.get_device_name(0)
    runs = [tuple(run.split(":")) for run in ("sentiment-lora:bf16" if args.serving_only else args.runs).split(",")]
    rows, artifacts = [], {}
    Path(args.output).mkdir(parents=True, exist_ok=True)
    for config, precision in runs:
        out = Path(args.output) / f"{config}-{precision}"
        # One process per run: Accelerate keeps one mixed-precision state per process.
        overrides = [f"model={args.model}", f"data.train={args.data}", f"train.mixed_precision={precision}",
                     f"train.epochs={args.epochs}", f"output_dir={out}"]
        command = [sys.executable, "-m", "training.cli", "train", str(ROOT / "configs" / f"{config}.yaml"),
                   "--overwrite", *[a for o in overrides for a in ("--set", o)]]
        start = time.perf_counter()
        with open(Path(args.output) / f"{config}-{precision}.log", "w") as log:
            subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
        seconds = time.perf_counter() - start
        artifact_dir = out / "artifact"
        manifest = read_manifest(artifact_dir)
        artifacts[(config, precision)] = artifact_dir
        test = manifest.metrics["test"]
        int8 = manifest.export.int8.model_dump() if manifest.export else {}
        rows.append(f"| {config} | {precision} ({manifest.training.mixed_precision} recorded) | {manifest.training.train_samples_per_second:.0f} | {seconds:.0f} | "
                    f"{100 * test['accuracy']:.2f}% | {test['f1_macro']:.4f} | "
                    f"{100 * manifest.export.parity['onnx'].label_agreement:.2f}% | "
                    f"{'kept' if int8.get('kept') else 'dropped'} |")
        print(rows[-1], flush=True)

    art = artifacts[("sentiment-lora", "bf16")]
    manifest = read_manifest(art)
    texts = [json.loads(line)["text"] for line in Path(args.data).read_text().splitlines()][-4 * args.n:] \
        if Path(args.data).is_file() else [s.text for s in manifest.export.selftest] * (4 * args.n // 8 + 1)
    backends = {
        "torch-cuda (bf16 weights)": TorchBackend(art, manifest, device="cuda", threads=cpu_threads(), batch_size=32),
        "torch-cpu fp32": TorchBackend(art, manifest, device="cpu", threads=cpu_threads(), batch_size=32),
        "onnx fp32 (CPU)": OnnxBackend(art, manifest, int8=False, threads=cpu_threads(), batch_size=32),
    }
    if manifest.export.variant("onnx-int8"):
        backends["onnx-int8 (CPU)"] = OnnxBackend(art, manifest, int8=True, threads=cpu_threads(), batch_size=32)
    serve_rows = []
    for name, backend in backends.items():
        check = run_selftest(backend, manifest, half_precision=getattr(backend, "half_precision", False))
        p50, throughput = latency_and_throughput(lambda batch, b=backend: b.logits(batch, None), texts, args.n,
                                                   4 * args.n, warmup=8)
        serve_rows.append(f"| {name} | {p50:.2f} ms | {throughput:.0f} /s | passed, max diff {check['max_abs_diff']:.1e} "
                          f"(tol {check['tolerance']:.0e}) |")
        print(serve_rows[-1], flush=True)

    # Where the time of a CUDA batch goes: the forward pass alone (inputs encoded and on the GPU beforehand,
    # timed between synchronizations), against the backend's whole call (tokenizing, copying, reading back).
    from core.encoding import encode

    cuda = backends["torch-cuda (bf16 weights)"]
    batches = [encode(cuda.tokenizer, texts[i:i + 32], max_length=manifest.max_length, padding="longest",
                      return_tensors="pt").to("cuda") for i in range(0, 4 * args.n, 32)]
    from transformers import AutoModelForSequenceClassification

    fp32 = AutoModelForSequenceClassification.from_pretrained(art / "model").to("cuda").eval()
    for label, model, dtype in (("bf16 weights (the backend)", cuda.model, None),
                                ("fp32 weights", fp32, None), ("fp32 weights under bf16 autocast", fp32, torch.bfloat16)):
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            for batch in batches:  # every shape once: kernel choice and allocator growth are not timed
                model(**batch)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for batch in batches:
                model(**batch)
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        serve_rows.append(f"| torch-cuda forward only, {label} | {1000 * seconds / len(batches):.2f} ms per batch of 32 | "
                          f"{4 * args.n / seconds:.0f} /s | (inputs pre-encoded on the GPU) |")
        print(serve_rows[-1], flush=True)
    start = time.perf_counter()
    for i in range(0, 4 * args.n, 32):
        encode(cuda.tokenizer, texts[i:i + 32], max_length=manifest.max_length, padding="longest", return_tensors="pt")
    serve_rows.append(f"| tokenizing alone | {1000 * (time.perf_counter() - start) / len(batches):.2f} ms per batch of 32 | "
                      f"{4 * args.n / (time.perf_counter() - start):.0f} /s | |")

    command = "python benchmarks/cuda_paths.py " + " ".join(sys.argv[1:])
    training = f"""## CUDA: mixed-precision training ({gpu})

vader:movie, {args.epochs} epochs; samples/s counts training examples per second of training steps, seconds is
the whole run (data, training, evaluation, baselines, ONNX export and its parity gate on the CPU):

| config | mixed precision | train samples/s | seconds | test accuracy | test F1 (macro) | ONNX fp32 label agreement | int8 |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""
    serving = f"""## CUDA: the torch serving backend beside ONNX Runtime ({gpu})

The bf16 LoRA artifact served by the service's backends on this machine: {args.n} single sentences (p50) and
{4 * args.n} sentences in batches of 32; each backend first passed the service's start-up self-test. The
forward-only rows time the model alone on inputs encoded and moved to the GPU beforehand, after one untimed
pass over the same batches.

| backend | batch 1 p50 | batch 32 throughput | self-test |
|---|---|---|---|
{chr(10).join(serve_rows)}
"""
    print(training if not args.serving_only else "", serving)
    if not args.serving_only:
        write_section("cuda-training", command, training)
    write_section("cuda-serving", command, serving)


if __name__ == "__main__":
    main()
