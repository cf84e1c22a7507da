"""Quality per model version and fault (docs/learning_loop.md, "Quality"): `Reports.quality` over a handcrafted
database on both engines (conftest `cloud_db`) whose every figure was worked out by hand below: precision from the
verdicts now, engine hours from SPN 247 samples over two versions' stretches, false alarms per 100 engine hours,
breakdowns caught and missed at the edges of the lead window, the median lead time, drift shares, retraining due
for both reasons and not due below `min_verdicts`. Also: malformed stored records (they are vehicles' JSON text)
do not break the report, the engine-hours queries go through the (vehicle, signal_id, ts) index and read two rows
per stretch, the pure rules on their own, and `cloud-sync quality` as the engineer runs it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_sync import quality as q
from cloud_sync.cli import main as cloud_main
from cloud_sync.config import QualityConfig
from cloud_sync.db import FleetDB
from cloud_sync.db_sqlite import CloudDB
from cloud_sync.reports import Reports
from harvester_common import wire
from tests.test_cloud_db import T0

P0, D, H = T0, 86400.0, 3600.0
SINCE, UNTIL = P0, P0 + 12 * D
MODEL = "harvester-anomaly"
HOURS = (q.HOURS_SIGNAL, "can0/00", "h")
OTHER = ("EEC1.EngSpeed", "can0/00", "rpm")


def opening(seq: int, alert_id: str, ts: float, version: str, label: str, state: str = "open",
            **extra: Any) -> wire.Segment:
    return wire.Segment("alert", seq, seq, record={
        "alert_id": alert_id, "state": state, "ts": ts, "score": 0.9, "model": MODEL, "model_version": version,
        "label": label, "window_start": ts - 30, "window_end": ts, **extra})


def drift(seq: int, ts: float, version: str, drifted: bool) -> wire.Segment:
    return wire.Segment("event", seq, seq, record={"kind": "drift", "ts": ts, "data": {
        "model": MODEL, "model_version": version, "drift": drifted, "windows": 100, "drifted": {}}})


def series(seq: int, points: Sequence[tuple[float, float]], sig: tuple[str, str, str] = HOURS) -> wire.Segment:
    n = len(points)
    cols = wire.SampleColumns([sig], np.zeros(n, np.uint16),
                              np.array([round(t * 1e6) for t, _ in points], np.int64),
                              np.array([v for _, v in points], np.float64))
    return wire.Segment("samples", seq, seq + n - 1, columns=cols)


def seed(db: FleetDB) -> None:
    """v1 ran 1.0.0 (named by a drift report and an alert before the period) until alert b1 opened under 2.0.0 at
    P0+5d; its SPN 247 rose 100 → 160 under 1.0.0 and 170 → 250 under 2.0.0. v2 sends no SPN 247 and first names
    a version (2.0.0) at P0+6d. Alert a4's closing record names 1.0.0 after the switch (closed: model changed)."""
    db.ingest([wire.Batch("f1", "v1", 1, [
        drift(1, P0 - D, "1.0.0", False),
        series(2, [(P0 - 0.5 * D, 90.0), (P0 + 0.5 * D, 100.0), (P0 + 4.5 * D, 160.0), (P0 + 5.5 * D, 170.0),
                   (P0 + 11.5 * D, 250.0)]),
        opening(10, "a0", P0 - D, "1.0.0", "coolant_leak"),
        opening(11, "a1", P0 + D, "1.0.0", "coolant_leak"),
        opening(12, "a2", P0 + 2 * D, "1.0.0", "coolant_leak"),
        opening(13, "a3", P0 + 3 * D, "1.0.0", "fan_belt"),
        opening(14, "a4", P0 + 3.5 * D, "1.0.0", "fan_belt"),
        opening(15, "b1", P0 + 5 * D, "2.0.0", "coolant_leak"),
        opening(16, "a4", P0 + 5 * D + 10, "1.0.0", "fan_belt", state="closed", reason="model_changed"),
        opening(17, "b2", P0 + 6 * D, "2.0.0", "coolant_leak"),
        opening(18, "b3", P0 + 7 * D, "2.0.0", "coolant_leak"),
        opening(19, "b4", P0 + 8 * D, "2.0.0", "fan_belt"),
        *[drift(20 + i, P0 + 5 * D + i * H, "2.0.0", i < 8) for i in range(9)],  # 8 of 9: too few to judge
    ])])
    db.ingest([wire.Batch("f1", "v2", 1, [
        *[drift(1 + i, P0 + 6 * D + i * H, "2.0.0", i < 3) for i in range(10)],  # 3 of 10 drifted: 30 %
        opening(11, "c1", P0 + 6.5 * D, "2.0.0", "coolant_leak"),
        opening(12, "c2", P0 + 7 * D, "2.0.0", "coolant_leak"),
    ])])
    verdicts = {"a1": "confirmed", "a2": "false_alarm", "a3": "unknown", "b1": "confirmed", "b2": "false_alarm",
                "b3": "false_alarm", "b4": "false_alarm", "c1": "false_alarm", "c2": "confirmed"}
    db.add_verdict("a2", "confirmed", by="bob")  # changed below: only the verdict now counts
    for alert_id, label in verdicts.items():
        db.add_verdict(alert_id, label, by="alice")
    for vehicle, at, fault in (
            ("v1", P0 - 2 * H, "coolant_leak"),  # before the period
            ("v1", P0 + H, "coolant_leak"),  # caught by a0 (opened before the period, no verdict): lead 25 h
            ("v1", P0 + 3.5 * D, "coolant_leak"),  # a1 opened 60 h before (a2 is a false alarm; a4 opened at it)
            ("v2", P0 + 10 * D, "coolant_leak"),  # c2 opened exactly 72 h before: caught, lead 72 h
            ("v2", P0 + 10 * D + 1, "coolant_leak"),  # one second later c2 is out of the window: missed
            ("v2", P0 + 6.5 * D + H, "hydraulic_leak"),  # only c1 warned of it, a false alarm: missed
            ("v2", P0 + D, "coolant_leak"),  # before v2 names any version: missed by an unknown version
            ("v1", UNTIL, "coolant_leak")):  # the period is half-open
        db.add_breakdown(vehicle, at, fault, by="carol", recorded_at=UNTIL)


