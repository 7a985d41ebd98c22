"""A ledger with retrying clients, tested under network faults.

Two clients pay amounts into a ledger agent.  A payment whose reply does not
come within a second is sent again (at-least-once delivery).  The first
ledger adds every deposit it receives: when the network duplicates a request,
or loses a reply so that the client retries a payment that did arrive, money
is counted twice.  The fixed ledger remembers the ids of the payments it has
booked and books each once.

The bug never shows on a healthy network.  A seed sweep over a simulated
network with a few lost and duplicated frames finds it; the seed replays the
failing run exactly; the fixed ledger passes every seed::

    python examples/simulation_ledger.py sweep --seeds 100
    python examples/simulation_ledger.py replay 17
    python examples/simulation_ledger.py sweep --seeds 1000 --fixed
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

import aiomas
from aiomas import simulation

PLAN = simulation.FaultPlan(
    default=simulation.LinkFaults(
        latency=0.01, jitter=0.01, drop=0.005, duplicate=0.005
    )
)
PAYMENTS = 10


class Ledger(aiomas.Agent):
    """Adds up deposits: the buggy one."""

    def __init__(self, container: aiomas.Container) -> None:
        super().__init__(container)
        self.balance = 0

    @aiomas.expose
    def deposit(self, amount: int, payment_id: str) -> int:
        self.balance += amount
        return self.balance


class IdempotentLedger(Ledger):
    """Books each payment once, however often it arrives: the fix."""

    def __init__(self, container: aiomas.Container) -> None:
        super().__init__(container)
        self.booked: dict[str, int] = {}

    @aiomas.expose
    def deposit(self, amount: int, payment_id: str) -> int:
        if payment_id not in self.booked:
            self.balance += amount
            self.booked[payment_id] = self.balance
        return self.booked[payment_id]


class Client(aiomas.Agent):
    """Pays amounts into a ledger, retrying each until it is acknowledged."""

    async def pay(self, ledger: str, amounts: list[int]) -> None:
        for number, amount in enumerate(amounts):
            payment_id = f"{self.addr}/{number}"
            while True:
                try:
                    proxy = await self.container.connect(ledger)
                    await asyncio.wait_for(proxy.deposit(amount, payment_id), 1.0)
                    break
                except (TimeoutError, ConnectionError, aiomas.RemoteException):
                    await asyncio.sleep(0.5)  # and pay again


async def scenario(sim: simulation.Simulation, fixed: bool = False) -> int:
    """Two clients pay into a ledger; return the balance.

    Raises:
        AssertionError: if the balance is not the sum of the payments.
    """
    bank, *shops = await sim.start(3)
    ledger = (IdempotentLedger if fixed else Ledger)(bank)
    amounts = [[10 * i + n for n in range(PAYMENTS)] for i in range(1, 3)]
    clients = [Client(container) for container in shops]
    await asyncio.gather(
        *(
            client.pay(ledger.addr, a)
            for client, a in zip(clients, amounts, strict=True)
        )
    )
    expected = sum(map(sum, amounts))
    assert ledger.balance == expected, f"balance {ledger.balance} != {expected}"
    return ledger.balance


def run(
    seed: int, fixed: bool = False, plan: simulation.FaultPlan = PLAN
) -> tuple[int | str, str]:
    """Run the scenario with *seed* and *plan*; return the balance (or the
    error) and a digest of the message log."""
    networks: list[simulation.SimulatedNetwork] = []

    async def main(sim: simulation.Simulation) -> int:
        networks.append(sim.network)
        return await scenario(sim, fixed)

    try:
        outcome: int | str = simulation.run(main, seed=seed, plan=plan)
    except AssertionError as exc:
        outcome = str(exc)
    return outcome, networks[0].digest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixed", action="store_true", help="the fixed ledger")
    parser.add_argument(
        "--healthy", action="store_true", help="a network without faults"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sweep = commands.add_parser("sweep", help="run seeds 0 .. N-1")
    sweep.add_argument("--seeds", type=int, default=100)
    replay = commands.add_parser("replay", help="run one seed, print its log")
    replay.add_argument("seed", type=int)
    args = parser.parse_args()
    # Every simulated fault breaks a connection, which aiomas logs as a
    # warning: thousands in a sweep.
    logging.getLogger("aiomas").setLevel(logging.ERROR)
    ledger = "fixed" if args.fixed else "buggy"
    plan = simulation.FaultPlan() if args.healthy else PLAN
    if args.command == "sweep":
        start = time.perf_counter()
        failing = [
            seed
            for seed in range(args.seeds)
            if not isinstance(run(seed, args.fixed, plan)[0], int)
        ]
        elapsed = time.perf_counter() - start
        print(f"{ledger} ledger: {len(failing)} of {args.seeds} seeds fail")
        if failing:
            print(f"first failing seed: {failing[0]}")
            print(f"replay: python examples/simulation_ledger.py replay {failing[0]}")
        print(f"({elapsed:.1f} s of wall time)")
        return
    outcome, digest = run(args.seed, args.fixed, plan)
    print(f"{ledger} ledger, seed {args.seed}: {outcome}")
    print(f"plan: {plan!r}")
    print(f"message log digest: {digest}")


if __name__ == "__main__":
    main()
