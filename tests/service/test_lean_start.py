"""A CPU server of an exported scoring model starts lean: neither transformers nor torch is imported, and the answers
are those of the same graph fed by transformers' tokenizer."""

import subprocess
import sys
import textwrap

import pytest


@pytest.mark.parametrize("name", ["pair", "token"])
def test_an_onnx_server_imports_neither_transformers_nor_torch(artifacts, name):
    """In a fresh interpreter (where torch is installed), ``auto`` picks the ONNX backend, which loads and answers
    without transformers or torch, with the logits of the same graph fed by transformers' tokenizer."""
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import numpy as np
        from core.manifest import read_manifest
        from service.backends import choose_backend, scoring_encoder
        artifact = Path({str(artifacts[name])!r})
        backend = choose_backend(artifact, read_manifest(artifact), backend="auto", device="auto", threads=1,
                                 batch_size=4)
        texts = ["the plot was good", "an awful, DULL ending naïve 東京 " * 9, "x"]
        pairs = ["a note", "the cast", "y"] if {name!r} == "pair" else None
        def flat(out):  # logits, or per text its sub-tokens' offsets and logits (token tasks)
            if isinstance(out, list):
                return np.concatenate([np.r_[o.offsets.ravel(), o.values.ravel()] for o in out])
            return np.asarray(out).ravel()
        alone = flat(backend.logits(texts, pairs))
        print(backend.name, type(backend.encoder.tokenizer).__name__, "transformers" in sys.modules,
              "torch" in sys.modules)
        backend.encoder = scoring_encoder(artifact, read_manifest(artifact), file_alone=False)
        print(np.array_equal(alone, flat(backend.logits(texts, pairs))))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[1:] == ["TokenizerFile", "False", "False", "True"], done.stdout
    assert done.stdout.split()[0].startswith("onnx"), done.stdout
