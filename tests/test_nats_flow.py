"""Tests for aiomas.nats against a real nats-server: flow control between the
two ends of a session (a peer that stops reading), a close while the peer's
link reconnects, INFO answers larger than the server takes, and containers
that claim one name at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest

import aiomas
import aiomas.nats
from aiomas.nats import HELD_LIMIT, UNACKED_HIGH, NatsConfig, NatsTransport

from .conftest import nats_missing
from .nats_server import NatsServer, cluster, running
from .test_agent import Callee, Echo
from .test_nats import links

pytestmark = pytest.mark.skipif(nats_missing() is not None, reason=str(nats_missing()))

WAIT = 10.0
BEAT = 0.25
CHUNK = 2**20


class Reader(asyncio.Protocol):
    """Keeps what arrives; pauses reading as soon as it is connected if
    *paused*."""

    def __init__(self, paused: bool) -> None:
        self.paused = paused
        self.data = bytearray()
        self.transport: NatsTransport | None = None
        self.lost: asyncio.Future[Exception | None] = (
            asyncio.get_running_loop().create_future()
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(NatsTransport, transport)
        if self.paused:
            self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class Writer(Reader):
    """Also waits in :meth:`drain` while the transport pauses writing."""

    def __init__(self) -> None:
        super().__init__(paused=False)
        self.writable = asyncio.Event()
        self.writable.set()
        self.pauses = 0

    def pause_writing(self) -> None:
        self.pauses += 1
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    async def drain(self) -> None:
        await self.writable.wait()


@contextlib.asynccontextmanager
async def session(
    server_link: aiomas.nats.NatsLink,
    client_link: aiomas.nats.NatsLink,
    reader: Reader,
) -> AsyncIterator[tuple[Writer, Reader]]:
    """A connection from *client_link* (a :class:`Writer`) to a container on
    *server_link* whose protocol is *reader*."""
    name = server_link.config.name
    server = await server_link.endpoint(name).create_server(lambda: reader)
    try:
        writer = Writer()
        await client_link.endpoint(name).create_connection(lambda: writer)
        async with asyncio.timeout(WAIT):
            while reader.transport is None:
                await asyncio.sleep(0.01)
        try:
            yield writer, reader
        finally:
            assert writer.transport is not None
            writer.transport.close()
            reader.transport.close()
    finally:
        server.close()
        await server.wait_closed()


def pattern(start: int, size: int) -> bytes:
    """*size* bytes of the stream from *start* on (each position tells its
    offset, so that reordering or a lost piece shows)."""
    first, count = divmod(start, 4)
    words = b"".join(
        (i % 2**32).to_bytes(4, "big") for i in range(first, first + size // 4 + 2)
    )
    return words[count : count + size]


# --- 1. backpressure ----------------------------------------------------------------


async def test_a_peer_that_stops_reading_makes_the_writer_wait(
    nats_server: NatsServer, nats_prefix: str
) -> None:
    """The receiver acknowledges only what its protocol got: while it does not
    read, the sender's unacknowledged data passes its limit and drain()
    blocks; the receiver holds a bounded amount.  Heartbeats go on (a paused
    reader is alive).  When reading resumes everything arrives, in order."""
    async with (
        links(
            nats_server.url,
            "s",
            "c",
            prefix=nats_prefix,
            heartbeat_interval=BEAT,
            heartbeat_timeout=6 * BEAT,
        ) as (s, c),
        session(s, c, Reader(paused=True)) as (writer, reader),
    ):
        sending = writer.transport
        receiving = reader.transport
        assert sending is not None
        assert receiving is not None
        written = 0
        for _ in range(3 * UNACKED_HIGH // CHUNK):
            sending.write(pattern(written, CHUNK))
            written += CHUNK
            try:
                # (The link's own send queue may make it wait a moment.)
                await asyncio.wait_for(writer.drain(), 1)
            except TimeoutError:
                break
        # drain() blocks: it was paused right above the high-water mark.
        assert written <= UNACKED_HIGH + CHUNK
        waiting = asyncio.ensure_future(writer.drain())
        # Twice the heartbeat bound later: still paused, still connected,
        # nothing delivered or acknowledged, the receiver's buffer bounded.
        await asyncio.sleep(14 * BEAT)
        assert not waiting.done()
        assert not reader.lost.done()
        assert not writer.lost.done()
        assert reader.data == b""
        sent, acked, _ = sending.stream_offsets
        assert (sent, acked) == (written, 0)
        assert 0 < receiving.get_read_buffer_size() <= written
        # Reading resumes: everything arrives, the writer goes on.
        receiving.resume_reading()
        await asyncio.wait_for(waiting, WAIT)
        async with asyncio.timeout(WAIT):
            while len(reader.data) < written:
                await asyncio.sleep(0.01)
        assert reader.data == pattern(0, written)
        assert receiving.get_read_buffer_size() == 0
        sending.write(b"more")
        async with asyncio.timeout(WAIT):
            while len(reader.data) < written + 4:
                await asyncio.sleep(0.01)
        assert reader.data.endswith(b"more")


async def test_a_paused_reader_holds_no_more_than_its_limit(
    nats_server: NatsServer, nats_prefix: str
) -> None:
    """A writer that does not wait in drain(): the paused receiver keeps at
    most HELD_LIMIT and drops the rest, which it asks for again when reading
    resumes; nothing is lost, nothing arrives twice."""
    async with (
        links(nats_server.url, "s", "c", prefix=nats_prefix) as (s, c),
        session(s, c, Reader(paused=True)) as (writer, reader),
    ):
        sending = writer.transport
        receiving = reader.transport
        assert sending is not None
        assert receiving is not None
        total = HELD_LIMIT + 6 * CHUNK
        for start in range(0, total, CHUNK):
            sending.write(pattern(start, CHUNK))
        assert writer.pauses == 1  # (Told, but it did not wait.)
        async with asyncio.timeout(WAIT):
            # Until the whole stream went by the receiver.
            while (
                receiving.get_read_buffer_size() < HELD_LIMIT - CHUNK or c.client.queued
            ):
                await asyncio.sleep(0.01)
            await s.client.flush()
        assert receiving.get_read_buffer_size() <= HELD_LIMIT
        assert sending.stream_offsets[1] == 0
        receiving.resume_reading()
        async with asyncio.timeout(WAIT):
            while len(reader.data) < total:
                await asyncio.sleep(0.01)
            await writer.drain()
        await asyncio.sleep(0.1)  # (Nothing comes twice, late.)
        assert reader.data == pattern(0, total)


# --- 2. a close while the peer reconnects ------------------------------------------


async def connect_when_routed(
    link: aiomas.nats.NatsLink, name: str, protocol: Writer
) -> None:
    """Connect to *name* once the cluster's routes carry its subscriptions."""
    async with asyncio.timeout(WAIT):
        while True:
            try:
                await link.endpoint(name).create_connection(lambda: protocol)
            except ConnectionRefusedError:
                await asyncio.sleep(0.05)
            else:
                return


