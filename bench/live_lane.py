"""The live lane (issue 15): how soon after a vehicle comes back from a long outage the cloud sees its present.

`live_after_reconnect_s`: a vehicle whose store holds a 2-hour backlog, written while it had no coverage, connects;
seconds from its connection to its newest sample being in the cloud database, with the live lane (the default
`[mqtt] live_lane_s = 60`) and without it (`live_lane_s = 0`: oldest first, what every vehicle did before, where
the newest sample arrives last). The time to drain the whole backlog is measured beside both.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from benchkit import Figure, _big_dbc, figure

SIM_EPOCH = 1_700_000_000.0
BACKLOG_MINUTES = 120
VEHICLE = "v1"


def _one_minute_decoded() -> list[Any]:
    """One minute of the simulator's J1939 traffic (a healthy harvester at harvest duty) through the agent's own
    decoder and store writer, flushed once a second as the running agent flushes: 60 segments' columns."""
    from agent.decode.j1939 import J1939Decoder
    from agent.frames import FrameBatch
    from agent.pipeline import Pipeline
    from agent.signals import SignalRegistry
    from agent.store import Store
    from agent.writer import StoreWriter
    from harvester_common import wire
    from harvester_sim.j1939_tx import J1939Transmitter
    from harvester_sim.physics import Harvester

    frames = list(J1939Transmitter(Harvester(seed=7)).frames_until(60.0))
    with tempfile.TemporaryDirectory() as d:
        reg = SignalRegistry()
        store = Store(Path(d) / "minute.sqlite", 1 << 30)
        writer = StoreWriter(store, reg)
        pipeline = Pipeline(reg, {"can0": J1939Decoder(reg, [_big_dbc()], "can0")}, None, writer)
        writer.resume(pipeline)
        second: list[Any] = []
        for m in frames:
            m.timestamp += SIM_EPOCH
            m.channel = "can0"
            if second and int(m.timestamp) != int(second[0].timestamp):
                pipeline.feed("can0", FrameBatch.from_messages(second, "can0"))
                writer.flush_samples()
                second = []
            second.append(m)
        pipeline.feed("can0", FrameBatch.from_messages(second, "can0"))
        writer.flush_samples()
        rows = store.pending(False, set(), 1 << 40)
        store.close()
    return [wire.decode_columns(json.loads(r.head), r.body) for r in rows]


def _backlog(path: Path) -> dict[str, int]:
    """The vehicle's store after a 2-hour outage: the decoded minute repeated with its clock moved on, a flush a
    second, each written as the store writer writes it (one durable transaction)."""
    import numpy as np

    from agent.store import Store
    from harvester_common import wire

    minute = _one_minute_decoded()
    store = Store(path, 1 << 34)
    for k in range(BACKLOG_MINUTES):
        shift = np.int64(k * 60_000_000)
        for c in minute:
            store.append_samples(wire.SampleColumns(c.signals, c.sig, c.ts_us + shift, c.value))
    st = store.status()
    store.close()
    return {"samples": int(st["records_written"]["samples"]), "rows": int(st["backlog"]["samples"]["rows"]),
            "bytes": int(st["backlog"]["samples"]["bytes"]), "newest_seq": int(st["highest_seq"])}


def _reconnect(store_path: Path, folder: Path, lane_s: float, newest_seq: int) -> dict[str, float]:
    """Mosquitto and the real cloud_sync receiver (SQLite) up; the vehicle's uplink connects with the backlog.
    Seconds from its CONNACK to the newest sample committed in the cloud database, and to the last sample acked."""
    from agent.config import MqttConfig, VehicleConfig
    from agent.store import Store
    from agent.uplink import Uplink
    from cloud_sync.config import CloudConfig
    from cloud_sync.db_sqlite import CloudDB
    from cloud_sync.receiver import Receiver
    from harvester_testing.broker import MosquittoBroker

    broker = MosquittoBroker(workdir=folder / "mosq")
    broker.start()
    cfg = CloudConfig.model_validate({"mqtt": {"host": broker.host, "port": broker.port},
                                      "db": {"path": str(folder / "cloud.sqlite")}, "log": {"level": "ERROR"}})
    db = CloudDB(cfg.db.path)
    rx = Receiver(cfg, db)
    rx.start()
    rx.connected.wait(10)
    reader = sqlite3.connect(f"file:{cfg.db.path}?mode=ro", uri=True)
    store = Store(store_path, 1 << 34)
    written = store.counters()["written_samples"]
    up = Uplink(MqttConfig(host=broker.host, port=broker.port, tls=False, live_lane_s=lane_s),
                VehicleConfig(fleet="bench", id=VEHICLE), store)
    try:
        up.start()
        while not up.connected:
            time.sleep(0.001)
        t0 = time.perf_counter()
        live: float | None = None
        while True:
            now = time.perf_counter() - t0
            if live is None and reader.execute("SELECT 1 FROM samples WHERE vehicle=? AND seq=?",
                                               (VEHICLE, newest_seq)).fetchone():
                live = now
            if store.counters()["acked_samples"] == written:
                drained = now
                break
            time.sleep(0.005)
        if live is None:  # committed between the last two looks: no later than the drain
            live = drained
        batches = up.stats.batches_sent
    finally:
        up.stop()
        store.close()
        reader.close()
        rx.stop()
        db.close()
        broker.close()
    return {"live_s": live, "drain_s": drained, "batches": float(batches)}


@figure("live_after_reconnect_s")
def live_after_reconnect_s() -> Figure:
    """Seconds from a vehicle's reconnection after a 2-hour outage to its newest sample committed in the cloud
    database, with the live lane; baseline: the same backlog sent oldest first (`live_lane_s = 0`, the behaviour
    before the lane), same run. The time to drain the whole backlog is measured beside both."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        built = _backlog(root / "backlog.sqlite")
        runs = {}
        for name, lane_s in (("lane", 60.0), ("oldest_first", 0.0)):
            (root / name).mkdir()
            store = root / name / "vehicle.sqlite"
            shutil.copyfile(root / "backlog.sqlite", store)  # closed cleanly: one file, no WAL beside it
            runs[name] = _reconnect(store, root / name, lane_s, built["newest_seq"])
    ours, base = runs["lane"], runs["oldest_first"]
    rate = built["samples"] / (BACKLOG_MINUTES * 60)
    return Figure(
        ours["live_s"], "s", base["live_s"], ours["live_s"] / base["live_s"],
        f"a {BACKLOG_MINUTES}-minute backlog ({built['samples']:,} samples of the simulator's J1939 traffic decoded "
        f"by the agent, {rate:.0f} samples/s, {built['rows']:,} one-second segments, {built['bytes'] / 1e6:.1f} MB "
        f"in the store) drained to a local Mosquitto and the real cloud_sync receiver (SQLite), default [mqtt] "
        f"batching; from the vehicle's CONNACK to its newest sample committed in the cloud: {ours['live_s']:.2f} s "
        f"with the 60 s live lane, {base['live_s']:.2f} s oldest first; whole backlog acked: {ours['drain_s']:.1f} s "
        f"with the lane, {base['drain_s']:.1f} s without",
        {"drain_s": ours["drain_s"], "baseline_drain_s": base["drain_s"],
         "drain_ratio": ours["drain_s"] / base["drain_s"], "samples": built["samples"], "segments": built["rows"],
         "batches": ours["batches"], "baseline_batches": base["batches"]},
    )
