"""A DTC storm is not a write storm, on real parts: the store writer holds a decoder's events for the samples'
flush (alerts and a DTC's first open at once), counted in the store's own transactions; a fuzzed storm replayed
through `harvester-agent replay` writes at most the bound per source and minute, every decoded event reconciled; a
real flapping-DTC trace (crafted DM1 frames in a candump -L log) becomes one `dtc_flapping` per period; a
debounced DTC held across a restart is neither lost nor doubled, with a simulated crash on real store files and
with a real agent process SIGKILLed (harvester_testing/flapproc.py)."""

from __future__ import annotations

import itertools
import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import can
import pytest

from agent.decode.j1939 import J1939Decoder
from agent.decode.j1939_id import make_id
from agent.decode.j1939_tp import PGN_DM1, Dtc
from agent.dtcdebounce import FLAPPING, STORM, DtcPolicy
from agent.frames import FrameBatch
from agent.pipeline import DTC_DEBOUNCE_STATE_KEY, Pipeline
from agent.signals import SignalRegistry
from agent.store import Store
from agent.writer import StoreWriter
from harvester_sim import bam_frames, encode_dm1
from harvester_testing import flapproc
from harvester_testing.storm import STORM_EPOCH, storm_frames, write_candump
from tests.test_dtcdebounce import V1_STATE
from tests.test_uplink import wait_for

Record = tuple[str, dict[str, Any]]


