"""What the fuzz targets in this directory share.

- :data:`LOOP`: the one event loop every target runs its inputs on;
- :class:`FakeTransport`: a transport without a socket that keeps what the
  protocol writes, so that a target can feed a
  :class:`~aiomas.channel.ChannelProtocol` bytes and read its answers;
- :func:`split_stream` and :func:`feed`: cut a byte stream into chunks and hand
  them to a protocol the way a socket transport would;
- :class:`HiddenErrors`: errors that aiomas does not raise but reports to the
  event loop's exception handler or logs at ERROR level (a task that failed
  unseen, a callback that raised); a target fails on them as on an exception;
- :func:`fuzz`: runs a target with atheris;
- :class:`Point`: the user class whose serializer the targets add.

Import it after ``atheris.instrument_imports()`` has imported aiomas, or inside
that block, so that aiomas is instrumented.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

import atheris

import aiomas
from aiomas.channel import ChannelProtocol

LOOP = asyncio.new_event_loop()
asyncio.set_event_loop(LOOP)

# Chunks are 1 to this many bytes long: small enough that frame headers and
# payloads are split in every possible place.
MAX_CHUNK_SIZE = 64


class FakeTransport(asyncio.Transport):
    """A transport that keeps what the protocol writes and reads nothing.

    ``closed`` is set by ``close()`` and ``abort()``, ``aborted`` only by
    ``abort()`` (aiomas aborts a connection whose peer broke the protocol).
    """

    def __init__(self, peername: Any = ("fuzzer", 1)) -> None:
        super().__init__()
        self.peername = peername
        self.written = bytearray()
        self.closed = False
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peername if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True
        self.aborted = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def split_stream(data: bytes) -> list[bytes]:
    """Cut ``data[1:]`` into chunks of ``data[0] % 64 + 1`` bytes (the last one
    may be shorter); no chunks for empty *data*."""
    if not data:
        return []
    size = data[0] % MAX_CHUNK_SIZE + 1
    stream = data[1:]
    return [stream[i : i + size] for i in range(0, len(stream), size)]


def feed(
    protocol: ChannelProtocol, transport: FakeTransport, chunks: Iterable[bytes]
) -> None:
    """Hand *chunks* to *protocol* as a socket transport does (through
    ``get_buffer()`` and ``buffer_updated()``), until it closes the transport."""
    for chunk in chunks:
        while chunk and not transport.closed:
            buffer = protocol.get_buffer(len(chunk))
            n = min(len(buffer), len(chunk))
            buffer[:n] = chunk[:n]
            protocol.buffer_updated(n)
            chunk = chunk[n:]


async def settle(rounds: int = 8) -> None:
    """Let the loop run callbacks and tasks for a few rounds (e.g. exposed
    coroutines answering calls, service tasks ending after a lost connection)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class HiddenErrors(logging.Handler):
    """Collects what the loop's exception handler gets and the ERROR records of
    the ``aiomas`` loggers.

    Warnings are not collected: aiomas logs bad input from a peer as a warning,
    which is what a fuzzer sends all the time.
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.found: list[str] = []

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Collect from *loop* and the ``aiomas`` loggers (which then print
        nothing)."""
        loop.set_exception_handler(self._loop_error)
        aiomas_logger = logging.getLogger("aiomas")
        aiomas_logger.setLevel(logging.ERROR)
        aiomas_logger.propagate = False
        aiomas_logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.name} logged {record.levelname}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            text += f" ({record.exc_info[1]!r})"
        self.found.append(text)

    def _loop_error(
        self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]
    ) -> None:
        exception = context.get("exception")
        self.found.append(f"loop error: {context.get('message')} ({exception!r})")

    def check(self) -> None:
        """Raise AssertionError if anything was collected (and forget it)."""
        found, self.found = self.found, []
        assert not found, "hidden errors: " + "; ".join(found)


HIDDEN_ERRORS = HiddenErrors()
HIDDEN_ERRORS.install(LOOP)


def fuzz(test_one_input: Callable[[bytes], None]) -> None:
    """Run *test_one_input* with atheris, with the command line's options."""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


@aiomas.codecs.serializable
class Point:
    """A user class that travels as ``{"__type__": [1, {"x": x, "y": y}]}`` in a
    container (Arrow dates are type id 0)."""

    def __init__(self, x: Any, y: Any) -> None:
        self.x = x
        self.y = y
