"""Exception types used by aiomas.

Every error that aiomas defines derives from :class:`AiomasError`:

.. code-block:: text

    AiomasError
    ├── RemoteException      the peer raised an error while handling our request
    ├── SerializationError   we were asked to encode something the codec cannot
    │   └── DecodeError      what the peer sent cannot be decoded (its error)
    ├── ConnectionLostError  the connection broke (a network or transport error,
    │   │                    not a clean close): also a ConnectionResetError
    │   └── ProtocolResetError  it was cut because the peer broke the protocol
    ├── ProtocolError        the peer sent bytes that break the wire protocol
    │   │                    (also a RuntimeError, as aiomas 1.x raised for it)
    │   └── ProtocolResetError  (the same class as above)
    └── DeadlineExceeded     the deadline of a call (aiomas.deadline()) passed:
                             also a TimeoutError

A connection that ends while requests are in flight fails them, and every later
``send()`` or ``recv()`` on it, with a :class:`ConnectionResetError`:

* the built-in :class:`ConnectionResetError` itself if it was closed cleanly
  (by either side);
* a :class:`ConnectionLostError` if it broke: the transport reported an error
  (the peer reset it, a timeout of dead-peer detection, a TLS error), which is
  its ``__cause__``;
* a :class:`ProtocolResetError` if this side cut it because the peer broke the
  protocol; the :class:`ProtocolError` is its ``__cause__``.

So ``except ConnectionError`` (or ``ConnectionResetError``) handles them all,
``except ConnectionLostError`` only the connections that did not end cleanly,
and ``except RuntimeError`` (what the 1.0.3 documentation promises for "an
invalid message type was received") catches a :class:`ProtocolResetError`.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AiomasError",
    "ConnectionLostError",
    "DeadlineExceeded",
    "DecodeError",
    "ProtocolError",
    "ProtocolResetError",
    "RemoteException",
    "SerializationError",
]


class AiomasError(Exception):
    """Base class for all exceptions defined by aiomas."""


class RemoteException(AiomasError):
    """Wraps a traceback of an exception on the other side of a channel.

    Args:
        origin: The remote peer name (for TCP a ``(host, port)`` tuple).
        remote_traceback: The remote exception's traceback as text.
    """

    origin: Any
    """Peername (producer of the exception)."""

    remote_traceback: str
    """Original traceback."""

    def __init__(self, origin: Any, remote_traceback: str) -> None:
        super().__init__(origin, remote_traceback)
        self.origin = origin
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return f"Origin: {self.origin}\n{self.remote_traceback}"


class SerializationError(AiomasError):
    """Raised when an object cannot be serialized (or bytes cannot be decoded)."""


class DecodeError(SerializationError):
    """What the peer sent cannot be decoded, e.g. a reply whose content has a
    custom type this side does not know (the peer's error, not the caller's)."""


class ProtocolError(AiomasError, RuntimeError):
    """The peer violated the wire protocol (bad frame, bad message, unknown id).

    The connection on which it happened is closed; other connections are unaffected.
    """


class ConnectionLostError(AiomasError, ConnectionResetError):
    """The connection broke: the transport reported an error (the peer reset
    it, dead-peer detection timed out, a TLS error, ...), which is the
    ``__cause__``.  A clean close raises the built-in
    :class:`ConnectionResetError` instead.

    Raised by calls in flight on that connection and by every later
    ``send()`` and ``recv()`` on it.
    """


class ProtocolResetError(ProtocolError, ConnectionLostError):
    """The connection was closed because the peer violated the wire protocol.

    Raised by calls in flight on that connection and by every later
    ``send()`` and ``recv()`` on it.  It is a :class:`ConnectionLostError` (so
    a :class:`ConnectionResetError`: code that handles lost connections
    handles it) and a :class:`ProtocolError` (so also a :class:`RuntimeError`,
    as the 1.0.3 documentation promises).  The :class:`ProtocolError` that
    ended the connection is its ``__cause__``.
    """


class DeadlineExceeded(AiomasError, TimeoutError):
    """The deadline of an :func:`aiomas.deadline` scope (or of the request
    being served) passed before the work in it was done.

    Raised at the end of the scope, and by a call made when no time is left;
    ``except TimeoutError`` catches it, as it catches :func:`asyncio.timeout`'s
    error.
    """
