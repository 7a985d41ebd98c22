"""Agents for the container processes started in the agent and clock guides.

A container process creates agents from a ``'module:Class'`` name, so their
class must live in a module that the process can import.
"""

from __future__ import annotations

import arrow

import aiomas


class Worker(aiomas.Agent):
    """Multiplies numbers by a factor and waits for dates of its clock."""

    def __init__(self, container: aiomas.Container, factor: int) -> None:
        super().__init__(container)
        self.factor = factor

    @aiomas.expose
    def work(self, value: int) -> int:
        return value * self.factor

    @aiomas.expose
    async def wait_until(self, date: arrow.Arrow) -> arrow.Arrow:
        """Wait until *date* on the container's clock; return the clock's date."""
        clock = self.container.clock
        await clock.sleep_until(date)
        return clock.utcnow()
