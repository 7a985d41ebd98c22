"""Tests for aiomas.codecs."""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import dataclasses
import doctest
import gc
import json
import math
import pickle
import struct
import subprocess
import sys
import tracemalloc
import weakref
from typing import Any

import arrow
import blosc
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aiomas
from aiomas.codecs import JSON, Codec, MsgPack, MsgPackBlosc, serializable
from aiomas.exceptions import SerializationError

ALL_CODECS = [JSON, MsgPack, MsgPackBlosc]
MSGPACK_CODECS = [MsgPack, MsgPackBlosc]


class Point:
    def __init__(self, x: Any, y: Any) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Point) or type(other) is not type(self):
            return NotImplemented
        return (self.x, self.y) == (other.x, other.y)

    def __repr__(self) -> str:
        return f"Point({self.x!r}, {self.y!r})"

    __hash__ = None  # type: ignore[assignment]


class SubPoint(Point):
    pass


def point_serializer() -> tuple[type, Any, Any]:
    return Point, lambda p: [p.x, p.y], lambda v: Point(*v)


def as_lists(value: Any) -> Any:
    """Normalise tuples to lists, recursively (JSON cannot tell them apart)."""
    if isinstance(value, list | tuple):
        return [as_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: as_lists(v) for k, v in value.items()}
    if isinstance(value, Point):
        return type(value)(as_lists(value.x), as_lists(value.y))
    return value


def round_trip(codec: Codec, value: Any) -> Any:
    return codec.decode(codec.encode(value))


# The base class and add_serializer().


def test_base_codec_is_abstract() -> None:
    codec = Codec()
    with pytest.raises(NotImplementedError):
        codec.encode(1)
    with pytest.raises(NotImplementedError):
        codec.decode(b"1")


def test_repr_lists_the_extra_types_in_order() -> None:
    codec = JSON()
    assert repr(codec) == str(codec) == "<JSON codec (no extra types)>"
    codec.add_serializer(*point_serializer())
    codec.add_serializer(object, str, str)
    assert repr(codec) == "<JSON codec (Point, object)>"


def test_a_type_gets_one_serializer_only() -> None:
    codec = JSON()
    codec.add_serializer(*point_serializer())
    with pytest.raises(ValueError, match=r"already a serializer.*test_codecs\.Point"):
        codec.add_serializer(*point_serializer())
    # The failed call did not use up a type id.
    codec.add_serializer(SubPoint, lambda p: None, lambda v: None)
    assert codec.encode(SubPoint(1, 2)) == b'{"__type__": [1, null]}'


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
def test_any_hashable_key_takes_a_type_id_but_matches_no_object(
    codec_cls: type[Codec],
) -> None:
    """Code written for the original registers numpy.array (a function) beside
    numpy.ndarray: the entry takes a type id and is never used for encoding."""
    import numpy

    def from_list(data: Any) -> Any:
        return numpy.array(data)

    codec = codec_cls()
    codec.add_serializer(numpy.ndarray, lambda a: a.tolist(), from_list)
    codec.add_serializer(numpy.array, lambda a: a.tolist(), from_list)
    codec.add_serializer("a name", str, str)
    codec.add_serializer(*point_serializer())
    assert codec.serialize_obj(Point(1, 2)) == {"__type__": [3, [1, 2]]}
    assert codec.serialize_obj(numpy.arange(3))["__type__"][0] == 0
    # The function key's id still decodes (with its deserializer).
    decoded = codec.deserialize_obj({"__type__": [1, [4, 5]]})
    assert isinstance(decoded, numpy.ndarray)
    assert decoded.tolist() == [4, 5]
    assert codec.deserialize_obj({"__type__": [2, "x"]}) == "x"
    with pytest.raises(SerializationError, match="No serializer"):
        codec.serialize_obj(lambda: None)  # a function is no instance of the key
    with pytest.raises(ValueError, match=r"already a serializer.*numpy.*array"):
        codec.add_serializer(numpy.array, str, str)
    assert "array" in repr(codec)
    assert "'a name'" in repr(codec)


def test_serializer_keys_must_be_hashable_and_functions_callable() -> None:
    codec = JSON()
    with pytest.raises(TypeError, match="unhashable"):
        codec.add_serializer([Point], str, str)
    with pytest.raises(TypeError, match=r"serialize function.*not callable"):
        codec.add_serializer(Point, None, str)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"deserialize function.*not callable"):
        codec.add_serializer(Point, str, "str")  # type: ignore[arg-type]
    # Failed calls used up no type id.
    codec.add_serializer(*point_serializer())
    assert codec.serialize_obj(Point(1, 2)) == {"__type__": [0, [1, 2]]}


def test_type_ids_follow_registration_order() -> None:
    codec = JSON()
    codec.add_serializer(SubPoint, lambda p: "sub", lambda v: SubPoint(0, 0))
    codec.add_serializer(*point_serializer())
    assert codec.encode(Point(1, 2)) == b'{"__type__": [1, [1, 2]]}'
    assert codec.encode(SubPoint(1, 2)) == b'{"__type__": [0, "sub"]}'
    assert codec.serialize_obj(Point(1, 2)) == {"__type__": [1, [1, 2]]}


def test_codec_instances_do_not_share_serializers() -> None:
    first, second = JSON(), JSON()
    first.add_serializer(*point_serializer())
    second.add_serializer(*point_serializer())  # no "already registered" error
    with pytest.raises(SerializationError):
        JSON().encode(Point(1, 2))


