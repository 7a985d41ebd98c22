"""Tests for aiomas.util."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import email.mime.text
import gc
import inspect
import json
import os.path
import ssl
import subprocess
import sys
import textwrap
import threading
import warnings
import weakref
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import arrow
import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st

from aiomas import exceptions, util
from aiomas.testing import settle

from .conftest import peek_thread_loop
from .helpers import close_loop

# Generous bound for things that happen within milliseconds; only a broken test
# waits this long.
WAIT: float = 10.0


# --- run() and get_loop() ----------------------------------------------------------


@pytest.fixture
def fresh_policy(no_thread_loop: None) -> Iterator[None]:
    """A new default policy: for it, the main thread never had a loop set.

    That is the state of a fresh interpreter, in which Python 3.12 and 3.13 warn
    when asyncio.get_event_loop() has to make a loop.
    """
    with warnings.catch_warnings():
        # Policies are deprecated from Python 3.14 on (which no longer warns).
        warnings.simplefilter("ignore", DeprecationWarning)
        old = asyncio.get_event_loop_policy()
        asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    try:
        yield
    finally:
        leftover = peek_thread_loop()
        if leftover is not None:
            close_loop(leftover)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            asyncio.set_event_loop_policy(old)


async def _answer() -> int:
    await asyncio.sleep(0)
    return 42


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


@pytest.mark.usefixtures("no_thread_loop")
class TestRun:
    def test_returns_result(self) -> None:
        assert util.run(_answer()) == 42

    def test_accepts_futures_and_tasks(self) -> None:
        loop = util.get_loop()
        future = loop.create_future()
        loop.call_soon(future.set_result, "done")
        assert util.run(future) == "done"
        assert util.run(loop.create_task(_answer())) == 42

    def test_propagates_exception(self) -> None:
        async def fail() -> None:
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            util.run(fail())

    def test_forever_until_stopped(self) -> None:
        loop = util.get_loop()
        calls: list[str] = []
        loop.call_soon(calls.append, "ran")
        loop.call_soon(loop.stop)
        assert util.run() is None
        assert calls == ["ran"]

    def test_creates_and_sets_loop(self) -> None:
        assert peek_thread_loop() is None
        loop = util.run(_running_loop())
        assert peek_thread_loop() is loop
        assert util.get_loop() is loop
        assert not loop.is_closed()

    def test_reuses_loop_across_calls(self) -> None:
        """The doctest pattern: a server made in one call serves in the next."""

        async def handle(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            writer.write(b"re: " + await reader.readline())
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        async def client(port: int) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"ohai\n")
            reply = await reader.readline()
            writer.close()
            await writer.wait_closed()
            return reply

        first = util.run(_running_loop())
        server = util.run(asyncio.start_server(handle, "127.0.0.1", 0))
        port = server.sockets[0].getsockname()[1]
        assert util.run(client(port)) == b"re: ohai\n"
        server.close()
        util.run(server.wait_closed())
        assert util.run(_running_loop()) is first

    def test_plain_asyncio_sees_same_loop(self) -> None:
        """A task made at top level with asyncio.ensure_future() (as in the docs)
        lands on the loop that run() uses."""
        loop = util.run(_running_loop())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            task = asyncio.ensure_future(_answer())
        assert task.get_loop() is loop
        assert util.run(task) == 42

    def test_replaces_closed_loop(self) -> None:
        closed = asyncio.new_event_loop()
        closed.close()
        asyncio.set_event_loop(closed)
        loop = util.run(_running_loop())
        assert loop is not closed
        assert not loop.is_closed()
        assert peek_thread_loop() is loop

    def test_respects_loop_set_by_user(self) -> None:
        mine = asyncio.new_event_loop()
        asyncio.set_event_loop(mine)
        assert util.run(_running_loop()) is mine
        assert util.get_loop() is mine

    def test_one_loop_per_thread(self) -> None:
        main_loop = util.get_loop()
        seen: list[asyncio.AbstractEventLoop] = []
        errors: list[BaseException] = []

        def in_thread() -> None:
            try:
                seen.append(util.run(_running_loop()))
                seen.append(util.run(_running_loop()))
            except BaseException as exc:  # reported in the main thread
                errors.append(exc)
            finally:
                loop = peek_thread_loop()
                if loop is not None:
                    close_loop(loop)
                asyncio.set_event_loop(None)

        thread = threading.Thread(target=in_thread)
        thread.start()
        thread.join(WAIT)
        assert not errors
        assert seen[0] is seen[1]
        assert seen[0] is not main_loop

    def test_emits_no_warnings(self, fresh_policy: None) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loop = util.run(_running_loop())
            util.run(_answer())
            task = asyncio.ensure_future(_answer())
            util.run(task)
            assert util.get_loop() is loop
        assert [str(w.message) for w in caught] == []

    def test_emits_no_warnings_in_fresh_interpreter(self) -> None:
        """The docs' top-level pattern in a new process, with warnings as errors."""
        script = textwrap.dedent(
            """
            import asyncio
            from aiomas.util import run

            async def handle(reader, writer):
                writer.write(await reader.readline())
                writer.close()
                await writer.wait_closed()

            async def client(port):
                reader, writer = await asyncio.open_connection('127.0.0.1', port)
                writer.write(b'ohai\\n')
                reply = await reader.readline()
                writer.close()
                await writer.wait_closed()
                return reply

            server = run(asyncio.start_server(handle, '127.0.0.1', 0))
            task = asyncio.ensure_future(client(server.sockets[0].getsockname()[1]))
            assert run(task) == b'ohai\\n'
            server.close()
            run(server.wait_closed())
            loop = asyncio.get_event_loop()
            loop.close()
            print('ok')
            """
        )
        result = subprocess.run(
            [sys.executable, "-W", "error", "-c", script],
            capture_output=True,
            text=True,
            timeout=WAIT * 3,
            check=False,
        )
        assert (result.returncode, result.stdout, result.stderr) == (0, "ok\n", "")


