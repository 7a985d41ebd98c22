"""``python -m aiomas COMMAND``: the aiomas command line.

Commands: ``container`` (a container with a Manager agent, see
:mod:`aiomas.subproc`), ``demo`` (the contract-net demo, :mod:`aiomas.demo`),
``bench`` (the benchmark suite, :mod:`aiomas.benchmark`), ``trace`` (view a
traced run: HTML, Mermaid or stats, :mod:`aiomas.trace_view`) and ``version``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from collections.abc import Callable, Sequence

import aiomas

_PROG = "python -m aiomas"


def _container(argv: Sequence[str], prog: str) -> int:
    from aiomas.subproc.__main__ import main

    return main(argv, prog)


def _demo(argv: Sequence[str], prog: str) -> int:
    from aiomas.demo import main

    return main(argv, prog)


def _bench(argv: Sequence[str], prog: str) -> int:
    from aiomas.benchmark import main

    return main(argv, prog)


def _trace(argv: Sequence[str], prog: str) -> int:
    from aiomas.trace_view import main

    return main(argv, prog)


def _version(argv: Sequence[str], prog: str) -> int:
    argparse.ArgumentParser(
        prog=prog, description="Print the versions of aiomas and its dependencies."
    ).parse_args(argv)
    print(f"aiomas {aiomas.__version__}")
    print(f"Python {sys.version.split()[0]} ({sys.implementation.name})")
    for name in ("arrow", "msgpack", "blosc", "uvloop"):
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{name} {version}")
    return 0


COMMANDS: dict[str, tuple[str, Callable[[Sequence[str], str], int]]] = {
    "container": ("run an agent container with a Manager agent", _container),
    "demo": ("run the contract-net demo (agents in three processes)", _demo),
    "bench": ("run the benchmark suite and print a table", _bench),
    "trace": ("view a traced run: HTML sequence diagram, Mermaid, stats", _trace),
    "version": ("print the versions of aiomas and its dependencies", _version),
}


def make_parser() -> argparse.ArgumentParser:
    """Return the top-level parser (it lists the commands in ``--help``)."""
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description=(
            "aiomas: request-reply channels, RPC and multi-agent systems on "
            "asyncio.  Run 'python -m aiomas COMMAND --help' for a command's "
            "options."
        ),
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, _) in COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        # A bare "required: COMMAND" would not say which commands there are.
        make_parser().print_help(sys.stderr)
        return 2
    if args[0] not in COMMANDS:
        make_parser().parse_args(args)  # Prints the help or the error; exits.
        return 2
    name, rest = args[0], args[1:]
    return COMMANDS[name][1](rest, f"{_PROG} {name}")


if __name__ == "__main__":
    sys.exit(main())