async def test_a_close_reaches_a_peer_that_reconnects(tmp_path: Path) -> None:
    """The closer's link is up, the peer's server is down: what was written
    before the close, and the end, are lost on the way.  When the peer is
    back (within the bound) it gets them, and ends the connection at once
    (not at the heartbeat bound); the closer's link close waits for that."""
    closer_server, peer_server = cluster(tmp_path, 2, advertise=False)
    beat, timeout = 0.5, 4.0
    with running(closer_server, peer_server):
        async with (
            links(
                closer_server.url,
                "closer",
                heartbeat_interval=beat,
                heartbeat_timeout=timeout,
            ) as (closer,),
            links(
                peer_server.url,
                "peer",
                heartbeat_interval=beat,
                heartbeat_timeout=timeout,
                reconnect_time_wait=0.1,
            ) as (peer,),
        ):
            reader = Reader(paused=False)
            server = await peer.endpoint("peer").create_server(lambda: reader)
            try:
                writer = Writer()
                await connect_when_routed(closer, "peer", writer)
                assert writer.transport is not None
                writer.transport.write(b"before|")
                async with asyncio.timeout(WAIT):
                    while reader.data != b"before|":
                        await asyncio.sleep(0.01)
                peer_server.kill()
                async with asyncio.timeout(WAIT):
                    while peer.client.is_connected:
                        await asyncio.sleep(0.01)
                writer.transport.write(b"last words")
                closing = asyncio.ensure_future(closer.close())
                await asyncio.sleep(0.3)  # (Published, and lost.)
                assert not closing.done()
                assert await writer.lost is None
                peer_server.start()
                start = time.monotonic()
                assert await asyncio.wait_for(reader.lost, WAIT) is None
                assert time.monotonic() - start < (beat + timeout) / 2
                assert reader.data == b"before|last words"
                await asyncio.wait_for(closing, WAIT)
            finally:
                server.close()
                await server.wait_closed()


