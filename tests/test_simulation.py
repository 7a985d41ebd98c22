"""Tests for aiomas.simulation: virtual time, the seeded network, replay."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterator
from typing import Any

import pytest

import aiomas
from aiomas import channel, local_queue, simulation, util, wire
from aiomas.simulation import (
    Crash,
    FaultPlan,
    LinkFaults,
    LogEntry,
    Partition,
    Simulation,
    SimulationStuck,
    VirtualTimeLoop,
    VirtualTimePolicy,
)

from .helpers import close_loop

# --- Virtual time ---------------------------------------------------------------


@pytest.fixture
def loop() -> Iterator[VirtualTimeLoop]:
    virtual = VirtualTimeLoop()
    yield virtual
    virtual.run_until_complete(virtual.shutdown_asyncgens())
    virtual.close()


def test_time_jumps_to_the_next_timer(loop: VirtualTimeLoop) -> None:
    order: list[tuple[str, float]] = []
    loop.call_later(20, lambda: order.append(("b", loop.time())))
    loop.call_later(10, lambda: order.append(("a", loop.time())))
    start = time.perf_counter()
    loop.run_until_complete(asyncio.sleep(3600))
    assert time.perf_counter() - start < 1  # an hour, at once
    assert loop.time() == 3600
    assert order == [("a", 10), ("b", 20)]


def test_run_until_idle_settles_chains_without_moving_time(
    loop: VirtualTimeLoop,
) -> None:
    steps: list[int] = []

    async def chain(n: int) -> None:
        for i in range(n):
            await asyncio.sleep(0)
            steps.append(i)

    async def main() -> float:
        task = asyncio.ensure_future(chain(50))
        later = asyncio.ensure_future(asyncio.sleep(5))
        await loop.run_until_idle()
        assert task.done()
        assert not later.done()
        await later
        return loop.time()

    assert loop.run_until_complete(main()) == 5
    assert steps == list(range(50))


def test_advance_without_autojump() -> None:
    loop = VirtualTimeLoop(autojump=False, start=100)

    async def main() -> None:
        sleeper = asyncio.ensure_future(asyncio.sleep(5))
        await loop.advance(3)
        assert loop.time() == 103
        assert not sleeper.done()
        await simulation.advance(2)
        assert loop.time() == 105
        assert sleeper.done()
        await loop.run_until_idle()
        assert loop.time() == 105
        with pytest.raises(ValueError, match="backwards"):
            await loop.advance(-1)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


async def test_advance_needs_a_virtual_loop() -> None:
    with pytest.raises(TypeError, match="VirtualTimeLoop"):
        await simulation.advance(1)


async def test_run_until_idle_on_another_loop() -> None:
    done = []

    async def chain() -> None:
        for _ in range(30):
            await asyncio.sleep(0)
        done.append(True)

    task = asyncio.ensure_future(chain())
    await simulation.run_until_idle()
    assert done == [True]
    await task

    async def busy() -> None:
        while True:
            await asyncio.sleep(0)

    spinner = asyncio.ensure_future(busy())
    with pytest.raises(SimulationStuck):
        await simulation.run_until_idle(max_rounds=50)
    spinner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await spinner


def test_the_policy_serves_aiomas_run(no_thread_loop: None) -> None:
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(VirtualTimePolicy())
    try:
        assert aiomas.run(asyncio.sleep(7, "slept")) == "slept"
        loop = util.get_loop()
        assert isinstance(loop, VirtualTimeLoop)
        assert loop.time() == 7
        clock = aiomas.AsyncioClock()
        assert aiomas.run(clock.sleep(3, "again")) == "again"
        assert clock.time() == 10
    finally:
        close_loop(util.get_loop())
        asyncio.set_event_loop(None)
        asyncio.set_event_loop_policy(previous)


# --- Running simulations ----------------------------------------------------------


class Echo(aiomas.Agent):
    def __init__(self, container: aiomas.Container) -> None:
        super().__init__(container)
        self.calls: list[Any] = []

    @aiomas.expose
    def echo(self, value: Any) -> Any:
        self.calls.append(value)
        return value


def test_a_stuck_run_fails_with_its_seed() -> None:
    async def main(sim: Simulation) -> None:
        await asyncio.get_running_loop().create_future()

    with pytest.raises(SimulationStuck, match="no timer is set") as info:
        simulation.run(main, seed=7)
    assert info.value.__notes__ == ["aiomas simulation: seed=7, plan=None"]

    async def periodic(sim: Simulation) -> None:
        # Timers keep firing, but what main waits for never comes.
        loop = asyncio.get_running_loop()

        def tick() -> None:
            loop.call_later(1, tick)

        tick()
        await loop.create_future()

    with pytest.raises(SimulationStuck, match="virtual time reached its end"):
        simulation.run(periodic, seed=7, timeout=100)


def test_a_stuck_clean_up_does_not_hang_the_run() -> None:
    async def main(sim: Simulation) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_future()
        finally:
            await loop.create_future()  # a clean-up that never ends

    with pytest.raises(SimulationStuck, match="no timer is set"):
        simulation.run(main, seed=7)


def test_a_failing_run_names_its_seed_and_plan() -> None:
    plan = FaultPlan(
        default=LinkFaults(latency=0.5, drop=0.1),
        partitions=(Partition(("sim-0",), ("sim-1",), start=10, duration=5),),
        crashes=(Crash("sim-1", at=3, restart_after=1),),
    )

    async def main(sim: Simulation) -> None:
        raise ValueError("the algorithm is wrong")

    with pytest.raises(ValueError, match="wrong") as info:
        simulation.run(main, seed=42, plan=plan)
    (note,) = info.value.__notes__
    assert note.startswith("aiomas simulation: seed=42, plan=")
    # The note is the code that replays the run.
    replay = eval(note.split("plan=", 1)[1], vars(simulation))
    assert replay == plan


def test_a_run_is_bounded_in_virtual_time() -> None:
    async def main(sim: Simulation) -> None:
        await asyncio.sleep(100)

    with pytest.raises(SimulationStuck, match=r"its end \(50 s\)"):
        simulation.run(main, seed=1, timeout=50)


def test_the_newcomer_case_with_autojump() -> None:
    """An agent that sleeps, then calls another agent, on virtual time."""

    async def main(sim: Simulation) -> list[tuple[float, Any]]:
        here, there = await sim.start(2)
        echo = Echo(there)
        clock = here.clock
        replies: list[tuple[float, Any]] = []

        async def tick() -> None:
            proxy = await here.connect(echo.addr)
            while True:
                await clock.sleep(10)
                replies.append((clock.time(), await proxy.echo(len(replies))))

        task = asyncio.ensure_future(tick())
        await simulation.advance(30)
        # Each reply takes two frames of 1 ms (the lookup in connect() came
        # before): the third sleep ends at 30.004, its reply comes at 30.006.
        assert replies == [(10.002, 0), (pytest.approx(20.004), 1)]
        await simulation.advance(0.01)
        assert len(replies) == 3
        await asyncio.sleep(3600 - asyncio.get_running_loop().time())  # at once
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return replies

    start = time.perf_counter()
    replies = simulation.run(main, seed=0)
    assert time.perf_counter() - start < 10
    assert [value for _, value in replies] == list(range(359))  # 3600 / 10.002


FAULTY = FaultPlan(
    default=LinkFaults(
        latency=0.01, jitter=0.02, drop=0.05, duplicate=0.05, reorder=0.1
    ),
)


async def chatter(sim: Simulation) -> list[str]:
    """Four containers call each other for a while; return what happened."""
    containers = await sim.start(4)
    agents = [Echo(c) for c in containers]
    outcomes: list[str] = []

    async def talk(me: int) -> None:
        for i in range(15):
            other = agents[(me + 1 + i % 3) % 4]
            try:
                proxy = await containers[me].connect(other.addr)
                reply = await asyncio.wait_for(proxy.echo([me, i]), 1)
                outcomes.append(f"{me}:{i}={reply}")
            except Exception as exc:
                outcomes.append(f"{me}:{i}!{type(exc).__name__}")
            await asyncio.sleep(0.1)

    await asyncio.gather(*(talk(me) for me in range(4)))
    return outcomes


def run_chatter(seed: int) -> tuple[list[str], list[LogEntry]]:
    logs: list[list[LogEntry]] = []

    async def main(sim: Simulation) -> list[str]:
        logs.append(sim.log)
        return await chatter(sim)

    outcomes = simulation.run(main, seed=seed, plan=FAULTY)
    return outcomes, logs[0]


def test_the_same_seed_gives_the_same_run() -> None:
    outcomes, log = run_chatter(3)
    again_outcomes, again_log = run_chatter(3)
    assert again_log == log
    assert again_outcomes == outcomes
    events = {entry.event for entry in log}
    assert {"send", "deliver", "drop", "duplicate", "reorder"} <= events
    _, other_log = run_chatter(4)
    assert other_log != log


EVERY_FAULT = FaultPlan(
    default=LinkFaults(
        latency=0.01,
        jitter=0.02,
        jitter_shape="exponential",
        drop=0.05,
        duplicate=0.05,
        reorder=0.3,
    ),
    links=((("sim-1", "sim-2"), LinkFaults(jitter=0.03, bandwidth=5000)),),
    partitions=(
        Partition(("sim-0", "sim-1"), ("sim-2", "sim-3"), start=0.3, duration=0.5),
        Partition(("sim-2",), ("sim-0",), start=1.0, duration=0.2, one_way=True),
    ),
    crashes=(Crash("sim-3", at=0.5, restart_after=0.4),),
    dead_peer_timeout=0.2,
)


def test_a_run_is_the_same_on_every_python() -> None:
    """The digest of a run with every kind of fault is pinned: CI runs this
    on each supported Python, so they all replay it message by message (the
    network draws only with version-stable random methods, and nothing
    iterates over a hash-ordered set)."""
    logs: list[simulation.SimulatedNetwork] = []

    async def main(sim: Simulation) -> list[str]:
        logs.append(sim.network)
        return await chatter(sim)

    outcomes = simulation.run(main, seed=2024, plan=EVERY_FAULT)
    events = collections.Counter(entry.event for entry in logs[0].log)
    assert set(events) == {
        "send", "deliver", "drop", "duplicate", "reorder", "cut", "reset",
        "refuse", "crash", "restart",
    }  # fmt: skip
    assert len(outcomes) == 60
    assert logs[0].digest() == (
        "3974974c519a04b9c1eef1d058909105567d0463443fea14bf450062710fb94a"
    )


def test_real_time_does_not_change_a_run() -> None:
    """Nothing in the library sets a timer by the wall clock (e.g. the
    channel's memory trim after a connection ended): a run that takes longer
    in real time is the same run, down to its last timer."""
    plan = FaultPlan(
        crashes=(
            Crash("sim-1", at=1, restart_after=0.25),
            Crash("sim-1", at=1.5, restart_after=0.25),
        )
    )

    def once(pause: float) -> tuple[str, float]:
        networks: list[simulation.SimulatedNetwork] = []
        ended: list[float] = []
        agents: list[Echo] = []

        async def setup(container: aiomas.Container) -> None:
            agents.append(Echo(container))

        async def main(sim: Simulation) -> None:
            networks.append(sim.network)
            loop = asyncio.get_running_loop()
            here, _ = await sim.start(2, setup)
            proxy = await here.connect(agents[1].addr)
            await proxy.echo("before the crashes")
            await asyncio.sleep(1.3 - loop.time())  # restarted at 1.25
            proxy = await here.connect(agents[-1].addr)
            await proxy.echo("between the crashes")
            time.sleep(pause)  # the loop blocks: real time passes
            try:
                await loop.create_future()  # until no timer is left
            finally:
                ended.append(loop.time())

        with pytest.raises(SimulationStuck):
            simulation.run(main, seed=0, plan=plan)
        return networks[0].digest(), ended[0]

    assert once(1.2) == once(0)


# --- Each fault on one link ---------------------------------------------------------


class Link:
    """A channel from queue ``c`` to a server on queue ``s`` in a simulation,
    and the requests the server received (with their virtual times)."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.received: list[tuple[float, Any]] = []
        self.requests: list[channel.Request] = []
        self.server_channels: list[channel.Channel] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def open(self, answer: bool = True) -> channel.Channel:
        server_queue = local_queue.get_queue("s")
        self.sim.network.attach(server_queue)
        loop = asyncio.get_running_loop()

        async def serve(chan: channel.Channel) -> None:
            self.server_channels.append(chan)
            try:
                while True:
                    request = await chan.recv()
                    self.received.append((loop.time(), request.content))
                    self.requests.append(request)
                    if answer:
                        request.reply_nowait(request.content)
            except ConnectionError:
                pass

        def connected(chan: channel.Channel) -> None:
            self.tasks.append(loop.create_task(serve(chan)))

        self.server = await channel.start_server(server_queue, connected)
        return await channel.open_connection(
            server_queue, local_addr=local_queue.get_queue("c")
        )

    async def close(self, client: channel.Channel) -> None:
        await client.close()
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for chan in self.server_channels:
            await chan.close()


def on_link(plan: FaultPlan, program: Any, seed: int = 0) -> Any:
    async def main(sim: Simulation) -> Any:
        link = Link(sim)
        client = await link.open(answer=getattr(program, "answer", True))
        try:
            return await program(link, client)
        finally:
            await link.close(client)

    return simulation.run(main, seed=seed, plan=plan)


def events(link: Link, kind: str) -> list[LogEntry]:
    return [entry for entry in link.sim.log if entry.event == kind]


def test_latency_is_fixed_per_frame() -> None:
    async def program(link: Link, client: channel.Channel) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await client.send("x") == "x"
        assert loop.time() - start == pytest.approx(1.0)  # there and back
        assert link.received == [(pytest.approx(start + 0.5), "x")]

    on_link(FaultPlan(default=LinkFaults(latency=0.5)), program)


def test_jitter_draws_latency_and_keeps_the_order() -> None:
    async def program(link: Link, client: channel.Channel) -> list[float]:
        replies = []
        for i in range(20):
            replies.append(client.send(i))
            await asyncio.sleep(1)
        await asyncio.gather(*replies)
        assert [content for _, content in link.received] == list(range(20))
        sent = {e.payload: e.time for e in events(link, "send") if e.source == "c"}
        return [
            e.time - sent[e.payload] for e in events(link, "deliver") if e.source == "c"
        ]

    delays = on_link(FaultPlan(default=LinkFaults(latency=1, jitter=2)), program)
    assert all(1 <= delay <= 3 for delay in delays)
    assert len(set(delays)) > 10  # drawn, not fixed


def test_exponential_jitter_has_a_long_tail() -> None:
    faults = LinkFaults(latency=0, jitter=1, jitter_shape="exponential")

    async def program(link: Link, client: channel.Channel) -> list[float]:
        for i in range(200):
            client.send(i)
            await asyncio.sleep(10)  # far apart: no frame waits for another
        sent = {e.payload: e.time for e in events(link, "send") if e.source == "c"}
        return [
            e.time - sent[e.payload] for e in events(link, "deliver") if e.source == "c"
        ]

    delays = on_link(FaultPlan(default=faults), program)
    assert len(delays) == 200
    assert 0.7 < sum(delays) / len(delays) < 1.3  # the mean
    assert max(delays) > 3  # beyond any uniform draw from [0, 1]
    with pytest.raises(ValueError, match="jitter_shape"):
        LinkFaults(jitter_shape="normal")  # type: ignore[arg-type]


def test_a_dropped_frame_is_never_seen() -> None:
    plan = FaultPlan(links=((("c", "s"), LinkFaults(drop=1.0)),))

    async def program(link: Link, client: channel.Channel) -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.send("lost"), 10)
        assert link.received == []
        assert [e.payload for e in events(link, "drop")] == [
            e.payload for e in events(link, "send")
        ]
        assert events(link, "deliver") == []

    on_link(plan, program)


