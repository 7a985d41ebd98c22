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
import builtins
import contextlib
import inspect
import logging
import weakref
from collections.abc import Callable, Iterable, Mapping
from types import FunctionType, MethodType
from typing import Any, Final, TypeVar

from aiomas import channel as channel_mod
from aiomas import protocol
from aiomas._guards import guarded, stops_the_process
from aiomas.channel import Address, Channel, Request
from aiomas.exceptions import SerializationError
from aiomas.wire import FAILURE, RESULT

__all__ = [
    "Proxy",
    "Router",
    "RpcClient",
    "Service",
    "ServiceDict",
    "expose",
    "open_connection",
    "rpc_service_process",
    "start_server",
]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

_RPC_MARKER: Final = "__rpc__"


def expose(func: F) -> F:
    """Decorator that makes *func* callable via RPC.

    The function is not wrapped; it only gains an ``__rpc__`` attribute.
    """
    setattr(func, _RPC_MARKER, True)
    return func


def _is_exposed(attr: Any) -> bool:
    """Whether :func:`expose` marked *attr*, found without running its code (a
    peer must not make us call ``__getattr__`` of whatever an agent holds)."""
    kind = type(attr)
    if kind is FunctionType:  # the common case, quickly
        return attr.__dict__.get(_RPC_MARKER) is True
    if kind is MethodType:  # e.g. obj.method in a ServiceDict
        return _is_exposed(attr.__func__)
    if issubclass(kind, staticmethod | classmethod):
        # @expose may sit inside or outside of @staticmethod / @classmethod.
        return attr.__dict__.get(_RPC_MARKER) is True or _is_exposed(attr.__func__)
    return _marked(attr)


def _marked(obj: Any) -> bool:
    return inspect.getattr_static(obj, _RPC_MARKER, False) is True


def _has_invalid_component(path: str) -> bool:
    """Whether a component of *path* is empty, ``..`` or starts with ``_`` (the
    checks of _check_component() for all components at once, in C)."""
    return (
        not path
        or path[0] in "/_"
        or path[-1] == "/"
        or "//" in path
        or "/_" in path
        or (".." in path and ".." in path.split("/"))
    )


def _short(value: Any) -> str:
    """The repr of *value*, shortened: error messages go back to the peer, and
    a hostile peer must not make us send its 10 kB path back twice."""
    return protocol.abbreviate(value, 200)


def _check_component(name: str, path: str) -> None:
    if not name or name.startswith("_") or name == "..":
        raise LookupError(
            f"Invalid component {_short(name)} in RPC path {_short(path)}"
        )


