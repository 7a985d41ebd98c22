"""Bi-directional RPC: the server calls back the client that called it.

Each client serves an RPC service of its own over the connection it opens, and
passes that service as an argument to the server's ``run_job()``.  The server
receives a proxy for it and calls back through the same connection while the
client's call is still in progress: it asks for the client's name and reports
progress to the client's ``progress`` sub-service.  Two clients run at once;
each proxy leads back to the client that sent it.

Run it with ``python examples/rpc_bidirectional.py``.
"""

from __future__ import annotations

import asyncio

import aiomas


class Progress:
    """The client's sub-service that the server reports progress to."""

    router = aiomas.rpc.Service()

    def __init__(self, name: str) -> None:
        self.name = name
        self.updates: list[int] = []

    @aiomas.expose
    def update(self, done: int, total: int) -> None:
        self.updates.append(done)
        print(f"{self.name}: server reports {done}/{total} steps done")


class Client:
    """The client's root service: the server can call its exposed methods."""

    router = aiomas.rpc.Service(["progress"])

    def __init__(self, name: str) -> None:
        self.name = name
        self.progress = Progress(name)

    @aiomas.expose
    def get_name(self) -> str:
        return self.name

    async def run(self, addr: tuple[str, int], steps: int) -> None:
        # rpc_service=self: this end of the connection serves the Client, too.
        rpc_con = await aiomas.rpc.open_connection(addr, rpc_service=self)
        try:
            # The Client object travels as a reference: the server gets a proxy.
            result = await rpc_con.remote.run_job(steps, self)
            print(f"{self.name}: job result: {result}")
        finally:
            await rpc_con.close()


class Server:
    router = aiomas.rpc.Service()

    @aiomas.expose
    async def run_job(self, steps: int, client: aiomas.rpc.Proxy) -> str:
        # Calls on the proxy go back over the connection the request came in on.
        name = await client.get_name()
        print(f"server: starting a job of {steps} steps for {name}")
        for step in range(1, steps + 1):
            await asyncio.sleep(0.01)  # the "work"
            await client.progress.update(step, steps)
        return f"{steps} steps done for {name}"


async def main() -> None:
    server = await aiomas.rpc.start_server(("127.0.0.1", 0), Server())
    addr = server.sockets[0].getsockname()[:2]
    print(f"server: listening on {addr[0]}:{addr[1]}")
    clients = [Client("Monty"), Client("Eric")]
    try:
        await asyncio.gather(*(client.run(addr, steps=3) for client in clients))
    finally:
        server.close()
        await server.wait_closed()
    for client in clients:
        print(f"{client.name} got progress updates {client.progress.updates}")


if __name__ == "__main__":
    asyncio.run(main())
