"""Token classification end to end on a tiny model: data formats and their errors, every method, the artifact."""

import json

import numpy as np
import pytest

from core.errors import DataError
from core.manifest import read_manifest
from core.tasks import Task
from tests.conftest import make_entity_rows, write_jsonl
from training.config import DataConfig, load_config
from training.data.reading import load_dataset
from training.inference import load_artifact, predict_logits
from training.run import train

TOKENS = Task.TOKEN_CLASSIFICATION


@pytest.fixture(scope="module")
def entity_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("entities")
    for split, (n, seed) in {"train": (240, 1), "validation": (60, 2), "test": (60, 3)}.items():
        write_jsonl(directory / f"{split}.jsonl", make_entity_rows(n, seed))
    return directory


def _config(tiny_model, entity_dir, tmp_path, **train) -> dict:
    return {
        "task": "token_classification", "model": tiny_model, "method": "full",
        "data": {"train": str(entity_dir / "train.jsonl"), "validation": str(entity_dir / "validation.jsonl"),
                 "test": str(entity_dir / "test.jsonl"), "text": "tokens", "label": "tags"},
        "train": {"epochs": 12, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0, "max_length": 12, "stride": 4,
                  "early_stopping": {"patience": None}, **train},
        "export": {"onnx": False},
        "output_dir": str(tmp_path / "run"),
    }


def test_conll_jsonl_and_spans_read_the_same_sentences(tmp_path, entity_dir):
    rows = make_entity_rows(6, seed=9)
    conll = tmp_path / "train.conll"
    conll.write_text("-DOCSTART- -X- O\n\n" + "\n\n".join(
        "\n".join(f"{t} NN {tag}" for t, tag in zip(r["tokens"], r["tags"])) for r in rows) + "\n")
    spans = write_jsonl(tmp_path / "spans.jsonl", rows)
    by_conll = load_dataset(DataConfig(train=str(conll), validation=str(conll), test=str(conll), text="tokens",
                                       label="tags"), TOKENS, seed=0)
    by_spans = load_dataset(DataConfig(train=str(spans), validation=str(spans), test=str(spans), text="text",
                                       label="entities"), TOKENS, seed=0)
    assert by_conll.labels == by_spans.labels == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert [t.tags for t in by_conll.train.labels] == [t.tags for t in by_spans.train.labels]
    assert by_conll.train.texts == by_spans.train.texts == [r["text"] for r in rows]


@pytest.mark.parametrize("rows, fields, message", [
    ([{"tokens": ["a", "b"], "tags": ["O"]}], {}, r"row 1, column 'tags': 2 tokens but 1 tags"),
    ([{"tokens": ["Ana", "Bo"], "tags": ["O", "I-PER"]}], {}, r"row 1, column 'tags': tag 2 \(I-PER\) continues no"),
    ([{"tokens": ["a"], "tags": ["X-PER"]}], {}, "not O or B-"),
])
def test_bad_token_rows_are_named(tmp_path, rows, fields, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows * 3)
    with pytest.raises(DataError, match=message):
        load_dataset(DataConfig(train=str(path), validation=str(path), test=str(path), text="tokens", label="tags",
                                **fields), TOKENS, seed=0)


def test_repair_and_unseen_tags(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"tokens": ["Ana", "Bo"], "tags": ["O", "I-PER"]}] * 4)
    data = load_dataset(DataConfig(train=str(train), validation=str(train), test=str(train), text="tokens",
                                   label="tags", repair_tags=True), TOKENS, seed=0)
    assert data.train.labels[0].tags == ["O", "B-PER"]
    test = write_jsonl(tmp_path / "test.jsonl", [{"tokens": ["Rome"], "tags": ["B-LOC"]}])
    with pytest.raises(DataError, match=r"data.test .* row 1, column 'tags': label 'B-LOC' never appears"):
        load_dataset(DataConfig(train=str(train), validation=str(train), test=str(test), text="tokens",
                                label="tags", repair_tags=True), TOKENS, seed=0)
    conll = tmp_path / "bad.bio"
    conll.write_text("Ana B-PER\nloner\n")
    with pytest.raises(DataError, match=r"bad.bio\): line 2: expected a token and its tag"):
        load_dataset(DataConfig(train=str(conll), text="tokens", label="tags"), TOKENS, seed=0)