class Router:
    """Resolves paths to the exposed functions of its object *obj* and its
    sub-services, and knows its own path for the reverse lookup.

    Args:
        obj: The service object: a class instance or a :class:`ServiceDict`.
    """

    __slots__ = ("__weakref__", "_declared", "_sub_routers", "name", "obj", "parent")

    expose = staticmethod(expose)
    """Alias for :func:`expose`."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        """The object to which this router belongs."""
        self.name = ""
        """The name of the router (empty for root routers)."""
        self.parent: Router | None = None
        """The parent router or ``None`` for root routers."""
        # Both are made on first use: a program may have many routers (one per
        # agent) and most of them have no sub-routers.
        self._sub_routers: dict[str, Router] | None = None
        # Sub-services declared by Service(sub_routers) whose attributes did not
        # exist yet when the router was made (e.g. still in __init__).
        self._declared: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"<Router {self.path!r} of {type(self.obj).__name__}>"

    @property
    def path(self) -> str:
        """The path to this router (without trailing slash)."""
        names = []
        router: Router | None = self
        while router is not None and router.parent is not None:
            names.append(router.name)
            router = router.parent
        return "/".join(reversed(names))

    @property
    def root(self) -> Router:
        """The topmost router of this router's hierarchy."""
        router = self
        while router.parent is not None:
            router = router.parent
        return router

    def add(self, name: str) -> None:
        """Add the sub-router of the service stored at ``self.obj.<name>``."""
        service = getattr(self.obj, name)
        router = getattr(service, "router", None)
        if not isinstance(router, Router):
            raise ValueError(f"Attribute {name!r} of {self.obj!r} is no RPC service")
        self.set_sub_router(router, name)

    def set_sub_router(self, router: Router, name: str) -> None:
        """Make *router* the sub-router *name* of this router."""
        _check_component(name, name)
        if "/" in name:
            raise ValueError(f"A sub-router name must not contain '/': {name!r}")
        router.parent = self
        router.name = name
        if self._sub_routers is None:
            self._sub_routers = {}
        self._sub_routers[name] = router

    def resolve(self, path: str) -> Callable[..., Any]:
        """Return the exposed function at *path* (components separated by ``/``).

        Only attributes marked by :func:`expose` and declared sub-services are
        reachable; names starting with ``_`` never are.  The object is not touched
        (no attribute lookup that could run code) until the path is known to be
        valid.

        Raises:
            LookupError: if there is no exposed function at *path*.
        """
        if not isinstance(path, str):
            raise LookupError(f"An RPC path must be a string, not {_short(path)}")
        components = path.split("/")
        if _has_invalid_component(path):
            # Find the culprit for the error message.
            for component in components:
                _check_component(component, path)
        name = components.pop()
        router = self
        for component in components:
            sub = router.sub_router(component)
            if sub is None:
                raise LookupError(
                    f"No RPC service {_short(component)} in path {_short(path)}"
                )
            router = sub
        func = router.function(name)
        if func is None:
            raise LookupError(
                f"No exposed function {_short(name)} at RPC path {_short(path)}"
            )
        return func

    def sub_router(self, name: str) -> Router | None:
        """The router of the sub-service *name*, or ``None`` (a hook for
        :meth:`resolve`; it runs no code of the service but our own)."""
        routers = self._sub_routers
        router = None if routers is None else routers.get(name)
        if router is None:
            if name in self._declared:
                self.declare()
                routers = self._sub_routers
                router = None if routers is None else routers.get(name)
            elif isinstance(self.obj, ServiceDict):
                # A service added to the dict after the ServiceDict was made.
                router = _router_in(self.obj.dict.get(name))
        return router

    def attach_declared(self) -> None:
        """Attach the declared sub-services that did not exist yet when their
        routers were made, in this router's whole tree (calls attach them on
        their way; this is for services sent before any call reached them)."""
        pending = [self]
        seen: set[int] = set()
        while pending:
            router = pending.pop()
            if id(router) in seen:
                continue
            seen.add(id(router))
            with contextlib.suppress(ValueError, AttributeError):
                # Not a service (yet): some other part of the tree, which
                # must not keep this one from being sent.
                router.declare()
            pending.extend(router.children())

    def children(self) -> Iterable[Router]:
        """The routers of the sub-services attached so far (and of the
        services in a :class:`ServiceDict`)."""
        routers = self._sub_routers
        children = [] if routers is None else list(routers.values())
        if isinstance(self.obj, ServiceDict):
            for name, value in self.obj.dict.items():
                if routers is None or name not in routers:
                    router = _router_in(value)
                    if router is not None:
                        children.append(router)
        return children

    def declare(self, names: Iterable[str] = ()) -> None:
        """Declare the sub-services stored at ``self.obj.<name>`` for each of
        *names*; those that exist now are added (see :meth:`add`), the others
        when they are first asked for.  Without *names*, it tries again to add
        the ones still missing.

        Raises:
            ValueError: if such an attribute is no RPC service.
        """
        if names:
            self._declared = (*self._declared, *names)
        if not self._declared:
            return
        missing = []
        for name in self._declared:
            if _static_lookup(self.obj, name) is _MISSING:
                missing.append(name)
            else:
                self.add(name)
        self._declared = tuple(missing)

    def function(self, name: str) -> Callable[..., Any] | None:
        """The exposed function *name* of this router's object, or ``None``
        (a hook for :meth:`resolve`; found by static lookups only)."""
        obj = self.obj
        if isinstance(obj, ServiceDict):
            func = obj.dict.get(name)
            return func if callable(func) and _is_exposed(func) else None
        if isinstance(obj, type):  # a class as the service: its own attributes
            attr = _class_lookup(obj, name)
            if attr is _MISSING or not _is_exposed(attr):
                return None
            bound = getattr(obj, name)
            return bound if callable(bound) else None
        own = _instance_lookup(obj, name)
        if own is not _MISSING:
            # An attribute of the instance hides the class' one: only an
            # exposed function stored there counts.
            return own if _is_exposed(own) and callable(own) else None
        # Methods live in the class: finding them there is much faster than
        # inspect.getattr_static().
        attr = _class_lookup(type(obj), name)
        if attr is _MISSING or not _is_exposed(attr):
            return None
        # Binding an exposed function (or static/class method) runs no user code.
        bound = getattr(obj, name)
        return bound if callable(bound) else None


