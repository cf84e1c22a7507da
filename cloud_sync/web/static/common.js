"use strict";
// What every page shares: fetching, cells, times, the live stream, an alert's detail with its plots and verdicts.
// Everything from the server is inserted with textContent or setAttribute, never as HTML (docs: hostile data).
const $ = (id) => document.getElementById(id);
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text; return e; }
function cell(tr, text, cls) { const td = el("td", cls, text); tr.appendChild(td); return td; }
function linkCell(tr, text, href, cls) { const td = el("td", cls); const a = el("a", "", text);
  a.setAttribute("href", href); td.appendChild(a); tr.appendChild(td); return td; }
function ago(s) { return s < 120 ? Math.round(s) + " s ago" : s < 7200 ? Math.round(s / 60) + " min ago"
  : s < 172800 ? Math.round(s / 3600) + " h ago" : Math.round(s / 86400) + " d ago"; }
function mib(n) { return (n / 1048576).toFixed(1); }
function when(t) { return Number.isFinite(t) ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19)
  : "?"; }
function fix(v, d) { return typeof v === "number" ? v.toFixed(d) : "-"; }
const vehicleUrl = (v) => "/vehicle/" + encodeURIComponent(v);
const alertUrl = (v, seq) => "/alert/" + encodeURIComponent(v) + "/" + seq;
async function get(url) { const r = await fetch(url); const j = await r.json().catch(() => ({}));
  if (r.status === 401) { location.assign("/signin?next=" + encodeURIComponent(location.pathname + location.search)); }
  if (!r.ok) throw new Error(j.error || r.status); return j; }
// Changes are JSON POSTs from this page: the server takes them only with this page's Origin (docs: CSRF).
async function post(url, body) {
  const r = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body) });
  const j = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(j.error || r.status); return j; }
function fields(form) { const out = {};
  for (const e of form.elements) if (e.name) out[e.name] = e.value.trim ? e.value.trim() : e.value;
  return out; }
function say(e, text, ok) { e.textContent = text; e.className = "form-msg " + (ok ? "ok" : "bad"); }
function fail(e) { $("error").textContent = "Could not load: " + e.message; }
function emptyRow(body, cols, text) { const tr = document.createElement("tr"); const td = cell(tr, text, "empty");
  td.colSpan = cols; body.appendChild(tr); }
let lastBy = "";
function rememberBy(by) { lastBy = by;
  for (const e of document.querySelectorAll("input.by")) if (!e.value) e.value = by; }

// Live updates: server-sent events from /api/stream (`fleet`, `alerts`). When the server refuses a stream (too many
// pages open) or the browser has none, the page polls `poll` every 30 s instead.
function live(handlers, poll) {
  const dot = $("live");
  const polling = () => { dot.className = "live off"; dot.textContent = "polling";
    setInterval(() => poll().catch(fail), 30000); };
  if (!window.EventSource) { polling(); return; }
  const es = new EventSource("/api/stream");
  for (const [name, fn] of Object.entries(handlers))
    es.addEventListener(name, (ev) => { try { fn(JSON.parse(ev.data)); } catch (e) { fail(e); } });
  es.onopen = () => { dot.className = "live on"; dot.textContent = "live"; };
  es.onerror = () => { if (es.readyState === EventSource.CLOSED) polling();
    else { dot.className = "live off"; dot.textContent = "reconnecting"; } };
}
const signOut = $("sign-out");
if (signOut) signOut.addEventListener("click", () => post("/api/signout", {}).then(() => location.assign("/signin")));

// --- an alert: its facts, the signals around it (uPlot), its verdicts -------------------------------------------

const SHADE = "rgba(224,122,18,0.22)";
function plotSignal(name, pts, d, win, rank, width) {
  const unit = d.units[name] || "";
  const wrap = el("div", "plot" + (rank >= 0 ? " top" : "")); wrap.dataset.signal = name;
  wrap.dataset.unit = unit; wrap.dataset.points = String(pts.length);
  const title = el("div", "plot-title"); title.append(el("span", "name", name));
  if (unit) title.append(el("span", "unit", unit));
  if (rank >= 0) { const f = d.alert.top_features.find((x) => x[0].split(":")[0] === name);
    title.append(el("span", "badge", "top feature " + (rank + 1) + (f && typeof f[1] === "number"
      ? " · contribution " + f[1].toFixed(2) : ""))); }
  wrap.appendChild(title);
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const opts = {
    width, height: 190,
    tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC"),
    cursor: { sync: { key: "alert" }, drag: { x: true, y: false } },
    scales: { x: { time: true } },
    legend: { live: true },
    // Ticks in UTC, 24 h, the date under the first tick and wherever the day changes.
    axes: [{ label: "time (UTC)", labelSize: 18, stroke: "#5f6b7a", grid: { stroke: "#eef1f4" }, size: 48,
      values: (u, splits) => splits.map((v, i) => { const s = when(v), day = s.slice(0, 10);
        return i === 0 || day !== when(splits[i - 1]).slice(0, 10) ? s.slice(11) + "\n" + day : s.slice(11); }) },
      { label: unit || "value", labelSize: 18, size: 64, stroke: "#5f6b7a", grid: { stroke: "#eef1f4" } }],
    series: [{ label: "time (UTC)", value: (u, v) => v == null ? "-" : when(v) }, { label: name, stroke: rank >= 0 ? "#c0640a" : "#1f5fbf", width: 1.5,
      value: (u, v) => v == null ? "-" : (Math.abs(v) >= 1e5 ? v.toExponential(3) : +v.toPrecision(6)) +
        (unit ? " " + unit : "") }],
    hooks: {
      // The window the model saw, shaded under the line; its place kept on the element for tests and tools.
      drawClear: [(u) => { const x0 = u.valToPos(win[0], "x", true), x1 = u.valToPos(win[1], "x", true);
        const ctx = u.ctx; ctx.save(); ctx.fillStyle = SHADE;
        ctx.fillRect(x0, u.bbox.top, Math.max(2, x1 - x0), u.bbox.height); ctx.restore();
        const dpr = uPlot.pxRatio;
        wrap.dataset.window = [x0 / dpr, x1 / dpr, u.bbox.top / dpr, (u.bbox.top + u.bbox.height) / dpr]
          .map((v) => v.toFixed(1)).join(","); }],
      setScale: [(u, key) => { if (key === "x") wrap.dataset.xrange = u.scales.x.min + "," + u.scales.x.max; }],
    },
  };
  const u = new uPlot(opts, [xs, ys], wrap);
  if (d.view) u.setScale("x", { min: d.view[0], max: d.view[1] });
  return wrap;
}

