"""Tests for aiomas.agent: agents, containers, addresses and connections."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import ssl
import struct
import sys
import tempfile
import time
import typing
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import arrow
import pytest

import aiomas
from aiomas import agent as agent_mod
from aiomas import rpc
from aiomas.agent import state_of
from aiomas.channel import Channel
from aiomas.testing import TIME_UNIT

from .conftest import TLSFiles, ipv6_available
from .helpers import black_hole, tcp_socket_options
from .test_addresses import MALFORMED_URLS

# Generous bound for things that happen within milliseconds; only a broken test
# waits this long.
WAIT: float = 10.0


HIDDEN_CALLS: list[Any] = []  # Callee.hidden() must never run from remote


class Callee(aiomas.Agent):
    @aiomas.expose
    def spam(self, times: int) -> str:
        return "spam" * times

    @aiomas.expose
    async def slow_echo(self, value: Any, delay: float = 0.0) -> Any:
        await asyncio.sleep(delay)
        return value

    @aiomas.expose
    def fail(self) -> None:
        raise ValueError("no spam today")

    def hidden(self) -> str:
        HIDDEN_CALLS.append(self)
        return "not exposed"


class Caller(aiomas.Agent):
    """Calls back whatever agent proxy it gets."""

    @aiomas.expose
    async def call_back(self, proxy: rpc.Proxy, times: int) -> str:
        result: str = await proxy.spam(times)
        return result.upper()


@dataclass
class Place:
    """Where the containers of a test live: one transport, many addresses."""

    kind: str
    directory: Path | None = None
    create_kwargs: dict[str, Any] = field(default_factory=dict)
    count: int = 0
    nats_url: str = ""  # for "nats": the server and the subject prefix
    nats_query: str = ""

    def next_addr(self) -> Any:
        self.count += 1
        if self.kind == "nats":
            return f"{self.nats_url}/c{self.count}?{self.nats_query}"
        if self.kind == "tcp6":
            return ("::1", 0)
        if self.kind == "unix":
            assert self.directory is not None
            return str(self.directory / f"c{self.count}")
        if self.kind == "localqueue":
            return aiomas.get_queue(f"container-{self.count}")
        return ("127.0.0.1", 0)

    @contextlib.asynccontextmanager
    async def containers(
        self, number: int, **kwargs: Any
    ) -> AsyncIterator[list[aiomas.Container]]:
        made: list[aiomas.Container] = []
        try:
            for _ in range(number):
                made.append(
                    await aiomas.Container.create(
                        self.next_addr(), as_coro=True, **self.create_kwargs, **kwargs
                    )
                )
            yield made
        finally:
            await asyncio.wait_for(
                asyncio.gather(*(c.shutdown(as_coro=True) for c in made)), WAIT
            )


TRANSPORTS = ["tcp4", "tcp6", "unix", "localqueue", "tls", "nats"]


def nats_place(request: pytest.FixtureRequest, query: str = "") -> Place:
    """Containers on the session's NATS server, under a prefix of the test's
    own."""
    server = request.getfixturevalue("nats_server")
    prefix = request.getfixturevalue("nats_prefix")
    return Place(
        "nats",
        nats_url=server.url,
        nats_query="&".join(part for part in (f"prefix={prefix}", query) if part),
    )


@pytest.fixture(params=TRANSPORTS)
def place(request: pytest.FixtureRequest, tls: TLSFiles) -> Iterator[Place]:
    """Every transport that containers run on."""
    kind = request.param
    if kind == "tcp6" and not ipv6_available():
        pytest.skip("IPv6 loopback (::1) is not available on this machine")
    if kind == "unix":
        if sys.platform == "win32":
            pytest.skip("unix domain sockets are not available on Windows")
        with tempfile.TemporaryDirectory(prefix="aiomas-") as directory:
            yield Place(kind, Path(directory))
        return
    if kind == "tls":
        certs = aiomas.SSLCerts(tls.cafile, tls.certfile, tls.keyfile)
        yield Place(kind, create_kwargs={"ssl": certs})
        return
    if kind == "nats":
        yield nats_place(request)
        return
    yield Place(kind)


@pytest.fixture
async def tcp_pair() -> AsyncIterator[list[aiomas.Container]]:
    """Two containers on 127.0.0.1."""
    async with Place("tcp4").containers(2) as containers:
        yield containers


async def cut_connections(
    container: aiomas.Container, caller: aiomas.Container, proxy: Any
) -> None:
    """Close *container*'s end of its incoming connections; wait until
    *caller* (whose *proxy* used one) has noticed and forgotten it."""
    for client in state_of(container).registry.clients:
        await client.close()
    with pytest.raises(ConnectionResetError):
        await proxy.spam(1)
    for _ in range(100):
        if not state_of(caller).pool.clients:
            break
        await asyncio.sleep(10 * TIME_UNIT)


def incoming(container: aiomas.Container) -> int:
    """How many connections other containers have open to *container*."""
    return len(state_of(container).registry.clients)


def channel_of(container: aiomas.Container, proxy: aiomas.AgentProxy) -> Channel:
    """The channel that *proxy* (made by *container*) sends its calls over.

    Proxies are equal if they have the same channel and path, so this finds it
    among *container*'s connections without looking into the proxy."""
    path = f"agents/{proxy.addr.rsplit('/', 1)[1]}"
    (channel,) = [
        client.channel
        for client in state_of(container).pool.clients.values()
        if proxy == rpc.Proxy(client.channel, path)
    ]
    return channel