_MISSING: Final = object()


def _class_lookup(cls: type, name: str) -> Any:
    """Find class attribute *name* along *cls*' MRO without running code."""
    for klass in cls.__mro__:
        attr = klass.__dict__.get(name, _MISSING)
        if attr is not _MISSING:
            return attr
    return _MISSING


def _instance_lookup(obj: Any, name: str) -> Any:
    """Find *name* in the ``__dict__`` of *obj* (if it has one) without running
    descriptors or ``__getattr__``."""
    try:
        attrs = object.__getattribute__(obj, "__dict__")
    except AttributeError:
        return _MISSING
    return attrs.get(name, _MISSING) if type(attrs) is dict else _MISSING


def _static_lookup(obj: Any, name: str) -> Any:
    """Find attribute *name* of *obj* without running descriptors or __getattr__."""
    try:
        return inspect.getattr_static(obj, name)
    except AttributeError:
        return _MISSING


class Service:
    """Descriptor that gives every instance of a class its own :class:`Router`.

    Name the class attribute ``router``::

        class Spam:
            router = aiomas.rpc.Service()

    Args:
        sub_routers: Names of attributes that hold sub-services (instances with a
            router or :class:`ServiceDict` objects); they are reachable under the
            same names.
    """

    __slots__ = ("_attr", "sub_routers")

    expose = staticmethod(expose)
    """Alias for :func:`expose`."""

    def __init__(self, sub_routers: Iterable[str] = ()) -> None:
        self.sub_routers = tuple(sub_routers)
        self._attr = "_aiomas_router"

    def __set_name__(self, owner: type, name: str) -> None:
        self._attr = f"_aiomas_{name}"

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        # A default (instead of catching AttributeError) spares CPython making
        # an exception for every new instance.
        router: Router | None = getattr(obj, self._attr, None)
        if router is None:
            router = Router(obj)
            try:
                setattr(obj, self._attr, router)
            except AttributeError:
                raise TypeError(
                    f"{type(obj).__qualname__} instances need a __dict__ or a "
                    f"{self._attr!r} slot to hold their RPC router"
                ) from None
            if self.sub_routers:
                router.declare(self.sub_routers)
        return router

    def __set__(self, obj: Any, value: Any) -> None:
        raise AttributeError("The router of an RPC service cannot be replaced")


class ServiceDict:
    """Wraps a dict of exposed functions and sub-services as an RPC service.

    Values that have a ``router`` (service instances and other ServiceDicts) become
    sub-services under their key.  Services put into :attr:`dict` later are
    reachable too; set their router's ``parent`` (to this router) and ``name``
    (to the key) so that their :attr:`Router.path` is right when they are sent
    to a peer.

    Args:
        dict: The functions and sub-services by name.
    """

    __slots__ = ("__weakref__", "dict", "router")

    def __init__(self, dict: Mapping[str, Any] | None = None) -> None:
        self.dict: builtins.dict[str, Any] = {} if dict is None else {**dict}
        """The wrapped dict."""
        self.router = Router(self)
        """The dict's router."""
        for name, value in self.dict.items():
            sub = getattr(value, "router", None)
            if isinstance(sub, Router):
                self.router.set_sub_router(sub, name)

    def __repr__(self) -> str:
        return f"ServiceDict({self.dict!r})"


def _router_in(value: Any) -> Router | None:
    """The router of a service stored in a :class:`ServiceDict`, found without
    running any code of the value's class but our own :class:`Service`."""
    if isinstance(value, ServiceDict):
        return value.router
    attr = _class_lookup(type(value), "router")
    if isinstance(attr, Service):
        router: Router = attr.__get__(value, type(value))
        return router
    own = _instance_lookup(value, "router")
    return own if isinstance(own, Router) else None