async def test_run_refuses_running_loop() -> None:
    coro = _answer()
    with pytest.raises(RuntimeError, match=r"aiomas\.run\(\).*running"):
        util.run(coro)
    # The coroutine was closed, so no "never awaited" warning follows.
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    with pytest.raises(RuntimeError, match="running"):
        util.run()


async def test_run_blocking_inside_a_running_loop_says_as_coro() -> None:
    coro = _answer()
    with pytest.raises(RuntimeError) as info:
        util.run_blocking(coro, "await thing(as_coro=True)")
    message = str(info.value)
    assert "pass as_coro=True and await the result: await thing(as_coro=True)" in (
        message
    )
    assert "aiomas.run()" not in message  # the caller never called it
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED


def test_run_blocking_without_a_running_loop_runs(no_thread_loop: None) -> None:
    assert util.run_blocking(_answer(), "unused") == 42


async def test_get_loop_returns_running_loop() -> None:
    assert util.get_loop() is asyncio.get_running_loop()


# --- create_task() -------------------------------------------------------------------


@dataclass
class Reports:
    """Collects what reaches the loop's exception handler."""

    contexts: list[dict[str, Any]] = field(default_factory=list)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.contexts.append(context)
        self._arrived.set()

    async def first(self) -> dict[str, Any]:
        async with asyncio.timeout(WAIT):
            await self._arrived.wait()
        return self.contexts[0]


@pytest.fixture
async def reports() -> AsyncIterator[Reports]:
    loop = asyncio.get_running_loop()
    collected = Reports()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(collected.handler)
    try:
        yield collected
    finally:
        loop.set_exception_handler(previous)


async def _fail(message: str = "boom") -> None:
    await asyncio.sleep(0)
    raise ValueError(message)


async def _wait_on_private_future() -> None:
    """Wait on a future that nothing but this coroutine references."""
    await asyncio.get_running_loop().create_future()


async def test_create_task_returns_task_with_result(reports: Reports) -> None:
    task = util.create_task(_answer())
    assert isinstance(task, asyncio.Task)
    assert await task == 42
    await settle()
    assert reports.contexts == []


async def test_create_task_keeps_task_alive() -> None:
    task = util.create_task(_wait_on_private_future())
    ref = weakref.ref(task)
    del task
    await asyncio.sleep(0)  # the task now waits; only create_task() holds it
    gc.collect()
    alive = ref()
    assert alive is not None
    assert not alive.done()
    alive.cancel()
    await asyncio.wait([alive])


async def test_create_task_lets_go_of_finished_task() -> None:
    task = util.create_task(_answer())
    await task
    await settle()
    ref = weakref.ref(task)
    del task
    gc.collect()
    assert ref() is None


