"""A data file whose content is not its extension's format: one message naming the file, the line or row, and
what is accepted, before (and instead of) anything the ``datasets`` library would log."""

import json
import logging
import re

import pytest
import yaml

from core.errors import DataError
from core.tasks import Task
from tests.conftest import make_rows, write_jsonl
from training.cli import main
from training.config import DataConfig
from training.data.reading import load_dataset

ACCEPTED = "accepted: .jsonl or .json"


def _error(path) -> str:
    with pytest.raises(DataError) as caught:
        load_dataset(DataConfig(train=str(path)), Task.CLASSIFICATION, seed=0)
    message = str(caught.value)
    assert "\n" not in message
    return message


def _train(tmp_path, data, capfd, caplog) -> tuple[int, str]:
    """``tuneserve train`` on a config that reads ``data``; returns the exit status and what reached stderr."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data": {"train": str(data)}, "output_dir": str(tmp_path / "run")}))
    with caplog.at_level(logging.DEBUG):
        status = main(["train", str(config)])
    stderr = capfd.readouterr().err
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a library logged an ERROR too"
    return status, stderr


def test_csv_saved_as_jsonl_is_one_line_naming_file_and_line(tmp_path, capfd, caplog):
    data = tmp_path / "train.jsonl"
    data.write_text("text,label\na lovely film,positive\na dull film,negative\n")
    status, stderr = _train(tmp_path, data, capfd, caplog)
    assert status == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"tuneserve train: error: data.train ({data}): cannot read it: line 1 is not a JSON "
                               "object: 'text,label' looks like CSV (name the file .csv);")
    assert ACCEPTED in lines[0] and ".csv or .tsv (a header row" in lines[0] and ".parquet" in lines[0]
    assert "ERROR" not in stderr and "Traceback" not in stderr


def test_a_failure_inside_datasets_is_reported_once_with_its_cause(tmp_path, capfd, caplog):
    # Python's JSON reads 1e999 (as inf), pyarrow refuses it: the file passes our own check, then datasets fails
    # and logs an ERROR of its own. Only our line must reach the user, with the cause rather than the wrapper.
    data = tmp_path / "train.jsonl"
    write_jsonl(data, make_rows(20))
    data.write_text(data.read_text() + '{"text": "a huge number", "label": 1e999}\n')
    status, stderr = _train(tmp_path, data, capfd, caplog)
    assert status == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert f"data.train ({data}): cannot read it: JSON parse error: Number too big to be stored in double;" in lines[0]
    assert ACCEPTED in lines[0] and "in row" not in lines[0]  # pyarrow's row is counted within a block, from 0
    assert "ERROR" not in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("name, content, expected", [
    ("empty.jsonl", "", "cannot read it: the file is empty"),
    ("empty.csv", "", "cannot read it: the file is empty"),
    ("blank.jsonl", "\n\n  \n", "the file holds only blank lines"),
    ("array_line.jsonl", '{"text": "a", "label": "x"}\n[1, 2]\n', r"line 2 is an array, not a JSON object: '\[1, 2\]'"),
    ("string_line.jsonl", '"just a text"\n', "line 1 is a string, not a JSON object"),
    ("cut.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", \n',
     r"line 2 is not a JSON object \(Expecting property name .* at column 1\)"),
    ("not.json", '[{"text": "a", "label": "x"},\n {"text": "b" "label": "y"}]\n',
     r"not valid JSON at line 2, column 15: Expecting ',' delimiter"),
    ("strings.json", '[{"text": "a", "label": "x"}, "b"]', "item 2 of the JSON array is a string, not an object"),
    ("nothing.json", "[]", "the JSON array is empty: no rows"),
    ("twice.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "text": "c"}\n', "line 2 names the field 'text' twice"),
    ("pretty.json", '{\n  "text": "a",\n  "label": "x"\n}\n{\n  "text": "b"\n  "label": "y"\n}\n',
     "not valid JSON at line 7, column 3: Expecting ',' delimiter"),
    ("array_then_more.json", '[{"text": "a", "label": "x"}]\n{"text": "b"}\n',
     "line 1: a JSON array must be the whole file"),
    ("ragged.csv", "text,label\ngood,positive\n\nbad,negative,extra\n",
     r"row 2 \(line 4\) has 3 field\(s\), the header has 2 \('text,label'\)"),
    ("short.tsv", "text\tlabel\ngood\tpositive\nbad\n", r"row 2 \(line 3\) has 1 field\(s\), the header has 2"),
    ("quote.csv", 'text,label\n"good,positive\nbad,negative\n', r"row 1 \(line 3\) .*a quote that is never closed"),
    ("commas.tsv", "text,label\ngood,positive\n", "line 1, the header, has no tab; it looks like CSV"),
    ("lines.csv", '{"text": "a", "label": "x"}\n', "line 1, the header, looks like JSON lines"),
    ("text.parquet", "text,label\ngood,positive\n",
     "not a Parquet file .*: its first line 'text,label' looks like CSV"),
])
def test_malformed_files_name_line_or_row(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    message = _error(path)
    assert message.startswith(f"data.train ({path}): cannot read it: ")
    assert ACCEPTED in message
    assert re.search(expected, message), message


def test_bytes_that_are_not_utf8_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "fine", "label": "x"}\n{"text": "caf\xe9", "label": "y"}\n')
    assert "line 2 is not UTF-8 text (byte 0xe9 at column 14); save the file as UTF-8" in _error(path)


def test_a_bad_file_in_a_directory_is_named(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", make_rows(10))
    (tmp_path / "b.jsonl").write_text("text,label\n")
    assert f"({tmp_path / 'b.jsonl'}): cannot read it: line 1 is not a JSON object" in _error(tmp_path)


def test_well_formed_variants_still_read(tmp_path):
    rows = make_rows(30)
    array = tmp_path / "array.jsonl"  # datasets reads a JSON array whatever the extension
    array.write_text(json.dumps([{"text": r["text"], "label": r["label"]} for r in rows]))
    csv_file = tmp_path / "blank_lines.csv"
    csv_file.write_bytes(b"\xef\xbb\xbftext,label\r\n" + b"".join(
        f'"{r["text"]}, really",{r["label"]}\r\n\r\n'.encode() for r in rows))
    pretty = tmp_path / "pretty.json"  # objects one after another, each over several lines: pyarrow reads them
    pretty.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}, indent=2) + "\n" for r in rows))
    for path in (array, csv_file, pretty):
        data = load_dataset(DataConfig(train=str(path)), Task.CLASSIFICATION, seed=0)
        assert len(data.train) + len(data.validation) + len(data.test) == 30


def test_a_missing_file_with_a_misspelt_name_or_type_is_not_looked_up_on_the_hub(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", make_rows(10))
    for name in ("trian.jsonl", "train.jsnol"):
        with pytest.raises(DataError, match=rf"file {tmp_path / name} does not exist \(did you mean "
                                            rf"{tmp_path / 'train.jsonl'}\?\)"):
            load_dataset(DataConfig(train=str(tmp_path / name)), Task.CLASSIFICATION, seed=0)