def _records(db: Path) -> list[Record]:
    """Every alert and event a store holds (nobody acks here), in sequence order; read-only, beside a writer."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = con.execute("SELECT kind, head FROM outbox WHERE kind != 'samples' ORDER BY seq_lo").fetchall()
    finally:
        con.close()
    return [(str(k), json.loads(h)) for k, h in rows]


def weight(rec: dict[str, Any]) -> int:
    """How many decoded DTC events a record stands for: a summary its `transitions` (a flapping one also the updates
    it superseded), a coalesced update its `updates`, a transition itself and the updates it superseded."""
    kind, d = rec["kind"], rec["data"]
    if kind == STORM:
        return int(d["transitions"])
    if kind == FLAPPING:
        return int(d["transitions"]) + int(d.get("updates", 0))
    if kind == "dtc_update":
        return int(d.get("updates", 1))
    if kind in ("dtc_open", "dtc_close"):
        return 1 + int(d.get("updates", 0))
    return 1 if kind.startswith("dtc_") else 0


def merged(rec: dict[str, Any]) -> int:
    """How many of the decoded DTC events a record stands for went out inside it rather than as itself."""
    summary = rec["kind"] in (FLAPPING, STORM) or (rec["kind"] == "dtc_update" and "updates" in rec["data"])
    return weight(rec) if summary else weight(rec) - 1


def _event(i: int) -> Record:
    return "event", {"kind": "dtc_close", "ts": float(i), "data": {"source": "can0/00", "spn": i, "fmi": 0}}


# --- the writer --------------------------------------------------------------------------------------------


def test_events_wait_for_the_flush_and_an_urgent_record_takes_them_along(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite", first_seq=1)
    w = StoreWriter(store, SignalRegistry())
    before = store.transactions
    for i in range(50):  # fifty batches' events: none is written on its own
        w.append_records([_event(i)], {"dtc_active/can0": {"00": [[i, 0]]}}, urgent=False)
        w.maybe_flush(60.0, max_samples=1000)
    assert store.transactions == before and store.status()["records_written"]["records"] == 0
    w.maybe_flush(60.0, max_samples=1000, now=time.monotonic() + 60.0)  # the flush interval has passed
    assert store.transactions == before + 1 and store.status()["records_written"]["records"] == 50
    assert store.get_state("dtc_active/can0") == {"00": [[49, 0]]}  # the state the last of them left

    w.append_records([_event(50)], {"k": 1}, urgent=False)
    w.append_records([("alert", {"alert_id": "a", "state": "open", "ts": 51.0})], {"alerts/open": {"x": 1}})
    assert store.transactions == before + 2  # the alert at once, and the event held before it, in its order
    assert [r.get("alert_id", r.get("data", {}).get("spn")) for _, r in _records(tmp_path / "s.sqlite")][-2:] == \
        [50, "a"]
    assert store.get_state("k") == 1 and not w.pending_records
    store.close()


# --- a fuzzed storm through `harvester-agent replay` --------------------------------------------------------


def test_a_fuzzed_storm_replay_writes_at_most_the_bound_and_reconciles(tmp_path: Path) -> None:
    n = 250_000  # 125 s of a busy bus: three windows per source
    log = tmp_path / "storm_candumpL.log"
    write_candump(log, storm_frames(n, seed=3))
    db = tmp_path / "replay.sqlite"
    r = subprocess.run([sys.executable, "-m", "agent", "replay", "--json", "--no-model", "--db", str(db), str(log)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["frames"] == n and out["dtc_events"] > 20_000  # a storm: ~0.2 DTC events per frame
    metrics = out["metrics"]["counters"]
    recs = [rec for _, rec in _records(db) if rec["kind"].startswith("dtc_")]
    # Every decoded event is written as itself or inside a summary; nothing is held after the replay.
    assert len(recs) == out["dtc_events_written"] == metrics["pipeline.dtc_events_written"]
    assert sum(weight(rec) for rec in recs) == out["dtc_events"]
    assert out["dtc_events_merged"] == sum(merged(rec) for rec in recs) > 0
    assert out["metrics"]["gauges"]["pipeline.dtc_events_held"] == 0
    # The bound: 30 a minute per source (the default), of which 15 only first opens may use, and a summary per
    # source and minute, over 125 s.
    windows = 3
    by_source: dict[str, list[str]] = defaultdict(list)
    for rec in recs:
        by_source[rec["data"]["source"]].append(rec["kind"])
    assert len(by_source) > 200  # random source addresses
    for kinds in by_source.values():
        assert sum(k not in (STORM, "dtc_open") for k in kinds) <= 15 * windows
        assert sum(k != STORM for k in kinds) <= 30 * windows and kinds.count(STORM) <= windows
    assert len(recs) < out["dtc_events"] / 2
    # One records transaction per batch at most (5,000 frames), plus the samples' own flushes and the last one.
    assert out["store_transactions"] <= 2 * (n // 5000) + 4


# --- a real flapping DTC -------------------------------------------------------------------------------------


def _flapping_log(path: Path, seconds: int, toggle_s: float) -> int:
    """Crafted DM1 traffic, once a second per controller as J1939-73 has it: the engine (SA 0x00) reports DTC 111/1
    all along; the transmission (SA 0x03) reports DTC 110/0 while `int(t / toggle_s)` is even (a loose
    connector). Returns how often 110/0 changed state."""
    msgs: list[can.Message] = []
    changes, was = 0, False
    for i in range(seconds * 10):
        t = STORM_EPOCH + i / 10
        active = int((t - STORM_EPOCH) / toggle_s) % 2 == 0
        if i % 10 == 0:
            msgs.append(can.Message(timestamp=t, arbitration_id=make_id(PGN_DM1, 0x00, 6), is_extended_id=True,
                                    data=encode_dm1([Dtc(111, 1, 1)])))
        if i % 10 == 5:
            msgs.append(can.Message(timestamp=t, arbitration_id=make_id(PGN_DM1, 0x03, 6), is_extended_id=True,
                                    data=encode_dm1([Dtc(110, 0, 2)] if active else [])))
            changes += active != was
            was = active
    write_candump(path, iter(msgs))
    return changes


def test_a_flapping_dtc_becomes_one_event_per_period(tmp_path: Path) -> None:
    log = tmp_path / "flapping_candumpL.log"
    changes = _flapping_log(log, 600, toggle_s=3.0)  # ten minutes, toggling every 3 s: 200 changes
    db = tmp_path / "replay.sqlite"
    r = subprocess.run([sys.executable, "-m", "agent", "replay", "--json", "--no-model", "--db", str(db), str(log)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    recs = [rec for _, rec in _records(db)]
    steady = [rec for rec in recs if rec["data"]["spn"] == 111]
    assert [rec["kind"] for rec in steady] == ["dtc_open"]  # a steady DTC is announced once, unchanged
    flap = [rec for rec in recs if rec["data"]["spn"] == 110]
    kinds = [rec["kind"] for rec in flap]
    # Opened, cleared: both at once; then, from the next change in its minute on, one event per minute.
    assert kinds[:2] == ["dtc_open", "dtc_close"] and set(kinds[2:]) == {FLAPPING} and 9 <= len(kinds) - 2 <= 11
    assert sum(weight(rec) for rec in flap) == changes == out["dtc_events"] - 1
    periods = [(rec["data"]["first_ts"], rec["data"]["last_ts"]) for rec in flap[2:]]
    assert all(a <= b < a + 60 for a, b in periods) and all(b < c for (_, b), (c, _) in itertools.pairwise(periods))
    assert flap[-1]["data"]["state"] == "closed"
    # A summary carries its last change's own data (an open's occurrence count and lamps, as decoded).
    assert all(rec["data"]["occurrence"] == 2 and rec["data"]["amber_warning"] == 1 for rec in flap[2:]
               if rec["data"]["state"] == "open")
    assert out["dtc_events_merged"] == sum(weight(rec) for rec in flap[2:])


def _lamp_follows_log(path: Path, seconds: int, new_fault_at: int) -> dict[int, int]:
    """Crafted DM1 traffic from one ECU (SA 0x00) over TP.BAM, once a second: three steady DTCs (111/1, 112/1,
    113/1) all along, DTC 110/0 active every other second (a loose connector), and the ECU's amber lamp following
    110/0, so that each flap changes the lamps of the three steady DTCs too; from `new_fault_at` on, an unrelated
    DTC 5000/3 is active as well. Returns how many DM1s changed each steady DTC's lamps (a `dtc_update` each)."""
    msgs: list[can.Message] = []
    updates: dict[int, int] = defaultdict(int)
    steady = [Dtc(111, 1, 1), Dtc(112, 1, 1), Dtc(113, 1, 1)]
    for i in range(seconds):
        t = STORM_EPOCH + i
        flapping = i % 2 == 0
        dtcs = ([Dtc(110, 0, 1)] if flapping else []) + steady + ([Dtc(5000, 3, 1)] if i >= new_fault_at else [])
        msgs += bam_frames(PGN_DM1, encode_dm1(dtcs, lamps=0x04 if flapping else 0x00), 0x00, t)
        if i:
            for d in steady:
                updates[d.spn] += 1
    write_candump(path, iter(msgs))
    return updates


