"""The training recipe: one flat loop with Accelerate, from config to published artifact.

Read it top to bottom: set up, load and check data, build the model, train with periodic evaluation,
early stopping and checkpoints, restore the best weights, score the test split beside the baselines,
and publish the artifact. Runs unchanged on one process or under ``accelerate launch`` / ``torchrun``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
from core.tasks.generation import GeneratedText
from training.batching import Collator, LengthGroupedBatchSampler, encode_split, without_content
from training.checkpoint import CHECKPOINTS, LoopState, latest_checkpoint, read_state, save_checkpoint
from training.config import Config
from training.data import load_dataset
from training.dropout import use_cpu_dropout
from training.generate import causal_lm_logits, examples_table, generate, keeps_logits, token_loss, with_loss
from training.modeling import build_model, l1_parameters, optimizer_groups, resolve_model, trainable_state
from training.precision import DeviceFacts, choose_mixed_precision
from training.tasks import IGNORE_INDEX, TorchTask, torch_task
from training.tracking import RunLabels, Tracking, closes_failed_runs, prefixed

logger = logging.getLogger(__name__)

BEST_WEIGHTS = "best.safetensors"
BASE_ANSWERS = "base_answers.json"  # generation: the base model's test answers, written before training


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


def make_loss(cfg: Config, torch_side: TorchTask, targets: np.ndarray, num_outputs: int):
    """The task's loss for this model (``torch_side``: :func:`training.tasks.model_task`), with class weights
    (single-label) or pos_weight (multi-label) from training frequencies."""
    return torch_side.make_loss(targets, num_outputs, cfg.train.class_weights, cfg.train.label_smoothing)


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
                   decisions: Decisions | None = None) -> tuple[Evaluation, np.ndarray, np.ndarray]:
    """Evaluate on every process; ``gather_for_metrics`` drops the samples DDP padding duplicated.

    Args:
        decisions: the calibration and thresholds fitted on validation; None during training, when a multi-label
            model with ``train.threshold: auto`` is judged at the thresholds that suit this evaluation best.

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
    result = cfg.task.spec.evaluate(targets, scores, labels, threshold=decisions.threshold)
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
    decisions = fitted_threshold(cfg, spec.scores(logits, calibration), targets)
    decisions.calibration = calibration
    return decisions


