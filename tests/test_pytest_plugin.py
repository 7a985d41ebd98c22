"""Tests for aiomas.pytest_plugin, the fixtures aiomas ships for pytest.

Each test writes test files into a fresh directory and runs pytest on them in a
subprocess (``pytester``, enabled by ``-p pytester`` in pyproject.toml).  That
directory has no aiomas configuration, so every run states its own options.
"""

from __future__ import annotations

import importlib.metadata
import re
from textwrap import dedent

import pytest

from aiomas import pytest_plugin

FIXTURES = [
    "aiomas_container",
    "aiomas_container_pair",
    "aiomas_local_containers",
    "aiomas_external_clock",
    "aiomas_clock_container",
    "aiomas_seed",
    "aiomas_fault_plan",
    "aiomas_simulation",
]

# Fails a test whose fixtures leave a task behind, collects garbage so that an
# unclosed socket or transport warns (an error with -W error), and checks that
# nothing is left bound to a LocalQueue.
HYGIENE_CONFTEST = """
    import asyncio
    import gc
    import sys

    import pytest_asyncio

    import aiomas

    @pytest_asyncio.fixture(autouse=True)
    async def _hygiene():
        assert sys.flags.dev_mode
        assert asyncio.get_running_loop().get_debug()
        yield
        current = asyncio.current_task()
        leaked = [t for t in asyncio.all_tasks() if t is not current]
        assert not leaked, f"leaked tasks: {leaked}"
        gc.collect()
        assert aiomas.get_queue("aiomas-test-0").server is None
"""

AGENTS = """
    import asyncio

    import aiomas

    class Echo(aiomas.Agent):
        @aiomas.expose
        def echo(self, text):
            return text.upper()

        async def call(self, addr, text):
            other = await self.container.connect(addr)
            return await other.echo(text)

    class Recorder(aiomas.Agent):
        def __init__(self, container):
            super().__init__(container)
            self.notes = []

        @aiomas.expose
        def note(self, text):
            self.notes.append(text)

        async def report(self, addr, name, count):
            recorder = await self.container.connect(addr)
            for i in range(count):
                await recorder.note(f"{name}{i}")

    class Sleeper(aiomas.Agent):
        def __init__(self, container):
            super().__init__(container)
            self.sleeping = asyncio.Event()

        @aiomas.expose
        async def remind(self, dt):
            self.sleeping.set()
            await self.container.clock.sleep(dt)
            return self.container.clock.time()

        async def tick(self, count):
            ticks = []
            for _ in range(count):
                await self.container.clock.sleep(1)
                ticks.append(self.container.clock.time())
            return ticks
"""


