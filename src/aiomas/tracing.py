"""Message traces: what a run's connections carried, across processes.

When tracing is on, every request, reply, failure, cancel, timeout and
connection event of a traced connection becomes a *record*, a dict written to
a JSON Lines file per process (``<directory>/<process token>.jsonl``) or
handed to a sink of yours.  Records carry a trace id, the id of the record
that caused them and a Lamport counter; over connections that agreed to the
wire extension's feature ``"trace"`` these travel with each request, so the
files of several processes merge (:func:`read`) into one causally ordered
run.  The format is in :doc:`/tracing`.

Turn it on for the whole process with :func:`enable` or the environment
variable ``AIOMAS_TRACE=<directory>``, for one container with
``Container.create(..., trace=...)``, or for one connection with
``trace=`` of :func:`aiomas.rpc.open_connection` and friends.  When it is off,
a call costs one attribute check more.

This module sits below :mod:`aiomas.channel`: it knows the wire constants and
asyncio, nothing else.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import itertools
import json
import logging
import math
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Final, TypeAlias

from aiomas.deadlines import current_deadline
from aiomas.protocol import EXTENSIONS_PATH

__all__ = [
    "ENV_VAR",
    "FORMAT",
    "RECORD_FIELDS",
    "VERSION",
    "Sink",
    "TraceFormatError",
    "TraceTarget",
    "Tracer",
    "active",
    "as_tracer",
    "disable",
    "enable",
    "process_token",
    "read",
    "read_headers",
    "scope",
]

FORMAT: Final = "aiomas-trace"
"""The ``"format"`` of a trace file's header line."""

VERSION: Final = 1
"""The version of the record format this module writes and reads."""

RECORD_FIELDS: Final = (
    "id",
    "ev",
    "type",
    "msg",
    "conn",
    "trace",
    "cause",
    "lamport",
    "wall",
    "clock",
    "local",
    "peer",
    "path",
    "size",
    "outcome",
    "args",
)
"""The keys of a record of format version 1 (``"args"`` only in records of
a tracer made with ``args=True``): see the record format in :doc:`/tracing`."""

ENV_VAR: Final = "AIOMAS_TRACE"
"""The environment variable that turns tracing on for a whole process (its
value is the directory of the trace files)."""

ARGS_LIMIT: Final = 200
"""Characters of ``repr()`` kept in a record's ``"args"``."""

Sink: TypeAlias = Callable[[dict[str, Any]], object]
"""A callable that takes each record (a dict)."""

logger = logging.getLogger(__name__)

_token = secrets.token_hex(6)
_ids = itertools.count(1)
_connections = itertools.count(1)
_lamport = 0


def process_token() -> str:
    """The random hex token of this process: the prefix of its record ids and
    the name of its trace file."""
    return _token


def _next_id() -> tuple[str, int]:
    """A new record id and the Lamport counter that goes with it."""
    global _lamport
    _lamport += 1
    return f"{_token}:{next(_ids)}", _lamport


def _merge_lamport(received: int) -> None:
    """A peer's counter arrived: ours goes beyond it (the +1 is the record's
    own, see :func:`_next_id`)."""
    global _lamport
    _lamport = max(_lamport, received)


def header() -> dict[str, Any]:
    """The header line of this process' trace file."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "process": _token,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "argv": list(sys.argv),
        "started": _started,
    }


_started: Final = time.time()


class _FileSink:
    """Appends records to ``<directory>/<process token>.jsonl``: the header
    first; flushed once per event loop iteration (at once without a loop)
    and at exit."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / f"{_token}.jsonl"
        self._file: IO[str] | None = None
        # The loop a flush is scheduled on: a loop that stopped (or closed)
        # before it ran the flush does not keep the next loop from flushing.
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def __call__(self, record: dict[str, Any]) -> None:
        line = _encode(record) + "\n"
        with self._lock:
            file = self._file
            if file is None:
                self.path = self.directory / f"{_token}.jsonl"  # (after a fork)
                self.directory.mkdir(parents=True, exist_ok=True)
                file = self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
                file.write(json.dumps(header(), separators=(",", ":")) + "\n")
                atexit.register(self.close)
            file.write(line)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._flush_loop is loop:
            return
        self._flush_loop = loop
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_loop = None
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def forget_file(self) -> None:
        """In a forked child: close the parent's file (flushed before the
        fork) and start a file of this process at the next record."""
        self._lock = threading.Lock()
        self._flush_loop = None
        if self._file is not None:
            self._file.close()
            self._file = None


