"""An in-process transport with a deterministic message order.

:class:`LocalQueueTransport` behaves like a TCP transport (a byte stream with the
asyncio :class:`~asyncio.Transport` interface) but never leaves the process: what
one end writes is handed to the other end's protocol by the event loop, in the
order of the ``write()`` calls.  Messages over several LocalQueue connections
therefore arrive in one reproducible order, which makes tests and debugging of
distributed algorithms repeatable.

Pass a :class:`LocalQueue` from :func:`get_queue` as the address to
:func:`aiomas.channel.start_server` / :func:`~aiomas.channel.open_connection` (or to
``Container.create()``).  Not thread safe: use it within one thread and process.

How delivery works: each direction of a connection is an :class:`asyncio.Queue`.
Every ``write()`` puts a copy of the data into the queue and schedules exactly one
``loop.call_soon()`` callback that hands the oldest queued chunk to the reading
protocol.  The loop runs callbacks in the order they were scheduled, so the
chunks of all LocalQueue connections of a loop arrive in the order of the
``write()`` calls.  No task runs in the background.
"""

from __future__ import annotations

import asyncio
import itertools
import weakref
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias, TypeVar, cast

__all__ = [
    "LocalQueue",
    "LocalQueueServer",
    "LocalQueueTransport",
    "clear_queue_cache",
    "create_connection",
    "create_server",
    "get_queue",
]

_P = TypeVar("_P", bound=asyncio.BaseProtocol)

ProtocolFactory: TypeAlias = Callable[[], asyncio.BaseProtocol]

DataQueue: TypeAlias = "asyncio.Queue[bytes | None]"
"""One direction of a connection: chunks of data; ``None`` marks the end."""

# asyncio's default for the write buffer's high-water mark; the low-water mark
# defaults to a quarter of it.
_DEFAULT_HIGH_WATER = 64 * 1024

_queues: dict[str, LocalQueue] = {}

# The transport reading from each queue (keyed by the queue's id), so that the two
# ends of a connection find each other through the queues they share, as the
# constructor's signature implies.  Weak values: a dropped transport unregisters.
_readers: weakref.WeakValueDictionary[int, LocalQueueTransport] = (
    weakref.WeakValueDictionary()
)


def get_queue(queue_id: str) -> LocalQueue:
    """Return the :class:`LocalQueue` for *queue_id*, creating it if needed.

    Raises:
        ValueError: if *queue_id* is not a string or contains ``/``.
    """
    if not isinstance(queue_id, str):
        raise ValueError(f"A queue id must be a string, not {queue_id!r}")
    if "/" in queue_id:
        raise ValueError(f"A queue id must not contain '/': {queue_id!r}")
    queue = _queues.get(queue_id)
    if queue is None:
        queue = _queues[queue_id] = LocalQueue(queue_id)
    return queue


def clear_queue_cache() -> None:
    """Forget all queues made by :func:`get_queue`."""
    _queues.clear()


async def create_connection(
    protocol_factory: Callable[[], _P],
    lq: LocalQueue,
    *,
    loop: asyncio.AbstractEventLoop | None = None,
    **kwds: Any,
) -> tuple[LocalQueueTransport, _P]:
    """Connect to the server bound to *lq*.

    Args:
        protocol_factory: Makes the client's protocol.
        lq: The queue whose server to connect to.
        loop: Accepted for compatibility; must be ``None`` or the running loop.
        **kwds: Ignored (they are TCP options), except ``ssl``, which must be
            ``None`` or ``False``.

    Returns:
        The client's ``(transport, protocol)``, once ``connection_made()`` ran.

    Raises:
        ConnectionRefusedError: if no server is bound to *lq* or it is closed.
        ValueError: if *ssl* asks for TLS or *loop* is not the running loop.
    """
    running = _check_arguments(loop, kwds)
    to_server: DataQueue = asyncio.Queue()
    to_client: DataQueue = asyncio.Queue()
    server_end = lq.new_connection(to_client, to_server)
    # As with TCP, the client's protocol is made once the server accepted.
    try:
        protocol = protocol_factory()
    except BaseException:
        server_end._reset()
        raise
    transport = LocalQueueTransport(
        lq,
        to_server,
        to_client,
        protocol,
        sockname=server_end.get_extra_info("peername"),
    )
    made = running.create_future()
    transport._made_waiter = made
    try:
        await made
    except BaseException:
        transport.close()
        raise
    return transport, protocol