# Base types.


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -1,
        -(2**63),
        2**64 - 1,
        1.5,
        -0.0,
        1e308,
        math.inf,
        -math.inf,
        "",
        "spam \u00e9 \u2603 \U0001f600 \x00",
        [],
        [1, [2, [3]]],
        {},
        {"a": {"b": [1, 2.5, "c", None]}, "": [{}]},
    ],
)
def test_base_types_round_trip(codec_cls: type[Codec], value: Any) -> None:
    decoded = round_trip(codec_cls(), value)
    assert as_lists(decoded) == value
    assert type(decoded) is type(value) or isinstance(value, list)


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
def test_decode_accepts_any_bytes_like(codec_cls: type[Codec]) -> None:
    codec = codec_cls()
    data = codec.encode([1, "two"])
    for form in (data, bytearray(data), memoryview(data)):
        assert as_lists(codec.decode(form)) == [1, "two"]


def test_json_decodes_tuples_and_lists_to_lists() -> None:
    assert round_trip(JSON(), (1, (2, 3), [4])) == [1, [2, 3], [4]]


@pytest.mark.parametrize("codec_cls", MSGPACK_CODECS)
def test_msgpack_decodes_tuples_and_lists_to_tuples(codec_cls: type[Codec]) -> None:
    assert round_trip(codec_cls(), [1, (2, 3), [4]]) == (1, (2, 3), (4,))
    assert round_trip(codec_cls(), {"a": [1]}) == {"a": (1,)}


def test_json_output_is_json_dumps() -> None:
    codec = JSON()
    assert codec.encode(["spam", 3.14]) == b'["spam", 3.14]'
    assert codec.encode({"a": [1, None, True]}) == b'{"a": [1, null, true]}'
    assert codec.encode("\u00e9\U0001f600") == b'"\\u00e9\\ud83d\\ude00"'
    assert codec.encode([math.nan, math.inf]) == b"[NaN, Infinity]"
    assert codec.encode((1, 2)) == b"[1, 2]"


def test_json_special_floats_and_big_ints() -> None:
    codec = JSON()
    values = round_trip(codec, [math.inf, -math.inf, math.nan, 2**200, -(2**200)])
    assert values[:2] == [math.inf, -math.inf]
    assert math.isnan(values[2])
    assert values[3:] == [2**200, -(2**200)]


@pytest.mark.parametrize("codec_cls", MSGPACK_CODECS)
def test_msgpack_bytes_and_non_str_keys(codec_cls: type[Codec]) -> None:
    codec = codec_cls()
    assert round_trip(codec, b"\x00\xff") == b"\x00\xff"
    assert round_trip(codec, [b"", bytearray(b"ab")]) == (b"", b"ab")
    # Old peers send maps with integer keys.
    assert round_trip(codec, {1: "one", -2: b"x", None: 1.5}) == {
        1: "one",
        -2: b"x",
        None: 1.5,
    }
    assert round_trip(codec, math.nan) != round_trip(codec, math.nan)


def test_msgpack_output_is_plain_msgpack() -> None:
    value = {"a": [1, -2, 2**40, 1.5, "é", b"\x00", None, True, (1, 2)]}
    assert MsgPack().encode(value) == msgpack.packb(value, use_bin_type=True)


# Encoding errors: the caller passed something the codec cannot represent.


def test_json_cannot_encode_bytes() -> None:
    with pytest.raises(SerializationError, match=r'"builtins\.bytes".*add_serializer'):
        JSON().encode(b"x")


@pytest.mark.parametrize("data", [b"x", bytearray(b"x"), memoryview(b"x")])
def test_json_bytes_error_suggests_msgpack(data: Any) -> None:
    with pytest.raises(SerializationError) as info:
        JSON().encode({"blob": data})
    message = str(info.value)
    assert "JSON cannot encode bytes" in message
    assert "codec=aiomas.MsgPack on both sides" in message
    assert "Codec.add_serializer()" in message


def test_no_serializer_error_names_the_fixes() -> None:
    class Unknown:
        pass

    with pytest.raises(SerializationError) as info:
        JSON().encode([Unknown()])
    message = str(info.value)
    assert "Unknown" in message
    assert "Codec.add_serializer()" in message
    assert "@aiomas.codecs.serializable" in message


def _circular() -> list[Any]:
    value: list[Any] = [1]
    value.append(value)
    return value


def _deeply_nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("codec_cls", "value"),
    [
        (JSON, {(1, 2): "tuple key"}),
        (JSON, _circular()),
        pytest.param(JSON, 10**5000, id="JSON-int-with-5001-digits"),
        (JSON, _deeply_nested(100_000)),
        (JSON, {1j}),
        (MsgPack, 2**64),
        (MsgPack, -(2**63) - 1),
        (MsgPack, _deeply_nested(100_000)),
        (MsgPack, {"a": {1j}}),
        (MsgPackBlosc, 2**64),
        (MsgPackBlosc, object()),
    ],
)
def test_unencodable_values_raise_serialization_error(
    codec_cls: type[Codec], value: Any
) -> None:
    codec = codec_cls()
    with pytest.raises(SerializationError) as info:
        codec.encode(value)
    assert len(str(info.value)) < 500  # the quoted message is abbreviated
    # The codec is still usable afterwards.
    assert as_lists(round_trip(codec, [1, "x"])) == [1, "x"]


