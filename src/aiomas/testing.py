"""Tools for testing code that speaks the aiomas protocol, without sockets.

aiomas' own tests and fuzz targets use them, and so can yours:

- :func:`connection_pair`, :func:`transfer`, :func:`receive` and
  :func:`sent_messages` drive two sans-I/O cores
  (:class:`aiomas.protocol.Connection`) joined by a fake link: no event loop,
  no transport, h11's way of testing a protocol;
- :class:`FakeTransport` is an :class:`asyncio.Transport` without a socket, for
  an asyncio protocol such as :class:`aiomas.channel.ChannelProtocol`: it
  records what the protocol writes and does, and can fill its write buffer to
  make the protocol pause writing;
- :func:`feed` hands bytes to such a protocol the way a socket transport does;
- :func:`settle` lets the event loop run what is ready;
- :data:`TIME_UNIT` is the scaled unit for the few waits that must take real
  time (set ``AIOMAS_TESTS_TIME_UNIT`` on a slow machine).

Nothing in aiomas imports this module; it imports the layers it drives.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from aiomas.codecs import JSON, Codec
from aiomas.protocol import Connection, Event
from aiomas.wire import FrameReader

__all__ = [
    "DEFAULT_TIME_UNIT",
    "TIME_UNIT",
    "FakeTransport",
    "connection_pair",
    "feed",
    "receive",
    "sent_messages",
    "settle",
    "time_unit",
    "transfer",
]

_Bytes = bytes | bytearray | memoryview

DEFAULT_TIME_UNIT: Final = 0.001
"""The time unit, in seconds, unless ``AIOMAS_TESTS_TIME_UNIT`` says otherwise."""


def time_unit(environ: Mapping[str, str] = os.environ) -> float:
    """Return the time unit that *environ* sets (in seconds).

    ``AIOMAS_TESTS_TIME_UNIT`` (a positive number of seconds) overrides
    :data:`DEFAULT_TIME_UNIT`.

    Raises:
        ValueError: if the variable is set, but not to a positive, finite
            number.
    """
    text = environ.get("AIOMAS_TESTS_TIME_UNIT", "").strip()
    if not text:
        return DEFAULT_TIME_UNIT
    try:
        unit = float(text)
    except ValueError:
        unit = math.nan
    if not 0 < unit < math.inf:
        raise ValueError(
            f"AIOMAS_TESTS_TIME_UNIT must be a positive number of seconds, not {text!r}"
        )
    return unit


TIME_UNIT: Final = time_unit()
"""The unit of the waits that must take real time, in seconds: 1 ms, or what
``AIOMAS_TESTS_TIME_UNIT`` says.

