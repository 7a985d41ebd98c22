"""Fuzz target: an agent container's RPC service, as a peer reaches it.

Three containers (JSON, MsgPack, MsgPackBlosc; each with a serializer for a
user class, ``harness.Point``, and the Arrow and proxy serializers that containers add)
serve two ``FuzzAgent`` agents each, on LocalQueues: no socket is opened.  Each
input is one connection to one of them, made with the container server's own
protocol factory on a fake transport.  The first input byte picks the codec
and the mode, the second one the size of the chunks the stream is cut into:

raw mode
    The rest of the input is the byte stream a peer sends.
structured mode
    The rest of the input picks up to four RPC requests (read by
    :class:`Choices`): paths made of real and bogus segments (``agents``,
    agent ids, exposed and unexposed names, ``__class__``, ``_private``,
    ``..``, empty segments, non-strings), arguments and keyword arguments of
    odd types (nested containers, NaN, 64-bit edge values, Points, Arrow dates,
    ``{"__type__": ...}`` maps with good and bad type ids), and malformed calls.
    They are encoded with the container's codec and sent in frames.

For every input the target checks that:

- nothing raises out of the protocol, and nothing fails unseen (an error
  passed to the loop's exception handler or logged at ERROR level);
- no code runs that is not exposed: the agents' unexposed methods, class and
  static methods, property, ``__getattr__`` and ``__call__``, and their
  instance attributes (a function, and objects whose ``__getattr__`` and
  ``__call__`` run code, one of them hiding an exposed method) record it when
  they run; no agent is created or removed;
- the server writes whole frames of replies (never a request: the agents
  call nobody back), and forgets the connection when it is lost;
- in structured mode: every request gets exactly one reply, a request for a
  path that is not exposed gets a failure, and ``validate_aid`` answers right.

Run it (needs ``pip install atheris``, Linux) on a copy of its seed corpus, as
the fuzzer adds the inputs it finds to the corpus directory::

    cp -r fuzz/corpus/container /tmp/container
    python fuzz/fuzz_container.py -max_len=2048 -max_total_time=3600 /tmp/container

The test suite runs it for a bounded number of inputs (tests/test_fuzz.py);
``python fuzz/make_corpus.py`` writes the seed corpus anew.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import atheris

# Only aiomas is instrumented: instrumenting what it imports (asyncio, ssl,
# Arrow, ...) would cost seconds at every start.
with atheris.instrument_imports(include=["aiomas"]):
    import arrow
    import harness

    import aiomas
    from aiomas import wire
    from aiomas.channel import ChannelProtocol, SerializerFactory
    from aiomas.codecs import Codec
    from aiomas.exceptions import SerializationError
    from aiomas.testing import FakeTransport, feed, settle

T = TypeVar("T")

FORBIDDEN_CALLS: list[str] = []
"""What ran although it is not exposed (only recorded once :data:`ARMED`)."""

ARMED = False
"""False while the containers and agents are set up."""


def forbidden(what: str) -> None:
    if ARMED:
        FORBIDDEN_CALLS.append(what)


def trap(what: str) -> Callable[..., None]:
    """A function that records that it was called."""

    def called(*args: Any, **kwargs: Any) -> None:
        forbidden(what)

    return called


class LazyObject:
    """An unexposed attribute value whose attribute lookups run code, as those
    of a lazy proxy or a database object may: neither that code nor the object
    itself may run for a request."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, attr: str) -> Any:
        forbidden(f"{self.name}.__getattr__({attr!r})")
        raise AttributeError(attr)

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        forbidden(f"{self.name}.__call__")


class Helper:
    """A sub-service of the agents (``agents/<id>/helper/...``)."""

    router = aiomas.rpc.Service()

    @aiomas.expose
    def ping(self) -> str:
        return "pong"

    def hidden(self, *args: Any, **kwargs: Any) -> None:
        forbidden("Helper.hidden")


