"""Delivery under failure, on real parts: the vehicle's store and uplink, a real Mosquitto that the tests kill and
restart, and the real cloud_sync receiver. After each ordeal the cloud holds every record the vehicle wrote exactly
once, and only documented, counted evictions are missing."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.config import MqttConfig, VehicleConfig
from agent.store import Store
from agent.uplink import Uplink
from cloud_sync.config import CloudConfig
from cloud_sync.db_sqlite import CloudDB
from cloud_sync.receiver import Receiver
from cloud_sync.reports import Reports
from harvester_common import wire
from harvester_testing.broker import MosquittoBroker
from tests.test_uplink import wait_for

VEHICLE = VehicleConfig(fleet="f1", id="v1")


def cols(n: int, t0: int) -> wire.SampleColumns:
    rng = np.random.default_rng(t0)
    return wire.SampleColumns([("EEC1.EngSpeed", "can0/00", "rpm"), ("ET1.EngCoolantTemp", "can0/00", "degC")],
                              (np.arange(n) % 2).astype(np.uint16), t0 + np.arange(n, dtype=np.int64) * 1000,
                              rng.normal(1500, 50, n))


class Rig:
    def __init__(self, broker: MosquittoBroker, tmp: Path, max_bytes: int = 1 << 30) -> None:
        self.broker = broker
        self.store = Store(tmp / "vehicle.sqlite", max_bytes=max_bytes)
        self.cloud_cfg = CloudConfig.model_validate({
            "mqtt": {"host": broker.host, "port": broker.port, "client_id": "cloud-1"},
            "db": {"path": str(tmp / "cloud.sqlite")}})
        self.db = CloudDB(self.cloud_cfg.db.path)
        self.rx: Receiver | None = None
        cfg = MqttConfig(host=broker.host, port=broker.port, tls=False, batch_max_age_s=0.2, ack_timeout_s=2.0,
                         reconnect_min_s=0.1, reconnect_max_s=0.5)
        self.up = Uplink(cfg, VEHICLE, self.store, seed=3)
        self.t = 0

    def start_cloud(self) -> None:
        self.rx = Receiver(self.cloud_cfg, self.db)
        self.rx.start()
        assert self.rx.connected.wait(10)

    def stop_cloud(self) -> None:
        if self.rx is not None:
            self.rx.stop()
            self.rx = None

    def write(self, segments: int, n: int = 2000, alert_every: int = 0) -> None:
        for i in range(segments):
            self.store.append_samples(cols(n, self.t))
            self.t += n * 1000
            if alert_every and i % alert_every == 0:
                self.store.append_records([("alert", {"ts": self.t / 1e6, "alert_id": f"a{self.t}",
                                                      "state": "open"})])

    def drained(self) -> bool:
        return self.store.status()["backlog_records"] == 0

    def check_exactly_once(self) -> None:
        try:
            wait_for(self.drained, timeout=60, what="the vehicle's backlog to drain")
        except AssertionError:
            rx = self.rx
            raise AssertionError(f"not drained: vehicle {self.store.status()['backlog']}, uplink {self.up.stats}, "
                                 f"cloud connected {rx.connected.is_set() if rx else None}, "
                                 f"cloud stats {dict(rx.stats) if rx else None}") from None
        st = self.store.status()
        v = Reports(self.db).stats()[0]
        assert v.records["samples"] == st["records_written"]["samples"] - st["evicted"]["samples"]
        assert v.records["alerts"] + v.records["events"] == st["records_written"]["records"] - st["evicted"]["records"]
        assert v.gaps == []
        assert v.highest_seq == st["highest_seq"]

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


def test_long_outage_then_recovery(rig: Rig) -> None:
    rig.start_cloud()
    rig.up.start()
    rig.write(5)
    wait_for(rig.drained, what="first drain")
    rig.broker.kill()
    rig.write(150, alert_every=30)  # 300,000 samples while out of coverage
    assert rig.store.status()["backlog_records"] >= 300_000
    rig.broker.start()
    rig.check_exactly_once()


def test_broker_killed_mid_batch(rig: Rig) -> None:
    rig.start_cloud()
    rig.write(100)
    rig.up.start()
    wait_for(lambda: rig.store.status()["acked"]["samples"] > 0, what="drain under way")
    rig.broker.kill()
    time.sleep(0.3)
    rig.broker.start()
    rig.check_exactly_once()


def test_flapping_network(rig: Rig) -> None:
    rig.start_cloud()
    rig.up.start()
    rng = random.Random(1)
    for _ in range(6):
        rig.write(10, alert_every=5)
        time.sleep(rng.uniform(0.05, 0.4))
        rig.broker.kill()
        rig.write(5)
        time.sleep(rng.uniform(0.05, 0.3))
        rig.broker.start()
    rig.check_exactly_once()
    assert rig.up.stats.connects >= 2  # it came back after outages (brief up-windows may pass unnoticed)


def test_cloud_down_while_broker_up_data_waits_on_the_vehicle(rig: Rig) -> None:
    rig.start_cloud()
    rig.stop_cloud()  # its session stays on the broker, its receiver is gone
    rig.up.start()
    rig.write(20, alert_every=5)
    time.sleep(3)  # longer than the ack timeout: batches are resent, never deleted
    st = rig.store.status()
    assert st["backlog_records"] == st["records_written"]["samples"] + st["records_written"]["records"]
    assert rig.up.stats.batches_sent > 0 and rig.up.stats.ack_timeouts > 0
    rig.start_cloud()
    rig.check_exactly_once()
    assert Reports(rig.db).stats()[0].duplicates > 0  # resent batches were stored once, counted as duplicates


def test_segments_written_before_the_wire_upgrade_still_arrive(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store upgraded in place holds segments in the old column layout (ENC_V1, written by the agent before it
    knew ENC_V2); they go out as stored, beside new ENC_V2 ones, and the cloud stores every value bit for bit."""
    rpm = (np.arange(3000) % 700 + 6000).astype(np.float64) * 0.125  # as the J1939 decoder computes EEC1.EngSpeed
    old = wire.SampleColumns([("EEC1.EngSpeed", "can0/00", "rpm")], np.zeros(3000, np.uint16),
                             1_700_000_000_000_000 + np.arange(3000, dtype=np.int64) * 20_000, rpm)
    encode = wire.encode_columns
    with monkeypatch.context() as m:  # the encoder the agent had before ENC_V2: its bytes, exactly
        m.setattr(wire, "encode_columns", lambda c: encode(c, wire.ENC_V1))
        rig.store.append_samples(old)
    new = cols(3000, 1_700_000_060_000_000)
    new.scales = [(0.125, 0.0), None]
    new.value[new.sig == 0] = rpm[:1500]
    rig.store.append_samples(new)
    heads = [json.loads(r.head) for r in rig.store.pending(records=False, exclude=set(), max_bytes=1 << 30)]
    assert [h.get("enc") for h in heads] == [None, wire.ENC_V2]
    assert heads[1]["signals"][0] == ["EEC1.EngSpeed", "can0/00", "rpm", 0.125, 0]  # sent as raw integers
    rig.start_cloud()
    rig.up.start()
    rig.check_exactly_once()
    got = rig.db.read("SELECT s.ts, g.name, s.value FROM samples s JOIN signals g ON g.id = s.signal_id "
                      "ORDER BY s.seq")
    want = [(t / 1e6, c.signals[k][0], v) for c in (old, new)
            for t, k, v in zip(c.ts_us.tolist(), c.sig.tolist(), c.value.tolist(), strict=True)]
    assert len(got) == 6000
    assert [(t, name) for t, name, _ in got] == [(t, name) for t, name, _ in want]
    values = np.array([v for *_, v in got]).view(np.uint64)
    assert np.array_equal(values, np.array([v for *_, v in want]).view(np.uint64))


