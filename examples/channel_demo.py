"""A request-reply demo on the channel layer.

A "calculator" server answers arithmetic requests; three clients connect at the
same time, each sends several requests without waiting in between, and one asks for
something impossible to show how failures come back.  It runs on TCP loopback,
uses a port the operating system picks, prints what happens and ends by itself.

Run it with ``python examples/channel_demo.py [--codec json|msgpack]``.
"""

from __future__ import annotations

import argparse
import asyncio
import operator

import aiomas

OPERATIONS = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
}


CLIENTS = 3
clients_left = 0
all_clients_left = asyncio.Event()


async def calculator(channel: aiomas.channel.Channel) -> None:
    """Serve one client: each request is ``[a, op, b]``; reply with the result."""
    global clients_left
    peer = channel.get_extra_info("peername")
    try:
        while True:
            request = await channel.recv()
            a, op, b = request.content
            try:
                result = OPERATIONS[op](a, b)
            except Exception as exc:
                await request.fail(exc)
            else:
                await request.reply(result)
    except ConnectionResetError:
        print(f"server: client {peer[1]} left")
        clients_left += 1
        if clients_left == CLIENTS:
            all_clients_left.set()


async def client(name: str, addr: tuple[str, int], codec: type) -> None:
    channel = await aiomas.channel.open_connection(addr, codec=codec)
    problems = [[6, "*", 7], [2, "+", 40], [50, "-", 8], [84, "/", 2], [1, "/", 0]]
    # All requests go out at once; the replies are matched to them by id.
    futures = [channel.send(problem) for problem in problems]
    for problem, future in zip(problems, futures, strict=True):
        a, op, b = problem
        try:
            print(f"{name}: {a} {op} {b} = {await future}")
        except aiomas.RemoteException as exc:
            error = exc.remote_traceback.strip().splitlines()[-1]
            print(f"{name}: {a} {op} {b} failed remotely: {error}")
    await channel.close()


async def main(codec: type) -> None:
    server = await aiomas.channel.start_server(
        ("127.0.0.1", 0), calculator, codec=codec
    )
    addr = server.sockets[0].getsockname()[:2]
    print(f"server: listening on {addr[0]}:{addr[1]} ({codec.__name__} codec)")
    await asyncio.gather(*(client(f"client-{i}", addr, codec) for i in range(CLIENTS)))
    await all_clients_left.wait()
    server.close()
    await server.wait_closed()
    print("server: closed")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codec", choices=["json", "msgpack"], default="json")
    args = parser.parse_args()
    asyncio.run(main(aiomas.MsgPack if args.codec == "msgpack" else aiomas.JSON))
