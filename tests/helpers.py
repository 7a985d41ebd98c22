"""Helpers shared by several test modules (and the doctest setup)."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import strategies as st

# Any value that every codec can encode (JSON, MsgPack, MsgPackBlosc).
codec_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=25,
)


def as_lists(value: Any) -> Any:
    """*value* with every tuple turned into a list (MsgPack decodes to tuples)."""
    if isinstance(value, list | tuple):
        return [as_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: as_lists(v) for k, v in value.items()}
    return value


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Close *loop* the way asyncio.run() would: tasks, async generators, executor."""
    if loop.is_closed():
        return
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()
