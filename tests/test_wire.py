"""Tests for the sans-I/O wire protocol core (aiomas.wire)."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiomas import codecs
from aiomas.exceptions import ProtocolError
from aiomas.wire import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_SIZE,
    MAX_FRAME_SIZE,
    FrameReader,
    frame,
    frame_header,
)

from .helpers import as_lists, codec_values


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split *data* at the (sorted, deduplicated) positions in *cuts*."""
    positions = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(positions)]


def test_frame_layout() -> None:
    assert frame(b"spam") == b"\x00\x00\x00\x04spam"
    assert frame(b"") == b"\x00\x00\x00\x00"
    assert frame_header(0x01020304) == b"\x01\x02\x03\x04"


def test_frame_header_refuses_what_32_bits_cannot_announce() -> None:
    assert frame_header(MAX_FRAME_SIZE) == b"\xff\xff\xff\xff"
    with pytest.raises(ValueError, match="too long"):
        frame_header(MAX_FRAME_SIZE + 1)


def test_default_limit_is_64_mib() -> None:
    assert DEFAULT_MAX_FRAME_SIZE == 64 * 2**20
    assert FrameReader().max_frame_size == DEFAULT_MAX_FRAME_SIZE


@pytest.mark.parametrize("bad", [-1, MAX_FRAME_SIZE + 1])
def test_reader_rejects_bad_limits(bad: int) -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        FrameReader(max_frame_size=bad)


def test_reader_rejects_tiny_buffer() -> None:
    with pytest.raises(ValueError, match="buffer_size"):
        FrameReader(buffer_size=4)


def test_feed_whole_frames() -> None:
    reader = FrameReader()
    data = frame(b"a") + frame(b"") + frame(b"xyz")
    assert reader.feed(data) == [b"a", b"", b"xyz"]
    assert reader.buffered == 0


def test_feed_byte_by_byte() -> None:
    reader = FrameReader(buffer_size=8)
    data = frame(b"hello world") + frame(b"!")
    out: list[bytes | bytearray] = []
    for i in range(len(data)):
        out.extend(reader.feed(data[i : i + 1]))
        if i < len(data) - 1 and not out:
            assert reader.buffered == i + 1
    assert out == [b"hello world", b"!"]


def test_feed_accepts_memoryview_and_bytearray() -> None:
    reader = FrameReader()
    assert reader.feed(memoryview(frame(b"ab"))) == [b"ab"]
    assert reader.feed(bytearray(frame(b"cd"))) == [b"cd"]


def test_oversized_frame_is_refused_before_allocation() -> None:
    reader = FrameReader(max_frame_size=10)
    assert reader.feed(frame(b"x" * 10)) == [b"x" * 10]
    with pytest.raises(ProtocolError, match="exceeds max_frame_size"):
        reader.feed(b"\x00\x00\x00\x0b")


def test_largest_header_with_default_limit_is_refused() -> None:
    reader = FrameReader()
    with pytest.raises(ProtocolError, match="4294967295"):
        reader.feed(b"\xff\xff\xff\xff")


def test_big_frame_gets_its_own_buffer() -> None:
    reader = FrameReader(buffer_size=16)
    payload = bytes(range(256)) * 40
    data = frame(payload) + frame(b"after")
    out = reader.feed(data[:10])
    assert out == []
    # The reader now asks for exactly the rest of the big frame.
    buf = reader.get_buffer(-1)
    assert len(buf) == len(payload) - 6
    buf[:] = data[10 : 4 + len(payload)]
    out = reader.buffer_updated(len(buf))
    assert out == [payload]
    assert isinstance(out[0], bytearray)
    assert reader.feed(data[4 + len(payload) :]) == [b"after"]


def test_buffered_protocol_interface_with_small_reads() -> None:
    reader = FrameReader(buffer_size=32)
    payloads = [bytes([i]) * i for i in range(40)]
    stream = b"".join(frame(p) for p in payloads)
    out: list[bytes | bytearray] = []
    pos = 0
    while pos < len(stream):
        buf = reader.get_buffer(-1)
        assert len(buf) > 0
        n = min(len(buf), 7, len(stream) - pos)
        buf[:n] = stream[pos : pos + n]
        pos += n
        out.extend(reader.buffer_updated(n))
    assert out == payloads


