"""Tests for aiomas.protocol: the sans-I/O message core, byte by byte, with no
event loop and no transport."""

from __future__ import annotations

import ast
import json
import struct
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aiomas
from aiomas import protocol
from aiomas.codecs import JSON, MsgPack, serializable
from aiomas.exceptions import DecodeError, SerializationError
from aiomas.protocol import (
    Connection,
    Event,
    FailureReceived,
    ProtocolViolation,
    ReplyUndecodable,
    RequestReceived,
    RequestRejected,
    ResultReceived,
)
from aiomas.testing import connection_pair, receive, sent_messages, transfer


def frame(payload: bytes) -> bytes:
    return struct.pack(">L", len(payload)) + payload


def jframe(message: Any) -> bytes:
    return frame(json.dumps(message).encode())


def test_the_core_imports_nothing_of_asyncio_or_sockets() -> None:
    tree = ast.parse(Path(protocol.__file__).with_name("protocol.py").read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert not imported & {"asyncio", "socket", "ssl", "selectors", "threading"}


def test_a_request_and_its_reply() -> None:
    client, server = connection_pair()
    token = object()
    assert client.send_request(["ohai"]) == 0
    assert client.send_request("again", token) == 1
    assert client.waiting_for_replies == 2
    assert client.pending == {0: None, 1: token}
    events = transfer(client, server)
    assert events == [RequestReceived(0, ["ohai"]), RequestReceived(1, "again")]
    server.send_result(1, "second")
    server.send_failure(0, "Traceback: nope\n")
    assert transfer(server, client) == [
        ResultReceived(1, "second", token),
        FailureReceived(0, "Traceback: nope\n"),
    ]
    assert client.waiting_for_replies == 0
    assert client.pending == {}
    assert client.bytes_to_send == server.bytes_to_send == 0


def test_the_bytes_on_the_wire() -> None:
    client = Connection(JSON())
    client.send_request(["agents/0/spam", [2], {}])
    assert b"".join(client.data_to_send()) == jframe([0, 0, ["agents/0/spam", [2], {}]])


@pytest.mark.parametrize(
    ("content", "text"),
    [
        ("a traceback\n", "a traceback\n"),
        (["ValueError", "no", "line 1"], "ValueError\nno\nline 1"),
        ({"not": "text"}, "{'not': 'text'}"),
    ],
)
def test_failure_texts_from_any_peer(content: Any, text: str) -> None:
    client = Connection(JSON())
    client.send_request(None)
    assert list(client.receive_data(jframe([2, 0, content]))) == [
        FailureReceived(0, text)
    ]


def test_a_reply_for_a_request_never_sent_is_a_violation() -> None:
    client = Connection(JSON())
    client.send_request(None)
    events = list(client.receive_data(jframe([1, 5, "x"]) + jframe([1, 0, "ok"])))
    assert len(events) == 1
    assert isinstance(events[0], ProtocolViolation)
    assert "unknown message id 5" in str(events[0].error)
    assert client.closed
    # Nothing received afterwards is looked at.
    assert list(client.receive_data(jframe([1, 0, "ok"]))) == []
    assert list(client.buffer_updated(0)) == []


def test_a_repeated_reply_is_dropped() -> None:
    # A network that delivers a message twice (or a peer that answers twice):
    # the caller keeps the first answer, drops the rest and stays connected.
    client = Connection(JSON())
    first = client.send_request("a", "token a")
    client.send_request("b", "token b")
    events = list(
        client.receive_data(
            jframe([1, first, "A"])
            + jframe([1, first, "again"])
            + jframe([2, first, "failure"])
            + jframe([1, 1, "B"])
        )
    )
    assert events == [
        ResultReceived(0, "A", "token a"),
        ResultReceived(1, "B", "token b"),
    ]
    assert not client.closed
    assert client.waiting_for_replies == 0


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (frame(b"not json"), "Cannot decode message"),
        (jframe([7, 0, None]), "Unknown message type 7"),
        (jframe([0, "id", None]), "Invalid message header"),
        (jframe({"a": 1}), "must be a list"),
        (jframe([1, 2]), "must be a list"),
        (struct.pack(">L", 2**31), "exceeds max_frame_size"),
    ],
)
def test_protocol_violations(data: bytes, reason: str) -> None:
    (event,) = Connection(JSON()).receive_data(data)
    assert isinstance(event, ProtocolViolation)
    assert reason in str(event.error)


def test_a_malformed_request_with_an_id_is_answered() -> None:
    server = Connection(JSON())
    events = list(server.receive_data(jframe([0, 3]) + jframe([0, 4, "fine"])))
    assert events[0] == RequestRejected(
        3,
        "malformed",
        "ProtocolError: a request must be a list [0, message_id, content], "
        "got a list of 2 elements\n",
    )
    assert events[1] == RequestReceived(4, "fine")
    assert sent_messages(server) == [[2, 3, events[0].text]]  # type: ignore[union-attr]


@serializable
class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x = x
        self.y = y


def test_undecodable_content_fails_only_that_message() -> None:
    server = Connection(JSON())
    unknown = {"__type__": [9, None]}
    events = list(server.receive_data(jframe([0, 1, unknown]) + jframe([0, 2, "ok"])))
    assert isinstance(events[0], RequestRejected)
    assert events[0].reason == "undecodable"
    assert events[0].text.startswith(
        "SerializationError: Cannot decode the content of message 1: "
    )
    assert events[1] == RequestReceived(2, "ok")
    assert [m[:2] for m in sent_messages(server)] == [[2, 1]]

    client = Connection(JSON())
    client.send_request(None)
    (event,) = list(client.receive_data(jframe([1, 0, unknown])))
    assert isinstance(event, ReplyUndecodable)
    assert event.message_id == 0
    assert isinstance(event.error, DecodeError)
    assert isinstance(event.error, SerializationError)
    assert "Cannot decode the content of message 0" in str(event.error)
    assert client.waiting_for_replies == 0


