"""Tests for aiomas.codecs."""

from __future__ import annotations

import math
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aiomas
from aiomas.codecs import JSON, Codec, MsgPack, MsgPackBlosc, serializable
from aiomas.exceptions import SerializationError

from .helpers import as_lists, codec_values

ALL_CODECS = [JSON, MsgPack, MsgPackBlosc]


class Point:
    def __init__(self, x: Any, y: Any) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)

    __hash__ = None  # type: ignore[assignment]


class SubPoint(Point):
    pass


def point_serializer() -> tuple[type, Any, Any]:
    return Point, lambda p: [p.x, p.y], lambda v: Point(*v)


def test_base_codec_is_abstract() -> None:
    codec = Codec()
    with pytest.raises(NotImplementedError):
        codec.encode(1)
    with pytest.raises(NotImplementedError):
        codec.decode(b"1")


def test_json_output_is_json_dumps() -> None:
    codec = JSON()
    assert codec.encode(["spam", 3.14]) == b'["spam", 3.14]'
    assert codec.encode({"a": [1, None, True]}) == b'{"a": [1, null, true]}'
    assert codec.encode("\u00e9") == b'"\\u00e9"'
    assert codec.encode(float("nan")) == b"NaN"


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -(2**63),
        2**64 - 1,
        1.5,
        -0.0,
        "",
        "spam \u00e9 \u2603 \U0001f600",
        [],
        [1, [2, [3]]],
        {},
        {"a": {"b": [1, 2.5, "c", None]}},
    ],
)
def test_base_types_round_trip(codec_cls: type[Codec], value: Any) -> None:
    codec = codec_cls()
    assert as_lists(codec.decode(codec.encode(value))) == value


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
def test_decode_accepts_any_bytes_like(codec_cls: type[Codec]) -> None:
    codec = codec_cls()
    data = codec.encode([1, "two"])
    for form in (data, bytearray(data), memoryview(data)):
        assert as_lists(codec.decode(form)) == [1, "two"]


def test_json_decodes_tuples_to_lists_and_msgpack_to_tuples() -> None:
    assert JSON().decode(JSON().encode((1, (2, 3)))) == [1, [2, 3]]
    assert MsgPack().decode(MsgPack().encode([1, [2, 3]])) == (1, (2, 3))


def test_json_special_floats() -> None:
    codec = JSON()
    values = codec.decode(codec.encode([math.inf, -math.inf, math.nan]))
    assert values[:2] == [math.inf, -math.inf]
    assert math.isnan(values[2])


@pytest.mark.parametrize("codec_cls", [MsgPack, MsgPackBlosc])
def test_msgpack_bytes_and_int_keys(codec_cls: type[Codec]) -> None:
    codec = codec_cls()
    assert codec.decode(codec.encode(b"\x00\xff")) == b"\x00\xff"
    # Old peers send maps with integer keys.
    assert codec.decode(codec.encode({1: "one"})) == {1: "one"}


def test_json_cannot_encode_bytes() -> None:
    with pytest.raises(SerializationError, match=r"builtins\.bytes"):
        JSON().encode(b"x")


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
def test_extra_serializers(codec_cls: type[Codec]) -> None:
    codec = codec_cls()
    codec.add_serializer(*point_serializer())
    value = {"p": Point(1, Point(2, 3)), "l": [Point("a", None)]}
    decoded = codec.decode(codec.encode(value))
    assert decoded["p"] == Point(1, Point(2, 3))
    assert as_lists(decoded["l"]) == [Point("a", None)]


def test_wire_form_of_extra_types() -> None:
    codec = JSON()
    codec.add_serializer(SubPoint, lambda p: "sub", lambda v: SubPoint(0, 0))
    codec.add_serializer(*point_serializer())
    assert codec.encode(Point(1, 2)) == b'{"__type__": [1, [1, 2]]}'
    assert codec.encode(SubPoint(1, 2)) == b'{"__type__": [0, "sub"]}'


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
    assert codec.decode(codec.encode(SubPoint(1, 2))) == "was SubPoint"
    assert codec.decode(codec.encode(Point(1, 2))) == Point(1, 2)


def test_a_type_gets_one_serializer_only() -> None:
    codec = JSON()
    codec.add_serializer(*point_serializer())
    with pytest.raises(ValueError, match="already a serializer"):
        codec.add_serializer(*point_serializer())


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
def test_failing_serializers(codec_cls: type[Codec]) -> None:
    codec = codec_cls()
    codec.add_serializer(Point, lambda p: 1 / 0, lambda v: 1 / 0)
    codec.add_serializer(SubPoint, lambda p: "ok", lambda v: 1 / 0)
    with pytest.raises(SerializationError, match="ZeroDivisionError") as info:
        codec.encode([Point(1, 2)])
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    data = codec.encode([SubPoint(1, 2)])
    with pytest.raises(SerializationError, match="ZeroDivisionError"):
        codec.decode(data)
    # The codec still works afterwards.
    assert as_lists(codec.decode(codec.encode([1]))) == [1]


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
def test_unknown_type_id_on_decode(codec_cls: type[Codec]) -> None:
    sender, receiver = codec_cls(), codec_cls()
    sender.add_serializer(*point_serializer())
    with pytest.raises(SerializationError, match="Unknown type id 0"):
        receiver.decode(sender.encode(Point(1, 2)))


