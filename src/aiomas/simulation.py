"""Deterministic simulation: virtual time and a seeded, faulty network.

Two parts, usable alone or together:

- :class:`VirtualTimeLoop` is an asyncio event loop whose :meth:`~VirtualTimeLoop.time`
  is virtual.  When nothing is ready to run and no real I/O is pending, it jumps
  straight to the next timer instead of sleeping (trio's ``MockClock``
  autojump), so containers on an :class:`~aiomas.clocks.AsyncioClock` run a
  simulated hour in the time the CPU needs.  :meth:`~VirtualTimeLoop.advance`
  and :meth:`~VirtualTimeLoop.run_until_idle` (and the module functions of the
  same names) settle all work woken meanwhile, including work that first makes
  RPC calls.
- :class:`SimulatedNetwork` carries the data of :mod:`aiomas.local_queue`
  connections (through its :class:`~aiomas.local_queue.Network` hook) frame by
  frame, with latency, drop, duplication, reordering, bandwidth and
  partitions, all drawn from one :class:`random.Random` seeded by the caller,
  and logs every frame with its virtual time.  :class:`Simulation` adds
  containers that crash and restart; :func:`run` runs a test program in a
  simulation on a fresh loop and puts the seed and the plan in any error.

On a :class:`VirtualTimeLoop` with only LocalQueue connections, the same seed
and plan give the same run, message by message.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import math
import random
import selectors
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Literal, TypeVar

from aiomas import local_queue, wire
from aiomas.agent import Container
from aiomas.exceptions import ProtocolError
from aiomas.local_queue import LocalQueue, Route

__all__ = [
    "Crash",
    "FaultPlan",
    "LinkFaults",
    "LogEntry",
    "Partition",
    "SimulatedNetwork",
    "Simulation",
    "SimulationStuck",
    "VirtualTimeLoop",
    "VirtualTimePolicy",
    "advance",
    "run",
    "run_until_idle",
    "sweep",
]

_T = TypeVar("_T")


class SimulationStuck(RuntimeError):
    """Every task waits for something that no timer and no I/O will bring
    (or the run exceeded its wall-clock bound)."""


# --- Virtual time -------------------------------------------------------------


class _VirtualSelector(selectors.BaseSelector):
    """A selector that polls the real one and, when nothing is ready, moves
    the virtual time to the loop's next timer instead of waiting."""

    def __init__(
        self,
        start: float,
        autojump: bool,
        autojump_threshold: float,
        on_stuck: Callable[[str], None] | None,
        wall_timeout: float | None,
        horizon: float,
    ) -> None:
        self.real = selectors.DefaultSelector()
        self.now = start
        self.limit = math.inf if autojump else start
        self.horizon = horizon
        self.autojump = autojump
        self.threshold = autojump_threshold
        self.idle_waiters: list[asyncio.Future[None]] = []
        self.on_stuck = on_stuck
        self.wall_deadline = (
            None if wall_timeout is None else time.monotonic() + wall_timeout
        )

    def register(
        self, fileobj: Any, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        return self.real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self.real.unregister(fileobj)

    def modify(
        self, fileobj: Any, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        return self.real.modify(fileobj, events, data)

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self.real.get_map()

    def close(self) -> None:
        self.real.close()

    def select(
        self, timeout: float | None = None
    ) -> list[tuple[selectors.SelectorKey, int]]:
        if self.wall_deadline is not None and time.monotonic() > self.wall_deadline:
            self.wall_deadline = None
            self._stuck("the run took longer than its wall-clock bound")
        events = self.real.select(0)
        if events or timeout == 0:
            return events
        if self.threshold > 0:
            wait = self.threshold if timeout is None else min(self.threshold, timeout)
            events = self.real.select(wait)
            if events:
                return events
        # With no timer, only advance() moves the time (the horizon does not).
        limit = (
            min(self.limit, self.horizon)
            if timeout is not None or self.limit < math.inf
            else math.inf
        )
        if timeout is not None and self.now + timeout <= limit:
            # Never stay put: a timer due in less than a float step.
            self.now = max(self.now + timeout, math.nextafter(self.now, math.inf))
            return []
        if self.now < limit < math.inf:
            self.now = limit  # Timers after the limit wait for it to move.
            return []
        # Idle: nothing can run before the limit.
        waiters, self.idle_waiters = self.idle_waiters, []
        woken = False
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
                woken = True
        if woken:
            return []
        if self.on_stuck is not None:
            if self.now >= self.horizon:
                self._stuck(f"virtual time reached its end ({self.horizon:g} s)")
            else:
                self._stuck("every task waits and no timer is set")
            return []
        return self.real.select(None)

    def _stuck(self, reason: str) -> None:
        if self.on_stuck is not None:
            self.on_stuck(reason)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time that jumps over idle time.

    Args:
        start: The initial :meth:`time`.
        autojump: Whether time jumps to the next timer by itself whenever
            nothing else can run; ``False``: it only moves in :meth:`advance`.
        autojump_threshold: Real seconds to wait for real I/O (a socket, a
            thread) before time jumps.  ``0`` polls it only: fine for
            LocalQueue and loopback TCP, whose data is there at once.
        on_stuck: Called (from the loop) with the reason, instead of waiting
            for real I/O forever, when every task waits and no timer is set
            (or only timers after *horizon*); also once *wall_timeout* real
            seconds have passed.
        wall_timeout: See *on_stuck* (``None``: no bound).
        horizon: The virtual time never passes this.
    """

    def __init__(
        self,
        *,
        start: float = 0.0,
        autojump: bool = True,
        autojump_threshold: float = 0.0,
        on_stuck: Callable[[str], None] | None = None,
        wall_timeout: float | None = None,
        horizon: float = math.inf,
    ) -> None:
        self._aiomas_selector = _VirtualSelector(
            start, autojump, autojump_threshold, on_stuck, wall_timeout, horizon
        )
        super().__init__(self._aiomas_selector)

    def time(self) -> float:
        """The virtual time (seconds)."""
        return self._aiomas_selector.now

    @property
    def horizon(self) -> float:
        """The virtual time never passes this (settable)."""
        return self._aiomas_selector.horizon

    @horizon.setter
    def horizon(self, value: float) -> None:
        self._aiomas_selector.horizon = value

    async def run_until_idle(self) -> None:
        """Return once nothing can run without time passing: every task waits
        for a timer (or for nothing).  Time does not move meanwhile."""
        selector = self._aiomas_selector
        limit, selector.limit = selector.limit, selector.now
        try:
            await self._idle()
        finally:
            selector.limit = limit

    async def advance(self, dt: float) -> None:
        """Let *dt* seconds of virtual time pass, running every timer due by
        then, and return once all woken work is idle (:meth:`time` is then
        *dt* later).  Works with and without autojump.

        Raises:
            ValueError: if *dt* is negative.
        """
        if dt < 0:
            raise ValueError(f"Time cannot go backwards (dt={dt})")
        selector = self._aiomas_selector
        target = selector.now + dt
        selector.limit = target
        try:
            await self._idle()
        finally:
            selector.limit = math.inf if selector.autojump else target

    def _idle(self) -> asyncio.Future[None]:
        waiter = self.create_future()
        self._aiomas_selector.idle_waiters.append(waiter)
        return waiter


class VirtualTimePolicy(asyncio.DefaultEventLoopPolicy):
    """An event loop policy whose new loops are :class:`VirtualTimeLoop`\\ s
    (e.g. for pytest-asyncio's ``event_loop_policy`` fixture, or
    :func:`asyncio.set_event_loop_policy` before :func:`aiomas.run`).

    Args:
        **loop_kwargs: Passed to :class:`VirtualTimeLoop`.
    """

    def __init__(self, **loop_kwargs: Any) -> None:
        super().__init__()
        self._loop_kwargs = loop_kwargs

    def new_event_loop(self) -> VirtualTimeLoop:
        return VirtualTimeLoop(**self._loop_kwargs)


async def run_until_idle(quiet_rounds: int = 5, max_rounds: int = 100_000) -> None:
    """Return once the running loop's work has settled.

    On a :class:`VirtualTimeLoop` this is exact (see
    :meth:`VirtualTimeLoop.run_until_idle`).  On another loop, it lets the
    loop run until no task has moved for *quiet_rounds* loop iterations in a
    row (I/O is polled once per iteration), a heuristic that suits loopback
    connections.

    Raises:
        SimulationStuck: if the tasks still move after *max_rounds* iterations.
    """
    loop = asyncio.get_running_loop()
    if isinstance(loop, VirtualTimeLoop):
        await loop.run_until_idle()
        return
    quiet = 0
    last = _progress()
    for _ in range(max_rounds):
        await asyncio.sleep(0)
        now = _progress()
        same = (
            now[0] == last[0]
            and len(now[1]) == len(last[1])
            and all(a is b for a, b in zip(now[1], last[1], strict=True))
        )
        quiet = quiet + 1 if same else 0
        if quiet >= quiet_rounds:
            return
        last = now
    raise SimulationStuck(f"Tasks still ran after {max_rounds} loop iterations")


async def advance(dt: float) -> None:
    """:meth:`VirtualTimeLoop.advance` on the running loop.

    Raises:
        TypeError: if the running loop is not a :class:`VirtualTimeLoop`.
        ValueError: if *dt* is negative.
    """
    loop = asyncio.get_running_loop()
    if not isinstance(loop, VirtualTimeLoop):
        raise TypeError(f"advance() needs a VirtualTimeLoop, not {loop!r}")
    await loop.advance(dt)


def _progress() -> tuple[list[object], list[object]]:
    """Where every task of the running loop waits, and on what: the positions
    (compared by value) and the awaited objects (compared by identity, and
    kept alive, so a new object of a new wait never passes for the old one)."""
    current = asyncio.current_task()
    positions: list[object] = []
    awaited_objects: list[object] = []
    for task in sorted(asyncio.all_tasks(), key=id):
        if task is current:
            continue
        positions.append((id(task), task.done()))
        awaited: Any = task.get_coro()
        while awaited is not None:
            awaited_objects.append(awaited)
            frame = getattr(awaited, "cr_frame", None) or getattr(
                awaited, "gi_frame", None
            )
            if frame is None:
                break
            positions.append(frame.f_lasti)
            awaited = getattr(awaited, "cr_await", None) or getattr(
                awaited, "gi_yieldfrom", None
            )
        positions.append(None)  # the end of a task's chain
    return positions, awaited_objects


# --- The fault plan -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinkFaults:
    """How a link (one direction between two nodes) carries frames.

    Args:
        latency: Seconds every frame takes.
        jitter: Extra seconds drawn per frame: uniformly from ``[0,
            jitter]``, or exponentially distributed with mean *jitter* (see
            *jitter_shape*).  The order of a link's frames is kept, unless
            reordered.
        jitter_shape: ``"uniform"`` or ``"exponential"`` (a long tail of
            late frames).
        drop: Probability that a frame is lost.
        duplicate: Probability that a frame arrives twice.
        reorder: Probability that a frame overtakes up to *reorder_window*
            frames still in flight on its link.
        reorder_window: See *reorder*.
        bandwidth: Bytes per second a link sends (``None``: no limit); a
            frame waits for the frames before it to be sent.  What waits
            counts for the writer's buffer, as a socket's unsent data does:
            above its high-water mark the writer's protocol gets
            ``pause_writing()`` (so ``drain()`` waits), at the low-water mark
            ``resume_writing()``.
    """

    latency: float = 0.001
    jitter: float = 0.0
    jitter_shape: Literal["uniform", "exponential"] = "uniform"
    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_window: int = 3
    bandwidth: float | None = None

    def __post_init__(self) -> None:
        for name in ("drop", "duplicate", "reorder"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(
                    f"{name} must be a probability, not {getattr(self, name)}"
                )
        if self.latency < 0 or self.jitter < 0:
            raise ValueError("latency and jitter must not be negative")
        if self.jitter_shape not in ("uniform", "exponential"):
            raise ValueError(f"Unknown jitter_shape {self.jitter_shape!r}")
        if self.reorder_window < 1:
            raise ValueError("reorder_window must be at least 1")
        if self.bandwidth is not None and not self.bandwidth > 0:
            raise ValueError("bandwidth must be positive (or None)")


@dataclasses.dataclass(frozen=True)
class Partition:
    """The links from the nodes *side_a* to the nodes *side_b* (and back,
    unless *one_way*) carry nothing from *start* for *duration* seconds.

    Frames sent meanwhile are lost; new connections fail with
    :class:`TimeoutError`.  With the plan's *dead_peer_timeout*, connections
    across it are reset that long after it began, as TCP keepalive would.
    """

    side_a: tuple[str, ...]
    side_b: tuple[str, ...]
    start: float
    duration: float
    one_way: bool = False

    def cuts(self, source: str | None, target: str | None, now: float) -> bool:
        """Whether the link *source* -> *target* is cut at time *now*."""
        if not self.start <= now < self.start + self.duration:
            return False
        if source in self.side_a and target in self.side_b:
            return True
        return not self.one_way and source in self.side_b and target in self.side_a


@dataclasses.dataclass(frozen=True)
class Crash:
    """Node *node* crashes at *at*: its connections are reset and its
    container shut down; it restarts *restart_after* seconds later (a new
    container on the same queue), or never (``None``)."""

    node: str
    at: float
    restart_after: float | None = None


@dataclasses.dataclass(frozen=True)
class FaultPlan:
    """Everything that goes wrong in a simulation, and when.

    Its ``repr()`` is Python code that makes it again: print it with the seed
    to replay a run.

    Args:
        default: How links carry frames unless *links* says otherwise.
        links: ``{(source, target): LinkFaults}`` for single links.
        partitions: When which links are cut.
        crashes: When which nodes crash (and restart).
        dead_peer_timeout: Seconds after which a connection across a
            partition is reset (``None``: never; its calls hang).
    """

    default: LinkFaults = LinkFaults()
    links: tuple[tuple[tuple[str, str], LinkFaults], ...] = ()
    partitions: tuple[Partition, ...] = ()
    crashes: tuple[Crash, ...] = ()
    dead_peer_timeout: float | None = None

    def link(self, source: str | None, target: str | None) -> LinkFaults:
        """The faults of the link *source* -> *target*."""
        for key, faults in self.links:
            if key == (source, target):
                return faults
        return self.default


@dataclasses.dataclass(frozen=True)
class LogEntry:
    """One event of a simulation's message log.

    *event* is ``"send"`` (a frame was written), ``"deliver"``, ``"drop"``,
    ``"duplicate"``, ``"reorder"``, ``"cut"`` (lost in a partition),
    ``"eof"``, ``"refuse"`` (a connection attempt failed), ``"reset"``,
    ``"crash"`` or ``"restart"``; *payload* is the frame's payload (empty for
    events that are no frame).
    """

    time: float
    event: str
    source: str | None
    target: str | None
    payload: bytes = b""


# --- The network --------------------------------------------------------------


# The piece of a big write that leaves a slow link's writer buffer at once
# (see SimulatedNetwork._hold()).
_SEGMENT = 4096


class _Link:
    """The state of one direction of one connection."""

    __slots__ = ("busy_until", "in_flight", "reader", "unheld")

    def __init__(self) -> None:
        # A small shared buffer: a system has thousands of links, and bigger
        # frames get a buffer of their own anyway.
        self.reader = wire.FrameReader(wire.MAX_FRAME_SIZE, buffer_size=4096)
        # (arrival time, frame or None for the end), in delivery order.
        self.in_flight: collections.deque[tuple[float, bytes | None]] = (
            collections.deque()
        )
        self.busy_until = 0.0
        # Bytes written of the frame not yet complete: they wait for the rest
        # of it, and are held with it (see SimulatedNetwork._hold()).
        self.unheld = 0


class SimulatedNetwork(local_queue.Network):
    """A :class:`~aiomas.local_queue.Network` that carries whole frames with
    the faults of a :class:`FaultPlan`, drawn from ``random.Random(seed)``.

    Attach it to queues with :meth:`attach`.  Connections whose ends are
    queues it knows are links between nodes named by the queue ids.

    Args:
        seed: Seeds the network's own random number generator.
        plan: The faults.
        log: Whether to record the :attr:`log`.
    """

    def __init__(
        self, seed: int, plan: FaultPlan | None = None, *, log: bool = True
    ) -> None:
        self.seed = seed
        """The seed."""
        self.plan = FaultPlan() if plan is None else plan
        """The fault plan."""
        self.random = random.Random(seed)
        """The random number generator of all faults."""
        self.log: list[LogEntry] = []
        """What happened, in order (if *log*)."""
        self.frames_sent = 0
        """Frames written so far (duplicates not counted)."""
        self._logging = log
        self._links: dict[Route, _Link] = {}
        self._down: dict[str, None] = {}
        self._loop = asyncio.get_running_loop()
        if self.plan.dead_peer_timeout is not None:
            for partition in self.plan.partitions:
                self._loop.call_at(
                    partition.start + self.plan.dead_peer_timeout,
                    self._reset_across,
                    partition,
                )

    def digest(self) -> str:
        """A SHA-256 hex digest of the :attr:`log`: the same for the same
        run on every supported Python and platform (compare it to tell
        whether two runs were the same, message by message)."""
        digest = hashlib.sha256()
        for entry in self.log:
            digest.update(
                f"{entry.time!r} {entry.event} {entry.source} {entry.target} "
                f"{entry.payload.hex()}\n".encode()
            )
        return digest.hexdigest()

    def attach(self, lq: LocalQueue) -> None:
        """Carry the data of new connections to *lq*."""
        lq.network = self

    def _record(
        self, event: str, source: str | None, target: str | None, payload: bytes = b""
    ) -> None:
        if self._logging:
            self.log.append(LogEntry(self._loop.time(), event, source, target, payload))

    def _cut(self, source: str | None, target: str | None) -> bool:
        now = self._loop.time()
        return any(p.cuts(source, target, now) for p in self.plan.partitions)

    def set_down(self, node: str, down: bool) -> None:
        """Mark *node* crashed (refusing connections, its links reset) or up."""
        if down:
            self._down[node] = None
            self._record("crash", node, None)
            for route in list(self._links):
                if node in (route.source, route.target):
                    self._record("reset", route.source, route.target)
                    route.reset()
                    self._links.pop(route, None)
        else:
            self._down.pop(node, None)
            self._record("restart", node, None)

    def _reset_across(self, partition: Partition) -> None:
        now = self._loop.time()
        for route in list(self._links):
            if partition.cuts(route.source, route.target, now):
                self._record("reset", route.source, route.target)
                route.reset()
                self._links.pop(route, None)

    # The Network hook

    def check_connect(self, source: str | None, target: str) -> None:
        if target in self._down:
            self._record("refuse", source, target)
            raise ConnectionRefusedError(f"{target} is down")
        if self._cut(source, target) or self._cut(target, source):
            self._record("refuse", source, target)
            raise TimeoutError(f"{source} cannot reach {target} (partition)")

    def connection_made(self, forth: Route, back: Route) -> None:
        self._links[forth] = _Link()
        self._links[back] = _Link()

    def carry(self, route: Route, chunk: bytes) -> None:
        link = self._links.get(route)
        if link is None:
            return  # reset by a crash or partition: the data is gone
        faults = self.plan.link(route.source, route.target)
        start = max(self._loop.time(), link.busy_until)
        try:
            payloads = link.reader.feed(chunk)
        except ProtocolError:
            # Not aiomas frames: carry them unharmed, like one frame.
            self._schedule(route, link, chunk, faults)
            held, link.unheld = link.unheld + len(chunk), 0
        else:
            for payload in payloads:
                self._send_frame(route, link, bytes(payload), faults)
            incomplete = link.reader.buffered
            held, link.unheld = link.unheld + len(chunk) - incomplete, incomplete
        if (
            held
            and faults.bandwidth is not None
            and link.busy_until > self._loop.time()
        ):
            self._hold(route, held, start, link.busy_until)

    def _hold(self, route: Route, size: int, start: float, end: float) -> None:
        """The writer's buffer holds what waits for the link (flow control):
        *size* bytes, which leave it from *start* to *end* in pieces, as a
        socket sends segments.  (The bytes of a frame still incomplete wait
        for the rest of it, whichever writes bring them, and are held with
        it.)"""
        route.buffered(size)
        call_at = self._loop.call_at
        for offset in range(_SEGMENT, size, _SEGMENT):
            call_at(start + (end - start) * offset / size, route.sent, _SEGMENT)
        call_at(end, route.sent, size - (size - 1) // _SEGMENT * _SEGMENT)

    def carry_end(self, route: Route) -> None:
        link = self._links.get(route)
        if link is None:
            return
        # The end travels like a frame, behind the frames before it.
        arrival = self._loop.time() + self.plan.link(route.source, route.target).latency
        if link.in_flight:
            arrival = max(arrival, link.in_flight[-1][0])
        link.in_flight.append((arrival, None))
        self._loop.call_at(arrival, self._pump, route, link)

    def _send_frame(
        self, route: Route, link: _Link, payload: bytes, faults: LinkFaults
    ) -> None:
        source, target = route.source, route.target
        self.frames_sent += 1
        self._record("send", source, target, payload)
        rng = self.random
        if self._cut(source, target):
            self._record("cut", source, target, payload)
            return
        if faults.drop and rng.random() < faults.drop:
            self._record("drop", source, target, payload)
            return
        data = wire.frame(payload)
        copies = 1
        if faults.duplicate and rng.random() < faults.duplicate:
            self._record("duplicate", source, target, payload)
            copies = 2
        for _ in range(copies):
            reorder = bool(faults.reorder) and rng.random() < faults.reorder
            self._schedule(route, link, data, faults, reorder, payload)

    def _schedule(
        self,
        route: Route,
        link: _Link,
        data: bytes,
        faults: LinkFaults,
        reorder: bool = False,
        payload: bytes = b"",
    ) -> None:
        now = self._loop.time()
        departure = now
        if faults.bandwidth is not None:
            departure = max(now, link.busy_until) + len(data) / faults.bandwidth
            link.busy_until = departure
        arrival = departure + faults.latency
        if faults.jitter:
            if faults.jitter_shape == "uniform":
                arrival += self.random.uniform(0, faults.jitter)
            else:
                arrival += self.random.expovariate(1 / faults.jitter)
        in_flight = link.in_flight
        frames = [i for i, (_, item) in enumerate(in_flight) if item is not None]
        if reorder and frames:
            # Overtake up to reorder_window frames still in flight.
            jump = self.random.randint(1, min(faults.reorder_window, len(frames)))
            index = frames[-jump]
            arrival = in_flight[index][0]
            in_flight.insert(index, (arrival, data))
            self._record("reorder", route.source, route.target, payload)
        else:
            if in_flight:
                arrival = max(arrival, in_flight[-1][0])
            in_flight.append((arrival, data))
        self._loop.call_at(arrival, self._pump, route, link)

    def _pump(self, route: Route, link: _Link) -> None:
        """Deliver the frames of *link* that have arrived, in order."""
        now = self._loop.time()
        in_flight = link.in_flight
        while in_flight and in_flight[0][0] <= now:
            _, data = in_flight.popleft()
            if data is None:
                self._record("eof", route.source, route.target)
                route.deliver_end()
                self._links.pop(route, None)
                return
            self._record(
                "deliver", route.source, route.target, data[wire.HEADER_SIZE :]
            )
            route.deliver(data)


# --- Systems of containers ----------------------------------------------------


Setup = Callable[[Container], Awaitable[object]]
"""Called with each container a :class:`Simulation` starts (again)."""


class Simulation:
    """Containers on LocalQueues joined by a :class:`SimulatedNetwork`.

    Make it in a running :class:`VirtualTimeLoop` (see :func:`run`), then
    :meth:`start` containers.  The plan's crashes shut a container down and
    start a new one on the same queue later, with the same *setup*.

    Args:
        seed: The network's seed.
        plan: The faults.
        prefix: The node names (queue ids) are this and a number.
        log: Whether the network records its log.
    """

    def __init__(
        self,
        seed: int,
        plan: FaultPlan | None = None,
        *,
        prefix: str = "sim-",
        log: bool = True,
    ) -> None:
        self.network = SimulatedNetwork(seed, plan, log=log)
        """The network."""
        self.containers: dict[str, Container] = {}
        """The running container of each node, by node name."""
        self._prefix = prefix
        self._setups: dict[str, Setup | None] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._loop = asyncio.get_running_loop()
        self._timers = [
            self._loop.call_at(crash.at, self._spawn, crash)
            for crash in self.network.plan.crashes
        ]

    @property
    def seed(self) -> int:
        """The seed."""
        return self.network.seed

    @property
    def plan(self) -> FaultPlan:
        """The fault plan."""
        return self.network.plan

    @property
    def log(self) -> list[LogEntry]:
        """The network's message log."""
        return self.network.log

    def describe(self) -> str:
        """The seed and the plan, as Python code to replay the run."""
        return f"seed={self.seed!r}, plan={self.plan!r}"

    async def start(self, n: int = 1, setup: Setup | None = None) -> list[Container]:
        """Start *n* containers (nodes ``<prefix>0``, ``<prefix>1``, ...) and
        call ``await setup(container)`` for each (again after a restart)."""
        started = []
        for _ in range(n):
            name = f"{self._prefix}{len(self._setups)}"
            self._setups[name] = setup
            started.append(await self._start(name))
        return started

    async def _start(self, name: str) -> Container:
        lq = local_queue.get_queue(name)
        self.network.attach(lq)
        container = await Container.create(lq, as_coro=True)
        self.containers[name] = container
        setup = self._setups[name]
        if setup is not None:
            await setup(container)
        return container

    def _spawn(self, crash: Crash) -> None:
        self._tasks.append(self._loop.create_task(self._crash(crash)))

    async def _crash(self, crash: Crash) -> None:
        container = self.containers.pop(crash.node, None)
        if container is None:
            return
        self.network.set_down(crash.node, True)
        await container.shutdown(as_coro=True)
        if crash.restart_after is not None:
            await asyncio.sleep(crash.restart_after)
            self.network.set_down(crash.node, False)
            await self._start(crash.node)

    async def close(self) -> None:
        """Cancel pending crashes and shut all containers down.

        Raises:
            Exception: what a crash or restart raised (e.g. the *setup* of
                a restarted container).
        """
        for timer in self._timers:
            timer.cancel()
        for task in self._tasks:
            task.cancel()
        outcomes = await asyncio.gather(*self._tasks, return_exceptions=True)
        for name in reversed(list(self.containers)):
            await self.containers.pop(name).shutdown(as_coro=True)
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome

    async def __aenter__(self) -> Simulation:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def run(
    main: Callable[[Simulation], Awaitable[_T]],
    *,
    seed: int,
    plan: FaultPlan | None = None,
    timeout: float = 3600.0,
    wall_timeout: float | None = 60.0,
    log: bool = True,
) -> _T:
    """Run ``await main(simulation)`` on a new :class:`VirtualTimeLoop`.

    The loop is closed afterwards, the LocalQueue cache cleared.  Any error
    (including *main*'s) carries a note with the seed and the plan, which
    pytest and tracebacks show: pass them here again to replay the run.

    Args:
        main: The test program.
        seed: The network's seed.
        plan: The faults.
        timeout: Virtual seconds *main* may take (the time never passes it).
        wall_timeout: Real seconds the run may take (``None``: no bound).
        log: Whether the network records its log.

    Returns:
        What *main* returns.

    Raises:
        SimulationStuck: if every task waits for nothing that will come
            before *timeout*, or the run took more than *wall_timeout* real
            seconds.
    """
    stuck: list[SimulationStuck] = []
    holder: list[asyncio.Task[_T]] = []

    def on_stuck(reason: str) -> None:
        if not stuck:
            # Cancel the program; its clean-up may take time again.
            stuck.append(SimulationStuck(reason))
            loop.horizon = math.inf
            if holder:
                holder[0].cancel()
            return
        # The clean-up is stuck, too: end every task, then give up.
        stuck.append(SimulationStuck(reason))
        if len(stuck) > 3:
            raise stuck[0]
        for task in asyncio.all_tasks(loop):
            task.cancel()

    loop = VirtualTimeLoop(
        on_stuck=on_stuck, wall_timeout=wall_timeout, horizon=timeout
    )
    description = f"seed={seed!r}, plan={plan!r}"

    async def program() -> _T:
        simulation = Simulation(seed, plan, log=log)
        try:
            return await main(simulation)
        finally:
            await simulation.close()

    try:
        task = loop.create_task(program())
        holder.append(task)
        try:
            return loop.run_until_complete(task)
        except asyncio.CancelledError:
            if stuck:
                raise stuck[0] from None
            raise
    except BaseException as exc:
        exc.add_note(f"aiomas simulation: {description}")
        raise
    finally:
        _close(loop)
        local_queue.clear_queue_cache()


def _close(loop: VirtualTimeLoop) -> None:
    pending = sorted(
        (task for task in asyncio.all_tasks(loop) if not task.done()),
        key=lambda task: task.get_name(),
    )
    for task in pending:
        task.cancel()
    try:
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    except SimulationStuck:
        pass  # The run already failed with it.
    finally:
        loop.close()


def sweep(
    main: Callable[[Simulation], Awaitable[object]],
    seeds: Iterable[int],
    plan: FaultPlan | None = None,
    **run_kwargs: Any,
) -> list[tuple[int, Exception]]:
    """Run *main* once per seed; return the failing seeds with their errors."""
    failures: list[tuple[int, Exception]] = []
    for seed in seeds:
        try:
            run(main, seed=seed, plan=plan, **run_kwargs)
        except Exception as exc:
            failures.append((seed, exc))
    return failures