def _router_of(service: Any) -> Router:
    router = getattr(service, "router", None)
    if not isinstance(router, Router):
        raise ValueError(
            f"{service!r} is no RPC service: it needs a 'router' attribute that "
            "is an aiomas.rpc.Router (use aiomas.rpc.Service or ServiceDict)"
        )
    return router


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
        """
        return self._channel.send([self._path, args, kwargs])

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
    """

    def __init__(self, channel: Channel, rpc_service: Any = None) -> None:
        self._channel = channel
        self._router = None if rpc_service is None else _router_of(rpc_service)
        # Tasks of user callbacks, and of exposed coroutines answering calls.
        self._tasks: set[asyncio.Future[Any]] = set()
        self._calls: set[asyncio.Future[Any]] = set()
        self._reset_callback: Callable[[BaseException], Any] | None = None
        self._closing = False
        self._remote = Proxy(channel, "")
        _install_proxy_serializer(channel, self._router)
        self._service: asyncio.Task[None] | None = None
        if self._router is None:
            channel.set_request_handler(self._no_service)
        else:
            # Serve at once: with TLS, the first request may arrive in the same
            # loop iteration as the connection, before any task has started.
            channel.set_request_handler(self.handler_for(self._router))
            self._service = asyncio.ensure_future(
                rpc_service_process(self, self._router, channel)
            )
            self._service.add_done_callback(self._service_done)

    @property
    def channel(self) -> Channel:
        """The communication :class:`~aiomas.channel.Channel` of this instance."""
        return self._channel

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
        for call in self._calls:
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
            self._tasks.add(task)
            task.add_done_callback(lambda t: self._callback_done(t, name))

    def _callback_done(self, task: asyncio.Future[Any], name: str) -> None:
        self._tasks.discard(task)
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
        handle = self._handle
        return lambda request: handle(router, request)

    def _handle(self, router: Router, request: Request) -> None:
        """Run the call in *request*; reply now if it is synchronous."""
        try:
            path, args, kwargs = _parse_call(request.content)
            func = router.resolve(path)
            result = func(*args, **kwargs)
        except BaseException as exc:
            if stops_the_process(exc):
                raise
            _fail_call(request, exc, self._channel.peername)
            return
        if type(result) not in _PLAIN_TYPES and inspect.isawaitable(result):
            task = asyncio.ensure_future(
                _reply_when_done(request, result, self._channel.peername)
            )
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
            return
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
    except ConnectionError:
        pass  # The caller is gone; nobody waits for this answer any more.
    except (SerializationError, ValueError):
        # The requester already got a failure reply that says what went wrong.
        logger.debug(
            "Could not encode the reply to request %s",
            request.message_id,
            extra={"message_id": request.message_id},
        )


def _parse_call(content: Any) -> tuple[str, Iterable[Any], Mapping[str, Any]]:
    if (
        type(content) in (list, tuple)
        and len(content) == 3
        and isinstance(content[0], str)
        and type(content[1]) in (list, tuple)
        and isinstance(content[2], dict)
    ):
        return content[0], content[1], content[2]
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
            raise SerializationError(f"Invalid RPC proxy path {_short(path)}")
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
    addr: Address, *, rpc_service: Any = None, **kwds: Any
) -> RpcClient:
    """Connect to *addr* and return an :class:`RpcClient`.

    Args:
        addr: See :func:`aiomas.channel.open_connection`.
        rpc_service: An RPC service to serve to the peer, so that it can call back.
        **kwds: Passed to :func:`aiomas.channel.open_connection`.
    """
    if rpc_service is not None:
        _router_of(rpc_service)
    channel = await channel_mod.open_connection(addr, **kwds)
    return RpcClient(channel, rpc_service)


async def start_server(
    addr: Address,
    rpc_service: Any,
    client_connected_cb: Callable[[RpcClient], Any] | None = None,
    **kwds: Any,
) -> asyncio.AbstractServer:
    """Start a server on *addr* that serves *rpc_service* to every client.

    Args:
        addr: See :func:`aiomas.channel.start_server`.
        rpc_service: An object with a ``router`` attribute (a :class:`Router`).
        client_connected_cb: Called with the :class:`RpcClient` of every new
            connection (may be a coroutine function).
        **kwds: Passed to :func:`aiomas.channel.start_server`.

    Raises:
        ValueError: if *rpc_service* is no RPC service.
    """
    _router_of(rpc_service)

    def connected(channel: Channel) -> None:
        client = RpcClient(channel, rpc_service)
        if client_connected_cb is not None:
            client.run_callback(client_connected_cb, client)

    return await channel_mod.start_server(addr, connected, **kwds)