def figures(alerts: int, verdicts: tuple[int, int, int, int], precision: float | None, caught: int, missed: int,
            lead: float | None) -> dict[str, Any]:
    return {"alerts": alerts, "verdicts": dict(zip(q.VERDICT_KEYS, verdicts, strict=True)), "precision": precision,
            "breakdowns": {"caught": caught, "missed": missed}, "median_lead_time_h": lead}


def version(name: str, v: str, total: dict[str, Any], hours: float | None, per_100h: float | None,
            drift_share: dict[str, float], drift_reports: dict[str, int], per_fault: dict[str, dict[str, Any]],
            reasons: list[str]) -> dict[str, Any]:
    return {"model": name, "version": v, "alerts": total["alerts"], "verdicts": total["verdicts"],
            "precision": total["precision"], "engine_hours": hours, "false_alarms_per_100_engine_hours": per_100h,
            "breakdowns": total["breakdowns"], "median_lead_time_h": total["median_lead_time_h"],
            "drift_share": drift_share, "drift_reports": drift_reports, "per_fault": per_fault,
            "retraining_due": bool(reasons), "retraining_reasons": reasons}


PRECISION_REASON = "precision 0.33 is below min_precision 0.70 (2 confirmed, 4 false alarms)"
DRIFT_REASON = "v2: 3 of 10 drift reports say drifted (30%), above max_drift_share 20%"
# By hand. 1.0.0: a1..a4 opened in the period (a0 before it); a2's verdict now is false_alarm; SPN 247 rose
# 160 - 100 = 60 h in its stretch [P0, P0+5d), one false alarm: 100/60 per 100 h; caught at lead 25 h and 60 h.
V1 = version(MODEL, "1.0.0", figures(4, (1, 1, 1, 1), 0.5, 2, 0, 42.5), 60.0, 1.6667, {}, {}, {
    "coolant_leak": figures(2, (1, 1, 0, 0), 0.5, 2, 0, 42.5),
    "fan_belt": figures(2, (0, 0, 1, 1), None, 0, 0, None)}, [])
# 2.0.0: b1..b4 on v1, c1, c2 on v2; 2 confirmed of 6 judged; 250 - 170 = 80 h on v1, none known on v2, so v1's
# three false alarms over v1's hours: 3.75 per 100 h (c1 is on a vehicle without hours); caught one at 72 h,
# missed two; v1 drifted 8 of 9 (too few reports to judge), v2 3 of 10.
V2 = version(MODEL, "2.0.0", figures(6, (2, 4, 0, 0), 0.3333, 1, 2, 72.0), 80.0, 3.75,
             {"v1": 0.8889, "v2": 0.3}, {"v1": 9, "v2": 10}, {
                 "coolant_leak": figures(5, (2, 3, 0, 0), 0.4, 1, 1, 72.0),
                 "fan_belt": figures(1, (0, 1, 0, 0), 0.0, 0, 0, None),
                 "hydraulic_leak": figures(0, (0, 0, 0, 0), None, 0, 1, None)},
             [PRECISION_REASON, DRIFT_REASON])
