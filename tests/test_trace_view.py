"""Tests for aiomas.trace_view: loading, pairing, Mermaid, stats, the HTML page.

The page is tested in Debian's chromium, headless, through playwright (no
browser download: it drives /usr/bin/chromium).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from aiomas import trace_view
from aiomas.testing import TIME_UNIT
from aiomas.trace_view import TraceFormatError, build, load

from .trace_samples import contract_net, write_run

CHROMIUM = Path("/usr/bin/chromium")
EVIL = "</script><img src=x onerror=\"document.title='pwned'\"><!--"


@pytest.fixture
def run_files(tmp_path: Path) -> list[Path]:
    return write_run(tmp_path)


def header(token: str = "aaaaaaaaaaaa", version: int = 1) -> str:
    return json.dumps(
        {
            "format": "aiomas-trace",
            "version": version,
            "process": token,
            "pid": 1,
            "host": "h",
            "argv": [],
            "started": 0.0,
        }
    )


def record(rid: str, ev: str, kind: str | None, **fields: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": rid,
        "ev": ev,
        "type": kind,
        "msg": None,
        "conn": "aaaaaaaaaaaa/c1",
        "trace": "ab" * 16,
        "cause": None,
        "lamport": int(rid.rsplit(":", 1)[1]),
        "wall": 100.0,
        "clock": None,
        "local": {"addr": "tcp://127.0.0.1:5555/", "agent": "0"},
        "peer": {"addr": "127.0.0.1:6000", "agent": None},
        "path": None,
        "size": None,
        "outcome": None,
    }
    item.update(fields)
    return item


# -- loading ----------------------------------------------------------------


def test_load_merges_files_and_skips_headers(run_files: list[Path]) -> None:
    records = load(run_files)
    lines = sum(len(p.read_text().splitlines()) for p in run_files)
    assert len(records) == lines - len(run_files)
    assert all("format" not in r for r in records)
    # A file given twice, or appended to with a second header, adds nothing.
    again = run_files[0].read_text() + run_files[0].read_text()
    run_files[0].write_text(again)
    assert load([*run_files, run_files[1]]) == records


def test_load_drops_a_cut_last_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    whole = json.dumps(record("aaaaaaaaaaaa:1", "open", None))
    path.write_text(f'{header()}\n{whole}\n{{"id": "aaaaaaaaaaaa:2", "ev')
    assert [r["id"] for r in load([path])] == ["aaaaaaaaaaaa:1"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty, no aiomas-trace header"),
        ('{"id": "x:1"}\n', "t.jsonl:1: no aiomas-trace header first"),
        (
            header(version=2) + "\n",
            "trace format version 2, this aiomas reads version 1",
        ),
        ('{"format": "other", "version": 1}\n', "format is not 'aiomas-trace'"),
        (header() + "\nnot json\n{}\n", "t.jsonl:2: not JSON"),
        (header() + "\n[1, 2]\n", "t.jsonl:2: not a JSON object"),
        (header() + '\n{"ev": "open"}\n', "t.jsonl:2: record without a string id"),
        (
            header() + '\n{"id": "a:1", "lamport": "x"}\n',
            "t.jsonl:2: lamport, wall or clock is not a number",
        ),
        (
            header() + '\n{"id": "a:1", "wall": [1]}\n',
            "t.jsonl:2: lamport, wall or clock is not a number",
        ),
    ],
)
def test_load_rejects_other_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(text)
    with pytest.raises(TraceFormatError, match=message.replace("(", r"\(")):
        load([path])


# -- pairing and order ------------------------------------------------------


def test_build_pairs_both_sides_and_draws_one_sided_messages() -> None:
    records = [r for p in contract_net() for r in p.records]
    run = build(records)
    lanes = {(lane.addr, lane.agent) for lane in run.lanes}
    # Socket addresses of traced containers map to their base URLs; the plain
    # endpoint keeps its socket address.
    assert lanes == {
        ("tcp://127.0.0.1:5555/", "0"),
        ("tcp://127.0.0.1:5556/", "0"),
        ("tcp://127.0.0.1:5556/", "1"),
        ("tcp://127.0.0.1:5557/", "0"),
        ("tcp://127.0.0.1:5557/", "1"),
        ("127.0.0.1:5560", "log"),
    }
    messages = [a for a in run.arrows if not a.kind.startswith("ev:")]
    kinds = [a.kind for a in messages]
    assert kinds.count("request") == 7
    assert kinds.count("result") == 5
    assert kinds.count("failure") == 1
    assert kinds.count("cancel") == 1
    one_sided = [(a.kind, a.first["path"]) for a in messages if a.one_sided]
    assert one_sided == [
        ("result", "agents/0/bid"),  # Sent after the caller timed out.
        ("request", "agents/log/report"),  # The plain peer records nothing.
        ("result", "agents/log/report"),
    ]
    late = next(a for a in messages if a.one_sided and a.kind == "result")
    assert late.send is not None
    assert late.recv is None
    assert (late.target.addr, late.target.agent) == ("tcp://127.0.0.1:5555/", "0")
    events = [a.kind for a in run.arrows if a.kind.startswith("ev:")]
    assert events.count("ev:timeout") == 1
    assert events.count("ev:open") == 7
    assert events.count("ev:close") == 4
    # Every record is drawn exactly once.
    drawn = [r["id"] for a in run.arrows for r in (a.send, a.recv) if r is not None]
    assert sorted(drawn) == sorted(r["id"] for r in records)


def test_build_orders_causally_across_skewed_wall_clocks() -> None:
    """Container C's wall clock is 5 s behind; the order still follows causes."""
    run = build([r for p in contract_net(tasks=3) for r in p.records])
    position = {}
    for index, arrow in enumerate(run.arrows):
        for side in (arrow.send, arrow.recv):
            if side is not None:
                position[side["id"]] = index
    for arrow in run.arrows:
        cause = arrow.first.get("cause")
        if cause in position:
            assert position[cause] < position[arrow.first["id"]], arrow
    walls = [a.first["wall"] for a in run.arrows if not a.kind.startswith("ev:")]
    assert walls != sorted(walls)  # Sorting by wall time would be wrong here.
    orders = [a.order for a in run.arrows]
    assert orders == sorted(orders)


