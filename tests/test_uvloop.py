"""The channel and RPC layers on uvloop, whose transports are duck-typed (they do
not subclass asyncio's transport classes)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import aiomas
from aiomas.rpc import ServiceDict, expose

from .conftest import TLSFiles
from .helpers import echo_until_closed

uvloop = pytest.importorskip("uvloop", reason="uvloop is not available here")


@expose
def echo(value: object) -> object:
    return value


def run_on_uvloop(coro: object) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)  # type: ignore[arg-type]


@pytest.mark.parametrize("codec", [aiomas.JSON, aiomas.MsgPack])
def test_rpc_over_tcp_on_uvloop(codec: type[aiomas.codecs.Codec]) -> None:
    async def main() -> None:
        service = ServiceDict({"echo": echo})
        server = await aiomas.rpc.start_server(("127.0.0.1", 0), service, codec=codec)
        port = server.sockets[0].getsockname()[1]
        client = await aiomas.rpc.open_connection(("127.0.0.1", port), codec=codec)
        results = await asyncio.gather(*(client.remote.echo(i) for i in range(500)))
        assert list(results) == list(range(500))
        big = "x" * 3_000_000
        assert await client.remote.echo(big) == big
        await client.close()
        server.close()
        await server.wait_closed()

    run_on_uvloop(main())


def test_channel_over_tls_and_unix_on_uvloop(tls: TLSFiles, tmp_path: Path) -> None:
    async def answer(channel: aiomas.channel.Channel) -> None:
        request = await channel.recv()
        await request.reply(request.content)
        await channel.close()

    async def main() -> None:
        server = await aiomas.channel.start_server(
            ("127.0.0.1", 0), answer, ssl=tls.server_context
        )
        port = server.sockets[0].getsockname()[1]
        channel = await aiomas.channel.open_connection(
            ("127.0.0.1", port), ssl=tls.client_context
        )
        assert await channel.send("over TLS") == "over TLS"
        await channel.close()
        server.close()
        await server.wait_closed()

        path = str(tmp_path / "uv.sock")
        server = await aiomas.channel.start_server(path, answer)
        channel = await aiomas.channel.open_connection(path)
        assert await channel.send("over a unix socket") == "over a unix socket"
        await channel.close()
        server.close()
        await server.wait_closed()

    run_on_uvloop(main())


def test_bad_input_on_uvloop_closes_only_that_connection() -> None:
    async def main() -> None:
        server = await aiomas.channel.start_server(("127.0.0.1", 0), echo_until_closed)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\xff\xff\xff\xff")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await writer.wait_closed()
        channel = await aiomas.channel.open_connection(("127.0.0.1", port))
        assert await channel.send("fine") == "fine"
        await channel.close()
        server.close()
        await server.wait_closed()

    run_on_uvloop(main())