# --- agents and their addresses -----------------------------------------------------


async def test_agents_get_ids_in_order_and_addresses(
    tcp_pair: list[aiomas.Container],
) -> None:
    container = tcp_pair[0]
    base = container.base_url
    agents = [Callee(container) for _ in range(3)]
    assert [a.addr for a in agents] == [f"{base}{i}" for i in range(3)]
    assert str(agents[1]) == f"Callee('{base}1')"
    assert repr(agents[1]) == str(agents[1])
    assert all(a.container is container for a in agents)


async def test_every_agent_has_its_own_router(tcp_pair: list[aiomas.Container]) -> None:
    first, second = Callee(tcp_pair[0]), Callee(tcp_pair[0])
    assert isinstance(first.router, rpc.Router)
    assert first.router is first.router
    assert first.router is not second.router
    assert first.router.path == "agents/0"
    assert first.router.root is tcp_pair[0].router
    assert isinstance(Callee.router, rpc.Service)


class CountedRouters(Callee):
    """Records every router made for its agents."""

    made: typing.ClassVar[list[rpc.Router]] = []

    def __rpc_router_made__(self, router: rpc.Router) -> None:
        CountedRouters.made.append(router)
        super().__rpc_router_made__(router)


async def test_agents_get_their_router_on_first_use(
    tcp_pair: list[aiomas.Container],
) -> None:
    CountedRouters.made.clear()
    callee, caller = tcp_pair
    agents = [CountedRouters(callee) for _ in range(3)]
    assert CountedRouters.made == []
    # An RPC call makes (and places) the router of the agent called only.
    proxy = await caller.connect(agents[1].addr)
    assert await proxy.spam(2) == "spamspam"
    assert CountedRouters.made == [agents[1].router]
    assert agents[1].router.path == "agents/1"
    assert agents[1].router.root is callee.router
    # Direct use places it too.
    assert agents[2].router.path == "agents/2"
    assert CountedRouters.made == [agents[1].router, agents[2].router]
    assert await proxy.spam(1) == "spam"
    assert len(CountedRouters.made) == 2
    # Placed routers are found without a lookup in the agent's class; the
    # others are made when asked for.
    agents_router = callee.agents.router
    assert agents_router.sub_router("1") is agents[1].router
    assert len(CountedRouters.made) == 2
    assert agents_router.sub_router("0") is agents[0].router
    assert len(CountedRouters.made) == 3
    assert list(agents_router.children()) == [a.router for a in agents]
    # The dict has the last word: an agent taken out (or replaced) there is
    # no longer called.
    del callee.agents.dict["1"]
    assert agents_router.sub_router("1") is None
    with pytest.raises(aiomas.RemoteException, match="No RPC service '1'"):
        await proxy.spam(1)
    callee.agents.dict["2"] = agents[0]
    assert agents_router.sub_router("2") is agents[0].router


async def test_the_first_call_makes_the_router_without_running_getattr(
    tcp_pair: list[aiomas.Container],
) -> None:
    ran: list[str] = []

    class Guarded(Callee):
        def __getattr__(self, name: str) -> Any:
            ran.append(name)
            raise AttributeError(name)

    agent = Guarded(tcp_pair[0])
    proxy = await tcp_pair[1].connect(agent.addr)
    assert await proxy.spam(1) == "spam"
    assert agent.router.path == "agents/0"
    assert ran == []


async def test_an_agent_sent_before_its_router_is_used_has_its_path(
    tcp_pair: list[aiomas.Container],
) -> None:
    callee, caller = tcp_pair
    target = Callee(caller)  # no router yet
    middle = Caller(callee)
    proxy = await caller.connect(middle.addr)
    # The caller's container sends `target` as a proxy: its router's path.
    assert await proxy.call_back(target, 2) == "SPAMSPAM"


async def test_a_router_made_before_registration_is_placed(
    tcp_pair: list[aiomas.Container],
) -> None:
    class Early(Callee):
        def __init__(self, container: aiomas.Container) -> None:
            self.early = self.router
            super().__init__(container)

    Callee(tcp_pair[0])
    agent = Early(tcp_pair[0])
    assert agent.early is agent.router
    assert agent.router.path == "agents/1"
    proxy = await tcp_pair[1].connect(agent.addr)
    assert await proxy.spam(1) == "spam"


def test_an_agent_that_never_registers_is_not_kept_alive() -> None:
    class Failing(Callee):
        def __init__(self, container: aiomas.Container) -> None:
            assert self.router.path == ""  # not placed: no container yet
            raise RuntimeError("never registered")

    with pytest.raises(RuntimeError, match="never registered"):
        Failing(None)  # type: ignore[arg-type]
    gc.collect()
    assert not [obj for obj in gc.get_objects() if type(obj) is Failing]


async def test_agent_needs_a_container() -> None:
    with pytest.raises(TypeError, match="needs a Container"):
        Callee(object())  # type: ignore[arg-type]


async def test_container_subclasses_are_accepted() -> None:
    class MyContainer(aiomas.Container):
        pass

    container = await MyContainer.create(("127.0.0.1", 0), as_coro=True)
    try:
        assert type(container) is MyContainer
        agent = Callee(container)
        assert agent.container is container
        assert repr(container).startswith("MyContainer('tcp://127.0.0.1:")
    finally:
        await container.shutdown(as_coro=True)


