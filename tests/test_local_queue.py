"""Tests for the LocalQueue transport (aiomas.local_queue).

LocalQueue hands data over in ``loop.call_soon()`` callbacks only, so a few
``asyncio.sleep(0)`` rounds (:func:`aiomas.testing.settle`) run everything that is
due: no test needs real time.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aiomas
from aiomas import local_queue
from aiomas.local_queue import (
    LocalQueue,
    LocalQueueServer,
    LocalQueueTransport,
    clear_queue_cache,
    create_connection,
    create_server,
    get_queue,
)
from aiomas.testing import settle

Event = tuple[Any, ...]


class Recorder(asyncio.Protocol):
    """Records its events; optionally echoes or keeps the connection open on EOF.

    Received data is also appended as ``(name, data)`` to *log*, which several
    protocols may share to record the global arrival order.
    """

    def __init__(
        self,
        name: str = "",
        log: list[tuple[str, bytes]] | None = None,
        *,
        echo: bool = False,
        keep_open: bool = False,
        greeting: bytes = b"",
    ) -> None:
        self.name = name
        self.log = [] if log is None else log
        self.echo = echo
        self.keep_open = keep_open
        self.greeting = greeting
        self.events: list[Event] = []
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[Exception | None] = (
            asyncio.get_running_loop().create_future()
        )

    @property
    def data(self) -> bytes:
        return b"".join(e[1] for e in self.events if e[0] == "data")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert not self.events, "connection_made() must come first"
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.events.append(("made",))
        if self.greeting:
            transport.write(self.greeting)

    def data_received(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.events.append(("data", data))
        self.log.append((self.name, data))
        if self.echo:
            assert self.transport is not None
            self.transport.write(data)

    def eof_received(self) -> bool:
        self.events.append(("eof",))
        return self.keep_open

    def pause_writing(self) -> None:
        self.events.append(("pause",))

    def resume_writing(self) -> None:
        self.events.append(("resume",))

    def connection_lost(self, exc: Exception | None) -> None:
        assert not self.lost.done(), "connection_lost() called twice"
        self.events.append(("lost", exc))
        self.lost.set_result(exc)


class SmallBuffers(asyncio.BufferedProtocol):
    """A buffered protocol with a tiny buffer; records the size of every piece."""

    def __init__(self, size: int, *, pause_after: int | None = None) -> None:
        self.buffer = bytearray(size)
        self.pieces: list[bytes] = []
        self.pause_after = pause_after
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[Exception | None] = (
            asyncio.get_running_loop().create_future()
        )

    @property
    def data(self) -> bytes:
        return b"".join(self.pieces)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> bytearray:
        assert sizehint > 0
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.pieces.append(bytes(self.buffer[:nbytes]))
        # Resizing fails if the transport still holds a view of the buffer.
        size = len(self.buffer)
        self.buffer.clear()
        self.buffer.extend(bytes(size))
        if len(self.pieces) == self.pause_after:
            assert self.transport is not None
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


@pytest.fixture(autouse=True)
async def no_tasks_left() -> AsyncIterator[None]:
    """LocalQueue must not leave tasks behind (it runs none)."""
    yield
    assert asyncio.all_tasks() == {asyncio.current_task()}


@pytest.fixture(autouse=True)
async def reports() -> AsyncIterator[list[dict[str, Any]]]:
    """What reached the loop's exception handler; must be empty at the end unless
    the test takes (clears) what it expected."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    yield reported
    loop.set_exception_handler(None)
    assert not reported, f"Unexpected errors: {reported}"


def bound(lq: LocalQueue) -> LocalQueueServer | None:
    """The server bound to *lq* (a function, so mypy does not narrow it)."""
    return lq.server


async def serve(
    lq: LocalQueue, make: Callable[[], asyncio.BaseProtocol] = Recorder, **kwds: Any
) -> tuple[LocalQueueServer, list[Any]]:
    """Start a server on *lq*; return it and the list of protocols it makes."""
    protocols: list[Any] = []

    def factory() -> asyncio.BaseProtocol:
        protocol = make()
        protocols.append(protocol)
        return protocol

    return await create_server(factory, lq, **kwds), protocols


# Queues


def test_get_queue_caches_instances() -> None:
    q = get_queue("spam")
    assert get_queue("spam") is q
    assert get_queue("eggs") is not q
    assert aiomas.get_queue is get_queue
    assert (q.queue_id, q.server) == ("spam", None)
    assert repr(q) == "LocalQueue('spam')"


@pytest.mark.parametrize("bad", [42, None, b"spam", "a/b", "/"])
def test_get_queue_rejects_bad_ids(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"string|'/'"):
        get_queue(bad)


