"""Connections between containers through a NATS system.

A NATS connection carries byte streams, one per aiomas connection, so that the
channel layer runs over it exactly as over TCP: the same frames, the same codec
payloads.  :class:`NatsTransport` is an :class:`asyncio.Transport`; what it
writes is published to the peer's subject, what arrives on its own subject is
fed to its protocol.

Sessions on subjects (``<prefix>`` is ``aiomas`` unless configured):

- A container named ``c1`` subscribes to ``<prefix>.c1.connect``.  A client
  subscribes to a fresh inbox, then sends a request ``{"v": 2, "inbox": ...,
  "from": ...}`` (JSON) there.  The container subscribes to a fresh inbox of its
  own and answers ``{"v": 2, "inbox": ...}``.  From then on each side publishes
  to the other's inbox.  Nobody subscribed ("no responders"): the client gets
  :class:`ConnectionRefusedError`, as from a TCP port nobody listens on.
- Each message on an inbox is a kind byte and stream offsets: ``D`` (data at
  an offset; a write larger than the server's ``max_payload`` is cut into
  several), ``A`` (acknowledged up to: given to the protocol), ``R``
  (resend after; I sent so much), ``E`` (the end, a close), ``F`` (I have
  the end: the answer to an ``E``) and ``H`` (a heartbeat, with a reply
  subject; answered with an ``A``).  The receiver drops what it has and asks
  for what it lacks; the sender keeps what is not acknowledged and sends it
  again when asked, so the stream survives a reconnect of either side's link,
  to the same server or another one of the cluster.
- Every ``heartbeat_interval`` seconds each side sends a heartbeat to the
  other.  No answer ("no responders", a timeout, or our own link down) for
  ``heartbeat_interval + heartbeat_timeout`` seconds ends the connection:
  calls pending on it fail with :class:`ConnectionResetError` within that
  bound after a container vanished or a link broke for good.
- A closed connection sends again what the peer lacks, and the end, until
  the peer confirms the end or the bound passes (see
  :meth:`NatsTransport.close`).
- A starting container claims its name on ``<prefix>.<name>.claim``, so that
  of containers started with one name at the same time exactly one gets it.
- Each container answers NATS's services API (``$SRV.PING``, ``$SRV.INFO``,
  ``$SRV.STATS``) as an instance of the service ``<prefix>`` with its name
  as id; its ``INFO`` lists its agents (see :meth:`NatsLink.discover`).

The NATS client library sits behind :class:`MessagingClient`; nats-py, an
optional dependency (``pip install 'aiomas[nats]'``), is imported only when a
link is opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import functools
import json
import logging
import re
import secrets
import ssl
import struct
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol, cast

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_PREFIX",
    "SERVICES_PREFIX",
    "SERVICE_VERSION",
    "MessagingClient",
    "NatsConfig",
    "NatsEndpoint",
    "NatsLink",
    "NatsServer",
    "NatsTransport",
    "check_name",
    "connect",
    "is_nats_url",
]

logger = logging.getLogger("aiomas.nats")

DEFAULT_PORT: Final = 4222
"""The port of a NATS server if a URL names none."""
DEFAULT_PREFIX: Final = "aiomas"
"""The first token of every subject that aiomas uses, and the name of the
containers' service in NATS's services API."""
SERVICES_PREFIX: Final = "$SRV"
"""The subjects of NATS's services API (``$SRV.PING``, ``$SRV.INFO``,
``$SRV.STATS``, each also ``.<service>`` and ``.<service>.<id>``)."""
_VERSION: Final = 2


def _is_inbox(text: str) -> bool:
    """Whether *text* is one subject a peer can be reached at: dot-separated
    tokens, none empty, no wildcards, no blanks."""
    return (
        0 < len(text) <= 255
        and not any(char.isspace() or char in "*>" for char in text)
        and all(text.split("."))
    )


SERVICE_VERSION: Final = f"{_VERSION}.0.0"
"""The version every container gives in the services API: that of the
session protocol on NATS."""

_SCHEMES: Final = ("nats", "tls")
_NAME: Final = r"[A-Za-z0-9_-]+"


def is_nats_url(addr: object) -> bool:
    """Whether *addr* is a NATS URL (``nats://...`` or ``tls://...``)."""
    return isinstance(addr, str) and addr.partition("://")[0] in _SCHEMES


def check_name(name: str) -> str:
    """Return *name* if it can name a container on NATS (letters, digits,
    ``_`` and ``-``: one subject token).

    Raises:
        ValueError: otherwise.
    """
    if not isinstance(name, str) or not re.fullmatch(_NAME, name):
        raise ValueError(
            f"A container name on NATS consists of letters, digits, '_' and '-', "
            f"got {name!r}"
        )
    return name


@dataclass(frozen=True)
class NatsConfig:
    """How a container reaches its NATS system, and its name there.

    Usually made from a URL (:meth:`from_url`); make one directly to pass what
    a URL cannot hold, e.g. an :class:`ssl.SSLContext`.
    """

    servers: tuple[str, ...]
    """The servers to try, e.g. ``('nats://127.0.0.1:4222',)``; the client
    learns the other servers of a cluster from them."""
    name: str
    """The container's name: its agents are ``nats://<name>/<id>``."""
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: str | None = None
    """A NATS credentials file (JWT and NKey seed)."""
    nkey: str | None = None
    """A file with the NKey seed of the user (for a server that lists the
    user's public NKey)."""
    tls: ssl.SSLContext | None = None
    """TLS to the servers (a ``tls://`` URL without it uses
    :func:`ssl.create_default_context`)."""
    tls_hostname: str | None = None
    prefix: str = DEFAULT_PREFIX
    """The first token of every subject (containers see each other only with
    the same prefix)."""
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 2.0
    connect_timeout: float = 2.0
    """Seconds for each attempt to reach a server."""
    reconnect_time_wait: float = 0.5
    max_reconnect_attempts: int = 60
    claim_wait: float = 0.1
    """Seconds a container that starts waits for other containers that claim
    its name at the same time (see :meth:`NatsEndpoint.create_server`)."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Free for the user (not sent anywhere)."""

    def __post_init__(self) -> None:
        check_name(self.name)
        check_name(self.prefix)
        if not self.servers:
            raise ValueError("A NatsConfig needs at least one server")
        for value, what in (
            (self.heartbeat_interval, "heartbeat_interval"),
            (self.heartbeat_timeout, "heartbeat_timeout"),
            (self.connect_timeout, "connect_timeout"),
        ):
            if not (isinstance(value, int | float) and value > 0):
                raise ValueError(f"{what} must be a positive number, got {value!r}")
        if not (isinstance(self.claim_wait, int | float) and self.claim_wait >= 0):
            raise ValueError(f"claim_wait must be >= 0, got {self.claim_wait!r}")

    @property
    def base_url(self) -> str:
        """The address prefix of the container's agents: ``'nats://<name>/'``."""
        return f"nats://{self.name}/"

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> NatsConfig:
        """Read a container URL:
        ``nats://[USER:PASSWORD@|TOKEN@]HOST[:PORT][,HOST[:PORT]...]/NAME[?OPTIONS]``.

        ``tls://`` instead of ``nats://`` uses TLS to the servers.  IPv6 hosts
        go in brackets; the port defaults to 4222.  OPTIONS (``&``-separated):
        ``creds=PATH`` (a credentials file), ``nkey=PATH`` (an NKey seed
        file), ``prefix=TOKEN``, ``heartbeat=SECONDS`` (the interval; the
        timeout is twice that), ``tls_hostname=NAME``.  *overrides* set any
        other field (e.g. ``tls=context``).

        Raises:
            ValueError: if *url* is not of that form.
        """
        scheme, sep, rest = (
            url.partition("://") if isinstance(url, str) else ("", "", "")
        )
        if not sep or scheme not in _SCHEMES:
            raise ValueError(
                f"Invalid NATS URL {url!r}: expected 'nats://host:port/name' "
                "or 'tls://host:port/name'"
            )
        netloc, _, path = rest.partition("/")
        name, _, query = path.partition("?")
        userinfo, at, hosts = netloc.rpartition("@")
        settings: dict[str, Any] = {}
        if at:
            user, colon, password = userinfo.partition(":")
            user = urllib.parse.unquote(user)
            if colon:
                settings["user"] = user
                settings["password"] = urllib.parse.unquote(password)
            elif user:
                settings["token"] = user
        servers = tuple(
            f"{scheme}://{_server(host, url)}" for host in hosts.split(",") if host
        )
        if not servers or not name:
            raise ValueError(f"Invalid NATS URL {url!r}: it needs a server and a name")
        for key, values in urllib.parse.parse_qs(
            query, strict_parsing=bool(query)
        ).items():
            value = values[-1]
            if key in ("creds", "nkey"):
                settings[key] = value
            elif key == "prefix":
                settings["prefix"] = value
            elif key == "tls_hostname":
                settings["tls_hostname"] = value
            elif key == "heartbeat":
                try:
                    interval = float(value)
                except ValueError:
                    raise ValueError(f"Invalid heartbeat in {url!r}") from None
                settings["heartbeat_interval"] = interval
                settings["heartbeat_timeout"] = 2 * interval
            else:
                raise ValueError(f"Unknown option {key!r} in the NATS URL {url!r}")
        if scheme == "tls" and "tls" not in overrides:
            settings["tls"] = ssl.create_default_context()
        settings.update(overrides)
        return cls(servers=servers, name=name, **settings)

    def with_name(self, name: str) -> NatsConfig:
        """The same system under another container name."""
        return replace(self, name=name)


def _server(host: str, url: str) -> str:
    """``host[:port]`` with the default port added."""
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise ValueError(f"Invalid NATS URL {url!r}: unclosed '['")
        address, rest = host[: end + 1], host[end + 1 :]
    else:
        address, _, port = host.partition(":")
        rest = f":{port}" if port else ""
    if not rest:
        return f"{address}:{DEFAULT_PORT}"
    if not rest.startswith(":") or not rest[1:].isdigit() or int(rest[1:]) > 65535:
        raise ValueError(f"Invalid NATS URL {url!r}: bad port in {host!r}")
    return address + rest


class MessagingClient(Protocol):
    """What aiomas needs of a NATS client (see ``aiomas._nats_client``)."""

    on_disconnect: Callable[[], None] | None
    on_reconnect: Callable[[], None] | None
    on_close: Callable[[], None] | None
    on_pressure: Callable[[bool], None] | None
    paused: bool

    @property
    def max_payload(self) -> int: ...
    @property
    def queued(self) -> int: ...
    @property
    def is_connected(self) -> bool: ...
    @property
    def connected_url(self) -> str | None: ...
    def new_inbox(self) -> str: ...
    def publish(self, subject: str, data: bytes, reply: str = "") -> None: ...
    async def subscribe(
        self,
        subject: str,
        callback: Callable[[bytes, str], None],
        overflow: Callable[[], None] | None = None,
    ) -> Callable[[], Awaitable[None]]: ...
    async def request(self, subject: str, data: bytes, timeout: float) -> bytes: ...  # noqa: ASYNC109
    async def flush(self, timeout: float = 2.0) -> None: ...  # noqa: ASYNC109
    async def gather(self, subject: str, data: bytes, wait: float) -> list[bytes]: ...
    async def close(self) -> None: ...
    async def abort(self) -> None: ...


async def connect(config: NatsConfig) -> NatsLink:
    """Open a link to the NATS system of *config*.

    Raises:
        ConnectionRefusedError: if no server could be reached.
        ImportError: if nats-py is not installed.
    """
    from aiomas._nats_client import NatsPyClient

    client = await NatsPyClient.connect(config)
    return NatsLink(client, config)


class NatsLink:
    """A container's connection to a NATS system, shared by every aiomas
    connection over it.

    Args:
        client: The NATS client (see :class:`MessagingClient`).
        config: The system and our name on it.
    """

    def __init__(self, client: MessagingClient, config: NatsConfig) -> None:
        self.client = client
        self.config = config
        self._transports: set[NatsTransport] = set()
        self._closed = False
        self._closing: asyncio.Task[None] | None = None
        client.on_disconnect = self._disconnected
        client.on_reconnect = self._reconnected
        client.on_close = self._gone
        client.on_pressure = self._pressure

    def __repr__(self) -> str:
        return f"NatsLink({self.config.name!r}, {list(self.config.servers)})"

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def transports(self) -> frozenset[NatsTransport]:
        """The open connections over this link (not those closed that still
        wait for their peer to confirm the end)."""
        return frozenset(t for t in self._transports if not t.is_closing())

    def subject(self, name: str, what: str) -> str:
        """The subject *what* (``connect``) of the container *name*."""
        return f"{self.config.prefix}.{name}.{what}"

    def endpoint(self, name: str) -> NatsEndpoint:
        """The container *name* on this system, for
        :func:`aiomas.channel.open_connection` and
        :func:`aiomas.channel.start_server`."""
        return NatsEndpoint(self, check_name(name))

    async def discover(self, wait: float = 0.25) -> list[dict[str, Any]]:
        """The :meth:`info` of every container on the system (with our
        prefix) that answers the services API's ``INFO`` within *wait*
        seconds, sorted by name."""
        return await self._discover(b"", wait)

    async def _discover(self, request: bytes, wait: float) -> list[dict[str, Any]]:
        answers = await self.client.gather(
            f"{SERVICES_PREFIX}.INFO.{self.config.prefix}", request, wait
        )
        found: dict[str, dict[str, Any]] = {}
        for data in answers:
            info = _container_info(data)
            if info is not None:
                found[info["name"]] = info
        return [found[name] for name in sorted(found)]

    async def info(self, name: str, timeout: float = 1.0) -> dict[str, Any]:  # noqa: ASYNC109
        """What the container *name* tells about itself: ``name``,
        ``base_url``, ``agents`` (id to class name), ``agent_count``,
        ``truncated`` (whether ``agents`` lists fewer than ``agent_count``:
        a container lists 10,000 at most, and only as many as fit into one
        message of the server's ``max_payload``) and ``service`` (its whole
        ``INFO`` answer of the services API).

        Raises:
            ConnectionRefusedError: if there is no such container.
            TimeoutError: if it does not answer within *timeout* seconds.
        """
        data = await self.client.request(
            f"{SERVICES_PREFIX}.INFO.{self.config.prefix}.{check_name(name)}",
            b"",
            timeout,
        )
        info = _container_info(data)
        if info is None:
            raise ConnectionResetError(f"{name!r} sent an undecodable info")
        return info

    async def lookup(self, name: str, wait: float = 0.25) -> list[str]:
        """The addresses of the agents called *name* (their id or their
        class name) on every container that answers within *wait* seconds,
        sorted.

        Each container is asked for those agents only (so that a long list
        of others does not cut them off); if a container's answer is still
        truncated, a warning is logged and its addresses are missing.
        """
        found = []
        request = json.dumps({"agents_named": name}).encode()
        for info in await self._discover(request, wait):
            named = [aid for aid, kind in info["agents"].items() if name in (aid, kind)]
            found += [info["base_url"] + aid for aid in named]
            if info["service"].get("agents_truncated"):
                logger.warning(
                    "NATS: the agents called %r on %s may be more than the %d "
                    "that fitted into its answer",
                    name,
                    info["name"],
                    len(named),
                )
        return sorted(found)

    def add(self, transport: NatsTransport) -> None:
        self._transports.add(transport)

    def discard(self, transport: NatsTransport) -> None:
        self._transports.discard(transport)

    async def close(self) -> None:
        """Close every connection over the link, then the link (once)."""
        self._closed = True
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def abort(self) -> None:
        """Cut the link at once, as a process that dies does (for tests)."""
        self._closed = True
        await self.client.abort()
        self._lose_all(ConnectionResetError("Our link to the NATS system was cut"))

    async def _close(self) -> None:
        transports = list(self._transports)
        for transport in transports:
            transport.close()
        await asyncio.sleep(0)  # let their connection_lost() run
        # What was written reaches the peers, and the end with it: a peer
        # that is reconnecting gets it when it is back, within the bound.
        config = self.config
        waiting = [t.wait_finished() for t in transports if t.ending]
        if waiting:
            done = asyncio.gather(*waiting)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    done, config.heartbeat_interval + config.heartbeat_timeout
                )
        self._lose_all(ConnectionResetError(f"{self!r} is closed"))
        await self.client.close()

    def _pressure(self, paused: bool) -> None:
        for transport in list(self._transports):
            transport.pressure(paused)

    def _disconnected(self) -> None:
        # The connections stay: their heartbeats end them if the link does
        # not come back in time (see NatsTransport).
        logger.warning(
            "NATS: %s lost its link to the server; reconnecting", self.config.name
        )

    def _reconnected(self) -> None:
        logger.warning(
            "NATS: %s reconnected to %s", self.config.name, self.client.connected_url
        )
        for transport in list(self._transports):
            transport.resync()

    def _gone(self) -> None:
        self._lose_all(
            ConnectionResetError("The link to the NATS system is closed for good")
        )

    def _lose_all(self, exc: Exception) -> None:
        for transport in list(self._transports):
            transport.lose(exc)


