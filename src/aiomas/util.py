"""Small helpers: running the event loop, background tasks, TLS contexts and more.

This is the lowest layer of aiomas next to :mod:`aiomas.exceptions`; it imports
nothing else from aiomas, so every other module may use it.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import ssl
import warnings
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, TypeVar, cast, overload

import arrow

__all__ = [
    "arrow_serializer",
    "create_task",
    "get_loop",
    "loop_factory",
    "make_ssl_client_context",
    "make_ssl_server_context",
    "obj_from_str",
    "run",
]

_T = TypeVar("_T")
_FutureT = TypeVar("_FutureT", bound="asyncio.Future[Any]")

# Cipher suites for TLS 1.2: ephemeral ECDH (forward secrecy) with an AEAD cipher.
# TLS 1.3 suites are configured separately by OpenSSL and all meet this bar.
_TLS12_CIPHERS: Final = "ECDHE+AESGCM:ECDHE+CHACHA20"

# asyncio only keeps weak references to tasks, so a fire-and-forget task that no
# one else references can be garbage collected while it waits.  create_task()
# keeps its tasks here until they are done.
_background_tasks: set[asyncio.Future[Any]] = set()


LOOPS: Final = ("asyncio", "uvloop")
"""The event loops that :func:`loop_factory` knows by name."""


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """Return the factory of the event loop *name* (one of :data:`LOOPS`) for
    :class:`asyncio.Runner` (``None`` for asyncio's default loop).

    Raises:
        ValueError: if *name* is not a loop of :data:`LOOPS`.
        ImportError: if it is ``"uvloop"`` and uvloop is not installed (the
            message says how to install it).
    """
    if name == "asyncio":
        return None
    if name != "uvloop":
        raise ValueError(f"unknown event loop {name!r}: expected one of {LOOPS}")
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        raise ImportError(
            "uvloop is not installed: pip install 'aiomas[uvloop]'"
        ) from None
    return cast(Callable[[], asyncio.AbstractEventLoop], uvloop.new_event_loop)


def get_loop() -> asyncio.AbstractEventLoop:
    """Return the event loop of the current thread, creating it if needed.

    This is the running loop if there is one, else the loop set for this thread
    with :func:`asyncio.set_event_loop`.  If no loop is set, or the one set is
    closed, a new loop is made with :func:`asyncio.new_event_loop` (so an event
    loop policy such as uvloop's is respected) and set for this thread, so that
    later calls (and plain asyncio calls like :func:`asyncio.ensure_future`) see
    the same loop.  Unlike :func:`asyncio.get_event_loop`, this never emits a
    :class:`DeprecationWarning`.
    """
    with warnings.catch_warnings():
        # Python 3.12 and 3.13 warn when they make the main thread's loop
        # implicitly, yet that loop (made and set by the policy, just like below)
        # is the one we want.  The filter is narrow because warning filters are
        # process-wide while this block runs.
        warnings.filterwarnings(
            "ignore",
            message="There is no current event loop",
            category=DeprecationWarning,
        )
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_event_loop()
        except RuntimeError:
            # No loop set (Python 3.14+, or a thread other than the main one).
            loop = None
    if loop is None or loop.is_closed():
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
    return loop


@overload
def run(until: None = None) -> None: ...


@overload
def run(until: Awaitable[_T]) -> _T: ...


def run(until: Awaitable[_T] | None = None) -> _T | None:
    """Run this thread's event loop forever, or until *until* is done.

    Unlike :func:`asyncio.run`, the loop (see :func:`get_loop`) is neither new
    nor closed afterwards: servers, tasks and futures made in one call live on in
    the next.

    Args:
        until: A coroutine, task, future or other awaitable.  ``None`` runs the
            loop until :meth:`~asyncio.AbstractEventLoop.stop` is called.

    Returns:
        The result of *until* (``None`` if it is ``None``).

    Raises:
        RuntimeError: If an event loop is already running in this thread (a
            coroutine passed as *until* is closed, since it can never run then).
        BaseException: Whatever *until* raises.
    """
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        if inspect.iscoroutine(until):
            # Spare the caller a "coroutine was never awaited" warning on top.
            until.close()
        raise RuntimeError(
            f"aiomas.run() cannot be called while an event loop is running in "
            f"this thread ({running!r}); use 'await' instead"
        )
    loop = get_loop()
    if until is None:
        loop.run_forever()
        return None
    return loop.run_until_complete(until)


def run_blocking(coro: Coroutine[Any, Any, _T], instead: str) -> _T:
    """Run *coro* with :func:`run`: the blocking form of an ``as_coro`` API.

    Args:
        coro: The coroutine that does the work of the API.
        instead: The call to use inside a coroutine, for the error message,
            e.g. ``'await Container.create(addr, as_coro=True)'``.

    Returns:
        The result of *coro*.

    Raises:
        RuntimeError: If an event loop is already running in this thread (the
            API was called inside a coroutine); *coro* is closed, so that no
            "coroutine was never awaited" warning follows.
    """
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return run(coro)
    coro.close()
    # The caller may well have written "await" already and never called
    # aiomas.run(): what is missing is as_coro=True, so that is what we say.
    raise RuntimeError(
        f"Without as_coro=True, this call runs the event loop itself, but one is "
        f"already running in this thread ({running!r}); inside a coroutine, pass "
        f"as_coro=True and await the result: {instead}"
    )


@overload
def create_task(
    coro_or_future: _FutureT,
    *,
    ignore_cancel: bool = True,
    loop: asyncio.AbstractEventLoop | None = None,
) -> _FutureT: ...


@overload
def create_task(
    coro_or_future: Coroutine[Any, Any, _T],
    *,
    ignore_cancel: bool = True,
    loop: asyncio.AbstractEventLoop | None = None,
) -> asyncio.Task[_T]: ...


@overload
def create_task(
    coro_or_future: Awaitable[_T],
    *,
    ignore_cancel: bool = True,
    loop: asyncio.AbstractEventLoop | None = None,
) -> asyncio.Future[_T]: ...


def create_task(
    coro_or_future: Awaitable[Any],
    *,
    ignore_cancel: bool = True,
    loop: asyncio.AbstractEventLoop | None = None,
) -> asyncio.Future[Any]:
    """Run *coro_or_future* in the background and report its failure at once.

    Like :func:`asyncio.ensure_future`: a coroutine (or other awaitable) becomes an
    :class:`asyncio.Task`, a future is returned as it is.  In addition:

    - A task is strongly referenced until it is done, so it cannot be garbage
      collected while it runs even if the caller drops it.
    - When it ends with an exception, the exception is passed to the loop's
      exception handler (:meth:`~asyncio.AbstractEventLoop.call_exception_handler`)
      right away, instead of being logged only when the task is garbage collected
      (or never).  Awaiting the task still raises the exception.
      :class:`KeyboardInterrupt` and :class:`SystemExit` are not reported, as
      asyncio already raises them out of the event loop.

    Args:
        coro_or_future: The coroutine, future or awaitable to run.
        ignore_cancel: If true, cancellation is not reported; else a
            :class:`asyncio.CancelledError` is reported like any other exception.
        loop: The loop to run on; ``None`` means the running loop or, if none is
            running, :func:`get_loop`.

    Returns:
        The task (or the future itself).
    """
    if loop is None:
        loop = get_loop()
    future = asyncio.ensure_future(coro_or_future, loop=loop)
    if isinstance(future, asyncio.Task):
        _background_tasks.add(future)
    future.add_done_callback(_make_reporter(ignore_cancel))
    return future


def _make_reporter(ignore_cancel: bool) -> Callable[[asyncio.Future[Any]], None]:
    """Return the done callback that create_task() adds to its futures."""

    def report(future: asyncio.Future[Any]) -> None:
        # Before any early return: this ends create_task()'s strong reference.
        _background_tasks.discard(future)
        exc: BaseException | None
        if future.cancelled():
            if ignore_cancel:
                return
            try:
                future.result()  # raises the CancelledError with its message
            except asyncio.CancelledError as cancelled:
                exc = cancelled
            what = "was cancelled"
        else:
            # Fetching the exception also marks it as retrieved, so asyncio does
            # not log it a second time when the future is garbage collected.
            exc = future.exception()
            if exc is None or isinstance(exc, KeyboardInterrupt | SystemExit):
                # asyncio already re-raises these two out of the event loop.
                return
            what = f"failed with {type(exc).__name__}"
        if isinstance(future, asyncio.Task):
            key, subject = "task", f"Background task {future.get_name()!r}"
        else:
            key, subject = "future", "Background future"
        future.get_loop().call_exception_handler(
            {"message": f"{subject} {what}", "exception": exc, key: future}
        )

    return report


def obj_from_str(obj_path: str) -> Any:
    """Return the object that *obj_path* names.

    The format is ``module:object`` where *module* is a (possibly dotted) module
    name and *object* a dotted attribute path in it, for example
    ``'package.module:Class.method'``.  The module is imported if necessary.

    Raises:
        ValueError: If *obj_path* is malformed: not exactly one ``:``, or an empty
            module or object part or path component.
        ImportError: If the module cannot be imported.
        AttributeError: If an attribute along the object path does not exist.
    """
    parts = obj_path.split(":")
    if len(parts) != 2:
        raise ValueError(
            f"Malformed object path {obj_path!r}: expected exactly one ':' as in "
            f"'package.module:Class.attr'"
        )
    mod_name, qualname = parts
    for part, what in ((mod_name, "module"), (qualname, "object")):
        if not all(part.split(".")):
            raise ValueError(
                f"Malformed object path {obj_path!r}: empty name in {what} part "
                f"{part!r}"
            )
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as exc:
        error = (
            ModuleNotFoundError if isinstance(exc, ModuleNotFoundError) else ImportError
        )
        raise error(
            f"Cannot import module {mod_name!r} of {obj_path!r}: {exc}",
            name=exc.name,
            path=exc.path,
        ) from exc
    resolved: list[str] = []
    for attr in qualname.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError as exc:
            owner = f"{mod_name}:{'.'.join(resolved)}" if resolved else mod_name
            raise AttributeError(
                f"Cannot resolve {obj_path!r}: {owner!r} has no attribute {attr!r}",
                name=attr,
                obj=obj,
            ) from exc
        resolved.append(attr)
    return obj


def _base_context(
    server_side: bool,
    cafile: str | os.PathLike[str],
    certfile: str | os.PathLike[str],
    keyfile: str | os.PathLike[str],
) -> ssl.SSLContext:
    """The settings that servers and clients share."""
    ctx = ssl.SSLContext(
        ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION
    # A plain SSLContext (unlike ssl.create_default_context()) does not load the
    # system's CAs: the CA in cafile is the only one trusted.
    ctx.load_verify_locations(cafile=cafile)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(certfile=certfile, keyfile=keyfile)
    return ctx


def make_ssl_server_context(
    cafile: str | os.PathLike[str],
    certfile: str | os.PathLike[str],
    keyfile: str | os.PathLike[str],
) -> ssl.SSLContext:
    """Return an :class:`ssl.SSLContext` for a server socket.

    The server authenticates itself with the certificate in *certfile* and the
    private key in *keyfile* (both PEM).  Clients must authenticate, too, with a
    certificate issued by the CA in *cafile*, the only CA trusted.

    TLS 1.2 is the minimum and TLS 1.3 is allowed; TLS 1.2 connections use only
    forward-secret AEAD ciphers (ECDHE with AES-GCM or ChaCha20-Poly1305).  ECDH
    keys are not reused across sessions and compression is disabled.

    Raises:
        OSError: If a file cannot be read (:class:`ssl.SSLError` if it is not a
            valid certificate or key).
    """
    ctx = _base_context(True, cafile, certfile, keyfile)
    ctx.options |= ssl.OP_SINGLE_ECDH_USE
    return ctx


def make_ssl_client_context(
    cafile: str | os.PathLike[str],
    certfile: str | os.PathLike[str],
    keyfile: str | os.PathLike[str],
) -> ssl.SSLContext:
    """Return an :class:`ssl.SSLContext` for a client socket.

    The server's certificate must be issued by the CA in *cafile* (the only CA
    trusted) and match the host name connected to.  The client authenticates
    itself with the certificate in *certfile* and the private key in *keyfile*
    (both PEM).  Protocol versions and ciphers are as in
    :func:`make_ssl_server_context`.

    Raises:
        OSError: If a file cannot be read (:class:`ssl.SSLError` if it is not a
            valid certificate or key).
    """
    ctx = _base_context(False, cafile, certfile, keyfile)
    ctx.check_hostname = True
    return ctx


def _serialize_arrow(date: arrow.Arrow) -> str:
    return date.isoformat()


def _deserialize_arrow(value: str) -> arrow.Arrow:
    if not isinstance(value, str):
        # arrow.get() would take a number for a timestamp; the wire holds text.
        raise TypeError(f"Expected an ISO 8601 string for an Arrow date: {value!r}")
    return arrow.get(value)


def arrow_serializer() -> tuple[
    type[arrow.Arrow], Callable[[arrow.Arrow], str], Callable[[str], arrow.Arrow]
]:
    """Return a serializer for :class:`arrow.Arrow` dates.

    The return value is an argument tuple for
    :meth:`aiomas.codecs.Codec.add_serializer`.  A date travels as its ISO 8601
    string (``Arrow.isoformat()``, the same as ``str(date)``); the instant and the
    UTC offset survive the round trip, a time zone's name does not.
    """
    return arrow.Arrow, _serialize_arrow, _deserialize_arrow
