"""Tests for aiomas.nats: containers that reach each other through a real
nats-server (one server, a 3-server cluster, TLS and credentials).

The channel conformance suite (tests/transports) and the agent scenarios run
over every transport (tests/test_agent.py, ``place``) run over NATS too; this
module tests what is particular to it: URLs, chunking, "no responders",
heartbeats, a broken link to the server, mixed TCP and NATS containers,
discovery and clusters.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import arrow
import pytest

import aiomas
import aiomas.nats
from aiomas.agent import nats_link, state_of
from aiomas.nats import NatsConfig
from aiomas.subproc import ContainerProcess
from aiomas.subproc.__main__ import container_kwargs, make_parser
from aiomas.testing import settle

from .conftest import TLSFiles, nats_missing
from .helpers import echo_forever
from .nats_server import NatsServer, cluster, running
from .test_agent import Callee, Caller, Echo, Place, Point, nats_place

pytestmark = pytest.mark.skipif(nats_missing() is not None, reason=str(nats_missing()))

WAIT = 10.0
# Heartbeats for the tests that wait for one to fail (seconds).
BEAT = 0.25


@pytest.fixture
def place(request: pytest.FixtureRequest) -> Place:
    """Containers on the session's NATS server."""
    return nats_place(request)


@pytest.fixture
def fast_place(request: pytest.FixtureRequest) -> Place:
    """Containers that notice a vanished peer within 3 * BEAT seconds."""
    return nats_place(request, f"heartbeat={BEAT}")


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A server of the test's own (to kill, or with settings of its own)."""
    with running(NatsServer(tmp_path, "own")) as (server,):
        yield server


@contextlib.asynccontextmanager
async def links(
    url: str, *names: str, **overrides: Any
) -> AsyncIterator[list[aiomas.nats.NatsLink]]:
    """Links to the NATS server at *url*, one per container name."""
    opened: list[aiomas.nats.NatsLink] = []
    try:
        for name in names:
            config = NatsConfig.from_url(f"{url}/{name}", **overrides)
            opened.append(await aiomas.nats.connect(config))
        yield opened
    finally:
        for link in opened:
            await link.close()


@contextlib.asynccontextmanager
async def echo_channel(
    server_link: aiomas.nats.NatsLink, client_link: aiomas.nats.NatsLink
) -> AsyncIterator[aiomas.channel.Channel]:
    """A channel from *client_link* to an echo server on *server_link*."""
    name = server_link.config.name
    server = await aiomas.channel.start_server(server_link.endpoint(name), echo_forever)
    try:
        channel = await aiomas.channel.open_connection(client_link.endpoint(name))
        try:
            yield channel
        finally:
            await channel.close()
    finally:
        server.close()
        await server.wait_closed()


def url_of(place: Place) -> str:
    return f"{place.nats_url}/%s?{place.nats_query}"


# --- URLs -----------------------------------------------------------------------------


def test_a_url_names_servers_and_the_container() -> None:
    config = NatsConfig.from_url("nats://127.0.0.1/c1")
    assert config.servers == ("nats://127.0.0.1:4222",)
    assert config.name == "c1"
    assert config.base_url == "nats://c1/"
    assert config.prefix == "aiomas"
    assert (config.user, config.password, config.token, config.tls) == (None,) * 4


def test_a_url_with_everything() -> None:
    config = NatsConfig.from_url(
        "tls://al%40ice:p%3Ass@n1:4223,[::1]:4224,n3/my-box_2"
        "?creds=/etc/me.creds&prefix=prod&heartbeat=0.5&tls_hostname=nats.example"
    )
    assert config.servers == ("tls://n1:4223", "tls://[::1]:4224", "tls://n3:4222")
    assert (config.user, config.password) == ("al@ice", "p:ss")
    assert config.name == "my-box_2"
    assert config.creds == "/etc/me.creds"
    assert config.prefix == "prod"
    assert (config.heartbeat_interval, config.heartbeat_timeout) == (0.5, 1.0)
    assert config.tls_hostname == "nats.example"
    assert isinstance(config.tls, ssl.SSLContext)


def test_a_token_and_overrides() -> None:
    context = ssl.create_default_context()
    config = NatsConfig.from_url("nats://s3cret@host:1/c", tls=context)
    assert config.token == "s3cret"
    assert config.user is None
    assert config.tls is context
    assert config.with_name("d").name == "d"


@pytest.mark.parametrize(
    "url",
    [
        "tcp://host:4222/c",
        "nats://host:4222",
        "nats://host:4222/",
        "nats:///c",
        "nats://host:42x/c",
        "nats://host:70000/c",
        "nats://[::1/c",
        "nats://host/a.b",
        "nats://host/a*",
        "nats://host/c?color=red",
        "nats://host/c?heartbeat=soon",
        "nats://host/c?heartbeat=0",
        "nats://host/c?prefix=a.b",
        "nats://host/c?creds",
    ],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ValueError):
        NatsConfig.from_url(url)


def test_is_nats_url() -> None:
    assert aiomas.nats.is_nats_url("nats://h/c")
    assert aiomas.nats.is_nats_url("tls://h/c")
    assert not aiomas.nats.is_nats_url("tcp://h:1/0")
    assert not aiomas.nats.is_nats_url(("nats://h/c", 1))