@closes_failed_runs
def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, labels: RunLabels | None = None,
          publish: bool = True, on_evaluation: Callable[[int, dict[str, float]], None] | None = None) -> RunResult:
    """Fine-tune, evaluate and publish ``OUTPUT_DIR/artifact``. See the module docstring for the flow.

    Args:
        cfg: the validated run configuration.
        resume: continue from the newest checkpoint in ``OUTPUT_DIR/checkpoints``.
        overwrite: start afresh even though ``OUTPUT_DIR`` holds checkpoints of an earlier run (they are
            removed; the earlier artifact stays until this run publishes its own).
        labels: how the trackers of ``train.report_to`` name the run (a search's trial: as a child run).
        publish: score the test split, fit the baselines and publish the artifact; False stops once the best
            weights are known (a search trial: the test split is never touched, ``metrics`` holds validation only).
        on_evaluation: called after each validation with the step and the validation metrics; an exception
            it raises ends the run (a search stops a weak trial this way).

    Raises:
        TrainingError: a fresh run would mix with an earlier run's checkpoints, there is nothing to
            resume, or the loss became non-finite.
        ConfigError: a tracker of ``train.report_to`` is not installed.
    """
    # imports matplotlib; keep it off the import path of tests that don't need it
    from training.artifact import publish_artifact

    started = time.time()
    output_dir = Path(cfg.output_dir)
    tc = cfg.train

    # -- set-up: device, precision, processes -------------------------------------------------------
    facts = DeviceFacts.detect()
    precision = choose_mixed_precision(tc.mixed_precision, facts)
    tracking = Tracking(cfg, labels)  # train.report_to: tensorboard, mlflow, ... (training/tracking.py)
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=tc.grad_accum, cpu=not facts.cuda,
                              **tracking.accelerator_options)
    set_seed(tc.seed)
    main = accelerator.is_main_process
    accelerator.print(f"device {accelerator.device}, {accelerator.num_processes} process(es), precision {precision}")

    # -- the output directory: never mix two runs' checkpoints --------------------------------------
    resume_from = latest_checkpoint(output_dir)
    if resume and resume_from is None:
        raise TrainingError(f"--resume: no checkpoint under {output_dir / CHECKPOINTS}")
    if not resume and resume_from is not None:
        if not overwrite:
            raise TrainingError(f"{output_dir} holds checkpoints of an earlier run: pass --resume to continue it, "
                                "or --overwrite to start again (its artifact stays until the new one is written)")
    clear_earlier_run = not resume and resume_from is not None  # done once the data has passed its checks

    # -- data: read and check on the main process first, so a download or cache write happens once ----
    model_path = resolve_model(cfg.model)  # a mistyped model fails before the data is read
    with accelerator.main_process_first():
        data = load_dataset(cfg.data, cfg.task, tc.seed)
    built = build_model(cfg, data.labels, model_path)
    model, tokenizer = built.model, built.tokenizer
    if accelerator.device.type == "cpu":
        use_cpu_dropout(model)  # same distribution, masks drawn in bulk: see training/dropout.py
    encoder = Encoder(tokenizer, tc.max_length, tc.stride)
    options = cfg.task_training_options
    prompt = None
    if "generation" in cfg.task.spec.options:  # the prompt format the artifact records and the service reuses
        prompt = cfg.generation.prompt_format(tokenizer, data.system)
        options["prompt"] = prompt
        options["encoder_decoder"] = built.torch_task.encoder_decoder  # which ids go where (core Layout)
    encoded = {
        split.name: encode_split(encoder, cfg.task, split.texts, split.pairs, split.targets, data.labels,
                                 desc=split.name, disable=not accelerator.is_local_main_process, **options)
        for split in (data.train, data.validation, data.test)
    }
    for name, stats in ((n, e.stats) for n, e in encoded.items()):
        if stats.get("texts_split_into_windows"):
            accelerator.print(f"{name}: {stats['texts_split_into_windows']} text(s) longer than train.max_length "
                              f"were split into overlapping windows (stride {tc.stride}); {stats['windows']} windows "
                              "in all")
        if stats.get("inputs_cut") or stats.get("targets_cut"):
            accelerator.print(f"{name}: {stats.get('inputs_cut', 0)} input(s) cut to train.max_length "
                              f"({tc.max_length} tokens), {stats.get('targets_cut', 0)} target(s) cut to "
                              f"generation.max_target_length ({cfg.generation.max_target_length})")
    for split in (data.train, data.validation, data.test):
        empty = without_content(tokenizer, encoded[split.name])
        if empty:
            rows = [split.rows[i] if i < len(split.rows) else i + 1 for i in empty[:5]]
            raise DataError(f"data.{split.name} ({split.source}): {len(empty)} text(s) tokenize to nothing "
                            f"(rows {rows}{', ...' if len(empty) > 5 else ''}); remove or fix them")
    accelerator.wait_for_everyone()
    if main:
        if clear_earlier_run:  # --overwrite: only now, so that a run refused for its data deletes nothing
            shutil.rmtree(output_dir / CHECKPOINTS)
            (output_dir / BEST_WEIGHTS).unlink(missing_ok=True)
        output_dir.mkdir(parents=True, exist_ok=True)
    tracking.start(accelerator)  # the data passed its checks: the trackers' run begins, with the config
    # An encoder-decoder model makes its decoder's inputs from the labels (its own shift right), in the collator.
    decoder_inputs = model.prepare_decoder_input_ids_from_labels if built.torch_task.encoder_decoder else None
    collate = Collator(tokenizer, cfg.task, pad_to_multiple_of=8 if precision != "no" else None,
                       decoder_inputs=decoder_inputs)
    train_sampler = LengthGroupedBatchSampler(encoded["train"].lengths, tc.batch_size, seed=tc.seed,
                                              group_by_length=tc.group_by_length)

    def loader(split: str, sampler) -> torch.utils.data.DataLoader:
        # A private generator: starting an iterator would otherwise draw from the global RNG that dropout
        # uses, and a run resumed mid-epoch (one more iterator) would no longer match an uninterrupted one.
        return torch.utils.data.DataLoader(encoded[split], batch_sampler=sampler, collate_fn=collate,
                                           num_workers=tc.num_workers,
                                           generator=torch.Generator().manual_seed(tc.seed))

    train_dl = loader("train", train_sampler)
    eval_dls = {name: loader(name, LengthGroupedBatchSampler(encoded[name].lengths, tc.eval_batch_size, shuffle=False))
                for name in ("validation", "test")}

    # -- optimizer and schedule ---------------------------------------------------------------------
    optimizer = torch.optim.AdamW(optimizer_groups(model, tc.weight_decay, built.head_modules, tc.head_lr),
                                  lr=cfg.lr)
    model, optimizer, train_dl, val_dl, test_dl = accelerator.prepare(
        model, optimizer, train_dl, eval_dls["validation"], eval_dls["test"])
    steps_per_epoch = math.ceil(len(train_dl) / tc.grad_accum)
    total_steps = steps_per_epoch * tc.epochs
    # Stepped by hand once per optimizer step (not prepared: Accelerate would step it once per process).
    scheduler = make_scheduler(tc.scheduler, optimizer, round(tc.warmup_ratio * total_steps), total_steps)
    accelerator.register_for_checkpointing(scheduler)
    loss_fn = make_loss(cfg, built.torch_task, data.train.targets, cfg.task.spec.num_outputs(data.labels))
    penalised = l1_parameters(model) if tc.l1 else []  # train.l1: the same tensors the prepared model trains
    monitor = cfg.monitor
    shifts_labels = built.torch_task.shifts_labels
    keeps = shifts_labels and keeps_logits(model)

    # -- state that checkpoints carry ---------------------------------------------------------------
    state = LoopState()
    if resume:
        accelerator.load_state(str(resume_from))
        state = read_state(resume_from)
        accelerator.print(f"resumed from {resume_from} (epoch {state.epoch}, step {state.step})")

    generates = built.torch_task.generates
    held_out = {"validation": data.validation, "test": data.test}

    def written(name: str, split_model) -> tuple[list, list]:
        """Generation tasks: the references and the text ``split_model`` writes for the first examples of a split."""
        split = held_out[name]
        count = min(cfg.generation.eval_examples, len(split))
        texts = generate(split_model, tokenizer, prompt, split.texts[:count], cfg.generation.decoding(),
                         max_input_tokens=tc.max_length, batch_size=min(tc.eval_batch_size, 16), seed=tc.seed,
                         desc=f"{name}: generate")
        return list(split.targets[:count]), texts

    def evaluate(name: str, dataloader, decisions: Decisions | None = None) -> tuple[Evaluation, np.ndarray, np.ndarray]:
        if not generates:
            return run_evaluation(model, dataloader, accelerator, cfg, data.labels, loss_fn, name, decisions)
        loss = token_loss(model, dataloader, accelerator, name, shift=built.torch_task.shifts_labels)
        references, texts = written(name, accelerator.unwrap_model(model))
        return with_loss(cfg.task.spec.evaluate(references, texts), loss), references, texts

    # Generation: the base model's own answers on the test sample, before any training (the baseline that
    # matters most); kept beside the checkpoints so that a resumed run reuses them.
    base_answers: list = []
    if generates and publish:
        stored = output_dir / BASE_ANSWERS
        if resume and stored.is_file():
            base_answers = [GeneratedText(**a) for a in json.loads(stored.read_text())]
        else:
            _, base_answers = written("test", accelerator.unwrap_model(model))
            if main:
                stored.write_text(json.dumps([vars(a) for a in base_answers]))

    # The best evaluation's validation targets and logits, for fitting calibration and thresholds after training
    # without another pass over validation (absent when the best step predates a resume).
    fits_decisions = publish and bool({"calibrate", "threshold"} & cfg.task.spec.options)
    best_outputs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def validate() -> bool:
        """Evaluate, keep the best weights, and say whether early stopping should end the run."""
        result, targets, outputs = evaluate("validation", val_dl)
        value = result.metrics.get(monitor)
        state.history["validation"].append({"step": state.step, "epoch": state.epoch, **result.metrics})
        accelerator.log(prefixed("validation", result.metrics), step=state.step)
        if value is not None and is_better(monitor, value, state.best):
            state.best, state.best_step, state.bad_evals = value, state.step, 0
            if fits_decisions:
                best_outputs.clear()
                best_outputs[state.step] = (targets, outputs)
            if main:
                tmp = output_dir / f".{BEST_WEIGHTS}.tmp"
                save_file(trainable_state(accelerator.unwrap_model(model)), str(tmp))
                tmp.replace(output_dir / BEST_WEIGHTS)
        else:
            state.bad_evals += 1
        accelerator.print(f"step {state.step}: validation {monitor} {value:.4f} (best {state.best:.4f} at step {state.best_step})"
                          if value is not None else f"step {state.step}: validation {monitor} undefined")
        if on_evaluation is not None:
            on_evaluation(state.step, result.metrics)
        patience = tc.early_stopping.patience
        return patience is not None and state.bad_evals >= patience

    def checkpoint() -> None:
        save_checkpoint(accelerator, output_dir, state.step, state, tc.keep_checkpoints)


    # -- the loop -----------------------------------------------------------------------------------
    model.train()
    start_epoch = state.epoch
    progress = tqdm(total=total_steps, initial=state.step, desc="train", unit="step",
                    disable=not accelerator.is_local_main_process)
    for epoch in range(start_epoch, tc.epochs):
        if state.stopped_early:
            break
        done_in_epoch = state.step - epoch * steps_per_epoch  # > 0 only when resuming mid-epoch
        batches = accelerator.skip_first_batches(train_dl, done_in_epoch * tc.grad_accum) if done_in_epoch else train_dl
        # The batch order is a function of (seed, epoch); Accelerate's loaders pass the epoch on to the
        # sampler, and a resumed run must tell them which epoch it is in.
        batches.set_epoch(epoch)
        window_loss, window_n, window_start = 0.0, 0, time.time()
        tick = time.perf_counter()  # training time excludes evaluation and checkpointing
        for batch in batches:
            with accelerator.accumulate(model):
                targets = batch.pop("labels")
                if shifts_labels:  # a causal LM: logits only where the loss reads them
                    logits, loss_targets = causal_lm_logits(model, batch, targets, keeps)
                else:
                    logits, loss_targets = model(**batch).logits, targets
                loss = loss_fn(logits, loss_targets)
                if not torch.isfinite(loss):
                    raise TrainingError(f"loss became {loss.item()} at epoch {epoch + 1}, step {state.step + 1}; "
                                        "lower train.lr or check the data. No artifact was published from this run.")
                # L1 joins the objective only: the logged losses stay the task's, comparable with validation's
                accelerator.backward(loss + tc.l1 * sum(p.abs().sum() for p in penalised) if penalised else loss)
                if accelerator.sync_gradients and tc.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window_loss += loss.item()
            window_n += targets.shape[0]
            state.train_samples += targets.shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            # One optimizer step done.
            scheduler.step()
            state.step += 1
            mean_loss = window_loss / tc.grad_accum
            state.history["train_loss"].append({"step": state.step, "loss": mean_loss,
                                                   "lr": scheduler.get_last_lr()[0]})
            accelerator.log(prefixed("train", state.history["train_loss"][-1]), step=state.step)
            progress.update(1)
            progress.set_postfix(epoch=epoch + 1, loss=f"{mean_loss:.4f}",
                                 samples_per_s=f"{window_n * accelerator.num_processes / (time.time() - window_start):.0f}")
            window_loss, window_n, window_start = 0.0, 0, time.time()
            state.train_seconds += time.perf_counter() - tick
            if isinstance(tc.eval_every, int) and state.step % tc.eval_every == 0:
                state.stopped_early = validate()
            if isinstance(tc.save_every, int) and state.step % tc.save_every == 0:
                checkpoint()
            if state.stopped_early:
                break
            tick = time.perf_counter()
        if not state.stopped_early:
            state.epoch = epoch + 1
            if tc.eval_every == "epoch":
                state.stopped_early = validate()
        if tc.save_every == "epoch" or state.stopped_early:
            checkpoint()
        if state.stopped_early:
            accelerator.print(f"early stopping: no {monitor} improvement in {tc.early_stopping.patience} evaluations")
            break
    progress.close()
    evaluated = state.history["validation"]
    if not evaluated or evaluated[-1]["step"] != state.step:
        validate()  # the final weights are a candidate for "best" too

    # -- restore the best weights and score the test split ------------------------------------------
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if state.best_step is None:  # the monitored metric was never defined: keep the final weights
        state.best_step = state.step
        accelerator.print(f"validation {monitor} was undefined at every evaluation; keeping the final weights")
    else:
        best = load_file(str(output_dir / BEST_WEIGHTS))
        with torch.no_grad():
            for name, param in unwrapped.named_parameters():
                if name in best:
                    param.copy_(best[name].to(param.device, param.dtype))
    validation = next(v for v in reversed(state.history["validation"]) if v["step"] == state.best_step)
    validation = {k: v for k, v in validation.items() if k not in ("step", "epoch")}
    if not publish:  # a search's trial: judged on the monitored validation metric, the test split never touched
        accelerator.wait_for_everyone()
        accelerator.end_training()
        tracking.close()
        return RunResult(artifact_dir=None, metrics={"validation": validation}, baselines={})

    # Calibration and multi-label thresholds are fitted on validation with the best weights, then judged on test.
    spec, decisions = cfg.task.spec, Decisions()
    if fits_decisions:
        # the best weights' validation logits: kept from their evaluation, or computed again
        val_targets, val_logits = best_outputs.get(state.best_step) or evaluate("validation", val_dl)[1:]
        decisions = fit_decisions(cfg, data.labels, val_logits, val_targets)
        rescored = spec.evaluate(val_targets, spec.scores(val_logits, decisions.calibration), data.labels,
                                 threshold=decisions.threshold)
        validation = {**rescored.metrics, "loss": validation["loss"]}
    test, test_targets, test_outputs = evaluate("test", test_dl, decisions)  # logits, or the texts written
    test_scores = test_outputs if generates else spec.scores(test_outputs, decisions.calibration)
    if decisions.calibration is not None:
        measure_calibration(decisions.calibration, "test", test_outputs, test_targets, spec.postprocess)
    metrics = {"validation": validation, "test": test.metrics}

    # -- baselines and the artifact (main process only) ---------------------------------------------
    result = RunResult(artifact_dir=None, metrics=metrics, baselines={}, test=test, test_targets=test_targets,
                       test_scores=test_scores, decisions=decisions,
                       test_logits=None if generates else test_outputs)
    if main:
        scored = len(test_targets)  # generation tasks score a sample of the test split: baselines score the same
        original = data.original_train  # baselines learn from the data as given, without augmentation
        result.baselines = cfg.task.spec.baselines(
            (original.texts, original.pairs, original.targets),
            (data.test.texts[:scored], data.test.pairs[:scored] if data.test.pairs else None, data.test.targets[:scored]),
            data.labels, threshold=None if tc.threshold == "auto" else tc.threshold, seed=tc.seed,
            validation=(data.validation.texts, data.validation.pairs, data.validation.targets), metric=cfg.primary_metric)
        if generates:
            result.baselines = {"base_model": cfg.task.spec.evaluate(test_targets, base_answers).metrics,
                                **result.baselines}
            result.examples = examples_table(data.test.texts, test_targets, base_answers, test_scores)
            result.prompt = prompt
        training_info = {
            "epochs_run": state.epoch, "steps": state.step, "best_step": state.best_step,
            "stopped_early": state.stopped_early, "steps_per_epoch": steps_per_epoch,
            "num_processes": accelerator.num_processes, "mixed_precision": precision,
            "device": str(accelerator.device), "lr": cfg.lr, "seconds": round(time.time() - started, 1),
            "train_seconds": round(state.train_seconds, 2),
            "train_samples_per_second": round(state.train_samples / max(state.train_seconds, 1e-9), 2),
            "examples": {"train": len(data.train), "validation": len(data.validation), "test": len(data.test)},
            "windows": {name: e.stats for name, e in encoded.items() if "windows" in e.stats},
            "truncation": {name: e.stats for name, e in encoded.items() if "inputs_cut" in e.stats},
            "history": state.history,
            "tracking": tracking.record(),
        }
        if data.augmentation is not None:
            training_info["augmentation"] = data.augmentation
        result.artifact_dir = publish_artifact(cfg, unwrapped, built, data, result, training_info)
        if cfg.export.onnx:
            from training.export import HeldOut, export_artifact

            held_out = HeldOut.from_splits(data.validation, data.train)
            result.export = export_artifact(result.artifact_dir, int8=cfg.export.int8, held_out=held_out,
                                            min_int8_agreement=cfg.export.int8_min_agreement,
                                            max_int8_drop=cfg.export.int8_max_metric_drop)
        tracking.log_results(result, step=state.step)  # test metrics, baselines, plots and the final manifest
    accelerator.wait_for_everyone()
    accelerator.end_training()
    tracking.close()
    return result