# (Records hold plain values; repr() is for a sink's odd one out.)
_encode = json.JSONEncoder(separators=(",", ":"), default=repr).encode

# One file sink per directory: tracers of one process share its file.
_file_sinks: dict[Path, _FileSink] = {}


def _before_fork() -> None:
    # The child must not write the parent's buffered records a second time.
    for sink in list(_file_sinks.values()):
        sink.flush()


def _after_fork_in_child() -> None:
    # A process of its own: its own token (record ids, file), its own files.
    global _token, _ids, _connections
    _token = secrets.token_hex(6)
    _ids = itertools.count(1)
    _connections = itertools.count(1)
    for sink in list(_file_sinks.values()):
        sink.forget_file()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def _drop(record: dict[str, Any]) -> None:
    pass


class Tracer:
    """Where records go.

    Args:
        target: A directory (``str`` or path) for this process' trace file,
            a :data:`Sink`, a callable taking each record, or ``None`` (the
            records are dropped: for *otel* alone).
        args: Put ``"args"`` (``repr()`` of a call's arguments and of its
            result, cut to 200 characters) into records.  Off by default:
            traces often leave the machine.
        otel: Also make OpenTelemetry spans (needs ``aiomas[otel]``):
            ``True`` for the global tracer provider, or a ``TracerProvider``.

    Raises:
        TypeError: if *target* is neither a directory, a callable nor ``None``.
        ImportError: for *otel*, if ``opentelemetry-api`` is not installed.
    """

    __slots__ = ("args", "directory", "failed", "otel", "sink")

    def __init__(
        self,
        target: str | os.PathLike[str] | Sink | None,
        *,
        args: bool = False,
        otel: Any = False,
    ) -> None:
        self.args = args
        self.failed = False
        """Whether the sink failed (then this tracer records nothing more:
        see :meth:`write`)."""
        self.directory: Path | None = None
        """The directory of the trace file, or ``None`` for a sink."""
        self.otel: Any = None
        """The maker of OpenTelemetry spans, or ``None``."""
        if otel is not False and otel is not None:
            from aiomas._otel import OtelBridge  # (an optional dependency)

            self.otel = OtelBridge(None if otel is True else otel)
        if target is None:
            self.sink: Sink = _drop
        elif isinstance(target, str | os.PathLike):
            directory = Path(target).absolute()
            sink = _file_sinks.get(directory)
            if sink is None:
                sink = _file_sinks[directory] = _FileSink(directory)
            self.directory = directory
            self.sink = sink
        elif callable(target):
            self.sink = target
        else:
            raise TypeError(
                f"a trace target is a directory or a callable, not {target!r}"
            )

    def __repr__(self) -> str:
        where = self.directory if self.directory is not None else self.sink
        return f"<Tracer to {where!r}>"

    def write(self, record: dict[str, Any]) -> None:
        """Give *record* to the sink.  Tracing never changes what a call or
        a connection does: if the sink raises (say, the trace directory
        cannot be written), the error is logged once and this tracer drops
        every record from then on (:attr:`failed`)."""
        if self.failed:
            return
        try:
            self.sink(record)
        except Exception:
            self.failed = True
            logger.exception(
                "Tracing to %s failed; %r records nothing from now on",
                self.directory if self.directory is not None else self.sink,
                self,
            )

    @property
    def path(self) -> Path | None:
        """This process' trace file (``None`` for a sink)."""
        if self.directory is None:
            return None
        return self.directory / f"{_token}.jsonl"

    def flush(self) -> None:
        """Write buffered records out (file targets)."""
        if isinstance(self.sink, _FileSink):
            self.sink.flush()


_active: Tracer | None = None

