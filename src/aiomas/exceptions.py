"""Exception types used by aiomas.

Every error that aiomas defines derives from :class:`AiomasError`:

.. code-block:: text

    AiomasError
    ├── RemoteException      the peer raised an error while handling our request
    ├── SerializationError   we were asked to encode something the codec cannot
    └── ProtocolError        the peer sent bytes that break the wire protocol
                             (also a RuntimeError, as aiomas 1.x raised for it)

A connection that ends while requests are in flight fails them with the built-in
:class:`ConnectionResetError`; when a :class:`ProtocolError` ended it, that error is
the ``__cause__``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AiomasError", "ProtocolError", "RemoteException", "SerializationError"]


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


class ProtocolError(AiomasError, RuntimeError):
    """The peer violated the wire protocol (bad frame, bad message, unknown id).

    The connection on which it happened is closed; other connections are unaffected.
    """
