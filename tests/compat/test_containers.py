"""What code written for aiomas 1.0.3 and 2.0.1 relies on in containers and
agents, beyond the 1.0.3 documentation (see docs/migrating.rst)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import aiomas
from aiomas.subproc import ContainerProcess, Manager
from aiomas.testing import TIME_UNIT

WAIT = 10.0
ROOT = Path(__file__).resolve().parents[2]
CHILD_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


class Hello(aiomas.Agent):
    @aiomas.expose
    def hello(self) -> str:
        return f"hello from {self.addr}"


async def test_create_binds_first_and_passes_the_real_base_url() -> None:
    seen: list[str] = []

    class Recording(aiomas.Container):
        def __init__(
            self, base_url: str, clock: aiomas.BaseClock, connect_kwargs: Any
        ) -> None:
            seen.append(base_url)
            super().__init__(base_url, clock, connect_kwargs)
            self.first = Hello(self)

    container = await Recording.create(("127.0.0.1", 0), as_coro=True)
    try:
        assert seen == [container.base_url]
        assert container.base_url.startswith("tcp://127.0.0.1:")
        assert not container.base_url.startswith("tcp://127.0.0.1:0/")
        assert container.first.addr == container.base_url + "0"
    finally:
        await container.shutdown(as_coro=True)


@pytest.mark.parametrize("form", ["positional", "keyword", "no loop name"])
async def test_subclasses_in_the_2_0_1_form_get_the_running_loop(form: str) -> None:
    loops: list[Any] = []

    if form == "positional":

        class Old(aiomas.Container):
            def __init__(
                self, base_url: str, loop: Any, clock: Any, connect_kwargs: Any
            ) -> None:
                loops.append(loop)
                super().__init__(base_url, loop, clock, connect_kwargs)

    elif form == "keyword":

        class Old(aiomas.Container):  # type: ignore[no-redef]
            def __init__(
                self, base_url: str, loop: Any, clock: Any, connect_kwargs: Any
            ) -> None:
                loops.append(loop)
                super().__init__(
                    base_url, loop=loop, clock=clock, connect_kwargs=connect_kwargs
                )

    else:

        class Old(aiomas.Container):  # type: ignore[no-redef]
            def __init__(self, url: str, ev: Any, clk: Any, kw: Any) -> None:
                loops.append(ev)
                super().__init__(url, clk, kw)  # 1.0.3's super() call

    container = await Old.create(("127.0.0.1", 0), as_coro=True)
    try:
        assert loops == [asyncio.get_running_loop()]
        callee = Hello(container)
        caller = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)
        try:
            proxy = await caller.connect(callee.addr)
            assert await proxy.hello() == f"hello from {callee.addr}"
        finally:
            await caller.shutdown(as_coro=True)
    finally:
        await container.shutdown(as_coro=True)


async def test_container_arguments_are_checked() -> None:
    clock = aiomas.AsyncioClock()
    with pytest.raises(TypeError, match="missing the argument 'connect_kwargs'"):
        aiomas.Container("tcp://x:1/", clock)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="unexpected arguments: \\['spam'\\]"):
        aiomas.Container("tcp://x:1/", clock, {}, spam=1)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="5 positional arguments"):
        aiomas.Container("tcp://x:1/", None, clock, {}, 1)  # type: ignore[call-overload]
    other_loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError, match="running event loop"):
            aiomas.Container("tcp://x:1/", other_loop, clock, {})
    finally:
        other_loop.close()
    container = aiomas.Container("tcp://x:1/", None, clock, {})
    assert container.base_url == "tcp://x:1/"
    assert container.clock is clock


async def test_a_subclass_that_forgets_super_init_fails_at_create() -> None:
    class Forgetful(aiomas.Container):
        def __init__(self, base_url: str, clock: Any, connect_kwargs: Any) -> None:
            pass

    with pytest.raises(TypeError, match=r"must call super\(\).__init__\(\)"):
        await Forgetful.create(("127.0.0.1", 0), as_coro=True)


async def test_a_failing_subclass_init_closes_the_server(tmp_path: Path) -> None:
    class Failing(aiomas.Container):
        def __init__(self, base_url: str, clock: Any, connect_kwargs: Any) -> None:
            super().__init__(base_url, clock, connect_kwargs)
            raise RuntimeError("no")

    path = tmp_path / "sock"
    with pytest.raises(RuntimeError, match="no"):
        await Failing.create(str(path), as_coro=True)
    assert not path.exists()
    # The address is free again.
    container = await aiomas.Container.create(str(path), as_coro=True)
    await container.shutdown(as_coro=True)


async def test_agents_is_a_service_dict_in_step_with_creation() -> None:
    container = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)
    try:
        assert isinstance(container.agents, aiomas.rpc.ServiceDict)
        assert container.agents.dict == {}
        agents = [Hello(container) for _ in range(3)]
        assert container.agents.dict == dict(zip("012", agents, strict=True))
        assert container.validate_aid("2") == "Hello"
        # The agents are reachable under "agents" as before.
        client = await aiomas.rpc.open_connection(
            container._tcp_server.sockets[0].getsockname()[:2]  # type: ignore[union-attr]
        )
        try:
            hello = aiomas.rpc.Proxy(client.channel, "agents/1/hello")
            assert await hello() == f"hello from {agents[1].addr}"
        finally:
            await client.close()
    finally:
        await container.shutdown(as_coro=True)


class Colliding(aiomas.Container):
    """Defines, as its own, names that a container's internals might use."""

    router = aiomas.rpc.Service()

    def __init__(self, base_url: str, clock: Any, connect_kwargs: Any) -> None:
        super().__init__(base_url, clock, connect_kwargs)
        for name in (
            "_server",
            "_clock",
            "_base_url",
            "_connect_kwargs",
            "_outgoing",
            "_incoming",
            "_connecting",
            "_proxies",
            "_shutdown_task",
            "_socket_file",
            "_agent_ids",
        ):
            setattr(self, name, f"mine: {name}")

    @property
    def _agents(self) -> str:
        return "mine"

    def _register(self, *args: Any) -> None:
        raise AssertionError("not ours")

    def _check_running(self, *args: Any) -> None:
        raise AssertionError("not ours")

    def _open(self, *args: Any) -> None:
        raise AssertionError("not ours")

    def _client_for(self, *args: Any) -> None:
        raise AssertionError("not ours")

    def _client_connected(self, *args: Any) -> None:
        raise AssertionError("not ours")

    def _forget(self, *args: Any) -> None:
        raise AssertionError("not ours")

    def _shutdown(self, *args: Any) -> None:
        raise AssertionError("not ours")

    def _close_everything(self, *args: Any) -> None:
        raise AssertionError("not ours")

    @classmethod
    def _create(cls, *args: Any) -> None:
        raise AssertionError("not ours")

    def _serve(self, *args: Any) -> None:
        raise AssertionError("not ours")


