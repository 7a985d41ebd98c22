"""Load test of aiomas: many concurrent RPC connections, many agent calls.

Usage::

    python benchmarks/load.py [--connections 500] [--calls 200]
        [--min-size 1] [--max-size 1048576] [--codec json|msgpack]
        [--agent-calls 1000000] [--seed 0] [--json] ...

Two workloads, each checked call by call; the exit status is 1 if any call is
lost, duplicated, answered wrongly or failed (or the run times out), else 0.

RPC
    An RPC server (:func:`aiomas.rpc.start_server`) runs in a child process and
    exposes ``echo(call_id, payload)``, which returns ``[call_id, payload]``.
    This process opens ``--connections`` client connections at once and makes
    ``--calls`` calls over each, ``--in-flight`` at a time per connection
    (default 1: sequential, so there are ``--connections`` calls in flight).
    Payload sizes are drawn log-uniformly from ``--min-size`` to ``--max-size``
    bytes (every order of magnitude equally likely; the mean of 1 B to 1 MiB is
    about 74 KiB).  Payloads are random slices of a random pool: ``bytes`` with
    MsgPack, ASCII ``str`` (base64 text) with JSON.  The client checks that each
    reply carries its own call id and an identical payload, and counts every
    call id on both sides: the server must run each call exactly once and the
    client must get exactly one reply for each.

Agents
    Two containers in two processes (the child started with
    :class:`aiomas.subproc.ContainerProcess`) each hold ``--agents`` agents.
    Every agent calls the agents of the other container, ``--agent-in-flight``
    calls at a time, so calls go both ways at once; ``--agent-calls`` in total,
    half each way.  A call ``work(call_id, token)`` goes to agent
    ``call_id % agents`` and returns ``[call_id, agent index, f(token)]``; both
    sides count call ids as for RPC.

The figures: calls/s, latency percentiles (RPC), payload bytes moved, and the
peak resident memory (VmHWM) of the server or child container and of this
process (the driver, measured after each workload, so it includes earlier ones).
The RPC server also reports its resident memory while all connections are open
after the calls (what connections keep between calls) and after they closed;
channel objects still alive then count as a failure (a leak).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import dataclasses
import gc
import json
import math
import os
import random
import resource
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiomas
from aiomas.benchmark import _codec_class
from aiomas.subproc import ContainerProcess

__all__ = [
    "AgentReport",
    "CallLedger",
    "LedgerSummary",
    "LoadAgent",
    "LoadConfig",
    "RpcReport",
    "log_uniform_mean",
    "main",
    "peak_rss",
    "run",
]

MIB = 2**20
# The golden ratio as a 32-bit odd number: work() mixes the caller's token with
# it, so a reply computed for another token (or not at all) does not match.
_MIX = 0x9E3779B1
# Seconds to wait for a child process to report that it listens, and to exit.
_CHILD_TIMEOUT = 30.0


@dataclasses.dataclass(frozen=True)
class LoadConfig:
    """What to run; see the module docstring.  ``connections == 0`` skips the
    RPC workload, ``agent_calls == 0`` the agent workload."""

    connections: int = 500
    calls: int = 200
    in_flight: int = 1
    min_size: int = 1
    max_size: int = MIB
    codec: str = "json"
    seed: int = 0
    agent_calls: int = 1_000_000
    agents: int = 10
    agent_in_flight: int = 10
    timeout: float = 1800.0
    debug: bool = False
    faults: str = ""  # For the tests of the checks, see serve_rpc().


def log_uniform_mean(low: int, high: int) -> float:
    """The mean of the continuous log-uniform distribution on [low, high]."""
    if low == high:
        return float(low)
    return (high - low) / math.log(high / low)


def _proc_status(field: str) -> int | None:
    """A memory figure (e.g. ``VmHWM``) of /proc/self/status in bytes, or None."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """The peak resident memory of this process in bytes.

    VmHWM, not ``ru_maxrss``: on Linux a child's ``ru_maxrss`` starts at its
    parent's peak (the exec'd process inherits it), which would hide its own.
    """
    peak = _proc_status("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def current_rss() -> int:
    """The resident memory of this process in bytes now (0 if unknown), after
    freed memory is given back to the system where possible (glibc keeps it
    otherwise, which would hide whether memory is really still in use)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # Not glibc.
            ctypes.CDLL(None).malloc_trim(0)
    return _proc_status("VmRSS") or 0


