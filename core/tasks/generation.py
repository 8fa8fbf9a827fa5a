"""Text generation: an input text in, a written text out (summaries, rewrites, answers).

Targets are reference texts; a model's outputs are generated texts, scored with BLEU, chrF, ROUGE and exact match
(:func:`core.metrics.generation_metrics`) beside simple baselines: copying the input, and retrieval (the reference
of the most similar training input, TF-IDF cosine). The base model's own answer before fine-tuning, the baseline
that matters most, needs the model and is added by the trainer.

Training examples are the prompt (:mod:`core.prompting`, the same rendering the service uses) followed by the
target and the end-of-sequence token; the loss covers the target tokens only. Inputs and targets longer than
their budgets are cut, and every cut is counted.

Two kinds of model do this task, told apart by their config (``is_encoder_decoder``); :class:`Layout` says where
the ids go for each. A decoder-only (causal) model reads prompt and target as one sequence and continues the prompt;
an encoder-decoder model (T5, BART, EncoderDecoderModel) reads the prompt with its encoder and writes the target
with its decoder, which starts from its own start token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from core.metrics import Evaluation, generation_metrics, generation_resampled, rouge_per_example
from core.prompting import PromptFormat, render_prompt
from core.tasks.base import LabelError, WritingSpec

# Label of a position the loss ignores (the prompt, padding): PyTorch's cross-entropy default.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class GeneratedText:
    """One generation: its text, why it stopped, and how many tokens it took."""

    text: str
    finish_reason: Literal["stop", "length"] = "stop"
    tokens: int = 0


class Generation(BaseModel):
    text: str = Field(description="The generated text, without the prompt.")
    finish_reason: Literal["stop", "length"] = Field(
        description="stop: the model ended it (end of sequence or a stop string); length: max_new_tokens reached.")
    tokens: int = Field(description="Tokens generated.")


@dataclass(frozen=True)
class Layout:
    """Where the ids go for one kind of language model (the torch side adds its loss: training/recipe/torch_tasks.py)."""

    encoder_decoder: bool
    auto_model: str  # the transformers Auto class that loads such a model for this task

    def example(self, prompt: list[int], answer: list[int]) -> tuple[list[int], list[int]]:
        """(model input ids, loss labels) of one training example. Decoder-only: the prompt and the answer in one
        sequence, the prompt's labels ignored (the loss shifts them by one). Encoder-decoder: the prompt is the
        encoder's input, the answer its labels (the model shifts them right into the decoder's inputs)."""
        if self.encoder_decoder:
            return list(prompt), list(answer)
        return list(prompt) + list(answer), [IGNORE_INDEX] * len(prompt) + list(answer)

    def pad_prompts(self, prompts: Sequence[Sequence[int]], pad: int) -> tuple[list[list[int]], list[list[int]]]:
        """Prompts padded to one width for a batch, and their attention masks. A decoder-only model continues its
        prompt, so prompts end together (padded on the left); an encoder reads them at their own positions (padded on
        the right, so that each prompt keeps the positions it has alone)."""
        width = max((len(p) for p in prompts), default=0)
        left = not self.encoder_decoder
        ids, mask = [], []
        for p in prompts:
            fill = width - len(p)
            ids.append([pad] * fill + list(p) if left else list(p) + [pad] * fill)
            mask.append([0] * fill + [1] * len(p) if left else [1] * len(p) + [0] * fill)
        return ids, mask

    def new_tokens(self, row: Sequence[int], width: int) -> list[int]:
        """The tokens a model's ``generate`` wrote, from one row of its output for prompts ``width`` wide: a
        decoder-only model returns the prompt and then its continuation; an encoder-decoder model only the decoder's
        tokens, behind its start token."""
        return list(row[1:] if self.encoder_decoder else row[width:])


DECODER_ONLY = Layout(encoder_decoder=False, auto_model="AutoModelForCausalLM")
ENCODER_DECODER = Layout(encoder_decoder=True, auto_model="AutoModelForSeq2SeqLM")


def layout(encoder_decoder: bool) -> Layout:
    """The :class:`Layout` of a model whose config says ``is_encoder_decoder``."""
    return ENCODER_DECODER if encoder_decoder else DECODER_ONLY


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # the answer's ids (decoder-only: after IGNORE_INDEX over the prompt)
    input_cut: bool
    target_cut: bool


def prompt_ids(tokenizer: Any, fmt: PromptFormat, prompt: str) -> list[int]:
    """Token ids of a rendered prompt. A chat template writes its special tokens as text; a plain prompt gets the
    tokenizer's own (a beginning-of-sequence token, for the models that use one)."""
    return list(tokenizer(prompt, add_special_tokens=fmt.style == "plain")["input_ids"])