async def test_a_reply_and_a_shutdown_reach_a_caller_that_reconnects(
    tmp_path: Path,
) -> None:
    """Containers: the callee answers while the caller's server is down and
    shuts down right after.  When the caller is back it gets the answer, and
    its other call fails at once with ConnectionResetError (not at the
    heartbeat bound)."""
    callee_server, caller_server = cluster(tmp_path, 2, advertise=False)
    bound = 10.0  # (Room for a loaded machine: the check is "well before it".)
    query = f"heartbeat={bound / 3}"
    with running(callee_server, caller_server):
        callee = await aiomas.Container.create(
            f"{callee_server.url}/callee?{query}", as_coro=True
        )
        caller = await aiomas.Container.create(
            NatsConfig.from_url(
                f"{caller_server.url}/caller?{query}", reconnect_time_wait=0.1
            ),
            as_coro=True,
        )
        try:
            agent = Callee(callee)
            proxy = await caller.connect(agent.addr, timeout=WAIT)
            assert await proxy.spam(1) == "spam"
            answered = asyncio.ensure_future(proxy.slow_echo("late", 0.3))
            hanging = asyncio.ensure_future(proxy.slow_echo("never", 60))
            await asyncio.sleep(0.05)
            caller_server.kill()
            await asyncio.sleep(0.5)  # The answer is written, and lost.
            shutdown = asyncio.ensure_future(callee.shutdown(as_coro=True))
            await asyncio.sleep(0.1)
            assert not answered.done()
            caller_server.start()
            start = time.monotonic()
            assert await asyncio.wait_for(answered, WAIT) == "late"
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(hanging, WAIT)
            assert time.monotonic() - start < bound / 2
            await asyncio.wait_for(shutdown, WAIT)
        finally:
            await caller.shutdown(as_coro=True)
            await callee.shutdown(as_coro=True)


class Refuser(Reader):
    """Closes the connection as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.close()


async def test_a_connection_closed_at_once_ends_at_once_on_both_sides(
    nats_server: NatsServer, nats_prefix: str
) -> None:
    """The server's protocol closes in connection_made(): the end may reach
    the client before the answer to its connect request; the client ends
    at once and confirms it, so the server's side is done at once too."""
    async with links(nats_server.url, "s", "c", prefix=nats_prefix) as (s, c):
        refuser = Refuser(paused=False)
        server = await s.endpoint("s").create_server(lambda: refuser)
        try:
            writer = Writer()
            start = time.monotonic()
            await c.endpoint("s").create_connection(lambda: writer)
            assert await asyncio.wait_for(writer.lost, WAIT) is None
            assert refuser.transport is not None
            await asyncio.wait_for(refuser.transport.wait_finished(), WAIT)
            bound = s.config.heartbeat_interval + s.config.heartbeat_timeout
            assert time.monotonic() - start < bound / 2
        finally:
            server.close()
            await server.wait_closed()


async def test_closing_a_link_waits_no_longer_than_the_bound(
    nats_server: NatsServer, nats_prefix: str
) -> None:
    """A peer that vanished never confirms the end: the link's close gives up
    after heartbeat_interval + heartbeat_timeout."""
    async with links(
        nats_server.url,
        "s",
        "c",
        prefix=nats_prefix,
        heartbeat_interval=BEAT,
        heartbeat_timeout=BEAT,
    ) as (s, c):
        reader = Reader(paused=False)
        server = await s.endpoint("s").create_server(lambda: reader)
        try:
            writer = Writer()
            await c.endpoint("s").create_connection(lambda: writer)
            async with asyncio.timeout(WAIT):
                while reader.transport is None:
                    await asyncio.sleep(0.01)
            await s.abort()
            assert writer.transport is not None
            writer.transport.write(b"nobody hears this")
            start = time.monotonic()
            await asyncio.wait_for(c.close(), WAIT)
            assert time.monotonic() - start < 2 * BEAT + 1
            assert writer.transport.stream_offsets[0] == 17
            assert not writer.transport.ending
        finally:
            server.close()
            await server.wait_closed()


