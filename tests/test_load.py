"""Load tests: ``benchmarks/load.py`` run as a program, every call checked.

The load tests run the program in processes of their own (so that the memory
figures are its own, not the test runner's) with ``--json`` and check the
report: 500 concurrent RPC connections whose calls are each answered exactly
once with the right result, and agent calls between two containers of which
none is lost.  Two small tests check that the program notices what it is
looking for.

By default the sizes fit CI (a few seconds); ``--aiomas-long`` runs the issue's
full size: 500 connections x 200 calls of 1 B to 1 MiB, and 1,000,000 agent
calls (a few minutes).  The figures are printed (``-s``) and recorded as
properties.  Warnings are errors in the program's processes too, and it fails
if it leaves a task running; asyncio's debug mode stays off there, since it
makes the load three times slower.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from aiomas.testing import TIME_UNIT

LOAD = Path(__file__).resolve().parent.parent / "benchmarks" / "load.py"
MIB = 2**20
KIB = 2**10


@dataclass(frozen=True)
class LoadSize:
    """How much load a test run makes, and how long it may take."""

    name: str
    calls_per_connection: int
    max_size: int
    agent_calls: int
    seconds: float  # For the program's own timeout; the test allows more.


CI = LoadSize(
    "CI", calls_per_connection=4, max_size=64 * KIB, agent_calls=10_000, seconds=30.0
)
FULL = LoadSize(
    "full",
    calls_per_connection=200,
    max_size=MIB,
    agent_calls=1_000_000,
    seconds=1500.0,
)
CONNECTIONS = 500  # Both sizes: the number of concurrent connections.

# The program's process group is watched and killed with POSIX calls.
posix_only = pytest.mark.skipif(
    sys.platform == "win32", reason="process groups are POSIX only"
)


@pytest.fixture
def size(long_run: bool, request: pytest.FixtureRequest) -> LoadSize:
    """The CI size, or the full size with ``--aiomas-long``.

    The tests' timeout markers have ``func_only=True``, so pytest-timeout reads
    the limit when the test function starts, after this fixture: the full size
    puts its own, longer limit in front of them.
    """
    if not long_run:
        return CI
    limit = pytest.mark.timeout(FULL.seconds + 300, func_only=True)
    request.node.add_marker(limit, append=False)
    return FULL


class LoadRun(NamedTuple):
    """The outcome of a run of load.py."""

    status: int
    report: dict[str, Any]
    stderr: str


def run_load(*args: str, seconds: float) -> LoadRun:
    """Run ``load.py --json --timeout seconds *args``; return its exit status,
    its report and what it wrote to stderr.

    The program runs in a process group of its own, which is killed if it
    exceeds *seconds* (plus a margin for cleaning up) or leaves any process
    behind; so no process outlives the test.
    """
    command = [sys.executable, str(LOAD), "--json", "--timeout", str(seconds), *args]
    # Warnings are errors in the program's processes, as in the test suite.
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    driver = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = driver.communicate(timeout=seconds + 20)
    except subprocess.TimeoutExpired:
        _kill_group(driver.pid)
        stdout, stderr = driver.communicate()
        pytest.fail(f"load.py did not finish within {seconds + 20}s:\n{stderr}")
    finally:
        if driver.poll() is None:  # E.g. the test was interrupted.
            _kill_group(driver.pid)
            driver.wait()
    assert not _group_alive(driver.pid), "load.py left processes behind"
    if not stdout:
        pytest.fail(f"load.py exited with {driver.returncode} and no report:\n{stderr}")
    return LoadRun(driver.returncode, json.loads(stdout), stderr)


def _kill_group(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _group_alive(group: int) -> bool:
    """Whether a process of *group* still runs after a moment's grace (for
    processes that were just reaped); kills them if so."""
    deadline = time.monotonic() + 2.0
    while True:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        if time.monotonic() > deadline:
            _kill_group(group)
            return True
        time.sleep(50 * TIME_UNIT)


def exactly_once(count: int) -> dict[str, int]:
    """The ledger summary of *count* ids each seen exactly once."""
    return {
        "expected": count,
        "seen": count,
        "missing": 0,
        "repeats": 0,
        "unexpected": 0,
    }


def rpc_memory_limit(connections: int, in_flight: int, max_size: int) -> int:
    """A generous bound for the peak memory of either end of the RPC load.

    Beyond the interpreter (128 MiB), a connection keeps receive buffers (320
    KiB, see docs/limits.rst), and a call in flight holds a few copies of its
    payload.  (Connections used to keep a MsgPack packer of up to twice the
    largest message each; the bound still allows for that.)
    """
    per_connection = 512 * KIB + 2 * max_size + 2 * in_flight * max_size
    return 128 * MIB + connections * per_connection


@functools.cache
def import_load() -> Any:
    """Import benchmarks/load.py (not a package) as the module ``aiomas_load``."""
    spec = importlib.util.spec_from_file_location("aiomas_load", LOAD)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there.
    spec.loader.exec_module(module)
    return module


def show(record_property: Any, title: str, figures: dict[str, Any]) -> None:
    """Print *figures* (seen with ``pytest -s``) and record them in the report."""
    print(f"\n{title}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
    for key, value in figures.items():
        record_property(key, value)


@posix_only
@pytest.mark.timeout(60, func_only=True)
@pytest.mark.parametrize("codec", ["json", "msgpack"])
def test_rpc_load_every_call_answered_once_and_right(
    size: LoadSize, codec: str, record_property: Any
) -> None:
    status, report, stderr = run_load(
        *f"--connections {CONNECTIONS} --calls {size.calls_per_connection} "
        f"--max-size {size.max_size} --codec {codec} --agent-calls 0".split(),
        seconds=size.seconds,
    )
    rpc = report["rpc"]
    calls = CONNECTIONS * size.calls_per_connection
    show(
        record_property,
        f"RPC load, {size.name} size, {codec}",
        {
            "calls": calls,
            "calls/s": round(rpc["calls_per_second"]),
            "p50 ms": round(rpc["latency_p50"] * 1e3, 1),
            "p99 ms": round(rpc["latency_p99"] * 1e3, 1),
            "max ms": round(rpc["latency_max"] * 1e3, 1),
            "payload MiB": round(rpc["payload_bytes"] / MIB),
            "server peak MiB": round(rpc["server_peak_rss"] / MIB, 1),
            "client peak MiB": round(rpc["client_peak_rss"] / MIB, 1),
            "server idle MiB": round(rpc["server_idle_rss"] / MIB, 1),
            "seconds": round(report["seconds"], 2),
        },
    )
    assert report["problems"] == [], stderr
    assert status == 0, stderr
    assert rpc["connections"] == CONNECTIONS
    assert (rpc["right"], rpc["wrong"], rpc["failed"]) == (calls, 0, 0)
    assert rpc["replies"] == exactly_once(calls)
    assert rpc["server_calls"] == exactly_once(calls)
    assert rpc["server_channels_left"] == 0
    limit = rpc_memory_limit(CONNECTIONS, rpc["in_flight"], size.max_size)
    assert rpc["server_peak_rss"] < limit
    assert rpc["client_peak_rss"] < limit


@posix_only
@pytest.mark.timeout(60, func_only=True)
def test_agent_load_loses_no_call(size: LoadSize, record_property: Any) -> None:
    status, report, stderr = run_load(
        *f"--connections 0 --agent-calls {size.agent_calls}".split(),
        seconds=size.seconds,
    )
    agents = report["agents"]
    calls = size.agent_calls
    show(
        record_property,
        f"Agent load, {size.name} size",
        {
            "calls": calls,
            "calls/s": round(agents["calls_per_second"]),
            "child peak MiB": round(agents["child_peak_rss"] / MIB, 1),
            "driver peak MiB": round(agents["driver_peak_rss"] / MIB, 1),
            "seconds": round(report["seconds"], 2),
        },
    )
    assert report["problems"] == [], stderr
    assert status == 0, stderr
    assert (agents["right"], agents["wrong"], agents["failed"]) == (calls, 0, 0)
    assert agents["replies"] == exactly_once(calls)
    assert agents["executed"] == exactly_once(calls)
    # Each process holds its agents and one byte per call id, not the calls.
    assert agents["child_peak_rss"] < 256 * MIB
    assert agents["driver_peak_rss"] < 256 * MIB


async def test_the_load_test_fails_on_a_wrong_or_lost_reply() -> None:
    """The server answers call 7 wrongly and call 9 never (load.py's hidden
    option ``--faults``).  Run in this process, so that the program's own code
    also runs in debug mode and under the check for leaked tasks."""
    load = import_load()
    # 5 connections x 4 calls: ids 4 to 7 go over the second one, 8 to 11 over
    # the third.
    config = load.LoadConfig(
        connections=5,
        calls=4,
        max_size=100,
        agent_calls=0,
        timeout=0.5,
        faults="wrong:7,lose:9",
    )
    report = await load.run(config)
    assert report.problems == [
        "RPC workload timed out after 0.5s",
        # Call 9 is lost, and with it calls 10 and 11 that its connection
        # would have made next.
        "RPC replies: 3 of 20 missing, 0 repeated, 0 unexpected",
        "RPC: 1 wrong replies, 0 failed calls (first: wrong reply to call 7)",
        "RPC calls run by the server: 2 of 20 missing, 0 repeated, 0 unexpected",
    ]


def test_call_ledger_sees_repeated_and_unexpected_ids() -> None:
    """Duplicates cannot be provoked through aiomas, so the counting that would
    find them is tested on its own."""
    load = import_load()
    # Ids 10..29 that are 1 modulo 3: 10, 13, 16, 19, 22, 25, 28.
    ledger = load.CallLedger(10, 20, stride=3, residue=1)
    recorded = (10, 13, 13, 11, 9, 31, "10", 28)
    assert [call_id for call_id in recorded if ledger.record(call_id)] == [10, 13, 28]
    summary = ledger.summary()
    assert summary == load.LedgerSummary(
        expected=7, seen=3, missing=4, repeats=1, unexpected=4
    )
    assert not summary.exactly_once
    for call_id in (16, 19, 22, 25):
        ledger.record(call_id)
    assert ledger.summary().missing == 0
    assert load.log_uniform_mean(1, MIB) == pytest.approx(75_638, abs=1)
