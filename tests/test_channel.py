"""Tests for aiomas.channel on every transport (TCP v4/v6, unix, LocalQueue, TLS)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import pytest

import aiomas
from aiomas import protocol, wire
from aiomas.channel import Channel, ChannelProtocol, Request
from aiomas.exceptions import (
    ConnectionLostError,
    DecodeError,
    ProtocolError,
    ProtocolResetError,
    RemoteException,
    SerializationError,
)
from aiomas.testing import TIME_UNIT, FakeTransport, feed, settle

from .conftest import Endpoint, NatsEndpoint, TLSFiles, ipv6_available
from .helpers import (
    aiomas_records,
    black_hole,
    echo_forever,
    echo_until_closed,
    frames,
    in_a_callback,
    tcp_socket_options,
)

Handler = Callable[[Channel], Awaitable[Any] | None]


def serving(
    endpoint: Endpoint, handler: Handler, **kwargs: Any
) -> contextlib.AbstractAsyncContextManager[Any]:
    """Run a channel server with *handler*; yield the address clients use."""
    return endpoint.serve(aiomas.channel.start_server, handler, **kwargs)


async def connect(endpoint: Endpoint, addr: Any, **kwargs: Any) -> Channel:
    return await aiomas.channel.open_connection(
        addr, **endpoint.client_kwargs, **kwargs
    )


# The spec's basic example, on every transport.


async def test_request_and_reply(endpoint: Endpoint) -> None:
    received = []

    async def handle_client(channel: Channel) -> None:
        req = await channel.recv()
        received.append(req.content)
        await req.reply("cya")
        await channel.close()

    async with serving(endpoint, handle_client) as addr:
        channel = await connect(endpoint, addr)
        assert await channel.send("ohai") == "cya"
        await channel.close()
    assert received == ["ohai"]


async def test_failure_reply_raises_remote_exception(endpoint: Endpoint) -> None:
    async def handle_client(channel: Channel) -> None:
        req = await channel.recv()
        await req.fail(ValueError(42))
        await channel.close()

    async with serving(endpoint, handle_client) as addr:
        channel = await connect(endpoint, addr)
        with pytest.raises(RemoteException) as info:
            await channel.send("ohai")
        await channel.close()
    exc = info.value
    assert exc.remote_traceback == "ValueError: 42\n"
    assert exc.origin == channel.peername
    assert str(exc) == f"Origin: {channel.peername}\nValueError: 42\n"


async def test_failure_of_a_raised_exception_carries_its_traceback(
    endpoint: Endpoint,
) -> None:
    async def handle_client(channel: Channel) -> None:
        req = await channel.recv()
        try:
            {}["missing"]
        except KeyError as exc:
            await req.fail(exc)
        await channel.close()

    async with serving(endpoint, handle_client) as addr:
        channel = await connect(endpoint, addr)
        with pytest.raises(RemoteException) as info:
            await channel.send(None)
        await channel.close()
    text = info.value.remote_traceback
    assert text.startswith("Traceback (most recent call last):\n")
    assert "handle_client" in text
    assert text.endswith("KeyError: 'missing'\n")


async def test_many_requests_in_flight_with_replies_out_of_order(
    endpoint: Endpoint,
) -> None:
    async def handle_client(channel: Channel) -> None:
        async def answer(req: Request) -> None:
            await asyncio.sleep(random.random() / 100)
            await req.reply(req.content * 2)

        tasks = set()
        with contextlib.suppress(ConnectionError):
            while True:
                req = await channel.recv()
                tasks.add(asyncio.ensure_future(answer(req)))
        await asyncio.gather(*tasks, return_exceptions=True)

    async with serving(endpoint, handle_client) as addr:
        channel = await connect(endpoint, addr)
        futures = [channel.send(i) for i in range(200)]
        assert await asyncio.gather(*futures) == [2 * i for i in range(200)]
        await channel.close()


async def test_both_sides_send_requests(endpoint: Endpoint) -> None:
    async def handle_client(channel: Channel) -> None:
        # The server asks the client before it answers the client's request.
        req = await channel.recv()
        name = await channel.send("who are you?")
        await req.reply(f"hello {name}, you said {req.content}")
        await channel.close()

    async with serving(endpoint, handle_client) as addr:
        channel = await connect(endpoint, addr)
        reply = channel.send("hi")
        question = await channel.recv()
        assert question.content == "who are you?"
        await question.reply("client")
        assert await reply == "hello client, you said hi"
        await channel.close()


async def test_many_calls_of_mixed_sizes_in_flight_arrive_whole(
    endpoint: Endpoint,
) -> None:
    """Calls in flight wake many callers per read, whose next messages leave
    gathered: on every transport, with payloads from empty to several hundred
    KiB (some above the size that is never joined), every call gets its own
    content back, and a reply to the last calls is not held back."""
    rng = random.Random(7)
    sizes = [0, 1, 100, 100, 1000, 1000, 70_000, 300_000]

    async def client(channel: Channel, index: int) -> None:
        for round_ in range(6):
            content = f"{index}/{round_}/" + "x" * rng.choice(sizes)
            assert await channel.send(content) == content

    async with serving(endpoint, echo_forever) as addr:
        channel = await connect(endpoint, addr)
        await asyncio.wait_for(
            asyncio.gather(*(client(channel, index) for index in range(20))),
            30.0,
        )
        # One more, alone: it waits for nothing gathered.
        assert await asyncio.wait_for(channel.send("last"), 100 * TIME_UNIT) == "last"
        await channel.close()


async def _two_replies_then(
    close: Callable[[Channel], Awaitable[None]], endpoint: Endpoint
) -> list[Any]:
    """The server answers two requests that came in one read (so its task
    was woken by a read of several frames and what it sends is gathered),
    then *close* ends the connection; return what the client's calls gave."""

    async def handle(channel: Channel) -> None:
        first = await channel.recv()
        second = await channel.recv()
        first.reply_nowait("one")
        second.reply_nowait("two")
        await close(channel)

    async with serving(endpoint, handle) as addr:
        client = await connect(endpoint, addr)
        # Sent in one step: the server gets both frames in one read.
        futures = [client.send("a"), client.send("b")]
        try:
            return list(
                await asyncio.wait_for(
                    asyncio.gather(*futures, return_exceptions=True), 10
                )
            )
        finally:
            await client.close()


async def test_replies_sent_just_before_channel_close_arrive(
    endpoint: Endpoint,
) -> None:
    async def close(channel: Channel) -> None:
        await channel.close()

    assert await _two_replies_then(close, endpoint) == ["one", "two"]


