"""What people read from the cloud database: per-vehicle statistics and gaps, the fleet overview (with each
vehicle's model: active, desired, last step), rollouts, alerts (with their verdict now) and the signals around
them, refused messages, and the quality of each model version (the queries here, the figures cloud_sync/quality.py).
Read-only, apart from ingest (cloud_sync/db.py), through `FleetDB.read`; the same SQL on both engines (`?`
placeholders; a backend rewrites them)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cloud_sync import quality as q
from cloud_sync import rollout as ro
from cloud_sync.config import QualityConfig
from cloud_sync.db import FleetDB, LearningError, RolloutInfo, RolloutVehicle, Verdict
from cloud_sync.migrations import STORED_KINDS
from cloud_sync.present import finite
from harvester_common import backfill, wire
from harvester_common import modelwire as mw
from harvester_common.seqranges import holes, merge_ranges, subtract

MAX_COUNTERS = 50  # non-zero counters per vehicle on the fleet page (largest first)
MAX_SOURCES = 32  # sources per vehicle whose last up/down is shown
SOURCE_EVENTS_READ = 500  # a vehicle's latest source_down/source_up events read to find each source's last one
MAX_TEXT = 300  # characters kept of a counter name or an event's error text
MAX_ROLLOUTS = 20  # rollouts on the fleet page, newest first (`cloud-sync rollout status --id N` shows any)
MAX_NAME = 256  # characters kept of a model name, version or label a vehicle's record names (wire's cap)
PRIOR_READ = 20  # a vehicle's latest records before a period read to find the last one naming a version


@dataclass(slots=True)
class VehicleStats:
    vehicle: str
    fleet: str
    records: dict[str, int]
    highest_seq: int
    duplicates: int
    gaps: list[list[int]]
    evicted: list[list[int]]
    quarantined: list[list[int]]
    online: bool
    last_seen: float
    status: dict[str, Any] = field(default_factory=dict)
    # Holes the vehicle still holds and sends behind its live lane: at or above its backfill position
    # (harvester_common/backfill.py; None: it never stated one, and every hole is a gap).
    backfilling: list[list[int]] = field(default_factory=list)
    backfill_from: int | None = None
    backfill_ignored: int = 0  # positions its batches stated that were not sequence numbers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Reports:
    """The reports over one database (`Reports(db).fleet()`); holds no state of its own."""

    def __init__(self, db: FleetDB) -> None:
        self.db = db

    def rejected(self) -> dict[str, int]:
        rows = self.db.read("SELECT name, value FROM counters WHERE vehicle='' AND name LIKE ?", ("rejected:%",))
        return {name.split(":", 1)[1]: int(value) for name, value in rows}

    def _event_data(self, vehicle: str, kind: str) -> list[dict[str, Any]]:
        out = []
        q = "SELECT record FROM events WHERE vehicle=? AND kind=? ORDER BY seq"
        for (rec,) in self.db.read(q, (vehicle, kind)):
            data = json.loads(rec).get("data", {})
            if isinstance(data, dict):
                out.append(data)
        return out

    def stats(self, only: str | None = None) -> list[VehicleStats]:
        """Every vehicle's, or only one vehicle's (its rows alone read: a page about one vehicle of a large fleet)."""
        out: list[VehicleStats] = []
        one, arg = ("", ()) if only is None else (" AND vehicle=?", (only,))
        with self.db.read_lock():
            vehicles = self.db.read(f"SELECT vehicle, fleet, online, last_seen, status FROM vehicles WHERE 1=1{one} "
                                    "ORDER BY fleet, vehicle", arg)
            stored: dict[str, dict[str, int]] = {}
            for v, name, value in self.db.read(
                    f"SELECT vehicle, name, value FROM counters WHERE name LIKE ?{one}", ("stored:%", *arg)):
                stored.setdefault(v, {})[name.split(":", 1)[1]] = int(value)
            positions = {str(v): int(p) for v, p in
                         self.db.read(f"SELECT vehicle, backfill_from FROM backfill WHERE 1=1{one}", arg)}
            ignored: Counter[str] = Counter()
            for v, value in self.db.read(f"SELECT vehicle, value FROM counters WHERE name LIKE ?{one}",
                                         ("backfill_ignored:%", *arg)):
                ignored[str(v)] += int(value)
            received: dict[str, list[tuple[int, int]]] = {}
            for v, lo, hi in self.db.read(f"SELECT vehicle, seq_lo, seq_hi FROM ranges WHERE 1=1{one}",
                                          arg):  # merged at ingest
                received.setdefault(v, []).append((int(lo), int(hi)))
            for vehicle, fleet, online, last_seen, status in vehicles:
                counts = {k: stored.get(vehicle, {}).get(k, 0) for k in STORED_KINDS}  # kept at ingest
                covered = merge_ranges(received.get(vehicle, []))
                highest = covered[-1][1] if covered else 0
                evicted: list[tuple[int, int]] = []
                for data in self._event_data(vehicle, "evicted"):
                    for r in data.get("ranges", []):
                        if isinstance(r, list) and len(r) == 2:
                            evicted.append((int(r[0]), int(r[1])))
                ev = merge_ranges(evicted)
                missing = subtract(holes(covered, highest), ev)
                # A store the vehicle had to quarantine took its unsent records with it; the new store starts at
                # `seq_floor`, so the gap that ends just below a floor is explained, and reported as such.
                floors = {d["seq_floor"] for d in self._event_data(vehicle, "store_quarantined")
                          if isinstance(d.get("seq_floor"), int)}
                quarantined = [g for g in missing if g[1] + 1 in floors]
                missing = [g for g in missing if g[1] + 1 not in floors]
                # What remains is lost, unless the vehicle still holds it: behind its live lane, at or above where
                # its backfill stands.
                missing, backfilling = backfill.split(missing, positions.get(vehicle))
                dup = self.db.read("SELECT value FROM counters WHERE vehicle=? AND name='duplicates'", (vehicle,))
                out.append(
                    VehicleStats(
                        vehicle=vehicle,
                        fleet=fleet,
                        records=counts,
                        highest_seq=highest,
                        duplicates=int(dup[0][0]) if dup else 0,
                        gaps=[list(g) for g in missing],
                        quarantined=[list(g) for g in quarantined],
                        evicted=[list(r) for r in ev if r[0] <= highest],
                        online=bool(online),
                        last_seen=float(last_seen),
                        status=json.loads(status) if status else {},
                        backfilling=backfilling,
                        backfill_from=positions.get(vehicle),
                        backfill_ignored=ignored[vehicle],
                    )
                )
        return out

    def fleet(self, now: float | None = None, vehicle: str | None = None) -> list[dict[str, Any]]:
        """One row per vehicle for people: what `cloud-sync fleet` and the web page show (docs/cloud_sync.md); with
        `vehicle`, that vehicle's row alone (none if unknown), its rows alone read."""
        now = time.time() if now is None else now
        one, arg = ("", ()) if vehicle is None else (" AND a.vehicle=?", (vehicle,))
        open_alerts: dict[str, int] = {}
        for v_id, n in self.db.read(
            "SELECT a.vehicle, COUNT(*) FROM alerts a WHERE a.seq = (SELECT MAX(b.seq) FROM alerts b "
            f"WHERE b.vehicle=a.vehicle AND b.alert_id=a.alert_id) AND a.state='open'{one} GROUP BY a.vehicle", arg
        ):
            open_alerts[v_id] = int(n)
        models = self.db.vehicle_models()
        desired = self.db.desired_models()
        rows = []
        for v in self.stats(vehicle):
            st = v.status
            backlog, budget, drift, evicted_vehicle = (
                _obj(st.get(k)) for k in ("backlog", "budget", "drift", "evicted"))
            rows.append({
                "vehicle": v.vehicle,
                "fleet": v.fleet,
                "online": v.online,
                "last_seen": v.last_seen,
                "last_seen_ago_s": round(max(0.0, now - v.last_seen), 1),
                "backlog": {"samples": _int(backlog.get("samples")), "records": _int(backlog.get("records"))},
                "model_version": str(st.get("model_version", "")),
                "model_status": str(st.get("model_status", "")),
                "open_alerts": open_alerts.get(v.vehicle, 0),
                "evicted": {
                    "reported_by_vehicle": {k: _int(x) for k, x in evicted_vehicle.items()},
                    "ranges_received": sum(hi - lo + 1 for lo, hi in v.evicted),
                },
                "budget": {"used_today": _int(budget.get("used_today")),
                           "daily_bytes": _int(budget.get("daily_bytes"))},
                "drift": bool(drift.get("drift", False)),
                "records": v.records,
                "gaps": len(v.gaps),
                # Holes the vehicle still holds and is sending behind its live lane: not lost (docs/delivery.md).
                "backfilling": len(v.backfilling),
                "backfilling_seqs": sum(hi - lo + 1 for lo, hi in v.backfilling),
                # The vehicle's own counters (its last status message), those not zero: name or name{label} → n.
                "metrics": {k[:MAX_TEXT]: n for k, n in wire.status_counters(st.get("metrics"), MAX_COUNTERS).items()},
                "sources": self.sources(v.vehicle),
                "model": _model_row(models.get(v.vehicle), desired.get(v.vehicle)),
            })
        return rows

    def rollout(self, rollout_id: int | None = None) -> dict[str, Any] | None:
        """One rollout (default: the latest) with its waves, each vehicle's step and the failures' reasons."""
        if rollout_id is None:
            latest = self.db.read("SELECT MAX(id) FROM rollouts")[0][0]
            if latest is None:
                return None
            rollout_id = int(latest)
        with self.db.read_lock():
            info = self.db.rollout(rollout_id)
            vehicles = self.db.rollout_vehicles(rollout_id) if info is not None else []
        return None if info is None else rollout_report(info, vehicles)

    def rollouts(self, limit: int = MAX_ROLLOUTS) -> list[dict[str, Any]]:
        """The latest `limit` rollouts, newest first, as `rollout` gives each."""
        out = []
        with self.db.read_lock():
            for info in self.db.rollouts(limit):
                out.append(rollout_report(info, self.db.rollout_vehicles(info.id)))
        return out

    def sources(self, vehicle: str) -> dict[str, dict[str, Any]]:
        """Each source's last `source_down` / `source_up` event: {source: {"up", "ts", "reason", "error"}}. A source
        that never failed has none (and is not listed)."""
        out: dict[str, dict[str, Any]] = {}
        rows = self.db.read("SELECT kind, ts, record FROM events WHERE vehicle=? AND kind IN (?, ?) "
                            "ORDER BY seq DESC LIMIT " + str(SOURCE_EVENTS_READ), (vehicle, "source_down", "source_up"))
        for kind, ts, rec in rows:
            data = _obj(_obj(json.loads(rec)).get("data"))
            name = data.get("source")
            if not isinstance(name, str) or name[:64] in out:
                continue
            if len(out) >= MAX_SOURCES:
                break
            reason, error = data.get("reason", ""), data.get("error", "")
            out[name[:64]] = {"up": kind == "source_up", "ts": finite(ts),
                              "reason": reason[:64] if isinstance(reason, str) else "",
                              "error": error[:MAX_TEXT] if isinstance(error, str) else ""}
        return dict(sorted(out.items()))

    def alerts(
        self, vehicle: str | None = None, state: str | None = None, since: float | None = None
    ) -> list[dict[str, Any]]:
        """Alert records, oldest first. `state="open"` means alerts still open now (their latest record is the
        opening one); `"closed"`, those whose closing record has arrived (that record is listed)."""
        sql = "SELECT a.vehicle, a.seq, a.alert_id, a.record FROM alerts a WHERE 1=1"
        args: list[Any] = []
        if vehicle:
            sql += " AND a.vehicle=?"
            args.append(vehicle)
        if state:
            sql += (" AND a.state=? AND a.seq = (SELECT MAX(b.seq) FROM alerts b "
                    "WHERE b.vehicle=a.vehicle AND b.alert_id=a.alert_id)")
            args.append(state)
        if since is not None:
            sql += " AND a.ts>=?"
            args.append(since)
        with self.db.read_lock():
            rows = self.db.read(sql + " ORDER BY a.ts, a.seq", args)
            verdicts = self.db.verdicts_now() if rows else {}
        # The row's keys last: a record's own "vehicle", "seq" or "verdict" (the vehicle's text) never renames them.
        return [{**json.loads(r), "vehicle": v, "seq": int(s), "verdict": _verdict_now(verdicts.get((v, a)))}
                for v, s, a, r in rows]

    def alert(self, vehicle: str, seq: int) -> dict[str, Any] | None:
        rows = self.db.read("SELECT record FROM alerts WHERE vehicle=? AND seq=?", (vehicle, seq))
        return {**json.loads(rows[0][0]), "vehicle": vehicle, "seq": seq} if rows else None

    def quality(self, thresholds: QualityConfig, since: float | None = None, until: float | None = None,
                model: str | None = None, now: float | None = None) -> dict[str, Any]:
        """The quality report over [since, until) (default: the 30 days to now), per model version and fault
        (cloud_sync/quality.py has the rules). What it reads grows with alerts, drift reports and breakdowns, and
        with the number of times vehicles changed version, never with samples: per stretch a version ran, the
        first and last SPN 247 sample through the (vehicle, signal_id, ts) index."""
        until = (time.time() if now is None else now) if until is None else until
        since = until - q.DEFAULT_PERIOD_S if since is None else since
        if not since < until:
            raise LearningError("the period is empty: since must be before until")
        period = q.Period(since, until)
        with self.db.read_lock():
            opened, marks = self._openings(since - thresholds.lead_window_h * 3600.0, until)
            verdicts = {k: v.label for k, v in self.db.verdicts_now().items()}
            breakdowns = self.db.breakdowns(since=since, until=until)
            hour_ids = [int(r[0]) for r in self.db.read("SELECT id FROM signals WHERE name=? ORDER BY id",
                                                        (q.HOURS_SIGNAL,))]
            runs: list[q.Stretch] = []
            hours: list[float | None] = []
            drift: list[q.Drift] = []
            for (vehicle,) in self.db.read("SELECT vehicle FROM vehicles ORDER BY vehicle"):
                vehicle = str(vehicle)
                reports = self._drift_reports(vehicle, since, until)
                drift += [q.Drift(vehicle, m.model, m.version, flag) for m, flag in reports if flag is not None]
                named = [m for m in marks.get(vehicle, []) if m.ts >= since] + [m for m, _ in reports]
                named += self._marks_before(vehicle, since)
                for s in q.stretches(vehicle, named, period):
                    runs.append(s)
                    wanted = model is None or s.model == model  # another model's row is not reported
                    hours.append(self._engine_hours(vehicle, hour_ids, s.start, s.end) if wanted else None)
        return q.report(period, thresholds, opened, verdicts, breakdowns, runs, hours, drift, model)

    def _openings(self, since: float, until: float) -> tuple[list[q.Opened], dict[str, list[q.Mark]]]:
        """Alerts that opened in [since, until) (the first open record of each), and per vehicle the marks among
        them: the openings whose record names a model and a version."""
        opened: dict[tuple[str, str], q.Opened] = {}
        marks: dict[str, list[q.Mark]] = {}
        for vehicle, alert_id, ts, rec in self.db.read(
                "SELECT vehicle, alert_id, ts, record FROM alerts WHERE state='open' AND ts>=? AND ts<? "
                "ORDER BY ts, vehicle, seq", (since, until)):
            key = (str(vehicle), str(alert_id))
            if key in opened:
                continue
            r = _record(rec)
            model, version = _name(r.get("model")), _name(r.get("model_version"))
            opened[key] = q.Opened(key[0], key[1], float(ts), model or q.UNKNOWN, version or q.UNKNOWN,
                                   _name(r.get("label")))
            if model and version:
                marks.setdefault(key[0], []).append(q.Mark(float(ts), model, version))
        return list(opened.values()), marks

    def _drift_reports(self, vehicle: str, since: float, until: float) -> list[tuple[q.Mark, bool | None]]:
        """The vehicle's drift reports in [since, until) that name a version: each as a mark, with its flag (None
        when the flag is not a boolean: the report still says which version ran)."""
        out = []
        for ts, rec in self.db.read("SELECT ts, record FROM events WHERE vehicle=? AND kind='drift' AND ts>=? "
                                    "AND ts<? ORDER BY ts, seq", (vehicle, since, until)):
            data = _obj(_record(rec).get("data"))
            model, version, flag = _name(data.get("model")), _name(data.get("model_version")), data.get("drift")
            if model and version:
                out.append((q.Mark(float(ts), model, version), flag if isinstance(flag, bool) else None))
        return out

    def _marks_before(self, vehicle: str, t: float) -> list[q.Mark]:
        """The vehicle's last opening and last drift report before `t` that name a version (of its latest
        PRIOR_READ of each: a longer run of malformed records leaves the version before `t` unknown)."""
        out: list[q.Mark] = []
        for sql, in_data in (
                ("SELECT ts, record FROM alerts WHERE vehicle=? AND state='open' AND ts<? ORDER BY ts DESC", False),
                ("SELECT ts, record FROM events WHERE vehicle=? AND kind='drift' AND ts<? ORDER BY ts DESC", True)):
            for ts, rec in self.db.read(f"{sql} LIMIT {PRIOR_READ}", (vehicle, t)):
                r = _record(rec)
                if in_data:  # a drift event: what it is about is in its data
                    r = _obj(r.get("data"))
                model, version = _name(r.get("model")), _name(r.get("model_version"))
                if model and version:
                    out.append(q.Mark(float(ts), model, version))
                    break
        return out

    def _engine_hours(self, vehicle: str, signal_ids: Sequence[int], t0: float, t1: float) -> float | None:
        """Engine hours of a vehicle in [t0, t1): the largest trusted rise among its SPN 247 signals (one per
        source), each from two rows read through the (vehicle, signal_id, ts) index."""
        best: float | None = None
        for sid in signal_ids:
            ends = []
            for order in ("ASC", "DESC"):
                rows = self.db.read("SELECT ts, value FROM samples WHERE vehicle=? AND signal_id=? AND ts>=? AND ts<? "
                                    f"ORDER BY ts {order} LIMIT 1", (vehicle, sid, t0, t1))
                ends.append((float(rows[0][0]), float(rows[0][1])) if rows else None)
            h = q.hours_rise(ends[0], ends[1])
            if h is not None and (best is None or h > best):
                best = h
        return best

    def signal_series(
        self, vehicle: str, t0: float, t1: float, names: Sequence[str] | None = None, *, max_points: int
    ) -> dict[str, list[tuple[float, float]]]:
        """`Message.Signal` → [(ts, value)] of one vehicle between t0 and t1 (the plot around an alert)."""
        q = ("SELECT g.name, s.ts, s.value FROM samples s JOIN signals g ON g.id = s.signal_id "
             "WHERE s.vehicle=? AND s.ts BETWEEN ? AND ?")
        args: list[Any] = [vehicle, t0, t1]
        if names:
            q += " AND g.name IN (" + ",".join("?" * len(names)) + ")"
            args += list(names)
        out: dict[str, list[tuple[float, float]]] = {}
        for name, ts, value in self.db.read(q + " ORDER BY g.name, s.ts LIMIT " + str(int(max_points)), args):
            out.setdefault(name, []).append((float(ts), float(value)))
        return out


