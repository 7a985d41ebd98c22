"""Runs the atheris fuzz target (fuzz/fuzz_wire.py) for a bounded number of
inputs: the frame decoder and the RPC dispatcher must survive any byte stream.

Run it longer by hand: ``python fuzz/fuzz_wire.py -max_total_time=3600``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).parent.parent / "fuzz"
RUNS = 20_000  # about 10 s on a 2-core machine


def test_fuzz_the_frame_decoder_and_the_rpc_dispatcher(tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris is not installed (Linux only)")
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / "corpus", corpus)  # the fuzzer adds what it finds
    result = subprocess.run(
        [
            sys.executable,
            str(FUZZ / "fuzz_wire.py"),
            f"-atheris_runs={RUNS}",
            "-max_len=2048",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    done = re.search(r"Done (\d+) in", output)
    assert done is not None, output[-3000:]
    assert int(done.group(1)) >= RUNS
