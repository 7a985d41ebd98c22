"""One conformance suite for every transport that aiomas runs on: TCP over IPv4
and IPv6, unix domain sockets, TLS, LocalQueue and NATS, each on asyncio's default
loop and on uvloop (whose transports are duck-typed: they do not subclass
asyncio's transport classes).

Every test here runs once per transport and loop (see ``endpoint`` in
tests/conftest.py and ``pytest_asyncio_loop_factories`` in this directory's
conftest.py); what one transport does, all must do.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

import aiomas
from aiomas import local_queue
from aiomas.rpc import ServiceDict, expose
from aiomas.testing import TIME_UNIT

from ..conftest import Endpoint, NatsEndpoint, TLSFiles
from ..helpers import echo_forever

WAIT = 10.0


class RawClient(asyncio.Protocol):
    """A peer that speaks bytes, not aiomas."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def raw_connect(
    endpoint: Endpoint, addr: Any
) -> tuple[asyncio.BaseTransport, RawClient]:
    loop = asyncio.get_running_loop()
    if endpoint.kind == "localqueue":
        return await local_queue.create_connection(RawClient, addr)
    if endpoint.kind == "nats":
        transport, protocol = await addr.create_connection(RawClient)
        return transport, protocol
    if endpoint.kind == "unix":
        return await loop.create_unix_connection(RawClient, addr)
    return await loop.create_connection(RawClient, *addr, **endpoint.client_kwargs)


@contextlib.asynccontextmanager
async def channel_to_echo(
    endpoint: Endpoint, **kwargs: Any
) -> AsyncIterator[aiomas.channel.Channel]:
    async with endpoint.serve(
        aiomas.channel.start_server, echo_forever, **kwargs
    ) as addr:
        channel = await aiomas.channel.open_connection(
            addr, **endpoint.client_kwargs, **kwargs
        )
        try:
            yield channel
        finally:
            await channel.close()


async def test_requests_and_replies(endpoint: Endpoint) -> None:
    async with channel_to_echo(endpoint) as channel:
        assert await channel.send("ohai") == "ohai"
        assert await channel.send(["a", 1, None, {"b": 2.5}]) == [
            "a",
            1,
            None,
            {"b": 2.5},
        ]


async def test_many_calls_in_flight(endpoint: Endpoint) -> None:
    async with channel_to_echo(endpoint) as channel:
        replies = await asyncio.wait_for(
            asyncio.gather(*(channel.send(i) for i in range(500))), WAIT
        )
        assert replies == list(range(500))


@pytest.mark.parametrize("codec", [aiomas.JSON, aiomas.MsgPack])
async def test_big_messages(
    endpoint: Endpoint, codec: type[aiomas.codecs.Codec]
) -> None:
    async with channel_to_echo(endpoint, codec=codec) as channel:
        big = "x" * 3_000_000
        assert await asyncio.wait_for(channel.send(big), WAIT) == big
        assert await channel.send("small after big") == "small after big"


async def test_the_server_end_receives_and_replies(endpoint: Endpoint) -> None:
    received: asyncio.Queue[Any] = asyncio.Queue()

    async def ask_back(channel: aiomas.channel.Channel) -> None:
        request = await channel.recv()
        received.put_nowait(await channel.send(f"what is {request.content}?"))
        await request.reply("done")
        await channel.close()

    async with endpoint.serve(aiomas.channel.start_server, ask_back) as addr:
        channel = await aiomas.channel.open_connection(addr, **endpoint.client_kwargs)
        reply = asyncio.ensure_future(channel.send("x"))
        question = await asyncio.wait_for(channel.recv(), WAIT)
        assert question.content == "what is x?"
        await question.reply(42)
        assert await asyncio.wait_for(reply, WAIT) == "done"
        assert await asyncio.wait_for(received.get(), WAIT) == 42
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(channel.recv(), WAIT)
        await channel.close()