def test_clear_queue_cache() -> None:
    q = get_queue("spam")
    clear_queue_cache()
    assert get_queue("spam") is not q


def test_module_exports() -> None:
    assert sorted(local_queue.__all__) == [
        "LocalQueue",
        "LocalQueueServer",
        "LocalQueueTransport",
        "Network",
        "Route",
        "clear_queue_cache",
        "create_connection",
        "create_server",
        "get_queue",
    ]


async def test_one_server_per_queue() -> None:
    lq = get_queue("busy")
    server, _ = await serve(lq)
    assert isinstance(server, LocalQueueServer)
    assert isinstance(server, asyncio.AbstractServer)
    assert lq.server is server
    assert server.lq is lq
    with pytest.raises(RuntimeError, match="already has a server"):
        await create_server(Recorder, lq)
    with pytest.raises(RuntimeError, match="already has a server"):
        lq.set_server(server)
    assert bound(lq) is server
    lq.unset_server()
    assert bound(lq) is None
    lq.set_server(server)
    server.close()
    assert bound(lq) is None
    # Closing a server unbinds only itself.
    other, _ = await serve(lq)
    lq.unset_server()
    lq.set_server(server)
    other.close()
    assert bound(lq) is server
    lq.unset_server()


async def test_connecting_without_a_server_is_refused() -> None:
    lq = get_queue("nobody")
    with pytest.raises(ConnectionRefusedError):
        await create_connection(Recorder, lq)
    with pytest.raises(ConnectionRefusedError):
        lq.new_connection(asyncio.Queue(), asyncio.Queue())


# Data transfer


async def test_echo_round_trip() -> None:
    lq = get_queue("echo")
    server, served = await serve(lq, lambda: Recorder("server", echo=True))
    made = server.protocol_factory()  # the factory serve() passed
    assert served == [made]
    served.clear()
    with pytest.raises(AttributeError):
        server.protocol_factory = Recorder  # type: ignore[misc]
    transport, client = await create_connection(Recorder, lq)
    assert isinstance(transport, LocalQueueTransport)
    assert isinstance(client, Recorder)
    # create_connection() returns once connection_made() ran on both ends.
    assert client.events == [("made",)]
    assert served[0].events == [("made",)]
    assert client.transport is transport
    assert transport.get_protocol() is client

    transport.write(b"hello")
    assert client.events == [("made",)]  # delivered later, never synchronously
    await settle()
    assert served[0].events == [("made",), ("data", b"hello")]
    assert client.events == [("made",), ("data", b"hello")]

    transport.close()
    assert await asyncio.wait_for(client.lost, 1) is None
    assert await asyncio.wait_for(served[0].lost, 1) is None
    server.close()


async def test_cancelling_create_connection_closes_the_new_connection() -> None:
    lq = get_queue("cancelled")
    server, served = await serve(lq)
    clients: list[Recorder] = []

    def factory() -> Recorder:
        clients.append(Recorder())
        return clients[-1]

    task = asyncio.ensure_future(create_connection(factory, lq))
    await asyncio.sleep(0)  # create_connection() now waits for connection_made()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settle()
    assert clients[0].events == [("made",), ("lost", None)]
    assert served[0].events == [("made",), ("eof",), ("lost", None)]
    server.close()


async def test_extra_info_names_both_ends() -> None:
    lq = get_queue("names")
    server, served = await serve(lq)
    first, _ = await create_connection(Recorder, lq)
    second, _ = await create_connection(Recorder, lq)
    server_end = served[1].transport
    assert first.get_extra_info("peername") == "names"
    assert first.get_extra_info("sockname") == "names#1"
    assert second.get_extra_info("sockname") == "names#2"
    assert server_end.get_extra_info("peername") == "names#2"
    assert server_end.get_extra_info("sockname") == "names"
    assert first.get_extra_info("socket") is None
    assert first.get_extra_info("nothing", 42) == 42
    assert repr(first) == "<LocalQueueTransport 'names' open>"
    first.close()
    assert repr(first) == "<LocalQueueTransport 'names' closing>"
    second.close()
    await settle()
    assert repr(first) == "<LocalQueueTransport 'names' closed>"
    server.close()