def test_a_received_reply_comes_after_the_sent_one() -> None:
    """Replies carry no Lamport counter; the viewer's order still puts the
    receive after the send even when the caller's counter is behind."""
    send = record("aaaaaaaaaaaa:1", "send", "request", path="x", lamport=1)
    recv = record("bbbbbbbbbbbb:1", "recv", "request", path="x", lamport=50)
    recv["cause"] = send["id"]
    reply = record("bbbbbbbbbbbb:2", "send", "result", path="x", lamport=51)
    reply["cause"] = recv["id"]
    back = record("aaaaaaaaaaaa:2", "recv", "result", path="x", lamport=2)
    back["cause"] = send["id"]
    later = record("aaaaaaaaaaaa:3", "open", None, lamport=3)
    run = build([back, later, reply, send, recv])
    assert [a.kind for a in run.arrows] == ["request", "result", "ev:open"]
    assert run.logical[back["id"]] > run.logical[reply["id"]]
    assert run.logical[later["id"]] > run.logical[back["id"]]


@pytest.mark.parametrize("open_names", ["sockets", "base URLs"])
def test_both_ends_of_a_connection_pair_without_trace_context(open_names: str) -> None:
    """Before the extension is agreed no context travels; the "open" records
    name the same sockets crosswise (or each its container's base URL and the
    server's address), and message ids match."""
    a_url, b_url = "tcp://127.0.0.1:5555/", "tcp://127.0.0.1:6000/"
    a_sock, b_sock = "127.0.0.1:40001", "127.0.0.1:6000"
    urls = open_names == "base URLs"

    def at(rid: str, ev: str, kind: str | None, local: str, peer: str, **f: Any) -> Any:
        conn = rid.split(":")[0] + "/c1"
        agent = None if kind is None else "1"
        return record(
            rid,
            ev,
            kind,
            conn=conn,
            local={"addr": local, "agent": None if ev == "send" else agent},
            peer={"addr": peer, "agent": agent if ev == "send" else None},
            **f,
        )

    records = [
        at("aaaaaaaaaaaa:1", "open", None, a_url if urls else a_sock, b_sock),
        at(
            "aaaaaaaaaaaa:2", "send", "request", a_url, b_sock, msg=0, path="agents/1/x"
        ),
        at("bbbbbbbbbbbb:1", "open", None, b_url if urls else b_sock, a_sock),
        at(
            "bbbbbbbbbbbb:2", "recv", "request", b_url, a_sock, msg=0, path="agents/1/x"
        ),
    ]
    records.append(
        at(
            "bbbbbbbbbbbb:3",
            "send",
            "result",
            b_url,
            a_sock,
            msg=0,
            cause="bbbbbbbbbbbb:2",
        )
    )
    records.append(
        at(
            "aaaaaaaaaaaa:3",
            "recv",
            "result",
            a_url,
            b_sock,
            msg=0,
            cause="aaaaaaaaaaaa:2",
        )
    )
    run = build(records)
    shown = [
        (a.kind, a.source.addr, a.target.addr, a.one_sided)
        for a in run.arrows
        if not a.kind.startswith("ev:")
    ]
    assert shown == [
        ("request", a_url, b_url, False),
        ("result", b_url, a_url, False),
    ]
    # One call, counted once though each end names its own request.
    (entry,) = trace_view.stats(records)
    assert (entry.calls, entry.results, len(entry.latencies)) == (1, 1, 1)
    # Events go to their container's lane, not a lane per socket address.
    assert {lane.addr for lane in run.lanes} == {a_url, b_url}
    # The page's cause chain goes from the served request to its sender.
    page = trace_view.to_html(run)
    data = json.loads(page.split('type="application/json">')[1].split("</script>")[0])
    ids = [r[0] for r in data["records"]]
    cause = data["records"][ids.index("bbbbbbbbbbbb:2")][data["fields"].index("cause")]
    assert ids[cause] == "aaaaaaaaaaaa:2"


