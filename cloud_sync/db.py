"""The cloud's database (SQLite): samples, alerts and events stored once per (vehicle, seq).

`ingest` writes a whole batch in one transaction with INSERT OR IGNORE on the (vehicle, seq) primary keys, so a
resent batch stores nothing twice and the difference is counted as duplicates. `synchronous=FULL`: an
acknowledged batch must survive a power cut, because the vehicle deletes it on our word.
Received sequence ranges are kept per segment, so gaps are computed from ranges, not by scanning samples.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent import wire
from agent.seqranges import holes, merge_ranges, subtract

SCHEMA_VERSION = 1

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS vehicles (
        vehicle TEXT PRIMARY KEY, fleet TEXT NOT NULL, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
        online INTEGER NOT NULL DEFAULT 0, status TEXT)""",
    """CREATE TABLE IF NOT EXISTS signals (
        id INTEGER PRIMARY KEY, name TEXT NOT NULL, source TEXT NOT NULL, unit TEXT NOT NULL,
        UNIQUE (name, source, unit))""",
    """CREATE TABLE IF NOT EXISTS samples (
        vehicle TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL, signal_id INTEGER NOT NULL,
        value REAL NOT NULL, PRIMARY KEY (vehicle, seq)) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS samples_by_signal_time ON samples (vehicle, signal_id, ts)",
    """CREATE TABLE IF NOT EXISTS alerts (
        vehicle TEXT NOT NULL, seq INTEGER NOT NULL, alert_id TEXT NOT NULL, state TEXT NOT NULL, ts REAL NOT NULL,
        score REAL, model TEXT, model_version TEXT, label TEXT, record TEXT NOT NULL,
        PRIMARY KEY (vehicle, seq))""",
    "CREATE INDEX IF NOT EXISTS alerts_by_id ON alerts (alert_id)",
    "CREATE INDEX IF NOT EXISTS alerts_by_time ON alerts (ts)",
    """CREATE TABLE IF NOT EXISTS events (
        vehicle TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, ts REAL NOT NULL, record TEXT NOT NULL,
        PRIMARY KEY (vehicle, seq))""",
    """CREATE TABLE IF NOT EXISTS ranges (
        vehicle TEXT NOT NULL, seq_lo INTEGER NOT NULL, seq_hi INTEGER NOT NULL, kind TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS ranges_by_vehicle ON ranges (vehicle, seq_lo)",
    """CREATE TABLE IF NOT EXISTS counters (
        vehicle TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL, PRIMARY KEY (vehicle, name))""",
]


class CloudDBError(RuntimeError):
    pass


@dataclass(slots=True)
class IngestResult:
    new: int = 0
    duplicates: int = 0


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