async def test_agents_of_a_subclass_with_sub_services(
    tcp_pair: list[aiomas.Container],
) -> None:
    class Inventory:
        router = rpc.Service()

        @aiomas.expose
        def count(self) -> int:
            return 3

    class Shop(aiomas.Agent):
        router = rpc.Service(["inventory"])

        def __init__(self, container: aiomas.Container) -> None:
            super().__init__(container)
            self.inventory = Inventory()

    shop = Shop(tcp_pair[0])
    proxy = await tcp_pair[1].connect(shop.addr)
    assert await proxy.inventory.count() == 3


# --- calls between agents, over every transport --------------------------------------


async def test_calls_within_one_container(place: Place) -> None:
    async with place.containers(1) as (container,):
        callee = Callee(container)
        caller = Caller(container)
        proxy = await container.connect(callee.addr)
        assert str(proxy) == f"CalleeProxy('{callee.addr}')"
        assert proxy.addr == callee.addr
        assert await proxy.spam(3) == "spamspamspam"
        assert await proxy.slow_echo([1, "a", None]) == [1, "a", None]
        caller_proxy = await container.connect(caller.addr)
        assert await caller_proxy.call_back(callee, 2) == "SPAMSPAM"


async def test_calls_between_two_containers(place: Place) -> None:
    async with place.containers(2) as (one, two):
        callee = Callee(one)
        caller = Caller(two)
        proxy = await two.connect(callee.addr)
        assert await proxy.spam(2) == "spamspam"
        # An agent passed as an argument arrives as a proxy through which the
        # other container calls back over the same connection.
        caller_proxy = await one.connect(caller.addr)
        assert await caller_proxy.call_back(callee, 1) == "SPAM"
        with pytest.raises(aiomas.RemoteException, match="no spam today") as info:
            await proxy.fail()
        assert "ValueError" in info.value.remote_traceback


async def test_only_exposed_methods_can_be_called(
    tcp_pair: list[aiomas.Container],
) -> None:
    callee = Callee(tcp_pair[0])
    proxy = await tcp_pair[1].connect(callee.addr)
    channel = channel_of(tcp_pair[1], proxy)
    agent_paths = [
        f"agents/0/{name}"
        for name in (
            "hidden",
            "_register",
            "container",
            "addr",
            "router",
            "__init__",
            "__class__",
            "__dict__",
            "",
            "spam/__func__",
            "spam/__globals__",
            "spam/__self__/hidden",
            "router/__dict__",
            "hidden/",
            "./hidden",
        )
    ]
    root_paths = [
        "connect",
        "shutdown",
        "create",
        "base_url",
        "agents",
        "agents/0",
        "agents/9/spam",
        "_agents",
        "agents/../agents/0/hidden",
        "agents//0/hidden",
        "agents/0//hidden",
        "agents/00/hidden",
        "agents/ 0/hidden",
        "validate_aid/__globals__",
        "router/hidden",
        "__class__/__subclasses__",
    ]
    for path in agent_paths + root_paths:
        with pytest.raises(aiomas.RemoteException, match="LookupError"):
            await rpc.Proxy(channel, path)()
    assert HIDDEN_CALLS == []


async def test_wire_layout_seen_by_a_plain_rpc_client(
    tcp_pair: list[aiomas.Container],
) -> None:
    """Peers that are no containers (other languages, old versions) see the
    root service with validate_aid() and the agents by id."""
    container = tcp_pair[0]
    Callee(container)
    Caller(container)
    endpoint, _ = agent_mod.parse_url(f"{container.base_url}0")
    client = await rpc.open_connection(endpoint.addr)
    try:
        assert await client.remote.validate_aid("1") == "Caller"
        assert await client.remote.validate_aid("0") == "Callee"
        assert await client.remote.validate_aid(0) == "Callee"
        assert await client.remote.validate_aid("2") is None
        assert await client.remote.validate_aid(["x"]) is None
        assert await getattr(client.remote.agents, "0").spam(1) == "spam"
        assert await rpc.Proxy(client.channel, "agents/0/spam")(2) == "spamspam"
    finally:
        await client.close()


async def test_validate_aid_locally(tcp_pair: list[aiomas.Container]) -> None:
    container = tcp_pair[0]
    Callee(container)
    assert container.validate_aid("0") == "Callee"
    assert container.validate_aid("1") is None


# --- connections: shared, cached, counted ------------------------------------------


async def test_one_connection_per_container_pair(
    tcp_pair: list[aiomas.Container],
) -> None:
    one, two = tcp_pair
    callees = [Callee(one) for _ in range(20)]
    proxies = [await two.connect(c.addr) for c in callees]
    assert [await p.spam(1) for p in proxies] == ["spam"] * 20
    assert incoming(one) == 1
    assert len({id(channel_of(two, p)) for p in proxies}) == 1


async def test_concurrent_connects_share_one_attempt(
    tcp_pair: list[aiomas.Container],
) -> None:
    one, two = tcp_pair
    callees = [Callee(one) for _ in range(10)]
    proxies = await asyncio.gather(*(two.connect(c.addr) for c in callees * 5))
    assert incoming(one) == 1
    assert len({id(p) for p in proxies}) == 10


