"""Fuzz target: decoding arbitrary bytes with the codecs and their serializers.

The codecs are set up as a container's connections have them: Arrow dates
(:func:`aiomas.util.arrow_serializer`), a user class (``harness.Point``, made
serializable with :func:`aiomas.codecs.serializable`) and RPC proxies (installed by an
:class:`aiomas.rpc.RpcClient` on a connection without a socket), in that order.
The first input byte picks the codec: JSON, MsgPack, MsgPackBlosc, or
MsgPackBlosc with the chunk size in the Blosc header set to the input's length
(so that the fuzzer gets past that first check and into Blosc itself).  For the
rest of the input, the target checks:

- ``decode()`` returns or raises ``SerializationError``, nothing else;
- ``decode_plain()`` raises nothing but ``Exception`` subclasses; it succeeds
  where ``decode()`` does, and where only ``decode()`` fails, that is because
  of a ``{"__type__": [id, data]}`` map (a deserializer failed);
- a decoded value holds only the documented types (see ``ALLOWED_TYPES``);
- it encodes again (unless it holds a proxy: those cannot be sent back, and
  ``SerializationError`` says so), decodes to an equal value, and encodes to
  the same bytes once more (NaN equals NaN here);
- decoding has no side effects: nothing is sent over the connection whose
  proxy serializer the codec has;
- MsgPackBlosc never decompresses more than its ``max_decompressed_size``: the
  limit is checked on the header, before Blosc allocates anything.

Run it (needs ``pip install atheris``, Linux) on a copy of its seed corpus, as
the fuzzer adds the inputs it finds to the corpus directory::

    cp -r fuzz/corpus/codecs /tmp/codecs
    python fuzz/fuzz_codecs.py -max_len=2048 -max_total_time=3600 /tmp/codecs

The test suite runs it for a bounded number of inputs (tests/test_fuzz.py);
``python fuzz/make_corpus.py`` writes the seed corpus anew.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import atheris

# Only aiomas and Arrow's date parser are instrumented (for coverage feedback):
# instrumenting everything they import would cost seconds at every start.
with atheris.instrument_imports(include=["aiomas", "arrow.parser"]):
    import arrow
    import blosc
    import harness
    import msgpack

    import aiomas
    from aiomas.channel import ChannelProtocol
    from aiomas.codecs import Codec
    from aiomas.exceptions import SerializationError
    from aiomas.rpc import Proxy, RpcClient
    from aiomas.testing import FakeTransport


class Service:
    """The RPC service of the connection whose codec gets the proxy serializer."""

    router = aiomas.rpc.Service()

    @aiomas.expose
    def ping(self) -> str:
        return "pong"


SERVICE = Service()

# Type ids, in the order a container adds the serializers.
ARROW_ID, POINT_ID, PROXY_ID = 0, 1, 2

# Small, so that inputs that fill it up are quick to run; Blosc headers may
# announce anything up to 4 GiB.
BLOSC_LIMIT = 2**16

# The codec JSON in mode 0, MsgPack in mode 1, MsgPackBlosc in modes 2 and 3
# (3: with the chunk size in the header patched, see the module docstring).
MODES = 4
BLOSC_RAW, BLOSC_PATCHED = 2, 3
BLOSC_HEADER_SIZE = 16

# What a decoded value may contain (besides its containers, see ALLOWED_TYPES):
# codecs.rst promises "only the basic types below and the types you registered".
REGISTERED_TYPES: tuple[type, ...] = (harness.Point, arrow.Arrow, Proxy)
SCALAR_TYPES: tuple[type, ...] = (type(None), bool, int, float, str)
# MsgPack decodes msgpack's extension types to these inert value objects
# (documented in docs/codecs.rst).
MSGPACK_EXTENSION_TYPES: tuple[type, ...] = (msgpack.ExtType, msgpack.Timestamp)
ALLOWED_TYPES: dict[type[Codec], frozenset[type]] = {
    aiomas.JSON: frozenset({*SCALAR_TYPES, list, dict, *REGISTERED_TYPES}),
    aiomas.MsgPack: frozenset(
        {
            *SCALAR_TYPES,
            bytes,
            tuple,
            dict,
            *REGISTERED_TYPES,
            *MSGPACK_EXTENSION_TYPES,
        }
    ),
}
ALLOWED_TYPES[aiomas.MsgPackBlosc] = ALLOWED_TYPES[aiomas.MsgPack]


def make_codec(codec_class: type[Codec]) -> Codec:
    """Return a *codec_class* instance with the serializers of a container's
    connection: Arrow dates, harness.Point, and the RPC proxy serializer of a
    connection that serves :data:`SERVICE` (on a fake transport, which is
    then in :data:`TRANSPORTS`)."""
    codec = codec_class()
    codec.add_serializer(*aiomas.util.arrow_serializer())
    codec.add_serializer(*harness.Point.__serializer__())  # type: ignore[attr-defined]

    async def connect() -> RpcClient:
        protocol = ChannelProtocol(codec)
        TRANSPORTS[codec] = FakeTransport(protocol, peername=("fuzzer", 1))
        assert protocol.channel is not None
        return RpcClient(protocol.channel, SERVICE)

    # The connection stays open (its service task waits) while the fuzzer runs.
    CLIENTS.append(harness.LOOP.run_until_complete(connect()))
    return codec


CLIENTS: list[RpcClient] = []
TRANSPORTS: dict[Codec, FakeTransport] = {}
JSON_CODEC = make_codec(aiomas.JSON)
MSGPACK_CODEC = make_codec(aiomas.MsgPack)
BLOSC_CODEC = make_codec(aiomas.MsgPackBlosc)
assert isinstance(BLOSC_CODEC, aiomas.MsgPackBlosc)
BLOSC_CODEC.max_decompressed_size = BLOSC_LIMIT
CODECS = (JSON_CODEC, MSGPACK_CODEC, BLOSC_CODEC, BLOSC_CODEC)


def announced_size(chunk: bytes | bytearray | memoryview) -> int:
    """The decompressed size that the header of a Blosc chunk announces."""
    return int.from_bytes(memoryview(chunk).cast("B")[4:8], "little")


def check_decompressed_size(
    decompress: Callable[..., bytes],
) -> Callable[..., bytes]:
    """Wrap ``blosc.decompress`` to check that the codec never asks for, nor
    gets, more than :data:`BLOSC_LIMIT` bytes."""

    def checked_decompress(chunk: Any, *args: Any, **kwargs: Any) -> bytes:
        announced = announced_size(chunk)
        assert announced <= BLOSC_LIMIT, f"decompressing a {announced} bytes chunk"
        result = decompress(chunk, *args, **kwargs)
        assert len(result) <= BLOSC_LIMIT, f"decompressed {len(result)} bytes"
        return result

    return checked_decompress


# The codec calls blosc.decompress() through the module, so this catches it.
blosc.decompress = check_decompressed_size(blosc.decompress)


def walk(value: Any) -> set[type]:
    """Return the types of everything in *value*.

    Iterative: decoded values may be nested a thousand levels deep.
    """
    types: set[type] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        types.add(type(item))
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):  # (msgpack.ExtType is a tuple)
            stack.extend(item)
        elif isinstance(item, harness.Point):
            stack.extend((item.x, item.y))
    return types


def raised_in_object_hook(error: BaseException) -> bool:
    """Whether *error* was raised in ``Codec.deserialize_obj()`` (an unknown
    type id) or in a deserializer that it called."""
    # (The codec's decoders call a function of its tables, not the method:
    # both are deserialize_obj in aiomas/codecs.py.)
    hook = Codec.deserialize_obj.__code__
    traceback = error.__traceback__
    while traceback is not None:
        code = traceback.tb_frame.f_code
        if code.co_name == hook.co_name and code.co_filename == hook.co_filename:
            return True
        traceback = traceback.tb_next
    return False


def same_float(a: float, b: float) -> bool:
    if math.isnan(a):
        return math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def same(a: Any, b: Any) -> bool:
    """Whether *a* and *b* are equal values of the same types, all the way down
    (NaN equals NaN, -0.0 differs from 0.0, Arrow dates keep their UTC offset).

    Iterative, as :func:`walk`.
    """
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if type(x) is not type(y):
            return False
        if isinstance(x, float):
            if not same_float(x, y):
                return False
        elif isinstance(x, list | tuple):
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y, strict=True))
        elif isinstance(x, dict):
            if len(x) != len(y):
                return False
            stack.extend(zip(x.keys(), y.keys(), strict=True))
            stack.extend(zip(x.values(), y.values(), strict=True))
        elif isinstance(x, harness.Point):
            stack.extend(((x.x, y.x), (x.y, y.y)))
        elif isinstance(x, arrow.Arrow):
            if x != y or x.utcoffset() != y.utcoffset():
                return False
        elif x != y:
            return False
    return True


def check_round_trip(codec: Codec, value: Any, types: set[type]) -> None:
    """*value* (decoded by *codec*) encodes, decodes to an equal value and
    encodes to the same bytes again."""
    try:
        encoded = codec.encode(value)
    except SerializationError:
        # A proxy stands for a service of the peer; it is not sent back.
        assert Proxy in types, "a decoded value does not encode again"
        return
    if codec is BLOSC_CODEC and announced_size(encoded) > BLOSC_LIMIT:
        # Encoding may take more room (e.g. float32 becomes float64), and the
        # decoder must then refuse it.
        try:
            codec.decode(encoded)
        except SerializationError:
            return
        raise AssertionError("decoded a chunk above max_decompressed_size")
    again = codec.decode(encoded)
    assert same(value, again), f"{value!r} came back as {again!r}"
    assert codec.encode(again) == encoded, "encoding is not stable"


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode = data[0] % MODES
    codec = CODECS[mode]
    payload = data[1:]
    if mode == BLOSC_PATCHED and len(payload) >= BLOSC_HEADER_SIZE:
        patched = bytearray(payload)
        patched[12:16] = len(payload).to_bytes(4, "little")
        payload = bytes(patched)
    try:
        value = codec.decode(payload)
        decode_error: SerializationError | None = None
    except SerializationError as exc:
        decode_error = exc
    try:
        codec.decode_plain(payload)
        plain_error: Exception | None = None
    except Exception as exc:  # documented: whatever decoding raises
        plain_error = exc
    if decode_error is None:
        if plain_error is not None:
            # With deserializers, a typed map used as a msgpack map key becomes
            # a hashable object; without them it stays an (unhashable) dict.
            assert codec is not JSON_CODEC, f"decode_plain() failed: {plain_error!r}"
            assert isinstance(plain_error, TypeError), repr(plain_error)
            assert "unhashable" in str(plain_error), repr(plain_error)
        types = walk(value)
        unexpected = types - ALLOWED_TYPES[type(codec)]
        assert not unexpected, f"decoded undocumented types {unexpected}"
        check_round_trip(codec, value, types)
    elif plain_error is None:
        # Only decode() fails: for a typed map (which need not be in the plain
        # value: a duplicate map key may have replaced it), or at the nesting
        # limit (the object hook that decode() calls takes a little more stack).
        assert raised_in_object_hook(decode_error) or isinstance(
            decode_error.__cause__, RecursionError
        ), f"only decode() failed, and not in a deserializer: {decode_error!r}"
    sent = TRANSPORTS[codec].written
    assert not sent, f"decoding sent {bytes(sent)!r} to the peer"
    harness.HIDDEN_ERRORS.check()


def seed_inputs() -> dict[str, bytes]:
    """The seed corpus: encoded values of every kind for each codec."""
    values: dict[str, Any] = {
        "rpc_call": [0, 1, ["agents/0/echo", [1, "two", None], {"key": 2.5}]],
        "scalars": [None, True, False, 0, -1, 2**63 - 1, -(2**63), 1.5, "é€"],
        "special_floats": [math.nan, math.inf, -math.inf, -0.0, 1e308],
        "point": {"at": harness.Point(1, harness.Point(2.5, "x"))},
        "arrow": [arrow.get("2024-02-29T12:30:45.123456+05:30")],
        "proxy_map": {"__type__": [PROXY_ID, "agents/0"]},
        "unknown_type_id": {"__type__": [7, None]},
        "bool_type_id": {"__type__": [True, 1]},
        "almost_typed": {"__type__": [0, 1, 2], "other": 1},
        "nested": [[[[{"a": [{"b": []}]}]]]],
    }
    binary = {
        "bytes": [b"\x00\xff", b""],
        "int_keys": {1: "one", (2, 3): "tuple key"},
    }
    seeds: dict[str, bytes] = {}
    for name, value in values.items():
        seeds[f"json_{name}"] = bytes([0]) + JSON_CODEC.encode(value)
    for name, value in {**values, **binary}.items():
        seeds[f"msgpack_{name}"] = bytes([1]) + MSGPACK_CODEC.encode(value)
        for mode in (BLOSC_RAW, BLOSC_PATCHED):
            seeds[f"blosc{mode}_{name}"] = bytes([mode]) + BLOSC_CODEC.encode(value)
    seeds["blosc2_too_big"] = bytes([BLOSC_RAW]) + BLOSC_CODEC.encode(
        "x" * (2 * BLOSC_LIMIT)
    )
    return seeds


if __name__ == "__main__":
    harness.fuzz(test_one_input)
