"""aiomas: request-reply channels, RPC and multi-agent systems on asyncio.

This module gives short access to the most used names; everything also lives in
its own submodule (:mod:`aiomas.channel`, :mod:`aiomas.codecs`, ...).
"""

from aiomas import (
    agent,
    channel,
    clocks,
    codecs,
    deadlines,
    exceptions,
    local_queue,
    protocol,
    rpc,
    subproc,
    tracing,
    util,
    wire,
)
from aiomas.agent import Agent, Container, SSLCerts
from aiomas.clocks import AsyncioClock, BaseClock, ExternalClock
from aiomas.codecs import JSON, MsgPack, MsgPackBlosc, serializable
from aiomas.deadlines import deadline, remaining
from aiomas.exceptions import (
    AiomasError,
    ConnectionLostError,
    DeadlineExceeded,
    DecodeError,
    ProtocolError,
    ProtocolResetError,
    RemoteException,
    SerializationError,
)
from aiomas.local_queue import get_queue
from aiomas.rpc import expose
from aiomas.util import (
    create_task,
    make_ssl_client_context,
    make_ssl_server_context,
    run,
)

__version__ = "2.1.0.dev0"

__all__ = [
    "JSON",
    "Agent",
    "AiomasError",
    "AsyncioClock",
    "BaseClock",
    "ConnectionLostError",
    "Container",
    "DeadlineExceeded",
    "DecodeError",
    "ExternalClock",
    "MsgPack",
    "MsgPackBlosc",
    "ProtocolError",
    "ProtocolResetError",
    "RemoteException",
    "SSLCerts",
    "SerializationError",
    "agent",
    "channel",
    "clocks",
    "codecs",
    "create_task",
    "deadline",
    "deadlines",
    "exceptions",
    "expose",
    "get_queue",
    "local_queue",
    "make_ssl_client_context",
    "make_ssl_server_context",
    "protocol",
    "remaining",
    "rpc",
    "run",
    "serializable",
    "subproc",
    "tracing",
    "util",
    "wire",
]
