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

How delivery works: each direction of a connection is a pipe, an
:class:`asyncio.Queue` that both ends share.  Every ``write()`` puts a copy of the
data into the pipe and schedules exactly one ``loop.call_soon()`` callback that
hands the oldest chunk in the pipe to the reading protocol.  The loop runs
callbacks in the order they were scheduled, so the chunks of all LocalQueue
connections of a loop arrive in the order of the ``write()`` calls.  No task
runs in the background.  The pipe also counts what the reader has not taken
yet (the writer's buffer), holds the chunks while the reader pauses, marks the
end of the stream and a reset, and tells each end what the other did; the ends
know nothing else of each other.

The pipes are the queues (a pipe is an :class:`asyncio.Queue`):
:func:`create_connection` makes them and passes them through the queue-typed
signatures of :meth:`LocalQueue.new_connection`, :meth:`LocalQueueServer.new_connection`
and :class:`LocalQueueTransport`, so no end has to look the other one up.  Only
transports made by hand with plain :class:`asyncio.Queue` objects need a table
from queue to pipe, so that both ends get the same pipe; it has weak keys and
serves nothing else.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import weakref
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Protocol, TypeAlias, TypeVar, cast

__all__ = [
    "LocalQueue",
    "LocalQueueServer",
    "LocalQueueTransport",
    "Network",
    "Route",
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
    local_addr: LocalQueue | None = None,
    **kwds: Any,
) -> tuple[LocalQueueTransport, _P]:
    """Connect to the server bound to *lq*.

    Args:
        protocol_factory: Makes the client's protocol.
        lq: The queue whose server to connect to.
        loop: Accepted for compatibility; must be ``None`` or the running loop.
        local_addr: The queue the connection comes from (containers on a
            LocalQueue pass their own), as TCP's *local_addr* names the local
            end.  Only a :class:`Network` on *lq* looks at it.
        **kwds: Ignored (they are TCP options), except ``ssl``, which must be
            ``None`` or ``False``.

    Returns:
        The client's ``(transport, protocol)``, once ``connection_made()`` ran.

    Raises:
        ConnectionRefusedError: if no server is bound to *lq* or it is closed.
        OSError: what the :class:`Network` on *lq* raises to refuse it.
        ValueError: if *ssl* asks for TLS or *loop* is not the running loop.
    """
    running = _check_arguments(loop, kwds)
    network = lq.network
    source = None if local_addr is None else local_addr.queue_id
    if network is not None:
        network.check_connect(source, lq.queue_id)
    to_server, to_client = _Pipe(), _Pipe()
    server_end = lq.new_connection(to_client, to_server)
    # As with TCP, the client's protocol is made once the server accepted.
    try:
        protocol = protocol_factory()
    except BaseException:
        to_server.reset()  # The server end sees a reset by its peer.
        raise
    transport = LocalQueueTransport(
        lq,
        to_server,
        to_client,
        protocol,
        sockname=server_end.get_extra_info("peername"),
    )
    if network is not None:
        forth = Route(network, to_server, to_client, source, lq.queue_id)
        back = Route(network, to_client, to_server, lq.queue_id, source)
        to_server.route, to_client.route = forth, back
        network.connection_made(forth, back)
    made = running.create_future()
    # Runs right after the transport's connection_made() callback.
    running.call_soon(_set_done, made)
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


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():  # It is cancelled if create_connection() was.
        future.set_result(None)


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
        self.network: Network | None = None
        """The :class:`Network` that carries the data of new connections to
        this queue (``None``: the data goes straight to the other end)."""
        # Numbers the connections, so each has a distinct peername.
        self._numbers = itertools.count(1)

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

    def next_peername(self) -> str:
        """Return the peername of the server end of a new connection:
        ``"<queue_id>#<n>"``, where *n* counts the connections to this queue
        (used by :class:`LocalQueueServer`)."""
        return f"{self.queue_id}#{next(self._numbers)}"

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


class Network(Protocol):
    """What carries the data of LocalQueue connections, e.g. a simulated
    network with latency and faults (see :mod:`aiomas.simulation`).

    Set it as :attr:`LocalQueue.network` of a queue: every connection made to
    that queue from then on sends what its ends write through the network,
    which hands it over when (and if) it wants with :meth:`Route.deliver`.
    Connections to queues without a network cost nothing extra.
    """

    def check_connect(self, source: str | None, target: str) -> None:
        """Called before a connection from *source* (a queue id, or ``None``
        if unknown) to the queue *target* is made.

        Raises:
            OSError: to refuse the connection (the caller of
                :func:`create_connection` gets it).
        """

    def connection_made(self, forth: Route, back: Route) -> None:
        """A connection was made: *forth* carries the client's data to the
        server, *back* the server's to the client."""

    def carry(self, route: Route, chunk: bytes) -> None:
        """An end wrote *chunk* to *route* (instead of it going to the
        other end); deliver it later with :meth:`Route.deliver`, or never.

        Data the network holds back before sending it (a slow link) can
        count for the writer's buffer and flow control, as a socket's unsent
        data does: see :meth:`Route.buffered`."""

    def carry_end(self, route: Route) -> None:
        """The writing end of *route* closed it; pass that on with
        :meth:`Route.deliver_end` once the data before it is delivered."""


class Route:
    """One direction of a LocalQueue connection that goes through a
    :class:`Network` (made by :func:`create_connection`).

    Args:
        network: The network that carries the data.
        pipe: This direction.
        reverse: The other direction.
        source: The queue id of the writing end (``None`` if unknown).
        target: The queue id of the reading end (``None`` if unknown).
    """

    def __init__(
        self,
        network: Network,
        pipe: DataQueue,
        reverse: DataQueue,
        source: str | None,
        target: str | None,
    ) -> None:
        self.network = network
        """The network that carries the data."""
        self.source = source
        """The queue id of the end that writes (``None``: not known)."""
        self.target = target
        """The queue id of the end that reads (``None``: not known)."""
        self._pipe = _pipe_of(pipe)
        self._reverse = _pipe_of(reverse)

    def __repr__(self) -> str:
        return f"<Route {self.source!r} -> {self.target!r}>"

    @property
    def closed(self) -> bool:
        """Whether the reader takes no more data (closed, or reset)."""
        return self._pipe.closed

    def deliver(self, chunk: bytes) -> None:
        """Hand *chunk* to the reading end now (in a loop callback, as
        LocalQueue always does); nothing happens if it stopped reading."""
        self._pipe.arrive(chunk)

    def deliver_end(self) -> None:
        """Hand the end of the stream to the reading end (as :meth:`deliver`)."""
        self._pipe.arrive_end()

    def buffered(self, nbytes: int) -> None:
        """*nbytes* that the writer wrote wait in the network to be sent:
        they count for the writer's buffer (``get_write_buffer_size()``, and
        ``pause_writing()`` above its high-water mark) until :meth:`sent`.

        Call it within :meth:`Network.carry`, so that the ``write()`` that
        passed them finds its buffer full."""
        self._pipe.buffered(nbytes)

    def sent(self, nbytes: int) -> None:
        """*nbytes* counted by :meth:`buffered` left the writer's buffer
        (its ``resume_writing()`` comes at the low-water mark).  Nothing
        happens once the connection was reset."""
        self._pipe.taken(nbytes)

    def reset(self) -> None:
        """Reset the whole connection: both ends lose it with a
        :class:`ConnectionResetError`, data in it is dropped."""
        self._pipe.reset()
        self._reverse.reset()


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

    @property
    def protocol_factory(self) -> ProtocolFactory:
        """What makes the protocol of every new connection (read-only)."""
        return self._protocol_factory

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
        transport = LocalQueueTransport(
            self.lq, sendq, recvq, protocol, peername=self.lq.next_peername()
        )
        self._transports[transport] = None
        _pipe_of(recvq).on_reader_done = partial(self._transports.pop, transport, None)
        return transport

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

    Data written here goes through *sendq* to the protocol of the transport
    that reads *sendq*; what comes through *recvq* is handed to *protocol*.
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
        ValueError: if *sendq* and *recvq* are the same queue, if another
            transport already reads *recvq* or writes to *sendq*, or if one
            reads *sendq* without writing to *recvq*.
    """

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
        send, recv = _pipe_of(sendq), _pipe_of(recvq)
        if recv.reader is not None:
            raise ValueError("Another transport already reads from recvq")
        if send.reader is not None and send.reader is not recv.writer:
            raise ValueError("sendq is read by a transport that is not our peer")
        if send.writer is not None:
            raise ValueError("Another transport already writes to sendq")
        super().__init__(
            {
                "peername": lq.queue_id if peername is None else peername,
                "sockname": lq.queue_id if sockname is None else sockname,
            }
        )
        self._loop = asyncio.get_running_loop()
        self._send = send
        self._recv = recv
        self._protocol = protocol
        self._closing = False  # set by close(), abort() and a reset by the peer
        self._aborted = False  # abort() or reset: the connection's data is gone
        self._lost = False  # connection_lost() was called (or is due now)
        self._high = _DEFAULT_HIGH_WATER
        self._low = _DEFAULT_HIGH_WATER // 4
        self._protocol_paused = False  # pause_writing() called
        self._loop.call_soon(self._connection_made)
        recv.attach_reader(self, self._receive, self._on_reset)
        send.attach_writer(self, self._check_drained, self._on_reset)

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
        return not self._recv.paused and not self._closing

    def pause_reading(self) -> None:
        """Hold received data (and the end of stream) until :meth:`resume_reading`."""
        if not self._closing:
            self._recv.paused = True

    def resume_reading(self) -> None:
        """Hand received data to the protocol again, starting with what was held.

        The data arrives in later loop callbacks, not within this call.
        """
        if self._recv.paused and not self._closing:
            self._recv.resume()

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
        return self._send.pending

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
        self._send.append(view.tobytes())
        self._maybe_pause_protocol()

    def writelines(
        self, list_of_data: Iterable[bytes | bytearray | memoryview]
    ) -> None:
        """Write the concatenation of *list_of_data* (delivered as one chunk).

        Raises:
            TypeError: if an item is not a bytes-like object.
        """
        data = b"".join(list_of_data)  # (the one copy, as write() makes)
        if self._closing or not data:
            return
        self._send.append(data)
        self._maybe_pause_protocol()

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
        self._recv.close_reader()
        send = self._send
        send.end()
        if send.pending == 0 or send.reader is None:
            self._loop.call_soon(self._lose, None)
        # Else _check_drained() does, once the peer has taken everything.

    def abort(self) -> None:
        """Close the transport at once; data not yet delivered is dropped.

        The protocol gets ``connection_lost(None)`` soon, the peer's protocol
        ``connection_lost()`` with a :class:`ConnectionResetError`.  Calling it
        again does nothing.
        """
        self._abort(None)

    # Internals: the callbacks this end attached to its pipes, and the calls of
    # the protocol.  "Taken" data is data the reading end has consumed or
    # dropped; only then does it leave the writer's buffer.

    def _connection_made(self) -> None:
        try:
            self._protocol.connection_made(self)
        except Exception as exc:
            self._report(exc, "Fatal error: protocol.connection_made() failed")
            self._abort(exc)
        else:
            # Data the peer wrote before this end existed.
            self._recv.release()

    def _receive(self, data: bytes | None) -> None:
        """Hand *data*, the oldest received chunk, to the protocol."""
        if data is None:
            self._eof_received()
            return
        protocol = self._protocol
        try:
            if isinstance(protocol, asyncio.BufferedProtocol):
                taken = self._feed_buffered(protocol, data)
            else:
                cast(asyncio.Protocol, protocol).data_received(data)
                taken = len(data)
        except Exception as exc:
            self._report(exc, "Fatal error: the protocol failed to receive data")
            self._abort(exc)
            return
        self._recv.taken(taken)

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
            if self._closing or self._recv.paused:
                break
        if offset < len(view) and not self._closing:
            self._recv.give_back(data[offset:])
            return offset
        # All of it was received, or the rest is dropped because we close.
        return len(data)

    def _eof_received(self) -> None:
        try:
            keep_open = cast(asyncio.Protocol, self._protocol).eof_received()
        except Exception as exc:
            self._report(exc, "Fatal error: protocol.eof_received() failed")
            self._abort(exc)
            return
        if not keep_open:
            self.close()

    def _check_drained(self) -> None:
        """The peer took data: resume our protocol's writing, or finish closing."""
        if self._aborted or self._lost:
            return
        if self._protocol_paused and self._send.pending <= self._low:
            self._protocol_paused = False
            try:
                self._protocol.resume_writing()
            except Exception as exc:
                self._report(exc, "protocol.resume_writing() failed")
        if self._closing and self._send.pending == 0:
            self._loop.call_soon(self._lose, None)

    def _on_reset(self) -> None:
        """The peer aborted (or vanished before its end was made)."""
        self._abort(ConnectionResetError("Connection reset by peer"))

    def _abort(self, exc: Exception | None) -> None:
        """Drop the connection's data, reset the peer, lose with *exc* soon."""
        if self._aborted or self._lost:
            return
        self._aborted = self._closing = True
        # Each reset tells the peer (and us, which does nothing now).
        self._send.reset()
        self._recv.reset()
        self._loop.call_soon(self._lose, exc)

    def _lose(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._recv.detach_reader()
        try:
            self._protocol.connection_lost(exc)
        except Exception as error:
            self._report(error, "protocol.connection_lost() failed")

    def _maybe_pause_protocol(self) -> None:
        if self._protocol_paused or self._closing or self._send.pending <= self._high:
            return
        self._protocol_paused = True
        try:
            self._protocol.pause_writing()
        except Exception as exc:
            self._report(exc, "protocol.pause_writing() failed")

    def _report(self, exc: Exception, message: str) -> None:
        """Tell the loop's exception handler that a protocol callback failed."""
        self._loop.call_exception_handler(
            {
                "message": message,
                "exception": exc,
                "transport": self,
                "protocol": self._protocol,
            }
        )


class _Pipe(asyncio.Queue[bytes | None]):
    """One direction of a connection, shared by its writing and its reading end.

    The pipe is the :data:`DataQueue` of its direction: it holds the chunks
    written and not yet delivered (``None`` marks the end of the stream), counts
    the bytes the reader has not taken yet (the writer's buffer), and schedules
    one delivery callback per chunk.  It tells each end what the other did
    through the callbacks the ends attached, and calls nothing else of theirs.
    """

    # Only asyncio.Queue's public methods are used, and the private names here
    # must not be asyncio.Queue's own.

    def __init__(self) -> None:
        super().__init__()
        # Deliveries run in an empty context of their own, as a socket's
        # reads do, not in the writer's: context variables that the writer
        # has set (e.g. the current deadline, see aiomas.deadlines) must not
        # reach the reader's code.
        self._call_soon = partial(
            asyncio.get_running_loop().call_soon, context=contextvars.Context()
        )
        self.reader: object | None = None
        """The end reading this pipe (compared, never called), or ``None``."""
        self.writer: object | None = None
        """The end writing to this pipe (compared, never called), or ``None``."""
        self.pending = 0
        """Bytes put and not yet taken by the reader: the writer's buffer size."""
        self.paused = False
        """Whether the reader holds its chunks (see :meth:`resume`)."""
        self.closed = False
        """Whether the reader stopped reading (or the pipe was reset)."""
        self.on_reader_done: Callable[[], object] = _ignore
        """Called once the reader has lost its connection."""
        self.route: Route | None = None
        """The route through a :class:`Network` that carries what is written,
        or ``None`` (the data arrives at once)."""
        self._reset = False
        # Delivery callbacks scheduled and not yet run (see release()).
        self._scheduled = 0
        # The rest of a chunk that a BufferedProtocol did not take before it
        # paused reading; it comes before the queued chunks.
        self._remainder = b""
        self._receive: Callable[[bytes | None], object] = _ignore
        self._reader_reset: Callable[[], object] = _ignore
        self._drained: Callable[[], object] = _ignore
        self._writer_reset: Callable[[], object] = _ignore

    def attach_reader(
        self,
        reader: object,
        receive: Callable[[bytes | None], object],
        reset: Callable[[], object],
    ) -> None:
        """Make *reader* the reading end.

        Args:
            reader: The end (for :attr:`reader`).
            receive: Gets the chunks, one per loop callback, unless
                :attr:`paused` or :attr:`closed`; it reports what it took
                with :meth:`taken`.
            reset: Called when the pipe is :meth:`reset`.
        """
        self.reader = reader
        self._receive = receive
        self._reader_reset = reset

    def attach_writer(
        self, writer: object, drained: Callable[[], object], reset: Callable[[], object]
    ) -> None:
        """Make *writer* the writing end.

        Args:
            writer: The end (for :attr:`writer`).
            drained: Called when :attr:`pending` went down.
            reset: Called when the pipe is :meth:`reset`.
        """
        self.writer = writer
        self._drained = drained
        self._writer_reset = reset

    def detach_reader(self) -> None:
        """The reader has lost its connection: free the pipe's reading end."""
        self.reader = None
        self.on_reader_done()

    def append(self, chunk: bytes) -> None:
        """Add *chunk*, unless :attr:`closed` (through :attr:`route`, if any).

        If a reader is attached, one delivery callback is scheduled for it.
        """
        if self.closed:
            return
        route = self.route
        if route is not None:
            route.network.carry(route, chunk)
            return
        self.arrive(chunk)

    def arrive(self, chunk: bytes) -> None:
        """Add *chunk* for the reader now, unless :attr:`closed`."""
        if self.closed:
            return
        self.put_nowait(chunk)
        self.pending += len(chunk)
        if self.reader is not None:
            self._scheduled += 1
            self._call_soon(self._deliver)

    def end(self) -> None:
        """Add the end of the stream, unless :attr:`closed` (as :meth:`append`)."""
        if self.closed:
            return
        route = self.route
        if route is not None:
            route.network.carry_end(route)
            return
        self.arrive_end()

    def arrive_end(self) -> None:
        """Add the end of the stream for the reader now, unless :attr:`closed`."""
        if self.closed:
            return
        self.put_nowait(None)
        if self.reader is not None:
            self._scheduled += 1
            self._call_soon(self._deliver)

    def resume(self) -> None:
        """Stop holding the chunks; deliver the held ones, in later callbacks."""
        self.paused = False
        self.release()

    def release(self) -> None:
        """Schedule the delivery of held chunks (those without a callback).

        The reader calls this when it starts reading.  Exactly one callback
        per chunk keeps the chunks of other connections in their places in
        the global order.
        """
        for _ in range(self.qsize() + bool(self._remainder) - self._scheduled):
            self._scheduled += 1
            self._call_soon(self._deliver)

    def _deliver(self) -> None:
        """Hand the oldest chunk to the reader (unless it holds or dropped it)."""
        self._scheduled -= 1
        if self.paused or self.closed:
            return
        if self._remainder:
            chunk: bytes | None = self._remainder
            self._remainder = b""
        else:
            chunk = self.get_nowait()
        self._receive(chunk)

    def give_back(self, rest: bytes) -> None:
        """Put *rest*, the unread end of the chunk just received, first again."""
        self._remainder = rest

    def buffered(self, nbytes: int) -> None:
        """*nbytes* more wait in a :class:`Network` for the reader: they
        count for the writer's buffer until :meth:`taken`."""
        if not self._reset:
            self.pending += nbytes

    def taken(self, nbytes: int) -> None:
        """The reader has taken *nbytes* more: they leave the writer's buffer."""
        if self._reset:  # The buffer was emptied then.
            return
        self.pending -= nbytes
        self._drained()

    def close_reader(self) -> None:
        """The reader stops reading: drop what it did not take, refuse more."""
        self.closed = True
        dropped = self._drop()
        if dropped:
            self.pending -= dropped
            # Later: the reader closes within a call of its protocol, and the
            # writer's protocol must not be called from there.
            self._call_soon(self._drained)

    def reset(self) -> None:
        """End this direction at once: drop all data and tell both ends."""
        if self._reset:
            return
        self._reset = self.closed = True
        self._drop()
        self.pending = 0
        self._reader_reset()
        self._writer_reset()

    def _drop(self) -> int:
        """Drop all chunks; return their size in bytes."""
        dropped = len(self._remainder)
        self._remainder = b""
        while not self.empty():
            dropped += len(self.get_nowait() or b"")
        return dropped


def _ignore(*args: object) -> None:
    """What an end that is not attached (yet) does when told something."""


# The pipes of queues given to LocalQueueTransport() that are not pipes
# (transports made by hand), so that the two ends share one pipe per queue.
# Weak keys: the pipe lives as long as the queue or a transport using it.
_adopted: weakref.WeakKeyDictionary[DataQueue, _Pipe] = weakref.WeakKeyDictionary()


def _pipe_of(queue: DataQueue) -> _Pipe:
    """Return the pipe that *queue* is (or stands for)."""
    if isinstance(queue, _Pipe):
        return queue
    pipe = _adopted.get(queue)
    if pipe is None:
        pipe = _adopted[queue] = _Pipe()
    return pipe