async def test_write_copies_and_checks_its_data() -> None:
    lq = get_queue("copies")
    server, served = await serve(lq)
    transport, _ = await create_connection(Recorder, lq)
    buffer = bytearray(b"abc")
    transport.write(buffer)
    buffer[:] = b"xyz"  # a transport owns a copy once write() returned
    transport.write(memoryview(b"-def-")[1:4])
    transport.writelines([b"g", bytearray(b"h"), memoryview(b"i")])
    transport.write(b"")  # writes nothing and delivers nothing
    with pytest.raises(TypeError):
        transport.write("text")  # type: ignore[arg-type]
    await settle()
    assert served[0].events[1:] == [
        ("data", b"abc"),
        ("data", b"def"),
        ("data", b"ghi"),
    ]
    transport.close()
    await served[0].lost
    server.close()


async def test_data_written_in_connection_made_arrives_later() -> None:
    lq = get_queue("greeting")
    server, _ = await serve(lq, lambda: Recorder(greeting=b"welcome"))
    transport, client = await create_connection(Recorder, lq)
    await settle()
    assert client.events == [("made",), ("data", b"welcome")]
    transport.close()
    await client.lost
    server.close()


async def test_buffered_protocol_gets_a_large_write_in_pieces() -> None:
    lq = get_queue("buffered")
    server, served = await serve(lq, lambda: SmallBuffers(3))
    transport, _ = await create_connection(Recorder, lq)
    payload = bytes(range(100))
    transport.write(payload)
    transport.write(b"end")
    await settle()
    receiver = served[0]
    assert receiver.data == payload + b"end"
    assert [len(piece) for piece in receiver.pieces] == [3] * 33 + [1, 3]
    transport.close()
    assert await asyncio.wait_for(receiver.lost, 1) is None
    server.close()


async def test_buffered_protocol_that_pauses_gets_the_rest_later() -> None:
    lq = get_queue("buffered-pause")
    server, served = await serve(lq, lambda: SmallBuffers(4, pause_after=1))
    transport, _ = await create_connection(Recorder, lq)
    transport.write(b"0123456789")
    transport.write(b"AB")
    await settle()
    receiver = served[0]
    assert receiver.pieces == [b"0123"]
    assert receiver.transport.get_write_buffer_size() == 0
    assert transport.get_write_buffer_size() == 8  # the rest waits for the peer
    receiver.transport.resume_reading()
    await settle()
    assert receiver.pieces == [b"0123", b"4567", b"89", b"AB"]
    assert transport.get_write_buffer_size() == 0
    transport.close()
    await receiver.lost
    server.close()


async def test_an_empty_buffer_is_a_fatal_error(
    reports: list[dict[str, Any]],
) -> None:
    lq = get_queue("empty-buffer")
    server, served = await serve(lq, lambda: SmallBuffers(0))
    transport, client = await create_connection(Recorder, lq)
    transport.write(b"data")
    exc = await asyncio.wait_for(served[0].lost, 1)
    assert isinstance(exc, RuntimeError)
    assert "empty buffer" in str(exc)
    assert isinstance(await asyncio.wait_for(client.lost, 1), ConnectionResetError)
    assert [r["exception"] for r in reports] == [exc]
    assert reports[0]["transport"] is served[0].transport
    reports.clear()
    server.close()


async def test_aborting_within_data_received() -> None:
    class Aborting(Recorder):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            assert self.transport is not None
            self.transport.abort()

    lq = get_queue("abort-on-data")
    server, served = await serve(lq, Aborting)
    transport, client = await create_connection(Recorder, lq)
    transport.write(b"first")
    transport.write(b"dropped")
    await settle()
    assert served[0].events == [("made",), ("data", b"first"), ("lost", None)]
    assert isinstance(await client.lost, ConnectionResetError)
    assert transport.get_write_buffer_size() == 0
    server.close()


async def test_set_protocol_redirects_further_data() -> None:
    lq = get_queue("switch")
    server, served = await serve(lq)
    transport, _ = await create_connection(Recorder, lq)
    transport.write(b"one")
    await settle()
    server_end = served[0].transport
    other = Recorder()
    server_end.set_protocol(other)
    assert server_end.get_protocol() is other
    transport.write(b"two")
    transport.close()
    await asyncio.wait_for(other.lost, 1)
    assert served[0].data == b"one"
    assert other.events == [("data", b"two"), ("eof",), ("lost", None)]
    server.close()


# Closing


async def test_close_delivers_pending_data_then_eof_then_loses_both_ends() -> None:
    lq = get_queue("close")
    server, served = await serve(lq)
    transport, client = await create_connection(Recorder, lq)
    transport.write(b"last")
    transport.write(b"words")
    transport.close()
    assert transport.is_closing()
    assert not transport.is_reading()
    assert client.events == [("made",)]  # connection_lost() comes later
    transport.close()  # twice is harmless
    await settle()
    assert served[0].events == [
        ("made",),
        ("data", b"last"),
        ("data", b"words"),
        ("eof",),
        ("lost", None),
    ]
    assert client.events == [("made",), ("lost", None)]
    assert served[0].transport.is_closing()
    server.close()


