"""Doctest setup for the guides in docs/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from _pytest.doctest import DoctestItem

DOCS = Path(__file__).parent

# Guides whose doctests start ``python -m aiomas.subproc`` containers that spawn
# agents from docs/workers.py.  A ``python -m`` child has its working directory
# on sys.path, so these guides run in docs/.
_GUIDES_WITH_SUBPROCESSES = ("agents.rst", "clocks.rst", "tutorial.rst")


def _doctest_file(request: pytest.FixtureRequest) -> str | None:
    node = request.node
    return node.name if isinstance(node, DoctestItem) else None


@pytest.fixture(autouse=True)
def _tls_files_for_tls_guide(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """The TLS guide reads ca.pem, device.pem and device.key from the current
    directory, as a deployment would; make them with a throw-away CA."""
    name = _doctest_file(request)
    if name is None or not name.endswith("tls.rst"):
        yield
        return
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "device.key"))
    (tmp_path / "device.pem").write_bytes(
        b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    )
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture(autouse=True)
def _run_subprocess_guides_in_docs(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Let the container processes of the agent and clock guides import
    docs/workers.py."""
    name = _doctest_file(request)
    if name is not None and name.endswith(_GUIDES_WITH_SUBPROCESSES):
        monkeypatch.chdir(DOCS)


@pytest.fixture(autouse=True)
def _nats_server_for_nats_guide(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[None]:
    """The NATS guide talks to a real nats-server: start one on a free
    loopback port and give its URL to the examples as ``NATS``."""
    name = _doctest_file(request)
    if name is None or not name.endswith("nats.rst"):
        yield
        return
    from tests.conftest import nats_missing
    from tests.nats_server import NatsServer, running

    missing = nats_missing()
    if missing:
        pytest.skip(missing)
    namespace = request.getfixturevalue("doctest_namespace")
    with running(NatsServer(tmp_path, "guide")) as (server,):
        namespace["NATS"] = server.url
        yield
