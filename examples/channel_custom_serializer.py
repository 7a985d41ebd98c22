"""A channel server and client that exchange objects of their own types.

Two kinds of serializers teach the JSON codec new types:

- ``Point`` is our own class; the ``@aiomas.codecs.serializable`` decorator
  writes its serializer.
- ``fractions.Fraction`` is a class we cannot decorate; ``fraction_serializer()``
  returns a ``(type, serialize, deserialize)`` triple for it.

Both ends pass the same list of serializers (in the same order: a type's id on
the wire is its position in the list) as ``extra_serializers``.  The client
sends points and fractions in its requests, and the server's replies carry them
back.  It runs on TCP loopback, on a port the operating system picks.

Run it with ``python examples/channel_custom_serializer.py``.
"""

from __future__ import annotations

import asyncio
from fractions import Fraction
from typing import Any

import aiomas


@aiomas.codecs.serializable
class Point:
    # serializable needs every __init__() argument stored under its own name.
    def __init__(self, x: Fraction, y: Fraction) -> None:
        self.x = x
        self.y = y


def fraction_serializer() -> tuple[type, Any, Any]:
    """Send a Fraction as ``[numerator, denominator]``: exact, unlike a float."""
    return (
        Fraction,
        lambda f: [f.numerator, f.denominator],
        lambda nd: Fraction(*nd),
    )


# A Point's attributes are Fractions; the codec serializes those in turn.
SERIALIZERS = [Point.__serializer__, fraction_serializer]


def handle(op: str, args: list[Any]) -> Any:
    if op == "scale":
        point, factor = args
        return Point(point.x * factor, point.y * factor)
    if op == "midpoint":
        a, b = args
        return Point((a.x + b.x) / 2, (a.y + b.y) / 2)
    raise ValueError(f"unknown operation {op!r}")


async def geometry_server(channel: aiomas.channel.Channel) -> None:
    """Serve one client; its requests are ``[op, args]``."""
    try:
        while True:
            request = await channel.recv()
            op, args = request.content
            # The codec has already turned the wire data back into our types.
            print(f"server: got {op} {args!r}")
            try:
                await request.reply(handle(op, args))
            except ValueError as exc:
                await request.fail(exc)
    except ConnectionResetError:
        print("server: client left")
    finally:
        await channel.close()


async def client(addr: tuple[str, int]) -> None:
    channel = await aiomas.channel.open_connection(addr, extra_serializers=SERIALIZERS)
    try:
        a = Point(Fraction(1), Fraction(2))
        b = Point(Fraction(1, 3), Fraction(-1, 2))
        for request in (["scale", [a, Fraction(1, 3)]], ["midpoint", [a, b]]):
            reply = await channel.send(request)
            print(f"client: {request[0]} -> {reply!r} ({type(reply).__name__})")
        try:
            await channel.send(["rotate", [a]])
        except aiomas.RemoteException as exc:
            error = exc.remote_traceback.strip().splitlines()[-1]
            print(f"client: rotate failed remotely: {error}")
    finally:
        await channel.close()


def show_wire_format() -> None:
    """Print what a request looks like in JSON with these serializers."""
    codec = aiomas.JSON()
    for factory in SERIALIZERS:
        codec.add_serializer(*factory())
    request = ["scale", [Point(Fraction(1), Fraction(1, 2)), Fraction(3)]]
    print("on the wire:", codec.encode(request).decode())


async def main() -> None:
    show_wire_format()
    handlers: set[asyncio.Task[None]] = set()

    def on_client(channel: aiomas.channel.Channel) -> None:
        # Keep the handler's task, so main() can wait for it to finish.
        handlers.add(asyncio.ensure_future(geometry_server(channel)))

    server = await aiomas.channel.start_server(
        ("127.0.0.1", 0), on_client, extra_serializers=SERIALIZERS
    )
    addr = server.sockets[0].getsockname()[:2]
    print(f"server: listening on {addr[0]}:{addr[1]}")
    try:
        await client(addr)
        await asyncio.gather(*handlers)
    finally:
        server.close()
        await server.wait_closed()
    print("server: closed")


if __name__ == "__main__":
    asyncio.run(main())
