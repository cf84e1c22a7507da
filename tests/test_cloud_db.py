"""The cloud database on both backends — SQLite (a temp file) and PostgreSQL (a real server the fixture starts with
initdb in a temp dir): the same batches give the same stored records, duplicates, gaps, fleet rows and alert
queries. Also the `cloud-sync fleet` and `cloud-sync alerts` commands over a seeded database."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_sync.cli import main as cloud_main
from cloud_sync.db import FleetDB, UnstorableError
from cloud_sync.db_sqlite import CloudDB
from cloud_sync.reports import Reports
from harvester_common import wire

T0 = 1_790_000_000.0


@pytest.fixture
def db(cloud_db: FleetDB) -> FleetDB:
    return cloud_db  # the tests below say `db`; conftest's `cloud_db` runs each on both engines


def samples(lo: int, n: int, t0: float = T0) -> wire.Segment:
    cols = wire.SampleColumns(
        [("EEC1.EngSpeed", "can0/00", "rpm"), ("ET1.EngCoolantTemp", "can0/00", "degC")],
        (np.arange(n) % 2).astype(np.uint16),
        int(t0 * 1e6) + np.arange(n, dtype=np.int64) * 100_000,
        np.where(np.arange(n) % 2 == 0, 1500.0, 90.0) + np.arange(n) * 0.01,
    )
    return wire.Segment("samples", lo, lo + n - 1, columns=cols)


def alert(seq: int, alert_id: str, state: str, ts: float, **extra: Any) -> wire.Segment:
    rec = {"alert_id": alert_id, "state": state, "ts": ts, "score": 0.93, "model": "harvester-anomaly",
           "model_version": "1.0.0", "label": "coolant_leak", "window_start": ts - 30, "window_end": ts,
           "top_features": [["ET1.EngCoolantTemp:mean:30s", 0.4]], "snapshot": {"ET1.EngCoolantTemp": 104.0}, **extra}
    return wire.Segment("alert", seq, seq, record=rec)


def event(seq: int, kind: str, data: dict[str, Any]) -> wire.Segment:
    return wire.Segment("event", seq, seq, record={"kind": kind, "ts": T0, "data": data})


def seed_fleet(db: FleetDB) -> None:
    """Three vehicles: v1 online with an open alert, v2 offline with a closed alert and an eviction, v3 silent."""
    db.ingest([wire.Batch("f1", "v1", 1, [samples(1, 1000), alert(1001, "a1", "open", T0 + 50)])])
    db.ingest([wire.Batch("f1", "v2", 1, [samples(1, 100), alert(101, "a2", "open", T0 + 10),
                                          alert(102, "a2", "closed", T0 + 90),
                                          event(103, "evicted", {"ranges": [[104, 199]]}), samples(200, 10)])])
    db.set_status("f1", "v1", {"state": "online", "model_version": "1.0.0", "backlog": {"samples": 500, "records": 1},
                               "evicted": {"samples": 0, "records": 0},
                               "budget": {"used_today": 3 * 1048576, "daily_bytes": 50 * 1048576},
                               "drift": {"enabled": True, "drift": True, "features": ["AMB.AmbientAirTemp:mean:30s"]}})
    db.set_status("f1", "v2", {"state": "offline"})
    db.set_status("f2", "v3", {"state": "online", "model_version": "0.9.0", "budget": "not an object"})


def test_the_same_batches_give_the_same_records_duplicates_and_gaps(db: FleetDB) -> None:
    b1 = wire.Batch("f1", "v1", 1, [samples(1, 500), alert(501, "a1", "open", T0)])
    b2 = wire.Batch("f1", "v1", 2, [samples(700, 100)])  # 502..699 missing: a gap
    assert [(r.new, r.duplicates) for r in db.ingest([b1, b2])] == [(501, 0), (100, 0)]
    assert [(r.new, r.duplicates) for r in db.ingest([b1])] == [(0, 501)]  # a resend stores nothing twice
    v = Reports(db).stats()[0]
    assert v.records == {"samples": 600, "alerts": 1, "events": 0}
    assert v.duplicates == 501 and v.highest_seq == 799 and v.gaps == [[502, 699]]
    db.ingest([wire.Batch("f1", "v1", 3, [event(800, "evicted", {"ranges": [[502, 699]]})])])
    v = Reports(db).stats()[0]
    assert v.gaps == [] and v.evicted == [[502, 699]]  # explained by the vehicle's eviction report


def test_fleet_rows_show_each_sources_last_state_and_the_vehicles_counters(db: FleetDB) -> None:
    """source_down / source_up events are the vehicle's JSON: the last per source wins, and what has not the
    expected shape is passed over, not a failed page for the fleet."""
    db.ingest([wire.Batch("f1", "v1", 1, [
        event(1, "source_down", {"source": "can0", "reason": "bus_error", "error": "bus off", "errno": 105}),
        event(2, "source_down", {"source": "gps", "reason": "open_failed", "error": "x" * 5000}),
        event(3, "source_up", {"source": "can0", "down_s": 4.0}),
        event(4, "source_down", {"source": ["not", "a", "name"]}),
        wire.Segment("event", 5, 5, record={"kind": "source_up", "ts": T0, "data": "not an object"}),
        event(6, "source_down", {"source": "imu", "reason": 7, "error": None})])])
    db.set_status("f1", "v1", {"state": "online", "metrics": {"counters": {"a": 1, "b": {"x": 2, "y": 0}}}})
    row = Reports(db).fleet(now=T0)[0]
    assert row["sources"] == {"can0": {"up": True, "ts": T0, "reason": "", "error": ""},
                              "gps": {"up": False, "ts": T0, "reason": "open_failed", "error": "x" * 300},
                              "imu": {"up": False, "ts": T0, "reason": "", "error": ""}}
    assert row["metrics"] == {"b{x}": 2, "a": 1}
    assert Reports(db).stats()[0].records["events"] == 6  # stored like any other event


def test_fleet_rows_and_alert_filters(db: FleetDB) -> None:
    seed_fleet(db)
    rows = {r["vehicle"]: r for r in Reports(db).fleet(now=T0 + 100)}
    assert set(rows) == {"v1", "v2", "v3"}
    v1, v2, v3 = rows["v1"], rows["v2"], rows["v3"]
    assert v1["online"] and not v2["online"] and v3["online"]
    assert v1["open_alerts"] == 1 and v2["open_alerts"] == 0  # a2 closed
    assert v1["backlog"] == {"samples": 500, "records": 1} and v1["model_version"] == "1.0.0"
    assert v1["budget"] == {"used_today": 3 * 1048576, "daily_bytes": 50 * 1048576} and v1["drift"] is True
    assert v2["evicted"]["ranges_received"] == 96 and v2["gaps"] == 0
    assert v3["budget"] == {"used_today": 0, "daily_bytes": 0}  # a malformed status field is not trusted
    assert [a["alert_id"] for a in Reports(db).alerts(state="open")] == ["a1"]
    assert [(a["alert_id"], a["state"]) for a in Reports(db).alerts(state="closed")] == [("a2", "closed")]
    assert [a["seq"] for a in Reports(db).alerts(vehicle="v2")] == [101, 102]
    assert [a["seq"] for a in Reports(db).alerts(since=T0 + 40)] == [1001, 102]
    a = Reports(db).alert("v1", 1001)
    assert a is not None and a["label"] == "coolant_leak"
    series = Reports(db).signal_series("v1", T0, T0 + 20, ["ET1.EngCoolantTemp"], max_points=1000)
    assert list(series) == ["ET1.EngCoolantTemp"] and len(series["ET1.EngCoolantTemp"]) == 100
    assert series["ET1.EngCoolantTemp"][0] == pytest.approx((T0 + 0.1, 90.01))



def test_one_vehicles_fleet_row_is_its_row_of_the_whole_fleet(db: FleetDB) -> None:
    """The vehicle page asks for one row and reads that vehicle's rows alone: the same row as the whole fleet's, on
    both engines; a vehicle nobody heard from, or a name made of SQL's wildcards, has none."""
    seed_fleet(db)
    db.ingest([wire.Batch("f1", "v1", 2, [samples(2000, 10)])])  # v1: a gap, so gaps are compared too
    rows = {r["vehicle"]: r for r in Reports(db).fleet(now=T0 + 100)}
    for vehicle, row in rows.items():
        assert Reports(db).fleet(now=T0 + 100, vehicle=vehicle) == [row]
    assert rows["v1"]["gaps"] == 1
    for nobody in ("v4", "%", "v_", "", "v1' OR '1'='1"):
        assert Reports(db).fleet(now=T0 + 100, vehicle=nobody) == []

