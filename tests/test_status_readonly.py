"""`harvester-agent status` reads the live store without touching it: read-only, no migrations, no checkpoint,
never a quarantine, and a lock held by the agent is reported as a lock. It counts alerts and events apart, written
and acknowledged, so each kind can be reconciled with the cloud. Real files, real processes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.store import Store
from tests.test_uplink import _cols

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp: Path, db: Path) -> Path:
    conf = tmp / "agent.toml"
    conf.write_text(f'[vehicle]\nfleet = "f1"\nid = "v1"\n[store]\npath = "{db}"\n')
    return conf


def _status(conf: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(conf), *extra],
                          capture_output=True, text=True, timeout=120, env=env)


def _digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.parent.iterdir()) if p.name.startswith(path.name) and not p.name.endswith("-shm")}


def _untouched(path: Path, before: dict[str, str]) -> None:
    """The store's files hold the same bytes; SQLite's own reader may leave an empty `-wal` beside a WAL store
    (any reader does; it holds nothing). `-shm` is shared memory, not data."""
    after = _digest(path)
    assert {k: v for k, v in after.items() if k in before} == before
    assert all((path.parent / k).stat().st_size == 0 for k in after.keys() - before.keys())


def test_status_counts_alerts_and_events_apart(tmp_path: Path) -> None:
    db = tmp_path / "vehicle.sqlite"
    s = Store(db, first_seq=1)
    s.append_samples(_cols(100))  # 1..100
    alerts = s.append_records([("alert", {"ts": 1.0, "alert_id": f"a{i}", "state": "open"}) for i in range(5)])
    events = s.append_records([("event", {"ts": 2.0, "kind": "dtc_open", "data": {}}) for _ in range(7)])
    s.ack([(a, a) for a in alerts[:3]] + [(e, e) for e in events[:2]] + [(1, 100)])
    s.close()
    r = _status(_config(tmp_path, db), "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert (st["alerts_written"], st["alerts_acked"], st["events_written"], st["events_acked"]) == (5, 3, 7, 2)
    assert st["alerts_evicted"] == st["events_evicted"] == 0
    # Each kind reconciles: written = acked + evicted + still waiting.
    assert st["alerts_written"] == st["alerts_acked"] + st["alerts_evicted"] + st["backlog"]["alert"]["records"]
    assert st["events_written"] == st["events_acked"] + st["events_evicted"] + st["backlog"]["event"]["records"]
    # The keys that were there before stay.
    assert st["records_written"] == {"samples": 100, "records": 12}
    assert st["acked"] == {"samples": 100, "records": 5}
    assert st["last_acked_seq"] == 107 and st["highest_seq"] == 112
    text = _status(_config(tmp_path, db))
    assert text.returncode == 0 and "alerts" in text.stdout and "5 written, 3 acked" in text.stdout


def test_status_during_an_exclusive_lock_reports_it_and_touches_nothing(tmp_path: Path) -> None:
    db = tmp_path / "vehicle.sqlite"
    s = Store(db, first_seq=1)
    s.append_records([("alert", {"ts": 1.0, "alert_id": "a1", "state": "open"})])
    s.close()
    # Another process (the agent, mid-way through a long write) holds an exclusive lock on the store.
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, sys\n"
         f"db = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
         "db.execute('PRAGMA locking_mode=EXCLUSIVE')\n"
         "db.execute('BEGIN EXCLUSIVE')\n"
         "db.execute(\"INSERT INTO meta VALUES ('held_by_test', 1)\")\n"
         "print('locked', flush=True)\n"
         "sys.stdin.readline()\n"
         "db.execute('COMMIT')\n"
         "print(db.execute(\"SELECT value FROM meta WHERE key='held_by_test'\").fetchone()[0], flush=True)\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "locked"
        before = _digest(db)
        r = _status(_config(tmp_path, db), "--wait-s", "1")
        assert r.returncode == 2
        assert "locked" in r.stderr and "Traceback" not in r.stderr
        _untouched(db, before)  # not checkpointed, not migrated, not written
        assert not [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]  # never moved aside
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "1"  # the holder's transaction commits as if nothing happened
    finally:
        holder.kill()
        holder.wait(10)
    r = _status(_config(tmp_path, db), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["alerts_written"] == 1


def test_status_never_migrates_or_creates(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "vehicle.sqlite"
    s = Store(db, first_seq=1)
    s.close()
    con = sqlite3.connect(db)
    con.execute("PRAGMA user_version=1")  # an older agent's store
    con.commit()
    con.close()
    before = _digest(db)
    r = _status(_config(tmp_path, db), "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["schema_version"] == 1 and st["alerts_written"] is None  # not counted by that version: said so
    _untouched(db, before)
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone()[0] == 1
    con.close()
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(os.urandom(8192))
    r = _status(_config(tmp_path, garbage))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert garbage.exists() and not [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]


def test_a_lock_is_never_taken_for_damage(tmp_path: Path) -> None:
    """The agent's own open quarantines only a damaged file: real SQLite errors, classified."""
    import sqlite3

    from agent.store import _damaged

    db = tmp_path / "live.sqlite"
    Store(db, first_seq=1).close()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("INSERT INTO meta VALUES ('x', 1)")
    other = sqlite3.connect(db, isolation_level=None, timeout=0)
    with pytest.raises(sqlite3.OperationalError) as busy:
        other.execute("PRAGMA journal_mode=WAL")  # what Store._open does first
    assert not _damaged(busy.value)
    other.close()
    holder.execute("ROLLBACK")
    holder.close()
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all " * 400)
    con = sqlite3.connect(junk)
    with pytest.raises(sqlite3.DatabaseError) as notadb:
        con.execute("PRAGMA journal_mode=WAL")
    con.close()
    assert _damaged(notadb.value)
    assert _damaged(sqlite3.DatabaseError("quick_check: *** in database main *** Page 3 is never used"))
