"""Tests for aiomas.rpc: proxies, RPC clients and calls over real transports
(the routing itself is tested in test_routing.py)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import random
import signal
import sys
import warnings
from typing import Any

import pytest

import aiomas
from aiomas.exceptions import RemoteException, SerializationError
from aiomas.rpc import Proxy, RpcClient, Service, ServiceDict, expose
from aiomas.testing import TIME_UNIT, FakeTransport, feed, settle

from .conftest import Endpoint
from .helpers import aiomas_records, frames, in_a_callback
from .test_routing import Calculator, add

# Services sent over a connection.


async def test_a_declared_sub_service_can_be_sent_before_any_call_reached_it() -> None:
    """Found by fuzzing: a sub-service set after its router was made could be
    returned as a proxy only after a call had gone through it once."""

    class Helper:
        router = Service()

        @expose
        def ping(self) -> str:
            return "pong"

    class Late:
        router = Service(["helper"])

        def __init__(self) -> None:
            assert self.router.path == ""  # router made before the helper exists
            self.helper = Helper()

        @expose
        def get_helper(self) -> Helper:
            return self.helper

    queue = aiomas.get_queue("rpc-late-helper")
    server = await aiomas.rpc.start_server(queue, Late())
    client = await aiomas.rpc.open_connection(queue)
    try:
        helper = await asyncio.wait_for(client.remote.get_helper(), 5)
        assert await asyncio.wait_for(helper.ping(), 5) == "pong"
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


# Calls over real connections.


def rpc_server(
    endpoint: Endpoint, service: Any, cb: Any = None, **kwargs: Any
) -> contextlib.AbstractAsyncContextManager[Any]:
    """Run an RPC server for *service*; yield the address clients use."""
    return endpoint.serve(aiomas.rpc.start_server, service, cb, **kwargs)


async def rpc_connect(endpoint: Endpoint, addr: Any, **kwargs: Any) -> RpcClient:
    return await aiomas.rpc.open_connection(addr, **endpoint.client_kwargs, **kwargs)


async def test_calls_on_every_transport(endpoint: Endpoint) -> None:
    async with rpc_server(endpoint, Calculator()) as addr:
        client = await rpc_connect(endpoint, addr)
        assert await client.remote.mul(3, 4) == 12
        assert await client.remote.slow_mul(a=3, b=5) == 15
        assert await client.remote.inner.add(1, b=2) == 3
        assert await client.remote.neg(1) == -1
        assert isinstance(client.channel, aiomas.channel.Channel)
        assert client.service is None
        await client.close()


async def test_three_levels_of_mixed_services(endpoint: Endpoint) -> None:
    class Leaf:
        router = Service()

        @expose
        def where(self) -> str:
            return self.router.path

    class Middle:
        router = Service(["leaf"])

        def __init__(self) -> None:
            self.leaf = Leaf()

    root = ServiceDict({"mid": ServiceDict({"m": Middle()})})
    async with rpc_server(endpoint, root) as addr:
        client = await rpc_connect(endpoint, addr)
        assert await client.remote.mid.m.leaf.where() == "mid/m/leaf"
        await client.close()


async def test_remote_exceptions(endpoint: Endpoint) -> None:
    @expose
    def fail_badly() -> None:
        raise ValueError('"spam" is not a number')

    service = ServiceDict({"fail_badly": fail_badly, "add": add})
    async with rpc_server(endpoint, service) as addr:
        client = await rpc_connect(endpoint, addr)
        with pytest.raises(RemoteException) as info:
            await client.remote.fail_badly()
        assert info.value.origin == client.channel.peername
        tb = info.value.remote_traceback
        assert tb.startswith("Traceback (most recent call last):")
        assert "fail_badly" in tb
        assert tb.endswith('ValueError: "spam" is not a number\n')

        with pytest.raises(RemoteException, match=r"LookupError.*'nope/deeper'"):
            await client.remote.nope.deeper()
        with pytest.raises(RemoteException, match="TypeError"):
            await client.remote.add(1, 2, 3)
        with pytest.raises(RemoteException, match="TypeError"):
            await client.remote.add(1, c=2)
        # The connection survived all of that.
        assert await client.remote.add(1, 2) == 3
        await client.close()


async def test_malformed_rpc_requests_get_failure_replies() -> None:
    lq = aiomas.get_queue("malformed")
    server = await aiomas.rpc.start_server(lq, Calculator())
    channel = await aiomas.channel.open_connection(lq)
    for content in [
        "mul",
        ["mul", [1, 2]],
        [1, [], {}],
        ["mul", 1, {}],
        ["mul", [], []],
    ]:
        with pytest.raises(RemoteException, match="path, args, kwargs"):
            await channel.send(content)
    assert await channel.send(["mul", [2, 3], {}]) == 6
    await channel.close()
    server.close()
    await server.wait_closed()


@pytest.mark.heavy
async def test_a_thousand_concurrent_calls_with_random_delays(
    endpoint: Endpoint,
) -> None:
    @expose
    async def echo_later(i: int) -> int:
        await asyncio.sleep(random.random() / 50)
        return i

    async with rpc_server(endpoint, ServiceDict({"echo": echo_later})) as addr:
        client = await rpc_connect(endpoint, addr)
        results = await asyncio.gather(*(client.remote.echo(i) for i in range(1000)))
        assert results == list(range(1000))
        await client.close()


async def test_slow_call_does_not_block_others(endpoint: Endpoint) -> None:
    release = asyncio.Event()

    @expose
    async def wait_for_release() -> str:
        await release.wait()
        return "released"

    @expose
    def release_it() -> None:
        release.set()

    service = ServiceDict({"wait": wait_for_release, "release": release_it})
    async with rpc_server(endpoint, service) as addr:
        client = await rpc_connect(endpoint, addr)
        waiting = client.remote.wait()
        await client.remote.release()
        assert await asyncio.wait_for(waiting, 5) == "released"
        await client.close()


async def test_bidirectional_calls_within_one_call(endpoint: Endpoint) -> None:
    class ClientService:
        router = Service(["sub"])

        def __init__(self, name: str) -> None:
            self.name = name
            self.sub = ServiceDict({"add": add})

        @expose
        def get_name(self) -> str:
            return self.name

        @expose
        async def ask_back(self, server: Proxy) -> str:
            # client -> server -> client -> server, all inside one call
            return f"{self.name} heard {await server.shout('hi')}"

    class ServerService:
        router = Service()

        @expose
        async def greet(self, client: Proxy) -> str:
            return f"Hello {await client.get_name()}"

        @expose
        async def use_sub(self, sub: Proxy) -> int:
            return int(await sub.add(20, 22))

        @expose
        async def roundtrip(self, client: Proxy) -> str:
            return str(await client.ask_back(self))

        @expose
        def shout(self, text: str) -> str:
            return text.upper()

    async with rpc_server(endpoint, ServerService()) as addr:
        service = ClientService("Monty")
        client = await rpc_connect(endpoint, addr, rpc_service=service)
        assert client.service is not None
        assert await client.remote.greet(service) == "Hello Monty"
        assert await client.remote.use_sub(service.sub) == 42
        assert await client.remote.roundtrip(service) == "Monty heard HI"
        await client.close()


async def test_only_services_of_this_connection_can_be_sent() -> None:
    lq = aiomas.get_queue("foreign-service")
    server = await aiomas.rpc.start_server(lq, ServiceDict({"add": add}))
    client = await aiomas.rpc.open_connection(lq, rpc_service=Calculator())
    with pytest.raises(SerializationError, match="not part of the RPC service"):
        client.remote.add(Calculator(), 1)
    with pytest.raises(SerializationError, match="No serializer"):
        client.remote.add(object(), 1)
    no_service = await aiomas.rpc.open_connection(lq)
    with pytest.raises(SerializationError, match="not part of the RPC service"):
        no_service.remote.add(Calculator(), 1)
    await client.close()
    await no_service.close()
    server.close()
    await server.wait_closed()


async def test_calls_to_a_side_without_service_fail_cleanly() -> None:
    lq = aiomas.get_queue("no-service")
    clients: list[RpcClient] = []
    server = await aiomas.rpc.start_server(lq, ServiceDict({}), clients.append)
    client = await aiomas.rpc.open_connection(lq)
    await asyncio.sleep(0)
    with pytest.raises(RemoteException, match="serves no RPC service"):
        await clients[0].remote.anything()
    await client.close()
    server.close()
    await server.wait_closed()


async def test_rpc_service_process_serves_a_channel_without_a_handler() -> None:
    """rpc_service_process() installs the handler for *router* on a channel
    that has none yet (one never given to an RpcClient, here that of a plain
    channel server); *rpc_client* keeps the calls it runs."""
    lq = aiomas.get_queue("service-process")
    channels: list[aiomas.channel.Channel] = []
    server = await aiomas.channel.start_server(lq, channels.append)
    client = await aiomas.rpc.open_connection(lq)
    await asyncio.sleep(0)
    (served,) = channels
    assert served.request_handler is None
    serving = asyncio.ensure_future(
        aiomas.rpc.rpc_service_process(client, Calculator().router, served)
    )
    assert await asyncio.wait_for(client.remote.slow_mul(6, 7), 5) == 42
    await client.close()
    with pytest.raises(ConnectionResetError):
        await serving
    server.close()
    await server.wait_closed()


async def test_start_server_refuses_non_services() -> None:
    with pytest.raises(ValueError, match="no RPC service"):
        await aiomas.rpc.start_server(aiomas.get_queue("x"), object())
    with pytest.raises(ValueError, match="no RPC service"):
        await aiomas.rpc.open_connection(aiomas.get_queue("x"), rpc_service={})


async def test_proxies() -> None:
    lq = aiomas.get_queue("proxies")
    server = await aiomas.rpc.start_server(lq, Calculator())
    client = await aiomas.rpc.open_connection(lq)
    other = await aiomas.rpc.open_connection(lq)
    remote = client.remote
    assert remote.inner is remote.inner  # cached
    assert remote.inner.add == Proxy(client.channel, "inner/add")
    assert hash(remote.inner.add) == hash(Proxy(client.channel, "inner/add"))
    assert remote.inner.add != other.remote.inner.add
    assert remote.inner != remote.mul
    assert {remote.mul: 1}[Proxy(client.channel, "mul")] == 1
    assert repr(remote.inner.add) == "Proxy('proxies', 'inner/add')"
    assert not hasattr(remote, "_private")  # no proxies for private names
    assert remote.mul != "mul"  # only proxies are equal to proxies
    await client.close()
    await other.close()
    server.close()
    await server.wait_closed()


async def test_a_proxy_keeps_a_bounded_number_of_child_proxies() -> None:
    """Code that makes up names on the fly must not make a proxy grow without
    bound: after 256 names, the cache starts again (the proxies stay equal)."""
    lq = aiomas.get_queue("proxy-children")
    server = await aiomas.rpc.start_server(lq, Calculator())
    client = await aiomas.rpc.open_connection(lq)
    remote = client.remote
    first = remote.name0
    for i in range(1, 256):
        assert getattr(remote, f"name{i}") is getattr(remote, f"name{i}")
    assert remote.name0 is first  # still cached: 256 children
    remote.one_more  # noqa: B018
    assert remote.name0 is not first
    assert remote.name0 == first
    assert await remote.mul(2, 3) == 6
    await client.close()
    server.close()
    await server.wait_closed()


async def test_an_invalid_proxy_path_from_the_peer_fails_its_request() -> None:
    lq = aiomas.get_queue("invalid-proxy-path")
    calc = Calculator()
    server = await aiomas.rpc.start_server(lq, Calculator())
    client = await aiomas.rpc.open_connection(lq, rpc_service=calc)
    # How the peer's codec sends a proxy for calc: its path as the data.
    proxy_map = json.loads(client.channel.codec.encode(calc))
    raw = await aiomas.channel.open_connection(lq)
    proxy_map["__type__"][1] = 42
    with pytest.raises(RemoteException, match="Invalid RPC proxy path 42"):
        await raw.send(["mul", [proxy_map, 1], {}])
    assert await raw.send(["mul", [2, 3], {}]) == 6
    await raw.close()
    await client.close()
    server.close()
    await server.wait_closed()


# Connected clients and connection losses.


async def test_client_connected_cb_and_on_connection_reset(endpoint: Endpoint) -> None:
    resets: list[BaseException] = []
    connected: list[RpcClient] = []
    reset_seen = asyncio.Event()

    def client_connected(client: RpcClient) -> None:
        def on_reset(exc: BaseException) -> None:
            resets.append(exc)
            reset_seen.set()

        client.on_connection_reset(on_reset)
        connected.append(client)

    async with rpc_server(endpoint, Calculator(), client_connected) as addr:
        client = await rpc_connect(endpoint, addr)
        assert await client.remote.mul(2, 2) == 4
        assert len(connected) == 1
        assert isinstance(connected[0].service, asyncio.Task)
        await client.close()
        await asyncio.wait_for(reset_seen.wait(), 5)
    assert len(resets) == 1
    assert isinstance(resets[0], ConnectionResetError)


async def test_on_connection_reset_argument_checks() -> None:
    lq = aiomas.get_queue("reset-args")
    server = await aiomas.rpc.start_server(lq, Calculator())
    client = await aiomas.rpc.open_connection(lq)
    with pytest.raises(RuntimeError, match="no service task"):
        client.on_connection_reset(print)
    serving = await aiomas.rpc.open_connection(lq, rpc_service=Calculator())
    with pytest.raises(ValueError, match="callable"):
        serving.on_connection_reset(42)  # type: ignore[arg-type]
    serving.on_connection_reset(print)
    serving.on_connection_reset(None)
    await client.close()
    await serving.close()
    server.close()
    await server.wait_closed()


async def test_connection_loss_fails_all_calls_in_flight(endpoint: Endpoint) -> None:
    clients: list[RpcClient] = []
    started = asyncio.Event()

    @expose
    async def hang() -> None:
        started.set()
        await asyncio.Event().wait()

    @expose
    async def close_all() -> None:
        while clients:
            await clients.pop().close()

    service = ServiceDict({"hang": hang, "close_all": close_all})
    async with rpc_server(endpoint, service, clients.append) as addr:
        client = await rpc_connect(endpoint, addr)
        calls = [client.remote.hang() for _ in range(50)]
        await started.wait()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(client.remote.close_all(), 5)
        for call in calls:
            with pytest.raises(ConnectionResetError):
                await call
        await client.close()


async def test_calls_running_for_a_lost_connection_are_cancelled(
    endpoint: Endpoint,
) -> None:
    """Results for a peer that is gone cannot be delivered: the exposed
    coroutines computing them are cancelled instead of running on."""
    started = asyncio.Event()
    cancelled: list[int] = []

    @expose
    async def hang(i: int) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(i)
            raise

    async with rpc_server(endpoint, ServiceDict({"hang": hang})) as addr:
        client = await rpc_connect(endpoint, addr)
        calls = [client.remote.hang(i) for i in range(10)]
        await started.wait()
        await asyncio.sleep(50 * TIME_UNIT)
        await client.close()
        for call in calls:
            with pytest.raises(ConnectionResetError):
                await call
        for _ in range(100):
            if len(cancelled) == 10:
                break
            await asyncio.sleep(10 * TIME_UNIT)
        assert sorted(cancelled) == list(range(10))


async def test_async_callbacks_run_as_tasks_that_close_cancels(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lq = aiomas.get_queue("async-callbacks")
    server = await aiomas.rpc.start_server(lq, Calculator())
    client = await aiomas.rpc.open_connection(lq)
    args: list[Any] = []
    hanging, hung_up = asyncio.Event(), asyncio.Event()

    async def quick(arg: Any) -> None:
        args.append(arg)

    async def hang(arg: Any) -> None:
        hanging.set()
        try:
            await asyncio.Event().wait()
        finally:
            hung_up.set()

    client.run_callback(quick, "spam")
    client.run_callback(hang, None)
    await asyncio.wait_for(hanging.wait(), 5)
    assert args == ["spam"]
    await client.close()
    assert hung_up.is_set()
    server.close()
    await server.wait_closed()
    assert aiomas_records(caplog, logging.ERROR) == []


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs SIGUSR1")
async def test_a_signal_in_a_callback_is_not_swallowed() -> None:
    """What a signal handler raises (Ctrl-C) while a callback runs must reach
    the caller instead of being logged as the callback's failure."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def callback(arg: Any) -> None:
        signal.raise_signal(signal.SIGUSR1)

    lq = aiomas.get_queue("signal-callback")
    server = await aiomas.rpc.start_server(lq, Calculator())
    client = await aiomas.rpc.open_connection(lq)
    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            client.run_callback(callback, None)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    await client.close()
    server.close()
    await server.wait_closed()


