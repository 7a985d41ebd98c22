"""Deadlines: a time limit for a block of code and every call made in it.

``async with aiomas.deadline(2.0): ...`` gives the block two seconds (on the
event loop's clock, or on the *clock* you pass, e.g. a container's
:class:`~aiomas.clocks.ExternalClock`).  When they have passed, the task is
cancelled, as :func:`asyncio.timeout` does, and the block ends with
:class:`~aiomas.exceptions.DeadlineExceeded`.  The deadline is held in a
context variable, so every RPC call made in the block (also from tasks started
in it) knows it: it fails with :class:`DeadlineExceeded` when the time is up,
and a peer that agreed to the wire extension gets the time left with the
request, serves it under that deadline and is told to cancel it (see
:doc:`/deadlines`).

This module sits below :mod:`aiomas.channel`: it knows asyncio and the error
tree, nothing else.  Any object with ``time()`` and ``call_in(dt, func,
*args)`` (every :class:`~aiomas.clocks.BaseClock`) can be its clock.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, Protocol

from aiomas.exceptions import DeadlineExceeded

__all__ = [
    "Clock",
    "Deadline",
    "DeadlineScope",
    "Guarded",
    "LoopClock",
    "context_with",
    "current_deadline",
    "deadline",
    "remaining",
]


# Guarded calls a deadline keeps before it forgets the ended ones.
_PRUNE_AT: Final = 64


class _Cancellable(Protocol):
    def cancel(self) -> None: ...


class Guarded(Protocol):
    """A call that relies on the timer of its deadline's task (see
    :meth:`Deadline.guard`)."""

    def done(self) -> bool:
        """Whether it has ended."""
        ...

    def unguarded(self) -> None:
        """The task stopped guarding the deadline while the call is pending:
        from now on the call must keep the deadline itself."""
        ...


class Clock(Protocol):
    """What a deadline needs of a clock (every
    :class:`~aiomas.clocks.BaseClock` has it)."""

    def time(self) -> float:
        """The current time in seconds."""
        ...

    def call_in(self, dt: float, func: Callable[..., Any], *args: Any) -> Any:
        """Call ``func(*args)`` in *dt* seconds; return a handle with a
        ``cancel()`` method."""
        ...


class LoopClock:
    """The time of an asyncio event loop (:meth:`asyncio.loop.time`), the
    default clock of deadlines.

    Args:
        loop: The loop (default: the running loop).

    Raises:
        RuntimeError: if *loop* is ``None`` and no loop is running.
    """

    __slots__ = ("_loop", "time")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = asyncio.get_running_loop() if loop is None else loop
        self.time: Callable[[], float] = self._loop.time

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LoopClock):
            return NotImplemented
        return self._loop is other._loop

    def __hash__(self) -> int:
        return hash(self._loop)

    def call_in(
        self, dt: float, func: Callable[..., Any], *args: Any
    ) -> asyncio.TimerHandle:
        """Call ``func(*args)`` in *dt* seconds (see
        :meth:`asyncio.loop.call_later`)."""
        return self._loop.call_later(dt, func, *args)


class Deadline:
    """A point in time *when* on *clock*, by which some work must be done.

    Args:
        when: The deadline, in the seconds of ``clock.time()``.
        clock: The clock it is on.
    """

    __slots__ = ("_guarded", "_prune_at", "clock", "task", "when")

    def __init__(self, when: float, clock: Clock) -> None:
        self.when = when
        self.clock = clock
        self.task: asyncio.Future[Any] | None = None
        """The task that is cancelled when the deadline passes (by a
        :func:`deadline` scope, or by RPC for the call it serves), or
        ``None``: calls made in it need no timer of their own, as long as
        they :meth:`guard` themselves (see :meth:`release`)."""
        self._guarded: list[Guarded] | None = None
        self._prune_at = _PRUNE_AT

    @classmethod
    def after(cls, seconds: float, clock: Clock | None = None) -> Deadline:
        """The deadline *seconds* from now on *clock* (default: the running
        loop's :class:`LoopClock`)."""
        clock = LoopClock() if clock is None else clock
        return cls(clock.time() + seconds, clock)

    def __repr__(self) -> str:
        return f"<Deadline in {self.remaining():.6g}s>"

    def remaining(self) -> float:
        """The seconds left (0 once it has passed)."""
        return max(0.0, self.when - self.clock.time())

    def expired(self) -> bool:
        """Whether it has passed."""
        return self.clock.time() >= self.when

    def call_at_expiry(self, func: Callable[..., Any], *args: Any) -> _Cancellable:
        """Call ``func(*args)`` (from the event loop) when it passes; return a
        handle with a ``cancel()`` method."""
        handle: _Cancellable = self.clock.call_in(self.remaining(), func, *args)
        return handle

    def guard(self, call: Guarded) -> None:
        """Record *call*, made by :attr:`task` and bounded by its timer: if
        the task stops guarding the deadline (:meth:`release`) before the
        call has ended -- a future kept beyond its ``async with`` block --,
        ``call.unguarded()`` is called."""
        guarded = self._guarded
        if guarded is None:
            self._guarded = [call]
            return
        if len(guarded) >= self._prune_at:
            # A long block makes many calls: forget the ended ones, so the
            # list stays as long as the calls pending (amortized O(1)).
            guarded[:] = [waiting for waiting in guarded if not waiting.done()]
            self._prune_at = max(_PRUNE_AT, 2 * len(guarded))
        guarded.append(call)

    def release(self) -> None:
        """:attr:`task` stops guarding the deadline (its block or its request
        has ended): the guarded calls still pending must keep it themselves
        (see :meth:`guard`)."""
        self.task = None
        guarded, self._guarded = self._guarded, None
        for call in guarded or ():
            if not call.done():
                call.unguarded()

    def exceeded(self) -> DeadlineExceeded:
        """The error for work that missed it."""
        return DeadlineExceeded("the deadline passed")


_current: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar(
    "aiomas_deadline", default=None
)

current_deadline = _current.get
"""``current_deadline()``: the :class:`Deadline` of the code running now, or
``None`` (the innermost :func:`deadline` scope, or the deadline of the RPC
request being served)."""


def remaining() -> float | None:
    """The seconds left until the current deadline (0 once it has passed), or
    ``None`` if there is none."""
    current = _current.get()
    return None if current is None else current.remaining()


def context_with(deadline: Deadline) -> contextvars.Context:
    """A copy of the current context in which *deadline* is the current one
    (for a task that serves a request under it, see
    :meth:`asyncio.loop.create_task`'s *context*)."""
    context = contextvars.copy_context()
    context.run(_current.set, deadline)
    return context


class DeadlineScope:
    """The async context manager that :func:`deadline` returns."""

    __slots__ = (
        "_cancelling",
        "_clock",
        "_fired",
        "_seconds",
        "_task",
        "_timer",
        "_token",
    )

    def __init__(self, seconds: float, clock: Clock | None) -> None:
        self._seconds = seconds
        self._clock = clock
        self._task: asyncio.Task[Any] | None = None
        self._timer: _Cancellable | None = None
        self._token: contextvars.Token[Deadline | None] | None = None
        self._fired = False
        self._cancelling = 0

    async def __aenter__(self) -> Deadline:
        task = asyncio.current_task()
        if task is None:  # pragma: no cover (async with runs in a task)
            raise RuntimeError("aiomas.deadline() must be used inside a task")
        if self._token is not None:
            raise RuntimeError("this deadline scope has been entered already")
        new = Deadline.after(self._seconds, self._clock)
        outer = _current.get()
        if (
            outer is not None
            and outer.task is task
            and outer.clock == new.clock
            and outer.when <= new.when
        ):
            # A nested deadline never gives more time than the outer one,
            # whose scope cancels the task in time.
            self._token = _current.set(outer)
            return outer
        if outer is not None and outer.clock == new.clock and outer.when < new.when:
            # The outer deadline is another task's (this one was started
            # under it): this task keeps it with a timer of its own.
            new = Deadline(outer.when, new.clock)
        self._task = task
        self._cancelling = task.cancelling()
        self._timer = new.call_at_expiry(self._expire)
        self._token = _current.set(new)
        new.task = task
        return new

    def _expire(self) -> None:
        self._timer = None
        if self._task is not None and not self._task.done():
            self._fired = True
            self._task.cancel()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._token is not None:
            deadline = _current.get()
            if deadline is not None and deadline.task is self._task:
                deadline.release()  # No timer guards it any more.
            _current.reset(self._token)
        task = self._task
        # As asyncio.timeout(): a cancel of our own becomes the error; one
        # from someone else stays a cancel.
        if (
            self._fired
            and task is not None
            and task.uncancel() <= self._cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise DeadlineExceeded(
                f"the deadline of {self._seconds:g}s passed"
            ) from exc


def deadline(seconds: float, *, clock: Clock | None = None) -> DeadlineScope:
    """A time limit for the ``async with`` block and the calls made in it.

    When *seconds* have passed on *clock* (default: the event loop's time,
    :class:`LoopClock`; in a container pass ``container.clock``, whose
    :class:`~aiomas.clocks.ExternalClock` only moves when it is set), the task
    is cancelled and the block raises
    :class:`~aiomas.exceptions.DeadlineExceeded`.  An RPC call in the block
    fails with it too, and its peer is told (see :doc:`/deadlines`).  A nested
    scope never extends an outer one on the same clock.

    ``async with`` gives the :class:`Deadline`.
    """
    return DeadlineScope(seconds, clock)
