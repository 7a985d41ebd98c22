"""A Container subclass in the 2.0.1 form: __init__(base_url, loop, clock,
connect_kwargs), agents made in __init__, listed through agents.dict."""

import asyncio

import aiomas


class Worker(aiomas.Agent):
    def __init__(self, container, name):
        super().__init__(container)
        self.name = name

    @aiomas.expose
    def name_of(self):
        return self.name


class MyContainer(aiomas.Container):
    def __init__(self, base_url, loop, clock, connect_kwargs):
        super().__init__(base_url, loop, clock, connect_kwargs)
        self.loop_was_running = loop is asyncio.get_running_loop()
        self.workers = [Worker(self, "w%d" % i) for i in range(3)]


container = MyContainer.create(("127.0.0.1", 0))
print(container.loop_was_running)
print([w.addr == container.base_url + str(i) for i, w in enumerate(container.workers)])
print(sorted(container.agents.dict))
print([type(a).__name__ for a in container.agents.dict.values()])
late = Worker(container, "late")
print(sorted(container.agents.dict), container.agents.dict["3"] is late)


async def call():
    client = aiomas.Container.create(("127.0.0.1", 0), as_coro=True)
    client = await client
    try:
        proxy = await client.connect(container.workers[1].addr)
        return await proxy.name_of()
    finally:
        await client.shutdown(as_coro=True)


print(aiomas.run(call()))
container.shutdown()
print("done")