def test_simulated_time_order_keeps_causes_first() -> None:
    """Each container follows its own clock: the callee's may be a little
    behind the caller's; its receive still sorts after the send."""
    send = record("bbbbbbbbbbbb:1", "send", "request", path="x", clock=0.95)
    recv = record("aaaaaaaaaaaa:1", "recv", "request", path="x", clock=0.90)
    recv["cause"] = send["id"]
    answer = record("aaaaaaaaaaaa:2", "send", "result", path="x", clock=0.90)
    answer["cause"] = recv["id"]
    other = record("cccccccccccc:1", "send", "request", path="y", clock=0.92)
    run = build([answer, recv, send, other])
    in_clock_order = sorted(run.arrows, key=lambda a: (a.clock_order, a.order))
    assert [(a.kind, a.first["path"]) for a in in_clock_order] == [
        ("request", "y"),
        ("request", "x"),
        ("result", "x"),
    ]
    assert run.clocks[answer["id"]] == 0.95
    assert answer["clock"] == 0.90  # The page still shows the recorded time.


DEMO = Path(__file__).with_name("trace_demo")


def test_a_recorded_demo_run() -> None:
    """Files that recording wrote (``python -m aiomas demo --external-clock
    --trace``, three processes, trace-record branch at 50f7f8a): the messages
    have both ends, every cause is in the files, and the order keeps causes
    first in both time modes."""
    records = load(sorted(DEMO.glob("*.jsonl")))
    run = build(records)
    messages = [a for a in run.arrows if not a.kind.startswith("ev:")]
    assert len(messages) == 336
    # The one message with one end: a bid sent after its caller gave up.
    late = [a for a in messages if a.one_sided]
    assert [(a.kind, a.recv) for a in late] == [("result", None)]
    assert all(r["cause"] in run.by_id for r in records if r["cause"] is not None)
    assert len({lane.addr for lane in run.lanes}) == 3
    for key in (
        lambda a: a.order,
        lambda a: (a.clock_order, a.order),
    ):
        seen: set[str] = set()
        for arrow in sorted(run.arrows, key=key):
            cause = arrow.first.get("cause")
            assert cause is None or cause in seen or cause == arrow.first["id"]
            seen.update(r["id"] for r in (arrow.send, arrow.recv) if r is not None)
    table = trace_view.stats(records)
    assert sum(s.calls for s in table) == 168
    assert sum(s.cancelled for s in table) == 10
    assert sum(s.results for s in table) == 158


