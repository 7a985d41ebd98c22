"""Read trace files and show the run: an HTML sequence diagram, Mermaid text, stats.

This module reads the JSON Lines files written by trace recording (record format
version 1, see :doc:`trace-viewer`) and needs neither asyncio nor a connection:

- :func:`load` merges files into one list of records (header lines checked);
- :func:`build` pairs the two sides of each message and orders the run
  causally (:class:`Run`);
- :func:`to_html` writes one self-contained page (no network, no external
  assets), :func:`to_mermaid` a Mermaid ``sequenceDiagram``, :func:`stats` calls,
  errors and latency percentiles per RPC path.

``python -m aiomas trace view|mermaid|stats FILES`` runs them (:func:`main`).
Records are untrusted data: the page never interprets their text as markup.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

from aiomas import tracing
from aiomas.tracing import FORMAT, RECORD_FIELDS, VERSION, TraceFormatError

__all__ = [
    "FORMAT",
    "MAX_HTML_ROWS",
    "VERSION",
    "Arrow",
    "Lane",
    "PathStats",
    "Run",
    "TraceFormatError",
    "build",
    "format_stats",
    "load",
    "main",
    "stats",
    "to_html",
    "to_mermaid",
]

#: The page draws at most this many rows (messages and events); the rest of a
#: larger run is left out with a notice, so the file stays a size a browser opens.
MAX_HTML_ROWS: Final = 200_000

_REPLY_TYPES: Final = ("result", "failure", "cancel")
_END_EVENTS: Final = frozenset({"timeout", "cancel", "open", "close"})

Record = dict[str, Any]


def load(paths: Iterable[str | Path]) -> list[Record]:
    """Read and merge trace files: :func:`aiomas.tracing.read`.

    Raises:
        TraceFormatError: a file has no valid header, another version, or a
            line that is not a JSON object (the message names file and line).
    """
    return tracing.read(paths)


@dataclass(frozen=True)
class Lane:
    """One column of the diagram: an agent of a container, or an endpoint.

    ``addr`` is the container's base URL or a socket address, ``agent`` the
    agent id or ``None`` for a plain RPC endpoint (one lane per address).
    """

    addr: str | None
    agent: str | None

    @property
    def label(self) -> str:
        """The agent id; ``(no agent)`` for the container or endpoint itself."""
        if self.agent is not None:
            return self.agent
        return "(no agent)" if self.addr is not None else "(unknown)"


@dataclass
class Arrow:
    """One row of the diagram: a message (arrow) or an event on one lane.

    ``kind`` is the message type (``request``, ``result``, ``failure``,
    ``cancel``) or, for an event, ``ev:timeout``, ``ev:cancel``, ``ev:open``,
    ``ev:close``.  ``send`` and ``recv`` are the records of the two sides (one
    of them ``None`` when only one side was recorded; events have only
    ``send``).  ``order`` is a causal order of the whole run.
    """

    kind: str
    source: Lane
    target: Lane
    send: Record | None
    recv: Record | None
    order: int = 0
    #: The container clock made monotonic along causes: the simulated-time order.
    clock_order: float = -math.inf

    @property
    def first(self) -> Record:
        """The record that starts the row (the sending side if recorded)."""
        record = self.send if self.send is not None else self.recv
        assert record is not None
        return record

    @property
    def outcome(self) -> str | None:
        """The outcome recorded on either side, else ``None``."""
        for record in (self.recv, self.send):
            if record is not None and record.get("outcome"):
                return str(record["outcome"])
        return None

    @property
    def one_sided(self) -> bool:
        """True for a message that only one side recorded."""
        return not self.kind.startswith("ev:") and (
            self.send is None or self.recv is None
        )


@dataclass
class Run:
    """A merged, paired and causally ordered run (see :func:`build`)."""

    records: list[Record]
    lanes: list[Lane]
    arrows: list[Arrow]
    #: Logical time of each record id: a Lamport clock recomputed over the
    #: pairs found, so that every receive comes after its send.
    logical: dict[str, int] = field(default_factory=dict)
    #: Container clock of each record id, made monotonic along causes.
    clocks: dict[str, float] = field(default_factory=dict)
    by_id: dict[str, Record] = field(default_factory=dict)


def _process(record: Mapping[str, Any]) -> tuple[str, int]:
    token, _, counter = str(record["id"]).rpartition(":")
    try:
        return token, int(counter)
    except ValueError:
        return str(record["id"]), 0


def _endpoint(value: Any) -> Lane:
    if isinstance(value, Mapping):
        addr, agent = value.get("addr"), value.get("agent")
        return Lane(
            None if addr is None else str(addr), None if agent is None else str(agent)
        )
    return Lane(None, None)


def _is_request(record: Mapping[str, Any] | None, ev: str) -> bool:
    return (
        record is not None
        and record.get("ev") == ev
        and record.get("type") == "request"
    )


def build(records: Sequence[Record]) -> Run:
    """Pair the records of a run into arrows and order them causally.

    A received request pairs with the send record its ``cause`` names.  A
    reply or cancel message pairs across processes through the request it
    answers: the receiving side's cause is the caller's "send request" record,
    the sending side's cause is the local "recv request" whose cause is that
    same record.  A message only one side recorded is drawn to (or from) the
    peer named in its record.
    """
    by_id: dict[str, Record] = {str(r["id"]): r for r in records}
    endpoint = _Endpoints(records)
    arrows: list[Arrow] = []
    paired: set[str] = set()
    # Requests received, by the id of their sender's record.
    received: dict[str, Record] = {}
    # Replies and cancels by (call key, kind, direction); the call key is the
    # caller's "send request" id.
    replies: dict[tuple[str, str, str], Record] = {}
    for record in records:
        cause = record.get("cause")
        if _is_request(record, "recv") and _is_request(_cause(record, by_id), "send"):
            received.setdefault(str(cause), record)
            continue
        direction, kind = _direction(record, by_id), _kind(record)
        key = _call_key(record, by_id)
        if direction and kind in _REPLY_TYPES and key is not None:
            replies.setdefault((key, kind, direction), record)
    for record in records:
        rid, ev, kind = str(record["id"]), record.get("ev"), _kind(record)
        if rid in paired:
            continue
        local = endpoint.local(record)
        direction = _direction(record, by_id)
        other: Record | None = None
        if kind == "request" and direction == "send":
            other = received.get(rid)
        elif kind == "request" and direction == "recv":
            candidate = _cause(record, by_id)
            if candidate is not None and received.get(str(candidate["id"])) is record:
                other = candidate
        elif direction and kind in _REPLY_TYPES:
            key = _call_key(record, by_id)
            if key is not None:
                opposite = "recv" if direction == "send" else "send"
                other = replies.get((key, kind, opposite))
        if (ev in _END_EVENTS and other is None) or direction is None or kind is None:
            if ev in _END_EVENTS:
                arrows.append(Arrow(f"ev:{ev}", local, local, record, None))
            continue
        if other is not None:
            paired.add(str(other["id"]))
            remote = endpoint.local(other)
        else:
            remote = _unpaired_peer(record, endpoint, by_id)
        send, recv = (record, other) if direction == "send" else (other, record)
        source, target = (local, remote) if direction == "send" else (remote, local)
        arrows.append(Arrow(kind, source, target, send, recv))
    arrows = _pair_by_connection(records, arrows, endpoint)
    logical, clocks = _logical_times(records, arrows)
    for arrow in arrows:
        arrow.order = logical[str(arrow.first["id"])]
        arrow.clock_order = clocks[str(arrow.first["id"])]
    arrows.sort(key=lambda a: (a.order, float(a.first.get("wall") or 0.0)))
    _move_events(arrows)
    lanes: dict[Lane, None] = {}
    # Lanes in the order messages reach them; connection events come first in
    # a run but say little about who matters.
    for events in (False, True):
        for arrow in arrows:
            if arrow.kind.startswith("ev:") is events:
                lanes.setdefault(arrow.source)
                lanes.setdefault(arrow.target)
    return Run(list(records), _group_lanes(lanes), arrows, logical, clocks, by_id)


def _unpaired_peer(
    record: Mapping[str, Any], endpoint: _Endpoints, by_id: Mapping[str, Record]
) -> Lane:
    """The far end of a message whose other side was not recorded.

    A callee's reply to a caller that recorded the request but not the reply
    (it timed out, or its file is missing) goes to the caller's lane, not to
    the socket address the callee saw.
    """
    if record.get("type") != "request":
        request = _cause(record, by_id)
        if _is_request(request, "recv"):
            assert request is not None
            sender = _cause(request, by_id)
            if _is_request(sender, "send"):
                assert sender is not None
                return endpoint.local(sender)
    return endpoint(record.get("peer"))


def _pair_by_connection(
    records: Sequence[Record], arrows: list[Arrow], endpoint: _Endpoints
) -> list[Arrow]:
    """Pair the one-sided messages of two traced ends of one connection.

    When the trace context did not travel (the extension was not agreed yet,
    or a plain channel), both ends may still have recorded the connection:
    their "open" records name the same two socket addresses crosswise, and a
    message has the same id at both ends.
    """
    sockets: dict[str, tuple[str, str]] = {}
    for record in records:
        local, peer = _endpoint(record.get("local")), _endpoint(record.get("peer"))
        conn = record.get("conn")
        if (
            record.get("ev") == "open"
            and isinstance(conn, str)
            and local.addr
            and peer.addr
        ):
            sockets.setdefault(conn, (local.addr, peer.addr))
    ends: dict[tuple[str, str], list[str]] = {}
    for conn, pair in sockets.items():
        ends.setdefault(pair, []).append(conn)
    partner: dict[str, str] = {}
    for conn, (local_addr, peer_addr) in sockets.items():
        others = ends.get((peer_addr, local_addr), [])
        if len(ends[(local_addr, peer_addr)]) == 1 and len(others) == 1:
            partner[conn] = others[0]  # Only where the addresses say it for sure.
    # A container's "open" names its base URL, not the socket the peer saw:
    # then the server's address alone pairs a connection, if it had only one.
    dialing: dict[str, list[str]] = {}
    serving: dict[str, list[str]] = {}
    for conn, (local_addr, peer_addr) in sockets.items():
        if conn not in partner:
            dialing.setdefault(_location(peer_addr), []).append(conn)
            serving.setdefault(_location(local_addr), []).append(conn)
    for where, callers in dialing.items():
        callees = serving.get(where, [])
        if len(callers) == 1 and len(callees) == 1 and callers != callees:
            partner[callers[0]], partner[callees[0]] = callees[0], callers[0]
    if not partner:
        return arrows
    received: dict[tuple[Any, Any, str], Arrow] = {}
    for arrow in arrows:
        if arrow.one_sided and arrow.recv is not None:
            key = (arrow.recv.get("conn"), arrow.recv.get("msg"), arrow.kind)
            received.setdefault(key, arrow)
    merged: set[int] = set()
    for arrow in arrows:
        send = arrow.send
        if not arrow.one_sided or send is None or send.get("msg") is None:
            continue
        conn = partner.get(str(send.get("conn")))
        other = received.get((conn, send["msg"], arrow.kind))
        if other is None or id(other) in merged or other.recv is None:
            continue
        merged.add(id(other))
        arrow.recv = other.recv
        arrow.source, arrow.target = endpoint.local(send), endpoint.local(other.recv)
    return [arrow for arrow in arrows if id(arrow) not in merged]


def _location(addr: str) -> str:
    """``host:port`` or a socket path, from a base URL or a socket address."""
    location = addr.split("://", 1)[1].rstrip("/") if "://" in addr else addr
    return location.replace("[", "").replace("]", "")


def _kind(record: Mapping[str, Any]) -> str | None:
    """The message kind a record draws: its type, or ``cancel`` for a cancel."""
    if record.get("ev") == "cancel":
        return "cancel"
    kind = record.get("type")
    return str(kind) if kind in ("request", *_REPLY_TYPES) else None


def _direction(record: Mapping[str, Any], by_id: Mapping[str, Record]) -> str | None:
    """``send`` or ``recv`` for a message record; ``None`` for other events.

    A cancel is sent on the caller's side (its cause is the "send request") and
    received on the callee's (its cause is the "recv request").
    """
    ev = record.get("ev")
    if ev in ("send", "recv"):
        return str(ev)
    if ev == "cancel":
        request = _cause(record, by_id)
        for side in ("send", "recv"):
            if _is_request(request, side):
                return side
    return None


class _Endpoints:
    """Lanes for ``local``/``peer`` values, socket addresses mapped to base URLs.

    A record names its peer by the socket address (``host:port``, a unix
    socket's path) where the container's own records name its base URL
    (``tcp://host:port/``, ``ipc://[path]/``): both are one lane.
    """

    def __init__(self, records: Iterable[Record]) -> None:
        self._urls: dict[str, str] = {}
        for record in records:
            local = record.get("local")
            addr = local.get("addr") if isinstance(local, Mapping) else None
            if isinstance(addr, str) and "://" in addr:
                location = addr.split("://", 1)[1].rstrip("/")
                if location.startswith("[") and location.endswith("]"):
                    location = location[1:-1]  # ipc://[path]/
                self._urls.setdefault(location, addr)
                self._urls.setdefault(location.replace("[", "").replace("]", ""), addr)

        # A connection's events name socket addresses; its messages, the
        # container: the events go where the messages are.
        self._conns: dict[str, str] = {}
        for record in records:
            local, conn = record.get("local"), record.get("conn")
            addr = local.get("addr") if isinstance(local, Mapping) else None
            if isinstance(addr, str) and "://" in addr and isinstance(conn, str):
                self._conns.setdefault(conn, addr)

    def local(self, record: Mapping[str, Any]) -> Lane:
        """The lane of the side that wrote ``record``."""
        lane = self(record.get("local"))
        if lane.addr is None or "://" not in lane.addr:
            url = self._conns.get(str(record.get("conn")))
            if url is not None:
                return Lane(url, lane.agent)
        return lane

    def __call__(self, value: Any) -> Lane:
        lane = _endpoint(value)
        if lane.addr is not None and "://" not in lane.addr:
            url = self._urls.get(lane.addr) or self._urls.get(
                lane.addr.replace("[", "").replace("]", "")
            )
            if url is not None:
                return Lane(url, lane.agent)
        return lane


def _move_events(arrows: Sequence[Arrow]) -> None:
    """Put a container's connection events on its own lane or its first agent's.

    They name no agent; a lane of their own per container would only widen
    the diagram when no message uses the container's lane.
    """
    first: dict[str | None, Lane] = {}
    for arrow in arrows:
        if arrow.kind.startswith("ev:"):
            continue
        for lane in (arrow.source, arrow.target):
            if lane.agent is None:
                first[lane.addr] = lane  # The container's own lane, if it has one.
            else:
                first.setdefault(lane.addr, lane)
    for arrow in arrows:
        if arrow.kind in ("ev:open", "ev:close") and arrow.source.agent is None:
            lane = first.get(arrow.source.addr, arrow.source)
            arrow.source = arrow.target = lane


def _call_key(record: Mapping[str, Any], by_id: Mapping[str, Record]) -> str | None:
    """The caller's "send request" id of the call a reply or cancel belongs to."""
    request = _cause(record, by_id)
    if _is_request(request, "send"):
        assert request is not None
        return str(request["id"])
    if _is_request(request, "recv"):
        assert request is not None
        cause = request.get("cause")
        return None if cause is None else str(cause)
    return None


def _group_lanes(lanes: Iterable[Lane]) -> list[Lane]:
    """Lanes of one container side by side, containers in order of appearance."""
    order: dict[str | None, list[Lane]] = {}
    for lane in lanes:
        order.setdefault(lane.addr, []).append(lane)
    return [lane for group in order.values() for lane in group]


def _logical_times(
    records: Sequence[Record], arrows: Sequence[Arrow]
) -> tuple[dict[str, int], dict[str, float]]:
    """A Lamport clock over process order and the message pairs found, and a
    container clock made monotonic along the same edges.

    Replies carry no counter on the wire, so the recorded ``lamport`` alone can
    put a received reply before the reply that was sent; this recomputes
    ``max(recorded, previous in process, send + 1)`` in a topological order.
    Containers' clocks differ a little (each follows its own ExternalClock), so
    the clock order is ``max(clock, previous in process, send's)``: a receive
    never sorts before its send.
    """
    processes: dict[str, list[Record]] = {}
    for record in records:
        processes.setdefault(_process(record)[0], []).append(record)
    for chain in processes.values():
        chain.sort(key=lambda r: (int(r.get("lamport") or 0), _process(r)[1]))
    send_of: dict[str, str] = {}
    for arrow in arrows:
        if arrow.send is not None and arrow.recv is not None:
            send_of[str(arrow.recv["id"])] = str(arrow.send["id"])
    logical: dict[str, int] = {}
    clocks: dict[str, float] = {}
    positions = dict.fromkeys(processes, 0)
    last = dict.fromkeys(processes, 0)
    last_clock = dict.fromkeys(processes, -math.inf)
    progress = True
    while progress:
        progress = False
        for token, chain in processes.items():
            while positions[token] < len(chain):
                record = chain[positions[token]]
                rid = str(record["id"])
                value = max(int(record.get("lamport") or 0), last[token] + 1)
                clock = _number(record.get("clock"), -math.inf)
                clock = max(clock, last_clock[token])
                if rid in send_of:
                    sent = logical.get(send_of[rid])
                    if sent is None:
                        break  # Wait until the sender's process got there.
                    value = max(value, sent + 1)
                    clock = max(clock, clocks[send_of[rid]])
                logical[rid] = last[token] = value
                clocks[rid] = last_clock[token] = clock
                positions[token] += 1
                progress = True
    # Only a cycle (inconsistent files) leaves records: keep their counters.
    for chain in processes.values():
        for record in chain:
            rid = str(record["id"])
            logical.setdefault(rid, int(record.get("lamport") or 0))
            clocks.setdefault(rid, _number(record.get("clock"), -math.inf))
    return logical, clocks


def _number(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) else default


# -- stats ------------------------------------------------------------------


@dataclass
class PathStats:
    """Calls of one RPC path: counts and the latencies of answered calls.

    ``latencies`` are seconds from a "send request" to its "recv" reply in the
    caller's process (one clock, so they are exact whatever the other hosts'
    clocks say).
    """

    path: str
    calls: int = 0
    results: int = 0
    errors: int = 0
    timeouts: int = 0
    cancelled: int = 0
    latencies: list[float] = field(default_factory=list)

    def percentile(self, p: float) -> float | None:
        """The nearest-rank percentile ``p`` (0 to 100) of the latencies."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        return ordered[rank - 1]


def stats(records: Sequence[Record]) -> list[PathStats]:
    """Count calls, outcomes and latencies per RPC path, sorted by path.

    A call is a "send request" record, or a "recv request" whose sender was not
    recorded.  Its outcome is what the caller saw first (a reply's ``outcome``,
    ``result`` or ``error:...``, a ``timeout`` or a ``cancel``); for a call
    only the callee recorded, what the callee saw.
    """
    run = build(records)
    by_path: dict[str, PathStats] = {}
    calls: dict[str, PathStats] = {}  # Caller's send id (or recv id) -> stats.
    call_of: dict[str, str] = {}
    for arrow in run.arrows:
        if arrow.kind == "request":
            path = str(arrow.first.get("path") or "")
            entry = by_path.setdefault(path, PathStats(path))
            entry.calls += 1
            calls[str(arrow.first["id"])] = entry
            # Ends name the request of their own side: both ids are the call.
            for side in (arrow.send, arrow.recv):
                if side is not None:
                    call_of[str(side["id"])] = str(arrow.first["id"])
    ends: dict[str, tuple[int, float, str]] = {}
    for record in run.records:
        ev, kind = record.get("ev"), record.get("type")
        if ev not in ("timeout", "cancel") and kind not in ("result", "failure"):
            continue
        request = _cause(record, run.by_id)
        key = None if request is None else call_of.get(str(request["id"]))
        if key is None or ev not in ("timeout", "cancel", "send", "recv"):
            continue
        outcome = str(record.get("outcome") or kind)
        if ev == "timeout":
            outcome = "timeout"
        elif ev == "cancel":
            outcome = "cancelled"
        caller_side = _is_request(request, "send")
        wall = float(record.get("wall") or 0.0)
        end = (0 if caller_side else 1, wall, outcome)
        ends[key] = min(ends.get(key, end), end)
        if ev == "recv" and caller_side and key in calls:
            assert request is not None
            calls[key].latencies.append(wall - float(request["wall"]))
    for key, (_, _, outcome) in ends.items():
        counted = calls.get(key)
        if counted is None:
            continue
        if outcome == "result":
            counted.results += 1
        elif outcome == "timeout":
            counted.timeouts += 1
        elif outcome == "cancelled":
            counted.cancelled += 1
        else:
            counted.errors += 1
    return [by_path[path] for path in sorted(by_path)]


def _cause(record: Mapping[str, Any], by_id: Mapping[str, Record]) -> Record | None:
    """The record that ``record``'s cause names, if it was loaded."""
    cause = record.get("cause")
    return by_id.get(cause) if isinstance(cause, str) else None


def format_stats(table: Sequence[PathStats]) -> str:
    """The stats as a text table; latencies in milliseconds, ``-`` if none."""
    head = ("path", "calls", "ok", "errors", "timeouts", "cancelled")
    rows = [
        (
            s.path or "(no path)",
            str(s.calls),
            str(s.results),
            str(s.errors),
            str(s.timeouts),
            str(s.cancelled),
            *(_ms(s.percentile(p)) for p in (50, 90, 99)),
        )
        for s in table
    ]
    header = (*head, "p50 ms", "p90 ms", "p99 ms")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])]
        cells += [
            cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    total = sum(s.calls for s in table)
    lines.append(f"{total} calls on {len(table)} paths")
    return "\n".join(lines) + "\n"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.3f}"


