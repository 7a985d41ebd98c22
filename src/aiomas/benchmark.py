"""The aiomas benchmark suite: ``python -m aiomas bench`` (or ``python -m
aiomas.benchmark``).

Request/reply round trips over TCP loopback for the channel, RPC (a call of an
exposed echo function) and agents (an agent calling an agent in another
container).  Every workload is also run on the *floor*: a bare
:class:`asyncio.Protocol` doing the same framing (4-byte length header) and the
same encoding with nothing around it, the best a naive pure-Python
implementation gets.

By default both ends of every side run in this one process, and the sides take
turns in short slices (50 ms): the floor, aiomas, and a second copy of aiomas
(the A/A pair, whose ratio is the noise band of the machine right now).  Each
round prints the machine's load beside its ratios; the summary is the median of
the rounds.  ``--processes`` measures absolute figures instead, client and
server in separate processes, whole rounds of seconds per side.

The *latency* tables (``--only latency``, in this process only) time every
call of one call in flight: per round the p50 and p99 of each side, and the
latency aiomas adds at p50 (its p50 minus the floor's, in microseconds), with
the A/A difference beside it.

The last table is the time and memory to create many agents in one container.

Benchmarks are run on purpose, never as tests: they take minutes (``--quick``
takes about one) and their figures depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import importlib
import itertools
import json
import os
import platform
import resource
import statistics
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import (
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar, cast

import aiomas

__all__ = [
    "FloorProtocol",
    "calls_per_second",
    "channel_echo",
    "floor_side",
    "library_side",
    "main",
    "rotations",
    "take_turns",
]

_HEADER = struct.Struct(">L")
_SMALL = ["ohai", 42, 3.14]
_MIB = 2**20
# About 1 MiB as JSON ("1048576, " is 9 bytes).
_INTS = list(range(1_000_000, 1_000_000 + _MIB // 9))
_K = TypeVar("_K")
SLICE_SECONDS = 0.05
"""How long each side runs in its turn in the in-process mode."""

Send = Callable[[Any], Awaitable[Any]]
Close = Callable[[], Awaitable[None]]
Side = tuple[Send, Close]
"""A way to make one call, and a way to end what serves it."""


@dataclass(frozen=True)
class Workload:
    """One line group of the table: what is sent, how, how many at once."""

    codec: str
    in_flight: int
    payload: str  # "small", "bytes" or "ints"
    impls: tuple[str, ...]
    latency: bool = False
    """Whether the figure is the latency of each call (in this process only),
    not the calls (or MiB) per second."""

    @property
    def name(self) -> str:
        what = {"small": "", "bytes": "1 MiB bytes, ", "ints": "1 MiB list of ints, "}
        name = f"{what[self.payload]}{self.codec}, {self.in_flight} in flight"
        return f"{name}, latency" if self.latency else name

    @property
    def unit(self) -> str:
        if self.latency:
            return "us"
        return "calls/s" if self.payload == "small" else "MiB/s"

    def content(self) -> Any:
        if self.payload == "bytes":
            return b"x" * _MIB
        if self.payload == "ints":
            return _INTS
        return _SMALL

    def mib(self) -> float:
        """Payload size in MiB (for MiB/s figures)."""
        if self.payload == "small":
            return 1.0
        codec = _raw_codec(self.codec)[0]
        return len(codec(self.content())) / _MIB


WORKLOADS = (
    [
        Workload(codec, in_flight, "small", ("floor", "channel", "rpc", "agent"))
        for codec in ("json", "msgpack")
        for in_flight in (1, 100)
    ]
    + [
        Workload("msgpack", 1, "bytes", ("floor", "channel", "rpc")),
        Workload("json", 1, "ints", ("floor", "channel", "rpc")),
    ]
    + [
        Workload(codec, 1, "small", ("floor", "channel", "rpc", "agent"), latency=True)
        for codec in ("json", "msgpack")
    ]
)


def _raw_codec(name: str) -> tuple[Callable[[Any], bytes], Callable[[bytes], Any]]:
    if name == "json":
        return (lambda obj: json.dumps(obj).encode()), json.loads
    msgpack: Any = importlib.import_module("msgpack")
    return (
        lambda obj: cast(bytes, msgpack.packb(obj, use_bin_type=True)),
        lambda data: msgpack.unpackb(data, raw=False, use_list=False),
    )


def _codec_class(name: str) -> type[aiomas.codecs.Codec]:
    return aiomas.JSON if name == "json" else aiomas.MsgPack


class FloorProtocol(asyncio.Protocol):
    """The floor: length-prefixed frames of ``[type, id, content]`` messages."""

    def __init__(self, codec: str, serve: bool) -> None:
        self.encode, self.decode = _raw_codec(codec)
        self.serve = serve
        self.buffer = bytearray()
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.next_id = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports are duck-typed.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while len(buffer) >= 4:
            (size,) = _HEADER.unpack_from(buffer)
            if len(buffer) < 4 + size:
                break
            msg_type, msg_id, content = self.decode(bytes(buffer[4 : 4 + size]))
            del buffer[: 4 + size]
            if msg_type == 0 and self.serve:
                self._write([1, msg_id, content])
            else:
                self.pending.pop(msg_id).set_result(content)

    def send(self, content: Any) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        msg_id = self.next_id
        self.next_id += 1
        self.pending[msg_id] = future
        self._write([0, msg_id, content])
        return future

    def _write(self, message: list[Any]) -> None:
        payload = self.encode(message)
        assert self.transport is not None
        self.transport.write(_HEADER.pack(len(payload)) + payload)


class EchoAgent(aiomas.Agent):
    """The agent called in the agent workloads."""

    @aiomas.expose
    def echo(self, content: Any) -> Any:
        return content


@aiomas.expose
def _rpc_echo(content: Any) -> Any:
    return content


async def channel_echo(channel: aiomas.channel.Channel) -> None:
    """Answer every request on *channel* with its content until the
    connection ends (the server of the channel workloads)."""
    try:
        while True:
            request = await channel.recv()
            await request.reply(request.content)
    except ConnectionResetError:
        pass


async def _serve(impl: str, codec: str) -> None:
    """Serve *impl* on a free port, print the port, run until stdin closes."""
    loop = asyncio.get_running_loop()
    codec_cls = _codec_class(codec)
    addr = ("127.0.0.1", 0)
    close: Callable[[], Awaitable[None]]
    if impl == "agent":
        container = await aiomas.Container.create(addr, codec=codec_cls, as_coro=True)
        EchoAgent(container)
        _, port = aiomas.agent.split_host_port(container.base_url[len("tcp://") : -1])

        async def close() -> None:
            await container.shutdown(as_coro=True)

    else:
        server: asyncio.AbstractServer
        if impl == "floor":
            server = await loop.create_server(
                lambda: FloorProtocol(codec, serve=True), *addr
            )
        elif impl == "rpc":
            service = aiomas.rpc.ServiceDict({"echo": _rpc_echo})
            server = await aiomas.rpc.start_server(addr, service, codec=codec_cls)
        else:
            server = await aiomas.channel.start_server(
                addr, channel_echo, codec=codec_cls
            )
        port = cast(asyncio.Server, server).sockets[0].getsockname()[1]

        async def close() -> None:
            server.close()

    print(port, flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    await close()


async def _measure(impl: str, workload: Workload, port: int, seconds: float) -> float:
    """Call the server at *port* for *seconds*; return calls per second."""
    loop = asyncio.get_running_loop()
    codec_cls = _codec_class(workload.codec)
    send: Callable[[Any], Awaitable[Any]]
    close: Callable[[], Awaitable[Any]]
    if impl == "floor":
        transport, protocol = await loop.create_connection(
            lambda: FloorProtocol(workload.codec, serve=False), "127.0.0.1", port
        )
        send = protocol.send

        async def close() -> None:
            transport.close()

    elif impl == "agent":
        container = await aiomas.Container.create(
            ("127.0.0.1", 0), codec=codec_cls, as_coro=True
        )
        send = (await container.connect(f"tcp://127.0.0.1:{port}/0")).echo

        async def close() -> None:
            await container.shutdown(as_coro=True)

    elif impl == "rpc":
        client = await aiomas.rpc.open_connection(("127.0.0.1", port), codec=codec_cls)
        send = client.remote.echo
        close = client.close
    else:
        channel = await aiomas.channel.open_connection(
            ("127.0.0.1", port), codec=codec_cls
        )
        send = channel.send
        close = channel.close
    rate = await calls_per_second(send, workload.content(), workload.in_flight, seconds)
    await close()
    return rate


async def calls_per_second(
    send: Callable[[Any], Awaitable[Any]],
    content: Any,
    in_flight: int,
    seconds: float,
    durations: list[int] | None = None,
) -> float:
    """Make calls ``send(content)`` for *seconds*, *in_flight* at a time;
    return how many were answered per second.  With *durations*, append
    to it how long each call took (ns, from the call to its answer)."""
    count = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            if durations is None:
                await send(content)
            else:
                began = time.perf_counter_ns()
                await send(content)
                durations.append(time.perf_counter_ns() - began)
            count += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return count / (time.perf_counter() - start)


# --- In one process: sides taking turns in slices ------------------------------


async def floor_side(codec: str) -> Side:
    """A server and a client of the floor, both in this process, on loopback."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: FloorProtocol(codec, serve=True), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    transport, protocol = await loop.create_connection(
        lambda: FloorProtocol(codec, serve=False), "127.0.0.1", port
    )

    async def close() -> None:
        transport.close()
        server.close()
        await server.wait_closed()

    return protocol.send, close