class CollidingAgent(Hello):
    def __init__(self, container: aiomas.Container) -> None:
        self._router = "mine"
        self._container = "mine"
        self._addr = "mine"
        super().__init__(container)

    def _register(self) -> None:
        raise AssertionError("not ours")


class CollidingManager(Manager):
    def __init__(self, container: aiomas.Container) -> None:
        self._stop_received = "mine"
        self._container = "mine"
        super().__init__(container)


async def test_subclass_names_never_collide_with_ours() -> None:
    one = await Colliding.create(("127.0.0.1", 0), as_coro=True)
    two = await Colliding.create(("127.0.0.1", 0), as_coro=True)
    try:
        callee = CollidingAgent(one)
        manager = CollidingManager(one)
        assert one._agents == "mine"
        assert callee.addr == one.base_url + "0"
        assert manager.addr == one.base_url + "1"
        proxy = await two.connect(callee.addr)
        assert await proxy.hello() == f"hello from {callee.addr}"
        manager_proxy = await two.connect(manager.addr)
        await manager_proxy.stop()
        assert manager.stop_received.done()
    finally:
        await two.shutdown(as_coro=True)
        await one.shutdown(as_coro=True)
    assert one._tcp_server is None


@pytest.mark.parametrize(
    "factory",
    [
        lambda: ([list], str, str),
        lambda: (dict, None, str),
        lambda: 1 / 0,
        lambda: (dict, str),
    ],
    ids=["unhashable key", "not callable", "factory raises", "no triple"],
)
async def test_a_bad_serializer_fails_at_create(factory: Any) -> None:
    with pytest.raises((TypeError, ZeroDivisionError)):
        await aiomas.Container.create(
            ("127.0.0.1", 0), extra_serializers=[factory], as_coro=True
        )


async def test_a_duplicate_serializer_fails_at_create() -> None:
    def factory() -> Any:
        return dict, str, str

    with pytest.raises(ValueError, match="already a serializer"):
        await aiomas.Container.create(
            ("127.0.0.1", 0), extra_serializers=[factory, factory], as_coro=True
        )
    # An Arrow serializer among the extra ones collides with the container's own.
    with pytest.raises(ValueError, match="already a serializer"):
        await aiomas.Container.create(
            ("127.0.0.1", 0),
            extra_serializers=[aiomas.util.arrow_serializer],
            as_coro=True,
        )


def wait_for_exit_without_the_loop(pid: int) -> None:
    """Block until process *pid* has exited (asyncio's child watcher reaps it
    in its own thread, or it is a zombie)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except (ProcessLookupError, FileNotFoundError):
            return
        time.sleep(10 * TIME_UNIT)
    raise TimeoutError(f"process {pid} did not exit")


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
async def test_connect_right_after_the_peer_died_is_refused() -> None:
    """The connection to a container that has just been killed is not handed
    out again: connect() meets what a new attempt meets."""
    for _ in range(3):
        process = await ContainerProcess.start(
            "127.0.0.1:0", "--log-level", "error", env=CHILD_ENV, cwd=str(ROOT)
        )
        master = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)
        try:
            manager = await master.connect(process.manager_addr)
            _, worker_addr = await manager.spawn(f"{__name__}:Hello")
            process.process.send_signal(signal.SIGKILL)
            # Wait for the exit without running the loop: the loop has not
            # seen the connection end yet.
            wait_for_exit_without_the_loop(process.process.pid)
            with pytest.raises(ConnectionRefusedError):
                await asyncio.wait_for(master.connect(worker_addr), WAIT)
            await asyncio.wait_for(process.wait(), WAIT)
        finally:
            await process.kill()
            await master.shutdown(as_coro=True)