async def create_server(
    protocol_factory: ProtocolFactory, lq: LocalQueue, **kwds: Any
) -> LocalQueueServer:
    """Start a server bound to *lq* and return it (it is also ``lq.server``).

    Args:
        protocol_factory: Makes a protocol for every new connection.
        lq: The queue to bind to.
        **kwds: Ignored (they are TCP options), except ``ssl``, which must be
            ``None`` or ``False``, ``loop``, which must be ``None`` or the
            running loop, and ``start_serving`` (default ``True``).

    Raises:
        RuntimeError: if *lq* already has a server.
        ValueError: if *ssl* asks for TLS or *loop* is not the running loop.
    """
    _check_arguments(kwds.get("loop"), kwds)
    server = LocalQueueServer(
        protocol_factory, lq, start_serving=bool(kwds.get("start_serving", True))
    )
    lq.set_server(server)
    return server


def _check_arguments(
    loop: asyncio.AbstractEventLoop | None, kwds: dict[str, Any]
) -> asyncio.AbstractEventLoop:
    running = asyncio.get_running_loop()
    if loop is not None and loop is not running:
        raise ValueError("The 'loop' argument must be the running event loop (or None)")
    if kwds.get("ssl") not in (None, False):
        raise ValueError("LocalQueue connections do not support TLS")
    return running


class LocalQueue:
    """The address of a LocalQueue server (what host and port are for TCP).

    Get instances from :func:`get_queue`, so that everybody using the same id
    shares one instance.

    Args:
        queue_id: The queue's id.
    """

    def __init__(self, queue_id: str) -> None:
        self.queue_id = queue_id
        """The queue's id."""
        self.server: LocalQueueServer | None = None
        """The server bound to this queue, or ``None``."""
        # Numbers the connections, so each has a distinct peername.
        self._connection_numbers = itertools.count(1)

    def __repr__(self) -> str:
        return f"LocalQueue({self.queue_id!r})"

    def set_server(self, server: LocalQueueServer) -> None:
        """Bind *server* to this queue (called by :func:`create_server`).

        Raises:
            RuntimeError: if a server is already bound to it.
        """
        if self.server is not None:
            raise RuntimeError(f"{self!r} already has a server: {self.server!r}")
        self.server = server

    def unset_server(self) -> None:
        """Unbind the server (called by :meth:`LocalQueueServer.close`)."""
        self.server = None

    def new_connection(self, sendq: DataQueue, recvq: DataQueue) -> LocalQueueTransport:
        """Create the server end of a new connection and return its transport.

        Called by :func:`create_connection`.

        Args:
            sendq: Carries data from the server to the client.
            recvq: Carries data from the client to the server.

        Raises:
            ConnectionRefusedError: if no server is bound to this queue.
        """
        server = self.server
        if server is None:
            raise ConnectionRefusedError(f"No server is bound to {self!r}")
        return server.new_connection(sendq, recvq)


