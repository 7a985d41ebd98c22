"""The comparison script in benchmarks/ runs (its figures are not checked:
benchmarks are never tests)."""

from __future__ import annotations

import asyncio
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from aiomas.benchmark import floor_side, library_side, take_turns

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
    result = run_python(script, "HEAD", "--slices", "2", *args, timeout=120)
    assert result.stderr == ""
    (row,) = [line for line in result.stdout.splitlines() if "new/base" in line]
    assert row.startswith(args[-1])
    assert "A/A" in row


def run_python(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run Python (warnings as errors) with *args*; it must succeed."""
    result = subprocess.run(
        [sys.executable, "-W", "error", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result


def run_benchmark(name: str, *args: str, timeout: float = 60) -> str:
    """Run ``benchmarks/NAME`` with *args*; return what it printed (it must
    succeed)."""
    return run_python(str(ROOT / "benchmarks" / name), *args, timeout=timeout).stdout


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


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_bench_latency_prints_p50s_and_the_latency_added_over_the_floor(
    loop: str,
) -> None:
    pytest.importorskip(loop)
    args = ["--rounds", "1", "--turns", "2", "--slice", "5", "--loop", loop]
    args += ["--only", "latency"]
    result = run_python("-m", "aiomas", "bench", *args)
    assert result.stderr == ""
    tables = result.stdout.split("\n\n")[2:]
    assert [table.splitlines()[0] for table in tables] == [
        f"{impl}, {codec}, 1 in flight, latency (us)"
        for codec in ("json", "msgpack")
        for impl in ("channel", "rpc", "agent")
    ]
    for table in tables:
        impl = table.split(",")[0]
        header, row, median = table.splitlines()[1:]
        assert header.split() == [
            "round", "load", "floor", "p50", impl, "p50", "added", "A/A",
            "floor", "p99", impl, "p99",
        ]  # fmt: skip
        assert row.split()[0] == "1"
        load, floor, ours, added, aa, floor_p99, ours_p99 = (
            float(cell) for cell in row.split()[1:]
        )
        assert load >= 0
        assert min(floor, ours, floor_p99, ours_p99) > 0
        assert floor_p99 >= floor
        assert ours_p99 >= ours
        # The cells are rounded to 0.1 us.
        assert added == pytest.approx(ours - floor, abs=0.11)
        assert abs(aa) < ours + 0.1
        # One round: its medians are its figures.
        assert median.split()[0] == "median"
        assert median.split()[1:7] == row.split()[2:]
        assert median.endswith(f"(A/A band {aa:.1f} .. {aa:.1f} us)")
    assert "Fan-out" not in result.stdout
    assert "Creating" not in result.stdout


async def test_take_turns_records_the_duration_of_every_call() -> None:
    sides = {
        "floor": await floor_side("json"),
        "rpc": await library_side("rpc", "json"),
    }
    try:
        sends = {name: send for name, (send, _) in sides.items()}
        durations: dict[str, list[int]] = {name: [] for name in sides}
        rates = await take_turns(sends, ["ohai"], 1, 2, 0.005, durations)
    finally:
        for _, close in sides.values():
            await close()
    for name in sides:
        assert rates[name] > 0
        assert durations[name]
        assert min(durations[name]) > 0
        # One call in flight: the calls of a turn (5 ms) end at most one call late.
        assert sum(durations[name]) <= 2 * (0.005 * 1e9 + max(durations[name]))


@pytest.mark.parametrize("layer", ["channel", "rpc", "rpc-async", "agent"])
async def test_every_library_side_echoes(layer: str) -> None:
    send, close = await library_side(layer, "msgpack")
    try:
        assert await asyncio.gather(*(send(f"ohai {i}") for i in range(3))) == [
            f"ohai {i}" for i in range(3)
        ]
    finally:
        await close()


def test_bench_latency_with_quick_and_with_processes() -> None:
    only = ["--only", "json, 1 in flight, latency", "--loop", "asyncio"]
    quick = run_python("-m", "aiomas", "bench", "--quick", *only).stdout
    assert "1 round(s) of 5 turns of 50 ms per side" in quick
    titles = [line for line in quick.splitlines() if line.endswith("latency (us)")]
    assert titles == [
        f"{impl}, json, 1 in flight, latency (us)"
        for impl in ("channel", "rpc", "agent")
    ]
    processes = run_python("-m", "aiomas", "bench", "--processes", *only).stdout
    assert "latency tables run in this process only" in processes
    assert "latency (us)" not in processes
    assert "Round trips" not in processes


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc")
def test_bench_with_steady_malloc_runs_again_with_the_tunables() -> None:
    only = ["--only", "1 MiB bytes", "--loop", "asyncio"]
    out = run_python("-m", "aiomas", "bench", "--quick", "--steady-malloc", *only)
    header, *rest = out.stdout.splitlines()
    assert ", steady malloc, " in header
    assert "rpc, 1 MiB bytes, msgpack, 1 in flight (MiB/s)" in rest
    assert any(line.lstrip().startswith("median") for line in rest)
    plain = run_python("-m", "aiomas", "bench", "--only", "nothing").stdout
    assert "steady malloc" not in plain
