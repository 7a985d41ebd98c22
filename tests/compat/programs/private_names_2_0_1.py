"""Names that 2.0.1-era code imports or reads although they were private."""

import os
import tempfile

import aiomas
from aiomas.agent import _get_base_url

print(_get_base_url("tcp://localhost:5555/0"))
print(_get_base_url("tcp://localhost:5555/12"))
print(_get_base_url("ipc://[/tmp/s]/0"))
print(_get_base_url("ipc:///tmp/s/0"))
print(_get_base_url("local://q/3"))
print(_get_base_url("tcp://::1:5555/0"))

container = aiomas.Container.create(("127.0.0.1", 0))
agent = aiomas.Agent(container)
# Is this agent local?  (What 2.0.1-era code does with _get_base_url.)
print(_get_base_url(agent.addr) == container.base_url)
port = container._tcp_server.sockets[0].getsockname()[1]
print(container.base_url == "tcp://127.0.0.1:%d/" % port)
container.shutdown()
print(container._tcp_server)

with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "agents.sock")
    ipc = aiomas.Container.create(path)
    print(ipc.base_url == "ipc://[%s]/" % path)
    print(_get_base_url(aiomas.Agent(ipc).addr) == ipc.base_url)
    print(ipc._tcp_server is not None)
    ipc.shutdown()
print("done")
