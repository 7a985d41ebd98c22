"""The transport conformance suite runs on every event loop we support."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Run every test of this directory on the default loop and on uvloop,
    if it can be imported (not on Windows)."""
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return factories
    factories["uvloop"] = uvloop.new_event_loop
    return factories