TraceTarget: TypeAlias = "Tracer | str | os.PathLike[str] | Sink"
"""What ``trace=`` takes: a :class:`Tracer`, or the target of a new one."""


def as_tracer(target: TraceTarget | None) -> Tracer | None:
    """*target* as a :class:`Tracer` (``None`` stays ``None``).

    Raises:
        TypeError: if *target* is neither a tracer, a directory nor a
            callable.
    """
    if target is None or isinstance(target, Tracer):
        return target
    return Tracer(target)


def active() -> Tracer | None:
    """The process-wide tracer (see :func:`enable`), or ``None``."""
    return _active


# What ENV_VAR was before enable() set it, as ``(value or None,)``; None
# while enable() has set nothing.
_env_before: tuple[str | None] | None = None


def enable(
    target: str | os.PathLike[str] | Sink | None,
    *,
    args: bool = False,
    otel: Any = False,
) -> Tracer:
    """Trace every connection made from now on, in this process.

    For a directory, :data:`ENV_VAR` names it in ``os.environ`` too, so that
    child processes started from now on trace into it (:func:`disable`
    gives the variable back its value from before).

    Args:
        target, args, otel: See :class:`Tracer`.

    Returns:
        The tracer.
    """
    global _active
    _active = tracer = Tracer(target, args=args, otel=otel)
    if tracer.directory is None:
        _restore_environment()
    else:
        _set_environment(str(tracer.directory))
    return tracer


def disable() -> None:
    """Stop tracing connections made from now on (connections traced so far
    go on recording); :data:`ENV_VAR` gets its value from before
    :func:`enable` again (none, if it turned tracing on when aiomas was
    imported), so that child processes started from now on do not trace."""
    global _active
    if _active is not None:
        _active.flush()
    _active = None
    _restore_environment()


def _set_environment(directory: str) -> None:
    global _env_before
    if _env_before is None:
        _env_before = (os.environ.get(ENV_VAR),)
    os.environ[ENV_VAR] = directory


def _restore_environment() -> None:
    global _env_before
    if _env_before is None:
        return
    (before,), _env_before = _env_before, None
    if before is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = before


def child_environment(env: dict[str, str] | None) -> dict[str, str] | None:
    """The environment for a child process that should write into our trace
    directory: *env* (default: ours) with :data:`ENV_VAR` set, or *env* as it
    is if we trace into no directory (or it sets the variable itself)."""
    tracer = _active
    if tracer is None or tracer.directory is None:
        return env
    base = dict(os.environ if env is None else env)
    base.setdefault(ENV_VAR, str(tracer.directory))
    return base


# --- Context: which trace and record the code running now belongs to -------

_Context: TypeAlias = tuple[str | None, str | None, str | None]
# (trace id, id of the record that causes calls made now, acting agent id)
_current: contextvars.ContextVar[_Context | None] = contextvars.ContextVar(
    "aiomas_trace", default=None
)


def _new_trace_id() -> str:
    return secrets.token_hex(8)


@contextlib.contextmanager
def scope(trace_id: str | None = None, *, agent: str | None = None) -> Iterator[str]:
    """Make the calls of the ``with`` block (and of tasks started in it)
    parts of one trace, *trace_id* (default: a new one), made by *agent*
    (an agent id, for the records' ``"local"``).

    Yields:
        The trace id.
    """
    current = _current.get()
    cause = None
    if trace_id is None:
        trace_id = _new_trace_id()
    elif current is not None and current[0] == trace_id:
        cause = current[1]
    if agent is None and current is not None:
        agent = current[2]
    token = _current.set((trace_id, cause, agent))
    try:
        yield trace_id
    finally:
        _current.reset(token)


# --- What a traced connection records -----------------------------------------


def _path_of(content: Any) -> str | None:
    """The RPC path of a request's content, or ``None`` (plain channels)."""
    if type(content) in (list, tuple) and len(content) == 3:
        path = content[0]
        if isinstance(path, str):
            return path
    return None


def agent_of_path(path: str | None) -> str | None:
    """The agent id in a container's RPC path (``"agents/<id>/..."``)."""
    if path is None or not path.startswith("agents/"):
        return None
    return path.split("/", 2)[1] or None


