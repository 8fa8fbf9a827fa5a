from pathlib import Path

from training.config import reference_table

README = Path(__file__).parents[2] / "README.md"


def test_readme_config_reference_is_current():
    assert reference_table() in README.read_text(), "regenerate the README table with: tuneserve config --reference"
