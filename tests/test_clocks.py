"""Tests for aiomas.clocks."""

from __future__ import annotations

import asyncio

import arrow
import pytest

from aiomas.clocks import AsyncioClock, BaseClock, ExternalClock, TimerHandle
from aiomas.testing import TIME_UNIT, settle


def test_base_clock_is_an_interface() -> None:
    clock = BaseClock()
    with pytest.raises(NotImplementedError):
        clock.time()
    with pytest.raises(NotImplementedError):
        clock.utcnow()


async def test_asyncio_clock_follows_the_loop() -> None:
    clock = AsyncioClock()
    loop = asyncio.get_running_loop()
    assert abs(clock.time() - loop.time()) < 0.1
    assert abs((clock.utcnow() - arrow.utcnow()).total_seconds()) < 1
    assert clock.utcnow().tzinfo is not None

    start = loop.time()
    assert await clock.sleep(20 * TIME_UNIT, result="done") == "done"
    assert loop.time() - start >= 15 * TIME_UNIT
    step = 10 * TIME_UNIT
    assert await clock.sleep_until(clock.time() + step, result=1) == 1
    assert await clock.sleep_until(clock.utcnow().shift(seconds=step)) is None

    calls: list[str] = []
    clock.call_in(step, calls.append, "in")
    clock.call_at(clock.time() + step, calls.append, "at")
    clock.call_at(clock.utcnow().shift(seconds=step), calls.append, "date")
    clock.call_in(step, calls.append, "cancelled").cancel()
    await asyncio.sleep(5 * step)
    assert sorted(calls) == ["at", "date", "in"]


async def test_times_in_the_past_are_refused() -> None:
    for clock in (AsyncioClock(), ExternalClock("2016-01-01")):
        with pytest.raises(ValueError, match="past"):
            clock.sleep_until(clock.time() - 1)
        with pytest.raises(ValueError, match="past"):
            clock.call_at(clock.utcnow().shift(seconds=-1), print)


def test_external_clock_dates() -> None:
    # The start date is the date at time 0, whatever the initial time.
    clock = ExternalClock("2016-01-01T00:00:00", init_time=-1)
    assert clock.time() == -1
    assert clock.utcnow() == arrow.get("2015-12-31T23:59:59")
    clock.set_time(0)
    assert clock.utcnow() == arrow.get("2016-01-01T00:00:00")
    clock.set_time(60)
    assert clock.utcnow() == arrow.get("2016-01-01T00:01:00")
    assert ExternalClock("2016-01-01", init_time=3600).utcnow() == arrow.get(
        "2016-01-01T01:00:00"
    )
    start = arrow.get("2020-06-01T12:00:00+02:00")
    assert ExternalClock(start).utcnow() == arrow.get("2020-06-01T10:00:00Z")
    assert "ExternalClock(time=0" in repr(ExternalClock(start))


def test_external_time_never_goes_backwards() -> None:
    clock = ExternalClock("2016-01-01")
    clock.set_time(10)
    clock.set_time(10)
    with pytest.raises(ValueError, match="backwards"):
        clock.set_time(9.9)
    assert clock.time() == 10


async def test_external_clock_releases_sleepers_in_time_order() -> None:
    clock = ExternalClock("2016-01-01")
    woke: list[str] = []

    async def sleeper(name: str, dt: float) -> None:
        woke.append(f"{name}={await clock.sleep(dt, result=dt)}")

    tasks = [
        asyncio.ensure_future(sleeper(name, dt))
        for name, dt in [("c", 3), ("a", 1), ("b", 2), ("b2", 2), ("d", 10)]
    ]
    await settle()
    assert woke == []
    clock.set_time(0.5)
    await settle()
    assert woke == []
    clock.set_time(2)
    await settle()
    assert woke == ["a=1", "b=2", "b2=2"]
    clock.set_time(5)
    await settle()
    assert woke == ["a=1", "b=2", "b2=2", "c=3"]
    tasks[-1].cancel()  # a cancelled sleeper is skipped quietly
    clock.set_time(20)
    await asyncio.gather(*tasks, return_exceptions=True)
    assert woke == ["a=1", "b=2", "b2=2", "c=3"]


async def test_external_clock_sleep_until_a_date() -> None:
    clock = ExternalClock("2016-01-01T00:00:00")
    future = clock.sleep_until(arrow.get("2016-01-01T00:00:30"), result="late")
    clock.set_time(29)
    await settle()
    assert not future.done()
    clock.set_time(30)
    assert await future == "late"
    assert await clock.sleep(0, result="now") == "now"


async def test_external_clock_scheduled_calls() -> None:
    clock = ExternalClock("2016-01-01")
    calls: list[tuple[str, float]] = []

    def record(name: str) -> None:
        calls.append((name, clock.time()))

    clock.call_in(2, record, "in 2")
    clock.call_at(1, record, "at 1")
    handle = clock.call_in(1.5, record, "cancelled")
    assert isinstance(handle, TimerHandle)
    handle.cancel()
    assert handle.cancelled()
    clock.call_at(arrow.get("2016-01-01T00:00:03"), record, "at 00:00:03")
    clock.call_in(0, record, "now")
    await settle()
    assert calls == [("now", 0)]
    clock.set_time(10)
    await settle()
    assert calls == [("now", 0), ("at 1", 10), ("in 2", 10), ("at 00:00:03", 10)]


async def test_spec_example_clock_setter() -> None:
    clock = ExternalClock("2016-01-01T00:00:00")

    async def clock_setter() -> None:
        while True:
            await asyncio.sleep(0.01)
            clock.set_time(clock.time() + 1)

    setter = asyncio.ensure_future(clock_setter())
    await asyncio.wait_for(clock.sleep(3), 2)
    assert clock.time() >= 3
    setter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await setter


@pytest.mark.usefixtures("no_thread_loop")
def test_clocks_work_outside_a_running_loop() -> None:
    """Like aiomas.run(), the clocks use this thread's loop when none runs."""
    import aiomas

    clock = AsyncioClock()
    start = clock.time()
    assert aiomas.run(clock.sleep(0.01, result="done")) == "done"
    assert clock.time() >= start + 0.01
    external = ExternalClock("2016-01-01T00:00:00")
    sleeper = external.sleep(1, result="woke")
    external.call_in(0, lambda: None)
    external.set_time(1)
    assert aiomas.run(sleeper) == "woke"


async def test_the_start_date_waits_for_set_time_0_with_init_time_minus_1() -> None:
    start = arrow.get("2016-01-01T00:00:00")
    clock = ExternalClock(start, init_time=-1)
    slept = clock.sleep_until(start, "slept")
    called: list[float] = []
    clock.call_at(start, lambda: called.append(clock.time()))
    await settle()
    assert not slept.done()
    assert not called
    clock.set_time(0)
    assert await slept == "slept"
    await asyncio.sleep(0)
    assert called == [0]


async def test_external_clock_next_deadline() -> None:
    clock = ExternalClock("2016-01-01")
    assert clock.next_deadline() is None
    later = clock.sleep(5)
    handle = clock.call_in(2, print)
    assert clock.next_deadline() == 2
    handle.cancel()  # a cancelled call is nothing to wait for
    assert clock.next_deadline() == 5
    clock.set_time(5)
    assert later.done()
    assert clock.next_deadline() is None
