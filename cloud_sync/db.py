"""The cloud's database: samples, alerts and events stored once per (vehicle, seq).

`FleetDB` holds everything both backends share: how a batch is stored, how gaps are explained, the fleet
queries. `CloudDB` is SQLite (the zero-configuration default); `cloud_sync.db_postgres.PostgresDB` is PostgreSQL
for a fleet, with the same schema, the same SQL where the dialects agree, and COPY for samples.

`ingest` writes a whole group of batches in one transaction; inserts skip rows whose (vehicle, seq) key is already
stored, so a resent batch stores nothing twice and the difference is counted as duplicates. Commits are durable
(SQLite `synchronous=FULL`, PostgreSQL's default `synchronous_commit`): the vehicle deletes a record on our ack.
Received sequence ranges are kept merged (one row per stretch without a hole), so gaps are computed from a few
rows, not by scanning samples; and the records stored per vehicle are counted in the same transaction, so the
reports never COUNT(*) the history.
"""

from __future__ import annotations

import abc
import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from harvester_common import wire
from harvester_common.seqranges import holes, merge_ranges, subtract

SCHEMA_VERSION = 3

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

# Schema steps after version 1, for both backends (plain SQL both dialects accept): indexes for the fleet queries.
_SCHEMA_V2 = [
    "CREATE INDEX IF NOT EXISTS alerts_by_vehicle ON alerts (vehicle, alert_id, seq)",
    "CREATE INDEX IF NOT EXISTS events_by_vehicle_kind ON events (vehicle, kind)",
]

# Version 3: records stored per vehicle and kind, kept in `counters` ("stored:samples", "stored:alerts",
# "stored:events") by the ingest transaction itself, so the fleet reports read one row instead of COUNT(*) over the
# whole history. A database from before starts from one full count here (once).
STORED_KINDS = ("samples", "alerts", "events")
_SCHEMA_V3 = [
    f"INSERT INTO counters (vehicle, name, value) SELECT vehicle, 'stored:{k}', COUNT(*) FROM {k} GROUP BY vehicle"
    for k in STORED_KINDS
] + [
    # And received ranges merged into one row per stretch without a hole (ingest keeps them so from now on): a
    # range starts a new stretch unless it overlaps or touches the ranges before it.
    """INSERT INTO ranges (vehicle, seq_lo, seq_hi, kind)
       SELECT vehicle, MIN(seq_lo), MAX(seq_hi), 'merged' FROM (
         SELECT vehicle, seq_lo, seq_hi,
                SUM(fresh) OVER (PARTITION BY vehicle ORDER BY seq_lo, seq_hi ROWS UNBOUNDED PRECEDING) AS stretch
         FROM (SELECT vehicle, seq_lo, seq_hi,
                      CASE WHEN seq_lo <= MAX(seq_hi) OVER (PARTITION BY vehicle ORDER BY seq_lo, seq_hi
                                                           ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) + 1
                           THEN 0 ELSE 1 END AS fresh
               FROM ranges) a) b
       GROUP BY vehicle, stretch""",
    "DELETE FROM ranges WHERE kind <> 'merged'",
]


class CloudDBError(RuntimeError):
    """The database cannot be used (unreachable, locked, full, I/O error): nothing was stored; try again later."""


class UnstorableError(ValueError):
    """A batch the database refused because of what it holds (a value out of range, a constraint): storing it again
    fails again. The transaction rolled back; the database itself is fine."""


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


class Cursor(Protocol):
    """What both drivers' cursors offer (DB-API 2)."""

    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: Any, params: Any = ..., /) -> Any: ...
    def executemany(self, sql: Any, params: Any, /) -> Any: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class FleetDB(abc.ABC):
    """The storage logic, written once; a backend supplies transactions, reads and the bulk sample insert.
    SQL is written with `?` placeholders; a backend that wants `%s` rewrites them (`_sql`)."""

    where: str  # for messages: the file or the server

    def __init__(self) -> None:
        self._lock = threading.RLock()  # one connection per object, shared by the worker and readers
        # Signal ids known to be COMMITTED. Ids taken inside the transaction in hand wait in `_new_signal_ids`
        # until its commit: a rolled-back id may be handed to another signal later (SQLite reuses it; a
        # PostgreSQL sequence skips it), and caching it would file later samples under the wrong signal.
        self._signal_ids: dict[tuple[str, str, str], int] = {}
        self._new_signal_ids: dict[tuple[str, str, str], int] = {}

    # --- what a backend provides -----------------------------------------------------------------------------

    @abc.abstractmethod
    def _transaction(self) -> contextlib.AbstractContextManager[Cursor]:
        """A write transaction: commits when the block ends, rolls back on an exception."""

    @abc.abstractmethod
    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    @abc.abstractmethod
    def _insert_samples(
        self,
        cur: Cursor,
        vehicle: str,
        seq_lo: int,
        ts: npt.NDArray[np.float64],
        sid: npt.NDArray[np.int64],
        value: npt.NDArray[np.float64],
    ) -> int:
        """Insert one segment's samples, skipping stored (vehicle, seq) keys; returns how many were new."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def _sql(self, sql: str) -> str:
        return sql

    def _is_outage(self, e: BaseException) -> bool:
        """Whether a failed write failed because of the database (else: because of the data)."""
        return isinstance(e, CloudDBError)

    # --- writing ---------------------------------------------------------------------------------------------

    def _signal_id(self, cur: Cursor, key: tuple[str, str, str]) -> int:
        sid = self._signal_ids.get(key) or self._new_signal_ids.get(key)
        if sid is None:
            cur.execute(self._sql("INSERT INTO signals (name, source, unit) VALUES (?,?,?) ON CONFLICT DO NOTHING"),
                        key)
            cur.execute(self._sql("SELECT id FROM signals WHERE name=? AND source=? AND unit=?"), key)
            sid = int(cur.fetchone()[0])
            self._new_signal_ids[key] = sid
        return sid

    def _count(self, cur: Cursor, vehicle: str, name: str, by: int) -> None:
        if by:
            cur.execute(
                self._sql("INSERT INTO counters VALUES (?,?,?) "
                          "ON CONFLICT (vehicle, name) DO UPDATE SET value=counters.value+excluded.value"),
                (vehicle, name, by),
            )

    def _touch(self, cur: Cursor, fleet: str, vehicle: str, now: float) -> None:
        cur.execute(
            self._sql("INSERT INTO vehicles (vehicle, fleet, first_seen, last_seen) VALUES (?,?,?,?) "
                      "ON CONFLICT (vehicle) DO UPDATE SET last_seen=excluded.last_seen, fleet=excluded.fleet"),
            (vehicle, fleet, now, now),
        )

    def _add_range(self, cur: Cursor, vehicle: str, lo: int, hi: int, kind: str) -> None:
        """Record [lo, hi] as received, merged with the ranges it overlaps or touches: a vehicle keeps one row per
        stretch without a hole, so the gap report reads a handful of rows whatever the history. (The vehicle's
        row is locked by this transaction already, so receivers sharing PostgreSQL cannot interleave here.)"""
        touching = self._sql("FROM ranges WHERE vehicle=? AND seq_lo<=? AND seq_hi>=?")
        args = (vehicle, hi + 1, lo - 1)
        cur.execute("SELECT MIN(seq_lo), MAX(seq_hi), COUNT(*) " + touching, args)
        mlo, mhi, n = cur.fetchone()
        if n:
            cur.execute("DELETE " + touching, args)
            lo, hi, kind = min(lo, int(mlo)), max(hi, int(mhi)), "merged"
        cur.execute(self._sql("INSERT INTO ranges VALUES (?,?,?,?)"), (vehicle, lo, hi, kind))

    def _ingest_one(self, cur: Cursor, b: wire.Batch, now: float) -> IngestResult:
        res = IngestResult()
        stored = dict.fromkeys(STORED_KINDS, 0)  # new rows only: what a skipped duplicate adds is nothing
        v = b.vehicle
        self._touch(cur, b.fleet, v, now)
        for seg in b.segments:
            c = seg.columns
            if c is not None:
                ids = np.array([self._signal_id(cur, k) for k in c.signals], np.int64)
                inserted = self._insert_samples(cur, v, seg.seq_lo, c.ts_us / 1e6, ids[c.sig], c.value)
                attempted = len(c)
            elif seg.kind == "alert":
                r = seg.record or {}
                cur.execute(
                    self._sql("INSERT INTO alerts VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING"),
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
                inserted, attempted = max(0, cur.rowcount), 1
            else:
                r = seg.record or {}
                cur.execute(
                    self._sql("INSERT INTO events VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING"),
                    (v, seg.seq_lo, str(r.get("kind", seg.kind)), _num(r.get("ts"), now), json.dumps(r)),
                )
                inserted, attempted = max(0, cur.rowcount), 1
            res.new += inserted
            res.duplicates += attempted - inserted
            stored["samples" if c is not None else "alerts" if seg.kind == "alert" else "events"] += inserted
            if inserted:
                self._add_range(cur, v, seg.seq_lo, seg.seq_hi, seg.kind)
        self._count(cur, v, "duplicates", res.duplicates)
        self._count(cur, v, "batches", 1)
        for kind, n in stored.items():
            self._count(cur, v, f"stored:{kind}", n)
        return res

    def ingest(self, batches: list[wire.Batch]) -> list[IngestResult]:
        """Store batches in ONE transaction; when this returns, they are durable and may be acknowledged."""
        now = time.time()
        # Rows are locked vehicle by vehicle in one order, so receivers sharing a database cannot deadlock.
        order = sorted(range(len(batches)), key=lambda i: (batches[i].vehicle, i))
        out: list[IngestResult] = [IngestResult()] * len(batches)
        with self._lock:
            self._new_signal_ids.clear()
            try:
                with self._transaction() as cur:
                    for i in order:
                        out[i] = self._ingest_one(cur, batches[i], now)
                self._signal_ids.update(self._new_signal_ids)  # committed: now they are for keeps
            except Exception as e:
                if self._is_outage(e):
                    if isinstance(e, CloudDBError):
                        raise
                    raise CloudDBError(f"{self.where}: {type(e).__name__}: {str(e).strip()[:200]}") from e
                raise UnstorableError(f"{type(e).__name__}: {str(e).strip()[:200]}") from e
            finally:
                self._new_signal_ids.clear()
        return out

    def set_status(self, fleet: str, vehicle: str, status: dict[str, Any]) -> None:
        now = time.time()
        with self._lock, self._write_errors(), self._transaction() as cur:
            self._touch(cur, fleet, vehicle, now)
            cur.execute(
                self._sql("UPDATE vehicles SET online=?, status=? WHERE vehicle=?"),
                (1 if status.get("state") == "online" else 0, json.dumps(status), vehicle),
            )

    def count_rejected(self, reason: str, n: int = 1) -> None:
        with self._lock, self._write_errors(), self._transaction() as cur:
            self._count(cur, "", f"rejected:{reason}", n)

    @contextlib.contextmanager
    def _write_errors(self) -> Iterator[None]:
        """A write's failure as CloudDBError (outage) or UnstorableError (content), like `ingest`."""
        try:
            yield
        except (CloudDBError, UnstorableError):
            raise
        except Exception as e:
            if self._is_outage(e):
                raise CloudDBError(f"{self.where}: {type(e).__name__}: {str(e).strip()[:200]}") from e
            raise UnstorableError(f"{type(e).__name__}: {str(e).strip()[:200]}") from e

    # --- reading ---------------------------------------------------------------------------------------------

    def rejected(self) -> dict[str, int]:
        rows = self._read("SELECT name, value FROM counters WHERE vehicle='' AND name LIKE ?", ("rejected:%",))
        return {name.split(":", 1)[1]: int(value) for name, value in rows}

    def _event_data(self, vehicle: str, kind: str) -> list[dict[str, Any]]:
        out = []
        for (rec,) in self._read("SELECT record FROM events WHERE vehicle=? AND kind=? ORDER BY seq", (vehicle, kind)):
            data = json.loads(rec).get("data", {})
            if isinstance(data, dict):
                out.append(data)
        return out

    def stats(self) -> list[VehicleStats]:
        out: list[VehicleStats] = []
        with self._lock:
            vehicles = self._read(
                "SELECT vehicle, fleet, online, last_seen, status FROM vehicles ORDER BY fleet, vehicle")
            stored: dict[str, dict[str, int]] = {}
            for vehicle, name, value in self._read(
                    "SELECT vehicle, name, value FROM counters WHERE name LIKE ?", ("stored:%",)):
                stored.setdefault(vehicle, {})[name.split(":", 1)[1]] = int(value)
            received: dict[str, list[tuple[int, int]]] = {}
            for vehicle, lo, hi in self._read("SELECT vehicle, seq_lo, seq_hi FROM ranges"):  # merged at ingest
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
                dup = self._read("SELECT value FROM counters WHERE vehicle=? AND name='duplicates'", (vehicle,))
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
        for vehicle, n in self._read(
            "SELECT a.vehicle, COUNT(*) FROM alerts a WHERE a.seq = (SELECT MAX(b.seq) FROM alerts b "
            "WHERE b.vehicle=a.vehicle AND b.alert_id=a.alert_id) AND a.state='open' GROUP BY a.vehicle"
        ):
            open_alerts[vehicle] = int(n)
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
            })
        return rows

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
        rows = self._read(q + " ORDER BY a.ts, a.seq", args)
        # The row's key last: a record's own "vehicle" or "seq" (the vehicle's text) never renames it.
        return [{**json.loads(r), "vehicle": v, "seq": int(s)} for v, s, r in rows]

    def alert(self, vehicle: str, seq: int) -> dict[str, Any] | None:
        rows = self._read("SELECT record FROM alerts WHERE vehicle=? AND seq=?", (vehicle, seq))
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
        for name, ts, value in self._read(q + " ORDER BY g.name, s.ts LIMIT " + str(int(max_points)), args):
            out.setdefault(name, []).append((float(ts), float(value)))
        return out


class CloudDB(FleetDB):
    """SQLite: one file, WAL, `synchronous=FULL`."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.where = str(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as e:
            raise CloudDBError(f"{self.path}: not a usable database: {e}") from None
        self.db.execute("PRAGMA synchronous=FULL")
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            v = int(self.db.execute("PRAGMA user_version").fetchone()[0])
            if v > SCHEMA_VERSION:
                raise CloudDBError(f"{self.path}: schema version {v} is newer than this cloud_sync ({SCHEMA_VERSION})")
            steps = {1: _SCHEMA, 2: _SCHEMA_V2, 3: _SCHEMA_V3}
            for step in range(v + 1, SCHEMA_VERSION + 1):
                with self._transaction() as cur:
                    for stmt in steps[step]:
                        cur.execute(stmt)
                    cur.execute(f"PRAGMA user_version={step}")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Cursor]:
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
            cur.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL, I/O error)
                self.db.execute("ROLLBACK")
            raise
        finally:
            cur.close()

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self.db.execute(sql, tuple(args)).fetchall()

    def _is_outage(self, e: BaseException) -> bool:
        # OperationalError: locked, busy, disk full, I/O error, read-only file: the database, not the data.
        return isinstance(e, CloudDBError | sqlite3.OperationalError)

    def _insert_samples(
        self,
        cur: Cursor,
        vehicle: str,
        seq_lo: int,
        ts: npt.NDArray[np.float64],
        sid: npt.NDArray[np.int64],
        value: npt.NDArray[np.float64],
    ) -> int:
        n = len(ts)
        rows = zip([vehicle] * n, range(seq_lo, seq_lo + n), ts.tolist(), sid.tolist(), value.tolist(), strict=True)
        cur.executemany("INSERT INTO samples VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING", rows)
        return max(0, cur.rowcount)

    def close(self) -> None:
        with self._lock:
            self.db.close()


def _obj(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _int(v: Any) -> int:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else 0


def _num(v: Any, default: float | None) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) else default
