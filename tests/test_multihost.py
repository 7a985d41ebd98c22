"""Containers on different hosts: agents that call each other over real links.

The module builds a small network out of Linux network namespaces.  Each
namespace is a host with its own interfaces, routes and TCP stack, joined to the
others by veth pairs::

                     test process (root namespace)
          control links: 10.N.N.(4i+1)/30 (root) <-> 10.N.N.(4i+2)/30 (host)
         .------------------------+------------------------.
         |                        |                        |
      host A ----------------- host B ----------------- host C
         172.31.12.1   172.31.12.2   172.31.23.2   172.31.23.3
               (link A-B, /24)             (link B-C, /24)

A and C have no link and no route to each other (B does not forward).  The
control subnet 10.N.N.0/24 is derived from the pid and checked against the
routes of the root namespace, so that concurrent runs do not clash; the link
subnets exist only inside the namespaces.

Each host runs two ``python -m aiomas.subproc 0.0.0.0:0`` containers, one with
plain TCP and one with TLS (certificates from one CA, for each host's
addresses).  B also runs an impostor: a TLS container whose certificate comes
from another CA.  The test process reaches each container's Manager over the
control links and spawns :class:`tests.multihost_agents.Peer` agents, which call
each other over the links A-B and B-C; only the test process' own calls use the
control links.

The namespaces and processes are shared by all tests of the module and removed
at its end, whatever happened.  Without root (CAP_NET_ADMIN) or the ``ip``
command (iproute2), the module is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

import aiomas
from aiomas.agent import split_host_port
from aiomas.testing import TIME_UNIT

from .conftest import TLSFiles, _tls_files
from .multihost_agents import Outcome

ROOT = Path(__file__).resolve().parent.parent
PEER = "tests.multihost_agents:Peer"
HOSTS = ("A", "B", "C")
# Links between hosts: the first three octets of the link's /24 subnet.  On each
# link a host's address ends in its number (A=1, B=2, C=3).
LINKS = {("A", "B"): "172.31.12", ("B", "C"): "172.31.23"}
HOST_NUMBERS = {"A": 1, "B": 2, "C": 3}
# Nothing listens on this port on any host: a connection attempt shows whether
# the host is reachable at all (refused) or not (unreachable) without setting
# up a connection that later calls would reuse.
UNUSED_PORT = 9

# Upper bound for anything that should be prompt; only a broken test waits that
# long.
WAIT = 10.0
# A failure "at once" takes less than this, even on a busy machine (the
# alternatives take seconds to minutes).
PROMPT = 2.0
# How long the callers wait for a call over a dead link before giving up.
STALL_BOUND = 0.5
# Lowered on host B during a cut (from Linux' default of 15, about 15 minutes
# of retransmissions), so that its kernel declares a dead connection dead after
# about 0.6 seconds.
CUT_TCP_RETRIES2 = 1
# The --dead-peer-timeout of the "watched" containers on A and B.
DEAD_PEER_TIMEOUT = 1.0


# --- the network -------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """A network namespace."""

    name: str
    netns: str
    control_address: str
    """The host's end of its control link to the root namespace."""
    link_addresses: dict[str, str] = field(default_factory=dict)
    """The host's address on its link to each neighbour (by the neighbour's name)."""
    link_devices: dict[str, str] = field(default_factory=dict)
    """The host's interface of its link to each neighbour."""


@dataclass(frozen=True)
class HostContainer:
    """A ``python -m aiomas.subproc`` process in a host."""

    host: Host
    port: int
    """The port that the container listens on, on all of the host's addresses."""

    @property
    def manager_url(self) -> str:
        """The manager's address on the control link."""
        return f"tcp://{self.host.control_address}:{self.port}/0"

    def url(self, aid: str, seen_from: str) -> str:
        """The address of agent *aid* on the link to host *seen_from*."""
        return f"tcp://{self.host.link_addresses[seen_from]}:{self.port}/{aid}"


@dataclass(frozen=True)
class Lab:
    """The hosts, their containers (by network kind, ``'tcp'`` or ``'tls'``,
    and host name) and the TLS files of the test process."""

    hosts: dict[str, Host]
    containers: dict[str, dict[str, HostContainer]]
    impostor: HostContainer
    """A TLS container on B whose certificate comes from another CA."""
    master_tls: TLSFiles
    """The test process' certificate (from the hosts' CA)."""
    impostor_cafile: str
    """The CA file that verifies the impostor's certificate."""


