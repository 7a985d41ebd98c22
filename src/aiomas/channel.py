"""Request-reply channels: the lowest layer of aiomas.

A :class:`Channel` sends requests and waits for their replies, and receives the
peer's requests (:class:`Request`) to answer them.  Messages are encoded by a
:class:`~aiomas.codecs.Codec` and framed as described in :mod:`aiomas.wire`.
:class:`ChannelProtocol` is the thin asyncio adapter between a transport (TCP, unix
socket, TLS or :mod:`~aiomas.local_queue`) and the channel.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import math
import os
import socket
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final, TypeAlias, cast

from aiomas import local_queue
from aiomas.codecs import JSON, Codec, MsgPack, MsgPackBlosc
from aiomas.exceptions import ProtocolError, RemoteException, SerializationError
from aiomas.wire import (
    DEFAULT_MAX_FRAME_SIZE,
    FAILURE,
    REQUEST,
    RESULT,
    FrameReader,
    RequestTable,
    frame_header,
)

__all__ = [
    "DEFAULT_CODEC",
    "Address",
    "Channel",
    "ChannelProtocol",
    "Request",
    "open_connection",
    "start_server",
]

logger = logging.getLogger(__name__)

DEFAULT_CODEC: Final = JSON
"""Default codec: :class:`~aiomas.codecs.JSON`."""

Address: TypeAlias = (
    "tuple[str | None, int] | str | os.PathLike[str] | local_queue.LocalQueue"
)
"""A ``(host, port)`` tuple (TCP), a unix socket path or a LocalQueue."""

SerializerFactory: TypeAlias = Callable[
    [], tuple[type, Callable[[Any], Any], Callable[[Any], Any]]
]
ClientConnectedCallback: TypeAlias = Callable[["Channel"], Awaitable[Any] | None]

# Payloads above this size are handed to the transport separately from their
# header, so that they are not copied once more just to prepend four bytes.
_JOIN_LIMIT: Final = 64 * 1024
# Replies to requests that arrived together are joined into writes of up to
# this many bytes.
_JOINED_WRITE_LIMIT: Final = 256 * 1024

# Requests for a request handler (RPC) that may wait while our write buffer is
# full; more are refused with a failure reply.
_MAX_DEFERRED_REQUESTS: Final = 1024
# Failure replies that the channel itself sends (to malformed, undecodable or
# refused requests) while the peer does not read: beyond this many bytes, the
# peer is cut off.
_MAX_UNREAD_FAILURE_BYTES: Final = 2**20

# How long Channel.close() waits for the transport to flush before aborting it.
_CLOSE_TIMEOUT: Final = 10.0

# Bounds for the pause between two attempts of open_connection(timeout=...).
_RETRY_DELAY_MIN: Final = 0.005
_RETRY_DELAY_MAX: Final = 0.25
# Errors after which open_connection(timeout=...) tries again: nobody listens
# (yet), or the network or host cannot be reached (yet).
_RETRY_ERRNOS: Final = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH})


def _should_retry(exc: OSError) -> bool:
    return isinstance(
        exc, ConnectionRefusedError | FileNotFoundError | TimeoutError
    ) or (exc.errno in _RETRY_ERRNOS)


def _check_dead_peer_timeout(timeout: float | None) -> None:
    if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(
            f"dead_peer_timeout must be a positive number or None, got {timeout!r}"
        )


# Linux refuses keepalive times above this many seconds.
_MAX_KEEPALIVE_SECONDS: Final = 32767


def _detect_dead_peer(transport: asyncio.BaseTransport, timeout: float) -> None:
    """Make the kernel close this TCP connection when the peer has not
    acknowledged sent data for *timeout* seconds, or, on an idle connection,
    has not answered keepalive probes for about that long."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # unix sockets and LocalQueues have no peer that can vanish
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    # Not every system has every option (macOS lacks TCP_USER_TIMEOUT).
    for name, value in (
        ("TCP_KEEPIDLE", min(max(1, round(timeout / 2)), _MAX_KEEPALIVE_SECONDS)),
        ("TCP_KEEPINTVL", min(max(1, round(timeout / 6)), _MAX_KEEPALIVE_SECONDS)),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", min(max(1, round(timeout * 1000)), 2**31 - 1)),
    ):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    for level, option, value in options:
        try:
            sock.setsockopt(level, option, value)
        except OSError as exc:  # Set what can be set.
            peer = transport.get_extra_info("peername")
            logger.warning(
                "Cannot set up dead peer detection for %s fully: %s",
                peer,
                exc,
                extra={"peer": peer},
            )


