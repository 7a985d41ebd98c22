"""Would msgspec make our codecs faster end to end?  An evaluation.

Usage::

    python benchmarks/msgspec_eval.py [--rounds 10] [--turns 4] [--check 2000]

msgspec (``pip install msgspec``, not a dependency of aiomas) encodes a small
RPC frame about 3x faster than msgpack-python.  It can only stand in for our
codecs where it produces the same bytes and the same values, so this script
builds the candidates here, outside the package:

* ``msgspec-safe``: :class:`aiomas.MsgPack` that encodes with msgspec when the
  message holds nothing but exact ``str``/``int`` (64 bits)/``float``/``bool``/
  ``None``/``bytes``/``list``/``tuple``/``dict`` values, found by a walk in
  Python, and with msgpack-python otherwise.  The walk is needed: msgspec encodes
  dataclasses, enums, sets, datetimes and more by itself, never asking the
  codec's serializers (which the reference codec does), calls its hook for
  ``str`` subclasses (which msgpack-python packs as ``str``) and raises for ints
  beyond 64 bits (for which the reference asks the serializers).  Decoding stays
  msgpack-python's: msgspec decodes arrays to lists (our contract: tuples) and
  has no hook for untyped maps (the ``__type__`` maps).
* ``msgspec-bound``: msgspec for every message, without the walk: wrong for the
  types above, but the upper bound of what any msgspec encoder could gain.
* ``json-decode-bound``: :class:`aiomas.JSON` that decodes with msgspec when the
  bytes contain no ``__type__`` and no escape (and with ours otherwise).  An
  upper bound again (msgspec refuses ``NaN`` and reads some numbers otherwise);
  a msgspec JSON *encoder* cannot give our bytes at all: it writes ``[1,2]``
  (we write ``[1, 2]``, as ``json.dumps()``), UTF-8 instead of ``\\u`` escapes,
  and ``1e16`` for ``1e+16``.

``--check N`` compares msgspec-safe's bytes with :class:`aiomas.MsgPack`'s for N
values drawn by hypothesis from the value space of the codec (nested lists,
tuples and dicts of text, bytes, ints of any size, floats, serializable objects
and Arrow dates), and decodes each with the other side.

Then RPC over TCP loopback, both ends in this process, 1 and 100 calls in
flight: each candidate against the reference codec and a second copy of the
reference (the A/A pair), taking turns of 50 ms
(:func:`aiomas.benchmark.take_turns`); it prints medians of calls per second
and of the per-round ratios, with their range.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import types
from collections.abc import Awaitable
from typing import Any

import aiomas
from aiomas.benchmark import Side, library_side, take_turns

try:
    import msgspec
except ImportError:
    sys.exit("This evaluation needs msgspec: pip install msgspec")

SMALL = ["ohai", 42, 3.14]
_PLAIN = frozenset({str, float, bool, type(None), bytes})
_INT64 = range(-(2**63), 2**64)


def plain(obj: Any) -> bool:
    """Whether msgspec encodes *obj* exactly as msgpack-python does, without
    any serializer of ours."""
    kind = type(obj)
    if kind in _PLAIN:
        return True
    if kind is int:
        return obj in _INT64
    if kind is list or kind is tuple:
        return all(map(plain, obj))
    if kind is dict:
        return all(map(plain, obj)) and all(map(plain, obj.values()))
    return False


class MsgspecSafe(aiomas.MsgPack):
    """msgspec for plain messages, msgpack-python for all others."""

    def __init__(self) -> None:
        super().__init__()
        self._fast = msgspec.msgpack.Encoder().encode

    def encode(self, data: Any) -> bytes:
        try:
            fast = plain(data)
        except RecursionError:
            fast = False
        return self._fast(data) if fast else super().encode(data)


class MsgspecBound(aiomas.MsgPack):
    """msgspec for every message (wrong for some types: an upper bound)."""

    def __init__(self) -> None:
        super().__init__()
        self._fast = msgspec.msgpack.Encoder(enc_hook=self.serialize_obj).encode

    def encode(self, data: Any) -> bytes:
        return self._fast(data)


class JsonDecodeBound(aiomas.JSON):
    """msgspec decodes what has no ``__type__`` and no escapes."""

    def __init__(self) -> None:
        super().__init__()
        self._fast = msgspec.json.Decoder().decode

    def decode(self, data: bytes | bytearray | memoryview) -> Any:
        raw = bytes(data)
        if b"__type__" not in raw and b"\\" not in raw:
            try:
                return self._fast(raw)
            except msgspec.DecodeError:
                pass
        return super().decode(raw)


def check(examples: int) -> None:
    """Compare MsgspecSafe with MsgPack on *examples* drawn values."""
    import arrow
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @aiomas.codecs.serializable
    class Point:
        def __init__(self, x: Any, y: Any) -> None:
            self.x, self.y = x, y

    def codecs() -> tuple[aiomas.MsgPack, aiomas.MsgPack]:
        made = MsgspecSafe(), aiomas.MsgPack()
        for codec in made:
            codec.add_serializer(*aiomas.util.arrow_serializer())
            codec.add_serializer(*Point.__serializer__())
        return made

    leaves = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=False)
        | st.text()
        | st.binary()
        | st.datetimes().map(arrow.get)
    )
    values = st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=5)
            | st.tuples(inner, inner)
            | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=5)
            | st.builds(Point, inner, inner)
        ),
        max_leaves=30,
    )
    counts = {"same": 0, "via msgpack-python": 0}

    @settings(max_examples=examples, deadline=None)
    @given(values)
    def same_bytes(value: Any) -> None:
        fast, reference = codecs()
        try:
            expected = reference.encode(value)
        except aiomas.exceptions.SerializationError:
            return  # (ints beyond 64 bits without a serializer fail on both)
        assert fast.encode(value) == expected
        assert repr(fast.decode(expected)) == repr(reference.decode(expected))
        counts["same" if plain(value) else "via msgpack-python"] += 1

    same_bytes()
    print(f"identical bytes for {sum(counts.values())} values ({counts})")


def rpc_side(codec: type[aiomas.codecs.Codec]) -> Awaitable[Side]:
    """RPC over TCP loopback, both ends here, with *codec*."""
    lib = types.SimpleNamespace(
        JSON=codec, MsgPack=codec, rpc=aiomas.rpc, expose=aiomas.expose
    )
    return library_side("rpc", "json", lib)


def band(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f} .. {max(values):.3f})"


async def compare(
    reference: type[aiomas.codecs.Codec],
    candidates: dict[str, type[aiomas.codecs.Codec]],
    rounds: int,
    turns: int,
) -> None:
    for in_flight in (1, 100):
        sides = {"ref": await rpc_side(reference), "ref2": await rpc_side(reference)}
        for name, codec in candidates.items():
            sides[name] = await rpc_side(codec)
        sends = {name: send for name, (send, _) in sides.items()}
        await take_turns(sends, SMALL, in_flight, 1)  # warm up
        rates: dict[str, list[float]] = {side: [] for side in sides}
        for _ in range(rounds):
            result = await take_turns(sends, SMALL, in_flight, turns)
            for side, rate in result.items():
                rates[side].append(rate)
        for _, close in sides.values():
            await close()
        ref = rates["ref"]
        print(
            f"{reference.__name__}, {in_flight} in flight: ref "
            f"{statistics.median(ref):,.0f} calls/s; A/A "
            + band([b / a for a, b in zip(ref, rates["ref2"], strict=True)])
        )
        for name in candidates:
            ratios = [c / a for a, c in zip(ref, rates[name], strict=True)]
            print(
                f"  {name:<18} {statistics.median(rates[name]):>8,.0f} calls/s,"
                f"  vs ref {band(ratios)}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="benchmarks/msgspec_eval.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=10, help="rounds (10)")
    parser.add_argument("--turns", type=int, default=4, help="turns a round (4)")
    parser.add_argument("--check", type=int, default=0, help="values to compare")
    args = parser.parse_args()
    print(
        f"msgspec {msgspec.__version__}, Python {sys.version.split()[0]}, "
        f"{args.rounds} rounds of {args.turns} turns of 50 ms per side"
    )
    if args.check:
        check(args.check)

    async def run() -> None:
        await compare(
            aiomas.MsgPack,
            {"msgspec-safe": MsgspecSafe, "msgspec-bound": MsgspecBound},
            args.rounds,
            args.turns,
        )
        await compare(
            aiomas.JSON,
            {"json-decode-bound": JsonDecodeBound},
            args.rounds,
            args.turns,
        )

    asyncio.run(run())


if __name__ == "__main__":
    main()
