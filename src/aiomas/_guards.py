"""Guards between user code and the library: what a handler or callback
raises must fail only its call (or its connection), never the event loop, the
server or the process -- except what a real signal raised.

Used by :mod:`aiomas.channel` and :mod:`aiomas.rpc`.
"""

from __future__ import annotations

import asyncio
import dis
import functools
import signal
from collections.abc import Awaitable
from typing import Any, Final

__all__ = ["guarded", "stops_the_process", "without_tracebacks"]


def stops_the_process(exc: BaseException) -> bool:
    """Whether *exc* must go on to end the process rather than fail one call.

    That is a ``KeyboardInterrupt`` or ``SystemExit`` from a signal (Ctrl-C, or
    a handler installed with :func:`signal.signal` that calls ``sys.exit()``)
    that arrived while the call's code ran, or one that the call raised while
    handling such an exception.  What the call raises by itself fails only it.
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, KeyboardInterrupt | SystemExit) and _from_signal(cause):
            return True
        cause = cause.__context__
    return False


def _from_signal(exc: BaseException) -> bool:
    handlers = _python_signal_handlers()
    tb = exc.__traceback__
    last = None
    while tb is not None:
        if tb.tb_frame.f_code in handlers:
            return True
        last, tb = tb, tb.tb_next
    if (
        isinstance(exc, KeyboardInterrupt)
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ):
        # Python's own SIGINT handler runs no Python code: its KeyboardInterrupt
        # appears wherever the call was when the signal came -- never at a
        # raise statement, where a KeyboardInterrupt of the call's own appears.
        if last is None:
            return True
        code = last.tb_frame.f_code.co_code
        at = last.tb_lasti
        return not (0 <= at < len(code) and dis.opname[code[at]] in _RAISES)
    return False


_RAISES: Final = frozenset({"RAISE_VARARGS", "RERAISE"})


def _python_signal_handlers() -> set[Any]:
    """The code objects of the signal handlers written in Python."""
    codes = set()
    for signum in signal.valid_signals():
        try:
            handler: Any = signal.getsignal(signum)
        except (OSError, ValueError):  # pragma: no cover (platform specific)
            continue
        while isinstance(handler, functools.partial):  # e.g. asyncio.Runner's
            handler = handler.func
        handler = getattr(handler, "__func__", handler)
        code = getattr(handler, "__code__", None)
        if code is not None:
            codes.add(code)
    return codes


async def guarded(awaitable: Awaitable[Any]) -> Any:
    """Await *awaitable* (a user's coroutine run as a task); what it raises
    that is not an :class:`Exception` comes out as a :class:`RuntimeError`,
    so that it fails only that task instead of ending the event loop
    (``SystemExit``, ``KeyboardInterrupt``) or passing for its cancellation.

    Our own cancellation and what a signal raised (see stops_the_process())
    pass unchanged.
    """
    try:
        return await awaitable
    except Exception:
        raise
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        raise RuntimeError(f"raised {type(exc).__name__}") from exc
    except BaseException as exc:
        if stops_the_process(exc):
            raise
        raise RuntimeError(f"raised {type(exc).__name__}") from exc


def without_tracebacks(exc: BaseException) -> BaseException:
    """Drop the tracebacks of *exc* and of its causes and contexts."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = None
        current = current.__cause__ or current.__context__
    return exc
