"""Fixtures for testing agents with pytest: the ``aiomas`` pytest plugin.

aiomas registers this module as a pytest plugin (entry point group ``pytest11``,
name ``aiomas``), so these fixtures are available in every project that has
aiomas installed:

- ``aiomas_container``: a :class:`~aiomas.Container` on a free port of
  ``127.0.0.1``;
- ``aiomas_container_pair``: two such containers, as a tuple;
- ``aiomas_local_containers``: a :class:`LocalContainerFactory` that makes
  containers on :mod:`aiomas.local_queue` transports (deterministic message
  order);
- ``aiomas_external_clock``: a :class:`SteppingClock` (an
  :class:`~aiomas.ExternalClock` that tests can :meth:`~SteppingClock.advance`);
- ``aiomas_clock_container``: a container on a free port of ``127.0.0.1`` that
  uses that clock;
- ``aiomas_seed``: the seed of a simulation (:mod:`aiomas.simulation`):
  ``--aiomas-seed=N`` if given, else a number made from the test's id (the
  same in every run);
- ``aiomas_fault_plan``: the :class:`~aiomas.simulation.FaultPlan` of the
  simulation, no faults unless a test module overrides the fixture;
- ``aiomas_simulation``: a :class:`SimulationRunner` that runs a test
  program in a simulation with that seed and plan, on virtual time.

Each fixture is function-scoped and shuts down what it made when the test is
over, passed or failed.  The container fixtures are async fixtures: they need
pytest-asyncio (or another plugin that runs async fixtures).  If pytest-asyncio
is installed, they are pytest-asyncio fixtures, so they also work in its
*strict* mode (where tests need ``@pytest.mark.asyncio``).  The event loop they
run in follows the project's ``asyncio_default_fixture_loop_scope``.

The plugin adds the option ``--aiomas-seed`` and, for tests that use its
fixtures only, two things: a failed test that used ``aiomas_seed`` reports
the seed and the plan (a section "aiomas simulation"), and a test runs at
most ``aiomas_timeout`` seconds (an ini option, default 60; ``0`` turns it
off; left to pytest-timeout where that plugin sets a timeout) before it fails
with a message instead of hanging.  ``pytest -p no:aiomas`` disables it.
"""

from __future__ import annotations

import itertools
import signal
import threading
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from contextlib import AsyncExitStack, contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from aiomas import simulation
from aiomas.agent import Container
from aiomas.channel import Address
from aiomas.clocks import ExternalClock
from aiomas.local_queue import LocalQueue, clear_queue_cache, get_queue
from aiomas.simulation import FaultPlan, Setup, Simulation

if TYPE_CHECKING:
    _async_fixture = pytest.fixture
else:
    try:
        # Marks the fixtures as pytest-asyncio's own, so that they work in its
        # strict mode, too.  An entry point plugin loads in every pytest run of
        # every project with aiomas installed, so pytest-asyncio is optional.
        from pytest_asyncio import fixture as _async_fixture
    except ImportError:
        # Another plugin may run async fixtures; if none does, only the tests
        # that use these fixtures fail, with pytest's own message.
        _async_fixture = pytest.fixture

# The fixtures are found by pytest, by name; these are for type annotations.
__all__ = [
    "DEFAULT_TIMEOUT",
    "QUEUE_ID_PREFIX",
    "START_DATE",
    "LocalContainerFactory",
    "SimulationRunner",
    "SteppingClock",
    "TestTimeout",
]

_T = TypeVar("_T")

DEFAULT_TIMEOUT = 60.0
"""Seconds a test that uses the plugin's fixtures may take (ini option
``aiomas_timeout``)."""

_FIXTURE_PREFIX = "aiomas_"

_LOOPBACK: Address = ("127.0.0.1", 0)  # port 0: a free port

START_DATE = "2016-01-01T00:00:00+00:00"
"""The date at which the ``aiomas_external_clock`` starts (at time ``0``)."""

QUEUE_ID_PREFIX = "aiomas-test-"
"""The queue ids of ``aiomas_local_containers`` are this prefix and a number."""


