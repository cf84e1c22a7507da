"use strict";
// A vehicle's page (/vehicle/<id>): its last status and, over a chosen period, its alerts, DTC events (with their
// words), drift reports, model versions and evictions; kept current by the live stream.
const main = $("main"), VEHICLE = main.dataset.vehicle;
const HOUR = 3600;

function status(v) {
  const dl = $("v-status"); dl.replaceChildren();
  const item = (k, val, cls) => { dl.append(el("dt", "", k), el("dd", cls || "", val)); };
  const pill = $("v-state"); pill.textContent = v.online ? "online" : "offline";
  pill.className = "pill " + (v.online ? "online" : "offline");
  $("v-title").textContent = v.fleet + "/" + v.vehicle;
  item("last seen", when(v.last_seen) + " UTC (" + ago(v.last_seen_ago_s) + ")");
  const m = v.model || {};
  item("model", (m.active ? m.active.name + " " + m.active.version : v.model_version || "-") +
    (m.desired ? " (asked for " + m.desired.version + ", rollout " + m.desired.rollout + ")" : "") +
    (m.state ? ": " + m.state + (m.reason ? " (" + m.reason + ")" : "") : ""), "model");
  item("open alerts", String(v.open_alerts), v.open_alerts ? "open" : "");
  item("drift", v.drift ? "yes" : "no", v.drift ? "yes" : "");
  item("backlog", v.backlog.samples + " samples, " + v.backlog.records + " records");
  item("data budget", mib(v.budget.used_today) + (v.budget.daily_bytes ? " / " + mib(v.budget.daily_bytes) : "") +
    " MiB today");
  item("gaps", v.gaps + " lost, " + v.backfilling + " backfilling");
  const ev = Object.values(v.evicted.reported_by_vehicle).reduce((x, y) => x + y, 0) || v.evicted.ranges_received;
  item("evicted", String(ev));
  const src = Object.entries(v.sources || {});
  item("sources", src.map(([n, s]) => n + (s.up ? " up" : " down (" + s.reason + ": " + s.error + ")")).join(", ")
    || "all up", src.some(([, s]) => !s.up) ? "open" : "");
  const ms = Object.entries(v.metrics || {});
  item("counters", ms.map(([k, n]) => k + " " + n).join(", ") || "-", "counters");
}

function rows(id, list, cols, empty, fill) {
  const body = $(id).tBodies[0]; body.replaceChildren();
  for (const r of list) { const tr = document.createElement("tr"); fill(tr, r); body.appendChild(tr); }
  if (!list.length) emptyRow(body, cols, empty);
}

// What the vehicle's last status says is active now (its own set, not rebuilt from the events below); an agent from
// before the status carried it, or a vehicle whose last word was its Will, lists nothing: the events tell.
function activeDtcs(a) {
  const fromStatus = a.from === "status";
  $("v-active-from").textContent = fromStatus
    ? "as the vehicle's status of " + when(a.reported) + " UTC lists them" +
      (a.more ? "; " + a.more + " more not listed" : "") + (a.ignored ? "; " + a.ignored + " malformed ignored" : "")
    : "the vehicle's last status does not list them: see the DTC events below";
  rows("v-active-dtcs", a.active, 6, fromStatus ? "No active DTC." : "Not reported by this vehicle.", (tr, x) => {
    cell(tr, x.source, "source");
    cell(tr, String(x.spn), "num"); cell(tr, String(x.fmi), "num"); cell(tr, x.text, "text");
    const lamps = cell(tr, ""); for (const l of x.lamps) lamps.appendChild(el("span", "lamp", l.replace("_", " ")));
    cell(tr, x.occurrence === null ? "" : String(x.occurrence), "num");
  });
}