async def test_proxies_are_cached(tcp_pair: list[aiomas.Container]) -> None:
    one, two = tcp_pair
    callee = Callee(one)
    proxy = await two.connect(callee.addr)
    assert await two.connect(callee.addr) is proxy
    del proxy
    gc.collect()
    pool = state_of(two).pool
    assert one.base_url in pool.clients
    assert pool.cached_proxies(one.base_url) == []
    again = await two.connect(callee.addr)
    assert await again.spam(1) == "spam"
    assert await two.connect(callee.addr) is again


async def test_a_cancelled_connect_does_not_cancel_the_others(
    tcp_pair: list[aiomas.Container],
) -> None:
    one, two = tcp_pair
    callee = Callee(one)
    first = asyncio.ensure_future(two.connect(callee.addr))
    second = asyncio.ensure_future(two.connect(callee.addr))
    await asyncio.sleep(0)
    first.cancel()
    proxy = await asyncio.wait_for(second, WAIT)
    assert await proxy.spam(1) == "spam"
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_an_attempt_given_up_by_every_caller_is_stopped(
    tcp_pair: list[aiomas.Container],
) -> None:
    """A connection attempt that hangs (a host that does not answer) ends when
    the last caller waiting for it gives up: the next connect() starts afresh
    instead of joining an attempt that may hang for minutes."""
    _, two = tcp_pair
    with black_hole() as (host, port):
        url = f"tcp://{host}:{port}/0"
        waiting = [asyncio.ensure_future(two.connect(url)) for _ in range(2)]
        await asyncio.sleep(50 * TIME_UNIT)
        pool = state_of(two).pool
        (attempt,) = pool.attempts.values()
        waiting[0].cancel()
        await asyncio.sleep(50 * TIME_UNIT)
        assert not attempt.done()  # somebody still waits for it
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(waiting[1], 100 * TIME_UNIT)
        await asyncio.sleep(0)
        assert attempt.cancelled()
        assert pool.attempts == {}
        with pytest.raises(asyncio.CancelledError):
            await waiting[0]
        # A new call makes a new attempt.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(two.connect(url), 100 * TIME_UNIT)
        assert pool.attempts == {}


async def test_a_late_second_connection_to_a_container_is_closed(
    tcp_pair: list[aiomas.Container],
) -> None:
    """If an attempt that was given up still connects after a newer one did,
    the container keeps one connection and closes the other."""
    one, two = tcp_pair
    endpoint, _ = agent_mod.parse_url(Callee(one).addr)
    pool = state_of(two).pool
    first = await pool.open(endpoint, 0)
    assert await pool.open(endpoint, 0) is first
    for _ in range(100):
        if incoming(one) == 1:
            break
        await asyncio.sleep(10 * TIME_UNIT)
    assert incoming(one) == 1


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux only")
async def test_dead_peer_timeout_applies_to_both_directions() -> None:
    async with Place("tcp4").containers(2, dead_peer_timeout=3) as (one, two):
        proxy = await two.connect(Callee(one).addr)
        assert await proxy.spam(1) == "spam"
        (incoming_client,) = state_of(one).registry.clients
        (outgoing_client,) = state_of(two).pool.clients.values()
        for client in (incoming_client, outgoing_client):
            assert tcp_socket_options(client.channel) == (1, 2, 3000)


@pytest.mark.parametrize("timeout", [0, -5])
def test_a_bad_dead_peer_timeout_is_refused_at_once(timeout: float) -> None:
    with pytest.raises(ValueError, match="dead_peer_timeout"):
        aiomas.Container.create(("127.0.0.1", 0), dead_peer_timeout=timeout)


async def test_reconnect_after_the_peer_container_restarts() -> None:
    place = Place("tcp4")
    async with place.containers(1) as (caller_side,):
        server = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)
        _, port = agent_mod.split_host_port(server.base_url[len("tcp://") : -1])
        addr = f"{Callee(server).addr}"
        proxy = await caller_side.connect(addr)
        assert await proxy.spam(1) == "spam"
        await server.shutdown(as_coro=True)
        with pytest.raises(ConnectionResetError):
            await proxy.spam(1)
        server = await aiomas.Container.create(("127.0.0.1", port), as_coro=True)
        try:
            Callee(server)
            new_proxy = await caller_side.connect(addr, timeout=WAIT)
            assert new_proxy is not proxy
            assert await new_proxy.spam(2) == "spamspam"
        finally:
            await server.shutdown(as_coro=True)