def _model_row(status: mw.ModelStatus | None, desired: RolloutInfo | None) -> dict[str, Any]:
    """A fleet row's `model`: what the vehicle says it runs and did last (its latest `model/status`), and what the
    cloud last asked it to run (the rollout whose desired model it was sent and that has not cleared it)."""
    active = status.active if status is not None else None
    return {
        "active": {"name": active["name"], "version": active["version"]} if active else None,
        "desired": {"name": desired.name, "version": desired.version, "rollout": desired.id}
        if desired is not None else None,
        "state": status.state if status is not None else "",
        "reason": status.reason if status is not None else "",
    }


def rollout_report(info: RolloutInfo, vehicles: Sequence[RolloutVehicle]) -> dict[str, Any]:
    """A rollout for people and scripts (`cloud-sync rollout status --json`, the fleet page). Waves are numbered from
    1; `progress` counts a wave's vehicles: sent their desired model, active and healthy, failed."""
    waves: list[dict[str, Any]] = []
    for n in range(info.waves):
        members = [v for v in vehicles if v.wave == n]
        steps = [v.step() for v in members]
        waves.append({
            "number": n + 1,
            "current": n == info.wave and info.state in ro.LIVE_STATES,
            "vehicles": [{"vehicle": v.vehicle, "fleet": v.fleet, "state": v.state, "healthy": v.healthy,
                          "reason": v.reason, "figures": v.figures, "sent_at": v.sent_at,
                          "cleared_at": v.cleared_at} for v in members],
            "counts": dict(sorted(Counter(s.state for s in steps).items())),
            "progress": {"total": len(members), "sent": sum(v.sent_at is not None for v in members),
                         "active_healthy": sum(s.succeeded for s in steps), "failed": sum(s.failed for s in steps)},
        })
    return {
        "id": info.id, "name": info.name, "version": info.version, "package_sha256": info.package_sha256,
        "mode": info.mode, "state": info.state, "reason": info.reason, "current_wave": info.wave + 1,
        "success_threshold": info.success_threshold, "error_threshold": info.error_threshold, "plan": info.plan,
        "created_by": info.created_by, "created_at": info.created_at, "updated_at": info.updated_at,
        "waves": waves,
        "failed": [{"vehicle": v.vehicle, "wave": v.wave + 1, "state": v.state, "reason": v.reason}
                   for v in vehicles if v.step().failed],
    }


def _verdict_now(v: Verdict | None) -> dict[str, Any] | None:
    return None if v is None else {"label": v.label, "fault": v.fault, "note": v.note, "by": v.by, "at": v.at,
                                   "id": v.id}


def _record(text: Any) -> dict[str, Any]:
    """A stored record (a vehicle's JSON text) as an object; {} for anything else."""
    try:
        v = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return {}
    return v if isinstance(v, dict) else {}


def _name(v: Any) -> str:
    return v[:MAX_NAME] if isinstance(v, str) else ""


def _obj(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _int(v: Any) -> int:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else 0