async def test_premise_plain_task_can_be_collected(reports: Reports) -> None:
    """Without create_task(), the same task is garbage collected mid-flight."""
    ref = weakref.ref(asyncio.ensure_future(_wait_on_private_future()))
    await asyncio.sleep(0)
    gc.collect()
    assert ref() is None
    assert "destroyed but it is pending" in (await reports.first())["message"]


async def test_create_task_reports_exception_at_once(reports: Reports) -> None:
    task = util.create_task(_fail(), loop=asyncio.get_running_loop())
    task.set_name("failing-job")
    context = await reports.first()
    assert task.done()
    assert isinstance(context["exception"], ValueError)
    assert context["task"] is task
    assert "failing-job" in context["message"]
    assert "ValueError" in context["message"]
    with pytest.raises(ValueError, match="boom"):
        await task


async def test_create_task_reports_only_once(reports: Reports) -> None:
    """The report marks the exception retrieved: no second report at GC time."""
    util.create_task(_fail())
    await reports.first()
    gc.collect()
    await settle()
    assert len(reports.contexts) == 1


async def test_create_task_cancel_is_silent(reports: Reports) -> None:
    task = util.create_task(_wait_on_private_future())
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.wait([task])
    await settle()
    assert task.cancelled()
    assert reports.contexts == []


async def test_create_task_cancel_reported_if_asked(reports: Reports) -> None:
    task = util.create_task(_wait_on_private_future(), ignore_cancel=False)
    await asyncio.sleep(0)
    task.cancel("stop it")
    context = await reports.first()
    assert isinstance(context["exception"], asyncio.CancelledError)
    assert context["exception"].args == ("stop it",)
    assert context["task"] is task
    assert "cancelled" in context["message"]


async def test_create_task_passes_futures_through(reports: Reports) -> None:
    loop = asyncio.get_running_loop()
    ok = loop.create_future()
    assert util.create_task(ok) is ok
    ok.set_result(1)
    await settle()
    assert reports.contexts == []

    failed = loop.create_future()
    assert util.create_task(failed) is failed
    failed.set_exception(KeyError("missing"))
    context = await reports.first()
    assert context["future"] is failed
    assert isinstance(context["exception"], KeyError)
    assert context["message"] == "Background future failed with KeyError"


@pytest.mark.usefixtures("no_thread_loop")
def test_create_task_without_running_loop() -> None:
    """At top level, the task goes to the loop that run() will use."""
    task = util.create_task(_answer())
    assert task.get_loop() is util.get_loop()
    assert util.run(task) == 42