@pytest.mark.parametrize("codec_cls", MSGPACK_CODECS)
def test_packer_is_reusable_after_a_failure(codec_cls: type[Codec]) -> None:
    codec = codec_cls()
    for bad in ([1, 2, object()], [b"x" * 100, 2**70], _deeply_nested(2000)):
        with pytest.raises(SerializationError):
            codec.encode(bad)
        # Nothing of the failed message leaks into the next one.
        assert codec.decode(codec.encode([3])) == (3,)
    assert MsgPack().encode([3]) == b"\x91\x03"


@pytest.mark.parametrize("codec_cls", [JSON, MsgPack])
def test_decoding_goes_on_after_a_failure(codec_cls: type[Codec]) -> None:
    """A message that does not decode leaves nothing behind for the next one,
    and the errors say what is wrong."""

    class Boom(Exception):
        pass

    codec = codec_cls()

    def deserialize(value: Any) -> Any:
        if value == "boom":
            raise Boom
        return value

    codec.add_serializer(Boom, lambda obj: "boom", deserialize)
    good = codec.encode([1, "x"])
    for bad, expected in [
        (good + good, "ExtraData" if codec_cls is MsgPack else "Extra data"),
        (good[:-1], "Cannot decode"),
        (b"\xc1" if codec_cls is MsgPack else b"[1, 2", "Cannot decode"),
    ]:
        with pytest.raises(SerializationError, match=expected):
            codec.decode(bad)
        assert as_lists(codec.decode(good)) == [1, "x"]
    with pytest.raises(SerializationError, match="Deserializing type id 0 failed"):
        codec.decode(codec.encode([Boom()]))
    assert as_lists(codec.decode(good)) == [1, "x"]
    # Other codecs of the thread are not disturbed either.
    assert as_lists(codec_cls().decode(good)) == [1, "x"]


def test_a_json_serializer_may_fail_to_encode_with_its_own_codec() -> None:
    """A serializer that encodes with the codec that is encoding it, and gives
    up on a failure, leaves the outer message intact (the encoder's record of
    the containers it is in belongs to the outer call)."""
    codec = JSON()

    class Wrapped:
        pass

    def serialize(obj: Wrapped) -> str:
        try:
            codec.encode([object()])
        except SerializationError:
            return "fallback"
        raise AssertionError("unreachable")

    codec.add_serializer(Wrapped, serialize, lambda value: value)
    inner: list[Any] = [1]
    assert codec.decode(codec.encode([inner, {"w": [Wrapped()]}, inner])) == [
        [1],
        {"w": ["fallback"]},
        [1],
    ]
    with pytest.raises(SerializationError, match="Circular reference"):
        codec.encode(_circular())


def test_json_decodes_whitespace_around_the_value_as_json_loads_does() -> None:
    codec = JSON()
    for text in [b' [1, "a"]', b'[1, "a"]\n', b'\t[1,"a"] ']:
        assert codec.decode(text) == json.loads(text) == [1, "a"]
    with pytest.raises(SerializationError, match="Expecting value"):
        codec.decode(b"  ")


def test_json_finds_circular_references_after_a_failure() -> None:
    """The encoder keeps the containers it is in while it encodes; a failed
    call must not leave them behind (or a later message would look circular)."""
    codec = JSON()
    inner: list[Any] = [1]
    for _ in range(3):
        with pytest.raises(SerializationError):
            codec.encode([inner, {"a": inner}, object()])
        assert codec.encode([inner, {"a": inner}]) == b'[[1], {"a": [1]}]'
    with pytest.raises(SerializationError, match="Circular reference"):
        codec.encode(_circular())


def test_msgpack_codecs_do_not_keep_big_buffers_each() -> None:
    """All MsgPack codecs of a thread share one packer: 500 connections that
    each sent a 1 MiB message hold about 2 MiB, not 500 times that."""
    codecs = [MsgPack() for _ in range(500)]
    message = [1, 2, b"x" * 2**20]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for codec in codecs:
            codec.encode(message)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 4 * 2**20


def test_a_msgpack_subclass_with_other_packer_options_keeps_its_own_packer() -> None:
    class SingleFloat(MsgPack):
        def _new_packer(self, default: Any = None) -> Any:
            return msgpack.Packer(
                default=self.serialize_obj if default is None else default,
                use_bin_type=True,
                use_single_float=True,
            )

    single, double = SingleFloat(), MsgPack()
    assert len(single.encode(1.5)) == 5  # float32
    assert len(double.encode(1.5)) == 9  # float64, not the subclass' packer
    assert len(single.encode(1.5)) == 5


def test_msgpack_codecs_in_several_threads() -> None:
    """Each thread packs with its own packer and its own codecs' serializers."""

    class Tagged:
        def __init__(self, n: int) -> None:
            self.n = n

    def encode_many(tag: str) -> list[bytes]:
        codec = MsgPack()
        codec.add_serializer(Tagged, lambda t: f"{tag}{t.n}", lambda d: d)
        return [
            codec.encode([i, Tagged(i), b"y" * (i % 7) * 50_000]) for i in range(200)
        ]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(encode_many, "abcd"))
    reader = MsgPack()
    reader.add_serializer(Tagged, lambda t: t, lambda d: d)
    for tag, encoded in zip("abcd", results, strict=True):
        for i, data in enumerate(encoded):
            assert reader.decode(data) == (i, f"{tag}{i}", b"y" * (i % 7) * 50_000)