let shown = null;
async function load() {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(fields($("period-form")))) if (v) q.set(k, v);
  const d = await get("/api/vehicle/" + encodeURIComponent(VEHICLE) + "?" + q);
  shown = d;
  status(d.vehicle);
  $("v-period").textContent = when(d.period[0]) + " … " + when(d.period[1]) + " UTC" +
    (d.truncated.length ? " (newest " + 500 + " shown of: " + d.truncated.join(", ") + ")" : "");
  rows("v-alerts", d.alerts, 7, "No alert in this period.", (tr, a) => {
    tr.dataset.seq = a.seq;
    linkCell(tr, when(a.ts), alertUrl(VEHICLE, a.seq), "time");
    cell(tr, a.state, a.state === "open" ? "open" : ""); cell(tr, a.label || "");
    cell(tr, typeof a.score === "number" ? a.score.toFixed(2) : "", "num");
    cell(tr, (a.model || "") + " " + (a.model_version || ""));
    cell(tr, a.verdict ? a.verdict.label + (a.verdict.fault ? " (" + a.verdict.fault + ")" : "") : "-", "verdict");
    cell(tr, a.top_features.map((f) => f[0]).join(", "));
  });
  activeDtcs(d.active_dtcs);
  rows("v-dtcs", d.dtcs, 8, "No DTC event in this period.", (tr, x) => {
    tr.dataset.seq = x.seq;
    cell(tr, when(x.ts)); cell(tr, x.kind.replace("dtc_", ""), x.kind === "dtc_open" ? "open" : "");
    cell(tr, x.source + (x.sa !== null ? " SA " + x.sa : ""), "source");
    cell(tr, x.spn === null ? "" : String(x.spn), "num"); cell(tr, x.fmi === null ? "" : String(x.fmi), "num");
    cell(tr, x.text, "text");
    const lamps = cell(tr, ""); for (const l of x.lamps) lamps.appendChild(el("span", "lamp", l.replace("_", " ")));
    cell(tr, x.occurrence === null ? "" : String(x.occurrence), "num");
  });
  rows("v-drift", d.drift, 4, "No drift report in this period.", (tr, x) => {
    cell(tr, when(x.ts)); cell(tr, x.drift ? "drifted" : "stable", x.drift ? "yes" : "");
    cell(tr, x.model + " " + x.model_version, "model"); cell(tr, x.drifted.join(", "));
  });
  rows("v-models", d.models, 6, "No alert or drift report named a model in this period.", (tr, m) => {
    cell(tr, m.model); cell(tr, m.version); cell(tr, when(m.first)); cell(tr, when(m.last));
    cell(tr, String(m.alerts), "num"); cell(tr, String(m.drift_reports), "num");
  });
  rows("v-evictions", d.evictions, 5, "Nothing evicted in this period.", (tr, x) => {
    cell(tr, when(x.ts)); cell(tr, x.ranges.map((r) => r[0] + "–" + r[1]).join(", "));
    cell(tr, String(x.seqs), "num"); cell(tr, x.samples === null ? "" : String(x.samples), "num");
    cell(tr, x.records === null ? "" : String(x.records), "num");
  });
}

// The period is part of the address (?since=&until=): a link to a vehicle's week is a link anyone can open.
const given = new URLSearchParams(location.search);
for (const k of ["since", "until"]) if (given.get(k)) $("v-" + k).value = given.get(k);
$("period-form").addEventListener("submit", (ev) => { ev.preventDefault();
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(fields($("period-form")))) if (v) q.set(k, v);
  history.replaceState(null, "", location.pathname + (q.size ? "?" + q : ""));
  load().then(() => say($("v-msg"), "", true)).catch((e) => say($("v-msg"), e.message, false)); });
for (const b of document.querySelectorAll("button.preset"))
  b.addEventListener("click", () => { $("v-since").value = new Date(Date.now() - b.dataset.hours * HOUR * 1000)
    .toISOString().slice(0, 16); $("v-until").value = ""; $("period-form").requestSubmit(); });
load().then(() => { document.body.dataset.loaded = "1";
  live({ fleet: (d) => { const v = d.vehicles.find((x) => x.vehicle === VEHICLE); if (v) status(v); },
    alerts: (d) => { if (d.new.some((a) => a.vehicle === VEHICLE) && !$("v-until").value) load().catch(fail); } },
  () => load()); }).catch(fail);
