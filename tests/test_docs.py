"""The prose of README.md, docs/ and examples/ (their code runs as doctests)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .shared_lock import open_shared_lock

try:
    import fcntl
except ImportError:  # Windows
    pass

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


_TRY_LOCK = """
import fcntl, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from shared_lock import open_shared_lock
fd = open_shared_lock(Path(sys.argv[2]))
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    print("busy")
else:
    print("locked")
"""


def _as_nobody(*args: str) -> str:
    """Run _TRY_LOCK as user nobody with a Python that nobody may run."""
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            result = subprocess.run(
                [python, "-c", _TRY_LOCK, *args],
                user="nobody",
                umask=0o077,
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
        except (PermissionError, FileNotFoundError):
            continue  # e.g. a Python under /root
        return result.stdout.strip()
    pytest.skip("no Python that user nobody may run")


@pytest.mark.skipif(
    sys.platform == "win32" or not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="needs root, to act as two users",
)
def test_docs_lock_is_shared_by_all_users() -> None:
    """The lock that the docs examples take turns with (they bind fixed
    ports, see conftest.py): whoever made the file, any user can take it, and
    it is the same lock for all of them."""
    import pwd

    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    with tempfile.TemporaryDirectory(prefix="aiomas-lock-") as directory:
        os.chmod(directory, 0o1777)  # Like /tmp: sticky, writable for all.
        # Made by root as the old conftest did (0644: nobody may not write).
        by_root = Path(directory) / "by-root.lock"
        by_root.touch(mode=0o644)
        assert _as_nobody(str(TESTS), str(by_root)) == "locked"
        fd = open_shared_lock(by_root)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            assert _as_nobody(str(TESTS), str(by_root)) == "busy"
        finally:
            os.close(fd)
        # Made by nobody (with umask 077): root can take it, and so could
        # any third user.
        by_nobody = Path(directory) / "by-nobody.lock"
        assert _as_nobody(str(TESTS), str(by_nobody)) == "locked"
        assert by_nobody.stat().st_mode & 0o777 == 0o444


@pytest.mark.skipif(sys.platform == "win32", reason="no flock() on Windows")
def test_docs_lock_opens_a_file_we_may_not_write(tmp_path: Path) -> None:
    lock = tmp_path / "docs.lock"
    lock.touch(mode=0o444)  # (as root, no mode keeps us from writing)
    fd = open_shared_lock(lock)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