async def test_the_closing_end_is_lost_only_after_the_peer_took_its_data() -> None:
    lq = get_queue("slow-reader")
    server, served = await serve(lq)
    transport, client = await create_connection(Recorder, lq)
    served[0].transport.pause_reading()
    transport.write(b"pending")
    transport.close()
    await settle()
    assert client.events == [("made",)]
    assert transport.get_write_buffer_size() == 7
    served[0].transport.resume_reading()
    await settle()
    assert client.events == [("made",), ("lost", None)]
    assert served[0].events[1:] == [("data", b"pending"), ("eof",), ("lost", None)]
    server.close()


async def test_eof_received_may_keep_the_connection_open() -> None:
    lq = get_queue("half-open")
    server, served = await serve(lq, lambda: Recorder(keep_open=True))
    transport, client = await create_connection(Recorder, lq)
    transport.close()
    await settle()
    server_end = served[0].transport
    assert served[0].events == [("made",), ("eof",)]
    assert not server_end.is_closing()
    server_end.write(b"nobody listens")  # the client has closed: discarded
    assert server_end.get_write_buffer_size() == 0
    await settle()
    assert client.events == [("made",), ("lost", None)]
    server_end.close()
    assert await asyncio.wait_for(served[0].lost, 1) is None
    server.close()


async def test_writes_after_close_are_ignored() -> None:
    lq = get_queue("late-writes")
    server, served = await serve(lq)
    transport, client = await create_connection(Recorder, lq)
    transport.close()
    transport.write(b"too late")
    transport.writelines([b"too", b"late"])
    await settle()
    assert served[0].data == b""
    assert client.events == [("made",), ("lost", None)]
    transport.write(b"after connection_lost()")
    server.close()


async def test_abort_drops_data_and_resets_the_peer() -> None:
    lq = get_queue("abort")
    server, served = await serve(lq)
    transport, client = await create_connection(Recorder, lq)
    transport.write(b"never delivered")
    transport.abort()
    assert transport.is_closing()
    assert client.events == [("made",)]  # connection_lost() comes later
    transport.abort()  # twice is harmless
    transport.close()
    await settle()
    assert client.events == [("made",), ("lost", None)]
    [made, (lost, exc)] = served[0].events
    assert (made, lost) == (("made",), "lost")
    assert isinstance(exc, ConnectionResetError)
    assert served[0].transport.is_closing()
    server.close()


async def test_abort_after_close_resets_the_peer() -> None:
    lq = get_queue("close-abort")
    server, served = await serve(lq)
    transport, client = await create_connection(Recorder, lq)
    transport.write(b"dropped")
    transport.close()
    transport.abort()
    await settle()
    assert client.events == [("made",), ("lost", None)]
    assert served[0].data == b""
    assert isinstance(await served[0].lost, ConnectionResetError)
    server.close()


async def test_abort_after_the_peer_dropped_our_data() -> None:
    lq = get_queue("drop-abort")
    server, served = await serve(lq)
    transport, client = await create_connection(Recorder, lq)
    transport.set_write_buffer_limits(high=1, low=0)
    served[0].transport.pause_reading()
    transport.write(b"unread")
    served[0].transport.close()  # drops b"unread"
    transport.abort()  # before writing could resume
    await settle()
    assert client.events == [("made",), ("pause",), ("lost", None)]
    assert served[0].events == [("made",), ("lost", None)]
    server.close()


async def test_abort_by_the_server_end() -> None:
    lq = get_queue("server-abort")
    server, served = await serve(lq)
    transport, client = await create_connection(Recorder, lq)
    transport.write(b"unread")
    served[0].transport.abort()
    await settle()
    assert served[0].events == [("made",), ("lost", None)]
    assert isinstance(await client.lost, ConnectionResetError)
    assert transport.is_closing()
    assert transport.get_write_buffer_size() == 0
    server.close()


# Reading and writing flow control