async def test_max_frame_size_limits_messages_in_both_directions(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A container with a small max_frame_size cuts off a container that sends
    it a larger message, whether that is a call or a reply; smaller ones pass,
    and the next connect() makes a new connection."""
    place = Place("tcp4")
    async with (
        place.containers(1, max_frame_size=1000) as (small,),
        place.containers(1) as (large,),
    ):
        small_callee, large_callee = Callee(small), Callee(large)
        to_small = await large.connect(small_callee.addr)
        assert await to_small.slow_echo("x" * 500) == "x" * 500
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(to_small.slow_echo("x" * 2000), WAIT)
        assert any("exceeds" in r.getMessage() for r in caplog.records)
        to_small = await large.connect(small_callee.addr)
        assert await to_small.spam(1) == "spam"
        # The reply to small's call is too big for small.
        to_large = await small.connect(large_callee.addr)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(to_large.spam(500), WAIT)
        assert await (await small.connect(large_callee.addr)).spam(2) == "spamspam"


@pytest.mark.parametrize("size", [-1, 2**32])
def test_a_bad_max_frame_size_is_refused_at_once(size: int) -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        aiomas.Container.create(("127.0.0.1", 0), max_frame_size=size)


# --- connect() errors ----------------------------------------------------------------


@pytest.mark.parametrize("url", MALFORMED_URLS)
async def test_malformed_urls_raise_value_error(
    tcp_pair: list[aiomas.Container], url: str
) -> None:
    with pytest.raises(ValueError, match="Invalid agent address"):
        await tcp_pair[0].connect(url)


async def test_non_string_url_raises_value_error(
    tcp_pair: list[aiomas.Container],
) -> None:
    with pytest.raises(ValueError, match="must be a string"):
        await tcp_pair[0].connect(("127.0.0.1", 5555))  # type: ignore[arg-type]


async def test_unknown_agent_id_raises_lookup_error(
    tcp_pair: list[aiomas.Container],
) -> None:
    callee = Callee(tcp_pair[0])
    with pytest.raises(LookupError, match="no agent '1'"):
        await tcp_pair[1].connect(callee.addr[:-1] + "1")
    with pytest.raises(LookupError, match="no agent 'spam'"):
        await tcp_pair[1].connect(callee.addr[:-1] + "spam")


async def test_connection_refused(unused_tcp_port: int) -> None:
    async with Place("tcp4").containers(1) as (container,):
        with pytest.raises(ConnectionRefusedError):
            await container.connect(f"tcp://127.0.0.1:{unused_tcp_port}/0")
        with pytest.raises(ConnectionRefusedError):
            await container.connect("local://nobody-here/0")


@pytest.mark.skipif(sys.platform == "win32", reason="no unix domain sockets")
async def test_missing_unix_socket(tmp_path: Path) -> None:
    async with Place("tcp4").containers(1) as (container,):
        with pytest.raises(FileNotFoundError):
            await container.connect(f"ipc://{tmp_path}/nothing/0")


async def test_connect_with_timeout_waits_for_the_container(
    unused_tcp_port: int,
) -> None:
    async with Place("tcp4").containers(1) as (container,):
        url = f"tcp://127.0.0.1:{unused_tcp_port}/0"
        connecting = asyncio.ensure_future(container.connect(url, timeout=WAIT))
        await asyncio.sleep(200 * TIME_UNIT)
        assert not connecting.done()
        late = await aiomas.Container.create(
            ("127.0.0.1", unused_tcp_port), as_coro=True
        )
        try:
            Callee(late)
            proxy = await asyncio.wait_for(connecting, WAIT)
            assert await proxy.spam(1) == "spam"
        finally:
            await late.shutdown(as_coro=True)


async def test_connect_timeout_expires(unused_tcp_port: int) -> None:
    async with Place("tcp4").containers(1) as (container,):
        start = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            await container.connect(
                f"tcp://127.0.0.1:{unused_tcp_port}/0", timeout=300 * TIME_UNIT
            )
        assert 250 * TIME_UNIT < time.monotonic() - start < WAIT


# --- addresses of containers ---------------------------------------------------------


async def test_port_zero_gives_the_real_port() -> None:
    container = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)
    try:
        port = state_of(container).server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        assert repr(container) == f"Container('tcp://127.0.0.1:{port}/')"
    finally:
        await container.shutdown(as_coro=True)


async def test_localhost_with_port_zero_listens_on_one_port_everywhere() -> None:
    container = await aiomas.Container.create(("localhost", 0), as_coro=True)
    try:
        ports = {s.getsockname()[1] for s in state_of(container).server.sockets}  # type: ignore[union-attr]
        assert len(ports) == 1
        callee = Callee(container)
        assert callee.addr == f"tcp://localhost:{ports.pop()}/0"
        proxy = await container.connect(callee.addr)
        assert await proxy.spam(1) == "spam"
    finally:
        await container.shutdown(as_coro=True)


@pytest.mark.parametrize("host", ["0.0.0.0", ""])
async def test_wildcard_hosts_use_the_fqdn(host: str) -> None:
    container = await aiomas.Container.create((host, 0), as_coro=True)
    try:
        assert Callee(container).addr.startswith(f"tcp://{socket.getfqdn()}:")
    finally:
        await container.shutdown(as_coro=True)


async def test_ipv6_addresses_are_bracketed() -> None:
    if not ipv6_available():
        pytest.skip("IPv6 loopback (::1) is not available on this machine")
    container = await aiomas.Container.create(("::1", 0), as_coro=True)
    try:
        callee = Callee(container)
        assert callee.addr.startswith("tcp://[::1]:")
        assert await (await container.connect(callee.addr)).spam(1) == "spam"
    finally:
        await container.shutdown(as_coro=True)


async def test_unix_and_local_addresses(tmp_path: Path) -> None:
    path = tempfile.mkdtemp(prefix="aiomas-")
    try:
        ipc = await aiomas.Container.create(f"{path}/sock", as_coro=True)
        local = await aiomas.Container.create(
            aiomas.get_queue("spam-queue"), as_coro=True
        )
        try:
            assert Callee(ipc).addr == f"ipc://[{path}/sock]/0"
            assert Callee(local).addr == "local://spam-queue/0"
            # Containers on different transports talk to each other.
            assert await (await ipc.connect("local://spam-queue/0")).spam(1) == "spam"
            assert await (await local.connect(f"ipc://{path}/sock/0")).spam(1) == "spam"
        finally:
            await ipc.shutdown(as_coro=True)
            await local.shutdown(as_coro=True)
        assert not Path(path, "sock").exists()
    finally:
        Path(path, "sock").unlink(missing_ok=True)
        Path(path).rmdir()


@pytest.mark.skipif(sys.platform == "win32", reason="no unix domain sockets")
@pytest.mark.parametrize("meanwhile", ["removed", "replaced"])
async def test_shutdown_leaves_a_socket_file_that_is_no_longer_ours(
    meanwhile: str,
) -> None:
    """Shutdown removes the container's socket file, but not a file that
    someone else put at that path since (nor does it fail if there is none)."""
    path = Path(tempfile.mkdtemp(prefix="aiomas-"), "sock")
    try:
        container = await aiomas.Container.create(str(path), as_coro=True)
        path.unlink()
        if meanwhile == "replaced":
            path.write_text("someone else's")
        await container.shutdown(as_coro=True)
        assert path.exists() == (meanwhile == "replaced")
    finally:
        path.unlink(missing_ok=True)
        path.parent.rmdir()


# --- codecs and serializers ----------------------------------------------------------


@aiomas.codecs.serializable
class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x = x
        self.y = y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


class Echo(aiomas.Agent):
    @aiomas.expose
    def echo(self, value: Any) -> Any:
        return value


@pytest.mark.parametrize("codec", [aiomas.JSON, aiomas.MsgPack, aiomas.MsgPackBlosc])
async def test_arrow_dates_and_extra_serializers(
    codec: type[aiomas.codecs.Codec],
) -> None:
    date = arrow.get("2016-01-01T12:30:00+01:00")
    async with Place("tcp4").containers(
        2, codec=codec, extra_serializers=[Point.__serializer__]
    ) as (one, two):
        proxy = await two.connect(Echo(one).addr)
        assert await proxy.echo(date) == date
        assert list(await proxy.echo([Point(1, 2), date])) == [Point(1, 2), date]


class Pinned(aiomas.Agent):
    """Returns an Arrow date, a serializable object and an agent proxy."""

    @aiomas.expose
    def things(self) -> list[Any]:
        return [arrow.get("2016-01-01T12:30:00+00:00"), Point(3, 4), self]


@pytest.mark.parametrize("codec", [aiomas.JSON, aiomas.MsgPack])
async def test_serializer_order_is_arrow_then_extra_serializers_then_proxies(
    codec: type[aiomas.codecs.Codec],
) -> None:
    """The type ids on the wire are those of the originals: Arrow dates 0, the
    container's extra serializers from 1, agent proxies after them.  Pinned as
    the exact bytes of a reply, read from a plain socket."""
    async with Place("tcp4").containers(
        1, codec=codec, extra_serializers=[Point.__serializer__]
    ) as (container,):
        Pinned(container)
        endpoint, _ = agent_mod.parse_url(f"{container.base_url}0")
        host, port = endpoint.addr
        reader, writer = await asyncio.open_connection(host, port)
        try:
            request = codec().encode([0, 7, ["agents/0/things", [], {}]])
            writer.write(struct.pack(">L", len(request)) + request)
            (size,) = struct.unpack(">L", await reader.readexactly(4))
            reply = await asyncio.wait_for(reader.readexactly(size), WAIT)
        finally:
            writer.close()
            await writer.wait_closed()
    if codec is aiomas.JSON:
        assert reply == (
            b'[1, 7, [{"__type__": [0, "2016-01-01T12:30:00+00:00"]}, '
            b'{"__type__": [1, {"x": 3, "y": 4}]}, '
            b'{"__type__": [2, "agents/0"]}]]'
        )
    else:
        assert reply == bytes.fromhex(
            "930107"  # [1, 7,
            "93"  # [
            "81a85f5f747970655f5f92"  # {"__type__": [
            "00b9323031362d30312d30315431323a33303a30302b30303a3030"
            "81a85f5f747970655f5f92"
            "0182a178"
            "03"
            "a179"
            "04"  # 1, {"x": 3, "y": 4}
            "81a85f5f747970655f5f92"
            "02a86167656e74732f30"  # 2, "agents/0"
        )


async def test_a_plain_rpc_peer_in_that_order_understands_a_container() -> None:
    date = arrow.get("2016-01-01T12:30:00+00:00")
    async with Place("tcp4").containers(
        1, extra_serializers=[Point.__serializer__]
    ) as (container,):
        Echo(container)
        endpoint, _ = agent_mod.parse_url(f"{container.base_url}0")
        client = await rpc.open_connection(
            endpoint.addr,
            extra_serializers=[aiomas.util.arrow_serializer, Point.__serializer__],
        )
        try:
            echo = getattr(client.remote.agents, "0").echo
            assert await echo(date) == date
            assert await echo(Point(3, 4)) == Point(3, 4)
        finally:
            await client.close()


# --- TLS -----------------------------------------------------------------------------


async def test_tls_with_context_tuple(tls: TLSFiles) -> None:
    contexts = (tls.server_context, tls.client_context)
    async with Place("tcp4").containers(2, ssl=contexts) as (one, two):
        proxy = await two.connect(Callee(one).addr)
        assert await proxy.spam(1) == "spam"
        assert channel_of(two, proxy).get_extra_info("ssl_object") is not None


async def test_tls_container_refuses_plain_containers(tls: TLSFiles) -> None:
    certs = aiomas.SSLCerts(tls.cafile, tls.certfile, tls.keyfile)
    place = Place("tcp4")
    async with (
        place.containers(1, ssl=certs) as (secure,),
        place.containers(1) as (plain,),
    ):
        addr = Callee(secure).addr
        with pytest.raises((ConnectionError, aiomas.ProtocolError)):
            await asyncio.wait_for(plain.connect(addr), WAIT)


async def test_tls_client_rejects_a_foreign_server(
    tls: TLSFiles, foreign_tls: TLSFiles
) -> None:
    ours = aiomas.SSLCerts(tls.cafile, tls.certfile, tls.keyfile)
    theirs = aiomas.SSLCerts(
        foreign_tls.cafile, foreign_tls.certfile, foreign_tls.keyfile
    )
    place = Place("tcp4")
    async with (
        place.containers(1, ssl=theirs) as (foreign,),
        place.containers(1, ssl=ours) as (own,),
    ):
        with pytest.raises(ssl.SSLError):
            await own.connect(Callee(foreign).addr)


@pytest.mark.parametrize("bad", ["ca.pem", ("a", "b"), (None, None), ("a", "b", "c")])
async def test_bad_ssl_argument(bad: Any) -> None:
    with pytest.raises(TypeError, match="ssl must be"):
        await aiomas.Container.create(("127.0.0.1", 0), ssl=bad, as_coro=True)


async def test_tls_is_not_used_for_unix_sockets(tls: TLSFiles, tmp_path: Path) -> None:
    certs = aiomas.SSLCerts(tls.cafile, tls.certfile, tls.keyfile)
    path = tempfile.mkdtemp(prefix="aiomas-")
    try:
        async with Place("tcp4").containers(1, ssl=certs) as (tcp,):
            ipc = await aiomas.Container.create(f"{path}/s", ssl=certs, as_coro=True)
            try:
                assert await (await tcp.connect(Callee(ipc).addr)).spam(1) == "spam"
                assert await (await ipc.connect(Callee(tcp).addr)).spam(1) == "spam"
            finally:
                await ipc.shutdown(as_coro=True)
    finally:
        Path(path, "s").unlink(missing_ok=True)
        Path(path).rmdir()


# --- create() and shutdown() ---------------------------------------------------------


@pytest.mark.usefixtures("no_thread_loop")
def test_create_and_shutdown_without_a_running_loop() -> None:
    container = aiomas.Container.create(("127.0.0.1", 0))
    callee = Callee(container)

    async def call() -> str:
        proxy = await container.connect(callee.addr)
        result: str = await proxy.spam(2)
        return result

    assert aiomas.run(call()) == "spamspam"
    container.shutdown()
    server = state_of(container).server
    assert server is not None
    assert not server.is_serving()


async def test_sync_create_inside_a_running_loop_fails_clearly() -> None:
    """Awaited or not, the error names the missing as_coro=True (not
    aiomas.run(), which the caller never called), and no "coroutine was never
    awaited" warning follows (warnings are errors here)."""
    hint = r"pass as_coro=True and await the result: await Container\.create\("
    with pytest.raises(RuntimeError, match=hint):
        aiomas.Container.create(("127.0.0.1", 0))
    with pytest.raises(RuntimeError, match=hint):
        await aiomas.Container.create(("127.0.0.1", 0))  # type: ignore[misc]
    container = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)
    hint = r"pass as_coro=True and await the result: await container\.shutdown\("
    with pytest.raises(RuntimeError, match=hint):
        container.shutdown()
    with pytest.raises(RuntimeError, match=hint):
        await container.shutdown()  # type: ignore[misc]
    await container.shutdown(as_coro=True)
    gc.collect()  # A coroutine left unclosed would warn now.


