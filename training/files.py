"""Publishing directories so that readers see the old version or the new one, never half of either."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def swap_into_place(staged: Path, final: Path) -> None:
    """Replace ``final`` by the complete directory ``staged`` with renames; the old one is removed last. What is
    published is readable by every user (:func:`readable`)."""
    readable(staged)
    old = final.with_name(f".{final.name}-old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)


def readable(directory: Path) -> None:
    """Make ``directory`` and everything under it readable by every user, as an installed file is: directories 0755,
    files 0644. A staging directory from ``tempfile.mkdtemp`` is 0700 and safetensors writes its files 0600, which
    would hide an artifact from a server running as another user (the Docker image's ``tuneserve``)."""
    for path in (directory, *directory.rglob("*")):
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