def prompt_for(tokenizer: Any, fmt: PromptFormat, text: str, max_input_tokens: int) -> tuple[list[int], bool]:
    """Token ids of the prompt for one input, the input cut to ``max_input_tokens`` first (training, evaluation,
    export and serving all build prompts here), and whether it was cut."""
    words = tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = len(words) > max_input_tokens
    if cut:
        text = tokenizer.decode(words[:max_input_tokens])
    return prompt_ids(tokenizer, fmt, render_prompt(fmt, tokenizer, text)), cut


@dataclass(frozen=True)
class Prompter:
    """How a generation model's inputs become prompt token ids: its tokenizer, prompt format and input budget, read
    from the manifest once (as :meth:`core.encoding.Encoder.from_manifest` is for scoring models) and carried to
    every place that builds prompts: the trainer's evaluation, the export gate, the service and the command line."""

    tokenizer: Any
    fmt: PromptFormat
    max_input_tokens: int

    @classmethod
    def from_manifest(cls, tokenizer: Any, manifest: Any) -> Prompter:
        return cls(tokenizer, manifest.prompt, manifest.max_length)

    def ids(self, text: str) -> list[int]:
        """One input's prompt (the input cut to the budget first, as in training)."""
        return prompt_for(self.tokenizer, self.fmt, text, self.max_input_tokens)[0]

    def all(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.ids(text) for text in texts]


def encode_example(tokenizer: Any, fmt: PromptFormat, text: str, target: str, *, max_input_tokens: int,
                   max_target_tokens: int, encoder_decoder: bool = False) -> EncodedExample:
    """The prompt of ``text`` and ``target`` followed by the end-of-sequence token, with loss labels on the target,
    laid out for the kind of model (:class:`Layout`: one sequence, or the prompt for the encoder and the target as
    the labels the decoder learns).

    An input over ``max_input_tokens`` tokens loses its end before it is put in the prompt (the template's text
    and the turn that cues the answer are kept whole); a target over ``max_target_tokens`` loses its end (and then
    has no end-of-sequence token: the model is not taught to stop early).
    """
    prompt, input_cut = prompt_for(tokenizer, fmt, text, max_input_tokens)
    answer = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    target_cut = len(answer) + 1 > max_target_tokens
    answer = answer[:max_target_tokens] if target_cut else answer + [tokenizer.eos_token_id]
    return EncodedExample(*layout(encoder_decoder).example(prompt, answer), input_cut, target_cut)