async def test_create_fails_when_the_address_is_taken() -> None:
    async with Place("tcp4").containers(1) as (container,):
        port = state_of(container).server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        with pytest.raises(OSError):
            await aiomas.Container.create(("127.0.0.1", port), as_coro=True)


async def test_shutdown_twice_and_use_after_shutdown() -> None:
    container = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)
    callee = Callee(container)
    await container.shutdown(as_coro=True)
    await container.shutdown(as_coro=True)
    await asyncio.gather(
        container.shutdown(as_coro=True), container.shutdown(as_coro=True)
    )
    with pytest.raises(RuntimeError, match="shut down"):
        await container.connect(callee.addr)
    with pytest.raises(RuntimeError, match="shut down"):
        Callee(container)


async def test_shutdown_with_calls_in_flight_both_ways() -> None:
    """Every pending call ends, every socket closes, no task is left behind
    (the autouse hygiene fixture checks tasks), and it is quick."""
    one = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)
    two = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)
    try:
        a, b = Callee(one), Callee(two)
        to_a = await two.connect(a.addr)
        to_b = await one.connect(b.addr)
        calls = [to_a.slow_echo(i, 60) for i in range(20)]
        calls += [to_b.slow_echo(i, 60) for i in range(20)]
        await asyncio.sleep(100 * TIME_UNIT)
        clients = [
            *state_of(one).registry.clients,
            *state_of(one).pool.clients.values(),
        ]
        channels = [c.channel for c in clients]
        assert len(channels) == 2
        start = time.monotonic()
        await asyncio.wait_for(one.shutdown(as_coro=True), WAIT)
        assert time.monotonic() - start < 2
        server = state_of(one).server
        assert server is not None
        assert not server.is_serving()
        assert all(c.protocol.is_closed() for c in channels)
        results = await asyncio.wait_for(
            asyncio.gather(*calls, return_exceptions=True), WAIT
        )
        assert all(isinstance(r, ConnectionResetError) for r in results), results
        assert incoming(one) == 0
        assert state_of(one).pool.clients == {}
        # The other container noticed and works with new partners.
        c = Callee(two)
        assert await (await two.connect(c.addr)).spam(1) == "spam"
    finally:
        await one.shutdown(as_coro=True)
        await two.shutdown(as_coro=True)


