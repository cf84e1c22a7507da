"""The cloud schema's one migration mechanism (cloud_sync/migrations.py), on both engines: the same steps give the
same tables and columns, a shipped step is never edited, an upgrade is one transaction, a newer database is refused."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from cloud_sync.database import open_db
from cloud_sync.db import CloudDBError, FleetDB
from cloud_sync.db_sqlite import CloudDB
from cloud_sync.migrations import SCHEMA_VERSION, STEPS

# The text of every step that has shipped. A step's statements are what databases in the field went through: change
# the schema with a new step at the end, never by editing one of these (this test then fails, on purpose).
SHIPPED = {1: "fad59918081d412c", 2: "3352f25b29c283d3", 3: "fe31e400523d78c2", 4: "9a534aa944cfc60c",
           5: "49cc129c605a998e", 6: "f8637c9f8c9b5a90", 7: "84b11e2c2d825eaa", 8: "85b04d25c185ad06"}


def fingerprint(version: int) -> str:
    step = STEPS[version - 1]
    return hashlib.sha256(repr((step.sqlite, step.postgres)).encode()).hexdigest()[:16]


def test_steps_are_numbered_from_one_without_holes_and_shipped_ones_are_unchanged() -> None:
    assert [s.version for s in STEPS] == list(range(1, len(STEPS) + 1))
    assert STEPS[-1].version == SCHEMA_VERSION
    for version, expected in SHIPPED.items():
        assert fingerprint(version) == expected, f"shipped schema step {version} was edited: add a new step instead"


def columns(db: FleetDB) -> dict[str, list[str]]:
    if isinstance(db, CloudDB):
        tables = [t for (t,) in db.read("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        return {t: [c[1] for c in db.read(f"PRAGMA table_info({t})")] for t in tables}
    out: dict[str, list[str]] = {}
    for t, c in db.read("SELECT table_name, column_name FROM information_schema.columns "
                        "WHERE table_schema='public' ORDER BY table_name, ordinal_position"):
        out.setdefault(t, []).append(c)
    out.pop("schema_version")  # where PostgreSQL keeps the version (SQLite: PRAGMA user_version)
    return out


def test_both_engines_end_with_the_same_tables_and_columns(cloud_db: FleetDB, tmp_path: Path) -> None:
    reference = columns(CloudDB(tmp_path / "reference.sqlite"))
    assert set(reference) == {"vehicles", "signals", "samples", "alerts", "events", "ranges", "counters",
                              "model_packages", "rollouts", "rollout_vehicles", "vehicle_models",
                              "verdicts", "breakdowns", "backfill", "signal_tables"}
    assert columns(cloud_db) == reference


def test_an_upgrade_is_one_transaction_a_failed_one_leaves_the_old_schema(tmp_path: Path) -> None:
    path = tmp_path / "cloud.sqlite"
    CloudDB(path).close()
    con = sqlite3.connect(path)
    con.execute("INSERT INTO samples VALUES ('v1', 1, 1.0, 1, 2.0)")  # so that step 3's counting adds a row
    con.execute("DELETE FROM counters")
    con.execute("PRAGMA user_version=2")  # as a version-2 receiver left it...
    con.execute("DROP TABLE ranges")  # ...but damaged, so that step 3's range merge fails
    con.commit()
    con.close()
    with pytest.raises(sqlite3.OperationalError, match="ranges"):
        CloudDB(path)
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == 2  # step 3 rolled back whole, version with it
    assert con.execute("SELECT COUNT(*) FROM counters").fetchone()[0] == 0  # its first half too
    con.close()


def test_a_database_newer_than_the_code_is_refused_on_both_engines(cloud_db: FleetDB, tmp_path: Path) -> None:
    fresh = cloud_db
    if isinstance(fresh, CloudDB):
        fresh.db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
        fresh.close()
        with pytest.raises(CloudDBError, match="newer than this cloud_sync"):
            CloudDB(fresh.path)
        return
    with fresh._transaction() as cur:
        cur.execute("UPDATE schema_version SET version=%s", (SCHEMA_VERSION + 1,))
    url = fresh.url  # type: ignore[attr-defined]
    fresh.close()
    with pytest.raises(CloudDBError, match="newer than this cloud_sync"):
        open_db(url, tmp_path / "unused.sqlite")


def test_a_version_3_database_gains_the_model_tables_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "cloud.sqlite"
    CloudDB(path).close()
    con = sqlite3.connect(path)
    for t in ("model_packages", "rollouts", "rollout_vehicles", "vehicle_models"):
        con.execute(f"DROP TABLE {t}")
    con.execute("INSERT INTO vehicles VALUES ('v1', 'f1', 1.0, 2.0, 1, NULL)")
    con.execute("PRAGMA user_version=3")  # as a version-3 receiver left it
    con.commit()
    con.close()
    db = CloudDB(path)
    try:
        assert db.read("PRAGMA user_version") == [(SCHEMA_VERSION,)]
        assert db.read("SELECT vehicle, fleet FROM vehicles") == [("v1", "f1")]
        assert {"model_packages", "rollouts", "rollout_vehicles", "vehicle_models",
                              "verdicts", "breakdowns", "signal_tables"} <= set(columns(db))
    finally:
        db.close()


def test_step_6_indexes_records_by_vehicle_and_time(cloud_db: FleetDB) -> None:
    """The quality report's indexes exist on both engines, and (vehicle, kind, ts) took the place of (vehicle,
    kind), whose every query it serves."""
    if isinstance(cloud_db, CloudDB):
        names = {n for (n,) in cloud_db.read("SELECT name FROM sqlite_master WHERE type='index'")}
    else:
        names = {n for (n,) in cloud_db.read("SELECT indexname FROM pg_indexes WHERE schemaname='public'")}
    assert {"events_by_vehicle_kind_time", "alerts_by_vehicle_state_time", "samples_by_signal_time"} <= names
    assert "events_by_vehicle_kind" not in names
