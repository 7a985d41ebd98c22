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
``ipc://[<socket path>]/<id>`` for unix domain sockets and ``local://<queue
id>/<id>`` for :mod:`aiomas.local_queue` (see :func:`parse_url` for the other
spellings that are read).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import os
import socket
import ssl as ssl_mod
import weakref
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Literal, NamedTuple, TypeVar, cast, overload

from aiomas import channel as channel_mod
from aiomas import local_queue, rpc, util
from aiomas._connect import check_dead_peer_timeout
from aiomas.channel import Address, Channel, SerializerFactory
from aiomas.clocks import AsyncioClock, BaseClock
from aiomas.codecs import JSON, Codec
from aiomas.wire import DEFAULT_MAX_FRAME_SIZE, FrameReader

__all__ = [
    "Agent",
    "AgentProxy",
    "Container",
    "SSLCerts",
    "parse_url",
    "split_host_port",
]

logger = logging.getLogger(__name__)

_ContainerT = TypeVar("_ContainerT", bound="Container")

# Hosts that make a server listen on every interface; agent addresses then name
# the machine by its fully qualified domain name instead.
_WILDCARD_HOSTS = frozenset({None, "", "0.0.0.0", "::"})

_SCHEMES = ("tcp", "ipc", "local")

# How often create() retries to get the same free port on all interfaces of a
# host name (like "localhost") when asked for port 0.
_SAME_PORT_ATTEMPTS = 5

# How long Container.connect() without a timeout waits for the answer to the
# agent lookup: as long as asyncio waits for a TLS handshake.
_LOOKUP_TIMEOUT = 60.0
# What Container.connect(timeout=T) may take beyond T: its connect attempts end
# by T with their own error; this bounds whatever comes after them.
_TIMEOUT_SLACK = 0.1


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
        self.addr = _state_of(container).register(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.addr!r})"


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


class _Endpoint(NamedTuple):
    """Where a container listens, as parsed from an agent address."""

    base_url: str  # e.g. "tcp://localhost:5555/"
    addr: Address  # what aiomas.rpc.open_connection() needs


def parse_url(url: str) -> tuple[_Endpoint, str]:
    """Split an agent address into its container's endpoint and the agent id.

    Both spellings of the original aiomas versions are read: unix domain
    sockets as ``ipc://[PATH]/ID`` (what we write) and ``ipc://PATH/ID``, IPv6
    hosts as ``tcp://[::1]:5555/ID`` (what we write) and ``tcp://::1:5555/ID``
    (aiomas 2.0.1: the host is everything before the last colon).  The
    endpoint's ``base_url`` is always the spelling we write, so both name the
    same container.

    Raises:
        ValueError: if *url* is no valid agent address.
    """
    scheme, base_url, where, aid = _locate(url)
    if scheme == "local":
        return _Endpoint(base_url, local_queue.get_queue(where)), aid
    return _Endpoint(base_url, where), aid


def _locate(url: str) -> tuple[str, str, Any, str]:
    """Return the scheme of *url*, its container's base URL (in the spelling
    we write), where that container is (``(host, port)``, a socket path or a
    queue id) and the agent id; nothing is looked up.

    Raises:
        ValueError: if *url* is no valid agent address.
    """
    scheme, location, aid = _split_url(url)
    if scheme == "tcp":
        host, port = _parse_host_port(location, url)
        return scheme, _host_port_url(host, port), (host, port), aid
    if scheme == "ipc":
        return scheme, _ipc_base_url(location), location, aid
    return scheme, f"local://{location}/", location, aid


def _split_url(url: str) -> tuple[str, str, str]:
    """Split *url* into scheme, location (an ipc path without brackets) and
    agent id."""
    if not isinstance(url, str):
        raise ValueError(f"An agent address must be a string, got {url!r}")
    scheme, sep, rest = url.partition("://")
    location, _, aid = rest.rpartition("/")
    if scheme == "ipc" and location.startswith("[") and location.endswith("]"):
        location = location[1:-1]
    if not sep or scheme not in _SCHEMES or not location or not aid:
        raise ValueError(
            f"Invalid agent address {url!r}: expected 'tcp://host:port/id', "
            "'ipc://[path]/id' or 'local://queue_id/id'"
        )
    return scheme, location, aid