async def test_shutdown_while_connecting(unused_tcp_port: int) -> None:
    container = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)
    connecting = asyncio.ensure_future(
        container.connect(f"tcp://127.0.0.1:{unused_tcp_port}/0", timeout=None)
    )
    await asyncio.sleep(100 * TIME_UNIT)
    await asyncio.wait_for(container.shutdown(as_coro=True), WAIT)
    # The caller was not cancelled: it learns that the container is gone.
    with pytest.raises(RuntimeError, match="shut down"):
        await connecting


async def test_lost_connections_are_forgotten(tcp_pair: list[aiomas.Container]) -> None:
    one, two = tcp_pair
    proxy = await two.connect(Callee(one).addr)
    assert len(state_of(two).pool.clients) == 1
    await cut_connections(one, two, proxy)
    assert state_of(two).pool.clients == {}
    assert await (await two.connect(proxy.addr)).spam(1) == "spam"


# --- clocks --------------------------------------------------------------------------


class Sleeper(aiomas.Agent):
    @aiomas.expose
    async def sleep(self, dt: float) -> float:
        await self.container.clock.sleep(dt)
        return self.container.clock.time()


async def test_default_clock_is_asyncio_clock(tcp_pair: list[aiomas.Container]) -> None:
    assert isinstance(tcp_pair[0].clock, aiomas.AsyncioClock)


