"""The smallest complete agent program (from the tutorial, docs/tutorial.rst).

Run it with ``python examples/first_program.py``; it prints ``42``.
"""

import asyncio

import aiomas


class Multiplier(aiomas.Agent):
    @aiomas.expose
    def multiply(self, a, b):
        return a * b


async def main():
    container = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)
    try:
        multiplier = Multiplier(container)
        proxy = await container.connect(multiplier.addr)
        print(await proxy.multiply(6, 7))
    finally:
        await container.shutdown(as_coro=True)


if __name__ == "__main__":
    asyncio.run(main())
