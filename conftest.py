"""Fixtures shared by the test suite and the doctests in docs/ and README.md."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _pytest.doctest import DoctestItem
from hypothesis import settings
from tests.helpers import close_loop
from tests.shared_lock import open_shared_lock

try:
    import fcntl
except ImportError:  # Windows: no xdist port clashes handled there
    fcntl = None  # type: ignore[assignment]


# Hypothesis fails an example that takes longer than 200 ms, which a loaded
# shared machine makes happen now and then; pytest-timeout bounds every test.
settings.register_profile("aiomas", deadline=None)
settings.load_profile("aiomas")


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


# Held while a docs example runs (see _one_docs_example_at_a_time()).  One
# file for the whole machine, as the ports are: /tmp rather than $TMPDIR,
# which may differ between users.
_DOCS_LOCK = Path("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()) / (
    "aiomas-docs-examples.lock"
)


@pytest.fixture(autouse=True)
def _one_docs_example_at_a_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """The docs examples bind fixed ports (5555 and 5556, as in the original
    docs).  With pytest-xdist, they may run in several workers at once (or in
    several test runs on one machine, by several users): a lock file makes
    them take turns."""
    node = request.node
    if fcntl is None or not (
        isinstance(node, DoctestItem) or node.nodeid.startswith("docs/")
    ):
        yield
        return
    fd = open_shared_lock(_DOCS_LOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the file is closed
        yield
    finally:
        os.close(fd)


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