Write such a wait as a multiple of it (``await asyncio.sleep(50 * TIME_UNIT)``
to give a server time to do something it must not do; ``timeout=200 *
TIME_UNIT`` as a bound that a test expects to hit), so that a slow machine can
scale them all at once, e.g. with ``AIOMAS_TESTS_TIME_UNIT=0.005``.  Waits for
time-based code are better not real at all: drive its clock (see
:class:`aiomas.clocks.ExternalClock`).
"""


async def settle(rounds: int = 20) -> None:
    """Let the running loop run its ready callbacks and tasks, and what they
    schedule in turn, for *rounds* iterations.

    It waits for nothing that takes time (a timer, a socket): only for what is
    due now, e.g. tasks answering requests that were fed to a protocol, or
    LocalQueue handing data over.
    """
    for _ in range(rounds):
        await asyncio.sleep(0)


# --- The sans-I/O core ---------------------------------------------------------


def connection_pair(
    codec: type[Codec] = JSON, **kwargs: Any
) -> tuple[Connection, Connection]:
    """Return two cores (:class:`aiomas.protocol.Connection`), each with a new
    *codec* instance and *kwargs* (e.g. ``max_frame_size``); move bytes from
    one to the other with :func:`transfer`."""
    return Connection(codec(), **kwargs), Connection(codec(), **kwargs)


def receive(
    connection: Connection, chunks: Iterable[_Bytes], *, zero_copy: bool = False
) -> list[Event]:
    """Push *chunks* into *connection*; return the events they make.

    With *zero_copy*, the bytes go in through
    :meth:`~aiomas.protocol.Connection.get_buffer` and
    :meth:`~aiomas.protocol.Connection.buffer_updated` (as many buffers as
    they need), as an :class:`asyncio.BufferedProtocol` gets them; otherwise
    through :meth:`~aiomas.protocol.Connection.receive_data`, a chunk at a
    time.
    """
    events: list[Event] = []
    for chunk in chunks:
        if zero_copy:
            view = memoryview(chunk)
            while view:
                nbytes = _copy_into(connection.get_buffer, view)
                events.extend(connection.buffer_updated(nbytes))
                view = view[nbytes:]
        else:
            events.extend(connection.receive_data(chunk))
    return events


def transfer(source: Connection, target: Connection) -> list[Event]:
    """Move what *source* has to send into *target*; return *target*'s
    events."""
    return receive(target, source.data_to_send())


def sent_messages(connection: Connection) -> list[Any]:
    """Take what *connection* has to send and return it decoded: a list of
    ``[msg_type, msg_id, content]`` messages (tuples with MsgPack).

    Raises:
        AssertionError: if the bytes end in a partial frame (the core never
            sends one).
    """
    reader = FrameReader()
    payloads: list[bytes | bytearray] = []
    for chunk in connection.data_to_send():
        payloads.extend(reader.feed(chunk))
    assert reader.buffered == 0, f"{reader.buffered} bytes of a partial frame"
    return [connection.codec.decode(payload) for payload in payloads]


def _copy_into(get_buffer: Callable[[int], Any], data: memoryview) -> int:
    """Copy the start of *data* into the buffer that *get_buffer* returns;
    return how many bytes went in (for ``buffer_updated()``)."""
    buffer = get_buffer(len(data))
    nbytes = min(len(buffer), len(data))
    if not nbytes:
        raise RuntimeError("get_buffer() returned an empty buffer")
    buffer[:nbytes] = data[:nbytes]
    return nbytes


# --- asyncio protocols -----------------------------------------------------------


class FakeTransport(asyncio.Transport):
    """A transport without a socket: it records what its protocol writes and
    does, and reads nothing (give the protocol bytes with :func:`feed`).

    Args:
        protocol: If given, the transport's protocol: its ``connection_made()``
            is called at once, ``pause_writing()`` and ``resume_writing()``
            follow the write buffer, and ``connection_lost()`` follows
            :meth:`close` and :meth:`abort` (see :meth:`lose_connection`).
        peername: What ``get_extra_info("peername")`` returns.
        sockname: What ``get_extra_info("sockname")`` returns.
        extra: More extra info.

    Everything written stays in the write buffer until :meth:`consume` takes
    it, as if the peer read it; but only once write buffer limits are set
    (:meth:`set_write_buffer_limits`, as for any asyncio transport) does a
    full buffer pause the protocol's writing.
    """

    def __init__(
        self,
        protocol: asyncio.BaseProtocol | None = None,
        *,
        peername: Any = ("peer", 1),
        sockname: Any = ("local", 1),
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__({"peername": peername, "sockname": sockname, **(extra or {})})
        self.writes: list[bytes] = []
        """Every ``write()``, in order."""
        self.closed = False
        """Whether :meth:`close`, :meth:`abort` or :meth:`lose_connection` was
        called."""
        self.aborted = False
        """Whether :meth:`abort` was called (aiomas aborts a connection whose
        peer broke the protocol)."""
        self.reading_paused = False
        """Whether the protocol paused reading (:func:`feed` then stops)."""
        self.writing_paused = False
        """Whether the transport told its protocol to pause writing."""
        self.lost = False
        """Whether the protocol's ``connection_lost()`` has been called."""
        self._protocol = protocol
        self._buffered = 0
        self._high: int | None = None
        self._low = 0
        if protocol is not None:
            protocol.connection_made(self)

    @property
    def written(self) -> bytes:
        """All bytes written, joined."""
        return b"".join(self.writes)

    def get_protocol(self) -> asyncio.BaseProtocol:
        if self._protocol is None:
            raise RuntimeError("The transport has no protocol")
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    # --- Writing ---------------------------------------------------------------

    def write(self, data: _Bytes) -> None:
        self.writes.append(bytes(data))
        self._buffered += len(data)
        self._check_pressure()

    def get_write_buffer_size(self) -> int:
        """Bytes written and not yet taken by :meth:`consume`."""
        return self._buffered

    def set_write_buffer_limits(
        self, high: int | None = None, low: int | None = None
    ) -> None:
        """Pause the protocol's writing above *high* buffered bytes, and
        resume it at *low* or fewer (the defaults are asyncio's: 64 KiB, and a
        quarter of *high*)."""
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._check_pressure()

    def consume(self, nbytes: int | None = None) -> None:
        """Let the peer read *nbytes* (all, by default) of the write buffer;
        resume the protocol's writing if the buffer is low enough."""
        taken = self._buffered if nbytes is None else min(nbytes, self._buffered)
        self._buffered -= taken
        self._check_pressure()

    def _check_pressure(self) -> None:
        if self._high is None:
            return
        if not self.writing_paused and self._buffered > self._high:
            self.writing_paused = True
            if self._protocol is not None:
                self._protocol.pause_writing()
        elif self.writing_paused and self._buffered <= self._low:
            self.writing_paused = False
            if self._protocol is not None:
                self._protocol.resume_writing()

    # --- Reading ---------------------------------------------------------------

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False

    def is_reading(self) -> bool:
        return not (self.reading_paused or self.closed)

    # --- The end ---------------------------------------------------------------

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        """Mark the transport closed; its protocol loses the connection soon
        after (in a callback of the running loop), as with a socket."""
        self._close()

    def abort(self) -> None:
        """Like :meth:`close`, and mark it aborted."""
        self.aborted = True
        self._close()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._protocol is not None:
            asyncio.get_running_loop().call_soon(self.lose_connection)

    def lose_connection(self, exc: Exception | None = None) -> None:
        """End the connection now, e.g. as if the network failed (*exc*):
        call the protocol's ``connection_lost(exc)``, unless that happened
        already."""
        self.closed = True
        if self.lost or self._protocol is None:
            return
        self.lost = True
        self._protocol.connection_lost(exc)


def feed(
    protocol: asyncio.Protocol | asyncio.BufferedProtocol,
    transport: FakeTransport,
    chunks: Iterable[_Bytes],
) -> bytes:
    """Hand *chunks* to *protocol* as a socket transport would: through
    ``get_buffer()`` and ``buffer_updated()`` for an
    :class:`asyncio.BufferedProtocol`, else with ``data_received()``.

    It stops when *transport* is closed or its reading is paused (e.g. when
    the protocol found a protocol violation and aborted the connection), and
    returns the bytes it did not hand over (``b""`` if it handed over all).
    """
    remaining = iter(chunks)
    for chunk in remaining:
        view = memoryview(chunk)
        while view and transport.is_reading():
            if isinstance(protocol, asyncio.BufferedProtocol):
                nbytes = _copy_into(protocol.get_buffer, view)
                protocol.buffer_updated(nbytes)
            else:
                nbytes = len(view)
                protocol.data_received(bytes(view))
            view = view[nbytes:]
        if view:
            return bytes(view) + b"".join(bytes(rest) for rest in remaining)
    return b""