async def library_side(layer: str, codec: str, lib: Any = aiomas) -> Side:
    """A server and a client of *layer* (``"channel"``, ``"rpc"``,
    ``"rpc-async"``, whose function is a coroutine, or ``"agent"``), both in
    this process, on loopback.

    *lib* is the aiomas package to measure: this one, or an older revision
    imported under another name (``benchmarks/compare.py`` does that), so only
    names that every revision has are used here.
    """
    codec_cls = lib.JSON if codec == "json" else lib.MsgPack
    addr = ("127.0.0.1", 0)
    if layer == "channel":
        server = await lib.channel.start_server(addr, channel_echo, codec=codec_cls)
        port = server.sockets[0].getsockname()[1]
        channel = await lib.channel.open_connection(
            ("127.0.0.1", port), codec=codec_cls
        )

        async def close_channel() -> None:
            await channel.close()
            server.close()
            await server.wait_closed()

        return channel.send, close_channel
    if layer in ("rpc", "rpc-async"):

        async def echo(content: Any) -> Any:
            return content

        service = lib.rpc.ServiceDict(
            {"echo": lib.expose(echo if layer == "rpc-async" else lambda c: c)}
        )
        server = await lib.rpc.start_server(addr, service, codec=codec_cls)
        port = server.sockets[0].getsockname()[1]
        client = await lib.rpc.open_connection(("127.0.0.1", port), codec=codec_cls)

        async def close_rpc() -> None:
            await client.close()
            server.close()
            await server.wait_closed()

        return client.remote.echo, close_rpc
    if layer != "agent":
        raise ValueError(f"unknown layer {layer!r}")

    class Echo(lib.Agent):  # type: ignore[misc]
        @lib.expose  # type: ignore[untyped-decorator]
        def echo(self, content: Any) -> Any:
            return content

    callee = await lib.Container.create(addr, codec=codec_cls, as_coro=True)
    Echo(callee)
    caller = await lib.Container.create(addr, codec=codec_cls, as_coro=True)
    proxy = await caller.connect(callee.base_url + "0")

    async def close() -> None:
        await caller.shutdown(as_coro=True)
        await callee.shutdown(as_coro=True)

    return proxy.echo, close