UNKNOWN = version(q.UNKNOWN, q.UNKNOWN, figures(0, (0, 0, 0, 0), None, 0, 1, None), None, None, {}, {},
                  {"coolant_leak": figures(0, (0, 0, 0, 0), None, 0, 1, None)}, [])


def test_every_figure_of_a_handcrafted_fleet(cloud_db: FleetDB) -> None:
    seed(cloud_db)
    r = Reports(cloud_db).quality(QualityConfig(), SINCE, UNTIL)
    assert r["period"] == {"since": SINCE, "until": UNTIL}
    assert r["thresholds"] == {"min_precision": 0.7, "min_verdicts": 5, "max_drift_share": 0.2,
                               "min_drift_reports": 10, "lead_window_h": 72.0}
    assert r["models"][0] == V1
    assert r["models"][1] == V2
    assert r["models"] == [V1, V2, UNKNOWN]
    assert r["retraining_due"] is True
    assert r["retraining_reasons"] == [f"{MODEL} 2.0.0: {PRECISION_REASON}", f"{MODEL} 2.0.0: {DRIFT_REASON}"]
    # One model's versions only; the thresholds are the config's: 1.0.0's two judged verdicts now suffice.
    assert Reports(cloud_db).quality(QualityConfig(), SINCE, UNTIL, model=MODEL)["models"] == [V1, V2]
    assert Reports(cloud_db).quality(QualityConfig(), SINCE, UNTIL, model="other")["models"] == []
    strict = Reports(cloud_db).quality(QualityConfig(min_verdicts=2), SINCE, UNTIL, model=MODEL)
    assert strict["models"][0]["retraining_reasons"] == [
        "precision 0.50 is below min_precision 0.70 (1 confirmed, 1 false alarms)"]
    # A wider lead window: the breakdown at P0+10d+1s is now caught by c2, 72 h and 1 s before it.
    wide = Reports(cloud_db).quality(QualityConfig(lead_window_h=73), SINCE, UNTIL, model=MODEL)["models"][1]
    assert wide["breakdowns"] == {"caught": 2, "missed": 1} and wide["median_lead_time_h"] == 72.0


def test_the_period_selects_openings_breakdowns_and_stretches(cloud_db: FleetDB) -> None:
    seed(cloud_db)
    # [P0+5d, P0+12d): v1 runs 2.0.0 from the start (named by b1 at the start itself); 1.0.0 had only a4's opening
    # before it, which is not in the period, so it has no row at all.
    r = Reports(cloud_db).quality(QualityConfig(), P0 + 5 * D, UNTIL, model=MODEL)
    assert [m["version"] for m in r["models"]] == ["2.0.0"]
    assert r["models"][0]["engine_hours"] == 80.0
    # [P0+4.6d, P0+5.6d): v1's 1.0.0 stretch holds no SPN 247 sample (hours unknown), 2.0.0's only one (no rise).
    r = Reports(cloud_db).quality(QualityConfig(), P0 + 4.6 * D, P0 + 5.6 * D, model=MODEL)
    assert [(m["version"], m["engine_hours"]) for m in r["models"]] == [("1.0.0", None), ("2.0.0", 0.0)]
    assert r["models"][1]["false_alarms_per_100_engine_hours"] is None  # no hours to divide by
    # The default period: the 30 days to now.
    now = Reports(cloud_db).quality(QualityConfig(), now=UNTIL + D)
    assert now["period"] == {"since": UNTIL + D - 30 * D, "until": UNTIL + D}