# -- mermaid ----------------------------------------------------------------

MERMAID = """\
sequenceDiagram
    box rgb(245,245,245) tcp://127.0.0.1:5555/
        participant p0 as 0
    end
    box rgb(245,245,245) tcp://127.0.0.1:5556/
        participant p1 as 0
        participant p2 as 1
    end
    box rgb(245,245,245) tcp://127.0.0.1:5557/
        participant p3 as 0
        participant p4 as 1
    end
    box rgb(245,245,245) 127.0.0.1:5560
        participant p5 as log
    end
    Note over p3: open c3c3c3c3c3c3/c1
    Note over p0: open a1a1a1a1a1a1/c1
    Note over p1: open b2b2b2b2b2b2/c1
    Note over p3: open c3c3c3c3c3c3/c2
    Note over p0: open a1a1a1a1a1a1/c2
    Note over p1: open b2b2b2b2b2b2/c2
    Note over p0: open a1a1a1a1a1a1/c3
    p0->>p1: agents/0/bid
    p0->>p2: agents/1/bid
    p0->>p3: agents/0/bid
    p1->>p4: agents/1/quote
    p4-->>p1: result agents/1/quote
    p3-->>p0: result agents/0/bid (one side recorded)
    p1-->>p0: result agents/0/bid
    p2--xp0: error:ValueError agents/1/bid
    Note over p0: timeout agents/0/bid
    p0->>p4: agents/1/bid
    p0-)p4: cancelled agents/1/bid
    p0->>p5: agents/log/report (one side recorded)
    p5-->>p0: result agents/log/report (one side recorded)
    p0->>p1: agents/0/award
    p1-->>p0: result agents/0/award
    Note over p1: close b2b2b2b2b2b2/c2
    Note over p0: close a1a1a1a1a1a1/c1
    Note over p0: close a1a1a1a1a1a1/c2
    Note over p0: close a1a1a1a1a1a1/c3
"""


def test_mermaid_text(run_files: list[Path]) -> None:
    assert trace_view.to_mermaid(build(load(run_files))) == MERMAID


def test_mermaid_limit_and_escaping() -> None:
    send = record("aaaaaaaaaaaa:1", "send", "request", path="a;b#c\nNote over p0: x")
    send["peer"] = {"addr": "127.0.0.1:6000", "agent": "%%{init}%%"}
    text = trace_view.to_mermaid(
        build([send, record("aaaaaaaaaaaa:2", "open", None)]), 1
    )
    assert text.splitlines()[-2:] == [
        "    p0->>p1: a#59;b#35;c#10;Note over p0: x (one side recorded)",
        "    Note over p0: 1 more rows left out",
    ]
    assert "participant p1 as #37;#37;#123;init#125;#37;#37;" in text


# -- stats ------------------------------------------------------------------


