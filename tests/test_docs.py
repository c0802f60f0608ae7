"""Documentation: every public name is in the API reference, in English and in Chinese."""

from __future__ import annotations

from pathlib import Path

import pytest

import dscompile

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_every_public_name_is_documented(lang):
    text = (DOCS / lang / "api.md").read_text(encoding="utf-8")
    missing = [name for name in dscompile.__all__ if f"`{name}" not in text and f"`models.{name}" not in text]
    assert not missing, f"docs/{lang}/api.md lacks {missing}"


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_quickstart_and_readme_name_the_two_commands(lang):
    readme = (DOCS.parent / ("README.md" if lang == "en" else "README.zh.md")).read_text(encoding="utf-8")
    assert "bash scripts/run.sh" in readme and "bash scripts/test.sh" in readme
    assert (DOCS / lang / "quickstart.md").read_text(encoding="utf-8").count("```") % 2 == 0
