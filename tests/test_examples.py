"""Every program in examples/ runs and does what it says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def run_example(name: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


@pytest.mark.parametrize("codec", ["json", "msgpack"])
def test_channel_demo(codec: str) -> None:
    out = run_example("channel_demo.py", "--codec", codec)
    lines = out.splitlines()
    assert lines[0].startswith("server: listening on 127.0.0.1:")
    for i in range(3):
        assert f"client-{i}: 6 * 7 = 42" in lines
        assert f"client-{i}: 84 / 2 = 42.0" in lines
        assert (
            f"client-{i}: 1 / 0 failed remotely: ZeroDivisionError: division by zero"
            in lines
        )
    assert lines.count("server: client left") == 0
    assert sum("left" in line for line in lines) == 3
    assert lines[-1] == "server: closed"