def _get_base_url(addr: str) -> str:
    """Return the address of the container of the agent at *addr*, with a
    trailing slash: ``'tcp://localhost:5555/'``, ``'ipc://[/tmp/s]/'``,
    ``'local://q/'`` (kept for code written against aiomas 2.0.1).

    Both spellings of unix socket and IPv6 addresses give the one we write (see
    :func:`parse_url`), so the result compares equal to
    :attr:`Container.base_url`.

    Raises:
        ValueError: if *addr* is no valid agent address.
    """
    return _locate(addr)[1]


def split_host_port(text: str) -> tuple[str, int]:
    """Split ``host:port`` into host and port.

    An IPv6 host is written in brackets (``[::1]:5555``); without them, the host
    is everything before the last colon (``::1:5555``), as aiomas 2.0.1 wrote
    it.

    Raises:
        ValueError: if *text* is not of that form or the port is not in
            0...65535.
    """
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if (
        not sep
        or not host
        or "[" in host
        or "]" in host
        or not port.isdigit()
        or int(port) > 65535
    ):
        raise ValueError(f"expected host:port, got {text!r}")
    return host, int(port)


def _parse_host_port(location: str, url: str) -> tuple[str, int]:
    try:
        host, port = split_host_port(location)
    except ValueError:
        port = 0
    if port == 0:  # (Port 0 is for listening, not for connecting.)
        raise ValueError(
            f"Invalid agent address {url!r}: expected 'tcp://host:port/id' "
            "(with an IPv6 host in brackets, like 'tcp://[::1]:5555/0')"
        )
    return host, port


def _tcp_base_url(host: Any, port: int) -> str:
    """The base URL of a container listening on *host* and *port*."""
    return _host_port_url(socket.getfqdn() if host in _WILDCARD_HOSTS else host, port)


def _host_port_url(host: str, port: int) -> str:
    if ":" in host:
        host = f"[{host}]"
    return f"tcp://{host}:{port}/"


def _ipc_base_url(path: str) -> str:
    # The brackets (as in the original aiomas) keep the slashes of the path
    # apart from the one before the agent id.
    return f"ipc://[{path}]/"


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


class _Attempt:
    """A connection attempt and how many connect() calls wait for it."""

    __slots__ = ("task", "waiters")

    def __init__(self, task: asyncio.Task[rpc.RpcClient]) -> None:
        self.task = task
        self.waiters = 0


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
        self.agents = rpc.ServiceDict()
        """The container's agents: ``agents.dict`` maps agent ids to agents."""
        # All other state lives in one object under a name that no subclass
        # picks for its own attributes.
        self._aiomas = _ContainerState(
            self, base_url, clock, connect_kwargs, self.agents
        )
        self.router.set_sub_router(self.agents.router, "agents")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"

    @overload
    @classmethod
    def create(
        cls: type[_ContainerT],
        addr: Address,
        *,
        clock: BaseClock | None = None,
        codec: type[Codec] | None = None,
        extra_serializers: Iterable[SerializerFactory] | None = None,
        ssl: SSLCerts | tuple[ssl_mod.SSLContext, ssl_mod.SSLContext] | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        dead_peer_timeout: float | None = None,
        as_coro: Literal[False] = False,
    ) -> _ContainerT: ...

    @overload
    @classmethod
    def create(
        cls: type[_ContainerT],
        addr: Address,
        *,
        clock: BaseClock | None = None,
        codec: type[Codec] | None = None,
        extra_serializers: Iterable[SerializerFactory] | None = None,
        ssl: SSLCerts | tuple[ssl_mod.SSLContext, ssl_mod.SSLContext] | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        dead_peer_timeout: float | None = None,
        as_coro: Literal[True],
    ) -> Coroutine[Any, Any, _ContainerT]: ...

    @classmethod
    def create(
        cls: type[_ContainerT],
        addr: Address,
        *,
        clock: BaseClock | None = None,
        codec: type[Codec] | None = None,
        extra_serializers: Iterable[SerializerFactory] | None = None,
        ssl: SSLCerts | tuple[ssl_mod.SSLContext, ssl_mod.SSLContext] | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        dead_peer_timeout: float | None = None,
        as_coro: bool = False,
    ) -> _ContainerT | Coroutine[Any, Any, _ContainerT]:
        """Make a container with a server socket listening on *addr*.

        The socket is bound first; then the container is made (see
        :class:`Container`) with its real base URL, so agents created in a
        subclass' ``__init__`` get their full addresses.

        Args:
            addr: A ``(host, port)`` tuple for TCP, a path for a unix domain
                socket or a :class:`~aiomas.local_queue.LocalQueue`.  A host
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
            as_coro: ``True`` returns a coroutine to ``await`` (for use inside
                a running event loop); ``False`` runs the event loop until the
                server listens.

        Returns:
            The container (or, with *as_coro*, a coroutine returning it).

        Raises:
            OSError: if the server socket cannot be bound.
            TypeError: if *ssl* has the wrong type, an extra serializer is bad
                (e.g. an unhashable key, see
                :meth:`~aiomas.codecs.Codec.add_serializer`), or the subclass'
                ``__init__`` does not call ``super().__init__()``.
            ValueError: if *max_frame_size* is not a number from 0 to
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
        coro = _create(cls, addr, clock, codec, extra_serializers, ssl, limits)
        if as_coro:
            return coro
        return util.run_blocking(coro, "await Container.create(addr, as_coro=True)")

    @property
    def base_url(self) -> str:
        """The address of the container: its agents' addresses without the id,
        e.g. ``'tcp://localhost:5555/'``."""
        return self._aiomas.base_url

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
        if type(aid) is int:
            aid = str(aid)
        agent = self._aiomas.agents.dict.get(aid) if isinstance(aid, str) else None
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
                LocalQueue.
            FileNotFoundError: if the unix domain socket does not exist.
            TimeoutError: if connecting or the lookup takes longer than
                allowed (see *timeout*).
            OSError: for other connection errors, e.g. an unreachable
                network.
            RuntimeError: if this container has been shut down.
        """
        return await self._aiomas.connect(url, timeout)

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