@dataclasses.dataclass
class LedgerSummary:
    """How the ids recorded in a :class:`CallLedger` match the expected ones.

    Exactly once means ``missing == repeats == unexpected == 0``.
    """

    expected: int = 0
    seen: int = 0
    missing: int = 0
    repeats: int = 0
    unexpected: int = 0

    def __iadd__(self, other: LedgerSummary) -> LedgerSummary:
        for field in dataclasses.fields(self):
            name = field.name
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    @property
    def exactly_once(self) -> bool:
        return self.missing == self.repeats == self.unexpected == 0


class CallLedger:
    """Records call ids to prove that each expected id came exactly once.

    The expected ids are those in ``range(first, first + count)`` that are
    ``residue`` modulo ``stride``.  One byte per expected id.
    """

    def __init__(self, first: int, count: int, stride: int = 1, residue: int = 0):
        self._first = first
        self._stop = first + count
        self._stride = stride
        self._residue = residue % stride
        self._expected = len(
            range(first + (self._residue - first) % stride, self._stop, stride)
        )
        self._flags = bytearray(count // stride + 1)
        self._seen = 0
        self._repeats = 0
        self._unexpected = 0

    def record(self, call_id: Any) -> bool:
        """Count *call_id*; return True if it is expected and new."""
        if (
            type(call_id) is not int
            or not self._first <= call_id < self._stop
            or call_id % self._stride != self._residue
        ):
            self._unexpected += 1
            return False
        index = (call_id - self._first) // self._stride
        if self._flags[index]:
            self._repeats += 1
            return False
        self._flags[index] = 1
        self._seen += 1
        return True

    def summary(self) -> LedgerSummary:
        return LedgerSummary(
            expected=self._expected,
            seen=self._seen,
            missing=self._expected - self._seen,
            repeats=self._repeats,
            unexpected=self._unexpected,
        )


@dataclasses.dataclass
class CallTally:
    """The caller's side of a workload: how each call ended."""

    replies: CallLedger
    right: int = 0
    wrong: int = 0
    failed: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    latencies: array[float] = dataclasses.field(default_factory=lambda: array("d"))

    def count(self, call_id: int, right: bool) -> None:
        """Count a reply to *call_id*; *right* says whether it was correct."""
        if not self.replies.record(call_id):
            return  # A repeated or unexpected id: the ledger counts it.
        if right:
            self.right += 1
        else:
            self.wrong += 1
            self._note(f"wrong reply to call {call_id}")

    def fail(self, call_id: int, exc: Exception) -> None:
        """Count a call that raised *exc* instead of returning."""
        self.replies.record(call_id)
        self.failed += 1
        self._note(f"call {call_id}: {type(exc).__name__}: {exc}")

    def _note(self, text: str) -> None:
        if len(self.errors) < 5:  # Enough to debug; a flood would drown them.
            self.errors.append(text.splitlines()[0] if text else text)


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of the sorted *ordered* (0.0 if empty)."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def _ledger_problems(what: str, summary: LedgerSummary) -> list[str]:
    if summary.exactly_once:
        return []
    return [
        f"{what}: {summary.missing} of {summary.expected} missing, "
        f"{summary.repeats} repeated, {summary.unexpected} unexpected"
    ]


def _tally_problems(what: str, tally: CallTally) -> list[str]:
    problems = _ledger_problems(f"{what} replies", tally.replies.summary())
    if tally.wrong or tally.failed:
        problems.append(
            f"{what}: {tally.wrong} wrong replies, {tally.failed} failed calls "
            f"(first: {'; '.join(tally.errors)})"
        )
    return problems


# --- The RPC workload -------------------------------------------------------


@dataclasses.dataclass
class RpcReport:
    """Figures and findings of the RPC workload."""

    connections: int
    calls_per_connection: int
    in_flight: int
    codec: str
    min_size: int
    max_size: int
    expected_mean_size: float
    mean_size: float = 0.0
    calls: int = 0
    right: int = 0
    wrong: int = 0
    failed: int = 0
    replies: LedgerSummary = dataclasses.field(default_factory=LedgerSummary)
    server_calls: LedgerSummary = dataclasses.field(default_factory=LedgerSummary)
    connect_seconds: float = 0.0
    seconds: float = 0.0
    calls_per_second: float = 0.0
    payload_bytes: int = 0
    mib_per_second: float = 0.0
    latency_p50: float = 0.0
    latency_p99: float = 0.0
    latency_max: float = 0.0
    server_peak_rss: int = 0
    server_idle_rss: int = 0  # With all connections open after the calls.
    server_end_rss: int = 0  # After all connections closed.
    server_channels_left: int = 0  # Channel objects alive then: leaks.
    client_peak_rss: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)


