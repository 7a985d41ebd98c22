"""What the fuzz targets in this directory share.

- :data:`LOOP`: the one event loop every target runs its inputs on;
- :func:`split_stream`: cuts a byte stream into chunks, which a target hands
  to a sans-I/O core or, with :func:`aiomas.testing.feed`, to a
  :class:`~aiomas.channel.ChannelProtocol` on an
  :class:`aiomas.testing.FakeTransport`;
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
from collections.abc import Callable
from typing import Any

import atheris

import aiomas

LOOP = asyncio.new_event_loop()
asyncio.set_event_loop(LOOP)

# Chunks are 1 to this many bytes long: small enough that frame headers and
# payloads are split in every possible place.
MAX_CHUNK_SIZE = 64


def split_stream(data: bytes) -> list[bytes]:
    """Cut ``data[1:]`` into chunks of ``data[0] % 64 + 1`` bytes (the last one
    may be shorter); no chunks for empty *data*."""
    if not data:
        return []
    size = data[0] % MAX_CHUNK_SIZE + 1
    stream = data[1:]
    return [stream[i : i + size] for i in range(0, len(stream), size)]


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