def test_malformed_stored_records_do_not_break_the_report(cloud_db: FleetDB) -> None:
    """Alert and event records are the vehicles' JSON, stored as sent: wrong types, non-objects, text that is not
    JSON at all (a database written by hand or by an older receiver) count as naming no version, or as no report."""
    seed(cloud_db)
    cloud_db.ingest([wire.Batch("f1", "v1", 2, [
        wire.Segment("alert", 100, 100, record={"alert_id": "j1", "state": "open", "ts": P0 + 2 * D, "model": 5,
                                                "model_version": None, "label": ["x"]}),
        wire.Segment("event", 101, 101, record={"kind": "drift", "ts": P0 + D, "data": "not an object"}),
        wire.Segment("event", 102, 102, record={"kind": "drift", "ts": P0 + 2 * D,
                                                "data": {"model": MODEL, "model_version": 7, "drift": True}}),
        wire.Segment("event", 103, 103, record={"kind": "drift", "ts": P0 + 2 * D, "data": []}),
    ])])
    with cloud_db._transaction() as cur:
        for seq, rec in ((200, "[1, 2]"), (201, "not json"), (202, "[" * 100_000), (203, "null")):
            cur.execute(cloud_db._sql("INSERT INTO events VALUES (?,?,?,?,?)"), ("v1", seq, "drift", P0 + 3 * D, rec))
        for seq, rec in ((210, "null"), (211, '{"model": "harvester-anomaly", "model_version": "9.9.9"'),
                         (212, "[" * 100_000)):
            cur.execute(cloud_db._sql("INSERT INTO alerts VALUES (?,?,?,?,?,?,?,?,?,?)"),
                        ("v1", seq, f"j{seq}", "open", P0 + 4 * D, None, MODEL, "9.9.9", "leak", rec))
    r = Reports(cloud_db).quality(QualityConfig(), SINCE, UNTIL)
    assert r["models"][:2] == [V1, V2]  # v1's stretches and hours untouched: none of these names a version
    unknown = r["models"][2]
    assert (unknown["alerts"], unknown["verdicts"]["none"], unknown["breakdowns"]) == (4, 4, {"caught": 0,
                                                                                              "missed": 1})
    assert unknown["per_fault"][""]["alerts"] == 4  # no label a report could use
    json.dumps(r, allow_nan=False)  # strict JSON