def rotations(sides: Iterable[_K], rounds: int) -> Iterator[list[_K]]:
    """The order of *sides* in each of *rounds* rounds: the side that goes
    first moves on by one each round, so that none is always first (or
    always after the same one)."""
    names = list(sides)
    for turn in range(rounds):
        start = turn % len(names)
        yield names[start:] + names[:start]


async def take_turns(
    sides: Mapping[str, Send],
    content: Any,
    in_flight: int,
    turns: int,
    seconds: float = SLICE_SECONDS,
    durations: Mapping[str, list[int]] | None = None,
) -> dict[str, float]:
    """Let every side make calls for *seconds*, in turn, *turns* times (the
    side that starts rotates); return each side's calls per second over all
    its turns.  With *durations*, append each call's duration (ns) to the
    list of its side (see :func:`calls_per_second`)."""
    calls = dict.fromkeys(sides, 0.0)
    elapsed = dict.fromkeys(sides, 0.0)
    for order in rotations(sides, turns):
        for name in order:
            began = time.perf_counter()
            rate = await calls_per_second(
                sides[name],
                content,
                in_flight,
                seconds,
                None if durations is None else durations[name],
            )
            took = time.perf_counter() - began
            calls[name] += rate * took
            elapsed[name] += took
    return {name: calls[name] / elapsed[name] for name in sides}


@dataclass(frozen=True)
class RoundResult:
    """One round of the in-process mode: each side's rate and the load; for
    a latency workload also each side's p50 and p99 (microseconds)."""

    rates: dict[str, float]
    load: float
    p50: dict[str, float] = field(default_factory=dict)
    p99: dict[str, float] = field(default_factory=dict)

    def ratio(self, side: str, other: str) -> float:
        return self.rates[side] / self.rates[other]

    def added(self, side: str, other: str) -> float:
        """How much longer (us) the median call of *side* took than *other*'s."""
        return self.p50[side] - self.p50[other]


def _percentiles(
    durations: Mapping[str, list[int]], fraction: float
) -> dict[str, float]:
    """The nearest-rank percentile *fraction* (us) of the durations (ns) of
    each side that has any."""
    percentiles = {}
    for side, values in durations.items():
        if values:
            ordered = sorted(values)
            index = min(len(ordered) - 1, int(fraction * len(ordered)))
            percentiles[side] = ordered[index] / 1000
    return percentiles


