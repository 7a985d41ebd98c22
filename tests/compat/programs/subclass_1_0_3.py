"""A Container subclass in the 1.0.3 form that creates agents in __init__ and
keeps state under names of its own (even ones our internals might pick)."""

import aiomas


class Manager(aiomas.Agent):
    @aiomas.expose
    def hello(self):
        return "hello from " + self.addr


class MyContainer(aiomas.Container):
    def __init__(self, base_url, clock, connect_kwargs):
        super().__init__(base_url, clock, connect_kwargs)
        # Names a subclass may well pick for itself:
        self._server = "my server"
        self._clock = "my clock"
        self._base_url = "my url"
        self._outgoing = []
        self._shutdown_task = None
        self.manager = Manager(self)

    @property
    def _agents(self):
        return sorted(self.agents.dict)

    def _register(self, *args):
        raise AssertionError("our _register must not be called")

    def _connect(self, *args):
        raise AssertionError("our _connect must not be called")

    def _check_running(self):
        raise AssertionError("our _check_running must not be called")


container = MyContainer.create(("127.0.0.1", 0))
other = aiomas.Container.create(("127.0.0.1", 0))
print(container.manager.addr == container.base_url + "0")
print(container.manager.addr.startswith("tcp://127.0.0.1:"))
print(container._agents, container._server, container._clock)


async def call():
    proxy = await other.connect(container.manager.addr)
    return await proxy.hello()


print(aiomas.run(call()) == "hello from " + container.manager.addr)
other.shutdown()
container.shutdown()
print("done")
