"""What tracing costs: nothing when it is off, and how much per call when on.

Usage::

    python benchmarks/tracing_cost.py [--slices 40] [--base REV] [--callgrind]

Both ends of an RPC connection run in this process over in-memory transports
(the ``--fake`` set-up of ``benchmarks/compare.py``: the library alone, no
event loop, no sockets).  Sides, alternated in slices round after round:

* ``off``, ``off2``: tracing off, twice (``off2/off`` is the A/A noise band);
* ``sink``: both ends traced into a sink that drops the records (the cost of
  making them);
* ``file``: both ends traced into a trace file in a temporary directory;
* ``base`` (with ``--base REV``): the library of *REV*, e.g. ``main``.

It prints the median microseconds per round trip of each side and the median
of the per-round ratios.  A traced round trip makes four records (send and
receive of the request, and of the reply).

``--callgrind`` also counts the instructions of a round trip with tracing off
under valgrind's callgrind, for this checkout and *REV*: the difference of
runs of 2,000 and 4,000 round trips, divided by 2,000 (so set-up and import
cancel out).  Run it on purpose, never as a test; shared machines are noisy,
so compare ratios from one run and look at the A/A band first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare

import aiomas
from aiomas import tracing
from aiomas.benchmark import rotations

N = 2000


def _drop(record: dict[str, Any]) -> None:
    pass


def traced_side(
    target: Any,
) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """The ``--fake`` RPC round trips of compare.py, both ends traced into
    *target* (``None``: off)."""
    if target is not None:
        tracing.enable(target)
    try:
        return compare.fake_side(aiomas, "rpc", "json")
    finally:
        tracing.disable()


async def measure(slices: int, base_rev: str | None, directory: Path) -> None:
    sides = {
        "off": traced_side(None),
        "off2": traced_side(None),
        "sink": traced_side(_drop),
        "file": traced_side(directory),
    }
    if base_rev is not None:
        (directory / "base").mkdir()
        base = compare.unpack_base(base_rev, directory / "base")
        sides["base"] = compare.fake_side(base, "rpc", "json")
    await asyncio.sleep(0)  # (RPC service tasks start)
    for run, _ in sides.values():
        run(N, 1)
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    for order in rotations(sides, slices):
        for side in order:
            start = time.perf_counter()
            sides[side][0](N, 1)
            seconds[side].append((time.perf_counter() - start) / N)
    for _, end in sides.values():
        end()
    for _ in range(5):
        await asyncio.sleep(0)
    off = statistics.median(seconds["off"]) * 1e6
    print(f"{'side':<6} {'us/round trip':>14} {'ratio to off':>13}")
    for side, values in seconds.items():
        ratio = statistics.median(
            v / o for v, o in zip(values, seconds["off"], strict=True)
        )
        micros = statistics.median(values) * 1e6
        print(f"{side:<6} {micros:>14.2f} {ratio:>13.3f}")
    for side in ("sink", "file"):
        extra = statistics.median(
            v - o for v, o in zip(seconds[side], seconds["off"], strict=True)
        )
        print(
            f"tracing into {side}: +{extra * 1e6:.2f} us per round trip "
            f"(4 records; off: {off:.2f} us)"
        )


_CHILD = """
import asyncio, sys
sys.path.insert(0, {benchmarks!r})
sys.path.insert(0, {path!r})
import compare
lib = __import__({module!r})
async def main():
    run, end = compare.fake_side(lib, "rpc", "json")
    await asyncio.sleep(0)
    run({n}, 1)
    end()
    for _ in range(5):
        await asyncio.sleep(0)
asyncio.run(main())
"""


def instructions(module: str, path: str, n: int, directory: Path) -> int:
    """Instructions (callgrind's Ir) of a process that makes *n* round trips
    with *module* (``aiomas`` or ``aiomas_base``) from *path*."""
    out = directory / f"callgrind.{module}.{n}"
    script = _CHILD.format(
        benchmarks=str(Path(__file__).resolve().parent), path=path, module=module, n=n
    )
    env = dict(os.environ)
    env.pop(tracing.ENV_VAR, None)
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-c",
            script,
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


def callgrind(base_rev: str, directory: Path) -> None:
    (directory / "cg").mkdir()
    compare.unpack_base(base_rev, directory / "cg")
    here = str(Path(aiomas.__file__).resolve().parent.parent)
    per_call = {}
    for module, path in (("aiomas", here), ("aiomas_base", str(directory / "cg"))):
        small = instructions(module, path, N, directory)
        large = instructions(module, path, 2 * N, directory)
        per_call[module] = (large - small) / N
    new, base = per_call["aiomas"], per_call["aiomas_base"]
    print(
        f"callgrind, tracing off: {new:,.0f} instructions per RPC round trip "
        f"(both ends), {base_rev}: {base:,.0f} ({new - base:+,.0f}, "
        f"{new / base - 1:+.2%})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="benchmarks/tracing_cost.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--slices", type=int, default=40, help="rounds (40)")
    parser.add_argument("--base", help="also measure the library of this revision")
    parser.add_argument(
        "--callgrind", action="store_true", help="count instructions (needs --base)"
    )
    args = parser.parse_args()
    if tracing.active() is not None:
        parser.error(f"unset {tracing.ENV_VAR}: tracing must start off")
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        print(
            f"aiomas {aiomas.__version__}, Python {sys.version.split()[0]}, "
            f"{args.slices} rounds of {N} round trips"
        )
        asyncio.run(measure(args.slices, args.base, directory))
        if args.callgrind:
            if args.base is None:
                parser.error("--callgrind needs --base REV")
            callgrind(args.base, directory)


if __name__ == "__main__":
    main()