def test_a_bad_nats_argument_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="NATS URL or NatsConfig"):
        aiomas.Container.create(("127.0.0.1", 0), nats="tcp://127.0.0.1:1/c")
    with pytest.raises(ValueError, match="on NATS already"):
        aiomas.Container.create("nats://127.0.0.1/c", nats="nats://127.0.0.1/d")
    with pytest.raises(ValueError, match="container name"):
        NatsConfig(servers=("nats://h:1",), name="a b")
    with pytest.raises(ValueError, match="at least one server"):
        NatsConfig(servers=(), name="c")


# --- channels over NATS ---------------------------------------------------------------


async def test_large_messages_are_cut_into_pieces_of_max_payload(
    tmp_path: Path,
) -> None:
    """A message larger than the server's max_payload arrives whole: writes are
    cut into pieces of what the server told at connect time."""
    small = NatsServer(tmp_path, "small", max_payload=4096)
    with running(small):
        async with links(small.url, "server", "client") as (server_link, client_link):
            assert client_link.client.max_payload == 4096
            async with echo_channel(server_link, client_link) as channel:
                big = "x" * 100_000 + "end"
                sizes = [
                    await channel.send(big),
                    *await asyncio.gather(*(channel.send(i * "y") for i in range(50))),
                ]
                assert sizes[0] == big
                assert sizes[1:] == [i * "y" for i in range(50)]


class LossyClient:
    """A real NATS client that loses the data messages *lose* picks (a fault
    injector: what a link that breaks between two messages does)."""

    def __init__(self, client: Any, lose: Callable[[bytes], bool]) -> None:
        self._client = client
        self._lose = lose
        self.lost: list[bytes] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("on_"):
            setattr(self._client, name, value)
        else:
            super().__setattr__(name, value)

    def publish(self, subject: str, data: bytes, reply: str = "") -> None:
        if data[:1] == b"D" and self._lose(data):
            self.lost.append(data)
            return
        self._client.publish(subject, data, reply)


async def test_lost_pieces_of_the_stream_are_sent_again(
    nats_server: NatsServer, nats_prefix: str
) -> None:
    """A piece lost on the way (a gap, or the tail) is asked for again and
    resent; the calls end with their results, nothing arrives twice."""
    async with links(
        nats_server.url, "s", "c", prefix=nats_prefix, heartbeat_interval=BEAT
    ) as (s, c):
        config = c.config.with_name("lossy")
        count = 0
        lost_once: set[bytes] = set()

        def every_third(data: bytes) -> bool:
            """Every third piece, the first time it is sent."""
            nonlocal count
            count += 1
            if count % 3 or data[:9] in lost_once:
                return False
            lost_once.add(data[:9])
            return True

        lossy_client = LossyClient(c.client, every_third)
        lossy = aiomas.nats.NatsLink(
            cast(aiomas.nats.MessagingClient, lossy_client), config
        )
        async with echo_channel(s, lossy) as channel:
            # One at a time: each third request is the tail, found by a heartbeat.
            for i in range(6):
                assert await asyncio.wait_for(channel.send(i), WAIT) == i
            # Many at once: the gaps are found by the pieces after them.
            values = [f"v{i}" * i for i in range(60)]
            results = await asyncio.wait_for(
                asyncio.gather(*(channel.send(v) for v in values)), WAIT
            )
            assert results == values
            assert len(lossy_client.lost) >= 2
            (transport,) = lossy.transports
            await asyncio.sleep(3 * BEAT)  # A heartbeat answer acks it all.
            sent, acked, _ = transport.stream_offsets
            assert sent == acked


async def test_messages_dropped_by_the_client_end_the_connection(
    nats_server: NatsServer, nats_prefix: str
) -> None:
    """When nats-py drops messages of a subscription we did not read in time
    (a slow consumer), the overflow callback of that subscription is called:
    this checks that nats-py's SlowConsumerError still names the
    subscription object that its subscribe() returned (``.sub``)."""
    async with links(nats_server.url, "c", prefix=nats_prefix) as (c,):
        client = cast(Any, c.client)
        client.pending_bytes_limit = 4096
        received: list[bytes] = []
        overflowed = asyncio.Event()
        subject = client.new_inbox()
        unsubscribe = await client.subscribe(
            subject, lambda data, _: received.append(data), overflowed.set
        )
        try:
            for _ in range(500):
                client.publish(subject, b"x" * 1024)
            await asyncio.wait_for(overflowed.wait(), WAIT)
            assert len(received) < 500
        finally:
            await unsubscribe()


