"""``python -m aiomas.subproc HOST:PORT``: run a container with a Manager agent.

The first line on stdout is the manager's address (``tcp://HOST:PORT/0``, with
the real port if PORT is 0).  The process ends when the manager's ``stop()`` is
called, or on SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import sys
from collections.abc import Sequence
from typing import Any

import arrow

from aiomas import codecs, util
from aiomas.agent import SSLCerts, split_host_port
from aiomas.clocks import ExternalClock
from aiomas.nats import NatsConfig, is_nats_url
from aiomas.subproc import serve
from aiomas.wire import DEFAULT_MAX_FRAME_SIZE, FrameReader

CODECS: dict[str, type[codecs.Codec]] = {
    "json": codecs.JSON,
    "msgpack": codecs.MsgPack,
    "msgpack-blosc": codecs.MsgPackBlosc,
}

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def host_port(value: str) -> tuple[str, int] | str:
    """Parse ``HOST:PORT`` (``[IPv6]:PORT`` for IPv6 addresses), or check a
    NATS URL (``nats://HOST:PORT/NAME``, see :doc:`/nats`) and return it."""
    if is_nats_url(value):
        return nats_url(value)
    try:
        return split_host_port(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT (e.g. 127.0.0.1:5555 or [::1]:5555), got {value!r}"
        ) from None


def nats_url(value: str) -> str:
    """Check that *value* is a NATS container URL."""
    try:
        NatsConfig.from_url(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def iso_date(value: str) -> str:
    """Check that *value* is a date that arrow can parse."""
    try:
        arrow.get(value)
    except (arrow.parser.ParserError, ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 date (e.g. 2010-03-27T00:00:00+01:00): {value!r} ({exc})"
        ) from None
    return value


def frame_size(value: str) -> int:
    """Parse a frame size limit: an integer from 0 to 2**32 - 1."""
    try:
        size = int(value)
        FrameReader(size)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of bytes from 0 to {2**32 - 1}, got {value!r}"
        ) from None
    return size


def seconds(value: str) -> float:
    """Parse a positive number of seconds."""
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if not (number > 0 and math.isfinite(number)):
        raise argparse.ArgumentTypeError(
            f"expected a positive number of seconds, got {value!r}"
        )
    return number


def make_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """Return the argument parser of the container command line."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Run an aiomas agent container with a Manager agent (id 0) that a "
            "master process uses to spawn agents, set the clock and stop the "
            "container.  Prints the manager's address as the first line."
        ),
    )
    parser.add_argument(
        "addr",
        metavar="HOST:PORT",
        type=host_port,
        help="address to listen on; port 0 picks a free port (or a NATS URL, "
        "nats://SERVER:PORT/NAME, for a container on that NATS system)",
    )
    parser.add_argument(
        "--nats",
        type=nats_url,
        metavar="URL",
        help="serve on this NATS system too (nats://SERVER:PORT/NAME)",
    )
    parser.add_argument(
        "--start-date",
        type=iso_date,
        help=(
            "use an ExternalClock whose date at time 0 is this date (ISO 8601, "
            "e.g. 2010-03-27T00:00:00+01:00); without it, the container runs "
            "in real time"
        ),
    )
    parser.add_argument(
        "--init-time",
        type=float,
        default=-1.0,
        help="initial time of the ExternalClock; the default %(default)s starts "
        "one second before --start-date",
    )
    parser.add_argument(
        "--codec",
        choices=sorted(CODECS),
        default="json",
        help="message codec (default: %(default)s)",
    )
    parser.add_argument(
        "--cafile", help="CA certificate for TLS (with --certfile and --keyfile)"
    )
    parser.add_argument("--certfile", help="this container's TLS certificate")
    parser.add_argument("--keyfile", help="the private key of --certfile")
    parser.add_argument(
        "--max-frame-size",
        type=frame_size,
        default=DEFAULT_MAX_FRAME_SIZE,
        metavar="BYTES",
        help="the largest message accepted from another container "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--dead-peer-timeout",
        type=seconds,
        metavar="SECONDS",
        help="close TCP connections to containers that stop acknowledging data "
        "for this long (default: the operating system's timeouts)",
    )
    parser.add_argument(
        "--loop",
        choices=util.LOOPS,
        default="asyncio",
        help="the event loop to run on (default: %(default)s; uvloop needs "
        "pip install 'aiomas[uvloop]')",
    )
    parser.add_argument(
        "--log-level",
        "-l",
        choices=LOG_LEVELS,
        default="info",
        help="log level (default: %(default)s)",
    )
    return parser


def container_kwargs(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> dict[str, Any]:
    """Turn parsed arguments into keyword arguments for Container.create()."""
    kwargs: dict[str, Any] = {
        "codec": CODECS[args.codec],
        "max_frame_size": args.max_frame_size,
        "dead_peer_timeout": args.dead_peer_timeout,
    }
    if args.nats is not None:
        if isinstance(args.addr, str):
            parser.error("--nats is for a container on TCP: HOST:PORT is a NATS URL")
        kwargs["nats"] = args.nats
    if args.start_date is not None:
        kwargs["clock"] = ExternalClock(args.start_date, init_time=args.init_time)
    tls_files = (args.cafile, args.certfile, args.keyfile)
    if any(tls_files):
        if not all(tls_files):
            parser.error("TLS needs all of --cafile, --certfile and --keyfile")
        kwargs["ssl"] = SSLCerts(*tls_files)
    return kwargs


async def run_container(addr: tuple[str, int] | str, kwargs: dict[str, Any]) -> None:
    """Run the container until its manager is stopped or SIGTERM arrives."""
    serving = asyncio.ensure_future(
        serve(addr, kwargs, lambda manager: print(manager.addr, flush=True))
    )
    if sys.platform != "win32":
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, serving.cancel)
    try:
        await serving
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # SIGINT cancelled us (asyncio.run): it raises KeyboardInterrupt.
        # SIGTERM cancelled only the container, which is shut down now.


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = make_parser(prog)
    args = parser.parse_args(argv)
    kwargs = container_kwargs(args, parser)
    try:
        factory = util.loop_factory(args.loop)
    except ImportError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(run_container(args.addr, kwargs))
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m aiomas.subproc"))
