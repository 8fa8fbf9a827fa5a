"""The manpages:debian demo set: a tiny .deb built here, read back through the same code as Debian's packages."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile

import pytest

from core.errors import DataError
from training.data import demo as demo_data
from training.data.demo import PinnedFile, parse_man_page, read_man_pages, read_manpage_pairs

LS = r""".\" Comment lines and \" trailing comments are dropped.
.TH LS "1" "September 2022" "GNU coreutils 9.1" "User Commands"
.SH NAME
ls, dir \- list directory contents \" the summary
.SH SYNOPSIS
.B ls
[\fI\,OPTION\/\fR]... [\fI\,FILE\/\fR]...
.SH DESCRIPTION
.\" Add any additional description here
.PP
List information about the \fBFILE\fPs (the current directory by default).
Sort entries alphabetically if none of \fB\-cftuvSUX\fR nor \f(CW\-\-sort\fP
is specified; see
.BR sort (1)
and
.IR locale (7),
or read \(lqthe manual\(rq \(em \s-1it\s0 isn\(aqt\& long.
.nf
Mandatory arguments to long options are mandatory for short options too.
.fi
.TP
\fB\-a\fR, \fB\-\-all\fR
do not ignore entries starting with .
"""

VDIR = LS.replace("ls, dir \\-", "vdir \\-")  # the same description under another name: kept once

STRLEN = r""".TH STRLEN 3 2022-10-30 "Linux man-pages 6.03"
.SH NAME
strlen, strnlen \- calculate the length of a string
.SH DESCRIPTION
.EX
.B size_t strlen(const char *s);
.EE
.nf
.B #include <string.h>
.fi
The
.BR strlen ()
function counts the bytes of the string pointed to by
.IR s ,
excluding the terminating null byte (\[aq]\e0\[aq]),
and
.B returns the count
of them to its caller.
.PP
A second paragraph that is not read.
"""

SHORT = r""".TH TRUE 1
.SH NAME
true \- do nothing, successfully
.SH DESCRIPTION
Exit with a status code indicating success.
"""

MDOC = r""".Dd March 3, 2022
.Dt CAT 1
.Os
.Sh NAME
.Nm cat
.Nd concatenate and print files
.Sh DESCRIPTION
The cat utility reads files sequentially, writing them to the standard output in the order they are
given on the command line and to nowhere else at all.
"""

SO = ".so man3/strlen.3\n"

EXPECTED = [
    {"name": "ls, dir", "section": "1",
     "input": "List information about the FILEs (the current directory by default). Sort entries alphabetically "
              "if none of -cftuvSUX nor --sort is specified; see sort(1) and locale(7), or read “the manual” — "
              "it isn't long.",
     "target": "list directory contents"},
    {"name": "strlen, strnlen", "section": "3",
     "input": "The strlen() function counts the bytes of the string pointed to by s, excluding the terminating "
              "null byte ('\\0'), and returns the count of them to its caller.",
     "target": "calculate the length of a string"},
]


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        assert len(header) == 60
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def _deb(pages: dict[str, str], links: dict[str, str] | None = None) -> bytes:
    """A .deb whose data.tar.xz holds ``pages`` (path -> roff text, gzipped) and symlinks (path -> target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for path, text in pages.items():
            data = gzip.compress(text.encode())
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for path, target in (links or {}).items():
            info = tarfile.TarInfo(path)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    control = io.BytesIO()
    with tarfile.open(fileobj=control, mode="w:xz"):
        pass
    return _ar([("debian-binary", b"2.0\n"), ("control.tar.xz", control.getvalue()),
                ("data.tar.xz", buffer.getvalue())])


MAN = "./usr/share/man/"
PAGES = {
    MAN + "man3/strlen.3.gz": STRLEN,  # out of order in the archive: the rows are sorted
    MAN + "man1/ls.1.gz": LS,
    MAN + "man1/vdir.1.gz": VDIR,
    MAN + "man1/true.1.gz": SHORT,
    MAN + "man1/cat.1.gz": MDOC,
    MAN + "man3/strnlen.3.gz": SO,
    MAN + "de/man1/ls.1.gz": LS.replace("list directory", "Verzeichnisinhalte auflisten"),  # a translation
}


def _pin(tmp_path, deb: bytes, **wrong) -> PinnedFile:
    path = tmp_path / "pages_1.0_all.deb"
    path.write_bytes(deb)
    fields = {"url": path.as_uri(), "size": len(deb), "sha256": hashlib.sha256(deb).hexdigest()}
    return PinnedFile(**{**fields, **wrong})


def test_reads_regular_english_man_pages_of_a_deb():
    deb = _deb(PAGES, links={MAN + "man1/dir.1.gz": "ls.1.gz"})
    names = sorted(name for name, _ in read_man_pages(deb))
    assert names == ["cat.1", "ls.1", "strlen.3", "strnlen.3", "true.1", "vdir.1"]  # no symlink, no translation


def test_pairs_from_a_pinned_deb_are_exact_sorted_and_deduplicated(tmp_path):
    pin = _pin(tmp_path, _deb(PAGES, links={MAN + "man1/dir.1.gz": "ls.1.gz"}))
    assert read_manpage_pairs([pin]) == EXPECTED


@pytest.mark.parametrize("text", [SHORT, MDOC, SO], ids=["too short", "mdoc", "redirect"])
def test_pages_that_give_no_clean_pair(text):
    assert parse_man_page(text) is None


@pytest.mark.parametrize("change", [
    ("the manual", r"the \h'1i'manual"),  # an escape this reader does not know
    ("or read", ".ti 3\nor read"),  # a request that breaks the paragraph early: it no longer ends in '.'
    (".IR locale (7),", ".UNKNOWN locale"),  # an unknown macro inside the paragraph
    ("is specified", "is specified. One. Two. Three"),  # four sentences
    (r"list directory contents \" the summary", "list"),  # a one-word summary
    (".PP\nList", ".TP\nList"),  # a list item, not a paragraph
])
def test_unclean_descriptions_are_dropped(change):
    assert parse_man_page(LS) is not None
    assert parse_man_page(LS.replace(*change)) is None


def test_a_wrong_sha256_or_size_is_refused_naming_the_url(tmp_path):
    deb = _deb(PAGES)
    bad = _pin(tmp_path, deb, sha256="0" * 64)
    with pytest.raises(DataError, match="refusing " + re.escape(bad.url)) as error:
        read_manpage_pairs([bad])
    assert "\n" not in str(error.value)
    with pytest.raises(DataError, match=f"got {len(deb)} bytes"):
        read_manpage_pairs([_pin(tmp_path, deb, size=len(deb) + 1)])
    with pytest.raises(DataError, match="could not download"):
        read_manpage_pairs([PinnedFile((tmp_path / "missing.deb").as_uri(), 1, "0" * 64)])


def test_the_demo_set_is_written_by_tuneserve_data_and_cached(tmp_path, monkeypatch, capsys):
    from training.cli import main

    monkeypatch.setenv("TUNESERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo_data, "MANPAGES_DEBS", (_pin(tmp_path, _deb(PAGES)),))
    assert demo_data.is_demo("manpages:debian") and "manpages:debian" in demo_data.DEMO_SETS
    assert main(["data", "manpages:debian", "--output", str(tmp_path / "out")]) == 0
    assert "2 rows" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "out" / "debian.jsonl").read_text().splitlines()]
    assert rows == EXPECTED and list(rows[0]) == ["name", "section", "input", "target"]
    monkeypatch.setattr(demo_data, "MANPAGES_DEBS", ())  # cached: nothing is fetched again
    assert demo_data.demo_path("manpages:debian") == tmp_path / "cache" / "manpages" / "debian.jsonl"
    with pytest.raises(DataError, match="unknown demo set"):
        demo_data.demo_path("manpages:freebsd")


@pytest.mark.slow
def test_the_real_debian_packages(tmp_path):
    rows = read_manpage_pairs(demo_data.MANPAGES_DEBS)
    assert 600 <= len(rows) <= 750
    by_name = {row["name"]: row for row in rows}
    assert by_name["sched_yield"]["target"] == "yield the processor"
    assert by_name["dir"]["target"] == "list directory contents"  # ls, dir and vdir share one description
    assert len({row["input"] for row in rows}) == len(rows)
    assert rows == sorted(rows, key=lambda row: (row["section"], row["name"]))
    assert not any("\\" in row["target"] or "\\f" in row["input"] for row in rows)