class FuzzAgent(aiomas.Agent):
    """An agent with exposed methods of every kind, and unexposed methods and
    attributes that record it when they run."""

    router = aiomas.rpc.Service(["helper"])

    def __init__(self, container: aiomas.Container) -> None:
        forbidden("FuzzAgent.__init__")  # e.g. through __class__
        super().__init__(container)
        self.helper = Helper()
        self.unexposed_attribute = trap("an unexposed instance attribute")
        self.lazy_object = LazyObject("lazy_object")
        # An instance attribute hiding an exposed method of the class.
        self.shadowed = LazyObject("shadowed")  # type: ignore[method-assign,assignment]
        self.exposed_attribute = aiomas.expose(lambda *args: list(args))

    @aiomas.expose
    def echo(self, *args: Any, **kwargs: Any) -> list[Any]:
        return [args, kwargs]

    @aiomas.expose
    async def later(self, value: Any = None) -> Any:
        await asyncio.sleep(0)
        return value

    @aiomas.expose
    def fail(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError("fails on purpose")

    @aiomas.expose
    @staticmethod
    def static_echo(value: Any = None) -> Any:
        return value

    @classmethod
    @aiomas.expose
    def class_name(cls) -> str:
        return cls.__name__

    @aiomas.expose
    def myself(self) -> FuzzAgent:
        return self  # arrives as a proxy

    @aiomas.expose
    def helper_service(self) -> Helper:
        return self.helper  # arrives as a proxy

    @aiomas.expose
    def shadowed(self) -> str:  # (hidden by an instance attribute, see __init__)
        return "the exposed method that an instance attribute hides"

    def secret(self, *args: Any, **kwargs: Any) -> None:
        forbidden("FuzzAgent.secret")

    def _private(self, *args: Any, **kwargs: Any) -> None:
        forbidden("FuzzAgent._private")

    @staticmethod
    def unexposed_static(*args: Any, **kwargs: Any) -> None:
        forbidden("FuzzAgent.unexposed_static")

    @classmethod
    def unexposed_class(cls, *args: Any, **kwargs: Any) -> None:
        forbidden("FuzzAgent.unexposed_class")

    @property
    def trap_property(self) -> Callable[..., Any]:
        forbidden("FuzzAgent.trap_property (getter)")
        return self.echo  # an exposed method: must still not be reachable

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        forbidden("FuzzAgent.__call__")

    def __getattr__(self, name: str) -> Any:
        forbidden(f"FuzzAgent.__getattr__({name!r})")
        raise AttributeError(name)


AGENT_IDS = ("0", "1")
AGENT_METHODS = (
    "echo",
    "later",
    "fail",
    "static_echo",
    "class_name",
    "myself",
    "helper_service",
    "exposed_attribute",
    "helper/ping",
)
EXPOSED_PATHS = frozenset(
    {"validate_aid"}
    | {f"agents/{aid}/{name}" for aid in AGENT_IDS for name in AGENT_METHODS}
)
"""Every path that reaches code; a request for any other one must fail."""

CODEC_CLASSES: tuple[type[Codec], ...] = (
    aiomas.JSON,
    aiomas.MsgPack,
    aiomas.MsgPackBlosc,
)
MODES = 2 * len(CODEC_CLASSES)  # raw and structured, for each codec


class Served:
    """A container, its agents, and how its server makes a connection."""

    def __init__(self, codec_class: type[Codec]) -> None:
        self.codec_class = codec_class
        queue = aiomas.get_queue(f"fuzz-container-{codec_class.__name__}")
        serializer: SerializerFactory = harness.Point.__serializer__  # type: ignore[attr-defined]
        create = aiomas.Container.create(
            queue, codec=codec_class, extra_serializers=[serializer], as_coro=True
        )
        self.container = harness.LOOP.run_until_complete(create)
        self.agents = [FuzzAgent(self.container) for _ in AGENT_IDS]
        assert [agent.addr.rsplit("/", 1)[1] for agent in self.agents] == list(
            AGENT_IDS
        )
        # The factory that the container's (LocalQueue) server makes the
        # protocol of every new connection with: the codec with the container's
        # serializers, and the RpcClient serving the container.
        server = aiomas.agent.state_of(self.container).server
        assert isinstance(server, aiomas.local_queue.LocalQueueServer)
        self.protocol_factory: Callable[[], ChannelProtocol] = cast(
            Callable[[], ChannelProtocol], server.protocol_factory
        )
        # The peer's codec: the same serializers, and proxies decoded to text.
        self.peer_codec = codec_class()
        self.peer_codec.add_serializer(*aiomas.util.arrow_serializer())
        self.peer_codec.add_serializer(*serializer())
        self.peer_codec.add_serializer(
            object, self._no_proxies, lambda path: f"<proxy {path}>"
        )

    @staticmethod
    def _no_proxies(obj: Any) -> None:
        raise SerializationError(f"the fuzzer sends no {type(obj).__name__}")


SERVED = [Served(codec_class) for codec_class in CODEC_CLASSES]
ARMED = True


class Choices:
    """Reads the choices that make a structured input, a byte at a time (0
    once the input is used up), so that every input makes valid requests."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def byte(self) -> int:
        pos = self._pos
        self._pos += 1
        return self._data[pos] if pos < len(self._data) else 0

    def pick(self, options: Sequence[T]) -> T:
        return options[self.byte() % len(options)]

    def text(self) -> str:
        """Up to 15 bytes of the input as text (invalid UTF-8 replaced)."""
        size = self.byte() % 16
        raw = self._data[self._pos : self._pos + size]
        self._pos += size
        return raw.decode("utf-8", "replace")


TEXT_FROM_INPUT = None  # in SEGMENTS: a segment made of input bytes

SEGMENTS: tuple[str | None, ...] = (
    "agents",
    "0",
    "1",
    *AGENT_METHODS[:-1],
    "helper",
    "ping",
    "hidden",
    "validate_aid",
    "shadowed",
    "secret",
    "unexposed_static",
    "unexposed_class",
    "unexposed_attribute",
    "lazy_object",
    "trap_property",
    "router",
    "container",
    "addr",
    "_private",
    "__class__",
    "__init__",
    "__dict__",
    "__getattr__",
    "__call__",
    "_aiomas_router",
    "..",
    ".",
    "",
    "2",
    "00",
    "-1",
    " 0",
    "AGENTS",
    "echo\x00",
    "ëcho",
    TEXT_FROM_INPUT,
)
NON_STRING_PATHS: tuple[Any, ...] = (None, 0, 1.5, ["agents", "0", "echo"], {"p": 1})
INTS = (0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1, 10**30)
FLOATS = (0.0, -0.0, 1.5, math.nan, math.inf, -math.inf, 1e308, 5e-324)
DATES = (
    arrow.get("2024-02-29T12:30:45.123456+05:30"),
    arrow.Arrow(1, 1, 1),
    arrow.Arrow(9999, 12, 31, 23, 59, 59, 999999),
)
KEYS: tuple[Any, ...] = ("value", "aid", "self", "x", "", "_private", "args", 1)
TYPE_IDS = (0, 1, 2, 3, -1, 2**40)
DEPTHS = (50, 300, 2000)
MAX_DEPTH = 4  # of the lists and dicts that values() builds


def value(choices: Choices, depth: int = 0) -> Any:
    """An argument of some odd type, chosen by *choices*."""
    kind = choices.byte() % 14
    if kind >= 6 and depth >= MAX_DEPTH:
        kind %= 6
    if kind == 0:
        return None
    if kind == 1:
        return bool(choices.byte() & 1)
    if kind == 2:
        return choices.pick(INTS)
    if kind == 3:
        return choices.pick(FLOATS)
    if kind == 4:
        return choices.pick(SEGMENTS) or choices.text()
    if kind == 5:
        return choices.text().encode()  # (JSON cannot send it: request dropped)
    if kind == 6:
        return [value(choices, depth + 1) for _ in range(choices.byte() % 4)]
    if kind == 7:
        return tuple(value(choices, depth + 1) for _ in range(choices.byte() % 4))
    if kind == 8:
        return {
            choices.pick(KEYS): value(choices, depth + 1)
            for _ in range(choices.byte() % 4)
        }
    if kind == 9:
        return harness.Point(value(choices, depth + 1), value(choices, depth + 1))
    if kind == 10:
        return choices.pick(DATES)
    if kind == 11:
        return {"__type__": [choices.pick(TYPE_IDS), value(choices, depth + 1)]}
    if kind == 12:
        nested: list[Any] = []
        for _ in range(choices.pick(DEPTHS)):
            nested = [nested]
        return nested
    return {"__type__": [2, choices.pick(SEGMENTS) or choices.text()]}  # a proxy


def path(choices: Choices) -> Any:
    kind = choices.byte() % 8
    if kind == 0:
        return choices.pick(NON_STRING_PATHS)
    if kind == 1:
        return choices.text()
    segments = [choices.pick(SEGMENTS) for _ in range(choices.byte() % 4 + 1)]
    return "/".join(choices.text() if s is None else s for s in segments)


def call(choices: Choices) -> tuple[Any, Any]:
    """Return the path and the content of an RPC request."""
    call_path = path(choices)
    args = [value(choices) for _ in range(choices.byte() % 4)]
    kwargs = {choices.pick(KEYS): value(choices) for _ in range(choices.byte() % 3)}
    shape = choices.byte() % 8
    if shape == 5:
        return call_path, [call_path, args]
    if shape == 6:
        return call_path, [call_path, kwargs, args]
    if shape == 7:
        return call_path, {"path": call_path}
    return call_path, [call_path, args, kwargs]


MESSAGE_ID_BASES = (0, 1, 2**31, 2**63 - 8, -8)


def structured_stream(
    served: Served, choices: Choices
) -> tuple[bytes, dict[int, tuple[Any, Any]]]:
    """Return the frames of up to four requests and, by message id, the path
    and the content of each."""
    base = choices.pick(MESSAGE_ID_BASES)
    frames = []
    requests = {}
    for msg_id in range(base, base + choices.byte() % 4 + 1):
        call_path, content = call(choices)
        try:
            payload = served.peer_codec.encode([wire.REQUEST, msg_id, content])
        except SerializationError:
            continue  # Not for this codec (bytes in JSON, huge ints, ...).
        frames.append(wire.frame(payload))
        requests[msg_id] = (call_path, content)
    return b"".join(frames), requests


def validate_aid_answer(content: Any) -> tuple[bool, Any]:
    """Whether we know what ``validate_aid`` answers *content*, and what."""
    if not (
        type(content) is list and len(content) == 3 and content[0] == "validate_aid"
    ):
        return False, None
    args, kwargs = content[1], content[2]
    if type(args) not in (list, tuple) or len(args) != 1 or kwargs != {}:
        return False, None
    (aid,) = args
    if type(aid) not in (str, int):
        return type(aid) in (type(None), bool, float), None
    return True, "FuzzAgent" if str(aid) in AGENT_IDS else None


def check_replies(
    served: Served,
    written: bytes,
    requests: dict[int, tuple[Any, Any]] | None,
) -> None:
    """Check what the server wrote; with *requests* (structured mode), also
    that each got one right reply."""
    reader = wire.FrameReader(wire.MAX_FRAME_SIZE)
    payloads = reader.feed(written)
    assert reader.buffered == 0, "the server wrote part of a frame"
    answers: dict[int, list[Any]] = {}
    for payload in payloads:
        try:
            message = served.peer_codec.decode(payload)
        except SerializationError:
            # An echo of something nested as deep as the codec can take is a
            # little deeper: the peer may not decode it.
            assert requests is None, "the server's reply cannot be decoded"
            continue
        assert type(message) in (list, tuple), message
        assert len(message) == 3, message
        msg_type, msg_id, content = message
        assert msg_type in (wire.RESULT, wire.FAILURE), f"server sent {message!r}"
        assert type(msg_id) is int, message
        if msg_type == wire.FAILURE:
            assert isinstance(content, str), f"failure reply {content!r}"
        answers.setdefault(msg_id, []).append((msg_type, content))
    if requests is None:
        return
    assert answers.keys() == requests.keys(), f"answered {answers}, sent {requests}"
    for msg_id, (call_path, content) in requests.items():
        assert len(answers[msg_id]) == 1, f"{content!r} got {answers[msg_id]}"
        [(msg_type, result)] = answers[msg_id]
        if not (isinstance(call_path, str) and call_path in EXPOSED_PATHS):
            assert msg_type == wire.FAILURE, f"{content!r} got result {result!r}"
        known, expected = validate_aid_answer(content)
        if known:
            assert (msg_type, result) == (wire.RESULT, expected), (content, result)


async def serve_one_connection(served: Served, data: bytes) -> None:
    structured = data[0] % MODES >= len(CODEC_CLASSES)
    requests: dict[int, tuple[Any, Any]] | None = None
    if structured:
        stream, requests = structured_stream(served, Choices(data[2:]))
    else:
        stream = data[2:]
    protocol = served.protocol_factory()
    transport = FakeTransport(protocol, peername=("fuzzer", 1))
    feed(protocol, transport, harness.split_stream(data[1:2] + stream))
    await settle(8)  # let exposed coroutines answer
    if structured:
        assert not transport.closed, "the server closed a connection of valid frames"
    check_replies(served, transport.written, requests)
    transport.lose_connection()
    container = served.container
    for _ in range(20):
        if not aiomas.agent.state_of(container).registry.clients:
            break
        await asyncio.sleep(0)
    assert not aiomas.agent.state_of(container).registry.clients, (
        "the container did not forget the connection"
    )


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    served = SERVED[data[0] % len(CODEC_CLASSES)]
    harness.LOOP.run_until_complete(serve_one_connection(served, data))
    assert not FORBIDDEN_CALLS, f"unexposed code ran: {FORBIDDEN_CALLS}"
    assert served.container.agents.dict == dict(
        zip(AGENT_IDS, served.agents, strict=True)
    )
    harness.HIDDEN_ERRORS.check()


def seed_inputs() -> dict[str, bytes]:
    """The seed corpus: in raw mode, calls of every exposed method and of some
    unexposed names; in structured mode, choices that make such calls."""
    seeds: dict[str, bytes] = {}
    calls: dict[str, list[Any]] = {
        "validate_aid": ["validate_aid", ["0"], {}],
        "echo": ["agents/0/echo", [1, "two", [3.5, None]], {"key": True}],
        "later": ["agents/1/later", [], {"value": "soon"}],
        "fail": ["agents/0/fail", [], {}],
        "static_echo": ["agents/0/static_echo", [{"a": 1}], {}],
        "class_name": ["agents/1/class_name", [], {}],
        "myself": ["agents/0/myself", [], {}],
        "helper_ping": ["agents/0/helper/ping", [], {}],
        "helper_service": ["agents/1/helper_service", [], {}],
        "exposed_attribute": ["agents/0/exposed_attribute", [1, 2], {}],
        "shadowed": ["agents/0/shadowed", [], {}],
        "lazy_object": ["agents/1/lazy_object", [], {}],
        "secret": ["agents/0/secret", [], {}],
        "dunder": ["agents/0/__class__", [], {}],
        "dotdot": ["agents/0/../0/echo", [], {}],
        "point": ["agents/0/echo", [harness.Point(1, 2), DATES[0]], {}],
        "proxy_arg": ["agents/0/echo", [{"__type__": [2, "agents/1"]}], {}],
        "bad_type_id": ["agents/0/echo", [{"__type__": [9, 1]}], {}],
    }
    chunk = 7  # byte 1: the chunk size, 8
    for mode, served in enumerate(SERVED):
        name = served.codec_class.__name__.lower()
        for call_name, content in calls.items():
            frames = b"".join(
                wire.frame(served.peer_codec.encode([wire.REQUEST, msg_id, content]))
                for msg_id in (1, 2)
            )
            seeds[f"raw_{name}_{call_name}"] = bytes([mode, chunk]) + frames
    structured = len(CODEC_CLASSES)  # + the codec index: structured mode
    segment = {s: i for i, s in enumerate(SEGMENTS) if s is not None}

    def choices_for(*segments: str, args: Sequence[Sequence[int]] = ()) -> bytes:
        """The choices of one request (message id 0) with the path *segments*
        and the arguments made by the choices in *args*; no keyword arguments,
        a well-formed call."""
        path_choices = [2, len(segments) - 1, *(segment[s] for s in segments)]
        arg_choices = [byte for arg in args for byte in arg]
        return bytes([0, 0, *path_choices, len(args), *arg_choices, 0, 0])

    # Argument choices: a value's kind, then what it is made of (see value()).
    one = [4, segment["1"]]
    point = [9, 2, 5, 3, 3]  # harness.Point(2**63 - 1, nan)
    date = [10, 0]
    bad_typed_map = [11, 3, 0]  # {"__type__": [3, None]}
    requests = {
        "validate_aid": choices_for("validate_aid", args=[one]),
        "echo_point": choices_for("agents", "0", "echo", args=[point, date]),
        "later_date": choices_for("agents", "1", "later", args=[date]),
        "helper_ping": choices_for("agents", "0", "helper", "ping"),
        "secret": choices_for("agents", "1", "secret"),
        "dunder": choices_for("agents", "0", "__class__"),
        "typed_map": choices_for("agents", "0", "static_echo", args=[bad_typed_map]),
    }
    for mode, served in enumerate(SERVED):
        name = served.codec_class.__name__.lower()
        for request_name, request in requests.items():
            seeds[f"structured_{name}_{request_name}"] = (
                bytes([structured + mode, chunk]) + request
            )
    return seeds


if __name__ == "__main__":
    harness.fuzz(test_one_input)