async function showAlert(box, vehicle, seq) {
  const d = await get("/api/alert/" + encodeURIComponent(vehicle) + "/" + seq);
  box.replaceChildren();
  const a = d.alert, head = el("div", "alert-head");
  const h = el("h2", "", `Alert on ${vehicle}: ${a.label || "fault"} (${a.state}), score ` +
    (typeof a.score === "number" ? a.score.toFixed(2) : "?"));
  head.appendChild(h);
  if (!location.pathname.startsWith("/alert/")) {  // on the fleet page: the alert's and the vehicle's own pages
    const open = el("a", "open-alert", "alert page"); open.setAttribute("href", alertUrl(vehicle, seq));
    const veh = el("a", "open-vehicle", "vehicle page"); veh.setAttribute("href", vehicleUrl(vehicle));
    head.append(open, veh);
  }
  box.appendChild(head);
  const facts = el("div", "facts");
  const fact = (k, v) => { const s = el("span"); s.append(k + " ", el("b", "", v)); facts.appendChild(s); };
  fact("model", (a.model || "?") + " " + (a.model_version || ""));
  fact("at", when(a.ts) + " UTC");
  const win = [a.window_start ?? a.ts, a.window_end ?? a.ts];
  fact("window", when(win[0]) + " … " + when(win[1]).slice(11));
  fact("top features", a.top_features.map((f) => f[0] + (typeof f[1] === "number" ? " (" + f[1].toFixed(2) + ")"
    : "")).join(", ") || "-");
  box.appendChild(facts);
  const names = d.span ? Object.keys(d.series) : [];
  const rank = (n) => d.top.indexOf(n);
  names.sort((x, y) => (rank(x) < 0 ? 1e9 : rank(x)) - (rank(y) < 0 ? 1e9 : rank(y)));
  if (!names.length) box.appendChild(el("p", "empty", "No samples stored around this alert."));
  else { const note = el("p", "legend-note"); note.append(el("span", "swatch"),
      "the window the model saw; signals of its top features first (marked). Drag across a plot to zoom, " +
      "double-click to zoom out."); box.appendChild(note); }
  const width = Math.max(480, Math.min(1400, box.clientWidth - 24));
  for (const n of names) box.appendChild(plotSignal(n, d.series[n], d, win, rank(n), width));
  box.appendChild(await verdictBox(vehicle, a.alert_id));
  return d;
}

// An alert's verdicts, newest last, and a form for a new one (every change is kept, with who and when).
async function verdictBox(vehicle, alertId) {
  const div = el("div", "verdict");
  div.appendChild(el("h3", "", "Verdict"));
  if (!alertId) { div.appendChild(el("p", "", "This alert record has no id: no verdict can be recorded."));
    return div; }
  const now = el("p", "now"); div.appendChild(now);
  const list = el("ol", "history"); div.appendChild(list);
  async function refresh() {
    const { history } = await get("/api/verdicts?" + new URLSearchParams({ vehicle, alert_id: alertId }));
    const last = history[history.length - 1];
    now.textContent = last ? "now: " + last.label + (last.fault ? " (" + last.fault + ")" : "") + " by " + last.by
      : "no verdict yet";
    list.replaceChildren(...history.map((v) => el("li", "", when(v.at) + " UTC, " + v.by + ": " + v.label +
      (v.fault ? " (" + v.fault + ")" : "") + (v.note ? ": " + v.note : ""))));
  }
  const form = el("form", "verdict-form"); form.autocomplete = "off";
  const label = document.createElement("select"); label.name = "label";
  for (const l of ["confirmed", "false_alarm", "unknown"]) label.appendChild(new Option(l, l));
  const input = (name, attrs) => { const lab = el("label"); lab.append(name + " ");
    const e = document.createElement("input"); e.name = name;
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    lab.appendChild(e); form.appendChild(lab); return e; };
  const lab = el("label"); lab.append("label ", label); form.appendChild(lab);
  input("fault", { placeholder: "as the alert's label", size: 16 });
  input("note", { maxlength: 2000, size: 30 });
  const by = input("by", { maxlength: 64, size: 10, class: "by" }); by.value = lastBy;
  const button = el("button", "", "Record verdict"); button.type = "submit";
  const msg = el("span", "form-msg");
  form.append(button, " ", msg);
  form.addEventListener("submit", (ev) => { ev.preventDefault();
    const f = fields(form);
    post("/api/verdict", { ...f, alert_id: alertId, vehicle }).then((r) => {
      say(msg, "recorded: " + r.verdict.label + (r.verdict.fault ? " (" + r.verdict.fault + ")" : ""), true);
      rememberBy(r.verdict.by); form.elements.note.value = "";
      return Promise.all([refresh(), ...(window.onVerdict ? [window.onVerdict()] : [])]);
    }).catch((e) => say(msg, "not recorded: " + e.message, false)); });
  div.appendChild(form);
  await refresh();
  return div;
}
