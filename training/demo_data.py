"""Demo data: the VADER ground-truth sentences with mean human sentiment ratings (-4..4).

They ship in the source distribution of ``vaderSentiment==3.3.2`` (Hutto & Gilbert, ICWSM 2014).
On first use the sdist is fetched from the package registry with pip, the ``*_GroundTruth.txt`` files
(``id<TAB>mean rating<TAB>sentence``, CRLF line ends) are converted to JSONL and cached. Each row has
``id``, ``text``, ``rating`` and ``polarity`` (``positive`` / ``negative``; null for a rating of exactly 0).
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
from pathlib import Path

from core.errors import DataError

logger = logging.getLogger(__name__)

PREFIX = "vader:"
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


def is_demo(source: str) -> bool:
    return source.startswith(PREFIX)


def demo_path(source: str) -> Path:
    """Path of the cached JSONL for ``vader:<domain>``, fetching and converting it on first use."""
    domain = source[len(PREFIX):]
    if domain not in VADER_DOMAINS:
        raise DataError(f"unknown demo set {source!r}; choose one of {[PREFIX + d for d in VADER_DOMAINS]}")
    target = cache_dir() / "vader" / f"{domain}.jsonl"
    if not target.is_file():
        _materialise(target.parent)
    return target


def _materialise(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        logger.info("fetching %s from the package registry (once; cached in %s)", VADER_PACKAGE, directory)
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                   "--dest", tmp, VADER_PACKAGE]
        result = subprocess.run(command, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if result.returncode != 0 or not sdists:
            raise DataError(f"could not fetch the demo data ({VADER_PACKAGE}) with pip: "
                            f"{result.stderr.strip()[-500:] or 'no sdist downloaded'}")
        for domain, stem in VADER_DOMAINS.items():
            rows = _read_ground_truth(sdists[0], stem)
            partial = Path(tmp) / f"{domain}.jsonl"
            with partial.open("w", encoding="utf-8") as out:
                for row in rows:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
            os.replace(partial, directory / f"{domain}.jsonl")  # atomic: a reader never sees half a file


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