class NatsEndpoint:
    """A container name on a NATS system: what :func:`aiomas.channel.open_connection`
    connects to and :func:`aiomas.channel.start_server` serves."""

    __slots__ = ("link", "name")

    def __init__(self, link: NatsLink, name: str) -> None:
        self.link = link
        self.name = name

    def __repr__(self) -> str:
        return f"NatsEndpoint(nats://{self.name}/)"

    @property
    def base_url(self) -> str:
        return f"nats://{self.name}/"

    async def create_connection(
        self, protocol_factory: Callable[[], asyncio.BaseProtocol]
    ) -> tuple[NatsTransport, asyncio.BaseProtocol]:
        """Open a connection to the container.

        Raises:
            ConnectionRefusedError: if no container of that name is on the
                system ("no responders").
            TimeoutError: if it did not answer within ``connect_timeout``.
            ConnectionResetError: if our link is closed.
        """
        link = self.link
        if link.closed:
            raise ConnectionResetError(f"{link!r} is closed")
        client = link.client
        protocol = protocol_factory()
        transport = NatsTransport(link, protocol, peername=self.base_url)
        await transport.listen()
        request = {"v": _VERSION, "inbox": transport.inbox, "from": link.config.name}
        try:
            answer = _decode(
                await client.request(
                    link.subject(self.name, "connect"),
                    json.dumps(request).encode(),
                    link.config.connect_timeout,
                )
            )
            if answer is None or not isinstance(answer.get("inbox"), str):
                raise ConnectionRefusedError(
                    f"The container {self.name!r} refused the connection: {answer}"
                )
        except ConnectionRefusedError as exc:
            await transport.discard()
            raise ConnectionRefusedError(
                errno.ECONNREFUSED,
                f"No container {self.name!r} on the NATS system ({exc})",
            ) from None
        except BaseException:
            await transport.discard()
            raise
        transport.start(answer["inbox"])
        return transport, protocol

    async def create_server(
        self, protocol_factory: Callable[[], asyncio.BaseProtocol]
    ) -> NatsServer:
        """Serve the container's name.

        Of containers that claim one name at the same time, one gets it (the
        claim takes ``claim_wait`` seconds).

        Raises:
            OSError: (``EADDRINUSE``) if another container has that name, or
                won it.
        """
        server = NatsServer(self.link, self.name, protocol_factory)
        await server.start()
        return server


