"""Testing agents with the fixtures of aiomas' pytest plugin (shown in
docs/testing.rst).

The plugin comes with aiomas; pytest-asyncio runs its async fixtures.  The tests
rely on ``asyncio_mode = "auto"``; in strict mode, mark them with
``@pytest.mark.asyncio``.  For brevity, the agents and their tests share one
module.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiomas
from aiomas.pytest_plugin import LocalContainerFactory, SteppingClock

#
# Production code
#


class Echo(aiomas.Agent):
    @aiomas.expose
    def echo(self, text: str) -> str:
        return text.upper()


class Caller(aiomas.Agent):
    async def call(self, addr: str, text: str) -> str:
        echo = await self.container.connect(addr)
        reply: str = await echo.echo(text)
        return reply


class Recorder(aiomas.Agent):
    """Writes down the notes it gets, in the order they arrive."""

    def __init__(self, container: aiomas.Container) -> None:
        super().__init__(container)
        self.notes: list[str] = []

    @aiomas.expose
    def note(self, text: str) -> None:
        self.notes.append(text)


class Reporter(aiomas.Agent):
    async def report(self, addr: str, name: str, count: int) -> None:
        recorder = await self.container.connect(addr)
        for i in range(count):
            await recorder.note(f"{name}{i}")


class Heartbeat(aiomas.Agent):
    """Beats once per second of its container's clock."""

    def __init__(self, container: aiomas.Container) -> None:
        super().__init__(container)
        self.beats: list[float] = []

    async def run(self, count: int) -> None:
        clock = self.container.clock
        for _ in range(count):
            await clock.sleep(1)
            self.beats.append(clock.time())


class Poller(aiomas.Agent):
    """Every ten seconds of its container's clock, asks another agent."""

    def __init__(self, container: aiomas.Container) -> None:
        super().__init__(container)
        self.answers: list[str] = []

    async def run(self, addr: str) -> None:
        clock = self.container.clock
        other = await self.container.connect(addr)
        while True:
            await clock.sleep(10)
            self.answers.append(await other.echo(f"t{clock.time():g}"))


#
# Testing code
#


async def test_agents_in_one_container(aiomas_container: aiomas.Container) -> None:
    caller = Caller(aiomas_container)
    echo = Echo(aiomas_container)
    assert await caller.call(echo.addr, "hi") == "HI"


async def test_agents_in_two_containers(
    aiomas_container_pair: tuple[aiomas.Container, aiomas.Container],
) -> None:
    here, there = aiomas_container_pair
    caller = Caller(here)
    echo = Echo(there)
    assert await caller.call(echo.addr, "hi") == "HI"


async def test_messages_arrive_in_the_same_order_every_time(
    aiomas_local_containers: LocalContainerFactory,
) -> None:
    async def run_once() -> list[str]:
        # A recorder in one container, three reporters in three others:
        recorder_home, *reporter_homes = await aiomas_local_containers(4)
        recorder = Recorder(recorder_home)
        reporters = [Reporter(c) for c in reporter_homes]
        await asyncio.gather(
            *(
                r.report(recorder.addr, name, 3)
                for r, name in zip(reporters, "abc", strict=True)
            )
        )
        return recorder.notes

    first = await run_once()
    assert sorted(first) == ["a0", "a1", "a2", "b0", "b1", "b2", "c0", "c1", "c2"]
    # The reporters run concurrently, but on LocalQueues their messages
    # interleave in one reproducible order:
    assert await run_once() == first


async def test_the_heartbeat_follows_the_clock(
    aiomas_clock_container: aiomas.Container,
    aiomas_external_clock: SteppingClock,
) -> None:
    heartbeat = Heartbeat(aiomas_clock_container)
    task = asyncio.ensure_future(heartbeat.run(3))
    await asyncio.sleep(0)  # let it start sleeping
    # No real time passes; the clock stops at every beat on its way:
    await aiomas_external_clock.advance(2.5)
    assert heartbeat.beats == [1, 2]
    await aiomas_external_clock.advance(0.5)
    assert heartbeat.beats == [1, 2, 3]
    await task


async def test_a_woken_agent_that_calls_another(
    aiomas_clock_container: aiomas.Container,
    aiomas_external_clock: SteppingClock,
) -> None:
    echo = Echo(aiomas_clock_container)
    poller = Poller(aiomas_clock_container)
    task = asyncio.ensure_future(poller.run(echo.addr))
    await aiomas_external_clock.run_until_idle()  # it sleeps now
    # Each wake-up makes an RPC call before the next sleep; advance() waits
    # for that call, so no real time passes and nothing hangs:
    await aiomas_external_clock.advance(30)
    assert poller.answers == ["T10", "T20", "T30"]
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