payload_lists = st.lists(
    st.one_of(
        st.binary(max_size=40),
        st.binary(min_size=60, max_size=300),
    ),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(
    payloads=payload_lists,
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
    buffer_size=st.sampled_from([8, 16, 64, 65536]),
)
def test_any_chunking_yields_the_same_frames(
    payloads: list[bytes], cuts: list[int], buffer_size: int
) -> None:
    stream = b"".join(frame(p) for p in payloads)
    reader = FrameReader(buffer_size=buffer_size)
    out: list[bytes | bytearray] = []
    for chunk in chunked(stream, cuts):
        out.extend(reader.feed(chunk))
    assert [bytes(p) for p in out] == payloads
    assert reader.buffered == 0


@pytest.mark.parametrize("codec_cls", [codecs.JSON, codecs.MsgPack])
@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(codec_values, min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=5_000), max_size=20),
)
def test_encoded_messages_survive_framing_and_chunking(
    codec_cls: type[codecs.Codec], values: list[Any], cuts: list[int]
) -> None:
    codec = codec_cls()
    messages = [[0, i, v] for i, v in enumerate(values)]
    stream = b"".join(frame(codec.encode(m)) for m in messages)
    reader = FrameReader(buffer_size=32)
    decoded = [
        codec.decode(p) for chunk in chunked(stream, cuts) for p in reader.feed(chunk)
    ]
    assert [as_lists(d) for d in decoded] == as_lists(messages)


def test_header_is_big_endian_uint32() -> None:
    reader = FrameReader()
    data = struct.pack(">L", 3) + b"abc"
    assert reader.feed(data) == [b"abc"]


def test_receive_buffer_is_made_on_the_first_read() -> None:
    """Idle connections cost no receive buffer."""
    reader = FrameReader(buffer_size=4096)
    assert reader.reserved == 0
    buffer = reader.get_buffer()
    assert len(buffer) == 4096
    assert reader.reserved == 4096
    data = frame(b"spam")
    buffer[: len(data)] = data
    assert reader.buffer_updated(len(data)) == [b"spam"]
    assert reader.get_buffer().obj is buffer.obj  # the same buffer, reused
    assert reader.reserved == 4096
    reader.release()
    assert reader.reserved == 0


def test_a_lying_header_reserves_little_memory() -> None:
    """A header that announces 60 MiB and is followed by nothing costs only
    the first slice of the frame's buffer."""
    import tracemalloc

    reader = FrameReader()
    tracemalloc.start()
    try:
        reader.feed(frame_header(60 * 2**20) + b"x" * 100)
        used = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert used < 64 * 2**10 + 512 * 2**10, used
    assert reader.buffered == 4 + 100
    assert reader.reserved == 64 * 2**10 + 256 * 2**10  # shared + first slice