def test_undecodable_replies_for_unknown_ids_are_violations() -> None:
    (event,) = Connection(JSON()).receive_data(jframe([1, 0, {"__type__": [9, 1]}]))
    assert isinstance(event, ProtocolViolation)
    (event,) = Connection(JSON()).receive_data(jframe([5, 0, {"__type__": [9, 1]}]))
    assert isinstance(event, ProtocolViolation)
    assert "Cannot decode message" in str(event.error)


def test_custom_types_travel() -> None:
    client, server = connection_pair(MsgPack)
    for conn in (client, server):
        conn.codec.add_serializer(*Point.__serializer__())  # type: ignore[attr-defined]
    client.send_request(Point(1, 2))
    (event,) = transfer(client, server)
    assert isinstance(event, RequestReceived)
    assert (event.content.x, event.content.y) == (1, 2)


def test_an_unencodable_result_still_answers_the_request() -> None:
    server = Connection(JSON())
    list(server.receive_data(jframe([0, 0, None])))
    with pytest.raises(SerializationError):
        server.send_result(0, object())
    ((msg_type, msg_id, text),) = sent_messages(server)
    assert (msg_type, msg_id) == (2, 0)
    assert "SerializationError" in text


def test_an_unencodable_request_sends_nothing() -> None:
    client = Connection(JSON())
    with pytest.raises(SerializationError):
        client.send_request(object())
    assert client.waiting_for_replies == 0
    assert client.data_to_send() == []
    assert client.send_request(1) == 1  # the id was used up


def test_small_frames_are_joined_and_big_payloads_are_chunks_of_their_own() -> None:
    conn = Connection(JSON())
    for i in range(3):
        list(conn.receive_data(jframe([0, i, None])))
        conn.send_result(i, i)
    big = "x" * (protocol.JOIN_LIMIT + 10)
    list(conn.receive_data(jframe([0, 3, None])))
    conn.send_result(3, big)
    list(conn.receive_data(jframe([0, 4, None])))
    conn.send_result(4, "small")
    chunks = conn.data_to_send()
    big_frame = jframe([1, 3, big])
    lead = 4 + protocol.BIG_PAYLOAD_LEAD  # (the header and 16 KiB of it)
    assert chunks == [
        b"".join(jframe([1, i, i]) for i in range(3)) + big_frame[:lead],
        big_frame[lead:],
        jframe([1, 4, "small"]),
    ]
    assert type(chunks[1]) is memoryview  # (the payload, not copied)


def test_a_big_request_is_a_chunk_of_its_own() -> None:
    conn = Connection(JSON())
    big = "x" * (protocol.JOIN_LIMIT + 10)
    conn.send_request("small")
    conn.send_request(big)
    frame = jframe([0, 1, big])
    lead = 4 + protocol.BIG_PAYLOAD_LEAD
    assert conn.data_to_send() == [
        jframe([0, 0, "small"]) + frame[:lead],
        frame[lead:],
    ]
    assert conn.waiting_for_replies == 2


def test_the_table_of_pending_requests_shrinks_after_a_burst() -> None:
    """Python dicts keep their size when emptied: after 10,000 calls at once
    the core must not hold a table for 10,000 (about 300 kB) while idle."""
    conn, peer = connection_pair()
    tracemalloc.start()
    try:
        for i in range(10_000):
            conn.send_request(i, token=i)
        for event in transfer(conn, peer):
            assert isinstance(event, RequestReceived)
            peer.send_result(event.message_id, None)
        assert len(transfer(peer, conn)) == 10_000
        assert conn.waiting_for_replies == 0
        # (The receive buffers, which are kept on purpose, are the reader's.)
        held = tracemalloc.take_snapshot().filter_traces(
            [
                tracemalloc.Filter(True, protocol.__file__),
                # Compiled (protocol.COMPILED), what the core allocates is
                # counted for the Python code that calls it: this test.
                tracemalloc.Filter(True, __file__),
            ]
        )
        assert sum(stat.size for stat in held.statistics("filename")) < 10_000
    finally:
        tracemalloc.stop()
    # One call at a time never grows it, and goes on working.
    for i in range(200):
        conn.send_request(i, token=i)
        (request,) = transfer(conn, peer)
        assert isinstance(request, RequestReceived)
        peer.send_result(request.message_id, i)
        assert transfer(peer, conn) == [ResultReceived(request.message_id, i, token=i)]


def test_joined_chunks_stay_below_the_write_limit() -> None:
    conn = Connection(JSON())
    text = "y" * 60_000
    for i in range(10):
        list(conn.receive_data(jframe([0, i, None])))
        conn.send_result(i, text)
    chunks = conn.data_to_send()
    assert all(len(chunk) <= protocol.JOINED_WRITE_LIMIT for chunk in chunks)
    assert len(chunks) == 3


def test_requests_are_held_while_writing_is_paused() -> None:
    server = Connection(JSON())
    server.hold_requests = True
    assert server.reading_wanted
    server.pause_writing()
    assert not server.reading_wanted
    assert list(server.receive_data(jframe([0, 0, "a"]) + jframe([0, 1, "b"]))) == []
    assert server.held_requests == 2
    assert server.next_held_request() is None  # still paused
    server.resume_writing()
    # A request that arrives now still waits behind the held ones.
    assert list(server.receive_data(jframe([0, 2, "c"]))) == []
    assert server.next_held_request() == RequestReceived(0, "a")
    server.pause_writing()
    assert server.next_held_request() is None
    server.resume_writing()
    assert server.next_held_request() == RequestReceived(1, "b")
    assert server.next_held_request() == RequestReceived(2, "c")
    assert server.next_held_request() is None
    assert list(server.receive_data(jframe([0, 3, "d"]))) == [RequestReceived(3, "d")]


def test_without_hold_requests_every_request_is_passed_on() -> None:
    server = Connection(JSON())
    server.pause_writing()
    assert list(server.receive_data(jframe([0, 0, "a"]))) == [RequestReceived(0, "a")]


def test_waiting_for_a_reply_keeps_reading() -> None:
    conn = Connection(JSON())
    conn.send_request(None)
    conn.pause_writing()
    assert conn.reading_wanted
    list(conn.receive_data(jframe([1, 0, None])))
    assert not conn.reading_wanted


