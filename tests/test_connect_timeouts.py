"""A peer that accepts connections and never answers cannot hold a caller.

The tarpit below accepts TCP connections and never sends a byte: to a TLS
client, it is a server whose handshake never completes; to a container, one
that never answers the agent lookup.  ``connect(..., timeout=1)`` must end
within 1.5 s and leave nothing behind: the tarpit sees each connection closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

import aiomas
from aiomas.testing import TIME_UNIT

from .conftest import TLSFiles

# What a connect(timeout=1) may take in all: the timeout plus the slack the
# docs promise (0.1 s), plus headroom for a busy test machine.
BOUND = 1.5


@dataclass
class Tarpit:
    """Accepts connections and never writes; counts open connections."""

    addr: tuple[str, int]
    opened: int = 0
    transports: list[asyncio.BaseTransport] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    open_now: int = 0

    def lost(self) -> None:
        self.open_now -= 1
        if not self.open_now:
            self.closed.set()

    async def all_closed(self) -> None:
        """Wait until every connection the tarpit accepted is closed by the
        client (the tarpit itself never closes one)."""
        await asyncio.wait_for(self.closed.wait(), 1)
        assert self.opened > 0


class _Silent(asyncio.Protocol):
    def __init__(self, tarpit: Tarpit) -> None:
        self.tarpit = tarpit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tarpit.opened += 1
        self.tarpit.open_now += 1
        self.tarpit.closed.clear()
        self.tarpit.transports.append(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.tarpit.lost()


@contextlib.asynccontextmanager
async def tarpit() -> AsyncIterator[Tarpit]:
    loop = asyncio.get_running_loop()
    pit: Tarpit
    server = await loop.create_server(lambda: _Silent(pit), "127.0.0.1", 0)
    pit = Tarpit(server.sockets[0].getsockname()[:2])
    try:
        yield pit
    finally:
        for transport in pit.transports:
            transport.close()
        server.close()
        await server.wait_closed()


def timed() -> Any:
    start = time.monotonic()
    return lambda: time.monotonic() - start


@pytest.mark.parametrize("layer", ["channel", "rpc"])
async def test_open_connection_to_a_tls_tarpit_ends_after_the_timeout(
    layer: str, tls: TLSFiles
) -> None:
    """The TLS handshake counts into the timeout: TimeoutError after 1 s."""
    module = aiomas.channel if layer == "channel" else aiomas.rpc
    async with tarpit() as pit:
        elapsed = timed()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(
                module.open_connection(pit.addr, ssl=tls.client_context, timeout=1),
                5,
            )
        assert 1 <= elapsed() < BOUND
        await pit.all_closed()


@pytest.mark.parametrize("transport", ["tcp", "tls"])
async def test_container_connect_to_a_tarpit_ends_after_the_timeout(
    transport: str, tls: TLSFiles
) -> None:
    """Container.connect(timeout=1) bounds the TCP connect, the TLS handshake
    and the agent lookup together; the connection it opened is closed."""
    certs = None
    if transport == "tls":
        certs = aiomas.SSLCerts(tls.cafile, tls.certfile, tls.keyfile)
    container = await aiomas.Container.create(("127.0.0.1", 0), ssl=certs, as_coro=True)
    try:
        async with tarpit() as pit:
            host, port = pit.addr
            elapsed = timed()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(
                    container.connect(f"tcp://{host}:{port}/0", timeout=1), 5
                )
            assert 1 <= elapsed() < BOUND
            await pit.all_closed()
            # The next attempt starts afresh (and is bounded again).
            elapsed = timed()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(
                    container.connect(f"tcp://{host}:{port}/0", timeout=0.5), 5
                )
            assert 0.5 <= elapsed() < BOUND
            await pit.all_closed()
            assert pit.opened == 2
    finally:
        await container.shutdown(as_coro=True)


async def test_a_caller_with_a_timeout_is_not_held_by_a_joined_attempt() -> None:
    """A connect() with a timeout that joins another caller's attempt without
    one still ends after its own timeout."""
    container = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)
    try:
        async with tarpit() as pit:
            host, port = pit.addr
            url = f"tcp://{host}:{port}/0"
            patient = asyncio.ensure_future(container.connect(url, timeout=None))
            await asyncio.sleep(50 * TIME_UNIT)
            elapsed = timed()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(container.connect(url, timeout=0.5), 5)
            assert 0.5 <= elapsed() < 1
            assert not patient.done()
            patient.cancel()
            with pytest.raises(asyncio.CancelledError):
                await patient
    finally:
        await container.shutdown(as_coro=True)


async def test_container_connect_without_timeout_gives_up_on_a_silent_peer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a timeout (the default, one attempt), a peer that accepts but
    never answers the lookup is given up after the lookup timeout (60 s;
    shortened here), and the connection is closed."""
    monkeypatch.setattr("aiomas._pool.LOOKUP_TIMEOUT", 0.5)
    container = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)
    try:
        async with tarpit() as pit:
            host, port = pit.addr
            elapsed = timed()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(container.connect(f"tcp://{host}:{port}/0"), 5)
            assert 0.5 <= elapsed() < 1
            await pit.all_closed()
    finally:
        await container.shutdown(as_coro=True)


@pytest.mark.parametrize("layer", ["channel", "rpc", "container"])
async def test_dead_peer_timeout_bounds_a_tls_handshake_without_timeout(
    layer: str, tls: TLSFiles
) -> None:
    """With dead peer detection on, a TLS handshake that the peer never
    answers is given up after dead_peer_timeout, even with timeout=0."""
    async with tarpit() as pit:
        host, port = pit.addr
        elapsed = timed()
        if layer == "container":
            certs = aiomas.SSLCerts(tls.cafile, tls.certfile, tls.keyfile)
            container = await aiomas.Container.create(
                ("127.0.0.1", 0), ssl=certs, dead_peer_timeout=1, as_coro=True
            )
            try:
                elapsed = timed()
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(
                        container.connect(f"tcp://{host}:{port}/0"), 5
                    )
            finally:
                await container.shutdown(as_coro=True)
        else:
            module = aiomas.channel if layer == "channel" else aiomas.rpc
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(
                    module.open_connection(
                        pit.addr, ssl=tls.client_context, dead_peer_timeout=1
                    ),
                    5,
                )
        assert 1 <= elapsed() < BOUND
        await pit.all_closed()
