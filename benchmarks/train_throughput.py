"""Training throughput: `tuneserve train` against Hugging Face `Trainer` on the same LoRA fine-tune.

Classification (the default): the same model (all-MiniLM-L6-v2 with the LoRA adapters of
configs/sentiment-lora.yaml), the same training sentences of vader:movie, batch 32, the same number of optimizer
steps, one epoch. Runners alternate within one invocation, each in a fresh subprocess, and the best speed of the
rounds is kept for each (the machine is shared and noisy). Round k gives every runner seed 42 + k, and test
accuracy (500 held-out sentences) is averaged over the rounds: one seed alone moves it by a few points after so
few steps.

Generation (``--task generation``): SmolLM2-135M-Instruct with the LoRA adapters of configs/summarize-lora.yaml on
the man-page pairs, batch 8, the same prompts and target-only labels (core.tasks.generation.encode_example) for
both; Trainer pads with DataCollatorForSeq2Seq and lets the model compute its loss. Quality is the test loss
(every test pair), the same cross-entropy over target tokens on both sides.

    python benchmarks/train_throughput.py [--steps 120] [--rounds 3]
    python benchmarks/train_throughput.py --task generation [--steps 30] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs" / "sentiment-lora.yaml"
RUNNERS = ("tuneserve", "trainer-random", "trainer-group_by_length")
GENERATION_CONFIG = ROOT / "configs" / "summarize-lora.yaml"
GENERATION_BATCH = 8


def _overrides(steps: int, seed: int, output_dir: str) -> list[str]:
    return [f"data.max_train_examples={steps * 32}", "data.max_eval_examples=500", "train.epochs=1",
            "train.batch_size=32", f"train.seed={seed}", f"output_dir={output_dir}"]


def _generation_overrides(steps: int, seed: int, output_dir: str) -> list[str]:
    # No export and a token amount of written text: the benchmark times the training loop (tuneserve's
    # train_samples_per_second excludes evaluation, as Trainer's does).
    return [f"data.max_train_examples={steps * GENERATION_BATCH}", "train.epochs=1",
            f"train.batch_size={GENERATION_BATCH}", f"train.seed={seed}", f"output_dir={output_dir}",
            "generation.eval_examples=4", "export.onnx=false"]


def generation_worker(runner: str, steps: int, seed: int) -> dict:
    import torch

    from core.tasks.generation import encode_example
    from training.config import load_config
    from training.data.reading import load_dataset
    from training.recipe.modeling import build_model, optimizer_groups

    tmp = tempfile.mkdtemp()
    cfg = load_config(GENERATION_CONFIG, _generation_overrides(steps, seed, tmp))
    data = load_dataset(cfg.data, cfg.task, cfg.train.seed)
    if runner == "tuneserve":
        from training.run import train

        result = train(cfg)
        info = json.loads((result.artifact_dir / "manifest.json").read_text())["training"]
        return {"runner": runner, "samples_per_s": info["train_samples_per_second"], "seconds": info["train_seconds"],
                "quality": result.metrics["test"]["loss"]}

    import datasets
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    built = build_model(cfg, None)  # the identical model and LoRA configuration
    prompt = cfg.generation.prompt_format(built.tokenizer)

    def encoded(split) -> datasets.Dataset:
        rows = [encode_example(built.tokenizer, prompt, text, target, max_input_tokens=cfg.train.max_length,
                               max_target_tokens=cfg.generation.max_target_length)
                for text, target in zip(split.texts, split.targets)]
        return datasets.Dataset.from_dict({"input_ids": [r.input_ids for r in rows],
                                           "attention_mask": [[1] * len(r.input_ids) for r in rows],
                                           "labels": [r.labels for r in rows]})

    args = TrainingArguments(
        output_dir=tmp, per_device_train_batch_size=GENERATION_BATCH, per_device_eval_batch_size=16,
        num_train_epochs=1, learning_rate=cfg.lr, lr_scheduler_type="linear",
        warmup_steps=round(cfg.train.warmup_ratio * steps), weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm, save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
        seed=cfg.train.seed, logging_steps=50, disable_tqdm=True, train_sampling_strategy=runner.removeprefix("trainer-"))
    optimizer = torch.optim.AdamW(optimizer_groups(built.model, cfg.train.weight_decay, built.head_modules,
                                                   cfg.train.head_lr), lr=cfg.lr)
    trainer = Trainer(model=built.model, args=args, train_dataset=encoded(data.train),
                      data_collator=DataCollatorForSeq2Seq(built.tokenizer, label_pad_token_id=-100),
                      optimizers=(optimizer, None))
    metrics = trainer.train().metrics
    return {"runner": runner, "samples_per_s": metrics["train_samples_per_second"], "seconds": metrics["train_runtime"],
            "quality": trainer.evaluate(encoded(data.test))["eval_loss"]}


def worker(runner: str, steps: int, seed: int) -> dict:
    import numpy as np
    import torch

    from core.encoding import encode
    from training.config import load_config
    from training.data.reading import load_dataset
    from training.recipe.modeling import build_model, optimizer_groups

    tmp = tempfile.mkdtemp()
    cfg = load_config(CONFIG, _overrides(steps, seed, tmp))
    data = load_dataset(cfg.data, cfg.task, cfg.train.seed)
    tokens = sum(len(ids) for ids in encode(load_tokenizer(cfg), data.train.texts, max_length=cfg.train.max_length)["input_ids"])

    if runner == "tuneserve":
        from training.run import train

        result = train(cfg)
        info = json.loads((result.artifact_dir / "manifest.json").read_text())["training"]
        return {"runner": runner, "samples_per_s": info["train_samples_per_second"], "seconds": info["train_seconds"],
                "accuracy": result.metrics["test"]["accuracy"], "tokens": tokens, "non_embedding_params": non_embedding(cfg)}

    import datasets
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    built = build_model(cfg, data.labels)  # the identical model and LoRA configuration
    features = encode(built.tokenizer, data.train.texts, max_length=cfg.train.max_length)
    train_set = datasets.Dataset.from_dict({**features, "labels": data.train.targets.tolist()})
    args = TrainingArguments(
        output_dir=tmp, per_device_train_batch_size=32, num_train_epochs=1, learning_rate=cfg.lr,
        lr_scheduler_type="linear", warmup_steps=round(0.06 * steps), weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm, save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
        seed=cfg.train.seed, logging_steps=50, disable_tqdm=True,
        train_sampling_strategy=runner.removeprefix("trainer-"))
    # The same AdamW groups as tuneserve (no decay on biases and norms; the head at train.head_lr), with the
    # linear warmup-and-decay schedule Trainer builds from the arguments above.
    optimizer = torch.optim.AdamW(optimizer_groups(built.model, cfg.train.weight_decay, built.head_modules,
                                                   cfg.train.head_lr), lr=cfg.lr)
    trainer = Trainer(model=built.model, args=args, train_dataset=train_set,
                      data_collator=DataCollatorWithPadding(built.tokenizer), optimizers=(optimizer, None))
    metrics = trainer.train().metrics
    model = built.model.eval()
    logits = []
    with torch.no_grad():
        for start in range(0, len(data.test), 128):
            batch = encode(built.tokenizer, data.test.texts[start:start + 128], max_length=cfg.train.max_length,
                           padding="longest", return_tensors="pt")
            logits.append(model(**batch).logits.float().numpy())
    scores = cfg.task.spec.scores(np.concatenate(logits))
    accuracy = cfg.task.spec.evaluate(data.test.targets, scores, data.labels).metrics["accuracy"]
    return {"runner": runner, "samples_per_s": metrics["train_samples_per_second"], "seconds": metrics["train_runtime"],
            "accuracy": accuracy, "tokens": tokens, "non_embedding_params": non_embedding(cfg)}


def load_tokenizer(cfg):
    from training.recipe.modeling import load_tokenizer as load
    from training.recipe.bases import resolve_model

    return load(resolve_model(cfg.model))


def non_embedding(cfg) -> int:
    from transformers import AutoModel

    from training.recipe.bases import resolve_model

    model = AutoModel.from_pretrained(resolve_model(cfg.model))
    return sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42, help="seed of the first round; round k uses seed + k")
    parser.add_argument("--task", choices=("classification", "generation"), default="classification")
    parser.add_argument("--worker", choices=RUNNERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run = generation_worker if args.task == "generation" else worker
        print("RESULT " + json.dumps(run(args.worker, args.steps, args.seed)))
        return
    if args.task == "generation":
        generation_main(args)
        return

    from benchmarks._report import matmul_gflops, write_section

    peak = matmul_gflops()
    runs = _rounds(args)

    best = {r: max(rs, key=lambda x: x["samples_per_s"]) for r, rs in runs.items()}
    fastest_trainer = max(best[r]["samples_per_s"] for r in RUNNERS if r.startswith("trainer"))
    lines = [f"| runner | samples/s (best of {args.rounds}) | all rounds | vs faster Trainer | test accuracy (mean) "
             "| per round | GFLOP/s | of matmul peak |",
             "|---|---|---|---|---|---|---|---|"]
    for r in RUNNERS:
        b = best[r]
        # LoRA: forward (2 FLOPs per parameter per token) + backward through the frozen weights for the
        # input gradients (2 more); attention-score FLOPs are left out, so this slightly understates.
        gflops = 4 * b["non_embedding_params"] * b["tokens"] / b["seconds"] / 1e9
        rounds = ", ".join(f"{x['samples_per_s']:.1f}" for x in runs[r])
        accuracies = [x["accuracy"] for x in runs[r]]
        lines.append(f"| {r} | {b['samples_per_s']:.1f} | {rounds} | {b['samples_per_s'] / fastest_trainer:.2f}x | "
                     f"{sum(accuracies) / len(accuracies):.4f} | {', '.join(f'{a:.3f}' for a in accuracies)} | "
                     f"{gflops:.1f} | {gflops / peak:.0%} |")
    table = "\n".join(lines)
    body = (f"{args.steps} optimizer steps of batch 32 ({args.steps * 32} sentences of vader:movie, one epoch, "
            f"{best['tuneserve']['tokens']:,} real tokens), LoRA as in configs/sentiment-lora.yaml. "
            f"Round k runs every runner with seed {args.seed} + k (weights of the head, dropout, batch order and "
            f"the 500 test sentences), so accuracy is compared per seed and averaged. "
            f"Measured fp32 matmul rate of this machine: {peak:.0f} GFLOP/s.\n\n{table}\n")
    print("\n" + table)
    write_section("train-throughput", f"python benchmarks/train_throughput.py --steps {args.steps} --rounds {args.rounds}"
                  + (f" --seed {args.seed}" if args.seed != 42 else ""),
                  "## Training throughput: tuneserve vs Hugging Face Trainer\n\n" + body)


def _rounds(args) -> dict[str, list[dict]]:
    """Every runner once per round, each in a fresh subprocess, in turn."""
    runs: dict[str, list[dict]] = {r: [] for r in RUNNERS}
    for round_ in range(args.rounds):
        for runner in RUNNERS:
            started = time.time()
            out = subprocess.run([sys.executable, __file__, "--worker", runner, "--steps", str(args.steps),
                                  "--seed", str(args.seed + round_), "--task", args.task],
                                 capture_output=True, text=True, cwd=ROOT)
            line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
            if out.returncode != 0 or line is None:
                sys.exit(f"{runner} failed:\n{out.stderr[-3000:]}")
            runs[runner].append(json.loads(line[7:]))
            result = runs[runner][-1]
            quality = (f"accuracy {result['accuracy']:.4f}" if "accuracy" in result
                       else f"test loss {result['quality']:.4f}")
            print(f"round {round_ + 1} {runner}: {result['samples_per_s']:.1f} samples/s, {quality} "
                  f"({time.time() - started:.0f} s wall)", flush=True)
    return runs


def generation_main(args) -> None:
    from benchmarks._report import write_section

    runs = _rounds(args)
    best = {r: max(rs, key=lambda x: x["samples_per_s"]) for r, rs in runs.items()}
    fastest_trainer = max(best[r]["samples_per_s"] for r in RUNNERS if r.startswith("trainer"))
    lines = [(f"| runner | samples/s (best of {args.rounds}) | all rounds | vs faster Trainer | test loss (mean) "
              "| per round |"), "|---|---|---|---|---|---|"]
    for r in RUNNERS:
        losses = [x["quality"] for x in runs[r]]
        speeds = ", ".join(f"{x['samples_per_s']:.2f}" for x in runs[r])
        lines.append(f"| {r} | {best[r]['samples_per_s']:.2f} | {speeds} "
                     f"| {best[r]['samples_per_s'] / fastest_trainer:.2f}x | {sum(losses) / len(losses):.4f} | "
                     f"{', '.join(f'{x:.4f}' for x in losses)} |")
    table = "\n".join(lines)
    body = (f"{args.steps} optimizer steps of batch {GENERATION_BATCH} ({args.steps * GENERATION_BATCH} man-page "
            f"pairs of manpages:debian, one epoch), SmolLM2-135M-Instruct with LoRA as in configs/summarize-lora.yaml. "
            f"Round k runs every runner with seed {args.seed} + k. Test loss: mean cross-entropy over the target "
            f"tokens of every test pair.\n\n{table}\n")
    print("\n" + table)
    write_section("train-throughput-generation",
                  f"python benchmarks/train_throughput.py --task generation --steps {args.steps} --rounds {args.rounds}"
                  + (f" --seed {args.seed}" if args.seed != 42 else ""),
                  "## Training throughput, generation: tuneserve vs Hugging Face Trainer\n\n" + body)


if __name__ == "__main__":
    main()
