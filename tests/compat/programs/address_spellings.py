"""Agent addresses in the spellings of both originals: ipc://[PATH]/ID (what
we write) and ipc://PATH/ID; tcp://::1:PORT/ID (2.0.1) and tcp://[::1]:PORT/ID
(what we write).  Both spellings of one container share one connection."""

import os
import sys
import tempfile

import aiomas


class Echo(aiomas.Agent):
    @aiomas.expose
    def echo(self, value):
        return value


caller = aiomas.Container.create(("127.0.0.1", 0))


async def call(*addrs):
    results = []
    proxies = []
    for addr in addrs:
        proxy = await caller.connect(addr)
        proxies.append(proxy)
        results.append(await proxy.echo(addr))
    # One container, one connection, one cached proxy:
    print(all(proxy is proxies[0] for proxy in proxies), proxies[0].addr == addrs[0])
    return results


with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "agents.sock")
    ipc = aiomas.Container.create(path)
    agent = Echo(ipc)
    print(agent.addr == "ipc://[%s]/0" % path)
    plain = "ipc://%s/0" % path
    print(aiomas.run(call(agent.addr, plain)) == [agent.addr, plain])
    ipc.shutdown()

if "--ipv6" in sys.argv:
    ipv6 = aiomas.Container.create(("::1", 0))
    agent = Echo(ipv6)
    port = agent.addr.rsplit(":", 1)[1].split("/")[0]
    print(agent.addr == "tcp://[::1]:%s/0" % port)
    old = "tcp://::1:%s/0" % port
    print(aiomas.run(call(agent.addr, old)) == [agent.addr, old])
    ipv6.shutdown()
caller.shutdown()
print("done")
