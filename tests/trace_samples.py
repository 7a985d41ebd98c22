"""Synthetic trace files (record format v1) of a contract-net-like run.

Three traced processes (an auctioneer container and two bidder containers)
and one plain RPC endpoint that records nothing.  Each task: the auctioneer
asks every bidder for a bid; a bidder in container B asks a price oracle in
container C while it serves the bid (a nested call); then the best bidder is
awarded.  Task 0 also has a failure (a bidder raises), a timeout (no reply in
time), a cancel (the caller gives up and tells the callee) and a call to the
untraced endpoint (only the caller's side is recorded).  Container C's wall
clock is 5 s behind, so only the Lamport counters order the run; every record
has a container clock except the auctioneer's calls to the plain endpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Record = dict[str, Any]

AUCTIONEER = "tcp://127.0.0.1:5555/"
BIDDERS_B = "tcp://127.0.0.1:5556/"
BIDDERS_C = "tcp://127.0.0.1:5557/"
PLAIN = "tcp://127.0.0.1:5560/"


@dataclass
class World:
    """Shared wall and simulated time; ``tick`` moves both on."""

    wall: float = 1_750_000_000.0
    clock: float = 0.0

    def tick(self, seconds: float = 0.001) -> None:
        self.wall += seconds
        self.clock += seconds * 10


@dataclass
class Process:
    """One traced process: writes records with its own counter and Lamport clock."""

    world: World
    token: str
    addr: str
    skew: float = 0.0
    counter: int = 0
    lamport: int = 0
    conns: int = 0
    records: list[Record] = field(default_factory=list)

    def header(self) -> Record:
        return {
            "format": "aiomas-trace",
            "version": 1,
            "process": self.token,
            "pid": 1000 + len(self.token),
            "host": "testhost",
            "argv": ["python", "-m", "aiomas", "demo"],
            "started": self.world.wall + self.skew,
        }

    def conn(self) -> str:
        self.conns += 1
        return f"{self.token}/c{self.conns}"

    def record(
        self,
        ev: str,
        kind: str | None,
        agent: str | None,
        peer: tuple[str | None, str | None],
        *,
        conn: str,
        trace: str,
        cause: str | None = None,
        msg: int | None = None,
        path: str | None = None,
        size: int | None = None,
        outcome: str | None = None,
        args: str | None = None,
        received_lamport: int = 0,
        clocked: bool = True,
    ) -> Record:
        self.world.tick()
        self.counter += 1
        self.lamport = max(self.lamport, received_lamport) + 1
        record: Record = {
            "id": f"{self.token}:{self.counter}",
            "ev": ev,
            "type": kind,
            "msg": msg,
            "conn": conn,
            "trace": trace,
            "cause": cause,
            "lamport": self.lamport,
            "wall": round(self.world.wall + self.skew, 6),
            "clock": round(self.world.clock, 6) if clocked else None,
            "local": {"addr": self.addr, "agent": agent},
            "peer": {"addr": peer[0], "agent": peer[1]},
            "path": path,
            "size": size,
            "outcome": outcome,
        }
        if args is not None:
            record["args"] = args
        self.records.append(record)
        return record

    def lines(self) -> list[str]:
        return [json.dumps(item) for item in [self.header(), *self.records]]


@dataclass
class Link:
    """A connection from a caller process to a callee (``None``: not traced)."""

    caller: Process
    callee: Process | None
    callee_addr: str
    caller_conn: str
    callee_conn: str | None
    next_msg: int = 0

    @property
    def callee_sock(self) -> str:
        """The callee's socket address, as a caller's records name it."""
        return self.callee_addr.removeprefix("tcp://").rstrip("/")

    @property
    def caller_sockaddr(self) -> str:
        return "127.0.0.1:" + str(40000 + int(self.caller_conn.rsplit("c", 1)[1]))


def connect(caller: Process, callee: Process | None, addr: str, trace: str) -> Link:
    link = Link(
        caller, callee, addr, caller.conn(), None if callee is None else callee.conn()
    )
    caller.record("open", None, None, (addr, None), conn=link.caller_conn, trace=trace)
    if callee is not None:
        assert link.callee_conn is not None
        callee.record(
            "open",
            None,
            None,
            (link.caller_sockaddr, None),
            conn=link.callee_conn,
            trace=trace,
        )
    return link


@dataclass
class Call:
    link: Link
    agent: str | None
    callee_agent: str
    path: str
    msg: int
    send: Record
    recv: Record | None


def request(
    link: Link,
    agent: str | None,
    callee_agent: str,
    method: str,
    trace: str,
    cause: str | None,
    args: str,
) -> Call:
    msg = link.next_msg
    link.next_msg += 1
    path = f"agents/{callee_agent}/{method}"
    size = 20 + len(path) + len(args)
    send = link.caller.record(
        "send",
        "request",
        agent,
        (link.callee_sock, callee_agent),
        conn=link.caller_conn,
        trace=trace,
        cause=cause,
        msg=msg,
        path=path,
        size=size,
        args=args,
        clocked=link.callee is not None,
    )
    recv = None
    if link.callee is not None:
        assert link.callee_conn is not None
        recv = link.callee.record(
            "recv",
            "request",
            callee_agent,
            (link.caller_sockaddr, None),
            conn=link.callee_conn,
            trace=trace,
            cause=send["id"],
            msg=msg,
            path=path,
            size=size,
            args=args,
            received_lamport=send["lamport"],
        )
    return Call(link, agent, callee_agent, path, msg, send, recv)


def reply(
    call: Call, kind: str, outcome: str, args: str, *, delivered: bool = True
) -> None:
    """The callee answers (if traced); the caller receives it if ``delivered``."""
    link = call.link
    size = 12 + len(args)
    trace = call.send["trace"]
    shown = None if kind == "failure" else args  # Failures are recorded without.
    if link.callee is not None and call.recv is not None:
        assert link.callee_conn is not None
        link.callee.record(
            "send",
            kind,
            call.callee_agent,
            (link.caller_sockaddr, None),
            conn=link.callee_conn,
            trace=trace,
            cause=call.recv["id"],
            msg=call.msg,
            path=call.path,
            size=size,
            outcome=outcome,
            args=shown,
        )
    if delivered:
        link.caller.record(
            "recv",
            kind,
            call.agent,
            (link.callee_sock, call.callee_agent),
            conn=link.caller_conn,
            trace=trace,
            cause=call.send["id"],
            msg=call.msg,
            path=call.path,
            size=size,
            outcome=outcome,
            args=shown,
            clocked=link.callee is not None,
        )


def caller_event(call: Call, ev: str) -> Record:
    """A timeout or a cancel (the caller gives up) on the caller's side."""
    return call.link.caller.record(
        ev,
        "cancel" if ev == "cancel" else None,
        call.agent,
        (call.link.callee_sock, call.callee_agent),
        conn=call.link.caller_conn,
        trace=call.send["trace"],
        cause=call.send["id"],
        msg=call.msg,
        path=call.path,
        outcome="cancelled" if ev == "cancel" else "timeout",
    )