def test_schema_is_versioned_and_a_newer_database_is_refused(tmp_path: Path) -> None:
    db = CloudDB(tmp_path / "c.sqlite")
    db.db.execute("PRAGMA user_version=99")
    db.close()
    from cloud_sync.db import CloudDBError

    with pytest.raises(CloudDBError, match="newer than this cloud_sync"):
        CloudDB(tmp_path / "c.sqlite")


def _cfg(tmp_path: Path) -> Path:
    p = tmp_path / "cloud.toml"
    p.write_text('[db]\npath = "cloud.sqlite"\n')
    return p


def test_fleet_and_alerts_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _cfg(tmp_path)
    assert cloud_main(["fleet", "--config", str(cfg)]) == 2  # no database yet: a clear error, not an empty one
    assert "no database yet" in capsys.readouterr().err
    db = CloudDB(tmp_path / "cloud.sqlite")
    seed_fleet(db)
    db.close()
    assert cloud_main(["fleet", "--config", str(cfg), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [v["vehicle"] for v in out["vehicles"]] == ["v1", "v2", "v3"]
    assert cloud_main(["fleet", "--config", str(cfg)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["vehicle", "state", "last"]
    assert table[1].split()[:2] == ["f1/v1", "online"] and table[1].split()[-1] == "yes"  # drift flagged
    assert "3.0/50.0" in table[1] and table[2].split()[:2] == ["f1/v2", "offline"]

    assert cloud_main(["alerts", "--config", str(cfg), "--state", "open", "--json"]) == 0
    assert [a["alert_id"] for a in json.loads(capsys.readouterr().out)["alerts"]] == ["a1"]
    assert cloud_main(["alerts", "--config", str(cfg), "--vehicle", "v2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and "closed" in lines[2] and "coolant_leak" in lines[2]
    since_now = str(time.time())
    assert cloud_main(["alerts", "--config", str(cfg), "--since", since_now]) == 0
    assert "(no alerts match)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cloud_main(["alerts", "--config", str(cfg), "--state", "maybe"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def _one_signal(lo: int, n: int, sig: tuple[str, str, str], value: float) -> wire.Segment:
    cols = wire.SampleColumns([sig], np.zeros(n, np.uint16),
                              int(T0 * 1e6) + np.arange(n, dtype=np.int64) * 100_000, np.full(n, value))
    return wire.Segment("samples", lo, lo + n - 1, columns=cols)


def _signal_of_each_sample(db: FleetDB, vehicle: str) -> dict[int, str | None]:
    rows = db.read("SELECT s.seq, g.name FROM samples s LEFT JOIN signals g ON g.id = s.signal_id "
                    "WHERE s.vehicle=? ORDER BY s.seq", (vehicle,))
    return {int(seq): name for seq, name in rows}


def test_every_sample_keeps_its_signal_through_a_failed_transaction(db: FleetDB) -> None:
    """A group that fails mid-transaction rolls back the signals it added; the id cache must not keep them, or a
    later batch's new signal takes the same id (SQLite) or the redelivered samples point at nothing (PostgreSQL)."""
    first = wire.Batch("f1", "v1", 1, [_one_signal(1, 10, ("FIRST.Sig", "can0/00", "u"), 1.0)])
    # Its group-mate cannot be stored (a sequence number past BIGINT): the whole transaction rolls back.
    poison = wire.Batch("f1", "v2", 2, [alert(2**63, "p", "open", T0)])
    with pytest.raises(UnstorableError):  # the backend refused the data; the database is fine
        db.ingest([first, poison])
    assert Reports(db).stats() == []  # nothing of the failed group is stored
    second = wire.Batch("f1", "v1", 3, [_one_signal(100, 10, ("SECOND.Sig", "can0/00", "u"), 2.0)])
    db.ingest([second])
    db.ingest([first])  # the redelivery, alone, after the failure
    got = _signal_of_each_sample(db, "v1")
    assert got == {**{s: "FIRST.Sig" for s in range(1, 11)}, **{s: "SECOND.Sig" for s in range(100, 110)}}
