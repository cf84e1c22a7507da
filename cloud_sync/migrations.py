"""The cloud database's schema for both engines: one append-only list of steps, applied by one function.

Each step brings the schema from the version before it to its own, in the same transaction as the new version
number, so a receiver killed mid-upgrade leaves the old schema. A step that has shipped is never edited (a test pins
each shipped step's text): a change is a new step at the end. Where the dialects differ (column types, how an id is
generated, `WITHOUT ROWID`) a step gives each engine its statements; where they agree one list serves both.

Where the version number lives is the backend's business, as databases from before this module keep it: SQLite's
`PRAGMA user_version`, PostgreSQL's `schema_version` table; so is the lock that lets one receiver migrate while
the others wait (SQLite `BEGIN IMMEDIATE`, a PostgreSQL advisory lock).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal, Protocol

from cloud_sync.errors import CloudDBError

Dialect = Literal["sqlite", "postgres"]


class _Cursor(Protocol):
    def execute(self, sql: str, /) -> object: ...


@dataclass(frozen=True, slots=True)
class Step:
    version: int
    why: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]

    def statements(self, dialect: Dialect) -> tuple[str, ...]:
        return self.sqlite if dialect == "sqlite" else self.postgres


_SQLITE_V1 = [
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

_POSTGRES_V1 = [
    """CREATE TABLE IF NOT EXISTS vehicles (
        vehicle TEXT PRIMARY KEY, fleet TEXT NOT NULL, first_seen DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL, online INTEGER NOT NULL DEFAULT 0, status TEXT)""",
    """CREATE TABLE IF NOT EXISTS signals (
        id SERIAL PRIMARY KEY, name TEXT NOT NULL, source TEXT NOT NULL, unit TEXT NOT NULL,
        UNIQUE (name, source, unit))""",
    """CREATE TABLE IF NOT EXISTS samples (
        vehicle TEXT NOT NULL, seq BIGINT NOT NULL, ts DOUBLE PRECISION NOT NULL, signal_id INTEGER NOT NULL,
        value DOUBLE PRECISION NOT NULL, PRIMARY KEY (vehicle, seq))""",
    "CREATE INDEX IF NOT EXISTS samples_by_signal_time ON samples (vehicle, signal_id, ts)",
    """CREATE TABLE IF NOT EXISTS alerts (
        vehicle TEXT NOT NULL, seq BIGINT NOT NULL, alert_id TEXT NOT NULL, state TEXT NOT NULL,
        ts DOUBLE PRECISION NOT NULL, score DOUBLE PRECISION, model TEXT, model_version TEXT, label TEXT,
        record TEXT NOT NULL, PRIMARY KEY (vehicle, seq))""",
    "CREATE INDEX IF NOT EXISTS alerts_by_id ON alerts (alert_id)",
    "CREATE INDEX IF NOT EXISTS alerts_by_time ON alerts (ts)",
    """CREATE TABLE IF NOT EXISTS events (
        vehicle TEXT NOT NULL, seq BIGINT NOT NULL, kind TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL,
        record TEXT NOT NULL, PRIMARY KEY (vehicle, seq))""",
    """CREATE TABLE IF NOT EXISTS ranges (
        vehicle TEXT NOT NULL, seq_lo BIGINT NOT NULL, seq_hi BIGINT NOT NULL, kind TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS ranges_by_vehicle ON ranges (vehicle, seq_lo)",
    """CREATE TABLE IF NOT EXISTS counters (
        vehicle TEXT NOT NULL, name TEXT NOT NULL, value BIGINT NOT NULL, PRIMARY KEY (vehicle, name))""",
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
]

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

