"""The guide under docs/ builds in MkDocs' strict mode and keeps up with the code it describes."""

import os
import re
import subprocess
import sys
from pathlib import Path

from service.settings import Settings
from training.config import reference_table

ROOT = Path(__file__).parents[1]


def test_the_guide_builds_strictly_with_the_generated_config_reference(tmp_path):
    """A broken link or anchor, a missing page or an unresolvable API reference fails the build."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    page = (tmp_path / "site" / "configuration" / "index.html").read_text()
    keys = re.findall(r"^\| `([^`]+)` \|", reference_table(), flags=re.MULTILINE)
    assert len(keys) > 80 and "train.epochs" in keys
    assert [k for k in keys if f"<code>{k}</code>" not in page] == []
    api = (tmp_path / "site" / "reference" / "tasks" / "index.html").read_text()
    assert "TaskSpec" in api and "def routes" not in api  # rendered by mkdocstrings, not pasted source


def test_every_shipped_config_and_service_setting_is_documented():
    configuration = (ROOT / "docs" / "configuration.md").read_text()
    assert [p.name for p in sorted((ROOT / "configs").glob("*.yaml")) if f"`configs/{p.name}`" not in configuration] == []
    serving = (ROOT / "docs" / "serving.md").read_text()
    variables = [f"TUNESERVE_{name.upper()}" for name in Settings.model_fields]
    assert len(variables) > 10 and [v for v in variables if v not in serving] == []


def test_readme_names_pages_that_exist_and_closes_its_code_blocks():
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"`(docs/[\w/-]+\.md)`", readme))
    assert len(named) >= 8 and [p for p in sorted(named) if not (ROOT / p).is_file()] == []
    assert readme.count("```") % 2 == 0
    assert len(readme.splitlines()) < 120  # the reference lives in docs/
