"""The prose of README.md, docs/ and examples/ (their code runs as doctests)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
TEXTS = sorted(
    [
        ROOT / "README.md",
        *(ROOT / "docs").glob("*.rst"),
        *(ROOT / "examples").glob("*.py"),
    ]
)
# "pip install aiomas" without a version, a direct reference or an extra.
_FROM_PYPI = re.compile(r"pip install ['\"]?aiomas(?![\w\[-]|\s*@)")


@pytest.mark.parametrize("path", TEXTS, ids=lambda path: path.name)
def test_pip_install_aiomas_comes_with_a_warning(path: Path) -> None:
    """PyPI has only the unmaintained 2.0.1 (it crashes on Python 3.11), so a
    text that mentions a plain ``pip install aiomas`` must say so."""
    for paragraph in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
        if _FROM_PYPI.search(paragraph):
            assert "2.0.1" in paragraph, paragraph