def _format_exception(exc: BaseException) -> str:
    """The text sent in a failure reply: the traceback (if any) and the error."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _failure_text(content: Any) -> str:
    """Turn the content of a received failure reply into readable text.

    aiomas peers send a string.  Other peers (e.g. mosaik 3) send a list such as
    ``[type, message, *traceback_lines]``; anything else is shown by its repr.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list | tuple) and all(isinstance(c, str) for c in content):
        return "\n".join(content)
    return repr(content)


class Request:
    """A request received by :meth:`Channel.recv`; answer it with :meth:`reply`
    or :meth:`fail`.  You don't create requests yourself.

    Args:
        content: The content of the request.
        message_id: Its id, unique within the channel.
        protocol: The :class:`ChannelProtocol` to send the answer through.
    """

    __slots__ = ("_answered", "_protocol", "content", "message_id")

    def __init__(self, content: Any, message_id: int, protocol: ChannelProtocol):
        self.content = content
        """The content of the incoming message."""
        self.message_id = message_id
        self._protocol = protocol
        self._answered = False

    @property
    def msg_id(self) -> int:
        """The message id of this request (alias of :attr:`message_id`)."""
        return self.message_id

    def __repr__(self) -> str:
        return f"<Request {self.message_id}: {self.content!r}>"

    async def reply(self, result: Any) -> None:
        """Reply to the request with *result*.

        Raises:
            RuntimeError: if the request was already answered.
            SerializationError: if *result* cannot be encoded; the requester then
                gets a failure reply that says so.
            ConnectionResetError: if the connection is closed.
        """
        self._answer(RESULT, result)
        await self._protocol.drain()

    async def fail(self, exception: BaseException) -> None:
        """Answer the request with a failure described by *exception*.

        The requester gets a :class:`~aiomas.exceptions.RemoteException` whose
        traceback is the text of *exception* (and its traceback, if it was raised).

        Raises:
            RuntimeError: if the request was already answered.
            ConnectionResetError: if the connection is closed.
        """
        self._answer(FAILURE, _format_exception(exception))
        await self._protocol.drain()

    def _answer(self, msg_type: int, content: Any) -> None:
        if self._answered:
            raise RuntimeError(f"Request {self.message_id} was already answered")
        channel = self._protocol.channel
        assert channel is not None
        self._answered = True
        try:
            channel._send_message(msg_type, self.message_id, content)
        except (SerializationError, ValueError) as exc:
            # The requester must not wait forever for an answer that cannot be sent.
            channel._send_message(FAILURE, self.message_id, _format_exception(exc))
            raise