@pytest.fixture
def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester directory with an ini file and the agents module, whose
    subprocess runs load the installed plugins (as a user's test run would)."""
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    # Dev mode: warnings of unclosed resources and never awaited coroutines.
    monkeypatch.setenv("PYTHONDEVMODE", "1")
    pytester.makeini(
        """
        [pytest]
        asyncio_mode = auto
        asyncio_debug = true
        asyncio_default_fixture_loop_scope = function
        asyncio_default_test_loop_scope = function
        """
    )
    pytester.makepyfile(agents=dedent(AGENTS))
    return pytester


def runpytest(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-W", "error", *args, timeout=50
    )


def test_the_entry_point_names_the_plugin(pytestconfig: pytest.Config) -> None:
    (entry_point,) = (
        ep
        for ep in importlib.metadata.entry_points(group="pytest11")
        if ep.name == "aiomas"
    )
    assert entry_point.value == "aiomas.pytest_plugin"
    assert pytestconfig.pluginmanager.get_plugin("aiomas") is pytest_plugin


def test_the_plugin_hooks() -> None:
    # The option, the timeout and the report; nothing else changes a run.
    assert [name for name in vars(pytest_plugin) if name.startswith("pytest_")] == [
        "pytest_addoption",
        "pytest_runtest_call",
        "pytest_runtest_makereport",
    ]


def test_all_fixtures_are_listed_and_prefixed(run: pytest.Pytester) -> None:
    result = runpytest(run, "--fixtures")
    section = re.search(
        r"fixtures defined from aiomas\.pytest_plugin -+\n(.*?)\n\n\n",
        result.stdout.str(),
        re.DOTALL,
    )
    assert section is not None, result.stdout.str()
    names = re.findall(r"^(\w+) -- ", section.group(1), re.MULTILINE)
    assert names == FIXTURES


def test_the_fixtures_work(
    run: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    run.makeconftest(HYGIENE_CONFTEST)
    run.makepyfile(
        test_fixtures="""
        import asyncio

        import pytest

        import aiomas
        from aiomas.pytest_plugin import LocalContainerFactory, SteppingClock
        from agents import Echo, Recorder, Sleeper

        SEEN = {}

        async def test_container(aiomas_container):
            assert aiomas_container.base_url.startswith("tcp://127.0.0.1:")
            assert not aiomas_container.base_url.endswith(":0/")
            assert isinstance(aiomas_container.clock, aiomas.AsyncioClock)
            a, b = Echo(aiomas_container), Echo(aiomas_container)
            assert await a.call(b.addr, "hi") == "HI"

        async def test_container_pair(aiomas_container_pair):
            here, there = aiomas_container_pair
            assert here.base_url != there.base_url
            a, b = Echo(here), Echo(there)
            assert await a.call(b.addr, "there") == "THERE"
            assert await b.call(a.addr, "back") == "BACK"

        async def test_local_containers(aiomas_local_containers):
            assert isinstance(aiomas_local_containers, LocalContainerFactory)
            containers = await aiomas_local_containers()
            containers += await aiomas_local_containers(1)
            assert [c.base_url for c in containers] == [
                "local://aiomas-test-0/",
                "local://aiomas-test-1/",
                "local://aiomas-test-2/",
            ]
            a, b = Echo(containers[0]), Echo(containers[2])
            assert await a.call(b.addr, "local") == "LOCAL"
            SEEN["queue"] = aiomas.get_queue("aiomas-test-0")

        async def test_local_queues_were_forgotten(aiomas_local_containers):
            old = SEEN["queue"]
            assert old.server is None
            assert aiomas.get_queue("aiomas-test-0") is not old
            (container,) = await aiomas_local_containers(1)
            assert container.base_url == "local://aiomas-test-0/"

        async def test_local_containers_share_create_kwargs(
            aiomas_local_containers, aiomas_external_clock
        ):
            containers = await aiomas_local_containers(3, clock=aiomas_external_clock)
            assert all(c.clock is aiomas_external_clock for c in containers)
            assert await aiomas_local_containers(0) == []
            with pytest.raises(ValueError, match="negative"):
                await aiomas_local_containers(-1)

        async def test_local_message_order(aiomas_local_containers):
            async def run_once():
                home, *others = await aiomas_local_containers(4)
                recorder = Recorder(home)
                reporters = [Recorder(c) for c in others]
                await asyncio.gather(
                    *(r.report(recorder.addr, n, 3) for r, n in zip(reporters, "abc"))
                )
                return recorder.notes

            orders = [await run_once() for _ in range(3)]
            assert sorted(orders[0]) == [f"{n}{i}" for n in "abc" for i in range(3)]
            assert orders[1] == orders[0]
            assert orders[2] == orders[0]
            print("ORDER:", " ".join(orders[0]))

        def test_external_clock(aiomas_external_clock):
            assert isinstance(aiomas_external_clock, SteppingClock)
            assert isinstance(aiomas_external_clock, aiomas.ExternalClock)
            assert aiomas_external_clock.time() == 0
            assert str(aiomas_external_clock.utcnow()) == "2016-01-01T00:00:00+00:00"

        async def test_advance_steps_through_deadlines(aiomas_external_clock):
            clock = aiomas_external_clock
            calls = []
            clock.call_at(2, calls.append, "at 2")
            clock.call_in(1, calls.append, "in 1")
            clock.call_in(9, calls.append, "in 9").cancel()
            await clock.advance(0)
            assert calls == []
            await clock.advance(5)
            assert calls == ["in 1", "at 2"]
            assert clock.time() == 5
            assert str(clock.utcnow()) == "2016-01-01T00:00:05+00:00"
            with pytest.raises(ValueError, match="backwards"):
                await clock.advance(-1)
            await clock.advance(10)  # passes the cancelled call
            assert calls == ["in 1", "at 2"]

        async def test_advance_wakes_a_ticking_agent(
            aiomas_clock_container, aiomas_external_clock
        ):
            assert aiomas_clock_container.clock is aiomas_external_clock
            sleeper = Sleeper(aiomas_clock_container)
            ticks = asyncio.ensure_future(sleeper.tick(3))
            await asyncio.sleep(0)
            await aiomas_external_clock.advance(2.5)
            assert not ticks.done()
            await aiomas_external_clock.advance(0.5)
            assert ticks.done()
            assert await ticks == [1, 2, 3]

        async def test_advance_wakes_a_remote_sleeper(
            aiomas_container, aiomas_clock_container, aiomas_external_clock
        ):
            loop = asyncio.get_running_loop()
            start = loop.time()
            sleeper = Sleeper(aiomas_clock_container)
            caller = Echo(aiomas_container)
            proxy = await caller.container.connect(sleeper.addr)
            reply = asyncio.ensure_future(proxy.remind(3600))
            await sleeper.sleeping.wait()
            await aiomas_external_clock.advance(3599)
            assert not reply.done()
            await aiomas_external_clock.advance(1)
            assert await reply == 3600
            assert loop.time() - start < 30  # an hour of clock time, no real hour

        async def test_advance_settles_an_agent_that_calls_first(
            aiomas_clock_container, aiomas_external_clock
        ):
            # The newcomer case: a woken agent makes an RPC call before it
            # sleeps again; advance() waits for it, with no real-time sleep.
            clock = aiomas_external_clock
            echo = Echo(aiomas_clock_container)
            caller = Echo(aiomas_clock_container)
            replies = []

            async def loop_forever():
                while True:
                    await clock.sleep(10)
                    replies.append(await caller.call(echo.addr, f"t{clock.time():g}"))

            task = asyncio.ensure_future(loop_forever())
            await clock.run_until_idle()
            await clock.advance(30)
            assert replies == ["T10", "T20", "T30"]
            await clock.advance(5)
            assert replies == ["T10", "T20", "T30"]
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        """
    )
    monkeypatch.setenv("PYTHONHASHSEED", "1")
    result = runpytest(run, "-s")
    result.assert_outcomes(passed=11)
    order = re.search(r"ORDER: [\w ]+", result.stdout.str())
    assert order is not None
    # The same order in another process, with other hashes:
    monkeypatch.setenv("PYTHONHASHSEED", "2")
    again = runpytest(run, "-s", "-k", "test_local_message_order")
    again.assert_outcomes(passed=1)
    again_order = re.search(r"ORDER: [\w ]+", again.stdout.str())
    assert again_order is not None
    assert again_order.group() == order.group()


def test_the_fixtures_work_in_strict_mode(run: pytest.Pytester) -> None:
    run.makeconftest(HYGIENE_CONFTEST)
    run.makepyfile(
        test_strict="""
        import pytest

        from agents import Echo

        @pytest.mark.asyncio
        async def test_pair(aiomas_container_pair):
            here, there = aiomas_container_pair
            assert await Echo(here).call(Echo(there).addr, "strict") == "STRICT"

        @pytest.mark.asyncio
        async def test_local(aiomas_local_containers):
            a, b = await aiomas_local_containers()
            assert await Echo(a).call(Echo(b).addr, "strict") == "STRICT"

        @pytest.mark.asyncio
        async def test_clock(aiomas_clock_container, aiomas_external_clock):
            await aiomas_external_clock.advance(1)
            assert aiomas_clock_container.clock.time() == 1
        """
    )
    result = runpytest(run, "-o", "asyncio_mode=strict")
    result.assert_outcomes(passed=3)


def test_failing_tests_fail_and_are_cleaned_up(run: pytest.Pytester) -> None:
    run.makeconftest(HYGIENE_CONFTEST)
    run.makepyfile(
        test_failures="""
        import pytest

        import aiomas
        from agents import Echo

        SEEN = {}

        async def test_wrong_answer(aiomas_container_pair):
            here, there = aiomas_container_pair
            SEEN["url"] = Echo(there).addr
            assert await Echo(here).call(SEEN["url"], "hi") == "hi"

        async def test_error_in_local_test(aiomas_local_containers):
            await aiomas_local_containers(3)
            raise RuntimeError("boom")

        async def test_the_containers_are_gone(aiomas_container):
            with pytest.raises(ConnectionRefusedError):
                await aiomas_container.connect(SEEN["url"])
            # The local containers were shut down and forgotten, too:
            assert aiomas.get_queue("aiomas-test-0").server is None
        """
    )
    result = runpytest(run)
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*assert 'HI' == 'hi'*",
            "*RuntimeError: boom*",
        ]
    )


