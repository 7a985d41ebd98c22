"""Bad input and faults: raw sockets that break the protocol against channels.

In every case the offending connection gets a failure reply (where the request id
can be read) or is closed with a logged reason naming the peer, pending requests end
with an error, and the server keeps serving its other clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

import aiomas
from aiomas.exceptions import ProtocolError, ProtocolResetError
from aiomas.testing import TIME_UNIT

from .helpers import echo_forever


@contextlib.asynccontextmanager
async def echo_server(**kwargs: Any) -> AsyncIterator[tuple[str, int]]:
    server = await aiomas.channel.start_server(("127.0.0.1", 0), echo_forever, **kwargs)
    try:
        yield server.sockets[0].getsockname()[:2]
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)


def raw_frame(payload: bytes) -> bytes:
    return struct.pack(">L", len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = struct.unpack(">L", await reader.readexactly(4))
    return json.loads(await reader.readexactly(size))


async def assert_closed_by_server(reader: asyncio.StreamReader) -> None:
    assert await asyncio.wait_for(reader.read(), 5) == b""


async def assert_still_serving(addr: tuple[str, int]) -> None:
    channel = await aiomas.channel.open_connection(addr)
    assert await asyncio.wait_for(channel.send("still there?"), 5) == "still there?"
    await channel.close()


def warnings_about(caplog: pytest.LogCaptureFixture, port: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "aiomas.channel"
        and r.levelno == logging.WARNING
        and str(port) in r.getMessage()
    ]


BAD_STREAMS = {
    "length above max_frame_size": struct.pack(">L", 2**20 + 1),
    "length 2**32-1": b"\xff\xff\xff\xff",
    "length 0": raw_frame(b""),
    "bad utf-8": raw_frame(b'["\xff\xfe"]'),
    "bad json": raw_frame(b"[0, 1, "),
    "random bytes": raw_frame(bytes(range(256))),
    "not a list": raw_frame(b'"hello"'),
    "a map": raw_frame(b'{"a": 1, "b": 2, "c": 3}'),
    "wrong element types": raw_frame(b'[0, "one", null]'),
    "boolean message type": raw_frame(b"[true, 1, null]"),
    "unknown message type": raw_frame(b"[7, 1, null]"),
    "reply for an id never sent": raw_frame(b"[1, 99, null]"),
    "failure for an id never sent": raw_frame(b'[2, 99, "boom"]'),
    "deeply nested arrays": raw_frame(
        b"[0, 1, " + b"[" * 100_000 + b"]" * 100_000 + b"]"
    ),
}


@pytest.mark.parametrize("stream", BAD_STREAMS.values(), ids=BAD_STREAMS.keys())
async def test_bad_input_closes_only_the_offending_connection(
    stream: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async with echo_server(max_frame_size=2**20) as addr:
        good = await aiomas.channel.open_connection(addr)
        reader, writer = await asyncio.open_connection(*addr)
        port = writer.get_extra_info("sockname")[1]
        writer.write(stream)
        await assert_closed_by_server(reader)
        writer.close()
        await writer.wait_closed()
        # The other client did not notice anything.
        assert await good.send("fine") == "fine"
        await good.close()
        await assert_still_serving(addr)
    messages = warnings_about(caplog, port)
    assert len(messages) == 1, caplog.text
    assert messages[0].startswith("Closing connection to ")
    # Bytes like JSON's garbled, or like no codec at all: no codec hint.
    assert "looks like" not in messages[0]


async def test_request_with_undecodable_content_gets_a_failure_reply(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unknown custom type id breaks only that message: the requester learns
    why, and the connection stays open."""
    async with echo_server() as addr:
        reader, writer = await asyncio.open_connection(*addr)
        writer.write(raw_frame(b'[0, 5, {"__type__": [5, null]}]'))
        msg_type, msg_id, text = await asyncio.wait_for(read_frame(reader), 5)
        assert (msg_type, msg_id) == (2, 5)
        assert text.startswith("SerializationError: Cannot decode the content")
        assert "Unknown type id 5" in text
        writer.write(raw_frame(b'[0, 6, "next"]'))
        assert await asyncio.wait_for(read_frame(reader), 5) == [1, 6, "next"]
        writer.close()
        await writer.wait_closed()
    assert any("Request 5 from" in r.getMessage() for r in caplog.records)


class Fragile:
    """Deserializing it fails on the receiving side."""

    def __init__(self, value: str) -> None:
        self.value = value


def fragile_serializer() -> tuple[type, Any, Any]:
    def deserialize(value: str) -> Fragile:
        if value == "bad":
            raise ValueError("cannot rebuild a bad Fragile")
        return Fragile(value)

    return Fragile, lambda obj: obj.value, deserialize


