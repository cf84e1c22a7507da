"""What is open across a restart, piece by piece: the alert tracker's carry-on/close rule, the DM1 active set, and
the store writing state in the records' own transaction. Real SQLite files; the SIGKILL drill with a real agent
process is tests/test_restart_continuity.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import can
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.alerts import AlertContext, AlertTracker
from agent.contract import AlertPolicy
from agent.decode.base import Decoder
from agent.decode.j1939 import J1939Decoder
from agent.decode.j1939_tp import Dtc
from agent.frames import FrameBatch
from agent.pipeline import ALERT_STATE_KEY, Pipeline
from agent.signals import SignalRegistry
from agent.store import Store
from agent.writer import StoreWriter
from harvester_sim import address_claim_frame, encode_dm1, make_name

POLICY = AlertPolicy(threshold=0.8, clear_threshold=0.3, min_windows=2, clear_windows=2)


def _open_tracker(model: str = "m", version: str = "1") -> AlertTracker:
    t = AlertTracker(POLICY, model, version)
    for i in range(2):
        t.update(0.9, AlertContext(10.0 * i, 10.0 * i + 30, "leak", snapshot={"x": 1.0}))
    assert t.open is not None
    t.update(0.5, AlertContext(20.0, 50.0, "leak", snapshot={"x": 2.0}))  # in between: stays open
    return t


def test_carry_on_within_the_limit_with_the_same_model() -> None:
    old = _open_tracker()
    saved = json.loads(json.dumps(old.saved(alive=1000.0)))  # as it comes back from the store
    new = AlertTracker(POLICY, "m", "1")
    assert new.resume(saved, now=1060.0, resume_s=120.0) is None
    assert new.open is not None and new.open.alert_id == old.open.alert_id  # type: ignore[union-attr]
    assert new.update(0.1, AlertContext(60, 90)) is None
    closed = new.update(0.1, AlertContext(65, 95))
    assert closed is not None and closed.state == "closed" and new.carried == 1
    assert closed.alert_id == old.open.alert_id and closed.reason == ""  # type: ignore[union-attr]


@pytest.mark.parametrize(("model", "version", "now", "reason"), [
    ("m", "1", 1000.0 + 121, "agent_restart"),  # gone too long
    ("m", "1", 999.0, "agent_restart"),  # the clock went back: no carrying on across that
    ("m", "2", 1001.0, "model_changed"),
    ("other", "1", 1001.0, "model_changed"),
])
def test_close_with_a_reason_otherwise(model: str, version: str, now: float, reason: str) -> None:
    old = _open_tracker()
    saved = old.saved(alive=1000.0)
    assert saved is not None
    new = AlertTracker(POLICY, model, version)
    closing = new.resume(saved, now=now, resume_s=120.0)
    assert new.open is None
    assert closing is not None and closing.state == "closed" and closing.reason == reason
    assert closing.alert_id == old.open.alert_id  # type: ignore[union-attr]
    assert closing.window_end == 50.0 and closing.score == 0.5 and closing.snapshot == {"x": 2.0}  # latest known


def test_clean_stop_closes_with_agent_stop() -> None:
    t = _open_tracker()
    closing = t.close_now("agent_stop", 2000.0)
    assert closing is not None and closing.reason == "agent_stop" and closing.ts == 2000.0
    assert t.open is None and t.saved(2000.0) is None and t.close_now("agent_stop", 2001.0) is None


_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6)),
                     lambda k: st.one_of(st.lists(k, max_size=3), st.dictionaries(st.text(max_size=8), k, max_size=4)),
                     max_leaves=15)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_json, st.fixed_dictionaries({"alert": _json, "alive": _json, "score": _json,
                                               "window_end": _json, "snapshot": _json})))
def test_damaged_saved_alert_is_refused_not_a_crash(saved: Any) -> None:
    t = AlertTracker(POLICY, "m", "1")
    try:
        t.resume(saved, now=1.0, resume_s=10.0)
    except (KeyError, TypeError, ValueError):
        assert t.open is None


def _records(store: Store) -> list[tuple[str, dict[str, Any]]]:
    rows = store.db.execute("SELECT kind, head FROM outbox WHERE kind != 'samples' ORDER BY seq_lo").fetchall()
    return [(k, json.loads(h)) for k, h in rows]


def _started(store: Store, reg: SignalRegistry, decoders: dict[str, Decoder[Any]]) -> Pipeline:
    """A pipeline without a model on the store, as the agent starts one: the writer hands it the saved state."""
    return _started_with_writer(store, reg, decoders)[0]


def _started_with_writer(store: Store, reg: SignalRegistry,
                         decoders: dict[str, Decoder[Any]]) -> tuple[Pipeline, StoreWriter]:
    w = StoreWriter(store, reg)
    p = Pipeline(reg, decoders, None, w)
    w.resume(p)
    return p, w


def test_a_saved_alert_no_model_can_own_is_closed_at_start(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite", first_seq=1)
    store.set_state(ALERT_STATE_KEY, _open_tracker().saved(alive=1.0))
    reg = SignalRegistry()
    p = _started(store, reg, {})  # the model was refused this time
    (kind, rec), = _records(store)
    assert kind == "alert" and rec["state"] == "closed" and rec["reason"] == "model_changed"
    assert store.get_state(ALERT_STATE_KEY) is None and p.stats.alerts_closed == 1
    _started(store, reg, {})  # and only once
    assert len(_records(store)) == 1
    store.close()


def test_damaged_state_is_counted_and_dropped(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite", first_seq=1)
    store.set_state(ALERT_STATE_KEY, {"alert": {"nope": 1}})
    store.set_state("dtc_active/can0", {"zz": [[1, 2]]})
    reg = SignalRegistry()
    p = _started(store, reg, {"can0": J1939Decoder(reg)})
    assert p.stats.errors["alert_state_unreadable"] == 1 and p.stats.errors["dtc_state_unreadable"] == 1
    assert store.get_state(ALERT_STATE_KEY) is None and _records(store) == []
    store.close()


def _dm1(t: float, by_source: dict[int, list[Dtc]]) -> FrameBatch:
    """Single-frame DM1s (one DTC fits in 8 bytes), one per source address."""
    return FrameBatch.from_messages([
        can.Message(timestamp=t, arbitration_id=(6 << 26) | (0xFECA << 8) | sa, is_extended_id=True,
                    data=encode_dm1(dtcs))
        for sa, dtcs in by_source.items()])


def test_dtcs_active_at_a_restart_are_continued_not_reannounced(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    leak, hot = Dtc(111, 1, 1), Dtc(110, 0, 2)

    def run(frames: list[FrameBatch]) -> list[tuple[str, str, int]]:
        store = Store(path, first_seq=1)
        before = len(_records(store))
        reg = SignalRegistry()
        p, w = _started_with_writer(store, reg, {"can0": J1939Decoder(reg)})
        for fb in frames:
            p.feed(fb.bus, fb)
        w.flush_records()  # the flush that follows within `flush_interval_s` (a close is not written at once)
        out = [(r["kind"], r["data"]["source"], r["data"]["spn"]) for _, r in _records(store)[before:]]
        store.db.close()  # as a crash leaves it: no clean close
        return out

    assert run([_dm1(1.0, {0x00: [leak], 0x03: [hot]})]) == [("dtc_open", "can0/00", 111),
                                                            ("dtc_open", "can0/03", 110)]
    assert run([_dm1(2.0, {0x00: [leak], 0x03: [hot]})]) == []  # still active after the restart: nothing new
    assert run([_dm1(3.0, {0x00: [leak], 0x03: []})]) == [("dtc_close", "can0/03", 110)]  # cleared meanwhile
    assert run([_dm1(4.0, {0x00: [leak]}), _dm1(5.0, {0x00: []})]) == [("dtc_close", "can0/00", 111)]
    assert run([_dm1(6.0, {0x00: [], 0x03: [hot]})]) == [("dtc_open", "can0/03", 110)]


def test_state_is_written_in_the_records_transaction(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite", first_seq=1)
    with pytest.raises(TypeError):  # a record that cannot be encoded: the whole transaction goes
        store.append_records([("event", {"kind": "x", "ts": 1.0, "data": {"bad": object()}})], {"k": [1]})
    assert store.get_state("k") is None and _records(store) == []
    store.append_records([("event", {"kind": "x", "ts": 1.0})], {"k": [1]})
    assert store.get_state("k") == [1] and len(_records(store)) == 1
    store.append_records([], {"k": None})  # state alone; None deletes
    assert store.get_state("k") is None
    store.close()


def test_the_name_map_and_dtcs_survive_a_restart_and_an_address_move(tmp_path: Path) -> None:
    """The engine claims 0x00 with its NAME; the agent is killed; the engine comes back at 0x05 (a claim, then its DM1):
    its signals keep their source and its DTC is neither closed nor announced again. Real SQLite, state saved with
    the records as the agent saves it."""
    path = tmp_path / "s.sqlite"
    name = make_name(identity=99, manufacturer=0x123, function=0)
    src = f"can0/{name:016X}"
    hot = Dtc(110, 0, 2)

    def run(msgs: list[can.Message]) -> tuple[list[tuple[str, str, int]], set[str]]:
        store = Store(path, first_seq=1)
        before = len(_records(store))
        reg = SignalRegistry()
        p, w = _started_with_writer(store, reg, {"can0": J1939Decoder(reg)})
        p.feed("can0", FrameBatch.from_messages(msgs))
        w.flush_records()  # the flush that follows within `flush_interval_s` (a close is not written at once)
        out = [(r["kind"], r["data"]["source"], r["data"]["spn"]) for _, r in _records(store)[before:]]
        store.db.close()  # as a crash leaves it
        return out, {reg.key(i)[1] for i in range(len(reg))}

    def et1(sa: int, t: float) -> can.Message:
        return can.Message(timestamp=t, arbitration_id=0x18FEEE00 | sa, is_extended_id=True,
                           data=bytes([130]) + b"\xff" * 7)

    first, sources = run([address_claim_frame(name, 0x00, 0.0), et1(0x00, 0.5), *_dm1_frames(1.0, 0x00, [hot])])
    assert first == [("dtc_open", src, 110)] and sources == {src}
    second, sources = run([address_claim_frame(name, 0x05, 10.0), et1(0x05, 10.5), *_dm1_frames(11.0, 0x05, [hot])])
    assert second == [] and sources == {src}
    third, _ = run([*_dm1_frames(20.0, 0x05, [])])  # no claim since this restart: 0x05 is still known as the engine
    assert third == [("dtc_close", src, 110)]


def _dm1_frames(t: float, sa: int, dtcs: list[Dtc]) -> list[can.Message]:
    return [can.Message(timestamp=t, arbitration_id=(6 << 26) | (0xFECA << 8) | sa, is_extended_id=True,
                        data=encode_dm1(dtcs))]


def test_an_address_claim_is_saved_at_once_not_with_the_next_flush(tmp_path: Path) -> None:
    """ECUs claim their addresses at power-up and rarely again: a NAME learned just before a crash must not wait for
    the writer's next flush, or the restarted agent names the ECU by its address until the next power-up. Real
    SQLite; the crash comes before any flush."""
    path = tmp_path / "s.sqlite"
    name = make_name(identity=7, manufacturer=0x123, function=0)
    store = Store(path, first_seq=1)
    reg = SignalRegistry()
    p, _ = _started_with_writer(store, reg, {"can0": J1939Decoder(reg)})
    p.feed("can0", FrameBatch.from_messages([address_claim_frame(name, 0x00, 0.0)]))
    store.db.close()  # as a crash leaves it: no flush after the claim

    store = Store(path, first_seq=1)
    reg = SignalRegistry()
    dec = J1939Decoder(reg)
    _started(store, reg, {"can0": dec})
    assert dec.source(0x00) == f"can0/{name:016X}"
    store.close()