def test_p_no_aiomas_disables_the_plugin(run: pytest.Pytester) -> None:
    run.makepyfile(
        test_disabled="""
        async def test_container(aiomas_container):
            pass
        """
    )
    result = runpytest(run, "-p", "no:aiomas")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'aiomas_container' not found*"])
    listed = runpytest(run, "-p", "no:aiomas", "--fixtures").stdout.str()
    assert "aiomas.pytest_plugin" not in listed
    assert not any(f"\n{name} -- " in listed for name in FIXTURES)


def test_harmless_without_pytest_asyncio(run: pytest.Pytester) -> None:
    # Makes "import pytest_asyncio" fail, as if it were not installed; -p loads
    # it before the plugins of the installed packages.
    run.makepyfile(
        no_pytest_asyncio="""
        import sys

        sys.modules["pytest_asyncio"] = None
        """,
        test_sync="""
        from aiomas.pytest_plugin import SteppingClock

        def test_plain():
            assert 1 + 1 == 2

        def test_clock(aiomas_external_clock):
            assert isinstance(aiomas_external_clock, SteppingClock)

        def test_async_fixture(aiomas_container):
            pass
        """,
    )
    # With the ini file of the run fixture, pytest would warn about unknown
    # asyncio_* options.
    (run.path / "tox.ini").unlink()
    result = runpytest(
        run, "-p", "no_pytest_asyncio", "-p", "no:asyncio", "--strict-config"
    )
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        ["*requested an async fixture 'aiomas_container'*no plugin*"]
    )
    listed = runpytest(run, "-p", "no_pytest_asyncio", "-p", "no:asyncio", "--fixtures")
    assert all(name in listed.stdout.str() for name in FIXTURES)


