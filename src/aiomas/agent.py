"""Agents and the containers they live in.

An :class:`Agent` is a light object: its container, its address and an RPC router
for its exposed methods.  A :class:`Container` does everything else: it runs one
RPC server for all of its agents, opens (and shares) the connections to other
containers, and gives its agents a clock.

On the wire a container is an RPC service with two entries:

- ``validate_aid(aid)``: the class name of the agent with id *aid*, or ``None``;
- ``agents``: the agents by id, so agent ``3``'s method ``spam`` is the RPC path
  ``agents/3/spam``.

Agent addresses are URLs: ``tcp://host:port/<id>`` (IPv6 hosts in brackets),
``ipc://[<socket path>]/<id>`` for unix domain sockets, ``local://<queue
id>/<id>`` for :mod:`aiomas.local_queue` and ``nats://<container name>/<id>``
for containers on a NATS system (see :func:`parse_url` for the other spellings
that are read, and :mod:`aiomas.nats`).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import ssl as ssl_mod
import weakref
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Literal, NamedTuple, TypeVar, cast, overload

from aiomas import channel as channel_mod
from aiomas import local_queue, rpc, tracing, util
from aiomas import nats as nats_mod
from aiomas._addresses import (
    base_url_of,
    ipc_base_url,
    local_base_url,
    nats_base_url,
    parse_url,
    split_host_port,
    tcp_base_url,
)
from aiomas._connect import check_dead_peer_timeout
from aiomas._pool import ConnectionPool
from aiomas.channel import Address, Channel, SerializerFactory
from aiomas.clocks import AsyncioClock, BaseClock
from aiomas.codecs import JSON, Codec
from aiomas.wire import DEFAULT_MAX_FRAME_SIZE, FrameReader

__all__ = [
    "Agent",
    "AgentProxy",
    "Container",
    "SSLCerts",
    "nats_link",
    "parse_url",
    "split_host_port",
]

# Kept under its aiomas 2.0.1 name, which programs written for it import.
_get_base_url = base_url_of

_ContainerT = TypeVar("_ContainerT", bound="Container")

# How often create() retries to get the same free port on all interfaces of a
# host name (like "localhost") when asked for port 0.
_SAME_PORT_ATTEMPTS = 5

# How many agents a container lists when asked on NATS (a NATS message is
# limited to 1 MB by default).
_LISTED_AGENTS = 10_000


class SSLCerts(NamedTuple):
    """File names of a CA certificate, a certificate and its private key.

    See :func:`aiomas.util.make_ssl_server_context` and
    :func:`aiomas.util.make_ssl_client_context`.
    """

    cafile: str
    """The CA certificate that signs the certificates of all peers."""
    certfile: str
    """The certificate that authenticates this container."""
    keyfile: str
    """The private key of *certfile*."""


class Agent:
    """Base class for all agents.

    Args:
        container: The :class:`Container` (or an instance of a subclass) that the
            agent lives in.

    Raises:
        TypeError: if *container* is not a :class:`Container`.
        RuntimeError: if the container has been shut down.
    """

    __slots__ = ("__weakref__", "_aiomas_router", "addr", "container")

    router = rpc.Service()
    """Descriptor that gives every agent its own :class:`~aiomas.rpc.Router`.

    Override it in a subclass to declare sub-services, e.g.
    ``router = aiomas.rpc.Service(['sub'])``.
    """

    container: Container
    """The :class:`Container` that the agent lives in."""
    addr: str
    """The agent's address, e.g. ``'tcp://localhost:5555/0'``."""

    def __init__(self, container: Container) -> None:
        if not isinstance(container, Container):
            raise TypeError(
                f"An agent needs a Container, got {type(container).__qualname__}"
            )
        self.container = container
        try:
            registry = container._aiomas.registry  # noqa: SLF001 (this module's)
        except AttributeError:
            registry = state_of(container).registry  # (raises the TypeError)
        self.addr = registry.register(self)

    def __rpc_router_made__(self, router: rpc.Router) -> None:
        """Place the agent's new router under its container's ``agents``.

        :class:`~aiomas.rpc.Service` calls this when the router is first used:
        agents get no router until then, which keeps making many of them cheap.
        """
        addr = getattr(self, "addr", None)
        if addr is None:
            # Made before Agent.__init__() registered us: register() places it.
            _unplaced[id(self)] = weakref.ref(self, _drop_unplaced(id(self)))
            return
        state_of(self.container).registry.place(router, addr)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.addr!r})"


