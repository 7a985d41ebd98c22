"""An RPC math server and a client that calls it.

The server's root service is a class with exposed methods and a sub-service
(``stats``), which the client reaches as ``remote.stats``.  Two calls fail on the
server: a division by zero and a method that is not exposed; both come back to
the client as a RemoteException.  Server and client run in one process, on TCP
loopback, on a port the operating system picks.

Run it with ``python examples/rpc_math.py``.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Awaitable
from typing import Any

import aiomas


class Stats:
    """A sub-service: statistics over lists of numbers."""

    router = aiomas.rpc.Service()

    @aiomas.expose
    def mean(self, values: list[float]) -> float:
        return statistics.fmean(values)

    @aiomas.expose
    async def median(self, values: list[float]) -> float:
        # Exposed coroutines run concurrently with the connection's other calls.
        await asyncio.sleep(0)
        return statistics.median(values)


class MathServer:
    """The root service.  Only exposed methods can be called from the network."""

    # Declares the attribute that holds a sub-service; __init__() sets it.
    router = aiomas.rpc.Service(["stats"])

    def __init__(self) -> None:
        self.stats = Stats()
        self.calls = 0

    @aiomas.expose
    def add(self, a: float, b: float) -> float:
        self.calls += 1
        return a + b

    @aiomas.expose
    def divide(self, a: float, b: float) -> float:
        self.calls += 1
        return a / b

    def reset(self) -> None:
        """Not exposed: a client cannot call it."""
        self.calls = 0


async def client(addr: tuple[str, int]) -> None:
    rpc_con = await aiomas.rpc.open_connection(addr)
    math = rpc_con.remote
    try:
        print("client: 3 + 4 =", await math.add(3, 4))
        print("client: 84 / 2 =", await math.divide(84, 2))
        values = [1, 2, 3, 4, 100]
        print(f"client: mean of {values} =", await math.stats.mean(values))
        print(f"client: median of {values} =", await math.stats.median(values))
        await show_failure("1 / 0", math.divide(1, 0))
        await show_failure("reset()", math.reset())
    finally:
        await rpc_con.close()


async def show_failure(name: str, call: Awaitable[Any]) -> None:
    """Await a remote *call* that should fail and print why it did."""
    try:
        await call
    except aiomas.RemoteException as exc:
        # The exception object cannot travel (the client may not know its
        # class), its traceback does, as text; the last line names the error.
        error = exc.remote_traceback.strip().splitlines()[-1]
        print(f"client: {name} failed on {exc.origin}: {error}")
    else:
        print(f"client: {name} did not fail?!")


async def main() -> None:
    service = MathServer()
    server = await aiomas.rpc.start_server(("127.0.0.1", 0), service)
    addr = server.sockets[0].getsockname()[:2]
    print(f"server: listening on {addr[0]}:{addr[1]}")
    try:
        await client(addr)
    finally:
        server.close()
        await server.wait_closed()
    print(f"server: answered {service.calls} arithmetic calls, closed")


if __name__ == "__main__":
    asyncio.run(main())