def test_disk_bound_reached_during_outage(broker: MosquittoBroker, tmp_path: Path) -> None:
    rig = Rig(broker, tmp_path, max_bytes=2 * 1024 * 1024)
    try:
        rig.start_cloud()
        rig.up.start()
        broker.kill()
        rig.write(200, alert_every=10)  # far more than 2 MiB of samples, and 20 alerts
        st = rig.store.status()
        assert st["evicted"]["samples"] > 0 and st["evicted"]["records"] == 0  # alerts kept
        broker.start()
        rig.check_exactly_once()
        v = Reports(rig.db).stats()[0]
        assert v.records["alerts"] == 20
        evicted = sum(hi - lo + 1 for lo, hi in v.evicted)
        assert evicted == st["evicted"]["samples"]  # every eviction explained to the cloud, none a gap
    finally:
        rig.close()


def test_agent_sigkill_mid_batch_in_a_loop(broker: MosquittoBroker, tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text(f"""
[vehicle]
fleet = "f1"
id = "v1"
[[can]]
interface = "virtual"
channel = "killme"
[model]
path = "{Path(__file__).resolve().parents[1] / 'models' / 'harvester-anomaly.int8.onnx'}"
[store]
path = "{tmp_path / 'vehicle.sqlite'}"
flush_interval_s = 0.2
[mqtt]
host = "{broker.host}"
port = {broker.port}
tls = false
batch_max_age_s = 0.2
ack_timeout_s = 2.0
reconnect_min_s = 0.1
reconnect_max_s = 0.5
""")
    cloud_cfg = CloudConfig.model_validate({"mqtt": {"host": broker.host, "port": broker.port},
                                            "db": {"path": str(tmp_path / "cloud.sqlite")}})
    db = CloudDB(cloud_cfg.db.path)
    rx = Receiver(cloud_cfg, db)
    rx.start()
    rng = random.Random(9)
    try:
        for _ in range(6):
            p = subprocess.Popen([sys.executable, "-m", "harvester_testing.agentproc", str(conf), "5"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
            time.sleep(rng.uniform(0.5, 2.0))
            p.send_signal(signal.SIGKILL)
            p.wait(10)
        # One last clean run drains the backlog every killed run left behind.
        p = subprocess.Popen([sys.executable, "-m", "harvester_testing.agentproc", str(conf), "5"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
        time.sleep(1.0)
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        store = Store(tmp_path / "vehicle.sqlite")
        up = Uplink(MqttConfig(host=broker.host, port=broker.port, tls=False, batch_max_age_s=0.1), VehicleConfig(
            fleet="f1", id="v1"), store)
        up.start()
        wait_for(lambda: store.status()["backlog_records"] == 0, timeout=60, what="drain after the kills")
        up.stop()
        st = store.status()
        store.close()
        v = Reports(db).stats()[0]
        assert v.records["samples"] == st["records_written"]["samples"] > 0
        assert v.gaps == [] and v.highest_seq == st["highest_seq"]
    finally:
        rx.stop()
        db.close()
