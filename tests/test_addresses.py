"""Tests for aiomas._addresses: agent addresses and base URLs, as text."""

from __future__ import annotations

import socket
from typing import Any

import pytest

import aiomas
from aiomas import _addresses, agent
from aiomas._addresses import (
    NatsName,
    base_url_of,
    ipc_base_url,
    local_base_url,
    nats_base_url,
    parse_url,
    split_host_port,
    tcp_base_url,
)


@pytest.mark.parametrize(
    ("url", "base_url", "addr", "aid"),
    [
        ("tcp://localhost:5555/0", "tcp://localhost:5555/", ("localhost", 5555), "0"),
        ("tcp://[::1]:5555/12", "tcp://[::1]:5555/", ("::1", 5555), "12"),
        ("tcp://::1:5555/12", "tcp://[::1]:5555/", ("::1", 5555), "12"),
        ("tcp://fe80::1:5555/1", "tcp://[fe80::1]:5555/", ("fe80::1", 5555), "1"),
        ("ipc:///tmp/x/sock/3", "ipc://[/tmp/x/sock]/", "/tmp/x/sock", "3"),
        ("ipc://[/tmp/x/sock]/3", "ipc://[/tmp/x/sock]/", "/tmp/x/sock", "3"),
        ("ipc://rel/sock/3", "ipc://[rel/sock]/", "rel/sock", "3"),
        ("ipc://[rel/sock]/3", "ipc://[rel/sock]/", "rel/sock", "3"),
        ("nats://billing/0", "nats://billing/", NatsName("billing"), "0"),
        ("nats://grid-A_2/17", "nats://grid-A_2/", NatsName("grid-A_2"), "17"),
    ],
)
def test_parse_url(url: str, base_url: str, addr: Any, aid: str) -> None:
    endpoint, parsed_aid = parse_url(url)
    assert (endpoint.base_url, endpoint.addr, parsed_aid) == (base_url, addr, aid)
    assert base_url_of(url) == base_url


def test_parse_local_url() -> None:
    endpoint, aid = parse_url("local://queue-7/4")
    assert endpoint.addr is aiomas.get_queue("queue-7")
    assert (endpoint.base_url, aid) == ("local://queue-7/", "4")
    assert base_url_of("local://queue-7/4") == "local://queue-7/"


# Not agent addresses (also used by the tests of Container.connect()).
MALFORMED_URLS = [
    "",
    "spam",
    "tcp://",
    "tcp://127.0.0.1:5555",
    "tcp://127.0.0.1:5555/",
    "tcp://127.0.0.1/0",
    "tcp://:5555/0",
    "tcp://127.0.0.1:port/0",
    "tcp://127.0.0.1:0/0",
    "tcp://127.0.0.1:70000/0",
    "tcp://[::1]/0",
    "http://127.0.0.1:5555/0",
    "ipc:///0",
    "ipc://[]/0",
    "ipc://",
    "local:///0",
    "127.0.0.1:5555/0",
    "nats:///0",
    "nats://billing/",
    "nats://a.b/0",
    "nats://host:4222/c/0",
    "nats://*/0",
]


@pytest.mark.parametrize("url", MALFORMED_URLS)
def test_malformed_urls(url: str) -> None:
    with pytest.raises(ValueError, match="Invalid agent address"):
        parse_url(url)
    with pytest.raises(ValueError, match="Invalid agent address"):
        base_url_of(url)


@pytest.mark.parametrize("url", [None, 5, b"tcp://localhost:5555/0"])
def test_an_address_must_be_a_string(url: Any) -> None:
    with pytest.raises(ValueError, match="must be a string"):
        parse_url(url)


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("localhost:5555", "localhost", 5555),
        ("127.0.0.1:0", "127.0.0.1", 0),
        ("[::1]:65535", "::1", 65535),
        ("::1:5555", "::1", 5555),
    ],
)
def test_split_host_port(text: str, host: str, port: int) -> None:
    assert split_host_port(text) == (host, port)


@pytest.mark.parametrize(
    "text",
    ["localhost", ":5555", "[]:5555", "[::1:5555", "a]:1", "host:port", "host:65536"],
)
def test_split_host_port_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="expected host:port"):
        split_host_port(text)


@pytest.mark.parametrize("host", [None, "", "0.0.0.0", "::"])
def test_wildcard_hosts_are_named_by_the_fqdn(host: str | None) -> None:
    fqdn = socket.getfqdn()
    expected = f"tcp://[{fqdn}]:5555/" if ":" in fqdn else f"tcp://{fqdn}:5555/"
    assert tcp_base_url(host, 5555) == expected


def test_nats_base_url() -> None:
    assert nats_base_url("billing") == "nats://billing/"


def test_base_urls_are_written_in_one_spelling() -> None:
    assert tcp_base_url("127.0.0.1", 1) == "tcp://127.0.0.1:1/"
    assert tcp_base_url("::1", 2) == "tcp://[::1]:2/"
    assert ipc_base_url("/tmp/s") == "ipc://[/tmp/s]/"
    assert local_base_url("q") == "local://q/"


def test_agent_re_exports_the_address_functions() -> None:
    """The names that programs import from aiomas.agent (its API, and
    _get_base_url of aiomas 2.0.1) are these functions."""
    assert agent.parse_url is _addresses.parse_url
    assert agent.split_host_port is _addresses.split_host_port
    assert agent._get_base_url is _addresses.base_url_of  # noqa: SLF001 (2.0.1 name)