async def test_a_bad_message_on_a_session_ends_only_that_connection(
    nats_server: NatsServer, nats_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with links(nats_server.url, "s", "c", prefix=nats_prefix) as (s, c):
        server = await aiomas.channel.start_server(s.endpoint("s"), echo_forever)
        try:
            for garbage in [b"X", b"D\x00", b"A" + (2**40).to_bytes(8, "big")]:
                channel = await aiomas.channel.open_connection(c.endpoint("s"))
                (transport,) = c.transports
                pending = asyncio.ensure_future(channel.send("x" * 10))
                await settle()
                s.client.publish(transport.inbox, garbage)
                with contextlib.suppress(ConnectionResetError):
                    await asyncio.wait_for(pending, WAIT)
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(channel.send(1), WAIT)
                await channel.close()
            assert caplog.text.count("sent a bad message") == 3
            channel = await aiomas.channel.open_connection(c.endpoint("s"))
            assert await channel.send(1) == 1
            await channel.close()
        finally:
            server.close()
            await server.wait_closed()


async def test_writers_wait_while_the_link_has_much_to_send(
    nats_server: NatsServer, nats_prefix: str
) -> None:
    """Flow control: over the link's high-water mark, every connection over it
    is told to pause writing, and to resume under the low-water mark."""
    async with (
        links(nats_server.url, "s", "c", prefix=nats_prefix) as (s, c),
        echo_channel(s, c) as channel,
    ):
        c.client.high_water, c.client.low_water = 10_000, 1_000
        protocol = channel.protocol
        reply = channel.send("x" * 50_000)
        assert protocol.writing_paused
        assert channel.transport.get_write_buffer_size() > 10_000
        assert await asyncio.wait_for(reply, WAIT) == "x" * 50_000
        assert not protocol.writing_paused
        assert channel.transport.get_write_buffer_size() == 0


async def test_the_default_max_payload_is_read_from_the_server(
    nats_server: NatsServer, nats_prefix: str
) -> None:
    async with links(nats_server.url, "c", prefix=nats_prefix) as (link,):
        assert link.client.max_payload == 2**20


async def test_max_frame_size_still_applies(
    nats_server: NatsServer, nats_prefix: str
) -> None:
    async with links(nats_server.url, "s", "c", prefix=nats_prefix) as (s, c):
        server = await aiomas.channel.start_server(
            s.endpoint("s"), echo_forever, max_frame_size=1000
        )
        channel = await aiomas.channel.open_connection(c.endpoint("s"))
        try:
            assert await channel.send("x" * 500) == "x" * 500
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(channel.send("x" * 2000), WAIT)
        finally:
            await channel.close()
            server.close()
            await server.wait_closed()


async def test_no_responders_is_connection_refused_at_once(
    nats_server: NatsServer, nats_prefix: str
) -> None:
    async with links(nats_server.url, "c", prefix=nats_prefix) as (link,):
        start = time.monotonic()
        with pytest.raises(
            ConnectionRefusedError, match="No container 'nobody'"
        ) as info:
            await aiomas.channel.open_connection(link.endpoint("nobody"))
        assert info.value.errno == errno.ECONNREFUSED
        assert time.monotonic() - start < 1
        assert link.transports == frozenset()


async def test_open_connection_with_a_timeout_waits_for_the_server(
    nats_server: NatsServer, nats_prefix: str
) -> None:
    async with links(nats_server.url, "s", "c", prefix=nats_prefix) as (s, c):
        connecting = asyncio.ensure_future(
            aiomas.channel.open_connection(c.endpoint("s"), timeout=WAIT)
        )
        await asyncio.sleep(0.1)
        assert not connecting.done()
        server = await aiomas.channel.start_server(s.endpoint("s"), echo_forever)
        try:
            channel = await asyncio.wait_for(connecting, WAIT)
            assert await channel.send("late") == "late"
            await channel.close()
        finally:
            server.close()
            await server.wait_closed()


async def test_a_peer_that_stops_answering_heartbeats_is_dropped(
    nats_server: NatsServer, nats_prefix: str
) -> None:
    """A container that accepts but then answers nothing (a frozen process, a
    host cut off behind a live server) ends our calls within interval +
    timeout."""
    async with links(
        nats_server.url,
        "ghost",
        "c",
        prefix=nats_prefix,
        heartbeat_interval=BEAT,
        heartbeat_timeout=BEAT,
    ) as (ghost, c):
        requests: list[bytes] = []

        def accept(data: bytes, reply: str) -> None:
            requests.append(data)
            ghost.client.publish(reply, json.dumps({"v": 1, "inbox": inbox}).encode())

        inbox = ghost.client.new_inbox()
        stop_inbox = await ghost.client.subscribe(inbox, lambda data, reply: None)
        stop_accept = await ghost.client.subscribe(
            ghost.subject("ghost", "connect"), accept
        )
        await ghost.client.flush()
        try:
            channel = await aiomas.channel.open_connection(c.endpoint("ghost"))
            assert json.loads(requests[0])["from"] == "c"
            start = time.monotonic()
            with pytest.raises(
                ConnectionResetError, match="did not answer: nothing heard from it"
            ):
                await asyncio.wait_for(channel.send("anyone?"), WAIT)
            assert time.monotonic() - start < 2 * BEAT + 1
        finally:
            await stop_accept()
            await stop_inbox()


async def test_a_bad_connect_request_is_ignored(
    nats_server: NatsServer, nats_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with links(nats_server.url, "s", "c", prefix=nats_prefix) as (s, c):
        server = await aiomas.channel.start_server(s.endpoint("s"), echo_forever)
        try:
            with pytest.raises(TimeoutError):
                await c.client.request(s.subject("s", "connect"), b"\xff garbage", 0.2)
            assert "bad connect request" in caplog.text
            # An inbox that is no subject (the heartbeat could never reach
            # it, and the connection would never end) is refused too.
            for inbox in ("", "a b", "a.*", "a.>", "a..b"):
                caplog.clear()
                request = json.dumps({"v": 2, "inbox": inbox}).encode()
                with pytest.raises(TimeoutError):
                    await c.client.request(s.subject("s", "connect"), request, 0.2)
                assert "bad connect request" in caplog.text
            # What the client library refuses is a ConnectionError of ours.
            with pytest.raises(ConnectionError, match="NATS request to 'a b'"):
                await c.client.request("a b", b"x", 0.2)
            channel = await aiomas.channel.open_connection(c.endpoint("s"))
            assert await channel.send(1) == 1
            await channel.close()
        finally:
            server.close()
            await server.wait_closed()


async def test_a_closed_link_refuses_to_connect(
    nats_server: NatsServer, nats_prefix: str
) -> None:
    async with links(nats_server.url, "c", prefix=nats_prefix) as (link,):
        await link.close()
        assert link.closed
        with pytest.raises(ConnectionResetError, match="closed"):
            await aiomas.channel.open_connection(link.endpoint("c"))


# --- containers -----------------------------------------------------------------------


async def test_agents_have_nats_addresses(place: Place) -> None:
    async with place.containers(1) as (container,):
        callee = Callee(container)
        assert container.base_url == "nats://c1/"
        assert callee.addr == "nats://c1/0"
        assert repr(container) == "Container('nats://c1/')"


async def test_one_connection_per_container_pair_and_cached_proxies(
    place: Place,
) -> None:
    async with place.containers(2) as (one, two):
        callee = Callee(one)
        proxies = await asyncio.gather(*(two.connect(callee.addr) for _ in range(5)))
        assert all(proxy is proxies[0] for proxy in proxies)
        assert list(state_of(two).pool.clients) == ["nats://c1/"]
        assert len(state_of(one).registry.clients) == 1
        assert await proxies[0].spam(2) == "spamspam"


async def test_connect_errors(place: Place) -> None:
    async with place.containers(1) as (container,):
        callee = Callee(container)
        with pytest.raises(LookupError, match="no agent '7'"):
            await container.connect(callee.addr[:-1] + "7")
        with pytest.raises(ConnectionRefusedError, match="No container 'nobody'"):
            await container.connect("nats://nobody/0")
        with pytest.raises(ValueError, match="Invalid agent address"):
            await container.connect("nats://no.body/0")


async def test_a_container_on_no_nats_system_cannot_reach_nats_addresses() -> None:
    async with Place("tcp4").containers(1) as (container,):
        assert nats_link(container) is None
        with pytest.raises(ConnectionRefusedError, match="on no NATS system"):
            await container.connect("nats://anybody/0")


async def test_connect_with_timeout_waits_for_the_container(place: Place) -> None:
    async with place.containers(1) as (container,):
        connecting = asyncio.ensure_future(
            container.connect("nats://c2/0", timeout=WAIT)
        )
        await asyncio.sleep(0.1)
        assert not connecting.done()
        async with place.containers(1) as (late,):
            Callee(late)
            proxy = await asyncio.wait_for(connecting, WAIT)
            assert await proxy.spam(1) == "spam"


async def test_two_containers_cannot_have_one_name(place: Place) -> None:
    async with place.containers(1):
        place.count -= 1
        with pytest.raises(OSError, match="named 'c1' is on the NATS system") as info:
            await aiomas.Container.create(place.next_addr(), as_coro=True)
        assert info.value.errno == errno.EADDRINUSE


async def test_no_nats_server_to_reach(unused_tcp_port: int) -> None:
    with pytest.raises(ConnectionRefusedError, match="could be reached"):
        await aiomas.Container.create(
            f"nats://127.0.0.1:{unused_tcp_port}/c?heartbeat=1", as_coro=True
        )


async def test_reconnect_after_the_peer_container_restarts(place: Place) -> None:
    async with place.containers(1) as (caller,):
        async with place.containers(1) as (first,):
            proxy = await caller.connect(Callee(first).addr)
            assert await proxy.spam(1) == "spam"
        with pytest.raises(ConnectionResetError):
            await proxy.spam(1)
        place.count -= 1  # the same name again
        async with place.containers(1) as (second,):
            proxy = await caller.connect(Callee(second).addr)
            assert await proxy.spam(2) == "spamspam"


async def test_shutdown_with_calls_in_flight_both_ways(place: Place) -> None:
    async with place.containers(2) as (one, two):
        to_one = await two.connect(Callee(one).addr)
        to_two = await one.connect(Callee(two).addr)
        calls = [to_one.slow_echo(i, 60) for i in range(10)]
        calls += [to_two.slow_echo(i, 60) for i in range(10)]
        await asyncio.sleep(0.05)
        start = time.monotonic()
        await asyncio.wait_for(one.shutdown(as_coro=True), WAIT)
        assert time.monotonic() - start < 2
        results = await asyncio.wait_for(
            asyncio.gather(*calls, return_exceptions=True), WAIT
        )
        assert all(isinstance(r, ConnectionResetError) for r in results), results
        link = nats_link(one)
        assert link is not None
        assert link.closed
        # The name is free again.
        place.count -= 2
        async with place.containers(1) as (again,):
            assert await (await two.connect(Callee(again).addr)).spam(1) == "spam"


async def test_a_vanished_container_fails_pending_calls_within_the_bound(
    fast_place: Place,
) -> None:
    """A container whose NATS connection ends without a goodbye (a process
    that died): calls to it fail within heartbeat_interval +
    heartbeat_timeout."""
    async with fast_place.containers(2) as (one, two):
        proxy = await two.connect(Callee(one).addr)
        pending = asyncio.ensure_future(proxy.slow_echo("never", 60))
        await asyncio.sleep(0.05)
        start = time.monotonic()
        link = nats_link(one)
        assert link is not None
        await link.abort()
        with pytest.raises(ConnectionResetError, match="left the NATS system"):
            await asyncio.wait_for(pending, WAIT)
        assert time.monotonic() - start < 3 * BEAT + 1
        await settle()
        assert state_of(two).pool.clients == {}


@pytest.mark.parametrize("codec", [aiomas.JSON, aiomas.MsgPack, aiomas.MsgPackBlosc])
async def test_codecs_dates_and_extra_serializers(
    place: Place, codec: type[aiomas.codecs.Codec]
) -> None:
    date = arrow.get("2016-01-01T12:30:00+01:00")
    async with place.containers(
        2, codec=codec, extra_serializers=[Point.__serializer__]
    ) as (one, two):
        proxy = await two.connect(Echo(one).addr)
        assert await proxy.echo(date) == date
        assert await proxy.echo(Point(1, 2)) == Point(1, 2)


async def test_the_external_clock_drives_agents_over_nats(place: Place) -> None:
    clock = aiomas.ExternalClock("2020-01-01T00:00:00")
    async with place.containers(2, clock=clock) as (one, two):

        class Sleeper(aiomas.Agent):
            @aiomas.expose
            async def nap(self, seconds: float) -> str:
                await self.container.clock.sleep(seconds)
                return str(self.container.clock.utcnow())

        proxy = await two.connect(Sleeper(one).addr)
        napping = asyncio.ensure_future(proxy.nap(10))
        await asyncio.sleep(0.05)
        assert not napping.done()
        clock.set_time(10)
        assert await asyncio.wait_for(napping, WAIT) == "2020-01-01T00:00:10+00:00"


# --- TCP and NATS at once -------------------------------------------------------------


async def test_a_container_on_tcp_and_nats(place: Place) -> None:
    """Its agents are reachable over both; proxies passed as arguments over
    either connection call back over that connection."""
    mixed = await aiomas.Container.create(
        ("127.0.0.1", 0), nats=place.next_addr(), as_coro=True
    )
    try:
        async with (
            place.containers(1) as (on_nats,),
            Place("tcp4").containers(1) as (on_tcp,),
        ):
            callee = Callee(mixed)
            assert callee.addr.startswith("tcp://127.0.0.1:")
            nats_addr = "nats://c1/0"
            via_nats = await on_nats.connect(nats_addr)
            via_tcp = await on_tcp.connect(callee.addr)
            assert await via_nats.spam(1) == await via_tcp.spam(1) == "spam"
            # Proxies the other way, and calls back.
            nats_caller, tcp_caller = Caller(on_nats), Caller(on_tcp)
            to_nats_caller = await mixed.connect(nats_caller.addr)
            to_tcp_caller = await mixed.connect(tcp_caller.addr)
            assert await to_nats_caller.call_back(callee, 2) == "SPAMSPAM"
            assert await to_tcp_caller.call_back(callee, 1) == "SPAM"
            link = nats_link(mixed)
            assert link is not None
            assert {info["name"] for info in await link.discover()} == {"c1", "c2"}
        await mixed.shutdown(as_coro=True)
        assert link.closed
        server = state_of(mixed).nats_server
        assert server is not None
        assert not server.is_serving()
    finally:
        await mixed.shutdown(as_coro=True)


# --- discovery ------------------------------------------------------------------------


async def test_discover_containers_and_their_agents(place: Place) -> None:
    async with place.containers(2) as (one, two):
        Callee(one)
        Caller(one)
        Echo(two)
        link = nats_link(one)
        assert link is not None
        found = await link.discover()
        assert [info["name"] for info in found] == ["c1", "c2"]
        assert found[0]["agents"] == {"0": "Callee", "1": "Caller"}
        assert found[1]["agents"] == {"0": "Echo"}
        assert found[1]["agent_count"] == 1
        assert found[1]["base_url"] == "nats://c2/"
        info = await link.info("c2")
        assert info["agents"] == {"0": "Echo"}
        with pytest.raises(ConnectionRefusedError):
            await link.info("c3")
        # Look an agent up by its class and call it.
        (addr,) = [
            c["base_url"] + aid
            for c in found
            for aid, kind in c["agents"].items()
            if kind == "Echo"
        ]
        assert await (await one.connect(addr)).echo("hi") == "hi"


async def test_containers_answer_the_services_api(place: Place) -> None:
    """PING, INFO and STATS of NATS's services API ("micro"), for all
    services, for the containers' service (the prefix) and for one container;
    nats-py's own parsers of the answers read them."""
    from nats.micro.service import ServiceInfo, ServicePing, ServiceStats

    async with place.containers(2) as (one, two):
        Echo(two)
        link = nats_link(one)
        assert link is not None
        client = link.client
        service = place.nats_query.partition("prefix=")[2].partition("&")[0]
        assert service, place.nats_query

        async def answers(subject: str) -> list[dict[str, Any]]:
            found = [json.loads(a) for a in await client.gather(subject, b"", 0.25)]
            return sorted(
                (a for a in found if a.get("name") == service), key=lambda a: a["id"]
            )

        for subject in ["$SRV.PING", f"$SRV.PING.{service}"]:
            pings = [ServicePing.from_dict(a) for a in await answers(subject)]
            assert [(p.name, p.id) for p in pings] == [(service, "c1"), (service, "c2")]
            assert pings[1].version == aiomas.nats.SERVICE_VERSION
            assert pings[1].metadata == {"aiomas.base_url": "nats://c2/"}
        (raw,) = await answers(f"$SRV.INFO.{service}.c2")
        info = ServiceInfo.from_dict(raw)
        assert raw["type"] == "io.nats.micro.v1.info_response"
        assert [(e.name, e.subject) for e in info.endpoints] == [
            ("connect", f"{service}.c2.connect")
        ]
        assert raw["agents"] == {"0": "Echo"}
        # Two connections to c2 were accepted: the first one, and ours now.
        await one.connect("nats://c2/0")
        (raw,) = await answers(f"$SRV.STATS.{service}.c2")
        stats = ServiceStats.from_dict(raw)
        assert stats.id == "c2"
        assert stats.endpoints[0].num_requests >= 1
        assert stats.endpoints[0].num_errors == 0
        assert await answers(f"$SRV.INFO.{service}.c3") == []


async def test_look_up_an_agent_by_name(place: Place) -> None:
    """By its class name (or its id) on every container of the system."""
    async with place.containers(3) as (one, two, three):
        Echo(two)
        Echo(three)
        Callee(three)
        link = nats_link(one)
        assert link is not None
        assert await link.lookup("Echo") == ["nats://c2/0", "nats://c3/0"]
        assert await link.lookup("Callee") == ["nats://c3/1"]
        assert await link.lookup("Nobody") == []
        (addr,) = await link.lookup("Callee")
        assert await (await one.connect(addr)).spam(1) == "spam"


async def test_other_prefixes_are_other_systems(place: Place) -> None:
    other = Place(
        "nats", count=5, nats_url=place.nats_url, nats_query="prefix=elsewhere"
    )
    async with place.containers(1) as (one,), other.containers(1) as (two,):
        Callee(two)
        with pytest.raises(ConnectionRefusedError):
            await one.connect("nats://c6/0")
        link = nats_link(two)
        assert link is not None
        assert [i["name"] for i in await link.discover()] == ["c6"]


# --- the link to the server -----------------------------------------------------------


async def test_a_server_back_within_the_bound_keeps_connections_and_calls(
    own_server: NatsServer,
) -> None:
    """Our server dies and comes back within heartbeat interval + timeout:
    the connections over it go on, the call in flight and a call made
    during the outage end with their results, the proxies keep working."""
    place = Place("nats", nats_url=own_server.url, nats_query="heartbeat=2")
    async with place.containers(2) as (one, two):
        callee = Callee(one)
        proxy = await two.connect(callee.addr)
        back = await one.connect(Caller(two).addr)
        in_flight = asyncio.ensure_future(proxy.slow_echo("in flight", 0.5))
        await asyncio.sleep(0.05)
        own_server.kill()
        during = asyncio.ensure_future(proxy.slow_echo("during", 0))
        await asyncio.sleep(0.2)
        own_server.start()
        assert await asyncio.wait_for(in_flight, WAIT) == "in flight"
        assert await asyncio.wait_for(during, WAIT) == "during"
        assert await proxy.spam(2) == "spamspam"
        assert await back.call_back(callee, 1) == "SPAM"
        link = nats_link(one)
        assert link is not None
        assert len(link.transports) == 2  # The same two connections.

        def acknowledged() -> bool:
            # (Acks travel on their own: the last ones may still be coming.)
            offsets = [t.stream_offsets for t in link.transports]
            return all(sent >= acked > 0 for sent, acked, _ in offsets)

        async with asyncio.timeout(WAIT):
            while not acknowledged():
                await asyncio.sleep(0.01)
        for transport in link.transports:
            assert transport.stream_offsets[2] > 0  # received


async def test_a_server_down_for_longer_fails_calls_within_the_bound(
    own_server: NatsServer,
) -> None:
    """Our server stays down: the calls pending over it fail with
    ConnectionResetError within heartbeat interval + timeout (+ a
    heartbeat interval); once it is back, containers reach each other again."""
    place = Place("nats", nats_url=own_server.url, nats_query=f"heartbeat={BEAT}")
    async with place.containers(2) as (one, two):
        proxy = await two.connect(Callee(one).addr)
        pending = asyncio.ensure_future(proxy.slow_echo(1, 60))
        await asyncio.sleep(0.05)
        start = time.monotonic()
        own_server.kill()
        with pytest.raises(ConnectionResetError, match="nothing heard from it"):
            await asyncio.wait_for(pending, WAIT)
        assert time.monotonic() - start < 4 * BEAT + 1
        own_server.start()
        proxy = await two.connect("nats://c1/0", timeout=WAIT)
        assert await proxy.spam(1) == "spam"


async def test_tls_to_the_server(tmp_path: Path, tls: TLSFiles) -> None:
    settings = "\n".join(
        [
            "tls {",
            f'  cert_file: "{tls.certfile}"',
            f'  key_file: "{tls.keyfile}"',
            "}",
        ]
    )
    server = NatsServer(tmp_path, "tls", settings=settings)
    context = ssl.create_default_context(cafile=tls.cafile)
    with running(server):
        one = await aiomas.Container.create(
            NatsConfig.from_url(f"tls://127.0.0.1:{server.port}/one", tls=context),
            as_coro=True,
        )
        two = await aiomas.Container.create(
            NatsConfig.from_url(f"tls://127.0.0.1:{server.port}/two", tls=context),
            as_coro=True,
        )
        try:
            proxy = await two.connect(Callee(one).addr)
            assert await proxy.spam(1) == "spam"
        finally:
            await one.shutdown(as_coro=True)
            await two.shutdown(as_coro=True)
        # The default context does not trust our test CA.
        with pytest.raises(ConnectionRefusedError, match="TLS"):
            await aiomas.Container.create(
                f"tls://127.0.0.1:{server.port}/three", as_coro=True
            )


async def test_user_and_password(tmp_path: Path) -> None:
    settings = "authorization {\n  user: alice\n  password: s3cret\n}"
    server = NatsServer(tmp_path, "auth", settings=settings)
    with running(server):
        base = f"127.0.0.1:{server.port}"
        await check_credentials(
            f"nats://alice:s3cret@{base}/good",
            f"nats://alice:s3cret@{base}/other",
            f"nats://alice:wrong@{base}/bad",
        )
        with pytest.raises(PermissionError):
            await aiomas.Container.create(f"nats://{base}/anonymous", as_coro=True)


async def check_credentials(good: str, other: str | NatsConfig, bad: str) -> None:
    """Containers at the URLs *good* and *other* reach each other; one at
    *bad* is refused with PermissionError."""
    one = await aiomas.Container.create(good, as_coro=True)
    two = await aiomas.Container.create(other, as_coro=True)
    try:
        proxy = await two.connect(Callee(one).addr)
        assert await proxy.spam(1) == "spam"
        with pytest.raises(PermissionError):
            await aiomas.Container.create(bad, as_coro=True)
    finally:
        await one.shutdown(as_coro=True)
        await two.shutdown(as_coro=True)


async def test_a_token(tmp_path: Path) -> None:
    server = NatsServer(tmp_path, "token", settings="authorization { token: s3cr3t }")
    with running(server):
        base = f"127.0.0.1:{server.port}"
        await check_credentials(
            f"nats://s3cr3t@{base}/one",
            f"nats://s3cr3t@{base}/two",
            f"nats://wrong@{base}/bad",
        )


def _new_seed(kind: int) -> bytes:
    """A fresh NKey seed of *kind* (nkeys.PREFIX_BYTE_USER, ...)."""
    import os

    import nkeys

    seed: bytes = nkeys.encode_seed(os.urandom(32), kind)
    return seed


async def test_an_nkey(tmp_path: Path) -> None:
    import nkeys

    seed = _new_seed(nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed)
    settings = f"authorization {{ users: [ {{ nkey: {public} }} ] }}"
    server = NatsServer(tmp_path, "nkey", settings=settings)
    other = tmp_path / "other.nk"
    other.write_bytes(_new_seed(nkeys.PREFIX_BYTE_USER))
    with running(server):
        base = f"127.0.0.1:{server.port}"
        await check_credentials(
            f"nats://{base}/one?nkey={seed_file}",
            NatsConfig.from_url(f"nats://{base}/two", nkey=str(seed_file)),
            f"nats://{base}/bad?nkey={other}",
        )


def _jwt(claims: dict[str, Any], issuer: Any) -> str:
    """A NATS JWT of *claims*, signed by the NKey pair *issuer*."""
    import base64
    import hashlib

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    claims = {"iat": int(time.time()), "iss": issuer.public_key.decode(), **claims}
    body = json.dumps(claims, separators=(",", ":")).encode()
    claims["jti"] = base64.b32encode(hashlib.sha256(body).digest()).decode().rstrip("=")
    head = b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = issuer.sign(f"{head}.{payload}".encode())
    return f"{head}.{payload}.{b64(signature)}"


async def test_a_credentials_file(tmp_path: Path) -> None:
    """Operator mode: an operator, an account and a user, their JWTs, and the
    user's ``.creds`` file (JWT and seed), as ``nsc`` makes them."""
    import nkeys

    operator = nkeys.from_seed(bytearray(_new_seed(nkeys.PREFIX_BYTE_OPERATOR)))
    account = nkeys.from_seed(bytearray(_new_seed(nkeys.PREFIX_BYTE_ACCOUNT)))
    user_seed = _new_seed(nkeys.PREFIX_BYTE_USER)
    user = nkeys.from_seed(bytearray(user_seed))
    operator_jwt = _jwt(
        {
            "sub": operator.public_key.decode(),
            "name": "op",
            "nats": {"type": "operator", "version": 2},
        },
        operator,
    )
    account_public = account.public_key.decode()
    account_jwt = _jwt(
        {
            "sub": account_public,
            "name": "grid",
            "nats": {
                "type": "account",
                "version": 2,
                "limits": {"subs": -1, "conn": -1, "data": -1, "payload": -1},
            },
        },
        operator,
    )
    user_jwt = _jwt(
        {
            "sub": user.public_key.decode(),
            "name": "grid-a",
            "nats": {
                "type": "user",
                "version": 2,
                "pub": {},
                "sub": {},
                "subs": -1,
                "data": -1,
                "payload": -1,
            },
        },
        account,
    )
    creds = tmp_path / "grid-a.creds"
    creds.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user_seed.decode()}\n"
        "------END USER NKEY SEED------\n"
    )
    settings = "\n".join(
        [
            f"operator: {operator_jwt}",
            "resolver: MEMORY",
            f"resolver_preload: {{ {account_public}: {account_jwt} }}",
        ]
    )
    server = NatsServer(tmp_path, "operator", settings=settings)
    with running(server):
        base = f"127.0.0.1:{server.port}"
        await check_credentials(
            f"nats://{base}/one?creds={creds}",
            f"nats://{base}/two?creds={creds}",
            f"nats://{base}/anonymous",
        )


