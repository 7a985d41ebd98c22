"""A contract-net auction between agents in several processes.

An auctioneer agent announces tasks.  Bidder agents, spread over containers in
subprocesses, answer each call for proposals with a price (or decline when
busy); bids that miss the deadline are ignored.  The cheapest bidder gets the
task, works on it and reports back when it is done.

Run it in real time (a few seconds)::

    python -m aiomas demo

or under an ExternalClock that the auctioneer's process drives, here at 50 times
real time, in every container::

    python -m aiomas demo --external-clock --speed 50

(``examples/contract_net.py`` in the source tree runs it, too.)  Ctrl-C stops
it, with its containers, and exits with code 130.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import sys
from collections.abc import Sequence
from typing import Any

import aiomas
from aiomas.subproc import ContainerProcess

START_DATE = "2026-01-01T08:00:00+00:00"
BID_DEADLINE = 0.5  # seconds (of the containers' clocks) to wait for bids
ANNOUNCE_EVERY = 0.4  # seconds between two calls for proposals
STOP_GRACE = 2.0  # seconds for interrupted containers to stop by themselves


class Bidder(aiomas.Agent):
    """Bids for tasks it can do and works on the ones it is awarded.

    Its prices and thinking times are random but reproducible (seeded by its
    name), so every run of the demo makes the same offers.
    """

    def __init__(self, container: aiomas.Container, name: str, skill: float) -> None:
        super().__init__(container)
        self.name = name
        self.skill = skill
        self.busy_until = 0.0
        self.work: asyncio.Task[None] | None = None

    @aiomas.expose
    async def call_for_proposal(self, task: dict[str, Any]) -> dict[str, Any] | None:
        """Think for a while, then offer a price for *task* (or decline)."""
        rng = random.Random(f"{self.name}/{task['id']}")
        clock = self.container.clock
        await clock.sleep(rng.uniform(0.05, 0.6))
        if clock.time() < self.busy_until:
            return None
        price = round(task["size"] * rng.uniform(0.8, 1.2) / self.skill, 2)
        return {"bidder": self.name, "price": price, "addr": self.addr}

    @aiomas.expose
    def award(self, task: dict[str, Any], auctioneer: aiomas.rpc.Proxy) -> float:
        """Take *task*; report to *auctioneer* when done.  Returns the duration."""
        duration: float = task["size"] / self.skill / 10
        self.busy_until = self.container.clock.time() + duration
        self.work = aiomas.create_task(self._work(task, duration, auctioneer))
        return duration

    async def _work(
        self, task: dict[str, Any], duration: float, auctioneer: aiomas.rpc.Proxy
    ) -> None:
        await self.container.clock.sleep(duration)
        try:
            await auctioneer.task_done(task["id"], self.name)
        except ConnectionResetError:
            pass  # The auctioneer is gone (e.g. Ctrl-C): nobody to report to.


class Auctioneer(aiomas.Agent):
    """Announces tasks, collects bids until the deadline, awards the cheapest."""

    def __init__(self, container: aiomas.Container) -> None:
        super().__init__(container)
        self.clock = container.clock
        self.start = self.clock.time()
        self.finished: dict[int, asyncio.Future[str]] = {}
        self.results: list[tuple[int, str, float]] = []

    def say(self, message: str) -> None:
        elapsed = self.clock.time() - self.start
        print(
            f"[{self.clock.utcnow().format('HH:mm:ss.SS')} +{elapsed:4.2f}s] {message}"
        )

    @aiomas.expose
    def task_done(self, task_id: int, bidder: str) -> None:
        self.say(f"task {task_id} finished by {bidder}")
        finished = self.finished[task_id]
        if not finished.done():  # (cancelled if the auction was interrupted)
            finished.set_result(bidder)

    async def run(self, bidders: list[aiomas.rpc.Proxy], tasks: list[int]) -> None:
        loop = asyncio.get_running_loop()
        for task_id in range(len(tasks)):
            self.finished[task_id] = loop.create_future()
        await asyncio.gather(
            *(self.auction(i, size, bidders) for i, size in enumerate(tasks))
        )
        await asyncio.gather(*self.finished.values())

    async def auction(self, task_id: int, size: int, bidders: list[Any]) -> None:
        await self.clock.sleep(task_id * ANNOUNCE_EVERY)
        task = {"id": task_id, "size": size}
        self.say(f"task {task_id} (size {size}): call for proposals")
        calls = [asyncio.ensure_future(b.call_for_proposal(task)) for b in bidders]
        try:
            await wait_until(calls, self.clock.sleep(BID_DEADLINE))
        except BaseException:
            abandon(calls)
            raise
        bids = []
        for bidder, call in zip(bidders, calls, strict=True):
            if not call.done():
                call.cancel()  # Too late: its reply will be dropped.
                continue
            if (bid := call.result()) is not None:
                bids.append((bid, bidder))
        late = sum(call.cancelled() for call in calls)
        declined = len(calls) - len(bids) - late
        offers = ", ".join(f"{b['bidder']} {b['price']:.2f}" for b, _ in bids)
        self.say(
            f"task {task_id}: {len(bids)} bids ({offers or 'none'}), "
            f"{declined} declined, {late} too late"
        )
        if not bids:
            self.say(f"task {task_id}: nobody takes it")
            self.finished[task_id].set_result("nobody")
            return
        best, winner = min(bids, key=lambda bid: bid[0]["price"])
        duration = await winner.award(task, self)
        self.results.append((task_id, best["bidder"], best["price"]))
        self.say(
            f"task {task_id}: awarded to {best['bidder']} at {best['addr']} "
            f"for {best['price']:.2f} (done in {duration:.2f}s)"
        )


async def wait_until(
    calls: list[asyncio.Future[Any]], deadline: asyncio.Future[Any]
) -> None:
    """Wait until all *calls* are done or the *deadline* has passed."""
    pending = set(calls)
    try:
        while pending and not deadline.done():
            _, pending = await asyncio.wait(
                {*pending, deadline}, return_when=asyncio.FIRST_COMPLETED
            )
            pending.discard(deadline)
    finally:
        deadline.cancel()


def abandon(calls: list[asyncio.Future[Any]]) -> None:
    """Give up *calls* (after an error or Ctrl-C): cancel the pending ones and
    fetch the errors of failed ones, which asyncio would report as "never
    retrieved" otherwise."""
    for call in calls:
        if not call.done():
            call.cancel()
        elif not call.cancelled():
            call.exception()


