"""Every program in examples/ runs and does what it says."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aiomas.testing import TIME_UNIT

EXAMPLES = Path(__file__).parent.parent / "examples"


def run_example(name: str, *args: str, timeout: float = 30) -> str:
    result = subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


@pytest.mark.parametrize("codec", ["json", "msgpack"])
def test_channel_demo(codec: str) -> None:
    out = run_example("channel_demo.py", "--codec", codec)
    lines = out.splitlines()
    assert lines[0].startswith("server: listening on 127.0.0.1:")
    for i in range(3):
        assert f"client-{i}: 6 * 7 = 42" in lines
        assert f"client-{i}: 84 / 2 = 42.0" in lines
        assert (
            f"client-{i}: 1 / 0 failed remotely: ZeroDivisionError: division by zero"
            in lines
        )
    assert lines.count("server: client left") == 0
    assert sum("left" in line for line in lines) == 3
    assert lines[-1] == "server: closed"


@pytest.mark.parametrize(
    "args", [[], ["--external-clock", "--speed", "100"]], ids=["realtime", "external"]
)
def test_contract_net_demo(args: list[str]) -> None:
    out = run_example("contract_net.py", *args)
    lines = out.splitlines()
    mode = "ExternalClock at 100x real time" if args else "real time"
    assert lines[0].endswith(f"6 bidders in 2 subprocess containers ({mode})")
    for task in range(5):
        assert sum(f"] task {task} (size " in line for line in lines) == 1
        awarded = [line for line in lines if f"] task {task}: awarded to" in line]
        assert len(awarded) == 1
        winner = awarded[0].split("awarded to ")[1].split()[0]
        assert any(line.endswith(f"task {task} finished by {winner}") for line in lines)
        assert any(line.startswith(f"    task {task}: {winner} ") for line in lines)
    # Bidders live in two other processes, and win only there.
    containers = [line.split("container ")[1].split()[0] for line in lines[1:3]]
    assert len(set(containers)) == 2
    for line in lines:
        if "awarded to" in line:
            assert line.split(" at ")[1].rsplit("/", 1)[0] in containers
    assert "all tasks finished:" in lines[-6]


def _alive(pid: int) -> bool:
    """Whether process *pid* exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # No /proc (macOS): ask the kernel.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


@pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals")
@pytest.mark.parametrize("to_group", [True, False], ids=["ctrl-c", "kill-int"])
@pytest.mark.usefixtures("sigint_reaches_children")
def test_contract_net_demo_interrupted(to_group: bool) -> None:
    """SIGINT to the demo's process group (Ctrl-C in a terminal) or to the demo
    alone: one line on stderr, and no container process left behind."""
    demo = subprocess.Popen(
        [sys.executable, "-W", "error", str(EXAMPLES / "contract_net.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # Its own process group, as under a shell.
    )
    assert demo.stdout is not None
    try:
        # Wait until the auctions run: the header with the children's pids,
        # then the first two calls for proposals.
        output = b""
        deadline = time.monotonic() + 30
        while output.count(b"call for proposals") < 2:
            assert time.monotonic() < deadline, output
            ready, _, _ = select.select([demo.stdout], [], [], 1)
            if ready:
                chunk = os.read(demo.stdout.fileno(), 4096)
                assert chunk, output  # The demo ended before it ran.
                output += chunk
        pids = [int(pid) for pid in re.findall(rb"\(pid (\d+)\)", output)]
        assert len(pids) == 2
        if to_group:
            os.killpg(demo.pid, signal.SIGINT)
        else:
            demo.send_signal(signal.SIGINT)
        _, err = demo.communicate(timeout=20)
        assert demo.returncode == 130
        assert err.decode().splitlines() == ["examples/contract_net.py: interrupted"]
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids):
            assert time.monotonic() < deadline, f"left behind: {pids}"
            time.sleep(50 * TIME_UNIT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(demo.pid, signal.SIGKILL)  # Whatever is left of it.
        demo.wait(5)


def test_hello_world() -> None:
    lines = run_example("hello_world.py").splitlines()
    assert lines[0].startswith("Monty (tcp://127.0.0.1:")
    assert lines[0].endswith("/0) says:")
    greetings = [line for line in lines if "Hello, World!" in line]
    assert len(greetings) == 3
    assert lines[1:4] == greetings
    assert lines[-1] == "container shut down"


def test_rpc_math() -> None:
    lines = run_example("rpc_math.py").splitlines()
    assert lines[0].startswith("server: listening on 127.0.0.1:")
    port = lines[0].rsplit(":", 1)[1]
    assert lines[1:5] == [
        "client: 3 + 4 = 7",
        "client: 84 / 2 = 42.0",
        "client: mean of [1, 2, 3, 4, 100] = 22.0",
        "client: median of [1, 2, 3, 4, 100] = 3",
    ]
    origin = f"('127.0.0.1', {port})"
    assert lines[5] == (
        f"client: 1 / 0 failed on {origin}: ZeroDivisionError: division by zero"
    )
    assert lines[6].startswith(f"client: reset() failed on {origin}: LookupError:")
    assert "'reset'" in lines[6]
    assert lines[-1] == "server: answered 3 arithmetic calls, closed"


def test_rpc_bidirectional() -> None:
    lines = run_example("rpc_bidirectional.py").splitlines()
    assert lines[0].startswith("server: listening on 127.0.0.1:")
    for name in ("Monty", "Eric"):
        assert f"server: starting a job of 3 steps for {name}" in lines
        # The server's callbacks reach the client that called, in order.
        updates = [line for line in lines if line.startswith(f"{name}: server ")]
        assert updates == [
            f"{name}: server reports {i}/3 steps done" for i in (1, 2, 3)
        ]
        assert f"{name}: job result: 3 steps done for {name}" in lines
        assert f"{name} got progress updates [1, 2, 3]" in lines


def test_channel_custom_serializer() -> None:
    lines = run_example("channel_custom_serializer.py").splitlines()
    assert lines[0] == (
        'on the wire: ["scale", [{"__type__": [0, {"x": {"__type__": [1, [1, 1]]}, '
        '"y": {"__type__": [1, [1, 2]]}}]}, {"__type__": [1, [3, 1]]}]]'
    )
    assert lines[1].startswith("server: listening on 127.0.0.1:")
    # The server gets our types, and its replies are our types again.
    assert lines[2] == (
        "server: got scale [Point(x=Fraction(1, 1), y=Fraction(2, 1)), Fraction(1, 3)]"
    )
    assert "client: scale -> Point(x=Fraction(1, 3), y=Fraction(2, 3)) (Point)" in lines
    assert (
        "client: midpoint -> Point(x=Fraction(2, 3), y=Fraction(3, 4)) (Point)" in lines
    )
    assert (
        "client: rotate failed remotely: ValueError: unknown operation 'rotate'"
        in lines
    )
    assert lines[-2:] == ["server: client left", "server: closed"]


def test_tls_containers() -> None:
    pytest.importorskip("trustme")
    lines = run_example("tls_containers.py").splitlines()
    tmpdir = lines[0].removeprefix("certificates in ").removesuffix(":")
    assert lines[1:8] == [
        f"    {name}.pem"
        for name in (
            "alice-cert",
            "alice-key",
            "bob-cert",
            "bob-key",
            "ca",
            "mallory-cert",
            "mallory-key",
        )
    ]
    assert lines[8].startswith("Alice at tcp://127.0.0.1:")
    assert lines[8].endswith("/0 (TLS)")
    assert lines[9] == "Alice hears: Hello Alice, I am Bob"
    assert lines[10] == "Bob hears: Hello Bob, I am Alice"
    assert lines[11].startswith("Mallory (certificate from another CA) cannot connect:")
    assert lines[12].startswith("Eve (no TLS) cannot connect:")
    assert lines[13] == "Alice hears: Hello Alice, I am Bob"
    assert lines[14] == f"removed {tmpdir}: True"
    assert not Path(tmpdir).exists()


def test_cosimulation() -> None:
    lines = run_example("cosimulation.py").splitlines()
    # Four sensors in two container processes, none in this one.
    spawned = [
        line for line in lines if line.startswith("simulator: ") and " at " in line
    ]
    assert len(spawned) == 4
    containers = {line.split(" at ")[1].rsplit("/", 1)[0] for line in spawned}
    assert len(containers) == 2
    assert "simulator: one day from 2026-06-21 00:00 in 15-minute steps" in lines
    hourly = [line for line in lines if line.startswith("[")]
    assert [line[1:17] for line in hourly] == [
        f"2026-06-21 {h:02}:00" for h in range(1, 24)
    ] + ["2026-06-22 00:00"]
    # The readings follow the simulated time of day, not the real one.
    assert hourly[2].endswith(
        "temp-A  9.0 C | pv-A 0.00 kW | temp-B  8.0 C | pv-B 0.00 kW"
    )
    assert hourly[11].endswith(
        "temp-A 19.2 C | pv-A 5.00 kW | temp-B 14.8 C | pv-B 3.00 kW"
    )
    summary = next(line for line in lines if " steps, " in line)
    assert summary.startswith("simulator: 96 steps, 264 reports, ")
    assert lines[-4:] == [
        "    temp-A: 48 samples, min 9.0, max 21.0",
        "    pv-A: 96 samples, min 0.0, max 5.0",
        "    temp-B: 24 samples, min 8.0, max 16.0",
        "    pv-B: 96 samples, min 0.0, max 3.0",
    ]


def test_first_program() -> None:
    assert run_example("first_program.py") == "42\n"


def test_container_script_without_arguments_prints_its_usage() -> None:
    result = subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLES / "container_script.py")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("usage: container_script.py")
    assert "HOST:PORT START_DATE" in result.stderr
    assert "Traceback" not in result.stderr


def test_container_script(unused_tcp_port: int) -> None:
    """The script runs a Manager that a master can use and stop."""
    import asyncio

    import aiomas

    script = subprocess.Popen(
        [
            sys.executable,
            "-W",
            "error",
            str(EXAMPLES / "container_script.py"),
            f"127.0.0.1:{unused_tcp_port}",
            "2010-03-27T00:00:00+01:00",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )

    async def master() -> None:
        container = await aiomas.Container.create(
            ("127.0.0.1", 0), codec=aiomas.MsgPackBlosc, as_coro=True
        )
        try:
            manager = await container.connect(
                f"tcp://127.0.0.1:{unused_tcp_port}/0", timeout=20
            )
            _, addr = await manager.spawn("aiomas.demo:Bidder", "b", skill=1)
            assert addr == f"tcp://127.0.0.1:{unused_tcp_port}/1"
            await manager.set_time(0)  # init_time is -1
            await manager.stop()
        finally:
            await container.shutdown(as_coro=True)

    try:
        asyncio.run(master())
        assert script.wait(20) == 0
    finally:
        if script.poll() is None:
            script.kill()
        _, stderr = script.communicate(timeout=20)
    assert stderr == ""


def _sweep(*args: str) -> tuple[int, int | None]:
    """Run a seed sweep of simulation_ledger.py: (failures, first failing seed).
    (1,000 seeds take under 10 s on a quiet 2-core machine; the bound leaves
    room for a loaded one.)"""
    out = run_example("simulation_ledger.py", *args, timeout=180).splitlines()
    failures = int(out[0].split(": ")[1].split()[0])
    first = int(out[1].rsplit(" ", 1)[1]) if failures else None
    return failures, first


def test_simulation_ledger_sweep_finds_replays_and_fixes() -> None:
    # The bug needs faults: a healthy network never shows it.
    assert _sweep("--healthy", "sweep", "--seeds", "20") == (0, None)
    failures, seed = _sweep("sweep", "--seeds", "100")
    assert failures > 0
    assert seed is not None
    # The seed replays the failure, message by message, in any process.
    replays = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        script = str(EXAMPLES / "simulation_ledger.py")
        result = subprocess.run(
            [sys.executable, "-W", "error", script, "replay", str(seed)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
            env=env,
        )
        assert result.stderr == ""
        replays.append(result.stdout)
    assert replays[0] == replays[1]
    assert re.search(rf"buggy ledger, seed {seed}: balance \d+ != 390", replays[0])
    # The fixed ledger passes 1,000 seeds (in a few seconds: the sweep
    # prints its wall time).
    assert _sweep("--fixed", "sweep", "--seeds", "1000") == (0, None)


def test_nats_containers(tmp_path: Path) -> None:
    from .conftest import nats_missing
    from .nats_server import NatsServer, running

    if nats_missing():
        pytest.skip(str(nats_missing()))
    with running(NatsServer(tmp_path, "example")) as (server,):
        lines = run_example("nats_containers.py", server.url).splitlines()
    assert lines == [
        "clerk at nats://office/0",
        "on NATS: office, shop, warehouse",
        "WarehouseProxy('nats://warehouse/0'): 3 spam in stock",
        "nats://office/0 got 12 eggs",
        "ShopProxy('nats://shop/0'): spam costs 1.5",
        "nats://office/0 got 1 a bill",
        "ConnectionRefusedError: [Errno 111] No container 'nobody' on the NATS "
        "system (Nobody serves 'aiomas.nobody.connect')",
        "done",
    ]
