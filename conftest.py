"""Fixtures shared by the test suite and the doctests in docs/ and README.md."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from _pytest.doctest import DoctestItem
from tests.helpers import close_loop


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--aiomas-long",
        action="store_true",
        default=False,
        help="run the load, fuzz and multi-host tests at full size (minutes)",
    )


def _close_thread_loop() -> None:
    """Close the loop that aiomas.run() set for this thread, cleanly."""
    policy = asyncio.get_event_loop_policy()
    try:
        loop = policy.get_event_loop()
    except RuntimeError:
        return
    close_loop(loop)
    policy.set_event_loop(None)


@pytest.fixture(autouse=True)
def _fresh_loop_for_doctests(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each doctest file runs on a new event loop that is closed afterwards."""
    if not isinstance(request.node, DoctestItem):
        yield
        return
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        yield
    finally:
        _close_thread_loop()
        if not loop.is_closed():  # The doctest set a loop of its own.
            close_loop(loop)
