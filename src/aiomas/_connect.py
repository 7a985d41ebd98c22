"""Connecting: where an address leads, when to try again, and the socket
options of dead peer detection.

The retry policy is a pure function of the attempt and the time left
(:func:`retry_delay`, :func:`attempt_bound`, :func:`should_retry`), and
:func:`connect_with_retries` takes the clock and the sleep it uses, so tests
run it on driven time.  Used by :func:`aiomas.channel.open_connection` and
:func:`aiomas.channel.start_server`.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeAlias

from aiomas import local_queue
from aiomas.nats import NatsEndpoint

__all__ = [
    "RETRY_DELAY_MAX",
    "RETRY_DELAY_MIN",
    "attempt_bound",
    "bounded",
    "check_dead_peer_timeout",
    "connect_with_retries",
    "detect_dead_peer",
    "opener",
    "retry_delay",
    "should_retry",
    "tcp_address",
]

logger = logging.getLogger("aiomas.channel")

Attempt: TypeAlias = Callable[[], Awaitable[tuple[asyncio.BaseTransport, Any]]]
"""Makes one connection attempt: returns ``(transport, protocol)``."""

RETRY_DELAY_MIN: Final = 0.005
"""The pause after the first failed attempt (seconds); it doubles each time."""
RETRY_DELAY_MAX: Final = 0.25
"""The longest pause between two attempts (seconds)."""

# Errors after which an attempt is made again: nobody listens (yet), or the
# network or host cannot be reached (yet).
_RETRY_ERRNOS: Final = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH})

# Linux refuses keepalive times above this many seconds.
_MAX_KEEPALIVE_SECONDS: Final = 32767


def should_retry(exc: OSError) -> bool:
    """Whether an attempt that failed with *exc* is worth making again."""
    return isinstance(
        exc, ConnectionRefusedError | FileNotFoundError | TimeoutError
    ) or (exc.errno in _RETRY_ERRNOS)


def retry_delay(failures: int) -> float:
    """The pause after the *failures*-th failed attempt (1, 2, ...)."""
    delay: float = min(RETRY_DELAY_MIN * 2 ** (failures - 1), RETRY_DELAY_MAX)
    return delay


def attempt_bound(
    left: float | None, timeout: float | None, dead_peer_timeout: float | None
) -> float | None:
    """How long one attempt may take, with *left* seconds left of the caller's
    *timeout* (``None``: no deadline), or ``None`` for no bound.

    The socket options of dead peer detection come only with the connection
    (for TLS, after the handshake): until then, *dead_peer_timeout* bounds the
    whole attempt.  ``timeout=0`` (try once) sets no bound of its own.
    """
    bound = dead_peer_timeout
    if left is not None and timeout != 0:
        remaining = max(left, RETRY_DELAY_MIN)
        bound = remaining if bound is None else min(bound, remaining)
    return bound


def check_dead_peer_timeout(timeout: float | None) -> None:
    """Raises: ValueError: if *timeout* is neither ``None`` nor a positive
    finite number."""
    if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(
            f"dead_peer_timeout must be a positive number or None, got {timeout!r}"
        )


def detect_dead_peer(transport: asyncio.BaseTransport, timeout: float) -> None:
    """Make the kernel close this TCP connection when the peer has not
    acknowledged sent data for *timeout* seconds, or, on an idle connection,
    has not answered keepalive probes for about that long."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # unix sockets and LocalQueues have no peer that can vanish
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    # Not every system has every option (macOS lacks TCP_USER_TIMEOUT).
    for name, value in (
        ("TCP_KEEPIDLE", min(max(1, round(timeout / 2)), _MAX_KEEPALIVE_SECONDS)),
        ("TCP_KEEPINTVL", min(max(1, round(timeout / 6)), _MAX_KEEPALIVE_SECONDS)),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", min(max(1, round(timeout * 1000)), 2**31 - 1)),
    ):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    for level, option, value in options:
        try:
            sock.setsockopt(level, option, value)
        except OSError as exc:  # Set what can be set.
            peer = transport.get_extra_info("peername")
            logger.warning(
                "Cannot set up dead peer detection for %s fully: %s",
                peer,
                exc,
                extra={"peer": peer},
            )


def tcp_address(addr: Sequence[Any]) -> tuple[str | None, int]:
    """Split a ``(host, port)`` tuple.

    Raises:
        ValueError: if *addr* is not a pair.
    """
    if len(addr) != 2:
        raise ValueError(f"A TCP address must be a (host, port) tuple, got {addr!r}")
    host, port = addr
    return host, port


