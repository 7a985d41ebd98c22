"""Fixtures shared by the test suite and the doctests in docs/ and README.md."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import pytest
from _pytest.doctest import DoctestItem
from hypothesis import settings
from tests.helpers import close_loop, free_port

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


# The ports that the docs examples show, as the original docs do.
_EXAMPLE_PORTS = (5555, 5556)


@pytest.fixture(autouse=True)
def _docs_examples_on_free_ports(request: pytest.FixtureRequest) -> None:
    """The docs examples show fixed ports (5555 and 5556); they run on free
    ones, so that a port that someone else holds, or another test run that
    runs them at the same time, does not make them fail.  The ports are
    replaced in the code and in the expected output of each example alike."""
    node = request.node
    if not isinstance(node, DoctestItem) or node.dtest is None:
        return
    taken: set[int] = set()
    replacements: dict[str, str] = {}
    for shown in _EXAMPLE_PORTS:
        port = free_port(taken, ipv6=True)  # (examples bind ``localhost``)
        taken.add(port)
        replacements[str(shown)] = str(port)
    shown_ports = "|".join(replacements)
    pattern = re.compile(rf"(?<!\d)(?:{shown_ports})(?!\d)")

    def replace(text: str) -> str:
        return pattern.sub(lambda match: replacements[match[0]], text)

    for example in node.dtest.examples:
        example.source = replace(example.source)
        example.want = replace(example.want)
        if example.exc_msg is not None:
            example.exc_msg = replace(example.exc_msg)


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
