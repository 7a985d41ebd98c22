"""The prose of README.md, docs/ and examples/ (their code runs as doctests)."""

from __future__ import annotations

import errno
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
ROOT = TESTS.parent
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


_QUIET_RUN = ("-q", "-p", "no:cacheprovider", "-n", "0")
# Texts whose examples bind the ports they show.
_SHOWING_PORTS = (
    "docs/agents.rst",
    "docs/channel.rst",
    "docs/clocks.rst",
    "docs/rpc.rst",
    "docs/tls.rst",
    "README.md",
)


def test_the_examples_run_while_the_ports_they_show_are_busy() -> None:
    """The examples show ports 5555 and 5556 but run on free ones: they pass
    while someone else holds those (here: we do, unless someone else does)."""
    held: list[socket.socket] = []
    try:
        for port in (5555, 5556):
            listener = socket.socket()
            try:
                listener.bind(("127.0.0.1", port))
                listener.listen()
            except OSError as exc:
                listener.close()
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue  # Busy already, as this test wants it.
            held.append(listener)
        result = subprocess.run(
            [sys.executable, "-m", "pytest", *_QUIET_RUN, *_SHOWING_PORTS],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        for listener in held:
            listener.close()
    assert result.returncode == 0, result.stdout + result.stderr
