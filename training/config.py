"""The run configuration: one typed pydantic model, every default defined here and only here.

A YAML file is validated against :class:`Config`; ``--set key.path=value`` overrides are applied to
the raw YAML before validation, so they go through exactly the same checks. Unknown keys are
rejected with their full path.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from core.errors import ConfigError
from core.prompting import PromptFormat
from core.tasks import Task
from training.data.demo import DEMO_SETS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class AugmentConfig(_Strict):
    synonym: float = Field(0.0, ge=0, lt=1, description="Augmentation (training split only): share of a text's words "
                           "replaced by a WordNet synonym (at least one word while above 0; 0 = off).")
    insert: float = Field(0.0, ge=0, lt=1, description="Augmentation: as many WordNet synonyms of the text's words as "
                          "this share of its words, inserted at random places.")
    swap: float = Field(0.0, ge=0, lt=1, description="Augmentation: share of the words swapped with a neighbour.")
    delete: float = Field(0.0, ge=0, lt=1, description="Augmentation: share of the words deleted.")
    copies: int = Field(1, ge=1, le=32, description="Augmented copies of each training example added (each applies "
                        "every operation above 0; seeded by train.seed; recorded in the manifest).")

    @property
    def enabled(self) -> bool:
        return any((self.synonym, self.insert, self.swap, self.delete))

    @model_validator(mode="after")
    def _copies_need_an_operation(self) -> AugmentConfig:
        if self.copies != 1 and not self.enabled:  # (a dumped config names copies: 1 with no operation on)
            raise ValueError("copies is set but no operation is on: set synonym, insert, swap or delete above 0")
        return self


class DataConfig(_Strict):
    train: str = Field(description="Training data: a file (csv, tsv, jsonl, json, parquet), a directory of such "
                       f"files, a demo set ({', '.join(DEMO_SETS)}) or a Hub data set name.")
    validation: str | None = Field(None, description="Validation data; carved from train (stratified, seeded) when null.")
    test: str | None = Field(None, description="Test data; carved from train (stratified, seeded) when null.")
    text: str = Field("text", description="Column holding the input text (generation: `input` unless set).")
    text_pair: str | None = Field(None, description="Column holding the second text, for pair tasks.")
    negative: str | None = Field(None, description="Embedding: column holding a hard negative per query, a document "
                                 "that looks relevant but is not; trained against beside the batch's other positives.")
    corpus: str | None = Field(None, description="Embedding: a file of further documents (column data.corpus_text) "
                               "that every validation and test query ranks beside its split's positives; null = "
                               "the positives alone.")
    corpus_text: str = Field("text", description="Embedding: the column of data.corpus holding each document.")
    label: str = Field("label", description="Column holding the label (class, list of classes, or number; "
                       "generation: the target text, `target` unless set).")
    label_delimiter: str | None = Field(None, description="Multi-label only: split a string label on this delimiter.")
    drop_missing_labels: bool = Field(False, description="Drop rows whose label is null or empty (counted in the "
                                      "log) instead of failing on them.")
    validation_size: float = Field(0.1, gt=0, lt=0.5, description="Fraction of train carved out when validation is null.")
    test_size: float = Field(0.1, gt=0, lt=0.5, description="Fraction of train carved out when test is null.")
    max_train_examples: int | None = Field(None, gt=0, description="Keep a seeded sample of this many training rows.")
    max_eval_examples: int | None = Field(None, gt=0, description="Keep a seeded sample of this many validation and test rows.")
    format: Literal["auto", "conll"] = Field("auto", description="'conll' reads a token and its tag per line (blank "
                                             "lines between sentences); 'auto' does so for .conll, .iob and .bio files.")
    tag_column: int = Field(-1, description="CoNLL: the column holding the tag (0 is the token; -1 the last).")
    tag_scheme: Literal["auto", "bio", "iob1", "bioes"] = Field(
        "auto", description="Token tasks: the tags' scheme, normalised to BIO; 'auto' = BIOES if E-/S- tags appear, else BIO.")
    repair_tags: bool = Field(False, description="Token tasks: an I- tag that continues no entity starts one "
                              "instead of failing.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


class LoraConfig(_Strict):
    r: int = Field(8, gt=0, description="Rank of the LoRA update matrices.")
    alpha: int = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Literal["auto"] | list[str] = Field(
        "auto", description="Module names to adapt; 'auto' = every linear layer inside the encoder blocks.")
    use_dora: bool = Field(False, description="DoRA: split each adapted weight into a magnitude and a direction, the "
                           "LoRA update acting on the direction (merged into `model/` as plain LoRA is).")
    use_rslora: bool = Field(False, description="rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r, "
                             "which keeps high ranks learning.")


class Ia3Config(_Strict):
    target_modules: Literal["auto"] | list[str] = Field(
        "auto", description="method=ia3: modules whose outputs (or, for feed-forward ones, inputs) are rescaled; "
                            "'auto' = peft's choice for the architecture (BERT: key, value, output.dense).")
    feedforward_modules: Literal["auto"] | list[str] = Field(
        "auto", description="method=ia3: the target modules that are feed-forward layers (rescaled on their input); "
                            "'auto' = peft's choice for the architecture.")


class PromptConfig(_Strict):
    num_virtual_tokens: int = Field(20, gt=0, description="method=prompt: trained embeddings put before every input "
                                    "(the artifact's tokenizer adds them as special tokens).")
    init_text: str | None = Field(None, description="method=prompt: start the virtual tokens from the embeddings "
                                  "of this text's tokens (special tokens included, as peft tokenizes it; repeated or cut "
                                  "to length); null = random.")


class FreezeConfig(_Strict):
    layers: int | None = Field(None, ge=0, description="method=freeze: freeze the embeddings and only the bottom N "
                               "encoder layers; null freezes the whole encoder.")


class EarlyStoppingConfig(_Strict):
    metric: str = Field("auto", description="Validation metric to watch; 'auto' = f1_macro (classification), "
                        "f1_micro (multilabel), r2 (regression). 'loss' is also accepted.")
    patience: int | None = Field(2, ge=1, description="Evaluations without improvement before stopping; null = never stop early.")


Tracker = Literal["tensorboard", "mlflow", "wandb", "trackio"]


class DropoutConfig(_Strict):
    hidden: float | None = Field(None, ge=0, lt=1, description="Dropout on hidden states and embeddings (BERT "
                                 "hidden_dropout_prob, GPT-2 resid_pdrop and embd_pdrop, T5 dropout_rate); null = "
                                 "the model's own.")
    attention: float | None = Field(None, ge=0, lt=1, description="Dropout on attention probabilities (BERT "
                                    "attention_probs_dropout_prob, Llama attention_dropout, GPT-2 attn_pdrop); null = "
                                    "the model's own.")
    classifier: float | None = Field(None, ge=0, lt=1, description="Dropout before the classification head (BERT "
                                     "classifier_dropout, DistilBERT seq_classif_dropout); null = the model's own.")


class TrainConfig(_Strict):
    epochs: int | Literal["auto"] = Field(3, description="Passes over the training data (early stopping may end "
                                          "sooner); 'auto' = until the validation metric stops improving "
                                          "(early_stopping.patience evaluations), at most max_epochs. The default "
                                          "is the task's own: auto for the tasks that score text (classification, "
                                          "regression, multilabel, token_classification, embedding), 3 for "
                                          "generation.")
    max_epochs: int = Field(20, gt=0, description="epochs: auto: the most passes over the training data.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps, whatever the epochs.")
    max_minutes: float | None = Field(None, gt=0, description="Stop at the first evaluation after this many minutes "
                                      "of training (evaluation and checkpoints not counted).")
    batch_size: int = Field(32, gt=0, description="Examples per optimizer micro-step, per process.")
    eval_batch_size: int = Field(128, gt=0, description="Examples per forward pass in evaluation, per process.")
    lr: float | Literal["auto"] = Field("auto", description="Peak learning rate; 'auto' = 5e-5 (full), 5e-4 (lora), 1e-3 (freeze), "
                                                    "3e-3 (ia3), 3e-2 (prompt).")
    head_lr: float | None = Field(None, gt=0, description="Peak learning rate of the task head and pooler; null = lr, "
                                  "or with lr: auto the task's own multiple of it (10x for the tasks with a "
                                  "head, at most 5e-3; not with method: freeze, which trains the head alone).")
    scheduler: Literal["auto", "linear", "cosine", "constant", "exponential"] = Field(
        "auto", description="Decay after warmup; 'auto' = linear over the run's steps, or constant with epochs: auto "
        "(a schedule that needs no length in advance).")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Fraction of optimizer steps spent warming up linearly "
                                "(with epochs: auto, of the first epoch's).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decay (not applied to biases and LayerNorm weights).")
    l1: float = Field(0.0, ge=0, description="L1 penalty: this times the summed absolute values of the trained weights "
                      "(not biases and LayerNorm weights) is added to the training objective; the logged losses "
                      "are the task's loss without it. 0 = off.")
    dropout: DropoutConfig = Field(default_factory=DropoutConfig)
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Classification only.")
    grad_accum: int = Field(1, gt=0, description="Micro-steps per optimizer step.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null disables clipping.")
    max_length: int = Field(128, gt=2, description="Tokens kept per example, special tokens included.")
    stride: int = Field(32, ge=0, description="Token tasks: a text longer than max_length is cut into windows "
                        "sharing this many tokens, so no word is dropped.")
    label_all_tokens: bool = Field(False, description="Token tasks: train every sub-token of a word, not only the first.")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="'auto' = bf16 on a CUDA device that supports it, fp16 on other CUDA devices, fp32 on CPU.")
    seed: int = Field(42, description="Seeds weights of the new head, dropout, batch order and data splits.")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        # YAML reads a bare `no` (in a file or in --set) as false.
        return "no" if value is False else value
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    class_weights: Literal["auto", "none"] = Field(
        "auto", description="'auto' weighs classes by inverse training frequency (pos_weight for multilabel).")
    threshold: Annotated[float, Field(gt=0, lt=1)] | Literal["auto"] = Field(
        "auto", description="Multi-label decision threshold on each label's probability; 'auto' = one per label, "
        "fitted on validation for the primary metric (the global best for labels too rare to fit).")
    calibrate: bool = Field(True, description="Classification and multi-label: fit a temperature (per-label Platt "
                            "scaling for multi-label) on validation so that scores are calibrated probabilities "
                            "(other tasks have nothing to calibrate).")
    eval_every: Literal["epoch"] | int = Field("epoch", description="'epoch' or a number of optimizer steps.")
    save_every: Literal["epoch"] | int = Field("epoch", description="'epoch' or a number of optimizer steps.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk (the newest ones).")
    group_by_length: bool = Field(True, description="Batch examples of similar length together (seeded) to cut padding.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    report_to: list[Tracker] = Field(
        default_factory=list, description="Experiment trackers the run logs to, any of: "
        f"{', '.join(get_args(Tracker))}; offline by default (tensorboard and MLflow under OUTPUT_DIR).")

    @field_validator("report_to", mode="before")
    @classmethod
    def _known_trackers(cls, value):
        value = [] if value is None else [value] if isinstance(value, str) else value
        if isinstance(value, list):
            unknown = [name for name in value if name not in get_args(Tracker)]
            if unknown:
                raise ValueError(f"unknown tracker(s) {unknown}; accepted: {', '.join(get_args(Tracker))}")
            value = list(dict.fromkeys(value))
        return value

    @model_validator(mode="after")
    def _steps_positive(self) -> TrainConfig:
        for name in ("eval_every", "save_every"):
            value = getattr(self, name)
            if isinstance(value, int) and value <= 0:
                raise ValueError(f"{name} must be 'epoch' or a positive number of steps, got {value}")
        return self

    @field_validator("epochs")
    @classmethod
    def _epochs_positive(cls, value):
        if isinstance(value, int) and value <= 0:
            raise ValueError(f"must be 'auto' or a positive number, got {value}")
        return value

    @property
    def epoch_cap(self) -> int:
        """The most epochs the run may take: ``epochs``, or ``max_epochs`` with ``epochs: auto``."""
        return self.max_epochs if self.epochs == "auto" else self.epochs

    @property
    def schedule(self) -> str:
        """The learning-rate schedule after warmup: ``scheduler``, with ``auto`` resolved."""
        if self.scheduler != "auto":
            return self.scheduler
        return "constant" if self.epochs == "auto" else "linear"


class ExportConfig(_Strict):
    onnx: bool = Field(True, description="Export to ONNX after training and gate it against PyTorch (tuneserve export does the same later).")
    int8: Literal["auto", "on", "off"] = Field(
        "auto", description="Dynamic int8 quantization: 'auto' keeps it only if it passes the gate, 'on' fails the export if it cannot.")

    @field_validator("int8", mode="before")
    @classmethod
    def _yaml_on_off(cls, value):
        # YAML 1.1 reads a bare `on` and `off` (in a file or in --set) as true and false.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
    int8_min_agreement: float = Field(0.99, gt=0, le=1, description="Label agreement with PyTorch an int8 model must reach.")
    int8_confidence: float = Field(
        0.95, ge=0, lt=1, description="Confidence at which the held-out decisions must show int8_min_agreement: the "
        "lower end of the agreement's Wilson interval at this level is what the gate compares (0: the measured "
        "agreement). At 0.95, 1,057 decisions show 99% with up to 4 differing; fewer than 381 never do.")
    int8_max_metric_drop: float = Field(0.005, ge=0, description="Largest drop of the primary metric int8 may cause (0.005 = 0.5 points).")
    aggregation: Literal["first", "max", "simple"] = Field(
        "first", description="Token tasks: how predictions turn sub-token scores into entities (as transformers' "
        "pipeline: a word's first sub-token, its most confident one, or sub-tokens grouped by their own tags).")


class EmbeddingConfig(_Strict):
    scale: float = Field(20.0, gt=0, le=1000, description="Embedding: the ranking loss's similarity scale (1 / "
                         "temperature): each query's cosine to every positive of its batch, times this, is what "
                         "cross-entropy reads (the other positives are its negatives).")
    pooling: Literal["auto", "mean", "cls", "max"] = Field(
        "auto", description="Embedding: how token states become one vector; auto: the base model's own, from its "
        "sentence-transformers files (mean where it has none).")


class GenerationConfig(_Strict):
    prompt: Literal["auto", "chat", "plain"] = Field(
        "auto", description="Generation: how an input becomes the prompt: the model's chat template (chat), the "
        "template alone (plain), or chat when the tokenizer has a chat template (auto).")
    template: str = Field("{input}", description="Generation: the user turn (chat) or whole prompt (plain); "
                          "{input} marks the input, exactly once.")
    system: str | None = Field(None, description="Generation: a system turn before the user turn (chat prompts).")
    max_target_length: int = Field(64, gt=0, description="Generation: target tokens kept in training (longer "
                                   "targets are cut, and counted).")
    max_new_tokens: int = Field(64, gt=0, le=4096, description="Generation: most tokens written per input in "
                                "evaluation (and the served default).")
    num_beams: int = Field(1, ge=1, le=16, description="Generation: beam search width (1 = greedy, unless sampling).")
    do_sample: bool = Field(False, description="Generation: sample instead of greedy/beam decoding (seeded by train.seed).")
    temperature: float = Field(1.0, gt=0, le=5, description="Generation: sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Generation: nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Generation: sample among the k likeliest tokens (0 = all).")
    eval_examples: int = Field(64, gt=0, description="Generation: validation and test examples written per "
                               "evaluation (generation is slow on a CPU; loss covers every example).")

    @field_validator("template")
    @classmethod
    def _one_input(cls, value: str) -> str:
        if value.count("{input}") != 1:
            raise ValueError(f"must contain {{input}} exactly once (found {value.count('{input}')} times)")
        return value

    @model_validator(mode="after")
    def _one_decoding(self) -> GenerationConfig:
        if self.do_sample and self.num_beams > 1:
            raise ValueError("generation: choose beam search (num_beams > 1) or sampling (do_sample), not both")
        if not self.do_sample and (self.temperature != 1.0 or self.top_p != 1.0 or self.top_k):
            raise ValueError("generation: temperature, top_p and top_k apply only with do_sample: true")
        return self

    def prompt_format(self, tokenizer: Any, data_system: str | None = None) -> PromptFormat:
        """The prompt format for this tokenizer (``auto``: its chat template when it has one).

        Args:
            data_system: the system turn of training data given as chat conversations; it becomes the prompt's
                system turn (``generation.system`` may repeat it, not contradict it).

        Raises:
            ConfigError: ``prompt: chat`` for a tokenizer without a chat template; conversations with a system turn
                for a plain prompt, or one other than ``generation.system``.
        """
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if self.prompt == "chat" and not has_chat:
            raise ConfigError("generation.prompt: chat, but this model's tokenizer has no chat template; use plain")
        style = "chat" if self.prompt == "chat" or (self.prompt == "auto" and has_chat) else "plain"
        system = self.system
        if data_system is not None:
            if style != "chat":
                raise ConfigError("the training conversations have a system turn, but this model's prompt is plain "
                                  "(no chat template): remove the system turns or use a model with a chat template")
            if system is not None and system != data_system:
                raise ConfigError(f"generation.system {system!r} differs from the training conversations' system "
                                  f"turn {data_system!r}")
            system = data_system
        return PromptFormat(style=style, template=self.template, system=system if style == "chat" else None)

    def decoding(self) -> dict[str, Any]:
        """Keyword arguments of transformers' ``generate`` (and the served defaults)."""
        out: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
                               "do_sample": self.do_sample}
        if self.do_sample:
            out.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return out