def retrieval_targets(train_inputs: Sequence[str], train_targets: Sequence[str], inputs: Sequence[str]) -> list[str]:
    """For each input, the target of the most similar training input (TF-IDF cosine on words and word pairs)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit(train_inputs)
    similarity = vectorizer.transform(inputs) @ vectorizer.transform(train_inputs).T
    nearest = np.asarray(similarity.argmax(axis=1)).reshape(-1)
    return [train_targets[i] for i in nearest]


class GenerationSpec(WritingSpec):

    problem_type = "text_generation"
    does = "writes a text for each input"
    postprocess = "identity"
    default_metric = "rougeL"
    # Validation loss every evaluation (all examples, cheap); generation metrics on a bounded sample.
    early_stopping_metric = "loss"
    # No train_defaults: 3 epochs decaying linearly. epochs: auto found the same best epoch (the third) on WordNet's
    # glosses but trained it at a constant rate, and wrote worse: ROUGE-L 21.3 against 22.5 over 3 seeds
    # (BENCHMARKS.md, defaults-generation-auto).
    options = frozenset({"generation"})
    metric_names = ("rougeL", "rouge1", "rouge2", "rougeLsum", "bleu", "chrf", "exact_match", "words",
                    "reference_words", "perplexity")
    has_labels = False
    label_noun = "reference texts"
    label_key = "reference"
    default_columns = ("input", "target")
    pipeline_tag = "text-generation"
    plot = "generation"
    auto_model = DECODER_ONLY.auto_model  # an encoder-decoder model's: ENCODER_DECODER.auto_model

    usage = ('POST /generate to use it (prompts, or messages; "stream": true for server-sent events), POST /evaluate '
             "to score it on input and reference pairs, GET /metadata for everything its artifact records.")

    def describe(self, manifest) -> list[str]:
        if manifest.prompt is None:
            return []
        style = {"chat": "the model's chat template", "plain": "a plain template"}[manifest.prompt.style]
        budget = (manifest.decoding or {}).get("max_new_tokens")
        return [f"Each input goes in its prompt as in training ({style}, inputs cut to {manifest.max_length} tokens)"
                + (f"; answers up to {budget} new tokens by default." if budget else ".")]

    def request_examples(self, manifest) -> dict[str, dict]:
        shown = (manifest.examples or [{}])[0]
        text = shown.get("input") or "A text for the model to answer."
        return {self.route: {"prompts": [text]},
                "/evaluate": {"examples": [{"input": text, "reference": shown.get("reference") or "The answer."}]}}

    def parse_label(self, value: Any, delimiter: str | None = None) -> str:
        if not isinstance(value, str):
            raise LabelError(f"a target must be a text, not {type(value).__name__}")
        if not value.strip():
            raise LabelError("empty target text")
        return value

    def encode_training(self, encoder, texts, pairs, targets, labels, *, prompt: PromptFormat,
                        max_target_length: int, encoder_decoder: bool = False,
                        **options: Any) -> tuple[dict[str, list], list, dict]:
        """Prompt + target + EOS per example (:func:`encode_example`, laid out for a decoder-only or an
        encoder-decoder model); ``encoder.max_length`` bounds the input."""
        features: dict[str, list] = {"input_ids": [], "attention_mask": []}
        encoded_targets, stats = [], {"inputs_cut": 0, "targets_cut": 0}
        for text, target in zip(texts, targets):
            example = encode_example(encoder.tokenizer, prompt, text, target, max_input_tokens=encoder.max_length,
                                     max_target_tokens=max_target_length, encoder_decoder=encoder_decoder)
            features["input_ids"].append(example.input_ids)
            features["attention_mask"].append([1] * len(example.input_ids))
            encoded_targets.append(example.labels)
            stats["inputs_cut"] += example.input_cut
            stats["targets_cut"] += example.target_cut
        return features, encoded_targets, stats

    def label_set(self, values) -> None:
        return None

    def to_targets(self, values: Sequence[Any], labels: Sequence[str] | None) -> np.ndarray:
        return np.asarray(list(values), dtype=object)

    def num_outputs(self, labels: Sequence[str] | None) -> int:
        return 0

    def scores(self, outputs: Any, calibration: None = None) -> list[GeneratedText]:
        """Generations as :class:`GeneratedText` (plain strings are taken as finished texts; generation has no
        calibration)."""
        return [o if isinstance(o, GeneratedText) else GeneratedText(str(o)) for o in outputs]

    def evaluate(self, targets: Any, scores: Any, labels: Sequence[str] | None = None, *,
                 threshold: float = 0.5) -> Evaluation:
        return generation_metrics(list(targets), [g.text for g in self.scores(scores)])

    def resampled(self, targets: Any, scores: Any, labels: Sequence[str] | None = None, *, threshold: float = 0.5):
        return generation_resampled(list(targets), [g.text for g in self.scores(scores)])

    loss_name = "100 - ROUGE-L F1 against the reference"

    def losses(self, targets: Any, scores: Any, *, threshold: float = 0.5) -> np.ndarray:
        return 100 - rouge_per_example(list(targets), [g.text for g in self.scores(scores)], ("rougeL",))["rougeL"]

    def baselines(self, train: tuple, test: tuple, labels: Sequence[str] | None, *, threshold: float | None = 0.5,
                  seed: int = 0, **_: Any) -> dict[str, dict[str, float]]:
        train_inputs, _, train_targets = train
        test_inputs, _, test_targets = test
        return {
            "copy_input": self.evaluate(test_targets, list(test_inputs)).metrics,
            "retrieval": self.evaluate(test_targets, retrieval_targets(list(train_inputs), list(train_targets),
                                                                       list(test_inputs))).metrics,
        }

    def decide(self, manifest, scores: Any) -> list[str]:
        return [g.text for g in self.scores(scores)]

    def shape(self, manifest, scores: Any, *, top_k: int | None = None,
              ndigits: int | None = None) -> list[dict[str, Any]]:
        return [{"text": g.text, "finish_reason": g.finish_reason, "tokens": g.tokens} for g in self.scores(scores)]

    @property
    def prediction_model(self) -> type[BaseModel]:
        return Generation

    def compare(self, manifest, reference: Any, candidate: Any, targets: Any) -> dict:
        """Two backends' generations on the same inputs: identical outputs and both sides' metrics."""
        ref_metrics = self.evaluate(targets, reference).metrics
        new_metrics = self.evaluate(targets, candidate).metrics
        return {"examples": len(targets), "metrics_torch": ref_metrics, "metrics_onnx": new_metrics,
                "metric_delta": {k: new_metrics[k] - v for k, v in ref_metrics.items() if k in new_metrics},
                **self.agreement(manifest, reference, candidate)}

    def agreement(self, manifest, reference: Any, candidate: Any) -> dict:
        """The share of generations that are identical (greedy decoding of a faithful copy reproduces them)."""
        same = [a.text == b.text for a, b in zip(self.scores(reference), self.scores(candidate))]
        return {"output_agreement": float(np.mean(same)) if same else 1.0}
