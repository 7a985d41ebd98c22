"""Tests for aiomas.rpc: routers, services, proxies and calls over real transports."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from typing import Any

import pytest

import aiomas
from aiomas.exceptions import RemoteException, SerializationError
from aiomas.rpc import Proxy, Router, RpcClient, Service, ServiceDict, expose
from aiomas.testing import TIME_UNIT

from .conftest import Endpoint
from .helpers import aiomas_records

# Routers and services, without a network.


@expose
def add(a: int, b: int) -> int:
    return a + b


def not_exposed() -> str:
    return "secret"


class Calculator:
    router = Service(["inner"])

    def __init__(self) -> None:
        self.inner = ServiceDict({"add": add})
        self.touched = False

    @expose
    def mul(self, a: int, b: int) -> int:
        return a * b

    @expose
    async def slow_mul(self, a: int, b: int) -> int:
        await asyncio.sleep(0)
        return a * b

    @expose
    @staticmethod
    def neg(a: int) -> int:
        return -a

    def hidden(self) -> str:
        return "secret"

    @property
    def dangerous(self) -> str:
        self.touched = True
        return "should never run"

    @expose
    def _private(self) -> str:
        return "secret"


def test_expose_only_marks_the_function() -> None:
    def func() -> None:
        pass

    assert expose(func) is func
    assert func.__rpc__ is True  # type: ignore[attr-defined]
    assert Service.expose is expose
    assert Router.expose is expose


def test_service_descriptor_gives_each_instance_its_own_router() -> None:
    assert isinstance(Calculator.router, Service)
    a, b = Calculator(), Calculator()
    assert isinstance(a.router, Router)
    assert a.router is a.router
    assert a.router is not b.router
    assert a.router.obj is a
    assert (a.router.name, a.router.parent, a.router.path) == ("", None, "")
    with pytest.raises(AttributeError):
        a.router = Router(a)  # type: ignore[misc]


def test_resolve_functions_and_sub_services() -> None:
    calc = Calculator()
    assert calc.router.resolve("mul")(3, 4) == 12
    assert calc.router.resolve("neg")(3) == -3
    assert calc.router.resolve("inner/add")(3, 4) == 7
    inner = calc.inner.router
    assert (inner.name, inner.parent, inner.path) == ("inner", calc.router, "inner")
    assert inner.root is calc.router


@pytest.mark.parametrize(
    "path",
    [
        "hidden",
        "dangerous",
        "_private",
        "__class__",
        "__init__",
        "__dict__",
        "mul/__globals__",
        "router",
        "obj",
        "inner/router",
        "inner/obj",
        "inner/dict",
        "inner/not_exposed",
        "nothing",
        "nothing/add",
        "",
        "/mul",
        "mul/",
        "inner//add",
        "../mul",
        "inner/../mul",
        "inner/add/__call__",
        "x" * 10_000,
    ],
)
def test_unreachable_paths_raise_lookup_error_without_touching_the_object(
    path: str,
) -> None:
    calc = Calculator()
    calc.inner.dict["not_exposed"] = not_exposed
    with pytest.raises(LookupError):
        calc.router.resolve(path)
    assert not calc.touched


def test_instance_attributes_and_exposure() -> None:
    """An instance attribute hides an exposed method of the class (and is not
    exposed itself); an exposed function stored on the instance is reachable."""

    class Service_:
        router = Service()

        @expose
        def hidden(self) -> int:
            return 1

        @expose
        @staticmethod
        def static() -> int:
            return 2

        @classmethod
        @expose
        def klass(cls) -> int:
            return 3

        handler = None  # a class attribute that is not exposed ...

    service = Service_()
    service.handler = expose(lambda: 6)  # type: ignore[assignment]  # ... hidden
    assert service.router.resolve("handler")() == 6
    service.hidden = lambda: 4  # type: ignore[method-assign]
    service.own = expose(lambda: 5)  # type: ignore[attr-defined]
    with pytest.raises(LookupError):
        service.router.resolve("hidden")
    assert service.router.resolve("static")() == 2
    assert service.router.resolve("klass")() == 3
    assert service.router.resolve("own")() == 5
    assert Service_().router.resolve("hidden")() == 1


def test_resolving_never_runs_code_of_unexposed_values() -> None:
    """Found by fuzzing: looking for the expose marker on an attribute value
    (or on one that hides an exposed method) ran that value's __getattr__."""
    looked_up: list[str] = []

    class Lazy:
        def __getattr__(self, name: str) -> Any:
            looked_up.append(name)
            raise AttributeError(name)

    class Holder:
        router = Service()

        def __init__(self) -> None:
            self.lazy_object = Lazy()
            self.shadowed = Lazy()

        @expose
        def shadowed(self) -> None:  # type: ignore[no-redef]
            pass

    holder = Holder()
    for path in ("lazy_object", "shadowed"):
        with pytest.raises(LookupError):
            holder.router.resolve(path)
    assert looked_up == []


