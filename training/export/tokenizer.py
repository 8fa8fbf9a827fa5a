"""Whether the artifact's ``tokenizer.json`` alone encodes as its transformers tokenizer does.

A scoring model's server then reads texts with :class:`core.tokenizer_file.TokenizerFile` and never imports
transformers. The check runs every call :class:`core.encoding.Encoder` makes (plain and padded batches, token
counts, windows with offsets, padding of encoded rows) on the held-out and calibration texts and on texts chosen to
be awkward, and compares the results exactly; the manifest records the outcome as ``export.tokenizer``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from core.encoding import Encoder
from core.manifest import MODEL_DIR, Manifest
from core.tokenizer_file import TOKENIZER_FILE, TokenizerFile

logger = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask")
# Texts that exercise normalisation, pre-tokenisation and truncation beyond what a held-out split may hold.
AWKWARD = ["", " ", "  leading and trailing  ", "\tTabs\nand\r\nnewlines\u2028", "Ünïcödé naïve café résumé",
           "東京は晴れ。北京欢迎你", "emoji 👍🏽🎉 and ZWJ 👩‍👩‍👧", "don't-stop ... 3.14159 $1,000 #tag @user",
           "ALL CAPS AND\u00a0NO-BREAK SPACE", "combining e\u0301 and precomposed \u00e9", "word " * 400,
           "x" * 3000, "[CLS] [SEP] [PAD] [MASK] <s> </s> <pad>", "مرحبا بالعالم", "Ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ"]
BATCH = 16


def _plain(value: Any) -> Any:
    """Encoder outputs as plain lists, whichever tokenizer made them."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict) or hasattr(value, "keys"):
        return {k: _plain(value[k]) for k in value.keys()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _first_difference(reference: Encoder, candidate: Encoder, texts: list[str], pairs: list[str] | None
                      ) -> str | None:
    """What the two encoders encode differently, first found (None: nothing)."""
    calls = {
        "encode": lambda e, t, p: e.encode(t, p),
        "encode, padded": lambda e, t, p: e.encode(t, p, padding="longest", return_tensors="np"),
        "token counts": lambda e, t, p: e.token_counts(t),
        "truncated": lambda e, t, p: e.truncated(t, p),
    }
    if pairs is None:
        calls["windows"] = lambda e, t, p: e.windows(t)
        calls["padded windows"] = lambda e, t, p: e.tokenizer.pad(
            {k: v for k, v in e.windows(t).items() if k in INPUT_NAMES}, padding="longest", return_tensors="np")
    for start in range(0, len(texts), BATCH):
        batch = texts[start:start + BATCH]
        batch_pairs = pairs[start:start + BATCH] if pairs is not None else None
        for call, run in calls.items():
            if _plain(run(reference, batch, batch_pairs)) == _plain(run(candidate, batch, batch_pairs)):
                continue
            for i, text in enumerate(batch):  # the first text that differs on its own
                pair = [batch_pairs[i]] if batch_pairs is not None else None
                if _plain(run(reference, [text], pair)) != _plain(run(candidate, [text], pair)):
                    return f"{call}: text {start + i} ({text[:60]!r})"
            return f"{call}: texts {start} to {start + len(batch) - 1}, padded together"
    return None


def tokenizer_file_record(artifact_dir: Path, manifest: Manifest, reference: Encoder, texts: list[str],
                          pairs: list[str] | None) -> dict:
    """``export.tokenizer``: whether ``tokenizer.json`` reproduces ``reference`` (the artifact's transformers
    tokenizer, with the manifest's settings) on ``texts`` (and ``pairs``) and the awkward texts."""
    model_dir = artifact_dir / MODEL_DIR
    record: dict[str, Any] = {"file": f"{MODEL_DIR}/{TOKENIZER_FILE}", "reproduces": False}
    if not (model_dir / TOKENIZER_FILE).exists():
        return {**record, "reason": f"{MODEL_DIR}/ has no {TOKENIZER_FILE} (not a fast tokenizer)"}
    inputs = [k for k in reference.encode(["a"], ["a"] if pairs is not None else None).keys() if k in INPUT_NAMES]
    try:
        candidate = Encoder.from_manifest(TokenizerFile.load(model_dir, inputs), manifest)
    except Exception as exc:  # a file the tokenizers library cannot read, or a config it does not expect
        return {**record, "reason": f"the tokenizers library cannot load it ({str(exc).splitlines()[0][:200]})"}
    texts = [*texts, *AWKWARD]
    pairs = [*pairs, *reversed(AWKWARD)] if pairs is not None else None
    difference = _first_difference(reference, candidate, texts, pairs)
    record.update(inputs=inputs, checked=len(texts))
    if difference:
        logger.info("the server will load the transformers tokenizer: %s alone encodes differently (%s)",
                    record["file"], difference)
        return {**record, "reason": difference}
    return {**record, "reproduces": True}