async def test_reply_with_undecodable_content_fails_only_that_call() -> None:
    async def reply_fragile(channel: aiomas.channel.Channel) -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                request = await channel.recv()
                await request.reply(Fragile(request.content))

    server = await aiomas.channel.start_server(
        ("127.0.0.1", 0), reply_fragile, extra_serializers=[fragile_serializer]
    )
    addr = server.sockets[0].getsockname()[:2]
    channel = await aiomas.channel.open_connection(
        addr, extra_serializers=[fragile_serializer]
    )
    with pytest.raises(aiomas.SerializationError, match="cannot rebuild"):
        await asyncio.wait_for(channel.send("bad"), 5)
    good = await asyncio.wait_for(channel.send("good"), 5)
    assert isinstance(good, Fragile)
    assert good.value == "good"
    await channel.close()
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize(
    "message", [b"[0, 5]", b"[0, 5, null, null]"], ids=["too short", "too long"]
)
async def test_malformed_request_with_readable_id_gets_a_failure_reply(
    message: bytes,
) -> None:
    async with echo_server() as addr:
        reader, writer = await asyncio.open_connection(*addr)
        writer.write(raw_frame(message))
        msg_type, msg_id, text = await asyncio.wait_for(read_frame(reader), 5)
        assert (msg_type, msg_id) == (2, 5)
        assert "ProtocolError" in text
        # The connection survives and works.
        writer.write(raw_frame(b'[0, 6, "next"]'))
        assert await asyncio.wait_for(read_frame(reader), 5) == [1, 6, "next"]
        writer.close()
        await writer.wait_closed()


async def test_frames_split_across_writes_are_reassembled() -> None:
    async with echo_server() as addr:
        reader, writer = await asyncio.open_connection(*addr)
        data = raw_frame(b'[0, 1, "abc"]') + raw_frame(b'[0, 2, "def"]')
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
        assert await asyncio.wait_for(read_frame(reader), 5) == [1, 1, "abc"]
        assert await asyncio.wait_for(read_frame(reader), 5) == [1, 2, "def"]
        writer.close()
        await writer.wait_closed()


async def test_peer_closing_mid_frame_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with echo_server() as addr:
        _reader, writer = await asyncio.open_connection(*addr)
        port = writer.get_extra_info("sockname")[1]
        writer.write(struct.pack(">L", 10) + b"abc")
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        await assert_still_serving(addr)
        for _ in range(100):
            if warnings_about(caplog, port):
                break
            await asyncio.sleep(10 * TIME_UNIT)
    messages = warnings_about(caplog, port)
    assert len(messages) == 1
    assert "in the middle of a frame (7 bytes of it received)" in messages[0]


@contextlib.asynccontextmanager
async def server_that_answers_with(
    payload: bytes, after_frames: int
) -> AsyncIterator[tuple[str, int]]:
    """A raw server that reads *after_frames* frames, then sends *payload* as
    a frame and waits for the client to hang up; yields its address."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(after_frames):
            await read_frame(reader)
        writer.write(raw_frame(payload))
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            await reader.read()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[:2]
    finally:
        server.close()
        await server.wait_closed()


async def test_client_fails_pending_requests_when_server_sends_garbage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with server_that_answers_with(b"[1, 12345, null]", 2) as addr:
        channel = await aiomas.channel.open_connection(addr)
        first, second = channel.send("a"), channel.send("b")
        for future in (first, second):
            with pytest.raises(
                ConnectionResetError, match="unknown message id"
            ) as info:
                await asyncio.wait_for(future, 5)
            assert isinstance(info.value.__cause__, ProtocolError)
        with pytest.raises(ConnectionResetError):
            await channel.recv()
        await channel.close()
    assert "unknown message id 12345" in caplog.text


async def test_an_invalid_message_type_is_a_runtime_and_a_connection_error() -> None:
    """The 1.0.3 docs: send() and recv() raise RuntimeError "if an invalid
    message type was received"; code also catches ConnectionError for it."""
    async with server_that_answers_with(b"[7, 0, null]", 1) as addr:
        channel = await aiomas.channel.open_connection(addr)
        receiving = asyncio.ensure_future(channel.recv())
        pending = channel.send("a")
        errors = []
        for call in (pending, receiving, channel.recv()):
            with pytest.raises(RuntimeError, match="Unknown message type 7") as info:
                await asyncio.wait_for(call, 5)
            errors.append(info.value)
        with pytest.raises(ProtocolResetError):
            channel.send("b")
        for error in errors:
            assert isinstance(error, ConnectionResetError)
            assert isinstance(error, ProtocolResetError)
            assert isinstance(error.__cause__, ProtocolError)
        await channel.close()


async def test_max_frame_size_option_on_the_client() -> None:
    async with echo_server() as addr:
        channel = await aiomas.channel.open_connection(addr, max_frame_size=100)
        assert await channel.send("x" * 50) == "x" * 50
        with pytest.raises(ConnectionResetError, match="max_frame_size"):
            await asyncio.wait_for(channel.send("x" * 200), 5)
        await channel.close()


async def test_server_survives_many_idle_connections() -> None:
    async with echo_server() as addr:
        idle = [await asyncio.open_connection(*addr) for _ in range(100)]
        await assert_still_serving(addr)
        for _reader, writer in idle:
            writer.close()
            await writer.wait_closed()
