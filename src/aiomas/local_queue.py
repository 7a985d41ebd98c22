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
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

__all__ = [
    "LocalQueue",
    "LocalQueueServer",
    "LocalQueueTransport",
    "clear_queue_cache",
    "create_connection",
    "create_server",
    "get_queue",
]

logger = logging.getLogger(__name__)

ProtocolFactory = Callable[[], asyncio.BaseProtocol]

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


class LocalQueue:
    """The address of a LocalQueue server (like a host and port for TCP).

    Args:
        queue_id: The queue's id.
    """

    def __init__(self, queue_id: str) -> None:
        self.queue_id = queue_id
        """The queue's id."""
        self.server: LocalQueueServer | None = None
        """The server bound to this queue, or ``None``."""

    def __repr__(self) -> str:
        return f"LocalQueue({self.queue_id!r})"

    def set_server(self, server: LocalQueueServer) -> None:
        """Bind *server* to this queue.

        Raises:
            RuntimeError: if a server is already bound to it.
        """
        if self.server is not None:
            raise RuntimeError(f"{self!r} already has a server")
        self.server = server

    def unset_server(self) -> None:
        """Unbind the server (called when it is closed)."""
        self.server = None

    def new_connection(
        self, sendq: asyncio.Queue[bytes | None], recvq: asyncio.Queue[bytes | None]
    ) -> LocalQueueTransport:
        """Create the server end of a new connection and return its transport.

        *sendq* carries data to the client, *recvq* data from it.

        Raises:
            ConnectionRefusedError: if no server is bound to this queue.
        """
        server = self.server
        if server is None:
            raise ConnectionRefusedError(f"No server listens on {self!r}")
        return server.new_connection(sendq, recvq)


class LocalQueueServer(asyncio.AbstractServer):
    """The server bound to a :class:`LocalQueue` (returned by
    :func:`create_server`).

    Args:
        protocol_factory: Makes a protocol for every new connection.
        lq: The queue to bind to.
    """

    def __init__(self, protocol_factory: ProtocolFactory, lq: LocalQueue) -> None:
        self._protocol_factory = protocol_factory
        self.lq = lq
        """The :class:`LocalQueue` the server is bound to."""
        self._loop = asyncio.get_running_loop()
        self._transports: list[LocalQueueTransport] = []
        self._serving = True
        self._connections = 0
        lq.set_server(self)

    def __repr__(self) -> str:
        return f"<LocalQueueServer {self.lq.queue_id!r}>"

    def new_connection(
        self, sendq: asyncio.Queue[bytes | None], recvq: asyncio.Queue[bytes | None]
    ) -> LocalQueueTransport:
        """Make a protocol and its transport for a new client and connect them."""
        if not self._serving:
            raise ConnectionRefusedError(f"{self!r} is closed")
        self._connections += 1
        protocol = self._protocol_factory()
        transport = LocalQueueTransport(
            self.lq,
            sendq,
            recvq,
            protocol,
            peername=f"{self.lq.queue_id}#{self._connections}",
        )
        self._transports.append(transport)
        transport._on_close = self._transports.remove
        return transport

    def close(self) -> None:
        """Stop accepting connections; existing ones are not affected."""
        if self._serving:
            self._serving = False
            if self.lq.server is self:
                self.lq.unset_server()

    def close_clients(self) -> None:
        """Close all connections made through this server."""
        for transport in list(self._transports):
            transport.close()

    def abort_clients(self) -> None:
        """Abort all connections made through this server."""
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
        """Do nothing: a LocalQueue server serves from its creation on."""

    async def serve_forever(self) -> None:
        """Serve until the task is cancelled, then close the server."""
        if not self._serving:
            raise RuntimeError(f"{self!r} is closed")
        try:
            await self._loop.create_future()
        finally:
            self.close()


