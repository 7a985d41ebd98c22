"""Request-reply channels: the lowest layer of aiomas.

A :class:`Channel` sends requests and waits for their replies, and receives the
peer's requests (:class:`Request`) to answer them.  Messages are encoded by a
:class:`~aiomas.codecs.Codec` and framed as described in :mod:`aiomas.wire`.
:class:`ChannelProtocol` is the thin asyncio adapter between a transport (TCP, unix
socket, TLS or :mod:`~aiomas.local_queue`) and the channel.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import inspect
import itertools
import logging
import math
import os
import sys
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Final, Self, TypeAlias, TypeVar, cast

from aiomas import local_queue, tracing
from aiomas._connect import (
    check_dead_peer_timeout,
    connect_with_retries,
    detect_dead_peer,
    opener,
    tcp_address,
)
from aiomas._guards import guarded, stops_the_process, without_tracebacks
from aiomas.codecs import JSON, Codec
from aiomas.deadlines import Clock, Deadline
from aiomas.exceptions import (
    ConnectionLostError,
    DeadlineExceeded,
    ProtocolError,
    ProtocolResetError,
    RemoteException,
    SerializationError,
)
from aiomas.nats import NatsEndpoint
from aiomas.protocol import (
    JOIN_LIMIT,
    JOINED_WRITE_LIMIT,
    CancelReceived,
    Connection,
    Event,
    ExtendedRequestReceived,
    FailureReceived,
    ProtocolViolation,
    ReplyUndecodable,
    RequestReceived,
    RequestRejected,
    ResultReceived,
    format_exception,
)
from aiomas.wire import DEFAULT_MAX_FRAME_SIZE, FrameReader

__all__ = [
    "DEFAULT_CODEC",
    "Address",
    "Channel",
    "ChannelProtocol",
    "ExtendedRequest",
    "Request",
    "open_connection",
    "start_server",
]

logger = logging.getLogger(__name__)

DEFAULT_CODEC: Final = JSON
"""Default codec: :class:`~aiomas.codecs.JSON`."""

Address: TypeAlias = (
    "tuple[str | None, int] | str | os.PathLike[str] | local_queue.LocalQueue"
    " | NatsEndpoint"
)
"""A ``(host, port)`` tuple (TCP), a unix socket path, a LocalQueue or a
container name on a NATS system (:class:`aiomas.nats.NatsEndpoint`)."""

SerializerFactory: TypeAlias = Callable[
    [], tuple[type, Callable[[Any], Any], Callable[[Any], Any]]
]
ClientConnectedCallback: TypeAlias = Callable[["Channel"], Awaitable[Any] | None]

# How long Channel.close() waits for the transport to flush before aborting it.
_CLOSE_TIMEOUT: Final = 10.0

# glibc's malloc keeps memory freed in the middle of its heap instead of
# giving it back: even with every connection freed at once, a server kept
# 20 to 25 MiB more after 10,000 short connections (each with buffers of
# 64 KiB and more), for good.  So a while after connections ended, it is asked
# to give it back -- at most once per this many seconds (it takes about 1 ms
# per 10 MiB freed).  The interval is in each loop's own time, so that a loop
# on virtual time (aiomas.simulation) sets the same timers in every run.
_TRIM_INTERVAL: Final = 1.0
# Per loop: the loop.time() before which no trim is scheduled.
_next_trims: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, float] = (
    weakref.WeakKeyDictionary()
)


def _find_malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # pragma: no cover (not glibc, e.g. musl)
        return None
    return trim


_malloc_trim = _find_malloc_trim()


def _trim_soon(loop: asyncio.AbstractEventLoop) -> None:
    """Have free heap memory returned to the system in a while (a connection
    has ended and freed its buffers)."""
    if _malloc_trim is None:
        return
    now = loop.time()
    if now < _next_trims.get(loop, -math.inf):
        return
    _next_trims[loop] = now + _TRIM_INTERVAL
    loop.call_later(_TRIM_INTERVAL, _malloc_trim, 0)


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
        """Reply to the request with *result*, and wait while the transport's
        write buffer is full (flow control).

        Raises:
            RuntimeError: if the request was already answered.
            SerializationError: if *result* cannot be encoded; the requester then
                gets a failure reply that says so.
            ConnectionResetError: if the connection is closed.
        """
        self.reply_nowait(result)
        protocol = self._protocol
        # (What drain() checks first, inline: every answer comes here, and
        # it rarely has to wait.)
        if protocol.writing_paused or protocol.is_closed():
            await protocol.drain()

    async def fail(self, exception: BaseException) -> None:
        """Answer the request with a failure described by *exception*, and
        wait while the transport's write buffer is full (flow control).

        The requester gets a :class:`~aiomas.exceptions.RemoteException` whose
        traceback is the text of *exception* (and its traceback, if it was raised).

        Raises:
            RuntimeError: if the request was already answered.
            ConnectionResetError: if the connection is closed.
        """
        self.fail_nowait(exception)
        await self._protocol.drain()

    def reply_nowait(self, result: Any) -> None:
        """Reply with *result* now, without waiting for flow control (what
        :mod:`aiomas.rpc` does: it holds requests back instead).

        Raises:
            RuntimeError: if the request was already answered.
            SerializationError: if *result* cannot be encoded (or ValueError if
                it is too long for a frame); the requester then gets a failure
                reply that says so.
            ConnectionResetError: if the connection is closed.
        """
        # (What _start_answer() does, inlined for the reply to every call.)
        if self._answered:
            raise RuntimeError(f"Request {self.message_id} was already answered")
        protocol = self._protocol
        core = protocol.core
        if core.closed:
            raise protocol.connection_error()
        self._answered = True
        core.send_result(self.message_id, result)

    def fail_nowait(self, exception: BaseException) -> None:
        """Answer with a failure described by *exception* now (see
        :meth:`reply_nowait` and :meth:`fail`).

        Raises:
            RuntimeError: if the request was already answered.
            ConnectionResetError: if the connection is closed.
        """
        core = self._start_answer()
        core.send_failure(self.message_id, format_exception(exception))

    def _start_answer(self) -> Connection:
        if self._answered:
            raise RuntimeError(f"Request {self.message_id} was already answered")
        protocol = self._protocol
        if protocol.core.closed:
            raise protocol.connection_error()
        self._answered = True
        return protocol.core


class ExtendedRequest(Request):
    """A request that came with metadata of the wire extension (see
    :doc:`/deadlines`): a :class:`Request` with :attr:`deadline` and
    :attr:`meta`.  You don't create requests yourself."""

    __slots__ = ("deadline", "meta")

    def __init__(
        self,
        content: Any,
        message_id: int,
        protocol: ChannelProtocol,
        deadline: float | None,
        meta: dict[str, Any],
    ) -> None:
        super().__init__(content, message_id, protocol)
        self.deadline = deadline
        """The seconds left for it when it was passed on: what the requester
        gave us (relative to its arrival), less the time it was held back
        (see :attr:`Channel.deadline_clock`); or ``None``."""
        self.meta = meta
        """All of its metadata."""


