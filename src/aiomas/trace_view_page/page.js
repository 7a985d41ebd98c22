// The aiomas trace viewer.  Record text is untrusted: it only ever reaches the
// page through textContent and setAttribute, never as markup.
(function () {
  "use strict";
  const SVG = "http://www.w3.org/2000/svg";
  const ROW = 24, GUTTER = 96, HEAD = 48, SPARE = 20;
  let LANE = 150;
  const D = JSON.parse(document.getElementById("trace-data").textContent);
  const F = {};
  D.fields.forEach(function (name, i) { F[name] = i; });
  const INTERNED = ["ev", "type", "conn", "trace", "path", "outcome"];

  function str(i) { return (i === null || i === undefined) ? null : D.strings[i]; }
  function field(rec, name) {
    const value = rec[F[name]];
    if (INTERNED.indexOf(name) >= 0) return str(value);
    if (name === "local" || name === "peer") return { addr: str(value[0]), agent: str(value[1]) };
    return value;
  }
  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    if (attrs) Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function sel(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    if (attrs) Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  // Rows: [kind, source, target, send, recv, order].
  const rows = D.rows.map(function (r, i) {
    const first = D.records[r[3] !== null ? r[3] : r[4]];
    let clock = null;
    [r[3], r[4]].forEach(function (k) {
      if (clock === null && k !== null) clock = D.records[k][F.clock];
    });
    let outcome = null;
    [r[4], r[3]].forEach(function (k) {
      if (outcome === null && k !== null) outcome = field(D.records[k], "outcome");
    });
    return { index: i, kind: r[0], source: r[1], target: r[2], send: r[3], recv: r[4],
      order: r[5], clockOrder: r[6], first: first, wall: first[F.wall], clock: clock, outcome: outcome };
  });
  const rowOfRecord = new Map();
  rows.forEach(function (row) {
    if (row.send !== null) rowOfRecord.set(row.send, row.index);
    if (row.recv !== null) rowOfRecord.set(row.recv, row.index);
  });
  const hasClock = rows.some(function (row) { return row.clock !== null; });
  // Simulated time: by the clock made monotonic along causes (containers'
  // clocks differ a little), then by the causal order.
  const byClock = rows.slice().sort(function (a, b) {
    return (a.clockOrder - b.clockOrder) || (a.index - b.index);
  });

  const state = { mode: "wall", from: null, to: null, conn: true, selected: null,
    lanes: D.lanes.map(function () { return true; }), view: [], shownLanes: [], hiddenNoClock: 0 };

  const scroller = document.getElementById("scroller");
  const body = document.getElementById("body");
  const svg = document.getElementById("rows");
  const head = document.getElementById("head");
  const detail = document.getElementById("detail");

  function time(row) {
    if (state.mode === "clock") return row.clock;
    return row.wall === null || row.wall === undefined ? null : row.wall - D.start;
  }

  function applyFilters() {
    const view = [];
    let noClock = 0;
    const lanesUsed = new Set();
    const source = state.mode === "clock" ? byClock : rows;
    for (const row of source) {
      if (!state.conn && (row.kind === "ev:open" || row.kind === "ev:close")) continue;
      if (!state.lanes[row.source] && !state.lanes[row.target]) continue;
      if (state.mode === "clock" && row.clock === null) { noClock++; continue; }
      const t = time(row);
      if (state.from !== null && (t === null || t < state.from)) continue;
      if (state.to !== null && (t === null || t > state.to)) continue;
      view.push(row);
      lanesUsed.add(row.source);
      lanesUsed.add(row.target);
    }
    state.view = view;
    state.hiddenNoClock = noClock;
    state.shownLanes = D.lanes.map(function (_, i) { return i; })
      .filter(function (i) { return state.lanes[i] || lanesUsed.has(i); });
    // Lanes share the width in view, between a readable minimum and a maximum.
    const room = (scroller.clientWidth - GUTTER - 20) / Math.max(1, state.shownLanes.length);
    LANE = Math.max(90, Math.min(150, Math.floor(room)));
    state.x = new Map();
    state.shownLanes.forEach(function (lane, k) { state.x.set(lane, GUTTER + k * LANE + LANE / 2); });
    drawHead();
    drawNotices();
    const width = GUTTER + state.shownLanes.length * LANE + 20;
    body.style.height = (view.length * ROW + 10) + "px";
    body.style.width = width + "px";
    head.style.width = width + "px";
    svg.setAttribute("width", width);
    draw();
  }

  function drawHead() {
    head.replaceChildren();
    let k = 0;
    while (k < state.shownLanes.length) {
      const container = D.lanes[state.shownLanes[k]][1];
      let n = k;
      while (n < state.shownLanes.length && D.lanes[state.shownLanes[n]][1] === container) n++;
      const box = el("div", { class: "box", title: D.containers[container] }, D.containers[container]);
      box.style.left = (GUTTER + k * LANE + 2) + "px";
      box.style.width = ((n - k) * LANE - 4) + "px";
      head.appendChild(box);
      for (let j = k; j < n; j++) {
        const lane = D.lanes[state.shownLanes[j]];
        const node = el("div", { class: "lane", "data-lane": String(state.shownLanes[j]),
          title: lane[0] + " @ " + D.containers[lane[1]] }, lane[0]);
        node.style.left = (GUTTER + j * LANE + 6) + "px";
        node.style.width = (LANE - 12) + "px";
        head.appendChild(node);
      }
      k = n;
    }
  }

  function drawNotices() {
    const box = document.getElementById("notices");
    box.replaceChildren();
    if (D.left_out > 0) box.appendChild(el("p", { class: "capped" },
      D.left_out + " rows left out: the page draws the first " + rows.length + " rows only."));
    if (state.mode === "clock" && state.hiddenNoClock > 0) box.appendChild(el("p", { class: "noclock-notice" },
      state.hiddenNoClock + " rows without a container clock are shown in wall time only."));
    document.getElementById("summary").textContent = state.view.length + " of " + rows.length +
      " rows shown, " + state.shownLanes.length + " of " + D.lanes.length + " lanes, " +
      D.containers.length + " containers, " + D.records.length + " records";
  }

  // Only the rows in view are in the DOM, so a run of many thousand messages
  // scrolls as fast as a small one.
  let pending = false;
  function draw() {
    pending = false;
    const top = Math.max(0, scroller.scrollTop - HEAD);
    const start = Math.max(0, Math.floor(top / ROW) - SPARE);
    const end = Math.min(state.view.length, Math.ceil((top + scroller.clientHeight) / ROW) + SPARE);
    svg.replaceChildren(defs());
    svg.style.top = (start * ROW) + "px";
    const height = Math.max(0, end - start) * ROW;
    svg.setAttribute("height", height);
    state.shownLanes.forEach(function (lane) {
      const x = state.x.get(lane);
      svg.appendChild(sel("line", { class: "laneline", x1: x, x2: x, y1: 0, y2: height }));
    });
    for (let i = start; i < end; i++) svg.appendChild(drawRow(state.view[i], (i - start) * ROW));
  }
  function schedule() { if (!pending) { pending = true; requestAnimationFrame(draw); } }

  function defs() {
    const node = sel("defs");
    ["request", "result", "failure", "cancel"].forEach(function (kind) {
      const marker = sel("marker", { id: "head-" + kind, viewBox: "0 0 10 10", refX: "9", refY: "5",
        markerWidth: "9", markerHeight: "9", markerUnits: "userSpaceOnUse", orient: "auto-start-reverse" });
      marker.appendChild(sel("path", { d: "M0,0 L10,5 L0,10 z", style: "fill: var(--" + kind + ")" }));
      node.appendChild(marker);
    });
    return node;
  }

  function label(row) {
    const path = field(row.first, "path") || "";
    if (row.kind === "request") return path || "request";
    if (row.kind.indexOf("ev:") === 0) return row.kind.slice(3) + " " + (path || field(row.first, "conn") || "");
    return ((row.outcome || row.kind) + " " + path).trim();
  }

  function drawRow(row, y) {
    const noClock = row.clock === null;
    const t = time(row);
    const g = sel("g", { "data-row": String(row.index), "data-kind": row.kind });
    const xs = state.x.get(row.source), xt = state.x.get(row.target);
    const mid = y + ROW / 2 + 3;
    let cls = row.kind.indexOf("ev:") === 0 ? "ev ev-" + row.kind.slice(3) : "msg k-" + row.kind;
    if (row.outcome === "timeout") cls += " o-timeout";
    if (row.outcome === "cancelled") cls += " o-cancelled";
    if (noClock) cls += " noclock";
    if (state.selected === row.index) cls += " selected";
    if (row.send === null || row.recv === null) cls += " one-sided";
    g.setAttribute("class", cls);
    const left = Math.min(xs, xt), right = Math.max(xs, xt);
    g.appendChild(sel("rect", { class: "hit", x: left - 30, y: y, width: right - left + 60, height: ROW }));
    g.appendChild(sel("text", { class: "time", x: 4, y: mid }, t === null ? "" :
      (state.mode === "clock" ? "t=" + fmt(t) : "+" + fmt(t) + " s")));
    if (row.kind.indexOf("ev:") === 0) {
      if (row.kind === "ev:timeout") {
        g.appendChild(sel("path", { class: "mark", d: "M" + (xs - 5) + "," + (mid - 9) + " l10,10 m0,-10 l-10,10" }));
      } else if (row.kind === "ev:cancel") {
        g.appendChild(sel("rect", { class: "mark", x: xs - 5, y: mid - 9, width: 10, height: 10 }));
      } else {
        g.appendChild(sel("circle", { class: "mark", cx: xs, cy: mid - 4, r: 4 }));
      }
      g.appendChild(sel("text", { x: xs + 9, y: mid }, label(row)));
      return g;
    }
    const kind = ["request", "result", "failure", "cancel"].indexOf(row.kind) >= 0 ? row.kind : "request";
    const ly = y + ROW - 5;
    if (xs === xt) {
      g.appendChild(sel("path", { d: "M" + xs + "," + (ly - 8) + " h30 v8 h-28", "marker-end": "url(#head-" + kind + ")" }));
      g.appendChild(sel("text", { class: "label", x: xs + 34, y: ly - 8, "text-anchor": "start", style: "text-anchor: start" }, label(row)));
    } else {
      const dir = xt > xs ? 1 : -1;
      g.appendChild(sel("line", { x1: xs, y1: ly, x2: xt - dir * 2, y2: ly, "marker-end": "url(#head-" + kind + ")" }));
      g.appendChild(sel("text", { class: "label", x: (xs + xt) / 2, y: ly - 4 }, label(row)));
    }
    // A hollow dot marks the end nobody recorded (a peer without tracing).
    if (row.send === null) g.appendChild(sel("circle", { class: "open-end", cx: xs, cy: ly, r: 3.5 }));
    if (row.recv === null) g.appendChild(sel("circle", { class: "open-end", cx: xt, cy: ly, r: 3.5 }));
    return g;
  }

  function fmt(t) { return Math.abs(t) >= 1000 ? t.toFixed(1) : t.toFixed(4).replace(/\.?0+$/, "") || "0"; }

  function laneName(i) { return D.lanes[i][0] + " @ " + D.containers[D.lanes[i][1]]; }

  function describe(k) {
    const rec = D.records[k];
    return [field(rec, "ev"), field(rec, "type"), field(rec, "path"), "@", endpoint(field(rec, "local"))]
      .filter(function (x) { return x !== null && x !== ""; }).join(" ");
  }
  function endpoint(e) { return (e.agent !== null ? e.agent + " @ " : "") + (e.addr || "?"); }

  function table(pairs) {
    const t = el("table");
    pairs.forEach(function (p) {
      if (p[1] === null || p[1] === undefined || p[1] === "") return;
      const tr = el("tr");
      tr.appendChild(el("th", null, p[0]));
      tr.appendChild(el("td", null, p[1]));
      t.appendChild(tr);
    });
    return t;
  }

  function recordTable(k) {
    const rec = D.records[k];
    const wall = rec[F.wall];
    return table([
      ["id", rec[F.id]], ["local", endpoint(field(rec, "local"))], ["peer", endpoint(field(rec, "peer"))],
      ["conn / msg", (field(rec, "conn") || "") + " / " + (rec[F.msg] === null ? "-" : rec[F.msg])],
      ["size", rec[F.size] === null ? null : rec[F.size] + " bytes"],
      ["wall", typeof wall === "number" ? new Date(wall * 1000).toISOString() + " (+" + fmt(wall - D.start) + " s)" : null],
      ["clock", rec[F.clock]], ["lamport", rec[F.lamport]], ["trace", field(rec, "trace")],
      ["outcome", field(rec, "outcome")], ["args", rec[F.args]],
    ]);
  }

  function jump(k) {
    const button = el("button", { type: "button", "data-record": String(k) }, describe(k));
    button.addEventListener("click", function () {
      const index = rowOfRecord.get(k);
      if (index !== undefined) select(index, true);
    });
    return button;
  }

  function select(index, scroll) {
    state.selected = index;
    const row = rows[index];
    detail.replaceChildren();
    detail.appendChild(el("h2", { id: "detail-title" }, row.kind.replace("ev:", "") + ": " + label(row)));
    detail.appendChild(table([
      ["path", field(row.first, "path")], ["outcome", row.outcome],
      ["from", laneName(row.source)], ["to", laneName(row.target)],
      ["recorded", row.send !== null && row.recv !== null ? "both sides" :
        (row.kind.indexOf("ev:") === 0 ? "event" : "one side only (peer not traced)")],
    ]));
    [["Sent", row.send], ["Received", row.recv]].forEach(function (side) {
      if (side[1] === null || (row.kind.indexOf("ev:") === 0 && side[0] === "Received")) return;
      detail.appendChild(el("h3", null, row.kind.indexOf("ev:") === 0 ? "Event" : side[0]));
      detail.appendChild(recordTable(side[1]));
    });
    detail.appendChild(el("h3", null, "Cause chain"));
    const chain = el("ol", { id: "cause-chain" });
    let cause = row.first[F.cause];
    const seen = new Set();
    while (cause !== null && cause !== undefined && !seen.has(cause) && seen.size < 200) {
      seen.add(cause);
      const li = el("li");
      if (typeof cause === "number") {
        li.appendChild(jump(cause));
        cause = D.records[cause][F.cause];
      } else {
        li.appendChild(el("span", { class: "missing" }, cause + " (not in the loaded files)"));
        cause = null;
      }
      chain.appendChild(li);
    }
    if (!chain.childNodes.length) chain.appendChild(el("li", { class: "missing" }, "none: a top-level call"));
    detail.appendChild(chain);
    if (scroll) {
      const position = state.view.indexOf(row);
      if (position >= 0) scroller.scrollTop = Math.max(0, position * ROW - scroller.clientHeight / 2);
    }
    draw();
  }

  svg.addEventListener("click", function (event) {
    const g = event.target.closest("g[data-row]");
    if (g) select(Number(g.getAttribute("data-row")), false);
  });
  scroller.addEventListener("scroll", schedule);
  window.addEventListener("resize", function () { applyFilters(); });

  function buildLaneList() {
    const list = document.getElementById("lane-list");
    let last = null;
    D.lanes.forEach(function (lane, i) {
      if (lane[1] !== last) {
        last = lane[1];
        list.appendChild(el("div", { class: "container" }, D.containers[lane[1]]));
      }
      const box = el("input", { type: "checkbox", "data-lane": String(i) });
      box.checked = true;
      box.addEventListener("change", function () { state.lanes[i] = box.checked; applyFilters(); });
      const item = el("label");
      item.appendChild(box);
      item.appendChild(document.createTextNode(" " + lane[0]));
      list.appendChild(item);
    });
  }
  function setAll(value) {
    state.lanes = state.lanes.map(function () { return value; });
    document.querySelectorAll("#lane-list input").forEach(function (box) { box.checked = value; });
    applyFilters();
  }
  document.getElementById("lanes-all").addEventListener("click", function () { setAll(true); });
  document.getElementById("lanes-none").addEventListener("click", function () { setAll(false); });

  function readWindow() {
    const from = document.getElementById("t-from").value, to = document.getElementById("t-to").value;
    state.from = from === "" ? null : Number(from);
    state.to = to === "" ? null : Number(to);
    applyFilters();
  }
  ["t-from", "t-to"].forEach(function (id) {
    document.getElementById(id).addEventListener("change", readWindow);
  });
  document.getElementById("t-reset").addEventListener("click", function () {
    document.getElementById("t-from").value = "";
    document.getElementById("t-to").value = "";
    readWindow();
  });
  document.getElementById("show-conn").addEventListener("change", function (event) {
    state.conn = event.target.checked;
    applyFilters();
  });
  function setUnit() {
    document.getElementById("t-unit").textContent = state.mode === "clock" ? "clock time" : "s since start";
  }
  document.querySelectorAll("input[name=mode]").forEach(function (radio) {
    radio.addEventListener("change", function () {
      state.mode = radio.value;
      setUnit();
      applyFilters();
    });
  });
  if (!hasClock) {
    const radio = document.getElementById("mode-clock");
    radio.disabled = true;
    radio.parentNode.title = "no record has a container clock time";
  }

  buildLaneList();
  setUnit();
  applyFilters();
  document.body.setAttribute("data-ready", "1");
})();