# -- mermaid ----------------------------------------------------------------

_MERMAID_ARROWS: Final = {
    "request": "->>",
    "result": "-->>",
    "failure": "--x",
    "cancel": "-)",
}


def to_mermaid(run: Run, limit: int | None = None) -> str:
    """The run as Mermaid ``sequenceDiagram`` text, one box per container.

    Participants are ``p0``, ``p1``...; labels are escaped with Mermaid's
    ``#code;`` entities, so record text cannot end a line or start a block.
    With ``limit``, only the first ``limit`` rows are written, and a note says
    how many were left out.
    """
    index = {lane: i for i, lane in enumerate(run.lanes)}
    lines = ["sequenceDiagram"]
    groups: dict[str | None, list[Lane]] = {}
    for lane in run.lanes:
        groups.setdefault(lane.addr, []).append(lane)
    for addr, lanes in groups.items():
        # A colour first: else a container named like one would be taken as it.
        lines.append(f"    box rgb(245,245,245) {_mermaid_text(addr or '(unknown)')}")
        for lane in lanes:
            lines.append(
                f"        participant p{index[lane]} as {_mermaid_text(lane.label)}"
            )
        lines.append("    end")
    rows = run.arrows if limit is None else run.arrows[:limit]
    for arrow in rows:
        source, target = f"p{index[arrow.source]}", f"p{index[arrow.target]}"
        if arrow.kind.startswith("ev:"):
            lines.append(
                f"    Note over {source}: {_mermaid_text(_event_label(arrow))}"
            )
            continue
        label = _arrow_label(arrow)
        if arrow.one_sided:
            label += " (one side recorded)"
        lines.append(
            f"    {source}{_MERMAID_ARROWS[arrow.kind]}{target}: {_mermaid_text(label)}"
        )
    if limit is not None and len(run.arrows) > limit:
        first = f"p{index[run.lanes[0]]}" if run.lanes else ""
        lines.append(
            f"    Note over {first}: {len(run.arrows) - limit} more rows left out"
        )
    return "\n".join(lines) + "\n"