async def test_cancelling_the_service_task_is_no_connection_reset() -> None:
    lq = aiomas.get_queue("cancel-service")
    server = await aiomas.rpc.start_server(lq, Calculator())
    client = await aiomas.rpc.open_connection(lq, rpc_service=Calculator())
    resets: list[BaseException] = []
    client.on_connection_reset(resets.append)
    service = client.service
    assert service is not None
    service.cancel()
    with pytest.raises(asyncio.CancelledError):
        await service
    await client.close()
    server.close()
    await server.wait_closed()
    assert resets == []


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_failing_client_connected_cb_is_logged_and_connection_survives(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    def sync_cb(client: RpcClient) -> None:
        raise ValueError("callback bug")

    async def async_cb(client: RpcClient) -> None:
        raise ValueError("callback bug")

    lq = aiomas.get_queue("failing-cb")
    server = await aiomas.rpc.start_server(
        lq, Calculator(), sync_cb if kind == "sync" else async_cb
    )
    client = await aiomas.rpc.open_connection(lq)
    assert await client.remote.mul(6, 7) == 42
    await client.close()
    server.close()
    await server.wait_closed()
    errors = aiomas_records(caplog, logging.ERROR)
    assert len(errors) == 1
    assert "failed for the connection" in errors[0].getMessage()


async def test_unserializable_result_becomes_a_remote_exception() -> None:
    @expose
    def odd() -> object:
        return object()

    lq = aiomas.get_queue("odd-result")
    server = await aiomas.rpc.start_server(lq, ServiceDict({"odd": odd, "add": add}))
    client = await aiomas.rpc.open_connection(lq)
    with pytest.raises(RemoteException, match="SerializationError"):
        await client.remote.odd()
    assert await client.remote.add(1, 1) == 2
    await client.close()
    server.close()
    await server.wait_closed()


async def test_msgpack_and_extra_serializers() -> None:
    @aiomas.codecs.serializable
    class Vec:
        def __init__(self, x: int, y: int) -> None:
            self.x, self.y = x, y

    @expose
    def swap(v: Vec) -> Vec:
        return Vec(v.y, v.x)

    kwargs = {"codec": aiomas.MsgPack, "extra_serializers": [Vec.__serializer__]}
    lq = aiomas.get_queue("rpc-msgpack")
    server = await aiomas.rpc.start_server(lq, ServiceDict({"swap": swap}), **kwargs)
    client = await aiomas.rpc.open_connection(lq, **kwargs)
    result = await client.remote.swap(Vec(1, 2))
    assert (result.x, result.y) == (2, 1)
    await client.close()
    server.close()
    await server.wait_closed()


async def test_a_second_rpc_client_on_a_channel_serves_its_own_service() -> None:
    """Adding an RpcClient must not break the channel's codec for the next."""

    class Callback:
        router = Service()

        def __init__(self, name: str) -> None:
            self.name = name

        @expose
        def who(self) -> str:
            return self.name

    class Asker:
        router = Service()

        @expose
        async def ask(self, proxy: Proxy) -> str:
            result: str = await proxy.who()
            return result

    server = await aiomas.rpc.start_server(("127.0.0.1", 0), Asker())
    addr = server.sockets[0].getsockname()[:2]  # type: ignore[attr-defined]
    try:
        first = await aiomas.rpc.open_connection(addr, rpc_service=Callback("first"))
        try:
            second_service = Callback("second")
            second = RpcClient(first.channel, second_service)
            assert await second.remote.ask(second_service) == "second"
            with pytest.raises(aiomas.SerializationError, match="not part of"):
                await second.remote.ask(Callback("stranger"))
        finally:
            await first.close()
    finally:
        server.close()
        await server.wait_closed()


# --- The wire extension (see docs/deadlines.rst) ---------------------------------


async def test_an_extension_server_serves_clients_that_do_not_offer() -> None:
    service = ServiceDict({"add": expose(lambda a, b: a + b)})
    server = await aiomas.rpc.start_server(("127.0.0.1", 0), service, extensions=True)
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    client = await aiomas.rpc.open_connection(("127.0.0.1", port))
    try:
        assert await client.wait_extensions() == frozenset()
        assert await client.remote.add(1, 2) == 3
        assert await client.remote.add(3, 4) == 7
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


async def test_an_offer_is_made_once() -> None:
    service = ServiceDict({"add": expose(lambda a, b: a + b)})
    server = await aiomas.rpc.start_server(("127.0.0.1", 0), service, extensions=True)
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    client = await aiomas.rpc.open_connection(("127.0.0.1", port), extensions=True)
    try:
        with pytest.raises(RuntimeError, match="offered already"):
            client.offer_extensions()
        assert await client.wait_extensions() == {"cancel", "deadline", "trace"}
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


async def test_an_end_without_a_service_takes_the_offer_too() -> None:
    ends: list[aiomas.rpc.RpcClient] = []

    async def connected(channel: aiomas.channel.Channel) -> None:
        ends.append(aiomas.rpc.RpcClient(channel, extensions=True))

    server = await aiomas.channel.start_server(("127.0.0.1", 0), connected)
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    client = await aiomas.rpc.open_connection(("127.0.0.1", port), extensions=True)
    try:
        assert await client.wait_extensions() == {"cancel", "deadline", "trace"}
        with pytest.raises(aiomas.RemoteException, match="serves no RPC service"):
            await client.remote.spam()
    finally:
        await client.close()
        for end in ends:
            await end.close()
        server.close()
        await server.wait_closed()


async def test_closing_cancels_the_calls_the_peer_may_cancel() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    ends: list[aiomas.rpc.RpcClient] = []
    service = ServiceDict({"forever": expose(forever)})
    server = await aiomas.rpc.start_server(
        ("127.0.0.1", 0), service, ends.append, extensions=True
    )
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    client = await aiomas.rpc.open_connection(("127.0.0.1", port), extensions=True)
    try:
        await client.wait_extensions()
        call = client.remote.forever()
        await asyncio.wait_for(started.wait(), 10)
        (end,) = ends
        await end.close()
        with pytest.raises(ConnectionResetError):
            await call
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


def _rpc_over_a_fake_transport(
    service: Any, extended: bool = False
) -> tuple[aiomas.channel.ChannelProtocol, FakeTransport, RpcClient]:
    """A JSON channel protocol on a FakeTransport, its RpcClient serving
    *service* (*extended*: it agreed on the wire extension the peer
    offered)."""
    clients: list[RpcClient] = []
    protocol = aiomas.channel.ChannelProtocol(
        aiomas.JSON(),
        lambda channel: clients.append(
            RpcClient(channel, service, extensions=extended)
        ),
    )
    transport = FakeTransport(protocol)
    if extended:
        features = ["cancel", "deadline"]
        offer = ["__aiomas__/extensions", [1, features], {}]
        feed(protocol, transport, [frames([0, 0, offer])])
        assert clients[0].channel.extended
        transport.writes.clear()
    return protocol, transport, clients[0]


async def test_a_call_cancelled_before_it_ran_does_not_warn() -> None:
    """A call's task cancelled before it ran (as when the connection ends
    or the client closes right after the request arrived): the call's
    coroutine is closed, not left to warn that it was never awaited."""
    started: list[bool] = []

    async def work() -> None:
        started.append(True)

    protocol, transport, client = _rpc_over_a_fake_transport(
        ServiceDict({"work": expose(work)})
    )
    before = asyncio.all_tasks()
    feed(protocol, transport, [frames([0, 0, ["work", [], {}]])])
    assert client.calls_in_progress == 1
    (call,) = [
        task
        for task in asyncio.all_tasks() - before
        if task.get_coro().__qualname__ == "_reply_when_done"  # type: ignore[union-attr]
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call.cancel()
        await settle()
        gc.collect()
    assert started == []
    assert [str(w.message) for w in caught] == []
    assert client.calls_in_progress == 0
    await client.close()


# An exposed coroutine function's task (Channel.start_task): on Python 3.12
# and later it starts eagerly, within the read, unless a task that an
# earlier message woke has yet to run.

EAGER = sys.version_info >= (3, 12)


@pytest.mark.parametrize("extended", [False, True], ids=["plain", "extended"])
async def test_a_coroutine_call_that_does_not_wait_is_answered_within_the_read(
    extended: bool,
) -> None:
    async def echo(value: Any) -> Any:
        return value

    service = ServiceDict({"echo": expose(echo)})
    request = [0, 1, ["echo", ["now"], {}]]
    await _answered_within_the_read_if_eager(service, extended, request, "now")


async def _answered_within_the_read_if_eager(
    service: Any, extended: bool, request: Any, answer: Any
) -> None:
    """Feed *request* to an RpcClient serving *service*: on 3.12+ it is
    answered with *answer* within the read, on 3.11 in the loop's next pass."""
    protocol, transport, client = _rpc_over_a_fake_transport(service, extended)

    def read() -> bytes:
        feed(protocol, transport, [frames(request)])
        return transport.written  # before the loop runs anything else

    answered = frames([1, request[1], answer])
    assert await in_a_callback(read) == (answered if EAGER else b"")
    await settle()
    assert transport.written == answered
    assert client.calls_in_progress == 0
    await client.close()


async def test_a_coroutine_call_with_a_deadline_starts_guarded_by_its_task() -> None:
    # (Eager on 3.12+, within the read: the deadline knows the call's task
    # from its first step, so calls it makes at once need no timers.)
    async def check() -> bool:
        deadline = aiomas.deadlines.current_deadline()
        return deadline is not None and deadline.task is asyncio.current_task()

    service = ServiceDict({"check": expose(check)})
    request = [3, 1, [["check", [], {}], {"deadline": 5}]]
    await _answered_within_the_read_if_eager(service, True, request, True)


async def test_a_coroutine_call_starts_after_the_task_an_earlier_message_woke() -> None:
    ran: list[str] = []

    async def handler() -> str:
        ran.append("handler")
        return "done"

    protocol, transport, client = _rpc_over_a_fake_transport(
        ServiceDict({"handler": expose(handler)})
    )

    async def caller() -> None:
        await client.remote.peer_function()
        ran.append("caller")

    calling = asyncio.ensure_future(caller())
    await settle()
    # The reply to the caller's call, then a request, in one read and in two.
    reply = frames([1, 0, None])
    request = frames([0, 0, ["handler", [], {}]])
    await in_a_callback(lambda: feed(protocol, transport, [reply + request]))
    await calling
    await settle()
    assert ran == ["caller", "handler"]
    calling = asyncio.ensure_future(caller())
    await settle()

    def two_reads() -> None:
        feed(protocol, transport, [frames([1, 1, None])])
        feed(protocol, transport, [frames([0, 1, ["handler", [], {}]])])

    await in_a_callback(two_reads)
    await calling
    await settle()
    assert ran == ["caller", "handler"] * 2
    await client.close()


async def test_a_coroutine_call_under_a_task_factory_starts_in_the_next_pass() -> None:
    loop = asyncio.get_running_loop()
    made: list[Any] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        made.append(coro)
        return asyncio.Task(coro, loop=loop, **kwargs)

    async def echo(value: Any) -> Any:
        return value

    protocol, transport, client = _rpc_over_a_fake_transport(
        ServiceDict({"echo": expose(echo)})
    )
    loop.set_task_factory(factory)
    try:

        def read() -> bytes:
            feed(protocol, transport, [frames([0, 0, ["echo", [1], {}]])])
            return transport.written

        assert await in_a_callback(read) == b""
        await settle()
        assert transport.written == frames([1, 0, 1])
        assert len(made) == 1  # (the factory made the call's task)
    finally:
        loop.set_task_factory(None)
    await client.close()
