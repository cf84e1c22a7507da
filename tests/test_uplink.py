"""The uplink against a real Mosquitto: records before samples, deletion only on the cloud's ack, resend on ack
timeout, survival of a broker crash, reconnects to a resumed session and to a new one. The cloud here is a small
real MQTT peer that decodes and acks (the full cloud_sync is exercised in test_end_to_end.py)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.backoff import backoff_delay
from agent.config import MqttConfig, VehicleConfig
from agent.store import Store
from agent.uplink import Uplink
from harvester_common import wire
from harvester_testing.broker import MosquittoBroker, free_port

VEHICLE = VehicleConfig(fleet="f1", id="v1")


def wait_for(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Acker:
    """Subscribes to the vehicle's uplink topics, records what arrives, and acks when `acking` is set. With
    `session_s`, its session outlives its connection (as cloud_sync's): what is published while it is away waits
    for it."""

    def __init__(self, broker: MosquittoBroker, session_s: int = 0) -> None:
        self.batches: list[tuple[str, wire.Batch]] = []
        self.acking = threading.Event()
        self.acking.set()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="acker", protocol=mqtt.MQTTv5)
        self.c.on_message = self._on_message
        self.c.on_connect = lambda c, *a: c.subscribe("fleet/+/vehicle/+/+", qos=1)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = session_s
        self.c.connect(broker.host, broker.port, properties=props)
        self.c.loop_start()

    def _on_message(self, c: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        leaf = msg.topic.rsplit("/", 1)[1]
        if leaf not in ("telemetry", "alerts", "events"):
            return
        b = wire.decode_batch(bytes(msg.payload))
        self.batches.append((leaf, b))
        if self.acking.is_set():
            ack = wire.Ack(b.vehicle, b.batch, [(s.seq_lo, s.seq_hi) for s in b.segments])
            c.publish(wire.vehicle_topic(b.fleet, b.vehicle, "ack"), wire.encode_ack(ack), qos=1)

    def seqs(self) -> list[int]:
        return sorted(q for _, b in self.batches for s in b.segments for q in range(s.seq_lo, s.seq_hi + 1))

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def _cols(n: int, noisy: bool = False) -> wire.SampleColumns:
    """A constant reading (it compresses to almost nothing), or with `noisy` one that keeps its size on the wire."""
    value = 1500.0 + np.random.default_rng(n).normal(size=n) if noisy else np.full(n, 1500.0)
    return wire.SampleColumns([("EEC1.EngSpeed", "can0/00", "rpm")], np.zeros(n, np.uint16),
                              np.arange(n, dtype=np.int64) * 20_000, value)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "out.sqlite", first_seq=1)
    yield s
    s.close()


def _uplink(broker: MosquittoBroker, store: Store, port: int | None = None, **kw: object) -> Uplink:
    cfg = MqttConfig(host=broker.host, port=port or broker.port, tls=False, batch_max_age_s=0.2, reconnect_min_s=0.1,
                     reconnect_max_s=0.5, **kw)  # type: ignore[arg-type]
    up = Uplink(cfg, VEHICLE, store, seed=1)
    up.start()
    return up


def test_records_go_first_and_acked_rows_are_deleted(broker: MosquittoBroker, store: Store) -> None:
    acker = Acker(broker)
    for _ in range(5):
        store.append_samples(_cols(1000))
    store.append_records([("alert", {"ts": 1.0, "alert_id": "a1"}), ("event", {"kind": "dtc_open", "ts": 2.0})])
    up = _uplink(broker, store)
    try:
        wait_for(lambda: store.status()["backlog_records"] == 0, what="backlog to drain")
        assert acker.seqs() == list(range(1, 5003))
        first_leaf = acker.batches[0][0]
        assert first_leaf in ("alerts", "events")
        st = store.status()
        assert st["acked"] == {"samples": 5000, "records": 2}
    finally:
        up.stop()
        acker.close()


def test_nothing_is_deleted_without_the_cloud_ack_and_unacked_batches_are_resent(
    broker: MosquittoBroker, store: Store
) -> None:
    acker = Acker(broker)
    acker.acking.clear()
    store.append_samples(_cols(100))
    up = _uplink(broker, store, ack_timeout_s=0.5)
    try:
        wait_for(lambda: len(acker.batches) >= 2, what="a resend after the ack timeout")
        assert store.status()["backlog_records"] == 100  # the broker's PUBACK deleted nothing
        assert up.stats.ack_timeouts >= 1
        acker.acking.set()
        wait_for(lambda: store.status()["backlog_records"] == 0, what="delete after ack")
    finally:
        up.stop()
        acker.close()


def test_broker_crash_and_restart_loses_nothing(broker: MosquittoBroker, store: Store) -> None:
    acker = Acker(broker)
    # Batches sent before the test's peer resubscribes to the restarted (memoryless) broker are lost there:
    # they must come again after the ack timeout.
    up = _uplink(broker, store, ack_timeout_s=1.0)
    try:
        wait_for(lambda: up.connected, what="connect")
        broker.kill()
        wait_for(lambda: not up.connected, what="disconnect noticed")
        for _ in range(3):
            store.append_samples(_cols(500))
        assert store.status()["backlog_records"] == 1500
        broker.start()
        acker.close()
        acker = Acker(broker)
        wait_for(lambda: store.status()["backlog_records"] == 0, timeout=30, what="drain after restart")
        assert set(acker.seqs()) == set(range(1, 1501))
        assert up.stats.connects >= 2
    finally:
        up.stop()
        acker.close()


# --- reconnects: a resumed session keeps the batches in flight ------------------------------------------------------

BIG = 2**63 - 1


def _doors(broker: MosquittoBroker, vehicle_port: int | None) -> str:
    """The config of a broker that saves its sessions (persistence, as a production broker's) and listens for the
    cloud (the test's peer) on `broker.port` always, and for the vehicle on `vehicle_port` when given: a restart
    without it leaves the vehicle out of coverage while the cloud goes on."""
    conf = (f"persistence true\npersistence_location {broker.workdir}/\n"
            f"listener {broker.port} {broker.host}\nallow_anonymous true\n")
    return conf + (f"listener {vehicle_port} {broker.host}\n" if vehicle_port is not None else "")


@pytest.fixture
def doors(tmp_path: Path) -> Iterator[tuple[MosquittoBroker, int]]:
    """A broker with two doors, and the vehicle's port."""
    b = MosquittoBroker(workdir=tmp_path / "mosquitto")
    vehicle_port = free_port()
    b.extra_conf = _doors(b, vehicle_port)
    b.start()
    try:
        yield b, vehicle_port
    finally:
        b.close()


def _vehicle_away(broker: MosquittoBroker, vehicle_port: int, acker: Acker, acks: list[bytes],
                  until: float = 0.0) -> None:
    """The broker restarts without the vehicle's door (it saves its sessions at the stop); the cloud, back on its
    own, publishes `acks` to the vehicle's ack topic (acknowledged by the broker: queued in the vehicle's session if
    it has one, else dropped); the vehicle stays away until `until` (time.monotonic()), then the broker restarts
    with both doors."""
    broker.stop()
    broker.extra_conf = _doors(broker, None)
    broker.start()
    wait_for(acker.c.is_connected, what="the cloud back on its own")
    topic = wire.vehicle_topic("f1", "v1", "ack")
    for info in [acker.c.publish(topic, p, qos=1) for p in acks]:
        info.wait_for_publish(20)
    wait_for(lambda: time.monotonic() > until, what="the vehicle's time away")
    broker.stop()
    broker.extra_conf = _doors(broker, vehicle_port)
    broker.start()


def _ack(b: wire.Batch, ranges: list[tuple[int, int]] | None = None) -> bytes:
    return wire.encode_ack(wire.Ack(b.vehicle, b.batch, ranges or [(s.seq_lo, s.seq_hi) for s in b.segments]))


def _outbox(store: Store) -> set[tuple[int, int]]:
    """The rows the store holds, read on a connection of the test's own (the uplink's thread uses the store's)."""
    con = sqlite3.connect(store.path)
    try:
        return {(int(lo), int(hi)) for lo, hi in con.execute("SELECT seq_lo, seq_hi FROM outbox")}
    finally:
        con.close()


def _resume_rig(broker: MosquittoBroker, vehicle_port: int, store: Store, **kw: object) -> tuple[Acker, Uplink]:
    """Eight segments of forty samples (seq 1..320), two to a batch, oldest first; the cloud does not ack."""
    acker = Acker(broker, session_s=3600)
    acker.acking.clear()
    for _ in range(8):
        store.append_samples(_cols(40, noisy=True))
    up = _uplink(broker, store, port=vehicle_port, live_lane_s=0, batch_max_bytes=1024, **kw)
    return acker, up


def test_a_resumed_session_keeps_the_batches_in_flight_and_their_acks_count(
    doors: tuple[MosquittoBroker, int], store: Store
) -> None:
    """Three batches in flight when the vehicle goes away; the cloud's acks for them (one naming everything, and a
    forged one) are queued in its session. The vehicle comes back longer than `ack_timeout_s` later, to the session
    resumed: the acks are believed for their batches (as far as those carried), nothing is sent again, and the ack
    timers start over at the reconnect. Before, the reconnect forgot the batches: the acks were dropped as
    `not_in_flight` and the three batches sent again."""
    broker, vehicle_port = doors
    acker, up = _resume_rig(broker, vehicle_port, store, max_inflight_batches=3, ack_timeout_s=10.0)
    try:
        wait_for(lambda: len(acker.batches) == 3 and not up._client._out_messages,
                 what="three batches in flight, each acknowledged by the broker")
        sent = time.monotonic()
        assert acker.seqs() == list(range(1, 241))
        b1, b2, b3 = (b for _, b in acker.batches)
        forged = wire.encode_ack(wire.Ack("v1", b1.batch - 1000, [(1, BIG)]))
        _vehicle_away(broker, vehicle_port, acker, [_ack(b1), _ack(b2, [(1, BIG)]), _ack(b3), forged],
                      until=sent + 12.0)
        wait_for(lambda: up.stats.acks + sum(up.stats.acks_rejected.values()) >= 4, what="the queued acks handled")
        assert up.stats.sessions_resumed == 1 and up.stats.connects == 2
        assert up.stats.inflight_kept == 3 and up.stats.inflight_forgotten == 0
        assert up.stats.acks_rejected == {"not_in_flight": 1}, up.stats  # the forged one only
        assert up.stats.acks == 3 and up.stats.acks_trimmed == 1
        # Away 12 s, the timeout 10 s: the timers stopped while the vehicle was away.
        assert up.stats.ack_timeouts == 0
        # The ack naming everything deleted only its batch's rows: the fourth batch's rows wait for their own.
        assert _outbox(store) == {(241, 280), (281, 320)}
        wait_for(lambda: len(acker.batches) == 4, what="the fourth batch")
        acker.c.publish(wire.vehicle_topic("f1", "v1", "ack"), _ack(acker.batches[3][1]), qos=1)
        wait_for(lambda: store.status()["backlog_records"] == 0, what="the backlog acked")
        seen = acker.seqs()
        assert seen[:240] == list(range(1, 241))  # nothing in flight at the outage was sent again
        assert set(seen) == set(range(1, 321))
    finally:
        up.stop()
        acker.close()


def test_a_batch_whose_ack_never_comes_is_sent_again_on_a_link_that_keeps_dropping(
    doors: tuple[MosquittoBroker, int], store: Store
) -> None:
    """The cloud never acks; the link drops every 2 s of connection, each time back to the session the broker kept.
    The ack timers stop while the vehicle is away and go on at the reconnect: after `ack_timeout_s` (5 s) of
    connection, spread over three stretches, the batches go again. Restarted at each reconnect instead, they never
    would while the link kept dropping (none of them had by the fourth reconnect)."""
    broker, vehicle_port = doors
    acker, up = _resume_rig(broker, vehicle_port, store, max_inflight_batches=2, ack_timeout_s=5.0)
    try:
        wait_for(lambda: len(acker.batches) == 2 and not up._client._out_messages,
                 what="two batches in flight, each acknowledged by the broker")
        for stretch in range(1, 4):
            time.sleep(2.0)  # connected, no ack
            _vehicle_away(broker, vehicle_port, acker, [], until=time.monotonic() + 0.5)
            wait_for(lambda n=stretch: up.stats.connects == n + 1 and up.stats.connected, what="back")
        assert up.stats.sessions_resumed == 3
        # 6 s of connection so far, 5 s the timeout: timed out during the third stretch, whatever the time away.
        assert up.stats.ack_timeouts >= 1, up.stats
        first = {b.batch for _, b in acker.batches[:2]}
        wait_for(lambda: {b.batch for _, b in acker.batches[2:]} - first, what="the batches sent again")
        resent = [q for _, b in acker.batches[2:] for seg in b.segments for q in range(seg.seq_lo, seg.seq_hi + 1)]
        assert set(range(1, 81)) <= set(resent)  # the two batches' rows, all of them again
    finally:
        up.stop()
        acker.close()


def test_a_session_not_resumed_sends_the_batches_in_flight_again_at_once(
    doors: tuple[MosquittoBroker, int], store: Store
) -> None:
    """The vehicle's session ends with its connection (`session_expiry_s = 0`): the acks the cloud publishes while
    it is away are lost with it, so at the reconnect the batches in flight go again at once, not after
    `ack_timeout_s` (ten minutes here)."""
    broker, vehicle_port = doors
    acker, up = _resume_rig(broker, vehicle_port, store, session_expiry_s=0, ack_timeout_s=600.0)
    try:
        wait_for(lambda: len(acker.batches) == 4 and not up._client._out_messages,
                 what="four batches in flight, each acknowledged by the broker")
        first = [b for _, b in acker.batches]
        acker.acking.set()  # the resent batches are acked as they come
        _vehicle_away(broker, vehicle_port, acker, [_ack(b) for b in first])
        wait_for(lambda: store.status()["backlog_records"] == 0, what="the batches sent again and acked")
        assert up.stats.sessions_resumed == 0 and up.stats.connects == 2
        assert up.stats.inflight_forgotten == 4 and up.stats.inflight_kept == 0
        assert up.stats.ack_timeouts == 0
        assert up.stats.acks_rejected == {}  # the acks published while it was away never arrived
        assert {b.batch for _, b in acker.batches[4:]}.isdisjoint(b.batch for b in first)  # under new ids
        assert acker.seqs() == sorted(list(range(1, 321)) * 2)  # each row twice: before the outage and after
    finally:
        up.stop()
        acker.close()


def test_malformed_and_foreign_acks_are_counted_not_applied(broker: MosquittoBroker, store: Store) -> None:
    acker = Acker(broker)
    acker.acking.clear()
    store.append_samples(_cols(10))
    up = _uplink(broker, store)
    try:
        wait_for(lambda: len(acker.batches) >= 1, what="first batch")
        topic = wire.vehicle_topic("f1", "v1", "ack")
        for payload in (b"garbage", b"{}", b"x" * 300_000,
                        wire.encode_ack(wire.Ack("other-vehicle", 1, [(1, 10)]))):
            acker.c.publish(topic, payload, qos=1)
        wait_for(lambda: sum(up.stats.acks_rejected.values()) >= 4, what="bad acks counted")
        assert up.stats.acks_rejected == {"malformed": 2, "oversized": 1, "wrong_vehicle": 1}
        assert store.status()["backlog_records"] == 10
    finally:
        up.stop()
        acker.close()


def test_status_is_retained_and_will_says_offline(broker: MosquittoBroker, store: Store) -> None:
    seen: list[bytes] = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="watcher", protocol=mqtt.MQTTv5)
    c.on_message = lambda cl, u, m: seen.append(bytes(m.payload))
    c.on_connect = lambda cl, *a: cl.subscribe("fleet/f1/vehicle/v1/status", qos=1)
    c.connect(broker.host, broker.port)
    c.loop_start()
    up = _uplink(broker, store)
    try:
        wait_for(lambda: any(b'"online"' in s for s in seen), what="online status")
    finally:
        up.stop()
    wait_for(lambda: b'"offline"' in seen[-1], what="offline status on clean stop")
    c.loop_stop()
    c.disconnect()


def test_backoff_has_full_jitter_and_a_cap() -> None:
    import random

    rng = random.Random(3)
    delays = [backoff_delay(a, 1.0, 60.0, rng) for a in range(20) for _ in range(20)]
    assert all(1.0 <= d <= 60.0 for d in delays)
    assert len({round(d, 3) for d in delays}) > 100  # jittered, not lockstep
    assert max(backoff_delay(3, 1.0, 60.0, rng) for _ in range(200)) <= 8.0


def test_daily_budget_holds_samples_back_but_never_alerts(broker: MosquittoBroker, store: Store) -> None:
    acker = Acker(broker)
    now = [1_800_000_000.0]
    for _ in range(20):
        store.append_samples(_cols(2000, noisy=True))  # a batch of constant readings would fit the whole budget
    cfg = MqttConfig(host=broker.host, port=broker.port, tls=False, batch_max_age_s=0.1, batch_max_bytes=8192,
                     max_inflight_batches=1, daily_budget_bytes=3000)
    up = Uplink(cfg, VEHICLE, store, seed=1, clock=lambda: now[0])
    up.start()
    try:
        wait_for(lambda: up.stats.budget_held, what="budget spent")
        held = store.status()["backlog"]["samples"]["records"]
        assert 0 < held < 40_000  # some samples went, the rest wait
        store.append_records([("alert", {"ts": 1.0, "alert_id": "late"})])
        wait_for(lambda: "alert" not in store.status()["backlog"], what="alert sent despite the spent budget")
        assert store.status()["backlog"]["samples"]["records"] == held
        now[0] += 86400  # a new UTC day, a new budget
        wait_for(lambda: store.status()["backlog"]["samples"]["records"] < held, what="samples flow again")
        assert up.budget_used() > 0
    finally:
        up.stop()
        acker.close()


def test_a_record_with_non_finite_numbers_cannot_stall_the_outbox(broker: MosquittoBroker, store: Store) -> None:
    acker = Acker(broker)
    nan = float("nan")
    store.append_records([("event", {"kind": "note", "ts": 1.0, "data": {"x": nan, "y": [float("inf"), 2.0]}})])
    store.append_samples(_cols(100))
    up = _uplink(broker, store)
    try:
        wait_for(lambda: store.status()["backlog_records"] == 0, what="everything behind the odd record delivered")
        rec = next(b for leaf, b in acker.batches if leaf == "events").segments[0].record
        assert rec is not None and rec["data"] == {"x": None, "y": [None, 2.0]}  # stated as missing, not dropped
    finally:
        up.stop()
        acker.close()


def test_status_messages_count_towards_the_daily_budget(broker: MosquittoBroker, store: Store) -> None:
    """docs/delivery.md: alerts, events and status always go, and count. With nothing in the store the only bytes
    sent are status messages, so the day's count is theirs."""
    now = [1_800_000_000.0]
    cfg = MqttConfig(host=broker.host, port=broker.port, tls=False, status_interval_s=1.0,
                     daily_budget_bytes=10_000_000)
    up = Uplink(cfg, VEHICLE, store, seed=1, clock=lambda: now[0])
    up.start()
    try:
        wait_for(lambda: up.budget_used() > 0, what="a status message counted")
        first = up.budget_used()
        wait_for(lambda: up.budget_used() >= 2 * first, what="the periodic status message counted")
    finally:
        up.stop()
    assert up.stats.bytes_sent == 0  # no batch went: every byte counted was a status message's
