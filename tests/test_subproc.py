"""Tests for aiomas.subproc: the Manager agent, start(), the command line and
containers in subprocesses."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import arrow
import pytest

import aiomas
from aiomas import rpc
from aiomas.agent import split_host_port, state_of
from aiomas.subproc import ContainerProcess, Manager, serve, start
from aiomas.subproc.__main__ import (
    container_kwargs,
    host_port,
    iso_date,
    main,
    make_parser,
)
from aiomas.testing import TIME_UNIT
from aiomas.wire import DEFAULT_MAX_FRAME_SIZE

WAIT: float = 10.0

ROOT = Path(__file__).resolve().parent.parent
# Lets child processes import this module, so that they can spawn its agents.
CHILD_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


class Worker(aiomas.Agent):
    def __init__(self, container: aiomas.Container, name: str, *, factor: int = 1):
        super().__init__(container)
        self.name = name
        self.factor = factor

    @aiomas.expose
    def work(self, value: int) -> str:
        return f"{self.name}: {value * self.factor}"

    @aiomas.expose
    async def nap(self, dt: float) -> float:
        await self.container.clock.sleep(dt)
        return self.container.clock.time()

    @aiomas.expose
    async def hang(self) -> None:
        await asyncio.Event().wait()


async def make_worker(container: aiomas.Container, name: str) -> Worker:
    """An asynchronous agent factory."""
    await asyncio.sleep(0)
    return Worker(container, name, factor=10)


def not_an_agent(container: aiomas.Container) -> str:
    return "spam"


@pytest.fixture
async def managed() -> AsyncIterator[tuple[aiomas.Container, Manager, Any]]:
    """A container with a Manager, and a proxy to it from another container."""
    clock = aiomas.ExternalClock("2020-01-01T00:00:00")
    managed = await aiomas.Container.create(("127.0.0.1", 0), clock=clock, as_coro=True)
    master = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)
    try:
        manager = Manager(managed)
        yield managed, manager, await master.connect(manager.addr)
    finally:
        await master.shutdown(as_coro=True)
        await managed.shutdown(as_coro=True)


# --- the Manager agent ---------------------------------------------------------------


async def test_manager_is_the_first_agent(managed: Any) -> None:
    container, manager, proxy = managed
    assert manager.addr == f"{container.base_url}0"
    assert str(proxy) == f"ManagerProxy('{manager.addr}')"


async def test_spawn_returns_a_proxy_and_the_address(managed: Any) -> None:
    container, _, proxy = managed
    worker, addr = await proxy.spawn(f"{__name__}:Worker", "w1", factor=3)
    assert addr == f"{container.base_url}1"
    assert await worker.work(2) == "w1: 6"
    assert container.validate_aid("1") == "Worker"


async def test_spawn_with_a_coroutine_factory(managed: Any) -> None:
    _, _, proxy = managed
    worker, _ = await proxy.spawn(f"{__name__}:make_worker", "w2")
    assert await worker.work(2) == "w2: 20"


@pytest.mark.parametrize(
    ("qualname", "error"),
    [
        ("no_colon", "ValueError"),
        ("no_such_module_xyz:Agent", "ModuleNotFoundError"),
        (f"{__name__}:NoSuchClass", "AttributeError"),
        (f"{__name__}:not_an_agent", "TypeError"),
    ],
)
async def test_spawn_errors(managed: Any, qualname: str, error: str) -> None:
    _, _, proxy = managed
    with pytest.raises(aiomas.RemoteException, match=error):
        await proxy.spawn(qualname)


async def test_set_time_drives_the_external_clock(managed: Any) -> None:
    container, _, proxy = managed
    worker, _ = await proxy.spawn(f"{__name__}:Worker", "w")
    naps = [asyncio.ensure_future(worker.nap(dt)) for dt in (2, 1)]
    await asyncio.sleep(50 * TIME_UNIT)
    await proxy.set_time(1)
    assert await asyncio.wait_for(naps[1], WAIT) == 1
    assert not naps[0].done()
    await proxy.set_time(5)
    assert await asyncio.wait_for(naps[0], WAIT) == 5
    assert container.clock.time() == 5
    with pytest.raises(aiomas.RemoteException, match="ValueError"):
        await proxy.set_time(4)


async def test_set_time_needs_an_external_clock() -> None:
    container = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)
    try:
        proxy = await container.connect(Manager(container).addr)
        with pytest.raises(aiomas.RemoteException, match="only an ExternalClock"):
            await proxy.set_time(1)
    finally:
        await container.shutdown(as_coro=True)


async def test_start_runs_until_stop() -> None:
    queue = aiomas.get_queue("managed")
    task = asyncio.ensure_future(start(queue))
    master = await aiomas.Container.create(aiomas.get_queue("master"), as_coro=True)
    try:
        manager = await master.connect("local://managed/0", timeout=WAIT)
        worker, _ = await manager.spawn(f"{__name__}:Worker", "x")
        assert await worker.work(1) == "x: 1"
        assert await manager.stop() is None
        await asyncio.wait_for(task, WAIT)
        assert queue.server is None  # The container is shut down.
        with pytest.raises(ConnectionResetError):
            await manager.stop()
    finally:
        task.cancel()
        await master.shutdown(as_coro=True)


async def test_serve_reports_the_manager_and_shuts_down_when_cancelled() -> None:
    ready: list[Manager] = []
    task = asyncio.ensure_future(serve(("127.0.0.1", 0), {}, ready.append))
    for _ in range(100):
        if ready:
            break
        await asyncio.sleep(10 * TIME_UNIT)
    (manager,) = ready
    assert manager.addr.endswith("/0")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(RuntimeError, match="shut down"):
        Worker(manager.container, "too late")


# --- the command line ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:5555", ("127.0.0.1", 5555)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:5555", ("::1", 5555)),
    ],
)
def test_host_port(value: str, expected: tuple[str, int]) -> None:
    assert host_port(value) == expected


@pytest.mark.parametrize(
    "args",
    [
        ["5555"],
        ["localhost"],
        [":5555"],
        ["localhost:port"],
        ["localhost:70000"],
        ["localhost:5555", "--start-date", "yesterday"],
        ["localhost:5555", "--codec", "pickle"],
        ["localhost:5555", "--log-level", "loud"],
        ["localhost:5555", "--cafile", "ca.pem"],
        ["localhost:5555", "--max-frame-size", "-1"],
        ["localhost:5555", "--max-frame-size", "lots"],
        ["localhost:5555", "--max-frame-size", str(2**32)],
        ["localhost:5555", "--dead-peer-timeout", "0"],
        ["localhost:5555", "--dead-peer-timeout", "soon"],
        ["localhost:5555", "--dead-peer-timeout", "nan"],
        [],
    ],
)
def test_bad_arguments_exit_with_a_message(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(args, prog="aiomas-test")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "aiomas-test: error:" in err


def test_limit_options() -> None:
    parser = make_parser()
    args = parser.parse_args(
        ["localhost:5555", "--max-frame-size", "1000", "--dead-peer-timeout", "2.5"]
    )
    kwargs = container_kwargs(args, parser)
    assert (kwargs["max_frame_size"], kwargs["dead_peer_timeout"]) == (1000, 2.5)
    kwargs = container_kwargs(parser.parse_args(["localhost:5555"]), parser)
    assert kwargs["max_frame_size"] == DEFAULT_MAX_FRAME_SIZE
    assert kwargs["dead_peer_timeout"] is None


def test_iso_date_accepts_iso_dates() -> None:
    assert iso_date("2010-03-27T00:00:00+01:00") == "2010-03-27T00:00:00+01:00"


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"], prog="aiomas-test")
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("HOST:PORT", "--start-date", "--codec", "--log-level", "--cafile"):
        assert option in out


# --- containers in subprocesses -----------------------------------------------------


async def start_process(*args: str) -> ContainerProcess:
    return await ContainerProcess.start(
        "127.0.0.1:0", "--log-level", "warning", *args, env=CHILD_ENV, cwd=str(ROOT)
    )


async def test_subprocess_containers_driven_by_a_master() -> None:
    """Two subprocess containers with ExternalClocks: the master spawns agents,
    sets the time of both via their managers and stops them."""
    processes = [
        await start_process("--start-date", "2020-01-01T00:00:00", "--init-time", "0")
        for _ in range(2)
    ]
    master = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)
    try:
        managers = [await master.connect(p.manager_addr) for p in processes]
        spawned = [
            await m.spawn(f"{__name__}:Worker", f"w{i}") for i, m in enumerate(managers)
        ]
        workers = [worker for worker, _ in spawned]
        assert [await w.work(3) for w in workers] == ["w0: 3", "w1: 3"]
        # The address works for connect(), too.
        by_addr = await master.connect(spawned[1][1])
        assert await by_addr.work(1) == "w1: 1"
        naps = [asyncio.ensure_future(w.nap(10)) for w in workers]
        await asyncio.sleep(100 * TIME_UNIT)
        assert not any(n.done() for n in naps)
        await asyncio.gather(*(m.set_time(10) for m in managers))
        assert await asyncio.wait_for(asyncio.gather(*naps), WAIT) == [10, 10]
        await asyncio.gather(*(m.stop() for m in managers))
        codes = await asyncio.wait_for(
            asyncio.gather(*(p.wait() for p in processes)), WAIT
        )
        assert codes == [0, 0]
    finally:
        for process in processes:
            await process.kill()
        await master.shutdown(as_coro=True)


class LoopReporter(aiomas.Agent):
    @aiomas.expose
    def loop(self) -> str:
        return type(asyncio.get_running_loop()).__module__


@pytest.mark.parametrize(
    ("option", "module"), [((), "asyncio"), (("--loop", "uvloop"), "uvloop")]
)
async def test_a_subprocess_container_runs_on_the_loop_asked_for(
    option: tuple[str, ...], module: str
) -> None:
    process = await start_process(*option)
    master = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)
    try:
        manager = await master.connect(process.manager_addr)
        reporter, _ = await manager.spawn(f"{__name__}:LoopReporter")
        assert (await reporter.loop()).split(".")[0] == module
        await manager.stop()
        assert await asyncio.wait_for(process.wait(), WAIT) == 0
    finally:
        await process.kill()
        await master.shutdown(as_coro=True)


def test_an_unknown_loop_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["127.0.0.1:0", "--loop", "trio"], prog="aiomas-test")
    assert info.value.code == 2
    assert "invalid choice: 'trio'" in capsys.readouterr().err


class DateSleeper(aiomas.Agent):
    @aiomas.expose
    async def sleep_until(self, date: str) -> str:
        clock = self.container.clock
        await clock.sleep_until(arrow.get(date))
        return f"{clock.time()} {clock.utcnow()}"

    @aiomas.expose
    def now(self) -> str:
        return str(self.container.clock.utcnow())


async def test_a_subprocess_start_date_is_reached_at_set_time_0() -> None:
    """--start-date is the date at time 0; the default --init-time -1 starts a
    second earlier, so waiting for the start date waits for set_time(0)."""
    process = await start_process("--start-date", "2020-01-01T00:00:00")
    master = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)
    try:
        manager = await master.connect(process.manager_addr)
        sleeper, _ = await manager.spawn(f"{__name__}:DateSleeper")
        assert await sleeper.now() == "2019-12-31T23:59:59+00:00"
        woken = asyncio.ensure_future(sleeper.sleep_until("2020-01-01T00:00:00"))
        await asyncio.sleep(200 * TIME_UNIT)
        assert not woken.done()
        await manager.set_time(0)
        assert await asyncio.wait_for(woken, WAIT) == "0 2020-01-01T00:00:00+00:00"
        await manager.stop()
        assert await asyncio.wait_for(process.wait(), WAIT) == 0
    finally:
        await process.kill()
        await master.shutdown(as_coro=True)


@pytest.mark.parametrize("codec", ["msgpack", "msgpack-blosc"])
async def test_subprocess_container_with_another_codec(codec: str) -> None:
    process = await start_process("--codec", codec)
    master = await aiomas.Container.create(
        ("127.0.0.1", 0),
        codec=aiomas.MsgPack if codec == "msgpack" else aiomas.MsgPackBlosc,
        as_coro=True,
    )
    try:
        manager = await master.connect(process.manager_addr)
        worker, _ = await manager.spawn(f"{__name__}:Worker", "m")
        assert await worker.work(7) == "m: 7"
        await manager.stop()
        assert await asyncio.wait_for(process.wait(), WAIT) == 0
    finally:
        await process.kill()
        await master.shutdown(as_coro=True)


async def test_subprocess_container_with_tls(tls: Any) -> None:
    files = (
        "--cafile",
        tls.cafile,
        "--certfile",
        tls.certfile,
        "--keyfile",
        tls.keyfile,
    )
    process = await start_process(*files)
    certs = aiomas.SSLCerts(tls.cafile, tls.certfile, tls.keyfile)
    master = await aiomas.Container.create(("127.0.0.1", 0), ssl=certs, as_coro=True)
    try:
        manager = await master.connect(process.manager_addr)
        worker, _ = await manager.spawn(f"{__name__}:Worker", "t")
        assert await worker.work(1) == "t: 1"
        (client,) = state_of(master).pool.clients.values()
        # Proxies are equal if they have the same channel and path.
        assert manager == rpc.Proxy(client.channel, "agents/0")
        assert client.channel.get_extra_info("ssl_object") is not None
        await manager.stop()
        assert await asyncio.wait_for(process.wait(), WAIT) == 0
    finally:
        await process.kill()
        await master.shutdown(as_coro=True)


@pytest.mark.skipif(sys.platform == "win32", reason="no SIGTERM on Windows")
async def test_sigterm_shuts_the_container_down() -> None:
    process = await start_process()
    process.process.terminate()
    assert await asyncio.wait_for(process.wait(), WAIT) == 0


async def test_killed_process_fails_calls_in_flight_promptly() -> None:
    """SIGKILL with 100 calls in flight: all fail with ConnectionResetError
    within a second, on_connection_reset fires, no socket is left open, and a
    peer restarted at the same address is reached with a new connection."""
    process = await start_process()
    master = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)
    try:
        manager = await master.connect(process.manager_addr)
        worker, _ = await manager.spawn(f"{__name__}:Worker", "k")
        (client,) = state_of(master).pool.clients.values()
        resets: list[BaseException] = []
        client.on_connection_reset(resets.append)
        calls = [asyncio.ensure_future(worker.hang()) for _ in range(100)]
        await asyncio.sleep(100 * TIME_UNIT)
        start_time = time.monotonic()
        await process.kill()
        results = await asyncio.wait_for(
            asyncio.gather(*calls, return_exceptions=True), WAIT
        )
        assert time.monotonic() - start_time < 1
        assert all(isinstance(r, ConnectionResetError) for r in results)
        await asyncio.sleep(
            50 * TIME_UNIT
        )  # the reset callback runs in the service task
        assert len(resets) == 1
        assert client.channel.protocol.is_closed()
        assert state_of(master).pool.clients == {}
        # The same address again, served by a new process.
        host_port = process.manager_addr[len("tcp://") :].rsplit("/", 1)[0]
        process = await ContainerProcess.start(
            host_port, "--log-level", "warning", env=CHILD_ENV, cwd=str(ROOT)
        )
        manager = await master.connect(process.manager_addr, timeout=WAIT)
        worker, _ = await manager.spawn(f"{__name__}:Worker", "again")
        assert await worker.work(2) == "again: 2"
    finally:
        await process.kill()
        await master.shutdown(as_coro=True)


async def test_bad_arguments_make_start_fail() -> None:
    with pytest.raises(RuntimeError, match="exited with code 2"):
        await ContainerProcess.start("not-an-address")


async def test_taken_port_makes_start_fail() -> None:
    container = await aiomas.Container.create(("127.0.0.1", 0), as_coro=True)
    try:
        _, port = split_host_port(container.base_url[len("tcp://") : -1])
        with pytest.raises(RuntimeError, match="exited with code 1"):
            await ContainerProcess.start(f"127.0.0.1:{port}")
    finally:
        await container.shutdown(as_coro=True)


@pytest.mark.skipif(sys.platform == "win32", reason="no SIGINT to a child on Windows")
@pytest.mark.usefixtures("sigint_reaches_children")
async def test_sigint_ends_the_process() -> None:
    process = await start_process()
    try:
        process.process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), WAIT) == 130
    finally:
        await process.kill()  # Leave nothing behind if it did not stop.


async def test_wait_or_kill() -> None:
    process = await start_process()
    start_time = time.monotonic()
    code = await process.wait_or_kill(0.2)  # nobody stopped it: killed
    assert code == -signal.SIGKILL if sys.platform != "win32" else code != 0
    assert time.monotonic() - start_time < WAIT
    assert await process.wait_or_kill() == code  # already gone
