"""Hello World: one proactive agent in a container.

The agent has a task of its own, ``run()``, that prints "Hello, World!" a few
times and sleeps on its container's clock in between.  The container listens on
TCP loopback, on a port the operating system picks, and is shut down at the end.

Run it with ``python examples/hello_world.py [--times N]``.
"""

from __future__ import annotations

import argparse

import aiomas


class HelloWorld(aiomas.Agent):
    """Says hello *times* times, a tenth of a second apart."""

    def __init__(self, container: aiomas.Container, name: str) -> None:
        # The base class registers the agent in its container and gives it an
        # address.
        super().__init__(container)
        self.name = name

    async def run(self, times: int) -> None:
        print(f"{self.name} ({self.addr}) says:")
        # The container's clock, not asyncio.sleep(): the same agent then also
        # runs in a simulation whose container has an ExternalClock.
        clock = self.container.clock
        start = clock.time()
        for _ in range(times):
            await clock.sleep(0.1)
            print(f"  Hello, World!  (after {clock.time() - start:.1f}s)")


def main(times: int) -> None:
    # Outside of a coroutine, create() and shutdown() run the event loop
    # themselves (inside one, pass as_coro=True and await them).
    container = aiomas.Container.create(("127.0.0.1", 0))
    try:
        agent = HelloWorld(container, "Monty")
        aiomas.run(until=agent.run(times))
    finally:
        container.shutdown()
    print("container shut down")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--times", type=int, default=3, help="greetings (default: 3)")
    main(parser.parse_args().times)
