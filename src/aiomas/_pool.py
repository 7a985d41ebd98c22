"""The connections of a container to other containers, and the agent proxies
cached on them.

A :class:`ConnectionPool` keeps one :class:`~aiomas.rpc.RpcClient` per base
URL (:mod:`aiomas._addresses`): concurrent :meth:`ConnectionPool.connect` calls
share one connection attempt, a connection is forgotten as soon as it closes,
and each connection caches the proxies of the agents looked up over it.  Used
by :class:`aiomas.agent.Container`.
"""

from __future__ import annotations

import asyncio
import logging
import types
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Final, Generic, TypeVar, cast

from aiomas import rpc
from aiomas._addresses import Endpoint, NatsName, parse_url
from aiomas.channel import Channel
from aiomas.local_queue import LocalQueue
from aiomas.nats import NatsLink

__all__ = ["LOOKUP_TIMEOUT", "TIMEOUT_SLACK", "ConnectionPool"]

# The pool does the connecting of aiomas.agent, so it logs as that module.
logger = logging.getLogger("aiomas.agent")

LOOKUP_TIMEOUT: Final = 60.0
"""How long :meth:`ConnectionPool.connect` without a time bound waits for the
answer to the agent lookup: as long as asyncio waits for a TLS handshake."""
TIMEOUT_SLACK: Final = 0.1
"""What ``connect(url, retry_for=T)`` may take beyond *T*: its connect attempts
end by *T* with their own error; this bounds whatever comes after them."""

_P = TypeVar("_P", bound=rpc.Proxy)


def _ended_by_the_peer(exc: ConnectionResetError) -> bool:
    """Whether *exc*, the error of a call on a connection that ended, says
    that the peer closed or reset it (not that it died of a timeout, a TLS
    error or a protocol error)."""
    cause = exc.__cause__
    return cause is None or isinstance(cause, ConnectionResetError | BrokenPipeError)


class _Attempt:
    """A connection attempt and how many connect() calls wait for it."""

    __slots__ = ("task", "waiters")

    def __init__(self, task: asyncio.Task[rpc.RpcClient]) -> None:
        self.task = task
        self.waiters = 0


