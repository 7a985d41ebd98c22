"""Clocks for agent containers.

All clocks share the :class:`BaseClock` interface, so agents can switch between
real time and simulated time without changing their code:

- :class:`AsyncioClock` follows the event loop's real-time clock.
- :class:`ExternalClock` only moves when :meth:`ExternalClock.set_time` is called,
  e.g. by a simulator that the agents are coupled with, so time can pass much
  faster (or slower) than real time.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Any, Protocol, TypeAlias

import arrow

from aiomas import util

__all__ = ["AsyncioClock", "BaseClock", "ExternalClock", "TimerHandle"]

Time: TypeAlias = "float | arrow.Arrow"


class Cancellable(Protocol):
    """What :meth:`BaseClock.call_in` and :meth:`BaseClock.call_at` return."""

    def cancel(self) -> None: ...


class BaseClock:
    """Interface for clocks.

    Subclasses implement at least :meth:`time`, :meth:`utcnow`, :meth:`sleep` and
    :meth:`call_in`; the methods taking an absolute time build on these.
    """

    def time(self) -> float:
        """Return the value (in seconds) of a monotonic clock.

        Consecutive calls never return smaller values.  The initial value is not
        defined; don't depend on it.
        """
        raise NotImplementedError

    def utcnow(self) -> arrow.Arrow:
        """Return the current date and time in UTC."""
        raise NotImplementedError

    def sleep(self, dt: float, result: Any = None) -> asyncio.Future[Any]:
        """Return a future that gets *result* after *dt* seconds."""
        raise NotImplementedError

    def sleep_until(self, t: Time, result: Any = None) -> asyncio.Future[Any]:
        """Return a future that gets *result* at time *t*.

        Args:
            t: Seconds (as returned by :meth:`time`) or an Arrow date.

        Raises:
            ValueError: if *t* lies in the past.
        """
        return self.sleep(self._delay_until(t), result)

    def call_in(self, dt: float, func: Callable[..., Any], *args: Any) -> Cancellable:
        """Call ``func(*args)`` in *dt* seconds.

        Returns:
            A handle whose ``cancel()`` method cancels the call.
        """
        raise NotImplementedError

    def call_at(self, t: Time, func: Callable[..., Any], *args: Any) -> Cancellable:
        """Call ``func(*args)`` at time *t* (seconds or an Arrow date).

        Returns:
            A handle whose ``cancel()`` method cancels the call.

        Raises:
            ValueError: if *t* lies in the past.
        """
        return self.call_in(self._delay_until(t), func, *args)

    def _delay_until(self, t: Time) -> float:
        if isinstance(t, arrow.Arrow):
            now_date = self.utcnow()
            if t < now_date:
                raise ValueError(f"{t} lies in the past (now is {now_date})")
            delta: float = (t - now_date).total_seconds()
            return delta
        now = self.time()
        if t < now:
            raise ValueError(f"Time {t} lies in the past (now is {now})")
        return t - now


def _loop() -> asyncio.AbstractEventLoop:
    """The running loop or, outside of one, the loop that aiomas.run() uses."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return util.get_loop()


class AsyncioClock(BaseClock):
    """A real-time clock: the time of the running asyncio event loop."""

    def time(self) -> float:
        return _loop().time()

    def utcnow(self) -> arrow.Arrow:
        return arrow.utcnow()

    def sleep(self, dt: float, result: Any = None) -> asyncio.Future[Any]:
        loop = _loop()
        future = loop.create_future()
        loop.call_later(dt, _set_result_unless_done, future, result)
        return future

    def call_in(
        self, dt: float, func: Callable[..., Any], *args: Any
    ) -> asyncio.TimerHandle:
        return _loop().call_later(dt, func, *args)


def _set_result_unless_done(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


class TimerHandle:
    """Lets you cancel a call scheduled by :class:`ExternalClock`.

    Args:
        future: The future that triggers the call when its time has come.
        callback: The done-callback of *future* that makes the call.
    """

    __slots__ = ("_callback", "_future")

    def __init__(
        self,
        future: asyncio.Future[Any],
        callback: Callable[[asyncio.Future[Any]], None],
    ) -> None:
        self._future = future
        self._callback = callback

    def cancel(self) -> None:
        """Cancel the scheduled call (if it has not happened yet)."""
        self._future.remove_done_callback(self._callback)
        self._future.cancel()

    def cancelled(self) -> bool:
        """Whether the call was cancelled."""
        return self._future.cancelled()


class ExternalClock(BaseClock):
    """A clock whose time is set from outside (e.g. by a simulator).

    Time only advances through :meth:`set_time`; sleepers and scheduled calls
    whose time has come are then released in time order (and in the order they
    were scheduled, for equal times).

    The date is tied to the time, not to the start: :meth:`utcnow` is always
    *utc_start* plus :meth:`time` seconds, as in the original aiomas.  With
    ``init_time=-1`` the clock starts one second before *utc_start*, so that
    ``sleep_until(utc_start)`` waits until the master calls ``set_time(0)``.

    Args:
        utc_start: The date at time ``0``: an Arrow date or anything
            :func:`arrow.get` can parse (e.g. ``'2016-01-01T00:00:00'``).
        init_time: The initial value of :meth:`time`.
    """

    def __init__(self, utc_start: Any, init_time: float = 0) -> None:
        self._utc_start = arrow.get(utc_start).to("utc")
        self._time = init_time
        self._counter = itertools.count()
        self._queue: list[tuple[float, int, asyncio.Future[Any], Any]] = []

    def __repr__(self) -> str:
        return f"ExternalClock(time={self._time}, utcnow={self.utcnow()})"

    def time(self) -> float:
        return self._time

    def utcnow(self) -> arrow.Arrow:
        return self._utc_start.shift(seconds=self._time)

    def set_time(self, t: float) -> None:
        """Advance the clock to *t* and release everything due by then.

        Raises:
            ValueError: if *t* is smaller than the current time.
        """
        if t < self._time:
            raise ValueError(
                f"Time must not go backwards: the clock is at {self._time}, got {t}"
            )
        self._time = t
        queue = self._queue
        while queue and queue[0][0] <= t:
            _, _, future, result = heapq.heappop(queue)
            if not future.done():
                future.set_result(result)

    def next_deadline(self) -> float | None:
        """The earliest time that a sleep or scheduled call waits for, or
        ``None`` if nothing waits.  (What a driver of the clock, such as a test,
        advances to next.)"""
        queue = self._queue
        while queue and queue[0][2].done():
            heapq.heappop(queue)  # cancelled: nobody waits for it any more
        return queue[0][0] if queue else None

    def sleep(self, dt: float, result: Any = None) -> asyncio.Future[Any]:
        future = _loop().create_future()
        if dt <= 0:
            future.set_result(result)
            return future
        entry = (self._time + dt, next(self._counter), future, result)
        heapq.heappush(self._queue, entry)
        return future

    def call_in(
        self, dt: float, func: Callable[..., Any], *args: Any
    ) -> TimerHandle | asyncio.Handle:
        if dt <= 0:
            # Due now: still call it from the loop, never from inside call_in().
            return _loop().call_soon(func, *args)
        future = self.sleep(dt)

        def callback(done: asyncio.Future[Any]) -> None:
            if not done.cancelled():
                func(*args)

        future.add_done_callback(callback)
        return TimerHandle(future, callback)
