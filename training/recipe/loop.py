"""The training recipe: one flat loop with Accelerate, from config to a trained, scored model.

Read :func:`fine_tune` top to bottom: set up, load and check data, build the model, train with periodic
evaluation, early stopping and checkpoints, restore the best weights, score the test split beside the
baselines. Publishing and export are later stages (training/run.py chains them). Runs unchanged on one
process or under ``accelerate launch`` / ``torchrun``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from core.calibration import Decisions, fit_calibration, fit_thresholds
from core.calibration import measure as measure_calibration
from core.encoding import Encoder
from core.errors import DataError, TrainingError
from core.metrics import Evaluation
from core.prompting import PromptFormat
from core.tasks import is_better
from core.tasks.generation import GeneratedText, Prompter
from training.recipe.batching import Collator, EncodedSplit, LengthGroupedBatchSampler, encode_split, without_content
from training.recipe.checkpoint import CHECKPOINTS, LoopState, latest_checkpoint, read_state, save_checkpoint
from training.config import Config
from training.data.reading import check_sources, load_dataset
from training.recipe.dropout import use_cpu_dropout
from training.recipe.generation_eval import causal_lm_logits, examples_table, generate, keeps_logits, token_loss, with_loss
from training.recipe.bases import check_model, resolve_model
from training.recipe.modeling import build_model, l1_parameters, optimizer_groups, trainable_state
from training.recipe.precision import DeviceFacts, choose_mixed_precision
from training.recipe.torch_tasks import IGNORE_INDEX, TorchTask, torch_task
from training.recipe.tracking import RunLabels, Tracking, closes_failed_runs, prefixed

logger = logging.getLogger(__name__)

BEST_WEIGHTS = "best.safetensors"
BASE_ANSWERS = "base_answers.json"  # generation: the base model's test answers, written before training
BASE_METRICS = "base_metrics.json"  # embedding: the base model's test metrics, measured before training


@dataclass
class RunResult:
    artifact_dir: Path | None
    metrics: dict[str, dict[str, float]]
    baselines: dict[str, dict[str, float]]
    test: Evaluation | None = None  # None: a run that stopped before the test split (publish=False)
    test_targets: np.ndarray | None = None
    test_scores: np.ndarray | None = None
    export: dict | None = None
    examples: list[dict] | None = None  # generation: a few test inputs with reference, base and fine-tuned answers
    prompt: PromptFormat | None = None  # generation: how inputs became prompts
    decisions: Decisions = field(default_factory=Decisions)  # calibration and thresholds fitted on validation
    test_logits: np.ndarray | None = None  # the test scores before calibration, as logits
    training_info: dict | None = None  # the manifest's training section (main process, published runs)


@dataclass
class Trained:
    """What publishing needs of a finished run beside its result: the model with its best weights, what built it,
    the data, and the run's accelerator and trackers (still open, for the stages that follow)."""
    result: RunResult
    model: torch.nn.Module
    built: Any
    data: Any
    accelerator: Accelerator
    tracking: Tracking
    step: int


def make_loss(cfg: Config, torch_side: TorchTask, targets: np.ndarray, num_outputs: int):
    """The task's loss for this model (``torch_side``: :func:`training.recipe.torch_tasks.model_task`), with class weights
    (single-label) or pos_weight (multi-label) from training frequencies."""
    return torch_side.make_loss(targets, num_outputs, cfg.train.class_weights, cfg.train.label_smoothing,
                                **cfg.loss_options)


