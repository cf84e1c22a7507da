"""PostgreSQL backend for a fleet (psycopg 3): the schema of `cloud_sync.db` in PostgreSQL types, and samples
through binary COPY.

Samples go COPY → a temporary table → `INSERT ... SELECT ... ON CONFLICT DO NOTHING`, one segment at a time: COPY
is the fastest way into PostgreSQL, and the INSERT still skips stored (vehicle, seq) keys and says how many rows
were new. The COPY stream is built with numpy in PostgreSQL's binary format (fixed-width big-endian columns), so
no Python object is made per sample.

Several receivers may share one database: migrations take an advisory lock, rollout writes another, and
`FleetDB.ingest` locks vehicles in one order. A lost connection fails the transaction in hand (the receiver does
not ack it; it is delivered again) and the next call reconnects.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg

from cloud_sync.config import DbConfig
from cloud_sync.db import Cursor, FleetDB
from cloud_sync.errors import CloudDBError
from cloud_sync.migrations import Dialect, migrate

_DB = DbConfig()  # the default of `[db] connect_timeout_s`, for callers without a config
_MIGRATION_LOCK = 0x68617276  # "harv": one receiver migrates, the others wait
_ROLLOUT_LOCK = 0x726F6C6C  # "roll": one writer of the registry and rollouts at a time (controllers, commands)

# One COPY row in PostgreSQL's binary format: field count, then (length, value) per column, big-endian.
_ROW = np.dtype([("nf", ">i2"), ("l_seq", ">i4"), ("seq", ">i8"), ("l_ts", ">i4"), ("ts", ">f8"),
                 ("l_sid", ">i4"), ("sid", ">i4"), ("l_val", ">i4"), ("val", ">f8")])
_COPY_HEAD = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
_COPY_TAIL = (-1).to_bytes(2, "big", signed=True)


def copy_rows(seq_lo: int, ts: npt.NDArray[np.float64], sid: npt.NDArray[np.int64],
              value: npt.NDArray[np.float64]) -> bytes:
    """A binary COPY stream of (seq, ts, signal_id, value) rows."""
    rows = np.empty(len(ts), _ROW)
    rows["nf"] = 4
    rows["l_seq"], rows["l_ts"], rows["l_sid"], rows["l_val"] = 8, 8, 4, 8
    rows["seq"] = np.arange(seq_lo, seq_lo + len(ts), dtype=np.int64)
    rows["ts"], rows["sid"], rows["val"] = ts, sid, value
    return _COPY_HEAD + rows.tobytes() + _COPY_TAIL


def copy_array(data: bytes | bytearray, dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """The rows of a binary COPY TO stream as a structured array of `dtype` (8-byte integer or float fields, in
    column order). CloudDBError when a row does not have exactly those fields, each 8 bytes and not NULL."""
    head = len(_COPY_HEAD)
    if bytes(data[:11]) != _COPY_HEAD[:11] or len(data) < head + 2 or bytes(data[-2:]) != _COPY_TAIL:
        raise CloudDBError("not a binary COPY stream")
    start = head + int.from_bytes(data[15:19], "big")  # the header extension, empty today
    names = list(dtype.names or ())
    if any(dtype[n].itemsize != 8 or dtype[n].kind not in "if" for n in names):
        raise CloudDBError(f"copy_array reads 8-byte numbers only, not {dtype}")
    wire_dtype = np.dtype([("nf", ">i2")] + [x for i, n in enumerate(names)
                                             for x in ((f"l{i}", ">i4"), (n, ">" + dtype[n].str[1:]))])
    body = len(data) - 2 - start
    if body < 0 or body % wire_dtype.itemsize:
        raise CloudDBError(f"COPY rows are not {len(names)} 8-byte columns (a NULL or another type)")
    rows = np.frombuffer(data, wire_dtype, count=body // wire_dtype.itemsize, offset=start)
    if (rows["nf"] != len(names)).any() or any((rows[f"l{i}"] != 8).any() for i in range(len(names))):
        raise CloudDBError(f"COPY rows are not {len(names)} 8-byte columns (a NULL or another type)")
    out = np.empty(len(rows), dtype)
    for n in names:
        out[n] = rows[n]
    return out


class PostgresDB(FleetDB):
    def __init__(self, url: str, connect_timeout_s: int = _DB.connect_timeout_s) -> None:
        super().__init__()
        self.url = url
        self.where = _redact(url)
        self.connect_timeout_s = connect_timeout_s
        self._conn: psycopg.Connection[Any] | None = None
        migrate(self)

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            try:
                self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=self.connect_timeout_s)
            except psycopg.Error as e:
                raise CloudDBError(f"{self.where}: cannot connect: {str(e).strip().splitlines()[0]}") from None
            self._conn.execute("CREATE TEMP TABLE IF NOT EXISTS samples_in (seq BIGINT, ts DOUBLE PRECISION, "
                               "signal_id INTEGER, value DOUBLE PRECISION) ON COMMIT DELETE ROWS")
        return self._conn

    def _drop_broken(self, e: BaseException) -> None:
        # After a connection-level failure the connection is useless: the next call opens a new one.
        if isinstance(e, psycopg.OperationalError) and self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    dialect: Dialect = "postgres"

    @contextlib.contextmanager
    def _migration(self) -> Iterator[Cursor]:
        with self._lock, self._transaction() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            yield cur

    def _rollout_lock(self, cur: Cursor) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_ROLLOUT_LOCK,))

    def _schema_version(self, cur: Any) -> int:
        cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        cur.execute("SELECT max(version) FROM schema_version")
        return int(cur.fetchone()[0] or 0)

    def _set_schema_version(self, cur: Any, version: int) -> None:
        cur.execute("DELETE FROM schema_version")
        cur.execute("INSERT INTO schema_version VALUES (%s)", (version,))

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def _is_outage(self, e: BaseException) -> bool:
        # OperationalError: connection lost, server shutting down, disk full, too many connections. A DataError or
        # IntegrityError (and Python's own OverflowError) is about the data.
        return isinstance(e, CloudDBError | psycopg.OperationalError | psycopg.InterfaceError)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Cursor]:
        conn = self._connection()
        try:
            with conn.transaction(), conn.cursor() as cur:
                yield cur
        except BaseException as e:
            self._drop_broken(e)
            raise

    def read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            conn = self._connection()
            try:
                with conn.cursor() as cur:
                    cur.execute(self._sql(sql), tuple(args))
                    return cur.fetchall()
            except BaseException as e:
                self._drop_broken(e)
                raise

    def read_array(self, sql: str, args: Sequence[Any], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
        # Binary COPY: fixed-width rows that numpy reads in one go, with no Python object per row or value.
        buf = bytearray()
        with self._lock:
            conn = self._connection()
            try:
                with conn.cursor() as cur, cur.copy(f"COPY ({self._sql(sql)}) TO STDOUT (FORMAT BINARY)",
                                                    tuple(args)) as cp:
                    for data in cp:
                        buf += data
            except BaseException as e:
                self._drop_broken(e)
                raise
        try:
            return copy_array(buf, dtype)
        except CloudDBError as e:
            raise CloudDBError(f"{self.where}: {e}") from None

    def _insert_samples(
        self,
        cur: Cursor,
        vehicle: str,
        seq_lo: int,
        ts: npt.NDArray[np.float64],
        sid: npt.NDArray[np.int64],
        value: npt.NDArray[np.float64],
    ) -> int:
        assert isinstance(cur, psycopg.Cursor)
        cur.execute("TRUNCATE samples_in")
        with cur.copy("COPY samples_in (seq, ts, signal_id, value) FROM STDIN (FORMAT BINARY)") as cp:
            cp.write(copy_rows(seq_lo, ts, sid, value))
        cur.execute("INSERT INTO samples SELECT %s, seq, ts, signal_id, value FROM samples_in "
                    "ON CONFLICT DO NOTHING", (vehicle,))
        return max(0, cur.rowcount)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        d = conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql (unparsable URL)"
    return f"postgresql://{d.get('user', '')}@{d.get('host', '')}:{d.get('port', '')}/{d.get('dbname', '')}"
