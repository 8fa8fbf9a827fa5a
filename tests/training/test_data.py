import json

import numpy as np
import pytest

from core.errors import DataError
from core.tasks import Task
from tests.conftest import make_rows, write_jsonl
from training.config import DataConfig
from training.data.reading import load_dataset


def _cfg(train, **fields) -> DataConfig:
    return DataConfig(train=str(train), **fields)


def test_reads_every_file_format(tmp_path):
    import pandas as pd

    frame = pd.DataFrame(make_rows(40))[["text", "label"]]
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_csv(tmp_path / "d.tsv", index=False, sep="\t")
    frame.to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(frame.to_dict(orient="records")))
    write_jsonl(tmp_path / "d.jsonl", frame.to_dict(orient="records"))
    for name in ("d.csv", "d.tsv", "d.parquet", "d.json", "d.jsonl"):
        data = load_dataset(_cfg(tmp_path / name), Task.CLASSIFICATION, seed=0)
        assert data.labels == ["negative", "positive"]
        assert len(data.train) + len(data.validation) + len(data.test) == 40


def test_carved_splits_are_stratified_seeded_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", make_rows(400))
    a = load_dataset(_cfg(path), Task.CLASSIFICATION, seed=3)
    b = load_dataset(_cfg(path), Task.CLASSIFICATION, seed=3)
    assert a.test.rows == b.test.rows and len(a.test) == 40 and len(a.validation) == 40
    assert not set(a.train.rows) & set(a.test.rows) and not set(a.validation.rows) & set(a.test.rows)
    overall = np.mean([r["label"] == "positive" for r in make_rows(400)])
    assert abs(a.test.targets.mean() - overall) < 0.03


def test_multilabel_and_regression(tmp_path):
    rows = make_rows(60)
    for r in rows:
        r["topics_str"] = ";".join(r["topics"])
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    ml = load_dataset(_cfg(path, label="topics"), Task.MULTILABEL, seed=0)
    assert ml.labels == sorted({t for r in rows for t in r["topics"]})
    assert ml.train.targets.shape[1] == len(ml.labels)
    ml_str = load_dataset(_cfg(path, label="topics_str", label_delimiter=";"), Task.MULTILABEL, seed=0)
    assert np.array_equal(ml_str.train.targets, ml.train.targets)
    reg = load_dataset(_cfg(path, label="score"), Task.REGRESSION, seed=0)
    assert reg.labels is None and reg.train.targets.dtype == np.float32


def _expect(tmp_path, rows, message, task=Task.CLASSIFICATION, **fields):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message):
        load_dataset(_cfg(path, **fields), task, seed=0)


def test_missing_column_names_a_close_column_and_the_key_that_sets_it(tmp_path):
    _expect(tmp_path, make_rows(10), r"bad.jsonl\): column 'sentence' not found; columns are \[.*\]; data.text names "
            r"the text column$", text="sentence")
    rows = [{"txt": r["text"], "label": r["label"]} for r in make_rows(10)]
    _expect(tmp_path, rows, r"column 'text' not found \(did you mean 'txt'\?\); .*; data.text names the text column")


def test_the_command_lines_data_errors_name_its_options(tmp_path):
    """A file read for `tuneserve evaluate --data FILE` is named --data, and its fixes are that command's options."""
    from types import SimpleNamespace

    from training.data.reading import load_labelled

    manifest = SimpleNamespace(text_fields=["text"], has_pair=False, label_field="label",
                               labels=["negative", "positive"], task=Task.CLASSIFICATION, provenance=SimpleNamespace(config={"data": {}}))
    rows = make_rows(6)
    rows[2]["label"] = None
    path = write_jsonl(tmp_path / "posted.jsonl", rows)
    with pytest.raises(DataError, match=r"^--data \(.*posted.jsonl\): row 3, column 'label': missing label "
                                        r"\(--drop-missing-labels skips rows without one\)$"):
        load_labelled(manifest, str(path))
    assert len(load_labelled(manifest, str(path), drop_missing=True)) == 5
    with pytest.raises(DataError, match=r"^--data .*column 'body' not found; .*; --text names the text column$"):
        load_labelled(manifest, str(path), text="body")


