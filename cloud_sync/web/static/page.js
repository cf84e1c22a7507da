"use strict";
// The fleet page: vehicles, alerts (with an alert's detail in place), rollouts, breakdowns, model quality; the
// vehicles and alerts kept current by the live stream.
const FAILED = ["rejected", "rolled_back", "failed"];
let fleetKey = "";

function renderFleet(vehicles) {
  // Rows are rebuilt only when something but the "ago" changed: a row being read is not replaced under the reader.
  const key = JSON.stringify(vehicles.map((v) => ({ ...v, last_seen_ago_s: 0 })));
  const body = $("fleet").tBodies[0];
  if (key === fleetKey) {
    for (const v of vehicles) { const tr = [...body.rows].find((r) => r.dataset.vehicle === v.vehicle);
      if (tr) tr.querySelector("td.ago").textContent = ago(v.last_seen_ago_s); }
    return;
  }
  fleetKey = key;
  body.replaceChildren();
  const sel = $("f-vehicle"), keep = sel.value;
  sel.replaceChildren(new Option("all", ""));
  for (const v of vehicles) {
    const tr = document.createElement("tr"); tr.className = v.online ? "online" : "offline";
    tr.dataset.vehicle = v.vehicle;
    const name = el("td", "vehicle"); const a = el("a", "", v.vehicle); a.setAttribute("href", vehicleUrl(v.vehicle));
    name.append(v.fleet + "/", a); tr.appendChild(name);
    cell(tr, v.online ? "online" : "offline");
    cell(tr, ago(v.last_seen_ago_s), "ago"); cell(tr, String(v.backlog.samples + v.backlog.records), "num");
    // What it runs (its model report, else its status), and what the cloud asked for when that differs.
    const m = v.model || {}, active = m.active ? m.active.version : (v.model_version || "-");
    const model = cell(tr, active + (m.desired && m.desired.version !== active ? " → " + m.desired.version : ""),
      "model");
    if (m.desired) model.setAttribute("title", "desired: " + m.desired.name + " " + m.desired.version +
      " (rollout " + m.desired.rollout + ")");
    const step = cell(tr, m.state || "-", "step" + (FAILED.includes(m.state) ? " failed" : ""));
    if (m.reason) step.setAttribute("title", m.reason);
    cell(tr, String(v.open_alerts), "num" + (v.open_alerts ? " open" : ""));
    const ev = Object.values(v.evicted.reported_by_vehicle).reduce((x, y) => x + y, 0) || v.evicted.ranges_received;
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
  const online = vehicles.filter((v) => v.online).length, open = vehicles.reduce((n, v) => n + v.open_alerts, 0);
  $("fleet-summary").textContent = `${vehicles.length} vehicles, ${online} online, ${open} open alerts`;
}

async function loadFleet() { renderFleet((await get("/api/fleet")).vehicles); }

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
      const p = w.progress, line = el("div", w.current ? "current" : "",
        "wave " + w.number + ": " + p.active_healthy + "/" + p.total + " active, " + p.failed + " failed, " + p.sent +
        " sent");
      line.setAttribute("title", w.vehicles.map((x) => x.vehicle + " " + x.state + (x.reason ? ": " + x.reason : ""))
        .join("\n"));
      waves.appendChild(line);
    }
    cell(tr, r.failed.map((f) => f.vehicle + " " + f.state + (f.reason ? " (" + f.reason + ")" : "")).join("; "),
      r.failed.length ? "failed" : "");
    body.appendChild(tr);
  }
  if (!rollouts.length) emptyRow(body, 5, "No rollout yet.");
}

let selected = null;
async function loadAlerts(fresh) {
  const q = new URLSearchParams();
  if ($("f-vehicle").value) q.set("vehicle", $("f-vehicle").value);
  if ($("f-state").value) q.set("state", $("f-state").value);
  const { alerts } = await get("/api/alerts?" + q);
  const body = $("alerts").tBodies[0]; body.replaceChildren();
  for (const a of alerts) {
    const tr = document.createElement("tr"); tr.className = "clickable";
    tr.dataset.vehicle = a.vehicle; tr.dataset.seq = a.seq;
    if (selected && selected[0] === a.vehicle && selected[1] === a.seq) tr.classList.add("selected");
    if (fresh && fresh.has(a.vehicle + "\n" + a.seq)) tr.classList.add("fresh");
    linkCell(tr, when(a.ts), alertUrl(a.vehicle, a.seq), "time");
    linkCell(tr, a.vehicle, vehicleUrl(a.vehicle));
    cell(tr, a.state, a.state === "open" ? "open" : "");
    cell(tr, a.label || ""); cell(tr, typeof a.score === "number" ? a.score.toFixed(2) : "", "num");
    cell(tr, (a.model || "") + " " + (a.model_version || ""), "model");
    const vd = a.verdict && typeof a.verdict === "object" ? a.verdict : null;
    const vc = cell(tr, vd ? vd.label + (vd.fault ? " (" + vd.fault + ")" : "") : "-", "verdict");
    if (vd) vc.setAttribute("title", vd.by + ", " + when(vd.at) + (vd.note ? ": " + vd.note : ""));
    cell(tr, (a.top_features || []).map((f) => f[0]).join(", "));
    tr.addEventListener("click", (ev) => { if (ev.target.closest("a")) return;
      selected = [a.vehicle, a.seq];
      for (const r of body.rows) r.classList.toggle("selected", r === tr);
      showAlert($("detail"), a.vehicle, a.seq).catch(fail); });
    body.appendChild(tr);
  }
  if (!alerts.length) emptyRow(body, 8, "No alert matches.");
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
    const drift = Object.entries(m.drift_share).sort((x, y) => y[1] - x[1]);
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
  if (!r.models.length) emptyRow(body, 15, "No alert, breakdown or drift report in this period.");
  const due = $("q-due");
  due.textContent = r.retraining_due ? "retraining due: " + r.retraining_reasons.join("; ") : "no retraining due";
  due.className = r.retraining_due ? "due" : "";
}

window.onVerdict = () => Promise.all([loadAlerts(), loadQuality()]);
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
$("f-vehicle").addEventListener("change", () => loadAlerts().catch(fail));
$("f-state").addEventListener("change", () => loadAlerts().catch(fail));

let newAlerts = 0;
Promise.all([loadFleet(), loadRollouts(), loadAlerts(), loadQuality()])
  .then(() => { document.body.dataset.loaded = "1";
    live({ fleet: (d) => renderFleet(d.vehicles),
      alerts: (d) => { newAlerts += d.new.length;
        $("alerts-new").textContent = newAlerts + " new since the page opened";
        loadAlerts(new Set(d.new.map((a) => a.vehicle + "\n" + a.seq))).catch(fail); } },
    () => Promise.all([loadFleet(), loadAlerts()])); })
  .catch(fail);