def test_maps_that_only_look_like_extra_types_stay_maps() -> None:
    codec = JSON()
    for text in [
        b'{"__type__": "x"}',
        b'{"__type__": [true, 1]}',
        b'{"__type__": [0, 1], "other": 1}',
        b'{"__type__": [0]}',
    ]:
        assert isinstance(codec.decode(text), dict)


@pytest.mark.parametrize("codec_cls", [MsgPack, MsgPackBlosc])
def test_packer_is_reusable_after_a_failure(codec_cls: type[Codec]) -> None:
    codec = codec_cls()
    with pytest.raises(SerializationError):
        codec.encode([1, 2, object()])
    assert codec.decode(codec.encode([3])) == (3,)


@pytest.mark.parametrize(
    ("codec_cls", "data"),
    [
        (JSON, b'["\xff"]'),
        (JSON, b"[1, 2"),
        (JSON, b""),
        (JSON, b"[" * 100_000 + b"]" * 100_000),
        (MsgPack, b"\xc1"),
        (MsgPack, b"\x93\x01"),
        (MsgPack, b"\x91" * 100_000 + b"\x90"),
        (MsgPackBlosc, b"short"),
        (MsgPackBlosc, bytes(64)),
    ],
)
def test_bad_input_raises_serialization_error(
    codec_cls: type[Codec], data: bytes
) -> None:
    with pytest.raises(SerializationError):
        codec_cls().decode(data)


def test_blosc_compresses_and_refuses_bombs() -> None:
    codec = MsgPackBlosc()
    big = b"x" * 2**20
    data = codec.encode(big)
    assert len(data) < len(big) // 10
    assert codec.decode(data) == big
    small = MsgPackBlosc()
    small.max_decompressed_size = 1000
    with pytest.raises(SerializationError, match="Refusing to decompress"):
        small.decode(data)
    truncated = data[:-1]
    with pytest.raises(SerializationError):
        codec.decode(truncated)


@pytest.mark.parametrize(
    ("module", "codec_cls", "extra"),
    [("msgpack", MsgPack, "mp"), ("blosc", MsgPackBlosc, "mpb")],
)
def test_missing_optional_packages_name_the_extra(
    monkeypatch: pytest.MonkeyPatch, module: str, codec_cls: type[Codec], extra: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=rf"pip install 'aiomas\[{extra}\]'"):
        codec_cls()


def test_importing_aiomas_needs_no_msgpack() -> None:
    import subprocess

    code = (
        "import sys; sys.modules['msgpack'] = None; sys.modules['blosc'] = None\n"
        "import aiomas; print(aiomas.JSON().encode([1]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "b'[1]'"


def test_repr() -> None:
    codec = JSON()
    assert repr(codec) == "<JSON codec (no extra types)>"
    codec.add_serializer(*point_serializer())
    assert repr(codec) == "<JSON codec (Point)>"


# The serializable decorator.


def test_serializable_spec_example() -> None:
    @serializable
    class A:
        def __init__(self, x: int, y: int) -> None:
            self.x = x
            self._y = y

        @property
        def y(self) -> int:
            return self._y

    codec = JSON()
    codec.add_serializer(*A.__serializer__())  # type: ignore[attr-defined]
    a = codec.decode(codec.encode(A(1, 2)))
    assert repr(a) == "A(x=1, y=2)"
    assert a.__asdict__() == {"x": 1, "y": 2}
    assert isinstance(A.__fromdict__({"x": 3, "y": 4}), A)  # type: ignore[attr-defined]


def test_serializable_without_repr_and_with_keyword_only_args() -> None:
    @serializable(repr=False)
    class B:
        def __init__(self, a: str, *, b: str = "bee") -> None:
            self.a, self.b = a, b

    assert "object at 0x" in repr(B("x"))
    codec = MsgPack()
    codec.add_serializer(*B.__serializer__())  # type: ignore[attr-defined]
    b = codec.decode(codec.encode([B("x", b="y")]))[0]
    assert (b.a, b.b) == ("x", "y")
    assert aiomas.serializable is serializable


def test_serializable_refuses_var_args() -> None:
    with pytest.raises(TypeError, match=r"\*\*kwargs"):

        @serializable
        class C:
            def __init__(self, **kwargs: Any) -> None:
                pass


# Property tests.


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
@settings(max_examples=80, deadline=None)
@given(value=codec_values)
def test_any_value_round_trips(codec_cls: type[Codec], value: Any) -> None:
    codec = codec_cls()
    assert as_lists(codec.decode(codec.encode(value))) == value


@settings(max_examples=80, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_never_raise_anything_but_serialization_error(
    data: bytes,
) -> None:
    for codec_cls in ALL_CODECS:
        try:
            codec_cls().decode(data)
        except SerializationError:
            pass
