"""Testing an agent with pytest and pytest-asyncio (shown in docs/testing.rst).

In a real project, the agent and its tests would live in separate modules
(``exampleagent.py`` and ``test_exampleagent.py``); here they share one.  The
tests rely on ``asyncio_mode = "auto"`` in the pytest configuration.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

import aiomas

#
# Production code (exampleagent.py)
#


class ExampleAgent(aiomas.Agent):
    async def run(self, target_addr: str, num: int) -> int:
        remote_agent = await self.container.connect(target_addr)
        result: int = await remote_agent.service(num)
        return result

    @aiomas.expose
    async def service(self, val: int) -> int:
        await self.container.clock.sleep(0.001)
        return val


#
# Testing code (test_exampleagent.py)
#


@pytest.fixture
async def container() -> AsyncIterator[aiomas.Container]:
    """A new container for every test, on a free port (port 0) of the loopback
    interface.

    An async fixture runs in the test's event loop, so it creates the container
    with ``as_coro=True``.
    """
    c = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)
    # Hand the container to the test:
    yield c
    # Clean up after the test:
    await c.shutdown(as_coro=True)


@pytest.fixture
async def sim_container() -> AsyncIterator[aiomas.Container]:
    """Like *container*, but with a clock that only moves when the test says so."""
    clock = aiomas.ExternalClock("2016-01-01T00:00:00")
    c = await aiomas.Container.create(("127.0.0.1", 0), clock=clock, as_coro=True)
    yield c
    await c.shutdown(as_coro=True)


# pytest passes the value of the fixture named "container" to the test.
async def test_example_agent(container: aiomas.Container) -> None:
    num = 42
    # Start two agents:
    agents = [ExampleAgent(container) for _ in range(2)]
    # Let the 1st one call the 2nd one and check the 1st one's result:
    res = await agents[0].run(agents[1].addr, num)
    assert res == num


async def test_service_waits_for_the_clock(sim_container: aiomas.Container) -> None:
    clock = sim_container.clock
    assert isinstance(clock, aiomas.ExternalClock)
    agent = ExampleAgent(sim_container)
    # An exposed method is a normal method, too; call it directly:
    reply = asyncio.ensure_future(agent.service(42))
    await asyncio.sleep(0)  # let it start sleeping
    assert not reply.done()
    clock.set_time(0.001)
    assert await reply == 42
