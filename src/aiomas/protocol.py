"""The aiomas message protocol as a state machine, free of I/O.

A :class:`Connection` is one end of a connection.  Push the bytes that arrive
into it (:meth:`Connection.receive_data`, or the zero-copy pair
:meth:`~Connection.get_buffer` / :meth:`~Connection.buffer_updated`) and it
returns what they mean as events (frozen dataclasses).  Tell it what to send
(:meth:`~Connection.send_request`, :meth:`~Connection.send_result`,
:meth:`~Connection.send_failure`) and take the bytes from
:meth:`~Connection.data_to_send`.  It never touches a socket, an event loop or
a clock, so it can be tested and fuzzed byte by byte.

It owns everything about messages: message ids and which of ours wait for a
reply, decoding and validating ``[msg_type, msg_id, content]``, answering
malformed and undecodable requests itself, holding requests back while the
peer does not read its replies (and refusing them beyond a limit), the budget
of unread failure replies, and the text of every failure reply.  Framing is
:mod:`aiomas.wire`'s.

Events are made one at a time, as they are asked for (h11's ``next_event()``
pattern, as an iterator): what the consumer does with one event (answering a
request may fill the write buffer) counts for the next.  A protocol violation
by the peer ends the connection: the core yields a :class:`ProtocolViolation`
event and ignores everything it receives afterwards.
"""

from __future__ import annotations

import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final, NoReturn, TypeAlias

from aiomas._compiled import is_compiled, mypyc_attr
from aiomas.codecs import JSON, Codec, MsgPack, MsgPackBlosc
from aiomas.exceptions import DecodeError, ProtocolError, SerializationError
from aiomas.wire import (
    DEFAULT_MAX_FRAME_SIZE,
    FAILURE,
    HEADER,
    HEADER_SIZE,
    REQUEST,
    RESULT,
    FrameReader,
    frame_header,
)

__all__ = [
    "COMPILED",
    "JOINED_WRITE_LIMIT",
    "JOIN_LIMIT",
    "MAX_HELD_REQUESTS",
    "MAX_UNREAD_FAILURE_BYTES",
    "Connection",
    "Event",
    "FailureReceived",
    "ProtocolViolation",
    "ReplyUndecodable",
    "RequestReceived",
    "RequestRejected",
    "ResultReceived",
    "abbreviate",
    "failure_text",
    "format_exception",
]
# The wire extension (see "Extension 1" in docs/wire-format.rst).
__all__ += [
    "CANCEL",
    "EXTENSIONS_PATH",
    "EXTENSIONS_VERSION",
    "EXTENSION_FEATURES",
    "REQUEST_WITH_META",
    "CancelReceived",
    "ExtendedRequestReceived",
]

MAX_HELD_REQUESTS: Final = 1024
"""Requests held back while the peer does not read its replies; more are
refused with a failure reply."""

MAX_UNREAD_FAILURE_BYTES: Final = 2**20
"""Failure replies that the core itself sends (to malformed, undecodable or
refused requests) while writing is paused: beyond this many bytes the peer is
cut off."""

EXTENSIONS_VERSION: Final = 1
"""The version of the wire extension this core speaks."""

EXTENSION_FEATURES: Final = frozenset({"cancel", "deadline", "trace"})
"""The features of the wire extension this core supports."""

EXTENSIONS_PATH: Final = "__aiomas__/extensions"
"""The reserved RPC path of the extension probe: a peer that does not know
the extension answers a call to it with a failure reply."""

REQUEST_WITH_META: Final = 3
"""Message type of a request with metadata, ``[3, id, [content, meta]]``
(features ``"deadline"`` and ``"trace"``)."""

_META_FEATURES: Final = frozenset({"deadline", "trace"})

CANCEL: Final = 4
"""Message type of a cancel, ``[4, id, null]``: the requester gave up on its
request *id* (feature ``"cancel"``)."""

JOIN_LIMIT: Final = 64 * 1024
"""Payloads above this size are not copied once more just to prepend four
bytes: only their first :data:`BIG_PAYLOAD_LEAD` bytes go with the header,
and the rest is handed out as a chunk of its own (never joined with other
frames)."""
BIG_PAYLOAD_LEAD: Final = 16 * 1024
"""The bytes of a big payload that go with its header (see :data:`JOIN_LIMIT`).

Not the header alone: a write of a few bytes ahead of a big one made 1 MiB
round trips on TCP loopback 30 % slower (2026-12-04, every loop and Python
measured), and copying 16 KiB is cheap."""
JOINED_WRITE_LIMIT: Final = 256 * 1024
"""Small frames are joined into chunks of up to this many bytes."""
# The table of requests waiting for replies is made afresh when it is empty and
# at least this many requests were sent since it was made.
_FRESH_PENDING_AFTER: Final = 64


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """The peer sent a request; answer it with :meth:`Connection.send_result`
    or :meth:`Connection.send_failure`."""

    message_id: int
    content: Any


@dataclass(frozen=True, slots=True)
class ResultReceived:
    """The peer answered our request *message_id* with *content*; *token* is
    what :meth:`Connection.send_request` got for it."""

    message_id: int
    content: Any
    token: Any = None


