"""The vehicle tells the cloud its active DTCs (docs/protocol.md "Status", docs/assistant.md): J1939 decoders fed
crafted DM1s (single frame and TP.BAM) → the pipeline's snapshot → the uplink's status payload; a whole agent on a
virtual CAN bus through a real Mosquitto into a real cloud database and the assistant; the status's size bound with
the largest list; and the cloud's checker, assistant and vehicle page against hostile `dtcs`."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import can
import paho.mqtt.client as mqtt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from agent import allocator
from agent.config import AgentConfig, MqttConfig, VehicleConfig
from agent.decode.j1939 import J1939Decoder
from agent.decode.j1939_tp import PGN_DM1, Dtc
from agent.frames import FrameBatch
from agent.pipeline import Pipeline
from agent.service import Agent
from agent.signals import SignalRegistry
from agent.store import Store
from agent.uplink import Uplink
from cloud_sync.assistant import Assistant, KnowledgeBase
from cloud_sync.config import CloudConfig, WebConfig
from cloud_sync.db_sqlite import CloudDB
from cloud_sync.present import status_dtcs
from cloud_sync.receiver import Receiver, _Msg
from cloud_sync.web.api import Api
from harvester_common import wire
from harvester_common.j1939_text import FMI_TEXT, SPN_MAX, DtcText
from harvester_sim import address_claim_frame, dm_frames, encode_dm1, make_name
from harvester_testing.broker import MosquittoBroker
from tests.test_uplink import wait_for

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "harvester-anomaly.int8.onnx"
RED_STOP, AMBER = 0x10, 0x04  # DM1 lamp byte: MIL 7-6, red stop 5-4, amber warning 3-2, protect 1-0


def dm1(sa: int, t: float, dtcs: list[Dtc], lamps: int | None = None) -> list[can.Message]:
    return dm_frames(PGN_DM1, encode_dm1(dtcs, lamps), sa, t)


def pipeline(*buses: str, every_s: float = 0.0) -> Pipeline:
    reg = SignalRegistry()
    return Pipeline(reg, {b: J1939Decoder(reg, bus=b) for b in buses}, None, None, dtc_snapshot_s=every_s)


def feed(p: Pipeline, bus: str, msgs: list[can.Message]) -> None:
    p.feed(bus, FrameBatch.from_messages(msgs))


def status_of(p: Pipeline, tmp_path: Path) -> dict[str, Any]:
    """The status message the uplink would publish, its `dtcs` from the pipeline's snapshot."""
    store = Store(tmp_path / "s.sqlite")
    try:
        up = Uplink(MqttConfig(port=1, tls=False), VehicleConfig(fleet="f1", id="v1"), store,
                    lambda: {"dtcs": p.dtc_status()})
        out: dict[str, Any] = json.loads(up._status_payload("online"))
        return out
    finally:
        store.close()


def keys(status: dict[str, Any]) -> list[tuple[str, int, int]]:
    return [(d["source"], d["spn"], d["fmi"]) for d in status["dtcs"]["active"]]


# --- the agent ---------------------------------------------------------------------------------------------------

def test_the_status_lists_every_decoders_active_dtcs_single_frame_and_bam(tmp_path: Path) -> None:
    p = pipeline("can0", "can1")
    assert status_of(p, tmp_path)["dtcs"] == {"active": [], "more": 0}
    feed(p, "can0", dm1(0x00, 1.0, [Dtc(110, 0, 3)], AMBER))  # one frame
    feed(p, "can1", dm1(0x21, 1.0, [Dtc(100, 1, 1), Dtc(111, 1, 4), Dtc(524287, 31, 126)]))  # TP.BAM
    st = status_of(p, tmp_path)
    assert keys(st) == [("can0/00", 110, 0), ("can1/21", 100, 1), ("can1/21", 111, 1), ("can1/21", 524287, 31)]
    first = st["dtcs"]["active"][0]
    assert first == {"source": "can0/00", "spn": 110, "fmi": 0, "occurrence": 3, "mil": 0, "red_stop": 0,
                     "amber_warning": 1, "protect": 0,
                     "text": "SPN 110 Engine Coolant Temperature, FMI 0: above normal, most severe"}
    assert st["dtcs"]["more"] == 0
    # One clears, one counts up: the next status says so.
    feed(p, "can1", dm1(0x21, 2.0, [Dtc(100, 1, 2), Dtc(524287, 31, 126)]))
    feed(p, "can0", dm1(0x00, 2.0, []))
    st = status_of(p, tmp_path)
    assert keys(st) == [("can1/21", 100, 1), ("can1/21", 524287, 31)]
    assert st["dtcs"]["active"][0]["occurrence"] == 2


