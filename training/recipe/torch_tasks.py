"""The torch side of each task: its transformers model class, peft task type, loss and target dtype.

Everything torch-free about a task lives in its spec under ``core/tasks/``; this registry adds what only
training needs. Adding a task: one entry in :data:`TORCH_TASKS`. A task that encoder-decoder models (T5, BART,
EncoderDecoderModel) can do has a second entry in :data:`ENCODER_DECODER_TASKS`, chosen when the model's config says
``is_encoder_decoder``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import ConfigError
from core.tasks import Task
from core.tasks.generation import ENCODER_DECODER

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# The target value that losses and metrics skip (sub-tokens after a word's first, padding): PyTorch's default.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class TorchTask:
    peft_task_type: str  # peft.TaskType name: SEQ_CLS, TOKEN_CLS, ...
    target_dtype: torch.dtype
    # (targets of the training split, number of outputs, class_weights, label_smoothing) -> loss function
    make_loss: Callable[[np.ndarray, int, str, float], LossFn]
    pads_targets: bool = False  # one target per token, padded with IGNORE_INDEX (else one per example)
    shifts_labels: bool = False  # position t's logits predict label t + 1 (a causal LM reading its own labels)
    encoder_decoder: bool = False  # the inputs go to an encoder, the labels (shifted right) to a decoder
    auto_model: str | None = None  # the transformers Auto class; None: the one the task spec names
    # (model, its directory, config) -> the module that trains: the model with what the task adds around it (None: the
    # model itself)
    wrap: Callable[[Any, str, Any], Any] | None = None
    scores_base_model: bool = False  # the base model's own test metrics are a baseline (scored before training)

    def collect(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, Any, Any]:
        """Gathered evaluation batches of ``(logits, targets)`` as ``(loss logits, loss targets, targets,
        logits)``: the last two as the task spec's ``evaluate`` and ``scores`` take them (for token tasks, one
        array per window holding the scored tokens only)."""
        if not self.pads_targets:
            logits, targets = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
            return logits, targets, targets.numpy(), logits.numpy()
        rows_t, rows_l, flat_t, flat_l = [], [], [], []
        for logits, targets in batches:
            mask = targets != IGNORE_INDEX
            flat_l.append(logits[mask])
            flat_t.append(targets[mask])
            for r in range(len(targets)):
                rows_t.append(targets[r][mask[r]].numpy())
                rows_l.append(logits[r][mask[r]].numpy())
        return torch.cat(flat_l), torch.cat(flat_t), rows_t, rows_l


def auto_model_class(task: Task, torch_side: TorchTask | None = None):
    """The transformers Auto class that builds and loads this task's model: the one ``torch_side`` (see
    :func:`model_task`) names, else the one the task spec names."""
    import transformers

    return getattr(transformers, (torch_side.auto_model if torch_side else None) or task.spec.auto_model)


def load_task_model(task: Task, path: str, torch_side: TorchTask | None = None, **kwargs: Any):
    """A saved model of ``task`` (``kwargs`` go to ``from_pretrained``), with what the task puts around the
    transformer (sentence embeddings: its pooling, read from the model's own files): what the trainer trained."""
    torch_side = torch_side or torch_task(task)
    model = auto_model_class(task, torch_side).from_pretrained(path, **kwargs)
    return torch_side.wrap(model, str(path), None) if torch_side.wrap else model


def is_encoder_decoder(path: str) -> bool:
    """Whether the model at ``path`` (a directory or a Hub id) is an encoder-decoder model, as its config says.

    Raises:
        ConfigError: there is no readable config at ``path``.
    """
    from transformers import AutoConfig

    try:
        return bool(getattr(AutoConfig.from_pretrained(path), "is_encoder_decoder", False))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model: cannot read the config of {path!r} ({str(exc).splitlines()[0][:300]})") from None


def _single_label_loss(targets: np.ndarray, num_outputs: int, class_weights: str, smoothing: float) -> LossFn:
    weight = None
    if class_weights == "auto":  # inverse training frequency
        counts = np.bincount(targets, minlength=num_outputs).astype(np.float64)
        weight = torch.tensor(len(targets) / (num_outputs * np.maximum(counts, 1)), dtype=torch.float32)

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        w = weight.to(logits.device) if weight is not None else None
        return F.cross_entropy(logits.float(), labels, weight=w, label_smoothing=smoothing)

    return loss


def _multi_label_loss(targets: np.ndarray, num_outputs: int, class_weights: str, smoothing: float) -> LossFn:
    weight = None
    if class_weights == "auto":  # pos_weight: negatives per positive of each label
        positives = targets.sum(axis=0)
        weight = torch.tensor(np.where(positives > 0, (len(targets) - positives) / np.maximum(positives, 1), 1.0),
                              dtype=torch.float32)

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        w = weight.to(logits.device) if weight is not None else None
        return F.binary_cross_entropy_with_logits(logits.float(), labels, pos_weight=w)

    return loss


def _regression_loss(targets: np.ndarray, num_outputs: int, class_weights: str, smoothing: float) -> LossFn:
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(logits.float().squeeze(-1), labels)

    return loss


def _token_loss(targets: Any, num_outputs: int, class_weights: str, smoothing: float) -> LossFn:
    # No class weights: O outnumbers every entity tag, and weighting by inverse frequency trades precision for
    # recall in a way entity F1 does not reward.
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, label_smoothing=smoothing)

    return loss