async def test_pause_reading_holds_data_and_eof() -> None:
    lq = get_queue("pause")
    server, served = await serve(lq, lambda: Recorder(echo=True))
    transport, client = await create_connection(Recorder, lq)
    assert transport.is_reading()
    transport.pause_reading()
    transport.pause_reading()  # twice is harmless
    assert not transport.is_reading()
    for chunk in (b"a", b"b", b"c"):
        transport.write(chunk)
    await settle()
    assert served[0].data == b"abc"
    assert client.events == [("made",)]
    served[0].transport.close()
    await settle()
    assert client.events == [("made",)]  # the end of the stream waits, too
    transport.resume_reading()
    assert transport.is_reading()
    transport.resume_reading()  # twice is harmless
    assert client.events == [("made",)]  # delivered later, never synchronously
    await settle()
    assert client.events == [
        ("made",),
        ("data", b"a"),
        ("data", b"b"),
        ("data", b"c"),
        ("eof",),
        ("lost", None),
    ]
    transport.pause_reading()  # on a closed transport: no effect
    assert not transport.is_reading()
    server.close()


async def test_held_data_keeps_its_place_in_the_global_order() -> None:
    """Pausing and resuming repeatedly must not let later data overtake the
    data of other connections."""
    log: list[tuple[str, bytes]] = []
    lq = get_queue("resume-order")
    server, served = await serve(lq)
    t1, _ = await create_connection(lambda: Recorder("c1", log), lq)
    t2, _ = await create_connection(lambda: Recorder("c2", log), lq)
    s1, s2 = (p.transport for p in served)
    t1.pause_reading()
    s1.write(b"A")
    await settle()
    t1.resume_reading()
    t1.pause_reading()
    t1.resume_reading()
    s2.write(b"X")
    s1.write(b"B")
    await settle()
    assert log == [("c1", b"A"), ("c2", b"X"), ("c1", b"B")]
    t1.close()
    t2.close()
    await settle()
    server.close()


async def test_write_buffer_limits() -> None:
    lq = get_queue("limits")
    server, _ = await serve(lq)
    transport, _ = await create_connection(Recorder, lq)
    assert transport.get_write_buffer_limits() == (16384, 65536)
    transport.set_write_buffer_limits(low=100)
    assert transport.get_write_buffer_limits() == (100, 400)
    transport.set_write_buffer_limits(high=100)
    assert transport.get_write_buffer_limits() == (25, 100)
    transport.set_write_buffer_limits(high=10, low=10)
    assert transport.get_write_buffer_limits() == (10, 10)
    with pytest.raises(ValueError, match="high"):
        transport.set_write_buffer_limits(high=1, low=2)
    with pytest.raises(ValueError, match="high"):
        transport.set_write_buffer_limits(high=1, low=-1)
    assert transport.get_write_buffer_limits() == (10, 10)
    transport.close()
    await settle()
    server.close()


async def test_a_slow_reader_pauses_the_writer() -> None:
    lq = get_queue("backpressure")
    server, served = await serve(lq)
    transport, client = await create_connection(Recorder, lq)
    transport.set_write_buffer_limits(high=10, low=4)
    reader = served[0].transport
    reader.pause_reading()
    transport.write(b"12345678")
    assert transport.get_write_buffer_size() == 8
    transport.writelines([b"9", bytearray(b"ab")])  # (as write() would)
    assert transport.get_write_buffer_size() == 11
    assert client.events == [("made",), ("pause",)]
    transport.write(b"c")
    assert client.events == [("made",), ("pause",)]  # paused once
    await settle()
    assert transport.get_write_buffer_size() == 12
    reader.resume_reading()
    await settle()
    assert served[0].data == b"123456789abc"
    assert transport.get_write_buffer_size() == 0
    assert client.events == [("made",), ("pause",), ("resume",)]
    # Lowering the limit below what is buffered pauses at once.
    reader.pause_reading()
    transport.write(b"xyz")
    transport.set_write_buffer_limits(high=2, low=0)
    assert client.events[-1] == ("pause",)
    reader.close()  # the reader drops what it did not read: writing resumes
    await settle()
    assert client.events[-3:] == [("resume",), ("eof",), ("lost", None)]
    server.close()


# Servers


async def test_closing_the_server_keeps_existing_connections() -> None:
    lq = get_queue("keep")
    server, _ = await serve(lq, lambda: Recorder(echo=True))
    transport, client = await create_connection(Recorder, lq)
    assert server.is_serving()
    server.close()
    assert not server.is_serving()
    assert bound(lq) is None
    server.close()  # twice is harmless
    await server.wait_closed()
    with pytest.raises(ConnectionRefusedError):
        await create_connection(Recorder, lq)
    with pytest.raises(ConnectionRefusedError):
        server.new_connection(asyncio.Queue(), asyncio.Queue())
    transport.write(b"still here")
    await settle()
    assert client.data == b"still here"
    # The queue is free for a new server.
    new_server, _ = await serve(lq)
    assert bound(lq) is new_server
    transport.close()
    await client.lost
    new_server.close()


