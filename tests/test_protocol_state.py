"""A hypothesis state machine for the core's message ids: whatever the order of
requests, replies, failures, replies for ids never sent and a closing
connection, every request ends exactly once (with its reply, or in the list
that ``connection_lost()`` returns), and ids are never reused."""

from __future__ import annotations

import json
import struct
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from aiomas.codecs import JSON
from aiomas.protocol import (
    Connection,
    FailureReceived,
    ProtocolViolation,
    ResultReceived,
)


def jframe(message: Any) -> bytes:
    payload = json.dumps(message).encode()
    return struct.pack(">L", len(payload)) + payload


class MessageIds(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.conn = Connection(JSON())
        self.sent: list[int] = []
        self.ended: dict[int, str] = {}  # how each request ended
        self.closed = False

    def pending(self) -> list[int]:
        return [i for i in self.sent if i not in self.ended]

    @precondition(lambda self: not self.closed)
    @rule()
    def send(self) -> None:
        msg_id = self.conn.send_request(None)
        assert msg_id not in self.sent  # ids are never reused
        self.sent.append(msg_id)
        self.conn.data_to_send()

    @precondition(lambda self: not self.closed)
    @rule(pick=st.integers(0, 50), kind=st.sampled_from([1, 2]), value=st.integers())
    def answer(self, pick: int, kind: int, value: int) -> None:
        msg_id = pick if pick >= len(self.sent) else self.sent[pick]
        events = list(self.conn.receive_data(jframe([kind, msg_id, value])))
        if msg_id in self.sent and msg_id not in self.pending():
            # Answered already: a repeat (a message delivered twice) is dropped.
            assert events == []
            assert not self.conn.closed
            return
        (event,) = events
        if msg_id in self.pending():
            expected = ResultReceived if kind == 1 else FailureReceived
            assert isinstance(event, expected)
            assert event.message_id == msg_id
            self.ended[msg_id] = "reply"
        else:  # never sent
            assert isinstance(event, ProtocolViolation)
            self.close()

    @precondition(lambda self: not self.closed)
    @rule()
    def close(self) -> None:
        waiting = self.conn.connection_lost()
        assert list(waiting) == self.pending()
        for msg_id in waiting:
            self.ended[msg_id] = "lost"
        self.closed = True

    @precondition(lambda self: self.closed)
    @rule()
    def reconnect(self) -> None:
        """A closed core answers nothing more; start over with a new one."""
        assert list(self.conn.receive_data(jframe([1, 0, None]))) == []
        self.__init__()  # type: ignore[misc]

    @invariant()
    def every_request_ends_once(self) -> None:
        assert set(self.ended) <= set(self.sent)
        if self.closed:
            assert self.pending() == []
            assert self.conn.waiting_for_replies == 0
        else:
            assert self.conn.waiting_for_replies == len(self.pending())


MessageIds.TestCase.settings = settings(max_examples=200, stateful_step_count=40)
test_message_ids_state_machine = MessageIds.TestCase
