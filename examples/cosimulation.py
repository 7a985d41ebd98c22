"""A co-simulation: a simulator drives the clocks of agents in other processes.

This process plays the simulator.  It starts two container processes whose
containers run on an ExternalClock, spawns sensor agents there and a collector
agent in its own container, and then moves the time of every container forward
in 15-minute steps over one simulated day, as fast as the agents keep up.

The sensors only know their container's clock: each one sleeps until its next
sample is due, measures (a made-up temperature or solar power curve of the
simulated time of day) and reports to the collector.  After each step the
simulator waits until every report due by then has arrived, so a run is the
same every time, however fast or slow the machine.

Run it with ``python examples/cosimulation.py``.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from pathlib import Path
from typing import Any

import arrow

import aiomas
from aiomas.subproc import ContainerProcess

START_DATE = "2026-06-21T00:00:00+00:00"
STEP = 15 * 60  # seconds of simulated time per step
DURATION = 24 * 3600  # one simulated day
# The sensors live in this module, which the container processes import from here.
HERE = str(Path(__file__).resolve().parent)
# (container process, sensor name, kind, sample interval in seconds).  All
# intervals divide an hour, so every sensor reports at each full hour.
SENSORS = [
    (0, "temp-A", "temperature", 30 * 60),
    (0, "pv-A", "pv", 15 * 60),
    (1, "temp-B", "temperature", 60 * 60),
    (1, "pv-B", "pv", 15 * 60),
]
FORMATS = {"temperature": "{:4.1f} C", "pv": "{:4.2f} kW"}


def measure(kind: str, name: str, date: arrow.Arrow) -> float:
    """The value a sensor reads at *date*: a smooth daily curve."""
    hour = date.hour + date.minute / 60
    if kind == "temperature":  # coldest at 03:00, warmest at 15:00
        mean, amplitude = (15, 6) if name.endswith("A") else (12, 4)
        return round(mean + amplitude * math.sin(2 * math.pi * (hour - 9) / 24), 1)
    peak = 5.0 if name.endswith("A") else 3.0  # kW, from 06:00 to 18:00
    return round(max(0.0, peak * math.sin(math.pi * (hour - 6) / 12)), 2)


class Sensor(aiomas.Agent):
    """Samples every *interval* seconds of its clock and reports to a collector.

    It runs in a container process (spawned by the simulator through the
    container's Manager) and stops after *duration* seconds.
    """

    def __init__(
        self,
        container: aiomas.Container,
        name: str,
        kind: str,
        interval: float,
        duration: float,
        collector_addr: str,
    ) -> None:
        super().__init__(container)
        self.name = name
        self.kind = kind
        self.samples = 0
        # The schedule starts now, when the simulator spawns us: the simulator
        # advances the clock only after spawn() has returned.
        start = container.clock.time()
        self.task = aiomas.create_task(
            self.run(start, interval, duration, collector_addr)
        )

    async def run(
        self, start: float, interval: float, duration: float, collector_addr: str
    ) -> None:
        clock = self.container.clock
        collector = None
        for k in range(1, int(duration // interval) + 1):
            # Sleep until a time of the schedule rather than for "interval"
            # from now, so that the samples never drift.
            await clock.sleep_until(start + k * interval)
            if collector is None:
                collector = await self.container.connect(collector_addr)
            now = clock.utcnow()
            await collector.report(self.name, now, measure(self.kind, self.name, now))
            self.samples += 1

    @aiomas.expose
    async def finished(self) -> int:
        """Wait until the sensor has taken all its samples; return their number."""
        await self.task
        return self.samples


class Collector(aiomas.Agent):
    """Receives the sensors' reports and lets the simulator wait for them."""

    def __init__(self, container: aiomas.Container) -> None:
        super().__init__(container)
        self.readings: dict[str, list[tuple[arrow.Arrow, float]]] = {}
        self.count = 0
        self._new_report = asyncio.Event()

    @aiomas.expose
    def report(self, sensor: str, date: arrow.Arrow, value: float) -> None:
        # Dates travel between containers as Arrow objects (see docs/agents.rst).
        self.readings.setdefault(sensor, []).append((date, value))
        self.count += 1
        self._new_report.set()

    async def wait_for(self, count: int) -> None:
        """Wait until *count* reports have arrived in total."""
        while self.count < count:
            self._new_report.clear()
            await self._new_report.wait()

    def latest(self) -> str:
        """The latest reading of each sensor, in one line."""
        return " | ".join(
            f"{name} {FORMATS[kind].format(self.readings[name][-1][1])}"
            for _, name, kind, _ in SENSORS
        )


def reports_due(t: float) -> int:
    """How many reports all sensors together send up to time *t*."""
    return sum(int(t // interval) for *_, interval in SENSORS)


async def simulate(
    clock: aiomas.ExternalClock, managers: list[Any], collector: Collector
) -> None:
    """Advance all clocks step by step; print the readings every full hour."""
    for t in range(STEP, DURATION + 1, STEP):
        # Our own clock first: no report can then arrive from our future.
        clock.set_time(t)
        await asyncio.gather(*(manager.set_time(t) for manager in managers))
        # Lock step: the next step only starts when the agents are done with
        # this one.  (The timeout turns a lost report into an error, not a hang.)
        await asyncio.wait_for(collector.wait_for(reports_due(t)), 10)
        if t % 3600 == 0:
            print(f"[{clock.utcnow().format('YYYY-MM-DD HH:mm')}] {collector.latest()}")


async def main() -> None:
    clock = aiomas.ExternalClock(START_DATE)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [HERE, os.environ.get("PYTHONPATH")])
        ),
    }
    # Every container process gets an ExternalClock at the same date and time.
    args = ["127.0.0.1:0", "--start-date", START_DATE, "--init-time", "0"]
    processes: list[ContainerProcess] = []
    container = await aiomas.Container.create(
        ("127.0.0.1", 0), clock=clock, as_coro=True
    )
    try:
        for _ in range(2):
            processes.append(
                await ContainerProcess.start(*args, "--log-level", "warning", env=env)
            )
        collector = Collector(container)
        managers = [await container.connect(p.manager_addr) for p in processes]
        sensors = []
        for c, name, kind, interval in SENSORS:
            sensor, addr = await managers[c].spawn(
                "cosimulation:Sensor", name, kind, interval, DURATION, collector.addr
            )
            sensors.append(sensor)
            print(f"simulator: {name} ({kind}, every {interval // 60} min) at {addr}")
        print(
            f"simulator: one day from {clock.utcnow().format('YYYY-MM-DD HH:mm')} "
            f"in {STEP // 60}-minute steps"
        )
        started = time.perf_counter()
        await simulate(clock, managers, collector)
        elapsed = time.perf_counter() - started
        samples = await asyncio.gather(*(sensor.finished() for sensor in sensors))
        print(
            f"simulator: {DURATION // STEP} steps, {collector.count} reports, "
            f"{elapsed:.2f} s real time ({DURATION / elapsed:,.0f}x real time)"
        )
        for (_, name, _, _), n in zip(SENSORS, samples, strict=True):
            values = [value for _, value in collector.readings[name]]
            print(f"    {name}: {n} samples, min {min(values)}, max {max(values)}")
        await asyncio.gather(*(manager.stop() for manager in managers))
    finally:
        await container.shutdown(as_coro=True)
        for process in processes:
            await process.wait_or_kill()


if __name__ == "__main__":
    asyncio.run(main())
