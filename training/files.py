"""Publishing directories so that readers see the old version or the new one, never half of either."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def swap_into_place(staged: Path, final: Path) -> None:
    """Replace ``final`` by the complete directory ``staged`` with renames; the old one is removed last."""
    old = final.with_name(f".{final.name}-old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)