# --- obj_from_str() ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("json:dumps", json.dumps),
        ("os.path:join", os.path.join),
        ("aiomas.exceptions:AiomasError", exceptions.AiomasError),
        (
            "aiomas.exceptions:RemoteException.__str__",
            exceptions.RemoteException.__str__,
        ),
        ("collections:OrderedDict.fromkeys", collections.OrderedDict.fromkeys),
        ("email.mime.text:MIMEText", email.mime.text.MIMEText),
    ],
)
def test_obj_from_str(path: str, expected: object) -> None:
    assert util.obj_from_str(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "",
        ":",
        "json",
        "json.dumps",
        "json:dumps:x",
        ":dumps",
        "json:",
        ".json:dumps",
        "os..path:join",
        "os.path.:join",
        "json:.dumps",
        "json:JSONEncoder..encode",
        "json:JSONEncoder.",
    ],
)
def test_obj_from_str_malformed(path: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        util.obj_from_str(path)
    assert repr(path) in str(excinfo.value)


@pytest.mark.parametrize(
    "path", ["aiomas_no_such_module:obj", "aiomas.no_such_module:obj"]
)
def test_obj_from_str_missing_module(path: str) -> None:
    with pytest.raises(ImportError) as excinfo:
        util.obj_from_str(path)
    assert isinstance(excinfo.value, ModuleNotFoundError)
    assert repr(path) in str(excinfo.value)


@pytest.mark.parametrize(
    ("path", "owner"),
    [
        ("json:no_such_thing", "'json'"),
        ("json:JSONEncoder.no_such_method", "'json:JSONEncoder'"),
    ],
)
def test_obj_from_str_missing_attribute(path: str, owner: str) -> None:
    with pytest.raises(AttributeError) as excinfo:
        util.obj_from_str(path)
    assert repr(path) in str(excinfo.value)
    assert owner in str(excinfo.value)


# --- TLS contexts --------------------------------------------------------------------


@dataclass(frozen=True)
class PKI:
    """PEM files: one CA with a server and a client certificate, and a foreign CA
    with a client certificate of its own."""

    cafile: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    foreign_cafile: str
    foreign_cert: str
    foreign_key: str

    def server_context(self) -> ssl.SSLContext:
        return util.make_ssl_server_context(
            self.cafile, self.server_cert, self.server_key
        )

    def client_context(self) -> ssl.SSLContext:
        return util.make_ssl_client_context(
            self.cafile, self.client_cert, self.client_key
        )


@pytest.fixture(scope="module")
def certificates() -> dict[str, trustme.CA | trustme.LeafCert]:
    """Made once per module: RSA keys (as in the TLS guide) take a while."""
    rsa = trustme.KeyType.RSA
    ca = trustme.CA(key_type=rsa)
    foreign_ca = trustme.CA(key_type=rsa)
    return {
        "ca": ca,
        "server": ca.issue_cert("127.0.0.1", "localhost", key_type=rsa),
        "client": ca.issue_cert("client.aiomas.test", key_type=rsa),
        "foreign_ca": foreign_ca,
        "foreign": foreign_ca.issue_cert("client.aiomas.test", key_type=rsa),
    }


@pytest.fixture
def pki(certificates: dict[str, Any], tmp_path: Path) -> PKI:
    def write_ca(name: str) -> str:
        path = tmp_path / f"{name}.pem"
        certificates[name].cert_pem.write_to_path(str(path))
        return str(path)

    def write_leaf(name: str) -> tuple[str, str]:
        cert: trustme.LeafCert = certificates[name]
        certfile, keyfile = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
        certfile.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(keyfile))
        return str(certfile), str(keyfile)

    return PKI(
        write_ca("ca"),
        *write_leaf("server"),
        *write_leaf("client"),
        write_ca("foreign_ca"),
        *write_leaf("foreign"),
    )


def _tls12_ciphers(ctx: ssl.SSLContext) -> list[Any]:
    return [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]


@pytest.mark.parametrize("side", ["server", "client"])
def test_ssl_context_settings(pki: PKI, side: str) -> None:
    ctx = pki.server_context() if side == "server" else pki.client_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.maximum_version in (
        ssl.TLSVersion.MAXIMUM_SUPPORTED,
        ssl.TLSVersion.TLSv1_3,
    )
    assert ctx.options & ssl.OP_NO_COMPRESSION
    ciphers = _tls12_ciphers(ctx)
    assert ciphers
    for cipher in ciphers:
        assert cipher["kea"] == "kx-ecdhe", cipher
        assert cipher["aead"], cipher
    # Only our CA is trusted, not the system's store.
    assert ctx.cert_store_stats()["x509_ca"] == 1
    if side == "server":
        # OpenSSL 1.1+ always behaves so and defines the flag as 0.
        assert ctx.options & ssl.OP_SINGLE_ECDH_USE == ssl.OP_SINGLE_ECDH_USE
        assert not ctx.check_hostname
    else:
        assert ctx.check_hostname


def test_ssl_context_missing_file(pki: PKI, tmp_path: Path) -> None:
    with pytest.raises(OSError):
        util.make_ssl_server_context(
            str(tmp_path / "nope.pem"), pki.server_cert, pki.server_key
        )