class ConnectionPool(Generic[_P]):
    """The connections of one container to other containers, by base URL.

    Args:
        service: What we serve to the containers we connect to (the
            container); it also names us in errors and log messages.
        connect_kwargs: Keyword arguments for
            :func:`aiomas.rpc.open_connection` (``ssl`` is passed for TCP
            addresses only).
        make_proxy: Makes the proxy of an agent from the channel, the agent
            id, its address and the name of its class.
    """

    __slots__ = (
        "_attempts",
        "_clients",
        "_closed",
        "_connect_kwargs",
        "_make_proxy",
        "_proxies",
        "_service",
        "nats_link",
        "on_open",
    )

    def __init__(
        self,
        service: object,
        connect_kwargs: dict[str, Any],
        make_proxy: Callable[[Channel, str, str, str], _P],
    ) -> None:
        self._service = service
        self._connect_kwargs = connect_kwargs
        self._make_proxy = make_proxy
        # The open connections, those being made right now (shared by
        # concurrent connect() calls), and the cached agent proxies of each
        # open connection, all by base URL.
        self._clients: dict[str, rpc.RpcClient] = {}
        self._attempts: dict[str, _Attempt] = {}
        self._proxies: dict[str, weakref.WeakValueDictionary[str, _P]] = {}
        self._closed = False
        self.on_open: Callable[[Channel], None] | None = None
        """Called with the channel of each connection the pool opens (the
        container starts tracing it there)."""
        self.nats_link: NatsLink | None = None
        """The container's link to a NATS system, through which it reaches
        ``nats://`` addresses (``None``: it has none)."""

    @property
    def clients(self) -> Mapping[str, rpc.RpcClient]:
        """The open connections by base URL (a read-only view)."""
        return types.MappingProxyType(self._clients)

    @property
    def attempts(self) -> dict[str, asyncio.Task[rpc.RpcClient]]:
        """The connection attempts in progress by base URL (a snapshot)."""
        return {url: attempt.task for url, attempt in self._attempts.items()}

    def cached_proxies(self, base_url: str) -> list[_P]:
        """The proxies cached on the connection to *base_url* (none without
        one): the ones somebody still holds."""
        return list(self._proxies.get(base_url, {}).values())

    async def connect(self, url: str, retry_for: float | None) -> _P:
        """Return a proxy to the agent at *url*; see
        :meth:`aiomas.agent.Container.connect` (whose *timeout* is
        *retry_for*) for what it does and raises."""
        endpoint, aid = parse_url(url)
        self._check_open()
        base_url = endpoint.base_url
        client = self._open_client(base_url)
        if client is not None:
            proxy = self._proxies[base_url].get(aid)
            if proxy is not None:
                return proxy
        loop = asyncio.get_running_loop()
        deadline = loop.time() + retry_for + TIMEOUT_SLACK if retry_for else None
        bounded = deadline is not None
        new_client: rpc.RpcClient | None = None
        try:
            async with asyncio.timeout_at(deadline):
                if client is not None:
                    try:
                        return await self._lookup(client, endpoint, aid, bounded)
                    except ConnectionResetError as exc:
                        if not _ended_by_the_peer(exc):
                            raise  # It died of a timeout or a protocol error.
                        # The peer closed or reset it, as a container that has
                        # just exited does: a new attempt tells the caller what
                        # it meets now (e.g. ConnectionRefusedError), at once.
                        self._forget(base_url, client)
                        client = None
                client = new_client = await self._client_for(endpoint, retry_for)
                return await self._lookup(client, endpoint, aid, bounded)
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

    async def open(self, endpoint: Endpoint, retry_for: float | None) -> rpc.RpcClient:
        """Open a connection to *endpoint* and keep it, unless one is open
        already: then close the new one and return that.

        Raises:
            RuntimeError: if the pool has been closed meanwhile.
            OSError: see :func:`aiomas.rpc.open_connection`.
        """
        kwargs = self._connect_kwargs
        addr: Any = endpoint.addr
        if not isinstance(addr, tuple):
            kwargs = {k: v for k, v in kwargs.items() if k != "ssl"}
        if "local_addr" in kwargs and not isinstance(endpoint.addr, LocalQueue):
            # A LocalQueue container's own queue means nothing to a socket.
            kwargs = {k: v for k, v in kwargs.items() if k != "local_addr"}
        if isinstance(addr, NatsName):
            if self.nats_link is None:
                raise ConnectionRefusedError(
                    f"{self._service!r} is on no NATS system: it cannot reach "
                    f"{endpoint.base_url}"
                )
            addr = self.nats_link.endpoint(addr.name)
        client = await rpc.open_connection(
            addr, rpc_service=self._service, timeout=retry_for, **kwargs
        )
        if self._closed:
            await client.close()
            self._check_open()
        if self.on_open is not None:
            self.on_open(client.channel)
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
            self._service,
            base_url,
            extra={"peer": client.channel.peername, "container": base_url},
        )
        self._clients[base_url] = client
        self._proxies[base_url] = weakref.WeakValueDictionary()
        service = client.service
        assert service is not None  # We serve the container to the peer.
        service.add_done_callback(lambda _: self._forget(base_url, client))
        return client

    def close(self) -> asyncio.Future[list[Any]]:
        """Refuse to connect from now on, stop the attempts in progress and
        close every connection.

        Returns:
            A future that is done when all of them have ended.
        """
        self._closed = True
        attempts = [attempt.task for attempt in self._attempts.values()]
        for task in attempts:
            task.cancel()
        clients = list(self._clients.values())
        self._clients.clear()
        self._proxies.clear()
        return asyncio.gather(
            *attempts, *(client.close() for client in clients), return_exceptions=True
        )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self._service!r} has been shut down")

    async def _lookup(
        self, client: rpc.RpcClient, endpoint: Endpoint, aid: str, bounded: bool
    ) -> _P:
        """Check that the agent *aid* exists at *client*'s peer; return its
        (cached) proxy.  Unless the caller *bounded* the time, the lookup is
        given up after LOOKUP_TIMEOUT."""
        base_url = endpoint.base_url
        lookup = client.remote.validate_aid(aid)
        type_name = await asyncio.wait_for(lookup, None if bounded else LOOKUP_TIMEOUT)
        if type_name is None:
            raise LookupError(f"There is no agent {aid!r} at {base_url}")
        proxies = self._proxies.get(base_url)
        if proxies is None or self._clients.get(base_url) is not client:
            # The connection was lost while we waited: hand out this proxy (its
            # calls will fail) but do not cache it.
            return self._make_proxy(client.channel, aid, base_url + aid, type_name)
        proxy = proxies.get(aid)
        if proxy is None:
            proxy = self._make_proxy(client.channel, aid, base_url + aid, type_name)
            proxies[aid] = proxy
        return proxy

    async def _client_for(
        self, endpoint: Endpoint, retry_for: float | None
    ) -> rpc.RpcClient:
        """Return the connection to the container at *endpoint*, opening it (or
        joining an attempt in progress) if needed."""
        base_url = endpoint.base_url
        client = self._open_client(base_url)
        if client is not None:
            return client
        attempt = self._attempts.get(base_url)
        if attempt is None:
            attempt = _Attempt(asyncio.ensure_future(self.open(endpoint, retry_for)))
            self._attempts[base_url] = attempt
            attempt.task.add_done_callback(lambda _: self._drop(base_url, attempt))
        # One caller giving up (e.g. a timeout) must not cancel the others' attempt.
        attempt.waiters += 1
        try:
            return await asyncio.shield(attempt.task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if attempt.task.cancelled() and not (current and current.cancelling()):
                # close() cancelled the attempt, not our caller.
                self._check_open()
            raise
        finally:
            attempt.waiters -= 1
            if not attempt.waiters and not attempt.task.done():
                # Everybody gave up: stop it, so that the next connect() starts
                # afresh instead of joining an attempt that may hang for minutes.
                self._drop(base_url, attempt)
                attempt.task.cancel()

    def _drop(self, base_url: str, attempt: _Attempt) -> None:
        if self._attempts.get(base_url) is attempt:
            del self._attempts[base_url]

    def _open_client(self, base_url: str) -> rpc.RpcClient | None:
        """Our connection to the container at *base_url*, if there is one that
        is open.  One that is closing is forgotten now: a caller that has just
        seen its calls fail may connect again before it is forgotten anyway."""
        client = self._clients.get(base_url)
        if client is not None and client.channel.transport.is_closing():
            self._forget(base_url, client)
            return None
        return client

    def _forget(self, base_url: str, client: rpc.RpcClient) -> None:
        """Drop a closed connection, so that the next connect() opens a new one.

        (close() drops them all first: a connection forgotten here was lost.)"""
        if self._clients.get(base_url) is client:
            del self._clients[base_url]
            del self._proxies[base_url]
            logger.info(
                "%s lost its connection to the container %s",
                self._service,
                base_url,
                extra={"peer": client.channel.peername, "container": base_url},
            )
