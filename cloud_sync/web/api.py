"""The fleet page's JSON side, without HTTP: what each endpoint answers, from the database, as plain dicts.

Everything from the database came from vehicles (or, for verdicts and breakdowns, from people typing) and is hostile:
values pass through cloud_sync/present.py (typed, no NaN, nesting cut) and the HTTP layer (cloud_sync/web/app.py)
escapes markup characters even inside JSON strings. One database connection serves every request, so each method
holds `Api._lock` while it reads or writes.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from typing import Any

from cloud_sync.config import QualityConfig, WebConfig
from cloud_sync.db import FleetDB, LearningError
from cloud_sync.present import LAMPS, clean_alert, finite, plain, status_dtcs
from cloud_sync.reports import Reports
from cloud_sync.times import TimeError, parse_time
from harvester_common.j1939_text import FMI_MAX, SAID_MAX, DtcText, fmi_text

_SEQ = re.compile(r"[0-9]{1,19}")  # ASCII digits only (int() would take "\u0663"); then bounded to 64 bits
SEQ_MAX = 2**63 - 1  # what both databases store
_POST_FIELDS = {"verdict": ("alert_id", "label", "fault", "note", "by", "vehicle"),
                "breakdown": ("vehicle", "at", "fault", "note", "by")}
DEFAULT_HISTORY_S = 7 * 86400.0  # a vehicle page's period when none is chosen: the week to now
HISTORY_ROWS = 500  # rows of each kind on a vehicle page (newest first); `truncated` says when more exist
DTC_KINDS = ("dtc_open", "dtc_update", "dtc_close", "dtc_previous", "dtc_flapping", "dtc_storm")
_DTC_TEXT = DtcText()  # built-in SPN names: for events stored before vehicles sent the DTC's text themselves


class BadRequest(Exception):
    pass


Query = dict[str, list[str]]


def _alert_signals(alert: dict[str, Any], max_signals: int) -> list[str]:
    """The signals worth plotting: the top contributing features' signals first, then the snapshot's."""
    return list(dict.fromkeys(_top_signals(alert) + [k for k in alert.get("snapshot") or {} if isinstance(k, str)]
                              ))[:max_signals]


def _top_signals(alert: dict[str, Any]) -> list[str]:
    """The signals of the alert's top features, in the order the model ranked them (a feature is
    `Message.Signal:stat:window`)."""
    names = [f[0].split(":", 1)[0] for f in alert.get("top_features") or []
             if isinstance(f, list | tuple) and f and isinstance(f[0], str)]
    return list(dict.fromkeys(names))


def _time(query: Query, name: str) -> float | None:
    text = query.get(name, [""])[0]
    try:
        return parse_time(text) if text else None
    except TimeError as e:
        raise BadRequest(f"{name}: {e}") from None


def post_fields(kind: str, body: object) -> dict[str, str]:
    """The fields of a POST to /api/<kind>: a JSON object holding only that form's fields, each text (an absent
    one is ""); BadRequest otherwise."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    allowed = _POST_FIELDS[kind]
    unknown = sorted(str(k) for k in body if k not in allowed)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0][:40]!r} (a {kind} has {', '.join(allowed)})")
    bad = [k for k in allowed if not isinstance(body.get(k, ""), str)]
    if bad:
        raise BadRequest(f"{bad[0]} must be text")
    return {k: body.get(k, "") for k in allowed}


def parse_seq(seq_s: str) -> int:
    if not _SEQ.fullmatch(seq_s) or int(seq_s) > SEQ_MAX:
        raise BadRequest("seq must be a non-negative integer")
    return int(seq_s)


