"""The README demo: a contract-net auction between agents in three processes.

The code lives in the package, :mod:`aiomas.demo` (``src/aiomas/demo.py``), so
that ``python -m aiomas demo`` runs it wherever aiomas is installed and its
subprocess containers can import the bidder agents.  Install aiomas from this
checkout (``pip install .``, see the README): ``pip install aiomas`` would get
the unmaintained 2.0.1 from PyPI, which this version supersedes and which
crashes on Python 3.11.  This script runs the same command line::

    python examples/contract_net.py [--external-clock] [--speed 20]
        [--containers 2] [--bidders 3]
"""

import sys

from aiomas.demo import main

if __name__ == "__main__":
    sys.exit(main(prog="examples/contract_net.py"))