def _band(values: Sequence[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}"


async def measure_in_process(
    workload: Workload, impl: str, rounds: int, turns: int, seconds: float
) -> list[RoundResult]:
    """Measure *impl* of *workload* against the floor and against a second
    copy of itself (A/A), *rounds* rounds of *turns* turns each (and, for a
    latency workload, every call's duration)."""
    sides = {
        "floor": await floor_side(workload.codec),
        "ours": await library_side(impl, workload.codec),
        "ours2": await library_side(impl, workload.codec),
    }
    sends = {name: send for name, (send, _) in sides.items()}
    content = workload.content()
    try:
        await take_turns(sends, content, workload.in_flight, 1, seconds)  # warm up
        results = []
        for _ in range(rounds):
            durations: dict[str, list[int]] = {name: [] for name in sides}
            rates = await take_turns(
                sends,
                content,
                workload.in_flight,
                turns,
                seconds,
                durations if workload.latency else None,
            )
            scale = workload.mib()
            results.append(
                RoundResult(
                    {name: rate * scale for name, rate in rates.items()},
                    os.getloadavg()[0],
                    _percentiles(durations, 0.5),
                    _percentiles(durations, 0.99),
                )
            )
        return results
    finally:
        for _, close in sides.values():
            await close()


async def _in_process_table(
    workloads: Sequence[Workload], rounds: int, turns: int, seconds: float
) -> None:
    for workload in workloads:
        for impl in workload.impls:
            if impl == "floor":
                continue
            results = await measure_in_process(workload, impl, rounds, turns, seconds)
            title = f"{impl}, {workload.name} ({workload.unit})"
            if workload.latency:
                print_latency_rounds(title, impl, results)
            else:
                print_rounds(title, impl, results)


def print_rounds(title: str, impl: str, results: Sequence[RoundResult]) -> None:
    """Print *results* (sides ``floor``, ``ours`` and ``ours2``) as a table
    under *title*: a row per round, then the medians and the A/A band."""
    print(f"\n{title}")
    print(f"  {'round':<7}{'load':>6}{'floor':>11}{impl:>11}{'/floor':>8}{'A/A':>7}")
    for number, result in enumerate(results, 1):
        print(
            f"  {number:<7}{result.load:>6.2f}"
            f"{result.rates['floor']:>11,.0f}{result.rates['ours']:>11,.0f}"
            f"{result.ratio('ours', 'floor'):>8.3f}"
            f"{result.ratio('ours2', 'ours'):>7.3f}",
            flush=True,
        )
    ratios = [result.ratio("ours", "floor") for result in results]
    aa = [result.ratio("ours2", "ours") for result in results]
    floor = statistics.median(result.rates["floor"] for result in results)
    ours = statistics.median(result.rates["ours"] for result in results)
    print(
        f"  {'median':<13}{floor:>11,.0f}{ours:>11,.0f}"
        f"{statistics.median(ratios):>8.3f}{statistics.median(aa):>7.3f}"
        f"   (A/A band {_band(aa)})",
        flush=True,
    )


def print_latency_rounds(title: str, impl: str, results: Sequence[RoundResult]) -> None:
    """Print the latencies of *results* (sides ``floor``, ``ours`` and
    ``ours2``) as a table under *title*: a row per round with the p50 and p99
    of the floor and of *impl*, the latency *impl* adds at p50 (its p50 minus
    the floor's) and the A/A difference (``ours2``'s p50 minus ``ours``');
    then the medians over the rounds and the A/A band."""
    print(f"\n{title}")
    print(
        f"  {'round':<7}{'load':>6}{'floor p50':>11}{f'{impl} p50':>12}"
        f"{'added':>8}{'A/A':>7}{'floor p99':>11}{f'{impl} p99':>12}"
    )
    columns: list[list[float]] = [[] for _ in range(6)]
    for number, result in enumerate(results, 1):
        row = (
            result.p50["floor"],
            result.p50["ours"],
            result.added("ours", "floor"),
            result.added("ours2", "ours"),
            result.p99["floor"],
            result.p99["ours"],
        )
        for column, value in zip(columns, row, strict=True):
            column.append(value)
        print(f"  {number:<7}{result.load:>6.2f}{_latency_cells(row)}", flush=True)
    aa = columns[3]
    print(
        f"  {'median':<13}{_latency_cells([statistics.median(c) for c in columns])}"
        f"   (A/A band {min(aa):.1f} .. {max(aa):.1f} us)",
        flush=True,
    )


def _latency_cells(row: Sequence[float]) -> str:
    widths = (11, 12, 8, 7, 11, 12)
    return "".join(
        f"{value:>{width}.1f}" for value, width in zip(row, widths, strict=True)
    )


def run_in_process(
    workloads: Sequence[Workload],
    loop_name: str,
    rounds: int,
    turns: int,
    seconds: float,
) -> None:
    """Measure and print *workloads* on *loop_name*, both ends in this
    process, the floor and two copies of aiomas taking turns."""
    print(f"\nRound trips, {loop_name}, both ends in this process:")
    _run(_in_process_table(workloads, rounds, turns, seconds), loop_name)


def _run(coro: Coroutine[Any, Any, Any], loop_name: str) -> Any:
    """Run *coro* on a new event loop of the kind *loop_name*."""
    with asyncio.Runner(loop_factory=aiomas.util.loop_factory(loop_name)) as runner:
        return runner.run(coro)


def _round(impl: str, workload: Workload, seconds: float, loop_name: str) -> float:
    """One measurement: a server process and this process as the client."""
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aiomas.benchmark",
            "--serve",
            impl,
            "--codec",
            workload.codec,
            "--loop",
            loop_name,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        rate: float = _run(_measure(impl, workload, port, seconds), loop_name)
        return rate
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(30)


def _table_header() -> str:
    return (
        f"{'workload':<48}{'impl':<9}{'median':>10}{'min':>10}{'max':>10}"
        f"{'vs floor':>10}"
    )


def run_roundtrips(
    workloads: Sequence[Workload], loop_name: str, rounds: int, seconds: float
) -> None:
    """Measure and print *workloads* on *loop_name*."""
    print(f"\nRound trips, {loop_name}:")
    print(_table_header())
    for workload in workloads:
        results: dict[str, list[float]] = {impl: [] for impl in workload.impls}
        for _ in range(rounds):
            for impl in workload.impls:
                rate = _round(impl, workload, seconds, loop_name)
                results[impl].append(rate * workload.mib())
        floor = statistics.median(results["floor"])
        for impl, values in results.items():
            median = statistics.median(values)
            name = f"{workload.name} ({workload.unit})"
            print(
                f"{name:<48}{impl:<9}{median:>10,.0f}{min(values):>10,.0f}"
                f"{max(values):>10,.0f}{median / floor:>10.0%}",
                flush=True,
            )


_FANOUT_CODECS = ("json", "msgpack")


async def _start_callee() -> tuple[
    dict[str, tuple[str, int]], Callable[[], Awaitable[None]]
]:
    """A callee of the fan-out workload: for each codec, an
    :class:`EchoAgent` in a container and a floor server.  Return, by codec,
    the agent's address and the floor's port, and a function closing them."""
    loop = asyncio.get_running_loop()
    addr = ("127.0.0.1", 0)
    containers = []
    floors = []
    callee = {}
    for codec in _FANOUT_CODECS:
        container = await aiomas.Container.create(
            addr, codec=_codec_class(codec), as_coro=True
        )
        containers.append(container)
        EchoAgent(container)
        floor = await loop.create_server(
            functools.partial(FloorProtocol, codec, serve=True), *addr
        )
        floors.append(floor)
        callee[codec] = (container.base_url + "0", floor.sockets[0].getsockname()[1])

    async def close() -> None:
        for floor in floors:
            floor.close()
        for container in containers:
            await container.shutdown(as_coro=True)
        for floor in floors:
            await floor.wait_closed()

    return callee, close


async def _serve_fanout() -> None:
    """Serve a callee of the fan-out workload; print its addresses and ports,
    run until stdin closes."""
    callee, close = await _start_callee()
    print(*(field for codec in _FANOUT_CODECS for field in callee[codec]), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await close()


async def _fanout_sides(
    callees: Sequence[tuple[str, int]], codec: str
) -> tuple[dict[str, Send], Close]:
    """The sides of the fan-out workload: the floor and two caller containers
    (``ours`` and, for the A/A band, ``ours2``), each a function that calls
    every callee at once (its argument is sent to each); and a function that
    closes them."""
    loop = asyncio.get_running_loop()
    transports = []
    floors = []
    for _, port in callees:
        transport, protocol = await loop.create_connection(
            lambda: FloorProtocol(codec, serve=False), "127.0.0.1", port
        )
        transports.append(transport)
        floors.append(protocol)
    containers = []
    sides: dict[str, Send] = {
        "floor": functools.partial(_call_all, [floor.send for floor in floors])
    }
    for side in ("ours", "ours2"):
        container = await aiomas.Container.create(
            ("127.0.0.1", 0), codec=_codec_class(codec), as_coro=True
        )
        containers.append(container)
        proxies = [await container.connect(url) for url, _ in callees]
        sides[side] = functools.partial(_call_all, [proxy.echo for proxy in proxies])

    async def close() -> None:
        for transport in transports:
            transport.close()
        for container in containers:
            await container.shutdown(as_coro=True)

    return sides, close


def _call_all(sends: Sequence[Send], content: Any) -> Awaitable[Any]:
    return asyncio.gather(*(send(content) for send in sends))


async def measure_fanout(
    callees: Sequence[tuple[str, int]] | int,
    codec: str,
    rounds: int,
    turns: int,
    seconds: float,
) -> list[RoundResult]:
    """Measure the fan-out workload with *codec*, *rounds* rounds of *turns*
    turns of *seconds* per side; *callees* are their addresses (see
    :func:`start_fanout_callees`) or the number of callees to serve in this
    process.  Rates are calls (not fan-outs) per second."""
    if isinstance(callees, int):
        started = [await _start_callee() for _ in range(callees)]
        try:
            addresses = [callee[codec] for callee, _ in started]
            return await measure_fanout(addresses, codec, rounds, turns, seconds)
        finally:
            for _, close_callee in started:
                await close_callee()
    sends, close = await _fanout_sides(callees, codec)
    try:
        await take_turns(sends, _SMALL, 1, 1, seconds)  # warm up
        results = []
        for _ in range(rounds):
            rates = await take_turns(sends, _SMALL, 1, turns, seconds)
            results.append(
                RoundResult(
                    {name: rate * len(callees) for name, rate in rates.items()},
                    os.getloadavg()[0],
                )
            )
        return results
    finally:
        await close()


def start_fanout_callees(
    number: int, loop_name: str
) -> tuple[list[subprocess.Popen[str]], dict[str, list[tuple[str, int]]]]:
    """Start *number* callee processes; return them and, for each codec, the
    address of the agent and the port of the floor server in each."""
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "aiomas.benchmark",
                "--serve",
                "fanout",
                "--loop",
                loop_name,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(number)
    ]
    callees: dict[str, list[tuple[str, int]]] = {c: [] for c in _FANOUT_CODECS}
    try:
        for process in processes:
            assert process.stdout is not None
            fields = process.stdout.readline().split()
            for i, codec in enumerate(_FANOUT_CODECS):
                callees[codec].append((fields[2 * i], int(fields[2 * i + 1])))
    except BaseException:
        stop_processes(processes)
        raise
    return processes, callees


def stop_processes(processes: Sequence[subprocess.Popen[str]]) -> None:
    """Close the stdin of each of *processes* (which ends them) and wait."""
    for process in processes:
        assert process.stdin is not None
        process.stdin.close()
    for process in processes:
        process.wait(30)
        if process.stdout is not None:
            process.stdout.close()


def run_fanout(
    number: int,
    loop_name: str,
    rounds: int,
    turns: int,
    seconds: float,
    in_process: bool = False,
) -> None:
    """Measure and print the fan-out workload: one container calling an agent
    in each of *number* containers at once, again and again, against the floor
    doing the same calls, with JSON and MsgPack.  The callees run in separate
    processes, or with *in_process* in this one (on TCP loopback all the
    same)."""
    where = "in this process" if in_process else "in separate processes"
    print(
        f"\nFan-out, {loop_name}: one container calling an agent in each of "
        f"{number} containers ({where}) at once:"
    )
    processes, callees = (
        ([], None) if in_process else start_fanout_callees(number, loop_name)
    )
    try:
        for codec in _FANOUT_CODECS:
            results = _run(
                measure_fanout(
                    number if callees is None else callees[codec],
                    codec,
                    rounds,
                    turns,
                    seconds,
                ),
                loop_name,
            )
            print_rounds(f"fan-out to {number}, {codec} (calls/s)", "agent", results)
    finally:
        stop_processes(processes)


class _PlainAgent(aiomas.Agent):
    """An agent subclass as users write it (with an instance dict)."""

    @aiomas.expose
    def ping(self) -> str:
        return "pong"


class LeanContainer:
    """The container of the lean model: its agents by id in a dict."""

    __slots__ = ("agents", "base_url", "ids")

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.agents: dict[str, LeanAgent] = {}
        self.ids = itertools.count()


class LeanAgent:
    """The lean model of an agent, the least an agent needs: an object holding
    its container, id, address and router (``None`` until used) in its dict,
    registered in its container's dict."""

    def __init__(self, container: LeanContainer) -> None:
        aid = str(next(container.ids))
        self.container = container
        self.aid = aid
        self.addr = container.base_url + aid
        self.router: aiomas.rpc.Router | None = None
        container.agents[aid] = self


# The sides of the agent creation benchmark: aiomas, the lean model, and a
# second lean model (the A/A pair).
_CREATION_SIDES = ("aiomas", "lean", "lean2")


async def _agent_factory(side: str) -> tuple[Callable[[], object], Callable[[], Any]]:
    """A function making one agent of *side* and one closing its container."""
    if side == "aiomas":
        container = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)

        def make() -> object:
            return _PlainAgent(container)

        return make, lambda: container.shutdown(as_coro=True)
    lean = LeanContainer("tcp://127.0.0.1:5555/")

    def make_lean() -> object:
        return LeanAgent(lean)

    async def close() -> None:
        lean.agents.clear()

    return make_lean, close


