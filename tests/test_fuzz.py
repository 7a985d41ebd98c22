"""Runs the atheris fuzz targets in fuzz/ for a bounded number of inputs each:

- ``fuzz_wire.py``: the frame decoder and a server-side channel with an RPC
  service must survive any byte stream;
- ``fuzz_codecs.py``: the codecs (with a user class, Arrow dates and RPC
  proxies) decode any bytes or raise SerializationError, and what they decode
  survives a round trip;
- ``fuzz_container.py``: an agent container's RPC service survives any byte
  stream and any RPC request, and runs nothing that is not exposed.

The targets run at the same time, each in a process of its own (the machines
that run the suite have two cores), starting from a copy of its seed corpus
(``fuzz/corpus/<target>/``): together they take about as long as 20,000 inputs
of fuzz_wire.py alone used to (about 10 s).  With ``--aiomas-long``, each one
runs for LONG_SECONDS instead.  The docstrings of the targets say how to run
them longer by hand.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

FUZZ = Path(__file__).parent.parent / "fuzz"
LONG_SECONDS = 30
MAX_LEN = 2048  # bytes per input


@dataclass(frozen=True)
class Target:
    """The fuzz target ``fuzz/fuzz_<name>.py`` and how many inputs it runs."""

    name: str
    runs: int


# The inputs per target are set so that each target takes 4 to 5 s of CPU time
# (their speeds differ by a factor of 10) and the three together about 7 s on
# two cores, start-up included.
TARGETS = (
    Target("wire", 6_000),
    Target("codecs", 20_000),
    Target("container", 2_500),
)


@dataclass
class FuzzRun:
    """A fuzz target running in a subprocess, its output going to *log*."""

    target: Target
    process: subprocess.Popen[bytes]
    log: Path

    def output(self, timeout: float) -> str:
        """Wait for the process to end and return its output (without the
        list of the modules that atheris instruments)."""
        self.process.wait(timeout)
        lines = self.log.read_text(errors="replace").splitlines(keepends=True)
        return "".join(
            line for line in lines if not line.startswith("INFO: Instrumenting")
        )


def start(target: Target, directory: Path, long_run: bool) -> FuzzRun:
    """Start *target* on a copy of its seed corpus in *directory* (the fuzzer
    adds what it finds to the corpus, and crashing inputs go there too)."""
    corpus = directory / "corpus"
    shutil.copytree(FUZZ / "corpus" / target.name, corpus)
    limit = (
        f"-max_total_time={LONG_SECONDS}"
        if long_run
        else f"-atheris_runs={target.runs}"
    )
    log = directory / "output.txt"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                str(FUZZ / f"fuzz_{target.name}.py"),
                limit,
                f"-max_len={MAX_LEN}",
                f"-artifact_prefix={directory}/",
                str(corpus),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    return FuzzRun(target, process, log)


def selected_targets(session: pytest.Session) -> set[str]:
    """The names of the targets whose tests are going to run."""
    return {
        target.name
        for item in session.items
        if (callspec := getattr(item, "callspec", None)) is not None
        and isinstance(target := callspec.params.get("target"), Target)
    }


@pytest.fixture(scope="module")
def fuzz_runs(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    long_run: bool,
) -> Iterator[dict[str, FuzzRun]]:
    """Start all selected targets at once; stop those still running at the end."""
    pytest.importorskip("atheris", reason="atheris is not installed (Linux only)")
    wanted = selected_targets(request.session)
    runs = {
        target.name: start(target, tmp_path_factory.mktemp(target.name), long_run)
        for target in TARGETS
        if target.name in wanted
    }
    yield runs
    for run in runs.values():
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()


@pytest.mark.timeout(LONG_SECONDS + 240)
@pytest.mark.parametrize("target", TARGETS, ids=lambda target: target.name)
def test_fuzz_target(
    target: Target, fuzz_runs: dict[str, FuzzRun], long_run: bool
) -> None:
    run = fuzz_runs[target.name]
    output = run.output(timeout=LONG_SECONDS + 180)
    assert run.process.returncode == 0, output[-3000:]
    done = re.search(r"Done (\d+) (?:runs )?in", output)
    assert done is not None, output[-3000:]
    assert int(done.group(1)) >= (1 if long_run else target.runs)
