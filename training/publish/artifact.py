"""Publishing the artifact: merged weights, adapter, tokenizer, manifest, model card and plots.

Everything is written to a temporary directory first and swapped into ``OUTPUT_DIR/artifact`` only
when complete, so a crash leaves the previous artifact as it was.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from core.manifest import ADAPTER_DIR, MODEL_DIR, Manifest, write_manifest
from core.tasks.embedding import pooling_files
from core.verdict import compare_with_baselines, diagnose
from training.publish.card import adapter_readme, base_model_name, write_card
from training.files import swap_into_place
from training.recipe.bases import bundled_hub_id, read_conversion
from training.recipe.modeling import PEFT_METHODS, merged_model, save_tokenizer_and_model
from training.publish.plots import (plot_against_baselines, plot_confusion, plot_curves, plot_per_label, plot_regression,
                             plot_reliability)

logger = logging.getLogger(__name__)

ARTIFACT = "artifact"
PACKAGES = ("tuneserve", "torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "scikit-learn",
            "numpy", "safetensors")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def decision_fields(cfg, labels, decisions) -> dict:
    """The manifest's calibration and multi-label threshold(s), from what was fitted on validation."""
    fields: dict = {"calibration": decisions.calibration}
    if "threshold" in cfg.task.spec.options:
        if np.ndim(decisions.threshold):
            fields["thresholds"] = {name: float(t) for name, t in zip(labels, decisions.threshold)}
            fields["threshold"] = decisions.global_threshold
        else:
            fields["threshold"] = float(decisions.threshold)
    return fields


def publish_artifact(cfg, model, built, data, result, training: dict) -> Path:
    """Write the artifact for a finished run and swap it into place. Returns its directory."""
    output_dir = Path(cfg.output_dir)
    final = output_dir / ARTIFACT
    tmp = output_dir / f".{ARTIFACT}-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    if cfg.method in PEFT_METHODS:
        model.save_pretrained(tmp / ADAPTER_DIR, safe_serialization=True)  # the adapter alone, before merging
        built.tokenizer.save_pretrained(tmp / ADAPTER_DIR)
    wrapper = model if built.torch_task.wrap else None  # what the task adds around the transformer (pooling)
    plain, tokenizer = merged_model(wrapper.encoder if wrapper else model, built.tokenizer)
    plain.config.name_or_path = cfg.run_name
    if cfg.task.spec.writes:  # the decoding evaluation used is the saved model's default
        for key, value in cfg.generation.decoding().items():
            setattr(plain.generation_config, key, value)
    save_tokenizer_and_model(plain, tokenizer, tmp / MODEL_DIR)
    if wrapper is not None:  # sentence-transformers' own files: its pooling, read back by every loader
        for relative, content in pooling_files(wrapper.pooling, plain.config.hidden_size).items():
            (tmp / MODEL_DIR / relative).parent.mkdir(parents=True, exist_ok=True)
            (tmp / MODEL_DIR / relative).write_text(json.dumps(content, indent=2) + "\n")

    manifest = build_manifest(cfg, built, data, result, training)
    write_manifest(manifest, tmp)
    write_card(tmp, manifest)  # re-written after the export, with its results
    if cfg.method in PEFT_METHODS:
        describe_adapter(tmp / ADAPTER_DIR, manifest)
    write_report(cfg, data, result, training, tmp / "report")
    swap_into_place(tmp, final)  # the old artifact stays whole until the new one is complete
    logger.info("artifact written to %s", final)
    return final


def run_cap(tc, stopped_because: str | None) -> tuple[str, float]:
    """The setting that ended a run that was not stopped by patience, and its value."""
    if stopped_because in ("max_steps", "max_minutes"):
        return f"train.{stopped_because}", getattr(tc, stopped_because)
    return ("train.max_epochs", tc.max_epochs) if tc.epochs == "auto" else ("train.epochs", tc.epochs)


def fixed_threshold(cfg) -> float | None:
    """The one decision threshold the config holds every label to, where the task has one (None: fitted per label)."""
    if "threshold" not in cfg.task.spec.options or cfg.train.threshold == "auto":
        return None
    return float(cfg.train.threshold)