async def test_external_clock_drives_agent_sleeps() -> None:
    clock = aiomas.ExternalClock("2016-01-01T00:00:00")
    async with Place("tcp4").containers(1, clock=clock) as (container,):
        assert container.clock is clock
        sleeper = await container.connect(Sleeper(container).addr)
        calls = [asyncio.ensure_future(sleeper.sleep(dt)) for dt in (3, 1, 2)]
        await asyncio.sleep(100 * TIME_UNIT)
        assert not any(c.done() for c in calls)
        clock.set_time(1.5)
        await asyncio.wait_for(calls[1], WAIT)
        assert not calls[0].done()
        assert not calls[2].done()
        clock.set_time(10)
        assert await asyncio.wait_for(asyncio.gather(*calls), WAIT) == [10, 1.5, 10]


# --- many agents ---------------------------------------------------------------------


@pytest.mark.heavy
async def test_ten_thousand_agents_each_called_once() -> None:
    async with Place("tcp4").containers(2) as (one, two):
        agents = [Echo(one) for _ in range(10_000)]

        async def call(agent: Echo) -> Any:
            proxy = await two.connect(agent.addr)
            return await proxy.echo(agent.addr)

        results = await asyncio.wait_for(asyncio.gather(*(call(a) for a in agents)), 60)
        assert results == [a.addr for a in agents]
        assert incoming(one) == 1


async def test_local_queue_containers_are_deterministic() -> None:
    """The same program over LocalQueue gives the same interleaving every time."""

    class Logger(aiomas.Agent):
        def __init__(self, container: aiomas.Container, log: list[str]) -> None:
            super().__init__(container)
            self.log = log

        @aiomas.expose
        async def hop(self, name: str, n: int) -> None:
            self.log.append(f"{name}{n}")
            await asyncio.sleep(0)

    async def run_once(tag: str) -> list[str]:
        log: list[str] = []
        queues = [aiomas.get_queue(f"{tag}-{i}") for i in range(3)]
        containers = [await aiomas.Container.create(q, as_coro=True) for q in queues]
        try:
            loggers = [Logger(c, log) for c in containers]
            proxies = [
                await containers[(i + 1) % 3].connect(lg.addr)
                for i, lg in enumerate(loggers)
            ]
            await asyncio.gather(
                *(
                    p.hop(name, n)
                    for n in range(20)
                    for name, p in zip("abc", proxies, strict=True)
                )
            )
        finally:
            for c in containers:
                await c.shutdown(as_coro=True)
        return log

    first = await run_once("first")
    assert sorted(first) == sorted(f"{x}{n}" for x in "abc" for n in range(20))
    assert await run_once("second") == first


async def test_container_connections_are_logged(
    tcp_pair: list[aiomas.Container], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="aiomas.agent")
    one, two = tcp_pair
    proxy = await two.connect(Callee(one).addr)
    await cut_connections(one, two, proxy)
    records = [r for r in caplog.records if r.name == "aiomas.agent"]
    assert [r.getMessage() for r in records] == [
        f"{two!r} connected to the container {one.base_url}",
        f"{two!r} lost its connection to the container {one.base_url}",
    ]
    assert all(r.container == one.base_url for r in records)  # type: ignore[attr-defined]