def test_a_duplicated_frame_arrives_twice() -> None:
    plan = FaultPlan(links=((("c", "s"), LinkFaults(duplicate=1.0)),))

    async def program(link: Link, client: channel.Channel) -> None:
        reply = client.send("twice")
        await asyncio.sleep(1)
        assert [content for _, content in link.received] == ["twice", "twice"]
        first, second = link.requests
        assert first.message_id == second.message_id
        first.reply_nowait("once")
        assert await reply == "once"

    program.answer = False  # type: ignore[attr-defined]
    on_link(plan, program)


def test_duplicates_reach_handlers_twice_and_callers_once() -> None:
    """At-least-once delivery: a duplicated request runs its handler twice;
    the caller takes the first reply and drops the repeats (duplicated
    replies, and the replies to the duplicated requests)."""
    plan = FaultPlan(default=LinkFaults(duplicate=1.0))

    async def main(sim: Simulation) -> None:
        here, there = await sim.start(2)
        echo = Echo(there)
        proxy = await here.connect(echo.addr)
        replies = [await proxy.echo(i) for i in range(5)]
        assert replies == list(range(5))
        assert echo.calls == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
        await asyncio.sleep(1)  # every repeat has arrived
        assert await proxy.echo("still connected") == "still connected"
        assert not {"reset", "eof"} & {e.event for e in sim.log}
        # Every frame (a request, or one of the two replies to it) came twice.
        kinds = collections.Counter(e.event for e in sim.log)
        assert kinds["deliver"] == 2 * kinds["send"] == 2 * kinds["duplicate"]

    simulation.run(main, seed=0, plan=plan)


