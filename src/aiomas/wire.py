"""The aiomas wire protocol, free of I/O.

A *frame* is a 4-byte big-endian unsigned length followed by that many payload
bytes.  The payload is a codec-encoded list ``[msg_type, msg_id, content]`` where
``msg_type`` is :data:`REQUEST` (0), :data:`RESULT` (1) or :data:`FAILURE` (2) and
``msg_id`` is an integer that the sender of a request chose uniquely for that
connection; a reply carries the id of the request it answers.

This module only turns bytes into frames and frames into bytes
(:class:`FrameReader`, :func:`frame`); the messages inside the frames are
:mod:`aiomas.protocol`'s.  It knows nothing of sockets or transports, so it can be
tested and fuzzed byte by byte.
"""

from __future__ import annotations

import struct
from typing import Final

from aiomas._compiled import mypyc_attr
from aiomas.exceptions import ProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "FAILURE",
    "HEADER_SIZE",
    "MAX_FRAME_SIZE",
    "REQUEST",
    "RESULT",
    "FrameReader",
    "frame",
    "frame_header",
]

REQUEST: Final = 0
"""Message type of a request."""
RESULT: Final = 1
"""Message type of a successful reply."""
FAILURE: Final = 2
"""Message type of a failure reply."""

HEADER: Final = struct.Struct(">L")
# A frame too big for the receive buffer gets a buffer of its exact size if it
# is at most this big.  A bigger one is received into a reused buffer of this
# size first, then into buffers that grow by _BIG_FRAME_GROWTH: so a lying
# header costs at most this, and we never hold more than _BIG_FRAME_GROWTH
# times what the peer really sent.
_BIG_FRAME_START: Final = 256 * 1024
_BIG_FRAME_GROWTH: Final = 8
HEADER_SIZE: Final = HEADER.size

MAX_FRAME_SIZE: Final = 2**32 - 1
"""The largest payload the 4-byte header can announce."""

DEFAULT_MAX_FRAME_SIZE: Final = 64 * 2**20
"""Default limit (64 MiB) for the payload of a received frame.

A peer announcing a larger frame is cut off before anything is allocated for it.
"""

# The reader's limits are checked against this copy, so that tests can lower
# MAX_FRAME_SIZE for senders without affecting readers.
_UINT32_MAX: Final = 2**32 - 1

_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from

# Frames up to this size are gathered in the reader's shared buffer; larger ones
# get a buffer of their own, so that a big payload is received with no extra copy
# and the shared buffer never has to grow.
_DEFAULT_BUFFER_SIZE: Final = 64 * 1024


def frame_header(size: int) -> bytes:
    """Return the 4-byte header announcing a payload of *size* bytes.

    Raises:
        ValueError: if *size* is larger than :data:`MAX_FRAME_SIZE`.
    """
    if size > MAX_FRAME_SIZE:
        raise ValueError(
            f"Message too long: {size} bytes (the maximum is {MAX_FRAME_SIZE})"
        )
    return _pack_header(size)


def frame(payload: bytes) -> bytes:
    """Return *payload* with its length header prepended.

    Raises:
        ValueError: if the payload is longer than :data:`MAX_FRAME_SIZE`.
    """
    return frame_header(len(payload)) + payload


