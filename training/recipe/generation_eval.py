"""Evaluating a generation model: loss over every example, and text written for a bounded sample.

Validation loss (and perplexity) is cheap and covers every example, so early stopping watches it. Writing text
is slow on a CPU, so the generation metrics (BLEU, ROUGE, ...) are computed on the first
``generation.eval_examples`` examples of a split, with the configured decoding, in batches padded as the model
reads them (:class:`core.tasks.generation.Layout`: on the left for a decoder-only model, on the right for an
encoder).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from core.metrics import Evaluation
from core.tasks.generation import GeneratedText, Prompter, layout
from training.recipe.torch_tasks import IGNORE_INDEX


def keeps_logits(model) -> bool:
    """Whether the causal LM under ``model`` (a peft or DDP wrapper, or none) computes logits for its last positions
    only when asked (``logits_to_keep``: Llama, GPT-2, Qwen2, ... in transformers 5)."""
    while hasattr(model, "module"):  # DDP
        model = model.module
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return "logits_to_keep" in inspect.signature(type(model).forward).parameters


def causal_lm_logits(model, batch: dict, labels: torch.Tensor, keeps: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal LM's logits for the positions its loss reads, and the labels they line up with (shift them as
    usual: logits ``[:, :-1]`` against labels ``[:, 1:]``).

    The loss covers the target tokens only, and the positions before the batch's first target (the prompt: most of
    a long input) need no logits: with ``keeps`` (:func:`keeps_logits`) the model runs its LM head, the largest
    matmul of a small model with a large vocabulary, on the last positions only. The loss is the same.
    """
    width = labels.shape[1]
    columns = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    keep = width - max(int(columns[0]) - 1, 0) if keeps and len(columns) else width
    if keep == width:
        return model(**batch).logits, labels
    return model(**batch, logits_to_keep=keep).logits, labels[:, -keep:]


@torch.no_grad()
def token_loss(model, dataloader, accelerator, desc: str, *, shift: bool = True) -> float:
    """Mean next-token cross-entropy over every target token of the split, on every process.

    ``shift``: a causal LM's logits at position t predict label t + 1; an encoder-decoder model's decoder read the
    labels shifted right already (``decoder_input_ids`` in the batch), so its logits line up with them
    (``TorchTask.shifts_labels``).
    """
    model.eval()
    keeps = shift and keeps_logits(model)
    total = torch.zeros(2, device=accelerator.device)
    for batch in tqdm(dataloader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        labels = batch.pop("labels")
        if shift:
            logits, labels = causal_lm_logits(model, batch, labels, keeps)
            logits, labels = logits[:, :-1].float(), labels[:, 1:]
        else:
            logits = model(**batch).logits.float()
        total[0] += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                      ignore_index=IGNORE_INDEX, reduction="sum")
        total[1] += (labels != IGNORE_INDEX).sum()
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return float(total[0] / total[1].clamp(min=1))


@torch.no_grad()
def generate(model, prompter: Prompter, texts: Sequence[str], decoding: dict, *, batch_size: int = 8, seed: int = 0,
             desc: str = "generate") -> list[GeneratedText]:
    """Write an answer to each input: prompts rendered as in training, batches padded as the model reads them,
    ``decoding`` as transformers' ``generate`` takes it; only the new text is returned (for an encoder-decoder
    model, what its decoder wrote). Inputs over the prompter's budget are cut as in training."""
    was_training = model.training
    model.eval()
    tokenizer = prompter.tokenizer
    eos = tokenizer.eos_token_id
    lay = layout(bool(getattr(model.config, "is_encoder_decoder", False)))
    outputs: list[GeneratedText] = []
    torch.manual_seed(seed)  # sampling, when configured, is seeded
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, leave=False):
        ids = prompter.all(texts[start:start + batch_size])
        padded, mask = lay.pad_prompts(ids, tokenizer.pad_token_id)
        out = model.generate(input_ids=torch.tensor(padded, device=model.device),
                             attention_mask=torch.tensor(mask, device=model.device),
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, **decoding)
        width = len(padded[0])
        for row in (lay.new_tokens(r, width) for r in out.tolist()):
            stopped = eos in row
            row = row[:row.index(eos)] if stopped else row
            outputs.append(GeneratedText(tokenizer.decode(row, skip_special_tokens=True).strip(),
                                         "stop" if stopped else "length", len(row)))
    if was_training:
        model.train()
    return outputs


def with_loss(result: Evaluation, loss: float) -> Evaluation:
    """Add the split's loss and perplexity to its generation metrics."""
    result.metrics["loss"] = loss
    result.metrics["perplexity"] = math.exp(min(loss, 50.0))
    return result


def examples_table(texts: Sequence[str], references: Sequence[str], base: Sequence[GeneratedText],
                   tuned: Sequence[GeneratedText], count: int = 5) -> list[dict[str, str]]:
    """A few test examples with the reference, the base model's answer and the fine-tuned model's."""
    rows = np.arange(min(count, len(tuned)))
    return [{"input": texts[i], "reference": references[i], "base_model": base[i].text, "fine_tuned": tuned[i].text}
            for i in rows]