def test_serializable_classes_accept_only_a_dict_of_attributes() -> None:
    """Found by fuzzing: a peer sent a proxy where the attributes of a Point
    belong, and ``Point(**proxy)`` called ``proxy.keys()``: a request to the
    peer, made while decoding."""

    @serializable
    class Point:
        def __init__(self, x: int, y: int) -> None:
            self.x, self.y = x, y

    called: list[str] = []

    class Greedy:
        def __getattr__(self, name: str) -> Any:
            called.append(name)
            return lambda *args: []

    codec = JSON()
    codec.add_serializer(*Point.__serializer__())
    codec.add_serializer(Greedy, lambda g: None, lambda data: Greedy())
    with pytest.raises(SerializationError, match="expects a map of attributes"):
        codec.decode(b'{"__type__": [0, {"__type__": [1, null]}]}')
    assert called == []
    assert codec.decode(b'{"__type__": [0, {"x": 1, "y": 2}]}').y == 2
    assert Point.__fromdict__(collections.OrderedDict(x=3, y=4)).x == 3  # type: ignore[attr-defined]


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
def test_serializers_may_use_the_codec_themselves(codec_cls: type[Codec]) -> None:
    """A serializer that encodes a part of the message itself (with the same
    codec, so while that codec is encoding) must not corrupt the message."""
    codec = codec_cls()

    class Envelope:
        def __init__(self, payload: Any) -> None:
            self.payload = payload

    def serialize(env: Envelope) -> Any:
        data = codec.encode(env.payload)
        return data if codec_cls is not JSON else data.decode()

    def deserialize(data: Any) -> Envelope:
        return Envelope(codec.decode(data if codec_cls is not JSON else data.encode()))

    codec.add_serializer(Envelope, serialize, deserialize)
    decoded = round_trip(codec, [1, Envelope([7, Envelope("x")]), 2])
    assert as_lists(decoded[0::2]) == [1, 2]
    inner = decoded[1].payload
    assert as_lists(inner[0]) == 7
    assert inner[1].payload == "x"
    with pytest.raises(SerializationError):
        codec.encode(Envelope(object()))
    assert as_lists(round_trip(codec, [3])) == [3]


# Extra serializers.


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
def test_extra_serializers_nest(codec_cls: type[Codec]) -> None:
    codec = codec_cls()
    codec.add_serializer(*point_serializer())
    value = {"p": Point(1, Point(2, 3)), "l": [Point("a", None)]}
    decoded = codec.decode(codec.encode(value))
    assert decoded["p"] == Point(1, Point(2, 3))
    assert as_lists(decoded["l"]) == [Point("a", None)]


@pytest.mark.parametrize(("codec_cls", "sequence"), [(JSON, list), (MsgPack, tuple)])
def test_deserializers_get_the_decoded_form(
    codec_cls: type[Codec], sequence: type
) -> None:
    codec = codec_cls()
    seen = []

    def deserialize(value: Any) -> Any:
        seen.append(value)
        return Point(*value)

    codec.add_serializer(Point, lambda p: (p.x, p.y), deserialize)
    assert round_trip(codec, Point(1, 2)) == Point(1, 2)
    assert type(seen[0]) is sequence


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
def test_serializers_apply_to_exact_types_only(codec_cls: type[Codec]) -> None:
    codec = codec_cls()
    codec.add_serializer(*point_serializer())
    with pytest.raises(SerializationError, match=r"tests\.test_codecs\.SubPoint"):
        codec.encode(SubPoint(1, 2))


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
def test_object_serializer_is_the_fallback(codec_cls: type[Codec]) -> None:
    codec = codec_cls()
    codec.add_serializer(*point_serializer())
    codec.add_serializer(object, lambda o: type(o).__name__, lambda v: f"was {v}")
    assert round_trip(codec, SubPoint(1, 2)) == "was SubPoint"
    assert round_trip(codec, Point(1, 2)) == Point(1, 2)
    assert codec.serialize_obj(SubPoint(1, 2)) == {"__type__": [1, "SubPoint"]}


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
def test_failing_serializers(codec_cls: type[Codec]) -> None:
    codec = codec_cls()
    codec.add_serializer(Point, lambda p: 1 / 0, lambda v: 1 / 0)
    codec.add_serializer(SubPoint, lambda p: "ok", lambda v: {}["missing"])
    with pytest.raises(SerializationError, match="ZeroDivisionError") as info:
        codec.encode([Point(1, 2)])
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    data = codec.encode([SubPoint(1, 2)])
    with pytest.raises(SerializationError, match="KeyError") as info:
        codec.decode(data)
    assert isinstance(info.value.__cause__, KeyError)
    # The codec still works afterwards.
    assert as_lists(round_trip(codec, [1])) == [1]


def test_serialization_errors_from_serializers_pass_unchanged() -> None:
    error = SerializationError("my own message")

    def fail(value: Any) -> Any:
        raise error

    codec = JSON()
    codec.add_serializer(Point, fail, fail)
    with pytest.raises(SerializationError) as info:
        codec.encode(Point(1, 2))
    assert info.value is error
    with pytest.raises(SerializationError) as info:
        codec.decode(b'{"__type__": [0, 1]}')
    assert info.value is error


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
def test_a_serializer_that_returns_its_input_fails_cleanly(
    codec_cls: type[Codec],
) -> None:
    codec = codec_cls()
    codec.add_serializer(object, lambda obj: obj, lambda v: v)
    with pytest.raises(SerializationError):
        codec.encode(Point(1, 2))


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
@pytest.mark.parametrize("type_id", [0, 5, -1])
def test_unknown_type_id_on_decode(codec_cls: type[Codec], type_id: int) -> None:
    sender, receiver = codec_cls(), codec_cls()
    sender.add_serializer(object, lambda o: type_id, lambda v: v)
    data = sender.encode({"__type__": [type_id, "data"]})
    with pytest.raises(SerializationError, match=rf"Unknown type id {type_id}\b"):
        receiver.decode(data)


