"""Request/reply round trips per second over TCP loopback: channel, RPC, agents.

Client and server run in separate processes.  Each workload is measured for the
aiomas channel, for aiomas RPC (a call of an exposed echo function), for agents
(an agent calling an exposed method of an agent in another container), and for
the *floor*: a bare :class:`asyncio.Protocol` doing the same framing (4-byte length
header) and the same encoding with nothing around it.  Runs alternate between the
implementations so that machine noise hits all alike; the table shows median, min
and max of the rounds and the median as a ratio to the floor.

Usage::

    python benchmarks/bench_roundtrip.py [--rounds 5] [--seconds 2]
        [--codec json msgpack] [--impl channel rpc agent] [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, cast

import aiomas

HEADER = struct.Struct(">L")
CONTENT = ["ohai", 42, 3.14]


def raw_codec(name: str) -> tuple[Callable[[Any], bytes], Callable[[bytes], Any]]:
    if name == "json":
        return (lambda obj: json.dumps(obj).encode()), (lambda data: json.loads(data))
    import msgpack

    return (
        lambda obj: msgpack.packb(obj, use_bin_type=True),
        lambda data: msgpack.unpackb(data, raw=False, use_list=False),
    )


class RawProtocol(asyncio.Protocol):
    """The floor: length-prefixed frames and [type, id, content] messages."""

    def __init__(self, codec: str, serve: bool) -> None:
        self.encode, self.decode = raw_codec(codec)
        self.serve = serve
        self.buffer = bytearray()
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.next_id = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports are duck-typed.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while len(buffer) >= 4:
            (size,) = HEADER.unpack_from(buffer)
            if len(buffer) < 4 + size:
                break
            msg_type, msg_id, content = self.decode(bytes(buffer[4 : 4 + size]))
            del buffer[: 4 + size]
            if msg_type == 0 and self.serve:
                payload = self.encode([1, msg_id, content])
                assert self.transport is not None
                self.transport.write(HEADER.pack(len(payload)) + payload)
            else:
                self.pending.pop(msg_id).set_result(content)

    def send(self, content: Any) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        msg_id = self.next_id
        self.next_id += 1
        self.pending[msg_id] = future
        payload = self.encode([0, msg_id, content])
        assert self.transport is not None
        self.transport.write(HEADER.pack(len(payload)) + payload)
        return future


async def echo(channel: aiomas.channel.Channel) -> None:
    try:
        while True:
            request = await channel.recv()
            await request.reply(request.content)
    except ConnectionResetError:
        pass


@aiomas.expose
def rpc_echo(content: Any) -> Any:
    return content


class EchoAgent(aiomas.Agent):
    @aiomas.expose
    def echo(self, content: Any) -> Any:
        return content


async def serve(impl: str, codec: str) -> None:
    loop = asyncio.get_running_loop()
    codec_cls = aiomas.JSON if codec == "json" else aiomas.MsgPack
    server: asyncio.AbstractServer
    if impl == "floor":
        server = await loop.create_server(
            lambda: RawProtocol(codec, serve=True), "127.0.0.1", 0
        )
    elif impl == "rpc":
        service = aiomas.rpc.ServiceDict({"echo": rpc_echo})
        server = await aiomas.rpc.start_server(
            ("127.0.0.1", 0), service, codec=codec_cls
        )
    elif impl == "agent":
        container = await aiomas.Container.create(
            ("127.0.0.1", 0), codec=codec_cls, as_coro=True
        )
        EchoAgent(container)
        print(container.base_url.rsplit(":", 1)[1].rstrip("/"), flush=True)
        await loop.run_in_executor(None, sys.stdin.read)
        await container.shutdown(as_coro=True)
        return
    else:
        server = await aiomas.channel.start_server(
            ("127.0.0.1", 0), echo, codec=codec_cls
        )
    print(server.sockets[0].getsockname()[1], flush=True)  # type: ignore[attr-defined]
    # Serve until the parent closes our stdin.
    await loop.run_in_executor(None, sys.stdin.read)
    server.close()


async def measure(
    impl: str, codec: str, port: int, in_flight: int, seconds: float
) -> float:
    loop = asyncio.get_running_loop()
    if impl == "floor":
        transport, protocol = await loop.create_connection(
            lambda: RawProtocol(codec, serve=False), "127.0.0.1", port
        )
        send = protocol.send
        close: Callable[[], Any] = transport.close
    elif impl == "rpc":
        codec_cls = aiomas.JSON if codec == "json" else aiomas.MsgPack
        client = await aiomas.rpc.open_connection(("127.0.0.1", port), codec=codec_cls)
        send = client.remote.echo
        close = client.close
    elif impl == "agent":
        codec_cls = aiomas.JSON if codec == "json" else aiomas.MsgPack
        container = await aiomas.Container.create(
            ("127.0.0.1", 0), codec=codec_cls, as_coro=True
        )
        proxy = await container.connect(f"tcp://127.0.0.1:{port}/0")
        send = proxy.echo
        close = container.shutdown
    else:
        codec_cls = aiomas.JSON if codec == "json" else aiomas.MsgPack
        channel = await aiomas.channel.open_connection(
            ("127.0.0.1", port), codec=codec_cls
        )
        send = channel.send
        close = channel.close
    count = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            await send(CONTENT)
            count += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - start
    result = close(as_coro=True) if impl == "agent" else close()
    if asyncio.iscoroutine(result):
        await result
    return count / elapsed


def run_loop(coro: Any, use_uvloop: bool) -> Any:
    """Run *coro* on a new default asyncio loop or on uvloop."""
    if not use_uvloop:
        return asyncio.run(coro)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def run_round(
    impl: str, codec: str, in_flight: int, seconds: float, use_uvloop: bool
) -> float:
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", impl, "--codec", codec]
        + (["--uvloop"] if use_uvloop else []),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        result: float = run_loop(
            measure(impl, codec, port, in_flight, seconds), use_uvloop
        )
        return result
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--uvloop", action="store_true", help="run client and server on uvloop"
    )
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument(
        "--codec", nargs="+", choices=["json", "msgpack"], default=["json", "msgpack"]
    )
    parser.add_argument(
        "--impl",
        nargs="+",
        choices=["channel", "rpc", "agent"],
        default=["channel", "rpc", "agent"],
    )
    parser.add_argument(
        "--serve", choices=["floor", "channel", "rpc", "agent"], help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.serve:
        run_loop(serve(args.serve, args.codec[0]), args.uvloop)
        return

    loop_name = "uvloop" if args.uvloop else "default asyncio loop"
    print(
        f"Python {sys.version.split()[0]}, {loop_name}, {args.rounds} rounds of "
        f"{args.seconds:g} s, TCP loopback, client and server in 2 processes"
    )
    print(
        f"{'workload (calls/s)':<38}{'median':>9}{'min':>9}{'max':>9}{'vs floor':>10}"
    )
    impls = ["floor", *args.impl]
    for codec in args.codec:
        for in_flight in (1, 100):
            results: dict[str, list[float]] = {impl: [] for impl in impls}
            for _ in range(args.rounds):
                for impl in impls:
                    results[impl].append(
                        run_round(impl, codec, in_flight, args.seconds, args.uvloop)
                    )
            floor = statistics.median(results["floor"])
            for impl in impls:
                values = results[impl]
                median = statistics.median(values)
                name = f"{impl}, {codec}, {in_flight} in flight"
                print(
                    f"{name:<38}{median:>9,.0f}{min(values):>9,.0f}"
                    f"{max(values):>9,.0f}{median / floor:>10.0%}"
                )


if __name__ == "__main__":
    main()