async def drive_clocks(
    clock: aiomas.ExternalClock, managers: list[Any], speed: float
) -> None:
    """Advance the ExternalClock of every container *speed* times as fast as
    real time, in steps of 50 ms of simulated time."""
    step = 0.05
    while True:
        await asyncio.sleep(step / speed)
        now = clock.time() + step
        # The remote clocks first, so that no reply arrives from the future.
        await asyncio.gather(*(manager.set_time(now) for manager in managers))
        clock.set_time(now)


async def run(
    containers: int = 2,
    bidders_per_container: int = 3,
    speed: float | None = None,
    loop: str = "asyncio",
    trace: str | None = None,
) -> None:
    """Run the auction with *containers* subprocess containers of
    *bidders_per_container* bidders each; *speed* (simulated seconds per real
    second) runs it on ExternalClocks, ``None`` in real time; *loop* is the
    event loop of the subprocess containers (see :data:`aiomas.util.LOOPS`);
    *trace* is a directory for the trace files of all processes (see
    :doc:`/tracing`)."""
    if trace is not None:
        aiomas.tracing.enable(trace)
    quiet = QuietWhenCancelled(asyncio.current_task())
    for name in QuietWhenCancelled.LOGGERS:
        logging.getLogger(name).addFilter(quiet)
    try:
        await _run(containers, bidders_per_container, speed, loop, trace is not None)
    finally:
        if trace is not None:
            aiomas.tracing.disable()
        for name in QuietWhenCancelled.LOGGERS:
            logging.getLogger(name).removeFilter(quiet)


