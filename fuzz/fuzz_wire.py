"""Fuzz target: the frame decoder and the RPC dispatcher, byte by byte.

Every input is a byte stream that a peer could send.  It is cut into chunks (the
first input byte picks the chunk size) and fed to

1. a :class:`aiomas.wire.FrameReader`, which must either return payloads that
   re-frame to a prefix of the stream or raise ``ProtocolError``, and
2. a server-side :class:`aiomas.channel.ChannelProtocol` with an RPC service on
   a fake transport, which must never raise: bad input closes the connection
   (with a logged reason), anything else is answered.

Run it (needs ``pip install atheris``, Linux)::

    python fuzz/fuzz_wire.py -max_total_time=3600    # an hour
    python fuzz/fuzz_wire.py -atheris_runs=100000     # a number of inputs

The test suite runs it for a bounded number of inputs (tests/test_fuzz.py).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import atheris

with atheris.instrument_imports():
    import aiomas
    from aiomas import wire
    from aiomas.channel import ChannelProtocol
    from aiomas.exceptions import ProtocolError

logging.getLogger("aiomas").setLevel(logging.CRITICAL)  # bad input is logged


class FakeTransport(asyncio.Transport):
    """Takes what the protocol writes; reads nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self.closed = False

    def write(self, data: Any) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("fuzzer", 1) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Service:
    router = aiomas.rpc.Service()

    @aiomas.expose
    def echo(self, value: Any) -> Any:
        return value

    @aiomas.expose
    def fail(self) -> None:
        raise ValueError("fails on purpose")

    @aiomas.expose
    async def later(self, value: Any) -> Any:
        return value


LOOP = asyncio.new_event_loop()
asyncio.set_event_loop(LOOP)
SERVICE = Service()


def chunks(data: bytes) -> list[bytes]:
    if not data:
        return []
    size = data[0] % 64 + 1
    rest = data[1:]
    return [rest[i : i + size] for i in range(0, len(rest), size)]


def check_reader(data: bytes) -> None:
    reader = wire.FrameReader(max_frame_size=2**16)
    stream = data[1:]
    payloads: list[bytes | bytearray] = []
    try:
        for chunk in chunks(data):
            payloads.extend(reader.feed(chunk))
    except ProtocolError:
        pass
    framed = b"".join(wire.frame(bytes(p)) for p in payloads)
    assert stream.startswith(framed), "payloads do not re-frame to the stream"


async def check_protocol(data: bytes) -> None:
    codec = aiomas.MsgPack if data and data[0] & 0x80 else aiomas.JSON
    protocol = ChannelProtocol(codec(), max_frame_size=2**16)
    transport = FakeTransport()
    protocol.connection_made(transport)
    assert protocol.channel is not None
    client = aiomas.rpc.RpcClient(protocol.channel, SERVICE)
    for chunk in chunks(data):
        if transport.closed:
            break
        buffer = protocol.get_buffer(len(chunk))
        n = min(len(buffer), len(chunk))
        buffer[:n] = chunk[:n]
        protocol.buffer_updated(n)
    await asyncio.sleep(0)  # let asynchronous handlers answer
    protocol.connection_lost(None)
    await client.close()


def test_one_input(data: bytes) -> None:
    check_reader(data)
    LOOP.run_until_complete(check_protocol(data))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