@pytest.mark.parametrize("how", ["close_clients", "abort_clients"])
async def test_close_and_abort_clients(how: str) -> None:
    lq = get_queue(how)
    server, served = await serve(lq)
    clients = [await create_connection(Recorder, lq) for _ in range(3)]
    getattr(server, how)()
    await settle()
    for (_, client), server_end in zip(clients, served, strict=True):
        assert_closed_by_server(how, client)
        assert server_end.events[-1] == ("lost", None)
    # The server still accepts connections, and closes only those still open.
    _, client = await create_connection(Recorder, lq)
    getattr(server, how)()
    await settle()
    assert_closed_by_server(how, client)
    assert [len(p.events) for p in served] == [2] * 4
    server.close()


def assert_closed_by_server(how: str, client: Recorder) -> None:
    if how == "close_clients":
        assert client.events == [("made",), ("eof",), ("lost", None)]
    else:
        [made, (lost, exc)] = client.events
        assert (made, lost) == (("made",), "lost")
        assert isinstance(exc, ConnectionResetError)


async def test_async_with_closes_the_server() -> None:
    lq = get_queue("context")
    async with await create_server(Recorder, lq) as server:
        assert server.get_loop() is asyncio.get_running_loop()
        assert server.is_serving()
        assert repr(server) == "<LocalQueueServer 'context' serving>"
    assert not server.is_serving()
    assert lq.server is None
    assert repr(server) == "<LocalQueueServer 'context' closed>"


async def test_serve_forever_until_cancelled() -> None:
    lq = get_queue("forever")
    server = await create_server(Recorder, lq)
    task = asyncio.ensure_future(server.serve_forever())
    await settle()
    with pytest.raises(RuntimeError, match="already"):
        await server.serve_forever()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not server.is_serving()
    assert lq.server is None
    with pytest.raises(RuntimeError, match="closed"):
        await server.serve_forever()
    with pytest.raises(RuntimeError, match="closed"):
        await server.start_serving()


async def test_close_ends_serve_forever() -> None:
    lq = get_queue("forever-close")
    server = await create_server(Recorder, lq)
    task = asyncio.ensure_future(server.serve_forever())
    await settle()
    server.close()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_server_may_start_serving_later() -> None:
    lq = get_queue("later")
    server = await create_server(Recorder, lq, start_serving=False)
    assert lq.server is server
    assert not server.is_serving()
    assert repr(server) == "<LocalQueueServer 'later' idle>"
    with pytest.raises(ConnectionRefusedError):
        await create_connection(Recorder, lq)
    await server.start_serving()
    await server.start_serving()  # twice is harmless
    transport, client = await create_connection(Recorder, lq)
    transport.close()
    await client.lost
    server.close()


async def test_tls_is_refused_and_tcp_options_are_ignored() -> None:
    lq = get_queue("options")
    with pytest.raises(ValueError, match="TLS"):
        await create_server(Recorder, lq, ssl=True)
    assert lq.server is None
    server = await create_server(Recorder, lq, ssl=None, backlog=5, reuse_port=True)
    with pytest.raises(ValueError, match="TLS"):
        await create_connection(Recorder, lq, ssl=object())
    # ssl=False means plain, as with asyncio.
    transport, protocol = await create_connection(Recorder, lq, ssl=False)
    transport.close()
    await protocol.lost
    transport, client = await create_connection(
        Recorder, lq, ssl=None, server_hostname="x", loop=asyncio.get_running_loop()
    )
    transport.close()
    await client.lost
    server.close()


async def test_a_foreign_loop_is_refused() -> None:
    lq = get_queue("foreign-loop")
    other = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError, match="loop"):
            await create_server(Recorder, lq, loop=other)
        server = await create_server(Recorder, lq)
        with pytest.raises(ValueError, match="loop"):
            await create_connection(Recorder, lq, loop=other)
    finally:
        other.close()
    server.close()


# Errors in protocols


async def test_a_failing_server_factory_refuses_the_connection(
    reports: list[dict[str, Any]],
) -> None:
    def broken() -> asyncio.Protocol:
        raise ValueError("factory bug")

    lq = get_queue("bad-factory")
    server = await create_server(broken, lq)
    with pytest.raises(ConnectionRefusedError) as info:
        await create_connection(Recorder, lq)
    assert isinstance(info.value.__cause__, ValueError)
    assert [r["exception"] for r in reports] == [info.value.__cause__]
    assert reports[0]["server"] is server
    reports.clear()
    server.close()


