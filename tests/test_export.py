"""`cloud-sync export` on both engines (SQLite file, real PostgreSQL): the Parquet dataset read back file by file
equals the database row for row (values bit for bit, records as stored), in the layout docs/learning_loop.md
promises (vehicle and UTC day in the path, seq order and the seq range in each file's name); the selection
(--vehicles, half-open --since/--until); pandas opens it in one line; a small --chunk-rows splits files and bounds
every read; an export killed with SIGKILL mid-way and run again equals one never interrupted; a file renamed
before its state was written, rows stored late below the recorded position, a full disk (a real tmpfs) and a DIR
that is not ours are all handled without a row lost, doubled, or anything of someone else's deleted."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pyarrow.parquet as pq
import pytest

from cloud_sync.cli import main as cloud_main
from cloud_sync.db import CloudDBError, FleetDB
from cloud_sync.db_postgres import PostgresDB
from cloud_sync.db_sqlite import CloudDB
from cloud_sync.export import Exporter, Selection, export
from cloud_sync.exportdir import LOCK, STATE, ExportError, Layout
from cloud_sync.progress import Progress
from harvester_common import wire
from harvester_testing.tomlw import dumps as toml_dumps

ROOT = Path(__file__).resolve().parents[1]
DAY0 = 1_790_035_200.0  # 2026-09-22T00:00:00Z
SIGNALS = [("EEC1.EngSpeed", "can0/00", "rpm"), ("ET1.EngCoolantTemp", "can0/00", "°C"),
           ("ET1.EngCoolantTemp", "can1/17", "°C"), ("GPS.Speed", "gps", "km/h"), ("VIB.Rms", "vib", "")]
# Values a float64 column must keep bit for bit: signed zero, subnormals, the extremes.
EVERYTHING = Selection()
ODD_VALUES = [-0.0, 5e-324, -2.5e-310, 1.7976931348623157e308, -1.7976931348623157e308, 0.1 + 0.2]


@pytest.fixture
def db(cloud_db: FleetDB) -> FleetDB:
    return cloud_db  # conftest's `cloud_db`: each test runs on SQLite and on PostgreSQL


def sample_segment(lo: int, n: int, t0: float, seed: int) -> wire.Segment:
    """`n` samples of all SIGNALS in signal-major order (as the agent's store sends them), so ts goes up and back
    down along seq; random float64 values of every magnitude, and the odd ones."""
    rng = np.random.default_rng(seed)
    k = len(SIGNALS)
    sig = np.repeat(np.arange(k), -(-n // k))[:n].astype(np.uint16)
    within = np.concatenate([np.arange((sig == i).sum()) for i in range(k)])
    ts_us = int(t0 * 1e6) + within.astype(np.int64) * 700_000 + sig.astype(np.int64) * 13
    value = rng.standard_normal(n) * 10.0 ** rng.integers(-300, 300, n)
    value[: len(ODD_VALUES)] = ODD_VALUES[: n]
    return wire.Segment("samples", lo, lo + n - 1, columns=wire.SampleColumns(SIGNALS, sig, ts_us, value))


def record(segment_kind: str, seq: int, /, **rec: Any) -> wire.Segment:
    return wire.Segment(segment_kind, seq, seq, record=rec)


def alert(seq: int, alert_id: str, state: str, ts: float, **extra: Any) -> wire.Segment:
    return record("alert", seq, alert_id=alert_id, state=state, ts=ts, score=0.91, model="harvester-anomaly",
                  model_version="2.0.0", label="coolant_leak", top_features=[["ET1.EngCoolantTemp:mean:30s", 0.4]],
                  **extra)


def seed(db: FleetDB) -> None:
    """Three vehicles over three UTC days: samples crossing midnight in signal-major order with holes in seq,
    alerts (one without a score, one with a Unicode snapshot), events (one of 1969, one past year 9999), verdicts
    (an alert's history of two) and breakdowns."""
    db.ingest([wire.Batch("f1", "hv-1", 1, [
        sample_segment(1, 900, DAY0 - 60, 1),  # straddles the first midnight
        alert(901, "a-1", "open", DAY0 + 10, snapshot={"ET1.EngCoolantTemp": 104.5, "note": "Kühlmittel ✓"}),
        sample_segment(902, 700, DAY0 + 86_400 - 50, 2),  # and the second
        alert(1602, "a-1", "closed", DAY0 + 86_400 + 5),
        record("event", 1603, kind="source_down", ts=DAY0 + 20, source="can0", error="bus off"),
        sample_segment(2000, 400, DAY0 + 2 * 86_400 + 60, 3),  # 1604..1999: a hole
    ])])
    db.ingest([wire.Batch("f1", "hv-2", 1, [
        sample_segment(10, 600, DAY0 + 3_600, 4),
        record("alert", 610, alert_id="a-2", state="open", ts=DAY0 + 4_000, model="harvester-anomaly",
               model_version="1.0.0", label="bearing_wear"),  # no score
        record("event", 611, kind="drift", ts=DAY0 + 4_100, model_version="1.0.0", drifted=False),
    ])])
    db.ingest([wire.Batch("f2", "hv-3", 1, [
        record("event", 1, kind="clock", ts=-1.5, note="before 1970"),
        record("event", 2, kind="clock", ts=1e300, note="a forged time"),
        sample_segment(3, 50, DAY0 + 86_400 + 7, 5),
    ])])
    with db._transaction() as cur:
        for row in [("hv-1", "a-1", "false_alarm", "", "first look", "ana", DAY0 + 90_000),
                    ("hv-1", "a-1", "confirmed", "coolant_leak", "hose split\nreplaced", "jo", DAY0 + 95_000),
                    ("hv-2", "a-2", "unknown", "", "could not tell — ask again", "ana", DAY0 + 96_000)]:
            cur.execute(db._sql("INSERT INTO verdicts (vehicle, alert_id, label, fault, note, by, at) "
                                "VALUES (?,?,?,?,?,?,?)"), row)
        for row in [("hv-1", DAY0 + 86_400 + 100, "coolant_leak", "", "jo", DAY0 + 97_000),
                    ("hv-3", DAY0 + 7, "flat_tyre", "rear left", "ana", DAY0 + 98_000)]:
            cur.execute(db._sql("INSERT INTO breakdowns (vehicle, at, fault, note, by, recorded_at) "
                                "VALUES (?,?,?,?,?,?)"), row)


# --- what the database holds, and what the dataset holds, as comparable rows ---------------------------------


def bits(row: Sequence[Any]) -> tuple[Any, ...]:
    """A row with its floats as their exact bits (hex), so -0.0 and 0.0 differ and nothing is rounded."""
    return tuple(v.hex() if isinstance(v, float) else v for v in row)


def day(ts: float) -> str:
    try:
        return dt.datetime.fromtimestamp(ts, dt.UTC).date().isoformat()
    except (OverflowError, ValueError, OSError):
        return "out-of-range"


DB_SQL = {
    "samples": "SELECT s.vehicle, s.seq, s.ts, g.name, g.source, g.unit, s.value FROM samples s "
               "JOIN signals g ON g.id = s.signal_id",
    "alerts": "SELECT vehicle, seq, alert_id, state, ts, score, model, model_version, label, record FROM alerts",
    "events": "SELECT vehicle, seq, kind, ts, record FROM events",
    "verdicts": 'SELECT id, vehicle, alert_id, label, fault, note, "by", "at" FROM verdicts',
    "breakdowns": 'SELECT id, vehicle, "at", fault, note, "by", recorded_at FROM breakdowns',
}


def db_rows(db: FleetDB, table: str, sel: Selection = EVERYTHING) -> list[tuple[Any, ...]]:
    """The selected rows straight from the database, filtered here: (vehicle, day, seq, ...) for the partitioned
    tables, (id, vehicle, ...) for the others."""
    out = []
    for r in db.read(DB_SQL[table]):
        if sel.vehicles is not None and r[0 if table in ("samples", "alerts", "events") else 1] not in sel.vehicles:
            continue
        if table in ("samples", "alerts", "events"):
            ts = float(r[2] if table == "samples" else r[4 if table == "alerts" else 3])
            if (sel.since is not None and ts < sel.since) or (sel.until is not None and ts >= sel.until):
                continue
            out.append(bits((r[0], day(ts), *r[1:])))
        else:
            out.append(bits(r))
    return sorted(out, key=lambda r: (r[0], r[2]) if table in ("samples", "alerts", "events") else r[0])


def dataset_rows(out: Path, table: str) -> list[tuple[Any, ...]]:
    """The dataset file by file, checking each file against the layout: vehicle and day from its path (and not
    in it), rows in seq order, its name the seq range it holds, each row in its day's folder."""
    if table in ("verdicts", "breakdowns"):
        return sorted(bits(r.values()) for r in pq.read_table(out / table / "part-0.parquet").to_pylist())
    rows = []
    for f in sorted((out / table).glob("vehicle=*/day=*/*")):
        assert f.name.startswith("part-") and f.suffix == ".parquet", f
        vehicle, d = f.parent.parent.name.removeprefix("vehicle="), f.parent.name.removeprefix("day=")
        t = pq.read_table(f)
        assert "vehicle" not in t.column_names and "day" not in t.column_names
        got = t.to_pylist()
        seqs = [r["seq"] for r in got]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), f
        assert f.name == f"part-{seqs[0]}-{seqs[-1]}.parquet"
        for r in got:
            assert day(r["ts"]) == d, (f, r["ts"])
            rows.append(bits((vehicle, d, *r.values())))
    return sorted(rows, key=lambda r: (r[0], r[2]))


def assert_equal_to_db(db: FleetDB, out: Path, sel: Selection = EVERYTHING) -> dict[str, int]:
    counts = {}
    for table in DB_SQL:
        want, got = db_rows(db, table, sel), dataset_rows(out, table)
        assert got == want, table
        counts[table] = len(got)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["rows"] == counts
    return counts


def files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet"))


def config(db: FleetDB, tmp_path: Path) -> Path:
    """A cloud_sync config naming this database, for the command."""
    path = tmp_path / "cloud.toml"
    dbc = {"url": db.url} if isinstance(db, PostgresDB) else {"path": str(cast(CloudDB, db).path)}
    path.write_text(toml_dumps({"db": dbc}))
    return path


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cloud_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# --- the dataset ------------------------------------------------------------------------------------------------


def test_the_dataset_equals_the_database_row_for_row(db: FleetDB, tmp_path: Path) -> None:
    seed(db)
    out = tmp_path / "export"
    r = export(db, out, Selection(), notes=io.StringIO())
    counts = assert_equal_to_db(db, out)
    assert counts == {"samples": 2650, "alerts": 3, "events": 4, "verdicts": 3, "breakdowns": 2}
    assert r.rows == counts and r.vehicles == ["hv-1", "hv-2", "hv-3"]
    # Every signal with its own source and unit, the same name under two sources kept apart.
    t = pq.read_table(out / "samples")
    assert {tuple(x.values()) for x in t.select(["signal", "source", "unit"]).to_pylist()} == set(SIGNALS)
    assert str(t.schema.field("signal").type) == "dictionary<values=string, indices=int32, ordered=0>"
    assert sorted({p.name for p in (out / "samples" / "vehicle=hv-1").iterdir()}) == [
        "day=2026-09-21", "day=2026-09-22", "day=2026-09-23", "day=2026-09-24"]
    assert [p.name for p in (out / "events" / "vehicle=hv-3").iterdir()] != []
    assert sorted(p.name for p in (out / "events" / "vehicle=hv-3").iterdir()) == ["day=1969-12-31",
                                                                                  "day=out-of-range"]
    # An alert without a score reads back as null, not 0 or NaN.
    alerts = pq.read_table(out / "alerts").to_pylist()
    assert [a["score"] for a in alerts if a["alert_id"] == "a-2"] == [None]


def test_pandas_opens_each_table_in_one_line(db: FleetDB, tmp_path: Path) -> None:
    import pandas

    seed(db)
    out = tmp_path / "export"
    export(db, out, Selection(), notes=io.StringIO())
    df = pandas.read_parquet(out / "samples")
    assert {"vehicle", "day", "seq", "ts", "signal", "source", "unit", "value"} <= set(df.columns)
    assert len(df) == 2650 and sorted(df["vehicle"].astype(str).unique()) == ["hv-1", "hv-2", "hv-3"]
    assert (df[df["vehicle"] == "hv-3"]["day"].astype(str) == "2026-09-23").all()
    assert df["value"].dtype == np.float64 and df["ts"].dtype == np.float64
    assert len(pandas.read_parquet(out / "alerts")) == 3
    assert len(pandas.read_parquet(out / "verdicts")) == 3


def test_selection_by_vehicles_and_a_half_open_period(db: FleetDB, tmp_path: Path) -> None:
    seed(db)
    # Bounds on stored times exactly: the row at `since` is in, the row at `until` is out.
    ((since,),) = db.read("SELECT ts FROM samples WHERE vehicle='hv-1' AND seq=300")
    ((until,),) = db.read("SELECT ts FROM samples WHERE vehicle='hv-1' AND seq=1000")
    sel = Selection(("hv-1", "hv-3"), float(since), float(until))
    out = tmp_path / "export"
    export(db, out, sel, notes=io.StringIO())
    counts = assert_equal_to_db(db, out, sel)
    seqs = {r[2] for r in dataset_rows(out, "samples") if r[0] == "hv-1"}
    assert 300 in seqs and 1000 not in seqs
    assert not (out / "samples" / "vehicle=hv-2").exists()
    # Verdicts and breakdowns of the selected vehicles whole, whatever their time.
    assert counts["verdicts"] == 2 and counts["breakdowns"] == 2
    assert {r[1] for r in dataset_rows(out, "verdicts")} == {"hv-1"}


def test_a_small_chunk_splits_files_and_bounds_every_read(db: FleetDB, tmp_path: Path) -> None:
    """Every read the export makes, counted: none holds more rows than --chunk-rows (nor more record text than
    its character budget, a row at least), whatever the size of the selection."""
    seed(db)
    reads: list[tuple[str, int]] = []

    class Counting:
        where = db.where

        def read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
            rows = db.read(sql, args)
            reads.append((sql, len(rows)))
            return rows

        def read_array(self, sql: str, args: Sequence[Any], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
            rows = db.read_array(sql, args, dtype)
            reads.append((sql, len(rows)))
            return rows

    out = tmp_path / "export"
    Exporter(Counting(), out, Selection(), chunk_rows=64, notes=io.StringIO(), chunk_chars=400).run()
    assert_equal_to_db(db, out)
    data_reads = [(sql, n) for sql, n in reads if "COUNT(*)" not in sql and "FROM signals" not in sql
                  and "FROM vehicles" not in sql]
    assert max(n for _, n in data_reads) == 64  # full chunks were read, none larger
    # An alert's record is 250 to 330 characters: with 400 to a chunk, each alert is read on its own.
    assert [n for sql, n in data_reads if "FROM alerts" in sql and "LENGTH" not in sql] == [1, 1, 1]
    per_file = [pq.read_metadata(out / f).num_rows for f in files(out) if f.startswith("samples")]
    assert max(per_file) <= 64 and len(per_file) > 2650 // 64


def test_the_command_prints_progress_and_a_summary(db: FleetDB, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    seed(db)
    out = tmp_path / "export"
    code, stdout, stderr = run_cli(["export", "--config", str(config(db, tmp_path)), "--out", str(out),
                                    "--vehicles", "hv-2,hv-1", "--since", "2026-09-21T23:55", "--until",
                                    str(DAY0 + 2 * 86_400), "--chunk-rows", "100"], capsys)
    assert code == 0, stderr
    assert_equal_to_db(db, out, Selection(("hv-1", "hv-2"), DAY0 - 300, DAY0 + 2 * 86_400))
    assert stdout.startswith(f"{out}: ") and "2 vehicles" in stdout
    # Not a terminal: a line per tenth of the rows, the last one complete.
    bar = [line for line in stderr.splitlines() if line.startswith("export [")]
    assert 2 <= len(bar) <= 11 and bar[-1].split("] ")[1].split()[0].split("/")[0] == \
        bar[-1].split("] ")[1].split()[0].split("/")[1]


# --- resuming ---------------------------------------------------------------------------------------------------


def test_kill_9_mid_way_then_the_same_command_gives_the_uninterrupted_export(db: FleetDB, tmp_path: Path) -> None:
    """A subprocess exporting in chunks of 20 rows is killed with SIGKILL once its state shows a fifth of the
    samples written (and before the end), then the command is run again: the files and every row equal an
    export that was never interrupted, with no row twice."""
    seed(db)
    db.ingest([wire.Batch("f1", "hv-2", 2, [sample_segment(1000, 6000, DAY0 + 10_000, 9)])])
    total = db.read("SELECT COUNT(*) FROM samples")[0][0]
    cfg = config(db, tmp_path)
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "cloud_sync", "export", "--config", str(cfg), "--out", str(out),
            "--chunk-rows", "20"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    written = 0
    try:
        deadline = time.monotonic() + 120
        while written < total // 5 and proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                state = json.loads((out / STATE).read_text())
                written = sum(p["rows"] for p in state["tables"]["samples"].values())
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    state = json.loads((out / STATE).read_text())
    at_kill = sum(p["rows"] for p in state["tables"]["samples"].values())
    assert total // 5 <= at_kill < total  # mid-way
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    whole = tmp_path / "whole"
    export(db, whole, Selection(), chunk_rows=20, notes=io.StringIO())
    assert files(out) == files(whole)
    for table in DB_SQL:
        assert dataset_rows(out, table) == dataset_rows(whole, table)
    assert assert_equal_to_db(db, out)["samples"] == total
    assert not list(out.rglob("*.tmp"))


def test_a_file_renamed_before_its_state_was_written_is_replaced_not_doubled(db: FleetDB, tmp_path: Path) -> None:
    """The state of an earlier run is put back under files written after it (as if the run had been killed
    between renaming those files and recording them): the next run deletes them and writes them again."""
    seed(db)
    out = tmp_path / "export"
    export(db, out, Selection(), chunk_rows=100, notes=io.StringIO())
    earlier = (out / STATE).read_text()
    db.ingest([wire.Batch("f1", "hv-1", 2, [sample_segment(5000, 450, DAY0 + 2 * 86_400 + 900, 7),
                                            alert(5450, "a-3", "open", DAY0 + 2 * 86_400 + 950)])])
    export(db, out, Selection(), chunk_rows=100, notes=io.StringIO())
    newer = files(out)
    (out / STATE).write_text(earlier)  # the files of seq 5000.. are there, the state does not count them
    notes = io.StringIO()
    r = export(db, out, Selection(), chunk_rows=100, notes=notes)
    assert r.removed == 6 and "removed 6 file(s)" in notes.getvalue()  # five of samples, one alert
    assert r.written["samples"] == 450 and r.written["alerts"] == 1
    assert files(out) == newer
    assert_equal_to_db(db, out)


def test_rows_stored_late_below_the_recorded_position_are_exported(db: FleetDB, tmp_path: Path) -> None:
    """A hole the vehicle fills after the export (a resent batch with lower seqs): the count below the recorded
    seq no longer matches, so that vehicle's samples are exported again from the start."""
    seed(db)
    out = tmp_path / "export"
    export(db, out, Selection(), chunk_rows=300, notes=io.StringIO())
    db.ingest([wire.Batch("f1", "hv-1", 3, [sample_segment(1700, 200, DAY0 + 2 * 86_400 + 10, 8)])])  # in 1604..1999
    notes = io.StringIO()
    r = export(db, out, Selection(), chunk_rows=300, notes=notes)
    assert "samples of hv-1: +200 rows stored below the last exported seq" in notes.getvalue()
    assert r.written["samples"] == 2200 and r.written["alerts"] == 0  # hv-1's samples, nothing else again
    counts = assert_equal_to_db(db, out)
    assert counts["samples"] == 2850


def test_a_rerun_adds_what_was_stored_since(db: FleetDB, tmp_path: Path) -> None:
    seed(db)
    out = tmp_path / "export"
    export(db, out, Selection(), notes=io.StringIO())
    db.ingest([wire.Batch("f1", "hv-2", 2, [sample_segment(700, 100, DAY0 + 5_000, 11),
                                            record("event", 800, kind="drift", ts=DAY0 + 5_100)])])
    r = export(db, out, Selection(), notes=io.StringIO())
    assert (r.written["samples"], r.written["events"], r.removed) == (100, 1, 0)
    assert assert_equal_to_db(db, out)["samples"] == 2750


def test_disk_full_is_one_line_and_the_rerun_resumes(db: FleetDB, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """DIR on a real tmpfs too small for the export: ENOSPC mid-way is one line (exit 2), the state still
    describes the files on disk; with room made, the same command completes the export."""
    seed(db)
    db.ingest([wire.Batch("f1", "hv-2", 2, [sample_segment(1000, 30_000, DAY0 + 10_000, 12)])])
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs to mount a tmpfs (root or CAP_SYS_ADMIN) to fill a disk for real")
    try:
        out = mnt / "export"
        argv = ["export", "--config", str(config(db, tmp_path)), "--out", str(out), "--chunk-rows", "1000"]
        code, _, stderr = run_cli(argv, capsys)
        assert code == 2
        err = [line for line in stderr.splitlines() if not line.startswith("export [")]
        assert len(err) == 1 and "no space left on the device" in err[0] and "run the same command again" in err[0]
        state = json.loads((out / STATE).read_text())
        for table, by_vehicle in state["tables"].items():  # what the state counts is on disk, whole
            for vehicle, pos in by_vehicle.items():
                on_disk = sum(pq.read_metadata(f).num_rows for f in (out / table).glob(f"vehicle={vehicle}/*/*"))
                assert on_disk >= pos["rows"]
        assert sum(p["rows"] for p in state["tables"]["samples"].values()) > 0
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        code, _, stderr = run_cli(argv, capsys)
        assert code == 0, stderr
        assert_equal_to_db(db, out)
        assert not list(out.rglob("*.tmp"))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# --- refusals ---------------------------------------------------------------------------------------------------


def test_a_dir_holding_an_export_with_other_arguments_is_refused(db: FleetDB, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    seed(db)
    cfg = str(config(db, tmp_path))
    out = tmp_path / "export"
    assert run_cli(["export", "--config", cfg, "--out", str(out), "--vehicles", "hv-1"], capsys)[0] == 0
    before = {f: (out / f).read_bytes() for f in files(out)}
    for other in (["--vehicles", "hv-2"], [], ["--vehicles", "hv-1", "--since", "2001-01-01"]):
        code, _, err = run_cli(["export", "--config", cfg, "--out", str(out), *other], capsys)
        assert code == 2 and err.count("\n") == 1 and "holds an export with other arguments" in err
    assert {f: (out / f).read_bytes() for f in files(out)} == before
    # The same selection, the vehicles named in another order, and another chunk size: the same export.
    code, _, err = run_cli(["export", "--config", cfg, "--out", str(out), "--vehicles", "hv-1,hv-1",
                            "--chunk-rows", "7"], capsys)
    assert code == 0, err


def test_bad_arguments_are_one_line_and_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = CloudDB(tmp_path / "cloud.sqlite")
    try:
        seed(db)
        cfg = str(config(db, tmp_path))
    finally:
        db.close()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    out = str(tmp_path / "export")
    for args, why in [
        (["--out", out, "--vehicles", "hv-1,nope,gone"], "unknown vehicles (not in the database"),
        (["--out", out, "--since", "2026-09-23", "--until", "2026-09-22"], "must be before --until"),
        (["--out", out, "--since", "1790035200", "--until", "1790035200"], "must be before --until"),
        (["--out", str(a_file)], "not a directory"),
        (["--out", str(theirs)], "holds files that are not an export of cloud-sync (notes.txt)"),
    ]:
        code, _, err = run_cli(["export", "--config", cfg, *args], capsys)
        assert code == 2 and err.count("\n") == 1 and why in err, (args, err)
    assert "gone, nope" in run_cli(["export", "--config", cfg, "--out", out, "--vehicles", "nope,hv-1,gone"],
                                   capsys)[2]
    assert not Path(out).exists()
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]  # not even a lock file written into it


def test_argparse_refusals_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args, why in [(["--since", "yesterday"], "not a time: 'yesterday'"), (["--until", "inf"], "not a time"),
                      (["--chunk-rows", "0"], "must be 1 to 10,000,000"),
                      (["--chunk-rows", "99999999999999999999"], "must be 1 to"),
                      (["--vehicles", " , "], "names no vehicle")]:
        with pytest.raises(SystemExit) as e:
            cloud_main(["export", "--config", "x.toml", "--out", str(tmp_path / "o"), *args])
        assert e.value.code == 2
        assert why in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_something_not_ours_inside_an_export_is_refused_before_anything_is_deleted(db: FleetDB,
                                                                                  tmp_path: Path) -> None:
    seed(db)
    out = tmp_path / "export"
    export(db, out, Selection(), chunk_rows=500, notes=io.StringIO())
    earlier = (out / STATE).read_text()
    db.ingest([wire.Batch("f1", "hv-1", 2, [sample_segment(5000, 10, DAY0 + 2 * 86_400 + 900, 7)])])
    export(db, out, Selection(), chunk_rows=500, notes=io.StringIO())
    (out / STATE).write_text(earlier)  # a file is now past the recorded position: a rerun would delete it
    before = files(out)
    for foreign in (out / "samples" / "vehicle=hv-1" / "day=2026-09-24" / "analysis.csv",
                    out / "samples" / "vehicle=hv-1" / "notes", out / "README.txt"):
        foreign.write_text("a data scientist's own file")
        with pytest.raises(ExportError, match="not a file of this export"):
            export(db, out, Selection(), chunk_rows=500, notes=io.StringIO())
        assert files(out) == before and foreign.read_text() == "a data scientist's own file"
        foreign.unlink()
    export(db, out, Selection(), chunk_rows=500, notes=io.StringIO())
    assert_equal_to_db(db, out)


def test_a_damaged_state_file_is_refused_and_nothing_is_deleted(db: FleetDB, tmp_path: Path) -> None:
    seed(db)
    out = tmp_path / "export"
    export(db, out, Selection(), chunk_rows=500, notes=io.StringIO())
    before = files(out)
    good = json.loads((out / STATE).read_text())
    for damaged, why in [("{not json", "unreadable"), ("[]", "not a state file"),
                         (json.dumps({**good, "tables": {"samples": []}}), "not a state file"),
                         (json.dumps({**good, "tables": {"samples": {"hv-1": {"seq": "9", "rows": 1}}}}),
                          "not a state file"),
                         (json.dumps({**good, "version": 99}), "format version 99")]:
        (out / STATE).write_text(damaged)
        with pytest.raises(ExportError, match=why):
            export(db, out, Selection(), chunk_rows=500, notes=io.StringIO())
        assert files(out) == before


def test_two_runs_never_write_one_dir(db: FleetDB, tmp_path: Path) -> None:
    seed(db)
    out = tmp_path / "export"
    export(db, out, Selection(), notes=io.StringIO())
    holder = Layout(out)
    holder.open()
    try:
        with pytest.raises(ExportError, match="another export is writing"):
            export(db, out, Selection(), notes=io.StringIO())
    finally:
        holder.close()
    assert (out / LOCK).exists()


def test_a_damaged_database_stops_the_export_with_the_rows_named(tmp_path: Path) -> None:
    """SQLite keeps any type in any column: a ts stored as text, or a sample whose signal id the signals table
    lacks, is named in one line; the chunk holding it is not written, and the state does not count it."""
    db = CloudDB(tmp_path / "cloud.sqlite")
    try:
        seed(db)
        with db._transaction() as cur:
            cur.execute("INSERT INTO samples VALUES ('hv-3', 9000, 1790000000.0, 777, 1.0)")
        with pytest.raises(ExportError, match=r"samples of hv-3 seq 3\.\.9000: samples name signal id 777"):
            export(db, tmp_path / "e1", Selection(("hv-3",)), notes=io.StringIO())
        state = json.loads((tmp_path / "e1" / STATE).read_text())
        assert "hv-3" not in state["tables"]["samples"] or state["tables"]["samples"]["hv-3"]["seq"] is None
        with db._transaction() as cur:
            cur.execute("DELETE FROM samples WHERE seq=9000")
            cur.execute("UPDATE alerts SET score='high' WHERE alert_id='a-2'")
        with pytest.raises(ExportError, match=r"alerts of hv-2 seq 610\.\.610: a stored value that is not of its "
                                               r"column's type \(score"):
            export(db, tmp_path / "e2", Selection(("hv-2",)), notes=io.StringIO())
    finally:
        db.close()


# --- the pieces -------------------------------------------------------------------------------------------------


def test_read_array_gives_numbers_bit_for_bit_and_refuses_rows_that_do_not_fit(db: FleetDB) -> None:
    """The backends' chunk reader: 8-byte numbers in column order, exact; a NULL (or, on PostgreSQL, a column of
    another width) is a CloudDBError, never a shifted or zero-filled row."""
    seed(db)
    dtype = np.dtype([("seq", "<i8"), ("value", "<f8")])
    got = db.read_array("SELECT seq, value FROM samples WHERE vehicle=? ORDER BY seq LIMIT ?", ["hv-1", 10], dtype)
    want = db.read("SELECT seq, value FROM samples WHERE vehicle='hv-1' ORDER BY seq LIMIT 10")
    assert [bits(r) for r in got.tolist()] == [bits(r) for r in want]
    # SQLite stores a REAL without a fraction as an integer, so ingest's -0.0 comes back +0.0 from the database
    # itself (the export keeps what is stored); PostgreSQL keeps the sign.
    stored = ODD_VALUES if isinstance(db, PostgresDB) else [0.0, *ODD_VALUES[1:]]
    assert bits(got["value"][:6].tolist()) == bits(stored)
    assert len(db.read_array("SELECT seq, value FROM samples WHERE vehicle=?", ["nobody"], dtype)) == 0
    with pytest.raises(CloudDBError, match=r"do not fit|8-byte columns"):
        db.read_array("SELECT seq, score FROM alerts ORDER BY seq", [], dtype)  # a-2 has no score: NULL
    if isinstance(db, PostgresDB):
        with pytest.raises(CloudDBError, match="8-byte columns"):
            db.read_array("SELECT seq, signal_id FROM samples", [], np.dtype([("a", "<i8"), ("b", "<i8")]))



def test_the_progress_bar_prints_ten_lines_off_a_terminal() -> None:
    s = io.StringIO()
    p = Progress("export", 1000, s)
    for _ in range(100):
        p.add(10)
    p.finish()
    lines = s.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("export [" + "#" * 30 + "] 1,000/1,000 rows")
    s = io.StringIO()
    p = Progress("export", 0, s)
    p.finish()
    assert s.getvalue().count("\n") == 1

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    t = Terminal()
    p = Progress("export", 1000, t)
    p.add(10)
    p.end_line()  # an error follows: it starts on a line of its own
    assert t.getvalue().startswith("\rexport [") and t.getvalue().endswith(" rows/s\n")
