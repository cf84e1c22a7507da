"""Past one machine: three `cloud-sync serve` processes on one shared subscription, a real Mosquitto, a real
PostgreSQL; vehicles (real stores and uplinks) stream while one receiver is killed with SIGKILL mid-stream. Every
record every vehicle wrote is in the database exactly once, and no vehicle has anything left to send."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psycopg

from agent.config import MqttConfig, VehicleConfig
from agent.store import Store
from agent.uplink import Uplink
from harvester_common import wire
from harvester_testing.broker import MosquittoBroker
from harvester_testing.cloudproc import start_receiver, stop_receiver, write_config
from harvester_testing.postgres import TempPostgres
from tests.test_uplink import wait_for

VEHICLES = 4
SEGMENTS = 30  # per vehicle
SEGMENT_SAMPLES = 1500


def _cols(n: int, t0_us: int) -> wire.SampleColumns:
    rng = np.random.default_rng(t0_us % 2**32)
    return wire.SampleColumns([("EEC1.EngSpeed", "can0/00", "rpm"), ("ET1.EngCoolantTemp", "can0/00", "degC")],
                              (np.arange(n) % 2).astype(np.uint16), t0_us + np.arange(n, dtype=np.int64) * 10_000,
                              rng.normal(1500, 50, n))


def _receiver(i: int, broker: MosquittoBroker, url: str, tmp: Path) -> subprocess.Popen[str]:
    return start_receiver(write_config(tmp / f"rx{i}.toml", broker, f"rx-{i}", db_url=url, commit_max_messages=20))


def test_three_receivers_one_killed_mid_stream_nothing_lost_nothing_twice(
    broker: MosquittoBroker, pg_server: TempPostgres, tmp_path: Path
) -> None:
    url = pg_server.new_database("scaleout")
    receivers = [_receiver(i, broker, url, tmp_path) for i in range(3)]
    stores, uplinks = [], []
    cfg = MqttConfig(host=broker.host, port=broker.port, tls=False, batch_max_age_s=0.1, batch_max_bytes=8192,
                     ack_timeout_s=2.0, reconnect_min_s=0.1, reconnect_max_s=0.5)
    for v in range(VEHICLES):
        s = Store(tmp_path / f"v{v}.sqlite")
        stores.append(s)
        up = Uplink(cfg, VehicleConfig(fleet="f1", id=f"v{v}"), s, seed=v)
        up.start()
        uplinks.append(up)

    def stored() -> int:
        with psycopg.connect(url) as c:
            return int(c.execute("SELECT count(*) FROM samples").fetchone()[0])  # type: ignore[index]

    def write_all() -> None:
        for k in range(SEGMENTS):
            for v, s in enumerate(stores):
                s.append_samples(_cols(SEGMENT_SAMPLES, (v * 10**6 + k * SEGMENT_SAMPLES) * 10_000))
                if k % 10 == 0:
                    s.append_records([("alert", {"ts": time.time(), "alert_id": f"v{v}-{k}", "state": "open"})])
            time.sleep(0.1)

    writer = threading.Thread(target=write_all)
    writer.start()
    try:
        total = VEHICLES * SEGMENTS * SEGMENT_SAMPLES
        wait_for(lambda: stored() > total // 5, timeout=60, what="the cloud to be part-way through the stream")
        receivers[1].send_signal(signal.SIGKILL)  # mid-stream: messages in its hands are neither stored nor acked
        receivers[1].wait(10)
        at_kill = stored()
        writer.join(120)

        def drained() -> bool:
            return all(s.status()["backlog_records"] == 0 for s in stores)

        wait_for(drained, timeout=120, what="every vehicle's backlog to drain through the two survivors")
        assert at_kill < total, "the kill was not mid-stream"
        with psycopg.connect(url) as c:
            for v, s in enumerate(stores):
                st = s.status()
                n, hi = c.execute("SELECT count(*), max(seq) FROM samples WHERE vehicle=%s",
                                      (f"v{v}",)).fetchone()  # type: ignore[misc]
                assert n == st["records_written"]["samples"] == SEGMENTS * SEGMENT_SAMPLES
                alerts = c.execute("SELECT count(*) FROM alerts WHERE vehicle=%s", (f"v{v}",)).fetchone()
                assert alerts is not None and alerts[0] == st["records_written"]["records"] == SEGMENTS // 10
                assert hi == st["highest_seq"]
            # Exactly once: the primary key makes a second copy impossible; this shows none was even attempted
            # silently (resends are counted as duplicates, not stored).
            dup = c.execute("SELECT count(*) FROM (SELECT vehicle, seq FROM samples GROUP BY vehicle, seq "
                            "HAVING count(*) > 1) d").fetchone()
            assert dup is not None and dup[0] == 0
        from cloud_sync.db_postgres import PostgresDB
        from cloud_sync.reports import Reports

        db = PostgresDB(url)
        try:
            assert all(v.gaps == [] for v in Reports(db).stats())
        finally:
            db.close()
    finally:
        writer.join(120)
        for up in uplinks:
            up.stop()
        for s in stores:
            s.close()
        for p in receivers:
            stop_receiver(p)


def test_database_outage_delays_but_loses_nothing(
    broker: MosquittoBroker, pg_server: TempPostgres, tmp_path: Path
) -> None:
    """PostgreSQL stopped mid-stream and started again: the receiver acks nothing it could not commit, reconnects
    by itself, and the vehicle's resends fill the cloud exactly once."""
    from cloud_sync.config import CloudConfig
    from cloud_sync.db_postgres import PostgresDB
    from cloud_sync.receiver import Receiver
    from cloud_sync.reports import Reports

    url = pg_server.new_database("outage")
    cfg = CloudConfig.model_validate({"mqtt": {"host": broker.host, "port": broker.port, "client_id": "rx-outage"},
                                      "db": {"url": url}})
    db = PostgresDB(url)
    rx = Receiver(cfg, db)
    rx.start()
    store = Store(tmp_path / "v.sqlite")
    up = Uplink(MqttConfig(host=broker.host, port=broker.port, tls=False, batch_max_age_s=0.1, batch_max_bytes=8192,
                           ack_timeout_s=1.0, reconnect_min_s=0.1, reconnect_max_s=0.5),
                VehicleConfig(fleet="f1", id="v1"), store, seed=1)
    up.start()
    try:
        assert rx.connected.wait(10)
        for k in range(10):
            store.append_samples(_cols(1000, k * 1000 * 10_000))
        wait_for(lambda: store.status()["backlog_records"] == 0, timeout=30, what="first part drained")
        pg_server.stop()
        for k in range(10, 20):
            store.append_samples(_cols(1000, k * 1000 * 10_000))
        wait_for(lambda: rx.stats["store_failures"] > 0, timeout=30, what="the receiver to hit the outage")
        assert store.status()["backlog_records"] > 0  # nothing acked while the database was down
        pg_server.start()
        wait_for(lambda: store.status()["backlog_records"] == 0, timeout=60, what="drain after the outage")
        v = Reports(db).stats()[0]
        assert v.records["samples"] == 20_000 == store.status()["records_written"]["samples"]
        assert v.gaps == []
    finally:
        up.stop()
        rx.stop()
        store.close()
        db.close()