def make_scheduler(name: str, optimizer, warmup: int, total: int):
    """Linear warmup, then linear / cosine / constant / exponential (to 1% of the peak at the end)."""
    if name == "exponential":
        decay = 0.01 ** (1.0 / max(1, total - warmup))
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: (step + 1) / (warmup + 1) if step < warmup else decay ** (step - warmup))
    hf_name = "constant_with_warmup" if name == "constant" else name
    return get_scheduler(hf_name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


@torch.no_grad()
def run_evaluation(model, dataloader, accelerator, cfg: Config, labels, loss_fn, desc: str,
                   decisions: Decisions | None = None, **extra: Any) -> tuple[Evaluation, np.ndarray, np.ndarray]:
    """Evaluate on every process; ``gather_for_metrics`` drops the samples DDP padding duplicated.

    Args:
        decisions: the calibration and thresholds fitted on validation; None during training, when a multi-label
            model with ``train.threshold: auto`` is judged at the thresholds that suit this evaluation best.
        extra: further arguments of the spec's ``evaluate`` (sentence embeddings: data.corpus's ``documents``).

    Returns:
        The evaluation, and the gathered targets and logits (in the loader's order).
    """
    model.eval()
    per_token = torch_task(cfg.task).pads_targets
    batches = []
    for batch in tqdm(dataloader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        targets = batch.pop("labels")
        logits = model(**batch).logits.float()
        if per_token:  # processes' batches differ in length: pad before gathering
            logits = accelerator.pad_across_processes(logits, dim=1)
            targets = accelerator.pad_across_processes(targets, dim=1, pad_index=IGNORE_INDEX)
        logits, targets = accelerator.gather_for_metrics((logits, targets))
        batches.append((logits.cpu(), targets.cpu()))
    loss_logits, loss_targets, targets, logits = torch_task(cfg.task).collect(batches)
    loss = float(loss_fn(loss_logits, loss_targets))
    decisions = decisions or fitted_threshold(cfg, cfg.task.spec.scores(logits), targets)
    scores = cfg.task.spec.scores(logits, decisions.calibration)
    result = cfg.task.spec.evaluate(targets, scores, labels, threshold=decisions.threshold, **extra)
    result.metrics["loss"] = loss
    model.train()
    return result, targets, logits


def fitted_threshold(cfg: Config, scores, targets) -> Decisions:
    """The multi-label threshold: the configured one, or (``auto``) one per label fitted to these scores."""
    if "threshold" not in cfg.task.spec.options:
        return Decisions()
    if cfg.train.threshold != "auto":
        return Decisions(threshold=cfg.train.threshold)
    global_threshold, per_label, _ = fit_thresholds(scores, targets, cfg.primary_metric)
    return Decisions(threshold=per_label, global_threshold=global_threshold)


def fit_decisions(cfg: Config, labels, logits, targets) -> Decisions:
    """Fit the calibration (``train.calibrate``), then the thresholds on the calibrated scores, on validation."""
    spec = cfg.task.spec
    calibration = None
    if cfg.train.calibrate and "calibrate" in spec.options:
        calibration = fit_calibration(logits, targets, spec.postprocess, labels)
        before, after = calibration.before["validation"], calibration.after["validation"]
        logger.info("calibration (%s) %s: validation log loss %.4f -> %.4f, ECE %.4f -> %.4f", calibration.method,
                    "applied" if calibration.applied else "tried and NOT applied (it did not help validation)",
                    before["log_loss"], after["log_loss"], before["ece"], after["ece"])
    decisions = fitted_threshold(cfg, spec.scores(logits, calibration), targets)
    decisions.calibration = calibration
    return decisions


@dataclass
class Loop:
    """What the set-up makes and the loop, its evaluations and the test scoring share."""
    cfg: Config
    accelerator: Accelerator
    precision: str
    tracking: Tracking
    output_dir: Path
    data: Any
    built: Any
    encoded: dict
    prompt: PromptFormat | None
    model: Any = None
    optimizer: Any = None
    scheduler: Any = None
    loaders: dict = field(default_factory=dict)
    loss_fn: Any = None
    penalised: list = field(default_factory=list)
    steps_per_epoch: int = 0
    state: LoopState = field(default_factory=LoopState)
    keeps: bool = False
    fits_decisions: bool = False
    on_evaluation: Callable[[int, dict[str, float]], None] | None = None
    best_outputs: dict = field(default_factory=dict)  # step -> the best evaluation's validation targets and logits
    base_answers: list = field(default_factory=list)
    base_metrics: dict | None = None
    started: float = field(default_factory=time.time)

    @property
    def writes(self) -> bool:
        """A model that writes text: evaluated by loss and by the text it writes for a sample."""
        return self.cfg.task.spec.writes

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


@closes_failed_runs
def fine_tune(cfg: Config, *, resume: bool = False, overwrite: bool = False, labels: RunLabels | None = None,
              publish: bool = True, on_evaluation: Callable[[int, dict[str, float]], None] | None = None) -> Trained:
    """Fine-tune and score: the loop, from config to the best weights and (``publish``) the test metrics beside the
    baselines. The trackers stay open for the stages that follow (training/run.py closes them).

    Args:
        cfg: the validated run configuration.
        resume: continue from the newest checkpoint in ``OUTPUT_DIR/checkpoints``.
        overwrite: start afresh even though ``OUTPUT_DIR`` holds checkpoints of an earlier run (they are
            removed; the earlier artifact stays until this run publishes its own).
        labels: how the trackers of ``train.report_to`` name the run (a search's trial: as a child run).
        publish: score the test split and fit the baselines; False stops once the best weights are known (a
            search trial: the test split is never touched, ``metrics`` holds validation only).
        on_evaluation: called after each validation with the step and the validation metrics; an exception
            it raises ends the run (a search stops a weak trial this way).

    Raises:
        TrainingError: a fresh run would mix with an earlier run's checkpoints, there is nothing to
            resume, or the loss became non-finite.
        ConfigError: a tracker of ``train.report_to`` is not installed.
    """
    loop = set_up(cfg, resume=resume, overwrite=overwrite, labels=labels)
    loop.on_evaluation = on_evaluation
    loop.fits_decisions = publish and bool({"calibrate", "threshold"} & cfg.task.spec.options)
    prepare(loop, resume)
    if loop.writes and publish:
        loop.base_answers = base_model_answers(loop, resume)
    if loop.built.torch_task.scores_base_model and publish:
        loop.base_metrics = base_model_metrics(loop, resume)
    run_epochs(loop)
    validation = restore_best(loop)
    if not publish:  # a search's trial: judged on the monitored validation metric, the test split never touched
        result = RunResult(artifact_dir=None, metrics={"validation": validation}, baselines={})
    else:
        result = score_test(loop, validation)
    return Trained(result, loop.accelerator.unwrap_model(loop.model), loop.built, loop.data, loop.accelerator,
                   loop.tracking, loop.state.step)


def set_up(cfg: Config, *, resume: bool, overwrite: bool, labels: RunLabels | None) -> Loop:
    """Device, precision and processes; the output directory checked; the data read, checked and encoded."""
    output_dir, tc = Path(cfg.output_dir), cfg.train
    check_sources(cfg.data)  # a missing file or an unknown model is said at once, before anything is set up
    check_model(cfg.model)
    facts = DeviceFacts.detect()
    precision = choose_mixed_precision(tc.mixed_precision, facts)
    tracking = Tracking(cfg, labels)  # train.report_to: tensorboard, mlflow, ... (training/recipe/tracking.py)
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=tc.grad_accum, cpu=not facts.cuda,
                              **tracking.accelerator_options)
    set_seed(tc.seed)
    accelerator.print(f"device {accelerator.device}, {accelerator.num_processes} process(es), precision {precision}")

    # -- the output directory: never mix two runs' checkpoints --------------------------------------
    resume_from = latest_checkpoint(output_dir)
    if resume and resume_from is None:
        raise TrainingError(f"--resume: no checkpoint under {output_dir / CHECKPOINTS}")
    if not resume and resume_from is not None and not overwrite:
        raise TrainingError(f"{output_dir} holds checkpoints of an earlier run: pass --resume to continue it, "
                            "or --overwrite to start again (its artifact stays until the new one is written)")

    # -- data: read and check on the main process first, so a download or cache write happens once ----
    model_path = resolve_model(cfg.model)  # a mistyped model fails before the data is read
    with accelerator.main_process_first():
        data = load_dataset(cfg.data, cfg.task, tc.seed)
    built = build_model(cfg, data.labels, model_path)
    if accelerator.device.type == "cpu":
        use_cpu_dropout(built.model)  # same distribution, masks drawn in bulk: see training/recipe/dropout.py
    encoded, prompt = encode_data(cfg, accelerator, data, built)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if not resume and resume_from is not None:  # --overwrite: only now, so that a run refused for its data deletes nothing
            shutil.rmtree(output_dir / CHECKPOINTS)
            (output_dir / BEST_WEIGHTS).unlink(missing_ok=True)
        output_dir.mkdir(parents=True, exist_ok=True)
    tracking.start(accelerator)  # the data passed its checks: the trackers' run begins, with the config
    return Loop(cfg, accelerator, precision, tracking, output_dir, data, built, encoded, prompt)


def encode_data(cfg: Config, accelerator: Accelerator, data, built) -> tuple[dict, PromptFormat | None]:
    """Every split through the shared encoder; says what was windowed or cut, refuses texts that tokenize to nothing."""
    tc, tokenizer = cfg.train, built.tokenizer
    encoder = Encoder(tokenizer, tc.max_length, tc.stride)
    options = cfg.task_training_options
    prompt = None
    if cfg.task.spec.writes:  # the prompt format the artifact records and the service reuses
        prompt = cfg.generation.prompt_format(tokenizer, data.system)
        options["prompt"] = prompt
        options["encoder_decoder"] = built.torch_task.encoder_decoder  # which ids go where (core Layout)
    splits = (data.train, data.validation, data.test)
    encoded = {
        split.name: encode_split(encoder, cfg.task, split.texts, split.pairs, split.targets, data.labels,
                                 desc=split.name, disable=not accelerator.is_local_main_process,
                                 negatives=split.negatives, **options)
        for split in splits
    }
    if data.corpus is not None:  # embeddings: documents every held-out query ranks too, in file order (the targets)
        encoded["corpus"] = EncodedSplit(dict(encoder.encode(data.corpus)), list(range(len(data.corpus))))
    for name, stats in ((n, e.stats) for n, e in encoded.items()):
        if stats.get("texts_split_into_windows"):
            accelerator.print(f"{name}: {stats['texts_split_into_windows']} text(s) longer than train.max_length "
                              f"were split into overlapping windows (stride {tc.stride}); {stats['windows']} windows "
                              "in all")
        if stats.get("inputs_cut") or stats.get("targets_cut"):
            accelerator.print(f"{name}: {stats.get('inputs_cut', 0)} input(s) cut to train.max_length "
                              f"({tc.max_length} tokens), {stats.get('targets_cut', 0)} target(s) cut to "
                              f"generation.max_target_length ({cfg.generation.max_target_length})")
    for split in splits:
        empty = without_content(tokenizer, encoded[split.name])
        if empty:
            rows = [split.rows[i] if i < len(split.rows) else i + 1 for i in empty[:5]]
            raise DataError(f"data.{split.name} ({split.source}): {len(empty)} text(s) tokenize to nothing "
                            f"(rows {rows}{', ...' if len(empty) > 5 else ''}); remove or fix them")
    return encoded, prompt


def prepare(loop: Loop, resume: bool) -> None:
    """Loaders, optimizer, schedule and loss, prepared by Accelerate; the loop's state restored on ``resume``."""
    cfg, tc, accelerator, built = loop.cfg, loop.cfg.train, loop.accelerator, loop.built
    # An encoder-decoder model makes its decoder's inputs from the labels (its own shift right), in the collator.
    decoder_inputs = built.model.prepare_decoder_input_ids_from_labels if built.torch_task.encoder_decoder else None
    collate = Collator(built.tokenizer, cfg.task, pad_to_multiple_of=8 if loop.precision != "no" else None,
                       decoder_inputs=decoder_inputs)

    def loader(split: str, sampler) -> torch.utils.data.DataLoader:
        # A private generator: starting an iterator would otherwise draw from the global RNG that dropout
        # uses, and a run resumed mid-epoch (one more iterator) would no longer match an uninterrupted one.
        return torch.utils.data.DataLoader(loop.encoded[split], batch_sampler=sampler, collate_fn=collate,
                                           num_workers=tc.num_workers,
                                           generator=torch.Generator().manual_seed(tc.seed))

    train_dl = loader("train", LengthGroupedBatchSampler(loop.encoded["train"].lengths, tc.batch_size, seed=tc.seed,
                                                         group_by_length=tc.group_by_length))
    eval_dls = [loader(name, LengthGroupedBatchSampler(loop.encoded[name].lengths, tc.eval_batch_size, shuffle=False))
                for name in ("validation", "test")]
    optimizer = torch.optim.AdamW(optimizer_groups(built.model, tc.weight_decay, built.head_modules, cfg.head_lr),
                                  lr=cfg.lr)
    loop.model, loop.optimizer, train_dl, val_dl, test_dl = accelerator.prepare(built.model, optimizer, train_dl,
                                                                                *eval_dls)
    loop.loaders = {"train": train_dl, "validation": val_dl, "test": test_dl}
    if "corpus" in loop.encoded:
        loop.loaders["corpus"] = accelerator.prepare(loader("corpus", LengthGroupedBatchSampler(
            loop.encoded["corpus"].lengths, tc.eval_batch_size, shuffle=False)))
    loop.steps_per_epoch = math.ceil(len(train_dl) / tc.grad_accum)
    total_steps = min(loop.steps_per_epoch * tc.epoch_cap, tc.max_steps or math.inf)
    # epochs: auto warms up over a share of the first epoch: the run's length is not known in advance
    warmup_of = min(loop.steps_per_epoch, total_steps) if tc.epochs == "auto" else total_steps
    # Stepped by hand once per optimizer step (not prepared: Accelerate would step it once per process).
    loop.scheduler = make_scheduler(tc.schedule, loop.optimizer, round(tc.warmup_ratio * warmup_of), total_steps)
    accelerator.register_for_checkpointing(loop.scheduler)
    loop.loss_fn = make_loss(cfg, built.torch_task, loop.data.train.targets, cfg.task.spec.num_outputs(loop.data.labels))
    loop.penalised = l1_parameters(loop.model) if tc.l1 else []  # train.l1: the same tensors the prepared model trains
    loop.keeps = built.torch_task.shifts_labels and keeps_logits(loop.model)
    if resume:
        resume_from = latest_checkpoint(loop.output_dir)
        accelerator.load_state(str(resume_from))
        loop.state = read_state(resume_from)
        accelerator.print(f"resumed from {resume_from} (epoch {loop.state.epoch}, step {loop.state.step})")


def written(loop: Loop, name: str, split_model) -> tuple[list, list]:
    """Generation tasks: the references and the text ``split_model`` writes for the first examples of a split."""
    cfg, tc = loop.cfg, loop.cfg.train
    split = loop.data.validation if name == "validation" else loop.data.test
    count = min(cfg.generation.eval_examples, len(split))
    prompter = Prompter(loop.built.tokenizer, loop.prompt, tc.max_length)  # the artifact records the same three
    texts = generate(split_model, prompter, split.texts[:count], cfg.generation.decoding(),
                     batch_size=min(tc.eval_batch_size, 16), seed=tc.seed, desc=f"{name}: generate")
    return list(split.targets[:count]), texts


def evaluate(loop: Loop, name: str, decisions: Decisions | None = None) -> tuple[Evaluation, np.ndarray, np.ndarray]:
    """One held-out split: the evaluation and its targets and outputs (logits, or the texts written)."""
    dataloader = loop.loaders[name]
    if not loop.writes:
        extra = {"documents": corpus_documents(loop)} if "corpus" in loop.loaders else {}
        return run_evaluation(loop.model, dataloader, loop.accelerator, loop.cfg, loop.data.labels, loop.loss_fn, name,
                              decisions, **extra)
    loss = token_loss(loop.model, dataloader, loop.accelerator, name, shift=loop.built.torch_task.shifts_labels)
    references, texts = written(loop, name, loop.accelerator.unwrap_model(loop.model))
    return with_loss(loop.cfg.task.spec.evaluate(references, texts), loss), references, texts


@torch.no_grad()
def corpus_documents(loop: Loop) -> tuple[list[str], np.ndarray]:
    """data.corpus as the model embeds it now: each document's key (as the targets name positives) and vector."""
    keys, vectors, model = [], [], loop.model
    model.eval()
    for batch in loop.loaders["corpus"]:
        index = batch.pop("labels")
        index, logits = loop.accelerator.gather_for_metrics((index, model(**batch).logits.float()))
        keys.extend(loop.cfg.task.spec.training_key(loop.data.corpus[i]) for i in index.tolist())
        vectors.append(logits.cpu().numpy())
    model.train()
    return keys, np.concatenate(vectors)


def base_model_answers(loop: Loop, resume: bool) -> list:
    """Generation: the base model's own answers on the test sample, before any training (the baseline that matters
    most); kept beside the checkpoints so that a resumed run reuses them."""
    stored = loop.output_dir / BASE_ANSWERS
    if resume and stored.is_file():
        return [GeneratedText(**a) for a in json.loads(stored.read_text())]
    _, answers = written(loop, "test", loop.accelerator.unwrap_model(loop.model))
    if loop.main:
        stored.write_text(json.dumps([vars(a) for a in answers]))
    return answers


def base_model_metrics(loop: Loop, resume: bool) -> dict[str, float]:
    """The base model's test metrics before any training (sentence embeddings: zero-shot retrieval, the baseline
    that matters most); kept beside the checkpoints so that a resumed run reuses them."""
    stored = loop.output_dir / BASE_METRICS
    if resume and stored.is_file():
        return json.loads(stored.read_text())
    metrics = {k: v for k, v in evaluate(loop, "test")[0].metrics.items() if k != "loss"}
    if loop.main:
        stored.write_text(json.dumps(metrics))
    return metrics


def validate(loop: Loop) -> bool:
    """Evaluate, keep the best weights, and say whether early stopping should end the run."""
    state, accelerator, monitor = loop.state, loop.accelerator, loop.cfg.monitor
    result, targets, outputs = evaluate(loop, "validation")
    value = result.metrics.get(monitor)
    state.history["validation"].append({"step": state.step, "epoch": state.epoch, **result.metrics})
    accelerator.log(prefixed("validation", result.metrics), step=state.step)
    if value is not None and is_better(monitor, value, state.best):
        state.best, state.best_step, state.bad_evals = value, state.step, 0
        if loop.fits_decisions:  # for fitting calibration and thresholds after training without another pass
            loop.best_outputs.clear()
            loop.best_outputs[state.step] = (targets, outputs)
        if loop.main:
            tmp = loop.output_dir / f".{BEST_WEIGHTS}.tmp"
            save_file(trainable_state(accelerator.unwrap_model(loop.model)), str(tmp))
            tmp.replace(loop.output_dir / BEST_WEIGHTS)
    else:
        state.bad_evals += 1
    accelerator.print(f"step {state.step}: validation {monitor} {value:.4f} (best {state.best:.4f} at step {state.best_step})"
                      if value is not None else f"step {state.step}: validation {monitor} undefined")
    if loop.on_evaluation is not None:
        loop.on_evaluation(state.step, result.metrics)
    patience = loop.cfg.train.early_stopping.patience
    return patience is not None and state.bad_evals >= patience


def checkpoint(loop: Loop) -> None:
    save_checkpoint(loop.accelerator, loop.output_dir, loop.state.step, loop.state, loop.cfg.train.keep_checkpoints)


def over_budget(loop: Loop) -> bool:
    """Whether ``train.max_minutes`` of training have passed: the main process's clock decides for every process."""
    from accelerate.utils import broadcast_object_list

    budget = loop.cfg.train.max_minutes
    if budget is None:
        return False
    return bool(broadcast_object_list([loop.state.train_seconds >= 60 * budget])[0])


def evaluate_and_decide(loop: Loop) -> None:
    """Evaluate; stop for want of improvement (``patience``) or of time (``max_minutes``)."""
    state = loop.state
    if validate(loop):
        state.stopped_early, state.stopped_because = True, "patience"
    elif over_budget(loop):
        state.stopped_early, state.stopped_because = True, "max_minutes"


def stop_message(loop: Loop) -> str:
    tc, reason = loop.cfg.train, loop.state.stopped_because
    if reason == "patience":
        return f"early stopping: no {loop.cfg.monitor} improvement in {tc.early_stopping.patience} evaluations"
    return f"stopped: train.{reason} ({getattr(tc, reason)}) reached"


def run_epochs(loop: Loop) -> None:
    """The loop: epochs of optimizer steps, with evaluation, checkpoints and early stopping where the config says."""
    tc, state, accelerator = loop.cfg.train, loop.state, loop.accelerator
    loop.model.train()
    progress = tqdm(total=min(loop.steps_per_epoch * tc.epoch_cap, tc.max_steps or math.inf), initial=state.step,
                    desc="train", unit="step", disable=not accelerator.is_local_main_process)
    for epoch in range(state.epoch, tc.epoch_cap):
        if state.stopped_early:
            break
        done_in_epoch = state.step - epoch * loop.steps_per_epoch  # > 0 only when resuming mid-epoch
        train_dl = loop.loaders["train"]
        batches = accelerator.skip_first_batches(train_dl, done_in_epoch * tc.grad_accum) if done_in_epoch else train_dl
        # The batch order is a function of (seed, epoch); Accelerate's loaders pass the epoch on to the
        # sampler, and a resumed run must tell them which epoch it is in.
        batches.set_epoch(epoch)
        window_loss, window_n, window_start = 0.0, 0, time.time()
        tick = time.perf_counter()  # training time excludes evaluation and checkpointing
        for batch in batches:
            loss, examples = train_step(loop, batch, epoch)
            window_loss += loss
            window_n += examples
            state.train_samples += examples * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            # One optimizer step done.
            loop.scheduler.step()
            state.step += 1
            mean_loss = window_loss / tc.grad_accum
            state.history["train_loss"].append({"step": state.step, "loss": mean_loss,
                                                "lr": loop.scheduler.get_last_lr()[0]})
            accelerator.log(prefixed("train", state.history["train_loss"][-1]), step=state.step)
            progress.update(1)
            progress.set_postfix(epoch=epoch + 1, loss=f"{mean_loss:.4f}",
                                 samples_per_s=f"{window_n * accelerator.num_processes / (time.time() - window_start):.0f}")
            window_loss, window_n, window_start = 0.0, 0, time.time()
            state.train_seconds += time.perf_counter() - tick
            if isinstance(tc.eval_every, int) and state.step % tc.eval_every == 0:
                evaluate_and_decide(loop)
            if tc.max_steps is not None and state.step >= tc.max_steps and not state.stopped_early:
                state.stopped_early, state.stopped_because = True, "max_steps"
            if isinstance(tc.save_every, int) and state.step % tc.save_every == 0:
                checkpoint(loop)
            if state.stopped_early:
                break
            tick = time.perf_counter()
        if not state.stopped_early:
            state.epoch = epoch + 1
            if tc.eval_every == "epoch":
                evaluate_and_decide(loop)
        if tc.save_every == "epoch" or state.stopped_early:
            checkpoint(loop)
        if state.stopped_early:
            accelerator.print(stop_message(loop))
            break
    progress.close()
    state.stopped_because = state.stopped_because or "epochs"
    evaluated = state.history["validation"]
    if not evaluated or evaluated[-1]["step"] != state.step:
        validate(loop)  # the final weights are a candidate for "best" too
    if still_improving(loop):
        accelerator.print(f"validation {loop.cfg.monitor} was still improving at the last evaluation "
                          f"({state.stopped_because} ended the run): a longer run may do better")


def still_improving(loop: Loop) -> bool:
    """The best validation value came at the last evaluation, after an earlier one, and no patience ran out."""
    evaluated, state = loop.state.history["validation"], loop.state
    return (len(evaluated) > 1 and state.stopped_because != "patience" and state.best_step == evaluated[-1]["step"])


def train_step(loop: Loop, batch: dict, epoch: int) -> tuple[float, int]:
    """Forward, loss and backward of one batch (an optimizer step when gradients sync); its loss and size."""
    tc, model, accelerator = loop.cfg.train, loop.model, loop.accelerator
    with accelerator.accumulate(model):
        targets = batch.pop("labels")
        if loop.built.torch_task.shifts_labels:  # a causal LM: logits only where the loss reads them
            logits, loss_targets = causal_lm_logits(model, batch, targets, loop.keeps)
        else:
            logits, loss_targets = model(**batch).logits, targets
        loss = loop.loss_fn(logits, loss_targets)
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became {loss.item()} at epoch {epoch + 1}, step {loop.state.step + 1}; "
                                "lower train.lr or check the data. No artifact was published from this run.")
        # L1 joins the objective only: the logged losses stay the task's, comparable with validation's
        penalised = loop.penalised
        accelerator.backward(loss + tc.l1 * sum(p.abs().sum() for p in penalised) if penalised else loss)
        if accelerator.sync_gradients and tc.max_grad_norm is not None:
            accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
        loop.optimizer.step()
        loop.optimizer.zero_grad(set_to_none=True)
    return loss.item(), targets.shape[0]


