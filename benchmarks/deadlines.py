"""What deadlines cost, and how soon a cancel reaches the peer.

Usage::

    python benchmarks/deadlines.py [latency] [cost] [--repeat 200]
        [--slices 40] [--transports tcp unix tls localqueue]
    python benchmarks/deadlines.py callgrind KIND N

``latency``: for each transport, *repeat* times, a call to a handler that
sleeps forever is made under ``aiomas.deadline(20 ms)`` over a connection with
the wire extension; printed are the median, the 99th percentile and the
maximum of two delays after the caller's deadline: until the caller's block
raises ``DeadlineExceeded``, and until the handler on the peer sees
``CancelledError`` (client and server run in this one process, on one clock).
TLS needs ``trustme`` (the dev extra) for its certificates.

``cost``: calls per second, one at a time, over TCP loopback, alternating
between the sides in slices of 50 ms, round after round (medians, and the
median of the per-round ratios to ``plain``):

* ``plain``: a connection without the extension, no deadline (as before);
* ``plain A/A``: a second such connection (the noise band);
* ``extended``: the extension agreed, no deadline;
* ``ext in block``: the extension, every call inside one long
  ``aiomas.deadline()`` block (each carries the time left);
* ``ext block/call``: the extension, ``async with aiomas.deadline(...)``
  around every call;
* ``plain in block``: no extension, calls inside one block (the deadline
  stays local);
* ``plain in timeout``: no extension, calls inside one ``asyncio.timeout()``
  block: what a pending timer costs the event loop alone, for reference.

``callgrind KIND N``: make *N* round trips of side *KIND* (``plain``,
``extended``, ``in-block``, ``plain-in-block``, ``plain-in-timeout``) over a
LocalQueue and exit, for
``valgrind --tool=callgrind``: the difference between *N* and 0 round trips,
divided by *N*, is the instructions per round trip (client and server).
Side ``plain`` runs on revisions from before the extension too (put their
``src`` first on ``PYTHONPATH``).

Benchmarks are run on purpose, never as tests; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomas
from aiomas import local_queue
from aiomas.benchmark import rotations

SLICE = 0.05
DEADLINE = 0.02
Send = Callable[[Any], Awaitable[Any]]


class Service:
    router = aiomas.rpc.Service()

    def __init__(self) -> None:
        self.cancelled: list[float] = []

    @aiomas.expose
    def echo(self, content: Any) -> Any:
        return content

    @aiomas.expose
    async def sleep(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.append(asyncio.get_running_loop().time())
            raise


def tls_contexts(directory: str) -> tuple[Any, Any]:
    """A server and a client context for 127.0.0.1, from a throwaway CA."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    files = {name: str(Path(directory) / f"{name}.pem") for name in "ack"}
    ca.cert_pem.write_to_path(files["a"])
    cert.private_key_pem.write_to_path(files["k"])
    Path(files["c"]).write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    return (
        aiomas.make_ssl_server_context(files["a"], files["c"], files["k"]),
        aiomas.make_ssl_client_context(files["a"], files["c"], files["k"]),
    )


@contextlib.asynccontextmanager
async def connection(
    kind: str, service: Service, directory: str, extensions: bool = True
) -> AsyncIterator[aiomas.rpc.RpcClient]:
    """A client connected over *kind* to a server of *service*."""
    server_kwargs: dict[str, Any] = {}
    client_kwargs: dict[str, Any] = {}
    addr: Any
    if kind == "tls":
        server_kwargs["ssl"], client_kwargs["ssl"] = tls_contexts(directory)
    if kind in ("tcp", "tls"):
        addr = ("127.0.0.1", 0)
    elif kind == "unix":
        addr = str(Path(directory) / f"s-{time.monotonic_ns()}")
    else:
        addr = aiomas.get_queue(f"bench-{time.monotonic_ns()}")
    if extensions:
        # (Only then: so that plain connections run on revisions from before
        # the extension, too, for the callgrind mode.)
        server_kwargs["extensions"] = client_kwargs["extensions"] = True
    server = await aiomas.rpc.start_server(addr, service, **server_kwargs)
    if kind in ("tcp", "tls"):
        addr = server.sockets[0].getsockname()[:2]  # type: ignore[attr-defined]
    client = await aiomas.rpc.open_connection(addr, **client_kwargs)
    if extensions:
        await client.wait_extensions()
    try:
        yield client
    finally:
        await client.close()
        server.close()
        await server.wait_closed()
        local_queue.clear_queue_cache()


def percentiles(values: list[float]) -> str:
    values = sorted(values)
    p99 = values[min(len(values) - 1, round(0.99 * (len(values) - 1)))]
    return (
        f"p50 {statistics.median(values) * 1000:6.2f}  p99 {p99 * 1000:6.2f}"
        f"  max {values[-1] * 1000:6.2f} ms"
    )