@dataclass
class TLSServer:
    """An echo server on 127.0.0.1 whose refusals we can wait for.

    asyncio reports a failed server-side handshake (in debug mode) to the loop's
    exception handler; that is how tests know the server is done with it.
    """

    server: asyncio.Server = field(init=False)
    handled: list[asyncio.Task[Any]] = field(default_factory=list)
    failures: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)

    @property
    def port(self) -> int:
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    def exception_handler(
        self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]
    ) -> None:
        self.failures.put_nowait(context)

    async def refusal(self) -> BaseException:
        """Wait until the server has given up on a connection; return why."""
        async with asyncio.timeout(WAIT):
            context = await self.failures.get()
        exc = context.get("exception")
        assert isinstance(exc, BaseException), context
        return exc

    async def echo(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handled.append(task)
        try:
            writer.write(await reader.readline())
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


@pytest.fixture
async def tls_server(pki: PKI) -> AsyncIterator[TLSServer]:
    loop = asyncio.get_running_loop()
    # Server-side handshake failures are only reported in debug mode.
    loop.set_debug(True)
    previous = loop.get_exception_handler()
    server = TLSServer()
    server.server = await asyncio.start_server(
        server.echo, "127.0.0.1", 0, ssl=pki.server_context()
    )
    loop.set_exception_handler(server.exception_handler)
    try:
        yield server
    finally:
        server.server.close()
        await server.server.wait_closed()
        await asyncio.gather(*server.handled, return_exceptions=True)
        loop.set_exception_handler(previous)
    assert server.failures.empty(), server.failures.get_nowait()


@dataclass
class Outcome:
    """What a client saw: the echo and TLS details, or the error."""

    reply: bytes = b""
    version: str | None = None
    cipher: str | None = None
    error: BaseException | None = None


async def _talk(
    port: int,
    ctx: ssl.SSLContext | None,
    server_hostname: str | None = "localhost",
) -> Outcome:
    outcome = Outcome()
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            ssl=ctx,
            server_hostname=server_hostname if ctx is not None else None,
        )
    except (OSError, ssl.SSLError) as exc:
        outcome.error = exc
        return outcome
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        if ssl_object is not None:
            outcome.version = ssl_object.version()
            outcome.cipher = ssl_object.cipher()[0]
        writer.write(b"ohai\n")
        await writer.drain()
        outcome.reply = await reader.readline()
    except OSError as exc:
        outcome.error = exc
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return outcome


async def test_tls_mutual_authentication(pki: PKI, tls_server: TLSServer) -> None:
    outcome = await _talk(tls_server.port, pki.client_context())
    assert outcome.error is None
    assert outcome.reply == b"ohai\n"
    assert outcome.version in ("TLSv1.2", "TLSv1.3")
    assert len(tls_server.handled) == 1


async def test_tls_ip_address_as_hostname(pki: PKI, tls_server: TLSServer) -> None:
    outcome = await _talk(tls_server.port, pki.client_context(), "127.0.0.1")
    assert outcome.reply == b"ohai\n"


async def test_tls12_uses_forward_secret_aead_cipher(
    pki: PKI, tls_server: TLSServer
) -> None:
    ctx = pki.client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    outcome = await _talk(tls_server.port, ctx)
    assert outcome.reply == b"ohai\n"
    assert outcome.version == "TLSv1.2"
    assert outcome.cipher is not None
    assert outcome.cipher.startswith("ECDHE-")
    assert "-GCM-" in outcome.cipher or "CHACHA20" in outcome.cipher


def _client_context_without_certificate(cafile: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile)
    return ctx


@dataclass
class Refusal:
    client_error: BaseException | None
    server_error: BaseException

    def server_reason(self) -> str | None:
        assert isinstance(self.server_error, ssl.SSLError), self.server_error
        return self.server_error.reason


async def _assert_refused(
    tls_server: TLSServer, ctx: ssl.SSLContext | None, hostname: str = "localhost"
) -> Refusal:
    """Connect, check that no data flows, and wait until the server gave up."""
    outcome = await _talk(tls_server.port, ctx, hostname)
    # With TLS 1.3 the client may finish its handshake before the server checks
    # the client certificate, so the refusal can also show as a closed stream.
    assert outcome.reply == b""
    server_error = await tls_server.refusal()
    assert tls_server.handled == []
    return Refusal(outcome.error, server_error)


async def test_tls_refuses_client_without_certificate(
    pki: PKI, tls_server: TLSServer
) -> None:
    ctx = _client_context_without_certificate(pki.cafile)
    refusal = await _assert_refused(tls_server, ctx)
    assert refusal.server_reason() == "PEER_DID_NOT_RETURN_A_CERTIFICATE"


async def test_tls_refuses_client_of_foreign_ca(
    pki: PKI, tls_server: TLSServer
) -> None:
    # The client trusts our server, but its own certificate is from elsewhere.
    ctx = util.make_ssl_client_context(pki.cafile, pki.foreign_cert, pki.foreign_key)
    refusal = await _assert_refused(tls_server, ctx)
    assert isinstance(refusal.server_error, ssl.SSLCertVerificationError)


async def test_tls_client_checks_hostname(pki: PKI, tls_server: TLSServer) -> None:
    refusal = await _assert_refused(
        tls_server, pki.client_context(), "elsewhere.aiomas.test"
    )
    assert isinstance(refusal.client_error, ssl.SSLCertVerificationError)
    assert "elsewhere.aiomas.test" in str(refusal.client_error)