def _run(*command: str) -> str:
    """Run *command*; return its output."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return done.stdout


def _ip(arguments: str) -> str:
    """Run ``ip`` with *arguments* (separated by spaces); return its output."""
    return _run("ip", *arguments.split())


def _in_netns(netns: str, *command: str) -> str:
    """Run *command* in the namespace *netns*; return its output."""
    return _run("ip", "netns", "exec", netns, *command)


def _control_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.0.0.0/8, derived from the pid, that no route of the root
    namespace overlaps (another run's control links included)."""
    routes = json.loads(_ip("-j -4 route show table all"))
    taken = [
        ipaddress.ip_network(route["dst"], strict=False)
        for route in routes
        if route["dst"] != "default"
    ]
    for offset in range(256):
        index = (os.getpid() + offset) % 65536
        subnet = ipaddress.IPv4Network(f"10.{index >> 8}.{index & 255}.0/24")
        if not any(subnet.overlaps(route) for route in taken):
            return subnet
    raise RuntimeError("Found no free /24 in 10.0.0.0/8 for the control links")


def _netns_name(host: str) -> str:
    """The name of *host*'s namespace: unique per test run."""
    return f"aiomas-mh-{os.getpid()}-{host.lower()}"


def _add_netns(stack: contextlib.ExitStack, netns: str) -> None:
    """Create *netns* (removed when *stack* closes); skip the module if this
    machine does not let us."""
    done = subprocess.run(
        ["ip", "netns", "add", netns], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(
            "cannot create network namespaces (needs root or CAP_NET_ADMIN): "
            + done.stderr.strip()
        )
    stack.callback(_ip, f"netns del {netns}")
    _ip(f"-n {netns} link set lo up")


def _build_hosts(stack: contextlib.ExitStack) -> dict[str, Host]:
    if not sys.platform.startswith("linux"):
        pytest.skip("network namespaces exist only on Linux")
    if shutil.which("ip") is None:
        pytest.skip("the 'ip' command (iproute2) is not installed")
    pid = os.getpid()
    control = list(_control_subnet().subnets(new_prefix=30))
    hosts: dict[str, Host] = {}
    for number, name in enumerate(HOSTS):
        netns = _netns_name(name)
        _add_netns(stack, netns)
        # The root end's name must be unique in the root namespace (at most 15
        # characters); the host's end is alone in its namespace.
        root_end = f"amh{pid}{name.lower()}"
        _ip(f"link add {root_end} type veth peer name ctl netns {netns}")
        root_address, host_address = control[number].hosts()
        _ip(f"addr add {root_address}/30 dev {root_end}")
        _ip(f"link set {root_end} up")
        _ip(f"-n {netns} addr add {host_address}/30 dev ctl")
        _ip(f"-n {netns} link set ctl up")
        hosts[name] = Host(name, netns, str(host_address))
    for (left, right), subnet in LINKS.items():
        ends = {left: f"to-{right.lower()}", right: f"to-{left.lower()}"}
        _ip(
            f"link add {ends[left]} netns {hosts[left].netns} type veth "
            f"peer name {ends[right]} netns {hosts[right].netns}"
        )
        for this, other in ((left, right), (right, left)):
            address = f"{subnet}.{HOST_NUMBERS[this]}"
            netns = hosts[this].netns
            _ip(f"-n {netns} addr add {address}/24 dev {ends[this]}")
            _ip(f"-n {netns} link set {ends[this]} up")
            hosts[this].link_addresses[other] = address
            hosts[this].link_devices[other] = ends[this]
    return hosts


def _start_container(host: Host, tls_args: list[str]) -> subprocess.Popen[bytes]:
    """Start a container process in *host*."""
    # `ip netns exec` execs the command: the process is the container itself.
    in_host = ["ip", "netns", "exec", host.netns]
    container = [sys.executable, "-m", "aiomas.subproc", "0.0.0.0:0"]
    return subprocess.Popen(
        [*in_host, *container, "--log-level", "warning", *tls_args],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        # Lets the child import tests.multihost_agents.
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _stop_all(processes: list[subprocess.Popen[bytes]], exit_codes: list[int]) -> None:
    """Stop the container processes with SIGTERM (a clean shutdown), all at
    once, or kill them; append their exit codes to *exit_codes*."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + 5
    for process in processes:
        try:
            exit_codes.append(process.wait(max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            process.kill()
            exit_codes.append(process.wait())
        finally:
            assert process.stdout is not None
            process.stdout.close()


def _wait_until_listening(
    host: Host, process: subprocess.Popen[bytes], deadline: float
) -> HostContainer:
    """Read the manager's address that the container process prints."""
    assert process.stdout is not None
    timeout = max(0.0, deadline - time.monotonic())
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline().decode() if ready else ""
    if not line:
        raise RuntimeError(
            f"The container process in {host.netns} did not report its address "
            f"(exit code {process.poll()})"
        )
    # tcp://<the machine's FQDN>:<port>/0: a container on 0.0.0.0 names its
    # agents by the machine's name (see Container.create()), which does not
    # lead other hosts to a given link.  The tests build the agents' addresses
    # on each link themselves.
    location = line.strip().partition("://")[2].rpartition("/")[0]
    _, port = split_host_port(location)
    return HostContainer(host, port)


def _addresses(host: Host) -> list[str]:
    return [host.control_address, *host.link_addresses.values()]


def _tls_args(cafile: str, certfile: str, keyfile: str) -> list[str]:
    """Command line options of a TLS container."""
    return [f"--cafile={cafile}", f"--certfile={certfile}", f"--keyfile={keyfile}"]


@pytest.fixture(scope="module")
def lab(ca: trustme.CA, other_ca: trustme.CA, tls_dir: Path) -> Iterator[Lab]:
    """The hosts and their running containers, shared by all tests."""
    exit_codes: list[int] = []
    with contextlib.ExitStack() as stack:
        hosts = _build_hosts(stack)
        # Certificates for all of a host's addresses: each client checks that
        # the address it connects to is in the server's certificate.
        host_tls = {
            name: _tls_files(ca, tls_dir, f"host-{name}", *_addresses(host))
            for name, host in hosts.items()
        }
        b = hosts["B"]
        impostor_tls = _tls_files(other_ca, tls_dir, "impostor", *_addresses(b))
        processes: list[subprocess.Popen[bytes]] = []
        stack.callback(_stop_all, processes, exit_codes)

        def start(host: Host, tls_args: list[str]) -> subprocess.Popen[bytes]:
            processes.append(_start_container(host, tls_args))
            return processes[-1]

        started: dict[tuple[str, str], subprocess.Popen[bytes]] = {}
        for name, host in hosts.items():
            files = host_tls[name]
            started["tcp", name] = start(host, [])
            started["tls", name] = start(
                host, _tls_args(files.cafile, files.certfile, files.keyfile)
            )
        for name in ("A", "B"):
            started["watched", name] = start(
                hosts[name], ["--dead-peer-timeout", str(DEAD_PEER_TIMEOUT)]
            )
        # The impostor trusts our CA (so it would accept our hosts) but proves
        # its own identity with a certificate that our hosts do not trust.
        impostor_process = start(
            b,
            _tls_args(
                host_tls["B"].cafile, impostor_tls.certfile, impostor_tls.keyfile
            ),
        )
        deadline = time.monotonic() + 30
        containers: dict[str, dict[str, HostContainer]] = {
            "tcp": {},
            "tls": {},
            "watched": {},
        }
        for (kind, name), process in started.items():
            containers[kind][name] = _wait_until_listening(
                hosts[name], process, deadline
            )
        impostor = _wait_until_listening(b, impostor_process, deadline)
        master_tls = _tls_files(ca, tls_dir, "master", "master.example")
        yield Lab(hosts, containers, impostor, master_tls, impostor_tls.cafile)
    prefix = _netns_name("")
    leftovers = [ns for ns in _ip("netns list").splitlines() if ns.startswith(prefix)]
    assert not leftovers, f"Namespaces left behind: {leftovers}"
    assert exit_codes == [0] * len(exit_codes), "A container did not shut down cleanly"


# --- agents on the hosts -----------------------------------------------------------


@dataclass
class Mesh:
    """A :class:`~tests.multihost_agents.Peer` agent on every host of one
    network kind, driven by the test process."""

    containers: dict[str, HostContainer]
    peers: dict[str, Any]
    """Proxies of the agents (over the control links), by host."""
    agent_ids: dict[str, str]

    def url(self, callee: str, seen_from: str) -> str:
        """The address of *callee*'s agent on its link to host *seen_from*."""
        return self.containers[callee].url(self.agent_ids[callee], seen_from)

    def unused_url(self, callee: str, seen_from: str) -> str:
        """An address on *callee*'s link to *seen_from* where nobody listens."""
        address = self.containers[callee].host.link_addresses[seen_from]
        return f"tcp://{address}:{UNUSED_PORT}/0"

    async def ping(self, caller: str, url: str, bound: float | None = None) -> Outcome:
        """Let *caller*'s agent ping the agent at *url*, giving up after
        *bound* seconds (``None``: when the connection fails); return the
        outcome."""
        outcome: Outcome = await asyncio.wait_for(
            self.peers[caller].ping_peer(url, bound), WAIT
        )
        return outcome


async def _spawn_peer(
    master: aiomas.Container, container: HostContainer, host: str
) -> tuple[Any, str]:
    """Spawn a Peer in *container* (via its manager); return a proxy to it
    and its agent id."""
    manager = await master.connect(container.manager_url)
    proxy, addr = await manager.spawn(PEER, host)
    return proxy, addr.rpartition("/")[2]


@contextlib.asynccontextmanager
async def _open_mesh(lab: Lab, kind: str) -> AsyncIterator[Mesh]:
    """Spawn a Peer on every host of network *kind* (``'tcp'`` or ``'tls'``)."""
    ssl = None
    if kind == "tls":
        files = lab.master_tls
        ssl = aiomas.SSLCerts(files.cafile, files.certfile, files.keyfile)
    master = await aiomas.Container.create(("127.0.0.1", 0), ssl=ssl, as_coro=True)
    try:
        containers = lab.containers[kind]
        spawned = await asyncio.gather(
            *(_spawn_peer(master, c, name) for name, c in containers.items())
        )
        peers = dict(zip(containers, (proxy for proxy, _ in spawned), strict=True))
        agent_ids = dict(zip(containers, (aid for _, aid in spawned), strict=True))
        yield Mesh(containers, peers, agent_ids)
    finally:
        await asyncio.wait_for(master.shutdown(as_coro=True), WAIT)


@pytest.fixture(params=["tcp", "tls"])
async def mesh(request: pytest.FixtureRequest, lab: Lab) -> AsyncIterator[Mesh]:
    """A Peer on each host, with plain TCP or with TLS."""
    async with _open_mesh(lab, request.param) as opened:
        yield opened


def assert_answered(outcome: Outcome, host: str) -> None:
    """The call was answered by the agent on *host*."""
    assert outcome["error"] is None, outcome
    assert outcome["result"] == host


def assert_failed(outcome: Outcome, error: str, *, within: float) -> None:
    """The call failed with *error* (a class name) in less than *within* s."""
    assert outcome["error"] == error, outcome
    assert outcome["elapsed"] < within, outcome


# --- calls across hosts ------------------------------------------------------------


async def test_agents_call_each_other_over_every_link(
    mesh: Mesh, long_run: bool
) -> None:
    """Both ends of both links call each other, all at once; B's container is
    reached on both of its link addresses at the same port."""
    pairs = [("A", "B"), ("B", "A"), ("B", "C"), ("C", "B")] * (100 if long_run else 1)
    outcomes = await asyncio.gather(
        *(mesh.ping(caller, mesh.url(callee, caller)) for caller, callee in pairs)
    )
    for (_, callee), outcome in zip(pairs, outcomes, strict=True):
        assert_answered(outcome, callee)


async def test_a_call_is_relayed_between_hosts_without_a_route(mesh: Mesh) -> None:
    """A cannot reach C (connecting fails at once, cleanly), but A's agent can
    ask B's agent to call C's."""
    direct = await mesh.ping("A", mesh.url("C", seen_from="B"))
    assert_failed(direct, "OSError", within=PROMPT)
    assert direct["errno"] == errno.ENETUNREACH
    outcome: Outcome = await asyncio.wait_for(
        mesh.peers["A"].relay_ping(mesh.url("B", "A"), mesh.url("C", "B")), WAIT
    )
    assert_answered(outcome, "C")


@contextlib.asynccontextmanager
async def _impostor_peer(lab: Lab) -> AsyncIterator[tuple[Any, str]]:
    """A Peer on the impostor container: its proxy and its address on the link
    to A."""
    files = lab.master_tls
    client_context = aiomas.make_ssl_client_context(
        lab.impostor_cafile, files.certfile, files.keyfile
    )
    ssl = (files.server_context, client_context)
    master = await aiomas.Container.create(("127.0.0.1", 0), ssl=ssl, as_coro=True)
    try:
        proxy, aid = await _spawn_peer(master, lab.impostor, "impostor")
        yield proxy, lab.impostor.url(aid, seen_from="A")
    finally:
        await asyncio.wait_for(master.shutdown(as_coro=True), WAIT)


async def test_tls_hosts_refuse_a_host_with_a_certificate_of_another_ca(
    lab: Lab,
) -> None:
    """A does not accept the impostor on B as a server nor as a client; the
    refusals fail only those calls."""
    async with _open_mesh(lab, "tls") as mesh, _impostor_peer(lab) as (impostor, url):
        to_impostor = await mesh.ping("A", url)
        assert_failed(to_impostor, "SSLCertVerificationError", within=PROMPT)
        assert "certificate verify failed" in to_impostor["message"]
        from_impostor: Outcome = await asyncio.wait_for(
            impostor.ping_peer(mesh.url("A", seen_from="B")), WAIT
        )
        # With TLS 1.3 the client's handshake is done before the server checks
        # the client's certificate; the server then just closes the
        # connection, and the client's first call (here the check of the
        # agent id in connect()) fails without learning why for sure; the
        # message names the likely reasons.  (The server's kernel resets the
        # connection if our first request is still unread: then it broke.)
        assert from_impostor["error"] in {
            "ConnectionResetError",
            "ConnectionLostError",
        }, from_impostor
        assert from_impostor["elapsed"] < PROMPT, from_impostor
        assert from_impostor["message"].endswith(
            "or else it may have refused our TLS certificate"
        ), from_impostor
        assert_answered(await mesh.ping("A", mesh.url("B", "A")), "B")
        assert_answered(await mesh.ping("B", mesh.url("A", "B")), "A")


# --- cutting a link ----------------------------------------------------------------


@contextlib.contextmanager
def _tcp_retries2(host: Host, value: int) -> Iterator[None]:
    """Set the TCP retransmission limit of *host*'s kernel (per namespace)."""
    path = "/proc/sys/net/ipv4/tcp_retries2"
    old = _in_netns(host.netns, "cat", path).strip()
    write = ["sh", "-c", f'echo "$1" > {path}', "sh"]
    _in_netns(host.netns, *write, str(value))
    try:
        yield
    finally:
        _in_netns(host.netns, *write, old)


@contextlib.contextmanager
def _link_down(host: Host, neighbour: str) -> Iterator[None]:
    """Set *host*'s end of its link to *neighbour* down (up again at the end)."""
    device = host.link_devices[neighbour]
    _ip(f"-n {host.netns} link set {device} down")
    try:
        yield
    finally:
        # The kernel restores the link's route with the link.
        _ip(f"-n {host.netns} link set {device} up")


async def _wait_until_sent_data_is_acknowledged(*hosts: Host) -> None:
    """Wait until no TCP connection of *hosts* has unacknowledged data.

    Data in flight when a link goes down is retransmitted, and on B the
    connection then dies (see CUT_TCP_RETRIES2).  Right after a call, the
    receiver may still hold back its ACK (delayed ACKs, up to 200 ms on Linux),
    so without this wait, which connections survive a cut depends on timing.
    """
    deadline = time.monotonic() + WAIT
    while True:
        in_flight = [
            line
            for host in hosts
            for line in _in_netns(host.netns, "ss", "-tnH").splitlines()
            if line.split()[2] != "0"  # State Recv-Q Send-Q Local Peer
        ]
        if not in_flight:
            return
        assert time.monotonic() < deadline, f"Data stays unacknowledged: {in_flight}"
        await asyncio.sleep(10 * TIME_UNIT)


@dataclass
class CutReport:
    """What the agents of one network saw during and after a cut."""

    stalled: Outcome
    unreachable: Outcome
    dropped: Outcome
    other_link: Outcome
    resumed: Outcome
    refused: Outcome
    reconnected: Outcome
    no_neighbour: Outcome | None = None


async def _gather(calls: Mapping[str, Awaitable[Outcome]]) -> dict[str, Outcome]:
    """Make the *calls* at once; return their outcomes by name."""
    outcomes = await asyncio.gather(*calls.values())
    return dict(zip(calls, outcomes, strict=True))


async def _during_cut(mesh: Mesh, long_run: bool) -> dict[str, Outcome]:
    calls = {
        # Over A's connection to B: A's kernel keeps the request (it has no
        # route to send it) and the connection.
        "stalled": mesh.ping("A", mesh.url("B", "A"), bound=STALL_BOUND),
        # A new connection from A.
        "unreachable": mesh.ping("A", mesh.unused_url("B", "A")),
        # Over B's connection to A: B's kernel sends the request into the dead
        # link and retransmits until it gives up (see CUT_TCP_RETRIES2).
        "dropped": mesh.ping("B", mesh.url("A", "B")),
        # Over the other link.
        "other_link": mesh.ping("C", mesh.url("B", "C")),
    }
    if long_run:
        # A new connection from B: B still has a route, but A's address does
        # not resolve any more (ARP gives up after 3 probes, a second apart).
        calls["no_neighbour"] = mesh.ping("B", mesh.unused_url("A", "B"), WAIT / 2)
    return await _gather(calls)


async def _after_cut(mesh: Mesh) -> dict[str, Outcome]:
    return await _gather(
        {
            "resumed": mesh.ping("A", mesh.url("B", "A")),
            "refused": mesh.ping("A", mesh.unused_url("B", "A")),
            "reconnected": mesh.ping("B", mesh.url("A", "B")),
        }
    )


async def _cut_link_a_b(
    lab: Lab, meshes: list[Mesh], long_run: bool
) -> list[CutReport]:
    """Cut the link A-B at A's end while the agents of *meshes* call across it,
    then restore it and call again."""
    # Open the connections A->B and B->A (a container calls out on its own
    # connection, not on the one that its peer opened).
    for mesh in meshes:
        assert_answered(await mesh.ping("A", mesh.url("B", "A")), "B")
        assert_answered(await mesh.ping("B", mesh.url("A", "B")), "A")
    hosts = lab.hosts
    await _wait_until_sent_data_is_acknowledged(hosts["A"], hosts["B"])
    with _tcp_retries2(hosts["B"], CUT_TCP_RETRIES2), _link_down(hosts["A"], "B"):
        during = await asyncio.gather(*(_during_cut(m, long_run) for m in meshes))
    after = await asyncio.gather(*(_after_cut(m) for m in meshes))
    return [
        CutReport(**before, **later)
        for before, later in zip(during, after, strict=True)
    ]


async def test_a_cut_link_fails_calls_cleanly_and_they_work_again(
    lab: Lab, long_run: bool
) -> None:
    """Calls across a cut link fail with a clear error within a bound; once the
    link is back, the same agents call each other again, over the connection
    that survived the cut (A->B) or over a new one (B->A).  Plain TCP and TLS
    see the same cut at the same time."""
    async with _open_mesh(lab, "tcp") as tcp, _open_mesh(lab, "tls") as tls:
        for _ in range(5 if long_run else 1):
            for report in await _cut_link_a_b(lab, [tcp, tls], long_run):
                # The call over the established connection just waits: only
                # the caller's bound ends it.
                assert_failed(
                    report.stalled, "TimeoutError", within=STALL_BOUND + PROMPT
                )
                assert report.stalled["elapsed"] >= STALL_BOUND
                # Without a route, connecting fails at once.
                assert_failed(report.unreachable, "OSError", within=PROMPT)
                assert report.unreachable["errno"] == errno.ENETUNREACH
                # B's kernel gives up on its connection (ETIMEDOUT), and the
                # container fails the call: the connection broke.
                assert_failed(report.dropped, "ConnectionLostError", within=WAIT / 2)
                assert "TimeoutError" in str(report.dropped["cause"]), report.dropped
                assert_answered(report.other_link, "B")
                if report.no_neighbour is not None:
                    assert_failed(report.no_neighbour, "OSError", within=WAIT / 2)
                    assert report.no_neighbour["errno"] == errno.EHOSTUNREACH
                # After the cut: the connection A->B that survived carries
                # calls again, B's container opens a new connection to A, and
                # B's host answers connection attempts again.
                assert_answered(report.resumed, "B")
                assert_answered(report.reconnected, "A")
                assert_failed(report.refused, "ConnectionRefusedError", within=PROMPT)


async def test_dead_peer_timeout_ends_calls_over_a_cut_link(lab: Lab) -> None:
    """With ``--dead-peer-timeout 1`` on both hosts, no call over a cut link
    waits for a caller's bound or for the operating system: calls over the
    established connections in both directions fail with ConnectionLostError
    (a ConnectionResetError) after about a second, and once the link is back,
    the containers connect anew by themselves."""
    hosts = lab.hosts
    async with _open_mesh(lab, "watched") as mesh:
        assert_answered(await mesh.ping("A", mesh.url("B", "A")), "B")
        assert_answered(await mesh.ping("B", mesh.url("A", "B")), "A")
        await _wait_until_sent_data_is_acknowledged(hosts["A"], hosts["B"])
        with _link_down(hosts["A"], "B"):
            during = await _gather(
                {
                    "A to B": mesh.ping("A", mesh.url("B", "A")),
                    "B to A": mesh.ping("B", mesh.url("A", "B")),
                }
            )
        for outcome in during.values():
            assert_failed(
                outcome, "ConnectionLostError", within=DEAD_PEER_TIMEOUT + PROMPT
            )
            assert outcome["elapsed"] >= DEAD_PEER_TIMEOUT * 0.9, outcome
            assert "TimeoutError" in str(outcome["cause"]), outcome
        assert_answered(await mesh.ping("A", mesh.url("B", "A")), "B")
        assert_answered(await mesh.ping("B", mesh.url("A", "B")), "A")


# --- through a NATS server on B ------------------------------------------------------


@contextlib.contextmanager
def _nats_server_on(host: Host) -> Iterator[str]:
    """Run a nats-server in *host* on all of its addresses (port 4222); yield
    its URL on the control link."""
    from .conftest import nats_missing
    from .nats_server import find_binary

    missing = nats_missing()
    if missing:
        pytest.skip(missing)
    binary = find_binary()
    assert binary is not None
    process = subprocess.Popen(
        ["ip", "netns", "exec", host.netns, binary, "-a", "0.0.0.0", "-p", "4222"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                socket.create_connection((host.control_address, 4222), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.01)
        yield f"nats://{host.control_address}:4222"
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _start_nats_container(host: Host, url: str) -> subprocess.Popen[bytes]:
    """Start a container process in *host* that is on NATS only (*url*)."""
    return subprocess.Popen(
        [
            *("ip", "netns", "exec", host.netns),
            *(sys.executable, "-m", "aiomas.subproc", url, "--log-level", "warning"),
        ],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


async def test_hosts_without_a_route_reach_each_other_through_nats(lab: Lab) -> None:
    """A and C have no route to each other; their containers are on a NATS
    server on B (A knows it as 172.31.12.2, C as 172.31.23.2) and call each
    other by name.  The test process drives them through the same server."""
    hosts = lab.hosts
    b = hosts["B"]
    with _nats_server_on(b) as control_url:
        processes = {
            name: _start_nats_container(
                hosts[name],
                f"nats://{b.link_addresses[name]}:4222/host-{name.lower()}",
            )
            for name in ("A", "C")
        }
        exit_codes: list[int] = []  # (checked above, after a clean stop)
        try:
            for name, process in processes.items():
                assert process.stdout is not None
                ready, _, _ = select.select([process.stdout], [], [], 30)
                assert ready, f"the container on {name} did not start"
                line = process.stdout.readline().decode().strip()
                assert line == f"nats://host-{name.lower()}/0"
            master = await aiomas.Container.create(
                f"{control_url}/master", as_coro=True
            )
            try:
                peers = {}
                for name in ("A", "C"):
                    manager = await master.connect(f"nats://host-{name.lower()}/0")
                    peers[name], _ = await manager.spawn(PEER, name)
                for caller, callee in (("A", "C"), ("C", "A")):
                    outcome: Outcome = await asyncio.wait_for(
                        peers[caller].ping_peer(f"nats://host-{callee.lower()}/1"),
                        WAIT,
                    )
                    assert_answered(outcome, callee)
                # Directly, A still cannot reach C.
                direct = await asyncio.wait_for(
                    peers["A"].ping_peer(f"tcp://{hosts['C'].link_addresses['B']}:9/0"),
                    WAIT,
                )
                assert direct["errno"] == errno.ENETUNREACH, direct
                for name in ("A", "C"):
                    manager = await master.connect(f"nats://host-{name.lower()}/0")
                    await manager.stop()
                    code = await asyncio.to_thread(processes[name].wait, WAIT)
                    assert code == 0, f"the container on {name} exited with {code}"
            finally:
                await master.shutdown(as_coro=True)
        finally:
            _stop_all(list(processes.values()), exit_codes)