class SearchRange(_Strict):
    """One searched value of ``tuneserve tune``: a range (``low``..``high``, on a log scale with ``log``) or ``choices``."""

    low: int | float | None = Field(None, description="Smallest value; integers stay integers (when the field takes them).")
    high: int | float | None = Field(None, description="Largest value (included).")
    log: bool = Field(False, description="Sample on a log scale (both bounds > 0).")
    choices: list[bool | int | float | str | None] | None = Field(
        None, min_length=1, description="The values to choose from, instead of a range (numbers, words, true/false, null).")

    @model_validator(mode="after")
    def _range_or_choices(self) -> SearchRange:
        if (self.choices is None) == (self.low is None or self.high is None):
            raise ValueError("give either low and high, or choices")
        if self.choices is not None and self.log:
            raise ValueError("log applies to a range (low, high), not to choices")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        if self.log and self.low is not None and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


# Soft prompts and IA3 scaling vectors are few parameters, each acting on every input: their papers train them with
# larger steps (IA3 in T-Few: 3e-3; prompt tuning: 0.3 with Adafactor, 3e-2 a common AdamW choice).
DEFAULT_LR = {"full": 5e-5, "lora": 5e-4, "freeze": 1e-3, "ia3": 3e-3, "prompt": 3e-2}
# The most a task's multiple (head_lr_factor) raises the head's rate to: what the defaults sweep chose for LoRA
# (10x 5e-4); a faster head was never measured, and a method whose body already trains faster keeps one rate.
MAX_DEFAULT_HEAD_LR = 5e-3
# Options that only one method reads (the older lora fields stay accepted with any method, as configs shipped with a
# lora section suggest `--set method=full`).
METHOD_OPTIONS = {"lora.use_dora": "lora", "lora.use_rslora": "lora", "ia3.*": "ia3", "prompt.*": "prompt",
                  "freeze.layers": "freeze"}