# --- a cluster of three servers -------------------------------------------------------


async def test_a_cluster_with_one_server_killed_during_calls(tmp_path: Path) -> None:
    """Containers on three servers of a cluster call each other; one server
    dies during calls: the container on it reconnects to another server, its
    subscriptions are restored, the calls in flight end with their results
    (the streams resend what was lost) and every proxy obtained before keeps
    working; nothing waits longer than the documented bound."""
    servers = cluster(tmp_path, 3)
    beat = 1.0
    with running(*servers):
        urls = [
            f"nats://127.0.0.1:{s.port}/c{i}?heartbeat={beat}"
            for i, s in enumerate(servers)
        ]
        containers = [await aiomas.Container.create(url, as_coro=True) for url in urls]
        try:
            callees = [Callee(c) for c in containers]
            # The cluster forms while the routes connect: keep trying.
            proxies = {
                (i, j): await containers[i].connect(callees[j].addr, timeout=WAIT)
                for i in range(3)
                for j in range(3)
                if i != j
            }
            for proxy in proxies.values():
                assert await proxy.spam(1) == "spam"
            calls = {
                pair: asyncio.ensure_future(proxy.slow_echo(list(pair), 0.5))
                for pair, proxy in proxies.items()
            }
            await asyncio.sleep(0.1)
            start = time.monotonic()
            servers[2].kill()
            # Calls made while c2 reconnects, both ways.
            during = [
                asyncio.ensure_future(proxies[pair].spam(3))
                for pair in [(2, 0), (0, 2), (1, 2)]
            ]
            # The bound: interval + timeout (3 * beat), and a heartbeat more.
            bound = 4 * beat + 1
            results = await asyncio.wait_for(asyncio.gather(*calls.values()), bound)
            assert results == [list(pair) for pair in calls]
            assert (
                await asyncio.wait_for(asyncio.gather(*during), bound)
                == ["spamspamspam"] * 3
            )
            assert time.monotonic() - start < bound
            link = nats_link(containers[2])
            assert link is not None
            assert link.client.connected_url in {servers[0].url, servers[1].url}
            # Every proxy obtained before the switch still works.
            for proxy in proxies.values():
                assert await proxy.spam(2) == "spamspam"
            # c2's subscriptions were restored: a newcomer finds and reaches it.
            newcomer = await aiomas.Container.create(
                f"{servers[0].url}/c3?heartbeat={beat}", as_coro=True
            )
            try:
                link = nats_link(newcomer)
                assert link is not None
                found = await link.discover()
                assert [info["name"] for info in found] == ["c0", "c1", "c2", "c3"]
                proxy = await newcomer.connect(callees[2].addr, timeout=WAIT)
                assert await proxy.spam(1) == "spam"
            finally:
                await newcomer.shutdown(as_coro=True)
        finally:
            for container in containers:
                await container.shutdown(as_coro=True)


