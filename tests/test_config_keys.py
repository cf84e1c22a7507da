"""Limits that used to be constants are config keys now: a non-default value must really change what the agent and
cloud_sync do, seen through their behaviour on real parts (python-can's virtual bus, SQLite, Mosquitto, the fleet
page's API over a real database). Under the defaults each of these assertions would fail."""

from __future__ import annotations

import json
from pathlib import Path

import can
import pytest

from agent.config import AgentConfig, CanBusConfig, MqttConfig
from agent.frames import FrameBatch
from agent.service import Agent
from agent.sources.can import CanSource
from agent.store import Store
from agent.uplink import Uplink
from cloud_sync.config import WebConfig
from cloud_sync.db_sqlite import CloudDB
from cloud_sync.web import Api
from harvester_common import wire
from harvester_testing.broker import MosquittoBroker
from tests.test_cloud_db import T0, alert, seed_fleet
from tests.test_store import _cols
from tests.test_uplink import VEHICLE, Acker, wait_for


def _frame(i: int) -> can.Message:
    return can.Message(arbitration_id=0x18FEEE00 | (i % 3), data=bytes(8), is_extended_id=True)


def test_can_batches_hold_at_most_batch_max_frames() -> None:
    batches: list[FrameBatch] = []
    # A long batch_max_s: batches close on their size here, not on time.
    src = CanSource(CanBusConfig(name="can0", interface="virtual", channel="keys-batch", batch_max_frames=7,
                                 batch_max_s=1.0), batches.append)
    src.start()
    tx = can.Bus(interface="virtual", channel="keys-batch")
    try:
        wait_for(lambda: src.up, what="bus open")
        for i in range(50):
            tx.send(_frame(i))
        wait_for(lambda: sum(len(b) for b in batches) == 50, what="all frames")
        assert max(len(b) for b in batches) <= 7 and len(batches) >= 8  # 2000 by default: one batch of 50
    finally:
        tx.shutdown()
        src.stop()


def test_a_full_pipeline_queue_drops_and_counts_at_queue_max_batches(tmp_path: Path) -> None:
    cfg = AgentConfig.model_validate({
        "can": [{"name": "can0", "interface": "virtual", "channel": "keys-queue", "batch_max_frames": 1}],
        "pipeline": {"queue_max_batches": 3},
        "model": {"path": str(tmp_path / "no-model.onnx")},  # refused: the agent runs without scoring
        "store": {"path": str(tmp_path / "buffer.sqlite")},
        "mqtt": {"host": "127.0.0.1", "port": 1, "tls": False},  # never started
    })
    agent = Agent(cfg)
    # Only the CAN source runs: no processing thread empties the queue, so what it holds and what was dropped are
    # exact. One frame per batch (batch_max_frames = 1).
    src = agent.can_sources[0]
    src.start()
    tx = can.Bus(interface="virtual", channel="keys-queue")
    try:
        wait_for(lambda: src.up, what="bus open")
        for i in range(10):
            tx.send(_frame(i))
        wait_for(lambda: src.frames == 10, what="all frames read")
        assert agent.queue.qsize() == 3 and agent.dropped["can"] == 7  # 2000 by default: nothing dropped
    finally:
        tx.shutdown()
        src.stop()
        agent.store.close()


def test_eviction_frees_down_to_the_watermark(tmp_path: Path) -> None:
    bound = 1024 * 1024
    s = Store(tmp_path / "a.sqlite", max_bytes=bound, first_seq=1, evict_watermark=0.5)
    evicting_writes = 0
    page = s.db.execute("PRAGMA page_size").fetchone()[0]
    for i in range(200):  # ~3 MB of segments (~16 KB each: their values are noise)
        before = s.counters()["evictions"]
        s.append_samples(_cols(2000, t0=1_700_000_000.0 + i * 100))
        if s.counters()["evictions"] > before:
            evicting_writes += 1
            # 0.9 by default: left at ~90 % of the bound; plus the page of the `evicted` notice, which is written
            # after the eviction reached the watermark
            assert s.used_bytes() <= bound * 0.5 + page
    assert evicting_writes >= 2
    s.close()


