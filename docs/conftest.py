"""Doctest setup for the guides in docs/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from _pytest.doctest import DoctestItem


@pytest.fixture(autouse=True)
def _tls_files_for_tls_guide(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """The TLS guide reads ca.pem, device.pem and device.key from the current
    directory, as a deployment would; make them with a throw-away CA."""
    node = request.node
    if not (isinstance(node, DoctestItem) and node.name.endswith("tls.rst")):
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