async def test_what_a_write_eof_keeps_from_leaving_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Closing the transport directly (not the channel) right after sending,
    in a step woken by a read of several frames, drops what was gathered; the
    calls of the peer fail (they do not wait forever), and after write_eof()
    the reason is logged."""

    async def close(channel: Channel) -> None:
        cast(asyncio.WriteTransport, channel.transport).write_eof()
        await asyncio.sleep(0)
        await channel.close()

    got = await _two_replies_then(close, Endpoint("tcp4", ("127.0.0.1", 0)))
    assert all(isinstance(result, ConnectionResetError) for result in got)
    warnings = [r.getMessage() for r in aiomas_records(caplog, logging.WARNING)]
    assert any("Could not write to" in text for text in warnings), warnings


async def test_large_messages(endpoint: Endpoint) -> None:
    big = "x" * (3 * 2**20)

    async with serving(endpoint, echo_forever) as addr:
        channel = await connect(endpoint, addr)
        results = await asyncio.gather(*(channel.send(big) for _ in range(3)))
        assert results == [big] * 3
        await channel.close()


async def test_msgpack_codec_and_extra_serializers(endpoint: Endpoint) -> None:
    @aiomas.codecs.serializable
    class Point:
        def __init__(self, x: int, y: int) -> None:
            self.x = x
            self.y = y

    kwargs = {"codec": aiomas.MsgPack, "extra_serializers": [Point.__serializer__]}
    async with serving(endpoint, echo_forever, **kwargs) as addr:
        channel = await connect(endpoint, addr, **kwargs)
        reply = await channel.send([b"\x00\xff", Point(1, 2)])
        assert isinstance(channel.codec, aiomas.MsgPack)
        await channel.close()
    assert reply[0] == b"\x00\xff"
    assert isinstance(reply, tuple)
    assert (reply[1].x, reply[1].y) == (1, 2)


async def test_every_server_connection_gets_its_own_codec(endpoint: Endpoint) -> None:
    codecs_seen: list[Any] = []

    def handler(channel: Channel) -> None:
        codecs_seen.append(channel.codec)
        channel.transport.close()

    async with serving(endpoint, handler) as addr:
        for _ in range(2):
            channel = await connect(endpoint, addr)
            await channel.wait_closed()
            await channel.close()
    assert len(codecs_seen) == 2
    assert codecs_seen[0] is not codecs_seen[1]


async def test_closing_fails_pending_requests_and_recv(endpoint: Endpoint) -> None:
    got_request = asyncio.Event()

    async def handle_client(channel: Channel) -> None:
        await channel.recv()
        got_request.set()
        with pytest.raises(ConnectionResetError):
            await channel.recv()

    async with serving(endpoint, handle_client) as addr:
        channel = await connect(endpoint, addr)
        pending = [channel.send(i) for i in range(3)]
        await got_request.wait()
        recv = asyncio.ensure_future(channel.recv())
        await asyncio.sleep(0)
        await channel.close()
        for future in pending:
            with pytest.raises(ConnectionResetError):
                await future
        with pytest.raises(ConnectionResetError):
            await recv
        with pytest.raises(ConnectionResetError):
            channel.send("too late")
        with pytest.raises(ConnectionResetError):
            await channel.recv()
        await channel.close()  # closing twice is fine


async def test_peer_closing_fails_pending_requests(endpoint: Endpoint) -> None:
    async def handle_client(channel: Channel) -> None:
        await channel.recv()
        await channel.close()

    async with serving(endpoint, handle_client) as addr:
        channel = await connect(endpoint, addr)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(channel.send("ping"), 5)
        await channel.close()


CODEC_MISMATCHES = [
    (aiomas.JSON, aiomas.MsgPack),
    (aiomas.MsgPack, aiomas.JSON),
    (aiomas.MsgPackBlosc, aiomas.MsgPack),
    (aiomas.JSON, aiomas.MsgPackBlosc),
]


@pytest.mark.parametrize(
    ("client_codec", "server_codec"),
    CODEC_MISMATCHES,
    ids=[f"{c.__name__}-to-{s.__name__}" for c, s in CODEC_MISMATCHES],
)
async def test_codec_mismatch_is_named_on_both_sides(
    endpoint: Endpoint,
    client_codec: type[aiomas.codecs.Codec],
    server_codec: type[aiomas.codecs.Codec],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server cannot decode the client's first message: it says which
    codec the bytes look like; the client, which only sees the close, says
    what the peer's log will tell.  Both keep ConnectionResetError."""
    caplog.set_level(logging.INFO, logger="aiomas.channel")
    server_error: asyncio.Future[BaseException] = (
        asyncio.get_running_loop().create_future()
    )

    async def handle_client(channel: Channel) -> None:
        try:
            await channel.recv()
        except ConnectionResetError as exc:
            server_error.set_result(exc)

    async with serving(endpoint, handle_client, codec=server_codec) as addr:
        channel = await connect(endpoint, addr, codec=client_codec)
        with pytest.raises(ConnectionResetError) as info:
            await asyncio.wait_for(channel.send("ohai"), 5)
        await channel.close()
        server_side = str(await asyncio.wait_for(server_error, 5))
    ours, theirs = client_codec.__name__, server_codec.__name__
    assert server_side.endswith(
        f"(it looks like {ours}, but this side uses {theirs}: both sides must "
        "use the same codec)"
    ), server_side
    client_side = str(info.value)
    assert "the peer hung up without answering our request; if its log says " in (
        client_side
    )
    assert f"both sides must use the same codec (this side uses {ours})" in (
        client_side
    )
    # The server warns; the client logs the close with the hint (a warning
    # only where it is a reset, as LocalQueue's abort() is).
    warnings = [r.getMessage() for r in aiomas_records(caplog, logging.WARNING)]
    closing = [m for m in warnings if m.startswith("Closing connection to ")]
    assert len(closing) == 1, warnings
    assert f"it looks like {ours}" in closing[0]
    logged = [r.getMessage() for r in aiomas_records(caplog, logging.INFO)]
    hinted = [m for m in logged if "hung up without answering our request" in m]
    assert len(hinted) == 1, logged


async def test_a_peer_that_answered_before_it_hung_up_gets_no_codec_hint(
    endpoint: Endpoint,
) -> None:
    async def handle_client(channel: Channel) -> None:
        request = await channel.recv()
        await request.reply(request.content)
        await channel.recv()
        await channel.close()  # without answering the second request

    async with serving(endpoint, handle_client) as addr:
        channel = await connect(endpoint, addr)
        assert await asyncio.wait_for(channel.send("one"), 5) == "one"
        with pytest.raises(ConnectionResetError) as info:
            await asyncio.wait_for(channel.send("two"), 5)
        await channel.close()
    assert str(info.value).endswith(" closed"), info.value


