"""cloud_sync against a real Mosquitto and real SQLite: store once, ack after commit, dedup, gaps vs evictions,
hostile messages rejected and counted, a persistent session that survives a receiver restart."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from cloud_sync.cli import main as cloud_main
from cloud_sync.config import CloudConfig, load_config
from cloud_sync.db_sqlite import CloudDB
from cloud_sync.receiver import Receiver, _Msg
from cloud_sync.reports import Reports
from harvester_common import wire
from harvester_testing.broker import MosquittoBroker
from tests.test_uplink import wait_for


class Vehicle:
    """A test vehicle: a real MQTT client that publishes wire batches and records the acks it gets."""

    def __init__(self, broker: MosquittoBroker, fleet: str = "f1", vid: str = "v1") -> None:
        self.fleet, self.vid = fleet, vid
        self.acks: list[wire.Ack] = []
        self.on_ack_hook: list[object] = []
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"veh-{vid}", protocol=mqtt.MQTTv5)
        subscribed = threading.Event()
        self.c.on_connect = lambda c, *a: c.subscribe(wire.vehicle_topic(fleet, vid, "ack"), qos=1)
        self.c.on_subscribe = lambda *a: subscribed.set()
        self.c.on_message = self._on_message
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        assert subscribed.wait(10)

    def _on_message(self, c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        ack = wire.decode_ack(bytes(m.payload))
        for hook in self.on_ack_hook:
            hook(ack)  # type: ignore[operator]
        self.acks.append(ack)

    def send(
        self, batch: wire.Batch, leaf: str = "telemetry", payload: bytes | None = None, topic_vehicle: str | None = None
    ) -> None:
        topic = wire.vehicle_topic(self.fleet, topic_vehicle or self.vid, leaf)
        self.c.publish(topic, payload if payload is not None else wire.encode_batch(batch), qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def samples(lo: int, n: int) -> wire.Segment:
    cols = wire.SampleColumns(
        [("EEC1.EngSpeed", "can0/00", "rpm"), ("ET1.EngCoolantTemp", "can0/00", "degC")],
        (np.arange(n) % 2).astype(np.uint16),
        1_700_000_000_000_000 + np.arange(n, dtype=np.int64) * 10_000,
        np.linspace(80, 90, n),
    )
    return wire.Segment("samples", lo, lo + n - 1, columns=cols)


def batch(bid: int, *segs: wire.Segment, vid: str = "v1") -> wire.Batch:
    return wire.Batch("f1", vid, bid, list(segs))


def cfg_for(broker: MosquittoBroker, tmp_path: Path, client_id: str = "cs-test") -> CloudConfig:
    return CloudConfig.model_validate(
        {
            "mqtt": {"host": broker.host, "port": broker.port, "client_id": client_id},
            "db": {"path": str(tmp_path / "cloud.sqlite")},
        }
    )


@pytest.fixture
def receiver(broker: MosquittoBroker, tmp_path: Path) -> Iterator[Receiver]:
    cfg = cfg_for(broker, tmp_path)
    db = CloudDB(cfg.db.path)
    rx = Receiver(cfg, db)
    rx.start()
    assert rx.connected.wait(10)
    yield rx
    rx.stop()
    db.close()


def test_batch_is_stored_then_acked(broker: MosquittoBroker, receiver: Receiver, tmp_path: Path) -> None:
    v = Vehicle(broker)
    seen_at_ack: list[int] = []

    def check_committed(ack: wire.Ack) -> None:
        # A separate connection sees only committed data: the rows must already be there when the ack arrives.
        con = sqlite3.connect(tmp_path / "cloud.sqlite")
        seen_at_ack.append(con.execute("SELECT COUNT(*) FROM samples").fetchone()[0])
        con.close()

    v.on_ack_hook.append(check_committed)
    alert = wire.Segment(
        "alert",
        101,
        101,
        record={
            "alert_id": "a1",
            "state": "open",
            "score": 0.93,
            "ts": 5.0,
            "model": "m",
            "model_version": "1",
            "label": "coolant_leak",
        },
    )
    v.send(batch(7, samples(1, 100), alert))
    wait_for(lambda: len(v.acks) == 1, what="ack")
    assert v.acks[0].batch == 7 and v.acks[0].ranges == [(1, 100), (101, 101)] and v.acks[0].status == "ok"
    assert seen_at_ack == [100]
    s = Reports(receiver.db).stats()[0]
    assert s.records == {"samples": 100, "alerts": 1, "events": 0} and s.highest_seq == 101 and s.gaps == []
    assert Reports(receiver.db).alerts()[0]["label"] == "coolant_leak"
    v.close()


def test_duplicates_stored_once_and_acked_again(broker: MosquittoBroker, receiver: Receiver) -> None:
    v = Vehicle(broker)
    b = batch(1, samples(1, 50))
    v.send(b)
    v.send(b)
    v.send(batch(2, samples(1, 80)))  # overlaps: 50 old, 30 new... as a different segmentation would
    wait_for(lambda: len(v.acks) == 3, what="three acks")
    s = Reports(receiver.db).stats()[0]
    assert s.records["samples"] == 80 and s.duplicates == 100
    v.close()


def test_gaps_and_evictions(broker: MosquittoBroker, receiver: Receiver) -> None:
    v = Vehicle(broker)
    v.send(batch(1, samples(1, 10)))
    v.send(batch(2, samples(31, 10)))  # 11..30 never arrived
    ev = wire.Segment(
        "event", 41, 41, record={"kind": "evicted", "ts": 1.0, "data": {"ranges": [[11, 20]], "count": 10}}
    )
    v.send(batch(3, ev), leaf="events")
    wait_for(lambda: len(v.acks) == 3, what="acks")
    s = Reports(receiver.db).stats()[0]
    assert s.evicted == [[11, 20]] and s.gaps == [[21, 30]] and s.highest_seq == 41
    v.close()


def test_hostile_messages_rejected_counted_and_service_continues(broker: MosquittoBroker, receiver: Receiver) -> None:
    v = Vehicle(broker)
    good = wire.encode_batch(batch(1, samples(1, 5)))
    v.send(batch(0), payload=b"garbage")
    v.send(batch(0), payload=good[: len(good) // 2])
    v.send(batch(0), payload=b"HV\x01\x00" + b"\x00" * 3)
    v.send(batch(0), payload=b"x" * (wire.MAX_MESSAGE_BYTES + 1))
    v.send(batch(1, samples(1, 5), vid="v2"), topic_vehicle="v1")  # claims another vehicle than its topic
    v.send(batch(5, samples(1, 5)))
    wait_for(lambda: len(v.acks) == 2, what="the good batch's ack and the mismatch's rejection")
    wait_for(lambda: sum(Reports(receiver.db).rejected().values()) == 5, what="rejections counted")
    assert Reports(receiver.db).rejected() == {"malformed": 3, "oversized": 1, "vehicle_mismatch": 1}
    # Nothing decodable names a batch in the first four; the mismatched one does, and is told it is refused.
    assert sorted((a.batch, a.status) for a in v.acks) == [(1, "rejected"), (5, "ok")]
    assert next(a for a in v.acks if a.batch == 1).reason.startswith("vehicle_mismatch")
    v.close()


def test_messages_published_while_receiver_is_down_arrive_after_restart(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    cfg = cfg_for(broker, tmp_path, "cs-persistent")
    db = CloudDB(cfg.db.path)
    rx = Receiver(cfg, db)
    rx.start()
    assert rx.connected.wait(10)
    rx.stop()
    v = Vehicle(broker)
    v.send(batch(9, samples(1, 20)))  # queued by the broker for the persistent session
    rx = Receiver(cfg, db)
    rx.start()
    try:
        wait_for(lambda: len(v.acks) == 1, what="ack after restart")
        assert Reports(db).stats()[0].records["samples"] == 20
    finally:
        rx.stop()
        v.close()
        db.close()


def test_status_marks_vehicle_online_and_offline(broker: MosquittoBroker, receiver: Receiver) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="st", protocol=mqtt.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    topic = wire.vehicle_topic("f1", "v9", "status")
    c.publish(topic, json.dumps({"state": "online", "ts": 1.0}), qos=1, retain=True).wait_for_publish(10)
    wait_for(lambda: any(s.vehicle == "v9" and s.online for s in Reports(receiver.db).stats()), what="online")
    c.publish(topic, json.dumps({"state": "offline", "ts": 2.0}), qos=1, retain=True).wait_for_publish(10)
    wait_for(lambda: any(s.vehicle == "v9" and not s.online for s in Reports(receiver.db).stats()), what="offline")
    c.loop_stop()
    c.disconnect()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300), st.sampled_from(["telemetry", "alerts", "events", "status", "bogus"]))
def test_fuzzed_payloads_never_break_the_worker(tmp_path: Path, data: bytes, leaf: str) -> None:
    cfg = CloudConfig.model_validate({"db": {"path": str(tmp_path / "fuzz.sqlite")}})
    db = CloudDB(cfg.db.path)
    rx = Receiver(cfg, db)
    rx.client.ack = lambda mid, qos: None  # type: ignore[method-assign]  # no broker in this unit test
    rx._process([_Msg(f"fleet/f1/vehicle/v1/{leaf}", data, 1, 1)])
    db.close()


def test_stats_cli_json_shape(
    broker: MosquittoBroker, receiver: Receiver, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    v = Vehicle(broker)
    v.send(batch(1, samples(1, 10)))
    wait_for(lambda: len(v.acks) == 1, what="ack")
    conf = tmp_path / "cloud.toml"
    conf.write_text(f'[db]\npath = "{tmp_path / "cloud.sqlite"}"\n')
    assert cloud_main(["stats", "--config", str(conf), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    veh = out["vehicles"][0]
    assert set(veh) >= {"vehicle", "fleet", "records", "highest_seq", "duplicates", "gaps", "evicted", "quarantined",
                        "online"}
    assert veh["records"]["samples"] == 10 and out["rejected"] == {}
    assert cloud_main(["stats", "--config", str(tmp_path / "missing.toml")]) == 2
    assert load_config(conf).db.path == tmp_path / "cloud.sqlite"
    v.close()


def test_gap_below_a_quarantine_floor_is_explained(broker: MosquittoBroker, receiver: Receiver) -> None:
    v = Vehicle(broker)
    v.send(batch(1, samples(1000, 10)))  # an old store's numbers: 1000..1009
    q = wire.Segment("event", 5000, 5000, record={"kind": "store_quarantined", "ts": 1.0,
                                                 "data": {"moved_to": "/x", "reason": "corrupt", "seq_floor": 5000}})
    v.send(batch(2, q, samples(5001, 5)), leaf="events")  # the new store starts at its floor
    wait_for(lambda: len(v.acks) == 2, what="acks")
    s = Reports(receiver.db).stats()[0]
    assert s.gaps == [] and s.quarantined == [[1010, 4999]]
    v.close()


def test_oversized_status_is_rejected_like_any_message(broker: MosquittoBroker, receiver: Receiver) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="big-status", protocol=mqtt.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    body = json.dumps({"state": "online", "pad": "x" * 300_000})
    c.publish(wire.vehicle_topic("f1", "v8", "status"), body, qos=1).wait_for_publish(10)
    wait_for(lambda: Reports(receiver.db).rejected().get("oversized", 0) == 1, what="oversized status counted")
    assert not any(s.vehicle == "v8" for s in Reports(receiver.db).stats())
    c.loop_stop()
    c.disconnect()


def _poison(i: int) -> tuple[str, bytes]:
    """(leaf, payload) of the i-th poison message: content no receiver can store, of every kind we know."""
    deep = b"HV\x01\x00" + b"[" * 5000 + b"]" * 5000
    big = 2**64
    hj = json.dumps({"schema": 1, "fleet": "f1", "vehicle": "v1", "batch": 2, "seq_lo": big, "seq_hi": big,
                     "segments": [{"kind": "alert", "seq_lo": big, "seq_hi": big, "record": {"alert_id": "x"}}]},
                    separators=(",", ":")).encode()
    huge_seq = b"HV\x01\x00" + len(hj).to_bytes(4, "little") + hj
    kinds: list[tuple[str, bytes]] = [
        ("telemetry", deep[:4] + (10_000).to_bytes(4, "little") + deep[4:]),  # json.loads -> RecursionError
        ("alerts", huge_seq),  # passed the old decoder, OverflowError at the INSERT
        ("status", b"[1, 2, 3]"),  # not an object
        ("status", b'{"state": "online", "backlog": ' + b"[" * 3000 + b"]" * 3000 + b"}"),  # nested junk
        ("status", b"\xff\xfe{not utf8"),
        ("status", b'{"state": "online", "budget": {"used_today": 1' + b"0" * 400 + b"}}"),  # huge number
        ("status", b'{"state": ["online"]}'),  # wrong type in a field set_status reads
        ("events", wire.encode_batch(batch(3, wire.Segment("event", 7, 7, record={
            "kind": "evicted", "ts": 1.0, "data": {"ranges": [["a", "b"]]}})), compress=False)),  # breaks reports
    ]
    return kinds[i % len(kinds)]


def test_poison_from_many_vehicles_never_stalls_the_fleet(broker: MosquittoBroker, tmp_path: Path) -> None:
    """120 poison messages (more than the broker's in-flight window of 100) from 40 vehicles, then a good alert:
    every poison is rejected, counted and PUBACKed, the alert is stored and acked; after a restart, still flowing."""
    cfg = cfg_for(broker, tmp_path, "cs-poison")
    db = CloudDB(cfg.db.path)
    rx = Receiver(cfg, db)
    rx.start()
    assert rx.connected.wait(10)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="poisoner", protocol=mqtt.MQTTv5)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    good = Vehicle(broker, vid="good")
    try:
        for i in range(120):
            leaf, payload = _poison(i)
            vid = f"v{i % 40:03d}"
            # the vehicle in the payload matches its topic (a header's length changes with it: same-length ids)
            body = payload.replace(b'"vehicle":"v1"', f'"vehicle":"{vid}"'.encode())
            if body != payload:
                hlen = int.from_bytes(body[4:8], "little") + len(vid) - 2
                body = body[:4] + hlen.to_bytes(4, "little") + body[8:]
            pub.publish(wire.vehicle_topic("f1", vid, leaf), body, qos=1).wait_for_publish(10)
        alert = wire.Segment("alert", 10, 10, record={"alert_id": "a1", "state": "open", "ts": 1.0, "label": "leak"})
        good.send(batch(77, alert, vid="good"), leaf="alerts")
        wait_for(lambda: any(a.batch == 77 and a.status == "ok" for a in good.acks), what="the good alert's ack")
        assert [a["alert_id"] for a in Reports(db).alerts(vehicle="good")] == ["a1"]
        wait_for(lambda: sum(Reports(db).rejected().values()) == 120, what="every poison message counted")
        assert sum(v for k, v in rx.stats.items() if k.startswith("rejected:")) == 120
        # the batches whose header names a batch id (the huge seq, the bad eviction event) got a rejected ack
        assert rx.stats["rejected_acks"] == 30
        rx.stop()
        rx = Receiver(cfg, db)  # the same persistent session: nothing left over to choke on
        rx.start()
        assert rx.connected.wait(10)
        good.send(batch(78, wire.Segment("alert", 11, 11, record={"alert_id": "a1", "state": "closed", "ts": 2.0}),
                        vid="good"), leaf="alerts")
        wait_for(lambda: any(a.batch == 78 and a.status == "ok" for a in good.acks), what="an ack after restart")
        assert [a["state"] for a in Reports(db).alerts(vehicle="good")] == ["open", "closed"]
        assert sum(Reports(db).rejected().values()) == 120  # PUBACKed: none came back after the restart
        s = {v.vehicle: v for v in Reports(db).stats()}
        assert set(s) == {"good"} and s["good"].records["alerts"] == 2  # cloud-sync stats still reads the fleet
    finally:
        rx.stop()
        pub.loop_stop()
        pub.disconnect()
        good.close()
        db.close()


def test_a_group_the_database_refuses_is_stored_message_by_message(
    broker: MosquittoBroker, receiver: Receiver, tmp_path: Path
) -> None:
    """The database itself refuses one batch of a commit group (a real constraint, here a trigger): its group-mates
    are stored and acked; it alone is rejected (`unstorable`), counted, and answered with a rejected ack."""
    con = sqlite3.connect(tmp_path / "cloud.sqlite")
    con.execute("CREATE TRIGGER refuse BEFORE INSERT ON alerts WHEN NEW.alert_id = 'refuse-me' "
                "BEGIN SELECT RAISE(ABORT, 'refused by a constraint'); END")
    con.commit()
    con.close()
    v = Vehicle(broker)

    def msg(bid: int, seq: int, alert_id: str) -> _Msg:
        b = batch(bid, wire.Segment("alert", seq, seq, record={"alert_id": alert_id, "state": "open", "ts": 1.0}))
        return _Msg(wire.vehicle_topic("f1", "v1", "alerts"), wire.encode_batch(b), 0, 0)

    held = receiver._process([msg(1, 1, "a"), msg(2, 2, "refuse-me"), msg(3, 3, "c")])
    assert held == []
    wait_for(lambda: len(v.acks) == 3, what="three acks")
    assert sorted((a.batch, a.status) for a in v.acks) == [(1, "ok"), (2, "rejected"), (3, "ok")]
    assert [a["alert_id"] for a in Reports(receiver.db).alerts()] == ["a", "c"]
    assert Reports(receiver.db).rejected() == {"unstorable": 1} and receiver.stats["groups_split"] == 1
    v.close()


def test_only_a_database_outage_holds_messages(broker: MosquittoBroker, receiver: Receiver, tmp_path: Path) -> None:
    """While another connection holds the database's write lock (SQLite's "database is locked": an outage, not the
    data's fault) nothing is settled, poison included; once it is released, the same messages settle."""
    v = Vehicle(broker)
    receiver.db.db.execute("PRAGMA busy_timeout=200")  # type: ignore[attr-defined]  # fail fast while locked
    good = _Msg(wire.vehicle_topic("f1", "v1", "telemetry"), wire.encode_batch(batch(1, samples(1, 5))), 0, 0)
    poison = _Msg(wire.vehicle_topic("f1", "v1", "telemetry"), b"HV\x01\x00garbage", 0, 0)
    locker = sqlite3.connect(tmp_path / "cloud.sqlite", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    held = receiver._process([good, poison])  # the poison's count fails: the valid batch before it waits too
    assert held == [good, poison] and v.acks == []
    locker.execute("ROLLBACK")
    locker.close()
    assert receiver._process(held) == []
    wait_for(lambda: len(v.acks) == 1, what="the ack once the database is back")
    assert v.acks[0].status == "ok" and Reports(receiver.db).rejected() == {"malformed": 1}
    v.close()


def test_ids_names_and_labels_are_checked_at_the_receiver(broker: MosquittoBroker, receiver: Receiver) -> None:
    """Vehicle ids, fleet names, signal names/sources/units and alert/event texts must match the patterns in
    docs/protocol.md: what does not is rejected with a reason, counted, and (a batch) answered `rejected`."""
    v = Vehicle(broker)
    odd = Vehicle(broker, vid="v é")  # not a vehicle id the agent's config would accept

    def alert(bid: int, seq: int, **rec: object) -> wire.Batch:
        return batch(bid, wire.Segment("alert", seq, seq, record={"alert_id": "a", "state": "open", **rec}))

    bad_signal = wire.SampleColumns([("ET1.Temp\x1b[2J", "can0/00", "degC")], np.zeros(3, np.uint16),
                                    np.arange(3, dtype=np.int64), np.ones(3))
    v.send(batch(1, wire.Segment("samples", 1, 3, columns=bad_signal)))
    v.send(alert(2, 4, label="\x1b[2Jall clear"), leaf="alerts")
    v.send(alert(3, 5, model={"not": "text"}), leaf="alerts")
    v.send(batch(4, wire.Segment("event", 6, 6, record={"kind": "evicted", "data": {"ranges": [["a", 1]]}})),
           leaf="events")
    v.send(alert(5, 7, label="x" * 257), leaf="alerts")
    odd.send(wire.Batch("f1", "v é", 6, [wire.Segment("alert", 1, 1, record={"alert_id": "a"})]), leaf="alerts")
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="st-bad", protocol=mqtt.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    c.publish(wire.vehicle_topic("f" * 65, "v1", "status"), b'{"state": "online"}', qos=1).wait_for_publish(10)
    c.publish(wire.vehicle_topic("f1", "v1", "status"), b'{"state": 5}', qos=1).wait_for_publish(10)
    v.send(alert(7, 8, label="coolant_leak", model="harvester-anomaly", model_version="1.0.0"), leaf="alerts")
    wait_for(lambda: sum(Reports(receiver.db).rejected().values()) == 8, what="eight rejections")
    assert Reports(receiver.db).rejected() == {"bad_signal": 1, "bad_record": 4, "bad_id": 2, "bad_status": 1}
    wait_for(lambda: len(v.acks) == 6, what="five rejected acks and one ok")
    assert sorted((a.batch, a.status) for a in v.acks) == [(1, "rejected"), (2, "rejected"), (3, "rejected"),
                                                            (4, "rejected"), (5, "rejected"), (7, "ok")]
    assert odd.acks == []  # a topic the receiver cannot trust gets no answer
    assert [a["label"] for a in Reports(receiver.db).alerts()] == ["coolant_leak"]
    assert {s.vehicle for s in Reports(receiver.db).stats()} == {"v1"}
    c.loop_stop()
    c.disconnect()
    v.close()
    odd.close()