# --- subprocess containers ----------------------------------------------------------


async def test_a_killed_subprocess_container_fails_calls_within_the_bound(
    fast_place: Place,
) -> None:
    """``python -m aiomas.subproc nats://...``: a container process on NATS,
    driven by a master on NATS; SIGKILL with calls in flight makes them fail
    within interval + timeout, and a new process takes the name again."""
    from .test_subproc import CHILD_ENV, ROOT
    from .test_subproc import __name__ as subproc_tests

    url = f"{fast_place.nats_url}/child?{fast_place.nats_query}"
    process = await ContainerProcess.start(
        url, "--log-level", "warning", env=CHILD_ENV, cwd=str(ROOT)
    )
    try:
        assert process.manager_addr == "nats://child/0"
        async with fast_place.containers(1) as (master,):
            manager = await master.connect(process.manager_addr)
            worker, addr = await manager.spawn(f"{subproc_tests}:Worker", "w")
            assert addr == "nats://child/1"
            assert await worker.work(3) == "w: 3"
            calls = [asyncio.ensure_future(worker.hang()) for _ in range(20)]
            await asyncio.sleep(0.05)
            start = time.monotonic()
            await process.kill()
            results = await asyncio.wait_for(
                asyncio.gather(*calls, return_exceptions=True), WAIT
            )
            assert all(isinstance(r, ConnectionResetError) for r in results)
            assert time.monotonic() - start < 3 * BEAT + 1
            process = await ContainerProcess.start(
                url, "--log-level", "warning", env=CHILD_ENV, cwd=str(ROOT)
            )
            manager = await master.connect(process.manager_addr, timeout=WAIT)
            worker, _ = await manager.spawn(f"{subproc_tests}:Worker", "again")
            assert await worker.work(1) == "again: 1"
            await manager.stop()
            assert await asyncio.wait_for(process.wait(), WAIT) == 0
    finally:
        await process.kill()


