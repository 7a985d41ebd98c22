"""Tests for the command line: python -m aiomas COMMAND."""

from __future__ import annotations

import subprocess
import sys

import pytest

import aiomas
from aiomas.__main__ import COMMANDS, main


def run_aiomas(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", "-m", "aiomas", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_help_lists_the_commands() -> None:
    result = run_aiomas("--help")
    assert result.returncode == 0
    for name in ("container", "demo", "bench", "version"):
        assert name in result.stdout
    assert set(COMMANDS) == {"container", "demo", "bench", "trace", "version"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["spam"], "invalid choice: 'spam'"),
        (["container"], "the following arguments are required: HOST:PORT"),
        (["container", "nowhere"], "expected HOST:PORT"),
        (["bench", "--rounds", "0"], "must be positive"),
        (["demo", "--speed", "-1"], "must be positive"),
        (["version", "--verbose"], "unrecognized arguments: --verbose"),
    ],
)
def test_bad_arguments(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_no_command_prints_the_help() -> None:
    """Not just "required: COMMAND": the help, which lists the commands."""
    result = run_aiomas()
    assert result.returncode == 2  # argparse's code for a usage error
    assert result.stdout == ""
    assert result.stderr.startswith("usage: python -m aiomas")
    for name in COMMANDS:
        assert f"    {name}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["container", "demo", "bench", "trace", "version"])
def test_each_command_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m aiomas {name}")


def test_version() -> None:
    result = run_aiomas("version")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"aiomas {aiomas.__version__}"
    assert lines[1].startswith("Python 3.")
    assert any(line.startswith("arrow ") for line in lines)


def test_demo_command() -> None:
    result = run_aiomas(
        "demo",
        "--containers",
        "1",
        "--bidders",
        "2",
        "--external-clock",
        "--speed",
        "200",
    )
    assert result.returncode == 0, result.stderr
    assert "2 bidders in 1 subprocess containers" in result.stdout
    assert "all tasks finished:" in result.stdout


def test_demo_command_on_uvloop() -> None:
    result = run_aiomas(
        "demo", "--containers", "1", "--bidders", "2", "--loop", "uvloop"
    )
    assert result.returncode == 0, result.stderr
    assert "all tasks finished:" in result.stdout


def test_bench_command_prints_a_table() -> None:
    result = run_aiomas(
        "bench",
        "--processes",
        "--rounds",
        "1",
        "--seconds",
        "0.05",
        "--loop",
        "asyncio",
        "--only",
        "json, 100 in flight",
    )
    assert result.returncode == 0, result.stderr
    rows = [
        line for line in result.stdout.splitlines() if "json, 100 in flight" in line
    ]
    assert [row.split()[5] for row in rows] == ["floor", "channel", "rpc", "agent"]
    assert rows[0].endswith("100%")
    assert "Creating" not in result.stdout


def test_bench_in_process_prints_rounds_with_the_load_and_the_a_a_band() -> None:
    result = run_aiomas(
        "bench",
        "--rounds",
        "2",
        "--turns",
        "2",
        "--slice",
        "10",
        "--loop",
        "asyncio",
        "--only",
        "msgpack, 100 in flight",
    )
    assert result.returncode == 0, result.stderr
    assert "both ends in this process" in result.stdout
    tables = result.stdout.split("\n\n")[2:]
    assert [table.splitlines()[0] for table in tables] == [
        f"{impl}, msgpack, 100 in flight (calls/s)"
        for impl in ("channel", "rpc", "agent")
    ]
    for table in tables:
        header, *rounds, median = table.splitlines()[1:]
        impl = table.split(",")[0]
        assert header.split() == ["round", "load", "floor", impl, "/floor", "A/A"]
        assert [row.split()[0] for row in rounds] == ["1", "2"]
        for row in rounds:
            load, floor, ours, ratio, aa = (
                float(cell.replace(",", "")) for cell in row.split()[1:]
            )
            assert min(load + 1, floor, ours) > 0
            assert ratio == pytest.approx(ours / floor, rel=0.01, abs=0.001)
            assert aa > 0
        assert median.split()[0] == "median"
        assert "(A/A band " in median
    assert "Creating" not in result.stdout


def test_bench_agent_creation() -> None:
    result = run_aiomas(
        "bench", "--rounds", "1", "--only", "agents", "--agents", "2000"
    )
    assert result.returncode == 0, result.stderr
    assert "Creating 2,000 agents in one container, against the lean" in result.stdout
    assert "Round trips" not in result.stdout
    rows = result.stdout.rstrip().splitlines()[-3:]
    assert [row.split()[0] for row in rows] == ["aiomas", "lean", "lean2"]
    assert all(row.endswith(" B") for row in rows)
    assert rows[1].split()[2] == "1.000"
