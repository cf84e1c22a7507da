"""`cloud-sync web`: a small page for people — the fleet, the alerts, and for an alert the signals the model saw.

Standard library only (`http.server`): the page is one self-contained HTML document (inline CSS and JavaScript,
nothing fetched from elsewhere) over three JSON endpoints. Everything from the database came from vehicles and
is treated as hostile: JSON carries it, the page inserts it with `textContent`, never as HTML.

    GET /                               the page
    GET /api/fleet                      {"vehicles": [...]}          (FleetDB.fleet)
    GET /api/alerts?vehicle=&state=&since=   {"alerts": [...]}       (FleetDB.alerts, newest first)
    GET /api/alert/<vehicle>/<seq>      {"alert": {...}, "series": {signal: [[ts, value], ...]}, "span": [t0, t1]}
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from cloud_sync.db import FleetDB
from cloud_sync.present import clean_alert, plain

log = logging.getLogger("cloud_sync.web")

CONTEXT_S = 120.0  # signal history shown either side of the window the model saw
MAX_SIGNALS = 8  # plots per alert: the page stays readable and the response small
MAX_POINTS = 20_000  # per signal: 270 s of a 10 Hz signal is ~2,700
_SEQ = re.compile(r"[0-9]{1,19}")  # ASCII digits only (int() would take "\u0663"); then bounded to 64 bits
SEQ_MAX = 2**63 - 1  # what both databases store


class BadRequest(Exception):
    pass


def _alert_signals(alert: dict[str, Any]) -> list[str]:
    """The signals worth plotting: the top contributing features' signals first, then the snapshot's."""
    names: list[str] = []
    for f in alert.get("top_features") or []:
        if isinstance(f, list | tuple) and f and isinstance(f[0], str):
            names.append(f[0].split(":", 1)[0])
    snap = alert.get("snapshot")
    if isinstance(snap, dict):
        names += [k for k in snap if isinstance(k, str)]
    return list(dict.fromkeys(names))[:MAX_SIGNALS]


class Api:
    """The JSON side, without HTTP: easy to test, and the handler stays a thin shell."""

    def __init__(self, db: FleetDB) -> None:
        self.db = db
        self._lock = threading.Lock()  # one database connection behind many server threads

    def fleet(self) -> dict[str, Any]:
        with self._lock:
            return {"vehicles": self.db.fleet()}

    def alerts(self, query: dict[str, list[str]]) -> dict[str, Any]:
        vehicle = query.get("vehicle", [""])[0] or None
        state = query.get("state", [""])[0] or None
        if state not in (None, "open", "closed"):
            raise BadRequest("state must be open or closed")
        since_s = query.get("since", [""])[0]
        try:
            since = float(since_s) if since_s else None
        except ValueError:
            raise BadRequest("since must be a Unix time") from None
        if since is not None and not math.isfinite(since):
            raise BadRequest("since must be a Unix time")
        with self._lock:
            rows = self.db.alerts(vehicle, state, since)
        return {"alerts": [clean_alert(a) for a in reversed(rows)]}

    def alert(self, vehicle: str, seq_s: str) -> dict[str, Any] | None:
        if not _SEQ.fullmatch(seq_s) or int(seq_s) > SEQ_MAX:
            raise BadRequest("seq must be a non-negative integer")
        seq = int(seq_s)
        with self._lock:
            raw = self.db.alert(vehicle, seq)
            if raw is None:
                return None
            a = clean_alert(raw)
            w0 = a["window_start"] if a["window_start"] is not None else a["ts"]
            w1 = a["window_end"] if a["window_end"] is not None else w0
            if w0 is None or w1 is None or w1 < w0:
                return {"alert": a, "series": {}, "span": None}
            span = [w0 - CONTEXT_S, w1 + CONTEXT_S]
            # One query per signal so a fast signal cannot use up the point budget of the others, and an alert
            # naming no signal plots nothing (names=None would mean every signal the vehicle has).
            series: dict[str, list[tuple[float, float]]] = {}
            for name in _alert_signals(a):
                series.update(self.db.signal_series(vehicle, span[0], span[1], [name], MAX_POINTS))
        return {"alert": a, "series": series, "span": span}


class Handler(BaseHTTPRequestHandler):
    server: WebServer

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline'; "
                         "style-src 'unsafe-inline'; img-src 'self' data:")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        # Markup characters escaped even inside JSON strings: a vehicle id like "<script>" never appears raw in a
        # response, whatever a browser or proxy decides to sniff it as.
        text = json.dumps(plain(obj), default=str, allow_nan=False)  # a stored NaN sample is null, not a 500
        text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        self._send(status, text.encode(), "application/json")

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/") if p]
        api = self.server.api
        try:
            if not parts:
                self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
            elif parts == ["api", "fleet"]:
                self._json(HTTPStatus.OK, api.fleet())
            elif parts == ["api", "alerts"]:
                self._json(HTTPStatus.OK, api.alerts(parse_qs(url.query)))
            elif len(parts) == 4 and parts[:2] == ["api", "alert"]:
                res = api.alert(parts[2], parts[3])
                if res is None:
                    self._json(HTTPStatus.NOT_FOUND, {"error": "no such alert"})
                else:
                    self._json(HTTPStatus.OK, res)
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
        except BadRequest as e:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except Exception:
            log.exception("request %s failed", self.path)  # the reason stays in our log, not with the client
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})


class WebServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], api: Api) -> None:
        super().__init__(addr, Handler)
        self.api = api


def make_server(db: FleetDB, host: str = "127.0.0.1", port: int = 8080) -> WebServer:
    return WebServer((host, port), Api(db))


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Harvester fleet</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
table { border-collapse: collapse; } th, td { padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; }
tr.offline td { color: #888; } tr.clickable { cursor: pointer; } tr.clickable:hover { background: #eef5ff; }
.open { color: #b00; font-weight: 600; } .yes { color: #b60; font-weight: 600; }
svg.plot { border: 1px solid #ccc; margin: 4px 0 10px 0; background: #fff; }
#error { color: #b00; }
</style></head>
<body>
<h1>Harvester fleet</h1>
<p id="error"></p>
<h2>Vehicles</h2>
<table id="fleet"><thead><tr><th>vehicle</th><th>state</th><th>last seen</th><th>backlog</th><th>model</th>
<th>open alerts</th><th>evicted</th><th>budget used</th><th>drift</th></tr></thead><tbody></tbody></table>
<h2>Alerts</h2>
<p>vehicle <select id="f-vehicle"><option value="">all</option></select>
state <select id="f-state"><option value="">all</option><option>open</option><option>closed</option></select></p>
<table id="alerts"><thead><tr><th>time (UTC)</th><th>vehicle</th><th>state</th><th>label</th><th>score</th>
<th>model</th><th>top features</th></tr></thead><tbody></tbody></table>
<div id="detail"></div>
<script>
"use strict";
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
    cell(tr, v.model_version || "-"); cell(tr, String(v.open_alerts), "num" + (v.open_alerts ? " open" : ""));
    const ev = Object.values(v.evicted.reported_by_vehicle).reduce((a, b) => a + b, 0) || v.evicted.ranges_received;
    cell(tr, String(ev), "num");
    cell(tr, mib(v.budget.used_today) + (v.budget.daily_bytes ? " / " + mib(v.budget.daily_bytes) : "") + " MiB");
    cell(tr, v.drift ? "yes" : "no", v.drift ? "yes" : "");
    body.appendChild(tr);
    sel.appendChild(new Option(v.vehicle, v.vehicle));
  }
  sel.value = keep;
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
}

function fail(e) { $("error").textContent = "Could not load: " + e.message; }
$("f-vehicle").addEventListener("change", () => loadAlerts().catch(fail));
$("f-state").addEventListener("change", () => loadAlerts().catch(fail));
Promise.all([loadFleet(), loadAlerts()]).then(() => document.body.dataset.loaded = "1").catch(fail);
</script>
</body></html>
"""
