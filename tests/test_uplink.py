"""The uplink against a real Mosquitto: records before samples, deletion only on the cloud's ack, resend on ack
timeout, survival of a broker crash. The cloud here is a small real MQTT peer that decodes and acks (the full
cloud_sync is exercised in test_end_to_end.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.backoff import backoff_delay
from agent.config import MqttConfig, VehicleConfig
from agent.store import Store
from agent.uplink import Uplink
from harvester_common import wire
from harvester_testing.broker import MosquittoBroker

VEHICLE = VehicleConfig(fleet="f1", id="v1")


def wait_for(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Acker:
    """Subscribes to the vehicle's uplink topics, records what arrives, and acks when `acking` is set."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.batches: list[tuple[str, wire.Batch]] = []
        self.acking = threading.Event()
        self.acking.set()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="acker", protocol=mqtt.MQTTv5)
        self.c.on_message = self._on_message
        self.c.on_connect = lambda c, *a: c.subscribe("fleet/+/vehicle/+/+", qos=1)
        self.c.connect(broker.host, broker.port)
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


def _uplink(broker: MosquittoBroker, store: Store, **kw: object) -> Uplink:
    cfg = MqttConfig(host=broker.host, port=broker.port, tls=False, batch_max_age_s=0.2, reconnect_min_s=0.1,
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