def _causal_lm_loss(targets: Any, num_outputs: int, class_weights: str, smoothing: float) -> LossFn:
    """Next-token cross-entropy over the target tokens (the prompt and padding carry IGNORE_INDEX)."""
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shifted = logits[:, :-1].float()
        return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX, label_smoothing=smoothing)

    return loss


def _seq2seq_lm_loss(targets: Any, num_outputs: int, class_weights: str, smoothing: float) -> LossFn:
    """Cross-entropy of the decoder's logits against the target tokens at the same positions: no shift here, the
    decoder read the labels shifted right (``decoder_input_ids``, made by the model from the labels; padding
    carries IGNORE_INDEX)."""
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, label_smoothing=smoothing)

    return loss


def _sentence_embedder(model, path: str, cfg):
    from training.recipe.sentence_embedder import sentence_embedder

    return sentence_embedder(model, path, cfg)


def _ranking_loss(targets: Any, num_outputs: int, class_weights: str, smoothing: float, *, scale: float) -> LossFn:
    from training.recipe.sentence_embedder import ranking_loss

    return ranking_loss(scale)


TORCH_TASKS: dict[Task, TorchTask] = {
    Task.CLASSIFICATION: TorchTask("SEQ_CLS", torch.long, _single_label_loss),
    Task.MULTILABEL: TorchTask("SEQ_CLS", torch.float32, _multi_label_loss),
    Task.REGRESSION: TorchTask("SEQ_CLS", torch.float32, _regression_loss),
    Task.TOKEN_CLASSIFICATION: TorchTask("TOKEN_CLS", torch.long, _token_loss, pads_targets=True),
    Task.GENERATION: TorchTask("CAUSAL_LM", torch.long, _causal_lm_loss, pads_targets=True,
                               shifts_labels=True),
    Task.EMBEDDING: TorchTask("FEATURE_EXTRACTION", torch.long, _ranking_loss, wrap=_sentence_embedder,
                              scores_base_model=True),
}
ENCODER_DECODER_TASKS: dict[Task, TorchTask] = {
    Task.GENERATION: TorchTask("SEQ_2_SEQ_LM", torch.long, _seq2seq_lm_loss, pads_targets=True,
                               encoder_decoder=True, auto_model=ENCODER_DECODER.auto_model),
}


def torch_task(task: Task, encoder_decoder: bool = False) -> TorchTask:
    """The task's torch side; with ``encoder_decoder``, its encoder-decoder entry where it has one (elsewhere such a
    model does the task as any other: transformers' BART and T5 classifiers read the text as BERT's do)."""
    return ENCODER_DECODER_TASKS.get(task, TORCH_TASKS[task]) if encoder_decoder else TORCH_TASKS[task]


def model_task(task: Task, path: str) -> TorchTask:
    """The torch side of ``task`` for the model at ``path`` (a directory or a Hub id): the encoder-decoder entry
    when the task has one and the model's config says ``is_encoder_decoder``.

    Raises:
        ConfigError: there is no readable config at ``path``.
    """
    return torch_task(task, task in ENCODER_DECODER_TASKS and is_encoder_decoder(path))
