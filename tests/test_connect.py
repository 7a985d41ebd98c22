"""Tests for aiomas._connect: the retry policy and connection attempts, on
driven time (no test here waits in real time)."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import pytest

import aiomas
from aiomas._connect import (
    RETRY_DELAY_MAX,
    RETRY_DELAY_MIN,
    attempt_bound,
    connect_with_retries,
    opener,
    retry_delay,
    should_retry,
    tcp_address,
)


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (ConnectionRefusedError(), True),
        (FileNotFoundError(), True),
        (TimeoutError(), True),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), True),
        (OSError(errno.EHOSTUNREACH, "No route to host"), True),
        (OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"), False),
        (PermissionError(), False),
    ],
)
def test_which_connect_errors_are_retried(error: OSError, retried: bool) -> None:
    """Within open_connection(timeout=...): nobody listening yet, and networks
    or hosts that are not reachable yet (hosts start in any order)."""
    assert should_retry(error) is retried


def test_the_pause_between_attempts_doubles_up_to_a_limit() -> None:
    delays = [retry_delay(n) for n in range(1, 10)]
    assert delays[0] == RETRY_DELAY_MIN
    assert delays[:5] == [0.005, 0.01, 0.02, 0.04, 0.08]
    assert delays[-3:] == [RETRY_DELAY_MAX] * 3


@pytest.mark.parametrize(
    ("left", "timeout", "dead_peer_timeout", "bound"),
    [
        (None, None, None, None),  # no deadline, no bound
        (None, 0, None, None),  # one attempt, bounded by the OS
        (5.0, 0, None, None),
        (None, None, 2.0, 2.0),  # dead peer detection bounds each attempt
        (5.0, 10, None, 5.0),  # what is left of the timeout
        (5.0, 10, 2.0, 2.0),
        (1.0, 10, 2.0, 1.0),
        (-1.0, 10, None, RETRY_DELAY_MIN),  # never a bound of 0 or less
    ],
)
def test_the_bound_of_one_attempt(
    left: float | None,
    timeout: float | None,
    dead_peer_timeout: float | None,
    bound: float | None,
) -> None:
    assert attempt_bound(left, timeout, dead_peer_timeout) == bound


class DrivenTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.now += delay


def failing(*errors: OSError) -> Any:
    """An attempt that fails with *errors* in turn, then succeeds."""
    queue = list(errors)

    async def connect() -> tuple[Any, Any]:
        if queue:
            raise queue.pop(0)
        return "transport", "protocol"

    return connect


async def test_attempts_go_on_until_one_succeeds() -> None:
    time = DrivenTime()
    connect = failing(*(ConnectionRefusedError() for _ in range(8)))
    result = await connect_with_retries(
        connect,
        "addr",
        retry_for=None,
        dead_peer_timeout=None,
        clock=time.clock,
        sleep=time.sleep,
    )
    assert result == ("transport", "protocol")
    assert time.sleeps == [retry_delay(n) for n in range(1, 9)]


async def test_the_deadline_ends_the_attempts_with_the_last_error() -> None:
    time = DrivenTime()
    connect = failing(*(FileNotFoundError("no socket") for _ in range(100)))
    with pytest.raises(FileNotFoundError, match="no socket"):
        await connect_with_retries(
            connect,
            "addr",
            retry_for=0.1,
            dead_peer_timeout=None,
            clock=time.clock,
            sleep=time.sleep,
        )
    assert sum(time.sleeps) == pytest.approx(0.1)
    assert max(time.sleeps) <= RETRY_DELAY_MAX


async def test_a_timeout_at_the_deadline_reports_what_came_before() -> None:
    time = DrivenTime()
    connect = failing(ConnectionRefusedError("nobody"), TimeoutError())
    with pytest.raises(ConnectionRefusedError, match="nobody"):
        await connect_with_retries(
            connect,
            "addr",
            retry_for=RETRY_DELAY_MIN,
            dead_peer_timeout=None,
            clock=time.clock,
            sleep=time.sleep,
        )


async def test_one_attempt_and_errors_not_worth_another() -> None:
    time = DrivenTime()
    with pytest.raises(ConnectionRefusedError):
        await connect_with_retries(
            failing(ConnectionRefusedError()),
            "addr",
            retry_for=0,
            dead_peer_timeout=None,
            clock=time.clock,
            sleep=time.sleep,
        )
    with pytest.raises(PermissionError):
        await connect_with_retries(
            failing(PermissionError()),
            "addr",
            retry_for=None,
            dead_peer_timeout=None,
            clock=time.clock,
            sleep=time.sleep,
        )
    assert time.sleeps == []


async def test_a_bounded_attempt_that_hangs_is_a_timeout() -> None:
    hang = asyncio.Event()

    async def connect() -> tuple[Any, Any]:
        await hang.wait()
        raise AssertionError("not reached")

    time = DrivenTime()
    with pytest.raises(TimeoutError, match=r"did not finish within 0\.01 s"):
        await connect_with_retries(
            connect,
            "addr",
            retry_for=0,
            dead_peer_timeout=0.01,
            clock=time.clock,
            sleep=time.sleep,
        )


async def test_where_an_address_leads(tmp_path: Any) -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(ValueError, match="needs a host"):
        opener((None, 5555), asyncio.Protocol, loop, {})
    with pytest.raises(ValueError, match="must be a"):
        tcp_address(("127.0.0.1",))
    with pytest.raises(ConnectionRefusedError):
        await opener(aiomas.get_queue("nobody-here"), asyncio.Protocol, loop, {})()
    with pytest.raises(FileNotFoundError):
        await opener(str(tmp_path / "nothing"), asyncio.Protocol, loop, {})()