def test_engine_hours_read_two_samples_per_stretch_through_the_index(cloud_db: FleetDB) -> None:
    """On a database of 100 M samples the report must not scan `samples`: per stretch a version ran, the first
    and the last SPN 247 sample, each an index search (the query plan says so on both engines)."""
    seed(cloud_db)
    # Bulk beside SPN 247, so that a plan that scanned would have something to scan.
    for vehicle in ("v1", "v2"):
        pts = [(P0 + i * 30.0, float(i)) for i in range(20_000)]
        cloud_db.ingest([wire.Batch("f1", vehicle, 5, [series(100_000, pts, OTHER)])])
    if not isinstance(cloud_db, CloudDB):
        with cloud_db._transaction() as cur:  # PostgreSQL plans by its statistics: give it the real ones
            cur.execute("ANALYZE samples")
    statements: list[tuple[str, tuple[Any, ...]]] = []
    read = cloud_db.read

    def recording(sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        statements.append((sql, tuple(args)))
        return read(sql, args)

    cloud_db.read = recording  # type: ignore[method-assign]
    try:
        assert Reports(cloud_db).quality(QualityConfig(), SINCE, UNTIL)["models"] == [V1, V2, UNKNOWN]
    finally:
        cloud_db.read = read  # type: ignore[method-assign]
    on_samples = [(sql, args) for sql, args in statements if "samples" in sql]
    # Three stretches (v1: 1.0.0, 2.0.0; v2: 2.0.0), one SPN 247 signal: first and last of each.
    assert len(on_samples) == 6
    for sql, args in on_samples:
        assert sql.startswith("SELECT ts, value FROM samples WHERE vehicle=? AND signal_id=? AND ts>=? AND ts<? "
                              "ORDER BY ts ") and sql.endswith(" LIMIT 1"), sql
        if isinstance(cloud_db, CloudDB):
            plan = " ".join(str(r[-1]) for r in read("EXPLAIN QUERY PLAN " + sql, args))
            assert "USING INDEX samples_by_signal_time" in plan and "SCAN" not in plan, plan
        else:
            plan = " ".join(str(r[0]) for r in read("EXPLAIN " + sql, args))
            assert "samples_by_signal_time" in plan and "Seq Scan" not in plan and "Sort" not in plan, plan
    # The vehicles' records are searched by index too (schema step 6), never scanned whole. (SQLite plans by the
    # schema alone; PostgreSQL rightly scans tables this small, so its plans say nothing here.)
    if isinstance(cloud_db, CloudDB):
        on_records = [(sql, args) for sql, args in statements if " FROM alerts " in sql or " FROM events " in sql]
        assert len(on_records) == 7  # the period's openings; per vehicle its drift reports, marks before
        for sql, args in on_records:
            plan = " ".join(str(r[-1]) for r in read("EXPLAIN QUERY PLAN " + sql, args))
            assert "SCAN" not in plan and "USING INDEX" in plan, (sql, plan)


# --- the pure rules ---------------------------------------------------------------------------------------------


def test_stretches_run_from_a_version_named_to_the_next_version_named() -> None:
    period = q.Period(100.0, 200.0)
    marks = [q.Mark(150.0, "m", "2"), q.Mark(10.0, "m", "0"), q.Mark(50.0, "m", "1"), q.Mark(120.0, "m", "1"),
             q.Mark(150.0, "m", "3"), q.Mark(180.0, "m", "3"), q.Mark(200.0, "m", "4")]
    assert q.stretches("v", marks, period) == [
        q.Stretch("v", "m", "1", 100.0, 150.0),  # from the last mark before the period; 120 names it again
        # 2 and 3 at the same time: 2 ran for no time at all; a mark at the period's end is outside it
        q.Stretch("v", "m", "3", 150.0, 200.0)]
    assert q.stretches("v", [q.Mark(130.0, "m", "1")], period) == [q.Stretch("v", "m", "1", 130.0, 200.0)]
    assert q.stretches("v", [], period) == [] and q.stretches("v", [q.Mark(250.0, "m", "1")], period) == []


@pytest.mark.parametrize(("first", "last", "expected"), [
    ((0.0, 100.0), (36_000.0, 110.0), 10.0),  # ten hours in ten hours
    ((0.0, 100.0), (36_000.0, 100.0), 0.0),  # engine off
    ((0.0, 100.0), (36_000.0, 110.05), 10.05),  # one counter step of slack
    ((0.0, 100.0), (36_000.0, 110.2), None),  # faster than time: a garbled sample
    ((0.0, 100.0), (36_000.0, 3.0), None),  # a counter reset (an ECU replaced)
    ((0.0, 100.0), (0.0, 100.0), 0.0),  # one sample
    (None, (0.0, 1.0), None),
    ((0.0, float("nan")), (10.0, 1.0), None),
])
def test_an_hours_rise_is_trusted_only_when_a_counter_could_make_it(
        first: tuple[float, float] | None, last: tuple[float, float] | None, expected: float | None) -> None:
    assert q.hours_rise(first, last) == (pytest.approx(expected) if expected is not None else None)


def test_versions_sort_by_their_numbers_and_hostile_ones_do_not_break_the_sort() -> None:
    runs = [q.Stretch("v", "m", ver, 0.0, 1.0) for ver in ("1.10.0", "1.9.0", "1" * 5000, "1.9.0-rc1", "²", "")]
    r = q.report(q.Period(0.0, 10.0), QualityConfig(), [], {}, [], runs, [None] * len(runs), [])
    assert [m["version"] for m in r["models"]] == ["", "1.9.0", "1.9.0-rc1", "1.10.0", "1" * 5000, "²"]


# --- the command ------------------------------------------------------------------------------------------------


def test_quality_command_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = CloudDB(tmp_path / "cloud.sqlite")
    seed(db)
    db.close()
    cfg = tmp_path / "cloud.toml"
    cfg.write_text('[db]\npath = "cloud.sqlite"\n[quality]\nmax_drift_share = 0.5\n')
    period = ["--since", "2026-09-21T14:13:20", "--until", str(int(UNTIL))]  # P0 in ISO, UNTIL in Unix seconds
    assert cloud_main(["quality", "--config", str(cfg), *period, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["period"] == {"since": SINCE, "until": UNTIL} and doc["thresholds"]["max_drift_share"] == 0.5
    assert doc["models"][1]["retraining_reasons"] == [PRECISION_REASON]  # 30 % drift is within 50 %
    assert cloud_main(["quality", "--config", str(cfg), *period]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("model quality from 2026-09-21 14:13:20 to 2026-10-03 14:13:20 UTC (a breakdown is caught "
                        "by an alert up to 72 h before it)")
    table = {tuple(ln.split()[:2]): ln.split() for ln in lines[2:-1]}
    assert table[(MODEL, "1.0.0")][2:] == ["4", "1", "1", "1", "1", "0.50", "60.0", "1.67", "2", "0", "42.5"]
    assert table[(MODEL, "2.0.0")][2:] == ["6", "2", "4", "0", "0", "0.33", "80.0", "3.75", "1", "2", "72.0",
                                           "89%", "v1"]
    assert table[("coolant_leak", "5")] == ["coolant_leak", "5", "2", "3", "0", "0", "0.40", "1", "1", "72.0"]
    assert table[(q.UNKNOWN, q.UNKNOWN)][2:] == ["0", "0", "0", "0", "0", "-", "-", "-", "0", "1", "-"]
    assert lines[-1] == f"retraining due: {MODEL} 2.0.0: {PRECISION_REASON}"
    assert cloud_main(["quality", "--config", str(cfg), "--model", "nothing", *period]) == 0
    assert capsys.readouterr().out.splitlines()[2:] == ["(no alert, breakdown or drift report in this period)",
                                                        "retraining due: no"]
