"""A hypothesis state machine for the request table: whatever the order of
requests, replies, failures, cancellations and a closing connection, every
pending call ends exactly once."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from aiomas.exceptions import ProtocolError
from aiomas.wire import RequestTable


class RequestTableMachine(RuleBasedStateMachine):
    ids = Bundle("ids")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.table = RequestTable()
        self.futures: dict[int, asyncio.Future[Any]] = {}
        self.outcomes: dict[int, str] = {}  # how each call ended
        self.values: dict[int, int] = {}  # the results of calls with a reply
        self.closed = False

    def teardown(self) -> None:
        for future in self.futures.values():
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: no "never retrieved" warnings
        self.loop.close()

    @precondition(lambda self: not self.closed)
    @rule(target=ids)
    def send(self) -> int:
        future = self.loop.create_future()
        msg_id = self.table.add(future)
        assert msg_id not in self.futures  # ids are never reused
        self.futures[msg_id] = future
        return msg_id

    @rule(msg_id=consumes(ids), value=st.integers())
    def reply(self, msg_id: int, value: int) -> None:
        if self.closed:
            with pytest.raises(ProtocolError):
                self.table.pop(msg_id)
            return
        future = self.table.pop(msg_id)
        assert future is self.futures[msg_id]
        if not future.done():
            future.set_result(value)
            self.outcomes[msg_id] = "result"
            self.values[msg_id] = value

    @rule(msg_id=consumes(ids))
    def fail(self, msg_id: int) -> None:
        if self.closed:
            return
        future = self.table.pop(msg_id)
        if not future.done():
            future.set_exception(RuntimeError("remote failure"))
            self.outcomes[msg_id] = "failure"

    @rule(msg_id=ids)
    def cancel(self, msg_id: int) -> None:
        # The caller gives up; the id stays in the table until the reply comes.
        if self.futures[msg_id].cancel():
            self.outcomes[msg_id] = "cancelled"

    @rule(msg_id=st.integers())
    def reply_to_an_unknown_id(self, msg_id: int) -> None:
        if msg_id in self.futures and msg_id in self.table._pending:
            return
        with pytest.raises(ProtocolError):
            self.table.pop(msg_id)

    @precondition(lambda self: not self.closed)
    @rule()
    def connection_lost(self) -> None:
        pending = [f for f in self.table._pending.values() if not f.done()]
        self.table.fail_all(lambda: ConnectionResetError("closed"))
        self.closed = True
        assert len(self.table) == 0
        for msg_id, future in self.futures.items():
            if future in pending:
                assert isinstance(future.exception(), ConnectionResetError)
                self.outcomes[msg_id] = "reset"

    @invariant()
    def every_call_ends_at_most_once_and_matches_its_outcome(self) -> None:
        for msg_id, future in self.futures.items():
            outcome = self.outcomes.get(msg_id)
            if outcome is None:
                assert not future.done()
                assert msg_id in self.table._pending
            elif outcome == "cancelled":
                assert future.cancelled()
            elif outcome == "result":
                assert future.result() == self.values[msg_id]
            else:
                assert future.exception() is not None

    @invariant()
    def after_close_nothing_is_pending(self) -> None:
        if self.closed:
            assert all(future.done() for future in self.futures.values())


RequestTableMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None
)
test_request_table_state_machine = RequestTableMachine.TestCase