def test_an_ack_over_max_ack_bytes_is_dropped_as_oversized(broker: MosquittoBroker, tmp_path: Path) -> None:
    store = Store(tmp_path / "out.sqlite", first_seq=1)
    store.append_records([("alert", {"ts": 1.0, "alert_id": "a1"})])  # seq 1
    acker = Acker(broker)
    acker.acking.clear()
    cfg = MqttConfig(host=broker.host, port=broker.port, tls=False, reconnect_min_s=0.1, reconnect_max_s=0.5,
                     ack_timeout_s=600, max_ack_bytes=wire.MAX_ACK_BYTES)  # its lowest allowed value
    up = Uplink(cfg, VEHICLE, store, seed=1)
    up.start()
    topic = wire.vehicle_topic("f1", "v1", "ack")
    try:
        wait_for(lambda: len(acker.batches) >= 1, what="the alert's batch")
        batch = acker.batches[0][1].batch
        # A valid ack for the batch in flight, its one range repeated: past the configured limit, within the
        # default (256 KiB), so only the key can have dropped it.
        big = wire.encode_ack(wire.Ack("v1", batch, [(1, 1)] * 40_000))
        assert wire.MAX_ACK_BYTES < len(big) < 256 * 1024
        acker.c.publish(topic, big, qos=1)
        wait_for(lambda: up.stats.acks_rejected.get("oversized", 0) == 1, what="the big ack dropped")
        assert store.status()["backlog_records"] == 1 and up.stats.acks == 0
        acker.c.publish(topic, wire.encode_ack(wire.Ack("v1", batch, [(1, 1)])), qos=1)
        wait_for(lambda: up.stats.acks == 1, what="the small ack applied")
        assert store.status()["backlog_records"] == 0
    finally:
        up.stop()
        acker.close()
        store.close()


@pytest.fixture
def fleet_db(tmp_path: Path) -> CloudDB:
    db = CloudDB(tmp_path / "cloud.sqlite")
    seed_fleet(db)  # v1: samples T0..T0+100 (two signals, 10 Hz together), alert 1001 on the window T0+20..T0+50
    two = alert(2001, "a5", "open", T0 + 50, top_features=[["EEC1.EngSpeed:mean:30s", 0.5],
                                                           ["ET1.EngCoolantTemp:mean:30s", 0.4]])
    db.ingest([wire.Batch("f1", "v1", 2, [two])])
    return db


def test_the_alert_plot_follows_the_web_keys(fleet_db: CloudDB) -> None:
    api = Api(fleet_db, WebConfig(context_s=10.0, max_signals=1, max_points=40))
    one = api.alert("v1", "1001")
    assert one is not None
    assert one["span"] == [T0 + 20 - 10, T0 + 50 + 10]  # 120 s either side by default
    (points,) = one["series"].values()
    assert len(points) == 40  # 20,000 by default: all 250 in the span
    assert all(T0 + 10 <= ts <= T0 + 60 for ts, _ in points)
    two = api.alert("v1", "2001")
    assert two is not None and list(two["series"]) == ["EEC1.EngSpeed"]  # the first named signal; 8 by default
    json.dumps(two)  # the API's answer stays plain JSON
    fleet_db.close()


def test_only_recent_batches_are_remembered_after_their_ack(broker: MosquittoBroker, tmp_path: Path) -> None:
    store = Store(tmp_path / "out.sqlite", first_seq=1)
    acker = Acker(broker)  # acks every batch it sees
    cfg = MqttConfig(host=broker.host, port=broker.port, tls=False, reconnect_min_s=0.1, reconnect_max_s=0.5,
                     recent_batches=1)
    up = Uplink(cfg, VEHICLE, store, seed=1)
    up.start()
    try:
        for n in (1, 2):
            store.append_records([("alert", {"ts": float(n), "alert_id": f"a{n}"})])
            wait_for(lambda n=n: up.stats.acks == n, what=f"batch {n} acked")
        first = acker.batches[0][1]
        replay = wire.Ack("v1", first.batch, [(s.seq_lo, s.seq_hi) for s in first.segments])
        acker.c.publish(wire.vehicle_topic("f1", "v1", "ack"), wire.encode_ack(replay), qos=1)
        wait_for(lambda: sum(up.stats.acks_rejected.values()) + up.stats.acks_replayed == 1, what="the replay")
        # Forgotten (only the last batch is remembered): taken for an ack of a batch never sent. With the default
        # of 1024 it is a harmless replay (`acks_replayed`).
        assert up.stats.acks_rejected == {"not_in_flight": 1} and up.stats.acks_replayed == 0
    finally:
        up.stop()
        acker.close()
        store.close()