def test_a_lamp_following_a_flapping_dtc_does_not_hide_a_new_fault(tmp_path: Path) -> None:
    """Issue 15's review: each flap made a `dtc_update` for each steady DTC, which tripped the source's bound, and
    the storm summary swallowed an unrelated DTC's first open. Through `harvester-agent replay`, default policy."""
    log = tmp_path / "lamp_candumpL.log"
    updates = _lamp_follows_log(log, 600, new_fault_at=300)  # ten minutes
    db = tmp_path / "replay.sqlite"
    r = subprocess.run([sys.executable, "-m", "agent", "replay", "--json", "--no-model", "--db", str(db), str(log)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    recs = [rec for _, rec in _records(db)]
    assert all(rec["kind"] != STORM for rec in recs)  # the source stays under its bound
    new = [rec for rec in recs if rec["data"]["spn"] == 5000]
    assert new[0]["kind"] == "dtc_open" and STORM_EPOCH + 300 <= new[0]["ts"] < STORM_EPOCH + 301  # its own record
    assert {rec["kind"] for rec in new[1:]} == {"dtc_update"}  # then it follows the lamp like the others
    for spn, n in updates.items():
        mine = [rec for rec in recs if rec["data"]["spn"] == spn]
        assert mine[0]["kind"] == "dtc_open" and {rec["kind"] for rec in mine[1:]} == {"dtc_update"}
        # The first update at once, then one per minute: the last of its minute, with how many it stands for.
        assert 10 <= len(mine) - 1 <= 12 and sum(weight(rec) for rec in mine[1:]) == n
        for rec in mine[2:]:
            d = rec["data"]
            assert d["changed"] == ["lamps"] and d["updates"] > 1 and d["first_ts"] < d["last_ts"] == rec["ts"]
            assert d["amber_warning"] == (1 if round(rec["ts"] - STORM_EPOCH) % 2 == 0 else 0)  # the last one's
    assert sum(weight(rec) for rec in recs) == out["dtc_events"] and len(recs) < 60
    assert out["dtc_events_merged"] == sum(merged(rec) for rec in recs)
    _check([(rec["kind"], rec) for rec in recs])  # every DTC's records in its order: no update of a DTC not open


# --- restarts --------------------------------------------------------------------------------------------------


def _dm1_batch(t: float, flapping: bool) -> FrameBatch:
    msgs = [can.Message(timestamp=t, arbitration_id=make_id(PGN_DM1, sa, 6), is_extended_id=True, data=encode_dm1(d))
            for sa, d in ((0x00, [Dtc(111, 1, 1)]), (0x03, [Dtc(110, 0, 1)] if flapping else []))]
    return FrameBatch.from_messages(msgs)


POLICY = DtcPolicy(10.0, 30)


def _run(path: Path, batches: list[FrameBatch], flushed: bool, policy: DtcPolicy = POLICY) -> tuple[int, int]:
    """One agent's life on the store: started from what it saved, fed, and crashed (no clean stop), after the
    writer's flush or before it. Returns the saved debouncer states it refused, and the events it took back held."""
    store = Store(path, first_seq=1)
    reg = SignalRegistry()
    w = StoreWriter(store, reg)
    p = Pipeline(reg, {"can0": J1939Decoder(reg)}, None, w, dtc_policy=policy)
    w.resume(p)
    resumed = (p.stats.errors["dtc_debounce_state_unreadable"], sum(d.held for d in p.debouncers.values()))
    for fb in batches:
        p.feed(fb.bus, fb)
    if flushed:
        w.flush_records()
    store.db.close()
    return resumed


def _check(recs: list[Record]) -> dict[int, bool]:
    """Every DTC's records tell a consistent story: a transition never repeats the state it found, a flapping
    summary ends where its count of transitions takes the state. Returns each DTC's last state."""
    state: dict[int, bool] = defaultdict(bool)
    for _, rec in recs:
        spn = rec["data"]["spn"]
        if rec["kind"] in ("dtc_open", "dtc_close"):
            assert state[spn] != (rec["kind"] == "dtc_open"), f"{rec['kind']} twice in a row for {spn}"
            state[spn] = rec["kind"] == "dtc_open"
        elif rec["kind"] == FLAPPING:
            d = rec["data"]
            assert d["opens"] + d["closes"] == d["transitions"] and abs(d["opens"] - d["closes"]) <= 1
            assert (d["state"] == "open") == (state[spn] != (d["transitions"] % 2 == 1))
            state[spn] = d["state"] == "open"
        elif rec["kind"] == "dtc_update":
            assert state[spn], f"an update of {spn} before its open"
    return dict(state)


def test_a_debounced_dtc_held_across_a_crash_is_neither_lost_nor_doubled(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    # Open, clear (both out at once), then two more changes held in the 10 s period; written, then a crash.
    _run(path, [_dm1_batch(t, f) for t, f in ((0, True), (1, False), (2, True), (3, False))], flushed=True)
    recs = _records(path)
    assert [(r["kind"], r["data"]["spn"]) for _, r in recs] == [("dtc_open", 111), ("dtc_open", 110),
                                                                 ("dtc_close", 110)]
    # The next life: the period ends on the data's clock; the two held changes go out once, as one event.
    _run(path, [_dm1_batch(t, False) for t in (5, 9, 11, 12)], flushed=True)
    recs = _records(path)
    assert [(r["kind"], r["data"]["spn"]) for _, r in recs][3:] == [(FLAPPING, 110)]
    assert recs[3][1]["data"]["transitions"] == 2 and recs[3][1]["data"]["state"] == "closed"
    _run(path, [_dm1_batch(t, False) for t in (30, 31)], flushed=True)
    assert len(_records(path)) == 4  # and never again
    assert _check(_records(path)) == {111: True, 110: False}


def test_a_held_open_across_a_crash_goes_out_once_and_is_not_announced_again(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    # Open, clear (out at once), open again: held in the period; written, then a crash.
    _run(path, [_dm1_batch(t, f) for t, f in ((0, True), (1, False), (2, True))], flushed=True)
    assert [r["kind"] for _, r in _records(path)] == ["dtc_open", "dtc_open", "dtc_close"]
    # Still active after the restart: the DM1s tell nothing new; the held open goes out once its period ends.
    _run(path, [_dm1_batch(t, True) for t in (4, 8, 10.5, 12, 30)], flushed=True)
    recs = _records(path)
    assert [(r["kind"], r["data"]["spn"], r["ts"]) for _, r in recs][3:] == [("dtc_open", 110, 2.0)]
    _run(path, [_dm1_batch(t, True) for t in (40, 41)], flushed=True)
    assert len(_records(path)) == 4 and _check(_records(path)) == {111: True, 110: True}


def test_a_crash_before_the_flush_loses_the_held_events_with_their_state_and_the_next_dm1_restores_them(
        tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    _run(path, [_dm1_batch(0, True)], flushed=True)  # announced (an open is written at once anyway)
    # The close is not urgent: it waits for the flush, and the crash comes first. Its state is lost with it.
    _run(path, [_dm1_batch(1, False)], flushed=False)
    assert [r["kind"] for _, r in _records(path)] == ["dtc_open", "dtc_open"]
    # The next life starts from what was written (110/0 open): the next DM1 tells the close again.
    _run(path, [_dm1_batch(2, False)], flushed=True)
    recs = _records(path)
    assert [(r["kind"], r["data"]["spn"], r["ts"]) for _, r in recs][2:] == [("dtc_close", 110, 2.0)]
    assert _check(recs) == {111: True, 110: False}


def test_a_debouncer_state_saved_by_the_agent_before_is_let_out_and_an_unknown_one_is_counted(
        tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    store = Store(path, first_seq=1)
    store.set_state(DTC_DEBOUNCE_STATE_KEY.format(source="can0"), V1_STATE)  # as the agent before saved it
    store.db.close()
    held = _run(path, [_dm1_batch(t, False) for t in (106, 111, 165)], flushed=True, policy=DtcPolicy(10.0, 8))
    assert held == (0, 3)  # read, not refused: its three held events
    recs = [r for _, r in _records(path)]
    assert [(r["kind"], r["data"]["source"], r["data"].get("spn")) for r in recs] == [
        ("dtc_open", "can0/00", 111), (FLAPPING, "can0/00", 110), (STORM, "can0/01", None)]
    assert recs[1]["data"]["transitions"] == 2 and recs[2]["data"]["transitions"] == 1
    # A state this agent cannot read (a newer agent's, or damaged): refused, counted, and the agent carries on.
    path = tmp_path / "t.sqlite"
    store = Store(path, first_seq=1)
    store.set_state(DTC_DEBOUNCE_STATE_KEY.format(source="can0"), V1_STATE | {"v": 99})
    store.db.close()
    assert _run(path, [_dm1_batch(1.0, True)], flushed=True) == (1, 0)
    assert sorted(r["data"]["spn"] for _, r in _records(path)) == [110, 111]


def _agent_config(tmp: Path) -> Path:
    conf = tmp / "agent.toml"
    conf.write_text(f"""
[vehicle]
fleet = "f1"
id = "v1"
[[can]]
interface = "virtual"
channel = "flapping-{tmp.name}"
batch_max_s = 0.05
[pipeline]
dtc_debounce_s = 1.0
dtc_max_events_per_min = 10000
[model]
path = "{tmp / 'no-model.onnx'}"
[store]
path = "{tmp / 'vehicle.sqlite'}"
flush_interval_s = 0.2
[mqtt]
host = "127.0.0.1"
port = 9
tls = false
reconnect_min_s = 30
reconnect_max_s = 60
""")
    return conf


def _start(conf: Path) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([sys.executable, "-m", "harvester_testing.flapproc", str(conf)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
    return p


@pytest.mark.slow
def test_sigkilled_agents_neither_lose_nor_double_a_flapping_dtc(tmp_path: Path) -> None:
    conf = _agent_config(tmp_path)
    db = tmp_path / "vehicle.sqlite"
    rng = random.Random(15)
    t0 = time.time()
    p = _start(conf)
    try:
        for life in range(5):
            mark = len(_records(db)) if db.exists() else 0
            # Running long enough for periods to end and summaries to be written, then killed at a random instant.
            wait_for(lambda m=mark: db.exists() and any(r["kind"] == FLAPPING for _, r in _records(db)[m:]),
                     timeout=60, what="a flapping summary written")
            time.sleep(rng.uniform(0.0, 1.0))
            if life == 4:
                break
            p.send_signal(signal.SIGKILL)
            p.wait(10)
            p = _start(conf)
        p.send_signal(signal.SIGTERM)  # a clean stop: the DTC clears, then everything held is written
        assert p.stdout is not None and p.stdout.readline().strip() == b"stopped"
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    t1 = time.time()
    recs = _records(db)
    last = _check(recs)
    assert last == {flapproc.STEADY.spn: True, flapproc.FLAPPING.spn: False}
    assert [r["kind"] for _, r in recs if r["data"]["spn"] == flapproc.STEADY.spn] == ["dtc_open"]  # never again
    flapping = [r for _, r in recs if r["data"]["spn"] == flapproc.FLAPPING.spn]
    assert sum(r["kind"] == FLAPPING for r in flapping) >= 5
    # Nothing doubled: the records stand for no more changes than the DTC made while any agent ran (and the one
    # the clean stop may force, clearing it).
    assert sum(weight(r) for r in flapping) <= flapproc.transitions_between(t0, t1) + 1
