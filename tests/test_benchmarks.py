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


@pytest.mark.parametrize("where", [[], ["--in-process"]])
def test_the_fanout_benchmark_prints_ratios_and_the_aa_band(where: list[str]) -> None:
    args = ["--containers", "2", "--rounds", "2", "--turns", "1", "--slice", "10"]
    stdout = run_benchmark("fanout.py", *args, *where)
    assert "calling an agent in each of 2 containers (" in stdout
    assert ("in this process" in stdout) == bool(where)
    titles = [line for line in stdout.splitlines() if "(calls/s)" in line]
    assert titles == [
        f"fan-out to 2, {codec} (calls/s)" for codec in ("json", "msgpack")
    ]
    medians = [line for line in stdout.splitlines() if "median" in line]
    assert len(medians) == 2
    for row in medians:
        # floor, agent, /floor, A/A, then the A/A band
        fields = row.split()
        assert all(float(field.replace(",", "")) > 0 for field in fields[1:5])
        assert "(A/A band " in row
