"""Compare this checkout of aiomas with an older commit, in one process.

Usage::

    python benchmarks/compare.py REV [--slices 40] [--only TEXT ...] [--fake]
                                     [--loop asyncio|uvloop]

``REV`` is any git revision of this repository (``main~3``, a tag, a hash).
Its ``src/aiomas`` is unpacked into a temporary directory as the package
``aiomas_base`` (its imports rewritten), so that both versions run in this one
process.  For each workload (channel, RPC and agents; JSON and MsgPack; 1 and
100 calls in flight) the script sets up both versions twice and the raw-asyncio
floor of :mod:`aiomas.benchmark`, then alternates between them in slices of
50 ms, round after round, and prints medians of the calls per second and the
median of the per-round ratios:

* ``new/base``: this checkout against ``REV`` (above 1: faster);
* ``A/A``: the second copy of ``REV`` against the first -- how far apart two
  identical sides land on this machine right now (the noise band);
* ``new/floor`` and ``base/floor``: each against the bare asyncio protocol.

Client and server of each side run in this process over TCP loopback, so the
figures include both ends.  ``--fake`` measures the library alone instead:
both ends are connected by in-memory transports and driven without the event
loop (channel and RPC only), in microseconds per round trip.

Benchmarks are run on purpose, never as tests; shared machines are noisy, so
compare ratios from one run, and look at the A/A band before believing a
difference.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import aiomas
from aiomas.benchmark import calls_per_second, floor_side, library_side, rotations

SLICE = 0.05
SMALL = ["ohai", 42, 3.14]


def unpack_base(rev: str, directory: Path) -> ModuleType:
    """Unpack ``src/aiomas`` of *rev* as the package ``aiomas_base``."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", rev, "src/aiomas"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    package = directory / "aiomas_base"
    (directory / "src" / "aiomas").rename(package)
    for path in package.glob("*.py"):
        text = path.read_text()
        text = re.sub(r"\bfrom aiomas(\.| import)", r"from aiomas_base\1", text)
        text = re.sub(
            r"^(\s*)import aiomas$", r"\1import aiomas_base as aiomas", text, flags=re.M
        )
        path.write_text(text)
    sys.path.insert(0, str(directory))
    return importlib.import_module("aiomas_base")


def report(name: str, rates: dict[str, list[float]], unit: str) -> None:
    med = {side: statistics.median(values) for side, values in rates.items()}
    ratio = statistics.median(
        n / b for n, b in zip(rates["new"], rates["base"], strict=True)
    )
    aa = statistics.median(
        a / b for a, b in zip(rates["base2"], rates["base"], strict=True)
    )
    line = (
        f"{name:<22}base {med['base']:>9,.1f}  new {med['new']:>9,.1f} {unit}"
        f"  new/base {ratio:5.3f}  A/A {aa:5.3f}"
    )
    if "floor" in med:
        line += (
            f"  floor {med['floor']:>9,.1f}  new/floor {med['new'] / med['floor']:4.2f}"
            f"  base/floor {med['base'] / med['floor']:4.2f}"
        )
    print(line, flush=True)


async def compare_tcp(base: ModuleType, only: list[str], slices: int) -> None:
    for layer in ("channel", "rpc", "rpc-async", "agent"):
        for codec_name in ("json", "msgpack"):
            for in_flight in (1, 100):
                name = f"{layer} {codec_name} {in_flight}"
                if only and not any(text in name for text in only):
                    continue
                sides = {
                    "floor": await floor_side(codec_name),
                    "base": await library_side(layer, codec_name, base),
                    "new": await library_side(layer, codec_name, aiomas),
                    "base2": await library_side(layer, codec_name, base),
                }
                for send, _ in sides.values():  # warm up
                    await calls_per_second(send, SMALL, in_flight, SLICE)
                rates: dict[str, list[float]] = {side: [] for side in sides}
                for order in rotations(sides, slices):
                    for side in order:
                        rates[side].append(
                            await calls_per_second(
                                sides[side][0], SMALL, in_flight, SLICE
                            )
                        )
                for _, close in sides.values():
                    await close()
                report(name, rates, "calls/s")


# --- --fake: the library alone -------------------------------------------------