@pytest.mark.parametrize(
    "text",
    [
        b'{"__type__": "x"}',
        b'{"__type__": [true, 1]}',
        b'{"__type__": [0.0, 1]}',
        b'{"__type__": [0, 1], "other": 1}',
        b'{"__type__": [0]}',
        b'{"__type__": [0, 1, 2]}',
        b'{"__type__": {"0": 1}}',
    ],
)
def test_maps_that_only_look_like_extra_types_stay_maps(text: bytes) -> None:
    codec = JSON()
    codec.add_serializer(object, str, lambda v: pytest.fail("must not be called"))
    assert codec.decode(text) == json.loads(text)


# Decoding errors: the peer sent bytes that are not a valid message.


@pytest.mark.parametrize(
    ("codec_cls", "data"),
    [
        (JSON, b'["\xff"]'),  # not UTF-8
        (JSON, b'"\xed\xa0\x80"'),  # an encoded surrogate is not UTF-8 either
        (JSON, b"\xef\xbb\xbf[]"),  # a byte order mark
        (JSON, b"[1, 2"),
        (JSON, b"[1] 2"),
        (JSON, b""),
        (JSON, b"{1: 2}"),
        (JSON, b"1" * 5000),  # more digits than str-to-int allows
        (JSON, b"[" * 100_000 + b"]" * 100_000),
        (JSON, b'{"a": ' * 100_000 + b"1" + b"}" * 100_000),
        (MsgPack, b""),
        (MsgPack, b"\xc1"),  # a reserved type byte
        (MsgPack, b"\x93\x01"),  # truncated
        (MsgPack, b"\x01\x02"),  # extra data
        (MsgPack, b"\xa1\xff"),  # not UTF-8
        (MsgPack, b"\x81\x80\x01"),  # an unhashable map key
        (MsgPack, b"\xdd\xff\xff\xff\xff"),  # a huge array in five bytes
        (MsgPack, b"\x91" * 100_000 + b"\x90"),
        (MsgPackBlosc, b""),
        (MsgPackBlosc, b"short"),
        (MsgPackBlosc, bytes(64)),
        (MsgPackBlosc, b"\x91\x01"),  # msgpack, but not compressed
    ],
)
def test_bad_input_raises_serialization_error(
    codec_cls: type[Codec], data: bytes
) -> None:
    with pytest.raises(SerializationError):
        codec_cls().decode(data)


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
def test_decode_refuses_text(codec_cls: type[Codec]) -> None:
    with pytest.raises(SerializationError):
        codec_cls().decode("[1]")  # type: ignore[arg-type]


# Blosc.


def test_blosc_header_layout_matches_the_installed_blosc() -> None:
    """MsgPackBlosc reads sizes from the header before decompressing; make sure
    the layout it assumes is the one the installed Blosc writes."""
    for size in (0, 1, 100, 10_000, 2**20):
        packed = msgpack.packb(b"ab" * size)
        # Not compared with blosc.compress(): with several threads, Blosc may
        # order its output differently from call to call.
        chunk = MsgPackBlosc().encode(b"ab" * size)
        version, _, _, typesize, nbytes, _, cbytes = struct.unpack_from(
            "<BBBBIII", chunk
        )
        assert (version, typesize) == (2, 8)
        assert nbytes == len(packed)
        assert cbytes == len(chunk)
        assert blosc.decompress(chunk) == packed


def test_blosc_compresses_large_messages() -> None:
    codec = MsgPackBlosc()
    big = b"x" * 2**20
    data = codec.encode(big)
    assert len(data) < len(big) // 10
    assert codec.decode(data) == big
    numbers = list(range(2**17))  # about 1 MiB packed
    assert codec.decode(codec.encode(numbers)) == tuple(numbers)


def _with_nbytes(chunk: bytes, nbytes: int) -> bytes:
    return chunk[:4] + struct.pack("<I", nbytes) + chunk[8:]


def test_blosc_refuses_bombs_before_decompressing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert MsgPackBlosc.max_decompressed_size == 256 * 2**20
    chunk = MsgPackBlosc().encode(b"x" * 10_000)
    codec = MsgPackBlosc()
    codec.max_decompressed_size = 1000
    monkeypatch.setattr(blosc, "decompress", lambda data: pytest.fail("called"))
    with pytest.raises(SerializationError, match="Refusing to decompress 100"):
        codec.decode(chunk)
    with pytest.raises(SerializationError, match="max_decompressed_size is 268435456"):
        MsgPackBlosc().decode(_with_nbytes(chunk, 256 * 2**20 + 1))
    with pytest.raises(SerializationError, match="Refusing"):
        MsgPackBlosc().decode(_with_nbytes(chunk, 2**32 - 1))


def test_blosc_refuses_an_inconsistent_header() -> None:
    codec = MsgPackBlosc()
    chunk = codec.encode(list(range(1000)))
    for bad in (chunk[:-1], chunk + b"\x00", chunk[:15], chunk[:16]):
        with pytest.raises(SerializationError, match="Cannot decode Blosc"):
            codec.decode(bad)
    # A header that claims less than the chunk holds.
    with pytest.raises(SerializationError):
        codec.decode(_with_nbytes(chunk, 10))
    assert codec.decode(chunk) == tuple(range(1000))


