"""The agent that ``tests/test_multihost.py`` spawns in its container processes.

It lives in a module of its own, so that the child processes import only aiomas
and this file (not pytest and the test fixtures): they start faster.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypedDict

import aiomas


class Outcome(TypedDict):
    """How a call from one host to another went, as seen by the caller."""

    result: str | None
    """The callee's answer, or ``None`` if the call failed."""
    error: str | None
    """The name of the exception's class if the call failed."""
    errno: int | None
    """The exception's ``errno`` (for an :class:`OSError`)."""
    message: str
    """``str()`` of the exception."""
    cause: str | None
    """``repr()`` of the exception's ``__cause__``: the connection's end reason."""
    elapsed: float
    """Seconds from the start of the call to its end."""


class Peer(aiomas.Agent):
    """An agent that answers pings with its host's name and pings other agents
    when asked to (the test process cannot reach the other hosts' data links
    itself).

    Args:
        container: The container of the agent.
        host: The name of the agent's host, e.g. ``'A'``.
    """

    def __init__(self, container: aiomas.Container, host: str) -> None:
        super().__init__(container)
        self.host = host

    @aiomas.expose
    def ping(self) -> str:
        """Return the name of this agent's host."""
        return self.host

    @aiomas.expose
    async def ping_peer(self, url: str, bound: float | None = None) -> Outcome:
        """Connect to the agent at *url* (or reuse the container's connection to
        it) and ping it; give up after *bound* seconds (``None``: never).

        Failures are reported, not raised: the test wants the exact exception
        and the time it took.
        """
        return await _outcome(self._ping(url), bound)

    @aiomas.expose
    async def relay_ping(self, via_url: str, target_url: str) -> Outcome:
        """Ask the agent at *via_url* to ping the agent at *target_url*; return
        that agent's outcome (or how the call to *via_url* failed)."""
        started = time.monotonic()
        try:
            via = await self.container.connect(via_url)
            outcome: Outcome = await via.ping_peer(target_url)
        except Exception as exc:
            return _failure(exc, started)
        return outcome

    async def _ping(self, url: str) -> str:
        peer = await self.container.connect(url)
        answer: str = await peer.ping()
        return answer


async def _outcome(call: Coroutine[Any, Any, str], bound: float | None) -> Outcome:
    started = time.monotonic()
    try:
        result = await asyncio.wait_for(call, bound)
    except Exception as exc:
        return _failure(exc, started)
    return Outcome(
        result=result,
        error=None,
        errno=None,
        message="",
        cause=None,
        elapsed=time.monotonic() - started,
    )


def _failure(exc: Exception, started: float) -> Outcome:
    return Outcome(
        result=None,
        error=type(exc).__name__,
        errno=exc.errno if isinstance(exc, OSError) else None,
        message=str(exc),
        cause=None if exc.__cause__ is None else repr(exc.__cause__),
        elapsed=time.monotonic() - started,
    )