# Version 4: model updates (docs/model_updates.md). The registry keeps each signed package itself (a receiver
# answers `model/get` from it); a rollout's waves are its vehicles' `wave` numbers; `vehicle_models` holds each
# vehicle's latest `model/status` with its `seq`, so an older report arriving later changes nothing.
def _schema_v4(blob: str, real: str, big: str, serial: str) -> tuple[str, ...]:
    return (
        f"""CREATE TABLE IF NOT EXISTS model_packages (
            package_sha256 TEXT PRIMARY KEY, name TEXT NOT NULL, version TEXT NOT NULL, model_sha256 TEXT NOT NULL,
            key_id TEXT NOT NULL, size {big} NOT NULL, manifest TEXT NOT NULL, package {blob} NOT NULL,
            published_by TEXT NOT NULL, published_at {real} NOT NULL, UNIQUE (name, version))""",
        f"""CREATE TABLE IF NOT EXISTS rollouts (
            id {serial}, name TEXT NOT NULL, version TEXT NOT NULL, package_sha256 TEXT NOT NULL,
            mode TEXT NOT NULL, waves INTEGER NOT NULL, plan TEXT NOT NULL, success_threshold {real} NOT NULL,
            error_threshold {real} NOT NULL, state TEXT NOT NULL, wave INTEGER NOT NULL, reason TEXT NOT NULL,
            created_by TEXT NOT NULL, created_at {real} NOT NULL, updated_at {real} NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS rollouts_by_state ON rollouts (state)",
        f"""CREATE TABLE IF NOT EXISTS rollout_vehicles (
            rollout {big} NOT NULL, vehicle TEXT NOT NULL, fleet TEXT NOT NULL, wave INTEGER NOT NULL,
            state TEXT NOT NULL, healthy INTEGER, reason TEXT NOT NULL, figures TEXT NOT NULL, seq {big},
            sent_at {real}, cleared_at {real}, updated_at {real} NOT NULL, PRIMARY KEY (rollout, vehicle))""",
        "CREATE INDEX IF NOT EXISTS rollout_vehicles_by_vehicle ON rollout_vehicles (vehicle)",
        f"""CREATE TABLE IF NOT EXISTS vehicle_models (
            vehicle TEXT PRIMARY KEY, fleet TEXT NOT NULL, seq {big} NOT NULL, ts {real} NOT NULL,
            state TEXT NOT NULL, target_sha256 TEXT, active_sha256 TEXT, reason TEXT NOT NULL, status TEXT NOT NULL,
            received_at {real} NOT NULL)""",
    )


# Version 5: the learning loop (docs/learning_loop.md). Mechanics' verdicts on alerts are kept as a history: every
# change is a new row (who, when), the latest row per (vehicle, alert_id) is the verdict now. Breakdowns nobody was
# warned of are recorded beside them, so misses count as well as false alarms.
def _schema_v5(real: str, serial: str) -> tuple[str, ...]:
    return (
        f"""CREATE TABLE IF NOT EXISTS verdicts (
            id {serial}, vehicle TEXT NOT NULL, alert_id TEXT NOT NULL, label TEXT NOT NULL, fault TEXT NOT NULL,
            note TEXT NOT NULL, by TEXT NOT NULL, at {real} NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS verdicts_by_alert ON verdicts (vehicle, alert_id, id)",
        f"""CREATE TABLE IF NOT EXISTS breakdowns (
            id {serial}, vehicle TEXT NOT NULL, at {real} NOT NULL, fault TEXT NOT NULL, note TEXT NOT NULL,
            by TEXT NOT NULL, recorded_at {real} NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS breakdowns_by_vehicle ON breakdowns (vehicle, at)",
    )


# Version 6: indexes for the quality report (docs/learning_loop.md, "Quality"). Which model version a vehicle ran when
# is read from its `drift` reports and alert openings, per vehicle and time: without these, finding the report just
# before a period, or a period's reports, read every drift report the vehicle ever sent (each several KB of JSON).
# (vehicle, kind, ts) serves every query (vehicle, kind) did, so that one goes.
_SCHEMA_V6 = [
    "CREATE INDEX IF NOT EXISTS events_by_vehicle_kind_time ON events (vehicle, kind, ts)",
    "DROP INDEX IF EXISTS events_by_vehicle_kind",
    "CREATE INDEX IF NOT EXISTS alerts_by_vehicle_state_time ON alerts (vehicle, state, ts)",
]


# Version 7: each vehicle's backfill position (harvester_common/backfill.py): the lowest sequence number it still
# holds unsent, as its batches state it. Holes at or above it are backfilling, not lost. No row: the vehicle never
# stated one (an older agent), and its holes are gaps as before.
def _schema_v7(big: str) -> tuple[str, ...]:
    return (f"CREATE TABLE IF NOT EXISTS backfill (vehicle TEXT PRIMARY KEY, backfill_from {big} NOT NULL)",)


# Version 8: signal tables by reference (docs/protocol.md,
# "Signal tables by reference"). A vehicle names a table the cloud confirmed it stores by its digest; the table is
# kept per vehicle (another vehicle's digest is unknown to it), the most recent MAX_TABLES_PER_VEHICLE of them.
def _schema_v8(real: str) -> tuple[str, ...]:
    return (
        f"""CREATE TABLE IF NOT EXISTS signal_tables (
            vehicle TEXT NOT NULL, digest TEXT NOT NULL, signals TEXT NOT NULL, stored_at {real} NOT NULL,
            PRIMARY KEY (vehicle, digest))""",
        "CREATE INDEX IF NOT EXISTS signal_tables_by_age ON signal_tables (vehicle, stored_at)",
    )


STEPS: tuple[Step, ...] = (
    Step(1, "tables: vehicles, signals, samples, alerts, events, ranges, counters",
         tuple(_SQLITE_V1), tuple(_POSTGRES_V1)),
    Step(2, "indexes for the fleet queries", tuple(_SCHEMA_V2), tuple(_SCHEMA_V2)),
    Step(3, "stored counts per vehicle and kind; received ranges merged", tuple(_SCHEMA_V3), tuple(_SCHEMA_V3)),
    Step(4, "model updates: model_packages, rollouts, rollout_vehicles, vehicle_models",
         _schema_v4("BLOB", "REAL", "INTEGER", "INTEGER PRIMARY KEY"),
         _schema_v4("BYTEA", "DOUBLE PRECISION", "BIGINT", "BIGSERIAL PRIMARY KEY")),
    Step(5, "the learning loop: verdicts (a history per alert), breakdowns",
         _schema_v5("REAL", "INTEGER PRIMARY KEY"), _schema_v5("DOUBLE PRECISION", "BIGSERIAL PRIMARY KEY")),
    Step(6, "indexes for the quality report: events (vehicle, kind, ts), alerts (vehicle, state, ts)",
         tuple(_SCHEMA_V6), tuple(_SCHEMA_V6)),
    Step(7, "backfill: where each vehicle's backfill stands, so that its holes above it are not gaps",
         _schema_v7("INTEGER"), _schema_v7("BIGINT")),
    Step(8, "signal tables by reference: signal_tables (vehicle, digest)",
         _schema_v8("REAL"), _schema_v8("DOUBLE PRECISION")),
)
SCHEMA_VERSION = STEPS[-1].version


class Migratable(Protocol):
    """What a backend gives `migrate`."""

    dialect: Dialect
    where: str

    def _migration(self) -> contextlib.AbstractContextManager[_Cursor]:
        """A write transaction holding the lock that keeps other receivers out until it ends."""

    def _schema_version(self, cur: _Cursor) -> int: ...

    def _set_schema_version(self, cur: _Cursor, version: int) -> None: ...


def migrate(db: Migratable) -> int:
    """Bring the database to SCHEMA_VERSION in one transaction; returns the version it had. A database newer than
    this code is refused (CloudDBError), never written to."""
    with db._migration() as cur:
        found = db._schema_version(cur)
        if found > SCHEMA_VERSION:
            raise CloudDBError(f"{db.where}: schema version {found} is newer than this cloud_sync ({SCHEMA_VERSION})")
        for step in STEPS[found:]:
            for stmt in step.statements(db.dialect):
                cur.execute(stmt)
            db._set_schema_version(cur, step.version)
    return found
