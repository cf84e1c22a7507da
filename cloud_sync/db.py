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
reports never COUNT(*) the history.
"""

from __future__ import annotations

import abc
import contextlib
import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from cloud_sync.errors import CloudDBError as CloudDBError  # re-exported: callers catch it as cloud_sync.db's
from cloud_sync.errors import UnstorableError as UnstorableError
from cloud_sync.migrations import STORED_KINDS
from harvester_common import wire


@dataclass(slots=True)
class IngestResult:
    new: int = 0
    duplicates: int = 0


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
    def read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of one query (`?` placeholders): what cloud_sync/reports.py reads through."""

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


def _num(v: Any, default: float | None) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) else default
