"""Tests for aiomas._pool: the connections of a container to other containers.

The pool under test serves a small stand-in for a container.  Its peers are
real containers, or a scripted peer (speaking the wire protocol through
:class:`aiomas.protocol.Connection`) that answers, ignores, breaks or hangs up
on each agent lookup as a test asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

import aiomas
from aiomas import local_queue, protocol, rpc
from aiomas._addresses import parse_url
from aiomas._pool import ConnectionPool
from aiomas.agent import AgentProxy
from aiomas.exceptions import ProtocolResetError
from aiomas.nats import NatsLink
from aiomas.testing import TIME_UNIT

from .helpers import black_hole

WAIT = 10.0

Pool = ConnectionPool[AgentProxy]


class Us:
    """What the pool serves to the containers it connects to."""

    router = rpc.Service()

    def __repr__(self) -> str:
        return "Us()"


class Callee(aiomas.Agent):
    @aiomas.expose
    def spam(self, times: int) -> str:
        return "spam" * times


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    pool = ConnectionPool(Us(), {}, AgentProxy)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def peer() -> AsyncIterator[aiomas.Container]:
    container = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)
    try:
        yield container
    finally:
        await container.shutdown(as_coro=True)


# What the scripted peer does with a request: answer it with this class name,
# or one of these.
IGNORE = "ignore"  # never answer
HANG_UP = "hang up"  # close the connection
RESET = "reset"  # reset the connection (SO_LINGER 0)
GARBAGE = "garbage"  # send bytes that break the protocol
REFUSE = "refuse"  # stop listening, then hang up


@dataclass
class ScriptedPeer:
    """A container stand-in that does the next step of *script* with each
    request it gets (on any connection)."""

    script: list[str]
    addr: tuple[str, int] = ("", 0)
    server: asyncio.Server | None = None
    connections: int = 0
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    after_answer: Callable[[], object] | None = None
    """Called right after each answer is sent (before it can arrive)."""

    def base_url(self) -> str:
        return f"tcp://{self.addr[0]}:{self.addr[1]}/"

    def url(self, aid: int) -> str:
        return f"{self.base_url()}{aid}"

    def protocol(self) -> asyncio.Protocol:
        return _ScriptedProtocol(self)


class _ScriptedProtocol(asyncio.Protocol):
    def __init__(self, peer: ScriptedPeer) -> None:
        self.peer = peer
        self.core = protocol.Connection(aiomas.JSON())
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer.connections += 1

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        for event in self.core.receive_data(data):
            assert isinstance(event, protocol.RequestReceived)
            step = self.peer.script.pop(0)
            if step == IGNORE:
                continue
            if step == GARBAGE:
                self.transport.write(b"\xff\xff\xff\xffgarbage")
            elif step == RESET:
                sock = self.transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01" + bytes(7))
                self.transport.abort()
            elif step in (HANG_UP, REFUSE):
                if step == REFUSE:
                    assert self.peer.server is not None
                    self.peer.server.close()
                self.transport.close()
            else:
                self.core.send_result(event.message_id, step)
                self.transport.writelines(self.core.data_to_send())
                if self.peer.after_answer is not None:
                    self.peer.after_answer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.peer.lost.set()


@contextlib.asynccontextmanager
async def scripted_peer(*script: str) -> AsyncIterator[ScriptedPeer]:
    peer = ScriptedPeer(list(script))
    loop = asyncio.get_running_loop()
    peer.server = await loop.create_server(peer.protocol, "127.0.0.1", 0)
    peer.addr = peer.server.sockets[0].getsockname()[:2]
    try:
        yield peer
    finally:
        peer.server.close()


@contextlib.asynccontextmanager
async def pool_and_scripted_peer(
    *script: str,
) -> AsyncIterator[tuple[Pool, ScriptedPeer]]:
    async with scripted_peer(*script) as peer:
        pool = ConnectionPool(Us(), {}, AgentProxy)
        try:
            yield pool, peer
        finally:
            await pool.close()


# --- connecting and the proxy cache --------------------------------------------------


async def test_one_connection_per_container_and_cached_proxies(
    pool: Pool, peer: aiomas.Container
) -> None:
    a, b = Callee(peer), Callee(peer)
    proxy_a = await pool.connect(a.addr, 0)
    assert await pool.connect(a.addr, 0) is proxy_a
    proxy_b = await pool.connect(b.addr, 0)  # looked up on the open connection
    assert (repr(proxy_a), proxy_b.addr) == (f"CalleeProxy({a.addr!r})", b.addr)
    assert list(pool.clients) == [peer.base_url]
    cached = pool.cached_proxies(peer.base_url)
    assert sorted(cached, key=lambda proxy: proxy.addr) == [proxy_a, proxy_b]
    assert pool.cached_proxies("tcp://elsewhere:1/") == []
    assert await proxy_b.spam(2) == "spamspam"
    # The cache holds proxies weakly.
    del proxy_a, proxy_b, cached
    gc.collect()
    assert pool.cached_proxies(peer.base_url) == []
    assert list(pool.clients) == [peer.base_url]


async def test_an_unknown_agent_raises_lookup_error(
    pool: Pool, peer: aiomas.Container
) -> None:
    with pytest.raises(LookupError, match="There is no agent '7' at"):
        await pool.connect(f"{peer.base_url}7", 0)


async def test_a_bad_url_raises_value_error(pool: Pool) -> None:
    with pytest.raises(ValueError, match="Invalid agent address"):
        await pool.connect("tcp://nowhere/0", 0)


async def test_concurrent_connects_share_one_attempt(
    pool: Pool, peer: aiomas.Container
) -> None:
    callees = [Callee(peer) for _ in range(3)]
    calls = [asyncio.ensure_future(pool.connect(c.addr, 0)) for c in callees * 2]
    await asyncio.sleep(0)
    assert list(pool.attempts) == [peer.base_url]
    proxies = await asyncio.gather(*calls)
    assert proxies[:3] == proxies[3:]
    assert len(pool.clients) == 1
    assert len(peer_clients(peer)) == 1
    assert pool.attempts == {}


def peer_clients(peer: aiomas.Container) -> frozenset[rpc.RpcClient]:
    return aiomas.agent.state_of(peer).registry.clients


async def test_an_attempt_given_up_by_every_caller_is_stopped(pool: Pool) -> None:
    with black_hole() as (host, port):
        url = f"tcp://{host}:{port}/0"
        calls = [asyncio.ensure_future(pool.connect(url, None)) for _ in range(2)]
        await asyncio.sleep(50 * TIME_UNIT)
        (attempt,) = pool.attempts.values()
        calls[0].cancel()
        await asyncio.sleep(0)
        assert not attempt.done()  # somebody still waits for it
        calls[1].cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        await asyncio.sleep(0)
        assert attempt.cancelled()
        assert pool.attempts == {}


async def test_connecting_may_time_out(pool: Pool) -> None:
    with black_hole() as (host, port), pytest.raises(TimeoutError):
        await asyncio.wait_for(pool.connect(f"tcp://{host}:{port}/0", 0.2), WAIT)
    assert pool.clients == {}


async def test_a_late_second_connection_is_closed(
    pool: Pool, peer: aiomas.Container
) -> None:
    endpoint, _ = parse_url(Callee(peer).addr)
    first = await pool.open(endpoint, 0)
    assert await pool.open(endpoint, 0) is first
    for _ in range(100):
        if len(peer_clients(peer)) == 1:
            break
        await asyncio.sleep(10 * TIME_UNIT)
    assert len(peer_clients(peer)) == 1


async def test_tls_settings_are_for_tcp_only(tmp_path: Path) -> None:
    """A unix socket peer is connected to without the pool's ssl argument
    (which would fail there)."""
    pool = ConnectionPool(Us(), {"ssl": object()}, AgentProxy)
    peer = await aiomas.Container.create(str(tmp_path / "s"), as_coro=True)
    try:
        proxy = await pool.connect(Callee(peer).addr, 0)
        assert await proxy.spam(1) == "spam"
    finally:
        await pool.close()
        await peer.shutdown(as_coro=True)


# --- lost connections ----------------------------------------------------------------


async def test_a_lost_connection_is_forgotten(
    pool: Pool, peer: aiomas.Container, caplog: pytest.LogCaptureFixture
) -> None:
    callee = Callee(peer)
    proxy = await pool.connect(callee.addr, 0)
    (client,) = pool.clients.values()
    caplog.set_level(logging.INFO, "aiomas.agent")
    for peer_client in peer_clients(peer):
        await peer_client.close()
    await asyncio.wait_for(client.channel.wait_closed(), WAIT)
    await asyncio.sleep(0)  # the service task ends after the channel
    assert pool.clients == {}
    assert "Us() lost its connection to the container" in caplog.text
    again = await pool.connect(callee.addr, 0)
    assert again is not proxy
    assert await again.spam(1) == "spam"


async def test_a_closing_connection_is_not_used(
    pool: Pool, peer: aiomas.Container
) -> None:
    callee = Callee(peer)
    proxy = await pool.connect(callee.addr, 0)
    (client,) = pool.clients.values()
    client.channel.transport.close()
    again = await pool.connect(callee.addr, 0)  # without waiting for the close
    assert again is not proxy
    assert pool.clients[peer.base_url] is not client


async def test_a_connection_the_peer_closed_is_replaced_once() -> None:
    """A lookup on an open connection that the peer has just closed (no
    cause: not a timeout or protocol error) is forgotten, and one new attempt
    tells the caller what it meets now."""
    async with pool_and_scripted_peer("Callee", HANG_UP, "Callee") as (pool, peer):
        await pool.connect(peer.url(0), 0)
        (first,) = pool.clients.values()
        proxy = await pool.connect(peer.url(1), 0)
        assert peer.connections == 2
        (second,) = pool.clients.values()
        assert second is not first
        assert pool.cached_proxies(peer.base_url()) == [proxy]


async def test_a_connection_the_peer_reset_is_replaced_once() -> None:
    """A reset (the call fails with ConnectionLostError, whose cause is the
    socket's ConnectionResetError) counts as the peer going away too."""
    async with pool_and_scripted_peer("Callee", RESET, "Callee") as (pool, peer):
        await pool.connect(peer.url(0), 0)
        (first,) = pool.clients.values()
        await pool.connect(peer.url(1), 0)
        assert peer.connections == 2
        (second,) = pool.clients.values()
        assert second is not first


async def test_the_new_attempt_reports_a_refused_connection() -> None:
    async with pool_and_scripted_peer("Callee", REFUSE) as (pool, peer):
        await pool.connect(peer.url(0), 0)
        with pytest.raises(ConnectionRefusedError):
            await pool.connect(peer.url(1), 0)
        assert pool.clients == {}


async def test_a_connection_broken_by_a_protocol_error_is_not_retried() -> None:
    async with pool_and_scripted_peer("Callee", GARBAGE) as (pool, peer):
        await pool.connect(peer.url(0), 0)
        with pytest.raises(ProtocolResetError) as info:
            await pool.connect(peer.url(1), 0)
        assert info.value.__cause__ is not None
        assert peer.connections == 1


async def test_a_silent_peer_on_a_new_connection_is_hung_up_on() -> None:
    async with pool_and_scripted_peer(IGNORE) as (pool, peer):
        with pytest.raises(TimeoutError, match="did not answer the lookup"):
            await pool.connect(peer.url(0), 0.2)
        await asyncio.wait_for(peer.lost.wait(), WAIT)
        assert pool.clients == {}


async def test_a_silent_peer_on_an_open_connection_keeps_it() -> None:
    async with pool_and_scripted_peer("Callee", IGNORE) as (pool, peer):
        await pool.connect(peer.url(0), 0)
        (client,) = pool.clients.values()
        with pytest.raises(TimeoutError, match="did not answer the lookup"):
            await pool.connect(peer.url(1), 0.2)
        assert pool.clients == {peer.base_url(): client}
        assert not client.channel.transport.is_closing()


# --- closing -------------------------------------------------------------------------


async def test_close_ends_attempts_and_connections(
    pool: Pool, peer: aiomas.Container
) -> None:
    proxy = await pool.connect(Callee(peer).addr, 0)
    (client,) = pool.clients.values()
    with black_hole() as (host, port):
        connecting = asyncio.ensure_future(pool.connect(f"tcp://{host}:{port}/0", None))
        await asyncio.sleep(50 * TIME_UNIT)
        (attempt,) = pool.attempts.values()
        await asyncio.wait_for(pool.close(), WAIT)
        assert attempt.cancelled()
        # The caller was not cancelled: it learns that the pool is closed.
        with pytest.raises(RuntimeError, match=r"Us\(\) has been shut down"):
            await connecting
    assert client.channel.protocol.is_closed()
    assert pool.clients == {}
    assert pool.cached_proxies(peer.base_url) == []
    with pytest.raises(ConnectionResetError):
        await proxy.spam(1)
    with pytest.raises(RuntimeError, match="has been shut down"):
        await pool.connect(proxy.addr, 0)


async def test_a_connection_opened_after_close_is_closed(
    pool: Pool, peer: aiomas.Container
) -> None:
    endpoint, _ = parse_url(Callee(peer).addr)
    opening = asyncio.ensure_future(pool.open(endpoint, 0))
    await pool.close()
    with pytest.raises(RuntimeError, match="has been shut down"):
        await opening
    assert pool.clients == {}
    for _ in range(100):
        if not peer_clients(peer):
            break
        await asyncio.sleep(10 * TIME_UNIT)
    assert not peer_clients(peer)


async def test_a_proxy_looked_up_as_the_connection_was_dropped_is_not_cached() -> None:
    """The answer to the lookup may arrive after the pool dropped the
    connection (here it closed, on a LocalQueue, which delivers the answer
    before the close runs): the caller gets its proxy, but it is not cached."""
    pool = ConnectionPool(Us(), {}, AgentProxy)
    peer = ScriptedPeer(["Callee"], after_answer=pool.close)
    server = await local_queue.create_server(
        peer.protocol, aiomas.get_queue("late-answer")
    )
    try:
        proxy = await asyncio.wait_for(pool.connect("local://late-answer/0", 0), WAIT)
        assert proxy.addr == "local://late-answer/0"
        assert pool.clients == {}
        assert pool.cached_proxies("local://late-answer/") == []
    finally:
        await pool.close()
        server.close()


async def test_each_connection_opened_is_announced(peer: aiomas.Container) -> None:
    pool = ConnectionPool(Us(), {}, AgentProxy)
    opened: list[Any] = []
    pool.on_open = opened.append
    try:
        await pool.connect(Callee(peer).addr, 0)
        await pool.connect(Callee(peer).addr, 0)  # (the same connection)
        (client,) = pool.clients.values()
        assert opened == [client.channel]
    finally:
        await pool.close()


async def test_a_local_queue_source_is_not_given_to_a_socket(
    peer: aiomas.Container,
) -> None:
    """A container on a LocalQueue connects from its queue (local_addr) to
    other LocalQueue containers only: a TCP connection gets no local_addr."""
    pool = ConnectionPool(Us(), {"local_addr": aiomas.get_queue("source")}, AgentProxy)
    try:
        proxy = await pool.connect(Callee(peer).addr, 0)
        assert await proxy.spam(1) == "spam"
    finally:
        await pool.close()


async def test_nats_addresses_need_a_nats_link(
    pool: Pool, peer: aiomas.Container
) -> None:
    with pytest.raises(ConnectionRefusedError, match=r"Us\(\) is on no NATS system"):
        await pool.connect("nats://spam/0", 0)
    tcp_addr = parse_url(Callee(peer).addr)[0].addr

    class Link:
        """Stands for a NatsLink: the name leads to the peer over TCP."""

        def endpoint(self, name: str) -> Any:
            assert name == "spam"
            return tcp_addr

    pool.nats_link = cast(NatsLink, Link())
    proxy = await pool.connect("nats://spam/0", 0)
    assert proxy.addr == "nats://spam/0"
    assert await proxy.spam(2) == "spamspam"
    assert list(pool.clients) == ["nats://spam/"]


async def test_the_proxy_factory_makes_every_proxy(peer: aiomas.Container) -> None:
    made: list[tuple[str, str, str]] = []

    def make(channel: Any, aid: str, addr: str, type_name: str) -> rpc.Proxy:
        made.append((aid, addr, type_name))
        return rpc.Proxy(channel, f"agents/{aid}")

    pool = ConnectionPool(Us(), {}, make)
    try:
        callee = Callee(peer)
        proxy = await pool.connect(callee.addr, 0)
        assert await proxy.spam(1) == "spam"
        assert made == [("0", callee.addr, "Callee")]
    finally:
        await pool.close()
