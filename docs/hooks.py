"""MkDocs hook: the configuration reference is generated from the config models at every build.

``docs/configuration.md`` holds a marker where the table goes; the table comes from
``training.config.reference_table``, the same function ``tuneserve config --reference`` prints, so the reference
cannot fall behind the code.
"""

from __future__ import annotations

import sys
from pathlib import Path

MARKER = "<!-- config-reference -->"


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 - MkDocs' hook signature
    if MARKER not in markdown:
        return markdown
    root = str(Path(config["config_file_path"]).parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from training.config import reference_table

    return markdown.replace(MARKER, reference_table())
