"""The README demo: a contract-net auction between agents in three processes.

The code lives in the package, :mod:`aiomas.demo` (``src/aiomas/demo.py``), so
that ``python -m aiomas demo`` runs it after a plain ``pip install aiomas`` and
its subprocess containers can import the bidder agents.  This script runs the
same command line::

    python examples/contract_net.py [--external-clock] [--speed 20]
        [--containers 2] [--bidders 3]
"""

import sys

from aiomas.demo import main

if __name__ == "__main__":
    sys.exit(main(prog="examples/contract_net.py"))