def _state_of(container: Container) -> _ContainerState:
    state = getattr(container, "_aiomas", None)
    if not isinstance(state, _ContainerState):
        raise TypeError(
            f"{type(container).__qualname__}.__init__() must call "
            "super().__init__() before it creates agents or returns"
        )
    return state


async def _create(
    cls: type[_ContainerT],
    addr: Address,
    clock: BaseClock | None,
    codec: type[Codec] | None,
    extra_serializers: Iterable[SerializerFactory] | None,
    ssl: SSLCerts | tuple[ssl_mod.SSLContext, ssl_mod.SSLContext] | None,
    limits: dict[str, Any],
) -> _ContainerT:
    """Bind the server socket, then make the container (see Container.create)."""
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
    made: list[Container] = []

    def connected(channel: Channel) -> None:
        # The container is made right after the bind, before the loop runs
        # again: no connection is accepted before it exists.
        if made:
            _state_of(made[0]).client_connected(channel)
        else:
            cast(asyncio.Transport, channel.transport).abort()

    socket_file = None
    server: asyncio.AbstractServer
    if isinstance(addr, local_queue.LocalQueue):
        server = await channel_mod.start_server(addr, connected, **kwargs)
        base_url = f"local://{addr.queue_id}/"
    elif isinstance(addr, str | os.PathLike):
        path = os.fspath(addr)
        server = await channel_mod.start_server(path, connected, **kwargs)
        base_url = _ipc_base_url(path)
        socket_file = (path, os.stat(path).st_ino)
    else:
        host, port = addr
        if server_ctx is not None:
            kwargs["ssl"] = server_ctx
        server, port = await _serve_tcp(host, port, connected, kwargs)
        base_url = _tcp_base_url(host, port)
    clock = AsyncioClock() if clock is None else clock
    try:
        if _takes_loop(cls):
            loop = asyncio.get_running_loop()
            container = cls(base_url, loop, clock, connect_kwargs)
        else:
            container = cls(base_url, clock, connect_kwargs)
        state = _state_of(container)
    except BaseException:
        server.close()
        await server.wait_closed()
        _remove_socket_file(socket_file)
        raise
    state.server = server
    state.socket_file = socket_file
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


