"""The comparison script in benchmarks/ runs (its figures are not checked:
benchmarks are never tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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
    script = str(ROOT / "benchmarks" / "compare.py")
    result = subprocess.run(
        [sys.executable, "-W", "error", script, "HEAD", "--slices", "2", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    (row,) = [line for line in result.stdout.splitlines() if "new/base" in line]
    assert row.startswith(args[-1])
    assert "A/A" in row


def run_benchmark(name: str, *args: str, timeout: float = 60) -> str:
    """Run ``benchmarks/NAME`` with *args*; return what it printed (it must
    succeed)."""
    result = subprocess.run(
        [sys.executable, "-W", "error", str(ROOT / "benchmarks" / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_simulation_benchmark_runs() -> None:
    stdout = run_benchmark("simulation.py", "--containers", "10", "--duration", "60")
    figures, digest = stdout.splitlines()
    assert figures.startswith("10 containers (any peer), faults on: ")
    assert figures.endswith("per CPU second)")
    assert digest.startswith("message log digest: ")


def test_nats_against_tcp_prints_both() -> None:
    from .conftest import nats_missing

    if nats_missing():
        pytest.skip(str(nats_missing()))
    args = ["--seconds", "0.05", "--rounds", "2", "--mesh-containers", "3"]
    args += ["--mesh-agents", "12", "--mesh-seconds", "0.1"]
    stdout = run_benchmark("nats_vs_tcp.py", *args, timeout=120)
    lines = [line for line in stdout.splitlines() if line]
    header = ["TCP", "TCP'", "NATS", "NATS/TCP", "A/A", "band"]
    assert lines[0] == "Two containers, one agent each"
    assert lines[1].split() == header
    assert [line.split()[0] for line in lines[2:6]] == [
        "sequential",
        "p50",
        "p99",
        "100",
    ]
    assert lines[6].startswith("Mesh: 12 agents in 3 containers")
    assert lines[7] == "Mesh"
    assert lines[8].split() == header
    assert [line.split()[0] for line in lines[9:]] == ["all", "p50", "p99"]


def test_the_deadlines_benchmark_prints_latencies_and_costs() -> None:
    args = ["latency", "cost", "--repeat", "3", "--slices", "2"]
    lines = run_benchmark("deadlines.py", *args, timeout=120).splitlines()
    for kind in ("tcp", "unix", "tls", "localqueue"):
        (row,) = [line for line in lines if line.strip().startswith(f"{kind} ")]
        assert "caller" in row
        assert "p99" in row
    assert sum("handler" in line for line in lines) == 4
    (row,) = [line for line in lines if line.strip().startswith("ext in block")]
    assert "calls/s" in row
    assert "ratio" in row