def test_reordered_frames_overtake_others_within_the_window() -> None:
    plan = FaultPlan(default=LinkFaults(latency=1, reorder=0.5, reorder_window=2))

    async def program(link: Link, client: channel.Channel) -> list[int]:
        replies = await asyncio.gather(*(client.send(i) for i in range(30)))
        assert replies == list(range(30))  # every call gets its own reply
        assert events(link, "reorder")
        return [content for _, content in link.received]

    order = on_link(plan, program)
    assert sorted(order) == list(range(30))
    assert order != list(range(30))
    for position, content in enumerate(order):
        # A frame overtakes at most 2 frames per reorder, so it never lands
        # far from where it was sent.
        assert abs(position - content) <= 30


def test_bandwidth_queues_frames() -> None:
    plan = FaultPlan(default=LinkFaults(latency=0, bandwidth=1000))

    async def program(link: Link, client: channel.Channel) -> None:
        payload = "x" * 92
        await asyncio.gather(client.send(payload), client.send(payload))
        (first_send, _) = [e for e in events(link, "send") if e.source == "c"]
        size = wire.HEADER_SIZE + len(first_send.payload)
        times = [time for time, _ in link.received]
        assert times == [
            pytest.approx(size / 1000),
            pytest.approx(2 * size / 1000),
        ]

    on_link(plan, program)