@dataclass(frozen=True, slots=True)
class FailureReceived:
    """The peer answered our request *message_id* with a failure; *text* is
    its description (a traceback, for aiomas peers).  *token*: see
    :class:`ResultReceived`."""

    message_id: int
    text: str
    token: Any = None


@dataclass(frozen=True, slots=True)
class ReplyUndecodable:
    """The reply to our request *message_id* is well-formed, but its content
    cannot be deserialized (e.g. an unknown custom type id).  *token*: see
    :class:`ResultReceived`."""

    message_id: int
    error: DecodeError
    token: Any = None


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """The core answered request *message_id* with a failure itself.

    *reason* is ``"undecodable"`` (its content cannot be deserialized),
    ``"malformed"`` (not ``[0, id, content]``) or ``"refused"`` (too many
    requests wait while the peer does not read its replies; reported once per
    such flood).
    """

    message_id: int
    reason: str
    text: str


@dataclass(frozen=True, slots=True)
class ExtendedRequestReceived:
    """The peer sent a request with metadata (only after the extension was
    agreed); answer it like a :class:`RequestReceived`.

    *deadline* is the time left for it in seconds, as the peer sent it
    (relative: the hosts' clocks differ), or ``None``; *meta* is all of the
    request's metadata (keys this side does not know included).
    """

    message_id: int
    content: Any
    deadline: float | None
    meta: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CancelReceived:
    """The peer gave up on its request *message_id* (only after the extension
    was agreed): stop working on it and send no reply.  *held* says whether
    the core dropped it from the requests it held back (it never reached the
    consumer then)."""

    message_id: int
    held: bool = False


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The peer broke the protocol: close the connection.  Nothing received
    afterwards is looked at."""

    error: ProtocolError


Event: TypeAlias = (
    RequestReceived
    | ResultReceived
    | FailureReceived
    | ReplyUndecodable
    | RequestRejected
    | ProtocolViolation
    | ExtendedRequestReceived
    | CancelReceived
)
"""What :meth:`Connection.events` yields."""

_Chunk: TypeAlias = "bytes | bytearray | memoryview"

_pack_header = HEADER.pack
_SEQUENCES: Final = (list, tuple)  # what codecs decode a message to

COMPILED: Final = is_compiled(__file__)
"""Whether this module is the compiled build's (docs/performance.rst, "The
compiled build"), not plain Python."""

# The two events of every call are made as instances of a twin class without
# the frozen dataclass' __setattr__ (so setting their slots is as cheap as it
# gets), which then become what they are: a frozen dataclass' __init__ sets
# each field through object.__setattr__(), which cost a third of the core's
# time per message.  The twins have the same slots, so the layouts match.
# (Compiled, the events are native classes, whose instances cannot change
# class, and cheap to make as they are.)


class _NewRequestReceived:
    __slots__ = RequestReceived.__slots__
    message_id: int
    content: Any


class _NewResultReceived:
    __slots__ = ResultReceived.__slots__
    message_id: int
    content: Any
    token: Any


_NOT_PENDING: Final = object()


class _LateReply(Exception):
    """A reply to a request that we cancelled or that was answered already:
    dropped without an event."""


def _valid_features(value: Any) -> frozenset[str] | None:
    """The feature names in *value* (a list of strings), or ``None``."""
    if type(value) not in _SEQUENCES or len(value) > 64:
        return None
    if not all(type(name) is str and len(name) <= 64 for name in value):
        return None
    return frozenset(value)


def _valid_deadline(meta: dict[Any, Any]) -> float | None:
    """The ``"deadline"`` of request metadata *meta*.

    Raises:
        ValueError: if it is not a finite number of seconds >= 0.
    """
    value = meta.get("deadline")
    if value is None:
        return None
    if type(value) not in (int, float) or not 0 <= value < float("inf"):
        raise ValueError(f"invalid deadline {abbreviate(value)}")
    try:
        return float(value)
    except OverflowError:  # (a JSON integer beyond any float)
        raise ValueError(f"invalid deadline {abbreviate(value)}") from None


def format_exception(exc: BaseException) -> str:
    """The text of a failure reply for *exc*: its traceback (if it was raised)
    and the error."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def failure_text(content: Any) -> str:
    """Turn the content of a received failure reply into readable text.

    aiomas peers send a string.  Other peers (e.g. mosaik 3) send a list such as
    ``[type, message, *traceback_lines]``; anything else is shown by its repr.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list | tuple) and all(isinstance(c, str) for c in content):
        return "\n".join(content)
    return repr(content)


def _codec_hint(payload: bytes | bytearray, codec: Codec) -> str:
    """Say so if *payload*, which *codec* cannot decode, looks like a message
    of another codec (a peer with the wrong codec sends nothing else)."""
    head = bytes(payload[:16])
    if head.startswith(b"["):
        guess = "JSON"
    elif head.startswith(b"\x93"):  # a msgpack array of 3
        guess = "MsgPack"
    elif (  # A Blosc header: format 2, typesize 8, the frame's size.
        len(head) == 16
        and head[0] == 2
        and head[3] == 8
        and int.from_bytes(head[12:], "little") == len(payload)
    ):
        guess = "MsgPackBlosc"
    else:
        return ""
    ours = (
        "MsgPackBlosc"
        if isinstance(codec, MsgPackBlosc)
        else "MsgPack"
        if isinstance(codec, MsgPack)
        else "JSON"
        if isinstance(codec, JSON)
        else type(codec).__name__
    )
    if guess == ours:
        return ""  # Our own format, garbled.
    return (
        f" (it looks like {guess}, but this side uses {ours}: both sides must "
        "use the same codec)"
    )