class _TracedReplies(Request):
    """The answers of a request on a traced channel are recorded."""

    __slots__ = ()

    def reply_nowait(self, result: Any) -> None:
        protocol = self._protocol
        try:
            super().reply_nowait(result)
        except (SerializationError, ValueError) as exc:
            _record_answer(protocol, self.message_id, exc, None)
            raise
        _record_answer(protocol, self.message_id, None, result)

    def fail_nowait(self, exception: BaseException) -> None:
        super().fail_nowait(exception)
        _record_answer(self._protocol, self.message_id, exception, None)


def _record_answer(
    protocol: ChannelProtocol,
    message_id: int,
    failure: BaseException | None,
    result: Any,
) -> None:
    channel = protocol.channel
    state = None if channel is None else channel.tracing
    if state is not None:
        state.answered(message_id, failure, protocol.core.sent_size, result)


class _TracedRequest(_TracedReplies):
    __slots__ = ()


class _TracedExtendedRequest(ExtendedRequest, _TracedReplies):
    __slots__ = ()


class Channel:
    """A request-reply channel between two endpoints.

    Returned by :func:`open_connection` and passed to the callback of
    :func:`start_server`.  Don't create channels yourself.

    The messages themselves are made and read by the connection's sans-I/O
    core (:class:`aiomas.protocol.Connection`, ``protocol.core``); the channel
    keeps the futures of its requests and the requests waiting for
    :meth:`recv`.

    Args:
        protocol: The :class:`ChannelProtocol` of the connection.
        codec: The codec instance that encodes and decodes messages.
        transport: The asyncio transport of the connection.
        loop: The event loop the connection runs in.
    """

    __slots__ = (
        "__weakref__",
        "_clear_scheduled",
        "_closed_error",
        "_core",
        "_held_cancels",
        "_held_since",
        "_incoming",
        "_peername",
        "_recv_waiter",
        "_resume_in_read",
        "_resume_later",
        "cancel_handler",
        "codec",
        "deadline_clock",
        "extended",
        "loop",
        "protocol",
        "request_handler",
        "tracing",
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
        self.loop = loop
        """The event loop of this channel (read it, don't set it)."""
        self._core = protocol.core
        self._peername = transport.get_extra_info("peername")
        self._incoming: deque[Request] = deque()  # for recv()
        self._recv_waiter: asyncio.Future[None] | None = None
        # Resuming recv() within the read saves a pass of asyncio's own loop,
        # written in Python; uvloop's passes cost less than the waiter does
        # (measured: 2 to 3 % fewer calls per second with it there).
        self._resume_in_read = isinstance(loop, asyncio.BaseEventLoop)
        # Set when a message (a reply, a cancel, a request in a read of
        # several) has woken a task that has not run yet: the tasks of later
        # messages then resume after it (cleared once it has, see
        # _woke_a_task()).
        self._resume_later = False
        self._clear_scheduled = False
        self._closed_error: BaseException | None = None
        self.request_handler: Callable[[Request], None] | None = None
        """Set by :meth:`set_request_handler`."""
        # The two messages of every call skip the core's event objects (the
        # core forgets its receivers when the connection ends).
        self._core.on_request = self._request_arrived
        self._core.on_request_with_meta = self._request_with_meta_arrived
        self._core.on_result = self._wake
        self.extended = False
        """Whether the peer agreed to the wire extension (see
        :meth:`offer_extensions`, :meth:`take_offer`); read it, don't set
        it."""
        self.cancel_handler: Callable[[int, bool], None] | None = None
        """Called with ``(message_id, held)`` when the peer cancels its
        request *message_id* (wire extension only); *held* says the request
        never left the core (see :class:`aiomas.protocol.CancelReceived`).
        Set by :mod:`aiomas.rpc`."""
        self.tracing: tracing.ConnectionTrace | None = None
        """The recorder of this connection while it is traced (see
        :meth:`start_tracing`), else ``None``."""
        self.deadline_clock: Clock | None = None
        """The clock of the deadlines of requests served (set by
        :class:`aiomas.rpc.RpcClient`; ``None``: the event loop's time).  A
        request held back while writing was paused (see
        :meth:`set_request_handler`) reaches the handler with the time it
        was held, on this clock, taken off its
        :attr:`ExtendedRequest.deadline`."""
        # When the requests that the core holds back arrived, oldest first,
        # and the ids of held ones the peer cancelled whose times are still
        # in there (see note_held_requests()); made when one is held.
        self._held_since: deque[float] | None = None
        self._held_cancels: list[int] | None = None

    def __repr__(self) -> str:
        state = "closed" if self._closed_error is not None else "open"
        return f"<Channel to {self._peername!r} ({state})>"

    @property
    def peername(self) -> Any:
        """The address of the peer, as the transport reports it."""
        return self._peername

    @property
    def closed(self) -> bool:
        """Whether the connection has ended."""
        return self._closed_error is not None

    @property
    def waiting_for_replies(self) -> int:
        """How many of our requests wait for their reply.

        A request whose future was cancelled counts until its late reply
        arrives (or the connection ends) -- except one of
        :meth:`send_cancellable` given up (cancelled, or its deadline passed)
        while the peer agreed to the extension's feature ``"cancel"``: the
        peer is sent a cancel for it, and it no longer counts."""
        return self._core.waiting_for_replies

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
            raise self.connection_error()
        if self.tracing is not None:
            return self._send_traced(content)
        # The core keeps the future with the request's id; a cancelled one
        # stays until its reply arrives (and is dropped quietly) or the
        # connection ends.
        # A call made while no other waits may resume its caller within the
        # read of its reply (see _Resumable); with more in flight, a read
        # brings several replies and the plain future costs less.
        future: asyncio.Future[Any] = (
            _Resumable(loop=self.loop)
            if self._resume_in_read and not self._core.pending
            else self.loop.create_future()
        )
        # (The core writes it, or gathers it with the replies of the read
        # being handled.)
        self._core.send_request(content, future)
        protocol = self.protocol
        if protocol.reading_paused:
            # We stopped reading because the peer did not read our replies;
            # now we wait for a reply of our own and must read again.
            protocol.update_reading()
        return future

    # The wire extension (see docs/deadlines.rst): new methods only, so that
    # the plain path above stays as it is.

    def offer_extensions(self) -> asyncio.Future[Any]:
        """Offer the wire extension to the peer (see
        :meth:`aiomas.protocol.Connection.offer_extensions`).

        Only for a peer that serves RPC: the offer is an RPC call to a
        reserved path.  Returns the future of the probe; when it is done,
        :attr:`extended` says whether the peer agreed (a failure reply or a
        closed connection leave the channel plain; the future then keeps
        that error, retrieved).

        Raises:
            ConnectionResetError: if the channel is already closed.
        """
        if self._closed_error is not None:
            raise self.connection_error()
        future = self.loop.create_future()
        self._core.offer_extensions(future)
        future.add_done_callback(self._offer_answered)
        return future

    def _offer_answered(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        self.extended = bool(self._core.offer_answered(future.result()))

    def take_offer(self, request: Request) -> bool:
        """If *request* is the peer's offer of the wire extension, answer it,
        agree and return ``True`` (the request is then answered); else return
        ``False`` (see :meth:`aiomas.protocol.Connection.take_offer`)."""
        if isinstance(request, ExtendedRequest) or self._closed_error is not None:
            return False
        if not self._core.take_offer(request.message_id, request.content):
            return False
        self.extended = bool(self._core.extensions)
        return True

    def send_cancellable(
        self, content: Any, deadline: Deadline | None = None
    ) -> asyncio.Future[Any]:
        """Send a request like :meth:`send`, bounded by *deadline* and
        cancelled on the peer when given up.

        When *deadline* passes first, the future fails with
        :class:`~aiomas.exceptions.DeadlineExceeded` (at once if it has
        passed already: then nothing is sent).  If the peer agreed to the
        wire extension, the request carries the time left, and when the
        future is cancelled or its deadline passes, the peer gets a cancel
        for it.  Without the extension the deadline is ours alone and
        nothing more is sent.

        Raises:
            SerializationError, ValueError, ConnectionResetError: see
                :meth:`send`.
        """
        if self._closed_error is not None:
            raise self.connection_error()
        time_left = None
        if deadline is not None:
            time_left = deadline.remaining()
            if time_left <= 0:
                failed = self.loop.create_future()
                failed.set_exception(deadline.exceeded())
                return failed
            if time_left == math.inf:
                time_left = None  # (no limit for the peer either)
        core = self._core
        state = self.tracing
        traced = None if state is None else state.start_call(content)
        meta = None
        if traced is not None:
            assert state is not None
            meta = state.trace_meta(*traced)
        # (Tells us when it is cancelled: no callback for every reply.)  As
        # in send(): alone in flight, it may resume its caller within the read
        # of the reply.
        call = (
            _ResumableCall(loop=self.loop)
            if self._resume_in_read and not core.pending and state is None
            else _CancellableCall(loop=self.loop)
        )
        call.channel = self
        call.deadline = deadline
        call.plain = False
        try:
            if self.extended:
                msg_id = core.send_request_with_meta(
                    content, call, deadline=time_left, trace=meta
                )
            else:
                msg_id = core.send_request(content, call)
        except BaseException:
            if traced is not None:
                assert state is not None
                state.call_failed(traced[0])
            raise
        call.message_id = msg_id
        if traced is not None:
            assert state is not None
            state.call_sent(*traced, call, msg_id, core.sent_size, content)
        # (The core writes it, or gathers it with the replies of the read
        # being handled.)
        protocol = self.protocol
        if protocol.reading_paused:
            protocol.update_reading()
        if deadline is not None:
            task = _current_task(self.loop)  # (no getpid() on Python 3.11)
            if task is not None and deadline.task is task:
                # The deadline's timer cancels this task, and with it the
                # call -- unless the call outlives the task's guard.
                deadline.guard(call)
            else:
                # No timer cancels the task that made the call when the
                # deadline passes (e.g. a task started inside a deadline
                # scope): the call needs a timer of its own.
                call.unguarded()
        return call

    def _send_traced(self, content: Any) -> asyncio.Future[Any]:
        """:meth:`send` on a traced channel: recorded (as a call of
        :meth:`send_cancellable` is), and as plain as ever: cancelling the
        future tells the peer nothing."""
        call = self.send_cancellable(content)
        assert isinstance(call, _CancellableCall)  # (It has no deadline.)
        call.plain = True
        return call

    def give_up(self, message_id: int) -> None:
        """We gave up on our request *message_id*: if the peer agreed to the
        wire extension, tell it to cancel (see
        :meth:`aiomas.protocol.Connection.cancel_request`); otherwise its late
        reply is dropped when it comes."""
        self._core.cancel_request(message_id)

    def start_tracing(
        self,
        tracer: tracing.Tracer,
        *,
        addr: str | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """Record this connection's messages into *tracer* from now on (see
        :mod:`aiomas.tracing`); a second call changes where they go.

        Args:
            tracer: Where the records go.
            addr: This end's address in the records (default: the socket's).
            clock: A callable for the records' ``"clock"`` (e.g. a
                container's ``clock.time``), or ``None``.
        """
        state = self.tracing
        if state is not None:
            if state.tracer is not tracer:
                if state.opening is not None:
                    state.opening = None  # (It goes to the new tracer only.)
                if self._closed_error is None:
                    state.opened()
            state.tracer = tracer
            state.local = addr if addr is not None else state.local
            state.clock = clock if clock is not None else state.clock
            return
        if self._closed_error is not None:
            return
        core = self._core
        local = (
            addr
            if addr is not None
            else _address_text(self.transport.get_extra_info("sockname"))
        )
        self.tracing = state = tracing.ConnectionTrace(
            tracer, local, _address_text(self._peername), clock, lambda: core.extensions
        )
        core.measure_sizes()
        core.on_request = self._traced_request_arrived
        core.on_result = self._traced_result
        state.opened()

    def _traced_request_arrived(self, message_id: int, content: Any) -> None:
        # (The core's on_request receiver while traced.)
        self._deliver_traced(
            _TracedRequest(content, message_id, self.protocol),
            None,
            self._core.received_size,
        )

    def _wake(self, future: asyncio.Future[Any], result: Any) -> None:
        """Set *result* on *future* (unless it is done): the future of a call
        whose reply came (the core's ``on_result`` receiver, see
        ``__init__``), or what recv() waits on."""
        if (
            not self._resume_later
            and type(future) in _RESUMABLE_TYPES
            and not self._core.frames_waiting
            and _current_task(self.loop) is None
        ):
            # It came alone, after nothing that may have woken another task:
            # the task that awaits it runs now.
            _resume(future, result)
            return
        if future.done():
            # (Cancelled; or recv()'s, woken by a request of this read with
            # more frames, and the task takes all the read's requests.)
            return
        # Tasks that earlier messages woke run first, and the frames of a
        # read are handled before the task: in the loop's next pass.
        future.set_result(result)
        if not self._clear_scheduled:  # (else noted already)
            self._woke_a_task()

    def _traced_result(self, future: asyncio.Future[Any], content: Any) -> None:
        # (The core's on_result receiver while traced.)
        state = self.tracing
        if state is not None:
            state.reply_received(future, None, self._core.received_size, content)
        _set_result(future, content)
        self._woke_a_task()

    def _woke_a_task(self) -> None:
        """A message just woke a task, which runs in the loop's next pass:
        until it has, the tasks of later messages resume after it, not
        within their read (see _wake())."""
        self._resume_later = True
        if not self._clear_scheduled:
            self._clear_scheduled = True
            # (After the task's wakeup, which the message scheduled.  On
            # uvloop, where nothing resumes within a read, the flags stay.)
            if self._resume_in_read:
                self.loop.call_soon(self._woken_have_run)

    def _woken_have_run(self) -> None:
        self._clear_scheduled = False
        self._resume_later = False

    def _deliver_traced(
        self, request: Request, meta: dict[str, Any] | None, size: int | None
    ) -> None:
        """Record *request*, then deliver it in its trace context (calls made
        while serving it have it as their cause)."""
        state = self.tracing
        served = None
        if state is not None:
            served = state.request_received(
                request.message_id, request.content, meta, size
            )
        if state is None or served is None:
            self._deliver(request)
            return
        tokens = state.enter(served)
        try:
            self._deliver(request)
        finally:
            state.leave(tokens)

    def set_request_handler(self, handler: Callable[[Request], None]) -> None:
        """Pass every request to *handler* as soon as it arrives, instead of
        queueing it for :meth:`recv` (this is how :mod:`aiomas.rpc` serves).

        Requests already queued are passed to it at once.  *handler* must not
        raise; it answers each request (now or later).  While the transport's
        write buffer is full, requests are held back (up to
        :data:`aiomas.protocol.MAX_HELD_REQUESTS`, then refused) and passed on
        when it has drained.
        """
        if self._closed_error is None:
            self.request_handler = handler
        self._core.hold_requests = True
        incoming = self._incoming
        while incoming:
            handler(incoming.popleft())

    async def recv(self) -> Request:
        """Wait for the next request from the peer and return it.

        On asyncio's own event loop, a task waiting here for a request that
        arrives alone in a read resumes within that read (not in the loop's
        next pass), so that its answer leaves at once.

        Raises:
            ConnectionResetError: if the connection is (or gets) closed and no
                received request is left.
            RuntimeError: if another task is already waiting in :meth:`recv`.
        """
        while not self._incoming:
            if self._closed_error is not None:
                raise self.connection_error()
            if self._recv_waiter is not None:
                raise RuntimeError("Another task is already waiting in recv()")
            waiter: asyncio.Future[None] = (
                _Resumable(loop=self.loop)
                if self._resume_in_read
                else self.loop.create_future()
            )
            self._recv_waiter = waiter
            try:
                await waiter
            finally:
                self._recv_waiter = None
        return self._incoming.popleft()

    async def close(self) -> None:
        """Close the channel and wait until the connection is closed.

        What was sent before leaves first (including what is gathered after a
        read of several frames, see :meth:`ChannelProtocol.flush`, which
        closing the transport directly would drop).  Requests still waiting
        for a reply fail with :class:`ConnectionResetError`.
        """
        transport = self.transport
        if not transport.is_closing():
            self.protocol.flush()  # (What was just sent leaves first.)
            transport.close()
        if self.protocol.is_closed():
            return
        try:
            await asyncio.wait_for(self.protocol.wait_closed(), _CLOSE_TIMEOUT)
        except TimeoutError:
            logger.warning(
                "Aborting connection to %s: it did not close within %ss",
                self._peername,
                _CLOSE_TIMEOUT,
                extra={"peer": self._peername},
            )
            cast(asyncio.Transport, transport).abort()
            await self.protocol.wait_closed()

    async def wait_closed(self) -> None:
        """Wait until the connection has ended (without closing it)."""
        await self.protocol.wait_closed()

    def start_task(
        self,
        coro: Coroutine[Any, Any, _T],
        *,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[_T]:
        """Run *coro* in a task of the channel's loop (in *context*, as
        :meth:`asyncio.loop.create_task` does): the answer to a message just
        received (:mod:`aiomas.rpc` runs an exposed coroutine function so).

        On Python 3.12 and later, on asyncio's own loop with no task factory
        set, the task starts eagerly (see :class:`asyncio.Task`'s
        *eager_start*): its first step runs now, as a plain function would,
        and a coroutine that finishes without waiting never waits for the
        loop's next pass.  Not while another task runs (the message was fed
        from within one), and not while a task that an earlier message woke
        has yet to run: then it starts in the loop's next pass, after that
        one, so that tasks still run in the order of the messages that
        started or woke them (as :meth:`recv` resumes, see
        ``Channel._wake()``).
        """
        loop = self.loop
        if sys.version_info >= (3, 12):
            if (
                self._resume_in_read
                and not self._resume_later
                and _current_task(loop) is None
                and loop.get_task_factory() is None
            ):
                return asyncio.Task(coro, loop=loop, eager_start=True, context=context)
        return loop.create_task(coro, context=context)

    def connection_error(self) -> ConnectionResetError:
        """The error that calls on this channel raise once it is closed: a
        :class:`ConnectionResetError` if it was closed cleanly, a
        :class:`~aiomas.exceptions.ConnectionLostError` if the transport
        reported an error (its ``__cause__``), a
        :class:`~aiomas.exceptions.ProtocolResetError` if a protocol error
        ended it (its ``__cause__``)."""
        return _closed_error(self._closed_error, f"Connection to {self._peername}")

    # What ChannelProtocol tells the channel.

    def event_received(self, event: Event) -> None:
        """Handle an event of the core (called by :class:`ChannelProtocol`;
        not for users).  A :class:`~aiomas.protocol.ProtocolViolation` never
        gets here."""
        if type(event) is RequestReceived:
            self._request_arrived(event.message_id, event.content)
            return
        # (A reply wakes its caller, a cancel may cancel a task: see _wake().)
        self._resume_later = True
        if type(event) is ResultReceived:
            _set_result(event.token, event.content)
        elif type(event) is FailureReceived:
            future = event.token
            if self.tracing is not None:
                self.tracing.reply_received(
                    future, event.text, self._core.received_size
                )
            if not future.done():
                future.set_exception(RemoteException(self._peername, event.text))
        elif type(event) is ReplyUndecodable:
            future = event.token
            if self.tracing is not None:
                self.tracing.reply_received(
                    future, f"DecodeError: {event.error}", self._core.received_size
                )
            if not future.done():
                future.set_exception(event.error)
        elif type(event) is RequestRejected:
            self._log_rejected(event)
        elif type(event) is ExtendedRequestReceived:
            self._extended_request(event)
        elif type(event) is CancelReceived:
            if event.held:
                self.note_held_requests(cancelled=event.message_id)
            if self.tracing is not None:
                self.tracing.cancel_received(event.message_id)
            cancel_handler = self.cancel_handler
            if cancel_handler is not None:
                cancel_handler(event.message_id, event.held)
        self._woke_a_task()

    def _extended_request(
        self, event: ExtendedRequestReceived, size: int | None = -1
    ) -> None:
        self._request_with_meta_arrived(
            event.message_id, event.content, event.deadline, event.meta, size
        )

    def _request_with_meta_arrived(
        self,
        message_id: int,
        content: Any,
        deadline: float | None,
        meta: dict[str, Any],
        size: int | None = -1,
    ) -> None:
        # (The core's on_request_with_meta receiver: see Channel.__init__.)
        # *size* is -1 while the frame was just decoded, None if unknown.
        if self.tracing is None:
            self._deliver(
                ExtendedRequest(content, message_id, self.protocol, deadline, meta)
            )
            return
        request = _TracedExtendedRequest(
            content, message_id, self.protocol, deadline, meta
        )
        if size == -1:
            size = self._core.received_size
        self._deliver_traced(request, meta, size)

    def _request_arrived(self, message_id: int, content: Any) -> None:
        # (The core's on_request receiver: see Channel.__init__.  What
        # _deliver() does, with a frame less for every request.)
        handler = self.request_handler
        if handler is not None:
            handler(Request(content, message_id, self.protocol))
            return
        self._incoming.append(Request(content, message_id, self.protocol))
        waiter = self._recv_waiter
        if waiter is not None:
            self._wake(waiter, None)

    def _deliver(self, request: Request) -> None:
        """Pass *request* to the request handler, or queue it for recv()."""
        handler = self.request_handler
        if handler is not None:
            handler(request)
            return
        self._incoming.append(request)
        waiter = self._recv_waiter
        if waiter is not None:
            self._wake(waiter, None)

    def _log_rejected(self, event: RequestRejected) -> None:
        peer = self._peername
        extra = {"peer": peer, "message_id": event.message_id}
        if event.reason == "refused":
            logger.warning(
                "Refusing requests from %s: %s requests wait for the peer to "
                "read its replies",
                peer,
                self._core.held_requests,
                extra=extra,
            )
        elif event.reason == "undecodable":
            logger.warning(
                "Request %s from %s: %s",
                event.message_id,
                peer,
                event.text.removeprefix("SerializationError: ").rstrip("\n"),
                extra=extra,
            )
        elif logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "Request %s from %s is malformed", event.message_id, peer, extra=extra
            )

    def deliver_held_requests(self) -> None:
        """Pass requests held back while writing was paused to the request
        handler, until writing pauses again (called by
        :class:`ChannelProtocol`).  A request with a deadline gets what is
        left of it (see :attr:`deadline_clock`)."""
        handler = self.request_handler
        core = self._core
        self.note_held_requests()  # (Any that came since writing resumed.)
        while handler is not None and self._closed_error is None:
            held = core.next_held_request()
            if held is None:
                break
            arrived = self._held_arrival(held.message_id)
            if type(held) is ExtendedRequestReceived:
                deadline = held.deadline
                if deadline is not None and arrived is not None:
                    waited = self._deadline_time() - arrived
                    deadline = max(0.0, deadline - waited)
                # (Its size is no longer known.)
                self._request_with_meta_arrived(
                    held.message_id, held.content, deadline, held.meta, None
                )
            elif self.tracing is not None:
                self._deliver_traced(
                    _TracedRequest(held.content, held.message_id, self.protocol),
                    None,
                    None,
                )
            else:
                handler(Request(held.content, held.message_id, self.protocol))
        if not core.held_requests:
            self._held_since = self._held_cancels = None

    def note_held_requests(self, cancelled: int | None = None) -> None:
        """Note that the requests the core held back since the last call
        arrived now (called after a read while writing is paused; not for
        users).  *cancelled*: the id of a held request the peer has just
        cancelled (the core no longer holds it)."""
        count = self._core.held_requests + (cancelled is not None)
        since = self._held_since
        cancels = self._held_cancels
        if since is None or cancels is None:
            if not count:
                return
            since = self._held_since = deque()
            cancels = self._held_cancels = []
        new = count - (len(since) - len(cancels))
        if new > 0:
            since.extend(itertools.repeat(self._deadline_time(), new))
        if cancelled is not None:
            cancels.append(cancelled)

    def _held_arrival(self, message_id: int) -> float | None:
        """When held request *message_id*, the oldest still held, arrived (or
        ``None`` if unknown)."""
        since = self._held_since
        if not since:
            return None
        cancels = self._held_cancels
        if cancels:
            # The peer numbers its requests in the order it sends them: the
            # cancelled ones with lower ids arrived before this one.
            earlier = [msg_id for msg_id in cancels if msg_id < message_id]
            for _ in earlier:
                if since:
                    since.popleft()
            cancels[:] = [msg_id for msg_id in cancels if msg_id >= message_id]
        return since.popleft() if since else None

    def _deadline_time(self) -> float:
        clock = self.deadline_clock
        return self.loop.time() if clock is None else clock.time()

    def connection_lost(self, reason: BaseException) -> None:
        """The connection has ended for *reason*: fail the requests waiting
        for replies and wake :meth:`recv` (called by :class:`ChannelProtocol`)."""
        if self._closed_error is not None:
            return
        # Without its traceback: that would keep the frames it passed through
        # (the transport's, with a view of our receive buffer) alive as long
        # as this channel.
        self._closed_error = without_tracebacks(reason)
        if self.tracing is not None:
            clean = isinstance(reason, _CleanClose)
            self.tracing.closed(None if clean else reason)
        for future in self._core.connection_lost().values():
            if not future.done():
                # Each its own instance: tracebacks added while one caller
                # handles it must not leak into another caller's.
                future.set_exception(self.connection_error())
        # No request comes any more; the handler (e.g. an RpcClient that holds
        # this channel) must not keep a reference cycle alive.
        self.request_handler = None
        self._held_since = self._held_cancels = None
        waiter = self._recv_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Resumable(asyncio.Future[Any]):
    """A future whose awaiting task :meth:`resume` can resume at once, within
    the read that brings what it waits for, instead of in the loop's next pass
    (one pass through the selector less per message): the future of a call
    made while no other call waited for its reply (see :meth:`Channel.send`),
    and what :meth:`Channel.recv` waits on.  The channel resumes it so only
    for a message that came alone, after nothing that may have woken another
    task, and while no task runs (see ``Channel._wake()``), so that tasks
    still run in the order of the messages that woke them.

    It is an :class:`asyncio.Future` in every other way (callers pass it to
    :func:`asyncio.gather`, ``wait_for()`` and ``add_done_callback()``).  It
    keeps its first done-callback (the awaiting task's wakeup) to itself and
    schedules it first when it is done, so that callbacks run in the order
    they were added.  Only the methods a task or a caller of the future use
    are in Python; awaiting it is the C future's own path.
    """

    _wakeup: tuple[Callable[[Any], object], Any] | None = None
    _more_callbacks = False

    def add_done_callback(
        self, fn: Callable[[Self], object], *, context: Any = None
    ) -> None:
        if self._wakeup is None and not self._more_callbacks and not _future_done(self):
            self._wakeup = (fn, context)
            return
        self._more_callbacks = True
        super().add_done_callback(fn, context=context)

    def remove_done_callback(self, fn: Callable[[Self], object]) -> int:
        removed = 0
        wakeup = self._wakeup
        if wakeup is not None and wakeup[0] == fn:
            self._wakeup = None
            removed = 1
        return removed + super().remove_done_callback(fn)

    def set_result(self, result: Any) -> None:
        if not self.done():
            self._schedule_wakeup()
        super().set_result(result)

    def set_exception(self, exception: type | BaseException) -> None:
        if not self.done():
            self._schedule_wakeup()
        super().set_exception(exception)

    def cancel(self, msg: Any = None) -> bool:
        if self.done():
            return False
        self._schedule_wakeup()
        return super().cancel(msg)

    def _schedule_wakeup(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            self.get_loop().call_soon(wakeup[0], self, context=wakeup[1])

    def resume(self, result: Any) -> None:
        """Set *result* and run the awaiting task's wakeup now; the caller
        checked that no task is running.  With other callbacks, or none,
        this is :meth:`set_result`; on a done (cancelled) future, nothing."""
        if _future_done(self):
            return
        wakeup = self._wakeup
        if wakeup is None or self._more_callbacks:
            self.set_result(result)
            return
        self._wakeup = None
        _future_set_result(self, result)  # (No callback left to schedule.)
        callback, context = wakeup
        try:
            if context is None:
                callback(self)
            else:
                context.run(callback, self)
        except (KeyboardInterrupt, SystemExit) as exc:
            # The task raised it (and keeps it as its exception).  It ends
            # the loop, as from the task's own step -- not from within the
            # read, where a transport may catch it.
            self.get_loop().call_soon(_reraise, exc)


_T = TypeVar("_T")
_current_task: Final = asyncio.current_task
_future_set_result: Final = asyncio.Future.set_result
_future_done: Final = asyncio.Future.done  # (no bound method to make)


def _reraise(exc: BaseException) -> None:
    raise exc


def _address_text(address: Any) -> str | None:
    """A socket address as text for trace records: ``host:port`` or a path."""
    if address is None or address == "":
        return None
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return str(address)


def _set_result(future: asyncio.Future[Any], content: Any) -> None:
    """Give *future* the content of its reply, unless it is done (cancelled):
    for a traced channel and for events (the plain path is ``Channel._wake``)."""
    if not future.done():
        future.set_result(content)


class _CancellableCall(asyncio.Future[Any]):
    """The future of a call made by :meth:`Channel.send_cancellable`:
    cancelling it tells the peer (with the wire extension), and once its
    deadline has passed it fails with nothing but
    :class:`~aiomas.exceptions.DeadlineExceeded`."""

    __slots__ = ("channel", "deadline", "message_id", "plain")

    channel: Channel
    deadline: Deadline | None
    message_id: int
    plain: bool  # (of a traced Channel.send(): cancelling it tells nobody)

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        if not self.plain:
            self.channel.give_up(self.message_id)
        return True

    def set_exception(self, exception: type | BaseException) -> None:
        deadline = self.deadline
        if (
            deadline is not None
            and not isinstance(exception, DeadlineExceeded)
            and deadline.expired()
        ):
            # Its deadline passed before the failure came (e.g. the peer's
            # own DeadlineExceeded, which its timer sent just before ours
            # fired): the caller learns the one thing that matters.
            error = deadline.exceeded()
            error.__cause__ = (
                exception if isinstance(exception, BaseException) else exception()
            )
            exception = error
        super().set_exception(exception)

    def unguarded(self) -> None:
        """Keep the deadline with a timer of its own (see
        :meth:`aiomas.deadlines.Deadline.guard`)."""
        deadline = self.deadline
        assert deadline is not None
        timer = deadline.call_at_expiry(self._expire, deadline)
        self.add_done_callback(lambda _: timer.cancel())

    def _expire(self, deadline: Deadline) -> None:
        if not self.done():
            self.set_exception(deadline.exceeded())
            self.channel.give_up(self.message_id)


class _ResumableCall(_CancellableCall, _Resumable):
    """The future of a call made by :meth:`Channel.send_cancellable` while no
    other call waited for its reply: a :class:`_CancellableCall` that the
    channel may resume within the read of its reply, as a
    :class:`_Resumable`."""

    __slots__ = ()


# The futures that Channel._wake() may resume within a read (their exact types).
_RESUMABLE_TYPES: Final = frozenset({_Resumable, _ResumableCall})
_resume: Final[Callable[[Any, Any], None]] = _Resumable.resume


class _UnansweredClose(ConnectionResetError):
    """The peer closed the connection before it answered any of our requests,
    as it does when it cannot decode them."""


class _CleanClose(ConnectionResetError):
    """The connection was closed, by us or by the peer, without an error."""


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _closed_error(reason: BaseException | None, what: str) -> ConnectionResetError:
    """The error for a call on a connection (*what*, for the message) that
    ended for *reason* (see Channel.connection_error())."""
    if isinstance(reason, ProtocolError):
        error: ConnectionResetError = ProtocolResetError(f"{what} closed: {reason}")
    elif isinstance(reason, _UnansweredClose):
        lost = reason.__cause__  # the transport's error, if it reported one
        if lost is None:
            return ConnectionResetError(f"{what} closed: {reason}")
        error = ConnectionLostError(f"{what} lost: {_describe(lost)}: {reason}")
        error.__cause__ = lost
        return error
    elif reason is None or isinstance(reason, _CleanClose):
        return ConnectionResetError(f"{what} closed")
    else:
        error = ConnectionLostError(f"{what} lost: {_describe(reason)}")
    error.__cause__ = reason
    return error


class ChannelProtocol(asyncio.BufferedProtocol):
    """The asyncio protocol that connects a transport with a :class:`Channel`.

    It feeds the bytes it reads into the connection's sans-I/O core
    (:attr:`core`), hands the core's events to the channel, and writes what the
    core has to send once per read (so replies to requests that arrived
    together leave in one write).

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
        check_dead_peer_timeout(dead_peer_timeout)
        self._dead_peer_timeout = dead_peer_timeout
        self.codec = codec
        self.core = core = Connection(codec, max_frame_size=max_frame_size)
        """The sans-I/O core of the connection
        (:class:`aiomas.protocol.Connection`)."""
        # The transport reads straight into the core's buffer (the
        # BufferedProtocol API's get_buffer()).
        self.get_buffer = core.get_buffer  # type: ignore[method-assign]
        # The channel, while the connection lasts; afterwards only a weak
        # reference, so that channel and protocol form no reference cycle and
        # are freed as soon as the user lets go of them.
        self._channel: Channel | None = None
        self._channel_ref: weakref.ref[Channel] | None = None
        self.transport: asyncio.BaseTransport | None = None
        self._write: Callable[[bytes | bytearray | memoryview], None] | None = None
        self._client_connected_cb = client_connected_cb
        # Holds the callback's task while it runs: asyncio keeps only weak
        # references to tasks.
        self._cb_task: asyncio.Future[Any] | None = None
        self.writing_paused = False
        """Whether the transport's write buffer is full (read it; don't set
        it)."""
        self.reading_paused = False
        """Whether we stopped reading: while our write buffer is full and we
        wait for no reply ourselves (see :meth:`update_reading`)."""
        self._dispatching = False  # handling the events of one read
        # What the callers woken by a read of several frames send, gathered
        # until they have run (see _gather_writes()); None when not gathering.
        self._gathered: list[bytes | bytearray | memoryview] | None = None
        self._gathered_size = 0
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._error: BaseException | None = None  # the peer's protocol error
        self._end: BaseException | None = None  # why the connection ended
        self._peer_closed = False  # (see _unanswered_close())

    @property
    def channel(self) -> Channel | None:
        """The :class:`Channel` of this connection: ``None`` before the
        connection is made, and after it is lost if nobody else holds it."""
        channel = self._channel
        if channel is None and self._channel_ref is not None:
            return self._channel_ref()
        return channel

    def connection_error(self) -> ConnectionResetError:
        """The error for calls on this connection once it has ended (see
        :meth:`Channel.connection_error`)."""
        channel = self.channel
        if channel is not None and channel.closed:
            return channel.connection_error()
        return _closed_error(self._error or self._end, "Connection")

    def is_closed(self) -> bool:
        """Whether the connection has been lost."""
        return self._closed.done()

    async def wait_closed(self) -> None:
        """Wait until the connection has been lost."""
        await asyncio.shield(self._closed)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Create the :class:`Channel` and start the client connected callback."""
        self.transport = transport
        # Duck typing: uvloop's transports do not subclass asyncio.Transport.
        self._write = cast(asyncio.WriteTransport, transport).write
        # The core writes what it has to send itself (see Connection.on_data).
        self.core.on_data = self._write
        if self._dead_peer_timeout is not None:
            detect_dead_peer(transport, self._dead_peer_timeout)
        channel = Channel(self, self.codec, transport, self._loop)
        self._channel = channel
        tracer = tracing.active()
        if tracer is not None:
            channel.start_tracing(tracer)
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
        except BaseException as exc:
            if stops_the_process(exc):
                raise
            logger.exception(
                "client_connected_cb failed for the connection from %s; closing it",
                channel.peername,
                extra={"peer": channel.peername},
            )
            transport.close()
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(guarded(result))
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

    def buffer_updated(self, nbytes: int) -> None:
        """Hand the bytes just read to the core and dispatch its events."""
        events = self.core.buffer_updated(nbytes)
        # Requests and results went to the receivers set in connection_made();
        # a lone frame that made no other event gives an empty tuple.
        if events and not self._events_arrived(events):
            return
        if self.writing_paused or self.reading_paused:
            self.update_reading()

    def data_received(self, data: bytes) -> None:
        """Hand *data* to the core and dispatch its events.

        Messages are framed by a 4-byte big-endian length header; the payload is
        ``[msg_type, msg_id, content]`` encoded with the codec.  Transports that
        support :class:`asyncio.BufferedProtocol` use :meth:`buffer_updated`
        instead.
        """
        events = self.core.receive_data(data)
        if events and not self._events_arrived(events):
            return
        if self.writing_paused or self.reading_paused:
            self.update_reading()

    def _events_arrived(self, events: Iterable[Event]) -> bool:
        """Dispatch the events of a read, and gather what the callers it
        woke send if it brought several frames; ``False`` if the peer broke
        the protocol."""
        several = self.core.frames_waiting > 1  # (Before they are looked at.)
        if not self._dispatch(events):
            return False
        if several and self._gathered is None:
            self._gather_writes()
        return True

    def _gather_writes(self) -> None:
        """A read brought several frames, so several callers were just woken
        (tasks waiting for replies, or in :meth:`Channel.recv`): gather what
        they send when they run, right after this, and write it in one go
        after them (one system call instead of one per message).

        The core's replies to the read's requests have been written already;
        :meth:`flush` ends the gathering (it is scheduled now, and called by
        :meth:`Channel.close` and :meth:`write`).
        """
        if self._write is None or self.core.closed:
            return
        self._gathered = []
        self.core.on_data = self._write_gathered
        self._loop.call_soon(self._flush_gathered)

    def _write_gathered(self, chunk: bytes | bytearray | memoryview) -> None:
        # (The core's on_data while gathering.)
        size = len(chunk)
        if size > JOIN_LIMIT or type(chunk) is memoryview:
            # A big payload (the core hands it out as a memoryview) or a big
            # chunk is not copied again: what came before it goes first.
            self._write_out()
            if self._write is not None:
                self._write(chunk)
            return
        if self._gathered_size + size > JOINED_WRITE_LIMIT:
            self._write_out()  # (It starts a new list.)
        gathered = self._gathered
        assert gathered is not None
        gathered.append(chunk)
        self._gathered_size += size

    def _write_out(self) -> None:
        gathered = self._gathered
        if not gathered:
            return
        self._gathered = []
        self._gathered_size = 0
        write = self._write
        if write is not None:
            write(gathered[0] if len(gathered) == 1 else b"".join(gathered))

    def flush(self) -> None:
        """Write what was gathered after a read of several frames (see
        :meth:`_gather_writes`) and write directly again.  Does nothing when
        nothing is gathered.

        Raises:
            What the transport's ``write()`` raises (the gathering has ended
            all the same).
        """
        gathered = self._gathered
        if gathered is None:
            return
        self._gathered = None
        self._gathered_size = 0
        write = self._write
        if write is None:
            return
        if not self.core.closed:
            self.core.on_data = write
        if gathered:
            write(gathered[0] if len(gathered) == 1 else b"".join(gathered))

    def _flush_gathered(self) -> None:
        # (Scheduled by _gather_writes(): the callers of the read have run.)
        try:
            self.flush()
        except Exception as exc:
            # E.g. somebody called the transport's write_eof() meanwhile: what
            # was gathered cannot leave, as a write of it then would not have.
            peer = self.channel.peername if self.channel is not None else None
            logger.warning(
                "Could not write to %s what was sent after a read: %r",
                peer,
                exc,
                extra={"peer": peer},
            )

    def _dispatch(self, events: Iterable[Event]) -> bool:
        """Dispatch the events of a read (the core writes the replies to its
        requests together when its last frame has been looked at).  Return
        ``False`` if the peer broke the protocol."""
        channel = self._channel
        assert channel is not None
        self._dispatching = True
        try:
            for event in events:
                if type(event) is ProtocolViolation:
                    self._fail(event.error)
                    return False
                channel.event_received(event)
        finally:
            self._dispatching = False
        return True

    def _fail(self, exc: ProtocolError) -> None:
        """The peer broke the protocol: log it and cut the connection."""
        channel = self.channel
        peer = channel.peername if channel is not None else None
        logger.warning("Closing connection to %s: %s", peer, exc, extra={"peer": peer})
        self._error = exc
        self._write = None  # Nothing more goes out to this peer either.
        if channel is not None:
            channel.connection_lost(exc)
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
        buffered = self.core.buffered
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
        reason: BaseException = self._error or unanswered or exc or _CleanClose()
        self._end = without_tracebacks(reason)
        channel = self._channel
        if channel is not None:
            channel.connection_lost(reason)
            self._channel_ref = weakref.ref(channel)
            self._channel = None
        else:
            self.core.connection_lost()
        self._write = None
        # asyncio's TLS protocol keeps our methods after the connection is
        # lost; holding its transport would make a reference cycle.
        self.transport = None
        _trim_soon(self._loop)
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(self.connection_error())
        if not self._closed.done():
            self._closed.set_result(None)

    def _unanswered_close(self, exc: Exception | None) -> _UnansweredClose | None:
        """The reason to give if the peer closed the connection before it
        answered any of our requests: it does so when it cannot decode them
        (and logs why), but a TLS server also does when it refuses our
        certificate."""
        core = self.core
        if (
            self._error is not None
            or self._channel is None
            or not (self._peer_closed or isinstance(exc, ConnectionResetError))
        ):
            return None
        waiting = core.waiting_for_replies
        if not waiting or waiting != core.requests_sent:
            return None  # No request, or the peer has answered some.
        ours = f"any of our {waiting} requests" if waiting > 1 else "our request"
        text = (
            f"the peer hung up without answering {ours}; if its log says that it "
            "cannot decode our messages, both sides must use the same codec "
            f"(this side uses {type(self.codec).__name__})"
        )
        if self.transport is not None and self.transport.get_extra_info("ssl_object"):
            text += ", or else it may have refused our TLS certificate"
        unanswered = _UnansweredClose(text)
        unanswered.__cause__ = exc
        return unanswered

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
        """The transport's write buffer is full.

        Requests for a request handler (RPC) are held back until writing
        resumes, and reading stops while this side waits for no reply itself,
        so that a peer that does not read its replies cannot make us buffer
        without bound.
        """
        assert not self.writing_paused
        self.writing_paused = True
        self.core.pause_writing()
        if not self._dispatching:
            self.update_reading()

    def resume_writing(self) -> None:
        """Wake everybody waiting in :meth:`drain`, and go on reading and
        handling the requests held back."""
        assert self.writing_paused
        self.writing_paused = False
        self.core.resume_writing()
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.update_reading()
        channel = self.channel
        if channel is not None and self.core.held_requests:
            # Not right here: a transport may call us from inside write().
            self._loop.call_soon(channel.deliver_held_requests)

    def update_reading(self) -> None:
        """Pause or resume reading as the core wants: reading stops while
        writing is paused and we wait for no reply (reading on would only bring
        more requests to answer); waiting for replies, we go on reading, so
        that two peers can never wait for each other."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        channel = self._channel
        if channel is not None and self.core.held_requests:
            # (Called after every read while writing is paused: the requests
            # it held back arrived now.)
            channel.note_held_requests()
        wanted = self.core.reading_wanted
        if wanted and self.reading_paused:
            self.reading_paused = False
            cast(asyncio.ReadTransport, transport).resume_reading()
        elif not wanted and not self.reading_paused:
            pause_reading = getattr(transport, "pause_reading", None)
            if pause_reading is not None:
                pause_reading()
                self.reading_paused = True

    async def drain(self) -> None:
        """Wait until the transport accepts more data (flow control).

        Raises:
            ConnectionResetError: if the connection is closed.
        """
        if self._closed.done():
            raise self.connection_error()
        if not self.writing_paused:
            return
        waiter = self._loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    async def write(self, len_bytes: bytes, content: bytes) -> None:
        """Write a frame (header *len_bytes* and payload *content*) and wait until
        the transport can take more data."""
        if self._write is None:
            raise self.connection_error()
        self.flush()  # (What was sent before goes first.)
        self._write(len_bytes + content)
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

    # A bad serializer (an unhashable key, a duplicate, a factory that raises or
    # returns no triple) fails here, when the server or connection is set up,
    # not at the first connection.
    make_codec()
    return make_codec


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
            reached) and bounds the whole of it, TCP connect and TLS
            handshake included; ``None`` tries forever.  With ``0`` or
            ``None``, an attempt is bounded only by *dead_peer_timeout*, or
            else by the operating system (unanswered TCP connection requests,
            about 2 minutes on Linux) and by asyncio's ``ssl_handshake_timeout``
            (60 s by default) -- a peer that accepts and then says nothing can
            hold the caller that long.
        max_frame_size: The largest payload accepted from the peer.
        dead_peer_timeout: For TCP (and TLS): close the connection when the
            peer has not acknowledged data sent to it for this many seconds,
            or, while nothing is sent, has not answered keepalive probes for
            about this long (so a vanished host or a cut link ends calls with
            :class:`ConnectionResetError` instead of letting them wait for
            the operating system's 15 minutes or forever).  It also bounds
            each connection attempt (TCP connect and TLS handshake).
            ``None`` (the default) leaves it to the operating system.
        **kwds: Passed to :meth:`asyncio.loop.create_connection` or
            :meth:`~asyncio.loop.create_unix_connection` (e.g. ``ssl``).

    Raises:
        ConnectionRefusedError: if nobody listens at a TCP address or LocalQueue
            (after *timeout*).
        FileNotFoundError: if the unix socket does not exist (after *timeout*).
        TimeoutError: if an attempt did not finish within *timeout* or
            *dead_peer_timeout* (and no attempt before it failed otherwise).
        OSError: for other errors, e.g. an unreachable network (after
            *timeout*).
        ValueError: if *dead_peer_timeout* is not a positive finite number.
    """
    running = _check_loop(loop)
    make_codec = _codec_factory(codec, extra_serializers)
    check_dead_peer_timeout(dead_peer_timeout)

    def factory() -> ChannelProtocol:
        return ChannelProtocol(
            make_codec(),
            max_frame_size=max_frame_size,
            dead_peer_timeout=dead_peer_timeout,
        )

    _transport, protocol = await connect_with_retries(
        opener(addr, factory, running, kwds),
        addr,
        retry_for=timeout,
        dead_peer_timeout=dead_peer_timeout,
        clock=running.time,
    )
    assert isinstance(protocol, ChannelProtocol)
    channel = protocol.channel
    if channel is None:  # Lost before we got here, and nobody holds it.
        raise ConnectionResetError(f"Connection to {addr!r} closed at once")
    return channel


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
    check_dead_peer_timeout(dead_peer_timeout)

    def factory() -> ChannelProtocol:
        return ChannelProtocol(
            make_codec(),
            client_connected_cb,
            max_frame_size=max_frame_size,
            dead_peer_timeout=dead_peer_timeout,
        )

    if isinstance(addr, local_queue.LocalQueue):
        return await local_queue.create_server(factory, addr, **kwds)
    if isinstance(addr, NatsEndpoint):
        return await addr.create_server(factory)
    if isinstance(addr, str | os.PathLike):
        return await running.create_unix_server(factory, os.fspath(addr), **kwds)
    host, port = tcp_address(addr)
    return await running.create_server(factory, host, port, **kwds)
