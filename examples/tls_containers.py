"""Two agent containers that talk over TLS, and an intruder that cannot join.

At start the example makes a throw-away certificate authority (CA) and gives
each container a certificate for 127.0.0.1 signed by it; the files go to a
temporary directory that is removed at the end.  With ``ssl=SSLCerts(...)`` a
container uses TLS for its server and for every connection it opens, trusts
only that CA and requires a certificate from its peers, too (mutual
authentication).  The agents themselves do not notice TLS at all.  Finally a
container with a certificate from another CA, and one without TLS, try to call
an agent and are turned away during the handshake.

The certificates are made with trustme, a test dependency of aiomas (it is in
the ``dev`` extra): ``pip install trustme``.  For real deployments, see
docs/tls.rst for how to run a private CA.

Run it with ``python examples/tls_containers.py``.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import tempfile
from pathlib import Path

import aiomas

try:
    import trustme
except ImportError:
    sys.exit("This example needs trustme: pip install trustme")

HOST = "127.0.0.1"


def write_ca(ca: trustme.CA, path: Path) -> str:
    """Write *ca*'s certificate (no key: it stays in memory) to *path*."""
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def issue_cert(ca: trustme.CA, directory: Path, name: str) -> tuple[str, str]:
    """Write a new certificate for HOST, issued by *ca*, and its private key to
    *directory*; return their file names."""
    cert = ca.issue_cert(HOST, common_name=name)
    certfile, keyfile = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    # The certificate file holds the whole chain, leaf first.
    certfile.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(keyfile))
    return str(certfile), str(keyfile)


class Greeter(aiomas.Agent):
    def __init__(self, container: aiomas.Container, name: str) -> None:
        super().__init__(container)
        self.name = name

    async def greet(self, addr: str) -> None:
        other = await self.container.connect(addr)
        print(f"{self.name} hears: {await other.hello(self.name)}")

    @aiomas.expose
    def hello(self, name: str) -> str:
        return f"Hello {name}, I am {self.name}"


async def intrude(container: aiomas.Container, name: str, addr: str) -> None:
    """Let an agent of *container* try to greet the agent at *addr*."""
    try:
        await Greeter(container, name).greet(addr)
    except (ssl.SSLError, ConnectionError) as exc:
        print(f"{name} cannot connect: {type(exc).__name__}")


def make_pki(directory: Path) -> list[aiomas.SSLCerts]:
    """Make a CA and certificates for Alice, Bob and Mallory in *directory*."""
    ca = trustme.CA()
    cafile = write_ca(ca, directory / "ca.pem")
    alice = aiomas.SSLCerts(cafile, *issue_cert(ca, directory, "alice"))
    bob = aiomas.SSLCerts(cafile, *issue_cert(ca, directory, "bob"))
    # Mallory trusts our CA (its certificate is no secret), but her own
    # certificate, though for the right host, is issued by a CA of her own.
    mallory = aiomas.SSLCerts(cafile, *issue_cert(trustme.CA(), directory, "mallory"))
    print(f"certificates in {directory}:")
    for path in sorted(directory.iterdir()):
        print(f"    {path.name}")
    return [alice, bob, mallory]


async def main(certs: list[aiomas.SSLCerts]) -> None:
    containers = [
        await aiomas.Container.create((HOST, 0), ssl=ssl_certs, as_coro=True)
        for ssl_certs in (*certs, None)
    ]
    a, b, mallory, plain = containers
    try:
        alice = Greeter(a, "Alice")
        bob = Greeter(b, "Bob")
        print(f"Alice at {alice.addr}, Bob at {bob.addr} (TLS)")
        # Each container is the TLS server of one connection and the TLS
        # client of the other.
        await alice.greet(bob.addr)
        await bob.greet(alice.addr)
        await intrude(mallory, "Mallory (certificate from another CA)", bob.addr)
        await intrude(plain, "Eve (no TLS)", bob.addr)
        # Bob's container still serves its friends.
        await alice.greet(bob.addr)
    finally:
        for container in containers:
            await container.shutdown(as_coro=True)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="aiomas-tls-") as name:
        asyncio.run(main(make_pki(Path(name))))
    print(f"removed {name}: {not Path(name).exists()}")
