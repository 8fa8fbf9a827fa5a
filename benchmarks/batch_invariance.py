"""Does an input's answer depend on what shares its batch? Every backend of an artifact, side by side.

The same held-out texts, shuffled (so batches mix lengths, as a server pools concurrent requests), are run alone,
in batches of 25 and in batches of 100; each arrangement is compared with "alone": labels that change and the
largest logit difference. ``--extra NAME=FILE.onnx`` adds another ONNX file of the same model (for example a
dynamically quantized int8 graph, whose activation scales are computed per batch) to compare with:

    python benchmarks/batch_invariance.py runs/sentiment-lora/artifact [--n 300]
    python benchmarks/batch_invariance.py runs/sentiment-lora/artifact --extra "int8, dynamic scales=old.int8.onnx"
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BATCHES = (25, 100)


class OnnxFile:
    """An ONNX file run as the service's ONNX backend runs its own (a call's texts sorted by length, then cut)."""

    def __init__(self, model, encoder, task):
        self.model, self.encoder, self.task, self.batch_size = model, encoder, task, 1

    def logits(self, texts, pairs):
        return self.model.logits(self.encoder, texts, pairs, task=self.task, batch_size=self.batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--n", type=int, default=300, help="held-out texts (the tail of the demo set)")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=FILE.onnx",
                        help="another ONNX file of the same model to compare")
    args = parser.parse_args()

    from benchmarks._report import write_section
    from core.manifest import read_manifest
    from core.onnx_runner import OnnxModel
    from service.backends import choose_backend, cpu_threads
    from training.data.demo import demo_path

    artifact = Path(args.artifact)
    manifest = read_manifest(artifact)
    data = manifest.provenance.config["data"]
    rows = [json.loads(line) for line in demo_path(data["train"]).read_text().splitlines()]
    column = [r[data["text"]] for r in rows[-args.n:]]
    texts = [" ".join(t) if isinstance(t, list) else t for t in column]
    texts = [texts[i] for i in np.random.default_rng(0).permutation(len(texts))]
    spec = manifest.task.spec

    backends = {}
    for name in ("torch", "onnx", "onnx-int8"):
        if name == "onnx-int8" and not manifest.export.variant("onnx-int8"):
            continue
        backend = choose_backend(artifact, manifest, backend=name, device="cpu", threads=cpu_threads(), batch_size=1)
        backends[f"{backend.name} (the service's)"] = backend
    encoder = backends["onnx (the service's)"].encoder
    for extra in args.extra:
        name, _, path = extra.partition("=")
        backends[name] = OnnxFile(OnnxModel(path, threads=cpu_threads()), encoder, manifest.task)

    lines = ["| backend | arrangement | labels changed vs alone | largest logit difference vs alone |",
             "|---|---|---|---|"]
    for name, backend in backends.items():
        backend.batch_size = 1
        alone = backend.logits(texts, None)
        for size in BATCHES:
            backend.batch_size = size
            pooled = backend.logits(texts, None)
            agreement = spec.agreement(manifest, spec.scores(alone), spec.scores(pooled)).get("label_agreement", 1.0)
            changed = round((1 - agreement) * len(texts))
            diff = float(np.abs(spec.flat(alone) - spec.flat(pooled)).max())
            lines.append(f"| {name} | batches of {size} | {changed} of {len(texts)} | {diff:.2e} |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    run_dir = artifact.resolve().parent.name
    body = (f"Artifact of `{run_dir}` ({manifest.task.value}), {len(texts)} texts from the tail of its demo set in a "
            f"seeded shuffle (batches of mixed lengths, padded to their longest), run alone and in batches of "
            f"{' and '.join(map(str, BATCHES))} by each backend; the service's backends sort a call's texts by length "
            f"before cutting batches, as they do when serving.\n\n{table}\n")
    write_section(f"batch-invariance-{run_dir}", shlex.join(["python", "benchmarks/batch_invariance.py", *sys.argv[1:]]),
                  f"## Batch invariance: one input, one answer, {run_dir}\n\n" + body)


if __name__ == "__main__":
    main()
