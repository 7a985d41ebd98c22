"""Hostile and broken input against every kind of server: a channel server, an
RPC server and an agent container.

Each case: the server stays up and keeps answering other clients, the offending
connection is closed with a logged reason that names the peer (or, where the
request id can be read, gets a failure reply), and memory stays bounded.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import gc
import json
import logging
import ssl
import struct
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import aiomas
from aiomas.agent import split_host_port
from aiomas.testing import TIME_UNIT
from aiomas.wire import DEFAULT_MAX_FRAME_SIZE

from .helpers import echo_forever, open_files_limit
from .test_channel_faults import BAD_STREAMS, raw_frame, read_frame

KINDS = ["channel", "rpc", "agent"]
WAIT = 5  # seconds: an upper bound for anything that should be prompt


class Echo(aiomas.Agent):
    @aiomas.expose
    def echo(self, value: Any) -> Any:
        return value


@aiomas.expose
def echo(value: Any) -> Any:
    return value


@dataclass
class Server:
    """A running server, the path of its echo function (for raw RPC requests),
    its frame size limit, and a check that it still answers promptly."""

    addr: tuple[str, int]
    echo_path: str | None
    max_frame_size: int
    still_serving: Callable[[], Awaitable[float]]


@contextlib.asynccontextmanager
async def serve(kind: str) -> AsyncIterator[Server]:
    """Run a server of *kind* on 127.0.0.1 (port 0)."""
    addr: tuple[str, int]
    if kind == "agent":
        container = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)
        Echo(container)
        _, port = split_host_port(container.base_url[len("tcp://") : -1])
        addr = ("127.0.0.1", port)
        client = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)

        async def still_serving() -> float:
            start = time.monotonic()
            proxy = await client.connect(f"{container.base_url}0")
            assert await asyncio.wait_for(proxy.echo("still there?"), 5) == (
                "still there?"
            )
            return time.monotonic() - start

        try:
            yield Server(addr, "agents/0/echo", DEFAULT_MAX_FRAME_SIZE, still_serving)
        finally:
            await client.shutdown(as_coro=True)
            await container.shutdown(as_coro=True)
        return
    limit = 2**20
    server: asyncio.AbstractServer
    if kind == "rpc":
        service = aiomas.rpc.ServiceDict({"echo": echo})
        server = await aiomas.rpc.start_server(
            ("127.0.0.1", 0), service, max_frame_size=limit
        )
    else:
        server = await aiomas.channel.start_server(
            ("127.0.0.1", 0), echo_forever, max_frame_size=limit
        )
    addr = server.sockets[0].getsockname()[:2]  # type: ignore[attr-defined]

    async def still_serving() -> float:
        start = time.monotonic()
        if kind == "rpc":
            rpc_client = await aiomas.rpc.open_connection(addr)
            result = await asyncio.wait_for(rpc_client.remote.echo("hi"), 5)
            await rpc_client.close()
        else:
            channel = await aiomas.channel.open_connection(addr)
            result = await asyncio.wait_for(channel.send("hi"), 5)
            await channel.close()
        assert result == "hi"
        return time.monotonic() - start

    try:
        yield Server(addr, "echo" if kind == "rpc" else None, limit, still_serving)
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)


def warnings_about(caplog: pytest.LogCaptureFixture, port: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("aiomas")
        and r.levelno >= logging.WARNING
        and str(port) in r.getMessage()
    ]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", [*BAD_STREAMS, "oversized frame"])
async def test_bad_streams_close_only_that_connection(
    kind: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with serve(kind) as server:
        stream = (
            struct.pack(">L", server.max_frame_size + 1)
            if name in ("oversized frame", "length above max_frame_size")
            else BAD_STREAMS[name]
        )
        reader, writer = await asyncio.open_connection(*server.addr)
        port = writer.get_extra_info("sockname")[1]
        writer.write(stream)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await writer.wait_closed()
        await server.still_serving()
    messages = warnings_about(caplog, port)
    assert len(messages) == 1, caplog.text
    assert messages[0].startswith(f"Closing connection to ('127.0.0.1', {port})")


BAD_CALLS = {
    "10 kB path": ["x" * 10_000, [], {}],
    "path is not a string": [42, [], {}],
    "args are not a list": ["{echo}", "spam", {}],
    "kwargs are not a map": ["{echo}", [], []],
    "unknown function": ["{echo}_nope", [], {}],
    "private name": ["_private", [], {}],
    "dunder path": ["__class__/__init__", [], {}],
    "empty path": ["", [], {}],
    "wrong arguments": ["{echo}", [1, 2, 3], {"spam": 1}],
    "not a call at all": "hello",
    "unknown custom type id": ["{echo}", [{"__type__": [99, None]}], {}],
}


@pytest.mark.parametrize("kind", ["rpc", "agent"])
@pytest.mark.parametrize("name", BAD_CALLS)
async def test_bad_rpc_calls_get_failure_replies(kind: str, name: str) -> None:
    async with serve(kind) as server:
        assert server.echo_path is not None
        call = json.loads(
            json.dumps(BAD_CALLS[name]).replace("{echo}", server.echo_path)
        )
        reader, writer = await asyncio.open_connection(*server.addr)
        writer.write(raw_frame(json.dumps([0, 1, call]).encode()))
        msg_type, msg_id, text = await asyncio.wait_for(read_frame(reader), 5)
        assert (msg_type, msg_id) == (2, 1)
        assert "Error" in text
        assert len(text) < 20_000  # a 10 kB path is not echoed back endlessly
        # The connection survives and still works.
        good = [server.echo_path, ["fine"], {}]
        writer.write(raw_frame(json.dumps([0, 2, good]).encode()))
        assert await asyncio.wait_for(read_frame(reader), 5) == [1, 2, "fine"]
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("kind", ["rpc", "agent"])
@pytest.mark.parametrize("msg_id", [-1, 2**70, 0], ids=["negative", "huge", "zero"])
async def test_odd_and_duplicate_request_ids_are_answered(
    kind: str, msg_id: int
) -> None:
    """The requester chooses the ids; the server answers each request with its
    id, even if a (broken) requester uses one id twice."""
    async with serve(kind) as server:
        reader, writer = await asyncio.open_connection(*server.addr)
        for value in ("first", "second"):
            call = [server.echo_path, [value], {}]
            writer.write(raw_frame(json.dumps([0, msg_id, call]).encode()))
        replies = [await asyncio.wait_for(read_frame(reader), 5) for _ in range(2)]
        assert replies == [[1, msg_id, "first"], [1, msg_id, "second"]]
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("kind", KINDS)
async def test_truncated_header_then_close(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with serve(kind) as server:
        _reader, writer = await asyncio.open_connection(*server.addr)
        port = writer.get_extra_info("sockname")[1]
        writer.write(b"\x00\x00")
        await writer.drain()
        await asyncio.sleep(50 * TIME_UNIT)
        writer.close()
        await writer.wait_closed()
        await server.still_serving()
        for _ in range(100):
            if warnings_about(caplog, port):
                break
            await asyncio.sleep(10 * TIME_UNIT)
    assert "in the middle of a frame" in warnings_about(caplog, port)[0]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_slow_sender_does_not_slow_down_others(kind: str) -> None:
    """One byte per tick: the connection waits, everybody else is served."""
    async with serve(kind) as server:
        reader, writer = await asyncio.open_connection(*server.addr)
        call: Any = (
            "slowly" if kind == "channel" else [server.echo_path, ["slowly"], {}]
        )
        data = raw_frame(json.dumps([0, 1, call]).encode())
        for i, byte in enumerate(data):
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(5 * TIME_UNIT)
            if i % 10 == 0:
                assert await server.still_serving() < 1.0
        assert await asyncio.wait_for(read_frame(reader), 5) == [1, 1, "slowly"]
        writer.close()
        await writer.wait_closed()


@pytest.mark.heavy
@pytest.mark.parametrize("kind", KINDS)
async def test_a_thousand_idle_connections(kind: str) -> None:
    """1,000 clients that connect and send nothing: the server still answers
    others promptly, and idle connections cost little memory."""
    # Debug mode keeps a traceback for every callback: not what users run.
    asyncio.get_running_loop().set_debug(False)
    # Both ends of 1,000 connections, and some to spare.
    with open_files_limit(2500):
        await _idle_connections(kind)


async def _idle_connections(kind: str) -> None:
    async with serve(kind) as server:
        await server.still_serving()  # Warm up (e.g. the agent connection).
        gc.collect()
        idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        tracemalloc.start()
        try:
            try:
                for _ in range(1000):
                    idle.append(await asyncio.open_connection(*server.addr))
                await asyncio.sleep(100 * TIME_UNIT)
                latency = await server.still_serving()
                used = tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
            assert latency < 1.0
            # Both ends of every connection live in this process; the server
            # side of an idle connection has no receive buffer yet.
            per_connection = used / 1000
            assert per_connection < 16_000, (
                f"{per_connection:.0f} bytes per idle connection"
            )
        finally:
            for _reader, writer in idle:
                writer.close()
            await asyncio.gather(
                *(w.wait_closed() for _r, w in idle), return_exceptions=True
            )
        await server.still_serving()


@dataclass
class BigReplyServer:
    """An RPC server whose ``fetch(i)`` returns ``[i, <100 kB>]``, and the
    clients that connected to it."""

    server: asyncio.AbstractServer
    addr: tuple[str, int]
    clients: list[aiomas.rpc.RpcClient]


@contextlib.asynccontextmanager
async def big_reply_server(
    *, waiting_for_the_peer: bool = False
) -> AsyncIterator[BigReplyServer]:
    """Serve ``fetch``; with *waiting_for_the_peer*, the server also sends each
    client a request that the client never answers (so it must go on reading
    from it)."""
    clients: list[aiomas.rpc.RpcClient] = []
    big = "x" * 100_000

    @aiomas.expose
    def fetch(i: int) -> list[Any]:
        return [i, big]

    def connected(client: aiomas.rpc.RpcClient) -> None:
        clients.append(client)
        if waiting_for_the_peer:
            client.channel.send(["never/answered", [], {}]).add_done_callback(
                lambda f: f.cancelled() or f.exception()
            )

    server = await aiomas.rpc.start_server(
        ("127.0.0.1", 0), aiomas.rpc.ServiceDict({"fetch": fetch}), connected
    )
    addr = server.sockets[0].getsockname()[:2]  # type: ignore[attr-defined]
    try:
        yield BigReplyServer(server, addr, clients)
    finally:
        server.close()
        await server.wait_closed()


def fetch_frame(i: int) -> bytes:
    return raw_frame(json.dumps([0, i, ["fetch", [i], {}]]).encode())


@pytest.mark.heavy
async def test_a_peer_that_does_not_read_its_replies_is_not_buffered_for() -> None:
    """RPC replies wait while the write buffer is full, and the server stops
    reading from that peer: memory stays bounded, and everything arrives once
    the peer reads."""
    async with big_reply_server() as served:
        reader, writer = await asyncio.open_connection(*served.addr)
        count = 500  # 50 MB of replies
        for i in range(count):
            writer.write(fetch_frame(i))
        await writer.drain()
        await asyncio.sleep(500 * TIME_UNIT)
        (client,) = served.clients
        transport = client.channel.transport
        assert transport.get_write_buffer_size() < 2**20  # type: ignore[attr-defined]
        # Others are still served meanwhile.
        other = await aiomas.rpc.open_connection(served.addr)
        assert (await asyncio.wait_for(other.remote.fetch(-1), 5))[0] == -1
        await other.close()
        replies = [await asyncio.wait_for(read_frame(reader), 10) for _ in range(count)]
        expected = [(1, i, i) for i in range(count)]
        assert [(r[0], r[1], r[2][0]) for r in replies] == expected
        writer.close()
        await writer.wait_closed()


async def test_two_peers_calling_each_other_with_big_payloads_never_deadlock() -> None:
    """Both write buffers full at once: each side still reads (it waits for
    replies itself), so all calls complete."""

    class Peer:
        router = aiomas.rpc.Service()

        @aiomas.expose
        def echo(self, value: Any) -> Any:
            return value

    clients: list[aiomas.rpc.RpcClient] = []
    server = await aiomas.rpc.start_server(("127.0.0.1", 0), Peer(), clients.append)
    addr = server.sockets[0].getsockname()[:2]  # type: ignore[attr-defined]
    client = await aiomas.rpc.open_connection(addr, rpc_service=Peer())
    (server_side,) = clients
    payload = "y" * 200_000
    calls = [client.remote.echo(payload) for _ in range(100)]
    calls += [server_side.remote.echo(payload) for _ in range(100)]
    results = await asyncio.wait_for(asyncio.gather(*calls), 30)
    assert results == [payload] * 200
    await client.close()
    server.close()
    await server.wait_closed()


@pytest.mark.heavy
async def test_a_flood_from_a_peer_we_wait_for_is_refused_beyond_a_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While we wait for a reply from a peer we keep reading from it; if it
    floods us with calls and reads nothing, calls beyond 1,024 are refused."""
    async with big_reply_server(waiting_for_the_peer=True) as served:
        reader, writer = await asyncio.open_connection(*served.addr)
        count = 3000
        for i in range(count):
            writer.write(fetch_frame(i))
            if i % 100 == 0:
                await writer.drain()
        await writer.drain()
        await asyncio.sleep(500 * TIME_UNIT)
        (client,) = served.clients
        assert client.channel.protocol.core.held_requests <= 1024
        transport = client.channel.transport
        assert transport.get_write_buffer_size() < 4 * 2**20  # type: ignore[attr-defined]
        # Now read: the server's own request first, then an answer for every call.
        assert (await asyncio.wait_for(read_frame(reader), 10))[0] == 0
        answers = [await asyncio.wait_for(read_frame(reader), 10) for _ in range(count)]
        assert sorted(a[1] for a in answers) == list(range(count))
        refused = [a for a in answers if a[0] == 2]
        assert refused
        assert all("overloaded" in a[2] for a in refused)
        refusals = [r for r in caplog.records if "Refusing requests" in r.getMessage()]
        assert refusals
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("waiting_for_the_peer", [False, True])
async def test_malformed_requests_from_a_peer_that_does_not_read_are_bounded(
    waiting_for_the_peer: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Failure replies to malformed requests are subject to flow control too:
    while the peer reads nothing, the server stops reading from it, or (when it
    waits for a reply from that peer and must go on reading) cuts it off after
    1 MiB of unread failure replies.  Other clients are served throughout."""
    async with big_reply_server(waiting_for_the_peer=waiting_for_the_peer) as served:
        _reader, writer = await asyncio.open_connection(*served.addr)
        # Fill the server's write buffer with replies that we do not read ...
        for i in range(300):
            writer.write(fetch_frame(i))
        await writer.drain()
        await asyncio.sleep(200 * TIME_UNIT)
        (client,) = served.clients
        assert client.channel.protocol.writing_paused
        # ... then send requests without content (each gets a failure reply).
        malformed = raw_frame(b"[0, 1]")
        with contextlib.suppress(ConnectionError):
            for _ in range(40):
                writer.write(malformed * 500)
                await asyncio.wait_for(writer.drain(), 5)
        await asyncio.sleep(200 * TIME_UNIT)
        transport = client.channel.transport
        if waiting_for_the_peer:
            deadline = time.monotonic() + 5
            while not transport.is_closing() and time.monotonic() < deadline:
                await asyncio.sleep(50 * TIME_UNIT)
            assert transport.is_closing()
            assert any(
                "does not read the replies" in r.getMessage()
                and str(served.addr[0]) in r.getMessage()
                for r in caplog.records
            )
        else:
            assert not transport.is_closing()
            assert client.channel.protocol.reading_paused
            assert client.channel.protocol.core.unread_failure_bytes <= 2**20
        assert transport.get_write_buffer_size() < 4 * 2**20  # type: ignore[attr-defined]
        other = await aiomas.rpc.open_connection(served.addr)
        assert (await asyncio.wait_for(other.remote.fetch(-1), 5))[0] == -1
        await other.close()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


# --- a server closed while clients are mid-call ---------------------------------


async def test_a_server_closed_mid_call_finishes_its_calls_and_ends_bounded() -> None:
    """``server.close()`` stops listening; calls in flight on open connections
    still get their results (nothing is lost); once the server closes those
    connections, calls still running fail with ConnectionResetError at once,
    and ``wait_closed()`` returns promptly."""
    clients: list[aiomas.rpc.RpcClient] = []
    release = asyncio.Event()

    @aiomas.expose
    async def wait(i: int) -> int:
        await release.wait()
        return i

    @aiomas.expose
    async def hang() -> None:
        await asyncio.Event().wait()

    server = await aiomas.rpc.start_server(
        ("127.0.0.1", 0),
        aiomas.rpc.ServiceDict({"wait": wait, "hang": hang}),
        clients.append,
    )
    addr = server.sockets[0].getsockname()[:2]  # type: ignore[attr-defined]
    client = await aiomas.rpc.open_connection(addr)
    try:
        waiting = [asyncio.ensure_future(client.remote.wait(i)) for i in range(50)]
        hanging = [asyncio.ensure_future(client.remote.hang()) for _ in range(50)]
        await asyncio.sleep(100 * TIME_UNIT)
        server.close()
        with pytest.raises(OSError):
            await aiomas.rpc.open_connection(addr)
        release.set()
        assert await asyncio.wait_for(asyncio.gather(*waiting), WAIT) == list(range(50))
        start = time.monotonic()
        await asyncio.gather(*(c.close() for c in clients))
        results = await asyncio.wait_for(
            asyncio.gather(*hanging, return_exceptions=True), WAIT
        )
        assert all(isinstance(r, ConnectionResetError) for r in results), results
        await asyncio.wait_for(server.wait_closed(), WAIT)
        assert time.monotonic() - start < 1
    finally:
        await client.close()


# --- exceptions inside serializers ----------------------------------------------


class Fragile:
    """Its serializer fails for mode "encode", its deserializer for "decode"."""

    def __init__(self, mode: str) -> None:
        self.mode = mode


def _serialize_fragile(obj: Fragile) -> str:
    if obj.mode == "encode":
        raise ValueError("this one cannot be encoded")
    return obj.mode


def _deserialize_fragile(mode: str) -> Fragile:
    if mode == "decode":
        raise ValueError("this one cannot be decoded")
    return Fragile(mode)


def fragile_serializer() -> tuple[type, Any, Any]:
    return Fragile, _serialize_fragile, _deserialize_fragile


@pytest.mark.parametrize("codec", [aiomas.JSON, aiomas.MsgPack])
async def test_exceptions_inside_serializers_fail_only_that_call(
    codec: type[aiomas.codecs.Codec],
) -> None:
    """A serializer or deserializer that raises, on either side: the caller
    gets a clear error naming the cause, and the connection goes on working."""

    @aiomas.expose
    def echo(value: Any) -> Any:
        return value

    @aiomas.expose
    def make(mode: str) -> Fragile:
        return Fragile(mode)

    kwargs: dict[str, Any] = {
        "codec": codec,
        "extra_serializers": [fragile_serializer],
    }
    server = await aiomas.rpc.start_server(
        ("127.0.0.1", 0), aiomas.rpc.ServiceDict({"echo": echo, "make": make}), **kwargs
    )
    addr = server.sockets[0].getsockname()[:2]  # type: ignore[attr-defined]
    client = await aiomas.rpc.open_connection(addr, **kwargs)
    remote = client.remote
    try:
        # Our serializer fails: nothing is sent.
        with pytest.raises(aiomas.SerializationError, match="cannot be encoded"):
            await asyncio.wait_for(remote.echo(Fragile("encode")), WAIT)
        # The server's deserializer fails on our argument.
        with pytest.raises(aiomas.RemoteException, match="cannot be decoded"):
            await asyncio.wait_for(remote.echo(Fragile("decode")), WAIT)
        # The server's serializer fails on its result.
        with pytest.raises(aiomas.RemoteException, match="cannot be encoded"):
            await asyncio.wait_for(remote.make("encode"), WAIT)
        # Our deserializer fails on the result.
        with pytest.raises(aiomas.SerializationError, match="cannot be decoded"):
            await asyncio.wait_for(remote.make("decode"), WAIT)
        # The connection survived all of it.
        assert (await asyncio.wait_for(remote.echo(Fragile("ok")), WAIT)).mode == "ok"
        assert not client.channel.transport.is_closing()
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


# --- TLS refusals beyond those in test_channel.py ---------------------------------


@pytest.fixture(scope="module")
def expired_tls(ca: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A certificate of the right CA that expired yesterday."""
    import datetime

    from .conftest import TLSFiles

    now = datetime.datetime.now(datetime.UTC)
    cert = ca.issue_cert(
        "127.0.0.1",
        "localhost",
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    directory = tmp_path_factory.mktemp("expired")
    files = TLSFiles(
        str(directory / "ca.pem"),
        str(directory / "cert.pem"),
        str(directory / "key.pem"),
    )
    ca.cert_pem.write_to_path(files.cafile)
    cert.private_key_pem.write_to_path(files.keyfile)
    with open(files.certfile, "wb") as f:
        f.write(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return files


async def _refused(server_ctx: Any, client_ctx: Any) -> None:
    """A client with *client_ctx* cannot talk to a server with *server_ctx*."""
    server = await aiomas.channel.start_server(
        ("127.0.0.1", 0), echo_forever, ssl=server_ctx
    )
    addr = server.sockets[0].getsockname()[:2]  # type: ignore[attr-defined]

    async def talk() -> None:
        channel = await asyncio.wait_for(
            aiomas.channel.open_connection(addr, ssl=client_ctx), 5
        )
        try:
            await asyncio.wait_for(channel.send("hi"), 5)
        finally:
            await channel.close()

    try:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await talk()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_server_with_an_expired_certificate_is_refused(
    tls: Any, expired_tls: Any
) -> None:
    await _refused(expired_tls.server_context, tls.client_context)


async def test_a_client_with_an_expired_certificate_is_refused(
    tls: Any, expired_tls: Any
) -> None:
    await _refused(tls.server_context, expired_tls.client_context)


async def test_a_tls_client_cannot_talk_to_a_plain_server(tls: Any) -> None:
    await _refused(None, tls.client_context)


@pytest.mark.heavy
async def test_ten_thousand_cancelled_calls_leave_nothing_behind() -> None:
    """Calls given up by their callers (wait_for timeouts): the late replies are
    dropped quietly, the connection stays usable, and memory comes back."""
    asyncio.get_running_loop().set_debug(False)  # (debug mode keeps tracebacks)

    @aiomas.expose
    async def slow(i: int) -> int:
        await asyncio.sleep(10 * TIME_UNIT)
        return i

    server = await aiomas.rpc.start_server(
        ("127.0.0.1", 0), aiomas.rpc.ServiceDict({"slow": slow})
    )
    addr = server.sockets[0].getsockname()[:2]  # type: ignore[attr-defined]
    client = await aiomas.rpc.open_connection(addr)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for batch in range(10):
            calls = [client.remote.slow(batch * 1000 + i) for i in range(1000)]
            _done, pending = await asyncio.wait(calls, timeout=TIME_UNIT)
            for call in pending:
                call.cancel()
        # Wait until every late reply has arrived and been dropped.
        for _ in range(500):
            if client.channel.waiting_for_replies == 0:
                break
            await asyncio.sleep(10 * TIME_UNIT)
        assert client.channel.waiting_for_replies == 0
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 1_000_000, f"{grown} bytes left after 10,000 cancelled calls"
    assert await asyncio.wait_for(client.remote.slow(-1), 5) == -1
    await client.close()
    server.close()
    await server.wait_closed()


# --- nothing received is unpickled or evaluated ----------------------------------

SRC = Path(aiomas.__file__).parent
# Modules that turn bytes or strings into code or arbitrary objects.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill"}
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__"}
# The only places that import a module by name, and why that is safe.
IMPORT_BY_NAME = {
    # obj_from_str() serves Manager.spawn("module:Class"): documented as code
    # execution by design, for trusted managers only (docs/reliability.rst).
    "util.py",
    # Optional dependencies of the benchmark, names fixed in the code.
    "benchmark.py",
}


def test_no_code_path_unpickles_or_evaluates_received_data() -> None:
    """A static check of the whole package: no pickle (or marshal, shelve, ...)
    and no eval/exec/compile; import by name only where listed above."""
    findings = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(SRC)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
                findings += [f"{where} imports {n}" for n in names & UNSAFE_MODULES]
            elif isinstance(node, ast.ImportFrom):
                if (node.module or "").split(".")[0] in UNSAFE_MODULES:
                    findings.append(f"{where} imports from {node.module}")
            elif isinstance(node, ast.Call):
                func = node.func
                name = (
                    func.id
                    if isinstance(func, ast.Name)
                    else func.attr
                    if isinstance(func, ast.Attribute)
                    else ""
                )
                if name in UNSAFE_BUILTINS:
                    findings.append(f"{where} calls {name}()")
                if name == "import_module" and path.name not in IMPORT_BY_NAME:
                    findings.append(f"{where} imports a module by name")
    assert findings == []