def fake_side(
    lib: Any, layer: str, codec_name: str
) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """Two ChannelProtocols of *lib* joined by in-memory transports; returns
    a function that makes *n* round trips, *batch* requests at a time, and one
    that ends the connection."""
    codec = lib.JSON if codec_name == "json" else lib.MsgPack
    keep: list[Any] = []

    class Transport(asyncio.Transport):
        def __init__(self, name: str) -> None:
            super().__init__({"peername": name})
            self.out: list[bytes] = []

        def write(self, data: Any) -> None:
            self.out.append(bytes(data))

        def is_closing(self) -> bool:
            return False

    def deliver(transport: Transport, protocol: Any) -> None:
        view = memoryview(b"".join(transport.out))
        transport.out.clear()
        while view:
            buffer = protocol.get_buffer(len(view))
            n = min(len(buffer), len(view))
            buffer[:n] = view[:n]
            protocol.buffer_updated(n)
            view = view[n:]

    def connected(channel: Any) -> None:
        if layer == "rpc":
            service = lib.rpc.ServiceDict({"echo": lib.expose(lambda c: c)})
            keep.append(lib.rpc.RpcClient(channel, service))
        elif hasattr(lib.channel.Request, "reply_nowait"):
            channel.set_request_handler(lambda req: req.reply_nowait(req.content))
        else:  # (before Request.reply_nowait() existed)
            channel.set_request_handler(lambda req: req._answer(1, req.content))  # noqa: SLF001

    server = lib.channel.ChannelProtocol(codec(), connected)
    client = lib.channel.ChannelProtocol(codec())
    to_client, to_server = Transport("client"), Transport("server")
    server.connection_made(to_client)
    client.connection_made(to_server)
    keep.append(lib.rpc.RpcClient(client.channel))
    send = keep[-1].remote.echo if layer == "rpc" else client.channel.send

    # What the loop would do right after the callers woken by a read have run
    # (revisions since 2026-12 gather their writes until then).
    flush_client = getattr(client, "flush", lambda: None)
    flush_server = getattr(server, "flush", lambda: None)

    def round_trips(n: int, batch: int) -> None:
        for _ in range(n // batch):
            futures = [send(SMALL) for _ in range(batch)]
            flush_client()
            deliver(to_server, server)
            flush_server()
            deliver(to_client, client)
            for future in futures:
                future.result()

    def end() -> None:
        server.connection_lost(None)
        client.connection_lost(None)

    return round_trips, end


async def compare_fake(base: ModuleType, only: list[str], slices: int) -> None:
    for layer in ("channel", "rpc"):
        for codec_name in ("json", "msgpack"):
            for batch in (1, 100):
                name = f"{layer} {codec_name} {batch}"
                if only and not any(text in name for text in only):
                    continue
                sides = {
                    "base": fake_side(base, layer, codec_name),
                    "new": fake_side(aiomas, layer, codec_name),
                    "base2": fake_side(base, layer, codec_name),
                }
                await asyncio.sleep(0)  # (RPC service tasks start)
                n = 2000
                for run, _ in sides.values():
                    run(n, batch)
                per_second: dict[str, list[float]] = {side: [] for side in sides}
                for order in rotations(sides, slices):
                    for side in order:
                        start = time.perf_counter()
                        sides[side][0](n, batch)
                        per_second[side].append(n / (time.perf_counter() - start))
                for _, end in sides.values():
                    end()
                for _ in range(5):  # (RPC service tasks end)
                    await asyncio.sleep(0)
                report(name, per_second, "round trips/s")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="benchmarks/compare.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("rev", help="the git revision to compare with")
    parser.add_argument("--slices", type=int, default=40, help="rounds (40)")
    parser.add_argument("--only", nargs="*", default=[], help="workloads to run")
    parser.add_argument("--fake", action="store_true", help="the library alone")
    parser.add_argument(
        "--loop", choices=["asyncio", "uvloop"], default="asyncio", help="(asyncio)"
    )
    args = parser.parse_args()
    loop_factory = None
    if args.loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with tempfile.TemporaryDirectory() as directory:
        base = unpack_base(args.rev, Path(directory))
        print(
            f"aiomas {aiomas.__version__} (this checkout) vs {args.rev}, Python "
            f"{sys.version.split()[0]}, {args.loop}, {args.slices} rounds of "
            f"{SLICE * 1000:.0f} ms"
        )
        compare = compare_fake if args.fake else compare_tcp
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(compare(base, args.only, args.slices))


if __name__ == "__main__":
    main()
