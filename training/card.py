"""The model card (README.md of the artifact), in the Hugging Face format with a metadata header."""

from __future__ import annotations

import yaml

from core.manifest import Manifest

_METHOD = {
    "full": "full fine-tuning (every weight trained)",
    "lora": "LoRA adapters on the encoder's linear layers plus a trained head; the adapters are merged into `model/`",
    "freeze": "a frozen encoder with a trained head",
}


def metrics_table(manifest: Manifest) -> str:
    baselines = list(manifest.baselines)
    header = "| metric | validation | test | " + " | ".join(baselines) + " |"
    rule = "|---" * (3 + len(baselines)) + "|"
    rows = [header, rule]
    for name in manifest.task.spec.metric_names:
        if name not in manifest.metrics.get("test", {}):
            continue
        cells = [manifest.metrics.get("validation", {}).get(name), manifest.metrics["test"][name],
                 *(manifest.baselines[b].get(name) for b in baselines)]
        rows.append(f"| {name} | " + " | ".join("—" if c is None else f"{c:.4f}" for c in cells) + " |")
    return "\n".join(rows)


def _length(manifest: Manifest) -> str:
    if manifest.stride is not None:  # token tasks drop nothing: long texts become overlapping windows
        return (f"longer texts cut into windows of {manifest.max_length} tokens sharing {manifest.stride}; "
                f"sub-token scores become entities by the `{manifest.aggregation}` strategy")
    return f"truncated to {manifest.max_length} tokens"


def model_card(manifest: Manifest) -> str:
    header = {
        "library_name": "transformers",
        "base_model": manifest.provenance.config.get("model", manifest.base_model),
        "pipeline_tag": manifest.task.spec.pipeline_tag,
        "tags": ["tuneserve", manifest.task.value, manifest.method],
        "metrics": [m for m in manifest.task.spec.metric_names if m in manifest.metrics.get("test", {})][:4],
    }
    cfg = manifest.provenance.config
    run = manifest.training
    train = cfg.get("train", {})
    examples = run.examples if run else {}
    labels = ", ".join(f"`{label}`" for label in manifest.labels) if manifest.labels else "none (a single value)"
    hyper = {k: train.get(k) for k in ("epochs", "batch_size", "scheduler", "warmup_ratio", "weight_decay",
                                       "grad_accum", "max_grad_norm", "max_length", "class_weights", "seed")}
    hyper["lr"] = run.lr if run else None
    if manifest.method == "lora":
        hyper["lora"] = cfg.get("lora")
    return f"""---
{yaml.safe_dump(header, sort_keys=False).strip()}
---

# {manifest.name}

A {manifest.task.value} model fine-tuned with tuneserve from `{header['base_model']}` by {_METHOD[manifest.method]}.

- **Labels:** {labels}
- **Input:** {' + '.join(f'`{f}`' for f in manifest.text_fields)}, {_length(manifest)}
- **Outputs:** logits; scores are their {manifest.postprocess}{f' (a label is predicted at probability ≥ {manifest.threshold})' if manifest.threshold is not None else ''}
- **Trainable parameters:** {manifest.trainable_parameters:,} of {manifest.total_parameters:,}

## Data

Training data `{cfg.get('data', {}).get('train')}`: {examples.get('train', '?')} training, {examples.get('validation', '?')}
validation and {examples.get('test', '?')} test examples (validation and test carved from the training data, seeded and
stratified, unless given separately). Data hashes are in `manifest.json` under `provenance.data_hashes`.

## Results

Validation metrics are from the best checkpoint (step {run.best_step if run else '—'}, selected on validation
`{manifest.primary_metric}`); test metrics are of that checkpoint, beside baselines fitted on the same training data
and scored on the same test split.

{metrics_table(manifest)}

Plots are in `report/`.

## Training

{run.epochs_run if run else '—'} epoch(s), {run.steps if run else '—'} optimizer steps on
{run.num_processes if run else '—'} process(es) ({run.device if run else '—'}, precision
{run.mixed_precision if run else '—'}), {run.seconds if run else '—'} s.

```yaml
{yaml.safe_dump(hyper, sort_keys=False).strip()}
```

## Limitations

The model knows only the labels above and was measured on data like its training data; text far from that
(other domains, languages, lengths beyond {manifest.max_length} tokens, which are cut) may score worse than the test
metrics suggest. Check it on your own labelled data with `tuneserve evaluate` before relying on it.
"""
