"""Tests of aiomas.tracing: records, cause chains, the wire feature "trace"."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import aiomas
from aiomas import protocol, tracing
from aiomas.testing import TIME_UNIT, connection_pair, sent_messages, settle

from .test_deadlines import SpecPeer, wait_until

EXAMPLES = Path(__file__).parent.parent / "examples"
WAIT = 200 * TIME_UNIT

FIELDS = {
    "id",
    "ev",
    "type",
    "msg",
    "conn",
    "trace",
    "cause",
    "lamport",
    "wall",
    "clock",
    "local",
    "peer",
    "path",
    "size",
    "outcome",
}


@pytest.fixture(autouse=True)
def _tracing_off() -> Iterator[None]:
    """No test leaves process-wide tracing on."""
    assert tracing.active() is None
    yield
    tracing.disable()


class Service:
    """Adds, and calls on through *other* (a nested call)."""

    router = aiomas.rpc.Service()

    def __init__(self) -> None:
        self.other: aiomas.rpc.RpcClient | None = None

    @aiomas.expose
    def add(self, a: int, b: int) -> int:
        return a + b

    @aiomas.expose
    def fail(self) -> None:
        raise ValueError("no")

    @aiomas.expose
    async def nested(self, x: int) -> int:
        assert self.other is not None
        result: int = await self.other.remote.add(x, 1)
        return result

    @aiomas.expose
    async def sleep(self) -> None:
        await asyncio.Event().wait()


async def _serve(
    service: Any, **kwargs: Any
) -> tuple[asyncio.AbstractServer, tuple[str, int]]:
    server = await aiomas.rpc.start_server(("127.0.0.1", 0), service, **kwargs)
    sockets = getattr(server, "sockets", None)
    assert sockets
    host, port = sockets[0].getsockname()[:2]
    return server, (host, port)


@contextlib.asynccontextmanager
async def traced_chain(
    tracer: tracing.Tracer, codec: type[aiomas.codecs.Codec] = aiomas.JSON
) -> AsyncIterator[aiomas.rpc.RpcClient]:
    """client -> A (nested) -> B, all traced into *tracer*, with the
    extension on every connection."""
    first, second = Service(), Service()
    options: dict[str, Any] = {"extensions": True, "trace": tracer, "codec": codec}
    server_a, addr_a = await _serve(first, **options)
    server_b, addr_b = await _serve(second, **options)
    first.other = await aiomas.rpc.open_connection(addr_b, **options)
    client = await aiomas.rpc.open_connection(addr_a, **options)
    try:
        assert "trace" in await client.wait_extensions()
        assert "trace" in await first.other.wait_extensions()
        yield client
    finally:
        await client.close()
        await first.other.close()
        for server in (server_a, server_b):
            server.close()
            await server.wait_closed()


@pytest.fixture(params=[aiomas.JSON, aiomas.MsgPack], ids=["json", "msgpack"])
async def chain(
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[aiomas.rpc.RpcClient, list[dict[str, Any]]]]:
    """:func:`traced_chain` into a sink (the records), with each codec (MsgPack
    gives the trace context back as a tuple)."""
    records: list[dict[str, Any]] = []
    async with traced_chain(tracing.Tracer(records.append), request.param) as client:
        yield client, records


def _by_id(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {record["id"]: record for record in records}


def _calls(records: list[dict[str, Any]], path: str) -> list[dict[str, Any]]:
    return [r for r in records if r["path"] == path]


async def test_nested_calls_have_complete_cause_chains(
    chain: tuple[aiomas.rpc.RpcClient, list[dict[str, Any]]],
) -> None:
    client, records = chain
    assert await client.remote.nested(3) == 4
    await settle()
    by_id = _by_id(records)
    assert set(tracing.RECORD_FIELDS) == FIELDS | {"args"}
    for record in records:
        assert set(record) == FIELDS
        assert record["id"].startswith(tracing.process_token() + ":")
    kinds = [(r["ev"], r["type"], r["path"]) for r in records if r["path"]]
    assert kinds == [
        ("send", "request", "nested"),
        ("recv", "request", "nested"),
        ("send", "request", "add"),
        ("recv", "request", "add"),
        ("send", "result", "add"),
        ("recv", "result", "add"),
        ("send", "result", "nested"),
        ("recv", "result", "nested"),
    ]
    chained = [r for r in records if r["path"]]
    send_n, recv_n, send_a, recv_a, reply_a, got_a, reply_n, got_n = chained
    assert send_n["cause"] is None  # a top-level call
    assert recv_n["cause"] == send_n["id"]  # through the wire extension
    assert send_a["cause"] == recv_n["id"]  # made while serving
    assert recv_a["cause"] == send_a["id"]
    assert reply_a["cause"] == recv_a["id"]
    assert got_a["cause"] == send_a["id"]
    assert reply_n["cause"] == recv_n["id"]
    assert got_n["cause"] == send_n["id"]
    assert {r["trace"] for r in chained} == {send_n["trace"]}
    for record in chained:
        if record["cause"] is not None:
            assert by_id[record["cause"]]["lamport"] < record["lamport"]
    assert got_n["outcome"] == "result"
    assert send_n["outcome"] is None
    # The request went with its trace context: it is longer than the reply.
    assert send_n["size"] == recv_n["size"] > reply_n["size"] == got_n["size"] > 0
    assert send_n["msg"] == recv_n["msg"] == got_n["msg"]
    assert send_n["conn"] != recv_n["conn"]
    assert send_n["peer"]["addr"] == recv_n["local"]["addr"]
    assert "args" not in send_n


async def test_failures_cancels_and_timeouts_are_recorded(
    chain: tuple[aiomas.rpc.RpcClient, list[dict[str, Any]]],
) -> None:
    client, records = chain
    with pytest.raises(aiomas.RemoteException):
        await client.remote.fail()
    with pytest.raises(aiomas.DeadlineExceeded):
        async with aiomas.deadline(10 * TIME_UNIT):
            await client.remote.sleep()
    call = client.remote.sleep()
    await settle()
    call.cancel()
    for _ in range(100):
        if sum(r["ev"] == "cancel" for r in records) == 3:
            break
        await asyncio.sleep(TIME_UNIT)
    by_id = _by_id(records)
    sent, got = (r for r in _calls(records, "fail") if r["type"] == "failure")
    assert sent["outcome"] == got["outcome"] == "error:ValueError"
    assert by_id[got["cause"]]["ev"] == "send"
    sleeps = _calls(records, "sleep")
    events = [(r["ev"], r["type"], r["outcome"]) for r in sleeps]
    assert ("timeout", None, "timeout") in events
    assert ("cancel", "cancel", "cancelled") in events
    # The callee was told of the cancel and recorded it; at the deadline, its
    # own timer may answer first (then the cancel finds nothing to stop).
    served = {r["conn"] for r in sleeps if r["ev"] == "recv"}
    ends = [
        (r["ev"], r["msg"], r["outcome"])
        for r in sleeps
        if r["conn"] in served and r["ev"] != "recv"
    ]
    first_msg = sleeps[0]["msg"]
    assert ends[0] in [
        ("cancel", first_msg, "cancelled"),
        ("send", first_msg, "error:DeadlineExceeded"),
    ]
    assert ends[1] == ("cancel", first_msg + 1, "cancelled")
    for record in sleeps:
        if record["ev"] != "send" or record["type"] != "request":
            assert by_id[record["cause"]]["type"] == "request"


async def test_the_args_option_records_truncated_reprs() -> None:
    records: list[dict[str, Any]] = []
    tracer = tracing.Tracer(records.append, args=True)
    server, addr = await _serve(Service(), trace=tracer)
    client = await aiomas.rpc.open_connection(addr)
    try:
        assert await client.remote.add("x" * 300, "y") == "x" * 300 + "y"
    finally:
        await client.close()
        server.close()
        await server.wait_closed()
    received, replied = _calls(records, "add")
    assert received["args"].startswith("[['xxx")
    assert len(received["args"]) == len(replied["args"]) == tracing.ARGS_LIMIT
    assert replied["args"].endswith("...")


# --- The wire -----------------------------------------------------------------


def test_a_request_with_a_trace_and_no_deadline_is_a_type_3_request() -> None:
    client, server = connection_pair()
    client.offer_extensions()
    (offer,) = server.receive_data(b"".join(client.data_to_send()))
    assert server.take_offer(offer.message_id, offer.content)
    (offer_reply,) = sent_messages(server)
    assert offer_reply[2] == [1, ["cancel", "deadline", "trace"]]
    client.offer_answered(offer_reply[2])
    msg_id = client.send_request_with_meta(
        ["p", [], {}], trace={"trace": ["t", "c:1", 5]}
    )
    data = b"".join(client.data_to_send())
    assert json.loads(data[4:]) == [
        3,
        msg_id,
        [["p", [], {}], {"trace": ["t", "c:1", 5]}],
    ]
    (event,) = server.receive_data(data)
    assert event == protocol.ExtendedRequestReceived(
        msg_id, ["p", [], {}], None, {"trace": ["t", "c:1", 5]}
    )


def test_only_a_feature_that_was_agreed_is_sent() -> None:
    client, _server = connection_pair()
    client.offer_extensions()
    client.data_to_send()
    client.offer_answered([1, ["deadline"]])
    client.send_request_with_meta(["p", [], {}], trace={"trace": ["t", "c:1", 5]})
    client.send_request_with_meta(
        ["p", [], {}], deadline=1.0, trace={"trace": ["t", "c:2", 6]}
    )
    assert sent_messages(client) == [
        [0, 1, ["p", [], {}]],
        [3, 2, [["p", [], {}], {"deadline": 1.0}]],
    ]


def test_a_trace_alone_makes_type_3_acceptable() -> None:
    client, server = connection_pair()
    assert server.take_offer(0, ["__aiomas__/extensions", [1, ["trace"]], {}])
    assert server.extensions == {"trace"}
    payload = json.dumps([3, 4, [["p", [], {}], {"trace": "junk"}]]).encode()
    (event,) = server.receive_data(struct.pack(">L", len(payload)) + payload)
    assert isinstance(event, protocol.ExtendedRequestReceived)
    assert event.meta == {"trace": "junk"}
    del client


class BytePeer(SpecPeer):
    """The documented-format peer of test_deadlines, keeping every byte it
    gets."""

    def __init__(self) -> None:
        super().__init__()
        self.received = b""

    def data_received(self, data: bytes) -> None:
        self.received += data
        super().data_received(data)


async def _spec_peer_session(extensions: bool, trace: Any) -> bytes:
    peers: list[BytePeer] = []

    def factory() -> BytePeer:
        peers.append(BytePeer())
        return peers[-1]

    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, "127.0.0.1", 0)
    addr = server.sockets[0].getsockname()[:2]
    try:
        client = await aiomas.rpc.open_connection(
            addr, extensions=extensions, trace=trace
        )
        try:
            assert await client.wait_extensions() == frozenset()
            assert await client.remote.add(1, 2) == 3
            with pytest.raises(aiomas.RemoteException):
                await client.remote.nothing()
        finally:
            await client.close()
    finally:
        server.close()
        await server.wait_closed()
    (peer,) = peers
    return peer.received


@pytest.mark.parametrize("extensions", [False, True])
async def test_a_plain_peer_sees_no_extra_bytes(extensions: bool) -> None:
    records: list[dict[str, Any]] = []
    plain = await _spec_peer_session(extensions, None)
    traced = await _spec_peer_session(extensions, records.append)
    assert traced == plain
    calls = [(r["ev"], r["type"], r["path"]) for r in records if r["path"]]
    assert calls == [
        ("send", "request", "add"),
        ("recv", "result", "add"),
        ("send", "request", "nothing"),
        ("recv", "failure", "nothing"),
    ]
    assert records[2]["cause"] == records[1]["id"]
    assert records[4]["outcome"] == "error:LookupError"
    assert [r["ev"] for r in records if r["path"] is None] == ["open", "close"]


class RawClient(asyncio.Protocol):
    """A client that speaks the extension as documented: it makes the offer
    and then sends type-3 requests as given."""

    def __init__(self) -> None:
        self.reader = aiomas.wire.FrameReader()
        self.replies: asyncio.Queue[Any] = asyncio.Queue()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for payload in self.reader.feed(data):
            self.replies.put_nowait(json.loads(payload))

    def send(self, message: Any) -> None:
        assert self.transport is not None
        self.transport.write(aiomas.wire.frame(json.dumps(message).encode()))


BAD_TRACES = [
    "junk",
    None,
    [],
    ["t", "c"],
    ["t", "c", "5"],
    [1, "c", 5],
    ["t", 2, 5],
    ["t", "c", -1],
    ["t", "c", 2**70],
    ["", "c", 1],
    ["t" * 65, "c", 1],
    ["t", "c", 1.5],
    {"trace": 1},
]


async def test_bad_trace_metadata_is_ignored_and_the_request_served() -> None:
    records: list[dict[str, Any]] = []
    server, addr = await _serve(Service(), extensions=True, trace=records.append)
    loop = asyncio.get_running_loop()
    transport, raw = await loop.create_connection(RawClient, *addr)
    try:
        raw.send([0, 0, ["__aiomas__/extensions", [1, ["trace"]], {}]])
        reply = await asyncio.wait_for(raw.replies.get(), WAIT)
        assert reply == [1, 0, [1, ["trace"]]]
        for msg_id, bad in enumerate(BAD_TRACES, start=1):
            raw.send([3, msg_id, [["add", [msg_id, 1], {}], {"trace": bad}]])
            assert await asyncio.wait_for(raw.replies.get(), WAIT) == [
                1,
                msg_id,
                msg_id + 1,
            ]
        # A good one is taken, and its Lamport counter moves ours on.
        raw.send([3, 99, [["add", [1, 1], {}], {"trace": ["abc", "x:1", 10**9]}]])
        assert await asyncio.wait_for(raw.replies.get(), WAIT) == [1, 99, 2]
    finally:
        transport.close()
        server.close()
        await server.wait_closed()
    received = [r for r in records if r["ev"] == "recv"]
    assert len(received) == len(BAD_TRACES) + 1
    assert all(r["cause"] is None for r in received[:-1])
    assert received[-1]["cause"] == "x:1"
    assert received[-1]["trace"] == "abc"
    assert received[-1]["lamport"] == 10**9 + 1


# --- Turning it on ------------------------------------------------------------


async def test_enable_and_disable_for_the_whole_process(tmp_path: Path) -> None:
    tracer = tracing.enable(tmp_path)
    assert tracing.active() is tracer
    assert tracer.path == tmp_path / f"{tracing.process_token()}.jsonl"
    server, addr = await _serve(Service())
    try:
        client = await aiomas.rpc.open_connection(addr)
        assert await client.remote.add(1, 1) == 2
        await client.close()
        tracing.disable()
        assert tracing.active() is None
        client = await aiomas.rpc.open_connection(addr)
        assert await client.remote.add(1, 2) == 3
        await client.close()
    finally:
        server.close()
        await server.wait_closed()
    await settle()
    assert tracer.path is not None
    (header,) = tracing.read_headers([tracer.path])
    assert header["process"] == tracing.process_token()
    assert header["pid"] == os.getpid()
    records = tracing.read([tracer.path])
    # Both ends of the first connection, nothing of the second.
    assert len({r["conn"] for r in records}) == 2
    assert [r["ev"] for r in records if r["path"] == "add"] == [
        "send",
        "recv",
        "send",
        "recv",
    ]


_ENV_SCRIPT = """
import asyncio, aiomas

