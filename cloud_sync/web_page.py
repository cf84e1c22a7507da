"""The fleet page's three files, served by `cloud_sync.web`: HTML, CSS and JavaScript apart, so the page runs under a
Content-Security-Policy with no 'unsafe-inline' (an injected inline script or style would not run). The script
inserts everything from the API with `textContent` or `setAttribute`, never as HTML."""

HTML = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Harvester fleet</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/page.css"></head>
<body>
<h1>Harvester fleet</h1>
<p id="error"></p>
<h2>Vehicles</h2>
<table id="fleet"><thead><tr><th>vehicle</th><th>state</th><th>last seen</th><th>backlog</th><th>model</th>
<th>model step</th><th>open alerts</th><th>evicted</th><th>gaps</th><th>backfilling</th><th>budget used</th>
<th>drift</th><th>sources</th>
<th>counters</th></tr></thead>
<tbody></tbody></table>
<h2>Rollouts</h2>
<table id="rollouts"><thead><tr><th>rollout</th><th>model</th><th>state</th><th>waves</th><th>failed</th></tr></thead>
<tbody></tbody></table>
<h2>Alerts</h2>
<p>vehicle <select id="f-vehicle"><option value="">all</option></select>
state <select id="f-state"><option value="">all</option><option>open</option><option>closed</option></select></p>
<table id="alerts"><thead><tr><th>time (UTC)</th><th>vehicle</th><th>state</th><th>label</th><th>score</th>
<th>model</th><th>verdict</th><th>top features</th></tr></thead><tbody></tbody></table>
<div id="detail"></div>
<h2>Record a breakdown</h2>
<form id="breakdown-form" autocomplete="off">
<label>vehicle <select name="vehicle" id="b-vehicle"></select></label>
<label>at (UTC) <input name="at" id="b-at" placeholder="2026-11-20T14:05" size="17"></label>
<label>fault <input name="fault" id="b-fault" placeholder="coolant_leak" size="16"></label>
<label>note <input name="note" id="b-note" maxlength="2000" size="30"></label>
<label>by <input name="by" class="by" id="b-by" maxlength="64" size="10"></label>
<button type="submit">Record breakdown</button> <span class="form-msg" id="b-msg"></span></form>
<h2>Model quality</h2>
<form id="quality-form" autocomplete="off">
<label>from <input name="since" id="q-since" placeholder="30 days before" size="17"></label>
<label>to <input name="until" id="q-until" placeholder="now" size="17"></label>
<label>model <input name="model" id="q-model" placeholder="all" size="16"></label>
<button type="submit">Show</button> <span class="form-msg" id="q-msg"></span></form>
<p id="q-due"></p>
<table id="quality"><thead><tr><th>model / fault</th><th>version</th><th>alerts</th><th>confirmed</th>
<th>false alarms</th><th>unknown</th><th>no verdict</th><th>precision</th><th>engine hours</th>
<th>false alarms / 100 h</th><th>caught</th><th>missed</th><th>median lead (h)</th><th>drift (highest)</th>
<th>retraining</th></tr></thead><tbody></tbody></table>
<script src="/static/page.js"></script>
</body></html>
"""

CSS = r"""body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
table { border-collapse: collapse; } th, td { padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; }
tr.offline td { color: #888; } tr.clickable { cursor: pointer; } tr.clickable:hover { background: #eef5ff; }
.open { color: #b00; font-weight: 600; } .yes { color: #b60; font-weight: 600; }
svg.plot { border: 1px solid #ccc; margin: 4px 0 10px 0; background: #fff; }
#error { color: #b00; }
td.counters { font-size: 12px; max-width: 40em; }
td.waves div { white-space: nowrap; } td.waves .current { font-weight: 600; }
.failed { color: #b00; } .done { color: #070; }
form label { margin-right: 0.8em; white-space: nowrap; } .form-msg { margin-left: 0.5em; }
.form-msg.bad { color: #b00; } .form-msg.ok { color: #070; }
tr.fault td { color: #555; font-size: 13px; } tr.fault td:first-child { padding-left: 2em; }
td.due { color: #b00; font-weight: 600; } #q-due.due { color: #b00; font-weight: 600; }
div.verdict { margin: 6px 0 12px 0; } ol.history { margin: 4px 0; font-size: 13px; }
"""

JS = r""""use strict";
const $ = (id) => document.getElementById(id);
function cell(tr, text, cls) { const td = document.createElement("td"); td.textContent = text;
  if (cls) td.className = cls; tr.appendChild(td); return td; }
function ago(s) { return s < 120 ? Math.round(s) + " s ago" : s < 7200 ? Math.round(s / 60) + " min ago"
  : s < 172800 ? Math.round(s / 3600) + " h ago" : Math.round(s / 86400) + " d ago"; }
function mib(n) { return (n / 1048576).toFixed(1); }
function when(t) { return Number.isFinite(t) ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19)
  : "?"; }
async function get(url) { const r = await fetch(url); const j = await r.json();
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
function say(el, text, ok) { el.textContent = text; el.className = "form-msg " + (ok ? "ok" : "bad"); }
function fix(v, d) { return typeof v === "number" ? v.toFixed(d) : "-"; }
let lastBy = "";
function rememberBy(by) { lastBy = by;
  for (const e of document.querySelectorAll("input.by")) if (!e.value) e.value = by; }

async function loadFleet() {
  const { vehicles } = await get("/api/fleet");
  const body = $("fleet").tBodies[0]; body.replaceChildren();
  const sel = $("f-vehicle"), keep = sel.value;
  sel.replaceChildren(new Option("all", ""));
  for (const v of vehicles) {
    const tr = document.createElement("tr"); tr.className = v.online ? "online" : "offline";
    tr.dataset.vehicle = v.vehicle;
    cell(tr, v.fleet + "/" + v.vehicle); cell(tr, v.online ? "online" : "offline");
    cell(tr, ago(v.last_seen_ago_s)); cell(tr, String(v.backlog.samples + v.backlog.records), "num");
    // What it runs (its model report, else its status), and what the cloud asked for when that differs.
    const m = v.model || {}, active = m.active ? m.active.version : (v.model_version || "-");
    const model = cell(tr, active + (m.desired && m.desired.version !== active ? " → " + m.desired.version : ""),
      "model");
    if (m.desired) model.setAttribute("title", "desired: " + m.desired.name + " " + m.desired.version +
      " (rollout " + m.desired.rollout + ")");
    const step = cell(tr, m.state || "-", "step" + (FAILED.includes(m.state) ? " failed" : ""));
    if (m.reason) step.setAttribute("title", m.reason);
    cell(tr, String(v.open_alerts), "num" + (v.open_alerts ? " open" : ""));
    const ev = Object.values(v.evicted.reported_by_vehicle).reduce((a, b) => a + b, 0) || v.evicted.ranges_received;
    cell(tr, String(ev), "num");
    // Gaps are lost; backfilling ranges the vehicle still holds and sends behind its live lane.
    cell(tr, String(v.gaps), "num gaps" + (v.gaps ? " open" : ""));
    const bf = cell(tr, String(v.backfilling), "num backfilling");
    if (v.backfilling) bf.setAttribute("title", v.backfilling_seqs + " sequence numbers still to come");
    cell(tr, mib(v.budget.used_today) + (v.budget.daily_bytes ? " / " + mib(v.budget.daily_bytes) : "") + " MiB");
    cell(tr, v.drift ? "yes" : "no", v.drift ? "yes" : "");
    // Each source's last up/down event (a source that never failed is not listed); the error text on hover.
    const src = Object.entries(v.sources || {});
    const down = src.filter(([, s]) => !s.up);
    const st = cell(tr, src.map(([n, s]) => n + (s.up ? " up" : " down (" + s.reason + ")")).join(", "),
      "sources" + (down.length ? " open" : ""));
    st.setAttribute("title", down.map(([n, s]) => n + " since " + when(s.ts) + ": " + s.error).join("\n"));
    // The vehicle's non-zero counters (its last status message), largest first.
    const ms = Object.entries(v.metrics || {});
    const mc = cell(tr, ms.slice(0, 8).map(([k, n]) => k + " " + n).join(", ") +
      (ms.length > 8 ? ", … " + (ms.length - 8) + " more" : ""), "counters");
    mc.setAttribute("title", ms.map(([k, n]) => k + " " + n).join("\n"));
    body.appendChild(tr);
    sel.appendChild(new Option(v.vehicle, v.vehicle));
  }
  sel.value = keep;
  const bsel = $("b-vehicle"), bkeep = bsel.value;
  bsel.replaceChildren(...vehicles.map((v) => new Option(v.vehicle, v.vehicle)));
  if (bkeep) bsel.value = bkeep;
}

const FAILED = ["rejected", "rolled_back", "failed"];

async function loadRollouts() {
  const { rollouts } = await get("/api/rollouts");
  const body = $("rollouts").tBodies[0]; body.replaceChildren();
  for (const r of rollouts) {
    const tr = document.createElement("tr"); tr.dataset.rollout = r.id;
    cell(tr, String(r.id) + " (" + r.mode + ")");
    cell(tr, r.name + " " + r.version);
    const st = cell(tr, r.state + (r.reason ? ": " + r.reason : ""),
      "state " + (r.state === "halted" ? "failed" : r.state === "done" ? "done" : ""));
    st.setAttribute("title", "success threshold " + r.success_threshold + ", error threshold " + r.error_threshold);
    // A line per wave: its progress counts; each vehicle's step on hover.
    const waves = cell(tr, "", "waves");
    for (const w of r.waves) {
      const p = w.progress, line = document.createElement("div");
      line.textContent = "wave " + w.number + ": " + p.active_healthy + "/" + p.total + " active, " + p.failed +
        " failed, " + p.sent + " sent";
      if (w.current) line.className = "current";
      line.setAttribute("title", w.vehicles.map((x) => x.vehicle + " " + x.state + (x.reason ? ": " + x.reason : ""))
        .join("\n"));
      waves.appendChild(line);
    }
    cell(tr, r.failed.map((f) => f.vehicle + " " + f.state + (f.reason ? " (" + f.reason + ")" : "")).join("; "),
      r.failed.length ? "failed" : "");
    body.appendChild(tr);
  }
}

async function loadAlerts() {
  const q = new URLSearchParams();
  if ($("f-vehicle").value) q.set("vehicle", $("f-vehicle").value);
  if ($("f-state").value) q.set("state", $("f-state").value);
  const { alerts } = await get("/api/alerts?" + q);
  const body = $("alerts").tBodies[0]; body.replaceChildren();
  for (const a of alerts) {
    const tr = document.createElement("tr"); tr.className = "clickable";
    tr.dataset.vehicle = a.vehicle; tr.dataset.seq = a.seq;
    cell(tr, when(a.ts)); cell(tr, a.vehicle); cell(tr, a.state, a.state === "open" ? "open" : "");
    cell(tr, a.label || ""); cell(tr, typeof a.score === "number" ? a.score.toFixed(2) : "", "num");
    cell(tr, (a.model || "") + " " + (a.model_version || ""));
    const vd = a.verdict && typeof a.verdict === "object" ? a.verdict : null;
    const vc = cell(tr, vd ? vd.label + (vd.fault ? " (" + vd.fault + ")" : "") : "-", "verdict");
    if (vd) vc.setAttribute("title", vd.by + ", " + when(vd.at) + (vd.note ? ": " + vd.note : ""));
    cell(tr, (a.top_features || []).map((f) => f[0]).join(", "));
    tr.addEventListener("click", () => showAlert(a.vehicle, a.seq).catch(fail));
    body.appendChild(tr);
  }
}

const NS = "http://www.w3.org/2000/svg";
function svgEl(name, attrs) { const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v)); return e; }

function plot(name, pts, span, win) {
  const W = 760, H = 150, L = 60, R = 10, T = 20, B = 22;
  const svg = svgEl("svg", { class: "plot", width: W, height: H, viewBox: `0 0 ${W} ${H}` });
  svg.dataset.signal = name;
  const vs = pts.map((p) => p[1]);
  let lo = Math.min(...vs), hi = Math.max(...vs); if (hi - lo < 1e-9) { lo -= 1; hi += 1; }
  const x = (t) => L + (t - span[0]) / (span[1] - span[0]) * (W - L - R);
  const y = (v) => T + (hi - v) / (hi - lo) * (H - T - B);
  svg.appendChild(svgEl("rect", { x: x(win[0]), y: T, width: Math.max(1, x(win[1]) - x(win[0])),
    height: H - T - B, fill: "#ffe5cc", class: "window" }));
  svg.appendChild(svgEl("polyline", { points: pts.map((p) => x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1)).join(" "),
    fill: "none", stroke: "#1f5fbf", "stroke-width": 1.2 }));
  const label = svgEl("text", { x: L, y: 14, "font-size": 12 }); label.textContent = name; svg.appendChild(label);
  for (const [v, yy] of [[hi, T + 4], [lo, H - B]]) {
    const t = svgEl("text", { x: 4, y: yy, "font-size": 10 }); t.textContent = v.toPrecision(4); svg.appendChild(t); }
  const axis = svgEl("text", { x: L, y: H - 6, "font-size": 10 });
  axis.textContent = when(span[0]) + "  …  " + when(span[1]) + " UTC (shaded: the window the model saw)";
  svg.appendChild(axis);
  return svg;
}

async function showAlert(vehicle, seq) {
  const d = await get("/api/alert/" + encodeURIComponent(vehicle) + "/" + seq);
  const box = $("detail"); box.replaceChildren();
  const h = document.createElement("h2");
  h.textContent = `Alert on ${vehicle}: ${d.alert.label || "fault"} (${d.alert.state}), score ` +
    (typeof d.alert.score === "number" ? d.alert.score.toFixed(2) : "?");
  box.appendChild(h);
  const win = [d.alert.window_start ?? d.alert.ts, d.alert.window_end ?? d.alert.ts];
  const names = d.span ? Object.keys(d.series) : [];
  if (!names.length) { const p = document.createElement("p"); p.className = "empty";
    p.textContent = "No samples stored around this alert."; box.appendChild(p); }
  for (const n of names) box.appendChild(plot(n, d.series[n], d.span, win));
  box.appendChild(await verdictBox(vehicle, d.alert.alert_id));
}

// An alert's verdicts, newest last, and a form for a new one (every change is kept, with who and when).
async function verdictBox(vehicle, alertId) {
  const div = document.createElement("div"); div.className = "verdict";
  const h = document.createElement("h3"); h.textContent = "Verdict"; div.appendChild(h);
  if (!alertId) { const p = document.createElement("p");
    p.textContent = "This alert record has no id: no verdict can be recorded."; div.appendChild(p); return div; }
  const now = document.createElement("p"); now.className = "now"; div.appendChild(now);
  const list = document.createElement("ol"); list.className = "history"; div.appendChild(list);
  async function refresh() {
    const { history } = await get("/api/verdicts?" + new URLSearchParams({ vehicle, alert_id: alertId }));
    const last = history[history.length - 1];
    now.textContent = last ? "now: " + last.label + (last.fault ? " (" + last.fault + ")" : "") + " by " + last.by
      : "no verdict yet";
    list.replaceChildren(...history.map((v) => { const li = document.createElement("li");
      li.textContent = when(v.at) + " UTC, " + v.by + ": " + v.label + (v.fault ? " (" + v.fault + ")" : "") +
        (v.note ? ": " + v.note : ""); return li; }));
  }
  const form = document.createElement("form"); form.className = "verdict-form"; form.autocomplete = "off";
  const label = document.createElement("select"); label.name = "label";
  for (const l of ["confirmed", "false_alarm", "unknown"]) label.appendChild(new Option(l, l));
  const input = (name, attrs) => { const lab = document.createElement("label"); lab.append(name + " ");
    const e = document.createElement("input"); e.name = name;
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    lab.appendChild(e); form.appendChild(lab); return e; };
  const lab = document.createElement("label"); lab.append("label ", label); form.appendChild(lab);
  input("fault", { placeholder: "as the alert's label", size: 16 });
  input("note", { maxlength: 2000, size: 30 });
  const by = input("by", { maxlength: 64, size: 10, class: "by" }); by.value = lastBy;
  const button = document.createElement("button"); button.type = "submit"; button.textContent = "Record verdict";
  const msg = document.createElement("span"); msg.className = "form-msg";
  form.append(button, " ", msg);
  form.addEventListener("submit", (ev) => { ev.preventDefault();
    const f = fields(form);
    post("/api/verdict", { ...f, alert_id: alertId, vehicle }).then((r) => {
      say(msg, "recorded: " + r.verdict.label + (r.verdict.fault ? " (" + r.verdict.fault + ")" : ""), true);
      rememberBy(r.verdict.by); form.elements.note.value = "";
      return Promise.all([refresh(), loadAlerts(), loadQuality()]);
    }).catch((e) => say(msg, "not recorded: " + e.message, false)); });
  div.appendChild(form);
  await refresh();
  return div;
}

// The period and model of the quality form (times as the CLI takes them: ISO 8601 in UTC, or Unix seconds).
async function loadQuality() {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(fields($("quality-form")))) if (v) q.set(k, v);
  const r = await get("/api/quality?" + q);
  const body = $("quality").tBodies[0]; body.replaceChildren();
  const figures = (tr, f, whole) => {
    const v = f.verdicts;
    for (const n of [f.alerts, v.confirmed, v.false_alarm, v.unknown, v.none]) cell(tr, String(n), "num");
    cell(tr, fix(f.precision, 2), "num");
    cell(tr, whole ? fix(f.engine_hours, 1) : "", "num");
    cell(tr, whole ? fix(f.false_alarms_per_100_engine_hours, 2) : "", "num");
    cell(tr, String(f.breakdowns.caught), "num"); cell(tr, String(f.breakdowns.missed), "num");
    cell(tr, fix(f.median_lead_time_h, 1), "num");
  };
  for (const m of r.models) {
    const tr = document.createElement("tr"); tr.className = "model";
    tr.dataset.model = m.model; tr.dataset.version = m.version;
    cell(tr, m.model); cell(tr, m.version); figures(tr, m, true);
    const drift = Object.entries(m.drift_share).sort((a, b) => b[1] - a[1]);
    const dc = cell(tr, drift.length ? Math.round(drift[0][1] * 100) + "% " + drift[0][0] : "-");
    dc.setAttribute("title", drift.map(([v, s]) => v + ": " + Math.round(s * 100) + "% of " + m.drift_reports[v] +
      " reports").join("\n"));
    cell(tr, m.retraining_due ? "due: " + m.retraining_reasons.join("; ") : "no", m.retraining_due ? "due" : "");
    body.appendChild(tr);
    for (const [fault, f] of Object.entries(m.per_fault)) {
      const fr = document.createElement("tr"); fr.className = "fault"; fr.dataset.fault = fault;
      cell(fr, fault || "(no label)"); cell(fr, ""); figures(fr, f, false); cell(fr, ""); cell(fr, "");
      body.appendChild(fr);
    }
  }
  if (!r.models.length) { const tr = document.createElement("tr");
    const td = cell(tr, "No alert, breakdown or drift report in this period."); td.colSpan = 15;
    body.appendChild(tr); }
  const due = $("q-due");
  due.textContent = r.retraining_due ? "retraining due: " + r.retraining_reasons.join("; ") : "no retraining due";
  due.className = r.retraining_due ? "due" : "";
}

$("breakdown-form").addEventListener("submit", (ev) => { ev.preventDefault();
  const form = $("breakdown-form"), msg = $("b-msg");
  post("/api/breakdown", fields(form)).then((r) => {
    say(msg, "recorded: breakdown " + r.breakdown.id + " of " + r.breakdown.vehicle + " at " +
      when(r.breakdown.at) + " UTC (" + r.breakdown.fault + ")", true);
    rememberBy(r.breakdown.by); form.elements.note.value = "";
    return loadQuality();
  }).catch((e) => say(msg, "not recorded: " + e.message, false)); });
$("quality-form").addEventListener("submit", (ev) => { ev.preventDefault();
  loadQuality().then(() => say($("q-msg"), "", true)).catch((e) => say($("q-msg"), e.message, false)); });

function fail(e) { $("error").textContent = "Could not load: " + e.message; }
$("f-vehicle").addEventListener("change", () => loadAlerts().catch(fail));
$("f-state").addEventListener("change", () => loadAlerts().catch(fail));
Promise.all([loadFleet(), loadRollouts(), loadAlerts(), loadQuality()])
  .then(() => document.body.dataset.loaded = "1").catch(fail);
"""