class _ContainerState:
    """Everything a :class:`Container` keeps and does besides its public API."""

    __slots__ = (
        "agent_ids",
        "agents",
        "base_url",
        "clock",
        "connect_kwargs",
        "connecting",
        "container",
        "incoming",
        "outgoing",
        "proxies",
        "server",
        "shutdown_task",
        "socket_file",
    )

    def __init__(
        self,
        container: Container,
        base_url: str,
        clock: BaseClock,
        connect_kwargs: dict[str, Any],
        agents: rpc.ServiceDict,
    ) -> None:
        self.container = container
        self.base_url = base_url
        self.clock = clock
        self.connect_kwargs = connect_kwargs
        self.agent_ids = itertools.count()
        self.agents = agents
        self.server: asyncio.AbstractServer | None = None
        # Connections to other containers (by their base URL), those being made
        # right now (shared by concurrent connect() calls), and the cached agent
        # proxies of each connection.
        self.outgoing: dict[str, rpc.RpcClient] = {}
        self.connecting: dict[str, _Attempt] = {}
        self.proxies: dict[str, weakref.WeakValueDictionary[str, AgentProxy]] = {}
        # Connections that other containers opened to us.
        self.incoming: set[rpc.RpcClient] = set()
        self.shutdown_task: asyncio.Task[None] | None = None
        # The unix socket file we listen on (path and inode), removed at shutdown.
        self.socket_file: tuple[str, int] | None = None

    def register(self, agent: Agent) -> str:
        """Give *agent* the next id, make it reachable via RPC and return its
        address."""
        self.check_running()
        aid = str(next(self.agent_ids))
        agents = self.agents
        agents.dict[aid] = agent
        # The ServiceDict finds the agent's router in its dict; what it needs
        # besides is the router's place in the tree, for the agent's RPC path.
        router = agent.router
        router.parent = agents.router
        router.name = aid
        return self.base_url + aid

    def check_running(self) -> None:
        if self.shutdown_task is not None:
            raise RuntimeError(f"{self.container!r} has been shut down")

    def client_connected(self, channel: Channel) -> None:
        if self.shutdown_task is not None:
            cast(asyncio.Transport, channel.transport).abort()
            return
        client = rpc.RpcClient(channel, self.container)
        self.incoming.add(client)
        service = client.service
        assert service is not None  # We serve the container to every client.
        service.add_done_callback(lambda _: self.incoming.discard(client))

    async def connect(self, url: str, retry_for: float | None) -> AgentProxy:
        endpoint, aid = parse_url(url)
        self.check_running()
        base_url = endpoint.base_url
        client = self.open_client(base_url)
        if client is not None:
            proxy = self.proxies[base_url].get(aid)
            if proxy is not None:
                return proxy
        loop = asyncio.get_running_loop()
        deadline = loop.time() + retry_for + _TIMEOUT_SLACK if retry_for else None
        bounded = deadline is not None
        new_client: rpc.RpcClient | None = None
        try:
            async with asyncio.timeout_at(deadline):
                if client is not None:
                    try:
                        return await self.proxy_for(client, endpoint, aid, bounded)
                    except ConnectionResetError as exc:
                        if exc.__cause__ is not None:
                            raise  # It died of a timeout or a protocol error.
                        # The peer closed or reset it, as a container that has
                        # just exited does: a new attempt tells the caller what
                        # it meets now (e.g. ConnectionRefusedError), at once.
                        self.forget(base_url, client)
                        client = None
                client = new_client = await self.client_for(endpoint, retry_for)
                return await self.proxy_for(client, endpoint, aid, bounded)
        except TimeoutError as exc:
            if client is None:
                raise  # Connecting timed out.
            if new_client is not None:
                # A peer that does not answer the first call on a new
                # connection is not worth keeping it open for.
                cast(asyncio.Transport, new_client.channel.transport).abort()
                await new_client.close()
            raise TimeoutError(
                f"{base_url} did not answer the lookup of agent {aid!r}"
            ) from exc

    async def proxy_for(
        self, client: rpc.RpcClient, endpoint: _Endpoint, aid: str, bounded: bool
    ) -> AgentProxy:
        """Check that the agent *aid* exists at *client*'s peer; return its
        (cached) proxy.  Unless the caller *bounded* the time, the lookup is
        given up after _LOOKUP_TIMEOUT."""
        base_url = endpoint.base_url
        lookup = client.remote.validate_aid(aid)
        type_name = await asyncio.wait_for(lookup, None if bounded else _LOOKUP_TIMEOUT)
        if type_name is None:
            raise LookupError(f"There is no agent {aid!r} at {base_url}")
        proxies = self.proxies.get(base_url)
        if proxies is None or self.outgoing.get(base_url) is not client:
            # The connection was lost while we waited: hand out this proxy (its
            # calls will fail) but do not cache it.
            return AgentProxy(client.channel, aid, base_url + aid, type_name)
        proxy = proxies.get(aid)
        if proxy is None:
            proxy = AgentProxy(client.channel, aid, base_url + aid, type_name)
            proxies[aid] = proxy
        return proxy

    async def shutdown(self) -> None:
        if self.shutdown_task is None:
            self.shutdown_task = asyncio.ensure_future(self.close_everything())
        await asyncio.shield(self.shutdown_task)

    async def close_everything(self) -> None:
        server = self.server
        if server is not None:
            server.close()
        connecting = [attempt.task for attempt in self.connecting.values()]
        for task in connecting:
            task.cancel()
        clients = [*self.outgoing.values(), *self.incoming]
        self.outgoing.clear()
        self.proxies.clear()
        await asyncio.gather(
            *connecting,
            *(client.close() for client in clients),
            return_exceptions=True,
        )
        if server is not None:
            await server.wait_closed()
        _remove_socket_file(self.socket_file)

    async def client_for(
        self, endpoint: _Endpoint, retry_for: float | None
    ) -> rpc.RpcClient:
        """Return the connection to the container at *endpoint*, opening it (or
        joining an attempt in progress) if needed."""
        base_url = endpoint.base_url
        client = self.open_client(base_url)
        if client is not None:
            return client
        attempt = self.connecting.get(base_url)
        if attempt is None:
            attempt = _Attempt(asyncio.ensure_future(self.open(endpoint, retry_for)))
            self.connecting[base_url] = attempt
            attempt.task.add_done_callback(lambda _: self.drop(base_url, attempt))
        # One caller giving up (e.g. a timeout) must not cancel the others' attempt.
        attempt.waiters += 1
        try:
            return await asyncio.shield(attempt.task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if attempt.task.cancelled() and not (current and current.cancelling()):
                # shutdown() cancelled the attempt, not our caller.
                self.check_running()
            raise
        finally:
            attempt.waiters -= 1
            if not attempt.waiters and not attempt.task.done():
                # Everybody gave up: stop it, so that the next connect() starts
                # afresh instead of joining an attempt that may hang for minutes.
                self.drop(base_url, attempt)
                attempt.task.cancel()

    def drop(self, base_url: str, attempt: _Attempt) -> None:
        if self.connecting.get(base_url) is attempt:
            del self.connecting[base_url]

    async def open(self, endpoint: _Endpoint, retry_for: float | None) -> rpc.RpcClient:
        kwargs = self.connect_kwargs
        if not isinstance(endpoint.addr, tuple):
            kwargs = {k: v for k, v in kwargs.items() if k != "ssl"}
        client = await rpc.open_connection(
            endpoint.addr, rpc_service=self.container, timeout=retry_for, **kwargs
        )
        if self.shutdown_task is not None:
            await client.close()
            self.check_running()
        base_url = endpoint.base_url
        existing = self.open_client(base_url)
        if existing is not None:
            # An attempt that was given up finished after all while a new one
            # succeeded (Python 3.11's wait_for() may swallow the cancel):
            # keep one connection.
            await client.close()
            return existing
        logger.info(
            "%s connected to the container %s",
            self.container,
            base_url,
            extra={"peer": client.channel.peername, "container": base_url},
        )
        self.outgoing[base_url] = client
        self.proxies[base_url] = weakref.WeakValueDictionary()
        service = client.service
        assert service is not None  # We serve the container to the peer.
        service.add_done_callback(lambda _: self.forget(base_url, client))
        return client

    def open_client(self, base_url: str) -> rpc.RpcClient | None:
        """Our connection to the container at *base_url*, if there is one that
        is open.  One that is closing is forgotten now: a caller that has just
        seen its calls fail may connect again before it is forgotten anyway."""
        client = self.outgoing.get(base_url)
        if client is not None and client.channel.transport.is_closing():
            self.forget(base_url, client)
            return None
        return client

    def forget(self, base_url: str, client: rpc.RpcClient) -> None:
        """Drop a closed connection, so that the next connect() opens a new one."""
        if self.outgoing.get(base_url) is client:
            del self.outgoing[base_url]
            del self.proxies[base_url]
            if self.shutdown_task is None:
                logger.info(
                    "%s lost its connection to the container %s",
                    self.container,
                    base_url,
                    extra={"peer": client.channel.peername, "container": base_url},
                )
