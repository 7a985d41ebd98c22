"""A container process of your own, with a Manager agent (see docs/agents.rst).

Usage::

    python examples/container_script.py HOST:PORT START_DATE

It runs a container with an ExternalClock starting at START_DATE (ISO 8601) and
the MsgPackBlosc codec, until a master calls ``stop()`` of its Manager at
``tcp://HOST:PORT/0``.  ``python -m aiomas container`` does the same with more
options; write your own script like this one when you need something else.
"""

import argparse
import asyncio

import aiomas


async def main(host_port, start_date):
    host, port = host_port.rsplit(":", 1)
    clock = aiomas.ExternalClock(start_date, init_time=-1)
    await aiomas.subproc.start(
        (host, int(port)), clock=clock, codec=aiomas.MsgPackBlosc
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="A container with a Manager agent, until a master stops it."
    )
    parser.add_argument("host_port", metavar="HOST:PORT", help="where to listen")
    parser.add_argument(
        "start_date", metavar="START_DATE", help="ISO 8601 start of the clock"
    )
    args = parser.parse_args()
    asyncio.run(main(args.host_port, args.start_date))
