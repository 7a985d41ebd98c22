"""Time and memory to create many agents in one container.

Each round creates the agents in a fresh container and reports the time; one
more round under :mod:`tracemalloc` reports the memory they take (agents, their
routers and the container's registry).

Usage::

    python benchmarks/bench_agents.py [--agents 100000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
import tracemalloc

import aiomas


class PlainAgent(aiomas.Agent):
    """A subclass as users write it (with an instance dict)."""

    @aiomas.expose
    def ping(self) -> str:
        return "pong"


class SlottedAgent(aiomas.Agent):
    """A subclass that declares ``__slots__``."""

    __slots__ = ()

    @aiomas.expose
    def ping(self) -> str:
        return "pong"


async def create(cls: type[aiomas.Agent], number: int) -> tuple[float, int]:
    """Create *number* agents; return seconds taken and bytes allocated."""
    container = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)
    try:
        gc.collect()
        traced = tracemalloc.is_tracing()
        before = tracemalloc.get_traced_memory()[0] if traced else 0
        start = time.perf_counter()
        agents = [cls(container) for _ in range(number)]
        elapsed = time.perf_counter() - start
        used = tracemalloc.get_traced_memory()[0] - before if traced else 0
        assert agents[-1].addr.endswith(f"/{number - 1}")
        return elapsed, used
    finally:
        await container.shutdown(as_coro=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(
        f"Python {sys.version.split()[0]}, {args.agents:,} agents per round, "
        f"{args.rounds} rounds"
    )
    print(
        f"{'agent class':<16}{'median':>9}{'min':>9}{'max':>9}"
        f"{'memory':>11}{'per agent':>11}"
    )
    for cls in (PlainAgent, SlottedAgent):
        times = [asyncio.run(create(cls, args.agents))[0] for _ in range(args.rounds)]
        tracemalloc.start()
        try:
            _, used = asyncio.run(create(cls, args.agents))
        finally:
            tracemalloc.stop()
        print(
            f"{cls.__name__:<16}{statistics.median(times):>8.3f}s{min(times):>8.3f}s"
            f"{max(times):>8.3f}s{used / 2**20:>7.1f} MiB{used / args.agents:>9.0f} B"
        )


if __name__ == "__main__":
    main()