class NatsServer(asyncio.AbstractServer):
    """Accepts the connections to one container name (see
    :meth:`NatsEndpoint.create_server`)."""

    def __init__(
        self,
        link: NatsLink,
        name: str,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
    ) -> None:
        self.link = link
        self.name = name
        self._factory = protocol_factory
        self._loop = asyncio.get_running_loop()
        self._unsubscribe: list[Callable[[], Awaitable[None]]] = []
        self._serving = False
        self._closed = self._loop.create_future()
        self._pending: set[asyncio.Task[None]] = set()
        self.info: Callable[[], dict[str, Any]] = dict
        """Adds to the container's ``INFO`` answer (set by the container:
        ``agents`` and ``agent_count``)."""
        self._started = (
            datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")[:-6]
            + "Z"
        )
        self._accepted = self._refused = 0
        self._truncated = False  # (Logged as a warning once.)
        # Claiming the name (see _claim()): our token, those of the others
        # that asked meanwhile, and whether we claim it (None: no more; a
        # loser or a closed server answers nobody), or it is ours.
        self._token = secrets.token_hex(16)
        self._rivals: list[str] = []
        self._claiming: bool | None = True
        self._claimed = False
        self.owns_link = False
        """Whether :meth:`wait_closed` closes the link too."""

    def __repr__(self) -> str:
        return f"NatsServer(nats://{self.name}/)"

    async def start(self) -> None:
        link = self.link
        try:
            await link.client.request(
                self._control("PING"), b"", link.config.connect_timeout
            )
        except ConnectionRefusedError:
            pass  # Nobody has the name: ours.
        except TimeoutError:
            pass  # Somebody subscribed but does not answer: take it.
        else:
            raise self._taken()
        try:
            await self._claim()
            client = link.client
            self._unsubscribe.append(
                await client.subscribe(link.subject(self.name, "connect"), self._accept)
            )
            # The services API: every verb for all services, for ours, for us.
            service = link.config.prefix
            for verb in ("PING", "INFO", "STATS"):
                answer = functools.partial(self._answer_control, verb)
                for subject in (
                    f"{SERVICES_PREFIX}.{verb}",
                    f"{SERVICES_PREFIX}.{verb}.{service}",
                    self._control(verb),
                ):
                    self._unsubscribe.append(await client.subscribe(subject, answer))
            # Serving starts when the server has our subscriptions: whoever hears
            # of us from now on finds us (nobody else shares our connection).
            await client.flush(link.config.connect_timeout)
        except BaseException:
            # (Taken, the server did not answer, we were cancelled: nothing
            # of ours stays subscribed.)
            self._claiming = None
            self._claimed = False
            unsubscribe, self._unsubscribe = self._unsubscribe, []
            await asyncio.gather(*(stop() for stop in unsubscribe))
            raise
        self._serving = True

    def _taken(self) -> OSError:
        return OSError(
            errno.EADDRINUSE,
            f"A container named {self.name!r} is on the NATS system already",
        )

    async def _claim(self) -> None:
        """Make sure that no other container takes our name at the same time.

        Every claimer subscribes to the name's ``claim`` subject, then asks
        there (with a random token) and waits ``claim_wait`` for the others'
        answers.  Of two claimers, the later one to subscribe reaches the
        earlier one, so both know each other's token: the lower one wins.  A
        container that serves the name answers that it does: it wins.

        Raises:
            OSError: (``EADDRINUSE``) if another container wins.
        """
        link = self.link
        client = link.client
        subject = link.subject(self.name, "claim")
        self._unsubscribe.append(await client.subscribe(subject, self._claim_heard))
        await client.flush(link.config.connect_timeout)
        request = json.dumps({"token": self._token}).encode()
        answers = await client.gather(subject, request, link.config.claim_wait)
        rivals = [_decode(answer) or {} for answer in answers]
        if any(rival.get("serving") for rival in rivals) or any(
            isinstance(token, str) and token < self._token
            for token in [*self._rivals, *(rival.get("token") for rival in rivals)]
        ):
            self._claiming = None
            raise self._taken()
        # Ours: whoever asks from now on hears that it is served.
        self._claiming = False
        self._claimed = True

    def _claim_heard(self, data: bytes, reply: str) -> None:
        request = _decode(data)
        token = None if request is None else request.get("token")
        if (
            not isinstance(token, str)
            or token == self._token  # (Our own question.)
            or not reply
            or self._claiming is None
        ):
            return
        if self._claiming:
            self._rivals.append(token)
        answer = {"token": self._token, "serving": self._claimed}
        self.link.client.publish(reply, json.dumps(answer).encode())

    def _control(self, verb: str) -> str:
        """Our subject of the services API's *verb*."""
        return f"{SERVICES_PREFIX}.{verb}.{self.link.config.prefix}.{self.name}"

    def describe(self, verb: str = "INFO") -> dict[str, Any]:
        """The container's answer to the services API's *verb* (``PING``,
        ``INFO`` or ``STATS``), with what :attr:`info` adds to ``INFO``."""
        link = self.link
        answer: dict[str, Any] = {
            "type": f"io.nats.micro.v1.{verb.lower()}_response",
            "name": link.config.prefix,
            "id": self.name,
            "version": SERVICE_VERSION,
            "metadata": {"aiomas.base_url": f"nats://{self.name}/"},
        }
        endpoint = {
            "name": "connect",
            "subject": link.subject(self.name, "connect"),
            "queue_group": "",
        }
        if verb == "INFO":
            answer["description"] = "An aiomas container"
            answer["endpoints"] = [{**endpoint, "metadata": {}}]
            answer.update(self.info())
        elif verb == "STATS":
            answer["started"] = self._started
            answer["endpoints"] = [
                {
                    **endpoint,
                    "num_requests": self._accepted,
                    "num_errors": self._refused,
                    "last_error": "",
                    "processing_time": 0,
                    "average_processing_time": 0,
                    "data": None,
                }
            ]
        return answer

    def _answer_control(self, verb: str, data: bytes, reply: str) -> None:
        if not (reply and self._claimed):
            return  # (Answered from the claim on: see _claim_heard().)
        answer = self.describe(verb)
        request = _decode(data) if data else None
        named = None if request is None else request.get("agents_named")
        agents = answer.get("agents")
        if isinstance(named, str) and isinstance(agents, dict):
            # (lookup(): only the agents of that id or class.)
            answer["agents"] = {
                aid: kind for aid, kind in agents.items() if named in (aid, kind)
            }
        encoded = self._fit(answer)
        if encoded is not None:
            self.link.client.publish(reply, encoded)

    def _fit(self, answer: dict[str, Any]) -> bytes | None:
        """*answer*, encoded; if it is larger than the server takes, with as
        many agents as fit and ``"agents_truncated": true`` (logged); ``None``
        if not even that fits (logged as an error)."""
        limit = self.link.client.max_payload
        data = json.dumps(answer).encode()
        agents = answer.get("agents")
        if len(data) <= limit:
            return data
        if not isinstance(agents, dict):
            agents = {}
        items = list(agents.items())
        answer["agents_truncated"] = True

        def encoded(count: int) -> bytes:
            answer["agents"] = dict(items[:count])
            return json.dumps(answer).encode()

        # The most agents that fit (found by bisection: the answer grows
        # with every agent listed).
        low, high = 0, len(items) - 1
        while low < high:
            middle = (low + high + 1) // 2
            if len(encoded(middle)) <= limit:
                low = middle
            else:
                high = middle - 1
        data = encoded(low)
        if len(data) > limit:
            logger.error(
                "NATS: the INFO answer of %s does not fit into %d bytes even "
                "without agents: not sent",
                self.name,
                limit,
            )
            return None
        level = logging.WARNING if not self._truncated else logging.DEBUG
        self._truncated = True
        logger.log(
            level,
            "NATS: %s lists %d of its %d agents in its INFO answer: the server "
            "takes messages of %d bytes at most",
            self.name,
            low,
            len(items),
            limit,
        )
        return data

    def _accept(self, data: bytes, reply: str) -> None:
        request = _decode(data)
        inbox = None if request is None else request.get("inbox")
        if (
            not reply
            or not isinstance(inbox, str)
            or not _is_inbox(inbox)
            or not self._serving
        ):
            self._refused += 1
            logger.warning(
                "NATS: ignored a bad connect request to %s: %r", self.name, data[:200]
            )
            return
        peer = request.get("from") if request else None
        self._accepted += 1
        task = asyncio.ensure_future(self._open(inbox, reply, peer))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _open(self, inbox: str, reply: str, peer: object) -> None:
        peername = f"nats://{peer}/" if isinstance(peer, str) else inbox
        transport = NatsTransport(self.link, self._factory(), peername=peername)
        await transport.listen()
        if not self._serving:
            await transport.discard()
            return
        self.link.client.publish(
            reply, json.dumps({"v": _VERSION, "inbox": transport.inbox}).encode()
        )
        try:
            transport.start(inbox)
        except ConnectionResetError as exc:
            logger.debug("NATS: a connection to %s ended at once: %s", self.name, exc)

    def close(self) -> None:
        """Stop accepting connections (those open stay open)."""
        if not self._serving and self._closed.done():
            return
        self._serving = self._claimed = False
        self._claiming = None
        unsubscribe, self._unsubscribe = self._unsubscribe, []
        task = asyncio.ensure_future(self._finish_close(unsubscribe))
        task.add_done_callback(lambda _: None)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _finish_close(
        self, unsubscribe: list[Callable[[], Awaitable[None]]]
    ) -> None:
        try:
            await asyncio.gather(*(stop() for stop in unsubscribe))
            await asyncio.gather(*list(self._pending - {asyncio.current_task()}))
        finally:
            if not self._closed.done():
                self._closed.set_result(None)

    async def wait_closed(self) -> None:
        """Wait until the server is closed (and, if it owns the link, the
        link too)."""
        await asyncio.shield(self._closed)
        if self.owns_link:
            await self.link.close()

    def is_serving(self) -> bool:
        return self._serving

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    async def start_serving(self) -> None:
        """It serves from the start."""

    async def serve_forever(self) -> None:
        await asyncio.shield(self._closed)