async def test_cancelled_request_drops_late_reply_quietly(
    endpoint: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    release = asyncio.Event()

    async def handle_client(channel: Channel) -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                req = await channel.recv()
                if req.content == "slow":
                    await release.wait()
                await req.reply(req.content)

    async with serving(endpoint, handle_client) as addr:
        channel = await connect(endpoint, addr)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(channel.send("slow"), 10 * TIME_UNIT)
        release.set()
        assert await channel.send("fast") == "fast"
        await channel.close()
    assert not aiomas_records(caplog, logging.WARNING)


async def test_unserializable_request_leaves_channel_usable(endpoint: Endpoint) -> None:
    async with serving(endpoint, echo_forever) as addr:
        channel = await connect(endpoint, addr)
        with pytest.raises(SerializationError, match="object"):
            channel.send(object())
        assert await channel.send("still works") == "still works"
        await channel.close()


async def test_unserializable_reply_fails_the_request_on_both_sides(
    endpoint: Endpoint,
) -> None:
    errors: list[BaseException] = []

    async def handle_client(channel: Channel) -> None:
        req = await channel.recv()
        try:
            await req.reply(object())
        except SerializationError as exc:
            errors.append(exc)
        with pytest.raises(RuntimeError, match="already answered"):
            await req.reply("twice")
        await channel.close()

    async with serving(endpoint, handle_client) as addr:
        channel = await connect(endpoint, addr)
        with pytest.raises(RemoteException, match="SerializationError"):
            await channel.send("give me something odd")
        await channel.close()
    assert len(errors) == 1


@pytest.mark.skipif(
    protocol.COMPILED,
    reason="the compiled build has the limits built in; the plain build tests them",
)
async def test_message_too_long(
    endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 4 GiB payloads are not something a test should allocate: lower the limit
    # (and the size up to which frames are taken to be far below it).
    monkeypatch.setattr(wire, "MAX_FRAME_SIZE", 100)
    monkeypatch.setattr(protocol, "JOIN_LIMIT", 50)
    async with serving(endpoint, echo_forever) as addr:
        channel = await connect(endpoint, addr)
        with pytest.raises(ValueError, match="too long"):
            channel.send("x" * 200)
        assert await channel.send("short") == "short"
        await channel.close()


async def test_two_concurrent_recv_calls_are_refused(endpoint: Endpoint) -> None:
    async with serving(endpoint, echo_forever) as addr:
        channel = await connect(endpoint, addr)
        first = asyncio.ensure_future(channel.recv())
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="already waiting"):
            await channel.recv()
        first.cancel()
        await channel.close()


async def test_transport_information(endpoint: Endpoint) -> None:
    async with serving(endpoint, echo_forever) as addr:
        channel = await connect(endpoint, addr)
        assert channel.get_extra_info("peername") == channel.peername
        assert channel.get_extra_info("no such thing", 42) == 42
        assert isinstance(channel.transport, asyncio.Transport)
        assert repr(channel).endswith("(open)>")
        await channel.close()
        assert repr(channel).endswith("(closed)>")


async def test_tls_peer_certificate_is_available(tls: TLSFiles) -> None:
    server = await aiomas.channel.start_server(
        ("127.0.0.1", 0), echo_forever, ssl=tls.server_context
    )
    port = server.sockets[0].getsockname()[1]
    channel = await aiomas.channel.open_connection(
        ("127.0.0.1", port), ssl=tls.client_context
    )
    assert await channel.send("secret") == "secret"
    cert = channel.get_extra_info("peercert")
    assert cert is not None
    assert "subjectAltName" in cert
    await channel.close()
    server.close()
    await server.wait_closed()


# Connecting.


async def test_connecting_to_nobody(endpoint: Endpoint) -> None:
    if isinstance(endpoint, NatsEndpoint):
        # Nobody has the name: "no responders".
        async with endpoint.client_link() as link:
            await check_connecting_to_nobody(
                endpoint, link.endpoint("nobody"), ConnectionRefusedError
            )
        return
    if endpoint.kind == "unix":
        expected: type[OSError] = FileNotFoundError
        addr: Any = endpoint.server_addr
    elif endpoint.kind == "localqueue":
        expected, addr = ConnectionRefusedError, endpoint.server_addr
    else:
        # A port that was free a moment ago: nobody listens there.
        server = await asyncio.start_server(lambda r, w: None, endpoint.server_addr[0])
        addr = server.sockets[0].getsockname()[:2]
        server.close()
        await server.wait_closed()
        expected = ConnectionRefusedError
    await check_connecting_to_nobody(endpoint, addr, expected)


async def check_connecting_to_nobody(
    endpoint: Endpoint, addr: Any, expected: type[OSError]
) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(expected):
        await connect(endpoint, addr)
    with pytest.raises(expected):
        await connect(endpoint, addr, timeout=200 * TIME_UNIT)
    assert loop.time() - start >= 200 * TIME_UNIT


async def test_a_hanging_connect_attempt_is_bounded_by_the_timeout() -> None:
    loop = asyncio.get_running_loop()
    with black_hole() as addr:
        start = loop.time()
        with pytest.raises(TimeoutError):
            await aiomas.channel.open_connection(addr, timeout=300 * TIME_UNIT)
        assert 300 * TIME_UNIT <= loop.time() - start < 300 * TIME_UNIT + 2


async def test_the_deadline_cutting_the_last_attempt_reports_the_error_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the deadline cuts the last attempt short, the caller learns what
    the attempts before met (nobody listens), not a bare TimeoutError."""
    attempts = 0

    async def refuse_then_hang(*args: Any, **kwargs: Any) -> Any:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionRefusedError("nobody listens")
        await asyncio.sleep(10)

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "create_connection", refuse_then_hang)
    with pytest.raises(ConnectionRefusedError, match="nobody listens"):
        await aiomas.channel.open_connection(("127.0.0.1", 1), timeout=200 * TIME_UNIT)
    assert attempts == 2


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux only")
@pytest.mark.parametrize("kind", ["tcp4", "tls"])
async def test_dead_peer_timeout_sets_keepalive_and_user_timeout(
    kind: str, tls: TLSFiles
) -> None:
    server_ssl = {"ssl": tls.server_context} if kind == "tls" else {}
    client_ssl = {"ssl": tls.client_context} if kind == "tls" else {}
    accepted: list[Channel] = []
    server = await aiomas.channel.start_server(
        ("127.0.0.1", 0), accepted.append, dead_peer_timeout=4, **server_ssl
    )
    addr = server.sockets[0].getsockname()[:2]  # type: ignore[attr-defined]
    plain = await aiomas.channel.open_connection(addr, **client_ssl)
    watched = await aiomas.channel.open_connection(
        addr, dead_peer_timeout=0.5, **client_ssl
    )
    try:
        assert tcp_socket_options(watched) == (1, 1, 500)
        assert tcp_socket_options(accepted[0]) == (1, 2, 4000)
        assert tcp_socket_options(plain)[0] == 0
    finally:
        await plain.close()
        await watched.close()
        server.close()
        await server.wait_closed()


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux only")
async def test_a_huge_dead_peer_timeout_is_clamped_to_what_the_kernel_takes() -> None:
    server = await aiomas.channel.start_server(("127.0.0.1", 0), echo_forever)
    addr = server.sockets[0].getsockname()[:2]  # type: ignore[attr-defined]
    channel = await aiomas.channel.open_connection(addr, dead_peer_timeout=1e300)
    try:
        assert tcp_socket_options(channel) == (1, 32767, 2**31 - 1)
        assert await channel.send("hi") == "hi"
    finally:
        await channel.close()
        server.close()
        await server.wait_closed()


async def test_dead_peer_timeout_is_harmless_on_unix_sockets(tmp_path: Any) -> None:
    path = str(tmp_path / "s")
    server = await aiomas.channel.start_server(path, echo_forever, dead_peer_timeout=1)
    channel = await aiomas.channel.open_connection(path, dead_peer_timeout=1)
    assert await channel.send("hi") == "hi"
    await channel.close()
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("timeout", [0, -1.0, math.inf, math.nan])
async def test_dead_peer_timeout_must_be_positive(timeout: float) -> None:
    with pytest.raises(ValueError, match="dead_peer_timeout"):
        await aiomas.channel.open_connection(
            ("127.0.0.1", 1), dead_peer_timeout=timeout
        )
    with pytest.raises(ValueError, match="dead_peer_timeout"):
        await aiomas.channel.start_server(
            ("127.0.0.1", 0), echo_forever, dead_peer_timeout=timeout
        )


async def test_connect_retries_until_the_server_starts(tmp_path: Any) -> None:
    path = str(tmp_path / "late.sock")
    client = asyncio.ensure_future(aiomas.channel.open_connection(path, timeout=5))
    await asyncio.sleep(100 * TIME_UNIT)
    assert not client.done()
    server = await aiomas.channel.start_server(path, echo_forever)
    channel = await client
    assert await channel.send("late but fine") == "late but fine"
    await channel.close()
    server.close()
    await server.wait_closed()


async def test_connect_with_timeout_none_retries_forever() -> None:
    lq = aiomas.get_queue("late-server")
    client = asyncio.ensure_future(aiomas.channel.open_connection(lq, timeout=None))
    await asyncio.sleep(300 * TIME_UNIT)
    assert not client.done()
    server = await aiomas.channel.start_server(lq, echo_forever)
    channel = await asyncio.wait_for(client, 5)
    assert await channel.send(1) == 1
    await channel.close()
    server.close()
    await server.wait_closed()


async def test_bad_arguments() -> None:
    other_loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError, match="loop"):
            await aiomas.channel.open_connection(("127.0.0.1", 1), loop=other_loop)
        with pytest.raises(ValueError, match="loop"):
            await aiomas.channel.start_server(
                ("127.0.0.1", 0), echo_forever, loop=other_loop
            )
    finally:
        other_loop.close()
    with pytest.raises(TypeError, match="Codec subclass"):
        await aiomas.channel.open_connection(
            ("127.0.0.1", 1),
            codec=aiomas.JSON(),  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match=r"\(host, port\)"):
        await aiomas.channel.open_connection(("127.0.0.1", 1, 2))  # type: ignore[arg-type]
    for bad_limit in (-1, 2**33):
        with pytest.raises(ValueError, match="max_frame_size"):
            await aiomas.channel.start_server(
                ("127.0.0.1", 0), echo_forever, max_frame_size=bad_limit
            )


async def test_loop_argument_may_be_the_running_loop() -> None:
    loop = asyncio.get_running_loop()
    lq = aiomas.get_queue("explicit-loop")
    server = await aiomas.channel.start_server(lq, echo_forever, loop=loop)
    channel = await aiomas.channel.open_connection(lq, loop=loop)
    assert await channel.send("x") == "x"
    await channel.close()
    server.close()
    await server.wait_closed()


# The client connected callback.


async def test_sync_client_connected_cb(endpoint: Endpoint) -> None:
    channels: list[Channel] = []

    async with serving(endpoint, channels.append) as addr:
        client = await connect(endpoint, addr)
        for _ in range(100):
            if channels:
                break
            await asyncio.sleep(10 * TIME_UNIT)
        server_side = channels[0]
        request = client.send("from client")
        req = await server_side.recv()
        await req.reply(req.content.upper())
        assert await request == "FROM CLIENT"
        await client.close()
        await server_side.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_failing_client_connected_cb_closes_only_that_connection(
    endpoint: Endpoint, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    def sync_handler(channel: Channel) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("handler bug")
        aiomas.create_task(echo_until_closed(channel))

    async def async_handler(channel: Channel) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("handler bug")
        with contextlib.suppress(ConnectionError):
            await echo_forever(channel)

    handler = sync_handler if kind == "sync" else async_handler
    async with serving(endpoint, handler) as addr:
        broken = await connect(endpoint, addr)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(broken.send("anyone?"), 5)
        working = await connect(endpoint, addr)
        assert await working.send("hi") == "hi"
        await broken.close()
        await working.close()
    errors = aiomas_records(caplog, logging.ERROR)
    assert len(errors) == 1
    assert "client_connected_cb failed" in errors[0].getMessage()
    assert errors[0].exc_info is not None
    assert isinstance(errors[0].exc_info[1], ValueError)


async def test_handler_ending_because_peer_left_is_not_an_error(
    endpoint: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(endpoint, echo_forever) as addr:
        channel = await connect(endpoint, addr)
        assert await channel.send(1) == 1
        await channel.close()
    assert not aiomas_records(caplog, logging.ERROR)


# Flow control.


async def test_drain_waits_while_writing_is_paused() -> None:
    lq = aiomas.get_queue("flow")
    server = await aiomas.channel.start_server(lq, echo_forever)
    channel = await aiomas.channel.open_connection(lq)
    protocol = channel.protocol
    protocol.pause_writing()
    drained = asyncio.ensure_future(protocol.drain())
    await settle()
    assert not drained.done()
    protocol.resume_writing()
    await asyncio.wait_for(drained, 1)
    protocol.pause_writing()
    stuck = asyncio.ensure_future(protocol.drain())
    await asyncio.sleep(0)
    await channel.close()
    with pytest.raises(ConnectionResetError):
        await stuck
    with pytest.raises(ConnectionResetError):
        await protocol.drain()
    server.close()
    await server.wait_closed()


async def test_replies_to_a_slow_reader_respect_flow_control() -> None:
    """A client that does not read makes the server's reply() wait instead of
    buffering without bound."""
    server_waits = asyncio.Event()
    payload = "x" * 2**20
    count = 64  # 64 MiB: more than the kernel's socket buffers can absorb

    async def handle_client(channel: Channel) -> None:
        transport = channel.transport
        assert isinstance(transport, asyncio.WriteTransport)
        transport.set_write_buffer_limits(high=2**16)
        with contextlib.suppress(ConnectionError):
            while True:
                req = await channel.recv()
                task = asyncio.ensure_future(req.reply(payload))
                await asyncio.sleep(TIME_UNIT)
                if not task.done():
                    assert transport.get_write_buffer_size() < 2**16 + 2**21
                    server_waits.set()
                await task

    server = await aiomas.channel.start_server(("127.0.0.1", 0), handle_client)
    port = server.sockets[0].getsockname()[1]
    channel = await aiomas.channel.open_connection(("127.0.0.1", port))
    transport = channel.transport
    assert isinstance(transport, asyncio.ReadTransport)
    transport.pause_reading()
    futures = [channel.send(i) for i in range(count)]
    await asyncio.wait_for(server_waits.wait(), 10)
    transport.resume_reading()
    results = await asyncio.wait_for(asyncio.gather(*futures), 30)
    assert results == [payload] * count
    await channel.close()
    server.close()
    await server.wait_closed()


async def test_protocol_write_coroutine() -> None:
    async def write_by_hand(channel: Channel) -> None:
        payload = channel.codec.encode([0, 0, "written by hand"])
        await channel.protocol.write(wire.frame_header(len(payload)), payload)

    lq = aiomas.get_queue("write")
    server = await aiomas.channel.start_server(lq, write_by_hand)
    channel = await aiomas.channel.open_connection(lq)
    request = await asyncio.wait_for(channel.recv(), 5)
    assert (request.msg_id, request.content) == (0, "written by hand")
    await channel.close()
    server.close()
    await server.wait_closed()


# Unit-level checks of the protocol without a transport.


def test_failure_text_of_foreign_peers() -> None:
    assert aiomas.protocol.failure_text("plain") == "plain"
    assert (
        aiomas.protocol.failure_text(["ValueError", "bad", "Traceback..."])
        == "ValueError\nbad\nTraceback..."
    )
    assert aiomas.protocol.failure_text({"error": 1}) == "{'error': 1}"


async def test_request_repr_and_aliases() -> None:
    protocol = ChannelProtocol(aiomas.JSON())
    request = Request("spam", 7, protocol)
    assert request.msg_id == 7
    assert repr(request) == "<Request 7: 'spam'>"


def test_protocol_error_is_a_runtime_error() -> None:
    assert issubclass(ProtocolError, RuntimeError)
    assert issubclass(ProtocolError, aiomas.AiomasError)


# TLS refusals at the channel level.


async def _tls_server(tls: TLSFiles) -> tuple[asyncio.AbstractServer, int]:
    server = await aiomas.channel.start_server(
        ("127.0.0.1", 0), echo_until_closed, ssl=tls.server_context
    )
    return server, server.sockets[0].getsockname()[1]


async def _close_server(server: asyncio.AbstractServer) -> None:
    server.close()
    await asyncio.wait_for(server.wait_closed(), 5)


async def _assert_refused(port: int, **kwargs: Any) -> None:
    """The handshake fails, or the server hangs up before the first reply."""
    try:
        channel = await aiomas.channel.open_connection(("127.0.0.1", port), **kwargs)
    except (ssl.SSLError, ConnectionError):
        return
    try:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.wait_for(channel.send("let me in"), 5)
    finally:
        await channel.close()


@pytest.fixture
async def quiet_handshake_errors() -> AsyncIterator[None]:
    """Failed handshakes are reported to the loop's exception handler; they are
    what these tests expect, so keep them out of the log."""
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, _context: None)
    yield
    loop.set_exception_handler(None)


@pytest.mark.usefixtures("quiet_handshake_errors")
async def test_tls_client_without_certificate_is_refused(tls: TLSFiles) -> None:
    server, port = await _tls_server(tls)
    no_cert = ssl.create_default_context(cafile=tls.cafile)
    await _assert_refused(port, ssl=no_cert)
    await _close_server(server)


@pytest.mark.usefixtures("quiet_handshake_errors")
async def test_tls_client_from_another_ca_is_refused(
    tls: TLSFiles, foreign_tls: TLSFiles
) -> None:
    server, port = await _tls_server(tls)
    foreign = aiomas.make_ssl_client_context(
        tls.cafile, foreign_tls.certfile, foreign_tls.keyfile
    )
    await _assert_refused(port, ssl=foreign)
    await _close_server(server)


@pytest.mark.usefixtures("quiet_handshake_errors")
async def test_tls_server_with_wrong_hostname_is_refused(
    tls: TLSFiles, wrong_host_tls: TLSFiles
) -> None:
    server, port = await _tls_server(wrong_host_tls)
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        await aiomas.channel.open_connection(
            ("127.0.0.1", port), ssl=tls.client_context
        )
    await _close_server(server)


@pytest.mark.usefixtures("quiet_handshake_errors")
async def test_plain_client_cannot_talk_to_tls_server(tls: TLSFiles) -> None:
    server, port = await _tls_server(tls)
    await _assert_refused(port)
    await _close_server(server)


def recording_protocol() -> tuple[ChannelProtocol, FakeTransport, Channel]:
    """A JSON channel protocol connected to a FakeTransport."""
    protocol = ChannelProtocol(aiomas.JSON())
    transport = FakeTransport(protocol)
    assert protocol.channel is not None
    return protocol, transport, protocol.channel


def messages_written(transport: FakeTransport) -> list[Any]:
    """Decode the JSON frames written to *transport*."""
    codec = aiomas.JSON()
    return [codec.decode(p) for p in wire.FrameReader().feed(transport.written)]


async def test_replies_to_requests_that_arrived_together_are_written_at_once() -> None:
    protocol, transport, channel = recording_protocol()
    channel.set_request_handler(lambda req: req.reply_nowait(req.content * 2))
    protocol.data_received(frames(*([0, i, i] for i in range(50))))
    assert transport.writes == [frames(*([1, i, 2 * i] for i in range(50)))]
    await asyncio.sleep(0)  # (The loop goes on: see the next test.)
    # One request alone is answered with one write, as always.
    protocol.data_received(frames([0, 50, 1]))
    assert transport.writes[1:] == [frames([1, 50, 2])]
    # Replies sent later (by asynchronous handlers) are not held back.
    held: list[Request] = []
    channel.set_request_handler(held.append)
    protocol.data_received(frames([0, 51, 1]))
    assert len(transport.writes) == 2
    held[0].reply_nowait("late")
    assert transport.writes[2:] == [frames([1, 51, "late"])]
    transport.lose_connection()


async def test_what_callers_woken_by_one_read_send_leaves_in_one_write() -> None:
    """A read of several frames wakes several callers; what they send when
    they run (in the same loop iteration) is gathered and written after them
    in one write, not in one per message."""
    protocol, transport, channel = recording_protocol()
    held: list[Request] = []
    channel.set_request_handler(held.append)
    protocol.data_received(frames([0, 0, "a"], [0, 1, "b"], [0, 2, "c"]))
    for request in held:
        request.reply_nowait(request.content)
    request_future = channel.send("mine")
    assert transport.writes == []
    await asyncio.sleep(0)  # (The loop runs what the read woke, then writes.)
    assert transport.writes == [
        frames([1, 0, "a"], [1, 1, "b"], [1, 2, "c"], [0, 0, "mine"])
    ]
    # Afterwards, each message is written as it is sent again.
    channel.send("next")
    assert transport.writes[1:] == [frames([0, 1, "next"])]
    # A read of one frame gathers nothing.
    protocol.data_received(frames([0, 3, "d"]))
    held[3].reply_nowait("d")
    assert transport.writes[2:] == [frames([1, 3, "d"])]
    # Closing the channel writes what was gathered first.
    protocol.data_received(frames([0, 4, "e"], [0, 5, "f"]))
    held[4].reply_nowait("e")
    held[5].reply_nowait("f")
    await channel.close()
    assert transport.writes[3:] == [frames([1, 4, "e"], [1, 5, "f"])]
    request_future.cancel()


async def test_gathered_writes_keep_big_payloads_apart_and_stay_bounded() -> None:
    protocol, transport, channel = recording_protocol()
    held: list[Request] = []
    channel.set_request_handler(held.append)
    protocol.data_received(frames(*([0, i, i] for i in range(12))))
    big = "x" * (aiomas.protocol.JOIN_LIMIT + 1)
    held[0].reply_nowait(0)
    held[1].reply_nowait(big)  # (a payload of its own, after what came before)
    # What was gathered, the big payload's header and its first 16 KiB, then
    # the rest of the payload, not copied (see _write_chunks()).
    assert len(transport.writes) == 2
    lead = 16 * 1024
    assert transport.writes[0].startswith(frames([1, 0, 0]))
    assert len(transport.writes[0]) == len(frames([1, 0, 0])) + 4 + lead
    assert len(transport.writes[1]) == len(frames([1, 1, big])) - 4 - lead
    part = "y" * 30_000  # (9 of them pass JOINED_WRITE_LIMIT)
    for request in held[2:11]:
        request.reply_nowait(part)
    assert len(transport.writes) == 3  # (written without waiting for the loop)
    held[11].reply_nowait(11)
    assert len(transport.writes) == 3
    await asyncio.sleep(0)
    assert len(transport.writes) == 4
    assert [message[1] for message in messages_written(transport)] == list(range(12))
    limit = aiomas.protocol.JOINED_WRITE_LIMIT
    assert all(len(transport.writes[i]) <= limit for i in (0, 2, 3))
    transport.lose_connection()


async def test_a_protocol_error_in_a_batch_drops_its_held_replies() -> None:
    protocol, transport, channel = recording_protocol()
    channel.set_request_handler(lambda req: req.reply_nowait(req.content))
    with contextlib.suppress(Exception):
        protocol.data_received(frames([0, 0, "a"], [7, 1, "bad type"], [0, 2, "c"]))
    assert transport.closed
    assert transport.writes == []
    transport.lose_connection()


async def test_a_peer_that_does_not_read_its_replies_stops_our_reading() -> None:
    """Flow control without sockets: the write buffer of a fake transport fills
    up, so the protocol pauses reading; each time the peer reads, it goes on."""
    protocol, transport, channel = recording_protocol()
    channel.set_request_handler(lambda req: req.reply_nowait(req.content))
    transport.set_write_buffer_limits(high=100, low=0)
    data = frames(*([0, i, "x" * 40] for i in range(10)))

    def in_chunks(data: bytes) -> list[bytes]:
        return [data[i : i + 10] for i in range(0, len(data), 10)]

    left = feed(protocol, transport, in_chunks(data))
    assert protocol.writing_paused
    assert transport.reading_paused
    assert left  # not everything was read
    rounds = 1
    while left:
        transport.consume()  # the peer reads its replies
        assert not transport.reading_paused
        await settle()
        left = feed(protocol, transport, in_chunks(left))
        rounds += 1
    transport.consume()
    await settle()
    reader = wire.FrameReader()
    replies = [aiomas.JSON().decode(p) for p in reader.feed(transport.written)]
    assert replies == [[1, i, "x" * 40] for i in range(10)]
    assert rounds > 2  # (the buffer filled up again and again)
    transport.lose_connection()


async def test_connections_are_logged_with_the_peer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="aiomas")
    lq = aiomas.get_queue("logged")
    server = await aiomas.channel.start_server(lq, echo_until_closed)
    channel = await aiomas.channel.open_connection(lq)
    assert await channel.send("hi") == "hi"
    await channel.close()
    server.close()
    await server.wait_closed()
    messages = [
        (r.levelname, r.getMessage(), r.peer) for r in aiomas_records(caplog, 0)
    ]  # type: ignore[attr-defined]
    assert ("INFO", "Connection to logged opened", "logged") in messages
    assert ("INFO", "Connection from logged#1 opened", "logged#1") in messages
    assert ("INFO", "Connection with logged closed", "logged") in messages
    with pytest.raises(ConnectionRefusedError):
        await aiomas.channel.open_connection(lq)
    failed = aiomas_records(caplog, 0)[-1]
    assert failed.getMessage().startswith("Connecting to LocalQueue('logged') failed")


async def test_a_reply_sent_right_before_the_handler_closes_arrives(
    endpoint: Endpoint,
) -> None:
    """A reply is not held back for batching when its read has no more
    frames: a handler may answer and hang up at once."""

    def answer_and_hang_up(channel: Channel) -> None:
        def handler(request: aiomas.channel.Request) -> None:
            request.reply_nowait("bye")
            channel.transport.close()

        channel.set_request_handler(handler)

    async with serving(endpoint, answer_and_hang_up) as addr:
        channel = await connect(endpoint, addr)
        assert await asyncio.wait_for(channel.send("hi"), 5) == "bye"
        await channel.close()


async def test_answering_after_a_protocol_error_raises_protocol_reset_error() -> None:
    received: asyncio.Queue[aiomas.channel.Request] = asyncio.Queue()

    async def keep_request(channel: Channel) -> None:
        received.put_nowait(await channel.recv())

    server = await aiomas.channel.start_server(("127.0.0.1", 0), keep_request)
    host, port = server.sockets[0].getsockname()[:2]  # type: ignore[attr-defined]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(wire.frame(b'[0, 1, "x"]') + wire.frame(b'[7, 1, "x"]'))
        request = await asyncio.wait_for(received.get(), 5)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # cut off
        for answer in (request.reply(1), request.fail(ValueError())):
            with pytest.raises(aiomas.ProtocolResetError, match="message type 7"):
                await answer
    finally:
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()


async def test_a_request_that_could_not_be_written_waits_for_nothing() -> None:
    server = await aiomas.channel.start_server(("127.0.0.1", 0), echo_until_closed)
    addr = server.sockets[0].getsockname()[:2]  # type: ignore[attr-defined]
    channel = await aiomas.channel.open_connection(addr)
    try:
        cast(asyncio.WriteTransport, channel.transport).write_eof()
        with pytest.raises(RuntimeError):  # asyncio: write() after write_eof()
            channel.send("lost")
        assert channel.waiting_for_replies == 0
        assert channel.protocol.core.requests_sent == 1
    finally:
        await channel.close()
        server.close()
        await server.wait_closed()


# A clean close and a broken connection.


async def test_a_clean_close_fails_calls_with_connection_reset_error() -> None:
    _, transport, channel = recording_protocol()
    call = channel.send("ping")
    transport.lose_connection()  # the peer closed it, without an error
    with pytest.raises(ConnectionResetError) as info:
        await call
    assert type(info.value) is ConnectionResetError
    assert info.value.__cause__ is None
    with pytest.raises(ConnectionResetError) as later:
        channel.send("again")
    assert type(later.value) is ConnectionResetError


@pytest.mark.parametrize(
    "error", [ConnectionResetError(104, "reset"), TimeoutError(110, "timed out")]
)
async def test_a_broken_connection_fails_calls_with_connection_lost_error(
    error: OSError,
) -> None:
    protocol, transport, channel = recording_protocol()
    call = channel.send("ping")
    request_of_peer: list[Request] = []
    channel.set_request_handler(request_of_peer.append)
    protocol.data_received(frames([0, 0, "theirs"]))
    transport.lose_connection(error)
    for raised in [call, channel.recv(), request_of_peer[0].reply("late")]:
        with pytest.raises(ConnectionLostError) as info:
            await raised
        assert isinstance(info.value, ConnectionResetError)
        assert isinstance(info.value, aiomas.AiomasError)
        assert info.value.__cause__ is error
        assert str(error) in str(info.value)
    with pytest.raises(ConnectionLostError):
        channel.send("again")
    assert channel.closed


async def test_a_protocol_error_is_a_broken_connection_too() -> None:
    protocol, transport, channel = recording_protocol()
    call = channel.send("ping")
    protocol.data_received(frames([7, 0, None]))  # an unknown message type
    with pytest.raises(ProtocolResetError) as info:
        await call
    assert isinstance(info.value, ConnectionLostError)
    assert isinstance(info.value, RuntimeError)
    assert isinstance(info.value.__cause__, ProtocolError)
    transport.lose_connection()


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
async def test_a_connection_reset_by_the_peer_is_lost(
    family: socket.AddressFamily,
) -> None:
    """The peer resets the connection (SO_LINGER 0, as a crashed host's
    stack or a firewall does): the call in flight gets a ConnectionLostError
    whose cause is the ConnectionResetError of the socket."""
    if family == socket.AF_INET6 and not ipv6_available():
        pytest.skip("no IPv6 on this machine")
    host = "127.0.0.1" if family == socket.AF_INET else "::1"

    async def reset(channel: Channel) -> None:
        await channel.recv()
        sock = channel.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        cast(asyncio.Transport, channel.transport).abort()

    server = await aiomas.channel.start_server((host, 0), reset)
    port = server.sockets[0].getsockname()[1]
    channel = await aiomas.channel.open_connection((host, port))
    with pytest.raises(ConnectionLostError) as info:
        await asyncio.wait_for(channel.send("ping"), 1000 * TIME_UNIT)
    assert type(info.value.__cause__) is ConnectionResetError
    await channel.close()
    server.close()
    await server.wait_closed()


# Every kind of event, on a fake transport.


async def test_failure_and_undecodable_replies_fail_only_their_call() -> None:
    protocol, transport, channel = recording_protocol()
    failing, undecodable, fine = (channel.send(i) for i in range(3))
    protocol.data_received(
        frames([2, 0, "Traceback: boom"], [1, 1, {"__type__": [9, 1]}], [1, 2, "ok"])
    )
    with pytest.raises(RemoteException, match="boom") as remote:
        await failing
    assert remote.value.origin == ("peer", 1)
    with pytest.raises(DecodeError, match="Unknown type id 9"):
        await undecodable
    assert await fine == "ok"
    assert not channel.closed
    # A reply that nobody waits for any more is dropped quietly.
    late = channel.send("late")
    late.cancel()
    protocol.data_received(frames([2, 3, "too late"]))
    assert channel.waiting_for_replies == 0
    transport.lose_connection()


async def test_requests_the_core_answers_itself_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiomas.channel")
    protocol, transport, channel = recording_protocol()
    protocol.data_received(frames([0, 5, {"__type__": [9, 1]}], [0, 6]))
    replies = [m[:2] for m in messages_written(transport)]
    assert replies == [[2, 5], [2, 6]]
    records = {r.getMessage(): r.levelno for r in aiomas_records(caplog, 0)}
    assert records["Request 6 from ('peer', 1) is malformed"] == logging.DEBUG
    (undecodable,) = [m for m in records if m.startswith("Request 5 from")]
    assert "Unknown type id 9" in undecodable
    assert records[undecodable] == logging.WARNING
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(channel.recv(), 10 * TIME_UNIT)  # nothing queued
    transport.lose_connection()


async def test_held_requests_are_delivered_when_writing_resumes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    protocol, transport, channel = recording_protocol()
    handled: list[Request] = []
    channel.set_request_handler(handled.append)
    protocol.pause_writing()
    limit = aiomas.protocol.MAX_HELD_REQUESTS
    protocol.data_received(frames(*([0, i, i] for i in range(limit + 2))))
    assert handled == []
    refused = [m for m in messages_written(transport) if m[0] == 2]
    assert [m[1] for m in refused] == [limit, limit + 1]
    (warning,) = [r.getMessage() for r in aiomas_records(caplog, logging.WARNING)]
    assert warning.startswith("Refusing requests from ('peer', 1)")
    protocol.resume_writing()
    await settle()
    assert [r.message_id for r in handled] == list(range(limit))
    transport.lose_connection()


async def test_replies_to_a_big_batch_leave_in_chunks_of_the_write_limit() -> None:
    protocol, transport, channel = recording_protocol()
    big = "x" * (aiomas.protocol.JOINED_WRITE_LIMIT // 3)
    channel.set_request_handler(lambda req: req.reply_nowait(big))
    protocol.data_received(frames(*([0, i, None] for i in range(6))))
    assert len(transport.writes) > 1
    assert len(messages_written(transport)) == 6
    transport.lose_connection()


async def test_a_big_payload_takes_16_kib_along_with_its_header() -> None:
    # (Not the header alone ahead of it: see protocol.BIG_PAYLOAD_LEAD.)
    protocol, transport, channel = recording_protocol()
    big = "x" * aiomas.protocol.JOIN_LIMIT
    answer = channel.send(big)
    whole = frames([0, 0, big])
    lead = 4 + aiomas.protocol.BIG_PAYLOAD_LEAD
    assert transport.writes == [whole[:lead], whole[lead:]]
    feed(protocol, transport, [frames([0, 7, None])])
    request = await channel.recv()
    await request.reply(big)
    assert len(transport.writes) == 4
    assert [m[:2] for m in messages_written(transport)] == [[0, 0], [1, 7]]
    transport.lose_connection()
    with pytest.raises(ConnectionResetError):
        await answer


async def test_a_big_payload_sent_while_gathering_leaves_after_what_was_gathered() -> (
    None
):
    protocol, transport, channel = recording_protocol()
    held: list[Request] = []
    channel.set_request_handler(held.append)
    protocol.data_received(frames(*([0, i, i] for i in range(3))))
    # (Just big: the rest of it is less than JOIN_LIMIT, and still not copied.)
    big = "x" * (aiomas.protocol.JOIN_LIMIT + 1)
    held[0].reply_nowait(0)  # (gathered)
    assert transport.writes == []
    held[1].reply_nowait(big)
    first, rest = transport.writes
    assert first.startswith(frames([1, 0, 0]))
    assert first + rest == frames([1, 0, 0], [1, 1, big])
    assert len(rest) == len(frames([1, 1, big])) - 4 - aiomas.protocol.BIG_PAYLOAD_LEAD
    held[2].reply_nowait(2)  # (gathered again, until the loop goes on)
    assert len(transport.writes) == 2
    await asyncio.sleep(0)
    assert [m[1] for m in messages_written(transport)] == [0, 1, 2]
    transport.lose_connection()


class _NeverRead(asyncio.Protocol):
    transports: list[asyncio.Transport]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transports.append(cast(asyncio.Transport, transport))
        self.transports[-1].pause_reading()


async def test_big_payloads_to_a_peer_that_does_not_read_pause_writing() -> None:
    loop = asyncio.get_running_loop()
    peers: list[asyncio.Transport] = []

    class NeverRead(_NeverRead):
        transports = peers

    server = await loop.create_server(NeverRead, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    channel = await aiomas.channel.open_connection(("127.0.0.1", port))
    protocol = channel.protocol
    big = "x" * 2**18
    answers = []
    for _ in range(400):  # (at most 100 MiB; a few MiB fill the socket's buffers)
        answers.append(channel.send(big))
        if protocol.writing_paused:
            break
    assert protocol.writing_paused
    cast(asyncio.Transport, protocol.transport).abort()  # (close() would wait)
    for answer in answers:
        with pytest.raises(ConnectionResetError):
            await answer
    await channel.close()
    for peer in peers:
        peer.abort()
    server.close()
    await server.wait_closed()


async def test_a_connection_that_does_not_close_is_aborted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Stuck(FakeTransport):
        def close(self) -> None:
            pass  # (a peer that never acknowledges the close)

    monkeypatch.setattr(aiomas.channel, "_CLOSE_TIMEOUT", 10 * TIME_UNIT)
    protocol = ChannelProtocol(aiomas.JSON())
    transport = Stuck(protocol)
    assert protocol.channel is not None
    await protocol.channel.close()
    assert transport.aborted
    (warning,) = [r.getMessage() for r in aiomas_records(caplog, logging.WARNING)]
    assert warning.startswith("Aborting connection to ('peer', 1)")


async def test_a_transport_without_abort_is_closed_after_a_violation() -> None:
    class NoAbort(FakeTransport):
        abort = None  # type: ignore[assignment]

    protocol = ChannelProtocol(aiomas.JSON())
    transport = NoAbort(protocol)
    protocol.data_received(frames([7, 0, None]))
    assert transport.is_closing()
    await settle()
    assert protocol.is_closed()
    with pytest.raises(ProtocolResetError):
        await protocol.write(b"\0\0\0\1", b"x")


# --- The wire extension on a channel (see docs/deadlines.rst) -------------------


def jframe(message: Any) -> bytes:
    return wire.frame(aiomas.JSON().encode(message))


OFFER = [0, 0, ["__aiomas__/extensions", [1, ["cancel", "deadline", "trace"]], {}]]


async def test_a_channel_takes_an_offer_and_reads_requests_with_metadata() -> None:
    protocol = ChannelProtocol(aiomas.JSON())
    transport = FakeTransport(protocol)
    channel = protocol.channel
    assert channel is not None
    feed(protocol, transport, [jframe([0, 0, "not an offer"]), jframe(OFFER)])
    plain = await channel.recv()
    assert not channel.take_offer(plain)
    offer = await channel.recv()
    assert not channel.extended
    assert channel.take_offer(offer)
    assert channel.extended
    assert transport.written == jframe([1, 0, [1, ["cancel", "deadline", "trace"]]])
    feed(protocol, transport, [jframe([3, 1, ["x", {"deadline": 2}]])])
    request = await channel.recv()
    assert isinstance(request, aiomas.channel.ExtendedRequest)
    assert (request.content, request.deadline, request.meta) == (
        "x",
        2.0,
        {"deadline": 2},
    )
    await request.reply("y")
    assert transport.written.endswith(jframe([1, 1, "y"]))
    # Without a cancel handler, a cancel is ignored.
    feed(protocol, transport, [jframe([4, 1, None])])
    assert not transport.closed
    # A closed channel takes no offer.
    transport.lose_connection()
    assert not channel.take_offer(Request(OFFER[2], 5, protocol))


async def paused_extended_channel(
    handled: list[Request], cancels: list[tuple[int, bool]]
) -> tuple[ChannelProtocol, FakeTransport, asyncio.Future[Any]]:
    """A channel that agreed to the extension, hands requests and cancels
    to *handled* and *cancels*, and whose writing is paused; it waits for a
    reply of its own (the future returned), so it reads on."""
    protocol = ChannelProtocol(aiomas.JSON())
    transport = FakeTransport(protocol)
    channel = protocol.channel
    assert channel is not None
    feed(protocol, transport, [jframe(OFFER)])
    assert channel.take_offer(await channel.recv())
    channel.set_request_handler(handled.append)
    channel.cancel_handler = lambda msg_id, held: cancels.append((msg_id, held))
    question = channel.send("q")
    transport.set_write_buffer_limits(high=1)
    assert protocol.writing_paused
    return protocol, transport, question


async def test_held_requests_with_metadata_reach_the_handler() -> None:
    handled: list[Request] = []
    cancels: list[tuple[int, bool]] = []
    protocol, transport, question = await paused_extended_channel(handled, cancels)
    feed(
        protocol,
        transport,
        [
            jframe([3, 1, ["a", {"deadline": 1}]])
            + jframe([3, 2, ["b", {}]])
            + jframe([4, 2, None])
        ],
    )
    assert handled == []
    assert cancels == [(2, True)]
    transport.consume()
    await settle()
    (request,) = handled
    assert isinstance(request, aiomas.channel.ExtendedRequest)
    assert request.content == "a"
    # (Less the loop time it was held: see the next test.)
    assert request.deadline is not None
    assert 0 < request.deadline <= 1.0
    transport.lose_connection()
    with pytest.raises(ConnectionResetError):
        await question


async def test_a_held_request_gets_only_what_is_left_of_its_deadline() -> None:
    """The time a request waited while writing was paused is taken off its
    deadline, measured from its arrival on the channel's deadline clock."""
    handled: list[Request] = []
    protocol, transport, question = await paused_extended_channel(handled, [])
    clock = aiomas.ExternalClock("2026-01-01T00:00:00")
    assert protocol.channel is not None
    protocol.channel.deadline_clock = clock
    feed(
        protocol,
        transport,
        [
            jframe([3, 1, ["a", {"deadline": 5}]])
            + jframe([3, 2, ["b", {"deadline": 5}]])
        ],
    )
    clock.set_time(1.5)
    feed(
        protocol,
        transport,
        [
            jframe([4, 1, None])  # "a" is cancelled while held
            + jframe([3, 3, ["c", {"deadline": 5}]])
            + jframe([0, 4, "plain"])
        ],
    )
    assert handled == []
    clock.set_time(4)
    transport.consume()
    await settle()
    assert [(r.content, getattr(r, "deadline", None)) for r in handled] == [
        ("b", 1.0),  # arrived at 0, passed on at 4
        ("c", 2.5),  # arrived at 1.5
        ("plain", None),
    ]
    transport.lose_connection()
    with pytest.raises(ConnectionResetError):
        await question


async def test_send_cancellable_without_the_extension_sends_plain_requests() -> None:
    protocol = ChannelProtocol(aiomas.JSON())
    transport = FakeTransport(protocol)
    channel = protocol.channel
    assert channel is not None
    deadline = aiomas.deadlines.Deadline.after(60)
    call = channel.send_cancellable("x", deadline)
    assert transport.written == jframe([0, 0, "x"])
    call.cancel()
    await settle()
    # Not agreed: no cancel is sent, and the id waits for its late reply.
    assert transport.written == jframe([0, 0, "x"])
    assert channel.waiting_for_replies == 1
    feed(protocol, transport, [jframe([1, 0, "late"])])
    assert channel.waiting_for_replies == 0
    # A deadline that has passed fails the call at once; nothing is sent.
    late = channel.send_cancellable("y", aiomas.deadlines.Deadline.after(-1))
    with pytest.raises(aiomas.DeadlineExceeded):
        await late
    assert channel.protocol.core.requests_sent == 1
    transport.lose_connection()
    with pytest.raises(ConnectionResetError):
        channel.send_cancellable("z")
    with pytest.raises(ConnectionResetError):
        channel.offer_extensions()


async def test_an_offer_whose_connection_ends_leaves_the_channel_plain() -> None:
    protocol = ChannelProtocol(aiomas.JSON())
    transport = FakeTransport(protocol)
    channel = protocol.channel
    assert channel is not None
    offer = channel.offer_extensions()
    assert transport.written == jframe(OFFER)
    transport.lose_connection()
    await settle()
    assert offer.done()
    assert not channel.extended


# --- recv() resumes its task from the read that brings the request -----------


def _echo_task(channel: Channel, log: list[Any]) -> asyncio.Task[None]:
    async def echo() -> None:
        while True:
            request = await channel.recv()
            log.append((request.content, asyncio.current_task()))
            await request.reply(request.content)

    return asyncio.ensure_future(echo())


async def test_recv_resumes_its_task_within_the_read() -> None:
    protocol, transport, channel = recording_protocol()
    log: list[Any] = []
    task = _echo_task(channel, log)
    await settle()  # (It waits in recv().)

    def read() -> list[bytes]:
        protocol.data_received(frames([0, 0, "now"]))
        return list(transport.writes)  # before the loop runs anything else

    assert await in_a_callback(read) == [frames([1, 0, "now"])]
    assert log == [("now", task)]  # (It ran as itself.)
    task.cancel()
    await settle()
    assert task.cancelled()


async def test_recv_resumes_in_the_next_iteration_from_within_a_task() -> None:
    protocol, transport, channel = recording_protocol()
    log: list[Any] = []
    task = _echo_task(channel, log)
    await settle()
    protocol.data_received(frames([0, 0, "later"]))  # (We are a task.)
    assert transport.writes == []
    await settle()
    assert messages_written(transport) == [[1, 0, "later"]]
    task.cancel()
    await settle()


async def test_a_read_of_several_requests_wakes_recv_once() -> None:
    protocol, transport, channel = recording_protocol()
    log: list[Any] = []
    task = _echo_task(channel, log)
    await settle()

    def read() -> list[bytes]:
        protocol.data_received(frames(*([0, i, i] for i in range(3))))
        return list(transport.writes)

    assert await in_a_callback(read) == []  # (It runs after the read.)
    await settle()
    assert messages_written(transport) == [[1, i, i] for i in range(3)]
    assert [content for content, _ in log] == [0, 1, 2]
    task.cancel()
    await settle()


async def test_recv_can_be_cancelled_and_called_again() -> None:
    protocol, _transport, channel = recording_protocol()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(TIME_UNIT):
            await channel.recv()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(channel.recv(), TIME_UNIT)
    waiting = asyncio.ensure_future(channel.recv())
    await settle()
    waiting.cancel()
    await settle()
    assert waiting.cancelled()
    # Woken within the read, it returns the request at once.
    waiting = asyncio.ensure_future(channel.recv())
    await settle()
    await in_a_callback(lambda: protocol.data_received(frames([0, 0, "now"])))
    assert waiting.done()
    assert (await waiting).content == "now"
    # A cancel that comes after the request woke it does not lose the request.
    waiting = asyncio.ensure_future(channel.recv())
    await settle()
    protocol.data_received(frames([0, 2, "kept"]))  # (Within a task: woken later.)
    waiting.cancel()
    await settle()
    assert waiting.cancelled()
    assert (await channel.recv()).content == "kept"
    # And a request that comes while nobody waits is kept for the next recv().
    protocol.data_received(frames([0, 1, "queued"]))
    assert (await channel.recv()).content == "queued"


async def test_recv_keeps_the_context_of_its_task() -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var")
    protocol, _transport, channel = recording_protocol()

    async def receive() -> tuple[str, Any]:
        var.set("mine")
        request = await channel.recv()
        return var.get(), request.content

    task = asyncio.ensure_future(receive())
    await settle()
    await in_a_callback(lambda: protocol.data_received(frames([0, 0, "x"])))
    assert await task == ("mine", "x")
    assert var.get("unset") == "unset"


async def test_recv_fails_when_the_connection_ends_while_it_waits() -> None:
    _protocol, transport, channel = recording_protocol()
    waiting = asyncio.ensure_future(channel.recv())
    await settle()
    await in_a_callback(transport.lose_connection)
    with pytest.raises(ConnectionResetError):
        await waiting


@pytest.mark.parametrize(
    "reads",
    [
        [[[1, 0, "reply"], [0, 0, "request"]]],  # in one read
        [[[1, 0, "reply"]], [[0, 0, "request"]]],  # in two (as a LocalQueue)
    ],
    ids=["one read", "two reads"],
)
async def test_tasks_resume_in_the_order_of_the_messages_that_woke_them(
    reads: list[list[Any]],
) -> None:
    # A reply, then a request: the caller waiting for the reply runs before
    # the server task waiting in recv(), as with futures.
    protocol, _transport, channel = recording_protocol()
    ran: list[str] = []

    async def call() -> None:
        await channel.send("call")
        ran.append("caller")

    async def serve() -> None:
        await channel.recv()
        ran.append("server")

    tasks = [asyncio.ensure_future(call()), asyncio.ensure_future(serve())]
    await settle()
    loop = asyncio.get_running_loop()
    for read in reads:
        loop.call_soon(protocol.data_received, frames(*read))
    await asyncio.gather(*tasks)
    assert ran == ["caller", "server"]
    # With nothing before it, a lone request resumes the server at once.
    task = asyncio.ensure_future(serve())
    await settle()
    await in_a_callback(lambda: protocol.data_received(frames([0, 1, "next"])))
    assert task.done()


async def test_recv_passes_on_the_message_of_its_cancellation() -> None:
    _protocol, _transport, channel = recording_protocol()
    waiting = asyncio.ensure_future(channel.recv())
    await settle()
    waiting.cancel("my reason")
    with pytest.raises(asyncio.CancelledError) as raised:
        await waiting
    assert raised.value.args == ("my reason",)


async def _serve_then_exit(channel: Channel) -> None:
    await channel.recv()
    raise SystemExit(3)


async def _call_then_exit(channel: Channel) -> None:
    await channel.send("x")
    raise SystemExit(3)


@pytest.mark.parametrize(
    ("wait", "message"),
    [(_serve_then_exit, [0, 0, "alone"]), (_call_then_exit, [1, 0, "alone"])],
    ids=["recv", "send"],
)
def test_an_exit_from_a_task_resumed_within_a_read_ends_the_loop(
    wait: Callable[[Channel], Awaitable[None]], message: list[Any]
) -> None:
    # (Its own loop: the SystemExit ends it.)
    loop = asyncio.new_event_loop()

    async def start() -> tuple[ChannelProtocol, asyncio.Future[None]]:
        protocol, _transport, channel = recording_protocol()
        task = asyncio.ensure_future(wait(channel))
        await settle()
        return protocol, task

    try:
        protocol, task = loop.run_until_complete(start())
        read_ended: list[bool] = []

        def read() -> None:
            protocol.data_received(frames(message))
            read_ended.append(True)

        loop.call_soon(read)
        with pytest.raises(SystemExit):
            loop.run_forever()
        assert isinstance(task.exception(), SystemExit)
        assert read_ended == [True]  # (not cut short by the exit)
    finally:
        loop.close()


def test_on_uvloop_recv_waits_on_a_plain_future() -> None:
    # (uvloop's passes are cheap: resuming within the read would cost more.)
    uvloop = pytest.importorskip("uvloop")
    loop = uvloop.new_event_loop()

    async def exchange() -> list[Any]:
        protocol, transport, channel = recording_protocol()
        assert not channel._resume_in_read  # noqa: SLF001
        waiting = asyncio.ensure_future(channel.recv())
        await settle()

        def read() -> bool:
            protocol.data_received(frames([0, 0, "x"]))
            return waiting.done()

        assert not await in_a_callback(read)  # (resumed in the next pass)
        request = await waiting
        await request.reply("y")
        return messages_written(transport)

    try:
        assert loop.run_until_complete(exchange()) == [[1, 0, "y"]]
    finally:
        loop.close()


async def test_on_asyncio_recv_resumes_within_the_read() -> None:
    _protocol, _transport, channel = recording_protocol()
    assert channel._resume_in_read  # noqa: SLF001


async def test_a_channel_tells_its_loop() -> None:
    _protocol, _transport, channel = recording_protocol()
    assert channel.loop is asyncio.get_running_loop()


async def test_start_task_starts_eagerly_where_it_may() -> None:
    _protocol, _transport, channel = recording_protocol()
    ran: list[str] = []

    async def step(name: str) -> str:
        ran.append(name)
        return name

    # In a callback of the loop, on Python 3.12 and later: its first step
    # runs at once (here all of it).
    def start() -> tuple[asyncio.Task[str], bool]:
        task = channel.start_task(step("eager"))
        return task, task.done()  # (before the loop runs anything else)

    task, done_at_once = await in_a_callback(start)
    assert isinstance(task, asyncio.Task)
    assert done_at_once is (sys.version_info >= (3, 12))
    assert await task == "eager"
    # From within a task: in the loop's next pass, as a plain task.
    later = channel.start_task(step("later"))
    assert not later.done()
    assert ran == ["eager"]
    assert await later == "later"


async def test_the_channel_makes_asyncio_futures_for_the_running_loop() -> None:
    protocol, _transport, channel = recording_protocol()
    loop = asyncio.get_running_loop()
    lone = channel.send("x")  # (may resume its caller within the read)
    second = channel.send("y")  # (a plain future)
    waiting = asyncio.ensure_future(channel.recv())
    await settle()
    for future in (lone, second):
        assert isinstance(future, asyncio.Future)
        assert future.get_loop() is loop
    await in_a_callback(
        lambda: protocol.data_received(frames([1, 1, "b"], [1, 0, "a"], [0, 0, "r"]))
    )
    assert await asyncio.gather(lone, second) == ["a", "b"]
    assert (await waiting).content == "r"


def test_a_call_made_before_the_loop_runs_gets_a_future_of_the_channels_loop() -> None:
    loop = asyncio.new_event_loop()

    async def connect() -> tuple[ChannelProtocol, Channel]:
        protocol, _transport, channel = recording_protocol()
        return protocol, channel

    try:
        protocol, channel = loop.run_until_complete(connect())
        future = channel.send("early")  # (No loop is running.)
        assert future.get_loop() is loop
        loop.call_soon(protocol.data_received, frames([1, 0, "answer"]))
        assert loop.run_until_complete(future) == "answer"
    finally:
        loop.close()


# The caller's side: a call made while no other waits resumes its caller
# within the read of its reply, as recv() does (see aiomas.channel._Resumable).


@pytest.mark.parametrize("cancellable", [False, True], ids=["send", "cancellable"])
async def test_a_lone_call_resumes_its_caller_within_the_read(
    cancellable: bool,
) -> None:
    protocol, transport, channel = recording_protocol()
    if cancellable:  # (send_cancellable(), over the wire extension)
        feed(protocol, transport, [jframe(OFFER)])
        assert channel.take_offer(await channel.recv())
    send = channel.send_cancellable if cancellable else channel.send
    answers: list[Any] = []

    async def call(content: Any) -> None:
        answers.append(await send(content))

    task = asyncio.ensure_future(call("x"))
    await settle()

    def read() -> bool:
        protocol.data_received(frames([1, 0, "answer"]))
        return task.done()

    assert await in_a_callback(read)
    assert answers == ["answer"]
    # A call made while another waits gets a plain future: its caller
    # resumes in the next pass.  The first one was made alone: once the
    # task that the other reply woke has run, it resumes within its read.
    tasks = [asyncio.ensure_future(call(i)) for i in (1, 2)]
    await settle()

    def read_for(task: asyncio.Task[None], message: Any) -> bool:
        protocol.data_received(frames(message))
        return task.done()

    assert not await in_a_callback(lambda: read_for(tasks[1], [1, 2, "second"]))
    assert await in_a_callback(lambda: read_for(tasks[0], [1, 1, "first"]))
    assert answers == ["answer", "second", "first"]


async def test_a_lone_cancellable_call_tells_the_peer_when_cancelled() -> None:
    protocol, transport, channel = recording_protocol()
    feed(protocol, transport, [jframe(OFFER)])
    assert channel.take_offer(await channel.recv())
    call = asyncio.ensure_future(channel.send_cancellable("y"))
    await settle()
    call.cancel()
    await settle()
    assert call.cancelled()
    assert messages_written(transport)[-1] == [4, 0, None]
    transport.lose_connection()


async def test_a_lone_call_waits_for_the_task_an_earlier_message_woke() -> None:
    # A reply resumes its caller within the read only if no task that an
    # earlier message woke waits to run: callers run in the order of the
    # messages that woke them.
    protocol, _transport, channel = recording_protocol()
    ran: list[Any] = []

    async def call(content: Any) -> None:
        ran.append(await channel.send(content))

    async def serve() -> None:
        request = await channel.recv()
        ran.append(request.content)

    first = asyncio.ensure_future(call("a"))
    await settle()
    second = asyncio.ensure_future(call("b"))  # (Two in flight: plain.)
    server = asyncio.ensure_future(serve())
    await settle()
    loop = asyncio.get_running_loop()
    # One pass: a request (woken later: it comes with more), the reply to
    # the second call, then, in a read of its own, the reply to the first.
    loop.call_soon(protocol.data_received, frames([0, 0, "request"], [1, 1, "b"]))
    loop.call_soon(protocol.data_received, frames([1, 0, "a"]))
    await asyncio.gather(first, second, server)
    assert ran == ["request", "b", "a"]


async def test_the_future_of_a_lone_call_behaves_as_a_future() -> None:
    protocol, _transport, channel = recording_protocol()
    future = channel.send("x")
    assert isinstance(future, asyncio.Future)
    assert asyncio.isfuture(future)
    assert future.get_loop() is asyncio.get_running_loop()
    calls: list[str] = []
    future.add_done_callback(lambda _: calls.append("first"))
    future.add_done_callback(print)
    future.add_done_callback(lambda _: calls.append("second"))
    assert future.remove_done_callback(print) == 1
    await in_a_callback(lambda: protocol.data_received(frames([1, 0, "y"])))
    assert future.result() == "y"
    await settle()
    assert calls == ["first", "second"]  # (In the order they were added.)
    future.add_done_callback(lambda _: calls.append("late"))
    await settle()
    assert calls[-1] == "late"
    # gather(), wait_for() and shield() take it, as any future.
    futures = [channel.send(1)]
    gathered = asyncio.gather(futures[0], asyncio.shield(channel.send(2)))
    await settle()
    await in_a_callback(lambda: protocol.data_received(frames([1, 1, 10])))
    await in_a_callback(lambda: protocol.data_received(frames([1, 2, 20])))
    assert await gathered == [10, 20]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(channel.send(3), TIME_UNIT)
    # (Its late reply is dropped; the channel goes on.)
    protocol.data_received(frames([1, 3, "late"]))
    answer = asyncio.ensure_future(channel.send(4))
    await settle()
    await in_a_callback(lambda: protocol.data_received(frames([1, 4, "four"])))
    assert await answer == "four"


async def test_a_lone_call_cancelled_or_failed_wakes_its_caller() -> None:
    protocol, transport, channel = recording_protocol()

    async def call(content: Any) -> Any:
        return await channel.send(content)

    # (Each caller is a task that waits on the future when its end comes.)
    waiting = asyncio.ensure_future(call("x"))
    await settle()
    waiting.cancel("my reason")
    with pytest.raises(asyncio.CancelledError) as raised:
        await waiting
    assert raised.value.args == ("my reason",)
    await in_a_callback(lambda: protocol.data_received(frames([1, 0, "late"])))
    # A failure reply, and the end of the connection.
    failing = asyncio.ensure_future(call("y"))
    await settle()
    await in_a_callback(lambda: protocol.data_received(frames([2, 1, "Boom\n"])))
    with pytest.raises(RemoteException, match="Boom"):
        await failing
    lost = asyncio.ensure_future(call("z"))
    await settle()
    await in_a_callback(transport.lose_connection)
    with pytest.raises(ConnectionResetError):
        await lost


async def test_a_lone_call_keeps_the_context_of_its_task() -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var")
    protocol, _transport, channel = recording_protocol()

    async def call() -> tuple[str, Any]:
        var.set("mine")
        answer = await channel.send("x")
        return var.get(), answer

    task = asyncio.ensure_future(call())
    await settle()
    await in_a_callback(lambda: protocol.data_received(frames([1, 0, "y"])))
    assert task.done()
    assert await task == ("mine", "y")
    assert var.get("unset") == "unset"


def test_on_uvloop_a_lone_call_resumes_in_the_next_pass() -> None:
    uvloop = pytest.importorskip("uvloop")
    loop = uvloop.new_event_loop()

    async def exchange() -> Any:
        protocol, _transport, channel = recording_protocol()

        async def call() -> Any:
            return await channel.send("x")

        waiting = asyncio.ensure_future(call())
        await settle()

        def read() -> bool:
            protocol.data_received(frames([1, 0, "y"]))
            return waiting.done()

        assert not await in_a_callback(read)
        return await waiting

    try:
        assert loop.run_until_complete(exchange()) == "y"
    finally:
        loop.close()
