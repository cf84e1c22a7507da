"""Per-vehicle record counts kept at ingest (the fleet page reads them instead of COUNT(*) over all history), on
both backends — SQLite (a temp file) and PostgreSQL (a real server): after duplicates inside one group,
redeliveries, partly overlapping resends and a transaction that fails half-way, the counts equal COUNT(*); a
database from before the counts (schema 2) gets them backfilled by the migration."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud_sync.database import open_db
from cloud_sync.db import FleetDB
from cloud_sync.db_sqlite import CloudDB
from cloud_sync.reports import Reports
from harvester_common import wire
from harvester_common.seqranges import holes, merge_ranges
from harvester_testing import postgres
from tests.test_cloud_db import T0, alert, event, samples

_n = 0


@pytest.fixture(params=["sqlite", "postgres"])
def url_and_path(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path]:
    global _n
    if request.param == "sqlite":
        return "", tmp_path / "cloud.sqlite"
    pg: postgres.TempPostgres = request.getfixturevalue("pg_server")
    _n += 1
    return pg.new_database(f"counts{_n}"), tmp_path / "unused.sqlite"


@pytest.fixture
def db(url_and_path: tuple[str, Path]) -> Iterator[FleetDB]:
    d = open_db(*url_and_path)
    yield d
    d.close()


def counted(db: FleetDB) -> dict[str, dict[str, int]]:
    """The counts as kept at ingest (table `counters`), checked to be what the reports show."""
    out: dict[str, dict[str, int]] = {v: {"samples": 0, "alerts": 0, "events": 0}
                                      for (v,) in db.read("SELECT vehicle FROM vehicles")}
    for v, name, n in db.read("SELECT vehicle, name, value FROM counters WHERE name LIKE ?", ("stored:%",)):
        out[v][name.split(":", 1)[1]] = int(n)
    assert out == {v.vehicle: v.records for v in Reports(db).stats()}
    assert out == {r["vehicle"]: r["records"] for r in Reports(db).fleet()}
    return out


def counted_by_scan(db: FleetDB) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {v: {"samples": 0, "alerts": 0, "events": 0}
                                      for (v,) in db.read("SELECT vehicle FROM vehicles")}
    for kind in ("samples", "alerts", "events"):
        for v, n in db.read(f"SELECT vehicle, COUNT(*) FROM {kind} GROUP BY vehicle"):
            out[v][kind] = int(n)
    return out


def gaps(db: FleetDB) -> dict[str, tuple[int, list[list[int]]]]:
    return {v.vehicle: (v.highest_seq, v.gaps) for v in Reports(db).stats()}


def gaps_by_merge(sent: list[wire.Batch]) -> dict[str, tuple[int, list[list[int]]]]:
    """Highest seq and gaps the long way: every segment sent merged in Python (no evictions sent here)."""
    by: dict[str, list[tuple[int, int]]] = {}
    for b in sent:
        by.setdefault(b.vehicle, []).extend((s.seq_lo, s.seq_hi) for s in b.segments)
    out = {}
    for v, rs in by.items():
        covered = merge_ranges(rs)
        highest = covered[-1][1] if covered else 0
        out[v] = (highest, holes(covered, highest))
    return out


def _random_batch(rng: random.Random, vehicle: str, bid: int) -> wire.Batch:
    """Segments drawn from a small seq space, so resends and overlaps are the rule."""
    segs: list[wire.Segment] = []
    seq = rng.randrange(1, 400)
    for _ in range(rng.randrange(1, 4)):
        kind = rng.choice(["samples", "samples", "alert", "event"])
        if kind == "samples":
            n = rng.randrange(1, 60)
            segs.append(samples(seq, n, T0 + seq))
            seq += n
        elif kind == "alert":
            segs.append(alert(seq, f"a{seq}", "open", T0 + seq))
            seq += 1
        else:
            segs.append(event(seq, "dtc_open", {"spn": seq}))
            seq += 1
    return wire.Batch("f1", vehicle, bid, segs)


def test_counts_equal_count_star_through_duplicates_redeliveries_and_overlaps(db: FleetDB) -> None:
    rng = random.Random(7)
    sent: list[wire.Batch] = []
    for i in range(40):
        group: list[wire.Batch] = []
        for _ in range(rng.randrange(1, 4)):
            if sent and rng.random() < 0.4:
                group.append(rng.choice(sent))  # a redelivery: the broker's or the vehicle's resend
            else:
                group.append(_random_batch(rng, rng.choice(["v1", "v2", "v3"]), i))
        if rng.random() < 0.2:
            group.append(group[0])  # the same batch twice in one transaction
        results = db.ingest(group)
        sent += group
        assert counted(db) == counted_by_scan(db), f"after group {i}"
        assert gaps(db) == gaps_by_merge(sent), f"after group {i}"
        # Received ranges are merged as they arrive: one row per stretch without a hole, not one per segment.
        rows = {v: int(n) for v, n in db.read("SELECT vehicle, COUNT(*) FROM ranges GROUP BY vehicle")}
        assert rows == {v: len(g) + 1 for v, (_, g) in gaps(db).items()}, f"after group {i}"
        stored = sum(sum(r.values()) for r in counted(db).values())
        assert stored > 0 and sum(r.new for r in results) <= stored
    assert any(g for _, g in gaps(db).values())  # the draw left holes to find
    totals = counted(db)
    assert all(totals[v]["samples"] > 0 for v in ("v1", "v2", "v3"))
    assert sum(r.duplicates for r in db.ingest(sent[:5])) > 0 and counted(db) == totals  # resends add nothing


def test_a_failed_transaction_counts_nothing(db: FleetDB) -> None:
    db.ingest([wire.Batch("f1", "v1", 1, [samples(1, 100)])])
    # A real failure half-way through a group: the database refuses one alert (a trigger), after the samples
    # before it were inserted in the same transaction.
    with db._transaction() as cur:
        if isinstance(db, CloudDB):
            cur.execute("CREATE TRIGGER boom BEFORE INSERT ON alerts WHEN NEW.label = 'boom' "
                        "BEGIN SELECT RAISE(ABORT, 'boom'); END")
        else:
            cur.execute("CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                        "IF NEW.label = 'boom' THEN RAISE EXCEPTION 'boom'; END IF; RETURN NEW; END $$")
            cur.execute("CREATE TRIGGER boom BEFORE INSERT ON alerts FOR EACH ROW EXECUTE FUNCTION boom()")
    group = [wire.Batch("f1", "v1", 2, [samples(101, 50)]),
             wire.Batch("f1", "v2", 1, [samples(1, 30), alert(31, "a1", "open", T0, label="boom")])]
    with pytest.raises(Exception, match="boom"):
        db.ingest(group)
    assert counted(db) == counted_by_scan(db) == {"v1": {"samples": 100, "alerts": 0, "events": 0}}
    with db._transaction() as cur:
        cur.execute("DROP TRIGGER boom" + ("" if isinstance(db, CloudDB) else " ON alerts"))
    db.ingest(group)  # redelivered after the failure: counted once
    assert counted(db) == counted_by_scan(db) == {"v1": {"samples": 150, "alerts": 0, "events": 0},
                                                  "v2": {"samples": 30, "alerts": 1, "events": 0}}


def test_migration_backfills_counts_of_a_schema_2_database(url_and_path: tuple[str, Path]) -> None:
    db = open_db(*url_and_path)
    db.ingest([wire.Batch("f1", "v1", 1, [samples(1, 300), alert(301, "a1", "open", T0), event(302, "x", {})]),
               wire.Batch("f1", "v2", 1, [samples(1, 20)])])
    expected = counted_by_scan(db)
    # Back to what schema 2 had: no stored counts, one range row per segment received (its tables are the same).
    with db._transaction() as cur:
        cur.execute("DELETE FROM counters WHERE name LIKE 'stored:%'")
        cur.execute("DELETE FROM ranges")
        for v, lo, hi in [("v1", 1, 100), ("v1", 101, 300), ("v1", 50, 60), ("v1", 301, 301), ("v1", 302, 302),
                          ("v1", 310, 320), ("v1", 321, 330), ("v2", 1, 20), ("v2", 1, 20)]:
            cur.execute(db._sql("INSERT INTO ranges VALUES (?,?,?,'samples')"), (v, lo, hi))
        if isinstance(db, CloudDB):
            cur.execute("PRAGMA user_version=2")
        else:
            cur.execute("UPDATE schema_version SET version=2")
    db.close()
    db = open_db(*url_and_path)
    try:
        assert counted(db) == expected == {"v1": {"samples": 300, "alerts": 1, "events": 1},
                                           "v2": {"samples": 20, "alerts": 0, "events": 0}}
        # Ranges merged by the migration: the same gaps, from one row per stretch.
        assert sorted(tuple(map(str, r)) for r in db.read("SELECT vehicle, seq_lo, seq_hi FROM ranges")) == [
            ("v1", "1", "302"), ("v1", "310", "330"), ("v2", "1", "20")]
        assert gaps(db) == {"v1": (330, [[303, 309]]), "v2": (20, [])}
        db.ingest([wire.Batch("f1", "v2", 2, [samples(1, 40)])])  # 20 resent, 20 new
        assert counted(db)["v2"]["samples"] == 40 == counted_by_scan(db)["v2"]["samples"]
    finally:
        db.close()


def test_the_fleet_query_reads_no_sample(tmp_path: Path) -> None:
    """What `/api/fleet` costs must not grow with the stored history: no statement it runs reads `samples`."""
    db = CloudDB(tmp_path / "cloud.sqlite")
    try:
        db.ingest([wire.Batch("f1", "v1", 1, [samples(1, 500), alert(501, "a1", "open", T0)]),
                   wire.Batch("f1", "v2", 1, [samples(1, 50), event(51, "evicted", {"ranges": [[60, 70]]})])])
        statements: list[str] = []
        db.db.set_trace_callback(statements.append)
        rows = Reports(db).fleet()
        stats = Reports(db).stats()
        db.db.set_trace_callback(None)
        assert [r["records"]["samples"] for r in rows] == [v.records["samples"] for v in stats] == [500, 50]
        assert statements and not [q for q in statements if "samples" in q.lower()], statements
    finally:
        db.close()