def abbreviate(obj: Any, limit: int = 80) -> str:
    """``repr(obj)``, cut to *limit* characters."""
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@mypyc_attr(allow_interpreted_subclasses=True)
class Connection:
    """One end of an aiomas connection, as a state machine.

    Args:
        codec: The codec instance of this connection.
        max_frame_size: The largest payload accepted from the peer; a larger
            frame is a protocol violation, found before anything is allocated
            for it.

    Raises:
        ValueError: if *max_frame_size* is not in 0...2**32 - 1.
    """

    __slots__ = (
        "_decode",
        "_discarded",
        "_encode",
        "_extensions",
        "_held",
        "_next_id",
        "_out",
        "_payloads",
        "_pending_since",
        "_reader",
        "_refusing",
        "_taken",
        "_unread_failure_bytes",
        "_writing_paused",
        "bytes_to_send",
        "closed",
        "codec",
        "frames_waiting",
        "get_buffer",
        "hold_requests",
        "on_data",
        "on_request",
        "on_request_with_meta",
        "on_result",
        "pending",
        "received_size",
        "sent_size",
    )

    def __init__(
        self, codec: Codec, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    ) -> None:
        self.codec = codec
        """The codec that encodes and decodes this connection's messages."""
        self._encode: Callable[[Any], bytes] = codec.encode
        self._decode: Callable[[Any], Any] = codec.decode
        self._reader = reader = FrameReader(max_frame_size)
        self.get_buffer = reader.get_buffer
        """``get_buffer(sizehint=-1)``: return a buffer to read the next bytes
        into; then call :meth:`buffer_updated` (the
        :class:`asyncio.BufferedProtocol` way)."""
        # Received frames whose events nobody asked for yet (see events()).
        self._payloads: list[bytes | bytearray] = []
        self._taken = 0  # of them, already looked at
        self.frames_waiting = 0
        """Received frames whose events have not been asked for yet (see
        :meth:`events`).  Read it; don't set it."""
        self._next_id = 0
        # Ids of our requests that wait for a reply.  An id stays here until its
        # reply arrives or the connection ends, even if the caller gave up on
        # it (unless a cancel was sent), so that a late reply is told from a
        # reply to a request never sent; an id below _next_id that is not here
        # (nor discarded) was answered, and another reply for it is dropped
        # (as is a reply for an id whose request could not be encoded: only a
        # peer that makes ids up sends one, and it harms nobody).
        self.pending: dict[int, Any] = {}
        """The tokens of our requests that wait for a reply, by message id
        (see :meth:`send_request`).  Read it; don't change it."""
        self._pending_since = 0  # _next_id when pending was made
        # Ids below _next_id that never left (see discard_request()); made
        # when the first one is discarded.
        self._discarded: set[int] | None = None
        self._out: list[_Chunk] = []
        self.bytes_to_send = 0
        """Bytes waiting in :meth:`data_to_send` (read it; don't set it)."""
        self._writing_paused = False
        self.hold_requests = False
        """Hold requests back while writing is paused (see
        :meth:`next_held_request`); for a user of the connection that answers
        every request as it arrives, as RPC does.  Otherwise requests are
        always passed on, and whoever reads them controls the pace."""
        # Made when the first request is held: most connections never hold
        # one, and there may be thousands of connections.
        self._held: deque[RequestReceived | ExtendedRequestReceived] | None = None
        self._refusing = False
        self._unread_failure_bytes = 0
        self.on_request: Callable[[int, Any], object] | None = None
        """If set, ``on_request(message_id, content)`` is called for each
        request instead of making a :class:`RequestReceived` event (requests
        held back still come as events from :meth:`next_held_request`)."""
        self.on_request_with_meta: (
            Callable[[int, Any, float | None, dict[str, Any]], object] | None
        ) = None
        """If set, ``on_request_with_meta(message_id, content, deadline,
        meta)`` is called for each request with metadata (wire extension)
        instead of making an :class:`ExtendedRequestReceived` event, as
        :attr:`on_request` is for plain requests."""
        self.on_result: Callable[[Any, Any], object] | None = None
        """If set, ``on_result(token, content)`` is called for each result
        instead of making a :class:`ResultReceived` event.

        The two receivers are the fast path for the two messages of every
        call: no event object is made, and a read of many frames yields only
        the other events.  They are called while the events are made (so what
        they do counts for the next frame, as for events), must not raise
        :class:`~aiomas.exceptions.ProtocolError`, and are forgotten when the
        connection ends."""
        self.on_data: Callable[[_Chunk], object] | None = None
        """If set, the bytes to send are passed to ``on_data(chunk)`` (e.g. a
        transport's ``write``) as soon as they are made, instead of waiting
        for :meth:`data_to_send` -- except while frames of a read wait for
        their events (:attr:`frames_waiting`): the replies to a read's
        requests are gathered and leave together (in chunks of up to
        256 KiB) when its last frame has been looked at.  What ``on_data``
        raises comes out of the call that sent (for :meth:`send_request`, the
        request is then forgotten).  Forgotten when the connection ends."""
        self.closed = False
        """Whether the connection has ended (:meth:`connection_lost`, or a
        protocol violation).  Read it; don't set it."""
        # The features of the wire extension agreed with the peer: none until
        # an offer was answered (see offer_extensions()).
        self._extensions: frozenset[str] = frozenset()
        self.sent_size: int | None = None
        """The payload bytes of the message encoded last, once
        :meth:`measure_sizes` was called (else ``None``)."""
        self.received_size: int | None = None
        """The payload bytes of the frame decoded last, once
        :meth:`measure_sizes` was called (else ``None``)."""

    # --- State ---------------------------------------------------------------

    @property
    def waiting_for_replies(self) -> int:
        """How many of our requests wait for their reply."""
        return len(self.pending)

    @property
    def requests_sent(self) -> int:
        """How many requests we have sent on this connection (answered or
        not)."""
        return self._next_id

    @property
    def held_requests(self) -> int:
        """How many received requests are held back (see
        :attr:`hold_requests`)."""
        return 0 if self._held is None else len(self._held)

    @property
    def unread_failure_bytes(self) -> int:
        """Bytes of failure replies that the core itself sent while writing
        was paused (see :data:`MAX_UNREAD_FAILURE_BYTES`)."""
        return self._unread_failure_bytes

    @property
    def buffered(self) -> int:
        """Received bytes of a frame that is not complete yet."""
        return self._reader.buffered

    @property
    def reading_wanted(self) -> bool:
        """Whether to go on reading.

        ``False`` while writing is paused and we wait for no reply ourselves:
        reading on would only bring more requests to answer.  Waiting for
        replies, we go on reading, so that two peers never wait for each other.
        """
        return not (self._writing_paused and not self.pending and not self.closed)

    # --- Receiving -----------------------------------------------------------

    def receive_data(self, data: _Chunk) -> Iterable[Event]:
        """Take bytes from the peer; return the events they complete (see
        :meth:`events`)."""
        if self.closed:
            return ()
        try:
            payloads = self._reader.feed(data)
        except ProtocolError:
            payloads = []  # (The reader keeps it: events() reports it.)
        return self._events_of(payloads)

    def buffer_updated(self, nbytes: int) -> Iterable[Event]:
        """Account for *nbytes* read into the last :meth:`get_buffer` buffer;
        return the events they complete (see :meth:`events`)."""
        if self.closed:
            return ()
        try:
            payloads = self._reader.buffer_updated(nbytes)
        except ProtocolError:
            payloads = []  # (The reader keeps it: events() reports it.)
        # (_events_of(), inlined for the lone frame that most reads bring.)
        if len(payloads) == 1 and not self._payloads and self._reader.error is None:
            event = self._frame_event(payloads[0])
            return () if event is None else (event,)
        return self._events_of(payloads)

    def _events_of(self, payloads: list[bytes | bytearray]) -> Iterable[Event]:
        if len(payloads) == 1 and not self._payloads and self._reader.error is None:
            # A lone frame, as most reads bring: nothing that the consumer does
            # can count for a later frame of this read, so its event is made
            # at once, without an iterator.
            event = self._frame_event(payloads[0])
            return () if event is None else (event,)
        self._payloads.extend(payloads)
        self.frames_waiting += len(payloads)
        return self.events()

    def events(self) -> Iterator[Event]:
        """Yield the events of the frames received so far, one at a time.

        Each frame is looked at only when its event is asked for, so what the
        consumer did with the events before (answering requests, which may
        pause writing) counts for the next: a request that comes after writing
        paused is held back (see :attr:`hold_requests`).  Frames whose events
        were not asked for are kept for the next call.  (When a read completes
        a lone frame and none are kept, :meth:`receive_data` and
        :meth:`buffer_updated` return its event at once, in a tuple.)
        """
        payloads = self._payloads
        frame_event = self._frame_event
        while self._taken < len(payloads):
            payload = payloads[self._taken]
            self._taken += 1
            self.frames_waiting -= 1
            event = frame_event(payload)
            if event is not None:
                yield event
        payloads.clear()
        self._taken = 0
        error = self._reader.error  # a bad header after these frames
        if error is not None and not self.closed:
            yield self._violation(error)
        elif self._out:
            self._release()  # what the frames' events made us send

    def _frame_event(self, payload: bytes | bytearray) -> Event | None:
        """The event of a received frame (a frame makes at most one), or
        ``None`` if it made none (or went to a receiver, see
        :attr:`on_request`)."""
        receiver: Callable[[Any, Any], object] | None
        meta_receiver: Callable[[int, Any, float | None, dict[str, Any]], object]
        request_with_meta: tuple[Any, float | None, dict[str, Any]]
        # A message id or a reply's token: declared, since a compiled build
        # (docs/performance.rst) checks the type of each value assigned.
        first: Any
        try:
            try:
                message = self._decode(payload)
            except Exception as exc:
                return self._content_not_decodable(payload, exc)
            if type(message) not in _SEQUENCES or len(message) != 3:
                return self._invalid_message(message)
            msg_type, msg_id, content = message
            if type(msg_id) is not int or type(msg_type) is not int:
                raise ProtocolError(
                    f"Invalid message header {abbreviate([msg_type, msg_id])}"
                )
            if msg_type == REQUEST:
                if self.hold_requests and (self._writing_paused or self._held):
                    return self._hold(RequestReceived(msg_id, content))
                receiver = self.on_request
                if receiver is None:
                    if COMPILED:
                        return RequestReceived(msg_id, content)
                    request: Any = _NewRequestReceived()
                    request.message_id = msg_id
                    request.content = content
                    request.__class__ = RequestReceived
                    return request  # type: ignore[no-any-return]
                first = msg_id
            elif msg_type == RESULT:
                # (_reply_arrived(), inlined for the reply to every call.)
                pending = self.pending
                first = pending.pop(msg_id, _NOT_PENDING)  # the token
                if first is _NOT_PENDING:
                    self._unknown_reply(msg_id)
                elif not pending and (
                    self._next_id - self._pending_since > _FRESH_PENDING_AFTER
                ):
                    self._forget_burst()
                receiver = self.on_result
                if receiver is None:
                    if COMPILED:
                        return ResultReceived(msg_id, content, first)
                    result: Any = _NewResultReceived()
                    result.message_id = msg_id
                    result.content = content
                    result.token = first
                    result.__class__ = ResultReceived
                    return result  # type: ignore[no-any-return]
            elif msg_type == FAILURE:
                token = self._reply_arrived(msg_id)
                return FailureReceived(msg_id, failure_text(content), token)
            elif self._extensions:
                on_meta = self.on_request_with_meta
                if msg_type != REQUEST_WITH_META or on_meta is None:
                    return self._extended_event(msg_type, msg_id, content)
                parsed = self._request_with_meta(msg_id, content)
                if not isinstance(parsed, tuple):
                    return parsed  # refused, malformed or held back
                meta_receiver, request_with_meta = on_meta, parsed
                receiver = None
            else:
                raise ProtocolError(f"Unknown message type {msg_type!r}")
        except ProtocolError as exc:
            return self._violation(exc)
        except _LateReply:
            return None
        # Outside the try: what a receiver raises is its own, not the peer's.
        if receiver is None:
            meta_receiver(msg_id, *request_with_meta)
            return None
        receiver(first, content)
        return None

    def _reply_arrived(self, msg_id: int) -> Any:
        """Forget request *msg_id*, now answered; return its token."""
        pending = self.pending
        token = pending.pop(msg_id, _NOT_PENDING)
        if token is _NOT_PENDING:
            self._unknown_reply(msg_id)
        if not pending and self._next_id - self._pending_since > _FRESH_PENDING_AFTER:
            self._forget_burst()
        return token

    def _unknown_reply(self, msg_id: int) -> NoReturn:
        """A reply came for *msg_id*, which is not pending.

        Raises:
            _LateReply: if we sent that request (the reply is dropped).
            ProtocolError: if we never did.
        """
        discarded = self._discarded
        if 0 <= msg_id < self._next_id and not (discarded and msg_id in discarded):
            # It crossed our cancel on the wire, or it repeats a reply that
            # came already (a network that delivers a message twice, as the
            # simulated one can): the caller has its answer.
            raise _LateReply
        raise ProtocolError(f"Reply for unknown message id {msg_id!r}")

    def _forget_burst(self) -> None:
        # A dict keeps its size after a burst of calls: start afresh (not
        # after every call: with one call at a time it never grows).
        self.pending = {}
        self._pending_since = self._next_id

    def _hold(
        self, request: RequestReceived | ExtendedRequestReceived
    ) -> RequestRejected | None:
        """Our write buffer is full (the peer does not read its replies): hold
        the request back, or refuse it if too many wait already."""
        held = self._held
        if held is None:
            held = self._held = deque()
        if len(held) < MAX_HELD_REQUESTS:
            held.append(request)
            return None
        text = (
            f"RuntimeError: overloaded: {len(held)} requests wait "
            "until you read the replies to earlier ones\n"
        )
        self._send_own_failure(request.message_id, text)
        if self._refusing:  # Reported once per flood, not per request.
            return None
        self._refusing = True
        return RequestRejected(request.message_id, "refused", text)

    def _content_not_decodable(
        self, payload: bytes | bytearray, error: Exception
    ) -> RequestRejected | ReplyUndecodable:
        """A message whose content has a custom type that cannot be
        deserialized (an unknown type id, a failing deserializer) is answered
        (a request) or reported (a reply) on its own; anything else that does
        not decode breaks the protocol."""
        try:
            message = self.codec.decode_plain(payload)
        except Exception:  # Malformed after all, or no decode_plain().
            message = None
        if (
            type(message) not in (list, tuple)
            or len(message) != 3
            or type(message[0]) is not int
            or type(message[1]) is not int
            or not (
                message[0] in (REQUEST, RESULT, FAILURE)
                or (
                    message[0] == REQUEST_WITH_META
                    and not self._extensions.isdisjoint(_META_FEATURES)
                )
            )
        ):
            hint = _codec_hint(payload, self.codec)
            raise ProtocolError(f"Cannot decode message: {error}{hint}") from error
        msg_type, msg_id, _ = message
        text = f"Cannot decode the content of message {msg_id}: {error}"
        if msg_type in (REQUEST, REQUEST_WITH_META):
            failure = f"SerializationError: {text}\n"
            self._send_own_failure(msg_id, failure)
            return RequestRejected(msg_id, "undecodable", failure)
        token = self._reply_arrived(msg_id)
        decode_error = DecodeError(text)
        decode_error.__cause__ = error
        return ReplyUndecodable(msg_id, decode_error, token)

    def _invalid_message(self, message: Any) -> RequestRejected:
        # A malformed request whose id we can read still gets an answer, so the
        # peer learns what is wrong instead of waiting forever.
        if (
            type(message) in (list, tuple)
            and len(message) >= 2
            and message[0] == REQUEST
            and type(message[1]) is int
        ):
            text = (
                "ProtocolError: a request must be a list [0, message_id, content], "
                f"got a {type(message).__name__} of {len(message)} elements\n"
            )
            self._send_own_failure(message[1], text)
            return RequestRejected(message[1], "malformed", text)
        raise ProtocolError(
            "A message must be a list [msg_type, msg_id, content], "
            f"got {abbreviate(message)}"
        )

    def _violation(self, error: ProtocolError) -> ProtocolViolation:
        self.closed = True
        self.on_request = self.on_request_with_meta = None
        self.on_result = self.on_data = None
        self._held = None
        self._payloads.clear()
        self._taken = 0
        self.frames_waiting = 0
        self._out = []  # Nothing more goes out to this peer.
        self.bytes_to_send = 0
        return ProtocolViolation(error)

    # --- Sending -------------------------------------------------------------

    def send_request(self, content: Any, token: Any = None) -> int:
        """Send a request with *content*; return its message id.

        *token* is kept until the reply arrives and comes back with the reply's
        event (or from :meth:`connection_lost`): the user's handle of the
        request, e.g. the future that waits for it.  So the ids of the
        requests in flight are in one table, the core's.

        Raises:
            SerializationError: if *content* cannot be encoded (nothing is
                sent).
            ValueError: if the encoded message is too long for a frame.
        """
        return self._send_request(REQUEST, content, token)

    def _send_request(self, msg_type: int, content: Any, token: Any) -> int:
        # (send_request() and send_request_with_meta(): the message, its id,
        # the table of pending requests, and the write.)
        msg_id = self._next_id
        self._next_id = msg_id + 1
        payload = self._encode([msg_type, msg_id, content])
        size = len(payload)
        if size > JOIN_LIMIT:
            self._queue(payload)  # (raises if too long: nothing is pending)
            frame = None
        else:
            frame = _pack_header(size) + payload
        self.pending[msg_id] = token
        try:
            on_data = self.on_data
            if frame is None:
                self._release()
            elif on_data is None or self.bytes_to_send or self.frames_waiting:
                self._out.append(frame)
                self.bytes_to_send += HEADER_SIZE + size
                self._release()
            else:
                on_data(frame)  # (what _release() would do, without a queue)
        except BaseException:
            self.discard_request(msg_id)  # It never left.
            raise
        return msg_id

    def discard_request(self, message_id: int) -> None:
        """Forget our request *message_id*: it never left (writing it
        failed), so no reply will come (a reply for it is a violation)."""
        if self.pending.pop(message_id, _NOT_PENDING) is _NOT_PENDING:
            return
        if self._discarded is None:
            self._discarded = set()
        self._discarded.add(message_id)

    def send_result(self, message_id: int, content: Any) -> None:
        """Answer request *message_id* with *content*.

        Raises:
            SerializationError: if *content* cannot be encoded, or ValueError
                if it is too long for a frame; the peer then gets a failure
                reply that says so, so it never waits for an answer that
                cannot be sent.
        """
        try:
            payload = self._encode([RESULT, message_id, content])
            size = len(payload)
            if size > JOIN_LIMIT:
                self._queue(payload)
                frame = None
            else:
                frame = _pack_header(size) + payload
        except (SerializationError, ValueError) as exc:
            self._send(FAILURE, message_id, format_exception(exc))
            raise
        if frame is None:
            self._release()
            return
        on_data = self.on_data
        if on_data is None or self.bytes_to_send or self.frames_waiting:
            self._out.append(frame)
            self.bytes_to_send += HEADER_SIZE + size
            self._release()
        else:
            on_data(frame)  # (what _release() would do, without a queue)

    def send_failure(self, message_id: int, text: str) -> None:
        """Answer request *message_id* with a failure described by *text*
        (see :func:`format_exception`)."""
        self._send(FAILURE, message_id, text)

    def _send_own_failure(self, msg_id: int, text: str) -> None:
        """Answer a request with a failure the core itself found.

        While writing is paused these replies are counted: the peer sends us
        requests to refuse but does not read the replies.

        Raises:
            ProtocolError: if the peer left too many of them unread.
        """
        if self._writing_paused:
            self._unread_failure_bytes += len(text)
            if self._unread_failure_bytes > MAX_UNREAD_FAILURE_BYTES:
                raise ProtocolError(
                    "the peer sends requests that we must refuse but does not "
                    f"read the replies ({self._unread_failure_bytes} bytes wait)"
                )
        self._send(FAILURE, msg_id, text)

    def _send(self, msg_type: int, msg_id: int, content: Any) -> None:
        self._queue(self._encode([msg_type, msg_id, content]))
        self._release()

    def _queue(self, payload: bytes) -> None:
        """Frame *payload* for :meth:`data_to_send`.

        Raises:
            ValueError: if *payload* is too long for a frame.
        """
        size = len(payload)
        header = frame_header(size)
        if size <= JOIN_LIMIT:
            self._out.append(header + payload)
        else:
            view = memoryview(payload)
            self._out.append(b"".join((header, view[:BIG_PAYLOAD_LEAD])))
            self._out.append(view[BIG_PAYLOAD_LEAD:])
        self.bytes_to_send += HEADER_SIZE + size

    def _release(self) -> None:
        """Hand what waits to :attr:`on_data`, unless more frames of a read
        wait for their events (and it is not too much already)."""
        on_data = self.on_data
        if (
            on_data is not None
            and self._out
            and not (self.frames_waiting and self.bytes_to_send <= JOINED_WRITE_LIMIT)
        ):
            for chunk in self.data_to_send():
                on_data(chunk)

    def data_to_send(self) -> list[_Chunk]:
        """Return (and forget) the bytes to write, in order.

        Small frames are joined into chunks of up to 256 KiB; a big payload
        is a chunk of its own, a :class:`memoryview` of it (never copied), but
        for its first 16 KiB, which go with its header (see
        :data:`BIG_PAYLOAD_LEAD`).  Only such chunks are memoryviews.  Write
        each chunk with one ``transport.write()``.
        """
        out = self._out
        if not out:
            return []
        self._out = []
        size = self.bytes_to_send
        self.bytes_to_send = 0
        if len(out) == 1:
            return out
        if size <= JOIN_LIMIT:  # (so none of them is big)
            return [b"".join(out)]
        chunks: list[_Chunk] = []
        group: list[_Chunk] = []
        size = 0
        for chunk in out:
            big = type(chunk) is memoryview  # (the rest of a big payload)
            if group and (big or size + len(chunk) > JOINED_WRITE_LIMIT):
                chunks.append(group[0] if len(group) == 1 else b"".join(group))
                group, size = [], 0
            if big:
                chunks.append(chunk)
                continue
            group.append(chunk)
            size += len(chunk)
        if group:
            chunks.append(group[0] if len(group) == 1 else b"".join(group))
        return chunks

    # --- The wire extension (docs/wire-format.rst, "Extension 1") ----------

    @property
    def extensions(self) -> frozenset[str]:
        """The features of the wire extension agreed with the peer (empty
        until an offer was answered): only these are ever sent."""
        return self._extensions

    def offer_extensions(
        self, token: Any = None, features: Iterable[str] = EXTENSION_FEATURES
    ) -> int:
        """Offer the wire extension to the peer: send the probe, an ordinary
        request (an RPC call to :data:`EXTENSIONS_PATH`), and return its
        message id.  Pass the content of its result to :meth:`offer_answered`;
        a failure reply means the peer does not speak the extension (nothing
        changes).  Until then, everything is sent in the plain format.

        Raises:
            ValueError: if *features* has a feature this core does not know.
        """
        offered = sorted(features)
        unknown = set(offered) - EXTENSION_FEATURES
        if unknown:
            raise ValueError(f"unknown extension features {sorted(unknown)}")
        return self.send_request(
            [EXTENSIONS_PATH, [EXTENSIONS_VERSION, offered], {}], token
        )

    def offer_answered(self, content: Any) -> frozenset[str]:
        """The peer answered our offer with the result *content*: agree on
        the features it names (those we support) and return them.

        A result that is not ``[version, [feature, ...]]`` with a version
        >= 1 agrees on nothing (and the connection stays plain).
        """
        if type(content) in _SEQUENCES and len(content) == 2:
            version, names = content
            features = _valid_features(names)
            if type(version) is int and version >= 1 and features is not None:
                self._extensions = features & EXTENSION_FEATURES
        return self._extensions

    def take_offer(
        self,
        message_id: int,
        content: Any,
        features: Iterable[str] = EXTENSION_FEATURES,
    ) -> bool:
        """If *content* of request *message_id* is an extension offer, answer
        it (with the features both sides support, at most *features*), agree
        on them and return ``True``; else return ``False`` and do nothing.

        Only a user of the connection that opted in calls this (RPC does, for
        the first request of a connection).
        """
        if not (
            type(content) in _SEQUENCES
            and len(content) == 3
            and content[0] == EXTENSIONS_PATH
            and type(content[1]) in _SEQUENCES
            and len(content[1]) == 2
            and type(content[1][0]) is int
            and content[1][0] >= 1
        ):
            return False
        offered = _valid_features(content[1][1])
        if offered is None:
            return False
        agreed = offered & EXTENSION_FEATURES & frozenset(features)
        version = min(content[1][0], EXTENSIONS_VERSION)
        self.send_result(message_id, [version, sorted(agreed)])
        self._extensions = agreed
        return True

    def send_request_with_meta(
        self,
        content: Any,
        token: Any = None,
        *,
        deadline: float | None = None,
        trace: dict[str, Any] | None = None,
    ) -> int:
        """Send a request like :meth:`send_request`, with *deadline* (the
        seconds the peer has for it) if the peer agreed to feature
        ``"deadline"``, and the keys of *trace* (``"trace"``: ``[trace id,
        cause id, lamport]``, maybe ``"traceparent"``, see
        :mod:`aiomas.tracing`) if it agreed to ``"trace"``; with neither, as
        a plain request.

        Raises:
            SerializationError, ValueError: see :meth:`send_request`; also
                ValueError if *deadline* is not a finite number >= 0.
        """
        extensions = self._extensions
        meta: dict[str, Any] = {}
        if deadline is not None and "deadline" in extensions:
            meta["deadline"] = deadline
            _valid_deadline(meta)
        if trace and "trace" in extensions:
            meta.update(trace)
        if not meta:
            return self._send_request(REQUEST, content, token)
        return self._send_request(REQUEST_WITH_META, [content, meta], token)

    def cancel_request(self, message_id: int) -> bool:
        """We gave up on our request *message_id*.

        If the peer agreed to feature ``"cancel"``, send it a cancel and forget
        the request at once (a reply that crosses the cancel is dropped
        without an event), and return ``True``.  Otherwise nothing is sent and
        the request waits for its (late) reply as before: return ``False``.
        Nothing happens for an id that waits for no reply.
        """
        if "cancel" not in self._extensions or self.closed:
            return False
        if self.pending.pop(message_id, _NOT_PENDING) is _NOT_PENDING:
            return False
        self._send(CANCEL, message_id, None)
        return True

    def _request_with_meta(
        self, msg_id: int, content: Any
    ) -> tuple[Any, float | None, dict[str, Any]] | RequestRejected | None:
        """The ``(content, deadline, meta)`` of request *msg_id* with
        metadata (extension agreed), or what became of it instead: refused
        or held back (see :meth:`_hold`), or malformed (answered).

        Raises:
            ProtocolError: if neither feature ``"deadline"`` nor ``"trace"``
                was agreed.
        """
        if self._extensions.isdisjoint(_META_FEATURES):
            raise ProtocolError(f"Unknown message type {REQUEST_WITH_META!r}")
        try:
            if type(content) not in _SEQUENCES or len(content) != 2:
                raise ValueError("the content must be [content, meta]")
            body, meta = content
            if type(meta) is not dict:
                raise ValueError("the metadata must be a map")
            deadline = _valid_deadline(meta)
        except ValueError as exc:
            text = f"ProtocolError: a request with metadata is malformed: {exc}\n"
            self._send_own_failure(msg_id, text)
            return RequestRejected(msg_id, "malformed", text)
        if self.hold_requests and (self._writing_paused or self._held):
            return self._hold(ExtendedRequestReceived(msg_id, body, deadline, meta))
        return body, deadline, meta

    def _extended_event(self, msg_type: int, msg_id: int, content: Any) -> Event | None:
        """The event of a message of the extension (which was agreed).

        Raises:
            ProtocolError: for a message type that was not agreed.
        """
        extensions = self._extensions
        if msg_type == REQUEST_WITH_META:
            parsed = self._request_with_meta(msg_id, content)
            if not isinstance(parsed, tuple):
                return parsed
            return ExtendedRequestReceived(msg_id, *parsed)
        if msg_type == CANCEL and "cancel" in extensions:
            held = self._held
            if held:
                for index, waiting in enumerate(held):
                    if waiting.message_id == msg_id:
                        del held[index]
                        return CancelReceived(msg_id, held=True)
            return CancelReceived(msg_id)
        raise ProtocolError(f"Unknown message type {msg_type!r}")

    # --- Sizes, for tracing ------------------------------------------------

    def measure_sizes(self) -> None:
        """From now on, keep the payload size of each message encoded and
        each frame decoded in :attr:`sent_size` and :attr:`received_size`
        (what :mod:`aiomas.tracing` records; a core that is not traced pays
        nothing for it)."""
        if self.sent_size is not None:
            return
        encode, decode = self._encode, self._decode

        def measured_encode(message: Any) -> bytes:
            payload = encode(message)
            self.sent_size = len(payload)
            return payload

        def measured_decode(payload: Any) -> Any:
            self.received_size = len(payload)
            return decode(payload)

        self.sent_size = self.received_size = 0
        self._encode = measured_encode
        self._decode = measured_decode

    # --- Flow control and the end ---------------------------------------------

    def pause_writing(self) -> None:
        """The transport's write buffer is full: hold requests back (see
        :attr:`hold_requests`) and stop reading if we can (see
        :attr:`reading_wanted`)."""
        self._writing_paused = True

    def resume_writing(self) -> None:
        """The transport takes data again: the unread-failure budget starts
        afresh, and held requests may be taken with :meth:`next_held_request`."""
        self._writing_paused = False
        self._unread_failure_bytes = 0

    def next_held_request(self) -> RequestReceived | ExtendedRequestReceived | None:
        """Return the oldest held request, unless writing is paused (again)."""
        held = self._held
        if self._writing_paused or not held:
            if not held:
                self._refusing = False
            return None
        request = held.popleft()
        if not held:
            self._refusing = False
        return request

    def connection_lost(self) -> dict[int, Any]:
        """The connection has ended: return the ids (and tokens) of our
        requests that will never get a reply, in the order they were sent, and
        forget them."""
        self.closed = True
        self.on_request = self.on_request_with_meta = None
        self.on_result = self.on_data = None
        self._held = None
        self._payloads.clear()
        self._taken = 0
        self.frames_waiting = 0
        self._out = []
        self.bytes_to_send = 0
        # Nothing more is read: the buffers go now, not with the last
        # reference to the connection.
        self._reader.release()
        pending, self.pending = self.pending, {}
        return pending