def opener(
    addr: Any,
    factory: Callable[[], asyncio.BaseProtocol],
    loop: asyncio.AbstractEventLoop,
    kwds: dict[str, Any],
) -> Attempt:
    """Return what makes one attempt to connect to *addr*: a
    :class:`~aiomas.local_queue.LocalQueue`, a
    :class:`~aiomas.nats.NatsEndpoint`, a unix socket path or a ``(host,
    port)`` tuple.

    Raises:
        ValueError: for a TCP address without a host.
    """
    if isinstance(addr, local_queue.LocalQueue):
        lq = addr

        def connect_locally() -> Awaitable[tuple[asyncio.BaseTransport, Any]]:
            return local_queue.create_connection(factory, lq, **kwds)

        return connect_locally
    if isinstance(addr, NatsEndpoint):
        endpoint = addr

        def connect_nats() -> Awaitable[tuple[asyncio.BaseTransport, Any]]:
            return endpoint.create_connection(factory)

        return connect_nats
    if isinstance(addr, str | os.PathLike):
        path = os.fspath(addr)

        def connect_unix() -> Awaitable[tuple[asyncio.BaseTransport, Any]]:
            return loop.create_unix_connection(factory, path, **kwds)

        return connect_unix
    host, port = tcp_address(addr)
    if not isinstance(host, str):
        raise ValueError(f"A client needs a host name or address, got {addr!r}")

    def connect_tcp() -> Awaitable[tuple[asyncio.BaseTransport, Any]]:
        return loop.create_connection(factory, host, port, **kwds)

    return connect_tcp


async def bounded(
    attempt: Awaitable[tuple[asyncio.BaseTransport, Any]], bound: float, addr: Any
) -> tuple[asyncio.BaseTransport, Any]:
    """Run a connection *attempt* for at most *bound* seconds.

    Raises:
        TimeoutError: if it takes longer (what is left of it is closed).
    """
    try:
        return await asyncio.wait_for(attempt, bound)
    except TimeoutError as exc:
        if exc.errno is not None:
            raise  # The kernel's ETIMEDOUT: it says enough.
        raise TimeoutError(
            f"Connecting to {addr!r} did not finish within {bound:.3g} s"
        ) from None


async def connect_with_retries(
    connect: Attempt,
    addr: Any,
    *,
    retry_for: float | None,
    dead_peer_timeout: float | None,
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> tuple[asyncio.BaseTransport, Any]:
    """Make attempts with *connect* until one succeeds, or until *retry_for*
    seconds (``0``: one attempt, ``None``: no end) are over or an attempt
    fails in a way not worth trying again (see :func:`should_retry`).

    Args:
        connect: Makes one attempt.
        addr: For messages.
        retry_for: The ``timeout`` of :func:`aiomas.channel.open_connection`.
        dead_peer_timeout: Bounds each attempt.
        clock: The time, in seconds (the loop's ``time``).
        sleep: Waits between attempts.

    Returns:
        The ``(transport, protocol)`` of the attempt that succeeded.

    Raises:
        OSError: what the last attempt met -- or, if the deadline cut it short
            with a TimeoutError, what the attempt before it met.
    """
    deadline = None if retry_for is None else clock() + retry_for
    failures = 0
    previous: OSError | None = None  # what the last attempt but one met
    while True:
        left = None if deadline is None else deadline - clock()
        bound = attempt_bound(left, retry_for, dead_peer_timeout)
        try:
            if bound is None:
                return await connect()
            return await bounded(connect(), bound, addr)
        except OSError as exc:
            left = None if deadline is None else deadline - clock()
            if not should_retry(exc) or (left is not None and left <= 0):
                if isinstance(exc, TimeoutError) and previous is not None:
                    # The deadline cut the last attempt short: what the ones
                    # before met says more (e.g. that nobody listens).
                    exc = previous
                logger.info(
                    "Connecting to %s failed: %s", addr, exc, extra={"peer": addr}
                )
                raise exc
            previous = exc
            failures += 1
            delay = retry_delay(failures)
            if left is not None:
                delay = min(delay, left)
            logger.debug(
                "Connecting to %s failed (%s); retrying in %.2fs",
                addr,
                exc,
                delay,
                extra={"peer": addr},
            )
            await sleep(delay)
