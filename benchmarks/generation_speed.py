"""Decoding speed of a generation artifact: transformers' ``generate`` (fp32) against the exported ONNX decoders.

Every runner writes the same number of new tokens for the same prompts (the artifact's held-out inputs, rendered
as in training): end-of-sequence is ignored, so no runner gains by stopping early. Two figures per runner, taken in
one process with the same thread count, the runners taking turns for ``--rounds`` rounds (each figure is the
runner's best round):

- batch 1: new tokens per second, prompt reading included, over prompts decoded one at a time;
- concurrency 8: new tokens per second in total with 8 prompts decoded together (the service pools concurrent
  requests into one batch the same way; transformers gets a left-padded batch of 8).

``--candidates`` adds the quantisation schemes the export did not choose, made from the fp32 graph on the spot. Every
row says how many answers equal transformers' and how many outputs change when the same prompts are decoded
pooled (the export gate requires none to change).

``--llama-cpp`` adds llama.cpp (``llama-cpp-python``, installed by hand: it is not a dependency of the project) on the
base model's original GGUF file, the engine a CPU user would otherwise pick. It reads the same prompt token ids (the
GGUF holds the same vocabulary) and writes as many tokens. Its answers are the base model's, not the fine-tuned
one's, so only its speed is compared; its Python binding decodes one sequence at a time, so "concurrency 8" is the
8 prompts one after another.

    python benchmarks/generation_speed.py runs/summarize-lora/artifact [--prompts 8] [--new-tokens 32] [--candidates]
        [--llama-cpp] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
THREADS = 2
CONCURRENCY = 8
# Weight-only schemes for --candidates (MatMulNBits options, blocks of 32): the export's own (when the artifact
# does not carry it: its gate dropped it), and those it does not try.
CANDIDATES = {
    "onnx, 8-bit weights, int8 compute (the export's)": {"bits": 8, "block_size": 32, "is_symmetric": True,
                                                         "accuracy_level": 4},
    "onnx, 4-bit weights, fp32 compute": {"bits": 4, "block_size": 32, "is_symmetric": True, "accuracy_level": 1},
    "onnx, 4-bit weights, int8 compute": {"bits": 4, "block_size": 32, "is_symmetric": True, "accuracy_level": 4},
    "onnx, 8-bit weights, fp32 compute": {"bits": 8, "block_size": 32, "is_symmetric": True, "accuracy_level": 1},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--prompts", type=int, default=8, help="prompts decoded one at a time (batch 1)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--candidates", action="store_true", help="also time the quantisation schemes not chosen")
    parser.add_argument("--llama-cpp", action="store_true", help="also time llama.cpp on the base model's GGUF file")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of every runner in turn; each figure is a runner's best round (the machine is "
                             "shared: a slow round is someone else's load)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks._report import write_section
    from core.decoding import OnnxDecoder
    from core.manifest import MODEL_DIR, read_manifest
    from core.tasks.generation import Prompter
    from training.export import held_out_from_config
    from training.export.decoder import ATTENTION, QUANTIZATION, quantize_decoder

    torch.set_num_threads(THREADS)
    artifact = Path(args.artifact)
    manifest = read_manifest(artifact)
    if manifest.export is None or manifest.export.variant("onnx") is None:
        sys.exit(f"{artifact}: not exported to ONNX; run `tuneserve export {artifact}` first")
    tokenizer = AutoTokenizer.from_pretrained(artifact / MODEL_DIR)
    texts = held_out_from_config(manifest, artifact).texts[:max(args.prompts, CONCURRENCY)]
    prompts = Prompter.from_manifest(tokenizer, manifest).all(texts)
    new = args.new_tokens

    model = AutoModelForCausalLM.from_pretrained(artifact / MODEL_DIR, attn_implementation=ATTENTION).eval()
    # The answers the runners' outputs are checked against: transformers' greedy ones, stopping where the model does
    # (the timed run forbids the end-of-sequence token until `new` tokens, which changes what it writes after it).
    with torch.no_grad():
        answers = [model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                  max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, len(p):]
                   .tolist() for p in prompts[:args.prompts]]

    def torch_run(batch: list[list[int]]) -> list[list[int]]:
        width = max(map(len, batch))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return out[:, width:].tolist()

    def onnx_runner(path: Path):
        decoder = OnnxDecoder(path, tokenizer, [], threads=THREADS)  # no end-of-sequence: every row writes `new`
        return lambda batch: [list(g.token_ids) for g in decoder.generate(batch, new)]

    runners = {"transformers generate, fp32": torch_run, "onnx fp32": onnx_runner(artifact / manifest.export.variant("onnx").path)}
    if manifest.export.variant("onnx-int8"):
        runners[f"onnx {manifest.export.int8.method}"] = onnx_runner(artifact / manifest.export.variant("onnx-int8").path)
    scratch = tempfile.TemporaryDirectory(prefix="generation-speed-")
    if args.candidates:
        for i, (name, options) in enumerate(CANDIDATES.items()):
            if options == QUANTIZATION and manifest.export.variant("onnx-int8"):
                continue  # timed above, from the artifact
            path = quantize_decoder(artifact / manifest.export.variant("onnx").path, Path(scratch.name) / f"candidate{i}.onnx",
                                    options)
            runners[name] = onnx_runner(path)

    if args.llama_cpp:
        runners["llama.cpp (llama-cpp-python), the base model's Q4_1 GGUF"] = llama_cpp_runner(manifest, new)

    for run in runners.values():
        run(prompts[:1])  # warm-up
    speeds: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    outputs = {}
    for round_ in range(1, args.rounds + 1):
        for name, run in runners.items():
            start = time.perf_counter()
            alone = [run([p])[0] for p in prompts[:args.prompts]]
            batch1 = args.prompts * new / (time.perf_counter() - start)
            start = time.perf_counter()
            pooled = run(prompts[:CONCURRENCY])
            concurrent = CONCURRENCY * new / (time.perf_counter() - start)
            speeds[name].append((batch1, concurrent))
            outputs.setdefault(name, (alone, pooled))  # greedy: every round writes the same tokens
            print(f"round {round_}, {name}: {batch1:.1f} tokens/s at batch 1, {concurrent:.1f} at concurrency "
                  f"{CONCURRENCY}", flush=True)
    rows = {name: (max(b for b, _ in speeds[name]), max(c for _, c in speeds[name]), *outputs[name])
            for name in runners}

    base_name = "transformers generate, fp32"
    base1, base8 = rows[base_name][:2]
    def answer(tokens: list[int]) -> list[int]:  # what the model wrote before it would have stopped
        eos = tokenizer.eos_token_id
        return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens

    lines = [(f"| runner | batch 1 (tokens/s) | vs transformers | concurrency {CONCURRENCY} (tokens/s total) | "
              "vs transformers | answers = transformers' | outputs changed when pooled |"),
             "|---|---|---|---|---|---|---|"]
    for name, (b1, c8, alone, pooled) in rows.items():
        same = ("(the reference)" if name == base_name else "(the base model)" if name.startswith("llama.cpp")
                else f"{sum(answer(a) == answer(r) for a, r in zip(alone, answers))}/{len(alone)}")
        moved = sum(a != p for a, p in zip(alone, pooled[:len(alone)]))
        lines.append(f"| {name} | {b1:.1f} | {b1 / base1:.2f}x | {c8:.1f} | {c8 / base8:.2f}x | "
                     f"{same} | {moved}/{min(len(alone), len(pooled))} |")
    body = (f"{manifest.name} ({manifest.base_model}), {len(prompts[:args.prompts])} held-out prompts of "
            f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, {new} new tokens each (end of sequence "
            f"ignored), {THREADS} threads for every runner; each figure is the runner's best of {args.rounds} "
            "rounds, the runners taking turns.\n\n" + "\n".join(lines) + "\n\n"
            "Answers are compared with transformers' greedy answers up to the first end-of-sequence token (where "
            "the model stops); "
            "outputs changed when pooled are counted over all the forced tokens, each prompt decoded alone against "
            "the same prompt decoded among the 8. The export gate measures agreement on more held-out inputs.")
    print(body)
    write_section("Generation decoding speed", " ".join(["python", "benchmarks/generation_speed.py", *sys.argv[1:]]),
                  body)
    scratch.cleanup()


def llama_cpp_runner(manifest, new: int):
    """Greedy decoding of ``new`` tokens per prompt with llama.cpp on the GGUF file the base model ships as."""
    import importlib.util

    from llama_cpp import Llama

    from training.recipe.bases import ALIASES

    spec = next((s for s in ALIASES.values() if s.hub_id == manifest.base_model and s.gguf_file), None)
    if spec is None:
        sys.exit(f"--llama-cpp: the base model {manifest.base_model} is not one that ships as a GGUF file")
    path = Path(importlib.util.find_spec(spec.package).submodule_search_locations[0]) / spec.gguf_file
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=THREADS, n_threads_batch=THREADS, verbose=False)

    def one(prompt: list[int]) -> list[int]:
        tokens = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            tokens.append(token)
            if len(tokens) == new:
                return tokens
        return tokens

    return lambda batch: [one(p) for p in batch]


if __name__ == "__main__":
    main()
