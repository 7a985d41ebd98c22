"""Run the aiomas benchmark suite (the same as ``python -m aiomas bench``).

Usage::

    python benchmarks/run.py [--quick] [--rounds 5] [--seconds 2]
        [--loop asyncio uvloop] [--only TEXT] [--agents 100000]

See :mod:`aiomas.benchmark` for what is measured and how.
"""

import sys

from aiomas.benchmark import main

if __name__ == "__main__":
    sys.exit(main(prog="benchmarks/run.py"))