class SteppingClock(ExternalClock):
    """An :class:`~aiomas.ExternalClock` that tests can move forward.

    It is what the ``aiomas_external_clock`` fixture returns.  Besides
    :meth:`~aiomas.ExternalClock.set_time`, which only releases what is due,
    :meth:`advance` also lets the released tasks run, one deadline at a time.

    Args:
        utc_start: The date at time ``0``: an Arrow date or anything
            :func:`arrow.get` can parse.
        init_time: The initial value of :meth:`time`.
    """

    async def advance(self, dt: float) -> None:
        """Move the clock *dt* seconds forward, as if the time passed steadily.

        The clock stops at every time something waits for (a sleep or a
        scheduled call) until *dt* seconds have passed.  At each stop it
        releases what is due and lets the woken work run until it is idle
        (:meth:`run_until_idle`) before the clock moves on.  So a task that
        sleeps again right away is woken again within the same call (an
        agent that ticks every second ticks three times in ``await
        clock.advance(3)``), even if it first makes an RPC call or waits for
        another task.

        Args:
            dt: Seconds to advance; ``0`` only lets the due tasks run.

        Raises:
            ValueError: if *dt* is negative.
            aiomas.simulation.SimulationStuck: if, on a loop other than a
                :class:`~aiomas.simulation.VirtualTimeLoop`, the woken work
                does not settle (see :func:`aiomas.simulation.run_until_idle`).
        """
        if dt < 0:
            raise ValueError(f"The clock cannot go backwards (dt={dt})")
        target = self.time() + dt
        await self.run_until_idle()
        # Deadlines always lie in the future: set_time() releases everything
        # up to the new time, and sleep() never queues dt <= 0.
        deadline = self.next_deadline()
        while deadline is not None and deadline < target:
            self.set_time(deadline)
            await self.run_until_idle()
            deadline = self.next_deadline()
        self.set_time(target)
        await self.run_until_idle()

    async def run_until_idle(self) -> None:
        """Let the work that is ready run until nothing moves any more
        (:func:`aiomas.simulation.run_until_idle`); the clock stays put."""
        await simulation.run_until_idle()


class LocalContainerFactory:
    """Makes containers on LocalQueue transports for one test.

    It is what the ``aiomas_local_containers`` fixture returns.  The containers
    get the queue ids ``aiomas-test-0``, ``aiomas-test-1``, ... in the order
    they are made (skipping any id whose queue already has a server), so agent
    addresses, like the order of the messages, are the same in every run.
    """

    def __init__(self) -> None:
        self._numbers = itertools.count()
        self._stack = AsyncExitStack()
        self._closed = False

    async def __call__(self, n: int = 2, **create_kwargs: Any) -> list[Container]:
        """Make *n* containers, each on a LocalQueue of its own.

        Args:
            n: How many containers to make.
            **create_kwargs: More arguments for
                :meth:`Container.create() <aiomas.Container.create>` (e.g.
                ``clock`` or ``codec``); all *n* containers get the same.

        Returns:
            The new containers.

        Raises:
            ValueError: if *n* is negative.
            RuntimeError: if the test is over (the factory was closed).
        """
        if n < 0:
            raise ValueError(f"n must not be negative, got {n}")
        if self._closed:
            raise RuntimeError("The test is over: no more containers")
        return [
            await _start(self._stack, self._free_queue(), create_kwargs)
            for _ in range(n)
        ]

    def _free_queue(self) -> LocalQueue:
        while True:
            queue = get_queue(f"{QUEUE_ID_PREFIX}{next(self._numbers)}")
            if queue.server is None:
                return queue

    async def close(self) -> None:
        """Shut all containers down (the last one made first) and forget all
        LocalQueues (:func:`~aiomas.local_queue.clear_queue_cache`)."""
        self._closed = True
        try:
            await self._stack.aclose()
        finally:
            clear_queue_cache()


async def _start(
    stack: AsyncExitStack, addr: Address, create_kwargs: dict[str, Any]
) -> Container:
    """Make a container on *addr* that *stack* shuts down when it closes."""
    container = await Container.create(addr, as_coro=True, **create_kwargs)
    stack.push_async_callback(_shutdown, container)
    return container


async def _shutdown(container: Container) -> None:
    await container.shutdown(as_coro=True)


@_async_fixture
async def aiomas_container() -> AsyncIterator[Container]:
    """A container on a free port of ``127.0.0.1``, shut down after the test."""
    async with AsyncExitStack() as stack:
        yield await _start(stack, _LOOPBACK, {})


@_async_fixture
async def aiomas_container_pair() -> AsyncIterator[tuple[Container, Container]]:
    """Two containers on free ports of ``127.0.0.1``, shut down after the test."""
    async with AsyncExitStack() as stack:
        first = await _start(stack, _LOOPBACK, {})
        second = await _start(stack, _LOOPBACK, {})
        yield first, second


@_async_fixture
async def aiomas_local_containers() -> AsyncIterator[LocalContainerFactory]:
    """A :class:`LocalContainerFactory`: ``await aiomas_local_containers(n)``
    returns *n* new containers on LocalQueues.

    After the test, all containers it made are shut down and the LocalQueue
    cache is cleared.
    """
    factory = LocalContainerFactory()
    yield factory
    await factory.close()


@pytest.fixture
def aiomas_external_clock() -> SteppingClock:
    """A :class:`SteppingClock` at time ``0``, 2016-01-01T00:00:00+00:00.

    Within a test, it is the clock of ``aiomas_clock_container``.
    """
    return SteppingClock(START_DATE, init_time=0)


@_async_fixture
async def aiomas_clock_container(
    aiomas_external_clock: SteppingClock,
) -> AsyncIterator[Container]:
    """A container on a free port of ``127.0.0.1`` whose clock is
    ``aiomas_external_clock``, shut down after the test."""
    async with AsyncExitStack() as stack:
        yield await _start(stack, _LOOPBACK, {"clock": aiomas_external_clock})