def restore_best(loop: Loop) -> dict[str, float]:
    """The best evaluation's weights back in the model; returns that evaluation's validation metrics."""
    state, accelerator = loop.state, loop.accelerator
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(loop.model)
    if state.best_step is None:  # the monitored metric was never defined: keep the final weights
        state.best_step = state.step
        accelerator.print(f"validation {loop.cfg.monitor} was undefined at every evaluation; keeping the final weights")
    else:
        best = load_file(str(loop.output_dir / BEST_WEIGHTS))
        with torch.no_grad():
            for name, param in unwrapped.named_parameters():
                if name in best:
                    param.copy_(best[name].to(param.device, param.dtype))
    validation = next(v for v in reversed(state.history["validation"]) if v["step"] == state.best_step)
    return {k: v for k, v in validation.items() if k not in ("step", "epoch")}


def score_test(loop: Loop, validation: dict[str, float]) -> RunResult:
    """Calibration and thresholds fitted on validation with the best weights, then the test split scored with them;
    on the main process, the baselines and the manifest's training record."""
    cfg, spec, data = loop.cfg, loop.cfg.task.spec, loop.data
    decisions = Decisions()
    if loop.fits_decisions:
        # the best weights' validation logits: kept from their evaluation, or computed again
        val_targets, val_logits = loop.best_outputs.get(loop.state.best_step) or evaluate(loop, "validation")[1:]
        decisions = fit_decisions(cfg, data.labels, val_logits, val_targets)
        rescored = spec.evaluate(val_targets, spec.scores(val_logits, decisions.calibration), data.labels,
                                 threshold=decisions.threshold)
        validation = {**rescored.metrics, "loss": validation["loss"]}
    test, test_targets, test_outputs = evaluate(loop, "test", decisions)  # logits, or the texts written
    test_scores = test_outputs if loop.writes else spec.scores(test_outputs, decisions.calibration)
    if decisions.calibration is not None:
        measure_calibration(decisions.calibration, "test", test_outputs, test_targets, spec.postprocess)
    result = RunResult(artifact_dir=None, metrics={"validation": validation, "test": test.metrics}, baselines={},
                       test=test, test_targets=test_targets, test_scores=test_scores, decisions=decisions,
                       test_logits=None if loop.writes else test_outputs)
    if loop.main:
        result.baselines = baselines(loop, len(test_targets))
        if loop.base_metrics is not None:
            result.baselines = {"base_model": loop.base_metrics, **result.baselines}
        if loop.writes:
            result.baselines = {"base_model": spec.evaluate(test_targets, loop.base_answers).metrics,
                                **result.baselines}
            result.examples = examples_table(data.test.texts, test_targets, loop.base_answers, test_scores)
            result.prompt = loop.prompt
        result.training_info = training_record(loop)
    return result


