"""Fuzz target: the frame decoder and the RPC dispatcher, byte by byte.

Every input is a byte stream that a peer could send.  It is cut into chunks (the
first input byte picks the chunk size) and fed to

1. a :class:`aiomas.wire.FrameReader`, which must either return payloads that
   re-frame to a prefix of the stream or raise ``ProtocolError``,
2. the sans-I/O core, a :class:`aiomas.protocol.Connection` (no event loop, no
   transport), which must return the same events whether it gets the stream at
   once or in chunks, raise nothing, and send only well-formed frames (it
   echoes every request it passes on), and
3. a server-side :class:`aiomas.channel.ChannelProtocol` with an RPC service on
   a fake transport (:class:`aiomas.testing.FakeTransport`), which must never
   raise, nor fail unseen (an error passed to the loop's exception handler or
   logged at ERROR level): bad input closes the connection (with a logged
   reason), anything else is answered.

Run it (needs ``pip install atheris``, Linux) on a copy of its seed corpus, as
the fuzzer adds the inputs it finds to the corpus directory::

    cp -r fuzz/corpus/wire /tmp/wire
    python fuzz/fuzz_wire.py -max_len=2048 -max_total_time=3600 /tmp/wire
    python fuzz/fuzz_wire.py -atheris_runs=100000 /tmp/wire   # a number of inputs

The test suite runs it for a bounded number of inputs (tests/test_fuzz.py).
"""

from __future__ import annotations

from typing import Any

import atheris

# Only aiomas is instrumented: instrumenting what it imports (asyncio, ssl,
# Arrow, ...) would cost seconds at every start.
with atheris.instrument_imports(include=["aiomas"]):
    import harness

    import aiomas
    from aiomas import protocol as core
    from aiomas import wire
    from aiomas.channel import ChannelProtocol
    from aiomas.exceptions import ProtocolError
    from aiomas.testing import FakeTransport, feed, sent_messages, settle


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


SERVICE = Service()


def check_reader(data: bytes) -> None:
    reader = wire.FrameReader(max_frame_size=2**16)
    stream = data[1:]
    payloads: list[bytes | bytearray] = []
    try:
        for chunk in harness.split_stream(data):
            payloads.extend(reader.feed(chunk))
    except ProtocolError:
        pass
    framed = b"".join(wire.frame(bytes(p)) for p in payloads)
    assert stream.startswith(framed), "payloads do not re-frame to the stream"


def run_core(codec_cls: type[aiomas.codecs.Codec], chunks: list[bytes]) -> list[str]:
    """Feed *chunks* to a core that waits for two replies of its own; return
    its events (as text) and check what it sends."""
    conn = core.Connection(codec_cls(), max_frame_size=2**16)
    conn.hold_requests = True
    conn.send_request("first")
    conn.send_request("second")
    events: list[str] = []
    for chunk in chunks:
        for event in conn.receive_data(chunk):
            if isinstance(event, core.RequestReceived):
                try:
                    conn.send_result(event.message_id, event.content)
                except aiomas.SerializationError:
                    pass  # (answered with a failure by the core)
            events.append(repr(event))
    for message in sent_messages(conn):  # (which finds partial frames)
        assert type(message) in (list, tuple), message
        assert len(message) == 3, message
    return events


def check_core(data: bytes) -> None:
    codec_cls = aiomas.MsgPack if data and data[0] & 0x80 else aiomas.JSON
    stream = data[1:]
    whole = run_core(codec_cls, [stream])
    assert run_core(codec_cls, harness.split_stream(data)) == whole, (
        "chunking changed the events"
    )


async def check_protocol(data: bytes) -> None:
    codec = aiomas.MsgPack if data and data[0] & 0x80 else aiomas.JSON
    protocol = ChannelProtocol(codec(), max_frame_size=2**16)
    transport = FakeTransport(protocol, peername=("fuzzer", 1))
    assert protocol.channel is not None
    client = aiomas.rpc.RpcClient(protocol.channel, SERVICE)
    feed(protocol, transport, harness.split_stream(data))
    await settle(1)  # let asynchronous handlers answer
    transport.lose_connection()
    await client.close()


def test_one_input(data: bytes) -> None:
    check_reader(data)
    check_core(data)
    harness.LOOP.run_until_complete(check_protocol(data))
    harness.HIDDEN_ERRORS.check()


if __name__ == "__main__":
    harness.fuzz(test_one_input)
