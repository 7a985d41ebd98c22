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
``ipc://<socket path>/<id>`` for unix domain sockets and ``local://<queue
id>/<id>`` for :mod:`aiomas.local_queue`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import ssl as ssl_mod
import weakref
from collections.abc import Coroutine, Iterable
from typing import Any, Literal, NamedTuple, TypeVar, cast, overload

from aiomas import local_queue, rpc, util
from aiomas.channel import (
    Address,
    Channel,
    SerializerFactory,
    _check_dead_peer_timeout,
)
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
        self.addr = container._register(self)

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


class _AgentsRouter(rpc.Router):
    """The ``agents`` sub-service of a container: routes ``<aid>/...`` to the
    router of the agent with that id, straight from the container's registry."""

    __slots__ = ("_agents",)

    def __init__(self, container: Container, agents: dict[str, Agent]) -> None:
        super().__init__(container)
        self._agents = agents

    def _sub_router(self, name: str) -> rpc.Router | None:
        agent = self._agents.get(name)
        return None if agent is None else agent.router

    def _function(self, name: str) -> None:
        return None  # An agent id names an agent, never a function.

    def _children(self) -> list[rpc.Router]:
        return [agent.router for agent in self._agents.values()]


class _Endpoint(NamedTuple):
    """Where a container listens, as parsed from an agent address."""

    base_url: str  # e.g. "tcp://localhost:5555/"
    addr: Address  # what aiomas.rpc.open_connection() needs


def parse_url(url: str) -> tuple[_Endpoint, str]:
    """Split an agent address into its container's endpoint and the agent id.

    Raises:
        ValueError: if *url* is no valid agent address.
    """
    if not isinstance(url, str):
        raise ValueError(f"An agent address must be a string, got {url!r}")
    scheme, sep, rest = url.partition("://")
    location, _, aid = rest.rpartition("/")
    if not sep or scheme not in _SCHEMES or not location or not aid:
        raise ValueError(
            f"Invalid agent address {url!r}: expected 'tcp://host:port/id', "
            "'ipc://path/id' or 'local://queue_id/id'"
        )
    addr: Address
    if scheme == "tcp":
        addr = _parse_host_port(location, url)
    elif scheme == "ipc":
        addr = location
    else:
        addr = local_queue.get_queue(location)
    return _Endpoint(f"{scheme}://{location}/", addr), aid