class PayloadSource:
    """Random payloads of a given size: slices of a random pool at random
    offsets, ``bytes`` for MsgPack and ASCII ``str`` for JSON (which has no
    bytes type)."""

    def __init__(self, codec: str, max_size: int, seed: int) -> None:
        pool_size = 2 * max_size
        rng = random.Random(seed)
        self._pool: bytes | str
        if codec == "json":
            # Base64 makes 4 characters of 3 bytes.
            text = base64.b64encode(rng.randbytes(pool_size * 3 // 4 + 3)).decode()
            self._pool = text[:pool_size]
        else:
            self._pool = rng.randbytes(pool_size)
        self._pool_size = pool_size

    def make(self, rng: random.Random, size: int) -> bytes | str:
        """A payload of *size* bytes (at most the max_size given)."""
        offset = rng.randrange(self._pool_size - size + 1)
        return self._pool[offset : offset + size]


def draw_size(rng: random.Random, low: int, high: int) -> int:
    """A log-uniform random size in [low, high]."""
    # int() rounds down: drawing from [low, high + 1) makes high as likely as
    # its neighbours.
    return min(high, int(low * ((high + 1) / low) ** rng.random()))


async def serve_rpc(
    codec: str, expected_calls: int, backlog: int, faults: str = ""
) -> None:
    """The RPC server process: serve ``echo`` on a free port of 127.0.0.1.

    Prints ``{"port": ...}`` when it listens; runs until stdin is closed (the
    driver is done, or died); then prints the ledger of executed calls and
    memory figures, as JSON.  *faults* (e.g. ``"wrong:7,lose:9"``) make the
    server answer call 7 wrongly and call 9 never, to prove that the checks work.
    """
    ledger = CallLedger(0, expected_calls)
    faulty_calls = {
        int(call_id): kind
        for kind, _, call_id in (fault.partition(":") for fault in faults.split(","))
        if call_id
    }

    @aiomas.expose
    def echo(call_id: int, payload: Any) -> Any:
        ledger.record(call_id)
        fault = faulty_calls.get(call_id)
        if fault == "lose":
            return asyncio.get_running_loop().create_future()  # Never done.
        if fault == "wrong":
            return [call_id + 1, payload]
        return [call_id, payload]

    @aiomas.expose
    def resident_memory() -> int:
        return current_rss()

    # The server's ends of the connections: Python 3.11's wait_closed() does
    # not wait for them, but the memory after the load is measured without them.
    connected: set[aiomas.rpc.RpcClient] = set()

    def client_connected(client: aiomas.rpc.RpcClient) -> None:
        connected.add(client)
        assert client.service is not None  # It serves our service.
        client.service.add_done_callback(lambda _: connected.discard(client))

    server = await aiomas.rpc.start_server(
        ("127.0.0.1", 0),
        aiomas.rpc.ServiceDict({"echo": echo, "resident_memory": resident_memory}),
        client_connected,
        codec=_codec_class(codec),
        backlog=backlog,
    )
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    print(json.dumps({"port": port}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    server.close()
    # The driver closed its ends; ours follow shortly.  (If they do not, the
    # channels left are reported.)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_CHILD_TIMEOUT / 2):
            while connected:
                await asyncio.sleep(0.01)
    await server.wait_closed()
    end_rss = current_rss()  # (Collects garbage, so only live channels count.)
    channels_left = sum(
        isinstance(obj, aiomas.channel.Channel) for obj in gc.get_objects()
    )
    result = {
        "ledger": dataclasses.asdict(ledger.summary()),
        "peak_rss": peak_rss(),
        "end_rss": end_rss,
        "channels_left": channels_left,
    }
    print(json.dumps(result), flush=True)


class _ServerProcess:
    """The RPC server child process (this program with ``--serve-rpc``)."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port

    @classmethod
    async def start(cls, config: LoadConfig, env: dict[str, str]) -> _ServerProcess:
        """Start the server and wait until it listens.

        Raises:
            RuntimeError: if it exits or is silent for _CHILD_TIMEOUT seconds.
        """
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--serve-rpc",
            "--codec",
            config.codec,
            "--connections",
            str(config.connections),
            "--calls",
            str(config.calls),
            "--faults",
            config.faults,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        try:
            ready = await asyncio.wait_for(_read_json(process), _CHILD_TIMEOUT)
            return cls(process, int(ready["port"]))
        except BaseException:  # Also when we are cancelled: leave no orphan.
            process.kill()
            await asyncio.shield(process.wait())
            raise

    async def stop(self) -> dict[str, Any]:
        """Let the server finish (close its stdin); return its final report.

        The process is reaped whatever happens (killed after _CHILD_TIMEOUT).
        """
        process = self.process
        try:
            assert process.stdin is not None
            process.stdin.close()
            report = await asyncio.wait_for(_read_json(process), _CHILD_TIMEOUT)
            await asyncio.wait_for(process.wait(), _CHILD_TIMEOUT)
            return report
        finally:
            if process.returncode is None:
                process.kill()
            await asyncio.shield(process.wait())


async def _read_json(process: asyncio.subprocess.Process) -> dict[str, Any]:
    assert process.stdout is not None
    line = await process.stdout.readline()
    if not line:
        code = await process.wait()
        raise RuntimeError(f"The server process exited with code {code}")
    result: dict[str, Any] = json.loads(line)
    return result


async def _open_clients(
    port: int, config: LoadConfig, clients: list[aiomas.rpc.RpcClient]
) -> list[BaseException]:
    """Open all connections at once, adding each to *clients* as soon as it is
    open (so that the caller can close them even if this is cancelled); return
    the errors of those that failed."""

    async def open_one() -> None:
        codec = _codec_class(config.codec)
        clients.append(
            await aiomas.rpc.open_connection(("127.0.0.1", port), codec=codec)
        )

    results = await asyncio.gather(
        *(open_one() for _ in range(config.connections)), return_exceptions=True
    )
    return [error for error in results if isinstance(error, BaseException)]


async def _rpc_calls(
    client: aiomas.rpc.RpcClient,
    index: int,
    config: LoadConfig,
    source: PayloadSource,
    tally: CallTally,
    sizes: list[int],
) -> None:
    """Make the calls of connection *index*, ``config.in_flight`` at a time."""
    rng = random.Random(config.seed * 1_000_003 + index)
    echo = client.remote.echo
    first = index * config.calls
    call_ids = iter(range(first, first + config.calls))
    perf_counter = time.perf_counter

    async def sequentially() -> None:
        # The in-flight workers share call_ids: each id is taken once.
        for call_id in call_ids:
            size = draw_size(rng, config.min_size, config.max_size)
            payload = source.make(rng, size)
            start = perf_counter()
            try:
                reply = await echo(call_id, payload)
            except Exception as exc:
                tally.fail(call_id, exc)
                continue
            tally.latencies.append(perf_counter() - start)
            sizes.append(len(payload))
            tally.count(
                call_id,
                type(reply) in (list, tuple)
                and len(reply) == 2
                and reply[0] == call_id
                and reply[1] == payload,
            )

    await asyncio.gather(*(sequentially() for _ in range(config.in_flight)))


async def run_rpc_load(config: LoadConfig, env: dict[str, str]) -> RpcReport:
    """Run the RPC workload (see the module docstring) and report on it."""
    expected = config.connections * config.calls
    report = RpcReport(
        connections=config.connections,
        calls_per_connection=config.calls,
        in_flight=config.in_flight,
        codec=config.codec,
        min_size=config.min_size,
        max_size=config.max_size,
        expected_mean_size=log_uniform_mean(config.min_size, config.max_size),
        calls=expected,
    )
    tally = CallTally(CallLedger(0, expected))
    sizes: list[int] = []
    source = PayloadSource(config.codec, config.max_size, config.seed)
    server = await _ServerProcess.start(config, env)
    clients: list[aiomas.rpc.RpcClient] = []
    try:
        start = time.perf_counter()
        try:
            async with asyncio.timeout(config.timeout):
                errors = await _open_clients(server.port, config, clients)
                report.connect_seconds = time.perf_counter() - start
                if errors:
                    report.problems.append(
                        f"{len(errors)} of {config.connections} connections "
                        f"failed: {errors[0]!r}"
                    )
                start = time.perf_counter()
                await asyncio.gather(
                    *(
                        _rpc_calls(client, i, config, source, tally, sizes)
                        for i, client in enumerate(clients)
                    )
                )
        except TimeoutError:
            report.problems.append(f"RPC workload timed out after {config.timeout}s")
        report.seconds = time.perf_counter() - start
        if clients:  # All connections open, no call in flight: what stays?
            report.server_idle_rss = await asyncio.wait_for(
                clients[0].remote.resident_memory(), _CHILD_TIMEOUT
            )
    finally:
        try:
            await asyncio.gather(*(client.close() for client in clients))
        finally:
            final = await server.stop()
    report.server_calls = LedgerSummary(**final["ledger"])
    report.server_peak_rss = int(final["peak_rss"])
    report.server_end_rss = int(final["end_rss"])
    report.server_channels_left = int(final["channels_left"])
    report.client_peak_rss = peak_rss()
    report.right, report.wrong, report.failed = tally.right, tally.wrong, tally.failed
    report.replies = tally.replies.summary()
    report.payload_bytes = 2 * sum(sizes)  # Each payload goes there and back.
    report.mean_size = sum(sizes) / len(sizes) if sizes else 0.0
    if report.seconds > 0:
        report.calls_per_second = len(sizes) / report.seconds
        report.mib_per_second = report.payload_bytes / MIB / report.seconds
    ordered = sorted(tally.latencies)
    report.latency_p50 = _percentile(ordered, 0.50)
    report.latency_p99 = _percentile(ordered, 0.99)
    report.latency_max = ordered[-1] if ordered else 0.0
    report.problems += _tally_problems("RPC", tally)
    report.problems += _ledger_problems(
        "RPC calls run by the server", report.server_calls
    )
    if report.server_channels_left:
        report.problems.append(
            f"{report.server_channels_left} channels still alive in the server "
            "after all connections closed"
        )
    return report


# --- The agent workload -----------------------------------------------------


def _mixed(call_id: int, token: int) -> int:
    return (token * _MIX + call_id) & 0xFFFFFFFF


class LoadAgent(aiomas.Agent):
    """Answers ``work()`` calls for the call ids ``first <= id < first + count``
    with ``id % agents == index``, and makes calls of its own (run_calls())."""

    def __init__(
        self,
        container: aiomas.Container,
        index: int,
        agents: int,
        first: int,
        count: int,
    ) -> None:
        super().__init__(container)
        self.index = index
        self.ledger = CallLedger(first, count, agents, index)

    @aiomas.expose
    def work(self, call_id: int, token: int) -> list[int]:
        """Count the call; return ``[call_id, index, f(token)]``."""
        self.ledger.record(call_id)
        return [call_id, self.index, _mixed(call_id, token)]

    @aiomas.expose
    async def run_calls(
        self, peers: list[str], first: int, count: int, in_flight: int, seed: int
    ) -> dict[str, Any]:
        """Call ``work()`` on *peers* (agent addresses, by index) for the ids
        ``first <= id < first + count``, *in_flight* at a time.

        Returns:
            The counts of the caller's side: ``right``, ``wrong``, ``failed``,
            ``errors`` and the ``replies`` ledger summary.
        """
        tally = await self._call(peers, first, count, in_flight, seed)
        return {
            "right": tally.right,
            "wrong": tally.wrong,
            "failed": tally.failed,
            "errors": tally.errors,
            "replies": dataclasses.asdict(tally.replies.summary()),
        }

    async def _call(
        self, peers: list[str], first: int, count: int, in_flight: int, seed: int
    ) -> CallTally:
        targets = [await self.container.connect(addr) for addr in peers]
        rng = random.Random(seed)
        tally = CallTally(CallLedger(first, count))
        call_ids = iter(range(first, first + count))

        async def sequentially() -> None:
            # The in-flight workers share call_ids: each id is taken once.
            for call_id in call_ids:
                target = call_id % len(targets)
                token = rng.getrandbits(32)
                try:
                    reply = await targets[target].work(call_id, token)
                except Exception as exc:
                    tally.fail(call_id, exc)
                    continue
                expected = [call_id, target, _mixed(call_id, token)]
                tally.count(
                    call_id, type(reply) in (list, tuple) and list(reply) == expected
                )

        await asyncio.gather(*(sequentially() for _ in range(in_flight)))
        return tally

    @aiomas.expose
    def report(self) -> dict[str, Any]:
        """The ledger of this agent's work() calls and the process' peak memory."""
        return {
            "ledger": dataclasses.asdict(self.ledger.summary()),
            "peak_rss": peak_rss(),
        }


@dataclasses.dataclass
class AgentReport:
    """Figures and findings of the agent workload."""

    calls: int
    agents: int
    in_flight_per_agent: int
    codec: str
    right: int = 0
    wrong: int = 0
    failed: int = 0
    replies: LedgerSummary = dataclasses.field(default_factory=LedgerSummary)
    executed: LedgerSummary = dataclasses.field(default_factory=LedgerSummary)
    seconds: float = 0.0
    calls_per_second: float = 0.0
    child_peak_rss: int = 0
    driver_peak_rss: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)


def _blocks(first: int, count: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(first, first + count)`` into *parts* (first, count) blocks."""
    bounds = [first + count * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(parts)]


def _seeds(seed: int, count: int, side: int) -> list[int]:
    """Distinct seeds for the *count* callers of one *side* (0 or 1)."""
    return [seed * 1_000_003 + 2 * index + side for index in range(count)]


async def run_agent_load(config: LoadConfig, env: dict[str, str]) -> AgentReport:
    """Run the agent workload (see the module docstring) and report on it."""
    report = AgentReport(
        calls=config.agent_calls,
        agents=config.agents,
        in_flight_per_agent=config.agent_in_flight,
        codec=config.codec,
    )
    # The child imports this file as "load" to spawn LoadAgents.
    path = os.pathsep.join(
        filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")])
    )
    child = await ContainerProcess.start(
        "127.0.0.1:0",
        "--codec",
        config.codec,
        "--log-level",
        "warning",
        env={**env, "PYTHONPATH": path},
    )
    try:
        container = await aiomas.Container.create(
            ("127.0.0.1", 0), codec=_codec_class(config.codec), as_coro=True
        )
        try:
            await _exchange_calls(config, container, child.manager_addr, report)
        finally:
            await container.shutdown(as_coro=True)
    finally:
        await child.wait_or_kill(_CHILD_TIMEOUT)
    report.driver_peak_rss = peak_rss()
    if report.seconds > 0:
        report.calls_per_second = report.replies.seen / report.seconds
    if report.wrong or report.failed:
        report.problems.append(
            f"agent calls: {report.wrong} wrong replies, {report.failed} failed"
        )
    report.problems += _ledger_problems("agent call replies", report.replies)
    report.problems += _ledger_problems("agent calls executed", report.executed)
    return report


async def _exchange_calls(
    config: LoadConfig,
    container: aiomas.Container,
    manager_addr: str,
    report: AgentReport,
) -> None:
    """Spawn the agents in the child (via its manager at *manager_addr*) and in
    *container*, let them call each other, fill in *report*, stop the child."""
    n_agents = config.agents
    # Ids [0, half) go from us to the child, [half, calls) from the child to us.
    half = config.agent_calls // 2
    outgoing = (0, half)
    incoming = (half, config.agent_calls - half)
    manager = await container.connect(manager_addr)
    remote: list[Any] = []
    remote_addrs: list[str] = []
    for index in range(n_agents):
        proxy, addr = await manager.spawn("load:LoadAgent", index, n_agents, *outgoing)
        remote.append(proxy)
        remote_addrs.append(addr)
    local = [LoadAgent(container, i, n_agents, *incoming) for i in range(n_agents)]
    local_addrs = [agent.addr for agent in local]
    in_flight = config.agent_in_flight
    calls = [
        agent.run_calls(remote_addrs, *block, in_flight, seed)
        for agent, block, seed in zip(
            local,
            _blocks(*outgoing, n_agents),
            _seeds(config.seed, n_agents, 0),
            strict=True,
        )
    ] + [
        proxy.run_calls(local_addrs, *block, in_flight, seed)
        for proxy, block, seed in zip(
            remote,
            _blocks(*incoming, n_agents),
            _seeds(config.seed, n_agents, 1),
            strict=True,
        )
    ]
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(config.timeout):
            results = await asyncio.gather(*calls)
    except TimeoutError:
        report.problems.append(f"agent calls timed out after {config.timeout}s")
    report.seconds = time.perf_counter() - start
    for result in results:
        report.right += result["right"]
        report.wrong += result["wrong"]
        report.failed += result["failed"]
        report.replies += LedgerSummary(**result["replies"])
        if result["errors"]:
            report.problems.append(f"agent calls: {'; '.join(result['errors'])}")
    if not results:  # Timed out: we cannot tell which calls came back.
        report.replies = LedgerSummary(
            expected=config.agent_calls, missing=config.agent_calls
        )
    for agent in local:
        report.executed += agent.ledger.summary()
    for proxy in remote:
        remote_report = await proxy.report()
        report.executed += LedgerSummary(**remote_report["ledger"])
        report.child_peak_rss = max(report.child_peak_rss, remote_report["peak_rss"])
    await manager.stop()


# --- Running, reporting, command line ---------------------------------------


@dataclasses.dataclass
class LoadReport:
    """Everything a run found; ``problems`` is empty if all calls were right."""

    python: str
    aiomas: str
    config: LoadConfig
    rpc: RpcReport | None = None
    agents: AgentReport | None = None
    seconds: float = 0.0
    problems: list[str] = dataclasses.field(default_factory=list)


async def run(config: LoadConfig) -> LoadReport:
    """Run the workloads of *config*; child processes are always reaped."""
    report = LoadReport(sys.version.split()[0], aiomas.__version__, config)
    env = dict(os.environ)
    if config.debug:
        env["PYTHONASYNCIODEBUG"] = "1"
    start = time.perf_counter()
    if config.connections:
        report.rpc = await run_rpc_load(config, env)
        report.problems += report.rpc.problems
    if config.agent_calls:
        report.agents = await run_agent_load(config, env)
        report.problems += report.agents.problems
    report.seconds = time.perf_counter() - start
    current = asyncio.current_task()
    leaked = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    if leaked:
        report.problems.append(f"{len(leaked)} tasks left running: {leaked[:3]}")
    return report


def _mib(size: float) -> str:
    return f"{size / MIB:,.1f} MiB"


def _size(size: float) -> str:
    for unit, factor in (("MiB", MIB), ("KiB", 1024)):
        if size >= factor:
            return f"{size / factor:,.1f} {unit}"
    return f"{size:,.0f} B"


def _ledger_text(summary: LedgerSummary) -> str:
    return (
        f"{summary.seen:,} of {summary.expected:,} once "
        f"(missing {summary.missing:,}, repeated {summary.repeats:,}, "
        f"unexpected {summary.unexpected:,})"
    )


def format_report(report: LoadReport) -> str:
    """The human-readable report."""
    lines = [
        f"aiomas {report.aiomas} load test, Python {report.python}, "
        f"seed {report.config.seed}, TCP loopback"
    ]
    rpc = report.rpc
    if rpc is not None:
        lines += [
            f"RPC ({rpc.codec}): {rpc.connections:,} connections x "
            f"{rpc.calls_per_connection:,} calls, {rpc.in_flight} in flight per "
            f"connection, payloads {_size(rpc.min_size)} to {_size(rpc.max_size)} "
            f"log-uniform (mean {_size(rpc.expected_mean_size)}, drawn "
            f"{_size(rpc.mean_size)}), echoed",
            f"  replies      {rpc.right:,} right, {rpc.wrong:,} wrong, "
            f"{rpc.failed:,} failed; {_ledger_text(rpc.replies)}",
            f"  server ran   {_ledger_text(rpc.server_calls)}",
            f"  connect      {rpc.connect_seconds:.2f} s for all connections",
            f"  throughput   {rpc.calls_per_second:,.0f} calls/s, "
            f"{rpc.mib_per_second:,.1f} MiB/s of payload ({_mib(rpc.payload_bytes)} "
            f"both ways) in {rpc.seconds:.2f} s",
            f"  latency      p50 {rpc.latency_p50 * 1e3:,.1f} ms, "
            f"p99 {rpc.latency_p99 * 1e3:,.1f} ms, max {rpc.latency_max * 1e3:,.1f} ms",
            f"  peak memory  server {_mib(rpc.server_peak_rss)}, "
            f"client {_mib(rpc.client_peak_rss)}",
            f"  server RSS   {_mib(rpc.server_idle_rss)} with all connections open "
            f"after the calls, {_mib(rpc.server_end_rss)} after they closed "
            f"({rpc.server_channels_left} channels left)",
        ]
    agents = report.agents
    if agents is not None:
        lines += [
            f"Agents ({agents.codec}): {agents.calls:,} calls between 2 containers "
            f"in 2 processes, both ways, {agents.agents} agents each, "
            f"{agents.in_flight_per_agent} calls in flight per agent",
            f"  replies      {agents.right:,} right, {agents.wrong:,} wrong, "
            f"{agents.failed:,} failed; {_ledger_text(agents.replies)}",
            f"  agents ran   {_ledger_text(agents.executed)}",
            f"  throughput   {agents.calls_per_second:,.0f} calls/s "
            f"in {agents.seconds:.2f} s",
            f"  peak memory  child container {_mib(agents.child_peak_rss)}, "
            f"driver {_mib(agents.driver_peak_rss)}",
        ]
    lines.append(
        f"Total {report.seconds:.1f} s: " + ("OK" if not report.problems else "FAILED")
    )
    lines += [f"  {problem}" for problem in report.problems]
    return "\n".join(lines)


def make_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """Return the argument parser of the load test's command line."""
    defaults = LoadConfig()
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Exit status 1 if any call was lost, duplicated, wrong or failed.",
    )

    def add(name: str, kind: Callable[[str], Any], text: str, metavar: str) -> None:
        default = getattr(defaults, name.lstrip("-").replace("-", "_"))
        parser.add_argument(
            name,
            type=kind,
            default=default,
            metavar=metavar,
            help=f"{text} (default: {default})",
        )

    add("--connections", int, "concurrent RPC connections; 0 skips RPC", "N")
    add("--calls", int, "RPC calls per connection", "N")
    add("--in-flight", int, "RPC calls in flight per connection", "N")
    add("--min-size", int, "smallest RPC payload", "BYTES")
    add("--max-size", int, "largest RPC payload", "BYTES")
    add("--agent-calls", int, "agent calls, half each way; 0 skips agents", "N")
    add("--agents", int, "agents per container", "N")
    add("--agent-in-flight", int, "agent calls in flight per agent", "N")
    add("--seed", int, "random seed of payload sizes, contents and tokens", "N")
    add("--timeout", float, "time limit of the calls of each workload", "SECONDS")
    parser.add_argument(
        "--codec",
        choices=["json", "msgpack"],
        default=defaults.codec,
        help=f"codec of all connections (default: {defaults.codec})",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="run all event loops in asyncio debug mode (slower)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the report as one JSON object"
    )
    parser.add_argument("--serve-rpc", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--faults", default="", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the load test command line; return the exit status."""
    parser = make_parser(prog)
    args = parser.parse_args(argv)
    if args.serve_rpc:
        expected = args.connections * args.calls
        backlog = max(100, args.connections)  # All clients connect at once.
        asyncio.run(serve_rpc(args.codec, expected, backlog, args.faults))
        return 0
    config = LoadConfig(
        **{
            field.name: getattr(args, field.name)
            for field in dataclasses.fields(LoadConfig)
        }
    )
    if (
        min(config.connections, config.agent_calls) < 0
        or min(config.calls, config.in_flight, config.agents, config.agent_in_flight)
        < 1
    ):
        parser.error("counts must be positive (--connections and --agent-calls >= 0)")
    if not 1 <= config.min_size <= config.max_size:
        parser.error("sizes must satisfy 1 <= --min-size <= --max-size")
    if config.timeout <= 0:
        parser.error("--timeout must be positive")
    report = asyncio.run(run(config), debug=config.debug)
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=1))
    else:
        print(format_report(report))
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main(prog="benchmarks/load.py"))