def test_at_most_64_listed_red_stop_first_the_rest_counted(tmp_path: Path) -> None:
    p = pipeline("can0", "can1")
    many = [Dtc(1000 + i, 1, 1) for i in range(40)]
    feed(p, "can0", dm1(0x10, 1.0, many, 0x00))  # no lamp
    feed(p, "can0", dm1(0x20, 1.0, many, RED_STOP))
    feed(p, "can1", dm1(0x30, 1.0, many[:10], AMBER))
    st = status_of(p, tmp_path)
    assert len(st["dtcs"]["active"]) == wire.MAX_STATUS_DTCS and st["dtcs"]["more"] == 90 - 64
    assert keys(st) == ([("can0/20", d.spn, 1) for d in many] + [("can1/30", d.spn, 1) for d in many[:10]]
                        + [("can0/10", d.spn, 1) for d in many[:14]])
    assert keys(status_of(p, tmp_path)) == keys(st)  # stable: the same set, the same list


def test_a_restart_lists_what_is_still_active_before_any_dm1(tmp_path: Path) -> None:
    p = pipeline("can0")
    feed(p, "can0", dm1(0x00, 1.0, [Dtc(110, 0, 3)]))
    dec = p.decoders["can0"]
    assert dec.state_key is not None
    saved = {dec.state_key: dec.state()}
    again = pipeline("can0")
    again.resume(saved)
    assert keys(status_of(again, tmp_path)) == [("can0/00", 110, 0)]


def test_snapshots_are_made_at_most_every_dtc_snapshot_s(tmp_path: Path) -> None:
    """A storm changes the active set with every batch: the snapshot (a walk of the whole set) is not remade for
    each; the status keeps the last one until the period has passed (the service's heartbeat then remakes it)."""
    p = pipeline("can0", every_s=1e9)
    feed(p, "can0", dm1(0x00, 1.0, [Dtc(110, 0, 3)]))  # the first snapshot is at once
    feed(p, "can0", dm1(0x00, 2.0, [Dtc(100, 1, 1)]))
    p.heartbeat()
    assert keys(status_of(p, tmp_path)) == [("can0/00", 110, 0)]
    p.dtc_snapshot_s = 0.0
    p.heartbeat()  # idle: the pending change goes into the next status
    assert keys(status_of(p, tmp_path)) == [("can0/00", 100, 1)]


