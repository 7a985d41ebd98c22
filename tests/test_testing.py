"""Tests for aiomas.testing: the fake link between two cores, the fake
transport, feed(), settle() and the time unit."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import Any

import pytest

import aiomas
from aiomas import testing
from aiomas.channel import ChannelProtocol
from aiomas.codecs import JSON, MsgPack
from aiomas.protocol import Connection, RequestReceived, ResultReceived
from aiomas.testing import (
    FakeTransport,
    connection_pair,
    feed,
    receive,
    sent_messages,
    settle,
    time_unit,
    transfer,
)
from aiomas.wire import frame


def test_no_module_of_aiomas_imports_the_testing_tools() -> None:
    package = Path(testing.__file__).parent
    for path in package.rglob("*.py"):
        if path.name == "testing.py":
            continue
        tree = ast.parse(path.read_text())
        imported = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            f"{node.module}.{alias.name}"
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            for alias in node.names
        }
        assert not any(
            name == "aiomas.testing" or name.startswith("aiomas.testing.")
            for name in imported
        ), path


# --- The time unit ----------------------------------------------------------------


def test_the_time_unit_is_a_millisecond_by_default() -> None:
    assert time_unit({}) == testing.DEFAULT_TIME_UNIT == 0.001
    assert time_unit({"AIOMAS_TESTS_TIME_UNIT": " "}) == 0.001
    assert time_unit({"AIOMAS_TESTS_TIME_UNIT": "0.005"}) == 0.005
    assert time_unit() == testing.TIME_UNIT


@pytest.mark.parametrize("text", ["fast", "0", "-1", "inf", "nan"])
def test_a_bad_time_unit_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="positive number of seconds"):
        time_unit({"AIOMAS_TESTS_TIME_UNIT": text})


# --- settle() ---------------------------------------------------------------------


async def test_settle_runs_what_is_ready_and_what_that_schedules() -> None:
    ran: list[int] = []
    loop = asyncio.get_running_loop()

    def step(n: int) -> None:
        ran.append(n)
        if n < 5:
            loop.call_soon(step, n + 1)

    loop.call_soon(step, 1)
    await settle(0)
    assert ran == []
    await settle(3)
    assert ran == [1, 2, 3]
    await settle()
    assert ran == [1, 2, 3, 4, 5]


# --- Two cores --------------------------------------------------------------------


def test_a_pair_of_cores_talks_through_transfer() -> None:
    client, server = connection_pair(MsgPack, max_frame_size=100)
    assert isinstance(client.codec, MsgPack)
    assert client.codec is not server.codec
    client.send_request("hi")
    assert transfer(client, server) == [RequestReceived(0, "hi")]
    server.send_result(0, "ho")
    assert transfer(server, client) == [ResultReceived(0, "ho")]
    assert transfer(server, client) == []


def test_receive_takes_chunks_with_or_without_copies() -> None:
    data = frame(b'[0, 0, "a"]') + frame(b'[0, 1, "b"]')
    expected = [RequestReceived(0, "a"), RequestReceived(1, "b")]
    pieces = [data[:3], data[3:17], data[17:]]
    assert receive(Connection(JSON()), pieces) == expected
    assert receive(Connection(JSON()), pieces, zero_copy=True) == expected
    # A whole stream needs several buffers.
    big = frame(b'[0, 0, "' + b"x" * 100_000 + b'"]')
    (event,) = receive(Connection(JSON()), [big], zero_copy=True)
    assert event == RequestReceived(0, "x" * 100_000)


def test_sent_messages_decodes_what_a_core_sends() -> None:
    client, _ = connection_pair()
    client.send_request([1, 2])
    client.send_request(None)
    assert sent_messages(client) == [[0, 0, [1, 2]], [0, 1, None]]
    assert sent_messages(client) == []


class Truncating(Connection):
    __slots__ = ()

    def data_to_send(self) -> list[Any]:
        return [frame(b"[0, 0, 1]")[:-1]]


def test_sent_messages_finds_a_partial_frame() -> None:
    with pytest.raises(AssertionError, match="12 bytes of a partial frame"):
        sent_messages(Truncating(JSON()))


# --- FakeTransport ------------------------------------------------------------------


class Recorder(asyncio.BufferedProtocol):
    """Records the calls of its transport; reads into a small buffer."""

    def __init__(self, buffer_size: int = 4) -> None:
        self.calls: list[Any] = []
        self.buffer = bytearray(buffer_size)
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.calls.append("connection_made")

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.calls.append(bytes(self.buffer[:nbytes]))

    def pause_writing(self) -> None:
        self.calls.append("pause_writing")

    def resume_writing(self) -> None:
        self.calls.append("resume_writing")

    def connection_lost(self, exc: Exception | None) -> None:
        self.calls.append(("connection_lost", exc))


class PlainRecorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        self.received.append(data)


def test_a_fake_transport_records_writes_and_extra_info() -> None:
    transport = FakeTransport(extra={"socket": None})
    assert transport.get_extra_info("peername") == ("peer", 1)
    assert transport.get_extra_info("sockname") == ("local", 1)
    assert transport.get_extra_info("socket", "default") is None
    assert transport.get_extra_info("ssl_object") is None
    transport.write(b"ab")
    transport.write(memoryview(b"cd"))
    transport.write(bytearray(b"e"))
    assert transport.writes == [b"ab", b"cd", b"e"]
    assert transport.written == b"abcde"
    assert transport.get_write_buffer_size() == 5
    transport.consume(2)
    assert transport.get_write_buffer_size() == 3
    transport.consume(10)
    assert transport.get_write_buffer_size() == 0
    other = FakeTransport(peername="elsewhere", sockname=None)
    assert other.get_extra_info("peername") == "elsewhere"
    assert other.get_extra_info("sockname") is None


def test_a_fake_transport_connects_its_protocol() -> None:
    with pytest.raises(RuntimeError, match="no protocol"):
        FakeTransport().get_protocol()
    protocol = Recorder()
    transport = FakeTransport(protocol)
    assert protocol.calls == ["connection_made"]
    assert protocol.transport is transport
    assert transport.get_protocol() is protocol
    other = Recorder()
    transport.set_protocol(other)
    assert transport.get_protocol() is other
    assert other.calls == []


def test_write_buffer_limits_pause_and_resume_writing() -> None:
    protocol = Recorder()
    transport = FakeTransport(protocol)
    transport.write(b"x" * 100_000)
    assert not transport.writing_paused  # no limits yet
    transport.set_write_buffer_limits()  # asyncio's: 64 KiB, 16 KiB
    assert transport.writing_paused
    assert protocol.calls[1:] == ["pause_writing"]
    transport.write(b"more")
    transport.consume(50_000)  # 50,004 bytes left: above 16 KiB
    assert protocol.calls[1:] == ["pause_writing"]
    transport.consume()
    assert not transport.writing_paused
    assert protocol.calls[1:] == ["pause_writing", "resume_writing"]
    transport.set_write_buffer_limits(high=10, low=2)
    transport.write(b"x" * 10)
    assert not transport.writing_paused  # (10 is not above 10)
    transport.write(b"x")
    transport.consume(8)
    assert transport.writing_paused
    transport.consume(1)
    assert not transport.writing_paused
    assert protocol.calls[1:] == ["pause_writing", "resume_writing"] * 2


def test_write_buffer_limits_are_checked() -> None:
    transport = FakeTransport()
    transport.set_write_buffer_limits(low=100)  # high: 400
    transport.write(b"x" * 400)
    assert not transport.writing_paused
    transport.write(b"x")
    assert transport.writing_paused  # (no protocol to tell)
    transport.consume(301)
    assert not transport.writing_paused
    with pytest.raises(ValueError, match="must be >= low"):
        transport.set_write_buffer_limits(high=1, low=2)
    with pytest.raises(ValueError, match="must be >= 0"):
        transport.set_write_buffer_limits(high=-4)


def test_reading_can_be_paused() -> None:
    transport = FakeTransport()
    assert transport.is_reading()
    transport.pause_reading()
    assert transport.reading_paused
    assert not transport.is_reading()
    transport.resume_reading()
    assert transport.is_reading()
    transport.close()
    assert not transport.is_reading()


async def test_closing_loses_the_connection_soon_after() -> None:
    protocol = Recorder()
    transport = FakeTransport(protocol)
    transport.close()
    transport.close()  # (twice: once is enough)
    assert transport.is_closing()
    assert not transport.aborted
    assert not transport.lost
    assert protocol.calls == ["connection_made"]
    await settle(1)
    assert transport.lost
    assert protocol.calls == ["connection_made", ("connection_lost", None)]
    transport.lose_connection()
    assert protocol.calls == ["connection_made", ("connection_lost", None)]


async def test_abort_and_lose_connection() -> None:
    protocol = Recorder()
    transport = FakeTransport(protocol)
    transport.abort()
    assert transport.closed
    assert transport.aborted
    error = ConnectionResetError("gone")
    transport.lose_connection(error)  # before the scheduled one
    await settle(1)
    assert protocol.calls == ["connection_made", ("connection_lost", error)]
    alone = FakeTransport()
    alone.abort()
    alone.lose_connection()
    assert alone.closed
    assert not alone.lost


# --- feed() -----------------------------------------------------------------------


def test_feed_fills_the_buffers_of_a_buffered_protocol() -> None:
    protocol = Recorder(buffer_size=4)
    transport = FakeTransport(protocol)
    assert feed(protocol, transport, [b"abcdef", b"", memoryview(b"gh")]) == b""
    assert protocol.calls[1:] == [b"abcd", b"ef", b"gh"]


def test_feed_hands_chunks_to_data_received() -> None:
    protocol = PlainRecorder()
    transport = FakeTransport(protocol)
    assert feed(protocol, transport, [b"abc", bytearray(b"de")]) == b""
    assert protocol.received == [b"abc", b"de"]


class Aborting(Recorder):
    """Aborts its transport after reading *limit* bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__(buffer_size=2)
        self.limit = limit

    def buffer_updated(self, nbytes: int) -> None:
        super().buffer_updated(nbytes)
        self.limit -= nbytes
        if self.limit <= 0:
            assert isinstance(self.transport, asyncio.Transport)
            self.transport.abort()