class Config(_Strict):
    task: Task = Field(Task.CLASSIFICATION, description=" | ".join(t.value for t in Task))
    model: str = Field("minilm", description="'minilm' (the bundled all-MiniLM-L6-v2), 'smollm2' (the bundled "
                       "SmolLM2-135M-Instruct, a small Llama-architecture language model), 'minilm2minilm' (an encoder-decoder "
                       "warm-started from MiniLM, for generation), a local directory, or a Hub model id.")
    name: str | None = Field(None, description="Model name in the artifact and model store; default: the config file's "
                             "name without its extension (else the output directory's name).")
    _file_stem: str | None = PrivateAttr(None)  # the config file's name, the model's when it names none
    data: DataConfig
    method: Literal["full", "lora", "freeze", "ia3", "prompt"] = Field(
        "lora", description="What is trained: everything, LoRA adapters + head, the head only, IA3 scaling vectors + "
        "head, or soft-prompt tokens + head (prompt tuning; classification, multilabel and regression).")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    ia3: Ia3Config = Field(default_factory=Ia3Config)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)
    output_dir: str = Field("runs/tuneserve", description="Checkpoints go to OUTPUT_DIR/checkpoints, the artifact to OUTPUT_DIR/artifact.")
    search: dict[str, SearchRange] = Field(
        default_factory=dict, description="`tuneserve tune` only (train ignores it): dotted config path -> "
        "{low, high, log} or {choices: [...]}, e.g. `train.lr: {low: 1.0e-4, high: 3.0e-3, log: true}`.")

    @model_validator(mode="after")
    def _cross_field_checks(self) -> Config:
        for field, column in zip(("text", "label"), self.task.spec.default_columns):
            if field not in self.data.model_fields_set:  # the task's own column names (generation: input, target)
                setattr(self.data, field, column)
        for field, value in self.task.spec.train_defaults.items():  # the task's own training defaults
            if field not in self.train.model_fields_set:
                setattr(self.train, field, value)
        metric = self.train.early_stopping.metric
        allowed = ("auto", "loss", *self.task.spec.metric_names)
        if metric not in allowed:
            raise ValueError(f"train.early_stopping.metric {metric!r} is not a {self.task.value} metric; choose one of {list(allowed)}")
        if "stride" in self.task.spec.options and self.train.stride >= self.train.max_length // 2:
            raise ValueError(f"train.stride {self.train.stride} must be below half of train.max_length "
                             f"({self.train.max_length}) so that windows move forward")
        for option, used in (("data.label_delimiter", self.data.label_delimiter is not None),
                             ("train.label_smoothing", bool(self.train.label_smoothing)),
                             ("data.tag_scheme", self.data.tag_scheme != "auto"),
                             ("data.repair_tags", self.data.repair_tags),
                             ("train.label_all_tokens", self.train.label_all_tokens),
                             ("data.augment", self.data.augment.enabled),
                             ("data.negative", self.data.negative is not None),
                             ("data.corpus", self.data.corpus is not None),
                             ("generation.*", self.generation != GenerationConfig()),
                             ("embedding.*", self.embedding != EmbeddingConfig())):
            key = option.split(".")[1] if not option.endswith("*") else option.split(".")[0]
            if used and key not in self.task.spec.options:
                takers = " or ".join(t.value for t in Task if key in t.spec.options)
                raise ValueError(f"{option} only applies to task: {takers}")
        for option, method in METHOD_OPTIONS.items():
            section, _, key = option.partition(".")
            value, default = getattr(self, section), type(getattr(self, section))()
            used = value != default if key == "*" else getattr(value, key) != getattr(default, key)
            if used and self.method != method:
                raise ValueError(f"{option} only applies to method: {method} (method is {self.method})")
        # peft's prompt tuning prepends virtual tokens: one output per text is unaffected, per-token outputs would shift.
        if self.method == "prompt" and self.task.spec.auto_model != "AutoModelForSequenceClassification":
            raise ValueError(f"method: prompt applies to classification, multilabel and regression, not task: "
                             f"{self.task.value}")
        self._check_search()
        return self

    def _check_search(self) -> None:
        """Each searched path names a value of this config, and every candidate value passes that field's own
        checks: the bounds (and choices) are tried by building the config with them."""
        base = self.model_dump(exclude_unset=True, exclude={"search"})
        for path, space in self.search.items():
            if path.split(".")[0] in ("search", "output_dir"):
                raise ValueError(f"'search.{path}': tune sets {path.split('.')[0]} itself; it cannot be searched")
            field = config_field(path)
            if space.choices is None:
                kinds = _annotation_types(field.annotation)
                if not kinds & {int, float}:
                    raise ValueError(f"'search.{path}': {path} is not a number; give choices instead of low and high")
                if float not in kinds and not all(_is_int(v) for v in (space.low, space.high)):
                    raise ValueError(f"'search.{path}': {path} takes integers; write low and high as integers "
                                     f"(got {space.low}, {space.high})")
            candidates = space.choices if space.choices is not None else [space.low, space.high]
            for value in candidates:
                try:
                    Config.model_validate(with_value(base, path, value))
                except ValidationError as exc:
                    raise ValueError(f"'search.{path}': {value!r} is not a valid {path}: {_describe(exc)}") from None

    def search_kind(self, path: str) -> Literal["int", "float", "choices"]:
        """How ``tuneserve tune`` draws the searched value at ``path``: integers stay integers."""
        space = self.search[path]
        if space.choices is not None:
            return "choices"
        takes_int = int in _annotation_types(config_field(path).annotation)
        return "int" if takes_int and _is_int(space.low) and _is_int(space.high) else "float"

    @property
    def lr(self) -> float:
        return DEFAULT_LR[self.method] if self.train.lr == "auto" else float(self.train.lr)

    @property
    def head_lr(self) -> float | None:
        """The task head's (and pooler's) learning rate: train.head_lr, else with lr: auto the task's multiple of it,
        up to MAX_DEFAULT_HEAD_LR (None: lr, one rate for every trained parameter)."""
        if self.train.head_lr is not None:
            return float(self.train.head_lr)
        factor = self.task.spec.head_lr_factor
        # the task's pair of rates goes with the default lr (a config that sets lr has chosen its rate for all);
        # method: freeze trains the head alone, at lr
        if self.train.lr != "auto" or self.method == "freeze" or factor == 1:
            return None
        head = min(self.lr * factor, MAX_DEFAULT_HEAD_LR)
        return head if head > self.lr else None

    @property
    def monitor(self) -> str:
        metric = self.train.early_stopping.metric
        spec = self.task.spec
        return (spec.early_stopping_metric or spec.default_metric) if metric == "auto" else metric

    @property
    def primary_metric(self) -> str:
        """The metric the artifact is judged by (against its baselines): the task's own unless one is chosen."""
        metric = self.train.early_stopping.metric
        return self.task.spec.default_metric if metric == "auto" else metric

    @property
    def loss_options(self) -> dict[str, Any]:
        """Options of the task's loss beyond class weights and label smoothing (embedding: the scale)."""
        return {"scale": self.embedding.scale} if "embedding" in self.task.spec.options else {}

    @property
    def task_training_options(self) -> dict[str, Any]:
        """Options of train: that the task's spec takes when it encodes training examples."""
        options = {k: getattr(self.train, k) for k in ("label_all_tokens",) if k in self.task.spec.options}
        if self.task.spec.writes:
            options["max_target_length"] = self.generation.max_target_length
        return options

    @property
    def run_name(self) -> str:
        """``name``, else the config file's stem, else the output directory's name."""
        return self.name or self._file_stem or Path(self.output_dir).resolve().name