def test_the_status_stays_within_its_bound_with_the_largest_dtcs_list(tmp_path: Path) -> None:
    """A real agent's status (model, drift, scoring, counters flooded to their bound) with 64 listed DTCs as long as
    a vehicle makes them: the longest bus name, ECUs under their NAMEs, SPN names of the longest a DBC gives
    (words_of cuts at 120 characters), the longest FMI words; it fits the receiver's limit."""
    bus = "b" * 32
    cfg = AgentConfig.model_validate({
        "vehicle": {"fleet": "f" * 64, "id": "v" * 64},
        "can": [{"name": bus, "interface": "virtual", "channel": f"size-{tmp_path.name}"}],
        "model": {"path": str(MODEL)},
        "store": {"path": str(tmp_path / "vehicle.sqlite")},
        "mqtt": {"port": 1, "tls": False},
        "log": {"warn_every_s": 86400},
    })
    agent = Agent(cfg)
    agent.pipeline.dtc_snapshot_s = 0.0  # every batch's change in the next status (no service loop runs here)
    try:
        dec = agent.pipeline.decoders[bus]
        assert isinstance(dec, J1939Decoder)
        longest_fmi = max(range(32), key=lambda f: len(FMI_TEXT[f]))
        spns = [SPN_MAX - i for i in range(40)]
        dec.dtcs.text = DtcText({s: ("W" + "x" * 9 + " ") * 10 + "Y" * 10 for s in spns})  # 120 characters
        for sa in range(4):
            name = make_name(identity=0x1FFFF0 + sa, manufacturer=0x7FF, function=0xFF)
            agent.pipeline.feed(bus, FrameBatch.from_messages(
                [address_claim_frame(name, sa, 0.0), *dm1(sa, 1.0, [Dtc(s, longest_fmi, 126) for s in spns],
                                                           0xFF)]))
        for c in range(200):
            for i in range(500):
                agent.metrics.error(f"component{c:03d}-" + "x" * 80, f"reason {i} " + "y" * 200)
        payload = agent.uplink._status_payload("online")
        st = json.loads(payload)
        listed = st["dtcs"]["active"]
        assert len(listed) == wire.MAX_STATUS_DTCS and st["dtcs"]["more"] == 4 * 40 - 64
        assert all(len(d["source"]) == 32 + 1 + 16 and len(d["text"]) >= 190 for d in listed)
        assert len(payload) <= wire.MAX_STATUS_BYTES, len(payload)
        assert len(json.dumps(st["dtcs"], separators=(",", ":"))) <= 24 * 1024  # as wire.MAX_STATUS_DTCS says
    finally:
        agent.store.close()


def agent_config(tmp: Path, broker: MosquittoBroker, channel: str) -> AgentConfig:
    return AgentConfig.model_validate({
        "vehicle": {"fleet": "f1", "id": "H-777"},
        "can": [{"name": "can0", "interface": "virtual", "channel": channel}],
        "model": {"path": str(MODEL)},
        "store": {"path": str(tmp / "vehicle.sqlite")},
        "mqtt": {"host": broker.host, "port": broker.port, "tls": False, "reconnect_min_s": 0.1,
                 "reconnect_max_s": 0.5, "status_interval_s": 1},
    })


def test_a_whole_agent_tells_the_cloud_its_active_dtcs(broker: MosquittoBroker, tmp_path: Path) -> None:
    """DM1s on a (virtual) CAN bus → the agent's retained status through Mosquitto → the cloud's database → the
    assistant names the DTCs from the status."""
    seen: list[bytes] = []
    lock = threading.Lock()

    def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        with lock:
            seen.append(bytes(m.payload))

    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="watcher", protocol=mqtt.MQTTv5)
    watcher.on_message = on_message
    watcher.on_connect = lambda cl, *a: cl.subscribe("fleet/f1/vehicle/H-777/status", qos=1)
    watcher.connect(broker.host, broker.port)
    watcher.loop_start()
    channel = f"dtcs-{tmp_path.name}"
    agent = Agent(agent_config(tmp_path, broker, channel))
    tx = can.Bus(interface="virtual", channel=channel)
    agent.start()

    def latest() -> dict[str, Any]:
        with lock:
            out: dict[str, Any] = json.loads(seen[-1]) if seen else {}
            return out

    try:
        wait_for(lambda: latest().get("state") == "online", what="the agent online")
        # A virtual bus delivers only to buses open on it: frames sent before the agent's CAN source opened its bus
        # would be lost (under load the uplink can be online first: a status that never named the DTCs in CI).
        wait_for(lambda: agent.can_sources[0].up, what="the agent's CAN source open")
        for m in dm1(0x00, 1.0, [Dtc(110, 0, 3)], AMBER) + dm1(0x03, 1.0, [Dtc(100, 1, 1), Dtc(111, 1, 4)]):
            tx.send(m)
        wait_for(lambda: len(latest().get("dtcs", {}).get("active", [])) == 3, what="a status naming the DTCs")
    finally:
        tx.shutdown()
        agent.stop(drain_s=0)
        watcher.loop_stop()
        watcher.disconnect()
    status = latest()  # the clean stop's "offline" status still names them
    assert status["state"] == "offline"
    assert status["allocator"] == allocator.running()  # this test's process: what the fleet sees per vehicle
    assert keys(status) == [("can0/00", 110, 0), ("can0/03", 100, 1), ("can0/03", 111, 1)]
    cfg = CloudConfig.model_validate({"db": {"path": str(tmp_path / "cloud.sqlite")}})
    db = CloudDB(cfg.db.path)
    kb = KnowledgeBase(index_path=tmp_path / "kb.sqlite")
    try:
        # The status as it came off the wire through the cloud's receiver (no broker needed for that part): its
        # checker takes size and `state` only, so a receiver from before `dtcs` stores it as well.
        rx = Receiver(cfg, db)
        rx.client.ack = lambda mid, qos: None  # type: ignore[method-assign]
        with lock:
            raw = seen[-1]
        rx._process([_Msg("fleet/f1/vehicle/H-777/status", raw, 1, 1)])
        assert json.loads(db.read("SELECT status FROM vehicles WHERE vehicle='H-777'")[0][0]) == status
        out = Assistant(db, kb).ask("how is H-777")
    finally:
        kb.close()
        db.close()
    assert "active DTC SPN 110 Engine Coolant Temperature, FMI 0: above normal, most severe (3 occurrences" \
        in out.answer, out.answer
    assert "SPN 111 Engine Coolant Level, FMI 1" in out.answer
    assert any(s.table == "vehicles" and s.keys == [{"vehicle": "H-777", "field": "status.dtcs"}]
               for s in out.sources)


