"""What the modules of the compiled build need from mypyc.

The compiled build (docs/performance.rst, "The compiled build") compiles
:mod:`aiomas.wire`, :mod:`aiomas.protocol` and :mod:`aiomas._routing` with
mypyc; the same source runs as plain Python everywhere else.  This module gives
both what they need, without making ``mypy_extensions`` a dependency.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

__all__ = ["is_compiled", "mypyc_attr"]

_T = TypeVar("_T")

if TYPE_CHECKING:
    # mypyc knows the decorator by this name (classes that Python code may
    # subclass say so with allow_interpreted_subclasses=True).
    from mypy_extensions import mypyc_attr as mypyc_attr
else:

    def mypyc_attr(*attrs: str, **kwattrs: object) -> Callable[[_T], _T]:
        """Without mypyc: a decorator that leaves the class as it is."""

        def unchanged(cls: _T) -> _T:
            return cls

        return unchanged


def is_compiled(module_file: str | None) -> bool:
    """Whether the module with this ``__file__`` is an extension module."""
    return module_file is not None and not module_file.endswith((".py", ".pyc"))
