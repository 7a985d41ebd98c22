"""Simulated messages per second of wall time, for a big system under faults.

Usage::

    python benchmarks/simulation.py [--containers 100] [--agents 1]
        [--duration 600] [--period 10] [--peers 0] [--seed 0] [--no-faults]
        [--no-log]

``--containers`` containers on a :class:`aiomas.simulation.SimulatedNetwork`
each hold ``--agents`` agents.  Every agent, every ``--period`` seconds of
virtual time (with a random phase), calls a random agent of another container
(``echo``, with a 2 s timeout) for ``--duration`` seconds of virtual time:
of any other container (``--peers 0``; most calls then open a connection),
or of the ``--peers`` containers after its own (neighbours, whose
connections are reused).
With faults on (the default), links have 5 ms latency plus up to 20 ms jitter,
drop 1 % and duplicate 1 % of the frames and reorder 5 %, and a partition cuts
a fifth of the containers off for a minute.

Printed: frames sent (requests and replies: the messages), calls that
succeeded and failed, virtual seconds simulated, wall and CPU seconds, and
frames per second of wall time (and of CPU time, which a machine shared with
other work reports more steadily); then the digest of the message log, the
same in every run with the same arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import time

import aiomas
from aiomas import simulation


class Peer(aiomas.Agent):
    @aiomas.expose
    def echo(self, value: int) -> int:
        return value


def plan_for(containers: int, faults: bool) -> simulation.FaultPlan:
    if not faults:
        return simulation.FaultPlan()
    cut_off = tuple(f"sim-{i}" for i in range(0, containers, 5))
    rest = tuple(f"sim-{i}" for i in range(containers) if i % 5)
    return simulation.FaultPlan(
        default=simulation.LinkFaults(
            latency=0.005, jitter=0.02, drop=0.01, duplicate=0.01, reorder=0.05
        ),
        partitions=(simulation.Partition(cut_off, rest, start=60, duration=60),),
        dead_peer_timeout=30,
    )


async def workload(
    sim: simulation.Simulation, args: argparse.Namespace
) -> tuple[int, int]:
    containers = await sim.start(args.containers)
    peers = [[Peer(c) for _ in range(args.agents)] for c in containers]
    rng = random.Random(args.seed)  # the workload's own choices
    loop = asyncio.get_running_loop()
    end = loop.time() + args.duration
    done = [0, 0]

    async def caller(index: int) -> None:
        container = containers[index]
        await asyncio.sleep(rng.uniform(0, args.period))
        if args.peers:
            others = [(index + 1 + i) % len(peers) for i in range(args.peers)]
        else:
            others = [i for i in range(len(peers)) if i != index]
        while loop.time() < end:
            other = rng.choice(others)
            target = rng.choice(peers[other])
            try:
                proxy = await container.connect(target.addr)
                await asyncio.wait_for(proxy.echo(index), 2)
                done[0] += 1
            except Exception:
                done[1] += 1
            await asyncio.sleep(args.period)

    await asyncio.gather(
        *(caller(i) for i in range(len(containers)) for _ in range(args.agents))
    )
    return done[0], done[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containers", type=int, default=100)
    parser.add_argument("--agents", type=int, default=1)
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--period", type=float, default=10.0)
    parser.add_argument("--peers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-faults", action="store_true")
    parser.add_argument("--no-log", action="store_true")
    args = parser.parse_args()
    logging.getLogger("aiomas").setLevel(logging.ERROR)  # every fault logs
    plan = plan_for(args.containers, not args.no_faults)
    networks: list[simulation.SimulatedNetwork] = []

    async def program(sim: simulation.Simulation) -> tuple[int, int]:
        networks.append(sim.network)
        return await workload(sim, args)

    start, cpu_start = time.perf_counter(), time.process_time()
    ok, failed = simulation.run(
        program,
        seed=args.seed,
        plan=plan,
        log=not args.no_log,
        timeout=args.duration + 3600,
        wall_timeout=None,
    )
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    sent = networks[0].frames_sent
    peers = f"{args.peers} peers each" if args.peers else "any peer"
    print(
        f"{args.containers} containers ({peers}), faults "
        f"{'off' if args.no_faults else 'on'}: {sent} frames sent, {ok} calls ok, "
        f"{failed} failed, {args.duration:g} s simulated in {wall:.2f} s of wall "
        f"time ({cpu:.2f} s CPU): {sent / wall:,.0f} messages/s "
        f"({sent / cpu:,.0f} per CPU second)"
    )
    if not args.no_log:
        # The same for every run with this seed: compare it to see that.
        print(f"message log digest: {networks[0].digest()[:16]}")


if __name__ == "__main__":
    main()