# --- the cloud ---------------------------------------------------------------------------------------------------

T0 = 1_790_000_000.0


def dtc_event(seq: int, kind: str, ts: float, spn: int, fmi: int = 1) -> wire.Segment:
    return wire.Segment("event", seq, seq, record={"kind": kind, "ts": ts, "data": {
        "source": "can0/00", "sa": 0, "spn": spn, "fmi": fmi, "occurrence": 1}})


def ask(db: CloudDB, tmp_path: Path, question: str) -> Any:
    kb = KnowledgeBase(index_path=tmp_path / "kb.sqlite")
    try:
        return Assistant(db, kb).ask(question, now=T0 + 10_000)
    finally:
        kb.close()


def test_a_dtc_opened_before_2000_later_events_is_active_when_the_status_says_so(tmp_path: Path) -> None:
    """The rebuild from events reads a vehicle's newest 2,000 of each kind: the coolant DTC opened before 2,100 others
    opened and closed is missed. The vehicle's status lists it: the assistant names it, from the status."""
    db = CloudDB(tmp_path / "cloud.sqlite")
    try:
        segs = [dtc_event(1, "dtc_open", T0, 110, 0)]
        for i in range(2100):
            segs += [dtc_event(2 + 2 * i, "dtc_open", T0 + 1 + i, 5000 + i), dtc_event(3 + 2 * i, "dtc_close",
                                                                                        T0 + 1.5 + i, 5000 + i)]
        db.ingest([wire.Batch("f1", "H-900", 1, segs)])
        db.set_status("f1", "H-900", {"state": "online", "ts": T0 + 5000})  # an older agent: no `dtcs`
        before = ask(db, tmp_path, "how is H-900")
        assert "SPN 110" not in before.answer  # what today's rebuild answers
        assert not any(s.table == "vehicles" and s.keys and "field" in s.keys[0] for s in before.sources)
        db.set_status("f1", "H-900", {"state": "online", "ts": T0 + 5000, "dtcs": {"active": [
            {"source": "can0/00", "spn": 110, "fmi": 0, "occurrence": 1, "mil": 0, "red_stop": 0,
             "amber_warning": 1, "protect": 0, "text": "SPN 110 Engine Coolant Temperature, FMI 0: above normal, "
                                                       "most severe"}], "more": 0}})
        after = ask(db, tmp_path, "how is H-900")
        assert "active DTC SPN 110 Engine Coolant Temperature, FMI 0: above normal, most severe (1 occurrence, " \
               "active in the vehicle's status of " in after.answer, after.answer
        assert [s.keys for s in after.sources if s.table == "vehicles" and s.query.startswith("SELECT status")] \
            == [[{"vehicle": "H-900", "field": "status.dtcs"}]]
        assert not any(s.table == "events" for s in after.sources)
        # The status says nothing is active: a close lost to eviction no longer leaves one "active" for ever.
        db.ingest([wire.Batch("f1", "H-900", 2, [dtc_event(10_000, "dtc_open", T0 + 9000, 96, 1)])])
        db.set_status("f1", "H-900", {"state": "online", "ts": T0 + 9500, "dtcs": {"active": [], "more": 0}})
        quiet = ask(db, tmp_path, "how is H-900").answer
        assert quiet.startswith("Nothing is wrong with H-900") and "SPN 96" not in quiet, quiet
        db.set_status("f1", "H-900", {"state": "online", "ts": T0 + 9500, "dtcs": {"active": [], "more": 70}})
        assert "70 more active DTCs" in ask(db, tmp_path, "how is H-900").answer
    finally:
        db.close()