# Agents whose router was made before they were registered, by id().
_unplaced: dict[int, weakref.ref[Agent]] = {}


def _drop_unplaced(key: int) -> Callable[[object], None]:
    def drop(_: object) -> None:
        _unplaced.pop(key, None)

    return drop


class AgentProxy(rpc.Proxy):
    """A :class:`~aiomas.rpc.Proxy` for a remote agent, as returned by
    :meth:`Container.connect`.

    Its ``str()`` names the agent's class and address, e.g.
    ``CalleeProxy('tcp://localhost:5555/0')``.
    """

    __slots__ = ("_addr", "_type_name")

    def __init__(self, channel: Channel, aid: str, addr: str, type_name: str) -> None:
        super().__init__(channel, f"agents/{aid}")
        self._addr = addr
        self._type_name = type_name

    @property
    def addr(self) -> str:
        """The address of the remote agent."""
        return self._addr

    def __repr__(self) -> str:
        return f"{self._type_name}Proxy({self._addr!r})"


def _ssl_contexts(
    ssl: SSLCerts | tuple[ssl_mod.SSLContext, ssl_mod.SSLContext] | None,
) -> tuple[ssl_mod.SSLContext | None, ssl_mod.SSLContext | None]:
    if ssl is None:
        return None, None
    if isinstance(ssl, SSLCerts):
        return (
            util.make_ssl_server_context(*ssl),
            util.make_ssl_client_context(*ssl),
        )
    if (
        isinstance(ssl, tuple)
        and len(ssl) == 2
        and all(isinstance(ctx, ssl_mod.SSLContext) for ctx in ssl)
    ):
        return ssl
    raise TypeError(
        "ssl must be an SSLCerts instance or a (server_context, client_context) "
        f"tuple of ssl.SSLContext objects, got {ssl!r}"
    )