def test_a_slow_link_pauses_its_writer() -> None:
    """Frames waiting for the link's bandwidth fill the writer's buffer, as
    a socket's unsent data does: pause_writing() above the high-water mark,
    resume_writing() at the low-water mark."""
    plan = FaultPlan(default=LinkFaults(latency=0, bandwidth=1000))

    async def main(sim: Simulation) -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        queue = local_queue.get_queue("slow")
        sim.network.attach(queue)
        flow: list[tuple[str, float]] = []
        received: list[bytes] = []

        class Writer(asyncio.Protocol):
            def pause_writing(self) -> None:
                flow.append(("pause", loop.time()))

            def resume_writing(self) -> None:
                flow.append(("resume", loop.time()))

        class Sink(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                received.append(data)

        server = await local_queue.create_server(Sink, queue)
        transport, _ = await local_queue.create_connection(Writer, queue)
        transport.set_write_buffer_limits(high=2000, low=1200)
        frame = wire.frame(b"x" * (300 - wire.HEADER_SIZE))
        for _ in range(10):
            transport.write(frame)
        # 3,000 bytes wait; each frame takes 0.3 s to send.
        assert transport.get_write_buffer_size() == 3000
        assert flow == [("pause", 0)]
        await asyncio.sleep(10)
        assert len(received) == 10
        assert transport.get_write_buffer_size() == 0
        transport.close()
        server.close()
        await asyncio.sleep(1)
        return flow

    flow = simulation.run(main, seed=0, plan=plan)
    # Under 1,200 bytes after the sixth frame left.
    assert flow == [("pause", 0), ("resume", pytest.approx(1.8))]


def test_drain_waits_for_a_slow_link() -> None:
    plan = FaultPlan(default=LinkFaults(latency=0.1, bandwidth=100_000))

    async def program(link: Link, client: channel.Channel) -> None:
        loop = asyncio.get_running_loop()
        reply = client.send("big")
        await asyncio.sleep(1)
        (request,) = link.requests
        start = loop.time()
        await request.reply("x" * 100_000)  # above the 64 KiB high-water mark
        # It returns once at most 16 KiB wait (the low-water mark); the
        # link sends a frame in slices of 4 KiB, as a socket sends segments.
        size = wire.HEADER_SIZE + len(b'[1, 0, "' + b"x" * 100_000 + b'"]')
        low, piece = 16 * 1024, 4 * 1024
        elapsed = loop.time() - start
        assert (size - low) / 100_000 <= elapsed <= (size - low + piece) / 100_000
        assert await reply == "x" * 100_000
        assert loop.time() - start == pytest.approx(size / 100_000 + 0.1)

    program.answer = False  # type: ignore[attr-defined]
    on_link(plan, program)


def test_frames_split_across_writes_are_carried_whole() -> None:
    async def main(sim: Simulation) -> list[bytes]:
        received: list[bytes] = []
        queue = local_queue.get_queue("raw")
        sim.network.attach(queue)

        class Sink(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                received.append(data)

        server = await local_queue.create_server(Sink, queue)
        transport, _ = await local_queue.create_connection(asyncio.Protocol, queue)
        frames = wire.frame(b"first") + wire.frame(b"second")
        transport.write(frames[:2])
        transport.write(frames[2:12])
        transport.write(frames[12:])
        await asyncio.sleep(1)
        transport.close()
        server.close()
        await asyncio.sleep(1)
        assert [e.payload for e in sim.log if e.event == "send"] == [
            b"first",
            b"second",
        ]
        return received

    assert simulation.run(main, seed=0) == [wire.frame(b"first"), wire.frame(b"second")]


def test_a_frame_in_several_writes_holds_the_buffer_as_one_write_does() -> None:
    plan = FaultPlan(default=LinkFaults(bandwidth=10_000))

    async def main(sim: Simulation) -> list[int]:
        queue = local_queue.get_queue("slow")
        sim.network.attach(queue)
        server = await local_queue.create_server(asyncio.Protocol, queue)
        transport, _ = await local_queue.create_connection(asyncio.Protocol, queue)
        data = wire.frame(b"x" * 9_996) * 2  # two frames of 10,000 bytes
        sizes = []
        for piece in (data[:5_000], data[5_000:10_000], data[10_000:]):
            transport.write(piece)
            sizes.append(transport.get_write_buffer_size())
        await asyncio.sleep(0.5)  # (half the first frame has left)
        sizes.append(transport.get_write_buffer_size())
        await asyncio.sleep(2)
        sizes.append(transport.get_write_buffer_size())
        transport.close()
        server.close()
        await asyncio.sleep(1)
        return sizes

    # The first half waits for the rest of its frame; then all of it is held.
    sizes = simulation.run(main, seed=0, plan=plan)
    assert sizes[:3] == [0, 10_000, 20_000]
    assert 14_000 <= sizes[3] <= 16_000
    assert sizes[4] == 0


@pytest.mark.parametrize("one_way", [False, True], ids=["two-way", "one-way"])
def test_partitions_cut_links_and_heal(one_way: bool) -> None:
    plan = FaultPlan(
        default=LinkFaults(latency=0.1),
        partitions=(Partition(("c",), ("s",), start=1, duration=2, one_way=one_way),),
    )

    async def program(link: Link, client: channel.Channel) -> None:
        assert await client.send("before") == "before"
        await asyncio.sleep(1.5 - asyncio.get_running_loop().time())
        lost = client.send("during")
        await asyncio.sleep(2)  # healed at 3
        assert not lost.done()
        assert [content for _, content in link.received] == ["before"]
        assert await client.send("after") == "after"
        lost.cancel()
        assert [(e.source, e.target) for e in events(link, "cut")] == [("c", "s")]

    on_link(plan, program)


def test_a_one_way_partition_lets_the_other_direction_through() -> None:
    plan = FaultPlan(
        default=LinkFaults(latency=0.1),
        partitions=(Partition(("s",), ("c",), start=1, duration=2, one_way=True),),
    )

    async def program(link: Link, client: channel.Channel) -> None:
        await asyncio.sleep(1.5)
        reply = client.send("request")
        await asyncio.sleep(1)
        # The request arrived, its reply was cut.
        assert [content for _, content in link.received] == ["request"]
        assert not reply.done()
        assert [(e.source, e.target) for e in events(link, "cut")] == [("s", "c")]
        reply.cancel()

    on_link(plan, program)


def test_no_connection_across_a_partition() -> None:
    plan = FaultPlan(partitions=(Partition(("c",), ("s",), start=0, duration=5),))

    async def main(sim: Simulation) -> None:
        queue = local_queue.get_queue("s")
        sim.network.attach(queue)
        server = await channel.start_server(queue, lambda chan: None)
        try:
            with pytest.raises(TimeoutError, match="partition"):
                await channel.open_connection(
                    queue, local_addr=local_queue.get_queue("c")
                )
            assert [e.event for e in sim.log] == ["refuse"]
        finally:
            server.close()

    simulation.run(main, seed=0, plan=plan)


def test_dead_peer_timeout_resets_connections_across_a_partition() -> None:
    plan = FaultPlan(
        partitions=(Partition(("c",), ("s",), start=1, duration=100),),
        dead_peer_timeout=5,
    )

    async def program(link: Link, client: channel.Channel) -> None:
        await asyncio.sleep(2)
        loop = asyncio.get_running_loop()
        with pytest.raises(ConnectionResetError):
            await client.send("hangs until the reset")
        assert loop.time() == 6
        assert {e.event for e in link.sim.log} >= {"cut", "reset"}

    on_link(plan, program)


def test_a_crashed_container_restarts() -> None:
    plan = FaultPlan(crashes=(Crash("sim-1", at=5, restart_after=5),))

    async def main(sim: Simulation) -> list[str]:
        agents: list[Echo] = []

        async def setup(container: aiomas.Container) -> None:
            agents.append(Echo(container))

        caller, _ = await sim.start(2, setup)
        proxy = await caller.connect(agents[1].addr)
        assert await proxy.echo("up") == "up"
        outcomes = []
        for at in (6, 8, 12):
            await asyncio.sleep(at - asyncio.get_running_loop().time())
            try:
                proxy = await caller.connect(agents[-1].addr)
                outcomes.append(f"{at}: {await proxy.echo(at)}")
            except ConnectionError as exc:
                outcomes.append(f"{at}: {type(exc).__name__}")
        assert [e.event for e in sim.log if e.event in ("crash", "restart")] == [
            "crash",
            "restart",
        ]
        assert len(agents) == 3  # setup ran again after the restart
        return outcomes

    assert simulation.run(main, seed=0, plan=plan) == [
        "6: ConnectionRefusedError",
        "8: ConnectionRefusedError",
        "12: 12",
    ]


class Slow(aiomas.Agent):
    @aiomas.expose
    async def work(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"


CUT_AT_5 = Partition(("sim-0",), ("sim-1",), start=5, duration=20)


def test_a_call_across_a_partition_ends_with_its_deadline() -> None:
    async def main(sim: Simulation) -> list[tuple[float, str]]:
        here, there = await sim.start(2)
        proxy = await here.connect(Echo(there).addr)
        loop = asyncio.get_running_loop()
        outcomes = []
        for at in (6, 30):  # in the partition, after it healed
            await asyncio.sleep(at - loop.time())
            try:
                async with aiomas.deadline(2):
                    reply = await proxy.echo(at)
                outcomes.append((loop.time(), reply))
            except aiomas.DeadlineExceeded:
                outcomes.append((loop.time(), "deadline exceeded"))
        return outcomes

    plan = FaultPlan(partitions=(CUT_AT_5,))
    assert simulation.run(main, seed=0, plan=plan) == [
        (8, "deadline exceeded"),
        (pytest.approx(30.002), 30),  # the same connection: nothing was reset
    ]


def test_dead_peer_detection_fails_calls_across_a_partition() -> None:
    async def main(sim: Simulation) -> list[str]:
        here, there = await sim.start(2)
        addr = Echo(there).addr
        proxy = await here.connect(addr)
        loop = asyncio.get_running_loop()
        await asyncio.sleep(6)
        outcomes = []
        try:
            await proxy.echo("lost")  # no timeout of its own
        except ConnectionError as exc:
            outcomes.append(f"{loop.time():g}: {type(exc).__name__}")
        try:
            await here.connect(addr)
        except TimeoutError as exc:
            outcomes.append(f"{loop.time():g}: {exc}")
        await asyncio.sleep(26 - loop.time())  # healed at 25
        proxy = await here.connect(addr)
        outcomes.append(f"{loop.time():g}: {await proxy.echo('again')}")
        return outcomes

    plan = FaultPlan(partitions=(CUT_AT_5,), dead_peer_timeout=3)
    assert simulation.run(main, seed=0, plan=plan) == [
        "8: ConnectionLostError",  # a ConnectionResetError
        "8: sim-0 cannot reach sim-1 (partition)",
        "26.002: again",
    ]


def test_a_crash_fails_the_calls_in_flight() -> None:
    async def main(sim: Simulation) -> float:
        here, there = await sim.start(2)
        proxy = await here.connect(Slow(there).addr)
        with pytest.raises(ConnectionResetError, match="sim-1"):
            await proxy.work(60)
        return asyncio.get_running_loop().time()

    plan = FaultPlan(crashes=(Crash("sim-1", at=5),))
    assert simulation.run(main, seed=0, plan=plan) == 5


def test_sweep_finds_the_failing_seeds() -> None:
    async def main(sim: Simulation) -> None:
        if sim.network.random.random() < 0.3:
            raise AssertionError("unlucky")

    failures = simulation.sweep(main, range(20))
    assert failures
    assert all(isinstance(exc, AssertionError) for _, exc in failures)
    seeds = [seed for seed, _ in failures]
    # The same seeds fail again, with the same error.
    again = simulation.sweep(main, seeds)
    assert [(seed, str(exc)) for seed, exc in again] == [
        (seed, str(exc)) for seed, exc in failures
    ]


def test_plans_check_their_numbers() -> None:
    with pytest.raises(ValueError, match="probability"):
        LinkFaults(drop=2)
    with pytest.raises(ValueError, match="negative"):
        LinkFaults(latency=-1)
    with pytest.raises(ValueError, match="window"):
        LinkFaults(reorder_window=0)
    with pytest.raises(ValueError, match="bandwidth"):
        LinkFaults(bandwidth=0)
    plan = FaultPlan(links=((("a", "b"), LinkFaults(drop=1)),))
    assert plan.link("a", "b").drop == 1
    assert plan.link("b", "a") == LinkFaults()


def test_a_failing_restart_fails_the_run() -> None:
    plan = FaultPlan(crashes=(Crash("sim-0", at=1, restart_after=1),))
    starts = []

    async def setup(container: aiomas.Container) -> None:
        starts.append(asyncio.get_running_loop().time())
        if len(starts) > 1:
            raise RuntimeError("no disk")

    async def main(sim: Simulation) -> None:
        await sim.start(1, setup)
        await asyncio.sleep(5)

    with pytest.raises(RuntimeError, match="no disk"):
        simulation.run(main, seed=0, plan=plan)
    assert starts == [0, 2]


def test_the_end_of_a_stream_travels_behind_the_data() -> None:
    async def program(link: Link, client: channel.Channel) -> list[LogEntry]:
        client.send("last words").cancel()
        await client.close()
        await asyncio.sleep(5)
        return [e for e in link.sim.log if e.source == "c"]

    log = on_link(FaultPlan(default=LinkFaults(latency=2)), program)
    assert [(e.time, e.event) for e in log] == [
        (0, "send"),
        (2, "deliver"),
        (2, "eof"),
    ]
