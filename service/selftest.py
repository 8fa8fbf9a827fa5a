"""Start-up self-test: the chosen backend must reproduce the outputs PyTorch gave at export time (scores and labels
for a scoring model, the very texts for a generation model)."""

from __future__ import annotations

import logging

import numpy as np

from core.errors import ArtifactError
from core.manifest import Manifest
from core.tasks.base import BATCH_INVARIANCE_TOLERANCE

logger = logging.getLogger("bentoml.tuneserve")

# Score tolerance of backends that compute what PyTorch computed at export, in fp32.
FP32_TOLERANCE = 1e-3
# Half precision on CUDA moves probabilities by up to about a percent.
HALF_TOLERANCE = 3e-2
# An exported variant against its own scores recorded at export: the same file and runtime, so only thread counts
# and CPU kernels (AVX2, AVX-512, VNNI) can move them.
OWN_TOLERANCE = 1e-3


def tolerance(manifest: Manifest, backend_name: str, half_precision: bool = False) -> float:
    """How far a backend's scores may sit from PyTorch's: for ONNX variants, twice the largest difference the
    export gate measured on the held-out split (at least the fp32 tolerance)."""
    if backend_name.startswith("torch"):
        return HALF_TOLERANCE if half_precision else FP32_TOLERANCE
    parity = manifest.export.parity.get(backend_name) if manifest.export else None
    return max(FP32_TOLERANCE, 2.0 * (parity.max_abs_diff or 0.0 if parity else 0.0))


def run_selftest(backend, manifest: Manifest, *, half_precision: bool = False) -> dict:
    """Run the manifest's self-test examples through ``backend``, pooled in one call (mixed lengths, as the
    service pools concurrent requests) and each alone.

    Returns:
        ``{"examples", "max_abs_diff", "tolerance", "batch_invariance"}`` when every label is equal, every score
        within tolerance, and each example's answer the same alone as pooled.

    Raises:
        ArtifactError: naming the first example that differs, or when the artifact records no examples.
    """
    samples = manifest.export.selftest if manifest.export else []
    if not samples:
        raise ArtifactError("the artifact records no self-test examples (export it with `tuneserve export`); "
                            "refusing to serve a model whose outputs cannot be checked")
    texts = [s.text for s in samples]
    pairs = [s.text_pair for s in samples] if manifest.has_pair else None
    spec = manifest.task.spec
    pytorch = [spec.from_record(s.text, s.scores) for s in samples]
    # an exported variant is held to its own outputs recorded at export; PyTorch to PyTorch's
    own = all(backend.name in s.variants for s in samples)
    expected = [spec.from_record(s.text, s.variants[backend.name]) for s in samples] if own else pytorch
    whose = "its own scores at export" if own else "PyTorch's scores"
    got = spec.scores(backend.logits(texts, pairs), manifest.calibration)
    if not np.all(np.isfinite(spec.flat(got))):
        raise ArtifactError(f"self-test: backend {backend.name} gives non-finite outputs")
    tol = OWN_TOLERANCE if own else tolerance(manifest, backend.name, half_precision)
    diff = np.array([np.abs(spec.flat([g]) - spec.flat([e])).max(initial=0.0) for g, e in zip(got, expected)])
    want, have = spec.decide(manifest, pytorch), spec.decide(manifest, got)
    recorded_own = spec.decide(manifest, expected)
    for i, sample in enumerate(samples):
        recorded = sample.decision
        if spec.has_labels and recorded is not None and recorded != want[i]:
            raise ArtifactError(f"self-test: the manifest's labels turn PyTorch's export-time scores for example {i} "
                                f"into {want[i]!r}, but PyTorch decided {recorded!r}: the manifest's labels "
                                f"{manifest.labels} do not belong to this model")
        if spec.has_labels and recorded_own[i] != have[i]:
            raise ArtifactError(f"self-test: backend {backend.name} predicts {have[i]!r} for example {i} "
                                f"({sample.text[:60]!r}); at export {'it' if own else 'PyTorch'} predicted {recorded_own[i]!r}")
        if diff[i] > tol:
            raise ArtifactError(f"self-test: backend {backend.name} is {diff[i]:.4g} away from {whose} on "
                                f"example {i} ({sample.text[:60]!r}); tolerance {tol:.4g}")
    alone = [spec.scores(backend.logits([text], [pairs[i]] if pairs else None), manifest.calibration)[0] for i, text in enumerate(texts)]
    invariance = spec.invariance(manifest, got, {"each alone": alone})
    # Half precision on a GPU is not held to the CPU backends' bound (its kernels are chosen per batch shape).
    bound = tol if half_precision else BATCH_INVARIANCE_TOLERANCE
    if invariance["decision_changes"] or invariance["max_abs_diff"] > bound:
        raise ArtifactError(f"self-test: backend {backend.name} answers depend on the batch: run alone instead of "
                            f"pooled, {invariance['decision_changes']} of {len(samples)} decisions change and scores "
                            f"move by up to {invariance['max_abs_diff']:.3g} (bound {bound:g})")
    return {"examples": len(samples), "max_abs_diff": float(diff.max()), "tolerance": tol,
            "batch_invariance": invariance["max_abs_diff"]}


# Half-precision greedy decoding may take the other branch of a near tie; at least this share of the recorded texts
# must still come out identical.
HALF_PRECISION_MIN_IDENTICAL = 0.5


def run_generation_selftest(backend, manifest: Manifest, *, half_precision: bool = False) -> dict:
    """Decode the manifest's self-test inputs greedily, as the export gate did (prompts from
    the backend's :class:`core.tasks.generation.Prompter`: the manifest's prompt format and input budget, the manifest's
    max_new_tokens), pooled in one call and each alone: every text must be the one PyTorch wrote at export.

    Returns:
        ``{"examples", "arrangements", "texts", "identical"}``: texts compared (examples times arrangements), and
        how many of them are identical to PyTorch's.

    Raises:
        ArtifactError: naming the first example whose text differs (in half precision on a GPU: when fewer than
            half are identical), or when the artifact records no examples.
    """
    from service.generation import default_max_new_tokens

    samples = manifest.export.selftest if manifest.export else []
    if not samples:
        raise ArtifactError("the artifact records no self-test examples (export it with `tuneserve export`); "
                            "refusing to serve a model whose outputs cannot be checked")
    max_new_tokens = default_max_new_tokens(manifest)
    prompts = backend.prompter.all([s.text for s in samples])
    arrangements = {"pooled": backend.generate(prompts, max_new_tokens=max_new_tokens),
                    "each alone": [backend.generate([p], max_new_tokens=max_new_tokens)[0] for p in prompts]}
    differences = [(i, arrangement, generations[i].text) for arrangement, generations in arrangements.items()
                   for i, sample in enumerate(samples) if generations[i].text != sample.decision]
    identical = len(samples) * len(arrangements) - len(differences)
    if differences:
        i, arrangement, text = differences[0]
        problem = (f"self-test: backend {backend.name} writes {text!r} for example {i} ({samples[i].text[:60]!r}, "
                   f"decoded {arrangement}); PyTorch wrote {samples[i].decision!r} at export "
                   f"({len(differences)} of {len(samples) * len(arrangements)} texts differ)")
        if not half_precision or identical < HALF_PRECISION_MIN_IDENTICAL * len(samples) * len(arrangements):
            raise ArtifactError(problem)
        logger.warning("%s; allowed in half precision", problem)
    return {"examples": len(samples), "arrangements": list(arrangements), "texts": len(samples) * len(arrangements),
            "identical": identical}
