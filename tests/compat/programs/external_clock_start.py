"""The co-simulation pattern: ExternalClock(start, init_time=-1); an agent
waits for the start date and then runs a cycle every minute, while the master
sets the time."""

import asyncio

import arrow

import aiomas

START = "2014-01-01T00:00:00+00:00"
CLOCK = aiomas.ExternalClock(START, init_time=-1)


class Controller(aiomas.Agent):
    def __init__(self, container):
        super().__init__(container)
        self.cycles = []

    async def run(self):
        clock = self.container.clock
        await clock.sleep_until(arrow.get(START))
        while True:
            self.cycles.append((clock.time(), str(clock.utcnow())))
            if len(self.cycles) == 3:
                return
            await clock.sleep(60)


container = aiomas.Container.create(("127.0.0.1", 0), clock=CLOCK)
controller = Controller(container)
print(CLOCK.time(), CLOCK.utcnow())


async def master():
    task = asyncio.ensure_future(controller.run())
    for _ in range(5):
        await asyncio.sleep(0)
    print("before set_time(0):", controller.cycles)
    for t in (0, 60, 120):
        CLOCK.set_time(t)
        for _ in range(5):
            await asyncio.sleep(0)
    await asyncio.wait_for(task, 5)


aiomas.run(master())
for cycle in controller.cycles:
    print(cycle)
container.shutdown()
print("done")