SIMULATION_TESTS = """
    import pytest

    from aiomas.simulation import FaultPlan, LinkFaults
    from agents import Echo

    async def call_echo(sim):
        a, b = sim.containers.values()
        return await Echo(a).call(Echo(b).addr, "hi")

    def test_simulation_runs(aiomas_simulation, aiomas_seed, aiomas_fault_plan):
        assert aiomas_simulation.seed == aiomas_seed
        assert aiomas_fault_plan == FaultPlan()
        assert aiomas_simulation.run(call_echo, n=2) == "HI"
        print("SEED", aiomas_seed)

    class TestSlowLinks:
        @pytest.fixture
        def aiomas_fault_plan(self):
            return FaultPlan(default=LinkFaults(latency=0.25))

        def test_the_plan_can_be_overridden(self, aiomas_simulation):
            async def main(sim):
                await call_echo(sim)
                return sim.log[-1].time

            # A lookup and a call: four frames, one after the other.
            assert aiomas_simulation.run(main, n=2) == 1.0

        def test_fails(self, aiomas_simulation):
            assert aiomas_simulation.run(call_echo, n=2) == "hi"
"""


def test_the_simulation_fixtures_report_the_seed(run: pytest.Pytester) -> None:
    run.makepyfile(test_sim=SIMULATION_TESTS)
    result = runpytest(run, "-s")
    result.assert_outcomes(passed=2, failed=1)
    seed = re.search(r"SEED (\d+)", result.stdout.str())
    assert seed is not None
    result.stdout.fnmatch_lines(
        [
            "*- aiomas simulation -*",
            "seed: *",
            "plan: FaultPlan(default=LinkFaults(latency=0.25*",
            "replay: pytest --aiomas-seed=* test_sim.py::TestSlowLinks::test_fails",
        ]
    )
    # The same test id gives the same seed in every run; the option sets it.
    again = runpytest(run, "-s", "-k", "test_simulation_runs")
    assert f"SEED {seed.group(1)}" in again.stdout.str()
    chosen = runpytest(run, "-s", "--aiomas-seed=1234", "-k", "test_simulation_runs")
    chosen.assert_outcomes(passed=1)
    assert "SEED 1234" in chosen.stdout.str()


def test_a_stuck_test_times_out_with_a_message(run: pytest.Pytester) -> None:
    run.makepyfile(
        test_stuck="""
        import asyncio
        import time

        def test_sync_stuck(aiomas_external_clock):
            time.sleep(30)

        async def test_async_stuck(aiomas_external_clock):
            await asyncio.Event().wait()

        def test_plain_tests_are_not_bounded():
            time.sleep(0.5)
        """
    )
    result = runpytest(run, "-p", "no:timeout", "-o", "aiomas_timeout=0.2")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        ["*TestTimeout: The test took more than 0.2 s (aiomas_timeout)*"]
    )


def test_async_tests_on_virtual_time(run: pytest.Pytester) -> None:
    # What docs/simulation.rst suggests: pytest-asyncio makes its loops with
    # VirtualTimeLoop, so that containers on AsyncioClock run on virtual time.
    run.makeconftest(
        HYGIENE_CONFTEST
        + """
    from aiomas.simulation import VirtualTimeLoop

    def pytest_asyncio_loop_factories(config, item):
        return {"virtual-time": VirtualTimeLoop}
    """
    )
    run.makepyfile(
        test_virtual="""
        import asyncio
        import time

        from aiomas import simulation
        from agents import Echo

        async def test_an_hour_at_once(aiomas_local_containers):
            here, there = await aiomas_local_containers()
            echo, caller = Echo(there), Echo(here)
            loop = asyncio.get_running_loop()
            assert isinstance(loop, simulation.VirtualTimeLoop)
            replies = []

            async def tick():
                while True:
                    await here.clock.sleep(10)
                    replies.append(await caller.call(echo.addr, "tick"))

            task = asyncio.ensure_future(tick())
            start = time.perf_counter()
            await simulation.advance(3600)
            assert time.perf_counter() - start < 20
            assert replies == ["TICK"] * 360
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        """
    )
    result = runpytest(run)
    result.assert_outcomes(passed=1)