class Channel:
    """A request-reply channel between two endpoints.

    Returned by :func:`open_connection` and passed to the callback of
    :func:`start_server`.  Don't create channels yourself.

    Args:
        protocol: The :class:`ChannelProtocol` of the connection.
        codec: The codec instance that encodes and decodes messages.
        transport: The asyncio transport of the connection.
        loop: The event loop the connection runs in.
    """

    __slots__ = (
        "_closed_error",
        "_decode",
        "_encode",
        "_incoming",
        "_loop",
        "_peername",
        "_recv_waiter",
        "_refusing",
        "_requests",
        "_unread_failure_bytes",
        "_write",
        "codec",
        "protocol",
        "request_handler",
        "transport",
    )

    def __init__(
        self,
        protocol: ChannelProtocol,
        codec: Codec,
        transport: asyncio.BaseTransport,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.protocol = protocol
        self.codec = codec
        """The codec used to encode and decode messages sent via this channel."""
        self.transport = transport
        """The transport of this channel."""
        self._loop = loop
        self._encode = codec.encode
        self._decode = codec.decode
        # Duck typing: uvloop's transports do not subclass asyncio.Transport.
        self._write: Callable[[bytes | bytearray | memoryview], None] = cast(
            asyncio.WriteTransport, transport
        ).write
        self._peername = transport.get_extra_info("peername")
        self._requests = RequestTable()
        self._incoming: deque[Request] = deque()
        self._refusing = False  # (see _refuse())
        self._unread_failure_bytes = 0  # (see _send_failure())
        self._recv_waiter: asyncio.Future[None] | None = None
        self._closed_error: BaseException | None = None
        self.request_handler: Callable[[Request], None] | None = None
        """Set by :meth:`set_request_handler`."""

    def __repr__(self) -> str:
        state = "closed" if self._closed_error is not None else "open"
        return f"<Channel to {self._peername!r} ({state})>"

    @property
    def peername(self) -> Any:
        """The address of the peer, as the transport reports it."""
        return self._peername

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Return transport information *name* (see
        :meth:`asyncio.BaseTransport.get_extra_info`)."""
        return self.transport.get_extra_info(name, default)

    def send(self, content: Any) -> asyncio.Future[Any]:
        """Send a request with *content* and return a future for the reply.

        The future's result is the content of the reply.  Awaiting it raises:
        :class:`~aiomas.exceptions.RemoteException` if the peer answered with a
        failure, :class:`ConnectionResetError` if the connection closed first.
        Cancelling the future does not disturb the channel: the late reply is
        dropped.

        Raises:
            SerializationError: if *content* cannot be encoded.
            ValueError: if the encoded message is too long for a frame.
            ConnectionResetError: if the channel is already closed.
        """
        if self._closed_error is not None:
            raise self._connection_error()
        future = self._loop.create_future()
        msg_id = self._requests.add(future)
        if self.protocol._reading_paused:
            # We stopped reading because the peer did not read our replies;
            # now we wait for a reply of our own and must read again.
            self.protocol._resume_reading()
        try:
            self._send_message(REQUEST, msg_id, content)
        except BaseException:
            self._requests.discard(msg_id)
            raise
        return future

    def set_request_handler(self, handler: Callable[[Request], None]) -> None:
        """Pass every request to *handler* as soon as it arrives, instead of
        queueing it for :meth:`recv` (this is how :mod:`aiomas.rpc` serves).

        Requests already queued are passed to it at once.  *handler* must not
        raise; it answers each request (now or later).
        """
        self.request_handler = handler
        incoming = self._incoming
        while incoming:
            handler(incoming.popleft())

    async def recv(self) -> Request:
        """Wait for the next request from the peer and return it.

        Raises:
            ConnectionResetError: if the connection is (or gets) closed and no
                received request is left.
            RuntimeError: if another task is already waiting in :meth:`recv`.
        """
        while not self._incoming:
            if self._closed_error is not None:
                raise self._connection_error()
            if self._recv_waiter is not None:
                raise RuntimeError("Another task is already waiting in recv()")
            waiter = self._loop.create_future()
            self._recv_waiter = waiter
            try:
                await waiter
            finally:
                self._recv_waiter = None
        return self._incoming.popleft()

    async def close(self) -> None:
        """Close the channel and wait until the connection is closed.

        Requests still waiting for a reply fail with :class:`ConnectionResetError`.
        """
        transport = self.transport
        closed = self.protocol._closed
        if not transport.is_closing():
            transport.close()
        if not closed.done():
            try:
                await asyncio.wait_for(asyncio.shield(closed), _CLOSE_TIMEOUT)
            except TimeoutError:
                logger.warning(
                    "Aborting connection to %s: it did not close within %ss",
                    self._peername,
                    _CLOSE_TIMEOUT,
                    extra={"peer": self._peername},
                )
                cast(asyncio.Transport, transport).abort()
                await closed

    # Internal API, used by Request, ChannelProtocol and aiomas.rpc.

    def _send_message(self, msg_type: int, msg_id: int, content: Any) -> None:
        if self._closed_error is not None:
            raise self._connection_error()
        payload = self._encode([msg_type, msg_id, content])
        header = frame_header(len(payload))
        if len(payload) <= _JOIN_LIMIT:
            self._write(header + payload)
        else:
            # Two writes rather than writelines(): Python 3.12's writelines()
            # does not pause the protocol when the buffer fills (flow control).
            write = self._write
            write(header)
            write(payload)

    def _payload_received(self, payload: bytes | bytearray) -> None:
        """Handle one received frame.

        Raises:
            ProtocolError: if the payload breaks the protocol; the caller closes
                the connection.
        """
        try:
            message = self._decode(payload)
        except Exception as exc:
            if self._content_not_decodable(payload, exc):
                return
            hint = _codec_hint(payload, self.codec)
            raise ProtocolError(f"Cannot decode message: {exc}{hint}") from exc
        if type(message) not in (list, tuple) or len(message) != 3:
            self._invalid_message(message)
            return
        msg_type, msg_id, content = message
        if type(msg_id) is not int or type(msg_type) is not int:
            raise ProtocolError(
                f"Invalid message header {_abbreviate([msg_type, msg_id])}"
            )
        if msg_type == REQUEST:
            protocol = self.protocol
            request = Request(content, msg_id, protocol)
            handler = self.request_handler
            if handler is not None:
                if protocol._paused or self._incoming:
                    # Our write buffer is full (the peer does not read its
                    # replies): answer later, when it has drained.
                    if len(self._incoming) >= _MAX_DEFERRED_REQUESTS:
                        self._refuse(msg_id)
                        return
                    self._incoming.append(request)
                    protocol._maybe_pause_reading()
                    return
                handler(request)
                return
            self._incoming.append(request)
            waiter = self._recv_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif msg_type == RESULT:
            future = self._requests.pop(msg_id)
            if not future.done():
                future.set_result(content)
        elif msg_type == FAILURE:
            future = self._requests.pop(msg_id)
            if not future.done():
                future.set_exception(
                    RemoteException(self._peername, _failure_text(content))
                )
        else:
            raise ProtocolError(f"Unknown message type {msg_type!r}")

    def _handle_deferred(self) -> None:
        """Pass the requests deferred while writing was paused to the request
        handler, until writing pauses again."""
        handler = self.request_handler
        incoming = self._incoming
        protocol = self.protocol
        while (
            handler is not None
            and incoming
            and not protocol._paused
            and self._closed_error is None
        ):
            handler(incoming.popleft())
        if not incoming:
            self._refusing = False

    def _refuse(self, msg_id: int) -> None:
        """Answer a request with a failure: too many wait already, because the
        peer sends requests but does not read the replies (while we wait for a
        reply from it, so we cannot stop reading)."""
        if not self._refusing:  # Log once per flood, not per request.
            self._refusing = True
            logger.warning(
                "Refusing requests from %s: %s requests wait for the peer to "
                "read its replies",
                self._peername,
                len(self._incoming),
                extra={"peer": self._peername, "message_id": msg_id},
            )
        self._send_failure(
            msg_id,
            f"RuntimeError: overloaded: {len(self._incoming)} requests wait "
            "until you read the replies to earlier ones\n",
        )

    def _send_failure(self, msg_id: int, text: str) -> None:
        """Answer request *msg_id* with a failure the channel itself found.

        These replies skip the request handler and so its flow control; while
        writing is paused they are counted instead, and reading stops if it
        can (see :meth:`ChannelProtocol._maybe_pause_reading`).

        Raises:
            ProtocolError: if the peer left too many of them unread (the caller
                closes the connection).
        """
        protocol = self.protocol
        if protocol._paused:
            self._unread_failure_bytes += len(text)
            if self._unread_failure_bytes > _MAX_UNREAD_FAILURE_BYTES:
                raise ProtocolError(
                    "the peer sends requests that we must refuse but does not "
                    f"read the replies ({self._unread_failure_bytes} bytes wait)"
                )
            protocol._maybe_pause_reading()
        self._send_message(FAILURE, msg_id, text)

    def _content_not_decodable(
        self, payload: bytes | bytearray, error: Exception
    ) -> bool:
        """A message is well-formed but its content has a custom type that we
        cannot deserialize (an unknown type id, a failing deserializer): answer
        that one message with the error and keep the connection.

        Returns:
            ``False`` if the message is not well-formed after all (the caller
            then closes the connection).

        Raises:
            ProtocolError: if it is a reply to a request never sent.
        """
        try:
            message = self.codec.decode_plain(payload)
        except Exception:  # Malformed after all, or no decode_plain().
            return False
        if (
            type(message) not in (list, tuple)
            or len(message) != 3
            or type(message[0]) is not int
            or type(message[1]) is not int
        ):
            return False
        msg_type, msg_id, _ = message
        text = f"Cannot decode the content of message {msg_id}: {error}"
        if msg_type == REQUEST:
            logger.warning(
                "Request %s from %s: %s",
                msg_id,
                self._peername,
                error,
                extra={"peer": self._peername, "message_id": msg_id},
            )
            self._send_failure(msg_id, f"SerializationError: {text}\n")
            return True
        if msg_type in (RESULT, FAILURE):
            future = self._requests.pop(msg_id)
            if not future.done():
                future.set_exception(SerializationError(text))
            return True
        return False

    def _invalid_message(self, message: Any) -> None:
        # A malformed request whose id we can read still gets an answer, so the
        # peer learns what is wrong instead of waiting forever.
        if (
            type(message) in (list, tuple)
            and len(message) >= 2
            and message[0] == REQUEST
            and type(message[1]) is int
        ):
            self._send_failure(
                message[1],
                "ProtocolError: a request must be a list [0, message_id, content], "
                f"got a {type(message).__name__} of {len(message)} elements\n",
            )
            return
        raise ProtocolError(
            "A message must be a list [msg_type, msg_id, content], "
            f"got {_abbreviate(message)}"
        )

    def _connection_error(self) -> ConnectionResetError:
        cause = self._closed_error
        if isinstance(cause, ProtocolError | _UnansweredClose):
            text = f"Connection to {self._peername} closed: {cause}"
        else:
            text = f"Connection to {self._peername} closed"
        error = ConnectionResetError(text)
        if cause is not None and not isinstance(cause, ConnectionResetError):
            error.__cause__ = cause
        return error

    def _connection_lost(self, reason: BaseException) -> None:
        if self._closed_error is not None:
            return
        self._closed_error = reason
        self._requests.fail_all(self._connection_error)
        waiter = self._recv_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _UnansweredClose(ConnectionResetError):
    """The peer closed the connection before it answered any of our requests,
    as it does when it cannot decode them."""


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


def _abbreviate(obj: Any, limit: int = 80) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _write_joined(
    write: Callable[[bytes | bytearray | memoryview], None],
    chunks: list[bytes | bytearray | memoryview],
) -> None:
    """Write *chunks* in order, small ones joined into few writes; big ones
    (whole frames above _JOIN_LIMIT) are not copied."""
    group: list[bytes | bytearray | memoryview] = []
    size = 0
    for chunk in chunks:
        if len(chunk) > _JOIN_LIMIT or size + len(chunk) > _JOINED_WRITE_LIMIT:
            if group:
                write(b"".join(group))
                group, size = [], 0
            if len(chunk) > _JOIN_LIMIT:
                write(chunk)
                continue
        group.append(chunk)
        size += len(chunk)
    if group:
        write(b"".join(group))


class ChannelProtocol(asyncio.BufferedProtocol):
    """The asyncio protocol that connects a transport with a :class:`Channel`.

    Args:
        codec: The codec instance for this connection (a :class:`Codec`).
        client_connected_cb: Called with the new :class:`Channel` when the
            connection is made (see :func:`start_server`); it may be a coroutine
            function, which then runs as a task.
        loop: Accepted for compatibility; must be ``None`` or the running loop.
        max_frame_size: The largest payload accepted from the peer.
        dead_peer_timeout: See :func:`open_connection`.
    """

    def __init__(
        self,
        codec: Codec,
        client_connected_cb: ClientConnectedCallback | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        dead_peer_timeout: float | None = None,
    ) -> None:
        self._loop = _check_loop(loop)
        _check_dead_peer_timeout(dead_peer_timeout)
        self._dead_peer_timeout = dead_peer_timeout
        self.codec = codec
        self.channel: Channel | None = None
        self.transport: asyncio.BaseTransport | None = None
        self._reader = FrameReader(max_frame_size)
        self._client_connected_cb = client_connected_cb
        # Holds the callback's task while it runs: asyncio keeps only weak
        # references to tasks.
        self._cb_task: asyncio.Future[Any] | None = None
        self._paused = False
        # Reading is paused while our write buffer is full and we wait for no
        # reply ourselves (see _maybe_pause_reading()).
        self._reading_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._error: BaseException | None = None
        self._peer_closed = False  # (see _unanswered_close())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Create the :class:`Channel` and start the client connected callback."""
        self.transport = transport
        if self._dead_peer_timeout is not None:
            _detect_dead_peer(transport, self._dead_peer_timeout)
        channel = Channel(self, self.codec, transport, self._loop)
        self.channel = channel
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "Connection %s %s opened",
                "from" if self._client_connected_cb is not None else "to",
                channel.peername,
                extra={"peer": channel.peername},
            )
        callback = self._client_connected_cb
        if callback is None:
            return
        try:
            result = callback(channel)
        except Exception:
            logger.exception(
                "client_connected_cb failed for the connection from %s; closing it",
                channel.peername,
                extra={"peer": channel.peername},
            )
            transport.close()
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._cb_task = task
            task.add_done_callback(self._cb_done)

    def _cb_done(self, task: asyncio.Future[Any]) -> None:
        self._cb_task = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None or isinstance(exc, ConnectionError):
            # A handler that ends because the peer went away is business as usual.
            return
        peer = self.channel.peername if self.channel is not None else None
        logger.error(
            "client_connected_cb failed for the connection from %s; closing it",
            peer,
            exc_info=exc,
            extra={"peer": peer},
        )
        if self.transport is not None:
            self.transport.close()

    def get_buffer(self, sizehint: int) -> memoryview:
        """Return the buffer the transport reads into (BufferedProtocol API)."""
        return self._reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        """Parse the bytes just read and dispatch complete messages."""
        if self._error is not None:
            return
        try:
            payloads = self._reader.buffer_updated(nbytes)
        except ProtocolError as exc:
            self._fail(exc)
            return
        self._dispatch(payloads)

    def data_received(self, data: bytes) -> None:
        """Buffer incoming data until a message is complete, then dispatch it.

        Messages are framed by a 4-byte big-endian length header; the payload is
        ``[msg_type, msg_id, content]`` encoded with the codec.  Transports that
        support :class:`asyncio.BufferedProtocol` use :meth:`buffer_updated`
        instead.
        """
        if self._error is not None:
            return
        try:
            payloads = self._reader.feed(data)
        except ProtocolError as exc:
            self._fail(exc)
            return
        self._dispatch(payloads)

    def _dispatch(self, payloads: list[bytes | bytearray]) -> None:
        channel = self.channel
        assert channel is not None
        handle = channel._payload_received
        if len(payloads) == 1:
            try:
                handle(payloads[0])
            except ProtocolError as exc:
                self._fail(exc)
            return
        # Many requests arrived at once: collect the replies that are sent right
        # away and hand them to the transport in one write (one system call).
        write = channel._write
        corked: list[bytes | bytearray | memoryview] = []
        corked_size = 0

        def cork(data: bytes | bytearray | memoryview) -> None:
            nonlocal corked, corked_size
            corked.append(data)
            corked_size += len(data)
            if corked_size > _JOINED_WRITE_LIMIT:
                # Hand it over now: the transport may pause writing, and then
                # the rest of the requests wait (see pause_writing()).  Take
                # the list first, in case writing calls back into us.
                chunks, corked, corked_size = corked, [], 0
                _write_joined(write, chunks)

        channel._write = cork
        try:
            for payload in payloads:
                try:
                    handle(payload)
                except ProtocolError as exc:
                    self._fail(exc)
                    return
        finally:
            channel._write = write
            if corked and self._error is None:
                chunks, corked = corked, []
                _write_joined(write, chunks)

    def _fail(self, exc: ProtocolError) -> None:
        """The peer broke the protocol: log it and cut the connection."""
        channel = self.channel
        peer = channel.peername if channel is not None else None
        logger.warning("Closing connection to %s: %s", peer, exc, extra={"peer": peer})
        self._error = exc
        if channel is not None:
            channel._connection_lost(exc)
        transport = self.transport
        if transport is not None:
            # Cut the connection at once: nothing more from this peer is trusted.
            abort = getattr(transport, "abort", None)
            if abort is not None:
                abort()
            else:
                transport.close()

    def eof_received(self) -> bool:
        """The peer closed its side: let the transport close the connection."""
        self._peer_closed = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail pending requests and waiters with :class:`ConnectionResetError`."""
        buffered = self._reader.buffered
        if buffered and self._error is None:
            peer = self.channel.peername if self.channel is not None else None
            logger.warning(
                "Connection to %s closed in the middle of a frame "
                "(%d bytes of it received)",
                peer,
                buffered,
                extra={"peer": peer},
            )
        unanswered = self._unanswered_close(exc)
        if self._error is None:  # (Protocol errors were logged already.)
            self._log_close(exc, unanswered)
        reason: BaseException = (
            self._error or unanswered or exc or ConnectionResetError()
        )
        if self.channel is not None:
            self.channel._connection_lost(reason)
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("Connection closed"))
        if not self._closed.done():
            self._closed.set_result(None)

    def _unanswered_close(self, exc: Exception | None) -> _UnansweredClose | None:
        """The reason to give if the peer closed the connection before it
        answered any of our requests: it does so when it cannot decode them
        (and logs why), but a TLS server also does when it refuses our
        certificate."""
        channel = self.channel
        if (
            self._error is not None
            or channel is None
            or not (self._peer_closed or isinstance(exc, ConnectionResetError))
        ):
            return None
        requests = channel._requests
        if not len(requests) or len(requests) != requests.issued:
            return None  # No request, or the peer has answered some.
        n = len(requests)
        ours = f"any of our {n} requests" if n > 1 else "our request"
        text = (
            f"the peer hung up without answering {ours}; if its log says that it "
            "cannot decode our messages, both sides must use the same codec "
            f"(this side uses {type(self.codec).__name__})"
        )
        if self.transport is not None and self.transport.get_extra_info("ssl_object"):
            text += ", or else it may have refused our TLS certificate"
        return _UnansweredClose(text)

    def _log_close(self, exc: Exception | None, hint: Exception | None) -> None:
        peer = self.channel.peername if self.channel is not None else None
        # A clean close stays INFO even with the hint: this side cannot tell a
        # codec mismatch from, say, a refused certificate; the peer can, and
        # logs a warning.
        why = "" if hint is None else f": {hint}"
        if exc is None:
            if logger.isEnabledFor(logging.INFO):
                logger.info(
                    "Connection with %s closed%s", peer, why, extra={"peer": peer}
                )
        else:
            logger.warning(
                "Connection with %s lost: %s%s", peer, exc, why, extra={"peer": peer}
            )

    def pause_writing(self) -> None:
        """Set the *paused* flag: the transport's write buffer is full.

        Requests for a request handler (RPC) are deferred until writing resumes,
        and reading stops while this side waits for no reply itself, so that a
        peer that does not read its replies cannot make us buffer without bound.
        """
        assert not self._paused
        self._paused = True
        self._maybe_pause_reading()

    def resume_writing(self) -> None:
        """Clear the *paused* flag, wake everybody waiting in :meth:`drain`, and
        go on reading and handling deferred requests."""
        assert self._paused
        self._paused = False
        channel = self.channel
        if channel is not None:
            channel._unread_failure_bytes = 0
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        if self._reading_paused:
            self._resume_reading()
        if channel is not None and channel._incoming:
            # Not right here: a transport may call us from inside write().
            self._loop.call_soon(channel._handle_deferred)

    def _maybe_pause_reading(self) -> None:
        """Stop reading if writing is paused and we wait for no reply: reading
        on would only bring more requests to answer.  (Waiting for replies, we
        go on reading, so that two peers can never wait for each other.)"""
        channel = self.channel
        transport = self.transport
        if (
            self._reading_paused
            or not self._paused
            or channel is None
            or len(channel._requests)
            or transport is None
            or transport.is_closing()
        ):
            return
        pause_reading = getattr(transport, "pause_reading", None)
        if pause_reading is not None:
            pause_reading()
            self._reading_paused = True

    def _resume_reading(self) -> None:
        self._reading_paused = False
        transport = self.transport
        if transport is not None and not transport.is_closing():
            cast(asyncio.ReadTransport, transport).resume_reading()

    async def drain(self) -> None:
        """Wait until the transport accepts more data (flow control).

        Raises:
            ConnectionResetError: if the connection is closed.
        """
        if self._closed.done():
            raise ConnectionResetError("Connection closed")
        if not self._paused:
            return
        waiter = self._loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    async def write(self, len_bytes: bytes, content: bytes) -> None:
        """Write a frame (header *len_bytes* and payload *content*) and wait until
        the transport can take more data."""
        transport = cast(asyncio.WriteTransport, self.transport)
        transport.write(len_bytes + content)
        await self.drain()


def _check_loop(loop: asyncio.AbstractEventLoop | None) -> asyncio.AbstractEventLoop:
    running = asyncio.get_running_loop()
    if loop is not None and loop is not running:
        raise ValueError("The 'loop' argument must be the running event loop (or None)")
    return running


def _codec_factory(
    codec: type[Codec] | None, extra_serializers: Iterable[SerializerFactory]
) -> Callable[[], Codec]:
    codec_cls = DEFAULT_CODEC if codec is None else codec
    if not (isinstance(codec_cls, type) and issubclass(codec_cls, Codec)):
        raise TypeError(f"codec must be a Codec subclass, not {codec_cls!r}")
    serializers = tuple(extra_serializers)

    def make_codec() -> Codec:
        instance = codec_cls()
        for get_serializer in serializers:
            instance.add_serializer(*get_serializer())
        return instance

    return make_codec


def _tcp_address(addr: Sequence[Any]) -> tuple[str | None, int]:
    if len(addr) != 2:
        raise ValueError(f"A TCP address must be a (host, port) tuple, got {addr!r}")
    host, port = addr
    return host, port


async def open_connection(
    addr: Address,
    *,
    loop: asyncio.AbstractEventLoop | None = None,
    codec: type[Codec] | None = None,
    extra_serializers: Iterable[SerializerFactory] = (),
    timeout: float | None = 0,  # noqa: ASYNC109 (the spec's retry timeout)
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    dead_peer_timeout: float | None = None,
    **kwds: Any,
) -> Channel:
    """Connect to *addr* and return a :class:`Channel`.

    Args:
        addr: A ``(host, port)`` tuple for TCP (IPv4 or IPv6), a path for a unix
            domain socket, or a :class:`~aiomas.local_queue.LocalQueue`.
        loop: Accepted for compatibility; must be ``None`` or the running loop.
        codec: The :class:`~aiomas.codecs.Codec` subclass to use (default:
            :data:`DEFAULT_CODEC`).
        extra_serializers: Callables that return ``(type, serialize,
            deserialize)`` tuples for :meth:`~aiomas.codecs.Codec.add_serializer`.
        timeout: ``0`` tries once; a number of seconds keeps trying for that
            long (while nobody listens, or the network or host cannot be
            reached) and also bounds each attempt; ``None`` tries forever.
        max_frame_size: The largest payload accepted from the peer.
        dead_peer_timeout: For TCP (and TLS): close the connection when the
            peer has not acknowledged data sent to it for this many seconds,
            or, while nothing is sent, has not answered keepalive probes for
            about this long (so a vanished host or a cut link ends calls with
            :class:`ConnectionResetError` instead of letting them wait for
            the operating system's 15 minutes or forever).  ``None`` (the
            default) leaves it to the operating system.
        **kwds: Passed to :meth:`asyncio.loop.create_connection` or
            :meth:`~asyncio.loop.create_unix_connection` (e.g. ``ssl``).

    Raises:
        ConnectionRefusedError: if nobody listens at a TCP address or LocalQueue
            (after *timeout*).
        FileNotFoundError: if the unix socket does not exist (after *timeout*).
        TimeoutError: if an attempt did not finish within *timeout* (and no
            attempt before it failed otherwise).
        OSError: for other errors, e.g. an unreachable network (after
            *timeout*).
        ValueError: if *dead_peer_timeout* is not a positive finite number.
    """
    running = _check_loop(loop)
    make_codec = _codec_factory(codec, extra_serializers)
    _check_dead_peer_timeout(dead_peer_timeout)

    def factory() -> ChannelProtocol:
        return ChannelProtocol(
            make_codec(),
            max_frame_size=max_frame_size,
            dead_peer_timeout=dead_peer_timeout,
        )

    connect: Callable[[], Awaitable[tuple[asyncio.BaseTransport, Any]]]
    if isinstance(addr, local_queue.LocalQueue):
        lq = addr

        def connect() -> Awaitable[tuple[asyncio.BaseTransport, Any]]:
            return local_queue.create_connection(factory, lq, **kwds)

    elif isinstance(addr, str | os.PathLike):
        path = os.fspath(addr)

        def connect() -> Awaitable[tuple[asyncio.BaseTransport, Any]]:
            return running.create_unix_connection(factory, path, **kwds)

    else:
        host, port = _tcp_address(addr)
        if not isinstance(host, str):
            raise ValueError(f"A client needs a host name or address, got {addr!r}")

        def connect() -> Awaitable[tuple[asyncio.BaseTransport, Any]]:
            return running.create_connection(factory, host, port, **kwds)

    deadline = None if timeout is None else running.time() + timeout
    delay = _RETRY_DELAY_MIN
    previous: OSError | None = None  # what the last attempt but one met
    while True:
        try:
            if deadline is None or timeout == 0:
                _transport, protocol = await connect()
            else:
                attempt_time = max(deadline - running.time(), _RETRY_DELAY_MIN)
                _transport, protocol = await asyncio.wait_for(connect(), attempt_time)
            break
        except OSError as exc:
            left = None if deadline is None else deadline - running.time()
            if not _should_retry(exc) or (left is not None and left <= 0):
                if isinstance(exc, TimeoutError) and previous is not None:
                    # The deadline cut the last attempt short: what the ones
                    # before met says more (e.g. that nobody listens).
                    exc = previous
                logger.info(
                    "Connecting to %s failed: %s", addr, exc, extra={"peer": addr}
                )
                raise exc
            previous = exc
            if left is not None:
                delay = min(delay, left)
            logger.debug(
                "Connecting to %s failed (%s); retrying in %.2fs",
                addr,
                exc,
                delay,
                extra={"peer": addr},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_DELAY_MAX)
    assert isinstance(protocol, ChannelProtocol)
    assert protocol.channel is not None
    return protocol.channel


async def start_server(
    addr: Address,
    client_connected_cb: ClientConnectedCallback,
    *,
    loop: asyncio.AbstractEventLoop | None = None,
    codec: type[Codec] | None = None,
    extra_serializers: Iterable[SerializerFactory] = (),
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    dead_peer_timeout: float | None = None,
    **kwds: Any,
) -> asyncio.AbstractServer:
    """Start a server listening on *addr*; call *client_connected_cb* for every
    client that connects.

    Every connection gets its own codec instance and :class:`Channel`, which is
    passed to *client_connected_cb*.  If the callback is a coroutine function,
    it runs as a task; when it raises (other than :class:`ConnectionError`), the
    error is logged and the connection is closed.

    Args:
        addr: A ``(host, port)`` tuple for TCP, a path for a unix domain socket,
            or a :class:`~aiomas.local_queue.LocalQueue`.
        client_connected_cb: Function or coroutine function taking a Channel.
        loop: Accepted for compatibility; must be ``None`` or the running loop.
        codec: The :class:`~aiomas.codecs.Codec` subclass to use (default:
            :data:`DEFAULT_CODEC`).
        extra_serializers: Callables that return ``(type, serialize,
            deserialize)`` tuples for :meth:`~aiomas.codecs.Codec.add_serializer`.
        max_frame_size: The largest payload accepted from a client.
        dead_peer_timeout: Close a client's TCP connection when the client's
            host stops acknowledging data (or keepalive probes) for about
            this long (see :func:`open_connection`).
        **kwds: Passed to :meth:`asyncio.loop.create_server` or
            :meth:`~asyncio.loop.create_unix_server` (e.g. ``ssl``).

    Returns:
        The server; close it with ``server.close()`` and
        ``await server.wait_closed()``.
    """
    running = _check_loop(loop)
    make_codec = _codec_factory(codec, extra_serializers)
    FrameReader(max_frame_size)  # A bad limit fails here, not per connection.
    _check_dead_peer_timeout(dead_peer_timeout)

    def factory() -> ChannelProtocol:
        return ChannelProtocol(
            make_codec(),
            client_connected_cb,
            max_frame_size=max_frame_size,
            dead_peer_timeout=dead_peer_timeout,
        )

    if isinstance(addr, local_queue.LocalQueue):
        return await local_queue.create_server(factory, addr, **kwds)
    if isinstance(addr, str | os.PathLike):
        return await running.create_unix_server(factory, os.fspath(addr), **kwds)
    host, port = _tcp_address(addr)
    return await running.create_server(factory, host, port, **kwds)
