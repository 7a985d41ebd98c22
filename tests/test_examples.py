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


@pytest.mark.parametrize(
    "args", [[], ["--external-clock", "--speed", "100"]], ids=["realtime", "external"]
)
def test_contract_net_demo(args: list[str]) -> None:
    out = run_example("contract_net.py", *args)
    lines = out.splitlines()
    mode = "ExternalClock at 100x real time" if args else "real time"
    assert lines[0].endswith(f"6 bidders in 2 subprocess containers ({mode})")
    for task in range(5):
        assert sum(f"] task {task} (size " in line for line in lines) == 1
        awarded = [line for line in lines if f"] task {task}: awarded to" in line]
        assert len(awarded) == 1
        winner = awarded[0].split("awarded to ")[1].split()[0]
        assert any(line.endswith(f"task {task} finished by {winner}") for line in lines)
        assert any(line.startswith(f"    task {task}: {winner} ") for line in lines)
    # Bidders live in two other processes, and win only there.
    containers = [line.split("container ")[1].split()[0] for line in lines[1:3]]
    assert len(set(containers)) == 2
    for line in lines:
        if "awarded to" in line:
            assert line.split(" at ")[1].rsplit("/", 1)[0] in containers
    assert "all tasks finished:" in lines[-6]