def test_too_many_held_requests_are_refused_once_reported() -> None:
    server = Connection(JSON())
    server.hold_requests = True
    server.pause_writing()
    data = b"".join(jframe([0, i, None]) for i in range(protocol.MAX_HELD_REQUESTS + 3))
    events = list(server.receive_data(data))
    assert len(events) == 1
    assert isinstance(events[0], RequestRejected)
    assert events[0].reason == "refused"
    assert events[0].message_id == protocol.MAX_HELD_REQUESTS
    refused = sent_messages(server)
    assert [m[1] for m in refused] == [protocol.MAX_HELD_REQUESTS + i for i in range(3)]
    assert all("overloaded: 1024 requests wait" in m[2] for m in refused)
    server.resume_writing()
    while server.next_held_request() is not None:
        pass
    # A new flood is reported again.
    server.pause_writing()
    events = list(server.receive_data(data))
    assert any(isinstance(e, RequestRejected) for e in events)


def test_unread_failure_replies_have_a_budget() -> None:
    server = Connection(JSON())
    server.pause_writing()
    malformed = jframe([0, 1])
    count = protocol.MAX_UNREAD_FAILURE_BYTES // 60 + 10
    events = list(server.receive_data(malformed * count))
    assert isinstance(events[-1], ProtocolViolation)
    assert "does not read the replies" in str(events[-1].error)
    assert server.unread_failure_bytes > protocol.MAX_UNREAD_FAILURE_BYTES
    assert all(isinstance(e, RequestRejected) for e in events[:-1])
    # Reading the replies (writing resumes) resets the budget.
    other = Connection(JSON())
    other.pause_writing()
    list(other.receive_data(malformed * (count // 2)))
    other.resume_writing()
    other.data_to_send()
    other.pause_writing()
    events = list(other.receive_data(malformed * (count // 2)))
    assert not any(isinstance(e, ProtocolViolation) for e in events)


def test_connection_lost_returns_the_requests_left_waiting() -> None:
    conn = Connection(JSON())
    for _ in range(3):
        conn.send_request(None)
    list(conn.receive_data(jframe([1, 1, None])))
    assert list(conn.connection_lost()) == [0, 2]
    assert conn.closed
    assert conn.waiting_for_replies == 0
    assert list(conn.receive_data(jframe([1, 0, None]))) == []


def test_buffered_counts_a_partial_frame() -> None:
    conn = Connection(JSON())
    list(conn.receive_data(jframe([0, 0, None])[:7]))
    assert conn.buffered == 7


def test_bad_max_frame_size() -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        Connection(JSON(), max_frame_size=-1)


def test_helpers() -> None:
    try:
        raise ValueError("boom")
    except ValueError as exc:
        text = protocol.format_exception(exc)
    assert text.startswith("Traceback (most recent call last):")
    assert text.endswith("ValueError: boom\n")
    assert protocol.format_exception(KeyError("k")) == "KeyError: 'k'\n"
    assert protocol.abbreviate("x" * 100, 10) == "'xxxxxx..."
    assert protocol.abbreviate("x") == "'x'"


# --- Any chunking of any stream gives the same events -----------------------------


def normalized(events: Sequence[Event]) -> list[Any]:
    out: list[Any] = []
    for event in events:
        if isinstance(event, ReplyUndecodable):
            out.append(("undecodable", event.message_id, str(event.error)))
        elif isinstance(event, ProtocolViolation):
            out.append(("violation", str(event.error)))
        else:
            out.append(event)
    return out


messages = st.one_of(
    st.builds(lambda i, c: [0, i, c], st.integers(0, 5), st.text(max_size=5)),
    st.builds(lambda i, c: [1, i, c], st.integers(0, 5), st.integers()),
    st.builds(lambda i, c: [2, i, c], st.integers(0, 5), st.text(max_size=5)),
    st.builds(lambda i: [0, i, {"__type__": [9, 1]}], st.integers(0, 5)),
    st.builds(lambda i: [1, i, {"__type__": [9, 1]}], st.integers(0, 5)),
    st.builds(lambda i: [0, i], st.integers(0, 5)),
    st.just([3, 0, None]),
    st.just({"no": "list"}),
)
frames = st.one_of(
    messages.map(jframe),
    st.binary(max_size=8).map(frame),
)


@settings(max_examples=300, deadline=None)
@given(
    stream=st.lists(frames, max_size=12).map(b"".join),
    cuts=st.lists(st.integers(0, 400), max_size=8),
    pending=st.integers(0, 6),
    paused=st.booleans(),
    hold=st.booleans(),
)
def test_any_chunking_gives_the_same_events(
    stream: bytes, cuts: list[int], pending: int, paused: bool, hold: bool
) -> None:
    def run(chunks: list[bytes], zero_copy: bool) -> tuple[list[Any], list[Any]]:
        conn = Connection(JSON(), max_frame_size=300)
        conn.hold_requests = hold
        for _ in range(pending):
            conn.send_request(None)
        conn.data_to_send()
        if paused:
            conn.pause_writing()
        events = receive(conn, chunks, zero_copy=zero_copy)
        return normalized(events), sent_messages(conn)

    whole = run([stream], zero_copy=False)
    points = sorted({min(cut, len(stream)) for cut in cuts})
    pieces = [
        stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)
    ]
    assert run(pieces, zero_copy=False) == whole
    assert run(pieces, zero_copy=True) == whole
    assert run([bytes([b]) for b in stream], zero_copy=False) == whole


def test_a_violation_on_the_zero_copy_path() -> None:
    conn = Connection(JSON(), max_frame_size=10)
    buffer = conn.get_buffer()
    buffer[:4] = struct.pack(">L", 11)
    (event,) = list(conn.buffer_updated(4))
    assert isinstance(event, ProtocolViolation)
    assert "exceeds max_frame_size" in str(event.error)


def test_a_big_payload_last() -> None:
    conn = Connection(JSON())
    list(conn.receive_data(jframe([0, 0, None])))
    conn.send_result(0, "z" * (protocol.JOIN_LIMIT + 1))
    chunks = conn.data_to_send()
    lead = 4 + protocol.BIG_PAYLOAD_LEAD
    assert [len(chunk) for chunk in chunks] == [lead, protocol.JOIN_LIMIT + 15 - lead]


def test_frames_before_a_bad_header_come_first() -> None:
    conn = Connection(JSON(), max_frame_size=100)
    events = list(conn.receive_data(jframe([0, 0, "a"]) + struct.pack(">L", 101)))
    assert events[0] == RequestReceived(0, "a")
    assert isinstance(events[1], ProtocolViolation)
    assert conn.closed


def test_events_are_made_as_they_are_asked_for() -> None:
    """Answering one request may pause writing: the requests after it in the
    same read are then held back, not passed on."""
    server = Connection(JSON())
    server.hold_requests = True
    events = server.receive_data(b"".join(jframe([0, i, i]) for i in range(4)))
    first = next(events)
    assert first == RequestReceived(0, 0)
    server.pause_writing()  # (as the transport would, while we answer)
    assert list(events) == []
    assert server.held_requests == 3
    server.resume_writing()
    assert server.next_held_request() == RequestReceived(1, 1)


def test_frames_not_asked_for_are_kept() -> None:
    conn = Connection(JSON())
    events = conn.receive_data(jframe([0, 0, "a"]) + jframe([0, 1, "b"]))
    assert next(events) == RequestReceived(0, "a")
    del events
    assert list(conn.receive_data(jframe([0, 2, "c"]))) == [
        RequestReceived(1, "b"),
        RequestReceived(2, "c"),
    ]


class Verbatim(aiomas.codecs.Codec):
    """Sends the content of a message as its payload, as it is."""

    def encode(self, data: Any) -> bytes:
        content: bytes = data[2]
        return content


def test_order_is_kept_and_big_payloads_are_not_copied() -> None:
    conn = Connection(Verbatim())
    small = [bytes([i % 256]) * 1000 for i in range(300)]  # 300 kB in 1 kB frames
    big = b"B" * (protocol.JOIN_LIMIT + 1)
    payloads = [*small[:100], big, *small[100:]]
    for i, payload in enumerate(payloads):
        conn.send_result(i, payload)
    chunks = conn.data_to_send()
    assert b"".join(chunks) == b"".join(frame(p) for p in payloads)
    # The big payload, but for the first 16 KiB that went with its header:
    (rest,) = [chunk for chunk in chunks if type(chunk) is memoryview]
    assert rest.obj is big
    assert rest == big[protocol.BIG_PAYLOAD_LEAD :]
    assert all(len(c) <= protocol.JOINED_WRITE_LIMIT for c in chunks if c is not big)
    assert len(chunks) <= 5


def test_the_rest_of_a_big_payload_is_never_joined_even_when_short() -> None:
    conn = Connection(Verbatim())
    big = b"B" * (protocol.JOIN_LIMIT + 1)  # (its rest is below JOIN_LIMIT)
    conn.send_result(0, big)
    conn.send_result(1, b"after")
    chunks = conn.data_to_send()
    assert [type(chunk) for chunk in chunks] == [bytes, memoryview, bytes]
    assert b"".join(chunks) == frame(big) + frame(b"after")
    assert cast(memoryview, chunks[1]).obj is big


@pytest.mark.parametrize(
    ("codec", "payload", "hint"),
    [
        (MsgPack, b"[0, 0, null]", "looks like JSON, but this side uses MsgPack"),
        (JSON, b"\x93\x00\x00\xc0", "looks like MsgPack, but this side uses JSON"),
        (JSON, bytes([2, 1, 0, 8]) + bytes(8) + (16).to_bytes(4, "little"), "Blosc"),
        (JSON, b"[garbled", None),  # our own format, garbled
        (JSON, b"\x00garbage", None),
    ],
)
def test_a_codec_mismatch_is_named(
    codec: type[aiomas.codecs.Codec], payload: bytes, hint: str | None
) -> None:
    (event,) = Connection(codec()).receive_data(frame(payload))
    assert isinstance(event, ProtocolViolation)
    text = str(event.error)
    assert text.startswith("Cannot decode message")
    if hint is None:
        assert "both sides must use the same codec" not in text
    else:
        assert hint in text
        assert "both sides must use the same codec" in text


def test_a_codec_of_its_own_is_named_by_its_class() -> None:
    class Mine(aiomas.codecs.Codec):
        def decode(self, data: Any) -> Any:
            raise SerializationError("never")

    (event,) = Connection(Mine()).receive_data(frame(b"\x93\x00\x00\xc0"))
    assert isinstance(event, ProtocolViolation)
    assert "this side uses Mine" in str(event.error)


def test_requests_sent_counts_answered_ones_too() -> None:
    conn = Connection(JSON())
    conn.send_request(None)
    conn.send_request(None)
    list(conn.receive_data(jframe([1, 0, None])))
    assert (conn.requests_sent, conn.waiting_for_replies) == (2, 1)


def test_nothing_is_left_to_send_after_the_end() -> None:
    conn = Connection(JSON())
    list(conn.receive_data(jframe([0, 0, None])))
    conn.send_result(0, "x" * 1000)
    events = list(conn.receive_data(jframe([9, 1, 0])))
    assert isinstance(events[-1], ProtocolViolation)
    assert conn.bytes_to_send == 0
    assert conn.data_to_send() == []
    other = Connection(JSON())
    other.send_request(None)
    other.connection_lost()
    assert other.bytes_to_send == 0


def test_frames_waiting_and_discarded_requests() -> None:
    conn = Connection(JSON())
    events = conn.receive_data(jframe([0, 0, "a"]) + jframe([0, 1, "b"]))
    assert conn.frames_waiting == 2
    next(events)
    assert conn.frames_waiting == 1
    list(events)
    assert conn.frames_waiting == 0
    kept = conn.send_request(None)
    msg_id = conn.send_request(None)
    conn.discard_request(msg_id)
    assert conn.waiting_for_replies == 1
    conn.discard_request(kept)
    conn.discard_request(kept)  # (twice: nothing happens)
    assert conn.waiting_for_replies == 0
    (event,) = conn.receive_data(jframe([1, msg_id, None]))
    assert isinstance(event, ProtocolViolation)  # a reply nobody waits for


# --- Receivers: the fast path for requests and results -------------------------


def test_receivers_take_requests_and_results_instead_of_events() -> None:
    conn = Connection(JSON())
    requests: list[tuple[int, Any]] = []
    results: list[tuple[Any, Any]] = []
    conn.on_request = lambda msg_id, content: requests.append((msg_id, content))
    conn.on_result = lambda token, content: results.append((token, content))
    conn.send_request("ask", token="my token")
    data = jframe([0, 7, "a"]) + jframe([1, 0, "answer"]) + jframe([2, 5, "oops"])
    events = list(conn.receive_data(data))
    # Only the failure (to a request never sent) is left for events.
    assert [type(event) for event in events] == [ProtocolViolation]
    assert requests == [(7, "a")]
    assert results == [("my token", "answer")]
    # A lone frame that went to a receiver gives no event at all.
    assert list(conn.receive_data(jframe([0, 8, "b"]))) == []
    assert requests == [(7, "a")]  # (the violation ended it: nothing is seen)


def test_a_lone_frame_goes_to_its_receiver_through_the_buffer_path() -> None:
    conn = Connection(MsgPack())
    seen: list[tuple[int, Any]] = []
    conn.on_request = lambda msg_id, content: seen.append((msg_id, content))
    payload = MsgPack().encode([0, 3, "x"])
    data = struct.pack(">L", len(payload)) + payload
    buffer = conn.get_buffer(len(data))
    buffer[: len(data)] = data
    assert conn.buffer_updated(len(data)) == ()
    assert seen == [(3, "x")]


def test_what_a_receiver_does_counts_for_the_next_frame() -> None:
    # The receiver of the first request pauses writing: with requests held for
    # a request handler (as RPC does), the second one is held back, and comes
    # as an event later, not to the receiver.
    conn = Connection(JSON())
    conn.hold_requests = True
    seen: list[int] = []

    def on_request(msg_id: int, content: Any) -> None:
        seen.append(msg_id)
        conn.send_result(msg_id, content)
        conn.pause_writing()

    conn.on_request = on_request
    assert list(conn.receive_data(jframe([0, 0, "a"]) + jframe([0, 1, "b"]))) == []
    assert seen == [0]
    assert conn.held_requests == 1
    conn.resume_writing()
    assert conn.next_held_request() == RequestReceived(1, "b")
    assert seen == [0]


def test_receivers_see_frames_one_at_a_time_as_events_are_asked_for() -> None:
    conn = Connection(JSON())
    waiting: list[int] = []
    conn.on_request = lambda msg_id, content: waiting.append(conn.frames_waiting)
    data = jframe([0, 0, "a"]) + jframe([2, 9, "no such call"]) + jframe([0, 1, "b"])
    events = conn.receive_data(data)
    assert waiting == []  # Nothing is looked at before it is asked for.
    assert isinstance(next(iter(events)), ProtocolViolation)
    assert waiting == [2]


def test_what_a_receiver_raises_is_its_own_not_a_protocol_violation() -> None:
    conn = Connection(JSON())

    def on_request(msg_id: int, content: Any) -> None:
        raise aiomas.exceptions.ProtocolError("the receiver's own error")

    conn.on_request = on_request
    with pytest.raises(aiomas.exceptions.ProtocolError, match="receiver's own"):
        list(conn.receive_data(jframe([0, 0, "a"]) + jframe([0, 1, "b"])))
    assert not conn.closed
    # The frame after it waits for the next call of events().
    conn.on_request = None
    assert list(conn.events()) == [RequestReceived(1, "b")]


def test_receivers_are_forgotten_when_the_connection_ends() -> None:
    conn = Connection(JSON())
    conn.on_request = conn.on_result = print
    conn.connection_lost()
    assert (conn.on_request, conn.on_result) == (None, None)
    other = Connection(JSON())
    other.on_request = other.on_result = print
    (event,) = other.receive_data(jframe([9, 0, None]))
    assert isinstance(event, ProtocolViolation)
    assert (other.on_request, other.on_result) == (None, None)


# --- on_data: the core writes through a sink ----------------------------------


def test_on_data_gets_each_frame_at_once_outside_a_read() -> None:
    conn = Connection(JSON())
    written: list[bytes] = []
    conn.on_data = written.append
    msg_id = conn.send_request("ask")
    assert written == [jframe([0, msg_id, "ask"])]
    conn.send_result(4, "answer")
    conn.send_failure(5, "no")
    assert written[1:] == [jframe([1, 4, "answer"]), jframe([2, 5, "no"])]
    assert conn.bytes_to_send == 0
    assert conn.data_to_send() == []


def test_on_data_gets_the_replies_of_a_read_together() -> None:
    conn = Connection(JSON())
    written: list[bytes] = []
    conn.on_data = written.append
    conn.on_request = lambda msg_id, content: conn.send_result(msg_id, content)
    malformed = jframe([0, 1])  # answered by the core itself
    list(conn.receive_data(jframe([0, 0, "a"]) + malformed + jframe([0, 2, "b"])))
    assert len(written) == 1
    messages = json_messages(written[0])
    assert [message[:2] for message in messages] == [[1, 0], [2, 1], [1, 2]]
    assert messages[2][2] == "b"


def json_messages(data: bytes) -> list[Any]:
    """The JSON messages framed in *data*."""
    messages, pos = [], 0
    while pos < len(data):
        (size,) = struct.unpack_from(">L", data, pos)
        messages.append(json.loads(data[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    return messages


def test_replies_gathered_in_a_read_leave_even_if_its_last_frame_sends_nothing() -> (
    None
):
    conn = Connection(JSON())
    written: list[bytes] = []
    conn.on_data = written.append
    conn.on_request = lambda msg_id, content: conn.send_result(msg_id, content)
    asked = conn.send_request(None)
    written.clear()
    list(conn.receive_data(jframe([0, 0, "a"]) + jframe([1, asked, None])))
    assert written == [jframe([1, 0, "a"])]


def test_on_data_gets_a_big_payload_apart_from_its_header() -> None:
    conn = Connection(JSON())
    written: list[bytes] = []
    conn.on_data = written.append
    big = "x" * protocol.JOIN_LIMIT
    conn.send_request(big)
    conn.send_result(1, big)
    lead = 4 + protocol.BIG_PAYLOAD_LEAD
    lengths = [lead, len(written[1]), lead, len(written[3])]
    assert [len(chunk) for chunk in written] == lengths
    assert b"".join(written[:2]) == jframe([0, 0, big])


def test_a_failing_on_data_comes_out_of_the_send_and_forgets_the_request() -> None:
    conn = Connection(JSON())

    def on_data(chunk: Any) -> None:
        raise OSError("the transport is gone")

    conn.on_data = on_data
    with pytest.raises(OSError, match="gone"):
        conn.send_request("ask")
    assert conn.waiting_for_replies == 0
    big = "x" * protocol.JOIN_LIMIT
    with pytest.raises(OSError, match="gone"):
        conn.send_request(big)
    assert conn.waiting_for_replies == 0
    with pytest.raises(OSError, match="gone"):
        conn.send_result(0, "answer")


class _CountedFlushes(Connection):
    """A core that counts how often its send queue is emptied."""

    flushes = 0

    def data_to_send(self) -> list[Any]:
        self.flushes += 1
        return super().data_to_send()


def agreed_alone() -> _CountedFlushes:
    """A client core that agreed on the whole extension (its peer left out)."""
    conn = _CountedFlushes(JSON())
    conn.offer_extensions()
    conn.data_to_send()
    agreed = [1, sorted(protocol.EXTENSION_FEATURES)]
    (answer,) = conn.receive_data(jframe([1, 0, agreed]))
    assert isinstance(answer, ResultReceived)
    conn.offer_answered(answer.content)
    conn.flushes = 0
    return conn


def test_a_request_with_meta_goes_to_on_data_without_the_queue() -> None:
    conn = agreed_alone()
    written: list[bytes] = []
    conn.on_data = written.append
    plain = conn.send_request("ask")
    assert written == [jframe([0, plain, "ask"])]
    assert conn.flushes == 0
    msg_id = conn.send_request_with_meta("ask", deadline=1.5)
    assert written[1:] == [jframe([3, msg_id, ["ask", {"deadline": 1.5}]])]
    assert conn.flushes == 0  # the same direct write as a plain request
    assert conn.bytes_to_send == 0
    assert conn.waiting_for_replies == 2


def test_a_request_with_meta_sent_while_a_read_is_handled_is_gathered() -> None:
    conn = agreed_alone()
    written: list[bytes] = []
    conn.on_data = written.append
    sent: list[int] = []
    conn.on_request = lambda msg_id, content: sent.append(
        conn.send_request_with_meta(content, deadline=1.0)
    )
    list(conn.receive_data(jframe([0, 0, "a"]) + jframe([0, 1, "b"])))
    assert len(written) == 1
    assert json_messages(written[0]) == [
        [3, sent[0], ["a", {"deadline": 1.0}]],
        [3, sent[1], ["b", {"deadline": 1.0}]],
    ]


def test_a_big_request_with_meta_goes_apart_from_its_header() -> None:
    conn = agreed_alone()
    written: list[bytes] = []
    conn.on_data = written.append
    big = "x" * protocol.JOIN_LIMIT
    msg_id = conn.send_request_with_meta(big, deadline=2.0)
    assert [len(chunk) for chunk in written] == [
        4 + protocol.BIG_PAYLOAD_LEAD,
        len(written[1]),
    ]
    assert b"".join(written) == jframe([3, msg_id, [big, {"deadline": 2.0}]])


def test_a_failing_on_data_forgets_the_request_with_meta() -> None:
    conn = agreed_alone()

    def on_data(chunk: Any) -> None:
        raise OSError("the transport is gone")

    conn.on_data = on_data
    for content in ("ask", "x" * protocol.JOIN_LIMIT):
        with pytest.raises(OSError, match="gone"):
            conn.send_request_with_meta(content, deadline=1.0)
        assert conn.waiting_for_replies == 0
    assert conn.bytes_to_send == 0
    # A reply for a request that never left is a violation, not a late reply.
    (event,) = conn.receive_data(jframe([1, 2, "made up"]))
    assert isinstance(event, ProtocolViolation)


def test_on_data_is_forgotten_when_the_connection_ends() -> None:
    conn = Connection(JSON())
    conn.on_data = print
    conn.connection_lost()
    assert conn.on_data is None
    other = Connection(JSON())
    other.on_data = print
    list(other.receive_data(jframe([9, 0, None])))
    assert other.on_data is None


# --- The wire extension (docs/wire-format.rst, "Extension 1") ------------------


def agreed_pair() -> tuple[Connection, Connection]:
    """A client and a server core that agreed on the whole extension."""
    client, server = connection_pair()
    msg_id = client.offer_extensions()
    (offer,) = transfer(client, server)
    assert isinstance(offer, RequestReceived)
    assert server.take_offer(offer.message_id, offer.content)
    (answer,) = transfer(server, client)
    assert isinstance(answer, ResultReceived)
    assert answer.message_id == msg_id
    assert client.offer_answered(answer.content) == protocol.EXTENSION_FEATURES
    return client, server


def test_the_offer_is_a_plain_rpc_call_to_the_reserved_path() -> None:
    client, server = connection_pair()
    assert client.extensions == frozenset()
    assert client.offer_extensions(token="t") == 0
    data = b"".join(client.data_to_send())
    assert data == jframe(
        [0, 0, ["__aiomas__/extensions", [1, ["cancel", "deadline", "trace"]], {}]]
    )
    (offer,) = server.receive_data(data)
    assert offer == RequestReceived(
        0, ["__aiomas__/extensions", [1, ["cancel", "deadline", "trace"]], {}]
    )
    assert server.take_offer(offer.message_id, offer.content)
    assert server.extensions == {"cancel", "deadline", "trace"}
    reply = b"".join(server.data_to_send())
    assert reply == jframe([1, 0, [1, ["cancel", "deadline", "trace"]]])
    (answer,) = client.receive_data(reply)
    assert answer == ResultReceived(0, [1, ["cancel", "deadline", "trace"]], "t")
    assert client.offer_answered(answer.content) == {"cancel", "deadline", "trace"}


def test_an_offer_of_some_features_agrees_on_those() -> None:
    client, server = connection_pair()
    client.offer_extensions(features=["cancel"])
    (offer,) = transfer(client, server)
    assert server.take_offer(offer.message_id, offer.content)
    assert sent_messages(server) == [[1, 0, [1, ["cancel"]]]]
    assert client.offer_answered([1, ["cancel"]]) == {"cancel"}
    # Without "deadline", requests stay plain.
    client.send_request_with_meta("x", deadline=1.0)
    assert sent_messages(client)[-1] == [0, 1, "x"]


def test_a_later_version_of_the_extension_is_answered_with_ours() -> None:
    _, server = connection_pair()
    offer = ["__aiomas__/extensions", [7, ["cancel", "deadline", "future"]], {}]
    assert server.take_offer(3, offer)
    assert sent_messages(server) == [[1, 3, [1, ["cancel", "deadline"]]]]


def test_unknown_features_cannot_be_offered() -> None:
    client, _ = connection_pair()
    with pytest.raises(ValueError, match="unknown extension features"):
        client.offer_extensions(features=["cancel", "teleport"])
    assert client.data_to_send() == []


@pytest.mark.parametrize(
    "content",
    [
        "ohai",
        ["calc/add", [1, 2], {}],
        ["__aiomas__/extensions", [], {}],
        ["__aiomas__/extensions", [0, ["cancel"]], {}],
        ["__aiomas__/extensions", [1, "cancel"], {}],
        ["__aiomas__/extensions", [1, [1, 2]], {}],
        ["__aiomas__/extensions", ["1", ["cancel"]], {}],
    ],
)
def test_anything_else_is_no_offer(content: Any) -> None:
    _, server = connection_pair()
    assert not server.take_offer(0, content)
    assert server.extensions == frozenset()
    assert server.data_to_send() == []


@pytest.mark.parametrize(
    "answer", [None, "x", [1], [0, ["cancel"]], [1, "cancel"], ["1", []], [1, [3]]]
)
def test_an_answer_that_is_no_agreement_leaves_the_connection_plain(
    answer: Any,
) -> None:
    client, _ = connection_pair()
    client.offer_extensions()
    assert client.offer_answered(answer) == frozenset()
    client.data_to_send()
    client.send_request_with_meta("x", deadline=1.0)
    assert client.cancel_request(1) is False
    assert sent_messages(client) == [[0, 1, "x"]]


def test_a_spec_peer_fails_the_offer_and_everything_stays_plain() -> None:
    client, server = connection_pair()
    client.offer_extensions()
    (offer,) = transfer(client, server)
    server.send_failure(offer.message_id, "LookupError: no such path\n")
    (failure,) = transfer(server, client)
    assert isinstance(failure, FailureReceived)
    assert client.extensions == frozenset()
    msg_id = client.send_request_with_meta(["f", [], {}], deadline=2.0)
    assert sent_messages(client) == [[0, msg_id, ["f", [], {}]]]
    # A cancel is not sent either: the request waits for its late reply.
    assert client.cancel_request(msg_id) is False
    assert client.data_to_send() == []
    assert client.waiting_for_replies == 1
    server.send_result(msg_id, "late")
    assert transfer(server, client) == [ResultReceived(msg_id, "late", None)]


def test_without_agreement_extension_messages_break_the_protocol() -> None:
    _, server = connection_pair()
    (event,) = receive(server, [jframe([3, 0, ["x", {"deadline": 1}]])])
    assert isinstance(event, ProtocolViolation)
    assert "Unknown message type 3" in str(event.error)
    _, server = connection_pair()
    (event,) = receive(server, [jframe([4, 0, None])])
    assert isinstance(event, ProtocolViolation)


def test_a_request_with_a_deadline_byte_by_byte() -> None:
    client, server = agreed_pair()
    msg_id = client.send_request_with_meta(["f", [1], {}], "token", deadline=1.5)
    data = b"".join(client.data_to_send())
    assert data == jframe([3, msg_id, [["f", [1], {}], {"deadline": 1.5}]])
    (event,) = server.receive_data(data)
    assert event == protocol.ExtendedRequestReceived(
        msg_id, ["f", [1], {}], 1.5, {"deadline": 1.5}
    )
    server.send_result(msg_id, 2)
    assert transfer(server, client) == [ResultReceived(msg_id, 2, "token")]
    # Without a deadline, a request is plain even when agreed.
    plain = client.send_request_with_meta("y")
    assert sent_messages(client) == [[0, plain, "y"]]


def test_a_cancel_byte_by_byte_and_the_late_reply_dropped() -> None:
    client, server = agreed_pair()
    msg_id = client.send_request("slow", "token")
    transfer(client, server)
    assert client.cancel_request(msg_id) is True
    assert client.waiting_for_replies == 0
    data = b"".join(client.data_to_send())
    assert data == jframe([4, msg_id, None])
    assert list(server.receive_data(data)) == [protocol.CancelReceived(msg_id)]
    # A reply that crossed the cancel is dropped without an event.
    server.send_result(msg_id, "late")
    server.send_failure(msg_id, "late failure")
    assert transfer(server, client) == []
    assert not client.closed
    # Cancelling again, or an id that waits for nothing, sends nothing.
    assert client.cancel_request(msg_id) is False
    assert client.cancel_request(99) is False
    assert client.data_to_send() == []


def test_a_reply_for_an_id_never_sent_still_breaks_the_protocol() -> None:
    client, _ = agreed_pair()
    (event,) = receive(client, [jframe([1, 50, "x"])])
    assert isinstance(event, ProtocolViolation)
    assert "unknown message id 50" in str(event.error)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("x", "must be [content, meta]"),
        (["x", "meta"], "must be a map"),
        (["x", {"deadline": -1}], "invalid deadline -1"),
        (["x", {"deadline": "soon"}], "invalid deadline 'soon'"),
        (["x", {"deadline": True}], "invalid deadline True"),
        (["x", {"deadline": 1e400}], "invalid deadline inf"),
    ],
)
def test_a_malformed_request_with_metadata_gets_a_failure(
    content: Any, why: str
) -> None:
    _, server = agreed_pair()
    (event,) = receive(server, [jframe([3, 5, content])])
    assert isinstance(event, RequestRejected)
    assert event.reason == "malformed"
    assert why in event.text
    ((msg_type, msg_id, text),) = sent_messages(server)
    assert (msg_type, msg_id) == (2, 5)
    assert why in text


def test_unknown_metadata_is_kept_but_ignored() -> None:
    _, server = agreed_pair()
    (event,) = receive(server, [jframe([3, 0, ["x", {"trace": "abc"}]])])
    assert event == protocol.ExtendedRequestReceived(0, "x", None, {"trace": "abc"})


def test_an_undecodable_request_with_metadata_gets_a_failure() -> None:
    @serializable
    class Unknown:
        def __init__(self, a: int) -> None:
            self.a = a

    sender = Connection(JSON())
    sender.codec.add_serializer(*Unknown.__serializer__())
    _, server = agreed_pair()
    payload = sender.codec.encode([3, 0, [Unknown(1), {"deadline": 1}]])
    (event,) = receive(server, [frame(payload)])
    assert isinstance(event, RequestRejected)
    assert event.reason == "undecodable"
    assert sent_messages(server)[0][:2] == [2, 0]


def test_a_cancelled_held_request_never_comes_out() -> None:
    _, server = agreed_pair()
    server.hold_requests = True
    server.pause_writing()
    assert receive(server, [jframe([0, 0, "a"]), jframe([3, 1, ["b", {}]])]) == []
    assert server.held_requests == 2
    assert receive(server, [jframe([4, 1, None])]) == [
        protocol.CancelReceived(1, held=True)
    ]
    assert receive(server, [jframe([4, 9, None])]) == [protocol.CancelReceived(9)]
    server.resume_writing()
    assert server.next_held_request() == RequestReceived(0, "a")
    assert server.next_held_request() is None


def test_a_held_request_with_metadata_comes_out_as_it_came() -> None:
    _, server = agreed_pair()
    server.hold_requests = True
    server.pause_writing()
    assert receive(server, [jframe([3, 1, ["b", {"deadline": 2}]])]) == []
    server.resume_writing()
    assert server.next_held_request() == protocol.ExtendedRequestReceived(
        1, "b", 2.0, {"deadline": 2}
    )


def test_requests_with_metadata_go_to_their_receiver() -> None:
    _, server = agreed_pair()
    received: list[tuple[Any, ...]] = []
    server.on_request_with_meta = lambda *args: received.append(args)
    frames = [
        jframe([3, 0, ["a", {"deadline": 1.5}]]),
        jframe([0, 1, "plain"]),  # (no on_request: an event)
        jframe([3, 2, ["b", {"trace": "t"}]]),
        jframe([3, 3, ["c", {"deadline": -1}]]),  # malformed: answered
    ]
    events = receive(server, frames)
    assert received == [
        (0, "a", 1.5, {"deadline": 1.5}),
        (2, "b", None, {"trace": "t"}),
    ]
    assert events[0] == RequestReceived(1, "plain")
    assert isinstance(events[1], RequestRejected)
    assert events[1].reason == "malformed"
    assert len(events) == 2
    # Held back while writing is paused: they come out as events.
    server.hold_requests = True
    server.pause_writing()
    assert receive(server, [jframe([3, 4, ["d", {"deadline": 2}]])]) == []
    assert len(received) == 2
    server.resume_writing()
    assert server.next_held_request() == protocol.ExtendedRequestReceived(
        4, "d", 2.0, {"deadline": 2}
    )
    server.connection_lost()
    assert server.on_request_with_meta is None


def test_a_request_with_metadata_breaks_the_protocol_without_deadline() -> None:
    client, server = connection_pair()
    client.offer_extensions(features=["cancel"])
    (offer,) = transfer(client, server)
    assert server.take_offer(offer.message_id, offer.content)
    server.on_request_with_meta = lambda *args: None
    (event,) = receive(server, [jframe([3, 0, ["a", {"deadline": 1}]])])
    assert isinstance(event, protocol.ProtocolViolation)
    assert server.on_request_with_meta is None


def test_nothing_is_cancelled_on_a_closed_connection() -> None:
    client, _ = agreed_pair()
    msg_id = client.send_request("x")
    client.connection_lost()
    assert client.cancel_request(msg_id) is False


@pytest.mark.parametrize("message", [[5, 0, None], [3, 0, ["x", {}]]])
def test_a_message_of_a_feature_not_agreed_breaks_the_protocol(
    message: list[Any],
) -> None:
    client, server = connection_pair()
    client.offer_extensions(features=["cancel"])
    (offer,) = transfer(client, server)
    assert server.take_offer(offer.message_id, offer.content)
    (event,) = receive(server, [jframe(message)])
    assert isinstance(event, ProtocolViolation)
    assert f"Unknown message type {message[0]}" in str(event.error)


def test_a_deadline_beyond_any_float_gets_a_failure_reply() -> None:
    """A JSON integer too large for a float (the core must not raise
    OverflowError out of receive_data()): that request is answered with a
    failure, the next one is served."""
    _, server = agreed_pair()
    huge = b'[3, 7, [["f", [], {}], {"deadline": 1' + b"0" * 400 + b"}]]"
    events = list(server.receive_data(frame(huge) + jframe([0, 8, "next"])))
    assert isinstance(events[0], RequestRejected)
    assert events[0].reason == "malformed"
    assert "invalid deadline" in events[0].text
    assert events[1] == RequestReceived(8, "next")
    assert not server.closed