def _arrow_label(arrow: Arrow) -> str:
    path = str(arrow.first.get("path") or "")
    if arrow.kind == "request":
        return path or "request"
    outcome = arrow.outcome or arrow.kind
    return f"{outcome} {path}".strip()


def _event_label(arrow: Arrow) -> str:
    record = arrow.first
    what = arrow.kind[3:]
    detail = record.get("path") or record.get("conn") or ""
    return f"{what} {detail}".strip()


def _mermaid_text(text: str) -> str:
    """Keep letters, digits and a few safe marks; the rest as ``#code;``."""
    safe = set(" ._-/:@()[]*+=?!,'")
    return "".join(
        c if (c.isalnum() and c.isascii()) or c in safe else f"#{ord(c)};" for c in text
    )


# -- html -------------------------------------------------------------------


def _page_data(run: Run, title: str, max_rows: int) -> dict[str, Any]:
    """The data the page's script draws from (plain JSON types only)."""
    lane_index = {lane: i for i, lane in enumerate(run.lanes)}
    containers: dict[str | None, int] = {}
    for lane in run.lanes:
        containers.setdefault(lane.addr, len(containers))
    record_index = {str(r["id"]): i for i, r in enumerate(run.records)}
    rows = run.arrows[:max_rows]
    strings: dict[str, int] = {}

    def text(value: Any) -> Any:
        # Paths, conns, trace ids and addresses repeat: send each once.
        if isinstance(value, str):
            return strings.setdefault(value, len(strings))
        return value

    # A request paired through its connection names no cause (the context did
    # not travel); its sender is the cause the chain shows.
    senders = {
        str(a.recv["id"]): record_index[str(a.send["id"])]
        for a in run.arrows
        if a.kind == "request" and a.send and a.recv and a.recv.get("cause") is None
    }
    records = []
    for r in run.records:
        item = []
        for name in RECORD_FIELDS:
            value = r.get(name)
            if name in ("local", "peer"):
                lane = _endpoint(value)
                value = [text(lane.addr), text(lane.agent)]
            elif name == "args":
                value = None if value is None else _truncate(str(value))
            elif name in ("conn", "trace", "path", "ev", "type", "outcome"):
                value = text(value)
            elif name in ("wall", "clock", "lamport", "msg", "size"):
                value = value if isinstance(value, (int, float)) else None
            elif name == "cause" and value is None:
                value = senders.get(str(r["id"]))
            elif name == "cause":
                value = (
                    record_index.get(value, value) if isinstance(value, str) else None
                )
            item.append(value)
        records.append(item)
    starts = [
        float(r["wall"]) for r in run.records if isinstance(r.get("wall"), (int, float))
    ]
    return {
        "title": title,
        "fields": list(RECORD_FIELDS),
        "strings": list(strings),
        "containers": [c or "(unknown)" for c in containers],
        "lanes": [[lane.label, containers[lane.addr], lane.addr] for lane in run.lanes],
        "records": records,
        # kind, source lane, target lane, send record, recv record, order,
        # clock order
        "rows": [
            [
                a.kind,
                lane_index[a.source],
                lane_index[a.target],
                None if a.send is None else record_index[str(a.send["id"])],
                None if a.recv is None else record_index[str(a.recv["id"])],
                a.order,
                a.clock_order if math.isfinite(a.clock_order) else None,
            ]
            for a in rows
        ],
        "left_out": len(run.arrows) - len(rows),
        "start": min(starts) if starts else 0.0,
    }