class LocalQueueTransport(asyncio.Transport):
    """One end of a LocalQueue connection.

    Data written to *sendq* is delivered to the peer's protocol; data from *recvq*
    to *protocol*.  Delivery happens in callbacks of the event loop, in the order
    of the ``write()`` calls of all LocalQueue transports of the loop.  A ``None``
    in a queue marks the end of the stream.

    Args:
        lq: The queue of the server this connection belongs to.
        sendq: Data to the peer.
        recvq: Data from the peer.
        protocol: The protocol to deliver received data to.
        peername: What ``get_extra_info('peername')`` returns (default: the
            queue id, which is the server's address as seen from a client).
    """

    def __init__(
        self,
        lq: LocalQueue,
        sendq: asyncio.Queue[bytes | None],
        recvq: asyncio.Queue[bytes | None],
        protocol: asyncio.BaseProtocol,
        *,
        peername: str | None = None,
    ) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._lq = lq
        self._sendq = sendq
        self._recvq = recvq
        self._protocol = protocol
        self._peer: LocalQueueTransport | None = None
        self._extra = {
            "peername": lq.queue_id if peername is None else peername,
            "sockname": lq.queue_id,
        }
        self._closing = False
        self._lost = False
        self._made = False
        self._reading = True
        self._on_close: Callable[[LocalQueueTransport], None] | None = None
        self._loop.call_soon(self._connection_made)

    def __repr__(self) -> str:
        state = "closed" if self._lost else "closing" if self._closing else "open"
        return f"<LocalQueueTransport {self._extra['peername']!r} {state}>"

    # Transport API

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Return ``'peername'`` or ``'sockname'`` (strings), else *default*."""
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        """Whether the transport is closing or closed."""
        return self._closing

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Set the protocol that receives data."""
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        """Return the protocol that receives data."""
        return self._protocol

    def is_reading(self) -> bool:
        """Whether received data is delivered to the protocol."""
        return self._reading and not self._closing

    def pause_reading(self) -> None:
        """Hold received data until :meth:`resume_reading`."""
        self._reading = False

    def resume_reading(self) -> None:
        """Deliver received data again, starting with what was held."""
        if not self._reading:
            self._reading = True
            self._schedule_pending()

    def set_write_buffer_limits(
        self, high: int | None = None, low: int | None = None
    ) -> None:
        """Accepted for compatibility: writes never block here."""

    def get_write_buffer_limits(self) -> tuple[int, int]:
        """Return ``(0, 0)``: data is handed over without buffering."""
        return (0, 0)

    def get_write_buffer_size(self) -> int:
        """Return ``0``: written data is queued for the peer at once."""
        return 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send *data* to the peer (a copy of it; it is delivered soon)."""
        if self._closing:
            return
        if not data:
            return
        self._sendq.put_nowait(bytes(data))
        peer = self._peer
        if peer is not None:
            # One callback per write: the loop runs callbacks in the order they
            # were scheduled, so data arrives in the order of all write() calls.
            self._loop.call_soon(peer._deliver_one)

    def writelines(
        self, list_of_data: Iterable[bytes | bytearray | memoryview]
    ) -> None:
        """Write every buffer of *list_of_data* (joined into one delivery)."""
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        """Return ``False``: half-closing is not supported."""
        return False

    def write_eof(self) -> None:
        """Not supported (see :meth:`can_write_eof`)."""
        raise NotImplementedError("LocalQueue transports cannot write EOF")

    def close(self) -> None:
        """Close the transport.

        Data already written is still delivered; then the peer gets
        ``eof_received()`` and our protocol ``connection_lost(None)``.
        """
        if self._closing:
            return
        self._closing = True
        self._sendq.put_nowait(None)
        if self._peer is not None:
            self._loop.call_soon(self._peer._deliver_one)
        self._loop.call_soon(self._lose, None)

    def abort(self) -> None:
        """Close the transport at once; data not yet delivered is dropped.

        The peer's protocol gets ``connection_lost()`` with a
        :class:`ConnectionResetError`.
        """
        self._closing = True
        peer = self._peer
        self._drop(self._sendq)
        if peer is not None and not peer._lost:
            peer._closing = True
            self._loop.call_soon(
                peer._lose, ConnectionResetError("Connection reset by peer")
            )
        self._loop.call_soon(self._lose, None)

    # Internals

    @staticmethod
    def _drop(queue: asyncio.Queue[bytes | None]) -> None:
        while not queue.empty():
            queue.get_nowait()

    def _connect(self, peer: LocalQueueTransport) -> None:
        self._peer = peer

    def _connection_made(self) -> None:
        if self._lost:
            return
        self._made = True
        try:
            self._protocol.connection_made(self)
        except Exception as exc:
            self._fatal(exc, "connection_made() failed")
            return
        # Data the peer wrote before this connection was made waited for it.
        self._schedule_pending()

    def _schedule_pending(self) -> None:
        for _ in range(self._recvq.qsize()):
            self._loop.call_soon(self._deliver_one)

    def _deliver_one(self) -> None:
        """Hand the oldest received chunk to the protocol."""
        queue = self._recvq
        if self._lost or not self._made or not self._reading or queue.empty():
            return
        data = queue.get_nowait()
        if data is None:
            self._eof()
            return
        protocol = self._protocol
        try:
            if isinstance(protocol, asyncio.BufferedProtocol):
                self._feed_buffered(protocol, data)
            else:
                protocol.data_received(data)  # type: ignore[attr-defined]
        except Exception as exc:
            self._fatal(exc, "Delivering data to the protocol failed")

    def _feed_buffered(self, protocol: asyncio.BufferedProtocol, data: bytes) -> None:
        view = memoryview(data)
        while view:
            buf = memoryview(protocol.get_buffer(len(view))).cast("B")
            size = len(buf)
            if not size:
                raise RuntimeError("get_buffer() returned an empty buffer")
            n = min(size, len(view))
            buf[:n] = view[:n]
            protocol.buffer_updated(n)
            view = view[n:]

    def _eof(self) -> None:
        try:
            keep_open = self._protocol.eof_received()  # type: ignore[attr-defined]
        except Exception as exc:
            self._fatal(exc, "eof_received() failed")
            return
        if not keep_open:
            self.close()

    def _fatal(self, exc: BaseException, message: str) -> None:
        self._loop.call_exception_handler(
            {
                "message": message,
                "exception": exc,
                "transport": self,
                "protocol": self._protocol,
            }
        )
        self.abort()

    def _lose(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        if self._on_close is not None:
            self._on_close(self)
        if not self._made:
            return
        try:
            self._protocol.connection_lost(exc)
        except Exception as error:
            self._loop.call_exception_handler(
                {
                    "message": "connection_lost() failed",
                    "exception": error,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )


async def create_connection(
    protocol_factory: ProtocolFactory,
    lq: LocalQueue,
    *,
    loop: asyncio.AbstractEventLoop | None = None,
    **kwds: Any,
) -> tuple[LocalQueueTransport, asyncio.BaseProtocol]:
    """Connect to the server bound to *lq*.

    Args:
        protocol_factory: Makes the client's protocol.
        lq: The queue whose server to connect to.
        loop: Accepted for compatibility; must be ``None`` or the running loop.
        **kwds: Ignored, except ``ssl``, which LocalQueue cannot do.

    Returns:
        The client's ``(transport, protocol)`` once ``connection_made()`` ran.

    Raises:
        ConnectionRefusedError: if no server is bound to *lq*.
        ValueError: if *ssl* is given or *loop* is not the running loop.
    """
    running = asyncio.get_running_loop()
    if loop is not None and loop is not running:
        raise ValueError("The 'loop' argument must be the running event loop (or None)")
    if kwds.get("ssl") is not None:
        raise ValueError("LocalQueue connections do not support TLS")
    to_server: asyncio.Queue[bytes | None] = asyncio.Queue()
    to_client: asyncio.Queue[bytes | None] = asyncio.Queue()
    server_transport = lq.new_connection(to_client, to_server)
    protocol = protocol_factory()
    client_transport = LocalQueueTransport(lq, to_server, to_client, protocol)
    client_transport._connect(server_transport)
    server_transport._connect(client_transport)
    # Both connection_made() calls are scheduled; wait until they ran.
    made = running.create_future()
    running.call_soon(made.set_result, None)
    await made
    return client_transport, protocol


async def create_server(
    protocol_factory: ProtocolFactory, lq: LocalQueue, **kwds: Any
) -> LocalQueueServer:
    """Start a server bound to *lq* and return it (also set as ``lq.server``).

    Raises:
        RuntimeError: if *lq* already has a server.
        ValueError: if *ssl* is given.
    """
    if kwds.get("ssl") is not None:
        raise ValueError("LocalQueue servers do not support TLS")
    return LocalQueueServer(protocol_factory, lq)