# --- 3. INFO answers larger than the server takes -----------------------------------


async def test_an_info_answer_too_large_for_the_server_is_truncated(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A container with more agents than fit into one message of the server's
    max_payload lists as many as fit and says so (logged once); info(),
    discover() and lookup() answer at once; lookup() asks for the agents of
    one name only, so it finds them all."""

    small = NatsServer(tmp_path, "small", max_payload=8192)
    with running(small):
        big = await aiomas.Container.create(f"{small.url}/big", as_coro=True)
        other = await aiomas.Container.create(f"{small.url}/other", as_coro=True)
        try:
            agents = [Callee(big) for _ in range(2000)]
            last = Echo(big)
            Echo(other)
            link = aiomas.agent.nats_link(other)
            assert link is not None
            start = time.monotonic()
            info = await link.info("big")
            assert time.monotonic() - start < 1
            assert info["truncated"]
            assert info["service"]["agents_truncated"] is True
            assert info["agent_count"] == 2001
            listed = info["agents"]
            assert 100 < len(listed) < 2001
            assert all(
                listed[a.addr.rpartition("/")[2]] == "Callee" for a in agents[:100]
            )
            assert "fitted" not in caplog.text
            assert caplog.text.count(f"lists {len(listed)} of its 2001 agents") == 1
            found = await link.discover()
            assert [(i["name"], i["truncated"]) for i in found] == [
                ("big", True),
                ("other", False),
            ]
            assert caplog.text.count("of its 2001 agents") == 1  # (Once.)
            assert await link.lookup("Echo") == [last.addr, "nats://other/0"]
            assert await link.lookup(last.addr.rpartition("/")[2]) == [last.addr]
            assert len(await link.lookup("Callee")) < 2000  # Cut off, and:
            assert "the agents called 'Callee' on big may be more" in caplog.text
            proxy = await other.connect(last.addr)
            assert await proxy.echo("here") == "here"
        finally:
            await other.shutdown(as_coro=True)
            await big.shutdown(as_coro=True)


# --- 4. containers that claim one name at the same time -----------------------------


async def test_of_containers_started_at_once_with_one_name_one_gets_it(
    nats_server: NatsServer, nats_prefix: str
) -> None:
    """Each one checks that the name is free before it subscribes to it; both
    checks can come first.  The claim that follows lets exactly one of them
    have it, every time."""
    for trial in range(5):
        url = f"{nats_server.url}/twin?prefix={nats_prefix}-{trial}"
        # (More than the default claim_wait: room for a loaded machine.)
        config = NatsConfig.from_url(url, claim_wait=0.5)
        results = await asyncio.gather(
            *(aiomas.Container.create(config, as_coro=True) for _ in range(3)),
            return_exceptions=True,
        )
        winners = [r for r in results if isinstance(r, aiomas.Container)]
        losers = [r for r in results if isinstance(r, OSError)]
        try:
            assert (len(winners), len(losers)) == (1, 2), results
            assert all(loser.errno == errno.EADDRINUSE for loser in losers)
            (winner,) = winners
            Echo(winner)
            async with (
                links(nats_server.url, "asker", prefix=f"{nats_prefix}-{trial}") as (
                    asker,
                ),
            ):
                assert [i["name"] for i in await asker.discover()] == ["twin"]
        finally:
            for container in winners:
                await container.shutdown(as_coro=True)


async def test_a_claim_loses_to_a_container_that_has_the_name(
    nats_server: NatsServer, nats_prefix: str
) -> None:
    """A container that serves the name answers claims that it does (even if
    the newcomer's token were lower)."""
    async with links(nats_server.url, "a", "b", prefix=nats_prefix) as (a, b):
        server = await a.endpoint("dup").create_server(asyncio.Protocol)
        try:
            subject = b.subject("dup", "claim")
            request = json.dumps({"token": ""}).encode()
            (answer,) = await b.client.gather(subject, request, 0.25)
            assert json.loads(answer)["serving"] is True
            with pytest.raises(OSError, match="already") as info:
                await b.endpoint("dup").create_server(asyncio.Protocol)
            assert info.value.errno == errno.EADDRINUSE
        finally:
            server.close()
            await server.wait_closed()