async def _run(
    containers: int,
    bidders_per_container: int,
    speed: float | None,
    loop: str,
    traced: bool,
) -> None:
    external = speed is not None
    clock = aiomas.ExternalClock(START_DATE) if external else aiomas.AsyncioClock()
    args = ["127.0.0.1:0", "--log-level", "warning", "--loop", loop]
    if external:
        args += ["--start-date", START_DATE, "--init-time", "0"]
    started = await asyncio.gather(
        *(ContainerProcess.start(*args) for _ in range(containers)),
        return_exceptions=True,
    )
    processes = [p for p in started if isinstance(p, ContainerProcess)]
    if len(processes) < containers:
        for process in processes:
            await process.kill()
        raise next(e for e in started if isinstance(e, BaseException))
    container: aiomas.Container | None = None
    ticker: asyncio.Future[None] | None = None
    stopped = False
    try:
        # (Traced, it offers the wire extension: the trace context then
        # reaches the subprocess containers, and their files merge with ours.)
        container = await aiomas.Container.create(
            ("127.0.0.1", 0), clock=clock, as_coro=True, extensions=traced
        )
        managers = [await container.connect(p.manager_addr) for p in processes]
        bidders = []
        for c, manager in enumerate(managers):
            for b in range(bidders_per_container):
                name = f"bidder-{c}.{b}"
                proxy, _addr = await manager.spawn(
                    "aiomas.demo:Bidder", name, skill=1 + (c + b) % 3
                )
                bidders.append(proxy)
        auctioneer = Auctioneer(container)
        if speed is not None:
            assert isinstance(clock, aiomas.ExternalClock)
            ticker = asyncio.ensure_future(drive_clocks(clock, managers, speed))
        mode = f"ExternalClock at {speed:g}x real time" if external else "real time"
        auctioneer.say(
            f"{len(bidders)} bidders in {containers} subprocess containers ({mode})"
        )
        for process in processes:
            base_url = process.manager_addr.rsplit("/", 1)[0]
            auctioneer.say(f"    container {base_url} (pid {process.process.pid})")
        with aiomas.tracing.scope(agent=auctioneer.addr.rsplit("/", 1)[1]):
            await auctioneer.run(bidders, tasks=[12, 30, 7, 21, 16])
        auctioneer.say("all tasks finished:")
        for task_id, bidder, price in sorted(auctioneer.results):
            print(f"    task {task_id}: {bidder:12} {price:6.2f}")
        await stop_ticker(ticker)
        await asyncio.gather(*(manager.stop() for manager in managers))
        stopped = True
    finally:
        await stop_ticker(ticker)
        if not stopped:
            # An error or Ctrl-C.  Ctrl-C in a terminal has sent the containers
            # SIGINT, too: let them stop by themselves (a second signal would
            # disturb that), then send SIGTERM, which shuts a container down
            # quietly (see aiomas.subproc).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(p.process.wait() for p in processes)),
                    STOP_GRACE,
                )
            for process in processes:
                terminate(process)
        # Ours goes last, so that no container sees its connections to us cut
        # while it still talks (and logs a warning about it).
        for process in processes:
            await process.wait_or_kill()
        if container is not None:
            await container.shutdown(as_coro=True)


class QuietWhenCancelled(logging.Filter):
    """Drops warnings once *task* is being cancelled (by Ctrl-C): then
    connections end at both ends at once, and warnings about them would only
    say that we are stopping.  Errors still pass."""

    LOGGERS = ("aiomas.agent", "aiomas.channel", "aiomas.rpc")

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        super().__init__()
        self.task = task

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether to log *record*."""
        cancelling = self.task is not None and self.task.cancelling() > 0
        return record.levelno >= logging.ERROR or not cancelling


def terminate(process: ContainerProcess) -> None:
    """Send SIGTERM to *process* unless it has exited."""
    if process.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):  # It exited just now.
            process.process.terminate()


async def stop_ticker(ticker: asyncio.Future[None] | None) -> None:
    """Stop driving the clocks (before the containers stop listening)."""
    if ticker is not None:
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)


def make_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """Return the argument parser of the demo's command line."""
    parser = argparse.ArgumentParser(
        prog=prog, description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument(
        "--containers", type=int, default=2, help="subprocess containers (default: 2)"
    )
    parser.add_argument(
        "--bidders", type=int, default=3, help="bidders per container (default: 3)"
    )
    parser.add_argument(
        "--external-clock",
        action="store_true",
        help="run under an ExternalClock driven by this process",
    )
    parser.add_argument(
        "--speed",
        type=float,
        default=20.0,
        help="simulated seconds per real second with --external-clock (default: 20)",
    )
    parser.add_argument(
        "--loop",
        choices=aiomas.util.LOOPS,
        default="asyncio",
        help="the event loop of every process (default: %(default)s; uvloop "
        "needs pip install 'aiomas[uvloop]')",
    )
    parser.add_argument(
        "--trace",
        metavar="DIR",
        help="record the messages of all processes into DIR/*.jsonl",
    )
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the demo's command line; return the exit code."""
    parser = make_parser(prog)
    args = parser.parse_args(argv)
    if args.containers < 1 or args.bidders < 1 or args.speed <= 0:
        parser.error("--containers, --bidders and --speed must be positive")
    speed = args.speed if args.external_clock else None
    try:
        factory = aiomas.util.loop_factory(args.loop)
    except ImportError as exc:
        parser.error(str(exc))
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(run(args.containers, args.bidders, speed, args.loop, args.trace))
    except KeyboardInterrupt:
        # run() has stopped the containers; a traceback would add nothing.
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report it
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m aiomas.demo"))
