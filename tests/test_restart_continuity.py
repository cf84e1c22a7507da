"""Restarts do not lose or repeat what is open. A real agent process (simulated coolant leak: an alert opens and
DTC 111/1 is active) is SIGKILLed again and again and restarted on the same store: no restart re-announces an
active DTC, the open alert is carried on under the same id (quick restart, same model) or closed with a reason
(gap too long), and after a clean stop every alert id that opened has closed."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from harvester_testing.broker import MosquittoBroker
from tests.test_uplink import wait_for

MODEL = Path(__file__).resolve().parents[1] / "models" / "harvester-anomaly.int8.onnx"


def _config(tmp: Path, broker: MosquittoBroker, resume_s: float) -> Path:
    conf = tmp / "agent.toml"
    conf.write_text(f"""
[vehicle]
fleet = "f1"
id = "v1"
[[can]]
interface = "virtual"
channel = "restarts"
[model]
path = "{MODEL}"
alert_resume_s = {resume_s}
[store]
path = "{tmp / 'vehicle.sqlite'}"
flush_interval_s = 0.2
[mqtt]
host = "{broker.host}"
port = {broker.port}
tls = false
""")
    return conf


def _records(db: Path) -> list[tuple[int, str, dict[str, Any]]]:
    """Every alert and event the store holds (nobody acks here, so nothing has left it), in sequence order."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = con.execute("SELECT seq_lo, kind, head FROM outbox WHERE kind != 'samples' ORDER BY seq_lo").fetchall()
    finally:
        con.close()
    return [(int(s), str(k), json.loads(h)) for s, k, h in rows]


def _data_time(db: Path, after_seq: int) -> float:
    """How much data time (simulated seconds) the store holds past `after_seq`."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        lo, hi = con.execute("SELECT MIN(ts_lo), MAX(ts_hi) FROM outbox WHERE kind='samples' AND seq_lo > ?",
                             (after_seq,)).fetchone()
        return 0.0 if lo is None else float(hi) - float(lo)
    finally:
        con.close()


def _highest(db: Path) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return int(con.execute("SELECT COALESCE(MAX(seq_hi), 0) FROM outbox").fetchone()[0])
    finally:
        con.close()


def _start(conf: Path) -> subprocess.Popen[bytes]:
    # Speed 5; the leak at full severity after 1 s, so the DTC and the alert hold through every restart.
    p = subprocess.Popen([sys.executable, "-m", "harvester_testing.agentproc", str(conf), "5", "1", "coolant_leak"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
    return p


def _run_restarts(tmp: Path, conf: Path, kills: int) -> list[tuple[int, str, dict[str, Any]]]:
    db = tmp / "vehicle.sqlite"
    p = _start(conf)
    try:
        wait_for(lambda: db.exists() and any(r.get("state") == "open" for _, k, r in _records(db) if k == "alert")
                 and any(r.get("kind") == "dtc_open" for _, _, r in _records(db)), timeout=120,
                 what="an open alert and an active DTC")
        for _ in range(kills):
            p.send_signal(signal.SIGKILL)
            p.wait(10)
            mark = _highest(db)
            p = _start(conf)
            # Long enough after the restart for a forgotten DTC to be re-announced (DM1 every simulated second)
            # and for a forgotten alert to be opened again (a 30 s window and the policy's minimum windows).
            wait_for(lambda m=mark: _data_time(db, m) >= 60, timeout=120,
                     what="a minute of data after the restart")
        p.send_signal(signal.SIGTERM)  # the nightly ignition-off: a clean stop
        assert p.stdout is not None and p.stdout.readline().strip() == b"stopped"
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    return _records(db)


def _check_dtcs(records: list[tuple[int, str, dict[str, Any]]]) -> None:
    state: dict[tuple[str, int, int], bool] = defaultdict(bool)
    opens = 0
    for _, _, r in records:
        if r.get("kind") in ("dtc_open", "dtc_close"):
            d = r["data"]
            key = (d["source"], d["spn"], d["fmi"])
            is_open = r["kind"] == "dtc_open"
            assert state[key] != is_open, f"{r['kind']} twice in a row for {key}"
            state[key] = is_open
            opens += is_open
    assert opens == 1  # the leak's DTC stayed active through every restart: announced once


def _alerts(records: list[tuple[int, str, dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for _, k, r in records:
        if k == "alert":
            by_id[r["alert_id"]].append(r)
    for aid, recs in by_id.items():
        assert [r["state"] for r in recs] == ["open", "closed"], f"alert {aid}: {[r['state'] for r in recs]}"
    return by_id


@pytest.mark.slow
def test_quick_restarts_carry_the_alert_on_and_never_reannounce_dtcs(broker: MosquittoBroker, tmp_path: Path) -> None:
    records = _run_restarts(tmp_path, _config(tmp_path, broker, resume_s=600), kills=4)
    _check_dtcs(records)
    by_id = _alerts(records)
    assert len(by_id) == 1  # the same alert all along
    (recs,) = by_id.values()
    assert recs[1]["reason"] == "agent_stop"


@pytest.mark.slow
def test_a_restart_after_the_resume_limit_closes_the_alert_with_a_reason(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    records = _run_restarts(tmp_path, _config(tmp_path, broker, resume_s=0), kills=2)
    _check_dtcs(records)
    by_id = _alerts(records)
    reasons = [recs[1]["reason"] for recs in by_id.values()]
    assert reasons == ["agent_restart", "agent_restart", "agent_stop"]  # a new alert after each restart
