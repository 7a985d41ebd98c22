"""Remote procedure calls on top of request-reply channels.

Each end of an RPC connection is an :class:`RpcClient`.  Its :attr:`~RpcClient.remote`
attribute is a :class:`Proxy` for the peer's service; calling a proxy sends
``[path, args, kwargs]`` and returns an awaitable for the result.  An end may also
serve an *RPC service* of its own, so that calls go both ways.

An RPC service is an object with a ``router`` attribute that is a :class:`Router`.
Classes get one per instance from the :class:`Service` descriptor; dicts of
functions are wrapped in a :class:`ServiceDict`.  Routers map paths like
``"addition/add"`` to functions and can be nested.  Only functions marked with
:func:`expose` can be called.

Objects with a router can also be sent as arguments or results: they arrive as a
:class:`Proxy` through which the peer calls back over the same connection.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import math
import weakref
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

from aiomas import channel as channel_mod
from aiomas import protocol, tracing
from aiomas._guards import guarded, stops_the_process
from aiomas._routing import (
    Router,
    Service,
    ServiceDict,
    expose,
    router_of,
    short_repr,
)
from aiomas.channel import Address, Channel, ExtendedRequest, Request
from aiomas.deadlines import Clock, Deadline, LoopClock, context_with, current_deadline
from aiomas.exceptions import DeadlineExceeded, SerializationError
from aiomas.wire import FAILURE, RESULT

# Routing needs no connection and no loop: it lives in aiomas._routing, and its
# public names are part of this module's API (and of its documentation, which
# autodoc makes from __all__).
__all__ = [
    "Proxy",
    "Quorum",
    "Router",
    "RpcClient",
    "Service",
    "ServiceDict",
    "expose",
    "open_connection",
    "quorum",
    "rpc_service_process",
    "start_server",
]

logger = logging.getLogger(__name__)

# How many child proxies (sub-paths) a proxy keeps for reuse.
_MAX_CACHED_CHILDREN: Final = 256

# Results of these exact types are never awaitable: no need to ask inspect.
_PLAIN_TYPES: Final = frozenset(
    {type(None), bool, int, float, str, bytes, list, tuple, dict}
)


class Proxy:
    """Stands for a remote service or function at *path* on the peer of *channel*.

    Attribute access gives the proxy of a sub-path (cached); calling the proxy
    sends the call and returns an awaitable for the result.

    Args:
        channel: The :class:`~aiomas.channel.Channel` to the peer.
        path: The remote path (empty for the peer's root service).
    """

    __slots__ = ("__weakref__", "_channel", "_children", "_path")

    def __init__(self, channel: Channel, path: str) -> None:
        self._channel = channel
        self._path = path
        # Strong references: ``proxy.method(...)`` must not make a new child
        # proxy per call.  Bounded, for code that makes up names on the fly.
        self._children: dict[str, Proxy] | None = None

    def __getattr__(self, name: str) -> Proxy:
        """Return the proxy for *name* below this proxy's path."""
        if name.startswith("_"):
            raise AttributeError(name)
        children = self._children
        if children is None:
            children = self._children = {}
        child = children.get(name)
        if child is None:
            path = f"{self._path}/{name}" if self._path else name
            # Sub-paths are plain proxies, whatever subclass this one is.
            child = Proxy(self._channel, path)
            if len(children) >= _MAX_CACHED_CHILDREN:
                children.clear()
            children[name] = child
        return child

    def __call__(self, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        """Call the remote function; await the result to get its return value.

        Raises:
            SerializationError: if an argument cannot be encoded.
            ConnectionResetError: if the connection is already closed.

        Raises (when awaited):
            RemoteException: if the remote function raised (or does not exist).
            ConnectionResetError: if the connection closes before the reply.
            DeadlineExceeded: if the current deadline (see
                :func:`aiomas.deadline`) passes first.
        """
        channel = self._channel
        deadline = current_deadline()
        if deadline is None and not channel.extended:
            return channel.send([self._path, args, kwargs])
        return channel.send_cancellable([self._path, args, kwargs], deadline)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Proxy):
            return NotImplemented
        return self._channel is other._channel and self._path == other._path

    def __hash__(self) -> int:
        return hash((id(self._channel), self._path))

    def __repr__(self) -> str:
        return f"Proxy({self._channel.peername!r}, {self._path!r})"


class RpcClient:
    """One end of an RPC connection.

    Args:
        channel: The :class:`~aiomas.channel.Channel` to the peer.
        rpc_service: An RPC service to serve to the peer, or ``None``.
        extensions: Accept the peer's offer of the wire extension (deadlines
            and cancels that reach the peer, see :doc:`/deadlines`), which
            it makes with its first request; :meth:`offer_extensions` makes
            one.  Off by default: the connection then speaks exactly the
            plain wire format.
        clock: The clock of the deadlines of requests served (default: the
            event loop's, :class:`~aiomas.deadlines.LoopClock`); a container
            passes its own.
        trace: Record this connection's messages (see :mod:`aiomas.tracing`):
            a :class:`~aiomas.tracing.Tracer`, a directory or a sink.  The
            trace context reaches the peer only if both ends agree to the
            wire extension (*extensions*).
    """

    def __init__(
        self,
        channel: Channel,
        rpc_service: Any = None,
        *,
        extensions: bool = False,
        clock: Clock | None = None,
        trace: tracing.TraceTarget | None = None,
    ) -> None:
        self._channel = channel
        tracer = tracing.as_tracer(trace)
        if tracer is not None:
            channel.start_tracing(tracer, clock=None if clock is None else clock.time)
        self._clock = clock
        channel.deadline_clock = clock  # (for requests held back)
        # Calls that the peer may cancel (wire extension only), by message id.
        self._cancellable: dict[int, asyncio.Future[Any]] = {}
        self._offer: asyncio.Future[Any] | None = None
        self._router = None if rpc_service is None else router_of(rpc_service)
        # Tasks of user callbacks, and of exposed coroutines answering calls.
        # Dicts, not sets: they are cancelled in the order they were made, so
        # that a run on LocalQueue is the same in every process.
        self._tasks: dict[asyncio.Future[Any], None] = {}
        self._calls: dict[asyncio.Future[Any], None] = {}
        self._reset_callback: Callable[[BaseException], Any] | None = None
        self._closing = False
        self._remote = Proxy(channel, "")
        _install_proxy_serializer(channel, self._router)
        self._service: asyncio.Task[None] | None = None
        base_handler = (
            self._no_service if self._router is None else self.handler_for(self._router)
        )
        if extensions:
            channel.cancel_handler = self._cancel_call
            channel.set_request_handler(
                functools.partial(self._first_request, base_handler)
            )
        else:
            # Serve at once: with TLS, the first request may arrive in the same
            # loop iteration as the connection, before any task has started.
            channel.set_request_handler(base_handler)
        if self._router is not None:
            self._service = asyncio.ensure_future(
                rpc_service_process(self, self._router, channel)
            )
            self._service.add_done_callback(self._service_done)

    @property
    def channel(self) -> Channel:
        """The communication :class:`~aiomas.channel.Channel` of this instance."""
        return self._channel

    @property
    def extensions(self) -> frozenset[str]:
        """The features of the wire extension agreed with the peer (empty
        while none are, e.g. before the answer to an offer)."""
        return self._channel.protocol.core.extensions

    def offer_extensions(self) -> None:
        """Offer the wire extension to the peer (what
        :func:`open_connection` does with ``extensions=True``).  Calls made
        before the answer arrives use the plain format; see
        :meth:`wait_extensions`.

        Raises:
            RuntimeError: if an offer was made already.
            ConnectionResetError: if the connection is closed.
        """
        if self._offer is not None:
            raise RuntimeError("the wire extension was offered already")
        self._channel.cancel_handler = self._cancel_call
        self._offer = self._channel.offer_extensions()

    async def wait_extensions(self) -> frozenset[str]:
        """Wait for the answer to our offer (if any) and return
        :attr:`extensions`."""
        if self._offer is not None:
            await asyncio.wait([self._offer])
        return self.extensions

    def _first_request(
        self, handler: Callable[[Request], None], request: Request
    ) -> None:
        """Take the peer's offer of the wire extension, if this is one; then
        hand every request to *handler*."""
        channel = self._channel
        if channel.request_handler is not None:
            channel.set_request_handler(handler)
        if not channel.take_offer(request):
            handler(request)

    def _cancel_call(self, message_id: int, held: bool) -> None:
        """The peer cancelled its request *message_id*: cancel its call (the
        call then sends no reply)."""
        call = self._cancellable.pop(message_id, None)
        if call is not None:
            call.cancel()

    @property
    def calls_in_progress(self) -> int:
        """How many of the peer's calls to coroutines are being served now
        (their tasks run; each ends with an answer, or without one when the
        peer cancelled it)."""
        return len(self._calls)

    @property
    def service(self) -> asyncio.Task[None] | None:
        """The task serving our RPC service on this connection (or ``None``)."""
        return self._service

    @property
    def remote(self) -> Proxy:
        """A :class:`Proxy` for the peer's RPC service."""
        return self._remote

    def on_connection_reset(
        self, callback: Callable[[BaseException], Any] | None
    ) -> None:
        """Call *callback* with the exception when the peer closes the connection.

        A new call replaces the callback; ``None`` removes it.

        Raises:
            ValueError: if *callback* is neither callable nor ``None``.
            RuntimeError: if this end runs no service task.
        """
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be callable or None, not {callback!r}")
        if self._service is None:
            raise RuntimeError("This RpcClient has no service task running")
        self._reset_callback = callback

    async def close(self) -> None:
        """Close the connection and wait for all sub tasks to finish."""
        self._closing = True
        await self._channel.close()
        tasks: list[asyncio.Future[Any]] = [*self._tasks, *self._calls]
        if self._service is not None:
            tasks.append(self._service)
        # close() may be called by one of our own handlers (e.g. an exposed
        # method that hangs up): that one must not cancel and await itself.
        current = asyncio.current_task()
        tasks = [task for task in tasks if task is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _service_done(self, task: asyncio.Task[None]) -> None:
        # The connection is gone: calls still running over it could never
        # deliver their results, so they must not run on (maybe forever).
        for call in list(self._calls):
            call.cancel()
        if task.cancelled():
            return
        exc = task.exception()
        callback = self._reset_callback
        if exc is not None and callback is not None and not self._closing:
            self.run_callback(callback, exc)

    def run_callback(self, callback: Callable[[Any], Any], arg: Any) -> None:
        """Run ``callback(arg)``, a user callback (function or coroutine
        function) for this connection; what it raises is logged and does not
        affect the connection (see :func:`start_server`)."""
        name = getattr(callback, "__qualname__", repr(callback))
        try:
            result = callback(arg)
        except BaseException as exc:
            if stops_the_process(exc):
                raise
            logger.exception(
                "%s failed for the connection with %s",
                name,
                self._channel.peername,
                extra={"peer": self._channel.peername},
            )
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(guarded(result))
            self._tasks[task] = None
            task.add_done_callback(lambda t: self._callback_done(t, name))

    def _call_done(self, awaitable: Any, task: asyncio.Future[Any]) -> None:
        self._calls.pop(task, None)
        _close_if_cancelled(awaitable, task)

    def _callback_done(self, task: asyncio.Future[Any], name: str) -> None:
        self._tasks.pop(task, None)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            logger.error(
                "%s failed for the connection with %s",
                name,
                self._channel.peername,
                exc_info=exc,
                extra={"peer": self._channel.peername},
            )

    def _no_service(self, request: Request) -> None:
        _answer(
            request,
            FAILURE,
            LookupError("this side of the connection serves no RPC service"),
        )

    def handler_for(self, router: Router) -> Callable[[Request], None]:
        """The request handler (see
        :meth:`~aiomas.channel.Channel.set_request_handler`) that serves the
        functions of *router* to the peer (what :func:`rpc_service_process`
        installs)."""
        # (A partial, not a lambda: one Python frame less for every call.)
        return functools.partial(self._handle, router)

    def _handle(self, router: Router, request: Request) -> None:
        """Run the call in *request*; reply now if it is synchronous."""
        # (A subclass too: a traced connection's requests.)
        if (
            type(request) is not Request
            and isinstance(request, ExtendedRequest)
            and request.deadline is not None
        ):
            self._handle_in_time(router, request, request.deadline)
            return
        try:
            # (_parse_call(), inlined for the shape of every valid call.)
            content = request.content
            if (
                type(content) in _SEQUENCES
                and len(content) == 3
                and type(content[0]) is str
                and type(content[1]) in _SEQUENCES
                and type(content[2]) is dict
            ):
                path, args, kwargs = content
            else:
                path, args, kwargs = _parse_call(content)
            func = router.resolve(path)
            result = func(*args, **kwargs)
        except BaseException as exc:
            if stops_the_process(exc):
                raise
            _fail_call(request, exc, self._channel.peername)
            return
        if type(result) not in _PLAIN_TYPES and inspect.isawaitable(result):
            if self._channel.extended:
                self._start_cancellable(request, result)
                return
            # (Not asyncio.ensure_future(), which asks for the running loop:
            # on Python 3.11 a getpid() call, which callgrind does not see.)
            task = self._channel.start_task(
                _reply_when_done(request, result, self._channel.peername)
            )
            self._calls[task] = None
            task.add_done_callback(functools.partial(self._call_done, result))
            return
        # (_answer(), inlined for the reply to every plain call.)
        try:
            request.reply_nowait(result)
        except Exception as exc:
            _unanswered(request, exc)

    def _handle_in_time(self, router: Router, request: Request, seconds: float) -> None:
        """:meth:`_handle` for a request that came with *seconds* left: the
        function runs under that deadline (a plain function too, so that it
        can read it and the calls and tasks it starts inherit it)."""
        if seconds <= 0:
            # (It passed while the request was held back: see
            # Channel.deadline_clock.)
            _answer(request, FAILURE, DeadlineExceeded("the deadline passed"))
            return
        clock = self._clock
        if clock is None:
            clock = self._clock = LoopClock()
        deadline = Deadline(clock.time() + seconds, clock)
        context = context_with(deadline)
        # (As in _handle(), which every plain call takes: kept apart, so that
        # that path has no extra frame.)
        try:
            path, args, kwargs = _parse_call(request.content)
            func = router.resolve(path)
            result = context.run(func, *args, **kwargs)
        except BaseException as exc:
            if stops_the_process(exc):
                raise
            _fail_call(request, exc, self._channel.peername)
            return
        if type(result) in _PLAIN_TYPES or not inspect.isawaitable(result):
            _answer(request, RESULT, result)
            return
        # (Eager where it may, as in _handle(); the coroutine tells the
        # deadline its task.)
        task = self._channel.start_task(
            _reply_in_time(request, result, self._channel.peername, deadline),
            context=context,
        )
        # The peer gives up at the deadline and sends a cancel, which usually
        # arrives first.  If not, the call stops at the deadline and fails,
        # so that a caller that waits after all gets an answer.
        timer = deadline.call_at_expiry(self._expired, request, task)

        def served(_: asyncio.Future[Any]) -> None:
            timer.cancel()
            deadline.release()  # (Calls it left running keep the deadline.)

        task.add_done_callback(served)
        self._track_cancellable(request.message_id, task, result)

    def _start_cancellable(self, request: Request, awaitable: Any) -> None:
        """Run the call in *request* (the wire extension was agreed, the
        request has no deadline) so that the peer can cancel it."""
        peer = self._channel.peername
        # (Eager where it may, as in _handle(): a cancel can only come in a
        # later frame, when the task is tracked.)
        task = self._channel.start_task(_reply_when_done(request, awaitable, peer))
        self._track_cancellable(request.message_id, task, awaitable)

    def _track_cancellable(
        self, message_id: int, task: asyncio.Future[Any], awaitable: Any
    ) -> None:
        self._calls[task] = None
        self._cancellable[message_id] = task
        task.add_done_callback(
            functools.partial(self._cancellable_done, message_id, awaitable)
        )

    def _expired(self, request: Request, task: asyncio.Future[Any]) -> None:
        """The deadline of the call in *request* has passed, and the peer has
        not cancelled it (yet): fail it, and stop it."""
        if self._cancellable.get(request.message_id) is task:
            del self._cancellable[request.message_id]
        if not task.done():
            _answer(request, FAILURE, DeadlineExceeded("the deadline passed"))
            task.cancel()

    def _cancellable_done(
        self, message_id: int, awaitable: Any, task: asyncio.Future[Any]
    ) -> None:
        self._calls.pop(task, None)
        if self._cancellable.get(message_id) is task:
            del self._cancellable[message_id]
        _close_if_cancelled(awaitable, task)


def _close_if_cancelled(awaitable: Any, task: asyncio.Future[Any]) -> None:
    """Close the coroutine of a call whose task was cancelled (by the peer,
    or because the connection ended) before it ran at all: it never started,
    and must not warn that it was never awaited.  (Closing one that ran is a
    no-op.)  A future the function returned is cancelled."""
    if not task.cancelled():
        return
    if inspect.iscoroutine(awaitable):
        awaitable.close()
    elif isinstance(awaitable, asyncio.Future):
        # (Work the function started, e.g. a call it forwarded: nobody
        # waits for it now.)
        awaitable.cancel()


async def _reply_in_time(
    request: Request, awaitable: Any, peer: Any, deadline: Deadline
) -> None:
    """:func:`_reply_when_done` for a request with a deadline: a call that
    ends because the deadline passed sends no reply (its caller gave up at
    that moment, and told us or will)."""
    # From its first step, which may run within the read (eager start): the
    # calls it makes need no timers of their own.
    deadline.task = asyncio.current_task()
    try:
        result = await awaitable
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        _fail_call(request, exc, peer)
    except DeadlineExceeded as exc:
        if deadline.expired():
            return
        _fail_call(request, exc, peer)
    except BaseException as exc:
        if stops_the_process(exc):
            raise
        _fail_call(request, exc, peer)
    else:
        _answer(request, RESULT, result)


async def _reply_when_done(request: Request, awaitable: Any, peer: Any) -> None:
    try:
        result = await awaitable
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Our own cancellation (the connection is gone, or shutdown):
            # nobody waits for an answer.
            raise
        _fail_call(request, exc, peer)  # The call raised it itself.
    except BaseException as exc:
        if stops_the_process(exc):
            raise
        _fail_call(request, exc, peer)
    else:
        _answer(request, RESULT, result)


def _fail_call(request: Request, exc: BaseException, peer: Any) -> None:
    """Answer *request* with the failure *exc* that its call raised.

    Exceptions that are not :class:`Exception` (``SystemExit``,
    ``KeyboardInterrupt``, ``GeneratorExit``, a ``CancelledError`` of its
    own ...) would end the process or a task if we let them through; they fail
    only this call, and are logged, since they usually mean a bug.
    """
    if not isinstance(exc, Exception):
        logger.error(
            "Call %s from %s raised %s; it fails with a failure reply and the "
            "server goes on",
            request.message_id,
            peer,
            type(exc).__name__,
            exc_info=exc,
            extra={"peer": peer, "message_id": request.message_id},
        )
    _answer(request, FAILURE, exc)


def _answer(request: Request, msg_type: int, content: Any) -> None:
    """Answer *request* with a result (*msg_type* RESULT) or a failure
    (FAILURE, *content* an exception), now."""
    try:
        if msg_type == RESULT:
            request.reply_nowait(content)
        else:
            request.fail_nowait(content)
    except Exception as exc:
        _unanswered(request, exc)


def _unanswered(request: Request, exc: Exception) -> None:
    """Answering *request* raised *exc*: log why nobody is told, or raise
    *exc* if it is not one of the expected errors."""
    if isinstance(exc, ConnectionError):
        return  # The caller is gone; nobody waits for this answer any more.
    if isinstance(exc, RuntimeError):
        # Answered already: its deadline passed (see RpcClient._expired) and
        # the function went on to return anyway.
        logger.debug(
            "Request %s was answered already",
            request.message_id,
            extra={"message_id": request.message_id},
        )
    elif isinstance(exc, SerializationError | ValueError):
        # The requester already got a failure reply that says what went wrong.
        logger.debug(
            "Could not encode the reply to request %s",
            request.message_id,
            extra={"message_id": request.message_id},
        )
    else:
        raise exc


_SEQUENCES: Final = (list, tuple)


def _parse_call(content: Any) -> tuple[str, Iterable[Any], Mapping[str, Any]]:
    if type(content) in _SEQUENCES and len(content) == 3:
        path, args, kwargs = content
        if (
            isinstance(path, str)
            and type(args) in _SEQUENCES
            and isinstance(kwargs, dict)
        ):
            return path, args, kwargs
    raise ValueError(
        "An RPC request must be [path, args, kwargs], got "
        f"{protocol.abbreviate(content)}"
    )


class _Served:
    """The router whose services a channel's codec sends as proxies."""

    __slots__ = ("router",)

    def __init__(self, router: Router | None) -> None:
        self.router = router


# A second RpcClient on a channel serves its router through the serializer the
# first one added (a codec refuses a second serializer for the same type).
_served: weakref.WeakKeyDictionary[Channel, _Served] = weakref.WeakKeyDictionary()


def _install_proxy_serializer(channel: Channel, router: Router | None) -> None:
    """Teach the connection's codec to send services and receive proxies."""
    served = _served.get(channel)
    if served is not None:
        served.router = router
        return
    served = _served[channel] = _Served(router)

    def serialize(obj: Any) -> str:
        router = served.router
        obj_router = getattr(obj, "router", None)
        if not isinstance(obj_router, Router):
            raise SerializationError(
                f"No serializer found for type {type(obj).__module__}."
                f"{type(obj).__qualname__}"
            )
        if router is not None and obj_router.root is not router:
            router.attach_declared()
        if router is None or obj_router.root is not router:
            raise SerializationError(
                f"{obj!r} is not part of the RPC service of this connection"
            )
        return obj_router.path

    # The codec belongs to the channel: a strong reference back would make a
    # reference cycle that keeps the whole connection until the garbage
    # collector runs.
    channel_ref = weakref.ref(channel)

    def deserialize(path: Any) -> Proxy:
        if not isinstance(path, str):
            raise SerializationError(f"Invalid RPC proxy path {short_repr(path)}")
        current = channel_ref()
        if current is None:  # pragma: no cover (we decode for the channel)
            raise SerializationError("The channel of this codec is gone")
        return Proxy(current, path)

    channel.codec.add_serializer(object, serialize, deserialize)


async def rpc_service_process(
    rpc_client: RpcClient, router: Router, channel: Channel
) -> None:
    """Serve the functions of *router* to the peer of *channel*.

    Errors raised by a function are sent to its caller.  Runs until the
    connection closes.

    Raises:
        ConnectionResetError: when the connection is closed.
    """
    if channel.request_handler is None:
        channel.set_request_handler(rpc_client.handler_for(router))
    await channel.wait_closed()
    # The task keeps the exception, and its traceback this frame: without
    # these, that makes no reference cycle through the client.
    del rpc_client, router
    raise channel.connection_error()


async def open_connection(
    addr: Address,
    *,
    rpc_service: Any = None,
    extensions: bool = False,
    clock: Clock | None = None,
    trace: tracing.TraceTarget | None = None,
    **kwds: Any,
) -> RpcClient:
    """Connect to *addr* and return an :class:`RpcClient`.

    Args:
        addr: See :func:`aiomas.channel.open_connection`.
        rpc_service: An RPC service to serve to the peer, so that it can call back.
        extensions: Offer the wire extension (deadlines and cancels that reach
            the peer, see :doc:`/deadlines`) with the first request; a peer
            that does not speak it answers with a failure, and everything
            stays plain.  Off by default.
        clock: See :class:`RpcClient`.
        trace: See :class:`RpcClient`.
        **kwds: Passed to :func:`aiomas.channel.open_connection`.
    """
    if rpc_service is not None:
        router_of(rpc_service)
    tracer = tracing.as_tracer(trace)
    channel = await channel_mod.open_connection(addr, **kwds)
    client = RpcClient(
        channel, rpc_service, extensions=extensions, clock=clock, trace=tracer
    )
    if extensions:
        client.offer_extensions()
    return client


async def start_server(
    addr: Address,
    rpc_service: Any,
    client_connected_cb: Callable[[RpcClient], Any] | None = None,
    *,
    extensions: bool = False,
    clock: Clock | None = None,
    trace: tracing.TraceTarget | None = None,
    **kwds: Any,
) -> asyncio.AbstractServer:
    """Start a server on *addr* that serves *rpc_service* to every client.

    Args:
        addr: See :func:`aiomas.channel.start_server`.
        rpc_service: An object with a ``router`` attribute (a :class:`Router`).
        client_connected_cb: Called with the :class:`RpcClient` of every new
            connection (may be a coroutine function).
        extensions: Accept a client's offer of the wire extension (see
            :func:`open_connection`).  Off by default.
        clock: See :class:`RpcClient`.
        trace: Record the messages of every connection (see
            :class:`RpcClient`).
        **kwds: Passed to :func:`aiomas.channel.start_server`.

    Raises:
        ValueError: if *rpc_service* is no RPC service.
    """
    router_of(rpc_service)
    tracer = tracing.as_tracer(trace)

    def connected(channel: Channel) -> None:
        client = RpcClient(
            channel, rpc_service, extensions=extensions, clock=clock, trace=tracer
        )
        if client_connected_cb is not None:
            client.run_callback(client_connected_cb, client)

    return await channel_mod.start_server(addr, connected, **kwds)


_K = TypeVar("_K", bound=Hashable)


@dataclass
class Quorum(Generic[_K]):
    """What :func:`quorum` returns: per callee (by the keys of its *calls*),
    the answers, the failures, and the calls that were still pending."""

    needed: int
    """How many answers were needed."""
    results: dict[_K, Any] = field(default_factory=dict)
    """The answers, by callee."""
    failures: dict[_K, BaseException] = field(default_factory=dict)
    """The errors of the calls that failed (e.g.
    :class:`~aiomas.exceptions.RemoteException`), by callee."""
    cancelled: set[_K] = field(default_factory=set)
    """The callees whose calls were still pending when the quorum was reached
    or the deadline passed: they were cancelled (on their peers too, where
    the connection agreed to the wire extension)."""

    @property
    def reached(self) -> bool:
        """Whether at least :attr:`needed` callees answered."""
        return len(self.results) >= self.needed


async def quorum(
    calls: Mapping[_K, Callable[[], Awaitable[Any]]],
    needed: float,
    *,
    within: float | None = None,
    clock: Clock | None = None,
) -> Quorum[_K]:
    """Make all *calls* at once; return when *needed* of them have answered,
    when so many failed that they cannot, or when *within* seconds have
    passed.

    The calls still pending then are cancelled -- on their peers too, over
    connections that agreed to the wire extension (see :doc:`/deadlines`).
    ``quorum()`` itself never raises for a call: every callee's outcome is in
    the :class:`Quorum` it returns.

    Args:
        calls: By callee (any key), a function without arguments that makes
            the call, e.g. ``lambda: proxy.method(x)``.  It is called under
            the quorum's deadline, so the call carries the time left.
        needed: How many answers are needed: a number of calls (``0`` to
            ``len(calls)``), or a fraction of them, a float between 0 and 1
            such as ``0.5`` (rounded up; a whole number such as ``1.0`` is
            a number of calls).
        within: Seconds until the calls are given up (default: no limit
            beyond the current deadline, which the calls carry anyway).
        clock: The clock of *within* (default: the event loop's; in a
            container, ``container.clock``).

    Raises:
        ValueError: if *needed* is out of range.
    """
    keys = list(calls)
    if isinstance(needed, float) and not needed.is_integer():
        if not 0 < needed < 1:
            raise ValueError(f"a fraction must be between 0 and 1, not {needed!r}")
        count = math.ceil(needed * len(keys))
    else:
        count = int(needed)
        if not 0 <= count <= len(keys):
            raise ValueError(f"needed must be 0 to {len(keys)}, not {needed!r}")
    outcome: Quorum[_K] = Quorum(count)
    deadline = None if within is None else Deadline.after(within, clock)
    outer = current_deadline()
    if (
        deadline is not None
        and outer is not None
        and outer.clock == deadline.clock
        and outer.when < deadline.when
    ):
        deadline = Deadline(outer.when, deadline.clock)  # never more time
    context = contextvars.copy_context() if deadline is None else context_with(deadline)
    running: dict[asyncio.Future[Any], _K] = {}
    for key in keys:
        try:
            future = context.run(_start_call, calls[key])
        except Exception as exc:
            outcome.failures[key] = exc
        else:
            running[future] = key
    loop = asyncio.get_running_loop()
    expired: asyncio.Future[None] = loop.create_future()
    timer = None
    if deadline is not None:
        timer = deadline.call_at_expiry(_set_unless_done, expired)
    pending: set[asyncio.Future[Any]] = set(running)
    try:
        while (
            pending
            and not expired.done()
            and len(outcome.results) < count
            and len(outcome.failures) <= len(keys) - count
        ):
            done, pending = await asyncio.wait(
                {*pending, expired}, return_when=asyncio.FIRST_COMPLETED
            )
            pending.discard(expired)
            for future in done:
                if future is not expired:
                    _record(outcome, running[future], future, deadline)
    finally:
        if timer is not None:
            timer.cancel()
        if not expired.done():
            expired.cancel()
        for future in pending:
            future.cancel()
            outcome.cancelled.add(running[future])
        if pending:
            # (Tasks of coroutine calls end in their next step.)
            await asyncio.wait(pending)
    return outcome


def _start_call(make_call: Callable[[], Awaitable[Any]]) -> asyncio.Future[Any]:
    return asyncio.ensure_future(make_call())


def _set_unless_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _record(
    outcome: Quorum[Any],
    key: Any,
    future: asyncio.Future[Any],
    deadline: Deadline | None,
) -> None:
    if future.cancelled():
        outcome.cancelled.add(key)
        return
    error = future.exception()
    if error is None:
        outcome.results[key] = future.result()
    elif (
        isinstance(error, DeadlineExceeded)
        and deadline is not None
        and deadline.expired()
    ):
        outcome.cancelled.add(key)  # Given up at the deadline (and told).
    else:
        outcome.failures[key] = error