def baselines(loop: Loop, scored: int) -> dict[str, dict[str, float]]:
    """The task's baselines on the test examples that were scored (generation scores a sample of the test split)."""
    cfg, data, tc = loop.cfg, loop.data, loop.cfg.train
    original = data.original_train  # baselines learn from the data as given, without augmentation
    return cfg.task.spec.baselines(
        (original.texts, original.pairs, original.targets),
        (data.test.texts[:scored], data.test.pairs[:scored] if data.test.pairs else None, data.test.targets[:scored]),
        data.labels, threshold=None if tc.threshold == "auto" else tc.threshold, seed=tc.seed,
        validation=(data.validation.texts, data.validation.pairs, data.validation.targets), metric=cfg.primary_metric,
        **({"documents": data.corpus} if data.corpus is not None else {}))


def training_record(loop: Loop) -> dict:
    """The manifest's ``training`` section: how the run went."""
    state, accelerator, data, encoded = loop.state, loop.accelerator, loop.data, loop.encoded
    info = {
        "epochs_run": state.epoch, "steps": state.step, "best_step": state.best_step,
        "stopped_early": state.stopped_early, "stopped_because": state.stopped_because,
        "still_improving": still_improving(loop), "steps_per_epoch": loop.steps_per_epoch,
        "num_processes": accelerator.num_processes, "mixed_precision": loop.precision,
        "device": str(accelerator.device), "lr": loop.cfg.lr, "head_lr": loop.cfg.head_lr,
        "seconds": round(time.time() - loop.started, 1),
        "train_seconds": round(state.train_seconds, 2),
        "train_samples_per_second": round(state.train_samples / max(state.train_seconds, 1e-9), 2),
        "examples": {"train": len(data.train), "validation": len(data.validation), "test": len(data.test)},
        "windows": {name: e.stats for name, e in encoded.items() if "windows" in e.stats},
        "truncation": {name: e.stats for name, e in encoded.items() if "inputs_cut" in e.stats},
        "history": state.history,
        "tracking": loop.tracking.record(),
    }
    if data.augmentation is not None:
        info["augmentation"] = data.augmentation
    return info