async def _creation_slices(
    number: int, rounds: int
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Create *number* agents on each side (each side in one container) in
    *rounds* rounds, every side making the same share per round in turn.
    Return each side's overall rate (agents/s) and the per-round ratios of
    aiomas and lean2 to lean."""
    factories = {side: await _agent_factory(side) for side in _CREATION_SIDES}
    spent = dict.fromkeys(_CREATION_SIDES, 0.0)
    ratios: dict[str, list[float]] = {"aiomas": [], "lean2": []}
    keep: list[object] = []
    order = list(_CREATION_SIDES)
    made = 0
    try:
        for round_ in range(rounds):
            share = number * (round_ + 1) // rounds - made
            times = {}
            for side in order:
                make = factories[side][0]
                start = time.perf_counter()
                for _ in range(share):
                    keep.append(make())
                times[side] = time.perf_counter() - start
                spent[side] += times[side]
            made += share
            # Every side goes first in turn: the garbage collector runs on
            # all objects made so far, so any side may meet it.
            order.append(order.pop(0))
            for side, values in ratios.items():
                values.append(times["lean"] / times[side])
    finally:
        for _, close in factories.values():
            await close()
    totals = {side: number / spent[side] for side in _CREATION_SIDES}
    return totals, ratios


def _bytes_per_agent(side: str, number: int) -> tuple[float, float]:
    """Bytes per agent of *side* when *number* are made in one container: by
    tracemalloc, and by the growth of the resident set (meaningful in a fresh
    process only)."""

    async def create(trace: bool) -> float:
        make, close = await _agent_factory(side)
        try:
            gc.collect()
            if trace:
                tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0] if trace else _rss()
            agents = [make() for _ in range(number)]
            used = (tracemalloc.get_traced_memory()[0] if trace else _rss()) - before
            assert len(agents) == number
            return used / number
        finally:
            tracemalloc.stop()
            await close()

    rss = asyncio.run(create(False))
    return asyncio.run(create(True)), rss


def _rss() -> int:
    """The resident set size of this process in bytes (its peak where there is
    no /proc)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def run_agent_creation(number: int) -> None:
    """Measure and print the rate and memory of creating *number* agents in
    one container, against the lean model (:class:`LeanAgent`)."""
    rounds = max(1, min(100, number // 1000))
    totals, ratios = asyncio.run(_creation_slices(number, rounds))
    memory = {side: _memory_in_subprocess(side, number) for side in ("aiomas", "lean")}
    print(
        f"\nCreating {number:,} agents in one container, against the lean model "
        f"(alternating, {rounds} rounds; ratios: median and 10-90 % of rounds):"
    )
    print(
        f"{'':<8}{'agents/s':>12}{'vs lean':>9}{'band':>16}"
        f"{'tracemalloc':>13}{'RSS':>9}"
    )
    for side in ("aiomas", "lean", "lean2"):
        values = ratios.get(side, [1.0])
        lo, hi = _quantiles(values)
        traced, rss = memory.get(side, memory["lean"])
        print(
            f"{side:<8}{totals[side]:>12,.0f}{statistics.median(values):>9.3f}"
            f"{f'{lo:.3f} .. {hi:.3f}':>16}{traced:>11.0f} B{rss:>7.0f} B"
        )


def _quantiles(values: list[float]) -> tuple[float, float]:
    """The 10th and 90th percentile of *values* (the band of a noisy ratio)."""
    if len(values) < 2:
        return values[0], values[0]
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return deciles[0], deciles[-1]


def _memory_in_subprocess(side: str, number: int) -> tuple[float, float]:
    output = subprocess.run(
        [
            sys.executable,
            "-m",
            "aiomas.benchmark",
            "--agent-memory",
            side,
            "--agents",
            str(number),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    traced, rss = output.split()
    return float(traced), float(rss)


def _available_loops(wanted: Sequence[str]) -> list[str]:
    loops = []
    for name in wanted:
        try:
            aiomas.util.loop_factory(name)
        except ImportError as exc:
            print(f"{exc}: skipping it")
            continue
        loops.append(name)
    return loops


STEADY_MALLOC: Final = (
    "glibc.malloc.mmap_threshold=67108864:glibc.malloc.trim_threshold=268435456"
    ":glibc.malloc.top_pad=67108864"
)
"""The glibc tunables of ``--steady-malloc``: allocations up to 64 MiB come
from the heap, which keeps 256 MiB before it gives memory back and grows by
64 MiB at least, so that a freed 1 MiB buffer is reused, not faulted in
again."""


def make_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """Return the argument parser of the benchmark command line."""
    parser = argparse.ArgumentParser(
        prog=prog, description=(__doc__ or "").split("\n\n")[0].replace("``", "")
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds per figure (default: 5)"
    )
    parser.add_argument(
        "--processes",
        action="store_true",
        help="absolute figures: client and server in separate processes, "
        "whole rounds of --seconds per side (default: both ends in this "
        "process, sides taking turns in slices)",
    )
    parser.add_argument(
        "--turns",
        type=int,
        default=20,
        help="turns per side and round, in this process (default: 20)",
    )
    parser.add_argument(
        "--slice",
        type=float,
        default=SLICE_SECONDS * 1000,
        metavar="MS",
        help="milliseconds per turn, in this process (default: 50)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=2.0,
        help="seconds per measurement with --processes (default: 2)",
    )
    parser.add_argument(
        "--loop",
        nargs="+",
        choices=aiomas.util.LOOPS,
        default=list(aiomas.util.LOOPS),
        help="event loops to measure on (default: both)",
    )
    parser.add_argument(
        "--only",
        metavar="TEXT",
        help="only workloads whose name contains TEXT (e.g. 'msgpack', "
        "'100 in flight', 'latency', 'fan-out', 'agents')",
    )
    parser.add_argument(
        "--agents",
        type=int,
        default=100_000,
        help="agents to create in the creation benchmark (default: 100000)",
    )
    parser.add_argument(
        "--fanout",
        type=int,
        default=50,
        metavar="N",
        help="callee containers (processes) in the fan-out workload (default: 50)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 round of 0.5 s per figure: a rough look in about a minute",
    )
    parser.add_argument(
        "--steady-malloc",
        action="store_true",
        help="run with glibc told to keep the memory it frees (the process "
        "starts again with GLIBC_TUNABLES set), so that big payloads cost no "
        "page faults: the 1 MiB rows then compare the code, not the "
        "allocator's state",
    )
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--agent-memory", help=argparse.SUPPRESS)
    parser.add_argument("--codec", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the benchmark command line; return the exit code."""
    parser = make_parser(prog)
    args = parser.parse_args(argv)
    if args.steady_malloc and os.environ.get("GLIBC_TUNABLES") != STEADY_MALLOC:
        if platform.libc_ver()[0] != "glibc":
            parser.error("--steady-malloc needs glibc")
        # glibc reads its tunables only when the process starts: this one
        # becomes the benchmark again, with them.
        again = sys.argv[1:] if argv is None else list(argv)
        env = {**os.environ, "GLIBC_TUNABLES": STEADY_MALLOC}
        sys.stdout.flush()
        warnings = [f"-W{option}" for option in sys.warnoptions]
        command = [sys.executable, *warnings, "-m", "aiomas.benchmark", *again]
        os.execve(sys.executable, command, env)
    if args.serve == "fanout":
        _run(_serve_fanout(), args.loop[0])
        return 0
    if args.serve:
        _run(_serve(args.serve, args.codec), args.loop[0])
        return 0
    if args.agent_memory:
        print(*_bytes_per_agent(args.agent_memory, args.agents))
        return 0
    if args.quick:
        args.rounds, args.seconds, args.turns = 1, 0.5, 5
    values = (args.rounds, args.seconds, args.agents, args.turns, args.slice)
    if min(*values, args.fanout) <= 0:
        parser.error(
            "--rounds, --seconds, --turns, --slice, --agents and --fanout must "
            "be positive"
        )
    workloads = [w for w in WORKLOADS if not args.only or args.only in w.name]
    python = f"aiomas {aiomas.__version__}, Python {sys.version.split()[0]}"
    if os.environ.get("GLIBC_TUNABLES") == STEADY_MALLOC:
        python += ", steady malloc"
    if args.processes:
        print(
            f"{python}, {args.rounds} round(s) of {args.seconds:g} s per figure, "
            "TCP loopback, client and server in separate processes"
        )
    else:
        print(
            f"{python}, TCP loopback, both ends in this process; {args.rounds} "
            f"round(s) of {args.turns} turns of {args.slice:g} ms per side "
            "(floor, aiomas, aiomas again for A/A); load: 1-minute load average"
        )
    if args.processes and any(w.latency for w in workloads):
        # Latencies are differences of small times: taken in turns only.
        print("(the latency tables run in this process only, not with --processes)")
        workloads = [w for w in workloads if not w.latency]
    if workloads:
        for loop_name in _available_loops(args.loop):
            if args.processes:
                run_roundtrips(workloads, loop_name, args.rounds, args.seconds)
            else:
                run_in_process(
                    workloads, loop_name, args.rounds, args.turns, args.slice / 1000
                )
    if not args.only or args.only in "fan-out":
        for loop_name in _available_loops(args.loop):
            run_fanout(
                args.fanout, loop_name, args.rounds, args.turns, args.slice / 1000
            )
    if not args.only or args.only in "agents":
        run_agent_creation(args.agents)
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m aiomas.benchmark"))
