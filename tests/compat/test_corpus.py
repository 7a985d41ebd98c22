"""Runs the programs of tests/compat/programs (written the way code for aiomas
1.0.3 and 2.0.1 is written), each in a fresh interpreter, and checks what they
print."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import ipv6_available

PROGRAMS = Path(__file__).parent / "programs"

EXPECTED = {
    "subclass_1_0_3.py": ["True", "True", "['0'] my server my clock", "True"],
    "subclass_2_0_1.py": [
        "True",
        "[True, True, True]",
        "['0', '1', '2']",
        "['Worker', 'Worker', 'Worker']",
        "['0', '1', '2', '3'] True",
        "w1",
    ],
    "private_names_2_0_1.py": [
        "tcp://localhost:5555/",
        "tcp://localhost:5555/",
        "ipc://[/tmp/s]/",
        "ipc://[/tmp/s]/",
        "local://q/",
        "tcp://[::1]:5555/",
        "True",
        "True",
        "None",
        "True",
        "True",
        "True",
    ],
    "function_serializer_key.py": [
        'b\'{"__type__": [3, {"x": 1, "y": 2}]}\'',
        "('ndarray', [0, 1, 2], 5, 6)",
    ],
    "external_clock_start.py": [
        "-1 2013-12-31T23:59:59+00:00",
        "before set_time(0): []",
        "(0, '2014-01-01T00:00:00+00:00')",
        "(60, '2014-01-01T00:01:00+00:00')",
        "(120, '2014-01-01T00:02:00+00:00')",
    ],
    "address_spellings.py": ["True", "True True", "True"],
}


def run_program(name: str, *args: str) -> list[str]:
    process = subprocess.run(
        [sys.executable, "-W", "error", str(PROGRAMS / name), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert process.returncode == 0, process.stderr
    assert process.stderr == ""
    lines = process.stdout.splitlines()
    assert lines[-1] == "done", process.stdout
    return lines[:-1]


def test_every_program_is_checked() -> None:
    assert sorted(EXPECTED) == sorted(p.name for p in PROGRAMS.glob("*.py"))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_program(name: str) -> None:
    assert run_program(name) == EXPECTED[name]


def test_ipv6_addresses_in_both_spellings() -> None:
    if not ipv6_available():
        pytest.skip("IPv6 loopback (::1) is not available on this machine")
    lines = run_program("address_spellings.py", "--ipv6")
    assert lines == [*EXPECTED["address_spellings.py"], "True", "True True", "True"]
