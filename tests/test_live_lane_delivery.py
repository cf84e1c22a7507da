"""The live lane end to end, on real parts: the vehicle's store and uplink, a real Mosquitto killed for the outage and
started again, the real cloud_sync receiver and its SQLite database. After a long outage the newest minute reaches
the cloud in the first batches, the history backfills behind it, samples written meanwhile overtake the history,
every sequence number is stored once, and the gap report, read after every commit of the backfill, never calls a
held range lost, while it still shows evictions as evictions and a real loss as a gap once the backfill has passed
it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import MqttConfig, VehicleConfig
from agent.store import Store
from agent.uplink import Uplink
from cloud_sync.config import CloudConfig
from cloud_sync.db import IngestResult
from cloud_sync.db_sqlite import CloudDB
from cloud_sync.receiver import Receiver, _Msg
from cloud_sync.reports import Reports
from harvester_common import backfill, wire
from harvester_testing.broker import MosquittoBroker
from tests.test_uplink import Acker, wait_for

VEHICLE = VehicleConfig(fleet="f1", id="v1")
T0_US = 1_800_000_000_000_000
SEGMENT_S = 10  # one flush of the writer: 10 s of two signals at 50 Hz
RATE_HZ = 50


def cols(t_s: int) -> wire.SampleColumns:
    """`SEGMENT_S` seconds of data from `t_s`: two signals at RATE_HZ, as the writer flushes them."""
    n = SEGMENT_S * RATE_HZ * 2
    rng = np.random.default_rng(t_s)
    ts = T0_US + t_s * 1_000_000 + (np.arange(n) // 2).astype(np.int64) * (1_000_000 // RATE_HZ)
    return wire.SampleColumns([("EEC1.EngSpeed", "can0/00", "rpm"), ("ET1.EngCoolantTemp", "can0/00", "degC")],
                              (np.arange(n) % 2).astype(np.uint16), ts, rng.normal(1500, 50, n))


@dataclass(slots=True)
class Stored:
    leaf: str
    ranges: list[tuple[int, int]]
    position: Any  # the backfill position the batch stated
    gaps: list[list[int]]  # the gap report right after the commit that stored this batch
    backfilling: list[list[int]]
    backfill_from: int | None  # the position the cloud believed then


class WatchedReceiver(Receiver):
    """The real receiver; after each batch it stores (and acks), it notes the batch and reads the gap report, and
    calls `hook` with the number of batches stored so far (the test writes to the vehicle from there)."""

    def __init__(self, cfg: CloudConfig, db: CloudDB) -> None:
        super().__init__(cfg, db)
        self.stored: list[Stored] = []
        self.hook: Callable[[int], None] = lambda n: None

    def _stored(self, m: _Msg, b: wire.Batch, r: IngestResult) -> None:
        super()._stored(m, b, r)
        v = next(s for s in Reports(self.db).stats() if s.vehicle == b.vehicle)
        leaf = m.topic.rsplit("/", 1)[1]
        self.stored.append(Stored(leaf, [(s.seq_lo, s.seq_hi) for s in b.segments], b.extra.get(backfill.KEY),
                                  v.gaps, v.backfilling, v.backfill_from))
        self.hook(len(self.stored))


class Rig:
    def __init__(self, broker: MosquittoBroker, tmp: Path, max_bytes: int = 1 << 30, lane_s: float = 60.0) -> None:
        self.broker = broker
        self.store = Store(tmp / "vehicle.sqlite", max_bytes=max_bytes)
        self.cloud_cfg = CloudConfig.model_validate({
            "mqtt": {"host": broker.host, "port": broker.port, "client_id": "cloud-1"},
            "db": {"path": str(tmp / "cloud.sqlite")}})
        self.db = CloudDB(self.cloud_cfg.db.path)
        self.rx: WatchedReceiver | None = None
        # One segment per batch (a segment is larger than a batch's cap) and two in flight: a backfill of many
        # round trips, so that the order of arrival is the thing under test.
        cfg = MqttConfig(host=broker.host, port=broker.port, tls=False, batch_max_age_s=0.2, batch_max_bytes=4096,
                         max_inflight_batches=2, ack_timeout_s=3.0, reconnect_min_s=0.1, reconnect_max_s=0.5,
                         live_lane_s=lane_s)
        self.up = Uplink(cfg, VEHICLE, self.store, seed=5)
        self.t = 0
        self.segments: dict[int, tuple[int, int]] = {}  # seq_lo → (seq_hi, data start in s)

    def start_cloud(self) -> WatchedReceiver:
        self.rx = WatchedReceiver(self.cloud_cfg, self.db)
        self.rx.start()
        assert self.rx.connected.wait(10)
        return self.rx

    def stop_cloud(self) -> None:
        if self.rx is not None:
            self.rx.stop()
            self.rx = None

    def write(self, segments: int) -> list[int]:
        los = []
        for _ in range(segments):
            lo, hi = self.store.append_samples(cols(self.t))
            self.segments[lo] = (hi, self.t)
            los.append(lo)
            self.t += SEGMENT_S
        return los

    def drained(self) -> bool:
        return self.store.status()["backlog_records"] == 0

    def close(self) -> None:
        self.up.stop()
        self.stop_cloud()
        self.store.close()
        self.db.close()


@pytest.fixture
def rig(broker: MosquittoBroker, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(broker, tmp_path)
    yield r
    r.close()


def outage(rig: Rig, segments: int) -> tuple[WatchedReceiver, list[int]]:
    """Connected and caught up, then the broker dies (the cloud with it) while `segments` are written; then both
    come back. Returns the receiver now serving and the seq_lo of the segments written during the outage."""
    rx = rig.start_cloud()
    rig.up.start()
    rig.write(3)
    wait_for(rig.drained, what="caught up before the outage")
    rig.stop_cloud()
    rig.broker.kill()
    wait_for(lambda: not rig.up.connected, what="the vehicle to notice the outage")
    backlog = rig.write(segments)
    rig.broker.start()
    rx = rig.start_cloud()
    return rx, backlog


def test_after_a_long_outage_the_newest_minute_comes_first_and_the_history_backfills_exactly_once(rig: Rig) -> None:
    fresh: list[int] = []
    rx, backlog = outage(rig, 120)  # 20 minutes of data, 120,000 samples

    def write_meanwhile(n: int) -> None:
        if n == 12 and not fresh:  # well into the backfill: a new flush from the running pipeline
            fresh.extend(rig.write(1))

    rx.hook = write_meanwhile
    wait_for(rig.drained, timeout=120, what="the backfill to complete")
    wait_for(lambda: bool(fresh) and rig.drained(), what="the sample written meanwhile to go too")
    tele = [s for s in rx.stored if s.leaf == "telemetry"]

    # The live lane first, newest first: the segments whose data ends within 60 s of the newest's end.
    lane = [lo for lo in backlog if rig.segments[lo][1] + SEGMENT_S >= rig.segments[backlog[-1]][1] + SEGMENT_S - 60]
    assert len(lane) == 7
    assert [s.ranges[0][0] for s in tele[:7]] == lane[::-1]
    assert tele[0].ranges == [(backlog[-1], rig.segments[backlog[-1]][0])]  # the newest sample in the first batch
    # Then the history, oldest first, with the sample written meanwhile overtaking what was left of it. (A batch
    # resent after a lost ack would be stored twice, as a duplicate: its first arrival is what counts.)
    order = list(dict.fromkeys(s.ranges[0][0] for s in tele[7:]))
    at = order.index(fresh[0])
    assert [lo for lo in order if lo != fresh[0]] == backlog[:-7]
    assert 12 - 7 <= at <= 12 - 7 + 3  # within the two batches in flight when it was written (+ the one acked)
    assert at < len(order) - 50  # ...far ahead of the rest of the history

    # The gap report after every commit: nothing held was ever called lost, and the holes were backfilling.
    assert all(s.gaps == [] for s in rx.stored)
    assert all(s.backfilling for s in tele[:-2])  # until the last batches filled the last holes
    # Right after the first commit (which may hold the first few lane batches), the whole history is one range held.
    assert len(tele[0].backfilling) == 1 and tele[0].backfilling[0][0] == backlog[0]

    # Every sequence number once; the report ends clean, the position where the vehicle will write next.
    st = rig.store.status()
    v = Reports(rig.db).stats()[0]
    assert v.records["samples"] == st["records_written"]["samples"] and v.highest_seq == st["highest_seq"]
    assert v.gaps == [] and v.backfilling == [] and v.backfill_from == st["highest_seq"] + 1
    assert Reports(rig.db).fleet()[0]["backfilling"] == 0


def test_evictions_stay_evictions_and_a_real_loss_is_a_gap_once_the_backfill_passes_it(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    rig = Rig(broker, tmp_path, max_bytes=2 * 1024 * 1024)
    try:
        rx = rig.start_cloud()
        rig.up.start()
        rig.write(3)
        wait_for(rig.drained, what="caught up before the outage")
        rig.stop_cloud()
        broker.kill()
        wait_for(lambda: not rig.up.connected, what="the vehicle to notice the outage")
        backlog = rig.write(200)  # about twice what 2 MiB holds: the oldest are evicted
        st = rig.store.status()
        assert st["evicted"]["samples"] > 0
        held = sorted(r[0] for r in rig.store.db.execute("SELECT seq_lo FROM outbox WHERE kind='samples'"))
        lost = held[len(held) // 2]  # a segment the vehicle lost without a word (a fault nothing reports)
        lost_hi = rig.segments[lost][0]
        rig.store.db.execute("DELETE FROM outbox WHERE seq_lo=?", (lost,))
        broker.start()
        rx = rig.start_cloud()
        wait_for(rig.drained, timeout=120, what="the backfill to complete")

        for s in rx.stored:
            # Never a false gap: the lost segment is the only one ever reported, and only once the vehicle's
            # backfill has passed it; evictions are never gaps.
            assert s.gaps in ([], [[lost, lost_hi]])
            if s.gaps:
                assert s.backfill_from is not None and s.backfill_from > lost_hi
        # Before the backfill reached it, it was backfilling like the rest: the vehicle's word was all there was.
        assert any(lo <= lost and lost_hi <= hi for s in rx.stored for lo, hi in s.backfilling)
        v = Reports(rig.db).stats()[0]
        assert v.gaps == [[lost, lost_hi]] and v.backfilling == []
        assert sum(hi - lo + 1 for lo, hi in v.evicted) == st["evicted"]["samples"]  # every eviction explained
        assert v.records["samples"] == (st["records_written"]["samples"] - st["evicted"]["samples"]
                                        - (lost_hi - lost + 1))
        assert v.highest_seq == st["highest_seq"] and backlog[-1] < v.highest_seq  # eviction notices came last
    finally:
        rig.close()


def test_with_the_lane_off_samples_go_oldest_first_as_before(broker: MosquittoBroker, tmp_path: Path) -> None:
    store = Store(tmp_path / "out.sqlite", first_seq=1)
    los = [store.append_samples(cols(t))[0] for t in range(0, 300, SEGMENT_S)]
    acker = Acker(broker)
    up = Uplink(MqttConfig(host=broker.host, port=broker.port, tls=False, batch_max_age_s=0.1, batch_max_bytes=4096,
                           max_inflight_batches=1, ack_timeout_s=2.0, reconnect_min_s=0.1, live_lane_s=0), VEHICLE,
                store)
    up.start()
    try:
        wait_for(lambda: store.status()["backlog_records"] == 0, what="the drain")
        # First arrivals count (a batch sent before the test's peer had subscribed comes again after the timeout).
        first: dict[int, wire.Batch] = {}
        for _, b in acker.batches:
            first.setdefault(b.segments[0].seq_lo, b)
        assert list(first) == los  # oldest first
        # Each states the next segment as where the backfill stands; the last, the number the store gives next.
        assert [first[lo].extra[backfill.KEY] for lo in los] == [*los[1:], los[-1] + SEGMENT_S * RATE_HZ * 2]
    finally:
        up.stop()
        acker.close()
        store.close()


def test_a_segment_stamped_in_the_future_does_not_turn_the_lane_off(rig: Rig) -> None:
    """While connected, one segment is stamped a year ahead (a clock that jumped and was set right) and goes to the
    cloud; then an outage, during which the writer goes on with the right time. The lane follows the segment
    written last, not the largest time: after the outage the newest minute still goes first. (Measured from the
    largest time ever seen, no segment would be within a minute of it, and every outage's backlog would go oldest
    first until the agent restarted.)"""
    rx = rig.start_cloud()
    rig.up.start()
    rig.write(3)
    t = rig.t
    rig.t = t + 365 * 86400
    rig.write(1)
    rig.t = t
    wait_for(rig.drained, what="caught up before the outage, the stray segment with the rest")
    rig.stop_cloud()
    rig.broker.kill()
    wait_for(lambda: not rig.up.connected, what="the vehicle to notice the outage")
    backlog = rig.write(30)
    rig.broker.start()
    rx = rig.start_cloud()
    wait_for(rig.drained, timeout=120, what="the backfill to complete")
    tele = [s.ranges[0][0] for s in rx.stored if s.leaf == "telemetry"]
    assert tele[:7] == backlog[-7:][::-1]  # the newest minute, newest first
    assert list(dict.fromkeys(tele[7:])) == backlog[:-7]  # then the history, oldest first