def test_full_finetune_learns_entities_and_the_artifact_reproduces_them(tiny_model, entity_dir, tmp_path, capsys):
    result = train(load_config(raw=_config(tiny_model, entity_dir, tmp_path)))
    test = result.metrics["test"]
    assert test["f1"] >= 0.9 and result.baselines["all_o"]["f1"] == 0.0
    assert set(result.baselines) == {"all_o", "memorisation"}
    manifest = read_manifest(result.artifact_dir)
    assert manifest.task is TOKENS and manifest.stride == 4 and manifest.aggregation == "first"
    assert set(manifest.per_class) == {"LOC", "ORG", "PER"}
    assert len(manifest.confusion_matrix) == len(manifest.labels) == 7
    assert manifest.training.windows["train"]["texts_split_into_windows"] > 0  # max_length 12 splits some
    assert (result.artifact_dir / "report" / "confusion_matrix.png").is_file()
    # The saved model, run over whole texts (windows merged), reproduces the test F1 the trainer reported.
    loaded = load_artifact(result.artifact_dir)
    rows = [json.loads(line) for line in open(entity_dir / "test.jsonl")]
    data = load_dataset(DataConfig(train=str(entity_dir / "test.jsonl"), validation=str(entity_dir / "test.jsonl"),
                                   test=str(entity_dir / "test.jsonl"), text="text", label="entities"), TOKENS, seed=0)
    spec = TOKENS.spec
    targets = spec.to_targets(data.test.labels, manifest.labels)
    scores = spec.scores(predict_logits(loaded, [r["text"] for r in rows]))
    assert spec.evaluate(targets, scores, manifest.labels).metrics["f1"] == pytest.approx(test["f1"], abs=0.02)
    entities = spec.shape(manifest, scores[:1])[0]["entities"]
    assert [(e["start"], e["end"], e["label"]) for e in entities] == [
        (s["start"], s["end"], s["label"]) for s in rows[0]["entities"]]

    # The command line prints the same entities, and evaluates a token file with the trainer's metrics.
    from training.cli import main

    assert main(["predict", str(result.artifact_dir), rows[0]["text"]]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(e["start"], e["end"], e["label"]) for e in printed["entities"]] == [
        (e["start"], e["end"], e["label"]) for e in entities]
    report = tmp_path / "report.json"
    assert main(["evaluate", str(result.artifact_dir), "--data", str(entity_dir / "test.jsonl"),
                 "--output", str(report)]) == 0
    assert json.loads(report.read_text())["metrics"]["f1"] == pytest.approx(test["f1"], abs=0.02)


@pytest.mark.parametrize("method", ["lora", "freeze", "ia3"])
def test_lora_and_freeze_train_the_token_head(tiny_model, entity_dir, tmp_path, method):
    raw = _config(tiny_model, entity_dir, tmp_path, epochs=2)
    raw["method"] = method
    if method == "ia3":  # merged like LoRA, and exported through the same gate
        raw["export"] = {"onnx": True, "int8": "off"}
    result = train(load_config(raw=raw))
    manifest = read_manifest(result.artifact_dir)
    assert "classifier" in manifest.training.head_modules
    assert manifest.trainable_parameters < manifest.total_parameters / 2
    if method != "freeze":
        config = json.loads((result.artifact_dir / "adapter" / "adapter_config.json").read_text())
        assert config["task_type"] == "TOKEN_CLS"
    if method == "ia3":
        assert manifest.export.parity["onnx"].max_abs_diff < 1e-3
    assert np.isfinite(result.metrics["test"]["loss"])


def test_token_options_are_refused_for_other_tasks(tiny_model, entity_dir, tmp_path):
    raw = _config(tiny_model, entity_dir, tmp_path)
    raw["task"] = "classification"
    raw["train"].pop("stride")
    raw["train"]["label_all_tokens"] = True
    with pytest.raises(Exception, match="train.label_all_tokens only applies to task: token_classification"):
        load_config(raw=raw)
    raw = _config(tiny_model, entity_dir, tmp_path, stride=8)
    with pytest.raises(Exception, match="train.stride 8 must be below half"):
        load_config(raw=raw)


def test_token_tag_lines_of_the_demo_set_are_read_as_sentences():
    from training.data.demo import read_token_tag_lines

    text = "@ann\tO\nEmpire\tB-facility\nState\tI-facility\n\t\nhi\tO\n"
    assert read_token_tag_lines(text) == [
        {"id": "1", "tokens": ["@ann", "Empire", "State"], "tags": ["O", "B-facility", "I-facility"]},
        {"id": "2", "tokens": ["hi"], "tags": ["O"]}]


def test_conll2003_lines_are_read_as_sentences_without_the_article_marks():
    from training.data.demo import read_conll2003

    text = ("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP B-MISC\n\n"
            "-DOCSTART- -X- -X- O\n\nPeter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n")
    assert read_conll2003(text) == [
        {"id": "1", "tokens": ["EU", "rejects", "German"], "tags": ["B-ORG", "O", "B-MISC"]},
        {"id": "2", "tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]}]
