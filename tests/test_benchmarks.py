"""The scripts in benchmarks/ run (their figures are not checked: benchmarks
are never tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CODECS = ("json", "msgpack")


def run_script(name: str, *args: str, timeout: float = 60) -> str:
    """Run benchmarks/*name* with *args* under ``-W error``; return what it
    printed (it must succeed and print nothing on stderr)."""
    result = subprocess.run(
        [sys.executable, "-W", "error", str(ROOT / "benchmarks" / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def _in_a_git_checkout() -> bool:
    try:
        subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


@pytest.mark.skipif(not _in_a_git_checkout(), reason="needs a git checkout")
@pytest.mark.parametrize(
    "args", [["--fake", "--only", "rpc msgpack 100"], ["--only", "agent json 100"]]
)
def test_compare_with_a_revision_prints_ratios(args: list[str]) -> None:
    stdout = run_script("compare.py", "HEAD", "--slices", "2", *args, timeout=120)
    (row,) = [line for line in stdout.splitlines() if "new/base" in line]
    assert row.startswith(args[-1])
    assert "A/A" in row


def test_the_simulation_benchmark_runs() -> None:
    stdout = run_script("simulation.py", "--containers", "10", "--duration", "60")
    assert stdout.startswith("10 containers, faults on: ")
    assert stdout.rstrip().endswith("messages/s")


def test_nats_against_tcp_prints_both() -> None:
    from .conftest import nats_missing

    if nats_missing():
        pytest.skip(str(nats_missing()))
    script = str(ROOT / "benchmarks" / "nats_vs_tcp.py")
    result = subprocess.run(
        [sys.executable, "-W", "error", script, "--seconds", "0.05", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["TCP", "NATS"]
    assert [line.split()[0] for line in lines[1:]] == ["sequential", "latency", "100"]


@pytest.mark.parametrize("where", [[], ["--in-process"]])
def test_the_fanout_benchmark_prints_ratios_and_the_aa_band(where: list[str]) -> None:
    args = ["--containers", "2", "--rounds", "2", "--turns", "1", "--slice", "10"]
    stdout = run_script("fanout.py", *args, *where)
    assert "calling an agent in each of 2 containers (" in stdout
    assert ("in this process" in stdout) == bool(where)
    titles = [line for line in stdout.splitlines() if "(calls/s)" in line]
    assert titles == [f"fan-out to 2, {codec} (calls/s)" for codec in CODECS]
    medians = [line for line in stdout.splitlines() if "median" in line]
    assert len(medians) == 2
    for row in medians:
        # floor, agent, /floor, A/A, then the A/A band
        fields = row.split()
        assert all(float(field.replace(",", "")) > 0 for field in fields[1:5])
        assert "(A/A band " in row