def known_calls() -> list[dict[str, Any]]:
    """Ten answered calls of 1 to 10 ms, a failure, a timeout and a call that
    only the callee recorded (its caller was not traced)."""
    records = []
    n = 0

    def add(ev: str, kind: str | None, **fields: Any) -> dict[str, Any]:
        nonlocal n
        n += 1
        item = record(f"aaaaaaaaaaaa:{n}", ev, kind, **fields)
        records.append(item)
        return item

    for i in range(1, 11):
        send = add("send", "request", path="agents/1/bid", wall=100.0 + i)
        add(
            "recv",
            "result",
            path="agents/1/bid",
            cause=send["id"],
            wall=send["wall"] + i / 1000,
            outcome="result",
        )
    # (request path, wall, end event, end type, end wall, outcome)
    ends = [
        ("agents/1/bid", 200.0, "recv", "failure", 200.25, "error:KeyError"),
        ("agents/2/award", 300.0, "timeout", None, 301.0, "timeout"),
    ]
    for path, wall, ev, kind, end, outcome in ends:
        send = add("send", "request", path=path, wall=wall)
        add(ev, kind, path=path, cause=send["id"], wall=end, outcome=outcome)
    served = add("recv", "request", path="status", wall=400.0)
    add(
        "send",
        "result",
        path="status",
        cause=served["id"],
        wall=400.5,
        outcome="result",
    )
    return records


STATS = """\
path            calls  ok  errors  timeouts  cancelled  p50 ms  p90 ms   p99 ms
agents/1/bid       11  10       1         0          0   6.000  10.000  250.000
agents/2/award      1   0       0         1          0       -       -        -
status              1   1       0         0          0       -       -        -
13 calls on 3 paths
"""


def test_stats_known_numbers() -> None:
    table = trace_view.stats(known_calls())
    bid = table[0]
    assert (bid.path, bid.calls, bid.results, bid.errors) == ("agents/1/bid", 11, 10, 1)
    assert bid.percentile(50) == pytest.approx(0.006)
    assert bid.percentile(90) == pytest.approx(0.010)
    assert bid.percentile(99) == pytest.approx(0.25)
    assert trace_view.format_stats(table) == STATS


def test_stats_of_the_demo_run(run_files: list[Path]) -> None:
    table = {s.path: s for s in trace_view.stats(load(run_files))}
    counts = {
        p: (s.calls, s.results, s.errors, s.timeouts, s.cancelled)
        for p, s in table.items()
    }
    assert counts == {
        "agents/0/award": (1, 1, 0, 0, 0),
        "agents/0/bid": (2, 1, 0, 1, 0),
        "agents/1/bid": (2, 0, 1, 0, 1),
        "agents/1/quote": (1, 1, 0, 0, 0),
        "agents/log/report": (1, 1, 0, 0, 0),
    }
    # The nested quote's latency is measured in B's process alone.
    assert table["agents/1/quote"].latencies == [pytest.approx(0.003, abs=1e-5)]


# -- command line -----------------------------------------------------------