def test_empty_text_names_row_and_column(tmp_path):
    rows = make_rows(10)
    rows[4]["text"] = "   "
    _expect(tmp_path, rows, r"row 5, column 'text': empty text")


def test_non_numeric_regression_target(tmp_path):
    rows = make_rows(10)
    rows[2]["score"] = "very good"
    _expect(tmp_path, rows, r"row 3, column 'score': regression target 'very good' is not a number",
            task=Task.REGRESSION, label="score")


def test_fewer_than_two_classes(tmp_path):
    rows = [dict(r, label="positive") for r in make_rows(10)]
    _expect(tmp_path, rows, r"has 1 classes \(\['positive'\]\); classification needs at least two")


def test_too_few_rows_to_carve_a_split_is_a_data_error_naming_it(tmp_path):
    rows = [dict(r, score=float(i)) for i, r in enumerate(make_rows(2))]
    # one row goes to test; the one left cannot also give a validation row
    _expect(tmp_path, rows, r"cannot set 11% of 1 training rows apart as the validation split .*data.validation",
            task=Task.REGRESSION, label="score")


def test_missing_label_fails_unless_dropping_is_asked_for(tmp_path):
    rows = make_rows(30)
    rows[7]["label"] = None
    _expect(tmp_path, rows, r"row 8, column 'label': missing label \(data.drop_missing_labels skips rows without one\)")
    path = write_jsonl(tmp_path / "ok.jsonl", rows)
    data = load_dataset(_cfg(path, drop_missing_labels=True), Task.CLASSIFICATION, seed=0)
    assert len(data.train) + len(data.validation) + len(data.test) == 29


def test_label_unseen_in_training(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(20))
    test_rows = make_rows(5)
    test_rows[3]["label"] = "neutral"
    test = write_jsonl(tmp_path / "test.jsonl", test_rows)
    with pytest.raises(DataError, match=r"data.test \(.*test.jsonl\): row 4, column 'label': label 'neutral' never appears"):
        load_dataset(_cfg(train, test=str(test)), Task.CLASSIFICATION, seed=0)


def test_unreadable_and_missing_files(tmp_path):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"definitely not parquet")
    with pytest.raises(DataError, match=r"data.train \(.*broken.parquet\): cannot read it"):
        load_dataset(_cfg(broken), Task.CLASSIFICATION, seed=0)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(_cfg(tmp_path / "nope.csv"), Task.CLASSIFICATION, seed=0)
    with pytest.raises(DataError, match="unknown demo set"):
        load_dataset(_cfg("vader:books"), Task.CLASSIFICATION, seed=0)


def test_nan_labels_and_targets_are_refused_naming_the_row(tmp_path):
    rows = make_rows(10)
    rows[6]["score"] = float("nan")
    _expect(tmp_path, rows, r"row 7, column 'score': regression target nan is not finite",
            task=Task.REGRESSION, label="score")
    rows = make_rows(10)
    rows[3]["label"] = float("nan")
    _expect(tmp_path, rows, r"row 4, column 'label': missing label")  # a NaN among strings reads as null
    rows = make_rows(10)
    rows[2]["topics"] = ["plot", "plot"]
    _expect(tmp_path, rows, r"row 3, column 'topics': .* repeats a label", task=Task.MULTILABEL, label="topics")


def test_texts_that_tokenize_to_nothing_stop_the_run_before_training(base_config, tmp_path):
    from training.config import load_config
    from training.run import train

    rows = make_rows(240, seed=1)
    rows[10]["text"] = "\u200b\u200b\u200b"  # zero-width spaces: not blank to str.strip(), nothing to BERT
    base_config["data"]["train"] = str(write_jsonl(tmp_path / "zw.jsonl", rows))
    with pytest.raises(DataError, match=r"data.train .*1 text\(s\) tokenize to nothing \(rows \[11\]\)"):
        train(load_config(raw=base_config))
    assert not (tmp_path / "run" / "checkpoints").exists()