def _truncate(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _script_json(data: Any) -> str:
    """JSON that cannot end a ``<script>`` element or open a comment in it."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def to_html(
    run: Run, title: str = "aiomas trace", max_rows: int = MAX_HTML_ROWS
) -> str:
    """The run as one self-contained HTML page (inline CSS and script only).

    The page draws only the rows in view, so runs of many thousand messages
    stay fast; beyond ``max_rows`` rows the rest is left out with a notice.
    """
    data = _page_data(run, title, max_rows)
    return (
        _PAGE.replace("%TITLE%", html.escape(title))
        .replace("%STYLE%", _STYLE)
        .replace("%SCRIPT%", _SCRIPT)
        .replace("%DATA%", _script_json(data))
    )


_RESOURCES: Final = Path(__file__).with_name("trace_view_page")
_PAGE: Final = (_RESOURCES / "page.html").read_text(encoding="utf-8")
_STYLE: Final = (_RESOURCES / "page.css").read_text(encoding="utf-8")
_SCRIPT: Final = (_RESOURCES / "page.js").read_text(encoding="utf-8")


# -- command line -----------------------------------------------------------


def main(argv: Sequence[str], prog: str, out: TextIO | None = None) -> int:
    """``python -m aiomas trace view|mermaid|stats FILES``; return the exit code."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Show a traced run: HTML viewer, Mermaid text or stats."
    )
    commands = parser.add_subparsers(dest="what", metavar="COMMAND", required=True)
    view = commands.add_parser("view", help="write a self-contained HTML viewer")
    view.add_argument(
        "-o", "--output", default="trace.html", help="default: trace.html"
    )
    view.add_argument("--title", default=None, help="page title (default: the files)")
    mermaid = commands.add_parser("mermaid", help="print a Mermaid sequenceDiagram")
    mermaid.add_argument("--limit", type=_positive, default=None, help="at most N rows")
    commands.add_parser("stats", help="print calls, errors and latency per path")
    for command in (view, mermaid, commands.choices["stats"]):
        command.add_argument(
            "files", nargs="+", metavar="FILE", help="*.jsonl trace files"
        )
    args = parser.parse_args(argv)
    out = sys.stdout if out is None else out
    try:
        records = load(args.files)
    except (OSError, TraceFormatError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    if args.what == "stats":
        out.write(format_stats(stats(records)))
        return 0
    run = build(records)
    if args.what == "mermaid":
        out.write(to_mermaid(run, args.limit))
        return 0
    began = time.perf_counter()
    title = args.title or "aiomas trace: " + " ".join(Path(f).name for f in args.files)
    page = to_html(run, title)
    Path(args.output).write_text(page, encoding="utf-8")
    print(
        f"{args.output}: {len(run.arrows)} rows, {len(run.lanes)} lanes, "
        f"{len(page) / 1e6:.1f} MB, {time.perf_counter() - began:.2f} s",
        file=out,
    )
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value
