// emo-mqtt dashboard: renders /api/state snapshots pushed over /events (SSE), polling as a
// fallback. Vanilla JS and inline SVG: nothing is loaded from outside the dashboard server.
"use strict";

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777",
  "#65a30d", "#475569", "#b45309", "#0f766e", "#9333ea"];
// How long each snapshot took to render, and when (benchmarks read it: emo bench dashboard).
window.emoPerf = { renders: [] };

// Three shades per algorithm: a run's colour says its algorithm, and its name (hashed)
// picks the shade, so a run keeps its colour whatever other runs appear.
const ALGORITHM_SHADES = {
  fl: ["#2563eb", "#1e40af", "#60a5fa"],
  sfl: ["#d97706", "#92400e", "#f59e0b"],
  sfl_v1: ["#0891b2", "#155e75", "#22d3ee"],
  emo: ["#dc2626", "#991b1b", "#f87171"],
  emo_all: ["#7c3aed", "#5b21b6", "#a78bfa"],
};

// Each kind of bytes in its own colour, the same in every run.
const KIND_COLORS = { weights: "#2563eb", activations: "#dc2626", gradients: "#d97706",
  control: "#7c3aed", status: "#475569", metrics: "#0891b2", inference: "#db2777",
  bench: "#65a30d" };

function fnv(name) {
  let h = 0x811c9dc5;
  for (let i = 0; i < name.length; i++) {
    h ^= name.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h;
}

function runColor(name, algorithm) {
  const shades = ALGORITHM_SHADES[algorithm];
  return shades ? shades[fnv(name) % shades.length] : COLORS[fnv(name) % COLORS.length];
}
const SVG = "http://www.w3.org/2000/svg";
let snapshot = null;
let chosenRun = new URLSearchParams(location.search).get("run") || "";
let pollTimer = null;

const $ = (id) => document.getElementById(id);

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmtBytes(n) {
  if (n >= 1e9) return (n / 1e9).toFixed(2) + " GB";
  if (n >= 1e6) return (n / 1e6).toFixed(2) + " MB";
  if (n >= 1e3) return (n / 1e3).toFixed(1) + " kB";
  return n + " B";
}

// 1, 2 or 5 times a power of ten: the smallest such step at least ``raw``.
function niceStep(raw) {
  const power = Math.pow(10, Math.floor(Math.log10(raw || 1)));
  for (const m of [1, 2, 5, 10]) if (m * power >= raw) return m * power;
  return 10 * power;
}

// A line chart: series = [{name, color, dash, points: [[x, y], ...]}].
function lineChart(container, series, opts) {
  const W = 640, H = 220, L = 48, R = 10, T = 10, B = 28;
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": opts.label || "chart" });
  const pts = series.flatMap((s) => s.points);
  if (!pts.length) {
    svg.appendChild(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no data yet"));
    container.replaceChildren(svg);
    return;
  }
  let x0 = Math.min(...pts.map((p) => p[0])), x1 = Math.max(...pts.map((p) => p[0]));
  // A log axis: values at or below zero have no place on it and are left out.
  const fy = opts.log ? (y) => Math.log10(y) : (y) => y;
  const ys = pts.filter((p) => !opts.log || p[1] > 0).map((p) => fy(p[1]));
  if (!ys.length) ys.push(0);
  let y0 = opts.yMin !== undefined ? opts.yMin : Math.min(...ys);
  let y1 = opts.yMax !== undefined ? opts.yMax : Math.max(...ys);
  if (opts.log) { y0 = Math.floor(y0); y1 = Math.max(Math.ceil(y1), y0 + 1); }
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) y1 = y0 + 1;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  const ticks = [];
  if (opts.log) for (let e = y0; e <= y1; e += Math.max(1, Math.ceil((y1 - y0) / 6))) ticks.push(e);
  else for (let i = 0; i <= 4; i++) ticks.push(y0 + ((y1 - y0) * i) / 4);
  for (const y of ticks) {
    svg.appendChild(svgEl("line", { x1: L, x2: W - R, y1: sy(y), y2: sy(y), class: "grid" }));
    svg.appendChild(svgEl("text", { x: L - 4, y: sy(y) + 3, "text-anchor": "end" },
      opts.yFmt(opts.log ? Math.pow(10, y) : y)));
  }
  let step = niceStep((x1 - x0) / 6);
  if (opts.integerX) step = Math.max(1, Math.round(step));
  for (let x = Math.ceil(x0 / step) * step; x <= x1 + 1e-9; x += step) {
    svg.appendChild(svgEl("text", { x: sx(x), y: H - B + 14, "text-anchor": "middle" },
      opts.xFmt(x, step)));
  }
  svg.appendChild(svgEl("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
  svg.appendChild(svgEl("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
  svg.appendChild(svgEl("text", { x: W - R, y: H - 2, "text-anchor": "end" }, opts.xLabel));
  // Dashed lines last, so that a line equal to a solid one (the FL model inside EMO and
  // plain FedAvg: bit-identical) still shows.
  for (const s of [...series.filter((x) => !x.dash), ...series.filter((x) => x.dash)]) {
    const shown = opts.log ? s.points.filter((p) => p[1] > 0) : s.points;
    if (!shown.length) continue;
    const d = shown.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(fy(p[1])).toFixed(1)}`)
      .join(" ");
    const path = svgEl("path", { d, fill: "none", stroke: s.color, "stroke-width": s.width || 2 });
    if (s.dash) path.setAttribute("stroke-dasharray", "5 4");
    svg.appendChild(path);
    for (const p of shown.length <= 40 ? shown : []) {
      svg.appendChild(svgEl("circle", { cx: sx(p[0]), cy: sy(fy(p[1])), r: 2.5, fill: s.color }));
    }
  }
  container.replaceChildren(svg);
}

function legend(container, series) {
  container.replaceChildren(...series.map((s) => {
    const span = el("span");
    const swatch = el("i");
    swatch.style.background = s.color;
    span.append(swatch, s.name);
    return span;
  }));
}

function currentRun() {
  const runs = snapshot ? snapshot.runs : {};
  if (chosenRun && runs[chosenRun]) return runs[chosenRun];
  const names = Object.keys(runs); // most recently active first
  return names.length ? runs[names[0]] : null;
}

function renderHeader() {
  $("broker").textContent = snapshot.broker || "?";
  const link = $("link");
  link.textContent = snapshot.connected ? "subscribed" : "disconnected";
  link.className = "badge " + (snapshot.connected ? "ok" : "bad");
  const select = $("run-select");
  const names = Object.keys(snapshot.runs);
  const run = currentRun();
  const want = names.join("\n") + "|" + (run ? run.name : "");
  if (select.dataset.key !== want) {
    select.replaceChildren(...(names.length ? names : [""]).map((n) =>
      el("option", { value: n }, n || "(waiting for a run)")));
    if (run) select.value = run.name;
    select.dataset.key = want;
  }
}

function renderNodes(run) {
  const lc = run ? run.lifecycle : null;
  const badge = $("run-state");
  badge.textContent = lc ? lc.label : "no run yet";
  badge.dataset.state = lc ? lc.state : "none";
  $("node-count").textContent = run ? run.online_count : 0;
  $("node-total").textContent = run ? run.node_count : 0;
  const roles = run ? Object.keys(run.total) : [];
  $("role-counts").textContent = roles.map((r) => `${r}: ${run.online[r]}/${run.total[r]} online`)
    .join(" · ");
  const live = lc && lc.state === "live";
  const items = [];
  if (run && run.big) {
    items.push(el("li", { class: "muted" },
      `${run.node_count} nodes: see the counts by state and site, or find one below`));
  }
  for (const role of run && !run.big ? roles : []) {
    for (const [id, node] of Object.entries(run.nodes[role] || {})) {
      // Nodes leaving a run that ended are done, not failed: grey, not red.
      const shown = node.state === "offline" && !live ? "done" : node.state;
      const li = el("li", { "data-state": shown });
      li.append(el("span", { class: "dot " + shown }), `${role}/${id}`);
      li.title = `${node.state}, round ${node.round ?? "?"}, version ${node.version}`;
      items.push(li);
    }
  }
  $("node-list").replaceChildren(...items);
}

function cells(tr, values) {
  for (const v of values) tr.append(el("td", {}, String(v)));
  return tr;
}

function renderFleet(run) {
  const states = run ? run.states : {};
  $("state-counts").tBodies[0].replaceChildren(...Object.entries(states).map(([role, c]) =>
    cells(el("tr"), [role, c.online, c.offline, c.unknown])));
  const sites = run ? run.sites : [];
  $("sites").tBodies[0].replaceChildren(...sites.map((x) =>
    cells(el("tr"), [x.site, x.devices, x.online, x.offline, x.trained, x.waiting])));
  const st = run ? run.stragglers : null;
  let text = "–";
  if (st && st.open) {
    text = st.count ? `round ${st.round}: waiting for ${st.count} of ${st.sampled} sampled: ` +
      st.devices.join(", ") + (st.count > st.devices.length ? " …" : "")
      : `round ${st.round}: all ${st.sampled} sampled devices have sent their update`;
  } else if (st && st.round) {
    text = st.count ? `round ${st.round} closed without ${st.count}: ${st.devices.join(", ")}`
      : `round ${st.round} closed with every sampled device`;
  }
  $("stragglers").textContent = text;
}

let searchTimer = null;
async function search() {
  const run = currentRun();
  const q = $("search").value.trim();
  if (!run || !q) { $("search-results").replaceChildren(); return; }
  const url = `/api/search?run=${encodeURIComponent(run.name)}&q=${encodeURIComponent(q)}`;
  try {
    const response = await fetch(url, { cache: "no-store" });
    const found = await response.json();
    const items = found.results.map((n) => el("li", { "data-state": n.state },
      `${n.role}/${n.id}: ${n.state}, round ${n.round ?? "?"}` +
      (n.role === "device" ? `, trained ${n.trained_round ?? "–"}, site ${n.site ?? "–"}` +
        (n.sampled ? ", sampled" : "") : "")));
    if (found.count > found.results.length) {
      items.push(el("li", { class: "muted" }, `… ${found.count - found.results.length} more`));
    }
    $("search-results").replaceChildren(...(items.length ? items
      : [el("li", { class: "muted" }, `no node matches "${found.query}"`)]));
  } catch (e) {
    $("search-results").replaceChildren(el("li", { class: "muted" }, "search failed"));
  }
}

function renderAccuracy(run) {
  const runs = Object.values(snapshot.runs).filter((r) => r.accuracy.length)
    .sort((a, b) => a.name.localeCompare(b.name)).slice(0, COLORS.length);
  const series = [];
  runs.forEach((r) => {
    const color = runColor(r.name, r.algorithm);
    const pts = r.accuracy.filter((p) => p.accuracy !== null).map((p) => [p.round, p.accuracy]);
    series.push({ name: r.name, color, points: pts, width: run && r.name === run.name ? 3 : 2 });
    // The FL model's own line, for runs whose deployed model differs from it (EMO).
    const fl = r.accuracy.filter((p) => p.fl_accuracy !== null)
      .map((p) => [p.round, p.fl_accuracy]);
    if (r.accuracy.some((p) => p.fl_accuracy !== p.accuracy)) series.push({ name: r.name + " (FL model)", color, dash: true, points: fl });
  });
  lineChart($("accuracy-chart"), series, { label: "accuracy per round", xLabel: "round",
    integerX: true, xFmt: (x) => String(Math.round(x)), yFmt: (y) => y.toFixed(2) });
  legend($("accuracy-legend"), series);
  const acc = run ? run.latest_accuracy : null;
  $("latest-accuracy").textContent = acc === null || acc === undefined
    ? "–" : `${run.name} ${acc.toFixed(4)}`;
  $("latest-accuracy").title = run && run.done ? "final accuracy (whole test set)"
    : "accuracy of the last round";
}

function renderBytes(run) {
  const samples = run ? run.bytes : [];
  const kinds = [...new Set(samples.flatMap((s) => Object.keys(s.by_kind)))].sort();
  const t0 = samples.length ? samples[0].t : 0;
  // Each kind keeps its colour (by name) whichever kinds a run has.
  const series = kinds.map((k) => ({ name: k, color: KIND_COLORS[k] || runColor(k),
    points: samples.map((s) => [s.t - t0, s.by_kind[k] || 0]) }));
  // Log scale: SplitFed's activations and a FedAvg run's weights differ by orders of
  // magnitude; on a linear axis all but the largest are a flat line at zero.
  lineChart($("bytes-chart"), series, { label: "bytes over time", xLabel: "seconds", log: true,
    xFmt: (x, step) => x.toFixed(step < 1 ? 1 : 0), yFmt: (y) => fmtBytes(Math.round(y)) });
  legend($("bytes-legend"), series);
  const totals = run ? run.bytes_by_kind : {};
  $("bytes-total").textContent = Object.entries(totals)
    .map(([k, v]) => `${k} ${fmtBytes(v)}`).join(" · ");
}

function renderCache(run) {
  const rows = Object.entries(run ? run.cache : {}).map(([id, c]) => {
    const share = c.capacity ? c.entries / c.capacity : 0;
    const row = el("div", { class: "cache-row" });
    row.append(el("div", {}, `${id}: ${c.entries ?? 0} / ${c.capacity ?? "?"} entries` +
      ` (${fmtBytes(c.bytes || 0)}), staleness ${c.mean_staleness === null ||
        c.mean_staleness === undefined ? "–" : c.mean_staleness.toFixed(2)}` +
      (c.loss === null || c.loss === undefined ? "" : `, loss ${c.loss.toFixed(3)}`)));
    const bar = el("div", { class: "bar" });
    const fill = el("div");
    fill.style.width = (100 * Math.min(1, share)).toFixed(1) + "%";
    bar.append(fill);
    row.append(bar);
    return row;
  });
  $("cache").replaceChildren(...(rows.length ? rows : [el("div", { class: "muted" },
    "no overlay in this run")]));
}

function renderController(run) {
  // FedAvg and SplitFed have no controller: no panel (their devices' "initial" decision is
  // not one).
  $("controller-card").hidden = !(run && run.has_controller);
  const rows = Object.entries(run ? run.decisions : {}).map(([id, d]) => {
    const tr = el("tr");
    for (const v of [id, d.round ?? "–", d.fraction === null ? "–" : d.fraction.toFixed(3),
      d.interval ?? "–", d.precision, d.activation_bytes === null ? "–"
        : (d.activation_bytes / 1e6).toFixed(2)]) tr.append(el("td", {}, String(v)));
    return tr;
  });
  $("controller").tBodies[0].replaceChildren(...rows);
}

function renderAlerts() {
  const items = snapshot.alerts.map((a) => el("li", { class: a.level },
    `${a.run}: ${a.message}`));
  $("alerts").replaceChildren(...(items.length ? items : [el("li", { class: "none" },
    "no alerts")]));
}

function render() {
  if (!snapshot) return;
  const started = performance.now();
  const run = currentRun();
  renderHeader();
  renderNodes(run);
  renderFleet(run);
  renderAccuracy(run);
  renderBytes(run);
  renderCache(run);
  renderController(run);
  renderAlerts();
  $("updated").textContent = new Date(snapshot.time * 1000).toLocaleTimeString();
  $("stats").textContent = `${snapshot.messages} messages, ${snapshot.malformed} malformed`;
  const perf = window.emoPerf.renders;
  perf.push({ version: snapshot.version, snapshot_time: snapshot.time, at: Date.now() / 1000,
    render_ms: performance.now() - started });
  if (perf.length > 1000) perf.shift();
}

function accept(text) {
  try {
    snapshot = JSON.parse(text);
  } catch (e) {
    return;
  }
  render();
}

async function poll() {
  try {
    const response = await fetch("/api/state", { cache: "no-store" });
    if (response.ok) accept(await response.text());
  } catch (e) {
    $("link").textContent = "dashboard unreachable";
    $("link").className = "badge bad";
  }
}

function startPolling() {
  if (pollTimer === null) pollTimer = setInterval(poll, 2000);
}

function stopPolling() {
  if (pollTimer !== null) clearInterval(pollTimer);
  pollTimer = null;
}

function connect() {
  if (!window.EventSource) {
    startPolling();
    return;
  }
  const source = new EventSource("/events");
  source.addEventListener("state", (event) => {
    stopPolling();
    accept(event.data);
  });
  source.onerror = () => startPolling(); // EventSource reconnects by itself meanwhile
}

$("search").addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(search, 150);
});

$("run-select").addEventListener("change", (event) => {
  chosenRun = event.target.value;
  const url = new URL(location.href);
  url.searchParams.set("run", chosenRun);
  history.replaceState(null, "", url);
  render();
});

// The server inlines the state it had when it sent the page: render it at once, then go live.
const initial = document.getElementById("initial-state");
if (initial) accept(initial.textContent);
else poll();
connect();
