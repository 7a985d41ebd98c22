"""Exception types used by aiomas.

Every error that aiomas defines derives from :class:`AiomasError`:

.. code-block:: text

    AiomasError
    ├── RemoteException      the peer raised an error while handling our request
    ├── SerializationError   we were asked to encode something the codec cannot
    │   └── DecodeError      what the peer sent cannot be decoded (its error)
    └── ProtocolError        the peer sent bytes that break the wire protocol
        │                    (also a RuntimeError, as aiomas 1.x raised for it)
        └── ProtocolResetError  the connection was closed for that: also a
                                ConnectionResetError

A connection that ends while requests are in flight fails them with the built-in
:class:`ConnectionResetError`.  When a :class:`ProtocolError` ended it, they (and
every later ``send()`` or ``recv()``) get a :class:`ProtocolResetError`, which
``except ConnectionError`` and ``except RuntimeError`` (what the 1.0.3
documentation promises for "an invalid message type was received") both catch;
the :class:`ProtocolError` is its ``__cause__``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AiomasError",
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


class ProtocolResetError(ProtocolError, ConnectionResetError):
    """The connection was closed because the peer violated the wire protocol.

    Raised by calls in flight on that connection and by every later
    ``send()`` and ``recv()`` on it.  It is a :class:`ConnectionResetError` (so
    code that handles lost connections handles it) and a :class:`ProtocolError`
    (so also a :class:`RuntimeError`, as the 1.0.3 documentation promises).  The
    :class:`ProtocolError` that ended the connection is its ``__cause__``.
    """