class SimulationRunner:
    """Runs test programs in simulations: what ``aiomas_simulation`` returns.

    Args:
        seed: The seed (the ``aiomas_seed`` fixture).
        plan: The fault plan (the ``aiomas_fault_plan`` fixture).
        wall_timeout: Real seconds one run may take.
    """

    def __init__(
        self, seed: int, plan: FaultPlan, wall_timeout: float | None = None
    ) -> None:
        self.seed = seed
        """The seed of every run."""
        self.plan = plan
        """The fault plan of every run."""
        self.wall_timeout = wall_timeout
        self.last: Simulation | None = None
        """The simulation of the last run (its log, its containers' names)."""

    def run(
        self,
        main: Callable[[Simulation], Awaitable[_T]],
        n: int = 0,
        setup: Setup | None = None,
        **run_kwargs: Any,
    ) -> _T:
        """Start *n* containers (with *setup*, see
        :meth:`Simulation.start() <aiomas.simulation.Simulation.start>`), then
        return ``await main(simulation)``, on a fresh
        :class:`~aiomas.simulation.VirtualTimeLoop` (see
        :func:`aiomas.simulation.run`, which gets *run_kwargs*).

        Call it from a plain (not async) test: it runs its own event loop.

        Raises:
            RuntimeError: if an event loop runs in this thread.
            Exception: what :func:`aiomas.simulation.run` raises.
        """

        async def program(sim: Simulation) -> _T:
            self.last = sim
            if n:
                await sim.start(n, setup)
            return await main(sim)

        run_kwargs.setdefault("wall_timeout", self.wall_timeout)
        return simulation.run(program, seed=self.seed, plan=self.plan, **run_kwargs)


@pytest.fixture
def aiomas_seed(request: pytest.FixtureRequest) -> int:
    """The simulation's seed: ``--aiomas-seed`` or one made from the test id."""
    given = request.config.getoption("aiomas_seed", None)
    if given is not None:
        return int(given)
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture
def aiomas_fault_plan() -> FaultPlan:
    """The simulation's :class:`~aiomas.simulation.FaultPlan`: none by
    default; override this fixture (or parametrize it) to add faults."""
    return FaultPlan()


@pytest.fixture
def aiomas_simulation(
    request: pytest.FixtureRequest, aiomas_seed: int, aiomas_fault_plan: FaultPlan
) -> SimulationRunner:
    """A :class:`SimulationRunner` with ``aiomas_seed`` and
    ``aiomas_fault_plan``; its runs are bounded by ``aiomas_timeout``."""
    return SimulationRunner(aiomas_seed, aiomas_fault_plan, _timeout(request.config))


# --- Hooks: the seed in the report, and the timeout ------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("aiomas")
    group.addoption(
        "--aiomas-seed",
        dest="aiomas_seed",
        type=int,
        default=None,
        help="the seed of aiomas simulations (aiomas_seed fixture), to replay a run",
    )
    parser.addini(
        "aiomas_timeout",
        help=(
            "seconds a test using aiomas fixtures may take "
            f"(default {DEFAULT_TIMEOUT:g}, 0: no limit)"
        ),
        default=str(DEFAULT_TIMEOUT),
    )


def _timeout(config: pytest.Config) -> float | None:
    seconds = float(config.getini("aiomas_timeout"))
    return seconds if seconds > 0 else None


def _uses_the_plugin(item: pytest.Item) -> bool:
    names = getattr(item, "fixturenames", ())
    return any(name.startswith(_FIXTURE_PREFIX) for name in names)


class TestTimeout(Exception):
    """A test that uses the plugin's fixtures took longer than ``aiomas_timeout``."""

    __test__ = False  # Not a test class.


@contextmanager
def _alarm(seconds: float | None) -> Iterator[None]:
    """Raise :class:`TestTimeout` in the main thread after *seconds*."""
    usable = (
        seconds is not None
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return
    assert seconds is not None

    def expired(signum: int, frame: object) -> None:
        raise TestTimeout(
            f"The test took more than {seconds:g} s (aiomas_timeout): "
            "something waits for what never comes"
        )

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _pytest_timeout_set(item: pytest.Item) -> bool:
    if item.get_closest_marker("timeout") is not None:
        return True
    if not item.config.pluginmanager.hasplugin("timeout"):
        return False
    try:
        value = item.config.getini("timeout")
    except ValueError:
        return False
    return bool(value and float(value) > 0) or bool(
        item.config.getoption("timeout", None)
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    if not _uses_the_plugin(item) or _pytest_timeout_set(item):
        return (yield)
    with _alarm(_timeout(item.config)):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    funcargs = getattr(item, "funcargs", {})
    if report.failed and "aiomas_seed" in funcargs:
        seed = funcargs["aiomas_seed"]
        plan = funcargs.get("aiomas_fault_plan")
        report.sections.append(
            (
                "aiomas simulation",
                f"seed: {seed}\nplan: {plan!r}\n"
                f"replay: pytest --aiomas-seed={seed} {item.nodeid}",
            )
        )
    return report