def test_command_line(
    run_files: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from aiomas.__main__ import main

    files = [str(p) for p in run_files]
    out = tmp_path / "out.html"
    assert main(["trace", "view", *files, "-o", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert capsys.readouterr().out.startswith(f"{out}: 26 rows, 6 lanes")
    assert main(["trace", "mermaid", *files]) == 0
    assert capsys.readouterr().out == MERMAID
    assert main(["trace", "stats", *files]) == 0
    assert capsys.readouterr().out.endswith("7 calls on 5 paths\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(header(version=9) + "\n")
    assert main(["trace", "stats", str(bad)]) == 1
    assert "version 9" in capsys.readouterr().err


# -- the page -----------------------------------------------------------------


def test_page_is_self_contained_and_escapes_record_text(run_files: list[Path]) -> None:
    records = load(run_files)
    records[0]["local"]["agent"] = EVIL
    records[0]["args"] = EVIL * 30
    page = trace_view.to_html(build(records), title=EVIL)
    assert EVIL not in page
    assert "<img" not in page
    assert page.count("</script>") == 2  # The data's and the code's, nothing else.
    plain = trace_view.to_html(build(load(run_files)))
    for external in (
        "http://",
        "https://",
        "src=",
        "href=",
        "@import",
        "url(h",
        "url(//",
    ):
        assert external not in plain.replace("http://www.w3.org/2000/svg", "")
    data = page.split('<script id="trace-data" type="application/json">')[1]
    data = json.loads(data.split("</script>")[0])
    assert EVIL in data["strings"]
    assert all(
        len(r[data["fields"].index("args")] or "") <= 200 for r in data["records"]
    )


def test_a_large_run_is_written_fast_and_capped(tmp_path: Path) -> None:
    processes = contract_net(tasks=1000)  # About 10,000 messages.
    records = [r for p in processes for r in p.records]
    began = time.perf_counter()
    run = build(records)
    page = trace_view.to_html(run)
    took = time.perf_counter() - began
    messages = sum(not a.kind.startswith("ev:") for a in run.arrows)
    assert messages >= 10_000
    print(
        f"{messages} messages: build and page in {took:.2f} s, {len(page) / 1e6:.1f} MB"
    )
    # A loose bound for a loaded machine (about 1 s here): fails only if it
    # became quadratic.
    assert took < 30 * max(1.0, TIME_UNIT / 0.001)
    assert len(page) < 1000 * len(records)
    capped = trace_view.to_html(run, max_rows=500)
    assert '"left_out":' + str(len(run.arrows) - 500) in capped


# -- the page in a browser ----------------------------------------------------


def browser_or_skip() -> None:
    """Skip (or fail under CI) when chromium or playwright is missing."""
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("playwright (pip install -e '.[dev]')")
    if missing:
        reason = "the browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(reason + "; under CI it must run")
        pytest.skip(reason)


class Page:
    """A page of the viewer that records JavaScript errors and requests."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        self.dismissed: list[asyncio.Future[None]] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on(
            "console",
            lambda msg: self.errors.append(msg.text) if msg.type == "error" else None,
        )
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("dialog", self._dialog)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        self.dismissed.append(asyncio.ensure_future(dialog.dismiss()))

    async def rows(self) -> list[str]:
        return list(
            await self.page.eval_on_selector_all(
                "#rows g[data-row]",
                "nodes => nodes.map(n => n.getAttribute('data-kind'))",
            )
        )

    async def count(self, selector: str) -> int:
        return int(await self.page.locator(selector).count())

    async def text(self, selector: str) -> str:
        return str(await self.page.locator(selector).text_content() or "")

    async def texts(self, selector: str) -> list[str]:
        return list(await self.page.locator(selector).all_text_contents())


@contextlib.asynccontextmanager
async def viewer(path: Path) -> AsyncIterator[Page]:
    """The page at ``path`` in headless chromium, loaded and drawn."""
    browser_or_skip()
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = Page(
                await browser.new_page(viewport={"width": 1400, "height": 1000})
            )
            await page.page.goto(path.as_uri())
            await page.page.wait_for_selector("body[data-ready='1']", timeout=60_000)
            yield page
            assert page.errors == [], "the page raised JavaScript errors"
        finally:
            await browser.close()


async def screenshot(page: Page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    await page.page.screenshot(path=str(path))
    print(f"screenshot: {path}")
    artifacts = os.environ.get("AIOMAS_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / name)
    return path


@pytest.mark.heavy  # A browser's pipe traffic in asyncio debug mode adds nothing.
@pytest.mark.timeout(180)
async def test_viewer_in_chromium(run_files: list[Path], tmp_path: Path) -> None:
    records = load(run_files)
    for r in records:  # An agent id that tries to end the script and run code.
        for side in ("local", "peer"):
            if r[side]["agent"] == "log":
                r[side]["agent"] = EVIL
    html = tmp_path / "trace.html"
    html.write_text(trace_view.to_html(build(records), title="demo " + EVIL))
    async with viewer(html) as page:
        ui = page.page
        # Lanes grouped by container, one arrow (or event) per row.
        assert await page.texts("#head .lane") == ["0", "0", "1", "0", "1", EVIL]
        assert await page.texts("#head .box") == [
            "tcp://127.0.0.1:5555/",
            "tcp://127.0.0.1:5556/",
            "tcp://127.0.0.1:5557/",
            "127.0.0.1:5560",
        ]
        kinds = await page.rows()
        assert len(kinds) == 26
        assert kinds.count("request") == 7
        assert kinds.count("failure") == 1
        assert kinds.count("ev:timeout") == 1
        assert kinds.count("cancel") == 1
        assert await page.count("#rows .k-failure line[marker-end]") == 1
        assert await page.count("#rows .open-end") == 3  # Ends nobody recorded.
        assert await page.count("img") == 0
        assert (await ui.title()).startswith("demo </script>")

        # A click on the nested call shows its detail and its cause chain.
        await ui.locator(
            "#rows g[data-kind=request]", has_text="agents/1/quote"
        ).click()
        assert await page.text("#detail-title") == "request: agents/1/quote"
        detail = await page.text("#detail")
        assert "tcp://127.0.0.1:5556/" in detail
        assert "()" in detail  # The (truncated) arguments.
        assert await page.texts("#cause-chain li") == [
            "recv request agents/0/bid @ 0 @ tcp://127.0.0.1:5556/",
            "send request agents/0/bid @ 0 @ tcp://127.0.0.1:5555/",
        ]
        # ... and a click in the chain goes to the cause.
        await ui.locator("#cause-chain li button").last.click()
        assert await page.text("#detail-title") == "request: agents/0/bid"
        await ui.locator("#rows g[data-kind=failure]").click()
        assert "error:ValueError" in await page.text("#detail")
        await screenshot(page, tmp_path, "trace-viewer.png")

        # Filter by agent: only the messages of the oracle c/1.
        await ui.click("#lanes-none")
        assert await page.rows() == []
        await ui.locator("#lane-list input[data-lane='4']").check()
        assert await page.rows() == ["request", "result", "request", "cancel"]
        assert await page.texts("#head .lane") == ["0", "0", "1"]
        await ui.click("#lanes-all")
        assert len(await page.rows()) == 26
        await ui.locator("#show-conn").uncheck()
        assert len(await page.rows()) == 15

        # Simulated time: rows without a clock (the plain peer's) drop out,
        # and the window is in clock units.
        await ui.check("#mode-clock")
        assert len(await page.rows()) == 13
        assert "2 rows without a container clock" in await page.text("#notices")
        await ui.fill("#t-from", "0.1")
        await ui.fill("#t-to", "0.15")
        await ui.locator("#t-to").dispatch_event("change")
        in_window = await page.rows()
        assert 0 < len(in_window) < 13
        times = await page.texts("#rows text.time")
        assert all(0.1 <= float(t.removeprefix("t=")) <= 0.15 for t in times)
        await ui.click("#t-reset")
        assert len(await page.rows()) == 13
        await ui.check("#mode-wall")
        assert len(await page.rows()) == 15

        assert page.dialogs == []
        assert all(url.startswith("file://") for url in page.requests), page.requests


@pytest.mark.heavy
@pytest.mark.timeout(180)
async def test_a_large_run_stays_usable_in_chromium(tmp_path: Path) -> None:
    run = build([r for p in contract_net(tasks=1000) for r in p.records])
    html = tmp_path / "large.html"
    html.write_text(trace_view.to_html(run))
    began = time.perf_counter()
    async with viewer(html) as page:
        print(f"{len(run.arrows)} rows ready in {time.perf_counter() - began:.2f} s")
        # Only the rows in view are in the DOM.
        assert 0 < len(await page.rows()) < 200
        await page.page.locator("#scroller").evaluate(
            "node => { node.scrollTop = node.scrollHeight; }"
        )
        last = len(run.arrows) - 1
        await page.page.wait_for_selector(f"#rows g[data-row='{last}']", timeout=10_000)
