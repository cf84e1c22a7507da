"""What people read from the cloud database: per-vehicle statistics and gaps, the fleet overview (with each
vehicle's model: active, desired, last step), rollouts, alerts and the signals around them, refused messages.
Read-only, apart from ingest (cloud_sync/db.py), through `FleetDB.read`; the same SQL on both engines (`?`
placeholders; a backend rewrites them)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cloud_sync import rollout as ro
from cloud_sync.db import FleetDB, RolloutInfo, RolloutVehicle
from cloud_sync.migrations import STORED_KINDS
from cloud_sync.present import finite
from harvester_common import modelwire as mw
from harvester_common import wire
from harvester_common.seqranges import holes, merge_ranges, subtract

MAX_COUNTERS = 50  # non-zero counters per vehicle on the fleet page (largest first)
MAX_SOURCES = 32  # sources per vehicle whose last up/down is shown
SOURCE_EVENTS_READ = 500  # a vehicle's latest source_down/source_up events read to find each source's last one
MAX_TEXT = 300  # characters kept of a counter name or an event's error text
MAX_ROLLOUTS = 20  # rollouts on the fleet page, newest first (`cloud-sync rollout status --id N` shows any)


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

    def stats(self) -> list[VehicleStats]:
        out: list[VehicleStats] = []
        with self.db.read_lock():
            vehicles = self.db.read(
                "SELECT vehicle, fleet, online, last_seen, status FROM vehicles ORDER BY fleet, vehicle")
            stored: dict[str, dict[str, int]] = {}
            for vehicle, name, value in self.db.read(
                    "SELECT vehicle, name, value FROM counters WHERE name LIKE ?", ("stored:%",)):
                stored.setdefault(vehicle, {})[name.split(":", 1)[1]] = int(value)
            received: dict[str, list[tuple[int, int]]] = {}
            for vehicle, lo, hi in self.db.read("SELECT vehicle, seq_lo, seq_hi FROM ranges"):  # merged at ingest
                received.setdefault(vehicle, []).append((int(lo), int(hi)))
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
                    )
                )
        return out

    def fleet(self, now: float | None = None) -> list[dict[str, Any]]:
        """One row per vehicle for people: what `cloud-sync fleet` and the web page show (docs/cloud_sync.md)."""
        now = time.time() if now is None else now
        open_alerts: dict[str, int] = {}
        for vehicle, n in self.db.read(
            "SELECT a.vehicle, COUNT(*) FROM alerts a WHERE a.seq = (SELECT MAX(b.seq) FROM alerts b "
            "WHERE b.vehicle=a.vehicle AND b.alert_id=a.alert_id) AND a.state='open' GROUP BY a.vehicle"
        ):
            open_alerts[vehicle] = int(n)
        models = self.db.vehicle_models()
        desired = self.db.desired_models()
        rows = []
        for v in self.stats():
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
        q = "SELECT a.vehicle, a.seq, a.record FROM alerts a WHERE 1=1"
        args: list[Any] = []
        if vehicle:
            q += " AND a.vehicle=?"
            args.append(vehicle)
        if state:
            q += (" AND a.state=? AND a.seq = (SELECT MAX(b.seq) FROM alerts b "
                  "WHERE b.vehicle=a.vehicle AND b.alert_id=a.alert_id)")
            args.append(state)
        if since is not None:
            q += " AND a.ts>=?"
            args.append(since)
        rows = self.db.read(q + " ORDER BY a.ts, a.seq", args)
        # The row's key last: a record's own "vehicle" or "seq" (the vehicle's text) never renames it.
        return [{**json.loads(r), "vehicle": v, "seq": int(s)} for v, s, r in rows]

    def alert(self, vehicle: str, seq: int) -> dict[str, Any] | None:
        rows = self.db.read("SELECT record FROM alerts WHERE vehicle=? AND seq=?", (vehicle, seq))
        return {**json.loads(rows[0][0]), "vehicle": vehicle, "seq": seq} if rows else None

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


def _obj(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _int(v: Any) -> int:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else 0