@mypyc_attr(allow_interpreted_subclasses=True)
class FrameReader:
    """Reassembles frames from a byte stream that arrives in arbitrary chunks.

    It has two interfaces: :meth:`feed` takes any bytes-like object; the pair
    :meth:`get_buffer` / :meth:`buffer_updated` lets a transport read straight into
    the reader's buffer (the :class:`asyncio.BufferedProtocol` interface), which
    avoids allocating a buffer per read.

    Args:
        max_frame_size: The largest payload accepted.  A header announcing more
            raises :class:`~aiomas.exceptions.ProtocolError` before anything is
            allocated for it.
        buffer_size: Size of the shared receive buffer.
    """

    __slots__ = (
        "_big",
        "_big_filled",
        "_big_size",
        "_buf",
        "_buffer_size",
        "_end",
        "_idle",
        "_max_frame_size",
        "_stage",
        "_start",
        "_view",
        "error",
    )

    def __init__(
        self,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        buffer_size: int = _DEFAULT_BUFFER_SIZE,
    ) -> None:
        if max_frame_size < 0 or max_frame_size > _UINT32_MAX:
            raise ValueError(
                f"max_frame_size must be in [0, {_UINT32_MAX}], got {max_frame_size}"
            )
        if buffer_size < 2 * HEADER_SIZE:
            raise ValueError(f"buffer_size too small: {buffer_size}")
        self._max_frame_size = max_frame_size
        # Made on the first read: a connection that never sends anything (there
        # may be thousands) costs no buffer.
        self._buffer_size = buffer_size
        self._buf = bytearray()
        self._view = memoryview(self._buf)
        self._start = 0  # first byte not yet parsed
        self._end = 0  # end of the received data in _buf
        # Whether nothing is buffered (no partial frame, no big frame in
        # progress), the shared buffer exists and no error was found: then the
        # next read goes to the start of the shared buffer, and a read that
        # brings exactly one frame needs no bookkeeping at all.
        self._idle = False
        # A frame too big for _buf is received into a buffer of its own, which
        # starts small: a 4-byte header must not make us reserve max_frame_size
        # bytes.
        self._big: bytearray | None = None
        self._big_filled = 0  # bytes of it received
        self._big_size = 0  # the size the header announced
        # Receives the start of frames above _BIG_FRAME_START (made once, when
        # the first such frame arrives, then reused).
        self._stage: bytearray | None = None
        self.error: ProtocolError | None = None
        """The protocol error found right after the frames that the last call
        returned (they came before it in the stream); every later call raises
        it, until :meth:`release`.  ``None`` while the stream is fine.  (Read
        it; don't set it.)"""

    @property
    def max_frame_size(self) -> int:
        """The largest payload this reader accepts."""
        return self._max_frame_size

    def release(self) -> None:
        """Drop all buffers and any partial frame (the stream has ended).

        The reader can be used again afterwards, as if it were new.
        """
        self._buf = bytearray()
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self._idle = False
        self._big = self._stage = None
        self._big_filled = self._big_size = 0
        # The error was the ended stream's; a new stream starts clean.
        self.error = None

    @property
    def buffered(self) -> int:
        """Number of received bytes that belong to a frame not yet complete."""
        if self._big is not None:
            return HEADER_SIZE + self._big_filled
        return self._end - self._start

    @property
    def reserved(self) -> int:
        """Number of bytes held in receive buffers: the shared one (none until
        the first read), the reused first slice of big frames (once one came)
        and the buffer of a big frame in progress."""
        big, stage = self._big, self._stage
        held = len(self._buf) + (0 if stage is None else len(stage))
        return held if big is None or big is stage else held + len(big)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Return a writable buffer for the next bytes of the stream.

        After writing *n* bytes into it, call :meth:`buffer_updated` with *n*.
        The buffer is never empty.
        """
        if self._idle:
            return self._view  # (The common case: nothing is buffered.)
        return self._next_buffer()

    def _next_buffer(self) -> memoryview:
        big = self._big
        if big is not None:
            filled = self._big_filled
            if filled == len(big):
                # Grow by a factor of 8 (not to the announced size at once), so
                # that we never hold more than 8 times what the peer really
                # sent; most frames need one step.  A new buffer, not a resize:
                # the transport may still hold a view of the old one.
                grown = bytearray(min(self._big_size, _BIG_FRAME_GROWTH * filled))
                grown[:filled] = big
                self._big = big = grown
            return memoryview(big)[filled:]
        start, end = self._start, self._end
        if start == end:
            self._start = self._end = 0
            if not self._buf:
                self._buf = bytearray(self._buffer_size)
                self._view = memoryview(self._buf)
            self._idle = self.error is None
            return self._view
        size = len(self._buf)
        if start and size - end < size // 2:
            # Move the partial frame to the front.  Doing it here rather than after
            # parsing keeps the move to one per read and never shifts bytes under
            # a payload that is still being decoded.
            remaining = end - start
            self._view[:remaining] = self._view[start:end]
            self._start, self._end = 0, remaining
            return self._view[remaining:]
        return self._view[end:]

    def buffer_updated(self, nbytes: int) -> list[bytes | bytearray]:
        """Account for *nbytes* written into the last :meth:`get_buffer` buffer.

        Returns:
            The payloads of all frames completed by these bytes, in order.  If
            a bad header follows them, :attr:`error` tells.

        Raises:
            ProtocolError: if a frame header announces more than
                ``max_frame_size`` bytes (and no complete frame comes before
                it), or an earlier call found one.  The reader is unusable
                afterwards.
        """
        if self._idle:
            # The bytes are at the start of the shared buffer.
            if nbytes > HEADER_SIZE:
                # Most reads bring exactly one frame: nothing changes.
                (size,) = _unpack_header(self._buf)
                if size + HEADER_SIZE == nbytes and size <= self._max_frame_size:
                    return [bytes(self._view[HEADER_SIZE:nbytes])]
            self._idle = False
            self._end = nbytes
            return self._parse()
        if self.error is not None:
            raise self.error
        big = self._big
        if big is not None:
            self._big_filled += nbytes
            if self._big_filled < self._big_size:
                return []
            self._big = None
            self._idle = True  # (The shared buffer was emptied for it.)
            return [big]
        end = self._end + nbytes
        start = self._start
        if end - start > HEADER_SIZE:
            # Most reads bring exactly one frame: cut it out without the loop.
            (size,) = _unpack_header(self._buf, start)
            if start + HEADER_SIZE + size == end and size <= self._max_frame_size:
                self._start = self._end = 0
                self._idle = True
                return [bytes(self._view[start + HEADER_SIZE : end])]
        self._end = end
        return self._parse()

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes | bytearray]:
        """Add *data* to the stream and return the payloads of completed frames.

        Raises:
            ProtocolError: see :meth:`buffer_updated`.
        """
        if self.error is not None:
            raise self.error
        payloads: list[bytes | bytearray] = []
        source = memoryview(data).cast("B")
        pos, total = 0, len(source)
        while pos < total and self.error is None:
            target = self.get_buffer()
            n = min(len(target), total - pos)
            target[:n] = source[pos : pos + n]
            pos += n
            try:
                payloads.extend(self.buffer_updated(n))
            except ProtocolError:
                if not payloads:
                    raise
                break  # (self.error tells the caller, after these payloads)
        return payloads

    def _parse(self) -> list[bytes | bytearray]:
        payloads: list[bytes | bytearray] = []
        buf = self._buf
        start, end = self._start, self._end
        while end - start >= HEADER_SIZE:
            (size,) = _unpack_header(buf, start)
            if size > self._max_frame_size:
                self._start = self._end = 0
                self.error = ProtocolError(
                    f"Frame of {size} bytes exceeds max_frame_size "
                    f"({self._max_frame_size} bytes)"
                )
                if payloads:
                    return payloads  # The frames before it count.
                raise self.error
            frame_end = start + HEADER_SIZE + size
            if frame_end <= end:
                payloads.append(bytes(self._view[start + HEADER_SIZE : frame_end]))
                start = frame_end
                continue
            if HEADER_SIZE + size > len(buf):
                have = end - start - HEADER_SIZE
                if size <= _BIG_FRAME_START:
                    big = bytearray(size)
                elif self._stage is not None:
                    big = self._stage
                else:
                    big = self._stage = bytearray(_BIG_FRAME_START)
                big[:have] = self._view[start + HEADER_SIZE : end]
                self._big, self._big_filled, self._big_size = big, have, size
                start = end = 0
            break
        if start == end and self._big is None:
            self._start = self._end = 0
            self._idle = True
        else:
            self._start, self._end = start, end
        return payloads
