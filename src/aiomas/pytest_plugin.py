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
  uses that clock.

Each fixture is function-scoped and shuts down what it made when the test is
over, passed or failed.  All but the clock are async fixtures: they need
pytest-asyncio (or another plugin that runs async fixtures).  If pytest-asyncio
is installed, they are pytest-asyncio fixtures, so they also work in its
*strict* mode (where tests need ``@pytest.mark.asyncio``).  The event loop they
run in follows the project's ``asyncio_default_fixture_loop_scope``.

The plugin only defines fixtures: no hooks, no command line options, nothing
that changes a test run that does not use them.  ``pytest -p no:aiomas``
disables it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import pytest

from aiomas.agent import Container
from aiomas.channel import Address
from aiomas.clocks import ExternalClock
from aiomas.local_queue import LocalQueue, clear_queue_cache, get_queue

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
__all__ = ["QUEUE_ID_PREFIX", "START_DATE", "LocalContainerFactory", "SteppingClock"]

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
        releases what is due and yields to the event loop once, so that a task
        woken by the clock runs up to its next ``await`` before the clock moves
        on.  A task that sleeps again right away is therefore woken again
        within the same call: an agent that ticks every second ticks three
        times in ``await clock.advance(3)``.

        A woken task that awaits something else first (an RPC call, another
        task) may need more loop iterations; await that result in the test.

        Args:
            dt: Seconds to advance; ``0`` only lets the due tasks run.

        Raises:
            ValueError: if *dt* is negative.
        """
        if dt < 0:
            raise ValueError(f"The clock cannot go backwards (dt={dt})")
        target = self.time() + dt
        # Deadlines always lie in the future: set_time() releases everything
        # up to the new time, and sleep() never queues dt <= 0.
        deadline = self.next_deadline()
        while deadline is not None and deadline < target:
            self.set_time(deadline)
            await asyncio.sleep(0)
            deadline = self.next_deadline()
        self.set_time(target)
        await asyncio.sleep(0)


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