class LocalQueueServer(asyncio.AbstractServer):
    """A server bound to a :class:`LocalQueue` (made by :func:`create_server`).

    Must be created while an event loop runs.  Like :class:`asyncio.Server`,
    closing it stops new connections; existing ones go on until they are
    closed (see :meth:`close_clients`).

    Args:
        protocol_factory: Makes a protocol for every new connection.
        lq: The queue this server is bound to.
        start_serving: Whether to accept connections right away (else from
            :meth:`start_serving` on).
    """

    def __init__(
        self,
        protocol_factory: ProtocolFactory,
        lq: LocalQueue,
        *,
        start_serving: bool = True,
    ) -> None:
        self.lq = lq
        """The :class:`LocalQueue` the server is bound to."""
        self._protocol_factory = protocol_factory
        self._loop = asyncio.get_running_loop()
        self._serving = start_serving
        self._closed = False
        # A dict, not a set: close_clients() must act in a reproducible order.
        self._transports: dict[LocalQueueTransport, None] = {}
        self._serve_forever_waiter: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        state = "serving" if self._serving else "closed" if self._closed else "idle"
        return f"<LocalQueueServer {self.lq.queue_id!r} {state}>"

    def new_connection(self, sendq: DataQueue, recvq: DataQueue) -> LocalQueueTransport:
        """Make a protocol and a transport for a new client and wire them.

        The protocol's ``connection_made()`` is called soon (not within this
        call).  Called by :func:`create_connection` via
        :meth:`LocalQueue.new_connection`.

        Args:
            sendq: Carries data to the client.
            recvq: Carries data from the client.

        Returns:
            The server's end of the connection.  Its ``peername`` is
            ``"<queue_id>#<n>"``, where *n* counts the connections to the queue.

        Raises:
            ConnectionRefusedError: if the server does not accept connections,
                or if the protocol factory failed (that error is reported to
                the loop's exception handler, as asyncio servers do).
        """
        if not self._serving:
            raise ConnectionRefusedError(f"{self!r} does not accept connections")
        try:
            protocol = self._protocol_factory()
        except Exception as exc:
            self._loop.call_exception_handler(
                {
                    "message": "LocalQueue server: protocol_factory() failed",
                    "exception": exc,
                    "server": self,
                }
            )
            raise ConnectionRefusedError(f"{self!r} failed to make a protocol") from exc
        number = next(self.lq._connection_numbers)
        transport = LocalQueueTransport(
            self.lq,
            sendq,
            recvq,
            protocol,
            peername=f"{self.lq.queue_id}#{number}",
        )
        self._transports[transport] = None
        transport._on_lost = self._forget
        return transport

    def _forget(self, transport: LocalQueueTransport) -> None:
        self._transports.pop(transport, None)

    def close(self) -> None:
        """Stop accepting connections and unbind from :attr:`lq`.

        Existing connections keep working.  Calling it again does nothing.
        """
        self._serving = False
        if not self._closed:
            self._closed = True
            if self.lq.server is self:
                self.lq.unset_server()
        waiter = self._serve_forever_waiter
        if waiter is not None and not waiter.done():
            waiter.cancel()

    def close_clients(self) -> None:
        """Close all connections accepted by this server."""
        for transport in list(self._transports):
            transport.close()

    def abort_clients(self) -> None:
        """Abort all connections accepted by this server."""
        for transport in list(self._transports):
            transport.abort()

    async def wait_closed(self) -> None:
        """Return at once: there is nothing to wait for."""

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """Return the event loop the server belongs to."""
        return self._loop

    def is_serving(self) -> bool:
        """Whether the server accepts new connections."""
        return self._serving

    async def start_serving(self) -> None:
        """Accept connections (does nothing if the server already does).

        Raises:
            RuntimeError: if the server is closed.
        """
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        self._serving = True

    async def serve_forever(self) -> None:
        """Accept connections until cancelled (or until :meth:`close`).

        When cancelled, the server is closed.

        Raises:
            RuntimeError: if the server is closed or another ``serve_forever()``
                runs.
        """
        if self._serve_forever_waiter is not None:
            raise RuntimeError(f"{self!r} is already in serve_forever()")
        await self.start_serving()
        self._serve_forever_waiter = waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._serve_forever_waiter = None
            self.close()