@pytest.mark.parametrize("size", [2**18 - 1, 2**18, 2**18 + 1, 3 * 2**20 + 7])
def test_big_frames_survive_their_buffer_growing(size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    data = frame(payload) + frame(b"next")
    reader = FrameReader()
    received: list[bytes | bytearray] = []
    chunk_sizes = itertools.cycle([1, 7, 4096, 65_536, 300_000])
    pos = 0
    while pos < len(data):
        buffer = reader.get_buffer()
        n = min(len(buffer), next(chunk_sizes), len(data) - pos)
        buffer[:n] = data[pos : pos + n]
        del buffer  # as a transport does: the view is gone before the next read
        pos += n
        received.extend(reader.buffer_updated(n))
    assert [bytes(p) for p in received] == [payload, b"next"]


@pytest.mark.parametrize("sent", [2**18 + 1, 2**19, 2**21 + 1])
def test_a_big_frame_buffer_stays_within_eight_times_what_arrived(sent: int) -> None:
    """Besides the shared buffer and the reused first slice (256 KiB, see
    docs/limits.rst), a big frame in progress holds one buffer, at most 8 times
    what arrived of it."""
    shared, first_slice = 64 * 2**10, 256 * 2**10
    reader = FrameReader(buffer_size=shared)
    reader.feed(frame_header(64 * 2**20) + b"x" * sent)
    assert reader.buffered == HEADER_SIZE + sent  # the frame is in progress
    held_for_frame = reader.reserved - shared - first_slice
    assert sent <= held_for_frame <= 8 * sent


def test_frames_before_a_bad_header_are_returned_first() -> None:
    """The frames that precede a too-large header in the stream count, however
    the stream is cut; the error comes after them."""
    stream = frame(b"one") + frame(b"two") + struct.pack(">L", 1000) + b"x"
    reader = FrameReader(max_frame_size=100)
    assert reader.feed(stream) == [b"one", b"two"]
    assert isinstance(reader.error, ProtocolError)
    assert "exceeds max_frame_size" in str(reader.error)
    with pytest.raises(ProtocolError):
        reader.feed(b"more")
    with pytest.raises(ProtocolError):
        reader.buffer_updated(0)
    # Cut before the bad header, the same frames, then the error.
    reader = FrameReader(max_frame_size=100)
    assert reader.feed(stream[:14]) == [b"one", b"two"]
    assert reader.error is None
    with pytest.raises(ProtocolError):
        reader.feed(stream[14:])


def test_a_bad_header_beyond_the_first_buffer_of_a_feed() -> None:
    """feed() fills the receive buffer several times: frames from the first
    fill are returned, and a bad header in a later one is reported after them."""
    reader = FrameReader(max_frame_size=100, buffer_size=16)
    stream = frame(b"one") + frame(b"two") + struct.pack(">L", 1000) + b"x" * 30
    assert reader.feed(stream) == [b"one", b"two"]
    assert isinstance(reader.error, ProtocolError)


def test_a_frame_larger_than_the_buffer_but_not_big_gets_a_buffer_of_its_size() -> None:
    reader = FrameReader(buffer_size=64)
    payload = bytes(range(200))
    assert reader.feed(frame(payload)[:100]) == []
    assert reader.buffered == 100
    assert reader.feed(frame(payload)[100:]) == [payload]
    assert reader.buffered == 0


def test_big_frames_one_after_another_reuse_the_first_slice() -> None:
    reader = FrameReader()
    first, second = b"a" * 300_000, b"b" * 400_000
    stream = frame(first) + frame(second)
    payloads = []
    for i in range(0, len(stream), 50_000):
        payloads += reader.feed(stream[i : i + 50_000])
    assert payloads == [first, second]
    assert reader.buffered == 0


def test_release_drops_every_buffer_and_the_reader_starts_afresh() -> None:
    """At the end of a connection, release() frees the receive buffer, the
    staging buffer of big frames and a partial big frame; the reader then
    works like a new one."""
    reader = FrameReader()
    big = b"x" * (2 * 2**20)
    assert reader.feed(frame(b"small") + frame(big)[: 2**20]) == [b"small"]
    assert reader.buffered > 0
    reader.release()
    assert reader.buffered == 0
    assert len(reader.get_buffer()) == 64 * 1024  # a new buffer, made on demand
    reader.release()
    assert reader.feed(frame(big)) == [big]


def test_release_after_a_bad_header_forgets_the_error() -> None:
    """release() leaves no trace of the ended stream, its error included: the
    reader behaves in every observable way like a new one."""
    stream = frame(b"one") + struct.pack(">L", 1000) + b"x"
    reader = FrameReader(max_frame_size=100, buffer_size=64)
    assert reader.feed(stream) == [b"one"]
    assert reader.error is not None
    reader.release()
    fresh = FrameReader(max_frame_size=100, buffer_size=64)
    for each in (reader, fresh):
        assert each.error is None
        assert (each.buffered, each.reserved) == (0, 0)
        assert each.max_frame_size == 100
    # Both the lone-frame path through the shared buffer and feed() work again.
    buffer = reader.get_buffer()
    assert len(buffer) == len(fresh.get_buffer()) == 64
    data = frame(b"two")
    buffer[: len(data)] = data
    assert reader.buffer_updated(len(data)) == [b"two"]
    assert reader.feed(frame(b"three") + frame(b"four")) == [b"three", b"four"]
    assert reader.error is None
    # And a new bad header is reported as for a new reader.
    with pytest.raises(ProtocolError, match="exceeds max_frame_size"):
        reader.feed(struct.pack(">L", 1000))
