"""Helpers shared by several test modules (and the doctest setup)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import strategies as st

import aiomas
from aiomas import wire
from aiomas.channel import Channel

# Any value that every codec can encode (JSON, MsgPack, MsgPackBlosc).
codec_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=25,
)


def as_lists(value: Any) -> Any:
    """*value* with every tuple turned into a list (MsgPack decodes to tuples)."""
    if isinstance(value, list | tuple):
        return [as_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: as_lists(v) for k, v in value.items()}
    return value


@contextlib.contextmanager
def open_files_limit(needed: int) -> Iterator[None]:
    """Let this process open at least *needed* files for a while.

    Unprivileged users often get a soft limit of 1024 open files, below their
    hard limit: raise the soft limit (anyone may, up to the hard limit) and
    restore it afterwards; skip the test if the hard limit is too low.
    """
    try:
        import resource
    except ImportError:  # Windows: no such limit per process.
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} open files; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Close *loop* the way asyncio.run() would: tasks, async generators, executor."""
    if loop.is_closed():
        return
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()


async def echo_forever(channel: Channel) -> None:
    """Answer every request with its content until the peer goes away (then the
    ConnectionResetError of recv() ends it, as a handler's normal end)."""
    while True:
        request = await channel.recv()
        await request.reply(request.content)


async def echo_until_closed(channel: Channel) -> None:
    """Like :func:`echo_forever`, but ends quietly when the peer goes away."""
    with contextlib.suppress(ConnectionError):
        await echo_forever(channel)


def aiomas_records(
    caplog: pytest.LogCaptureFixture, level: int
) -> list[logging.LogRecord]:
    """The log records of aiomas' own loggers at *level* or above."""
    return [
        r for r in caplog.records if r.name.startswith("aiomas") and r.levelno >= level
    ]


def _ports_below_outgoing() -> range | None:
    """Ports below the range the system hands out as the local ports of
    outgoing connections (which the suite makes many of, and a client that
    retries a connection to a port in that range may even get its own
    socket there); ``None`` if that range starts too low to leave room."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        low = int(text.split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # (Linux's default)
    return range(20000, low) if low > 21000 else None


# (Not the random module's own generator: tests seed that, the same way in
# every worker.)
_PORT_CHOICE = random.SystemRandom()


def free_port(taken: Iterable[int] = (), ipv6: bool = False) -> int:
    """A TCP port that nobody listens on now on 127.0.0.1 (and on ``::1``
    with *ipv6*, where there is IPv6), not in *taken*.

    It is taken below the ports of outgoing connections (see above), at
    random, so that a server that is stopped and started again on it, or an
    example that binds it a little later, finds it still free.
    """
    candidates = _ports_below_outgoing()
    taken = set(taken)  # (may be an iterator)
    while True:
        wanted = 0 if candidates is None else _PORT_CHOICE.choice(candidates)
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", wanted))
                port: int = probe.getsockname()[1]
        except OSError:
            continue
        if port in taken:
            continue
        if ipv6 and socket.has_ipv6:
            try:
                with socket.socket(socket.AF_INET6) as probe6:
                    probe6.bind(("::1", port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue
                # No IPv6 loopback: localhost is 127.0.0.1 only.
        return port


@contextlib.contextmanager
def black_hole() -> Iterator[tuple[str, int]]:
    """A TCP address on 127.0.0.1 where connecting hangs: the listener's
    accept queue is full, so the kernel ignores further connection requests."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        addr = listener.getsockname()
        with socket.create_connection(addr):
            yield addr


def tcp_socket_options(channel: Channel) -> tuple[int, int, int]:
    """SO_KEEPALIVE, TCP_KEEPIDLE and TCP_USER_TIMEOUT of *channel*'s socket."""
    sock = channel.get_extra_info("socket")
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
    )


async def in_a_callback(action: Callable[[], Any]) -> Any:
    """Run *action* in a callback of the loop (where no task runs, as in a
    transport's read), and return what it returned."""
    done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(lambda: done.set_result(action()))
    return await done


def frames(*messages: Any) -> bytes:
    """*messages* encoded with JSON and framed, as a peer sends them."""
    codec = aiomas.JSON()
    return b"".join(wire.frame(codec.encode(m)) for m in messages)