class S:
    router = aiomas.rpc.Service()
    @aiomas.expose
    def ping(self):
        return "pong"

async def main():
    server = await aiomas.rpc.start_server(("127.0.0.1", 0), S())
    client = await aiomas.rpc.open_connection(server.sockets[0].getsockname()[:2])
    assert await client.remote.ping() == "pong"
    await client.close()
    server.close()
    await server.wait_closed()

asyncio.run(main())
print(aiomas.tracing.process_token())
"""


def _run_traced(script: str, directory: Path) -> str:
    """Run *script* in a Python started with AIOMAS_TRACE=*directory*;
    return what it printed."""
    env = dict(os.environ, AIOMAS_TRACE=str(directory))
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=True,
    )
    return result.stdout


def test_the_environment_variable_turns_it_on(tmp_path: Path) -> None:
    token = _run_traced(_ENV_SCRIPT, tmp_path / "run").strip()
    (path,) = (tmp_path / "run").iterdir()
    assert path.name == f"{token}.jsonl"
    records = tracing.read([path])
    assert [r["ev"] for r in records if r["path"] == "ping"] == [
        "send",
        "recv",
        "send",
        "recv",
    ]


def test_read_checks_headers_and_skips_a_cut_last_line(tmp_path: Path) -> None:
    def write(name: str, lines: list[Any], tail: str = "") -> Path:
        path = tmp_path / name
        text = "".join(json.dumps(line) + "\n" for line in lines)
        path.write_text(text + tail, encoding="utf-8")
        return path

    head = {"format": "aiomas-trace", "version": 1, "process": "a"}
    one = write("a.jsonl", [head, {"id": "a:1", "lamport": 3, "wall": 1.0}], '{"id')
    two = write("b.jsonl", [head, {"id": "b:1", "lamport": 1, "wall": 9.0}])
    assert [r["id"] for r in tracing.read([one, two])] == ["b:1", "a:1"]
    newer = write("c.jsonl", [{**head, "version": 2}])
    with pytest.raises(ValueError, match="version 2"):
        tracing.read([newer])
    other = write("d.jsonl", [{"format": "something"}])
    with pytest.raises(ValueError, match="format is not 'aiomas-trace'"):
        tracing.read_headers([other])
    broken = write("e.jsonl", [head], "nonsense\n[1]\n")
    with pytest.raises(ValueError, match=r"e\.jsonl:2"):
        tracing.read([broken])


def test_a_trace_target_is_a_directory_or_a_callable() -> None:
    with pytest.raises(TypeError):
        tracing.Tracer(42)  # type: ignore[arg-type]
    tracer = tracing.Tracer(print)
    assert tracing.as_tracer(tracer) is tracer
    assert tracing.as_tracer(None) is None
    assert tracer.path is None


async def test_a_plain_channel_is_traced_without_paths() -> None:
    records: list[dict[str, Any]] = []

    async def serve(channel: aiomas.channel.Channel) -> None:
        request = await channel.recv()
        await request.reply(request.content * 2)

    server = await aiomas.channel.start_server(("127.0.0.1", 0), serve)
    addr = server.sockets[0].getsockname()[:2]  # type: ignore[attr-defined]
    channel = await aiomas.channel.open_connection(addr)
    channel.start_tracing(tracing.Tracer(records.append), addr="me")
    try:
        assert await channel.send("ab") == "abab"
    finally:
        await channel.close()
        server.close()
        await server.wait_closed()
    sent, got = (r for r in records if r["msg"] is not None)
    assert (sent["ev"], sent["path"], got["ev"], got["cause"]) == (
        "send",
        None,
        "recv",
        sent["id"],
    )
    assert sent["local"] == {"addr": "me", "agent": None}


# --- Containers ----------------------------------------------------------------


class Echo(aiomas.Agent):
    def __init__(self, container: aiomas.Container, other: Any = None) -> None:
        super().__init__(container)
        self.other = other

    @aiomas.expose
    async def relay(self, x: int) -> int:
        assert self.other is not None
        result: int = await self.other.echo(x)
        return result

    @aiomas.expose
    def echo(self, x: int) -> int:
        return x


async def test_containers_on_an_external_clock_record_ordered_clock_times(
    tmp_path: Path,
) -> None:
    clock = aiomas.ExternalClock("2020-01-01T00:00:00")
    one = await aiomas.Container.create(
        ("127.0.0.1", 0), clock=clock, extensions=True, trace=tmp_path, as_coro=True
    )
    two = await aiomas.Container.create(
        aiomas.get_queue("trace-ext"), clock=clock, trace=tmp_path, as_coro=True
    )
    try:
        echo = Echo(two)
        proxy = await one.connect(echo.addr)
        relay = Echo(one, proxy)
        caller = await two.connect(relay.addr)
        for step in range(4):
            clock.set_time(10 * step)
            assert await caller.relay(step) == step
    finally:
        await one.shutdown(as_coro=True)
        await two.shutdown(as_coro=True)
    records = tracing.read(tmp_path.iterdir())
    relayed = [r for r in records if r["path"] and "relay" in r["path"]]
    assert [r["clock"] for r in relayed if r["ev"] == "recv"] == [
        0.0,
        0.0,
        10.0,
        10.0,
        20.0,
        20.0,
        30.0,
        30.0,
    ]
    clocks = [r["clock"] for r in records if r["msg"] is not None]
    assert clocks == sorted(clocks)
    by_id = _by_id(records)
    echoes = [r for r in records if r["path"] and r["path"].endswith("/echo")]
    for record in echoes:
        if record["ev"] == "send" and record["type"] == "request":
            # Made by the relay agent while it served a relay call.
            assert by_id[record["cause"]]["path"].endswith("/relay")
            assert record["local"] == {"addr": one.base_url, "agent": "0"}
            assert record["peer"]["agent"] == "0"
        if record["ev"] == "recv" and record["type"] == "request":
            assert record["local"] == {"addr": two.base_url, "agent": "0"}


def test_the_contract_net_demo_traced_in_three_processes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            str(EXAMPLES / "contract_net.py"),
            "--trace",
            str(run),
            "--external-clock",
            "--speed",
            "100",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    paths = sorted(run.iterdir())
    assert len(paths) == 3
    headers = tracing.read_headers(paths)
    assert len({h["pid"] for h in headers}) == 3
    records = tracing.read(paths)
    by_id = _by_id(records)
    processes = {r["id"].split(":")[0] for r in records}
    assert processes == {h["process"] for h in headers}
    replies = [r for r in records if r["type"] in ("result", "failure")]
    assert replies
    for reply in replies:
        cause = by_id[reply["cause"]]
        assert cause["type"] == "request"
        assert cause["msg"] == reply["msg"]
    served = [r for r in records if r["ev"] == "recv" and r["type"] == "request"]
    crossed = 0
    for request in served:
        if request["cause"] is None:
            # Only the lookup before the answer to the extension offer.
            assert request["path"] == "validate_aid"
            continue
        cause = by_id[request["cause"]]
        assert cause["ev"] == "send"
        assert cause["path"] == request["path"]
        assert cause["lamport"] < request["lamport"]
        crossed += cause["id"].split(":")[0] != request["id"].split(":")[0]
    assert crossed >= 10
    nested = [
        r
        for r in records
        if r["ev"] == "send" and r["type"] == "request" and r["cause"] is not None
    ]
    # The bidders report back while they serve their award.
    assert {by_id[r["cause"]]["path"].rsplit("/", 1)[1] for r in nested} == {"award"}
    assert all(r["clock"] is not None for r in records if r["msg"] is not None)
    cancels = [r for r in records if r["ev"] == "cancel"]
    assert all(by_id[r["cause"]]["type"] == "request" for r in cancels)


# --- OpenTelemetry ---------------------------------------------------------------


async def test_opentelemetry_spans_follow_the_calls_across_the_wire() -> None:
    pytest.importorskip("opentelemetry.sdk")  # (in the dev extra)
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )
    from opentelemetry.trace import SpanKind, StatusCode

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    records: list[dict[str, Any]] = []
    tracer = tracing.Tracer(records.append, otel=provider)
    async with traced_chain(tracer) as client:
        assert await client.remote.nested(1) == 2
        with pytest.raises(aiomas.RemoteException):
            await client.remote.fail()
    provider.shutdown()
    spans = {(s.name, s.kind): s for s in exporter.get_finished_spans()}
    assert len(spans) == 6
    call_n = spans["aiomas nested", SpanKind.CLIENT]
    serve_n = spans["aiomas nested", SpanKind.SERVER]
    call_a = spans["aiomas add", SpanKind.CLIENT]
    serve_a = spans["aiomas add", SpanKind.SERVER]
    assert call_n.parent is None
    assert serve_n.parent is not None
    assert serve_n.parent.is_remote
    assert serve_n.parent.span_id == call_n.context.span_id
    assert call_a.parent is not None
    assert call_a.parent.span_id == serve_n.context.span_id
    assert serve_a.parent is not None
    assert serve_a.parent.span_id == call_a.context.span_id
    trace_ids = {s.context.trace_id for s in (call_n, serve_n, call_a, serve_a)}
    assert len(trace_ids) == 1
    assert call_n.attributes is not None
    assert call_n.attributes["rpc.method"] == "nested"
    assert call_n.attributes["aiomas.outcome"] == "result"
    failed = spans["aiomas fail", SpanKind.CLIENT]
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes is not None
    assert failed.attributes["aiomas.outcome"] == "error:ValueError"
    assert spans["aiomas fail", SpanKind.SERVER].status.status_code is StatusCode.ERROR
    # The records are made all the same.
    assert len([r for r in records if r["path"] == "nested"]) == 4


def test_children_get_the_trace_directory(tmp_path: Path) -> None:
    assert tracing.child_environment({"A": "1"}) == {"A": "1"}  # tracing off
    tracing.enable(print)
    assert tracing.child_environment(None) is None  # no directory to give
    tracing.enable(tmp_path)
    env = tracing.child_environment({"A": "1"})
    assert env == {"A": "1", tracing.ENV_VAR: str(tmp_path)}
    assert tracing.child_environment({tracing.ENV_VAR: "mine"}) == {
        tracing.ENV_VAR: "mine"
    }
    inherited = tracing.child_environment(None)
    assert inherited is not None
    assert inherited[tracing.ENV_VAR] == str(tmp_path)


class Waiter:
    """A service whose calls wait until released (or cancelled)."""

    router = aiomas.rpc.Service()

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0
        self.cancelled = 0

    @aiomas.expose
    async def wait(self) -> str:
        self.started += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return "done"


async def test_a_traced_plain_send_stays_plain_when_cancelled() -> None:
    """With "cancel" agreed, cancelling the future of a traced plain
    ``Channel.send`` tells the peer nothing (only ``send_cancellable`` does),
    and the call is recorded all the same."""
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    waiter = Waiter()
    server, addr = await _serve(waiter, extensions=True, trace=theirs.append)
    client = await aiomas.rpc.open_connection(addr, extensions=True, trace=ours.append)
    try:
        assert "cancel" in await client.wait_extensions()
        channel = client.channel
        plain = channel.send(["wait", [], {}])
        await wait_until(lambda: waiter.started == 1)
        cancellable = channel.send_cancellable(["wait", [], {}])
        await wait_until(lambda: waiter.started == 2)
        plain.cancel()
        cancellable.cancel()
        # The plain one waits for its late reply; the other was forgotten.
        assert channel.waiting_for_replies == 1
        await wait_until(lambda: waiter.cancelled == 1)
        await settle()
        assert waiter.cancelled == 1
        waiter.release.set()
        await wait_until(lambda: channel.waiting_for_replies == 0)
        sends = [r for r in ours if r["ev"] == "send" and r["path"] == "wait"]
        assert len(sends) == 2
        assert [r["ev"] for r in ours if r["msg"] == sends[0]["msg"]][:2] == [
            "send",
            "cancel",
        ]
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


def test_enable_names_the_directory_for_children_and_disable_restores_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(tracing.ENV_VAR, raising=False)
    tracing.enable(tmp_path / "a")
    assert os.environ[tracing.ENV_VAR] == str(tmp_path / "a")
    tracing.enable(tmp_path / "b")
    assert os.environ[tracing.ENV_VAR] == str(tmp_path / "b")
    tracing.disable()
    assert tracing.ENV_VAR not in os.environ
    monkeypatch.setenv(tracing.ENV_VAR, "before")
    tracing.enable(tmp_path / "c")
    tracing.enable(print)  # (no directory for children)
    assert os.environ[tracing.ENV_VAR] == "before"
    tracing.enable(tmp_path / "d")
    tracing.disable()
    assert os.environ[tracing.ENV_VAR] == "before"


_DISABLE_SCRIPT = """
import os, aiomas
assert aiomas.tracing.active() is not None
aiomas.tracing.disable()
print(os.environ.get("AIOMAS_TRACE"), aiomas.tracing.child_environment(None))
"""


def test_disable_turns_off_the_variable_that_turned_tracing_on(
    tmp_path: Path,
) -> None:
    """A process started with AIOMAS_TRACE that disables tracing starts no
    traced children any more (e.g. subprocess containers)."""
    printed = _run_traced(_DISABLE_SCRIPT, tmp_path / "run")
    assert printed.split() == ["None", "None"]


def test_records_are_flushed_on_a_loop_after_one_that_stopped_first(
    tmp_path: Path,
) -> None:
    tracer = tracing.Tracer(tmp_path)
    first = asyncio.new_event_loop()
    try:

        def write_and_stop() -> None:
            tracer.write({"ev": "first"})
            first.stop()  # before the flush it scheduled has run

        first.call_soon(write_and_stop)
        first.run_forever()
    finally:
        first.close()

    async def write_on_another_loop() -> None:
        tracer.write({"ev": "second"})
        await asyncio.sleep(0)  # (the flush runs in this iteration)

    asyncio.run(write_on_another_loop())
    assert tracer.path is not None
    with tracer.path.open(encoding="utf-8") as file:
        lines = [json.loads(line) for line in file]
    assert [line.get("ev") for line in lines[1:]] == ["first", "second"]


async def test_a_failing_sink_changes_no_call(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A sink that raises (a full disk, a directory that cannot be made)
    fails neither the calls nor the connections: the error is logged once,
    and that tracer records nothing more."""
    records: list[dict[str, Any]] = []

    def sink(record: dict[str, Any]) -> None:
        records.append(record)
        if record["ev"] == "send":
            raise OSError("disk full")

    client_tracer = tracing.Tracer(sink)
    # (A file, not a directory: the trace directory cannot be made.)
    (tmp_path / "file").write_text("")
    server_tracer = tracing.Tracer(tmp_path / "file" / "traces")
    server = await aiomas.rpc.start_server(
        ("127.0.0.1", 0), Service(), trace=server_tracer
    )
    client = await aiomas.rpc.open_connection(
        server.sockets[0].getsockname(), trace=client_tracer
    )
    try:
        with caplog.at_level("ERROR", logger="aiomas.tracing"):
            assert [await client.remote.add(i, 1) for i in range(3)] == [1, 2, 3]
        assert client_tracer.failed
        assert server_tracer.failed
        assert client.channel.waiting_for_replies == 0
        failures = [r for r in caplog.records if r.name == "aiomas.tracing"]
        assert len(failures) == 2  # once per tracer
        assert len(records) == 2  # "open", then the failing "send"
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


FORKING = """
import os, sys, aiomas
aiomas.tracing.enable(sys.argv[1])

class S:
    router = aiomas.rpc.Service()

    @aiomas.expose
    def ping(self):
        return 1

async def once():
    server = await aiomas.rpc.start_server(('127.0.0.1', 0), S())
    client = await aiomas.rpc.open_connection(server.sockets[0].getsockname())
    await client.remote.ping()
    await client.close()
    server.close()
    await server.wait_closed()

aiomas.run(once())
pid = os.fork()
aiomas.run(once())
if pid:
    os.waitpid(pid, 0)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
def test_a_forked_child_traces_into_a_file_of_its_own(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", FORKING, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    files = sorted(tmp_path.glob("*.jsonl"))
    assert len(files) == 2
    headers = tracing.read_headers(files)
    assert len({header["process"] for header in headers}) == 2
    assert len({header["pid"] for header in headers}) == 2
    child, parent = sorted(len(tracing.read([path])) for path in files)
    # The parent made two rounds of calls, the child one, and nothing twice.
    assert child > 0
    assert parent == 2 * child
    per_file = [child, parent]
    assert len(tracing.read(files)) == sum(per_file)