async def latency(transports: list[str], repeat: int) -> None:
    loop = asyncio.get_running_loop()
    print(
        f"Delay after the caller's deadline ({DEADLINE * 1000:.0f} ms), "
        f"{repeat} calls per transport:"
    )
    with tempfile.TemporaryDirectory(prefix="aiomas-") as directory:
        for kind in transports:
            service = Service()
            caller: list[float] = []
            handler: list[float] = []
            async with connection(kind, service, directory) as client:
                assert client.extensions == {"cancel", "deadline", "trace"}
                for _ in range(repeat):
                    try:
                        async with aiomas.deadline(DEADLINE) as deadline:
                            await client.remote.sleep()
                    except aiomas.DeadlineExceeded:
                        caller.append(loop.time() - deadline.when)
                    while len(service.cancelled) < len(caller):
                        await asyncio.sleep(0.0005)
                    handler.append(service.cancelled[-1] - deadline.when)
            print(f"  {kind:<10} caller   {percentiles(caller)}", flush=True)
            print(f"  {'':<10} handler  {percentiles(handler)}", flush=True)


Block = Callable[[], contextlib.AbstractAsyncContextManager[Any]]


def no_block() -> contextlib.AbstractAsyncContextManager[Any]:
    return contextlib.nullcontext()


def deadline_block() -> contextlib.AbstractAsyncContextManager[Any]:
    return aiomas.deadline(3600)


def timeout_block() -> contextlib.AbstractAsyncContextManager[Any]:
    return asyncio.timeout(3600)


async def rate(send: Send, seconds: float, block: Block) -> float:
    """Calls per second of ``send()``, one at a time, for *seconds*, all in
    one ``async with block():``."""
    count = 0
    end = time.perf_counter() + seconds
    start = time.perf_counter()
    async with block():
        while time.perf_counter() < end:
            await send("ohai")
            count += 1
    return count / (time.perf_counter() - start)


async def cost(slices: int) -> None:
    with tempfile.TemporaryDirectory(prefix="aiomas-") as directory:
        async with contextlib.AsyncExitStack() as stack:
            plain = await stack.enter_async_context(
                connection("tcp", Service(), directory, extensions=False)
            )
            plain2 = await stack.enter_async_context(
                connection("tcp", Service(), directory, extensions=False)
            )
            extended = await stack.enter_async_context(
                connection("tcp", Service(), directory)
            )
            ext_echo = extended.remote.echo

            async def block_per_call(content: Any) -> Any:
                async with aiomas.deadline(3600):
                    return await ext_echo(content)

            sides: dict[str, tuple[Send, Block]] = {
                "plain": (plain.remote.echo, no_block),
                "plain A/A": (plain2.remote.echo, no_block),
                "extended": (ext_echo, no_block),
                "ext in block": (ext_echo, deadline_block),
                "ext block/call": (block_per_call, no_block),
                "plain in block": (plain.remote.echo, deadline_block),
                "plain in timeout": (plain.remote.echo, timeout_block),
            }
            for send, block in sides.values():  # warm up
                await rate(send, SLICE, block)
            rates: dict[str, list[float]] = {side: [] for side in sides}
            for order in rotations(sides, slices):
                for side in order:
                    send, block = sides[side]
                    rates[side].append(await rate(send, SLICE, block))
    print(
        f"Calls per second over TCP, one at a time, {slices} rounds of "
        f"{SLICE * 1000:.0f} ms (ratio: median of per-round ratios to plain):"
    )
    base = rates["plain"]
    for side, values in rates.items():
        ratio = statistics.median(v / b for v, b in zip(values, base, strict=True))
        per_call = 1e6 / statistics.median(values)
        print(
            f"  {side:<15} {statistics.median(values):>9,.0f} calls/s"
            f"  {per_call:6.1f} us/call  ratio {ratio:5.3f}",
            flush=True,
        )


CALLGRIND_SIDES: dict[str, tuple[bool, Block]] = {
    # kind: (extension, block around the calls)
    "plain": (False, no_block),
    "extended": (True, no_block),
    "in-block": (True, deadline_block),
    "plain-in-block": (False, deadline_block),
    "plain-in-timeout": (False, timeout_block),
}


async def callgrind(kind: str, n: int) -> None:
    extensions, block = CALLGRIND_SIDES[kind]
    with tempfile.TemporaryDirectory(prefix="aiomas-") as directory:
        async with connection(
            "localqueue", Service(), directory, extensions=extensions
        ) as client:
            echo = client.remote.echo
            await echo("warm up")
            async with block():
                for _ in range(n):
                    await echo("ohai")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="benchmarks/deadlines.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "what", nargs="*", default=["latency", "cost"], help="latency, cost"
    )
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument(
        "--transports", nargs="*", default=["tcp", "unix", "tls", "localqueue"]
    )
    args = parser.parse_args()
    if args.what[:1] == ["callgrind"]:
        kind, n = args.what[1], int(args.what[2])
        asyncio.run(callgrind(kind, n))
        return
    print(f"aiomas {aiomas.__version__}, Python {sys.version.split()[0]}")
    if "latency" in args.what:
        asyncio.run(latency(args.transports, args.repeat))
    if "cost" in args.what:
        asyncio.run(cost(args.slices))


if __name__ == "__main__":
    main()
