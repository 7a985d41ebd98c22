"""The fan-out workload alone: one container calling an agent in each of N
containers at once, again and again, against the raw-asyncio floor doing the
same calls (the same as ``python -m aiomas bench --only fan-out``).

Usage::

    python benchmarks/fanout.py [--containers 50] [--rounds 5] [--turns 20]
        [--slice 50] [--loop asyncio] [--in-process]

The callee containers run in separate processes (each also serves the floor),
or with ``--in-process`` in this one (which on 2 cores measures the library
rather than waking 50 processes);
the caller side lets the floor, a caller container and a second caller
container (the A/A pair) take turns of 50 ms, and prints each round's calls
per second and ratios, their medians and the A/A band.  See
:mod:`aiomas.benchmark`.
"""

import argparse

from aiomas.benchmark import run_fanout


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="benchmarks/fanout.py", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--containers", type=int, default=50, help="callees (50)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (5)")
    parser.add_argument("--turns", type=int, default=20, help="turns a round (20)")
    parser.add_argument("--slice", type=float, default=50, help="ms a turn (50)")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="the callees in this process (on TCP loopback all the same)",
    )
    args = parser.parse_args()
    if min(args.containers, args.rounds, args.turns, args.slice) <= 0:
        parser.error("--containers, --rounds, --turns and --slice must be positive")
    run_fanout(
        args.containers,
        args.loop,
        args.rounds,
        args.turns,
        args.slice / 1000,
        args.in_process,
    )


if __name__ == "__main__":
    main()