def remote_type(text: str) -> str:
    """The exception type named by the last line of a failure reply's text."""
    for line in reversed(text.strip().splitlines()):
        name = line.split(":", 1)[0].strip()
        if name:
            return name.rsplit(".", 1)[-1]
    return "RemoteException"


def _abbreviated(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # A user's __repr__ must not break the call.
        text = f"<repr failed: {type(exc).__name__}>"
    if len(text) > ARGS_LIMIT:
        text = text[: ARGS_LIMIT - 3] + "..."
    return text


def _valid_trace_meta(value: Any) -> tuple[str, str, int] | None:
    """The ``[trace id, cause id, lamport]`` of a request's ``"trace"``
    metadata, or ``None`` if it is malformed (then it is ignored)."""
    # (MsgPack decodes arrays as tuples.)
    if type(value) not in (list, tuple) or len(value) != 3:
        return None
    trace_id, cause, lamport = value
    if (
        type(trace_id) is not str
        or not 0 < len(trace_id) <= 64
        or type(cause) is not str
        or not 0 < len(cause) <= 128
        or type(lamport) is not int
        or not 0 <= lamport < 2**62
    ):
        return None
    return trace_id, cause, lamport


class Exchange:
    """What a traced connection keeps of a request in flight (its own or
    the peer's): the id of its record, its trace, path and local agent."""

    __slots__ = ("agent", "msg", "path", "record", "span", "trace")

    def __init__(self, record: str, trace: str, path: str | None, agent: str | None):
        self.record = record
        self.trace = trace
        self.path = path
        self.agent = agent
        self.msg: int | None = None
        self.span: Any = None  # its OpenTelemetry span, if any


class ConnectionTrace:
    """The recorder of one connection (made by
    :meth:`aiomas.channel.Channel.start_tracing`; not for users).

    Args:
        tracer: Where its records go.
        local: This end's address (a container's base URL, else the socket's).
        peer: The peer's address.
        clock: A callable giving the container clock's time, or ``None``.
        features: A callable giving the features of the wire extension
            agreed with the peer.
    """

    __slots__ = (
        "calls",
        "clock",
        "conn",
        "features",
        "local",
        "opening",
        "peer",
        "served",
        "tracer",
    )

    def __init__(
        self,
        tracer: Tracer,
        local: str | None,
        peer: str | None,
        clock: Callable[[], float] | None = None,
        features: Callable[[], frozenset[str]] = frozenset,
    ) -> None:
        self.tracer = tracer
        self.local = local
        self.peer = peer
        self.clock = clock
        self.conn = f"{_token}/c{next(_connections)}"
        self.calls: dict[Any, Exchange] = {}  # by the future of the call
        self.served: dict[int, Exchange] = {}  # by message id
        self.features = features
        # The "open" record waits for the first other one (or the close):
        # a container tells its address and clock right after the connection
        # is made.
        self.opening: tuple[str, int, float] | None = None

    def emit(
        self,
        ev: str,
        *,
        record: tuple[str, int] | None = None,
        type_: str | None = None,
        msg: int | None = None,
        trace: str | None = None,
        cause: str | None = None,
        local_agent: str | None = None,
        peer_agent: str | None = None,
        path: str | None = None,
        size: int | None = None,
        outcome: str | None = None,
        args: Any = None,
        with_args: bool = False,
    ) -> str:
        """Make a record and give it to the tracer's sink; return its id."""
        if self.opening is not None:
            self._emit_open()
        rec_id, lamport = _next_id() if record is None else record
        entry = self._entry(rec_id, lamport, time.time(), ev, local_agent, peer_agent)
        entry["type"] = type_
        entry["msg"] = msg
        entry["trace"] = trace
        entry["cause"] = cause
        entry["path"] = path
        entry["size"] = size
        entry["outcome"] = outcome
        if with_args and self.tracer.args:
            entry["args"] = _abbreviated(args)
        self.tracer.write(entry)
        return rec_id

    def _entry(
        self,
        rec_id: str,
        lamport: int,
        wall: float,
        ev: str,
        local_agent: str | None = None,
        peer_agent: str | None = None,
    ) -> dict[str, Any]:
        """A record with all its fields (those of messages ``null``)."""
        clock = self.clock
        return {
            "id": rec_id,
            "ev": ev,
            "type": None,
            "msg": None,
            "conn": self.conn,
            "trace": None,
            "cause": None,
            "lamport": lamport,
            "wall": wall,
            "clock": None if clock is None else clock(),
            "local": {"addr": self.local, "agent": local_agent},
            "peer": {"addr": self.peer, "agent": peer_agent},
            "path": None,
            "size": None,
            "outcome": None,
        }

    # Connection events.

    def opened(self) -> None:
        """The connection is traced from now on (its "open" record is made
        with the next one)."""
        rec_id, lamport = _next_id()
        self.opening = (rec_id, lamport, time.time())

    def _emit_open(self) -> None:
        assert self.opening is not None
        rec_id, lamport, wall = self.opening
        self.opening = None
        self.tracer.write(self._entry(rec_id, lamport, wall, "open"))

    def closed(self, reason: BaseException | None) -> None:
        outcome = None if reason is None else f"error:{type(reason).__name__}"
        otel = self.tracer.otel
        if otel is not None:
            for exchange in (*self.calls.values(), *self.served.values()):
                self._end_span(exchange, outcome or "error:ConnectionResetError")
        self.calls.clear()
        self.served.clear()
        self.emit("close", outcome=outcome)
        if isinstance(self.tracer.sink, _FileSink):
            self.tracer.sink.flush()

    def _emit_of(
        self, ev: str, exchange: Exchange, cause: str | None, **fields: Any
    ) -> str:
        """A record of the request *exchange* or of its end."""
        return self.emit(
            ev,
            msg=exchange.msg,
            trace=exchange.trace,
            cause=cause,
            local_agent=exchange.agent,
            path=exchange.path,
            **fields,
        )

    def _attributes(self, path: str | None) -> dict[str, Any]:
        return {
            "rpc.system": "aiomas",
            "rpc.method": path or "",
            "aiomas.conn": self.conn,
            "aiomas.local": self.local or "",
            "aiomas.peer": self.peer or "",
        }

    def _end_span(self, exchange: Exchange, outcome: str | None) -> None:
        span, exchange.span = exchange.span, None
        if span is not None:
            self.tracer.otel.end(span, outcome)

    # Our requests.

    def start_call(self, content: Any) -> tuple[Exchange, tuple[str, int]] | None:
        """A request is about to leave: its :class:`Exchange`, and the id and
        Lamport counter of its record (``None`` for an extension offer)."""
        path = _path_of(content)
        if path == EXTENSIONS_PATH:
            return None
        context = _current.get()
        record = _next_id()
        if context is None:
            trace, agent = _new_trace_id(), None
        else:
            trace = context[0] or _new_trace_id()
            agent = context[2]
        call = Exchange(record[0], trace, path, agent)
        otel = self.tracer.otel
        if otel is not None:
            call.span = otel.start_client(path, self._attributes(path))
        return call, record

    def trace_meta(self, call: Exchange, record: tuple[str, int]) -> dict[str, Any]:
        """The metadata of the request: ``"trace"`` (and, with spans,
        ``"traceparent"``) if the peer agreed to the feature; else nothing of
        the trace leaves."""
        if "trace" not in self.features():
            return {}
        meta: dict[str, Any] = {"trace": [call.trace, call.record, record[1]]}
        if call.span is not None:
            traceparent = self.tracer.otel.traceparent(call.span)
            if traceparent is not None:
                meta["traceparent"] = traceparent
        return meta

    def call_failed(self, call: Exchange) -> None:
        """The request never left (it could not be encoded or written)."""
        self._end_span(call, "error:not sent")

    def call_sent(
        self,
        call: Exchange,
        record: tuple[str, int],
        future: asyncio.Future[Any],
        msg_id: int,
        size: int | None,
        content: Any,
    ) -> None:
        context = _current.get()
        call.msg = msg_id
        self._emit_of(
            "send",
            call,
            None if context is None else context[1],
            record=record,
            type_="request",
            peer_agent=agent_of_path(call.path),
            size=size,
            args=content[1:] if call.path is not None else content,
            with_args=True,
        )
        if call.span is not None:
            call.span.set_attribute("aiomas.msg", msg_id)
        self.calls[future] = call
        future.add_done_callback(self._call_done)

    def reply_received(
        self,
        future: Any,
        failure: str | None,
        size: int | None,
        content: Any = None,
    ) -> None:
        """The reply to our call *future* arrived (*failure*: its text, for a
        failure)."""
        call = self.calls.pop(future, None)
        if call is not None:
            error = None if failure is None else remote_type(failure)
            self._reply("recv", call, error, size, content)

    def _reply(
        self,
        ev: str,
        exchange: Exchange,
        error: str | None,
        size: int | None,
        content: Any,
    ) -> None:
        """Record the reply to *exchange* (a failure with exception type
        *error*, or a result)."""
        outcome = "result" if error is None else f"error:{error}"
        self._end_span(exchange, outcome)
        received = ev == "recv"
        self._emit_of(
            ev,
            exchange,
            exchange.record,
            type_="result" if error is None else "failure",
            peer_agent=agent_of_path(exchange.path) if received else None,
            size=size,
            outcome=outcome,
            args=content,
            with_args=error is None,
        )

    def _call_done(self, future: asyncio.Future[Any]) -> None:
        call = self.calls.get(future)
        if call is None:
            return  # Its reply was recorded.
        if future.cancelled():
            # (Done callbacks run in the caller's context: its deadline.)
            deadline = current_deadline()
            if deadline is not None and deadline.expired():
                ev, outcome = "timeout", "timeout"
            else:
                ev, outcome = "cancel", "cancelled"
        else:
            error = future.exception()
            if error is None or not isinstance(error, TimeoutError):
                return  # Its reply is still to be recorded, or it never comes.
            ev, outcome = "timeout", "timeout"
        if "cancel" in self.features():
            # The peer is told: no reply comes.
            del self.calls[future]
        self._end_span(call, outcome)
        self._emit_of(
            ev,
            call,
            call.record,
            type_="cancel" if ev == "cancel" else None,
            peer_agent=agent_of_path(call.path),
            outcome=outcome,
        )

    # The peer's requests.

    def request_received(
        self, msg_id: int, content: Any, meta: dict[str, Any] | None, size: int | None
    ) -> Exchange | None:
        """A request arrived: record it; return what serving it needs
        (``None`` for an extension offer)."""
        path = _path_of(content)
        if path == EXTENSIONS_PATH:
            return None
        incoming = None if meta is None else _valid_trace_meta(meta.get("trace"))
        if incoming is None:
            trace, cause = _new_trace_id(), None
        else:
            trace, cause, lamport = incoming
            _merge_lamport(lamport)
        served = Exchange("", trace, path, agent_of_path(path))
        served.msg = msg_id
        served.record = self._emit_of(
            "recv",
            served,
            cause,
            type_="request",
            size=size,
            args=content[1:] if path is not None else content,
            with_args=True,
        )
        otel = self.tracer.otel
        if otel is not None:
            traceparent = None if meta is None else meta.get("traceparent")
            served.span = otel.start_server(path, traceparent, self._attributes(path))
        self.served[msg_id] = served
        return served

    def enter(self, served: Exchange) -> tuple[Any, Any]:
        """Make *served* the cause of the calls made from now on (and its
        span the current one); undo with :meth:`leave`."""
        token = _current.set((served.trace, served.record, served.agent))
        span = served.span
        return token, None if span is None else self.tracer.otel.enter(span)

    def leave(self, tokens: tuple[Any, Any]) -> None:
        """Undo :meth:`enter`."""
        token, otel_token = tokens
        if otel_token is not None:
            self.tracer.otel.leave(otel_token)
        _current.reset(token)

    def answered(
        self,
        msg_id: int,
        failure: BaseException | None,
        size: int | None,
        result: Any = None,
    ) -> None:
        """We answered request *msg_id*."""
        served = self.served.pop(msg_id, None)
        if served is not None:
            error = None if failure is None else type(failure).__name__
            self._reply("send", served, error, size, result)

    def cancel_received(self, msg_id: int) -> None:
        served = self.served.pop(msg_id, None)
        if served is None:
            return
        self._end_span(served, "cancelled")
        self._emit_of(
            "cancel", served, served.record, type_="cancel", outcome="cancelled"
        )


# --- Reading traces ---------------------------------------------------------


class TraceFormatError(ValueError):
    """A file is not a trace of the aiomas format, of a version we read (the
    message names the file and the line)."""


def read_headers(paths: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """The header lines of the trace files *paths* (the first of each).

    Raises:
        TraceFormatError: see :func:`read`.
        OSError: if a file cannot be read.
    """
    return [_read_file(path)[0] for path in paths]


def read(paths: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """Read and merge the trace files *paths* (of one run, from any number of
    processes): all their records, ordered by Lamport counter, then wall
    time (every request after its cause; replies carry no counter, see the
    record format in :doc:`/tracing`).

    Header lines further down a file (files appended to) are skipped, and a
    record id seen twice (a file given twice) is kept once.  A file's last
    line may be cut short (a process that was killed): it is dropped.

    Raises:
        TraceFormatError: if a file has no header of the aiomas format first,
            one of another version, or a line (but a cut last one) that is no
            JSON object with a string ``"id"``.
        OSError: if a file cannot be read.
    """
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for path in paths:
        for record in _read_file(path)[1]:
            if record["id"] not in seen:
                seen.add(record["id"])
                records.append(record)
    records.sort(key=_order)
    return records


def _read_file(
    path: str | os.PathLike[str],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The first header of the trace file *path*, and its records."""
    name = os.fspath(path)
    with open(path, encoding="utf-8") as file:
        lines = file.read().split("\n")
    first: dict[str, Any] | None = None
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            if first is not None and number == len(lines):  # (no newline after it)
                break
            raise TraceFormatError(f"{name}:{number}: not JSON: {exc}") from None
        if not isinstance(item, dict):
            raise TraceFormatError(f"{name}:{number}: not a JSON object")
        if "format" in item:
            _check_header(name, number, item)
            if first is None:
                first = item
        elif first is None:
            raise TraceFormatError(f"{name}:{number}: no aiomas-trace header first")
        elif not isinstance(item.get("id"), str):
            raise TraceFormatError(f"{name}:{number}: record without a string id")
        elif not _numbers_fit(item):
            raise TraceFormatError(
                f"{name}:{number}: lamport, wall or clock is not a number"
            )
        else:
            records.append(item)
    if first is None:
        raise TraceFormatError(f"{name}: empty, no aiomas-trace header")
    return first, records


def _numbers_fit(record: dict[str, Any]) -> bool:
    """Whether the record's ``lamport`` is an int and its ``wall`` and
    ``clock`` are numbers (each may be missing or null)."""
    lamport = record.get("lamport")
    if lamport is not None and type(lamport) is not int:
        return False
    return all(
        value is None or (type(value) in (int, float) and math.isfinite(value))
        for value in (record.get("wall"), record.get("clock"))
    )


def _check_header(name: str, number: int, item: dict[str, Any]) -> None:
    if item.get("format") != FORMAT:
        raise TraceFormatError(f"{name}:{number}: format is not {FORMAT!r}")
    version = item.get("version")
    if type(version) is not int or not 1 <= version <= VERSION:
        raise TraceFormatError(
            f"{name}:{number}: trace format version {version!r}, "
            f"this aiomas reads version {VERSION}"
        )


def _order(record: dict[str, Any]) -> tuple[int, float, str]:
    lamport = record.get("lamport")
    wall = record.get("wall")
    return (
        lamport if type(lamport) is int else 0,
        wall if isinstance(wall, int | float) else 0.0,
        str(record.get("id")),
    )


def _enable_from_environment() -> None:
    global _env_before
    directory = os.environ.get(ENV_VAR)
    if directory:
        # The variable was meant for this process (and the children it
        # starts while tracing): after disable() it is gone.
        _env_before = (None,)
        enable(directory)


_enable_from_environment()
