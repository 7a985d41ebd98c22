"""Whatever an exposed function raises fails only its call.

Against an RPC server and an agent container, over TCP and TLS: every kind of
exception, from sync and async handlers, gives the caller a failure reply that
names it, while the connection (with its other calls in flight) and the server
go on.  A real SIGINT or SIGTERM still stops the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import aiomas
from aiomas.testing import TIME_UNIT

from .conftest import TLSFiles
from .helpers import aiomas_records


class Bad(BaseException):
    """An exception that is not an Exception (like those of some frameworks)."""


EXCEPTIONS: dict[str, Callable[[], BaseException]] = {
    "SystemExit": lambda: SystemExit(3),
    "KeyboardInterrupt": KeyboardInterrupt,
    "GeneratorExit": GeneratorExit,
    "CancelledError": asyncio.CancelledError,
    "Bad": Bad,
    "ValueError": lambda: ValueError("plain"),
}


class Faulty:
    """Raises what it is told to; ``wait`` holds a call in flight meanwhile."""

    router = aiomas.rpc.Service()

    def __init__(self) -> None:
        self.release = asyncio.Event()

    @aiomas.expose
    def fail(self, name: str) -> None:
        raise EXCEPTIONS[name]()

    @aiomas.expose
    async def fail_async(self, name: str) -> None:
        await asyncio.sleep(0)
        raise EXCEPTIONS[name]()

    @aiomas.expose
    async def wait(self) -> str:
        await self.release.wait()
        return "waited"

    @aiomas.expose
    def echo(self, value: Any) -> Any:
        return value


class FaultyAgent(aiomas.Agent):
    def __init__(self, container: aiomas.Container) -> None:
        super().__init__(container)
        self.release = asyncio.Event()

    fail = Faulty.fail
    fail_async = Faulty.fail_async
    wait = Faulty.wait
    echo = Faulty.echo


@contextlib.asynccontextmanager
async def faulty_peer(
    kind: str, tls: TLSFiles | None
) -> AsyncIterator[tuple[Any, Any]]:
    """Serve a Faulty (RPC server) or FaultyAgent (container); yield a proxy
    to it and the object whose ``release`` event ends ``wait()``."""
    if kind == "rpc":
        service = Faulty()
        server_ssl = {} if tls is None else {"ssl": tls.server_context}
        client_ssl = {} if tls is None else {"ssl": tls.client_context}
        server = await aiomas.rpc.start_server(("127.0.0.1", 0), service, **server_ssl)
        addr = server.sockets[0].getsockname()[:2]  # type: ignore[attr-defined]
        client = await aiomas.rpc.open_connection(addr, **client_ssl)
        try:
            yield client.remote, service
        finally:
            await client.close()
            server.close()
            await asyncio.wait_for(server.wait_closed(), 5)
        return
    certs = (
        None if tls is None else aiomas.SSLCerts(tls.cafile, tls.certfile, tls.keyfile)
    )
    server_c = await aiomas.Container.create(("127.0.0.1", 0), ssl=certs, as_coro=True)
    client_c = await aiomas.Container.create(("127.0.0.1", 0), ssl=certs, as_coro=True)
    try:
        agent = FaultyAgent(server_c)
        yield await client_c.connect(agent.addr), agent
    finally:
        await client_c.shutdown(as_coro=True)
        await server_c.shutdown(as_coro=True)


@pytest.mark.parametrize("name", list(EXCEPTIONS))
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("transport", ["tcp", "tls"])
@pytest.mark.parametrize("kind", ["rpc", "agent"])
async def test_any_exception_of_a_handler_fails_only_its_call(
    kind: str,
    transport: str,
    asynchronous: bool,
    name: str,
    tls: TLSFiles,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The caller gets a failure reply naming the exception; a call in flight
    on the same connection and the next call there still get their results;
    exceptions that are not an Exception are logged at ERROR."""
    async with faulty_peer(kind, tls if transport == "tls" else None) as (
        proxy,
        target,
    ):
        waiting = asyncio.ensure_future(proxy.wait())
        fail = proxy.fail_async if asynchronous else proxy.fail
        with pytest.raises(aiomas.RemoteException) as info:
            await asyncio.wait_for(fail(name), 5)
        assert name in info.value.remote_traceback
        assert await asyncio.wait_for(proxy.echo("still there"), 5) == "still there"
        target.release.set()
        assert await asyncio.wait_for(waiting, 5) == "waited"
    errors = [
        r for r in aiomas_records(caplog, logging.ERROR) if name in r.getMessage()
    ]
    assert len(errors) == (0 if name == "ValueError" else 1)


async def test_a_handler_that_swallows_our_cancellation_still_ends_quietly() -> None:
    """When the connection closes, running calls are cancelled; one that
    turns the cancellation into another exception is not answered (nobody
    waits) and leaves no task or log record behind."""
    started = asyncio.Event()

    @aiomas.expose
    async def stubborn() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise SystemExit(1) from None

    server = await aiomas.rpc.start_server(
        ("127.0.0.1", 0), aiomas.rpc.ServiceDict({"stubborn": stubborn})
    )
    addr = server.sockets[0].getsockname()[:2]  # type: ignore[attr-defined]
    client = await aiomas.rpc.open_connection(addr)
    call = client.remote.stubborn()
    await asyncio.wait_for(started.wait(), 5)
    await client.close()
    with pytest.raises(ConnectionResetError):
        await call
    server.close()
    await asyncio.wait_for(server.wait_closed(), 5)


CALLBACK_EXCEPTIONS = ["SystemExit", "KeyboardInterrupt", "CancelledError", "Bad"]