def _container_info(data: bytes) -> dict[str, Any] | None:
    """What :meth:`NatsLink.info` returns, from an ``INFO`` answer (``None``
    if it is not a container's)."""
    service = _decode(data)
    if service is None:
        return None
    name = service.get("id")
    agents = service.get("agents")
    if not isinstance(name, str) or not isinstance(agents, dict):
        return None
    count = service.get("agent_count")
    if not isinstance(count, int):
        count = len(agents)
    return {
        "name": name,
        "base_url": f"nats://{name}/",
        "agents": agents,
        "agent_count": count,
        "truncated": bool(service.get("agents_truncated")) or count > len(agents),
        "service": service,
    }


def _decode(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


# Messages on a session's inboxes (see the module docstring): a kind byte and
# stream offsets (unsigned 64-bit, big-endian).
_DATA: Final = b"D"  # offset, then the bytes at that offset of the stream
_ACK: Final = b"A"  # what the sender of the ack has handed to its protocol
# received, sent: resend what I lack (an ack up to received); I sent so much
_RESEND: Final = b"R"
_END: Final = b"E"  # sent: the stream ends after that many bytes
_ENDED: Final = b"F"  # received: I have the whole stream and its end
_BEAT: Final = b"H"  # sent, with a reply subject: answered with an ack
_OFFSET: Final = struct.Struct(">cQ")
_TWO_OFFSETS: Final = struct.Struct(">cQQ")
ACK_EVERY: Final = 256 * 1024
"""A receiver acknowledges at least every this many bytes handed to its
protocol (and with every heartbeat answer), so that the sender may forget
them."""
UNACKED_HIGH: Final = 8 * 2**20
"""Writers are told to pause when this many bytes wait for an ack..."""
UNACKED_LOW: Final = 2 * 2**20
"""...and to resume when the acks brought it under this."""
HELD_LIMIT: Final = 2 * UNACKED_HIGH
"""The most a receiver holds while its protocol paused reading; what comes
beyond it is dropped and asked for again when reading resumes."""


class NatsTransport(asyncio.Transport):
    """One aiomas connection over a NATS link (see the module docstring).

    The byte stream survives a reconnect of either side's link (to the same
    or another server): every piece carries its offset, the receiver drops
    duplicates and asks for what it lacks, the sender keeps what was not
    acknowledged yet and sends it again when asked.  Only what the protocol
    was given is acknowledged: a protocol that pauses reading makes the
    peer's writers pause, as over TCP.
    """

    def __init__(
        self, link: NatsLink, protocol: asyncio.BaseProtocol, *, peername: str
    ) -> None:
        super().__init__({"peername": peername, "sockname": link.config.base_url})
        self._link = link
        self._protocol = protocol
        self._loop = asyncio.get_running_loop()
        self.inbox = link.client.new_inbox()
        self.peer_inbox: str | None = None
        self._unsubscribe: Callable[[], Awaitable[None]] | None = None
        # What arrived before connection_made() or while reading is paused
        # (b"" for the end), and its size.
        self._held: deque[bytes] = deque()
        self._held_size = 0
        self._reading = False
        # close() or the end: no more writes, nothing more for the protocol.
        self._closing = False
        # The protocol was told (connection_lost() is scheduled).
        self._lost = False
        # We sent the end and wait for the peer to confirm it (F).
        self._ending = False
        # The peer's end arrived (in order).
        self._peer_ended = False
        # Unsubscribed, everything dropped: nothing to do any more.
        self._finished = False
        self._done: asyncio.Future[None] = self._loop.create_future()
        self._heartbeat: asyncio.Task[None] | None = None
        self._link_paused = False
        self._writing_paused = False
        # Sending: the offset of the next byte, and the pieces the peer has
        # not acknowledged yet (offset, bytes), in order.
        self._sent = 0
        self._acked = 0
        self._unacked: deque[tuple[int, bytes]] = deque()
        self._unacked_size = 0
        # Receiving: the bytes of the stream we have (given to the protocol
        # or held), those given to the protocol, what we acknowledged, the
        # most the peer said it sent, and when we last asked for a resend
        # (and from where).
        self._received = 0
        self._delivered = 0
        self._received_acked = 0
        self._peer_sent = 0
        self._asked: tuple[int, float] | None = None
        self._heard = self._loop.time()

    def __repr__(self) -> str:
        return f"NatsTransport({self.get_extra_info('peername')!r})"

    async def listen(self) -> None:
        """Subscribe to our inbox (before anybody knows it)."""
        self._unsubscribe = await self._link.client.subscribe(
            self.inbox, self._received_message, self._overflow
        )

    async def discard(self) -> None:
        """Give up a transport that was never started."""
        self._closing = self._lost = self._finished = True
        if not self._done.done():
            self._done.set_result(None)
        if self._unsubscribe is not None:
            await self._unsubscribe()

    def start(self, peer_inbox: str) -> None:
        """Connect to the peer's inbox and tell the protocol.

        Raises:
            ConnectionResetError: if the transport was lost already (say, a
                bad message reached its inbox before the peer's answer).
        """
        if self._lost:
            raise ConnectionResetError(
                f"The connection to {self.get_extra_info('peername')} ended "
                "before it was made"
            )
        self.peer_inbox = peer_inbox
        if self._peer_ended:
            # The end came first (before the answer to our connect request).
            self._send_to_peer(_OFFSET.pack(_ENDED, self._received))
        self._link.add(self)
        self._reading = True
        self._protocol.connection_made(self)
        if self._link.client.paused:
            self.pressure(True)
        if not self._finished:
            # (Also if the protocol closed at once: the end must arrive.)
            self._heartbeat = asyncio.ensure_future(self._beat())
        if not self._lost:
            self._deliver_held()

    @property
    def stream_offsets(self) -> tuple[int, int, int]:
        """Bytes sent, acknowledged by the peer, and received so far."""
        return self._sent, self._acked, self._received

    def get_read_buffer_size(self) -> int:
        """The bytes received but not given to the protocol yet (it paused
        reading): at most :data:`HELD_LIMIT` (and the rest of a message that
        a buffered protocol did not take whole)."""
        return self._held_size

    async def wait_finished(self) -> None:
        """Wait until the transport is done with the peer: after a close,
        when the peer confirmed the end, or gave up (see :meth:`close`)."""
        await asyncio.shield(self._done)

    # Receiving

    def _received_message(self, data: bytes, reply: str) -> None:
        if self._finished:
            return
        # Whatever comes from the peer shows it is there (a busy peer may
        # answer heartbeats late: they queue behind its data).
        self._heard = self._loop.time()
        kind = data[:1]
        try:
            if kind == _DATA:
                _, offset = _OFFSET.unpack_from(data)
                self._received_data(offset, data, _OFFSET.size)
            elif kind == _ACK:
                self._acknowledged(_OFFSET.unpack(data)[1])
            elif kind == _BEAT and reply:
                sent = _OFFSET.unpack(data)[1]
                # What the protocol has, not what we hold: a paused reader
                # answers (it is alive) without taking more.
                self._publish(reply, _OFFSET.pack(_ACK, self._delivered))
                self._received_acked = self._delivered
                self._check_complete(sent)
            elif kind == _RESEND:
                _, received, sent = _TWO_OFFSETS.unpack(data)
                self._resend(received)
                self._check_complete(sent)
            elif kind == _END:
                self._received_end(_OFFSET.unpack(data)[1])
            elif kind == _ENDED:
                self._end_confirmed(_OFFSET.unpack(data)[1])
            else:
                raise ValueError(f"unknown message kind {kind!r}")
        except (struct.error, ValueError) as exc:
            logger.warning(
                "NATS: %s sent a bad message (%s): %r",
                self.get_extra_info("peername"),
                exc,
                data[:40],
            )
            self.lose(ConnectionResetError(f"The peer broke the NATS session: {exc}"))

    def _received_data(self, offset: int, data: bytes, start: int) -> None:
        if self._closing or self._peer_ended:
            return  # Closed: nobody reads it any more.
        received = self._received
        end = offset + len(data) - start
        self._peer_sent = max(self._peer_sent, end)
        if end <= received:
            return  # Sent again: we have it.
        if offset > received:
            self._ask_for(received)  # Something before it was lost.
            return
        piece = data[start + received - offset :]
        self._asked = None
        # Held until the connection is made -- the answer to our connect
        # request may come after the peer's first messages, through another
        # subscription -- and while reading pauses.
        if not self._reading or self._held:
            if self._held_size + len(piece) > HELD_LIMIT:
                return  # Asked for again when reading resumes.
            self._held.append(piece)
            self._held_size += len(piece)
            self._received = end
        else:
            self._received = end
            self._feed(piece)
            self._ack_delivered()

    def _ack_delivered(self) -> None:
        if self._delivered - self._received_acked >= ACK_EVERY and not self._lost:
            self._received_acked = self._delivered
            self._send_to_peer(_OFFSET.pack(_ACK, self._delivered))

    def _received_end(self, offset: int) -> None:
        self._peer_sent = max(self._peer_sent, offset)
        if self._closing:
            # We closed too: the rest of the stream does not matter.
            self._send_to_peer(_OFFSET.pack(_ENDED, offset))
            return
        if offset > self._received:
            self._ask_for(self._received)
            return
        # The whole stream is here (held, maybe): the peer may forget it.
        self._send_to_peer(_OFFSET.pack(_ENDED, offset))
        if self._peer_ended:
            return  # (The end again: our confirmation was lost.)
        self._peer_ended = True
        if self._reading and not self._held:
            self._eof()
        else:
            self._held.append(b"")

    def _end_confirmed(self, received: int) -> None:
        if received != self._sent:
            raise ValueError(f"end confirmed at {received}, {self._sent} were sent")
        if self._ending:
            self._finish()

    def _check_complete(self, sent: int) -> None:
        """The peer has sent *sent* bytes: ask for what did not arrive."""
        self._peer_sent = max(self._peer_sent, sent)
        if sent > self._received:
            self._ask_for(self._received)

    def _ask_for(self, received: int) -> None:
        """Ask the peer to send everything after *received* again (once per
        gap and heartbeat interval: the answer takes a round trip)."""
        if self.peer_inbox is None or not self._reading or self._closing:
            # Not started (the first heartbeat will tell), reading paused
            # (asked when it resumes: a request acknowledges what we have,
            # and we hold that without reading it), or closed.
            return
        now = self._loop.time()
        asked = self._asked
        interval = self._link.config.heartbeat_interval
        if asked is not None and asked[0] == received and now - asked[1] < interval:
            return
        self._asked = (received, now)
        self._send_to_peer(_TWO_OFFSETS.pack(_RESEND, received, self._sent))

    def _eof(self) -> None:
        self._delivered = self._received
        keep_open = cast(asyncio.Protocol, self._protocol).eof_received()
        if not keep_open:
            self._tell_protocol(None)
            self._finish()

    def _feed(self, data: bytes) -> None:
        protocol = self._protocol
        if not isinstance(protocol, asyncio.BufferedProtocol):
            self._delivered += len(data)
            cast(asyncio.Protocol, protocol).data_received(data)
            return
        view = memoryview(data)
        while view:
            buffer = memoryview(protocol.get_buffer(len(view)))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            view = view[size:]
            self._delivered += size
            protocol.buffer_updated(size)
            if self._lost:
                return
            if view and not self._reading:
                self._held.appendleft(bytes(view))
                self._held_size += len(view)
                return

    def _deliver_held(self) -> None:
        held = self._held
        while held and self._reading and not self._lost:
            data = held.popleft()
            self._held_size -= len(data)
            if data:
                self._feed(data)
            else:
                self._eof()
        if self._reading and not self._lost:
            self._ack_delivered()
            # What was dropped while reading paused, or lost meanwhile.
            self._check_complete(self._peer_sent)

    def _overflow(self) -> None:
        self.lose(
            ConnectionResetError(
                "The NATS client dropped messages of this connection (we did not "
                "keep up reading)"
            )
        )

    def pause_reading(self) -> None:
        """Hold what arrives (up to :data:`HELD_LIMIT`) and acknowledge
        nothing more, so that the peer's writers pause."""
        self._reading = False

    def resume_reading(self) -> None:
        if not self._reading and not self._lost:
            self._reading = True
            self._loop.call_soon(self._deliver_held)

    def is_reading(self) -> bool:
        return self._reading

    # Sending

    def _publish(self, subject: str, data: bytes) -> None:
        self._link.client.publish(subject, data)

    def _send_to_peer(self, data: bytes) -> None:
        if self.peer_inbox is not None:
            self._link.client.publish(self.peer_inbox, data)

    def _send_piece(self, offset: int, piece: bytes) -> None:
        """Send *piece* of the stream, in messages the server takes (its
        limit may be another one after a reconnect)."""
        limit = self._link.client.max_payload - _OFFSET.size
        for start in range(0, len(piece), limit):
            self._send_to_peer(
                _OFFSET.pack(_DATA, offset + start) + piece[start : start + limit]
            )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self.peer_inbox is None:
            return
        size = len(data)
        if not size:
            return
        limit = self._link.client.max_payload - _OFFSET.size
        view = memoryview(data)
        for start in range(0, size, limit):
            piece = bytes(view[start : start + limit])
            self._unacked.append((self._sent, piece))
            self._unacked_size += len(piece)
            self._send_to_peer(_OFFSET.pack(_DATA, self._sent) + piece)
            self._sent += len(piece)
        if self._unacked_size > UNACKED_HIGH:
            self._update_pressure()

    def writelines(
        self, list_of_data: Iterable[bytes | bytearray | memoryview]
    ) -> None:
        self.write(b"".join(list_of_data))

    def _acknowledged(self, received: int) -> None:
        """Forget what the peer has received."""
        if received > self._sent:
            raise ValueError(f"ack of {received} bytes, {self._sent} were sent")
        if received <= self._acked:
            return
        self._acked = received
        unacked = self._unacked
        while unacked and unacked[0][0] + len(unacked[0][1]) <= received:
            self._unacked_size -= len(unacked.popleft()[1])
        if self._writing_paused and self._unacked_size <= UNACKED_LOW:
            self._update_pressure()

    def _resend(self, received: int) -> None:
        """Send again what the peer lacks (after *received* bytes), and the
        end if we closed."""
        self._acknowledged(received)
        for offset, piece in self._unacked:
            skip = max(received - offset, 0)
            if skip < len(piece):
                self._send_piece(offset + skip, piece[skip:])
        if self._ending:
            self._send_to_peer(_OFFSET.pack(_END, self._sent))

    def resync(self) -> None:
        """Our link is back (maybe through another server): tell the peer
        what we have and have sent, so that each side resends what the
        other lacks."""
        if self._finished or self.peer_inbox is None:
            return
        # From what the protocol has: a resend request acknowledges, and
        # what we hold while reading pauses is not acknowledged yet.
        self._asked = (self._delivered, self._loop.time())
        self._send_to_peer(_TWO_OFFSETS.pack(_RESEND, self._delivered, self._sent))
        if self._ending:
            self._send_to_peer(_OFFSET.pack(_END, self._sent))

    def pressure(self, paused: bool) -> None:
        """The link's send queue is over its high-water mark (*paused*), or
        back under its low-water mark: tell the protocol."""
        self._link_paused = paused
        self._update_pressure()

    def _update_pressure(self) -> None:
        if self._lost:
            return
        if self._writing_paused:
            paused = self._link_paused or self._unacked_size > UNACKED_LOW
        else:
            paused = self._link_paused or self._unacked_size > UNACKED_HIGH
        if paused == self._writing_paused:
            return
        self._writing_paused = paused
        protocol = self._protocol
        if paused:
            protocol.pause_writing()
        else:
            protocol.resume_writing()

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        """What the link has queued to send (for every connection over it)."""
        return self._link.client.queued

    def set_write_buffer_limits(
        self, high: int | None = None, low: int | None = None
    ) -> None:
        """The limits are the link's, shared by its connections (4 MiB and
        1 MiB); they are not set per connection."""

    def is_closing(self) -> bool:
        return self._closing

    @property
    def ending(self) -> bool:
        """Whether the transport was closed and still waits for the peer to
        confirm the end (see :meth:`close`)."""
        return self._ending and not self._finished

    def close(self) -> None:
        """Send the end of the stream after what was written, and close.

        The protocol hears of it at once (``connection_lost(None)``); the
        transport goes on in the background until the peer has confirmed
        the end: it sends what the peer lacks (say, it lost it while its
        link reconnected) again and the end with it.  It gives up when the
        peer was not heard for ``heartbeat_interval + heartbeat_timeout``
        seconds, or when its link closes (:meth:`wait_finished`).
        """
        if self._closing:
            return
        self._closing = True
        self._tell_protocol(None)
        if self.peer_inbox is None:
            self._finish()
            return
        self._ending = True
        self._held.clear()
        self._held_size = 0
        self._send_to_peer(_OFFSET.pack(_END, self._sent))

    def abort(self) -> None:
        """Send the end (once, without waiting for the peer to confirm it)
        and close at once, dropping what the peer did not acknowledge."""
        if not self._closing:
            self._send_to_peer(_OFFSET.pack(_END, self._sent))
        self._closing = True
        self._tell_protocol(None)
        self._finish()

    def lose(self, exc: Exception) -> None:
        """End the connection with *exc* (the peer vanished, the link broke);
        a closed transport stops waiting for the peer's confirmation."""
        if self._finished:
            return
        if self._ending:
            logger.debug(
                "NATS: %s did not confirm the end of the stream: %s",
                self.get_extra_info("peername"),
                exc,
            )
        elif not self._closing:
            # (Best effort: a peer that is there ends at once, not at the
            # heartbeat bound.)
            self._send_to_peer(_OFFSET.pack(_END, self._sent))
        self._closing = True
        self._tell_protocol(exc)
        self._finish()

    def _tell_protocol(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        if self.peer_inbox is not None:
            self._loop.call_soon(self._protocol.connection_lost, exc)

    def _finish(self) -> None:
        """Unsubscribe and drop everything."""
        if self._finished:
            return
        self._finished = True
        self._link.discard(self)
        heartbeat = self._heartbeat
        if heartbeat is not None and heartbeat is not asyncio.current_task():
            heartbeat.cancel()
        self._held.clear()
        self._held_size = 0
        self._unacked.clear()
        self._unacked_size = 0
        unsubscribe = self._unsubscribe
        if unsubscribe is not None:
            task = asyncio.ensure_future(unsubscribe())
            # Tracked by the link's close() through the client; nothing to wait for.
            task.add_done_callback(_ignore)
        if not self._done.done():
            self._done.set_result(None)

    async def _beat(self) -> None:
        """Every heartbeat_interval, ask the peer what it has received; end
        the connection when nothing came from the peer for interval +
        timeout seconds (it is gone, or one of the links did not come
        back)."""
        config = self._link.config
        client = self._link.client
        peer = self.peer_inbox
        assert peer is not None
        loop = self._loop
        bound = config.heartbeat_interval + config.heartbeat_timeout
        deadline = loop.time() + bound
        why = "did not answer"
        while True:
            deadline = max(deadline, self._heard + bound)
            await asyncio.sleep(
                max(min(config.heartbeat_interval, deadline - loop.time()), 0)
            )
            if self._finished:
                return
            if client.is_connected:
                timeout = min(config.heartbeat_timeout, deadline - loop.time())
                try:
                    answer = await client.request(
                        peer, _OFFSET.pack(_BEAT, self._sent), max(timeout, 0.01)
                    )
                except ConnectionRefusedError:
                    why = "left the NATS system (no responders)"
                except TimeoutError:
                    why = "did not answer"
                except ConnectionResetError as exc:
                    self.lose(exc)
                    return
                except Exception as exc:
                    # (The link reconnects, a subject the server refuses ...:
                    # the heartbeat must not die and leave the connection
                    # open; it fails at the bound unless the peer is heard.)
                    why = f"could not be asked ({exc})"
                else:
                    self._received_message(answer, "")
                    if self._ending and not self._finished:
                        # The end (or its confirmation) may have been lost.
                        self._send_to_peer(_OFFSET.pack(_END, self._sent))
                    deadline = loop.time() + bound
                    continue
            else:
                why = "is out of reach: our link to the NATS system is down"
            deadline = max(deadline, self._heard + bound)
            if loop.time() >= deadline:
                self.lose(
                    ConnectionResetError(
                        f"{self.get_extra_info('peername')} {why}: nothing "
                        f"heard from it for {bound:.3g} s"
                    )
                )
                return


def _ignore(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