def _annotation_types(annotation: Any) -> set:
    return {annotation, *get_args(annotation)}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def config_field(path: str):
    """The pydantic field a dotted path (``train.lr``) names.

    Raises:
        ValueError: no such key, or the path ends at a section rather than a value.
    """
    model: type[BaseModel] = Config
    keys = path.split(".")
    for depth, key in enumerate(keys):
        field = model.model_fields.get(key)
        if field is None:
            raise ValueError(f"'search.{path}': unknown config key '{'.'.join(keys[:depth + 1])}'")
        nested = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) else None
        if depth == len(keys) - 1:
            if nested is not None:
                raise ValueError(f"'search.{path}': {path} is a section; name one of its values")
            return field
        if nested is None:
            raise ValueError(f"'search.{path}': '{'.'.join(keys[:depth + 1])}' is a value, not a section")
        model = nested
    raise AssertionError("unreachable")


def with_value(raw: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of raw config data with the value at a dotted path replaced (sections created as needed)."""
    out = copy.deepcopy(raw)
    node = out
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return out


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``key.path=value`` override to raw YAML data; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value")
    path, _, text = assignment.partition("=")
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {assignment!r}: empty key in {path!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {assignment!r}: value is not valid YAML ({exc})") from None
    node = raw
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: '{'.'.join(keys[:depth + 1])}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, raw: dict | None = None) -> Config:
    """Load, override and validate a run configuration.

    Raises:
        ConfigError: unreadable YAML, an unknown key, or an invalid value; the message names the
            file and the field's full path.
    """
    source = str(path) if path is not None else "config"
    if raw is None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) if path is not None else {}
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read config ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML ({exc})") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a mapping of keys to values")
    for assignment in overrides or []:
        apply_override(raw, assignment)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: " + _describe(exc)) from None
    if path is not None:
        cfg._file_stem = Path(path).stem
    return cfg


_UNION_TAG = re.compile(r"^(float|int|str|bool|list\[.*\]|literal\[.*\]|function-.*)$")


def _describe(exc: ValidationError) -> str:
    """One line per offending field; the alternatives of a union are joined with 'or'."""
    by_field: dict[str, list[str]] = {}
    for error in exc.errors():
        loc = [str(p) for p in error["loc"] if not _UNION_TAG.match(str(p))]
        where = ".".join(loc)
        if error["type"] == "extra_forbidden":
            message = "unknown key" + _did_you_mean(loc)
        elif error["type"] == "missing":
            message = "is required"
        else:
            message = error["msg"].removeprefix("Value error, ")
        by_field.setdefault(where, []).append(message)
    return "; ".join(
        (f"'{where}': " if where else "") + " or ".join(dict.fromkeys(messages))
        for where, messages in by_field.items()
    )


def _did_you_mean(loc: list[str]) -> str:
    """' (did you mean 'train.epochs'?)' for an unknown key close to a key of its section."""
    model: type[BaseModel] = Config
    names = iter(loc[:-1])
    for name in names:
        field = model.model_fields.get(name)
        nested = [t for t in (field.annotation, *get_args(field.annotation))
                  if isinstance(t, type) and issubclass(t, BaseModel)] if field is not None else []
        if not nested:
            return ""
        if get_origin(field.annotation) is dict:  # a keyed section (search: config path -> range): skip the key
            next(names, None)
        model = nested[0]
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.6)
    return f" (did you mean '{'.'.join([*loc[:-1], close[0]])}'?)" if close else ""


def reference_table() -> str:
    """The config reference as a Markdown table (the docs build puts it into docs/configuration.md)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            nested = [t for t in (field.annotation, *get_args(field.annotation))
                      if isinstance(t, type) and issubclass(t, BaseModel)]
            keyed = get_origin(field.annotation) is dict  # search: config path -> SearchRange
            if nested and not keyed:
                walk(nested[0], f"{prefix}{name}.")
                continue
            default = "required" if field.is_required() else field.get_default(call_default_factory=True)
            default = getattr(default, "value", default)
            text = (field.description or "").replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | `{'null' if default is None else default}` | {text} |")
            if nested and keyed:
                walk(nested[0], f"{prefix}{name}.PATH.")

    walk(Config, "")
    return "\n".join(rows)
