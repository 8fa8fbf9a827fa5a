"""The import contract (pyproject.toml, [tool.importlinter]): core/ stays torch-free and independent of both sides,
and the service never imports training code; the command line (training/) may use the service's backends, never the
reverse. import-linter follows imports inside functions too."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    done = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout
