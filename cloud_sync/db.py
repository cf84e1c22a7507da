"""The cloud's database: samples, alerts and events stored once per (vehicle, seq).

`FleetDB` holds how a batch is stored, written once for both engines; a backend supplies transactions, reads and
the bulk sample insert: `cloud_sync.db_sqlite.CloudDB` (SQLite, the zero-configuration default) and
`cloud_sync.db_postgres.PostgresDB` (PostgreSQL for a fleet, COPY for samples). The schema and its upgrades are in
cloud_sync/migrations.py, the reports people read in cloud_sync/reports.py, and cloud_sync/database.py picks the
engine.

`ingest` writes a whole group of batches in one transaction; inserts skip rows whose (vehicle, seq) key is already
stored, so a resent batch stores nothing twice and the difference is counted as duplicates. Commits are durable
(SQLite `synchronous=FULL`, PostgreSQL's default `synchronous_commit`): the vehicle deletes a record on our ack.
Received sequence ranges are kept merged (one row per stretch without a hole), so gaps are computed from a few
rows, not by scanning samples; and the records stored per vehicle are counted in the same transaction, so the
reports never COUNT(*) the history. Where a vehicle's backfill stands (the position its batches state,
harvester_common/backfill.py) is kept in the same transaction too, as far as its own numbers bear it out
(`_backfill`): the reports call the holes above it backfilling, not gaps.

Model updates (docs/model_updates.md) live here too, each write one transaction: the registry of signed packages
(`publish_package`: a name and version stand for one package for ever; the same package again changes nothing),
rollouts (`create_rollout`, `change_rollout`; a vehicle is in at most one rollout that is not over, checked in the
transaction that adds it), each vehicle's latest `model/status` (`set_model_status`: the highest `seq` wins, and a
stored report is folded into the vehicle's rollout at once), and the controller's tick (`rollout_tx`). Rollouts
are written under one lock (`_rollout_lock`: SQLite's write lock, a PostgreSQL advisory lock), so receivers
sharing a database cannot both advance one wave or both start rollouts over the same vehicles.

The learning loop's records (docs/learning_loop.md, "Records") are written here as well, one transaction each:
`add_verdict` (append-only: a change of verdict is a new row, so every change is kept with who and when) and
`add_breakdown`; their rules are cloud_sync/learning.py's, checked before the transaction starts.
"""

from __future__ import annotations

import abc
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from cloud_sync import learning as lr
from cloud_sync import rollout as ro
from cloud_sync.errors import CloudDBError as CloudDBError  # re-exported: callers catch it as cloud_sync.db's
from cloud_sync.errors import LearningError as LearningError
from cloud_sync.errors import RolloutError as RolloutError
from cloud_sync.errors import UnstorableError as UnstorableError
from cloud_sync.learning import Breakdown as Breakdown  # re-exported: the rows the learning methods return
from cloud_sync.learning import Verdict as Verdict
from cloud_sync.migrations import STORED_KINDS
from harvester_common import backfill, wire
from harvester_common import modelwire as mw


@dataclass(slots=True)
class IngestResult:
    new: int = 0
    duplicates: int = 0
    tables: list[str] = field(default_factory=list)  # digests of the batch's full signal tables, now stored


# Signal tables kept per vehicle (the most recently received); a reference to an evicted one is refused with
# wire.UNKNOWN_TABLE_REASON, and the vehicle then sends full tables again.
MAX_TABLES_PER_VEHICLE = wire.MAX_ACK_TABLES


class Cursor(Protocol):
    """What both drivers' cursors offer (DB-API 2)."""

    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: Any, params: Any = ..., /) -> Any: ...
    def executemany(self, sql: Any, params: Any, /) -> Any: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


Query = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]  # `?` placeholders in, rows out


def _in(db: FleetDB, cur: Cursor) -> Query:
    """Queries inside the transaction `cur` belongs to, as `FleetDB.read` runs them outside one."""
    def query(sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cur.execute(db._sql(sql), tuple(args))
        return [tuple(r) for r in cur.fetchall()]
    return query


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
    def read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of one query (`?` placeholders): what cloud_sync/reports.py reads through."""

    @abc.abstractmethod
    def read_array(self, sql: str, args: Sequence[Any], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
        """Rows of one query (`?` placeholders) as a structured array of `dtype`, whose fields are 8-byte integers
        or floats in the query's column order, none of them NULL: a chunk of samples read without a list of Python
        rows (cloud_sync/export.py). CloudDBError when the rows do not fit `dtype`."""

    def read_lock(self) -> contextlib.AbstractContextManager[Any]:
        """Held across several reads that must see one state: ingest waits until it is released."""
        return self._lock

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

    @abc.abstractmethod
    def _rollout_lock(self, cur: Cursor) -> None:
        """Take the lock that whoever writes the registry or rollouts holds until its transaction ends."""

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

    def _backfill(self, cur: Cursor, vehicle: str, b: wire.Batch) -> None:
        """Take the batch's backfill position (harvester_common/backfill.py) as far as the vehicle's own numbers
        bear it out. Never above the highest number received from it: there is no hole up there to explain, and a
        forged huge position would otherwise make every later backfill look lost. Never below a position it stated
        before: a late, replayed or forged lower one would hide holes the vehicle has already let go of. So a
        position hides a hole only until the vehicle's next batch moves it past. One that is not a sequence number
        is counted (`backfill_ignored:<reason>`) and changes nothing; the batch itself is stored all the same."""
        position, why = backfill.claim(b.extra)
        if position is None:
            if why:
                self._count(cur, vehicle, f"backfill_ignored:{why}", 1)
            return
        cur.execute(self._sql("SELECT MAX(seq_hi) FROM ranges WHERE vehicle=?"), (vehicle,))
        (highest,) = cur.fetchone()
        if highest is None:
            return  # nothing received from it yet: no hole to explain
        position = min(position, int(highest) + 1)
        cur.execute(self._sql("INSERT INTO backfill (vehicle, backfill_from) VALUES (?,?) ON CONFLICT (vehicle) "
                              "DO UPDATE SET backfill_from=excluded.backfill_from "
                              "WHERE backfill.backfill_from < excluded.backfill_from"), (vehicle, position))

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
        self._backfill(cur, v, b)
        for digest in sorted(b.tables)[: wire.MAX_ACK_TABLES]:
            cur.execute(self._sql("INSERT INTO signal_tables VALUES (?,?,?,?) ON CONFLICT (vehicle, digest) "
                                  "DO UPDATE SET stored_at=excluded.stored_at"),
                        (v, digest, json.dumps(b.tables[digest], separators=(",", ":")), now))
            res.tables.append(digest)
        if res.tables:
            cur.execute(self._sql("DELETE FROM signal_tables WHERE vehicle=? AND digest NOT IN (SELECT digest FROM "
                                  "signal_tables WHERE vehicle=? ORDER BY stored_at DESC, digest LIMIT ?)"),
                        (v, v, MAX_TABLES_PER_VEHICLE))
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

    def signal_table(self, vehicle: str, digest: str) -> list[Any] | None:
        """The signal table `vehicle` sent in full under `digest`, or None (never sent, evicted, another vehicle's).
        CloudDBError while the database is away."""
        rows = self.read("SELECT signals FROM signal_tables WHERE vehicle=? AND digest=?", (vehicle, digest))
        if not rows:
            return None
        try:
            table = json.loads(rows[0][0])
        except ValueError:
            return None
        return table if isinstance(table, list) else None

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
        except (CloudDBError, UnstorableError, RolloutError, LearningError):
            raise
        except Exception as e:
            if self._is_outage(e):
                raise CloudDBError(f"{self.where}: {type(e).__name__}: {str(e).strip()[:200]}") from e
            raise UnstorableError(f"{type(e).__name__}: {str(e).strip()[:200]}") from e

    # --- the learning loop: verdicts and breakdowns ----------------------------------------------------------

    def add_verdict(self, alert_id: str, label: str, *, by: str, fault: str | None = None, note: str = "",
                    vehicle: str | None = None, at: float | None = None) -> Verdict:
        """Record a mechanic's verdict on an alert (a new row: the alert's verdict now); returns the stored row.
        `fault` defaults, for `confirmed`, to the alert's own label; a false alarm has none. LearningError for an
        unknown alert, an id stored for several vehicles without `vehicle`, or a bad field; nothing is stored
        then."""
        alert_id = lr.check_key("alert id", alert_id)
        label = lr.check_label(label)
        by, note = lr.check_by(by), lr.check_note(note)
        vehicle = None if vehicle is None else lr.check_key("vehicle", vehicle)
        named = lr.fault_name(fault) if fault not in (None, "") else ""
        if label == "false_alarm" and named:
            raise LearningError("a false alarm found no fault: leave the fault out (or say unknown)")
        at = time.time() if at is None else at
        with self._lock, self._write_errors(), self._transaction() as cur:
            vehicle = self._alert_vehicle(_in(self, cur), alert_id, vehicle)
            if label == "confirmed" and not named:
                cur.execute(self._sql("SELECT label FROM alerts WHERE vehicle=? AND alert_id=? ORDER BY seq LIMIT 1"),
                            (vehicle, alert_id))
                own = str(cur.fetchone()[0] or "")
                try:
                    named = lr.fault_name(own)
                except LearningError:
                    raise LearningError(f"the label of alert {_quoted(alert_id)}, {_quoted(own)}, is not a fault "
                                        "name: name the fault found") from None
            cur.execute(self._sql("INSERT INTO verdicts (vehicle, alert_id, label, fault, note, by, at) "
                                  "VALUES (?,?,?,?,?,?,?) RETURNING id"),
                        (vehicle, alert_id, label, named, note, by, at))
            vid = int(cur.fetchone()[0])
        return Verdict(vid, vehicle, alert_id, label, named, note, by, at)

    def add_breakdown(self, vehicle: str, at: float, fault: str, *, by: str, note: str = "",
                      recorded_at: float | None = None) -> Breakdown:
        """Record a breakdown of a known vehicle at `at` (Unix seconds), warned of or not; returns the stored row.
        LearningError for an unknown vehicle or a bad field; nothing is stored then."""
        vehicle = lr.check_key("vehicle", vehicle)
        now = time.time() if recorded_at is None else recorded_at
        at, named = lr.check_at(at, now), lr.fault_name(fault)
        by, note = lr.check_by(by), lr.check_note(note)
        with self._lock, self._write_errors(), self._transaction() as cur:
            cur.execute(self._sql("SELECT 1 FROM vehicles WHERE vehicle=?"), (vehicle,))
            if cur.fetchone() is None:
                raise LearningError(f"no vehicle {_quoted(vehicle)} in the database (a vehicle is known once it has "
                                    "sent data)")
            cur.execute(self._sql("INSERT INTO breakdowns (vehicle, at, fault, note, by, recorded_at) "
                                  "VALUES (?,?,?,?,?,?) RETURNING id"), (vehicle, at, named, note, by, now))
            bid = int(cur.fetchone()[0])
        return Breakdown(bid, vehicle, at, named, note, by, now)

    @staticmethod
    def _alert_vehicle(query: Query, alert_id: str, vehicle: str | None) -> str:
        """The vehicle whose alert `alert_id` is: the one given, if it has that alert; else the only one that
        has. An id stored for two vehicles (only a forged one can be) must be told apart by the caller."""
        if vehicle is not None:
            if not query("SELECT 1 FROM alerts WHERE alert_id=? AND vehicle=? LIMIT 1", (alert_id, vehicle)):
                raise LearningError(f"no alert {_quoted(alert_id)} on vehicle {_quoted(vehicle)}")
            return vehicle
        found = [str(r[0]) for r in query("SELECT DISTINCT vehicle FROM alerts WHERE alert_id=? ORDER BY vehicle "
                                          "LIMIT 11", (alert_id,))]
        if not found:
            raise LearningError(f"no alert {_quoted(alert_id)} (cloud-sync alerts lists them)")
        if len(found) > 1:
            shown = ", ".join(_quoted(v) for v in found[:10]) + (" and more" if len(found) > 10 else "")
            raise LearningError(f"alert {_quoted(alert_id)} is stored for several vehicles ({shown}): say which "
                                "with --vehicle")
        return found[0]

    def verdict_history(self, alert_id: str, vehicle: str | None = None) -> tuple[str, list[Verdict]]:
        """An alert's vehicle and every verdict it was given, oldest first (the last is the verdict now).
        LearningError as `add_verdict` for an unknown or ambiguous id."""
        alert_id = lr.check_key("alert id", alert_id)
        vehicle = None if vehicle is None else lr.check_key("vehicle", vehicle)
        with self.read_lock():
            vehicle = self._alert_vehicle(self.read, alert_id, vehicle)
            rows = self.read(f"SELECT {_VERDICT_COLUMNS} FROM verdicts WHERE vehicle=? AND alert_id=? ORDER BY id",
                             (vehicle, alert_id))
        return vehicle, [_verdict(r) for r in rows]

    def verdicts_now(self) -> dict[tuple[str, str], Verdict]:
        """Each (vehicle, alert id) with a verdict: its latest one. Verdicts are typed by people, so the table
        stays small beside the vehicles' records."""
        rows = self.read(f"SELECT {_VERDICT_COLUMNS} FROM verdicts v WHERE v.id = (SELECT MAX(w.id) FROM verdicts w "
                         "WHERE w.vehicle = v.vehicle AND w.alert_id = v.alert_id)")
        return {(v.vehicle, v.alert_id): v for v in map(_verdict, rows)}

    def breakdowns(self, vehicle: str | None = None, since: float | None = None,
                   until: float | None = None) -> list[Breakdown]:
        """Breakdowns by time (`since` <= at < `until`), optionally of one vehicle."""
        q = f"SELECT {_BREAKDOWN_COLUMNS} FROM breakdowns WHERE 1=1"
        args: list[Any] = []
        for cond, v in (("vehicle=?", vehicle), ("at>=?", since), ("at<?", until)):
            if v is not None:
                q += " AND " + cond
                args.append(v)
        return [_breakdown(r) for r in self.read(q + " ORDER BY at, id", args)]

    # --- model updates ---------------------------------------------------------------------------------------

    def publish_package(self, info: PackageInfo, package: bytes) -> bool:
        """Add a verified package to the registry; True if new, False if this very package was there already.
        RolloutError when its name and version stand for another package."""
        with self._lock, self._write_errors(), self._transaction() as cur:
            self._rollout_lock(cur)
            cur.execute(self._sql("SELECT package_sha256 FROM model_packages WHERE package_sha256=? "
                                  "OR (name=? AND version=?)"), (info.package_sha256, info.name, info.version))
            found = [r[0] for r in cur.fetchall()]
            if info.package_sha256 in found:
                return False
            if found:
                raise RolloutError(f"{info.name} {info.version} is published already as another package (sha256 "
                                   f"{found[0]}); a version stands for one package: sign this one with a new version")
            cur.execute(
                self._sql("INSERT INTO model_packages (package_sha256, name, version, model_sha256, key_id, size, "
                          "manifest, package, published_by, published_at) VALUES (?,?,?,?,?,?,?,?,?,?)"),
                (info.package_sha256, info.name, info.version, info.model_sha256, info.key_id, len(package),
                 json.dumps(info.manifest), package, info.published_by, info.published_at))
        return True

    def packages(self, name: str | None = None, version: str | None = None) -> list[PackageInfo]:
        """Registry entries (without the package bytes), by name then publication time; optionally only those of
        one name and/or version."""
        q = f"SELECT {_PACKAGE_COLUMNS} FROM model_packages WHERE 1=1"
        args: list[Any] = []
        for col, v in (("name", name), ("version", version)):
            if v is not None:
                q += f" AND {col}=?"
                args.append(v)
        return [_package_info(r) for r in self.read(q + " ORDER BY name, published_at, version", args)]

    def package_info(self, package_sha256: str) -> PackageInfo | None:
        rows = self.read(f"SELECT {_PACKAGE_COLUMNS} FROM model_packages WHERE package_sha256=?", (package_sha256,))
        return _package_info(rows[0]) if rows else None

    def package_bytes(self, package_sha256: str) -> bytes | None:
        """The package itself, or None when no such package is published."""
        rows = self.read("SELECT package FROM model_packages WHERE package_sha256=?", (package_sha256,))
        return bytes(rows[0][0]) if rows else None

    def known_vehicles(self, fleet: str = "+") -> list[tuple[str, str]]:
        """(vehicle, fleet) of every vehicle the database knows, of one fleet or (`+`) all."""
        if fleet == "+":
            return [(str(v), str(f)) for v, f in self.read("SELECT vehicle, fleet FROM vehicles ORDER BY vehicle")]
        return [(str(v), str(f)) for v, f in
                self.read("SELECT vehicle, fleet FROM vehicles WHERE fleet=? ORDER BY vehicle", (fleet,))]

    def create_rollout(self, pkg: PackageInfo, waves: Sequence[Sequence[tuple[str, str]]], *, mode: str,
                       plan: dict[str, Any], success_threshold: float, error_threshold: float, by: str) -> int:
        """A new `running` rollout of `pkg` over `waves` of (vehicle, fleet); returns its id. RolloutError when a
        vehicle is in another rollout that is not over. A vehicle whose latest report says it already runs the
        package's model starts `active` (the controller then has nothing to wait for)."""
        if mode not in mw.MODES:
            raise RolloutError(f"mode must be one of {', '.join(mw.MODES)}")
        members = {v: (f, i) for i, w in enumerate(waves) for v, f in w}
        if not members:
            raise RolloutError("a rollout needs at least one vehicle")
        now = time.time()
        with self._lock, self._write_errors(), self._transaction() as cur:
            self._rollout_lock(cur)
            cur.execute(self._sql("SELECT rv.rollout, r.state, rv.vehicle FROM rollout_vehicles rv JOIN rollouts r "
                                  "ON r.id = rv.rollout WHERE r.state IN (?,?,?) ORDER BY rv.rollout, rv.vehicle"),
                        ro.LIVE_STATES)
            busy: dict[tuple[int, str], list[str]] = {}
            for rid, state, vehicle in cur.fetchall():
                if vehicle in members:
                    busy.setdefault((int(rid), str(state)), []).append(str(vehicle))
            if busy:
                (rid, state), names = next(iter(busy.items()))
                shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
                raise RolloutError(f"{len(names)} of these vehicles are in rollout {rid} ({state}): {shown}; a "
                                   f"vehicle is in one rollout at a time: wait for it to end, or "
                                   f"`cloud-sync rollout abort --id {rid}`")
            cur.execute(self._sql(
                "INSERT INTO rollouts (name, version, package_sha256, mode, waves, plan, success_threshold, "
                "error_threshold, state, wave, reason, created_by, created_at, updated_at) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id"),
                (pkg.name, pkg.version, pkg.package_sha256, mode, len(waves), json.dumps(plan), success_threshold,
                 error_threshold, "running", 0, "", by, now, now))
            rid = int(cur.fetchone()[0])
            cur.executemany(self._sql(
                "INSERT INTO rollout_vehicles (rollout, vehicle, fleet, wave, state, healthy, reason, figures, seq, "
                "sent_at, cleared_at, updated_at) VALUES (?,?,?,?,?,NULL,'','{}',NULL,NULL,NULL,?)"),
                [(rid, v, f, i, ro.PENDING, now) for v, (f, i) in members.items()])
            cur.execute(self._sql("SELECT vehicle, seq, status FROM vehicle_models WHERE active_sha256=? "
                                  "OR target_sha256=?"), (pkg.model_sha256, pkg.package_sha256))
            for vehicle, seq, text in cur.fetchall():
                if vehicle not in members:
                    continue
                status = _stored_status(text)
                step = status and ro.fold_status(status, pkg.package_sha256, pkg.model_sha256)
                if step and step[0] == "active":
                    self._set_step(cur, rid, str(vehicle), int(seq), step, now)
        return rid

    def change_rollout(self, rollout_id: int, action: str, by: str) -> tuple[str, RolloutInfo]:
        """`pause` (running → paused), `resume` (paused or halted → running: a halted rollout is judged again),
        `abort` (not over → aborted: the controller then clears the desired model of its vehicles not active on
        it). Returns the state before and the rollout after; RolloutError for an unknown rollout or a transition
        its state forbids."""
        allowed = {"pause": (("running",), "paused"), "resume": (("paused", "halted"), "running"),
                   "abort": (ro.LIVE_STATES, "aborted")}
        if action not in allowed:
            raise RolloutError(f"unknown action {action!r}")
        sources, target = allowed[action]
        with self._lock, self._write_errors(), self._transaction() as cur:
            self._rollout_lock(cur)
            cur.execute(self._sql("SELECT state, reason FROM rollouts WHERE id=?"), (rollout_id,))
            row = cur.fetchone()
            if row is None:
                raise RolloutError(f"no rollout {rollout_id}")
            before, old_reason = str(row[0]), str(row[1])
            if before not in sources:
                raise RolloutError(f"rollout {rollout_id} is {before}: it cannot {action} (only a rollout "
                                   f"{' or '.join(sources)} can)")
            reason = {"pause": f"paused by {by}", "resume": "", "abort": f"aborted by {by}"}[action]
            if action == "abort" and before == "halted":
                reason += f" after it halted: {old_reason}"
            cur.execute(self._sql("UPDATE rollouts SET state=?, reason=?, updated_at=? WHERE id=?"),
                        (target, reason[:ro.MAX_REASON_CHARS], time.time(), rollout_id))
        info = self.rollout(rollout_id)
        assert info is not None
        return before, info

    def rollout(self, rollout_id: int) -> RolloutInfo | None:
        rows = self.read(f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE id=?", (rollout_id,))
        return _rollout_info(rows[0]) if rows else None

    def rollouts(self, limit: int | None = None) -> list[RolloutInfo]:
        """The rollouts, newest first (the latest `limit` of them)."""
        q = f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts ORDER BY id DESC"
        return [_rollout_info(r) for r in self.read(q + ("" if limit is None else f" LIMIT {int(limit)}"))]

    def rollout_vehicles(self, rollout_id: int) -> list[RolloutVehicle]:
        rows = self.read(f"SELECT {_RV_COLUMNS} FROM rollout_vehicles WHERE rollout=? ORDER BY wave, vehicle",
                         (rollout_id,))
        return [_rollout_vehicle(r) for r in rows]

    def set_model_status(self, fleet: str, vehicle: str, status: mw.ModelStatus) -> str:
        """Keep a vehicle's `model/status` if its `seq` is the highest yet, and fold it into the vehicle's rollout
        of the package it names. Returns `stored`, `duplicate` (this seq is stored already: a retained message
        delivered again) or `stale` (an older seq: a late or replayed report, dropped)."""
        now = time.time()
        text = mw.encode_status(status).decode()
        target = (status.target or {}).get("package_sha256")
        active = (status.active or {}).get("sha256")
        with self._lock, self._write_errors(), self._transaction() as cur:
            cur.execute(self._sql("INSERT INTO vehicles (vehicle, fleet, first_seen, last_seen) VALUES (?,?,?,?) "
                                  "ON CONFLICT (vehicle) DO NOTHING"), (vehicle, fleet, now, now))
            cur.execute(
                self._sql("INSERT INTO vehicle_models (vehicle, fleet, seq, ts, state, target_sha256, active_sha256, "
                          "reason, status, received_at) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (vehicle) DO UPDATE "
                          "SET fleet=excluded.fleet, seq=excluded.seq, ts=excluded.ts, state=excluded.state, "
                          "target_sha256=excluded.target_sha256, active_sha256=excluded.active_sha256, "
                          "reason=excluded.reason, status=excluded.status, received_at=excluded.received_at "
                          "WHERE vehicle_models.seq < excluded.seq"),
                (vehicle, fleet, status.seq, status.ts, status.state, target, active, status.reason, text, now))
            if cur.rowcount != 1:
                cur.execute(self._sql("SELECT seq FROM vehicle_models WHERE vehicle=?"), (vehicle,))
                return "duplicate" if int(cur.fetchone()[0]) == status.seq else "stale"
            cur.execute(self._sql(
                "SELECT rv.rollout, r.package_sha256, p.model_sha256 FROM rollout_vehicles rv "
                "JOIN rollouts r ON r.id = rv.rollout JOIN model_packages p ON p.package_sha256 = r.package_sha256 "
                "WHERE rv.vehicle=? AND r.state IN (?,?,?)"), (vehicle, *ro.LIVE_STATES))
            for rid, package_sha256, model_sha256 in cur.fetchall():
                step = ro.fold_status(status, str(package_sha256), str(model_sha256))
                if step is not None:
                    self._set_step(cur, int(rid), vehicle, status.seq, step, now)
        return "stored"

    def _set_step(self, cur: Cursor, rollout_id: int, vehicle: str, seq: int,
                  step: tuple[str, bool | None, str, dict[str, Any]], now: float) -> None:
        state, healthy, reason, figures = step
        cur.execute(self._sql("UPDATE rollout_vehicles SET state=?, healthy=?, reason=?, figures=?, seq=?, "
                              "updated_at=? WHERE rollout=? AND vehicle=? AND (seq IS NULL OR seq < ?)"),
                    (state, None if healthy is None else int(healthy), reason, json.dumps(figures), seq, now,
                     rollout_id, vehicle, seq))

    def vehicle_models(self) -> dict[str, mw.ModelStatus]:
        """Each vehicle's latest `model/status`."""
        out: dict[str, mw.ModelStatus] = {}
        for vehicle, text in self.read("SELECT vehicle, status FROM vehicle_models"):
            status = _stored_status(text)
            if status is not None:
                out[str(vehicle)] = status
        return out

    def desired_models(self) -> dict[str, RolloutInfo]:
        """For each vehicle, the rollout whose desired model it was last sent, unless that rollout cleared it."""
        cols = ", ".join("r." + c for c in _ROLLOUT_COLUMNS.split(", "))
        rows = self.read(f"SELECT rv.vehicle, {cols} FROM rollout_vehicles rv JOIN rollouts r ON r.id = rv.rollout "
                         "WHERE rv.sent_at IS NOT NULL AND rv.cleared_at IS NULL AND rv.rollout = "
                         "(SELECT MAX(o.rollout) FROM rollout_vehicles o "
                         "WHERE o.vehicle = rv.vehicle AND o.sent_at IS NOT NULL)")
        return {str(row[0]): _rollout_info(row[1:]) for row in rows}

    def rollout_work(self) -> tuple[list[tuple[RolloutInfo, list[RolloutVehicle]]], list[tuple[int, str, str, bool]]]:
        """What the controller has to publish: each running rollout with its vehicles of the waves so far that
        have not been sent its desired model; and (rollout, vehicle, fleet, superseded) of aborted rollouts'
        vehicles whose desired model is still ours to clear: sent, not cleared, not active on it. `superseded`: a
        later rollout has sent this vehicle its own desired model since, which clearing would erase."""
        with self.read_lock():
            running = [_rollout_info(r) for r in
                       self.read(f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE state='running' ORDER BY id")]
            work = []
            for r in running:
                rows = self.read(f"SELECT {_RV_COLUMNS} FROM rollout_vehicles WHERE rollout=? AND wave<=? "
                                 "AND sent_at IS NULL ORDER BY wave, vehicle", (r.id, r.wave))
                work.append((r, [_rollout_vehicle(x) for x in rows]))
            rows = self.read("SELECT rv.rollout, rv.vehicle, rv.fleet, (SELECT COUNT(*) FROM rollout_vehicles o "
                             "WHERE o.vehicle = rv.vehicle AND o.rollout > rv.rollout AND o.sent_at IS NOT NULL) "
                             "FROM rollout_vehicles rv JOIN rollouts r ON r.id = rv.rollout WHERE r.state='aborted' "
                             "AND rv.sent_at IS NOT NULL AND rv.cleared_at IS NULL AND rv.state <> 'active' "
                             "ORDER BY rv.rollout, rv.vehicle")
        return work, [(int(r), str(v), str(f), int(n) > 0) for r, v, f, n in rows]

    @contextlib.contextmanager
    def rollout_tx(self) -> Iterator[RolloutTx]:
        """One transaction of the rollout controller, holding the rollout lock (and this object's lock, so a
        receiver's worker sharing it waits) until it ends."""
        with self._lock, self._write_errors(), self._transaction() as cur:
            self._rollout_lock(cur)
            yield RolloutTx(self, cur)


class RolloutTx:
    """What the controller reads and writes inside its one transaction per tick."""

    def __init__(self, db: FleetDB, cur: Cursor) -> None:
        self.db, self.cur = db, cur

    def _q(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        self.cur.execute(self.db._sql(sql), tuple(args))
        return self.cur.fetchall()

    def _x(self, sql: str, args: Sequence[Any] = ()) -> None:
        self.cur.execute(self.db._sql(sql), tuple(args))

    def running(self) -> list[RolloutInfo]:
        return [_rollout_info(r) for r in
                self._q(f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE state='running' ORDER BY id")]

    def wave(self, rollout_id: int, wave: int) -> list[RolloutVehicle]:
        return [_rollout_vehicle(r) for r in self._q(
            f"SELECT {_RV_COLUMNS} FROM rollout_vehicles WHERE rollout=? AND wave=? ORDER BY vehicle",
            (rollout_id, wave))]

    def mark_sent(self, rollout_id: int, vehicles: Sequence[str]) -> None:
        """The desired model of `rollout_id` reached the broker for these vehicles (whatever the rollout's state
        now: an aborted one's are then cleared by the next tick)."""
        now = time.time()
        self.cur.executemany(self.db._sql(
            "UPDATE rollout_vehicles SET sent_at=?, updated_at=?, state=CASE WHEN state=? THEN ? ELSE state END "
            "WHERE rollout=? AND vehicle=? AND sent_at IS NULL"),
            [(now, now, ro.PENDING, ro.SENT, rollout_id, v) for v in vehicles])

    def mark_cleared(self, rollout_id: int, vehicles: Sequence[str]) -> None:
        now = time.time()
        self.cur.executemany(self.db._sql("UPDATE rollout_vehicles SET cleared_at=?, updated_at=? "
                                          "WHERE rollout=? AND vehicle=?"),
                             [(now, now, rollout_id, v) for v in vehicles])

    def set_wave(self, rollout_id: int, wave: int) -> None:
        self._x("UPDATE rollouts SET wave=?, updated_at=? WHERE id=?", (wave, time.time(), rollout_id))

    def set_state(self, rollout_id: int, state: str, reason: str) -> None:
        self._x("UPDATE rollouts SET state=?, reason=?, updated_at=? WHERE id=?",
                (state, reason[:ro.MAX_REASON_CHARS], time.time(), rollout_id))


@dataclass(frozen=True, slots=True)
class PackageInfo:
    """A registry entry: what `model list` shows; the package bytes apart (`FleetDB.package_bytes`)."""

    package_sha256: str
    name: str
    version: str
    model_sha256: str
    key_id: str
    size: int
    manifest: dict[str, Any]
    published_by: str
    published_at: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class RolloutInfo:
    id: int
    name: str
    version: str
    package_sha256: str
    mode: str
    waves: int
    plan: dict[str, Any]
    success_threshold: float
    error_threshold: float
    state: str
    wave: int  # the current wave, 0-based
    reason: str
    created_by: str
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class RolloutVehicle:
    vehicle: str
    fleet: str
    wave: int  # 0-based
    state: str
    healthy: bool | None
    reason: str
    figures: dict[str, Any]
    sent_at: float | None
    cleared_at: float | None
    updated_at: float

    def step(self) -> ro.Step:
        return ro.Step(self.vehicle, self.state, self.healthy, self.reason, self.figures)


_PACKAGE_COLUMNS = ("package_sha256, name, version, model_sha256, key_id, size, manifest, published_by, "
                    "published_at")
_ROLLOUT_COLUMNS = ("id, name, version, package_sha256, mode, waves, plan, success_threshold, error_threshold, "
                    "state, wave, reason, created_by, created_at, updated_at")
_RV_COLUMNS = "vehicle, fleet, wave, state, healthy, reason, figures, sent_at, cleared_at, updated_at"
_VERDICT_COLUMNS = "id, vehicle, alert_id, label, fault, note, by, at"
_BREAKDOWN_COLUMNS = "id, vehicle, at, fault, note, by, recorded_at"


def _package_info(r: Sequence[Any]) -> PackageInfo:
    return PackageInfo(str(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), int(r[5]), _json_obj(r[6]), str(r[7]),
                       float(r[8]))


def _rollout_info(r: Sequence[Any]) -> RolloutInfo:
    return RolloutInfo(int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), int(r[5]), _json_obj(r[6]),
                       float(r[7]), float(r[8]), str(r[9]), int(r[10]), str(r[11]), str(r[12]), float(r[13]),
                       float(r[14]))


def _rollout_vehicle(r: Sequence[Any]) -> RolloutVehicle:
    return RolloutVehicle(str(r[0]), str(r[1]), int(r[2]), str(r[3]), None if r[4] is None else bool(r[4]),
                          str(r[5]), _json_obj(r[6]), None if r[7] is None else float(r[7]),
                          None if r[8] is None else float(r[8]), float(r[9]))


def _verdict(r: Sequence[Any]) -> Verdict:
    return Verdict(int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), str(r[5]), str(r[6]), float(r[7]))


def _breakdown(r: Sequence[Any]) -> Breakdown:
    return Breakdown(int(r[0]), str(r[1]), float(r[2]), str(r[3]), str(r[4]), str(r[5]), float(r[6]))


def _quoted(text: str) -> str:
    """Stored text in a one-line message: escaped as repr escapes it, and cut."""
    s = repr(text)
    return s if len(s) <= 80 else s[:77] + "...'"


def _json_obj(text: Any) -> dict[str, Any]:
    try:
        v = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return v if isinstance(v, dict) else {}


def _stored_status(text: Any) -> mw.ModelStatus | None:
    """A stored `model/status` (validated when it arrived), read back; None if it no longer reads."""
    try:
        return mw.decode_status(str(text).encode())
    except mw.ModelWireError:
        return None


def _num(v: Any, default: float | None) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) else default
