"""Deadlines together with the other features merged beside them: traced
connections, plain handlers, tasks started under a deadline, quorum calls,
forwarded calls (each test failed before its fix)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

import aiomas
from aiomas import rpc
from aiomas.exceptions import DeadlineExceeded
from aiomas.testing import TIME_UNIT, settle

SLOW = 300 * TIME_UNIT  # what "slow" takes
LIMIT = 60 * TIME_UNIT  # a deadline well before it


class Downstream:
    router = rpc.Service()

    def __init__(self) -> None:
        self.log: list[str] = []

    @aiomas.expose
    async def slow(self) -> str:
        try:
            await asyncio.sleep(SLOW)
        except asyncio.CancelledError:
            self.log.append("cancelled")
            raise
        self.log.append("ran to the end")
        return "late"


class Middle:
    router = rpc.Service()

    def __init__(self, other: rpc.RpcClient) -> None:
        self.other = other
        self.kept: asyncio.Future[Any] | None = None

    @aiomas.expose
    async def left(self) -> float | None:
        return aiomas.remaining()

    @aiomas.expose
    def left_sync(self) -> float | None:
        return aiomas.remaining()

    @aiomas.expose
    def fire(self) -> str:
        """A plain function that starts a call and returns before it ends."""
        self.kept = self.other.remote.slow()
        return "ok"

    @aiomas.expose
    def forward(self) -> asyncio.Future[Any]:
        """A plain function that returns the future of a forwarded call."""
        return self.other.remote.slow()


@contextlib.asynccontextmanager
async def chain(
    **middle_options: Any,
) -> AsyncIterator[tuple[rpc.RpcClient, Middle, Downstream]]:
    """client -> Middle -> Downstream, the extension on every connection."""
    downstream = Downstream()
    down_server = await rpc.start_server(("127.0.0.1", 0), downstream, extensions=True)
    other = await rpc.open_connection(
        down_server.sockets[0].getsockname(), extensions=True
    )
    middle = Middle(other)
    server = await rpc.start_server(
        ("127.0.0.1", 0), middle, extensions=True, **middle_options
    )
    client = await rpc.open_connection(server.sockets[0].getsockname(), extensions=True)
    try:
        await other.wait_extensions()
        await client.wait_extensions()
        yield client, middle, downstream
    finally:
        await client.close()
        await other.close()
        for each in (server, down_server):
            each.close()
            await each.wait_closed()


@pytest.mark.parametrize("traced", [False, True])
async def test_a_traced_server_keeps_the_deadline_of_requests(traced: bool) -> None:
    options = {"trace": lambda record: None} if traced else {}
    async with chain(**options) as (client, _, _), aiomas.deadline(5.0):
        for left in (await client.remote.left(), await client.remote.left_sync()):
            assert left is not None
            assert 4.0 < left <= 5.0


async def test_a_call_kept_by_a_plain_function_ends_at_the_deadline() -> None:
    async with chain() as (client, middle, _):
        async with aiomas.deadline(LIMIT):
            assert await client.remote.fire() == "ok"
        assert middle.kept is not None
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(middle.kept, SLOW / 2)


async def test_a_call_made_in_a_callback_after_the_block_ends_at_the_deadline() -> None:
    async with chain() as (_, middle, _):
        loop = asyncio.get_running_loop()
        calls: list[asyncio.Future[Any]] = []
        async with aiomas.deadline(LIMIT):
            # (The callback runs in a copy of this context, after the block.)
            loop.call_soon(lambda: calls.append(middle.other.remote.slow()))
        await asyncio.sleep(0)
        (call,) = calls
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(call, SLOW / 2)


async def test_a_longer_scope_in_a_child_task_keeps_the_outer_deadline() -> None:
    async def child() -> None:
        async with aiomas.deadline(SLOW):
            await asyncio.sleep(2 * SLOW)

    async with aiomas.deadline(LIMIT):
        task = asyncio.create_task(child())
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(task, SLOW)


async def test_a_quorum_within_a_longer_time_keeps_the_outer_deadline() -> None:
    async with chain() as (client, _, _):

        async def ask() -> rpc.Quorum[str]:
            return await rpc.quorum({"a": client.remote.forward}, 1, within=10.0)

        async with aiomas.deadline(LIMIT):
            task = asyncio.create_task(ask())
        outcome = await asyncio.wait_for(task, SLOW / 2)
        assert outcome.results == {}
        assert outcome.cancelled == {"a"}
        await settle()


async def test_a_forwarded_call_is_cancelled_with_the_request() -> None:
    async with chain() as (client, _, downstream):
        call = client.remote.forward()
        call.cancel()  # (before the middle's reply task ran)
        for _ in range(100):
            if downstream.log:
                break
            await asyncio.sleep(TIME_UNIT)
        assert downstream.log == ["cancelled"]