def _obj(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _text(v: Any, n: int = 300) -> str:
    return v[:n] if isinstance(v, str) else ""


def dtc_row(seq: int, kind: str, ts: Any, data: dict[str, Any]) -> dict[str, Any]:
    """A DTC event for people: its SPN/FMI and their words, by the one rule of DtcText.words (the vehicle's own words
    when they are about this DTC, else made here from the built-in SPN names: events from before vehicles sent words,
    or words about another DTC)."""
    spn, fmi = _int(data.get("spn")), _int(data.get("fmi"))
    said = _text(data.get("text"), SAID_MAX)
    text = _DTC_TEXT.words(spn, fmi, said)
    if kind == "dtc_previous":  # a DM2 answer: the DTCs the ECU remembers, each with its own words
        parts = []
        dtcs = data.get("dtcs")
        for d in dtcs if isinstance(dtcs, list) else []:
            d = _obj(d)
            t = _DTC_TEXT.words(_int(d.get("spn")), _int(d.get("fmi")), d.get("text"))
            if t:
                parts.append(t)
        text = "previously active: " + ("; ".join(parts[:16]) if parts else "none")
    elif kind == "dtc_storm":
        text = f"DTC storm: {_int(data.get('events')) or 0} events in {finite(data.get('window_s')) or 60:g} s"
    elif kind == "dtc_flapping":
        text = f"{text} (flapping: {_int(data.get('transitions')) or 0} changes, ended {_text(data.get('state'), 8)})"
    lamps = [k for k in ("mil", "red_stop", "amber_warning", "protect") if data.get(k) in (1, True, "on")]
    return {"seq": seq, "ts": finite(ts), "kind": kind, "source": _text(data.get("source"), 64),
            "sa": _int(data.get("sa")), "spn": spn, "fmi": fmi, "occurrence": _int(data.get("occurrence")),
            # The vehicle's SPN name goes with its words: shown only where they were.
            "spn_name": (_text(data.get("spn_name")) if said and text == said else "")
            or (_DTC_TEXT.spn_name(spn) if spn is not None else None),
            # FMI words are the public table's, whatever the vehicle said.
            "fmi_text": fmi_text(fmi) if fmi is not None and 0 <= fmi <= FMI_MAX else "", "text": text, "lamps": lamps}


def active_dtcs(status: Any) -> dict[str, Any]:
    """The vehicle's active DTCs as its last status lists them (cloud_sync/present.py `status_dtcs` checks them),
    each with its words by DtcText.words: `from` "status"; or `from` "events" and an empty list when the status lists
    none (an agent from before it did, or the Will of a vehicle that went away): the page then points at the DTC
    events, the assistant rebuilds the set from them."""
    listed = status_dtcs(_obj(status))
    if listed is None:
        return {"from": "events", "active": [], "more": 0, "ignored": 0, "reported": None}
    rows = [{"source": d["source"], "spn": d["spn"], "fmi": d["fmi"], "occurrence": d["occurrence"],
             "text": _DTC_TEXT.words(d["spn"], d["fmi"], d["text"]), "lamps": [k for k in LAMPS if d[k] == 1]}
            for d in listed.active]
    return {"from": "status", "active": rows, "more": listed.more, "ignored": listed.ignored,
            "reported": finite(_obj(status).get("ts"))}


class Api:
    """The JSON side, without HTTP: easy to test, and the HTTP layer stays a thin shell."""

    def __init__(self, db: FleetDB, cfg: WebConfig, quality: QualityConfig | None = None) -> None:
        self.db = db
        self.cfg = cfg
        self.quality_cfg = quality if quality is not None else QualityConfig()
        self._lock = threading.Lock()  # one database connection behind many server threads

    def quality(self, query: Query) -> dict[str, Any]:
        since, until = _time(query, "since"), _time(query, "until")
        model = query.get("model", [""])[0] or None
        with self._lock:
            try:
                return Reports(self.db).quality(self.quality_cfg, since, until, model)
            except LearningError as e:
                raise BadRequest(str(e)) from None

    def verdicts(self, query: Query) -> dict[str, Any]:
        alert_id, vehicle = query.get("alert_id", [""])[0], query.get("vehicle", [""])[0] or None
        with self._lock:
            try:
                vehicle, history = self.db.verdict_history(alert_id, vehicle)
            except LearningError as e:
                raise BadRequest(str(e)) from None
        return {"vehicle": vehicle, "alert_id": alert_id, "history": [h.to_dict() for h in history]}

    def add_verdict(self, body: object) -> dict[str, Any]:
        f = post_fields("verdict", body)
        with self._lock:
            try:
                v = self.db.add_verdict(f["alert_id"], f["label"], fault=f["fault"] or None, note=f["note"],
                                        by=f["by"], vehicle=f["vehicle"] or None)
            except LearningError as e:
                raise BadRequest(str(e)) from None
        return {"verdict": v.to_dict()}

    def add_breakdown(self, body: object) -> dict[str, Any]:
        f = post_fields("breakdown", body)
        try:
            at = parse_time(f["at"])
        except TimeError as e:
            raise BadRequest(f"at: {e}") from None
        with self._lock:
            try:
                b = self.db.add_breakdown(f["vehicle"], at, f["fault"], note=f["note"], by=f["by"])
            except LearningError as e:
                raise BadRequest(str(e)) from None
        return {"breakdown": b.to_dict()}

    def fleet(self) -> dict[str, Any]:
        with self._lock:
            return {"vehicles": Reports(self.db).fleet()}

    def rollouts(self) -> dict[str, Any]:
        with self._lock:
            return {"rollouts": Reports(self.db).rollouts()}

    def alerts(self, query: Query) -> dict[str, Any]:
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
            rows = Reports(self.db).alerts(vehicle, state, since)
        return {"alerts": [clean_alert(a) for a in reversed(rows)]}

    def alert(self, vehicle: str, seq_s: str) -> dict[str, Any] | None:
        """An alert with the signals around it: `series` {signal: [[ts, value], ...]} over `span` (the window the
        model saw with `context_s` either side), `view` (that span fitted to the samples there are, never narrower
        than the window), `units` {signal: unit as the vehicle's signal table names it, from its DBC}, `top` (the
        signals of the top features, most contributing first)."""
        seq = parse_seq(seq_s)
        with self._lock:
            raw = Reports(self.db).alert(vehicle, seq)
            if raw is None:
                return None
            a = clean_alert(raw)
            top = _top_signals(a)
            w0 = a["window_start"] if a["window_start"] is not None else a["ts"]
            w1 = a["window_end"] if a["window_end"] is not None else w0
            if w0 is None or w1 is None or w1 < w0:
                return {"alert": a, "series": {}, "span": None, "view": None, "units": {}, "top": top}
            span = [w0 - self.cfg.context_s, w1 + self.cfg.context_s]
            # One query per signal so a fast signal cannot use up the point budget of the others, and an alert
            # naming no signal plots nothing (names=None would mean every signal the vehicle has).
            series: dict[str, list[tuple[float, float]]] = {}
            for name in _alert_signals(a, self.cfg.max_signals):
                series.update(Reports(self.db).signal_series(vehicle, span[0], span[1], [name],
                                                             max_points=self.cfg.max_points))
            units = self._units(list(series))
        ts = [p[0] for pts in series.values() for p in pts]
        view = [min(min(ts), w0), max(max(ts), w1)] if ts else [w0, w1]
        return {"alert": a, "series": series, "span": span, "view": view, "units": units, "top": top}

    def _units(self, names: list[str]) -> dict[str, str]:
        if not names:
            return {}
        rows = self.db.read("SELECT name, unit FROM signals WHERE name IN (" + ",".join("?" * len(names)) +
                            ") ORDER BY id", names)
        out: dict[str, str] = {}
        for name, unit in rows:
            if unit and str(name) not in out:  # a signal sent under two units: the first one stored
                out[str(name)] = str(unit)[:32]
        return out

    def vehicle(self, vehicle: str, query: Query) -> dict[str, Any] | None:
        """A vehicle's page: its fleet row (last status, model now) and its history over [since, until) (default:
        the week to now, or to the vehicle's last contact when that is older): alerts, DTC events with their words,
        drift reports, evictions, and the model versions its alerts and drift reports named. Each list newest first,
        at most HISTORY_ROWS (`truncated` names those cut). And `active_dtcs`, what its last status says is active now
        (`active_dtcs` above)."""
        until_q, since_q = _time(query, "until"), _time(query, "since")
        until = time.time() if until_q is None else until_q
        lim = f" ORDER BY ts DESC, seq DESC LIMIT {HISTORY_ROWS + 1}"
        with self._lock:
            row = next(iter(Reports(self.db).fleet(vehicle=vehicle)), None)
            if row is None:
                return None
            status = self.db.read("SELECT status FROM vehicles WHERE vehicle=?", (vehicle,))
            # Unchosen, the period is the week to now, reaching back to the week before the vehicle's last contact
            # when that is older: a harvester parked for a month still shows what it did last.
            since = since_q if since_q is not None else min(until, row["last_seen"]) - DEFAULT_HISTORY_S
            if not since < until:
                raise BadRequest("the period is empty: since must be before until")
            alerts = self.db.read("SELECT seq, record FROM alerts WHERE vehicle=? AND ts>=? AND ts<?" + lim,
                                  (vehicle, since, until))
            marks = {(str(v), str(a)): x for (v, a), x in self.db.verdicts_now().items() if v == vehicle}
            kinds = ",".join("?" * len(DTC_KINDS))
            dtcs = self.db.read(f"SELECT seq, kind, ts, record FROM events WHERE vehicle=? AND kind IN ({kinds}) "
                                "AND ts>=? AND ts<?" + lim, (vehicle, *DTC_KINDS, since, until))
            drift = self.db.read("SELECT seq, ts, record FROM events WHERE vehicle=? AND kind='drift' AND ts>=? "
                                 "AND ts<?" + lim, (vehicle, since, until))
            evicted = self.db.read("SELECT seq, ts, record FROM events WHERE vehicle=? AND kind='evicted' AND ts>=? "
                                   "AND ts<?" + lim, (vehicle, since, until))
        truncated = [k for k, rows in (("alerts", alerts), ("dtcs", dtcs), ("drift", drift), ("evictions", evicted))
                     if len(rows) > HISTORY_ROWS]
        out_alerts = []
        for seq, rec in alerts[:HISTORY_ROWS]:
            a = clean_alert({**_obj(_load(rec)), "vehicle": vehicle, "seq": int(seq)})
            v = marks.get((vehicle, a["alert_id"]))
            a["verdict"] = None if v is None else {"label": v.label, "fault": v.fault, "by": v.by, "at": v.at,
                                                  "note": v.note}
            out_alerts.append(a)
        out_dtcs = [dtc_row(int(seq), str(kind), ts, _obj(_obj(_load(rec)).get("data")))
                    for seq, kind, ts, rec in dtcs[:HISTORY_ROWS]]
        out_drift = []
        for seq, ts, rec in drift[:HISTORY_ROWS]:
            d = _obj(_obj(_load(rec)).get("data"))
            feats = d.get("drifted")
            out_drift.append({"seq": int(seq), "ts": finite(ts), "drift": d.get("drift") is True,
                              "model": _text(d.get("model"), 256), "model_version": _text(d.get("model_version"), 256),
                              "drifted": [_text(f, 120) for f in feats[:20]] if isinstance(feats, list) else []})
        out_evicted = []
        for seq, ts, rec in evicted[:HISTORY_ROWS]:
            d = _obj(_obj(_load(rec)).get("data"))
            ranges = [[r[0], r[1]] for r in d.get("ranges") or [] if isinstance(r, list) and len(r) == 2
                      and _int(r[0]) is not None and _int(r[1]) is not None]
            out_evicted.append({"seq": int(seq), "ts": finite(ts), "ranges": ranges[:50],
                                "seqs": sum(hi - lo + 1 for lo, hi in ranges), "samples": _int(d.get("samples")),
                                "records": _int(d.get("records"))})
        out: dict[str, Any] = plain({
            "vehicle": row, "period": [since, until], "alerts": out_alerts, "dtcs": out_dtcs,
            "active_dtcs": active_dtcs(_load(status[0][0]) if status and status[0][0] else {}), "drift": out_drift,
            "evictions": out_evicted, "models": _versions(out_alerts, out_drift), "truncated": truncated})
        return out

    # --- what the live stream (/api/stream) polls ----------------------------------------------------------------

    def alert_marks(self) -> dict[str, tuple[int, int]]:
        """Each vehicle's alert records stored (the count ingest keeps) and its highest alert seq: any new record
        changes the first, one above all before it the second (a record backfilled below it changes only the
        count)."""
        with self._lock:
            counts = {str(v): int(n) for v, n in self.db.read(
                "SELECT vehicle, value FROM counters WHERE name='stored:alerts'")}
            tops = {str(v): int(s) for v, s in self.db.read("SELECT vehicle, MAX(seq) FROM alerts GROUP BY vehicle")}
        return {v: (counts.get(v, 0), tops[v]) for v in tops}

    def alerts_after(self, marks: dict[str, tuple[int, int]], now: dict[str, tuple[int, int]], limit: int = 100
                     ) -> list[dict[str, Any]]:
        """The alert records stored since `marks` was read (`now` is the later reading) above each vehicle's
        highest seq then, newest first (a record backfilled below it is not among them: the page reloads its list
        on any change anyway)."""
        out: list[dict[str, Any]] = []
        with self._lock:
            for vehicle, (_, hi) in now.items():
                lo = marks.get(vehicle, (0, -1))[1]
                if hi > lo:
                    out += [{**_obj(_load(rec)), "vehicle": vehicle, "seq": int(seq)} for seq, rec in self.db.read(
                        f"SELECT seq, record FROM alerts WHERE vehicle=? AND seq>? ORDER BY seq DESC LIMIT {limit}",
                        (vehicle, lo))]
        return [clean_alert(a) for a in sorted(out, key=lambda a: -(finite(a.get("ts")) or 0))[:limit]]


def _load(rec: Any) -> Any:
    try:
        return json.loads(rec)
    except (TypeError, ValueError, RecursionError):
        return {}


def _versions(alerts: list[dict[str, Any]], drift: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The model versions the period's alerts and drift reports named, each with when it was first and last named
    there: what the vehicle ran when (its reports are the evidence; the cloud never sees the switch itself)."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for kind, rows in (("alerts", alerts), ("drift_reports", drift)):
        for r in rows:
            if not (r["model"] and r["model_version"]) or r["ts"] is None:
                continue
            v = seen.setdefault((r["model"], r["model_version"]), {
                "model": r["model"], "version": r["model_version"], "first": r["ts"], "last": r["ts"],
                "alerts": 0, "drift_reports": 0})
            v["first"], v["last"] = min(v["first"], r["ts"]), max(v["last"], r["ts"])
            v[kind] += 1
    return sorted(seen.values(), key=lambda v: -v["last"])
