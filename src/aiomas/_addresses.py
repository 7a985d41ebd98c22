"""Agent addresses and the base URLs of containers, as plain text functions.

An agent address is ``tcp://host:port/<id>`` (IPv6 hosts in brackets),
``ipc://[<socket path>]/<id>`` for unix domain sockets, ``local://<queue
id>/<id>`` for :mod:`aiomas.local_queue` or ``nats://<container name>/<id>``
for a container on a NATS system (:mod:`aiomas.nats`); a container's base URL
is that address without the id.  :func:`parse_url` reads the other spellings of the
original aiomas versions too; :func:`base_url_of` and the ``*_base_url``
functions always write ours, so two spellings of one container compare equal.

Nothing here connects or resolves a host name (only :func:`tcp_base_url` asks
for the machine's FQDN).  Used by :mod:`aiomas.agent`, which re-exports
:func:`parse_url`, :func:`split_host_port` and, for code written against aiomas
2.0.1, :func:`base_url_of` as ``_get_base_url``.
"""

from __future__ import annotations

import re
import socket
from typing import Any, Final, NamedTuple

from aiomas import local_queue

__all__ = [
    "Endpoint",
    "NatsName",
    "base_url_of",
    "ipc_base_url",
    "local_base_url",
    "nats_base_url",
    "parse_url",
    "split_host_port",
    "tcp_base_url",
]

# Hosts that make a server listen on every interface; agent addresses then name
# the machine by its fully qualified domain name instead.
_WILDCARD_HOSTS: Final = frozenset({"", "0.0.0.0", "::"})

# A container name on NATS is one subject token (see aiomas.nats.check_name).
_NATS_NAME: Final = r"[A-Za-z0-9_-]+"

_SCHEMES: Final = ("tcp", "ipc", "local", "nats")


class NatsName(NamedTuple):
    """A container on a NATS system, by name (what ``nats://<name>/<id>``
    names); the container that connects reaches it over its own NATS link."""

    name: str


class Endpoint(NamedTuple):
    """Where a container listens, as parsed from an agent address."""

    base_url: str
    """The container's base URL, e.g. ``'tcp://localhost:5555/'``."""
    addr: tuple[str, int] | str | local_queue.LocalQueue | NatsName
    """What :func:`aiomas.rpc.open_connection` needs: ``(host, port)``, a
    socket path or a :class:`~aiomas.local_queue.LocalQueue`; or the
    :class:`NatsName` of a container on NATS."""


def parse_url(url: str) -> tuple[Endpoint, str]:
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
        return Endpoint(base_url, local_queue.get_queue(where)), aid
    if scheme == "nats":
        return Endpoint(base_url, NatsName(where)), aid
    return Endpoint(base_url, where), aid


def base_url_of(addr: str) -> str:
    """Return the address of the container of the agent at *addr*, with a
    trailing slash: ``'tcp://localhost:5555/'``, ``'ipc://[/tmp/s]/'``,
    ``'local://q/'`` (``aiomas.agent._get_base_url``, kept for code written
    against aiomas 2.0.1).

    Both spellings of unix socket and IPv6 addresses give the one we write (see
    :func:`parse_url`), so the result compares equal to
    :attr:`aiomas.agent.Container.base_url`.

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


def tcp_base_url(host: str | None, port: int) -> str:
    """The base URL of a container listening on *host* and *port*: a wildcard
    host (``'0.0.0.0'``, ``'::'``, ``''``, ``None``) is named by the machine's
    FQDN, an IPv6 host is put in brackets."""
    if host is None or host in _WILDCARD_HOSTS:
        host = socket.getfqdn()
    return _host_port_url(host, port)


def ipc_base_url(path: str) -> str:
    """The base URL of a container listening on the unix socket *path*."""
    # The brackets (as in the original aiomas) keep the slashes of the path
    # apart from the one before the agent id.
    return f"ipc://[{path}]/"


def local_base_url(queue_id: str) -> str:
    """The base URL of a container served through the LocalQueue *queue_id*."""
    return f"local://{queue_id}/"


def nats_base_url(name: str) -> str:
    """The base URL of the container *name* on a NATS system."""
    return f"nats://{name}/"


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
        return scheme, ipc_base_url(location), location, aid
    if scheme == "nats":
        if not re.fullmatch(_NATS_NAME, location):
            raise ValueError(
                f"Invalid agent address {url!r}: a container name on NATS "
                "consists of letters, digits, '_' and '-'"
            )
        return scheme, nats_base_url(location), location, aid
    return scheme, local_base_url(location), location, aid


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
            "'ipc://[path]/id', 'local://queue_id/id' or 'nats://name/id'"
        )
    return scheme, location, aid


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


def _host_port_url(host: str, port: int) -> str:
    if ":" in host:
        host = f"[{host}]"
    return f"tcp://{host}:{port}/"