class Container:
    """Container for agents.

    Don't instantiate it yourself: :meth:`create` makes a container whose server
    socket already listens, and then calls ``cls(base_url, clock,
    connect_kwargs)``.  Subclasses written for aiomas 2.0.1, whose ``__init__``
    takes ``(base_url, loop, clock, connect_kwargs)``, get the running loop
    there, and may pass it on to ``super().__init__()``.

    Args:
        base_url: The address prefix of the container's agents, e.g.
            ``'tcp://localhost:5555/'``.
        clock: The container's clock.
        connect_kwargs: Keyword arguments for :func:`aiomas.rpc.open_connection`
            when connecting to other containers (``codec``,
            ``extra_serializers``, and ``ssl`` for TCP connections).

    Raises:
        TypeError: for missing or unknown arguments.
        ValueError: if a *loop* is given that is not the running loop.
    """

    router = rpc.Service()

    @overload
    def __init__(
        self, base_url: str, clock: BaseClock, connect_kwargs: dict[str, Any]
    ) -> None: ...

    @overload
    def __init__(
        self,
        base_url: str,
        loop: asyncio.AbstractEventLoop | None,
        clock: BaseClock,
        connect_kwargs: dict[str, Any],
    ) -> None: ...

    def __init__(self, base_url: str, *args: Any, **kwargs: Any) -> None:
        clock, connect_kwargs = _init_arguments(args, kwargs)
        # All our state lives in one object under a name that no subclass
        # picks for its own attributes.
        self._aiomas = _ContainerState(self, base_url, clock, connect_kwargs)
        self.agents: rpc.ServiceDict = self._aiomas.registry.agents
        """The container's agents: ``agents.dict`` maps agent ids to agents."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"

    @overload
    @classmethod
    def create(
        cls: type[_ContainerT],
        addr: Address | nats_mod.NatsConfig,
        *,
        clock: BaseClock | None = None,
        codec: type[Codec] | None = None,
        extra_serializers: Iterable[SerializerFactory] | None = None,
        ssl: SSLCerts | tuple[ssl_mod.SSLContext, ssl_mod.SSLContext] | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        dead_peer_timeout: float | None = None,
        nats: str | nats_mod.NatsConfig | None = None,
        as_coro: Literal[False] = False,
        extensions: bool = False,
        trace: tracing.TraceTarget | None = None,
    ) -> _ContainerT: ...

    @overload
    @classmethod
    def create(
        cls: type[_ContainerT],
        addr: Address | nats_mod.NatsConfig,
        *,
        clock: BaseClock | None = None,
        codec: type[Codec] | None = None,
        extra_serializers: Iterable[SerializerFactory] | None = None,
        ssl: SSLCerts | tuple[ssl_mod.SSLContext, ssl_mod.SSLContext] | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        dead_peer_timeout: float | None = None,
        nats: str | nats_mod.NatsConfig | None = None,
        as_coro: Literal[True],
        extensions: bool = False,
        trace: tracing.TraceTarget | None = None,
    ) -> Coroutine[Any, Any, _ContainerT]: ...

    @classmethod
    def create(
        cls: type[_ContainerT],
        addr: Address | nats_mod.NatsConfig,
        *,
        clock: BaseClock | None = None,
        codec: type[Codec] | None = None,
        extra_serializers: Iterable[SerializerFactory] | None = None,
        ssl: SSLCerts | tuple[ssl_mod.SSLContext, ssl_mod.SSLContext] | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        dead_peer_timeout: float | None = None,
        nats: str | nats_mod.NatsConfig | None = None,
        as_coro: bool = False,
        extensions: bool = False,
        trace: tracing.TraceTarget | None = None,
    ) -> _ContainerT | Coroutine[Any, Any, _ContainerT]:
        """Make a container with a server socket listening on *addr*.

        The socket is bound first; then the container is made (see
        :class:`Container`) with its real base URL, so agents created in a
        subclass' ``__init__`` get their full addresses.

        Args:
            addr: A ``(host, port)`` tuple for TCP, a path for a unix domain
                socket, a :class:`~aiomas.local_queue.LocalQueue`, or a NATS
                URL (``'nats://host:4222/<name>'``) or
                :class:`~aiomas.nats.NatsConfig`: the container then is
                ``nats://<name>/`` on that NATS system (see :doc:`/nats`).  A host
                ``'0.0.0.0'``, ``'::'``, ``''`` or ``None`` listens on all
                interfaces, and the agents' addresses use the machine's FQDN
                (:func:`socket.getfqdn`).  Port ``0`` picks a free port.
            clock: The agents' clock (default: a new
                :class:`~aiomas.clocks.AsyncioClock`).
            codec: A :class:`~aiomas.codecs.Codec` subclass (default:
                :class:`~aiomas.codecs.JSON`).
            extra_serializers: Callables returning ``add_serializer()``
                argument tuples.  The container adds a serializer for Arrow
                dates first (type id 0), then these, then one for agent
                proxies, as the original aiomas does.
            ssl: An :class:`SSLCerts` or a ``(server_context, client_context)``
                tuple: TLS for all incoming and outgoing TCP connections.
            max_frame_size: The largest message (payload bytes) accepted from
                another container, on incoming and outgoing connections; a
                peer that sends a larger one is disconnected.
            dead_peer_timeout: Seconds after which a TCP connection to a
                container that stopped acknowledging data (a vanished host, a
                cut link) is closed, on incoming and outgoing connections;
                calls over it then fail with :class:`ConnectionResetError`
                and the next :meth:`connect` opens a new one (see
                :func:`aiomas.channel.open_connection`).  ``None`` leaves it
                to the operating system (15 minutes, or never while idle).
            nats: A NATS URL or :class:`~aiomas.nats.NatsConfig` for a
                container that listens on *addr* and on NATS at once: its
                agents are reachable as ``nats://<name>/<id>`` too (their
                :attr:`Agent.addr` is the one on *addr*), and it can connect
                to ``nats://`` addresses.
            as_coro: ``True`` returns a coroutine to ``await`` (for use inside
                a running event loop); ``False`` runs the event loop until the
                server listens.
            extensions: Speak the wire extension with containers that speak
                it too (deadlines and cancels that reach the peer, see
                :doc:`/deadlines`): offer it on every connection we open,
                accept it on those opened to us.  Requests served under a
                deadline run on the container's *clock*.  Off by default:
                every connection speaks exactly the plain wire format.
            trace: Record the messages of all the container's connections
                (see :doc:`/tracing`): a :class:`~aiomas.tracing.Tracer`, a
                directory for this process' trace file, or a sink (a callable
                taking each record).  Default: the process-wide tracer, if
                :func:`aiomas.tracing.enable` or ``AIOMAS_TRACE`` turned one on.
                A traced container accepts the wire extension's offer of the
                containers that connect to it (so that their trace context
                arrives); it offers it itself only with *extensions*.

        Returns:
            The container (or, with *as_coro*, a coroutine returning it).

        Raises:
            OSError: if the server socket cannot be bound, no NATS server can
                be reached (:class:`ConnectionRefusedError`) or another
                container on the NATS system has the name (``EADDRINUSE``).
            TypeError: if *ssl* has the wrong type, an extra serializer is bad
                (e.g. an unhashable key, see
                :meth:`~aiomas.codecs.Codec.add_serializer`), or the subclass'
                ``__init__`` does not call ``super().__init__()``.
            ImportError: for NATS, if nats-py is not installed
                (``pip install 'aiomas[nats]'``).
            ValueError: if a NATS URL is invalid, *addr* and *nats* are both
                on NATS, if *max_frame_size* is not a number from 0 to
                2**32 - 1, *dead_peer_timeout* is not a positive finite
                number, or two extra serializers are for the same type.
        """
        # Bad limits fail here, not later.
        FrameReader(max_frame_size)
        check_dead_peer_timeout(dead_peer_timeout)
        limits = {
            "max_frame_size": max_frame_size,
            "dead_peer_timeout": dead_peer_timeout,
        }
        if nats is not None and _nats_config(addr) is not None:
            raise ValueError("addr is on NATS already: pass nats=None")
        tracer = tracing.as_tracer(trace)
        coro = _create(
            cls, addr, clock, codec, extra_serializers, ssl, limits, nats, extensions
        )
        if tracer is not None:
            coro = _traced(coro, tracer)
        if as_coro:
            return coro
        return util.run_blocking(coro, "await Container.create(addr, as_coro=True)")

    @property
    def base_url(self) -> str:
        """The address of the container: its agents' addresses without the id,
        e.g. ``'tcp://localhost:5555/'``."""
        return self._aiomas.registry.base_url

    @property
    def clock(self) -> BaseClock:
        """The clock of the container (a :class:`~aiomas.clocks.BaseClock`)."""
        return self._aiomas.clock

    @property
    def _tcp_server(self) -> asyncio.AbstractServer | None:
        """The container's server (for any kind of address) while it serves,
        ``None`` after :meth:`shutdown` (kept for code written against aiomas
        2.0.1)."""
        state = self._aiomas
        return None if state.shutdown_task is not None else state.server

    @rpc.expose
    def validate_aid(self, aid: Any) -> str | None:
        """Return the class name of the agent with id *aid*, or ``None`` if
        there is no such agent."""
        agent = self._aiomas.registry.find(aid)
        return None if agent is None else type(agent).__name__

    async def connect(self, url: str, timeout: float | None = 0) -> AgentProxy:  # noqa: ASYNC109
        """Return a proxy to the agent at *url* (e.g. ``'tcp://localhost:5555/0'``).

        All agents of this container share one connection to each other
        container; concurrent calls share one connection attempt, and proxies
        are cached.

        Args:
            url: The agent's address (:attr:`Agent.addr`).
            timeout: ``0`` tries to connect once; a number of seconds keeps
                trying for that long, ``None`` forever (for containers that may
                not be up yet).  A number bounds the whole call (TCP connect,
                TLS handshake and the agent lookup) to *timeout* plus 0.1 s.
                With ``0`` or ``None``, the container's *dead_peer_timeout*
                (else the operating system and asyncio's 60 s TLS handshake
                timeout) bounds each connect attempt, and the lookup on a new
                connection is given up after 60 s.

        Raises:
            ValueError: if *url* is no valid agent address.
            LookupError: if the container at *url* has no agent with that id.
            ConnectionRefusedError: if nobody listens at a TCP address or
                LocalQueue, no container of that name is on the NATS system
                ("no responders"), or this container is on no NATS system.
            FileNotFoundError: if the unix domain socket does not exist.
            TimeoutError: if connecting or the lookup takes longer than
                allowed (see *timeout*).
            OSError: for other connection errors, e.g. an unreachable
                network.
            RuntimeError: if this container has been shut down.
        """
        return await self._aiomas.pool.connect(url, timeout)

    @overload
    def shutdown(self, as_coro: Literal[False] = False) -> None: ...

    @overload
    def shutdown(self, as_coro: Literal[True]) -> Coroutine[Any, Any, None]: ...

    def shutdown(self, as_coro: bool = False) -> Coroutine[Any, Any, None] | None:
        """Close the server socket and all connections of the container.

        Calls in flight over them fail with :class:`ConnectionResetError`.

        Args:
            as_coro: ``True`` returns a coroutine to ``await`` (inside a running
                event loop); ``False`` runs the event loop until all is closed.
        """
        coro = self._aiomas.shutdown()
        if as_coro:
            return coro
        util.run_blocking(coro, "await container.shutdown(as_coro=True)")
        return None


def _init_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[BaseClock, dict[str, Any]]:
    """Bind the arguments of :class:`Container` in either form:
    ``(clock, connect_kwargs)`` (1.0.3) or ``(loop, clock, connect_kwargs)``
    (2.0.1)."""
    values = list(args)
    loop = kwargs.pop("loop", None)
    if len(values) == 3 or (
        values
        and (values[0] is None or isinstance(values[0], asyncio.AbstractEventLoop))
    ):
        loop = values.pop(0)
    names = ("clock", "connect_kwargs")
    if len(values) > len(names):
        raise TypeError(
            f"Container() takes (base_url, clock, connect_kwargs) or (base_url, "
            f"loop, clock, connect_kwargs), got {len(args) + 1} positional arguments"
        )
    bound = dict(zip(names, values, strict=False))
    for name in names[len(values) :]:
        if name not in kwargs:
            raise TypeError(f"Container() is missing the argument {name!r}")
        bound[name] = kwargs.pop(name)
    if kwargs:
        raise TypeError(f"Container() got unexpected arguments: {sorted(kwargs)}")
    if loop is not None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = loop
        if loop is not running:
            raise ValueError(
                "The 'loop' argument must be the running event loop (or None)"
            )
    return bound["clock"], bound["connect_kwargs"]


def _takes_loop(cls: type[Container]) -> bool:
    """Whether *cls* is constructed as in aiomas 2.0.1, with ``(base_url, loop,
    clock, connect_kwargs)``: its ``__init__`` has a parameter ``loop`` or four
    required positional ones."""
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):  # No signature to read: the 1.0.3 form.
        return False
    positional = [
        param
        for param in parameters
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD)
    ]
    if any(param.name == "loop" for param in positional):
        return True
    required = [param for param in positional if param.default is param.empty]
    return len(required) == 4


def nats_link(container: Container) -> nats_mod.NatsLink | None:
    """The link of *container* to its NATS system (``None`` if it is on
    none), e.g. for :meth:`~aiomas.nats.NatsLink.discover`."""
    return state_of(container).pool.nats_link


def state_of(container: Container) -> _ContainerState:
    """The parts that *container* is made of, for tests and debugging (see the
    design page of the documentation): ``registry`` (its agents and the
    connections other containers opened to it), ``pool`` (its connections to
    other containers, an :class:`aiomas._pool.ConnectionPool`) and ``server``.

    Raises:
        TypeError: if *container*'s ``__init__`` did not call
            ``Container.__init__()``.
    """
    state = getattr(container, "_aiomas", None)
    if not isinstance(state, _ContainerState):
        raise TypeError(
            f"{type(container).__qualname__}.__init__() must call "
            "super().__init__() before it creates agents or returns"
        )
    return state


async def _create(
    cls: type[_ContainerT],
    addr: Address | nats_mod.NatsConfig,
    clock: BaseClock | None,
    codec: type[Codec] | None,
    extra_serializers: Iterable[SerializerFactory] | None,
    ssl: SSLCerts | tuple[ssl_mod.SSLContext, ssl_mod.SSLContext] | None,
    limits: dict[str, Any],
    nats: str | nats_mod.NatsConfig | None = None,
    extensions: bool = False,
) -> _ContainerT:
    """Bind the server socket, then make the container (see Container.create)."""
    nats_config = _nats_config(addr)
    extra_config = _nats_config(nats)
    if nats is not None and extra_config is None:
        raise ValueError(f"nats must be a NATS URL or NatsConfig, got {nats!r}")
    # Bad URLs fail before anything is opened.
    links: list[nats_mod.NatsLink] = []
    servers: list[asyncio.AbstractServer] = []
    try:
        for config in (nats_config, extra_config):
            if config is not None:
                links.append(await nats_mod.connect(config))
        return await _create_on(
            cls,
            addr,
            clock,
            codec,
            extra_serializers,
            ssl,
            limits,
            links,
            servers,
            extensions,
        )
    except BaseException:
        for server in servers:
            server.close()
            await server.wait_closed()
        for link in links:
            await link.close()
        raise


async def _traced(
    coro: Coroutine[Any, Any, _ContainerT], tracer: tracing.Tracer
) -> _ContainerT:
    """Make the container (*coro*) and trace it into *tracer*."""
    container = await coro
    state_of(container).tracer = tracer
    return container


def _nats_config(addr: object) -> nats_mod.NatsConfig | None:
    """The NATS configuration that *addr* stands for, or ``None``.

    Raises:
        ValueError: for an invalid NATS URL.
    """
    if isinstance(addr, nats_mod.NatsConfig):
        return addr
    if nats_mod.is_nats_url(addr):
        return nats_mod.NatsConfig.from_url(cast(str, addr))
    return None


async def _create_on(
    cls: type[_ContainerT],
    addr: Address | nats_mod.NatsConfig,
    clock: BaseClock | None,
    codec: type[Codec] | None,
    extra_serializers: Iterable[SerializerFactory] | None,
    ssl: SSLCerts | tuple[ssl_mod.SSLContext, ssl_mod.SSLContext] | None,
    limits: dict[str, Any],
    links: list[nats_mod.NatsLink],
    servers: list[asyncio.AbstractServer],
    extensions: bool = False,
) -> _ContainerT:
    """Listen on *addr* and make the container.  *links* has the link of a
    NATS *addr*, or else the link of the NATS system that the container
    serves on as well, or nothing; the servers started go into *servers*
    (closed by the caller if this fails)."""
    server_ctx, client_ctx = _ssl_contexts(ssl)
    # The order of the originals: the type ids of a container's custom types
    # are part of the wire format.
    serializers = [util.arrow_serializer, *(extra_serializers or ())]
    kwargs: dict[str, Any] = {
        "codec": JSON if codec is None else codec,
        "extra_serializers": serializers,
        **limits,
    }
    connect_kwargs = dict(kwargs)
    if client_ctx is not None:
        connect_kwargs["ssl"] = client_ctx
    clock = AsyncioClock() if clock is None else clock
    if extensions:
        # (For rpc.open_connection(), and read by the agent registry.)
        connect_kwargs["extensions"] = True
        connect_kwargs["clock"] = clock
    made: list[Container] = []

    def connected(channel: Channel) -> None:
        # The container is made right after the bind, before the loop runs
        # again: no connection is accepted before it exists.
        if made:
            state_of(made[0]).registry.client_connected(channel)
        else:
            cast(asyncio.Transport, channel.transport).abort()

    socket_file = None
    server: asyncio.AbstractServer
    nats_server: nats_mod.NatsServer | None = None
    on_nats = _nats_config(addr) is not None
    if on_nats:
        link = links[0]
        server = await channel_mod.start_server(
            link.endpoint(link.config.name), connected, **kwargs
        )
        base_url = nats_base_url(link.config.name)
    elif isinstance(addr, local_queue.LocalQueue):
        server = await channel_mod.start_server(addr, connected, **kwargs)
        base_url = local_base_url(addr.queue_id)
        # Connections to other LocalQueue containers come from this queue
        # (what a simulated network needs to know, see aiomas.simulation).
        connect_kwargs["local_addr"] = addr
    elif isinstance(addr, str | os.PathLike):
        path = os.fspath(addr)
        server = await channel_mod.start_server(path, connected, **kwargs)
        base_url = ipc_base_url(path)
        socket_file = (path, os.stat(path).st_ino)
    else:
        host, port = cast(tuple[Any, int], addr)
        if server_ctx is not None:
            kwargs["ssl"] = server_ctx
        server, port = await _serve_tcp(host, port, connected, kwargs)
        base_url = tcp_base_url(host, port)
    servers.append(server)
    if links and not on_nats:
        # The container listens on NATS too.
        link = links[0]
        kwargs.pop("ssl", None)
        extra = await channel_mod.start_server(
            link.endpoint(link.config.name), connected, **kwargs
        )
        nats_server = cast(nats_mod.NatsServer, extra)
        servers.append(nats_server)
    try:
        if _takes_loop(cls):
            loop = asyncio.get_running_loop()
            container = cls(base_url, loop, clock, connect_kwargs)
        else:
            container = cls(base_url, clock, connect_kwargs)
        state = state_of(container)
    except BaseException:
        _remove_socket_file(socket_file)
        raise
    for nats_listener in servers:
        if isinstance(nats_listener, nats_mod.NatsServer):
            nats_listener.owns_link = True
            nats_listener.info = state.registry.describe
    state.server = server
    state.nats_server = nats_server
    state.socket_file = socket_file
    if links:
        state.pool.nats_link = links[0]
    made.append(container)
    return container


async def _serve_tcp(
    host: Any,
    port: int,
    connected: Callable[[Channel], None],
    kwargs: dict[str, Any],
) -> tuple[asyncio.AbstractServer, int]:
    """Listen on *host*; with port 0, use the same free port on each of the
    host's interfaces, so that the agents' address reaches all of them."""
    for _ in range(_SAME_PORT_ATTEMPTS):
        server = await channel_mod.start_server((host, port), connected, **kwargs)
        sockets = cast(asyncio.Server, server).sockets
        ports = {sock.getsockname()[1] for sock in sockets}
        if len(ports) == 1 or port != 0:
            return server, ports.pop() if port == 0 else port
        first_port = sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        try:
            server = await channel_mod.start_server(
                (host, first_port), connected, **kwargs
            )
        except OSError:
            continue  # Someone else got that port on another interface.
        return server, first_port
    raise OSError(f"Found no port that is free on every interface of {host!r}")


def _remove_socket_file(socket_file: tuple[str, int] | None) -> None:
    """Remove our unix socket file (Python 3.13 does so itself, older ones
    leave it behind), unless someone else has replaced it since."""
    if socket_file is None:
        return
    path, inode = socket_file
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass


class _AgentsRouter(rpc.Router):
    """The router of a container's :attr:`~Container.agents`: it keeps the
    routers of the agents placed in the tree (see
    :meth:`_AgentRegistry.place`), and finds a call's agent by them while
    that agent is in the dict."""

    __slots__ = ("placed",)

    obj: rpc.ServiceDict

    def __init__(self, agents: rpc.ServiceDict) -> None:
        super().__init__(agents)
        self.placed: dict[str, rpc.Router] = {}

    def sub_router(self, name: str) -> rpc.Router | None:
        router = self.placed.get(name)
        if router is not None and router.obj is self.obj.dict.get(name):
            return router
        return super().sub_router(name)


class _AgentRegistry:
    """The agents of a container and the service it offers: the ids and
    addresses of its agents, the container's router, and the connections that
    other containers opened to it.

    Args:
        container: The container: the RPC service of every incoming connection,
            whose router gets the agents as its sub-service ``agents``.
        base_url: The address prefix of the container's agents.
    """

    __slots__ = (
        "_by_id",
        "_closed",
        "_ids",
        "_incoming",
        "_placed",
        "agents",
        "base_url",
        "container",
        "extensions",
    )

    def __init__(
        self, container: Container, base_url: str, extensions: bool = False
    ) -> None:
        self.container = container
        self.extensions = extensions
        """Whether connections to us may agree on the wire extension."""
        self.base_url = base_url
        self.agents = rpc.ServiceDict()
        self._by_id = self.agents.dict
        self._placed = _AgentsRouter(self.agents)
        self.agents.router = self._placed
        container.router.set_sub_router(self._placed, "agents")
        self._ids = itertools.count()
        # A dict, not a set: closed in the order they came, in every process.
        self._incoming: dict[rpc.RpcClient, None] = {}
        self._closed = False

    @property
    def clients(self) -> frozenset[rpc.RpcClient]:
        """The open connections that other containers opened to us."""
        return frozenset(self._incoming)

    def register(self, agent: Agent) -> str:
        """Give *agent* the next id, make it reachable via RPC and return its
        address.

        Raises:
            RuntimeError: if the registry has been closed.
        """
        if self._closed:
            self._check_open()
        aid = str(next(self._ids))
        self._by_id[aid] = agent
        addr = self.base_url + aid
        # The agent's router is made on first use, and placed then (see
        # Agent.__rpc_router_made__), unless it exists already.
        if _unplaced and _unplaced.pop(id(agent), None) is not None:
            self.place(agent.router, addr)
        return addr

    def place(self, router: rpc.Router, addr: str) -> None:
        """Put *router*, the router of our agent at *addr*, at its place in
        the container's tree (below ``agents``, which gives it its RPC path,
        and where calls find it without a lookup in the agent's class)."""
        aid = addr[len(self.base_url) :]
        router.parent = self._placed
        router.name = aid
        self._placed.placed[aid] = router

    def find(self, aid: Any) -> Agent | None:
        """The agent with id *aid* (a string, or an int as 2.0.1 sent it), or
        ``None``."""
        if type(aid) is int:
            aid = str(aid)
        agent = self.agents.dict.get(aid) if isinstance(aid, str) else None
        return cast(Agent | None, agent)

    def client_connected(self, channel: Channel) -> None:
        """Serve the container on the new incoming *channel* (abort it once
        the registry is closed)."""
        if self._closed:
            cast(asyncio.Transport, channel.transport).abort()
            return
        state = state_of(self.container)
        tracer = state.tracer or tracing.active()
        if tracer is not None:
            channel.start_tracing(
                tracer, addr=self.base_url, clock=self.container.clock.time
            )
        if self.extensions or tracer is not None:
            client = rpc.RpcClient(
                channel,
                self.container,
                extensions=True,
                clock=self.container.clock,
            )
        else:
            client = rpc.RpcClient(channel, self.container)
        self._incoming[client] = None
        service = client.service
        assert service is not None  # We serve the container to every client.
        service.add_done_callback(lambda _: self._incoming.pop(client, None))

    def describe(self) -> dict[str, Any]:
        """What the container tells about itself on NATS (see
        :meth:`aiomas.nats.NatsLink.discover`): its agents' ids and class
        names (up to 10,000 of them) and how many there are."""
        agents = self.agents.dict
        listed = dict(itertools.islice(agents.items(), _LISTED_AGENTS))
        return {
            "agents": {aid: type(agent).__name__ for aid, agent in listed.items()},
            "agent_count": len(agents),
        }

    def close(self) -> asyncio.Future[list[Any]]:
        """Refuse new agents and connections from now on and close the
        incoming connections.

        Returns:
            A future that is done when they are closed.
        """
        self._closed = True
        clients = list(self._incoming)
        return asyncio.gather(
            *(client.close() for client in clients), return_exceptions=True
        )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.container!r} has been shut down")