async def test_closing_fails_calls_in_flight(endpoint: Endpoint) -> None:
    async def never_answer(channel: aiomas.channel.Channel) -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                await channel.recv()

    async with endpoint.serve(aiomas.channel.start_server, never_answer) as addr:
        channel = await aiomas.channel.open_connection(addr, **endpoint.client_kwargs)
        calls = [channel.send(i) for i in range(5)]
        await asyncio.sleep(10 * TIME_UNIT)
        await channel.close()
        for call in calls:
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(call, WAIT)
        with pytest.raises(ConnectionResetError):
            channel.send("after close")


async def test_bad_bytes_close_only_that_connection(endpoint: Endpoint) -> None:
    async with endpoint.serve(aiomas.channel.start_server, echo_forever) as addr:
        good = await aiomas.channel.open_connection(addr, **endpoint.client_kwargs)
        transport, raw = await raw_connect(endpoint, addr)
        try:
            transport.write(b"\xff\xff\xff\xff")  # type: ignore[attr-defined]
            await asyncio.wait_for(raw.closed, WAIT)
            assert raw.data == b""
            assert await good.send("still here") == "still here"
        finally:
            transport.close()
            await good.close()


async def test_rpc_calls_both_ways(endpoint: Endpoint) -> None:
    class Service:
        router = aiomas.rpc.Service()

        @expose
        async def call_back(self, proxy: aiomas.rpc.Proxy, value: int) -> int:
            result: int = await proxy.double(value)
            return result + 1

    @expose
    def double(value: int) -> int:
        return 2 * value

    async with endpoint.serve(aiomas.rpc.start_server, Service()) as addr:
        mine = ServiceDict({"double": double})
        client = await aiomas.rpc.open_connection(
            addr, rpc_service=mine, **endpoint.client_kwargs
        )
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(client.remote.call_back(mine, i) for i in range(50))),
                WAIT,
            )
            assert results == [2 * i + 1 for i in range(50)]
        finally:
            await client.close()


class Pinger(aiomas.Agent):
    @expose
    async def ping(self, other_addr: str, times: int) -> list[str]:
        other = await self.container.connect(other_addr, timeout=WAIT)
        return [await other.pong(i) for i in range(times)]

    @expose
    def pong(self, i: int) -> str:
        return f"pong {i} from {self.addr}"


async def container_addr(endpoint: Endpoint, number: int) -> Any:
    addr = endpoint.server_addr
    if endpoint.kind == "unix":
        return f"{addr}{number}"
    if endpoint.kind == "localqueue":
        return aiomas.get_queue(f"{addr.queue_id}-{number}")
    if isinstance(endpoint, NatsEndpoint):
        return endpoint.container_url(f"c{number}")
    return addr


async def test_agents_in_containers(endpoint: Endpoint, tls: TLSFiles) -> None:
    kwargs: dict[str, Any] = {}
    if endpoint.kind == "tls":
        kwargs["ssl"] = aiomas.SSLCerts(tls.cafile, tls.certfile, tls.keyfile)
    one = await aiomas.Container.create(
        await container_addr(endpoint, 1), as_coro=True, **kwargs
    )
    two = await aiomas.Container.create(
        await container_addr(endpoint, 2), as_coro=True, **kwargs
    )
    try:
        a, b = Pinger(one), Pinger(two)
        proxy = await one.connect(b.addr, timeout=WAIT)
        pongs = await asyncio.wait_for(proxy.ping(a.addr, 3), WAIT)
        assert pongs == [f"pong {i} from {a.addr}" for i in range(3)]
    finally:
        await two.shutdown(as_coro=True)
        await one.shutdown(as_coro=True)


async def test_the_loop_is_the_one_named(
    endpoint: Endpoint, request: pytest.FixtureRequest
) -> None:
    loop_module = type(asyncio.get_running_loop()).__module__
    if "[uvloop-" in request.node.name:
        assert loop_module.startswith("uvloop")
    else:
        assert loop_module.startswith("asyncio")
