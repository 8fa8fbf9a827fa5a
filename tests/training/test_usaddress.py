"""usaddress:labeled: usaddress's labelled addresses as a token-classification demo set."""

import json

import pytest

from core.errors import DataError
from training.config import load_config
from training.data import demo as demo_data
from training.data.demo import USADDRESS_MEMBER, PinnedFile, read_usaddress
from training.data.reading import load_dataset
from tests.conftest import pinned_tarball

XML = b"""<?xml version="1.0" encoding="utf-8"?>
<AddressCollection>
  <AddressString><AddressNumber>8128</AddressNumber> <StreetName>MARTIN</StreetName>
    <StreetName>LUTHER KING</StreetName> <StreetNamePostType>Drive,</StreetNamePostType>
    <PlaceName>Chicago</PlaceName></AddressString>
  <AddressString><Recipient>Jane</Recipient> <Recipient>Doe</Recipient> <USPSBoxType>PO Box</USPSBoxType>
    <USPSBoxID>12</USPSBoxID></AddressString>
  <AddressString></AddressString>
</AddressCollection>
"""


def test_each_token_is_tagged_with_its_field_and_a_run_of_one_field_is_one_entity():
    assert read_usaddress(XML) == [
        {"id": "1", "tokens": ["8128", "MARTIN", "LUTHER", "KING", "Drive,", "Chicago"],
         "tags": ["B-AddressNumber", "B-StreetName", "I-StreetName", "I-StreetName", "B-StreetNamePostType",
                  "B-PlaceName"]},
        {"id": "2", "tokens": ["Jane", "Doe", "PO", "Box", "12"],
         "tags": ["B-Recipient", "I-Recipient", "B-USPSBoxType", "I-USPSBoxType", "B-USPSBoxID"]},
        # the empty address is no row
    ]


@pytest.mark.parametrize("xml, message", [
    (b"<AddressCollection><AddressString>", "not XML"),
    (b"<AddressCollection><AddressString><ZipCode> </ZipCode></AddressString></AddressCollection>",
     "address 1 has an empty <ZipCode>"),
])
def test_a_broken_file_is_a_data_error_that_says_where(xml, message):
    with pytest.raises(DataError, match=message):
        read_usaddress(xml)


def _pinned_sdist(tmp_path, xml: bytes) -> PinnedFile:
    return pinned_tarball(tmp_path / "usaddress.tar.gz", USADDRESS_MEMBER, xml)


def test_the_demo_set_is_written_cached_and_reads_as_token_classification(tmp_path, monkeypatch, capsys):
    from training.cli import main

    monkeypatch.setenv("TUNESERVE_CACHE", str(tmp_path / "cache"))
    head, _, rest = XML.partition(b"<AddressString>")
    many = head + (b"<AddressString>" + rest.rpartition(b"</AddressCollection>")[0]) * 4 + b"</AddressCollection>"
    monkeypatch.setattr(demo_data, "USADDRESS_SDIST", _pinned_sdist(tmp_path, many))
    assert main(["data", "usaddress:labeled", "--output", str(tmp_path / "out")]) == 0
    assert "fields: id, tokens, tags" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "out" / "labeled.jsonl").read_text().splitlines()]
    assert rows == read_usaddress(many)
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in read_usaddress(XML)] * 4
    monkeypatch.setattr(demo_data, "USADDRESS_SDIST", PinnedFile("file:///nowhere.tar.gz", 1, "0" * 64))  # cached
    cfg = load_config(raw={"task": "token_classification",
                           "data": {"train": "usaddress:labeled", "text": "tokens", "label": "tags",
                                    "test_size": 0.25, "validation_size": 0.25}})
    data = load_dataset(cfg.data, cfg.task, seed=0)
    assert {"B-StreetName", "I-StreetName", "B-USPSBoxType", "O"} <= set(data.labels)