def split_host_port(text: str) -> tuple[str, int]:
    """Split ``host:port`` (``[IPv6 address]:port``) into host and port.

    Raises:
        ValueError: if *text* is not of that form or the port is not in
            0...65535.
    """
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # An IPv6 address must be in brackets.
    if not sep or not host or not port.isdigit() or int(port) > 65535:
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
    if host in _WILDCARD_HOSTS:
        host = socket.getfqdn()
    if ":" in host:
        host = f"[{host}]"
    return f"tcp://{host}:{port}/"


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
    socket already listens.

    Args:
        base_url: The address prefix of the container's agents, e.g.
            ``'tcp://localhost:5555/'``.
        clock: The container's clock.
        connect_kwargs: Keyword arguments for :func:`aiomas.rpc.open_connection`
            when connecting to other containers (``codec``,
            ``extra_serializers``, and ``ssl`` for TCP connections).
    """

    router = rpc.Service()

    def __init__(
        self, base_url: str, clock: BaseClock, connect_kwargs: dict[str, Any]
    ) -> None:
        self._base_url = base_url
        self._clock = clock
        self._connect_kwargs = connect_kwargs
        self._agent_ids = itertools.count()
        self._agents: dict[str, Agent] = {}
        self._agents_router = _AgentsRouter(self, self._agents)
        self.router.set_sub_router(self._agents_router, "agents")
        self._server: asyncio.AbstractServer | None = None
        # Connections to other containers (by their base URL), those being made
        # right now (shared by concurrent connect() calls), and the cached agent
        # proxies of each connection.
        self._outgoing: dict[str, rpc.RpcClient] = {}
        self._connecting: dict[str, _Attempt] = {}
        self._proxies: dict[str, weakref.WeakValueDictionary[str, AgentProxy]] = {}
        # Connections that other containers opened to us.
        self._incoming: set[rpc.RpcClient] = set()
        self._shutdown_task: asyncio.Task[None] | None = None
        # The unix socket file we listen on (path and inode), removed at shutdown.
        self._socket_file: tuple[str, int] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._base_url!r})"

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
                argument tuples.  A serializer for Arrow dates is added after
                them.
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
            TypeError: if *ssl* has the wrong type.
            ValueError: if *max_frame_size* is not a number from 0 to
                2**32 - 1, or *dead_peer_timeout* is not a positive finite
                number.
        """
        # Bad limits fail here, not later.
        FrameReader(max_frame_size)
        _check_dead_peer_timeout(dead_peer_timeout)
        limits = {
            "max_frame_size": max_frame_size,
            "dead_peer_timeout": dead_peer_timeout,
        }
        coro = cls._create(addr, clock, codec, extra_serializers, ssl, limits)
        if as_coro:
            return coro
        return util.run_blocking(coro, "await Container.create(addr, as_coro=True)")

    @classmethod
    async def _create(
        cls: type[_ContainerT],
        addr: Address,
        clock: BaseClock | None,
        codec: type[Codec] | None,
        extra_serializers: Iterable[SerializerFactory] | None,
        ssl: SSLCerts | tuple[ssl_mod.SSLContext, ssl_mod.SSLContext] | None,
        limits: dict[str, Any],
    ) -> _ContainerT:
        server_ctx, client_ctx = _ssl_contexts(ssl)
        serializers = [*(extra_serializers or ()), util.arrow_serializer]
        connect_kwargs: dict[str, Any] = {
            "codec": JSON if codec is None else codec,
            "extra_serializers": serializers,
            **limits,
        }
        if client_ctx is not None:
            connect_kwargs["ssl"] = client_ctx
        container = cls("", AsyncioClock() if clock is None else clock, connect_kwargs)
        server_kwargs = {
            "codec": connect_kwargs["codec"],
            "extra_serializers": serializers,
            **limits,
        }
        if isinstance(addr, local_queue.LocalQueue):
            container._server = await container._serve(addr, server_kwargs)
            container._base_url = f"local://{addr.queue_id}/"
        elif isinstance(addr, str | os.PathLike):
            path = os.fspath(addr)
            container._server = await container._serve(path, server_kwargs)
            container._base_url = f"ipc://{path}/"
            container._socket_file = (path, os.stat(path).st_ino)
        else:
            host, port = addr
            if server_ctx is not None:
                server_kwargs["ssl"] = server_ctx
            container._server, port = await container._serve_tcp(
                host, port, server_kwargs
            )
            container._base_url = _tcp_base_url(host, port)
        return container

    async def _serve(
        self, addr: Address, kwargs: dict[str, Any]
    ) -> asyncio.AbstractServer:
        return await rpc.start_server(addr, self, self._client_connected, **kwargs)

    async def _serve_tcp(
        self, host: Any, port: int, kwargs: dict[str, Any]
    ) -> tuple[asyncio.AbstractServer, int]:
        """Listen on *host*; with port 0, use the same free port on each of the
        host's interfaces, so that the agents' address reaches all of them."""
        for _ in range(_SAME_PORT_ATTEMPTS):
            server = await self._serve((host, port), kwargs)
            sockets = cast(asyncio.Server, server).sockets
            ports = {sock.getsockname()[1] for sock in sockets}
            if len(ports) == 1 or port != 0:
                return server, ports.pop() if port == 0 else port
            first_port = sockets[0].getsockname()[1]
            server.close()
            await server.wait_closed()
            try:
                server = await self._serve((host, first_port), kwargs)
            except OSError:
                continue  # Someone else got that port on another interface.
            return server, first_port
        raise OSError(f"Found no port that is free on every interface of {host!r}")

    @property
    def base_url(self) -> str:
        """The address of the container: its agents' addresses without the id,
        e.g. ``'tcp://localhost:5555/'``."""
        return self._base_url

    @property
    def clock(self) -> BaseClock:
        """The clock of the container (a :class:`~aiomas.clocks.BaseClock`)."""
        return self._clock

    @rpc.expose
    def validate_aid(self, aid: Any) -> str | None:
        """Return the class name of the agent with id *aid*, or ``None`` if
        there is no such agent."""
        if type(aid) is int:
            aid = str(aid)
        agent = self._agents.get(aid) if isinstance(aid, str) else None
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
                not be up yet).

        Raises:
            ValueError: if *url* is no valid agent address.
            LookupError: if the container at *url* has no agent with that id.
            ConnectionRefusedError: if nobody listens at a TCP address or
                LocalQueue.
            FileNotFoundError: if the unix domain socket does not exist.
            TimeoutError: if an attempt hangs beyond a non-zero *timeout*.
            OSError: for other connection errors, e.g. an unreachable
                network.
            RuntimeError: if this container has been shut down.
        """
        endpoint, aid = parse_url(url)
        self._check_running()
        if self._open_client(endpoint.base_url) is not None:
            proxy = self._proxies[endpoint.base_url].get(aid)
            if proxy is not None:
                return proxy
        client = await self._client_for(endpoint, timeout)
        type_name = await client.remote.validate_aid(aid)
        if type_name is None:
            raise LookupError(f"There is no agent {aid!r} at {endpoint.base_url}")
        proxies = self._proxies.get(endpoint.base_url)
        if proxies is None or self._outgoing.get(endpoint.base_url) is not client:
            # The connection was lost while we waited: hand out this proxy (its
            # calls will fail) but do not cache it.
            return AgentProxy(client.channel, aid, endpoint.base_url + aid, type_name)
        proxy = proxies.get(aid)
        if proxy is None:
            proxy = AgentProxy(client.channel, aid, endpoint.base_url + aid, type_name)
            proxies[aid] = proxy
        return proxy

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
        coro = self._shutdown()
        if as_coro:
            return coro
        util.run_blocking(coro, "await container.shutdown(as_coro=True)")
        return None

    async def _shutdown(self) -> None:
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.ensure_future(self._close_everything())
        await asyncio.shield(self._shutdown_task)

    async def _close_everything(self) -> None:
        server = self._server
        if server is not None:
            server.close()
        connecting = [attempt.task for attempt in self._connecting.values()]
        for task in connecting:
            task.cancel()
        clients = [*self._outgoing.values(), *self._incoming]
        self._outgoing.clear()
        self._proxies.clear()
        await asyncio.gather(
            *connecting,
            *(client.close() for client in clients),
            return_exceptions=True,
        )
        if server is not None:
            await server.wait_closed()
        self._remove_socket_file()

    def _remove_socket_file(self) -> None:
        """Remove our unix socket file (Python 3.13 does so itself, older ones
        leave it behind), unless someone else has replaced it since."""
        if self._socket_file is None:
            return
        path, inode = self._socket_file
        try:
            if os.stat(path).st_ino == inode:
                os.unlink(path)
        except FileNotFoundError:
            pass

    # Internal API, used by Agent.

    def _register(self, agent: Agent) -> str:
        """Give *agent* the next id, make it reachable via RPC and return its
        address."""
        self._check_running()
        aid = str(next(self._agent_ids))
        # Attach the agent's router like set_sub_router() would, but without a
        # second registry: _AgentsRouter finds it in self._agents.
        router = agent.router
        router.parent = self._agents_router
        router.name = aid
        self._agents[aid] = agent
        return self._base_url + aid

    def _check_running(self) -> None:
        if self._shutdown_task is not None:
            raise RuntimeError(f"{self!r} has been shut down")

    def _client_connected(self, client: rpc.RpcClient) -> None:
        if self._shutdown_task is not None:
            cast(asyncio.Transport, client.channel.transport).abort()
            return
        self._incoming.add(client)
        service = client.service
        assert service is not None  # We serve the container to every client.
        service.add_done_callback(lambda _: self._incoming.discard(client))

    async def _client_for(
        self, endpoint: _Endpoint, retry_for: float | None
    ) -> rpc.RpcClient:
        """Return the connection to the container at *endpoint*, opening it (or
        joining an attempt in progress) if needed."""
        base_url = endpoint.base_url
        client = self._open_client(base_url)
        if client is not None:
            return client
        attempt = self._connecting.get(base_url)
        if attempt is None:
            attempt = _Attempt(asyncio.ensure_future(self._open(endpoint, retry_for)))
            self._connecting[base_url] = attempt
            attempt.task.add_done_callback(lambda _: self._drop(base_url, attempt))
        # One caller giving up (e.g. a timeout) must not cancel the others' attempt.
        attempt.waiters += 1
        try:
            return await asyncio.shield(attempt.task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if attempt.task.cancelled() and not (current and current.cancelling()):
                # shutdown() cancelled the attempt, not our caller.
                self._check_running()
            raise
        finally:
            attempt.waiters -= 1
            if not attempt.waiters and not attempt.task.done():
                # Everybody gave up: stop it, so that the next connect() starts
                # afresh instead of joining an attempt that may hang for minutes.
                self._drop(base_url, attempt)
                attempt.task.cancel()

    def _drop(self, base_url: str, attempt: _Attempt) -> None:
        if self._connecting.get(base_url) is attempt:
            del self._connecting[base_url]

    async def _open(
        self, endpoint: _Endpoint, retry_for: float | None
    ) -> rpc.RpcClient:
        kwargs = self._connect_kwargs
        if not isinstance(endpoint.addr, tuple):
            kwargs = {k: v for k, v in kwargs.items() if k != "ssl"}
        client = await rpc.open_connection(
            endpoint.addr, rpc_service=self, timeout=retry_for, **kwargs
        )
        if self._shutdown_task is not None:
            await client.close()
            self._check_running()
        base_url = endpoint.base_url
        existing = self._open_client(base_url)
        if existing is not None:
            # An attempt that was given up finished after all while a new one
            # succeeded (Python 3.11's wait_for() may swallow the cancel):
            # keep one connection.
            await client.close()
            return existing
        logger.info(
            "%s connected to the container %s",
            self,
            base_url,
            extra={"peer": client.channel.peername, "container": base_url},
        )
        self._outgoing[base_url] = client
        self._proxies[base_url] = weakref.WeakValueDictionary()
        service = client.service
        assert service is not None  # We serve the container to the peer.
        service.add_done_callback(lambda _: self._forget(base_url, client))
        return client

    def _open_client(self, base_url: str) -> rpc.RpcClient | None:
        """Our connection to the container at *base_url*, if there is one that
        is open.  One that is closing is forgotten now: a caller that has just
        seen its calls fail may connect again before it is forgotten anyway."""
        client = self._outgoing.get(base_url)
        if client is not None and client.channel.transport.is_closing():
            self._forget(base_url, client)
            return None
        return client

    def _forget(self, base_url: str, client: rpc.RpcClient) -> None:
        """Drop a closed connection, so that the next connect() opens a new one."""
        if self._outgoing.get(base_url) is client:
            del self._outgoing[base_url]
            del self._proxies[base_url]
            if self._shutdown_task is None:
                logger.info(
                    "%s lost its connection to the container %s",
                    self,
                    base_url,
                    extra={"peer": client.channel.peername, "container": base_url},
                )
