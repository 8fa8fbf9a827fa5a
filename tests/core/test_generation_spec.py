"""The generation task's torch-free side: metrics, baselines, prompts and the training encoding."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.metrics import generation_metrics
from core.prompting import PromptFormat, check_messages, render_messages, render_prompt
from core.tasks.base import LabelError
from core.tasks.generation import IGNORE_INDEX, GeneratedText, GenerationSpec, encode_example, retrieval_targets
from tests.conftest import CHATML, byte_level_bpe


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE tokenizer with ChatML special tokens and chat template, built here."""
    corpus = ["copy a file to another place", "list the files of a directory", "remove a file",
              "Summarize: the cp command copies files and directories"] * 20
    return byte_level_bpe(corpus, ["<|im_start|>", "<|im_end|>"], vocab_size=300, chat_template=CHATML,
                          eos_token="<|im_end|>", pad_token="<|im_end|>")


def test_generation_metrics_on_known_cases():
    same = generation_metrics(["the cat sat on the mat"], ["the cat sat on the mat"]).metrics
    assert same["rougeL"] == pytest.approx(100) and same["bleu"] == pytest.approx(100) and same["exact_match"] == 1
    partial = generation_metrics(["the cat sat on the mat"], ["the cat sat"]).metrics
    # ROUGE-1: precision 3/3, recall 3/6 -> F 2/3; ROUGE-2: 2 of 2 predicted bigrams, 2 of 5 reference ones -> 4/7
    assert partial["rouge1"] == pytest.approx(100 * 2 / 3)
    assert partial["rouge2"] == pytest.approx(100 * 4 / 7)
    assert partial["exact_match"] == 0 and partial["words"] == 3 and partial["reference_words"] == 6
    apart = generation_metrics(["copy files"], ["remove a directory"]).metrics
    assert apart["rougeL"] == 0 and apart["bleu"] == 0
    assert generation_metrics(["a  b"], ["a b"]).metrics["exact_match"] == 1  # whitespace does not count
    with pytest.raises(ValueError, match="1 references but 2 generations"):
        generation_metrics(["a"], ["a", "b"])


def test_the_worst_generations_are_those_furthest_from_their_reference():
    from types import SimpleNamespace

    from core.report import worst_examples
    from core.tasks.base import Task

    references = ["the cat sat on the mat", "a dog ran", "birds fly south"]
    written = [GeneratedText("the cat sat on the mat"), GeneratedText("a cat ran"), GeneratedText("nothing alike")]
    losses = GenerationSpec().losses(references, written)
    # ROUGE-L F1: identical 100; "a cat ran" shares 2 of 3 words each way -> 200/3; nothing shared -> 0
    assert losses == pytest.approx([0, 100 / 3, 100])
    manifest = SimpleNamespace(task=Task.GENERATION, decision_threshold=0.5)
    worst = worst_examples(manifest, references, written, k=2)
    assert worst["by"].startswith("100 - ROUGE-L")
    assert worst["examples"] == [{"index": 2, "prediction": "nothing alike", "loss": pytest.approx(100)},
                                 {"index": 1, "prediction": "a cat ran", "loss": pytest.approx(100 / 3)}]


def test_baselines_copy_the_input_and_retrieve_the_nearest_training_target():
    spec = GenerationSpec()
    train = (["copy files and directories", "remove files or directories", "list directory contents"], None,
             ["copy files", "remove files", "list files"])
    test = (["remove files or directories quickly", "list the directory contents"], None, ["remove files", "list files"])
    assert retrieval_targets(train[0], train[2], test[0]) == ["remove files", "list files"]
    scores = spec.baselines(train, test, None)
    assert scores["retrieval"]["exact_match"] == 1 and scores["retrieval"]["rougeL"] == pytest.approx(100)
    assert scores["copy_input"]["exact_match"] == 0 and 0 < scores["copy_input"]["rougeL"] < 100


def test_targets_must_be_texts_and_outputs_shape_as_the_api_says():
    spec = GenerationSpec()
    assert spec.parse_label("copy files") == "copy files"
    with pytest.raises(LabelError, match="empty"):
        spec.parse_label("  ")
    with pytest.raises(LabelError, match="text, not int"):
        spec.parse_label(3)
    outputs = [GeneratedText("copy files", "stop", 3), "list files"]
    assert spec.decide(None, outputs) == ["copy files", "list files"]
    shaped = spec.shape(None, outputs)
    assert shaped[0] == {"text": "copy files", "finish_reason": "stop", "tokens": 3}
    spec.prediction_model.model_validate(shaped[0])
    assert spec.agreement(None, outputs, ["copy files", "other"]) == {"output_agreement": 0.5}
    assert spec.evaluate(["copy files", "list files"], outputs).metrics["exact_match"] == 1


def test_prompt_formats_are_checked_and_rendered_as_the_model_expects(tokenizer):
    with pytest.raises(ValidationError, match="exactly once"):
        PromptFormat(style="plain", template="Summarize:")
    with pytest.raises(ValidationError, match="exactly once"):
        PromptFormat(style="plain", template="{input} {input}")
    plain = PromptFormat(style="plain", template="Summarize: {input}\nSummary:")
    assert render_prompt(plain, tokenizer, "a {brace} text") == "Summarize: a {brace} text\nSummary:"
    chat = PromptFormat(style="chat", template="Summarize: {input}", system="Be brief.")
    assert render_prompt(chat, tokenizer, "cp copies") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSummarize: cp copies<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert render_messages(tokenizer, [{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("messages, message", [
    ([], "at least one message"),
    ([{"role": "user"}], r"messages\[0\]: each message is an object"),
    ([{"role": "robot", "content": "x"}], r"messages\[0\]\.role: 'robot'"),
    ([{"role": "user", "content": 3}], r"messages\[0\]\.content: must be a string"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "last message must be the user's"),
])
def test_malformed_messages_are_refused_by_position(messages, message):
    with pytest.raises(ValueError, match=message):
        check_messages(messages)


def test_training_examples_mask_the_prompt_end_with_eos_and_count_cuts(tokenizer):
    fmt = PromptFormat(style="chat", template="Summarize: {input}")
    example = encode_example(tokenizer, fmt, "the cp command copies files", "copy files",
                             max_input_tokens=64, max_target_tokens=16)
    prompt = tokenizer(render_prompt(fmt, tokenizer, "the cp command copies files"), add_special_tokens=False)["input_ids"]
    answer = tokenizer("copy files", add_special_tokens=False)["input_ids"]
    assert example.input_ids == prompt + answer + [tokenizer.eos_token_id]
    assert example.labels == [IGNORE_INDEX] * len(prompt) + answer + [tokenizer.eos_token_id]
    assert not example.input_cut and not example.target_cut

    long_input = " ".join(["files"] * 50)
    cut = encode_example(tokenizer, fmt, long_input, "copy files and directories to another place",
                         max_input_tokens=5, max_target_tokens=3)
    assert cut.input_cut and cut.target_cut
    assert tokenizer.decode(cut.input_ids).endswith("<|im_start|>assistant\n" + tokenizer.decode(cut.labels[-3:]))
    assert cut.labels[-1] != tokenizer.eos_token_id  # a cut target is not taught to stop there
    assert sum(label != IGNORE_INDEX for label in cut.labels) == 3