class CloudDB:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as e:
            raise CloudDBError(f"{self.path}: not a usable database: {e}") from None
        self.db.execute("PRAGMA synchronous=FULL")
        self._lock = threading.RLock()
        self._signal_ids: dict[tuple[str, str, str], int] = {}
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            v = int(self.db.execute("PRAGMA user_version").fetchone()[0])
            if v > SCHEMA_VERSION:
                raise CloudDBError(f"{self.path}: schema version {v} is newer than this cloud_sync ({SCHEMA_VERSION})")
            if v < 1:
                self.db.execute("BEGIN IMMEDIATE")
                for stmt in _SCHEMA:
                    self.db.execute(stmt)
                self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                self.db.execute("COMMIT")

    # --- writing ---------------------------------------------------------------------------------------------

    def _signal_id(self, key: tuple[str, str, str]) -> int:
        sid = self._signal_ids.get(key)
        if sid is None:
            self.db.execute("INSERT OR IGNORE INTO signals (name, source, unit) VALUES (?,?,?)", key)
            row = self.db.execute("SELECT id FROM signals WHERE name=? AND source=? AND unit=?", key).fetchone()
            sid = int(row[0])
            self._signal_ids[key] = sid
        return sid

    def _count(self, vehicle: str, name: str, by: int) -> None:
        if by:
            self.db.execute(
                "INSERT INTO counters VALUES (?,?,?) "
                "ON CONFLICT (vehicle, name) DO UPDATE SET value=value+excluded.value",
                (vehicle, name, by),
            )

    def _touch(self, fleet: str, vehicle: str, now: float) -> None:
        self.db.execute(
            "INSERT INTO vehicles (vehicle, fleet, first_seen, last_seen) VALUES (?,?,?,?) "
            "ON CONFLICT (vehicle) DO UPDATE SET last_seen=excluded.last_seen, fleet=excluded.fleet",
            (vehicle, fleet, now, now),
        )

    def _ingest_one(self, b: wire.Batch, now: float) -> IngestResult:
        res = IngestResult()
        v = b.vehicle
        self._touch(b.fleet, v, now)
        for seg in b.segments:
            c = seg.columns
            ids = np.array([self._signal_id(k) for k in c.signals], np.int64) if c is not None else None
            before = self.db.total_changes  # counted after the signal rows, so only records count
            if c is not None and ids is not None:
                n = len(c)
                rows = zip(
                    [v] * n,
                    range(seg.seq_lo, seg.seq_lo + n),
                    (c.ts_us / 1e6).tolist(),
                    ids[c.sig].tolist(),
                    c.value.tolist(),
                    strict=True,
                )
                self.db.executemany("INSERT OR IGNORE INTO samples VALUES (?,?,?,?,?)", rows)
                attempted = n
            elif seg.kind == "alert":
                r = seg.record or {}
                self.db.execute(
                    "INSERT OR IGNORE INTO alerts VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        v,
                        seg.seq_lo,
                        str(r.get("alert_id", "")),
                        str(r.get("state", "")),
                        _num(r.get("ts"), now),
                        _num(r.get("score"), None),
                        str(r.get("model", "")),
                        str(r.get("model_version", "")),
                        str(r.get("label", "")),
                        json.dumps(r),
                    ),
                )
                attempted = 1
            else:
                r = seg.record or {}
                self.db.execute(
                    "INSERT OR IGNORE INTO events VALUES (?,?,?,?,?)",
                    (v, seg.seq_lo, str(r.get("kind", seg.kind)), _num(r.get("ts"), now), json.dumps(r)),
                )
                attempted = 1
            inserted = self.db.total_changes - before
            res.new += inserted
            res.duplicates += attempted - inserted
            if inserted:
                self.db.execute("INSERT INTO ranges VALUES (?,?,?,?)", (v, seg.seq_lo, seg.seq_hi, seg.kind))
        self._count(v, "duplicates", res.duplicates)
        self._count(v, "batches", 1)
        return res

    def ingest(self, batches: list[wire.Batch]) -> list[IngestResult]:
        """Store batches in ONE transaction; when this returns, they are durable and may be acknowledged."""
        now = time.time()
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                out = [self._ingest_one(b, now) for b in batches]
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL, I/O error)
                    self.db.execute("ROLLBACK")
                raise
        return out

    def set_status(self, fleet: str, vehicle: str, status: dict[str, Any]) -> None:
        now = time.time()
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            self._touch(fleet, vehicle, now)
            self.db.execute(
                "UPDATE vehicles SET online=?, status=? WHERE vehicle=?",
                (1 if status.get("state") == "online" else 0, json.dumps(status), vehicle),
            )
            self.db.execute("COMMIT")

    def count_rejected(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self._count("", f"rejected:{reason}", n)

    # --- reading ---------------------------------------------------------------------------------------------

    def rejected(self) -> dict[str, int]:
        with self._lock:
            rows = self.db.execute("SELECT name, value FROM counters WHERE vehicle='' AND name LIKE 'rejected:%'")
            return {name.split(":", 1)[1]: int(value) for name, value in rows}

    def stats(self) -> list[VehicleStats]:
        out: list[VehicleStats] = []
        with self._lock:
            vehicles = self.db.execute(
                "SELECT vehicle, fleet, online, last_seen, status FROM vehicles ORDER BY fleet, vehicle"
            ).fetchall()
            for vehicle, fleet, online, last_seen, status in vehicles:
                counts = {
                    k: int(self.db.execute(f"SELECT COUNT(*) FROM {k} WHERE vehicle=?", (vehicle,)).fetchone()[0])
                    for k in ("samples", "alerts", "events")
                }
                ranges = [
                    (int(a), int(b))
                    for a, b in self.db.execute("SELECT seq_lo, seq_hi FROM ranges WHERE vehicle=?", (vehicle,))
                ]
                covered = merge_ranges(ranges)
                highest = covered[-1][1] if covered else 0
                evicted: list[tuple[int, int]] = []
                for (rec,) in self.db.execute(
                    "SELECT record FROM events WHERE vehicle=? AND kind='evicted'", (vehicle,)
                ):
                    for r in json.loads(rec).get("data", {}).get("ranges", []):
                        if isinstance(r, list) and len(r) == 2:
                            evicted.append((int(r[0]), int(r[1])))
                ev = merge_ranges(evicted)
                missing = subtract(holes(covered, highest), ev)
                # A store the vehicle had to quarantine took its unsent records with it; the new store starts at
                # `seq_floor`, so the gap that ends just below a floor is explained, and reported as such.
                floors = set()
                for (rec,) in self.db.execute(
                    "SELECT record FROM events WHERE vehicle=? AND kind='store_quarantined'", (vehicle,)
                ):
                    f = json.loads(rec).get("data", {}).get("seq_floor")
                    if isinstance(f, int):
                        floors.add(f)
                quarantined = [g for g in missing if g[1] + 1 in floors]
                missing = [g for g in missing if g[1] + 1 not in floors]
                dup = self.db.execute(
                    "SELECT value FROM counters WHERE vehicle=? AND name='duplicates'", (vehicle,)
                ).fetchone()
                out.append(
                    VehicleStats(
                        vehicle=vehicle,
                        fleet=fleet,
                        records=counts,
                        highest_seq=highest,
                        duplicates=int(dup[0]) if dup else 0,
                        gaps=missing,
                        quarantined=quarantined,
                        evicted=[r for r in ev if r[0] <= highest],
                        online=bool(online),
                        last_seen=float(last_seen),
                        status=json.loads(status) if status else {},
                    )
                )
        return out

    def alerts(
        self, vehicle: str | None = None, state: str | None = None, since: float | None = None
    ) -> list[dict[str, Any]]:
        q = "SELECT vehicle, seq, record FROM alerts WHERE 1=1"
        args: list[Any] = []
        if vehicle:
            q += " AND vehicle=?"
            args.append(vehicle)
        if state:
            q += " AND state=?"
            args.append(state)
        if since is not None:
            q += " AND ts>=?"
            args.append(since)
        with self._lock:
            rows = self.db.execute(q + " ORDER BY ts, seq", args).fetchall()
        return [{"vehicle": v, "seq": s, **json.loads(r)} for v, s, r in rows]

    def close(self) -> None:
        with self._lock:
            self.db.close()


def _num(v: Any, default: float | None) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) else default