async def test_feed_stops_when_the_transport_closes() -> None:
    protocol = Aborting(limit=4)
    transport = FakeTransport(protocol)
    assert feed(protocol, transport, [b"abcdef", b"gh"]) == b"efgh"
    assert protocol.calls[1:] == [b"ab", b"cd"]
    again = Aborting(limit=2)
    transport = FakeTransport(again)
    assert feed(again, transport, [b"ab", b"cd", bytearray(b"e")]) == b"cde"
    await settle(1)


def test_feed_stops_while_reading_is_paused() -> None:
    protocol = PlainRecorder()
    transport = FakeTransport(protocol)
    transport.pause_reading()
    assert feed(protocol, transport, [b"ab", b"c"]) == b"abc"
    assert protocol.received == []


def test_feed_refuses_an_empty_buffer() -> None:
    protocol = Recorder(buffer_size=0)
    with pytest.raises(RuntimeError, match="empty buffer"):
        feed(protocol, FakeTransport(protocol), [b"a"])


async def test_a_channel_on_a_fake_transport() -> None:
    protocol = ChannelProtocol(aiomas.JSON())
    transport = FakeTransport(protocol)
    channel = protocol.channel
    assert channel is not None
    assert channel.peername == ("peer", 1)
    reply = channel.send("hi")
    assert transport.written == frame(b'[0, 0, "hi"]')
    feed(protocol, transport, [frame(b'[1, 0, "ho"]')])
    assert await reply == "ho"
    await channel.close()  # (the fake transport loses the connection)
    assert transport.lost