async def test_a_subprocess_container_on_tcp_and_nats(place: Place) -> None:
    from .test_subproc import CHILD_ENV, ROOT

    process = await ContainerProcess.start(
        "127.0.0.1:0",
        "--nats",
        f"{place.nats_url}/both?{place.nats_query}",
        "--log-level",
        "warning",
        env=CHILD_ENV,
        cwd=str(ROOT),
    )
    try:
        assert process.manager_addr.startswith("tcp://127.0.0.1:")
        async with place.containers(1) as (master,):
            manager = await master.connect("nats://both/0")
            await manager.stop()
            assert await asyncio.wait_for(process.wait(), WAIT) == 0
    finally:
        await process.kill()


def test_subprocess_command_line_checks_nats_urls() -> None:
    parser = make_parser()
    args = parser.parse_args(["nats://127.0.0.1:4222/c1"])
    assert args.addr == "nats://127.0.0.1:4222/c1"
    args = parser.parse_args(["127.0.0.1:0", "--nats", "nats://h/c"])
    assert container_kwargs(args, parser)["nats"] == "nats://h/c"
    with pytest.raises(SystemExit):
        parser.parse_args(["nats://127.0.0.1:4222/a.b"])
    args = parser.parse_args(["nats://h/c", "--nats", "nats://h/d"])
    with pytest.raises(SystemExit):
        container_kwargs(args, parser)