def build_manifest(cfg, built, data, result, training: dict) -> Manifest:
    """The manifest of a finished run: what the model does, how well beside the baselines, and how it was made."""
    primary = cfg.primary_metric
    generation = cfg.task.spec.writes
    verdict = compare_with_baselines(primary, result.metrics["test"][primary], result.baselines)
    diagnosis = None
    if verdict and not verdict.beats:
        diagnosis = diagnose(verdict, training.get("history"), result.test.per_class, method=cfg.method,
                             cap=run_cap(cfg.train, training.get("stopped_because")), lr=cfg.lr,
                             stopped_early=training.get("stopped_because") == "patience", head_lr=cfg.head_lr,
                             threshold=fixed_threshold(cfg))
        logger.warning("%s; %s: the artifact is written, and its manifest and card say so", verdict.message,
                       diagnosis.message)
    return Manifest(
        name=cfg.run_name,
        task=cfg.task,
        problem_type=cfg.task.spec.problem_type,
        labels=data.labels,
        text_fields=[cfg.data.text] + ([cfg.data.text_pair] if cfg.data.text_pair else []),
        label_field=cfg.data.label,
        # prompt tuning: the virtual tokens, now the tokenizer's, come before the max_length tokens trained on
        max_length=cfg.train.max_length + (cfg.prompt.num_virtual_tokens if cfg.method == "prompt" else 0),
        stride=cfg.train.stride if "stride" in cfg.task.spec.options else None,
        aggregation=cfg.export.aggregation if "aggregation" in cfg.task.spec.options else None,
        postprocess=cfg.task.spec.postprocess,
        **decision_fields(cfg, data.labels, result.decisions),
        base_model=bundled_hub_id(cfg.model) or cfg.model,
        method=cfg.method,
        trainable_parameters=built.trainable_parameters,
        total_parameters=built.total_parameters,
        metrics=result.metrics,
        baselines=result.baselines,
        primary_metric=primary,
        beats_baselines=verdict.beats if verdict else None,
        diagnosis=diagnosis.message if diagnosis else None,
        per_class=result.test.per_class,
        prompt=result.prompt,
        decoding=cfg.generation.decoding() if generation else None,
        examples=result.examples,
        confusion_matrix=result.test.confusion_matrix,
        # lora_target_modules, or ia3_target_modules (prompt tuning adapts no module)
        training={**training, **({f"{cfg.method}_target_modules": built.target_modules} if built.target_modules else {}),
                  "head_modules": built.head_modules},
        provenance={
            "seed": cfg.train.seed,
            # What reproducibility was asked for: one seed for weights of new modules, dropout, batch order and
            # data splits; on the CPU two runs give bitwise-identical weights (tested), on CUDA close ones.
            "determinism": {"seed": cfg.train.seed, "data_order": "seeded private generator",
                            "torch_deterministic_algorithms": _deterministic_algorithms()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "packages": package_versions(),
            "data_hashes": data.hashes,
            "git_sha": git_sha(),
            "config": cfg.model_dump(mode="json"),
            "base_model_origin": read_conversion(built.base_path),
        },
    )


def write_report(cfg, data, result, training: dict, report: Path) -> None:
    """The report plots: learning curves, the task's own picture of test errors, and reliability when calibrated."""
    report.mkdir()
    plot_curves(training["history"], cfg.monitor, report / "curves.png")
    plots = {
        "confusion": lambda: plot_confusion(result.test.confusion_matrix, data.labels, report / "confusion_matrix.png"),
        "regression": lambda: plot_regression(result.test_targets, result.test_scores, report / "predicted_vs_true.png"),
        "per_label": lambda: plot_per_label(result.test.per_class, report / "per_label_f1.png"),
        "generation": lambda: plot_against_baselines(result.metrics["test"], result.baselines,
                                                     ("rougeL", "rouge1", "rouge2", "bleu", "chrf"),
                                                     report / "metrics_vs_baselines.png"),
        "retrieval": lambda: plot_against_baselines(result.metrics["test"], result.baselines, cfg.task.spec.metric_names,
                                                    report / "metrics_vs_baselines.png"),
    }
    plots[cfg.task.spec.plot]()
    calibration = result.decisions.calibration
    if calibration is not None:
        spec = cfg.task.spec
        plot_reliability(spec.scores(result.test_logits), result.test_scores, result.test_targets, spec.postprocess,
                         {"before": calibration.before["test"], "after": calibration.after["test"]},
                         report / "reliability.png")


def describe_adapter(adapter_dir: Path, manifest: Manifest) -> None:
    """Replace peft's empty card template with a note on loading the adapter, and point its config at the base
    model's Hub id (peft records the local path the base model was loaded from)."""
    from training.recipe.torch_tasks import ENCODER_DECODER_TASKS

    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    # An encoder-decoder base model (peft task type SEQ_2_SEQ_LM) loads with its own Auto class.
    auto_model = next((t.auto_model for t in ENCODER_DECODER_TASKS.values()
                       if t.peft_task_type == config.get("task_type")), None)
    (adapter_dir / "README.md").write_text(adapter_readme(manifest, auto_model))
    config["base_model_name_or_path"] = base_model_name(manifest.base_model)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _deterministic_algorithms() -> bool:
    import torch

    return torch.are_deterministic_algorithms_enabled()
