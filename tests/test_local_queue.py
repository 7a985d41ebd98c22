"""Tests for the LocalQueue transport (aiomas.local_queue)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

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


class Recorder(asyncio.Protocol):
    """Records every callback; optionally echoes what it receives."""

    def __init__(self, name: str = "", log: list[Any] | None = None, echo=False):  # type: ignore[no-untyped-def]
        self.name = name
        self.log = [] if log is None else log
        self.echo = echo
        self.events: list[str] = []
        self.data = b""
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.events.append("data")
        self.data += data
        self.log.append((self.name, data))
        if self.echo:
            assert self.transport is not None
            self.transport.write(data)

    def eof_received(self) -> bool | None:
        self.events.append("eof")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.lost.set_result(exc)


class SmallBuffers(asyncio.BufferedProtocol):
    def __init__(self, size: int) -> None:
        self.buffer = bytearray(size)
        self.data = b""
        self.lost = asyncio.get_running_loop().create_future()

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data += bytes(self.buffer[:nbytes])

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


def test_get_queue_caches_and_validates() -> None:
    q = get_queue("spam")
    assert get_queue("spam") is q
    assert aiomas.get_queue is get_queue
    assert q.queue_id == "spam"
    assert q.server is None
    assert repr(q) == "LocalQueue('spam')"
    clear_queue_cache()
    assert get_queue("spam") is not q
    with pytest.raises(ValueError, match="string"):
        get_queue(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'/'"):
        get_queue("a/b")


async def test_no_server_no_connection() -> None:
    lq = get_queue("nobody")
    with pytest.raises(ConnectionRefusedError):
        await create_connection(Recorder, lq)
    with pytest.raises(ConnectionRefusedError):
        lq.new_connection(asyncio.Queue(), asyncio.Queue())


async def test_one_server_per_queue() -> None:
    lq = get_queue("busy")
    server = await create_server(Recorder, lq)
    assert isinstance(server, LocalQueueServer)
    assert lq.server is server
    assert server.lq is lq
    with pytest.raises(RuntimeError, match="already has a server"):
        await create_server(Recorder, lq)
    server.close()
    assert lq.server is None
    assert not server.is_serving()
    await server.wait_closed()


async def test_echo_and_closing_sequence() -> None:
    lq = get_queue("echo")
    server_protocols: list[Recorder] = []

    def factory() -> Recorder:
        protocol = Recorder("server", echo=True)
        server_protocols.append(protocol)
        return protocol

    server = await create_server(factory, lq)
    transport, client = await create_connection(Recorder, lq)
    assert isinstance(transport, LocalQueueTransport)
    assert isinstance(client, Recorder)
    assert client.events == ["made"]
    assert server_protocols[0].events == ["made"]
    transport.write(b"hello ")
    transport.writelines([b"wor", bytearray(b"ld")])
    transport.write(b"")
    for _ in range(5):
        await asyncio.sleep(0)
    assert client.data == b"hello world"
    assert transport.get_extra_info("peername") == "echo"
    assert server_protocols[0].transport is not None
    assert server_protocols[0].transport.get_extra_info("peername") == "echo#1"
    assert transport.get_extra_info("nothing", 1) == 1
    assert transport.get_write_buffer_size() == 0
    assert not transport.can_write_eof()
    with pytest.raises(NotImplementedError):
        transport.write_eof()

    transport.close()
    assert transport.is_closing()
    transport.close()  # twice is harmless
    transport.write(b"ignored after close")
    assert await asyncio.wait_for(client.lost, 1) is None
    assert await asyncio.wait_for(server_protocols[0].lost, 1) is None
    assert client.events == ["made", "data", "data", "lost"]
    assert server_protocols[0].events == ["made", "data", "data", "eof", "lost"]
    server.close()


async def test_close_delivers_pending_data_first() -> None:
    lq = get_queue("flush")
    received: list[Recorder] = []

    def factory() -> Recorder:
        received.append(Recorder())
        return received[0]

    server = await create_server(factory, lq)
    transport, _client = await create_connection(Recorder, lq)
    transport.write(b"last words")
    transport.close()
    await asyncio.wait_for(received[0].lost, 1)
    assert received[0].data == b"last words"
    assert received[0].events == ["made", "data", "eof", "lost"]
    server.close()


async def test_abort_drops_data_and_resets_the_peer() -> None:
    lq = get_queue("abort")
    received: list[Recorder] = []

    def factory() -> Recorder:
        received.append(Recorder())
        return received[0]

    server = await create_server(factory, lq)
    transport, client = await create_connection(Recorder, lq)
    transport.write(b"never delivered")
    transport.abort()
    assert await asyncio.wait_for(client.lost, 1) is None
    exc = await asyncio.wait_for(received[0].lost, 1)
    assert isinstance(exc, ConnectionResetError)
    assert received[0].data == b""
    transport.abort()
    server.close()


async def test_buffered_protocol_gets_data_in_pieces() -> None:
    lq = get_queue("buffered")
    receivers: list[SmallBuffers] = []

    def factory() -> SmallBuffers:
        receivers.append(SmallBuffers(3))
        return receivers[0]

    server = await create_server(factory, lq)
    transport, _ = await create_connection(Recorder, lq)
    transport.write(b"0123456789" * 10)
    transport.close()
    await asyncio.wait_for(receivers[0].lost, 1)
    assert receivers[0].data == b"0123456789" * 10
    server.close()


async def test_pause_and_resume_reading() -> None:
    lq = get_queue("pause")
    server = await create_server(lambda: Recorder(echo=True), lq)
    transport, client = await create_connection(Recorder, lq)
    transport.pause_reading()
    assert not transport.is_reading()
    transport.write(b"ping")
    for _ in range(5):
        await asyncio.sleep(0)
    assert client.data == b""
    transport.resume_reading()
    assert transport.is_reading()
    for _ in range(5):
        await asyncio.sleep(0)
    assert client.data == b"ping"
    transport.close()
    await client.lost
    server.close()


async def test_closing_the_server_keeps_existing_connections() -> None:
    lq = get_queue("keep")
    server = await create_server(lambda: Recorder(echo=True), lq)
    transport, client = await create_connection(Recorder, lq)
    server.close()
    with pytest.raises(ConnectionRefusedError):
        await create_connection(Recorder, lq)
    transport.write(b"still here")
    for _ in range(5):
        await asyncio.sleep(0)
    assert client.data == b"still here"
    transport.close()
    await client.lost


@pytest.mark.parametrize("how", ["close_clients", "abort_clients"])
async def test_close_and_abort_clients(how: str) -> None:
    lq = get_queue(how)
    server = await create_server(Recorder, lq)
    clients = [await create_connection(Recorder, lq) for _ in range(3)]
    getattr(server, how)()
    for _transport, protocol in clients:
        await asyncio.wait_for(protocol.lost, 1)  # type: ignore[attr-defined]
    server.close()


async def test_async_with_and_serve_forever() -> None:
    lq = get_queue("ctx")
    async with await create_server(Recorder, lq) as server:
        assert server.get_loop() is asyncio.get_running_loop()
        await server.start_serving()
        task = asyncio.ensure_future(server.serve_forever())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert lq.server is None
    with pytest.raises(RuntimeError):
        await server.serve_forever()


async def test_protocol_errors_are_reported_and_close_the_transport() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:

        class Broken(Recorder):
            def data_received(self, data: bytes) -> None:
                raise ValueError("protocol bug")

        lq = get_queue("broken")
        server = await create_server(Broken, lq)
        transport, client = await create_connection(Recorder, lq)
        transport.write(b"boom")
        exc = await asyncio.wait_for(client.lost, 1)
        assert isinstance(exc, ConnectionResetError)
        assert len(reported) == 1
        assert isinstance(reported[0]["exception"], ValueError)
        server.close()
    finally:
        loop.set_exception_handler(None)


async def test_tls_and_foreign_loops_are_refused() -> None:
    lq = get_queue("tls")
    with pytest.raises(ValueError, match="TLS"):
        await create_server(Recorder, lq, ssl=object())
    server = await create_server(Recorder, lq)
    with pytest.raises(ValueError, match="TLS"):
        await create_connection(Recorder, lq, ssl=object())
    other = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError, match="loop"):
            await create_connection(Recorder, lq, loop=other)
    finally:
        other.close()
    server.close()


async def interleaved_run(name: str) -> list[Any]:
    """Three clients write in turns to one server; return the arrival order."""
    log: list[Any] = []
    lq = get_queue(name)
    server = await create_server(lambda: Recorder("server", log), lq)
    clients = [await create_connection(Recorder, lq) for _ in range(3)]
    expected = []
    for round_ in range(5):
        # Client 0 writes twice per round: arrival follows the write calls,
        # not the connections.
        for i, (transport, _) in [(0, clients[0]), *enumerate(clients)]:
            message = f"{i}:{round_};".encode()
            transport.write(message)
            expected.append(("server", message))
        await asyncio.sleep(0)
    for transport, protocol in clients:
        transport.close()
        await protocol.lost  # type: ignore[attr-defined]
    server.close()
    assert log == expected
    return log


async def test_messages_of_many_connections_arrive_in_write_order() -> None:
    runs = [await interleaved_run(f"order-{i}") for i in range(5)]
    assert all(run == runs[0] for run in runs)


def test_module_exports() -> None:
    assert set(local_queue.__all__) == {
        "LocalQueue",
        "LocalQueueServer",
        "LocalQueueTransport",
        "clear_queue_cache",
        "create_connection",
        "create_server",
        "get_queue",
    }
    assert LocalQueue("x").queue_id == "x"