async def test_a_failing_client_factory_resets_the_server_end() -> None:
    def broken() -> asyncio.Protocol:
        raise ValueError("factory bug")

    lq = get_queue("bad-client-factory")
    server, served = await serve(lq)
    with pytest.raises(ValueError, match="factory bug"):
        await create_connection(broken, lq)
    exc = await asyncio.wait_for(served[0].lost, 1)
    assert isinstance(exc, ConnectionResetError)
    assert served[0].events[0] == ("made",)
    server.close()


class Failing(Recorder):
    """Raises in the callback named *where*."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def _maybe_fail(self, where: str) -> None:
        if where == self.where:
            raise ValueError(f"bug in {where}()")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._maybe_fail("connection_made")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._maybe_fail("data_received")

    def eof_received(self) -> bool:
        super().eof_received()
        self._maybe_fail("eof_received")
        return False


@pytest.mark.parametrize("where", ["connection_made", "data_received", "eof_received"])
async def test_a_failing_callback_is_reported_and_aborts_the_connection(
    where: str, reports: list[dict[str, Any]]
) -> None:
    lq = get_queue(f"failing-{where}")
    # Only the first connection's protocol fails.
    protocols = iter([Failing(where), Recorder()])
    server, served = await serve(lq, lambda: next(protocols))
    transport, client = await create_connection(Recorder, lq)
    other_transport, other = await create_connection(Recorder, lq)
    transport.write(b"x")
    if where == "eof_received":
        transport.close()
    exc = await asyncio.wait_for(served[0].lost, 1)
    assert isinstance(exc, ValueError)
    assert str(exc) == f"bug in {where}()"
    assert served[0].events[-1] == ("lost", exc)
    assert [r["exception"] for r in reports] == [exc]
    assert reports[0]["protocol"] is served[0]
    assert where.split("_")[0] in reports[0]["message"]
    reports.clear()
    if where != "eof_received":
        assert isinstance(await client.lost, ConnectionResetError)
    # The loop goes on, and so do the other connections.
    other_transport.write(b"fine")
    await settle()
    assert served[1].data == b"fine"
    other_transport.close()
    await other.lost
    server.close()


async def test_failing_flow_control_and_connection_lost_are_reported(
    reports: list[dict[str, Any]],
) -> None:
    class Clumsy(Recorder):
        def pause_writing(self) -> None:
            raise ValueError("pause")

        def resume_writing(self) -> None:
            raise ValueError("resume")

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            raise ValueError("lost")

    lq = get_queue("clumsy")
    server, served = await serve(lq)
    transport, client = await create_connection(Clumsy, lq)
    transport.set_write_buffer_limits(high=0)
    served[0].transport.pause_reading()
    transport.write(b"x")
    assert not transport.is_closing()  # a failing pause_writing() is no reason
    served[0].transport.resume_reading()
    transport.close()
    await settle()
    assert client.lost.result() is None
    assert [str(r["exception"]) for r in reports] == ["pause", "resume", "lost"]
    reports.clear()
    server.close()


# Transports made by hand


async def test_transports_find_their_peer_through_the_queues() -> None:
    lq = get_queue("by-hand")
    a_to_b: asyncio.Queue[bytes | None] = asyncio.Queue()
    b_to_a: asyncio.Queue[bytes | None] = asyncio.Queue()
    a, b = Recorder("a", echo=True), Recorder("b")
    a_end = LocalQueueTransport(lq, a_to_b, b_to_a, a)
    a_end.write(b"early")  # before its peer exists: waits in the queue
    b_end = LocalQueueTransport(lq, b_to_a, a_to_b, b)
    b_end.write(b"ping")
    await settle()
    assert a.data == b"ping"
    assert b.data == b"earlyping"
    with pytest.raises(ValueError, match="different"):
        LocalQueueTransport(lq, a_to_b, a_to_b, Recorder())
    with pytest.raises(ValueError, match="already reads"):
        LocalQueueTransport(lq, asyncio.Queue(), a_to_b, Recorder())
    with pytest.raises(ValueError, match="not our peer"):
        LocalQueueTransport(lq, a_to_b, asyncio.Queue(), Recorder())
    a_end.close()
    await settle()
    assert a.events[-1] == ("lost", None)
    assert b.events[-2:] == [("eof",), ("lost", None)]


async def test_a_transport_made_by_hand_may_close_before_its_peer_exists() -> None:
    lq = get_queue("by-hand-early-close")
    a_to_b: asyncio.Queue[bytes | None] = asyncio.Queue()
    b_to_a: asyncio.Queue[bytes | None] = asyncio.Queue()
    a, b = Recorder("a"), Recorder("b")
    a_end = LocalQueueTransport(lq, a_to_b, b_to_a, a)
    await settle()
    a_end.write(b"early")
    a_end.close()  # Nobody reads yet: lost at once, the data waits.
    await settle()
    assert a.events == [("made",), ("lost", None)]
    b_end = LocalQueueTransport(lq, b_to_a, a_to_b, b)
    b_end.write(b"too late")  # a_end has closed its reading end: discarded
    await settle()
    assert b.events == [("made",), ("data", b"early"), ("eof",), ("lost", None)]
    assert a.events == [("made",), ("lost", None)]
    assert (a_end.get_write_buffer_size(), b_end.get_write_buffer_size()) == (0, 0)


async def test_a_queue_has_one_writer() -> None:
    lq = get_queue("one-writer")
    a_to_b: asyncio.Queue[bytes | None] = asyncio.Queue()
    a = Recorder()
    a_end = LocalQueueTransport(lq, a_to_b, asyncio.Queue(), a)
    with pytest.raises(ValueError, match="already writes"):
        LocalQueueTransport(lq, a_to_b, asyncio.Queue(), Recorder())
    a_end.close()
    await a.lost


async def test_unsupported_half_close() -> None:
    lq = get_queue("half-close")
    server, _ = await serve(lq)
    transport, client = await create_connection(Recorder, lq)
    assert not transport.can_write_eof()
    with pytest.raises(NotImplementedError):
        transport.write_eof()
    transport.close()
    await client.lost
    server.close()


# The point of LocalQueue: one deterministic order


async def interleaved_run(name: str) -> list[tuple[str, bytes]]:
    """Three clients and an echoing server exchange messages; return the
    arrival order of everything, at all ends."""
    log: list[tuple[str, bytes]] = []
    lq = get_queue(name)
    server, _ = await serve(lq, lambda: Recorder("server", log, echo=True))
    clients = [
        await create_connection(lambda i=i: Recorder(f"client{i}", log), lq)  # type: ignore[misc]
        for i in range(3)
    ]
    written = []
    for round_ in range(5):
        # Client 0 writes twice per round: arrival follows the write() calls,
        # not the connections.
        for i in [0, 2, 0, 1]:
            message = f"{i}:{round_};".encode()
            clients[i][0].write(message)
            written.append(message)
        await asyncio.sleep(0)
    for transport, protocol in clients:
        transport.close()
        await protocol.lost
    server.close()
    assert [data for who, data in log if who == "server"] == written
    return log


async def test_messages_of_many_connections_arrive_in_write_order() -> None:
    runs = [await interleaved_run(f"order-{i}") for i in range(5)]
    assert all(run == runs[0] for run in runs)
    # The echoes interleave with the requests, also reproducibly.
    assert {who for who, _ in runs[0]} == {"server", "client0", "client1", "client2"}


async def test_the_order_holds_across_queues() -> None:
    log: list[tuple[str, bytes]] = []
    servers = []
    transports = []
    for name in ("left", "right"):
        server, _ = await serve(get_queue(name), lambda n=name: Recorder(n, log))  # type: ignore[misc]
        servers.append(server)
        transports.append((await create_connection(Recorder, get_queue(name)))[0])
    expected = []
    for i in range(10):
        side = i * 7 % 3 % 2
        transports[side].write(str(i).encode())
        expected.append((("left", "right")[side], str(i).encode()))
    await settle()
    assert log == expected
    for transport in transports:
        transport.close()
    await settle()
    for server in servers:
        server.close()


_ids = itertools.count()


@settings(max_examples=50, deadline=None)
@given(
    writes=st.lists(
        st.tuples(st.integers(0, 3), st.binary(min_size=1, max_size=8), st.booleans()),
        max_size=30,
    ),
)
async def test_arrival_order_is_the_write_order(
    writes: list[tuple[int, bytes, bool]],
) -> None:
    """Whatever the clients write, and however the loop turns in between, the
    server receives the chunks in the order of the write() calls."""
    log: list[tuple[str, bytes]] = []
    lq = LocalQueue(f"property-{next(_ids)}")
    server, _ = await serve(lq, lambda: Recorder("server", log))
    clients = [await create_connection(Recorder, lq) for _ in range(4)]
    for client, data, yield_now in writes:
        clients[client][0].write(data)
        if yield_now:
            await asyncio.sleep(0)
    for transport, _ in clients:
        transport.close()
    await settle()
    assert [data for _, data in log] == [data for _, data, _ in writes]
    assert all(protocol.lost.done() for _, protocol in clients)
    server.close()