def callee_cancelled(call: Call, lamport: int) -> None:
    """The callee receives the cancel of ``call``; its handler ends cancelled."""
    link = call.link
    assert link.callee is not None
    assert call.recv is not None
    assert link.callee_conn is not None
    link.callee.record(
        "cancel",
        "cancel",
        call.callee_agent,
        (link.caller_sockaddr, None),
        conn=link.callee_conn,
        trace=call.send["trace"],
        cause=call.recv["id"],
        msg=call.msg,
        path=call.path,
        outcome="cancelled",
        received_lamport=lamport,
    )


def contract_net(tasks: int = 1) -> list[Process]:
    """The processes of a run with ``tasks`` auctions (see the module doc)."""
    world = World()
    a = Process(world, "a1a1a1a1a1a1", AUCTIONEER)
    b = Process(world, "b2b2b2b2b2b2", BIDDERS_B)
    c = Process(world, "c3c3c3c3c3c3", BIDDERS_C, skew=-5.0)
    ab = connect(a, b, BIDDERS_B, "0" * 32)
    ac = connect(a, c, BIDDERS_C, "0" * 32)
    bc = connect(b, c, BIDDERS_C, "0" * 32)
    plain = connect(a, None, PLAIN, "0" * 32)
    for task in range(tasks):
        trace = f"{task + 1:032x}"
        bids: list[Call] = []
        for link, agent in ((ab, "0"), (ab, "1"), (ac, "0")):
            bids.append(request(link, "0", agent, "bid", trace, None, f"({task!r},)"))
        # Bidder b/0 asks the oracle c/1 while serving its bid: a nested call.
        first = bids[0]
        assert first.recv is not None
        quote = request(
            bc, first.callee_agent, "1", "quote", trace, first.recv["id"], "()"
        )
        reply(quote, "result", "result", "42.0")
        reply(first, "result", "result", "{'price': 42.0}")
        if task == 0:
            reply(bids[1], "failure", "error:ValueError", "ValueError('no capacity')")
            caller_event(bids[2], "timeout")
            reply(bids[2], "result", "result", "{'price': 50.0}", delivered=False)
            doomed = request(ac, "0", "1", "bid", trace, None, "(0,)")
            gave_up = caller_event(doomed, "cancel")
            callee_cancelled(doomed, gave_up["lamport"])
            logged = request(plain, "0", "log", "report", trace, None, "('task 0',)")
            reply(logged, "result", "result", "None")
        else:
            reply(bids[1], "result", "result", "{'price': 45.0}")
            reply(bids[2], "result", "result", "{'price': 44.0}")
        award = request(ab, "0", "0", "award", trace, None, f"({task!r}, 42.0)")
        reply(award, "result", "result", "True")
    for link in (ab, ac, bc, plain):
        link.caller.record(
            "close",
            None,
            None,
            (link.callee_sock, None),
            conn=link.caller_conn,
            trace="0" * 32,
        )
    return [a, b, c]


def write_run(directory: Path, tasks: int = 1) -> list[Path]:
    """Write the run's files (``<token>.jsonl``) into ``directory``."""
    paths = []
    for process in contract_net(tasks):
        path = directory / f"{process.token}.jsonl"
        path.write_text("\n".join(process.lines()) + "\n", encoding="utf-8")
        paths.append(path)
    return paths