@pytest.mark.parametrize("name", CALLBACK_EXCEPTIONS)
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_a_channel_handler_that_raises_anything_closes_only_its_connection(
    asynchronous: bool, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A channel server's client_connected_cb that raises any exception
    closes only that connection, with an ERROR record; the next client is
    served."""
    connections = 0

    async def fail_later() -> None:
        await asyncio.sleep(0)
        raise EXCEPTIONS[name]()

    async def echo_once(channel: aiomas.channel.Channel) -> None:
        request = await channel.recv()
        await request.reply(request.content)

    def cb(channel: aiomas.channel.Channel) -> Any:
        nonlocal connections
        connections += 1
        if connections > 1:
            return echo_once(channel)
        if asynchronous:
            return fail_later()
        raise EXCEPTIONS[name]()

    server = await aiomas.channel.start_server(("127.0.0.1", 0), cb)
    addr = server.sockets[0].getsockname()[:2]  # type: ignore[attr-defined]
    try:
        first = await aiomas.channel.open_connection(addr)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(first.send("lost"), 5)
        await first.close()
        second = await aiomas.channel.open_connection(addr)
        assert await asyncio.wait_for(second.send("served"), 5) == "served"
        await second.close()
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)
    errors = [
        r
        for r in aiomas_records(caplog, logging.ERROR)
        if "client_connected_cb" in r.getMessage()
    ]
    assert len(errors) == 1


@pytest.mark.parametrize("name", CALLBACK_EXCEPTIONS)
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_an_rpc_client_connected_cb_that_raises_anything_is_only_logged(
    asynchronous: bool, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An RPC server's client_connected_cb that raises any exception is
    logged at ERROR; the connection and the server go on."""

    def sync_cb(client: aiomas.rpc.RpcClient) -> None:
        raise EXCEPTIONS[name]()

    async def async_cb(client: aiomas.rpc.RpcClient) -> None:
        await asyncio.sleep(0)
        raise EXCEPTIONS[name]()

    service = Faulty()
    server = await aiomas.rpc.start_server(
        ("127.0.0.1", 0), service, async_cb if asynchronous else sync_cb
    )
    addr = server.sockets[0].getsockname()[:2]  # type: ignore[attr-defined]
    try:
        client = await aiomas.rpc.open_connection(addr)
        await asyncio.sleep(50 * TIME_UNIT)
        assert await asyncio.wait_for(client.remote.echo(1), 5) == 1
        await client.close()
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)
    errors = [
        r
        for r in aiomas_records(caplog, logging.ERROR)
        if "failed for the connection" in r.getMessage()
    ]
    assert len(errors) == 1


# --- Real signals still stop the process ----------------------------------------

SERVER = textwrap.dedent(
    """
    import asyncio, signal, sys, time
    import aiomas

    mode = sys.argv[1]

    @aiomas.expose
    def spin():
        print("spinning", flush=True)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            pass

    @aiomas.expose
    async def spin_async():
        print("spinning", flush=True)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            await asyncio.sleep(0)

    service = aiomas.rpc.ServiceDict({"spin": spin, "spin_async": spin_async})

    async def start():
        server = await aiomas.rpc.start_server(("127.0.0.1", 0), service)
        print(server.sockets[0].getsockname()[1], flush=True)
        return server

    if mode == "asyncio.run":
        async def main():
            await start()
            await asyncio.Event().wait()
        asyncio.run(main())
    else:
        if mode == "sigterm-exits":
            signal.signal(signal.SIGTERM, lambda *args: sys.exit(0))
        aiomas.run(start())
        aiomas.run()
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize(
    ("mode", "call", "signum", "times"),
    [
        ("aiomas.run", "spin", signal.SIGINT, 1),
        ("aiomas.run", "spin_async", signal.SIGINT, 1),
        # asyncio.run()'s first SIGINT cancels the main task, which waits for
        # a blocking handler to return; its second raises KeyboardInterrupt.
        ("asyncio.run", "spin", signal.SIGINT, 2),
        ("asyncio.run", "spin_async", signal.SIGINT, 1),
        ("sigterm-exits", "spin", signal.SIGTERM, 1),
        ("sigterm-exits", "spin_async", signal.SIGTERM, 1),
    ],
)
@pytest.mark.usefixtures("sigint_reaches_children")
async def test_a_real_signal_still_stops_a_busy_server(
    mode: str, call: str, signum: int, times: int, tmp_path: Path
) -> None:
    """SIGINT (with Python's or asyncio.run()'s handler) and a SIGTERM handler
    that calls sys.exit() stop a server within 2 s, even while a handler
    is busy: the KeyboardInterrupt or SystemExit they raise inside the
    handler's code is not taken for the handler's own."""
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        mode,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.stdout is not None
    try:
        port = int(await asyncio.wait_for(proc.stdout.readline(), 10))
        client = await aiomas.rpc.open_connection(("127.0.0.1", port))
        try:
            pending = getattr(client.remote, call)()
            assert await asyncio.wait_for(proc.stdout.readline(), 5) == b"spinning\n"
            await asyncio.sleep(100 * TIME_UNIT)
            start = time.monotonic()
            for _ in range(times):
                proc.send_signal(signum)
                await asyncio.sleep(50 * TIME_UNIT)
            returncode = await asyncio.wait_for(proc.wait(), 5)
            assert time.monotonic() - start < 2
            with pytest.raises(ConnectionResetError):
                await pending
        finally:
            await client.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if signum == signal.SIGTERM:
        assert returncode == 0
    else:  # An uncaught KeyboardInterrupt ends Python by SIGINT.
        assert returncode in (-signal.SIGINT, 1, 130)