def test_exposed_bound_methods_and_partials_in_a_service_dict() -> None:
    class Counter:
        @expose
        def add(self, a: int, b: int) -> int:
            return a + b

        def hidden(self) -> None:
            pass

    counter = Counter()
    service = ServiceDict(
        {
            "add": counter.add,
            "hidden": counter.hidden,
            "twice": expose(functools.partial(counter.add, 2)),
        }
    )
    assert service.router.resolve("add")(1, 2) == 3
    assert service.router.resolve("twice")(5) == 7
    with pytest.raises(LookupError):
        service.router.resolve("hidden")


def test_services_put_into_a_service_dict_later_are_reachable() -> None:
    class Leaf:
        router = Service()

        @expose
        def ping(self) -> str:
            return "pong"

        @property
        def trap(self) -> None:
            raise AssertionError("no code of the value runs")

    class Plain:
        router = "not a router"

    service = ServiceDict()
    leaf, inner = Leaf(), ServiceDict({"add": expose(lambda a, b: a + b)})
    service.dict.update({"leaf": leaf, "inner": inner, "plain": Plain()})
    leaf.router.parent, leaf.router.name = service.router, "leaf"
    assert service.router.resolve("leaf/ping")() == "pong"
    assert service.router.resolve("inner/add")(1, 2) == 3
    assert leaf.router.path == "leaf"
    for path in ("plain/x", "nothing/ping", "leaf/trap"):
        with pytest.raises(LookupError):
            service.router.resolve(path)
    children = list(service.router.children())
    assert leaf.router in children
    assert inner.router in children


def test_a_class_can_be_the_service() -> None:
    class Klass:
        router = Service()

        @expose
        @staticmethod
        def static() -> int:
            return 1

        @classmethod
        @expose
        def klass(cls) -> str:
            return cls.__name__

        @staticmethod
        def hidden() -> None:
            pass

    router = Router(Klass)
    assert router.resolve("static")() == 1
    assert router.resolve("klass")() == "Klass"
    with pytest.raises(LookupError):
        router.resolve("hidden")


def test_a_half_built_service_elsewhere_does_not_stop_sending_another() -> None:
    """Before refusing to send a service, the proxy serializer attaches late
    sub-services in the whole tree; one that is not a service (yet) is skipped."""

    class Helper:
        router = Service()

    class Half:
        router = Service(["sub"])

        def __init__(self) -> None:
            self.router  # noqa: B018 (made before "sub" is filled in)
            self.sub = None

    class Root:
        router = Service(["half", "helper"])

        def __init__(self) -> None:
            self.router  # noqa: B018 (made before the sub-services exist)
            self.half = Half()
            self.helper = Helper()

    root = Root()
    root.router.attach_declared()
    assert root.helper.router.path == "helper"
    assert root.half.router.path == "half"


def test_resolve_refuses_non_string_paths() -> None:
    with pytest.raises(LookupError):
        Calculator().router.resolve(["mul"])  # type: ignore[arg-type]


def test_declared_sub_services_may_be_set_after_the_router_exists() -> None:
    class Late:
        router = Service(["child"])

        def __init__(self) -> None:
            assert self.router.path == ""  # router made before the child exists
            self.child = ServiceDict({"add": add})

    late = Late()
    assert late.router.resolve("child/add")(1, 2) == 3
    assert late.child.router.path == "child"


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


def test_router_add_and_set_sub_router() -> None:
    class Root:
        router = Service()

        def __init__(self) -> None:
            self.a = ServiceDict({"add": add})
            self.router.add("a")
            self.b = Calculator()
            self.router.set_sub_router(self.b.router, "bee")

    root = Root()
    assert root.router.resolve("a/add")(1, 1) == 2
    assert root.router.resolve("bee/mul")(2, 3) == 6
    assert root.router.resolve("bee/inner/add")(2, 3) == 5
    assert root.b.inner.router.path == "bee/inner"
    with pytest.raises(ValueError, match="no RPC service"):
        root.router.add("router")
    with pytest.raises(ValueError, match="'/'"):
        root.router.set_sub_router(Calculator().router, "x/y")
    with pytest.raises(LookupError):
        root.router.set_sub_router(Calculator().router, "_x")


def test_service_dict() -> None:
    sd = ServiceDict({"add": add, "sub": ServiceDict({"add": add})})
    assert sd.dict["add"] is add
    assert sd.router.resolve("sub/add")(1, 2) == 3
    assert ServiceDict().dict == {}
    assert "ServiceDict" in repr(sd)


def test_slotted_service_without_room_for_a_router() -> None:
    class Slotted:
        __slots__ = ()
        router = Service()

    with pytest.raises(TypeError, match="slot"):
        Slotted().router  # noqa: B018


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
    with pytest.raises(AttributeError):
        remote._private  # noqa: B018
    await client.close()
    await other.close()
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