_entry_fields = st.fixed_dictionaries({}, optional={
    "source": st.one_of(st.text(max_size=80), st.sampled_from(["can0/00", "can1/A000FF00FFFFFFF0", ""]),
                        st.integers(), st.none()),
    "spn": st.one_of(st.integers(-2, 2**20), st.sampled_from([0, SPN_MAX, SPN_MAX + 1, True]), st.floats(),
                     st.text(max_size=6)),
    "fmi": st.one_of(st.integers(-2, 40), st.booleans(), st.floats(), st.none()),
    "occurrence": st.one_of(st.integers(-2, 300), st.floats(), st.text(max_size=4), st.none()),
    "red_stop": st.one_of(st.integers(-1, 5), st.booleans(), st.text(max_size=3)),
    "text": st.one_of(st.text(max_size=400), st.integers(), st.lists(st.integers(), max_size=2)),
})
# Well-typed keys with hostile rest: the path where a DTC is kept and its words, count and lamps are read.
_good_entry = st.fixed_dictionaries({
    "source": st.sampled_from(["can0/00", "can1/A000FF00FFFFFFF0", ""]), "spn": st.integers(0, SPN_MAX),
    "fmi": st.integers(0, 31)}, optional={
    "occurrence": st.one_of(st.integers(-2, 300), st.floats(), st.none()),
    "mil": st.one_of(st.integers(-1, 5), st.booleans(), st.none()),
    "text": st.one_of(st.text(max_size=400), st.just("SPN 110 \u202e<b>x</b>, FMI 0: y"), st.integers())})
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=4), max_leaves=12)
_dtcs = st.one_of(_json, st.fixed_dictionaries({"active": st.lists(st.one_of(_good_entry, _entry_fields, _json),
                                                                     max_size=80)},
                                               optional={"more": st.one_of(st.integers(-5, 2**40), _json)}))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                           HealthCheck.too_slow, HealthCheck.data_too_large])
@given(dtcs=_dtcs)
def test_hostile_dtcs_in_a_stored_status_never_break_the_assistant_or_the_page(tmp_path: Path, dtcs: Any) -> None:
    status = {"state": "online", "ts": T0, "dtcs": dtcs}
    checked = status_dtcs(status)
    if checked is not None:
        listed = dtcs["active"]
        assert len(checked.active) + checked.ignored == len(listed)
        assert len(checked.active) <= wire.MAX_STATUS_DTCS and checked.more >= 0
        for d in checked.active:
            assert type(d["spn"]) is int and 0 <= d["spn"] <= SPN_MAX
            assert type(d["fmi"]) is int and 0 <= d["fmi"] <= 31
            assert isinstance(d["source"], str) and len(d["source"]) <= 64
            assert d["red_stop"] is None or (type(d["red_stop"]) is int and 0 <= d["red_stop"] <= 3)
    db = CloudDB(tmp_path / f"hostile-{abs(hash(repr(dtcs)))}.sqlite")
    try:
        db.set_status("f1", "H-900", status)
        out = ask(db, tmp_path, "how is H-900")
        assert out.intent == "vehicle_status" and json.loads(out.to_json())["answer"] == out.answer
        page = Api(db, WebConfig()).vehicle("H-900", {})
        assert page is not None
        json.dumps(page, allow_nan=False)  # the page's JSON stays strict JSON
        assert page["active_dtcs"]["from"] == ("status" if checked is not None else "events")
        assert len(page["active_dtcs"]["active"]) == (len(checked.active) if checked is not None else 0)
    finally:
        db.close()

