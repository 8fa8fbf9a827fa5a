"""The FOLDOC demo set: dictd files read as multi-label definitions."""

from __future__ import annotations

import pytest

from core.errors import DataError
from training.data.demo import read_foldoc

DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _number(value: int) -> str:
    out = ""
    while True:
        value, digit = divmod(value, 64)
        out = DIGITS[digit] + out
        if not value:
            return out


def _dictd(entries: list[tuple[list[str], str]]) -> tuple[bytes, str]:
    """dictd files: each entry under each of its headwords, as dictfmt writes them."""
    dictionary, index = b"", []
    for words, body in entries:
        data = body.encode("utf-8")
        index += [f"{word}\t{_number(len(dictionary))}\t{_number(len(data))}" for word in words]
        dictionary += data
    return dictionary, "\n".join(index) + "\n"


ENTRIES = [
    (["00-database-info"], "00-database-info\n\n   This is FOLDOC.\n\n"),
    (["5th glove", "5th glove dfk"], "5th Glove\n5th Glove DFK\n\n   <hardware, virtual reality> A {data glove} and\n"
                                     "   flexor strip kit.\n\n   It tracks the hand.\n\n   (1995-03-06)\n\n"),
    (["hash"], "hash\n#\n\n   1. <character> {hash character}.\n\n   2. <programming> {hash coding}.\n\n"),
    (["percent"], "percent\n%\n\n   %\n\n   Common: percent sign.\n\n   (1995-03-06)\n\n"),
    (["1.tr.6"], "1.TR.6\n\n   <networking, protocol> A control channel protocol for ISDN.\n\n   (1996-01-01)\n\n"),
    (["copy"], "copy\n\n   <hardware> A {data glove} and flexor strip kit. It tracks the hand.\n\n"),
]


def test_each_entry_is_its_first_sense_labelled_with_its_categories():
    dictionary, index = _dictd(ENTRIES)
    assert read_foldoc(dictionary, index, min_per_label=1) == [
        # the sense's paragraphs up to its date; braces gone; read once though listed under two headwords
        {"id": "5th glove", "text": "A data glove and flexor strip kit. It tracks the hand.",
         "labels": ["hardware", "virtual reality"]},
        {"id": "hash", "text": "hash character.", "labels": ["character"]},  # up to the second sense
        {"id": "1.tr.6", "text": "A control channel protocol for ISDN.", "labels": ["networking", "protocol"]},
        # "percent" has no categories; "copy" repeats a text already read
    ]


def test_rare_categories_go_and_entries_left_without_one_with_them():
    dictionary, index = _dictd(ENTRIES)
    rows = read_foldoc(dictionary, index, min_per_label=2)  # only "hardware" is on two entries
    assert rows == [{"id": "5th glove", "text": "A data glove and flexor strip kit. It tracks the hand.",
                     "labels": ["hardware"]}]


def test_a_malformed_index_is_a_data_error():
    with pytest.raises(DataError, match="index line 2: expected headword, offset and length"):
        read_foldoc(b"", "a\tA\tB\nbroken line\n")