class _ContainerState:
    """What a :class:`Container` is made of besides its public API: its agent
    registry, its connection pool, its server and its shutdown."""

    __slots__ = (
        "clock",
        "nats_server",
        "pool",
        "registry",
        "server",
        "shutdown_task",
        "socket_file",
        "tracer",
    )

    def __init__(
        self,
        container: Container,
        base_url: str,
        clock: BaseClock,
        connect_kwargs: dict[str, Any],
    ) -> None:
        self.clock = clock
        self.registry = _AgentRegistry(
            container, base_url, bool(connect_kwargs.get("extensions"))
        )
        self.pool = ConnectionPool(container, connect_kwargs, AgentProxy)
        self.pool.on_open = self._trace_connection
        self.tracer: tracing.Tracer | None = None
        """The container's own tracer (``trace=``), or ``None``: the
        process-wide one, if any."""
        self.server: asyncio.AbstractServer | None = None
        # The NATS server of a container that listens on NATS besides its
        # address (a container *on* NATS has it as its server).
        self.nats_server: nats_mod.NatsServer | None = None
        # The unix socket file we listen on (path and inode), removed at shutdown.
        self.socket_file: tuple[str, int] | None = None
        self.shutdown_task: asyncio.Task[None] | None = None

    def _trace_connection(self, channel: Channel) -> None:
        tracer = self.tracer or tracing.active()
        if tracer is not None:
            channel.start_tracing(
                tracer, addr=self.registry.base_url, clock=self.clock.time
            )

    async def shutdown(self) -> None:
        """Close the server, the registry and the pool (once)."""
        if self.shutdown_task is None:
            # Everything refuses new work from here on, at once.
            for server in (self.server, self.nats_server):
                if server is not None:
                    server.close()
            closing = asyncio.gather(self.pool.close(), self.registry.close())
            self.shutdown_task = asyncio.ensure_future(self._finish(closing))
        await asyncio.shield(self.shutdown_task)

    async def _finish(self, closing: asyncio.Future[Any]) -> None:
        await closing
        for server in (self.server, self.nats_server):
            if server is not None:
                await server.wait_closed()
        _remove_socket_file(self.socket_file)
