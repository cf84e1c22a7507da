"""SQLite, the cloud's zero-configuration default: one file, WAL, `synchronous=FULL` (a commit is durable before
the vehicle is told it may delete)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud_sync.db import Cursor, FleetDB
from cloud_sync.errors import CloudDBError
from cloud_sync.migrations import Dialect, migrate


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
        migrate(self)

    dialect: Dialect = "sqlite"

    @contextlib.contextmanager
    def _migration(self) -> Iterator[Cursor]:
        with self._lock, self._transaction() as cur:  # BEGIN IMMEDIATE: other writers wait
            yield cur

    def _schema_version(self, cur: Any) -> int:
        cur.execute("PRAGMA user_version")
        return int(cur.fetchone()[0])

    def _set_schema_version(self, cur: Any, version: int) -> None:
        cur.execute(f"PRAGMA user_version={int(version)}")

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

    def _rollout_lock(self, cur: Cursor) -> None:
        pass  # every write transaction is `BEGIN IMMEDIATE`: it holds SQLite's one write lock already

    def read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self.db.execute(sql, tuple(args)).fetchall()

    def read_array(self, sql: str, args: Sequence[Any], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
        # Straight from the cursor into the array: no list of row tuples, so a chunk costs its array and no more.
        with self._lock:
            try:
                out = np.fromiter(self.db.execute(sql, tuple(args)), dtype=dtype, count=-1)
            except (TypeError, ValueError, OverflowError) as e:
                raise CloudDBError(f"{self.path}: rows that do not fit {dtype}: {e}") from None
        # numpy turns a NULL into NaN in a float field; SQLite never stores NaN (it stores NULL instead), so a NaN
        # here is always a NULL.
        for name in dtype.names or ():
            if dtype[name].kind == "f" and np.isnan(out[name]).any():
                raise CloudDBError(f"{self.path}: rows that do not fit {dtype}: a NULL in {name}")
        return out

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