def test_blosc_refuses_what_blosc_cannot_compress(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(blosc, "MAX_BUFFERSIZE", 100)
    codec = MsgPackBlosc()
    codec.encode(b"x" * 90)
    with pytest.raises(SerializationError, match="too large for Blosc"):
        codec.encode(b"x" * 100)


@settings(max_examples=150, deadline=None)
@given(
    chunk=st.sampled_from(
        [
            blosc.compress(msgpack.packb(value), typesize=8)
            for value in (list(range(300)), "x" * 3000, {"a": b"y" * 2000}, "short")
        ]
    ),
    changes=st.lists(
        st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=4
    ),
    cut=st.integers(min_value=0, max_value=50),
)
def test_corrupted_blosc_chunks_raise_serialization_error(
    chunk: bytes, changes: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(chunk[: len(chunk) - cut])
    for position, byte in changes:
        if data:
            data[position % min(len(data), 32 if position % 2 else len(data))] = byte
    try:
        MsgPackBlosc().decode(data)
    except SerializationError:
        pass


# Optional packages.


@pytest.mark.parametrize(
    ("module", "codec_cls", "extra"),
    [
        ("msgpack", MsgPack, "mp"),
        ("msgpack", MsgPackBlosc, "mpb"),
        ("blosc", MsgPackBlosc, "mpb"),
    ],
)
def test_missing_optional_packages_name_the_extra(
    monkeypatch: pytest.MonkeyPatch, module: str, codec_cls: type[Codec], extra: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(
        ImportError, match=rf"{module} package: pip install 'aiomas\[{extra}\]'"
    ) as info:
        codec_cls()
    assert isinstance(info.value.__cause__, ImportError)


def test_missing_blosc_does_not_affect_msgpack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "blosc", None)
    assert round_trip(MsgPack(), [1]) == (1,)


def test_importing_aiomas_needs_no_msgpack() -> None:
    code = (
        "import sys; sys.modules['msgpack'] = None; sys.modules['blosc'] = None\n"
        "import aiomas, aiomas.codecs; print(aiomas.JSON().encode([1]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert out.stdout.strip() == "b'[1]'"


# The serializable decorator.

SPEC_EXAMPLE = """
>>> import aiomas.codecs
>>>
>>> @aiomas.codecs.serializable
... class A:
...     def __init__(self, x, y):
...         self.x = x
...         self._y = y
...
...     @property
...     def y(self):
...         return self._y
>>>
>>> codec = aiomas.codecs.JSON()
>>> codec.add_serializer(*A.__serializer__())
>>> a = codec.decode(codec.encode(A(1, 2)))
>>> a
A(x=1, y=2)
"""


def test_serializable_spec_example() -> None:
    test = doctest.DocTestParser().get_doctest(SPEC_EXAMPLE, {}, "spec", None, 0)
    runner = doctest.DocTestRunner()
    runner.run(test)
    assert runner.summarize(verbose=False) == (0, 6)


def test_serializable_methods() -> None:
    @serializable
    class A:
        def __init__(self, x: Any, y: Any = 2) -> None:
            self.x = x
            self._y = y

        @property
        def y(self) -> Any:
            return self._y

    a = A(1, [2])
    assert a.__asdict__() == {"x": 1, "y": [2]}  # type: ignore[attr-defined]
    b = A.__fromdict__({"x": 3, "y": 4})  # type: ignore[attr-defined]
    assert (type(b), b.x, b.y) == (A, 3, 4)
    assert A.__serializer__()[0] is A  # type: ignore[attr-defined]
    assert repr(a) == "A(x=1, y=[2])"
    assert A.__repr__.__qualname__.endswith("A.__repr__")
    # __serializer__ is the factory that extra_serializers expects.
    codec = MsgPack()
    for factory in [A.__serializer__]:  # type: ignore[attr-defined]
        codec.add_serializer(*factory())
    assert repr(round_trip(codec, [A("s", A(None))])) == "(A(x='s', y=A(x=None, y=2)),)"


def test_serializable_without_repr_and_with_keyword_only_args() -> None:
    @serializable(repr=False)
    class B:
        def __init__(self, a: str, *, b: str = "bee") -> None:
            self.a, self.b = a, b

    assert "object at 0x" in repr(B("x"))
    codec = MsgPack()
    codec.add_serializer(*B.__serializer__())  # type: ignore[attr-defined]
    b = round_trip(codec, [B("x", b="y")])[0]
    assert (b.a, b.b) == ("x", "y")
    assert aiomas.serializable is serializable


def test_serializable_with_positional_only_args() -> None:
    @serializable
    class C:
        def __init__(self, a: int, /, b: int) -> None:
            self.a, self.b = a, b

    attrs = {"a": 1, "b": 2}
    assert repr(C.__fromdict__(attrs)) == "C(a=1, b=2)"  # type: ignore[attr-defined]
    assert attrs == {"a": 1, "b": 2}
    codec = JSON()
    codec.add_serializer(*C.__serializer__())  # type: ignore[attr-defined]
    assert repr(round_trip(codec, C(3, b=4))) == "C(a=3, b=4)"


def test_serializable_looks_at_init_not_new() -> None:
    @serializable
    class D:
        def __new__(cls, *args: Any, **kwargs: Any) -> D:
            return super().__new__(cls)

        def __init__(self, value: int) -> None:
            self.value = value

    assert repr(D(1)) == "D(value=1)"


def test_serializable_without_init() -> None:
    @serializable
    class E:
        pass

    codec = JSON()
    codec.add_serializer(*E.__serializer__())  # type: ignore[attr-defined]
    assert codec.encode(E()) == b'{"__type__": [0, {}]}'
    assert repr(round_trip(codec, E())) == "E()"


def test_serializable_keeps_methods_the_class_defines() -> None:
    @serializable
    class F:
        def __init__(self, when: float) -> None:
            self.when = when

        def __repr__(self) -> str:
            return "<F>"

        def __asdict__(self) -> dict[str, Any]:
            return {"when": str(self.when)}

    @serializable
    @dataclasses.dataclass
    class G:
        x: int
        y: str = "why"

    assert repr(F(1.5)) == "<F>"
    codec = JSON()
    codec.add_serializer(*F.__serializer__())  # type: ignore[attr-defined]
    codec.add_serializer(*G.__serializer__())  # type: ignore[attr-defined]
    assert codec.encode(F(1.5)) == b'{"__type__": [0, {"when": "1.5"}]}'
    assert round_trip(codec, G(1)) == G(1)
    assert (
        repr(G(1))
        == "test_serializable_keeps_methods_the_class_defines.<locals>.G(x=1, y='why')"
    )


def test_serializable_repr_of_an_object_that_contains_itself() -> None:
    @serializable
    class Node:
        def __init__(self, children: list[Any]) -> None:
            self.children = children

    node = Node([])
    node.children.append(node)
    assert repr(node) == "Node(children=[...])"


@pytest.mark.parametrize("signature", ["*args", "**kwargs", "a, *args, b"])
def test_serializable_refuses_var_args(signature: str) -> None:
    namespace: dict[str, Any] = {}
    exec(f"class H:\n    def __init__(self, {signature}): pass", namespace)
    name = signature.split(", ")[1] if "," in signature else signature
    with pytest.raises(TypeError, match=rf"parameter \{name} of H\.__init__"):
        serializable(namespace["H"])


def test_serializable_needs_attributes_named_like_the_parameters() -> None:
    @serializable(repr=False)
    class K:
        def __init__(self, value: int) -> None:
            self._value = value

    codec = JSON()
    codec.add_serializer(*K.__serializer__())  # type: ignore[attr-defined]
    with pytest.raises(SerializationError, match="value") as info:
        codec.encode(K(1))
    assert isinstance(info.value.__cause__, AttributeError)


def test_serializable_refuses_unexpected_fields_on_decode() -> None:
    @serializable
    class L:
        def __init__(self, a: int) -> None:
            self.a = a

    codec = JSON()
    codec.add_serializer(*L.__serializer__())  # type: ignore[attr-defined]
    with pytest.raises(SerializationError) as info:
        codec.decode(b'{"__type__": [0, {"a": 1, "evil": 2}]}')
    assert isinstance(info.value.__cause__, TypeError)


# Property tests.

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
)


def containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(inner, max_size=5)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    )


values = st.recursive(scalars, containers, max_leaves=25)


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
@settings(max_examples=80, deadline=None)
@given(value=values)
def test_any_value_round_trips(codec_cls: type[Codec], value: Any) -> None:
    assert as_lists(round_trip(codec_cls(), value)) == as_lists(value)


@settings(max_examples=80, deadline=None)
@given(
    value=st.recursive(scalars | st.floats() | st.integers(), containers, max_leaves=25)
)
def test_json_is_byte_compatible_with_json_dumps(value: Any) -> None:
    assert JSON().encode(value) == json.dumps(value).encode()


@settings(max_examples=80, deadline=None)
@given(value=st.recursive(scalars | st.binary(), containers, max_leaves=25))
def test_msgpack_is_byte_compatible_with_msgpack(value: Any) -> None:
    codec = MsgPack()
    assert codec.encode(value) == msgpack.packb(value, use_bin_type=True)
    assert as_lists(codec.decode(codec.encode(value))) == as_lists(value)


@settings(max_examples=80, deadline=None)
@given(value=values)
def test_extra_types_round_trip_anywhere(value: Any) -> None:
    for codec_cls in ALL_CODECS:
        codec = codec_cls()
        codec.add_serializer(*point_serializer())
        message = {"v": Point(value, [Point(1, value)]), "w": [value, Point(0, 0)]}
        assert as_lists(round_trip(codec, message)) == as_lists(message)


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_never_raise_anything_but_serialization_error(
    data: bytes,
) -> None:
    for codec_cls in ALL_CODECS:
        codec = codec_cls()
        codec.add_serializer(*point_serializer())
        try:
            codec.decode(data)
        except SerializationError:
            pass


@pytest.mark.parametrize("codec_cls", [JSON, MsgPack, MsgPackBlosc])
def test_decode_plain_leaves_custom_types_as_maps(codec_cls: type[Codec]) -> None:
    sender = codec_cls()
    sender.add_serializer(*aiomas.util.arrow_serializer())
    data = sender.encode([0, 3, arrow.get("2016-01-01T00:00:00+00:00")])
    receiver = codec_cls()  # knows no custom types
    with pytest.raises(SerializationError, match="Unknown type id 0"):
        receiver.decode(data)
    message = receiver.decode_plain(data)
    assert list(message[:2]) == [0, 3]
    assert list(message[2]["__type__"]) == [0, "2016-01-01T00:00:00+00:00"]


def test_decode_plain_is_optional_for_codecs() -> None:
    with pytest.raises(NotImplementedError):
        Codec().decode_plain(b"[]")


class _OwnHooks(JSON):
    """Overrides both hooks: its encoder and decoder must call them."""

    def serialize_obj(self, obj: Any) -> dict[str, Any]:
        return {"own": super().serialize_obj(obj)}

    def deserialize_obj(self, obj_repr: dict[Any, Any]) -> Any:
        if "own" in obj_repr:  # (what it holds was decoded already)
            return ("own", obj_repr["own"])
        return super().deserialize_obj(obj_repr)


@pytest.mark.parametrize("codec_cls", [*ALL_CODECS, _OwnHooks])
def test_a_codec_is_freed_without_the_garbage_collector(
    codec_cls: type[Codec],
) -> None:
    """No reference cycle keeps a codec (there is one per connection): its
    encoder and decoder hooks don't hold it, and it is freed on its last
    reference, with the garbage collector off."""
    codec = codec_cls()
    codec.add_serializer(complex, lambda c: [c.real, c.imag], lambda d: complex(*d))
    decoded = codec.decode(codec.encode([1j, {"k": 2}]))
    if codec_cls is _OwnHooks:
        assert decoded == [("own", 1j), {"k": 2}]
    else:
        assert decoded in ([1j, {"k": 2}], (1j, {"k": 2}))
    ref = weakref.ref(codec)
    enabled = gc.isenabled()
    gc.disable()
    try:
        del codec
        assert ref() is None
    finally:
        if enabled:
            gc.enable()


# Copies, pickling and hooks set on an instance (the originals' codecs were
# plain objects, and code written for them may rely on that).


class _OwnMsgPackHooks(MsgPack):
    def serialize_obj(self, obj: Any) -> dict[str, Any]:
        return {"own": super().serialize_obj(obj)}


def _complex_to_list(c: complex) -> list[float]:
    return [c.real, c.imag]


def _list_to_complex(parts: Any) -> complex:
    return complex(*parts)


def _with_complex(codec_cls: type[Codec]) -> Codec:
    codec = codec_cls()
    codec.add_serializer(complex, _complex_to_list, _list_to_complex)
    return codec


@pytest.mark.parametrize("codec_cls", [*ALL_CODECS, _OwnHooks, _OwnMsgPackHooks])
@pytest.mark.parametrize("make_copy", [copy.copy, copy.deepcopy])
def test_a_copy_of_a_codec_works_on_its_own(
    codec_cls: type[Codec], make_copy: Any
) -> None:
    original = _with_complex(codec_cls)
    message = [1j, {"k": 2}]
    expected = original.encode(message)
    duplicate = make_copy(original)
    ref = weakref.ref(original)
    del original
    gc.collect()
    assert ref() is None
    assert duplicate.encode(message) == expected
    assert as_lists(duplicate.decode(expected)) == as_lists(
        _with_complex(codec_cls).decode(expected)
    )


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
def test_a_shallow_copy_shares_the_serializers_and_a_deep_one_does_not(
    codec_cls: type[Codec],
) -> None:
    original = codec_cls()
    shallow, deep = copy.copy(original), copy.deepcopy(original)
    shallow.add_serializer(complex, _complex_to_list, _list_to_complex)
    assert original.decode(shallow.encode([1j])) in ([1j], (1j,))
    assert repr(original) == repr(shallow)
    with pytest.raises(SerializationError):
        deep.encode([1j])


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
def test_a_codec_survives_pickling(codec_cls: type[Codec]) -> None:
    codec = _with_complex(codec_cls)
    if isinstance(codec, MsgPackBlosc):
        codec.max_decompressed_size = 1000
    clone = pickle.loads(pickle.dumps(codec))
    assert type(clone) is codec_cls
    assert clone.encode([2j]) == codec.encode([2j])
    assert as_lists(clone.decode(codec.encode([2j]))) == [2j]
    if isinstance(clone, MsgPackBlosc):
        assert clone.max_decompressed_size == 1000


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
def test_hooks_set_on_an_instance_are_used(codec_cls: type[Codec]) -> None:
    codec = codec_cls()
    seen: list[Any] = []

    def serialize_obj(obj: Any) -> dict[str, Any]:
        return {"z": [obj.real, obj.imag]}

    def deserialize_obj(obj_repr: dict[Any, Any]) -> Any:
        seen.append(obj_repr)
        return complex(*obj_repr["z"]) if "z" in obj_repr else obj_repr

    codec.serialize_obj = serialize_obj  # type: ignore[method-assign]
    codec.deserialize_obj = deserialize_obj  # type: ignore[method-assign]
    data = codec.encode([3j, {"k": 1}])
    assert as_lists(codec.decode(data)) == [3j, {"k": 1}]
    assert len(seen) == 2
    del codec.serialize_obj, codec.deserialize_obj
    with pytest.raises(SerializationError, match="complex"):
        codec.encode([3j])
    assert as_lists(codec.decode(data)) == [{"z": [0.0, 3.0]}, {"k": 1}]
    assert len(seen) == 2


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
def test_replaced_serializer_tables_are_used(codec_cls: type[Codec]) -> None:
    """A subclass may set the serializer tables itself (one that starts from
    another codec's, say): the hooks follow."""
    source = _with_complex(codec_cls)
    codec = codec_cls()
    codec._serializers = dict(source._serializers)  # noqa: SLF001
    codec._deserializers = list(source._deserializers)  # noqa: SLF001
    assert as_lists(codec.decode(codec.encode([4j]))) == [4j]