class LocalQueueTransport(asyncio.Transport):
    """One end of a LocalQueue connection.

    Data written here is put into *sendq* and handed to the protocol of the
    transport that reads *sendq*; data put into *recvq* is handed to *protocol*.
    The two ends of a connection find each other through these queues (one's
    *sendq* is the other's *recvq*), whichever is made first.

    It behaves like a TCP transport, with these specifics:

    * Data is handed over in loop callbacks, one ``write()`` per callback, in
      the order of the ``write()`` calls of all transports of the loop.
    * ``get_extra_info('peername')`` is the queue id on the client side and
      ``"<queue_id>#<n>"`` on the server side; ``'sockname'`` is the other
      end's ``peername``.  There is no socket.
    * The write buffer is the data the peer has not taken yet.  Above the
      high-water mark the protocol's ``pause_writing()`` is called, as asyncio
      transports do.
    * Data written after the peer has closed its end is discarded (TCP would
      answer it with a reset).
    * Half-closing (``write_eof()``) is not supported.

    Must be created while an event loop runs; the protocol's
    ``connection_made()`` is called soon afterwards.

    Args:
        lq: The queue of the server this connection belongs to.
        sendq: Data to the peer.
        recvq: Data from the peer.
        protocol: The protocol to hand received data to.
        peername: What ``get_extra_info('peername')`` returns (default: the
            queue id, which is the server's address as seen from a client).
        sockname: What ``get_extra_info('sockname')`` returns (default: the
            queue id).

    Raises:
        ValueError: if *sendq* and *recvq* are the same queue, or another
            transport already reads *recvq* or reads *sendq* without writing to
            *recvq*.
    """

    _on_lost: Callable[[LocalQueueTransport], None] | None = None
    _made_waiter: asyncio.Future[None] | None = None

    def __init__(
        self,
        lq: LocalQueue,
        sendq: DataQueue,
        recvq: DataQueue,
        protocol: asyncio.BaseProtocol,
        *,
        peername: str | None = None,
        sockname: str | None = None,
    ) -> None:
        if sendq is recvq:
            raise ValueError("sendq and recvq must be two different queues")
        if id(recvq) in _readers:
            raise ValueError("Another transport already reads from recvq")
        peer = _readers.get(id(sendq))
        if peer is not None and (peer._sendq is not recvq or peer._peer is not None):
            raise ValueError("sendq is read by a transport that is not our peer")
        super().__init__(
            {
                "peername": lq.queue_id if peername is None else peername,
                "sockname": lq.queue_id if sockname is None else sockname,
            }
        )
        self._loop = asyncio.get_running_loop()
        self._lq = lq
        self._sendq: DataQueue = sendq
        self._recvq: DataQueue = recvq
        self._protocol = protocol
        self._peer: LocalQueueTransport | None = peer
        self._made = False
        self._closing = False  # set by close(), abort() and a reset by the peer
        self._aborted = False  # abort() or reset: our data is gone
        self._lost = False  # connection_lost() was called (or is due now)
        self._paused = False  # pause_reading()
        # Delivery callbacks scheduled and not yet run (see _release_held()).
        self._scheduled = 0
        # The rest of a chunk that a BufferedProtocol did not take before it
        # paused reading; it is delivered before the queue's next chunk.
        self._remainder = b""
        self._buffer_size = 0  # bytes written that the peer has not taken
        self._high = _DEFAULT_HIGH_WATER
        self._low = _DEFAULT_HIGH_WATER // 4
        self._protocol_paused = False  # pause_writing() called
        _readers[id(recvq)] = self
        if peer is not None:
            peer._peer = self
        self._loop.call_soon(self._connection_made)

    def __repr__(self) -> str:
        state = "closed" if self._lost else "closing" if self._closing else "open"
        return f"<LocalQueueTransport {self.get_extra_info('peername')!r} {state}>"

    # Transport API

    def is_closing(self) -> bool:
        """Whether the transport is closing or closed."""
        return self._closing

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Set the protocol that gets all further events."""
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        """Return the current protocol."""
        return self._protocol

    def is_reading(self) -> bool:
        """Whether received data is handed to the protocol."""
        return not self._paused and not self._closing

    def pause_reading(self) -> None:
        """Hold received data (and the end of stream) until :meth:`resume_reading`."""
        if not self._closing:
            self._paused = True

    def resume_reading(self) -> None:
        """Hand received data to the protocol again, starting with what was held.

        The data arrives in later loop callbacks, not within this call.
        """
        if self._paused and not self._closing:
            self._paused = False
            self._release_held()

    def set_write_buffer_limits(
        self, high: int | None = None, low: int | None = None
    ) -> None:
        """Set the water marks for pausing and resuming the protocol's writing.

        Args:
            high: Pause writing when more bytes than this are buffered
                (default: 64 KiB, or ``4 * low`` if only *low* is given).
            low: Resume writing when at most this many bytes are buffered
                (default: ``high // 4``).

        Raises:
            ValueError: unless ``high >= low >= 0``.
        """
        if high is None:
            high = _DEFAULT_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) >= 0")
        self._high = high
        self._low = low
        self._maybe_pause_protocol()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        """Return the ``(low, high)`` water marks."""
        return (self._low, self._high)

    def get_write_buffer_size(self) -> int:
        """Return the number of bytes written that the peer has not taken yet."""
        return self._buffer_size

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send a copy of *data* to the peer; it is delivered soon.

        Writing nothing, writing to a closing transport and writing to a peer
        that has closed its end do nothing (as asyncio ignores writes to a lost
        connection).

        Raises:
            TypeError: if *data* is not a bytes-like object.
        """
        view = memoryview(data)
        if self._closing or not view.nbytes:
            return
        peer = self._peer
        if peer is not None and peer._closing:
            return
        chunk = view.tobytes()
        self._sendq.put_nowait(chunk)
        self._buffer_size += len(chunk)
        if peer is not None:
            peer._schedule_delivery()
        self._maybe_pause_protocol()

    def writelines(
        self, list_of_data: Iterable[bytes | bytearray | memoryview]
    ) -> None:
        """Write the concatenation of *list_of_data* (delivered as one chunk)."""
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        """Return ``False``: half-closing is not supported."""
        return False

    def write_eof(self) -> None:
        """Not supported (see :meth:`can_write_eof`).

        Raises:
            NotImplementedError: always.
        """
        raise NotImplementedError("LocalQueue transports cannot write EOF")

    def close(self) -> None:
        """Close the transport.

        Data already written is still delivered, then the peer's protocol gets
        ``eof_received()``.  No more data is received.  Once the peer has taken
        all data, the protocol gets ``connection_lost(None)`` (in a later loop
        callback).  Calling it again does nothing.
        """
        if self._closing:
            return
        self._closing = True
        self._drop_received(notify_peer=True)
        peer = self._peer
        if peer is None or not peer._closing:
            self._sendq.put_nowait(None)
            if peer is not None:
                peer._schedule_delivery()
        if self._buffer_size == 0 or peer is None:
            self._loop.call_soon(self._lose, None)
        # Else _taken() calls _lose() once the peer has read everything.

    def abort(self) -> None:
        """Close the transport at once; data not yet delivered is dropped.

        The protocol gets ``connection_lost(None)`` soon, the peer's protocol
        ``connection_lost()`` with a :class:`ConnectionResetError`.  Calling it
        again does nothing.
        """
        self._abort(None)

    # Internals.  "Taken" data is data the reading end has consumed or dropped;
    # only then does it leave the writer's buffer.

    def _connection_made(self) -> None:
        self._made = True
        try:
            self._protocol.connection_made(self)
        except Exception as exc:
            self._fatal_error(exc, "Fatal error: protocol.connection_made() failed")
        else:
            # Data the peer wrote before this end existed or was made.
            self._release_held()
        waiter = self._made_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _schedule_delivery(self) -> None:
        self._scheduled += 1
        self._loop.call_soon(self._deliver_next)

    def _release_held(self) -> None:
        """Schedule delivery of held chunks (those without a pending callback).

        Exactly one callback per chunk keeps the chunks of other connections in
        their places in the global order.
        """
        held = self._recvq.qsize() + bool(self._remainder) - self._scheduled
        for _ in range(held):
            self._schedule_delivery()

    def _deliver_next(self) -> None:
        """Hand the oldest received chunk to the protocol (if it may read)."""
        self._scheduled -= 1
        if self._closing or self._paused or not self._made:
            # Held until resume_reading() or _connection_made(); dropped on close.
            return
        if self._remainder:
            data, self._remainder = self._remainder, b""
        elif self._recvq.empty():
            return
        else:
            item = self._recvq.get_nowait()
            if item is None:
                self._eof_received()
                return
            data = item
        protocol = self._protocol
        try:
            if isinstance(protocol, asyncio.BufferedProtocol):
                taken = self._feed_buffered(protocol, data)
            else:
                cast(asyncio.Protocol, protocol).data_received(data)
                taken = len(data)
        except Exception as exc:
            self._fatal_error(exc, "Fatal error: the protocol failed to receive data")
            return
        peer = self._peer
        if peer is not None:
            peer._taken(taken)

    def _feed_buffered(self, protocol: asyncio.BufferedProtocol, data: bytes) -> int:
        """Copy *data* into the protocol's buffers; return the bytes taken."""
        view = memoryview(data)
        offset = 0
        while offset < len(view):
            # Release our views of the buffer before buffer_updated(): the
            # protocol may resize it there, which exported views forbid.
            with (
                memoryview(protocol.get_buffer(len(view) - offset)) as given,
                given.cast("B") as buffer,
            ):
                if not buffer.nbytes:
                    raise RuntimeError("get_buffer() returned an empty buffer")
                size = min(buffer.nbytes, len(view) - offset)
                buffer[:size] = view[offset : offset + size]
            offset += size
            protocol.buffer_updated(size)
            if self._closing or self._paused:
                break
        if offset < len(view) and not self._closing:
            self._remainder = data[offset:]
            return offset
        # All of it was received, or the rest is dropped because we close.
        return len(data)

    def _eof_received(self) -> None:
        try:
            keep_open = cast(asyncio.Protocol, self._protocol).eof_received()
        except Exception as exc:
            self._fatal_error(exc, "Fatal error: protocol.eof_received() failed")
            return
        if not keep_open:
            self.close()

    def _drop_received(self, *, notify_peer: bool) -> None:
        """Stop receiving: drop all data not yet delivered to our protocol."""
        dropped = len(self._remainder)
        self._remainder = b""
        while not self._recvq.empty():
            item = self._recvq.get_nowait()
            if item is not None:
                dropped += len(item)
        peer = self._peer
        if notify_peer and peer is not None and dropped and not peer._aborted:
            peer._buffer_size -= dropped
            # Later: this runs within a call of our protocol (close()), and the
            # peer's protocol must not be called from there.
            self._loop.call_soon(peer._check_drained)

    def _taken(self, nbytes: int) -> None:
        """The peer's protocol has taken *nbytes* more of our data."""
        if not self._aborted:
            self._buffer_size -= nbytes
            self._check_drained()

    def _check_drained(self) -> None:
        """Resume our protocol's writing, or finish closing, if due."""
        if self._aborted or self._lost:
            return
        self._maybe_resume_protocol()
        if self._closing and self._buffer_size == 0:
            self._loop.call_soon(self._lose, None)

    def _abort(self, exc: Exception | None) -> None:
        if not self._drop_everything():
            return
        if self._peer is not None:
            self._peer._reset()
        self._loop.call_soon(self._lose, exc)

    def _reset(self) -> None:
        """The peer aborted: drop everything and lose the connection."""
        if self._drop_everything():
            self._loop.call_soon(
                self._lose, ConnectionResetError("Connection reset by peer")
            )

    def _drop_everything(self) -> bool:
        """Stop the connection's traffic at once; false if that already happened."""
        if self._aborted or self._lost:
            return False
        self._aborted = True
        self._closing = True
        self._buffer_size = 0
        self._drop_received(notify_peer=False)
        return True

    def _fatal_error(self, exc: Exception, message: str) -> None:
        self._loop.call_exception_handler(
            {
                "message": message,
                "exception": exc,
                "transport": self,
                "protocol": self._protocol,
            }
        )
        self._abort(exc)

    def _lose(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        if _readers.get(id(self._recvq)) is self:
            del _readers[id(self._recvq)]
        if self._on_lost is not None:
            self._on_lost(self)
        if not self._made:  # Not reachable: _connection_made() runs first.
            return
        try:
            self._protocol.connection_lost(exc)
        except Exception as error:
            self._report(error, "protocol.connection_lost() failed")

    def _maybe_pause_protocol(self) -> None:
        if self._protocol_paused or self._closing or self._buffer_size <= self._high:
            return
        self._protocol_paused = True
        try:
            self._protocol.pause_writing()
        except Exception as exc:
            self._report(exc, "protocol.pause_writing() failed")

    def _maybe_resume_protocol(self) -> None:
        if not self._protocol_paused or self._buffer_size > self._low:
            return
        self._protocol_paused = False
        try:
            self._protocol.resume_writing()
        except Exception as exc:
            self._report(exc, "protocol.resume_writing() failed")

    def _report(self, exc: Exception, message: str) -> None:
        self._loop.call_exception_handler(
            {
                "message": message,
                "exception": exc,
                "transport": self,
                "protocol": self._protocol,
            }
        )