async def test_tls_client_checks_server_ca(pki: PKI, tls_server: TLSServer) -> None:
    # A client of the foreign PKI does not trust our server.
    ctx = util.make_ssl_client_context(
        pki.foreign_cafile, pki.foreign_cert, pki.foreign_key
    )
    refusal = await _assert_refused(tls_server, ctx)
    assert isinstance(refusal.client_error, ssl.SSLCertVerificationError)


async def test_tls_refuses_plain_tcp_client(tls_server: TLSServer) -> None:
    refusal = await _assert_refused(tls_server, None)
    assert refusal.server_reason() is not None


@pytest.mark.parametrize(
    "ciphers",
    [
        pytest.param("ECDHE+AES:!AESGCM:!AESCCM", id="cbc"),
        pytest.param("kRSA+AESGCM", id="no-forward-secrecy"),
    ],
)
async def test_tls12_refuses_weak_ciphers(
    pki: PKI, tls_server: TLSServer, ciphers: str
) -> None:
    ctx = pki.client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.set_ciphers(ciphers)
    except ssl.SSLError:
        pytest.skip(f"the local OpenSSL offers no {ciphers!r} ciphers at all")
    refusal = await _assert_refused(tls_server, ctx)
    assert refusal.server_reason() == "NO_SHARED_CIPHER"


def _tls11_client_context(cafile: str) -> ssl.SSLContext:
    """A client that speaks TLS 1.1 only, or skip if OpenSSL cannot make one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        # OpenSSL 3 allows TLS < 1.2 only at security level 0.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError) as exc:
        pytest.skip(f"the local OpenSSL cannot make a TLS 1.1 client: {exc}")
    # Check offline that it really sends a TLS 1.1 ClientHello.
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    probe = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        probe.do_handshake()
    except ssl.SSLWantReadError:
        pass
    except ssl.SSLError as exc:
        pytest.skip(f"the local OpenSSL cannot make a TLS 1.1 client: {exc}")
    if not outgoing.pending:
        pytest.skip("the local OpenSSL sends no TLS 1.1 ClientHello")
    return ctx


async def test_tls_refuses_tls11_client(pki: PKI, tls_server: TLSServer) -> None:
    ctx = _tls11_client_context(pki.cafile)
    refusal = await _assert_refused(tls_server, ctx)
    assert refusal.server_reason() == "UNSUPPORTED_PROTOCOL"


# --- arrow_serializer() --------------------------------------------------------------


def test_arrow_serializer_round_trip() -> None:
    cls, serialize, deserialize = util.arrow_serializer()
    assert cls is arrow.Arrow
    date = arrow.get("2016-05-09T13:37:42.123456+05:30")
    text = serialize(date)
    assert text == "2016-05-09T13:37:42.123456+05:30" == str(date)
    back = deserialize(json.loads(json.dumps(text)))
    assert isinstance(back, arrow.Arrow)
    assert back == date
    assert back.utcoffset() == datetime.timedelta(hours=5, minutes=30)


def test_arrow_serializer_rejects_non_strings() -> None:
    _, _, deserialize = util.arrow_serializer()
    with pytest.raises(TypeError):
        deserialize(1462801062)  # type: ignore[arg-type]


_offsets = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(
    lambda minutes: datetime.timezone(datetime.timedelta(minutes=minutes))
)


@given(st.datetimes(timezones=_offsets))
def test_arrow_serializer_keeps_instant_and_offset(moment: datetime.datetime) -> None:
    _, serialize, deserialize = util.arrow_serializer()
    date = arrow.Arrow.fromdatetime(moment)
    back = deserialize(serialize(date))
    assert back == date
    assert back.utcoffset() == date.utcoffset()


def test_loop_factory_names_the_loops() -> None:
    import uvloop

    assert util.loop_factory("asyncio") is None
    assert util.loop_factory("uvloop") is uvloop.new_event_loop
    with pytest.raises(ValueError, match="unknown event loop 'trio'"):
        util.loop_factory("trio")


def test_loop_factory_says_how_to_install_uvloop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # (import fails)
    with pytest.raises(ImportError, match=r"pip install 'aiomas\[uvloop\]'"):
        util.loop_factory("uvloop")
