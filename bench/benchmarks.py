"""Benchmarks. Every figure is measured beside a baseline in the same run, and reported as a ratio too.

    bench/run                      # all figures, as a table
    bench/run --json NAME [NAME…]  # only the named figures, as {"name": {"value", "unit", "baseline", "ratio"}}

Machines here are noisy: compare ratios, not absolute numbers. Record results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchkit import FIGURES, REPO, Figure, _big_dbc, _cpu, _trace_files, figure

# Topic modules register their figures on import (bench/benchkit.py): add a new topic's module here.
TOPICS: tuple[str, ...] = ("ingest", "live_lane", "dtc_storm", "agent_memory", "assistant")


def _baseline_decode(files: list[Path]) -> tuple[int, float]:
    """The naive gateway: python-can LogReader + cantools decode per frame, looked up by PGN, nothing else."""
    import can
    import cantools

    db: Any = cantools.database.load_file(str(_big_dbc()), strict=False)
    by_pgn = {}
    for m in db.messages:
        pgn = (m.frame_id >> 8) & 0x3FFFF
        by_pgn[pgn & 0x3FF00 if ((pgn >> 8) & 0xFF) < 240 else pgn] = m
    n = 0
    t0 = time.perf_counter()
    for f in files:
        for msg in can.LogReader(str(f)):
            pgn = (msg.arbitration_id >> 8) & 0x3FFFF
            m = by_pgn.get(pgn & 0x3FF00 if ((pgn >> 8) & 0xFF) < 240 else pgn)
            if m is not None:
                with contextlib.suppress(Exception):  # the baseline gateway ignores bad frames too
                    m.decode(bytes(msg.data))
            n += 1
    return n, time.perf_counter() - t0


def _pipeline_replay(files: list[Path], store_dir: Path) -> tuple[int, float, float, Any]:
    """The whole on-vehicle pipeline on the same frames, as `harvester-agent replay` runs it (agent.replay: read in
    bulk, decode, features, scoring, store), in this process: imports done, the DBC tables from this process's or
    the disk cache. Returns frames, wall seconds, CPU seconds and the summary (windows formed and scored say what
    scoring really did)."""
    from agent.replay import replay

    model = REPO / "models" / "harvester-anomaly.int8.onnx"
    c0 = _cpu()
    t0 = time.perf_counter()
    out = replay(files, [_big_dbc()], store_dir / "bench.sqlite", model if model.exists() else None)
    dt = time.perf_counter() - t0
    return out["frames"], dt, _cpu() - c0, out


def _ingest_figure(files: list[Path], what: str) -> Figure:
    nb, tb = _baseline_decode(files)
    with tempfile.TemporaryDirectory() as d:
        n, t, cpu, st = _pipeline_replay(files, Path(d))
    ours, base = n / t, nb / tb
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    scored = f"{st['windows_scored']} of {st['windows']} windows scored"
    if st["windows_scored"] == 0:
        scored += " (the model scored NOTHING here: this figure measures decode and store only)"
    return Figure(
        ours,
        "frames/s",
        base,
        ours / base,
        f"{n} frames ({what}); {scored}; replay in this process, start-up excluded (ingest_frames_per_s includes "
        f"it); baseline: LogReader + cantools decode per frame, DBC load excluded; "
        f"pipeline CPU {cpu:.2f} s in {t:.2f} s wall (one core); peak RSS of the process {rss_mb:.0f} MB",
        {"frames": n, "windows": st["windows"], "windows_scored": st["windows_scored"], "alerts": st["alerts"]},
    )


@figure("ingest_frames_per_s_real_traces")
def ingest_frames_per_s_real_traces() -> Figure:
    return _ingest_figure(_trace_files(), "the 44 real John Deere 5055E logs")


def _decoded_trace_samples(files: list[Path]) -> list[tuple[Path, Any, Any, Any, Any]]:
    """(log, registry, ts, sid, value) per log that decodes to anything, by the agent's own decoder, by time."""
    import can
    import numpy as np

    from agent.decode.j1939 import J1939Decoder
    from agent.frames import FrameBatch
    from agent.signals import SignalRegistry

    reg = SignalRegistry()
    dec = J1939Decoder(reg, [_big_dbc()], "can0")
    out = []
    for f in files:
        r = dec.decode(FrameBatch.from_messages(list(can.LogReader(str(f))), "can0")).samples
        if len(r):
            o = np.argsort(r.ts, kind="stable")
            out.append((f, reg, r.ts[o], r.sid[o], r.value[o]))
    return out


def ten_second_batches() -> list[tuple[Path, Any]]:
    """(log, columns) of each 10 s batch of the real traces, as the vehicle's writer makes a segment of them (the
    batches wire_bytes_per_sample sends; bench/wire_breakdown.py takes them apart)."""
    import numpy as np

    from agent.records import SampleArrays
    from agent.writer import SampleBuffer

    out = []
    for f, reg, ts, sid, val in _decoded_trace_samples(_trace_files()):
        edges = np.arange(ts[0], ts[-1] + 10.0, 10.0)
        for a, b in itertools.pairwise(edges):
            sel = (ts >= a) & (ts < b)
            if not sel.any():
                continue
            buf = SampleBuffer(reg)
            buf.add(SampleArrays(ts[sel], sid[sel], val[sel]))
            cols = buf.take()
            assert cols is not None
            out.append((f, cols))
    return out


def _json_lines(cols: Any, vehicle: str = "harvester-0001") -> bytes:
    """A batch as the common gateway writes it: one JSON object per sample, one per line."""
    out = []
    for i in range(len(cols)):
        name, source, unit = cols.signals[int(cols.sig[i])]
        out.append(json.dumps({"vehicle": vehicle, "ts": int(cols.ts_us[i]) / 1e6, "signal": name, "source": source,
                               "unit": unit, "value": float(cols.value[i])}, separators=(",", ":")))
    return ("\n".join(out) + "\n").encode()


def _parquet_zstd(cols: Any) -> bytes:
    """The same batch as a Parquet file with zstd (pyarrow): dictionary-encoded names, typed columns."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = np.array([f"{n}|{s}|{u}" for n, s, u in cols.signals], dtype=object)[cols.sig]
    table = pa.table({"ts_us": pa.array(cols.ts_us), "signal": pa.array(names).dictionary_encode(),
                      "value": pa.array(cols.value)})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", compression_level=3)
    return buf.getvalue()


@figure("wire_bytes_per_sample")
def wire_bytes_per_sample() -> Figure:
    """Real traces, decoded, cut into batches of 10 s (the age bound), encoded by harvester_common.wire as a
    connected uplink sends them in steady state: a signal table goes in full until the cloud has confirmed storing
    it, by reference after (the cloud's side simulated here as the receiver does it: the tables each batch carried
    are stored and confirmed before the next batch, the traces played one after the other as one vehicle);
    baseline: what a user would pick instead for the same batches, zstd-compressed JSON lines at the level our
    small messages use (ZSTD_LEVEL_D1; at zstd's default level 3 beside it); Parquet with zstd (pyarrow) beside
    it. Cold: every batch with its full table (a cloud that holds none)."""
    import numpy as np
    import zstandard

    from harvester_common import wire

    # The baseline at the level our small messages use (the stricter comparison), and at zstd's default beside it.
    zc = zstandard.ZstdCompressor(level=wire.ZSTD_LEVEL_D1)
    zc3 = zstandard.ZstdCompressor(level=3)
    ours = cold = jsonl_zstd = jsonl_zstd3 = jsonl_raw = parquet = n = batches = as_int = full_batches = 0
    ref_bytes = ref_n = 0
    codec1 = vehicle_like = vehicle_like1 = 0
    first_batch: tuple[int, int] | None = None  # (bytes, samples) of the very first batch, necessarily cold
    cloud: dict[str, list[Any]] = {}  # the receiver's (vehicle, digest) -> table, for this one vehicle
    for _, cols in ten_second_batches():
        head, blob = wire.encode_columns(cols)
        # samples whose signal went as raw integers (a 5-element entry in the table), not as float bits
        as_int += int(np.array([len(e) == 5 for e in head["signals"]])[cols.sig].sum())
        seg = wire.Segment("samples", n + 1, n + len(cols), encoded=(head, blob))
        batch = wire.Batch("fleet-1", "harvester-0001", batches, [seg])
        msg = wire.encode_batch(batch, known_tables=cloud)
        full_batches += 1 if batch.tables else 0
        if not batch.tables:
            ref_bytes, ref_n = ref_bytes + len(msg), ref_n + len(cols)
        got = wire.decode_batch(msg, tables=cloud.get)
        cloud.update(got.tables)  # stored and listed in the ack: referenced from the next batch on
        back = got.segments[0].columns
        assert back is not None and np.array_equal(back.value.view(np.uint64), cols.value.view(np.uint64))
        ours += len(msg)
        # The same message as agents before codec 2 sent it (zstd level 3, no dictionary), in this run.
        codec1 += len(wire.encode_batch(wire.Batch("fleet-1", "harvester-0001", batches, [seg]),
                                        known_tables=cloud.keys() - batch.tables.keys(), codec=wire.CODEC_ZSTD))
        # With header values as a vehicle's uplink writes them (the numbers above are small): sequence numbers from
        # the store's microsecond floor, batch ids from a millisecond clock, sent_at, backfill_from.
        lo = 1_764_000_000_000_000 + n + 1
        real_seg = wire.Segment("samples", lo, lo + len(cols) - 1, encoded=(head, blob))
        for codec in (None, wire.CODEC_ZSTD):
            real = wire.Batch("fleet-1", "harvester-0001", 1_764_000_000_123 + 10_000 * batches, [real_seg],
                              1_764_000_000.123456 + 10 * batches, extra={"backfill_from": lo + len(cols)})
            size = len(wire.encode_batch(real, known_tables=cloud.keys() - batch.tables.keys(), codec=codec))
            if codec is None:
                vehicle_like += size
            else:
                vehicle_like1 += size
        cold += len(wire.encode_batch(wire.Batch("fleet-1", "harvester-0001", batches, [seg])))
        if first_batch is None:
            first_batch = (len(msg), len(cols))
        lines = _json_lines(cols)
        jsonl_raw += len(lines)
        jsonl_zstd += len(zc.compress(lines))
        jsonl_zstd3 += len(zc3.compress(lines))
        parquet += len(_parquet_zstd(cols))
        n += len(cols)
        batches += 1
    assert first_batch is not None
    v, base = ours / n, jsonl_zstd / n
    return Figure(v, "bytes/sample", base, v / base,
                  f"{n} decoded samples from the real traces in {batches} batches of 10 s (one segment each, "
                  f"enc {wire.ENC_V2}); {full_batches} batches carried their signal table in full "
                  f"({len(cloud)} distinct tables), the other {batches - full_batches} a reference to one the cloud "
                  f"had confirmed ({ref_bytes / max(ref_n, 1):.3f} B/sample in those alone); "
                  f"{100 * as_int / n:.1f} % of samples sent as raw integers, the rest as float bits; "
                  f"values bit-identical after decoding; cold (every table in full) {cold / n:.3f} B, the first "
                  f"batch {first_batch[0]} bytes for {first_batch[1]} samples; codec {wire.CODEC_ZSTD_D1} (zstd level "
                  f"{wire.ZSTD_LEVEL_D1} with dictionary D1); baseline zstd JSON lines {base:.3f} B at level "
                  f"{wire.ZSTD_LEVEL_D1} ({jsonl_zstd3 / n:.3f} B at level 3: ours = {v / (jsonl_zstd3 / n):.3f} "
                  f"of it); "
                  f"Parquet+zstd {parquet / n:.3f} B (ours = {v / (parquet / n):.3f} of it); uncompressed JSON lines "
                  f"{jsonl_raw / n:.1f} B; as agents before codec 2 sent the same batches (codec 1) {codec1 / n:.4f} B;"
                  f" with a vehicle's header values {vehicle_like / n:.4f} B ({vehicle_like1 / n:.4f} B as codec 1)",
                  {"samples": n, "batches": batches, "full_table_batches": full_batches, "tables": len(cloud),
                   "referenced_bytes_per_sample": ref_bytes / max(ref_n, 1),
                   "cold_bytes_per_sample": cold / n, "first_batch_bytes": first_batch[0],
                   "first_batch_samples": first_batch[1], "parquet_zstd_bytes_per_sample": parquet / n,
                   "ratio_to_parquet_zstd": v / (parquet / n), "json_lines_bytes_per_sample": jsonl_raw / n,
                   "json_lines_zstd3_bytes_per_sample": jsonl_zstd3 / n,
                   "ratio_to_json_lines_zstd3": v / (jsonl_zstd3 / n),
                   "codec1_bytes_per_sample": codec1 / n, "vehicle_header_bytes_per_sample": vehicle_like / n,
                   "vehicle_header_codec1_bytes_per_sample": vehicle_like1 / n,
                   "raw_integer_share": as_int / n})


def _synthetic_cols(n: int, t0_us: int = 1_700_000_000_000_000) -> Any:
    """A segment shaped like a real flush: 8 signals at their J1939 periods, smooth values."""
    import numpy as np

    from harvester_common import wire

    sig = (np.arange(n) % 8).astype(np.uint16)
    ts = t0_us + (np.arange(n) // 8).astype(np.int64) * 20_000
    val = np.round(1500 + 40 * np.sin(np.arange(n) / 500.0) + sig.astype(np.float64) * 10, 3)
    return wire.SampleColumns([(f"SIG{i}.Value", "can0/00", "u") for i in range(8)], sig, ts, val)


@figure("store_samples_per_s")
def store_samples_per_s() -> Figure:
    """Durable (WAL, synchronous=FULL) writes of 20,000-sample flushes; baseline: one row per sample, the same
    durability, one transaction per flush (the usual time-series-in-SQLite layout)."""
    import sqlite3

    from agent.store import Store

    flushes, n = 30, 20_000
    with tempfile.TemporaryDirectory() as d:
        store = Store(Path(d) / "s.sqlite", 1 << 32)
        t0 = time.perf_counter()
        for i in range(flushes):
            store.append_samples(_synthetic_cols(n, 1_700_000_000_000_000 + i * 10**8))
        ours = flushes * n / (time.perf_counter() - t0)
        store.close()
        db = sqlite3.connect(Path(d) / "b.sqlite", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE samples (seq INTEGER PRIMARY KEY, ts REAL, signal TEXT, source TEXT, value REAL)")
        seq = 1
        t0 = time.perf_counter()
        for i in range(flushes):
            c = _synthetic_cols(n, 1_700_000_000_000_000 + i * 10**8)
            names = [c.signals[k][0] for k in c.sig.tolist()]
            rows = zip(range(seq, seq + n), (c.ts_us / 1e6).tolist(), names, ["can0/00"] * n, c.value.tolist(),
                       strict=True)
            db.execute("BEGIN")
            db.executemany("INSERT INTO samples VALUES (?,?,?,?,?)", rows)
            db.execute("COMMIT")
            seq += n
        base = flushes * n / (time.perf_counter() - t0)
        db.close()
    return Figure(ours, "samples/s", base, ours / base,
                  "600,000 samples in 20,000-sample flushes, WAL + synchronous=FULL; baseline one row per sample")


class _Cloud:
    """Mosquitto + the real cloud_sync receiver, for delivery benchmarks."""

    def __init__(self, folder: Path) -> None:
        from cloud_sync.config import CloudConfig
        from cloud_sync.db_sqlite import CloudDB
        from cloud_sync.receiver import Receiver
        from harvester_testing.broker import MosquittoBroker

        self.broker = MosquittoBroker(workdir=folder / "mosq")
        self.broker.start()
        cfg = CloudConfig.model_validate({"mqtt": {"host": self.broker.host, "port": self.broker.port},
                                          "db": {"path": str(folder / "cloud.sqlite")}, "log": {"level": "ERROR"}})
        self.db = CloudDB(cfg.db.path)
        self.rx = Receiver(cfg, self.db)
        self.rx.start()
        self.rx.connected.wait(10)

    def close(self) -> None:
        self.rx.stop()
        self.db.close()
        self.broker.close()


def _mqtt_client(broker: Any, cid: str) -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


@figure("drain_samples_per_s")
def drain_samples_per_s() -> Figure:
    """A backlog of 1,000,000 samples (an outage's worth) drained to a local broker and acknowledged end to end
    by cloud_sync after its commit; baseline: a batched publisher a user would write instead, the same samples as
    zstd-compressed JSON lines in 20,000-sample messages at QoS 1, timed from the first compression to the last
    PUBACK (the broker's, not a database's: the baseline stores nothing and gets no end-to-end ack)."""
    import zstandard

    from agent.config import MqttConfig, VehicleConfig
    from agent.store import Store
    from agent.uplink import Uplink

    n_seg, n = 50, 20_000
    with tempfile.TemporaryDirectory() as d:
        cloud = _Cloud(Path(d))
        store = Store(Path(d) / "v.sqlite", 1 << 32)
        for i in range(n_seg):
            store.append_samples(_synthetic_cols(n, 1_700_000_000_000_000 + i * 10**8))
        up = Uplink(MqttConfig(host=cloud.broker.host, port=cloud.broker.port, tls=False, batch_max_bytes=1 << 20,
                               max_inflight_batches=8), VehicleConfig(fleet="bench", id="v1"), store)
        t0 = time.perf_counter()
        up.start()
        while store.status()["backlog_records"] > 0:
            time.sleep(0.01)
        ours = n_seg * n / (time.perf_counter() - t0)
        up.stop()
        store.close()
        # The baseline's JSON text is made before the clock starts, as a buffering gateway would have it on disk.
        bodies = [_json_lines(_synthetic_cols(n, 1_700_000_000_000_000 + i * 10**8), "v1") for i in range(n_seg)]
        c = _mqtt_client(cloud.broker, "gateway")
        zc = zstandard.ZstdCompressor(level=3)
        t0 = time.perf_counter()
        infos = [c.publish("gateway/v1/samples", zc.compress(b), qos=1) for b in bodies]
        for info in infos:
            info.wait_for_publish(60)
        base = n_seg * n / (time.perf_counter() - t0)
        c.loop_stop()
        c.disconnect()
        cloud.close()
    return Figure(ours, "samples/s", base, ours / base,
                  "1,000,000 samples acked end to end after cloud commit; baseline the same samples as zstd JSON "
                  "lines, 20,000 a message, QoS 1, broker PUBACK only",
                  {"samples": n_seg * n})


def _bench_batches(n_batches: int, n_vehicles: int, samples_per_batch: int) -> list[tuple[str, bytes]]:
    """Encoded telemetry batches as vehicles send them: (topic, payload), vehicles interleaved."""
    from harvester_common import wire

    out, seq = [], {v: 1 for v in range(n_vehicles)}
    for i in range(n_batches):
        v = i % n_vehicles
        c = _synthetic_cols(samples_per_batch, 1_700_000_000_000_000 + i * 10**9)
        seg = wire.Segment("samples", seq[v], seq[v] + len(c) - 1, columns=c)
        seq[v] += len(c)
        out.append((wire.vehicle_topic("bench", f"v{v}", "telemetry"),
                    wire.encode_batch(wire.Batch("bench", f"v{v}", i, [seg]))))
    return out


def _receivers_ingest(n_receivers: int, batches: list[tuple[str, bytes]], samples: int, folder: Path,
                      db_url: str = "") -> float:
    """Samples/s through `n_receivers` cloud-sync processes sharing one subscription: from the first publish to
    the last end-to-end ack (each sent after the receiver's commit)."""
    import threading

    from harvester_testing.broker import MosquittoBroker
    from harvester_testing.cloudproc import start_receiver, stop_receiver, write_config

    broker = MosquittoBroker(workdir=folder / f"mosq{n_receivers}")
    broker.start()
    procs = [start_receiver(write_config(folder / f"rx{n_receivers}-{i}.toml", broker, f"rx-{i}", db_url=db_url,
                                         db_path=str(folder / f"cloud{n_receivers}.sqlite")))
             for i in range(n_receivers)]
    acks = 0
    done = threading.Event()

    def on_ack(*_: Any) -> None:
        nonlocal acks
        acks += 1
        if acks >= len(batches):
            done.set()

    c = _mqtt_client(broker, "bench-fleet")
    c.on_message = on_ack
    c.subscribe("fleet/bench/vehicle/+/ack", qos=1)
    time.sleep(0.5)  # the subscription is in place before the first ack can come
    t0 = time.perf_counter()
    for topic, payload in batches:
        c.publish(topic, payload, qos=1)
    if not done.wait(600):
        raise RuntimeError(f"only {acks}/{len(batches)} batches acknowledged")
    rate = samples / (time.perf_counter() - t0)
    c.loop_stop()
    c.disconnect()
    for p in procs:
        stop_receiver(p)
    broker.close()
    return rate


def _insert_rows_baseline(batches: list[tuple[str, bytes]], insert: Callable[[list[tuple[Any, ...]]], None]) -> float:
    """The plain way: decode, then one parameterised INSERT per sample (executemany), a transaction per batch."""
    from harvester_common import wire

    n = 0
    t0 = time.perf_counter()
    for _, payload in batches:
        b = wire.decode_batch(payload)
        for seg in b.segments:
            c = seg.columns
            assert c is not None
            rows = list(zip([b.vehicle] * len(c), range(seg.seq_lo, seg.seq_hi + 1), (c.ts_us / 1e6).tolist(),
                            c.sig.tolist(), c.value.tolist(), strict=True))
            insert(rows)
            n += len(rows)
    return n / (time.perf_counter() - t0)


@figure("cloud_ingest_samples_per_s_sqlite")
def cloud_ingest_samples_per_s_sqlite() -> Figure:
    """One cloud-sync receiver into SQLite, end to end (broker, decode, dedup insert, commit, ack); baseline: the
    same rows inserted with executemany, one transaction per batch, no broker, no decode."""
    import sqlite3

    batches = _bench_batches(40, 8, 20_000)
    with tempfile.TemporaryDirectory() as d:
        ours = _receivers_ingest(1, batches, 40 * 20_000, Path(d))
        db = sqlite3.connect(Path(d) / "b.sqlite", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE samples (vehicle TEXT, seq INTEGER, ts REAL, signal_id INTEGER, value REAL, "
                   "PRIMARY KEY (vehicle, seq)) WITHOUT ROWID")

        def insert(rows: list[tuple[Any, ...]]) -> None:
            db.execute("BEGIN")
            db.executemany("INSERT OR IGNORE INTO samples VALUES (?,?,?,?,?)", rows)
            db.execute("COMMIT")

        base = _insert_rows_baseline(batches[:10], insert)
        db.close()
    return Figure(ours, "samples/s", base, ours / base,
                  "800,000 samples in 40 batches from 8 vehicles, end to end; baseline executemany rows, no broker")


@figure("cloud_ingest_samples_per_s_postgres")
def cloud_ingest_samples_per_s_postgres() -> Figure:
    """One receiver into PostgreSQL (binary COPY into a temp table, INSERT ... ON CONFLICT DO NOTHING), end to
    end; baseline: psycopg executemany of one INSERT per sample, a transaction per batch, no broker."""
    import psycopg

    from harvester_testing.postgres import TempPostgres, unavailable

    why = unavailable()
    if why:
        raise RuntimeError(f"needs PostgreSQL: {why}")
    batches = _bench_batches(40, 8, 20_000)
    with tempfile.TemporaryDirectory() as d, TempPostgres() as pg:
        ours = _receivers_ingest(1, batches, 40 * 20_000, Path(d), pg.new_database("ours"))
        with psycopg.connect(pg.new_database("base"), autocommit=True) as conn:
            conn.execute("CREATE TABLE samples (vehicle TEXT, seq BIGINT, ts DOUBLE PRECISION, signal_id INTEGER, "
                         "value DOUBLE PRECISION, PRIMARY KEY (vehicle, seq))")

            def insert(rows: list[tuple[Any, ...]]) -> None:
                with conn.transaction(), conn.cursor() as cur:
                    cur.executemany("INSERT INTO samples VALUES (%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING", rows)

            base = _insert_rows_baseline(batches[:4], insert)
    return Figure(ours, "samples/s", base, ours / base,
                  "800,000 samples in 40 batches from 8 vehicles, end to end; baseline executemany rows, no broker")


@figure("cloud_scaleout_ratio_2")
def cloud_scaleout_ratio_2() -> Figure:
    """Two receiver processes sharing the subscription vs one, into PostgreSQL, end to end; on this 2-core machine
    the broker, PostgreSQL and the publisher share the cores with the receivers."""
    from harvester_testing.postgres import TempPostgres, unavailable

    why = unavailable()
    if why:
        raise RuntimeError(f"needs PostgreSQL: {why}")
    batches = _bench_batches(60, 16, 20_000)
    n = 60 * 20_000
    runs: dict[int, list[float]] = {1: [], 2: []}
    # A fresh server for every run: a run right after another competes with that one's checkpoint and
    # autovacuum. Interleaved and best of two, as the machine is shared and noisy.
    for receivers in (1, 2, 1, 2):
        with tempfile.TemporaryDirectory() as d, TempPostgres() as pg:
            runs[receivers].append(_receivers_ingest(receivers, batches, n, Path(d), pg.new_database("x")))
    one, two = max(runs[1]), max(runs[2])
    return Figure(two / one, "x", 1.0, two / one,
                  f"1,200,000 samples from 16 vehicles: one receiver {one:,.0f}/s, two {two:,.0f}/s (PostgreSQL)")


EXPORT_VEHICLES = 4
EXPORT_SAMPLES = 2_000_000
EXPORT_DAYS = 3
EXPORT_CHUNK = 20_000  # samples per stored segment, as a busy vehicle's flushes arrive
# The baseline: what a data scientist writes without our command. The same rows with the signal join, the same
# UTC day, the same partitioning and compression, so both datasets hold the same content.
_PANDAS_EXPORT = """
import json, sys, time, warnings
import pandas as pd
kind, where, out = sys.argv[1:4]
if kind == "sqlite":
    import sqlite3
    conn = sqlite3.connect(where)
else:
    import psycopg
    conn = psycopg.connect(where)
    warnings.simplefilter("ignore", UserWarning)  # pandas: "only supports SQLAlchemy connectable": it works
t0 = time.perf_counter()
df = pd.read_sql("SELECT s.vehicle, s.seq, s.ts, g.name AS signal, g.source, g.unit, s.value FROM samples s "
                 "JOIN signals g ON g.id = s.signal_id ORDER BY s.vehicle, s.seq", conn)
df["day"] = pd.to_datetime(df["ts"], unit="s").dt.strftime("%Y-%m-%d")
df.to_parquet(out, partition_cols=["vehicle", "day"], compression="zstd", index=False)
print(json.dumps({"seconds": time.perf_counter() - t0, "rows": len(df)}))
"""
_OUR_EXPORT = """
import io, json, sys, time
from pathlib import Path
from cloud_sync.database import open_db
from cloud_sync.export import Selection, export
kind, where, out = sys.argv[1:4]
db = open_db(where if kind == "postgres" else "", Path(where))
t0 = time.perf_counter()
r = export(db, Path(out), Selection(), notes=io.StringIO())
print(json.dumps({"seconds": time.perf_counter() - t0, "rows": r.rows["samples"]}))
"""


def _export_fill(db: Any) -> None:
    """EXPORT_SAMPLES samples of 8 signals from EXPORT_VEHICLES vehicles over EXPORT_DAYS days, stored by the
    backend's own bulk insert in segments of EXPORT_CHUNK, as ingest stores them."""
    import numpy as np

    per = EXPORT_SAMPLES // EXPORT_VEHICLES
    step_us = EXPORT_DAYS * 86_400 * 1_000_000 * 8 // per  # each signal's period: the samples span the days
    with db._transaction() as cur:
        ids = np.array([db._signal_id(cur, (f"SIG{k}.Value", "can0/00", "u")) for k in range(8)], np.int64)
        for v in range(EXPORT_VEHICLES):
            db._touch(cur, "bench", f"harvester-{v:02d}", time.time())
            for lo in range(0, per, EXPORT_CHUNK):
                c = _synthetic_cols(EXPORT_CHUNK)  # its signals and values; the times span EXPORT_DAYS
                ts = (1_790_035_200_000_000 + (lo + np.arange(EXPORT_CHUNK)) // 8 * step_us) / 1e6
                db._insert_samples(cur, f"harvester-{v:02d}", lo + 1, ts, ids[c.sig], c.value)
    db._signal_ids.update(db._new_signal_ids)


def _child(code: str, *argv: str) -> tuple[dict[str, Any], float]:
    """Run `code` in a fresh interpreter; its JSON line and its peak RSS in MB (the child's own ru_maxrss)."""
    import subprocess

    with tempfile.TemporaryFile() as err:  # a file, not a pipe: the child never blocks on a full stderr
        p = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, stderr=err,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        out = p.stdout.read() if p.stdout else b""
        _, status, usage = os.wait4(p.pid, 0)  # not p.wait(): wait4 gives this child's own peak RSS
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"export child failed: {err.read().decode()[-2000:]}")
    return json.loads(out.decode().strip().splitlines()[-1]), usage.ru_maxrss / 1024


def _export_pair(kind: str, where: str, folder: Path) -> dict[str, float]:
    """Ours and the pandas baseline on one database, interleaved, best of two each (the machine is shared)."""
    import shutil

    best: dict[str, float] = {"ours": 0.0, "base": 0.0, "ours_rss_mb": 0.0, "base_rss_mb": 0.0}
    for run in range(2):
        for name, code in (("ours", _OUR_EXPORT), ("base", _PANDAS_EXPORT)):
            out = folder / f"{kind}-{name}-{run}"
            res, rss = _child(code, kind, where, str(out))
            if res["rows"] != EXPORT_SAMPLES:
                raise RuntimeError(f"{name} exported {res['rows']} of {EXPORT_SAMPLES} samples")
            best[name] = max(best[name], res["rows"] / res["seconds"])
            best[f"{name}_rss_mb"] = max(best[f"{name}_rss_mb"], rss)
            best[f"{name}_mb"] = sum(f.stat().st_size for f in out.rglob("*.parquet")) / 1e6
            shutil.rmtree(out)
    return best


@figure("export_samples_per_s")
def export_samples_per_s() -> Figure:
    """`cloud-sync export` of 2,000,000 samples (4 vehicles, 3 days, 8 signals) into the Parquet dataset, from
    SQLite (the value) and from PostgreSQL (in the note and the extra keys), each in a fresh process; baseline:
    pandas `read_sql` of the same rows with the signal join + `DataFrame.to_parquet` partitioned by vehicle and
    day, same compression, in the same run. Peak RSS of each process beside it."""
    from cloud_sync.db_sqlite import CloudDB
    from harvester_testing.postgres import TempPostgres, unavailable

    why = unavailable()
    if why:
        raise RuntimeError(f"needs PostgreSQL: {why}")
    with tempfile.TemporaryDirectory() as d, TempPostgres() as pg:
        folder = Path(d)
        db = CloudDB(folder / "cloud.sqlite")
        _export_fill(db)
        db.close()
        lite = _export_pair("sqlite", str(folder / "cloud.sqlite"), folder)
        from cloud_sync.db_postgres import PostgresDB

        url = pg.new_database("export")
        pdb = PostgresDB(url)
        _export_fill(pdb)
        with pdb._transaction() as cur:
            cur.execute("ANALYZE samples")  # as autovacuum would have by now: fresh statistics for the planner
        pdb.close()
        post = _export_pair("postgres", url, folder)
    note = (f"2,000,000 samples, 4 vehicles x 3 days; SQLite {lite['ours']:,.0f}/s vs pandas {lite['base']:,.0f}/s, "
            f"PostgreSQL {post['ours']:,.0f}/s vs pandas {post['base']:,.0f}/s "
            f"({post['ours'] / post['base']:.2f}x); peak RSS ours {lite['ours_rss_mb']:.0f}/"
            f"{post['ours_rss_mb']:.0f} MB, pandas {lite['base_rss_mb']:.0f}/{post['base_rss_mb']:.0f} MB "
            f"(SQLite/PostgreSQL); dataset {lite['ours_mb']:.1f} MB vs pandas' {lite['base_mb']:.1f} MB")
    return Figure(lite["ours"], "samples/s", lite["base"], lite["ours"] / lite["base"], note, {
        "postgres": post["ours"], "postgres_baseline": post["base"], "postgres_ratio": post["ours"] / post["base"],
        "rss_mb": {"sqlite": lite["ours_rss_mb"], "postgres": post["ours_rss_mb"]},
        "baseline_rss_mb": {"sqlite": lite["base_rss_mb"], "postgres": post["base_rss_mb"]},
        "dataset_mb": lite["ours_mb"], "baseline_dataset_mb": lite["base_mb"]})


_MODEL_RUNS: list[Any] = []


def _model_runs() -> list[Any]:
    """Held-out simulator runs (seeds the build never used): every fault and healthy, 20 minutes each."""
    if not _MODEL_RUNS:
        from harvester_sim import DUTY_CYCLES, FAULTS
        from models.dataset import RunSpec, simulate_run

        for i in range(25):
            fault = (None, *FAULTS)[i % 5]
            _MODEL_RUNS.append(simulate_run(RunSpec(
                seed=900_000 + i, fault=fault, duty=DUTY_CYCLES[i % len(DUTY_CYCLES)], ambient_c=8.0 + (i * 1.3) % 32,
                duration_s=1200.0, onset_s=200.0 if fault else 0.0, ramp_s=300.0 if fault else 1.0)))
    return _MODEL_RUNS


def _models() -> tuple[Path, Path]:
    fp32, int8 = REPO / "models" / "harvester-anomaly.onnx", REPO / "models" / "harvester-anomaly.int8.onnx"
    if not (fp32.exists() and int8.exists()):
        raise RuntimeError("the shipped models are missing: python -m models.build")
    return fp32, int8


def _model_rss_mb(path: Path) -> float:
    """Resident memory a model adds once onnxruntime is imported, in a fresh process (in this one, the second
    model would reuse the first one's allocations)."""
    import subprocess

    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import onnxruntime, numpy\n"
            "from agent.scoring import Scorer\n"
            "def rss():\n"
            "    return int([l for l in open('/proc/self/status') if l.startswith('VmRSS:')][0].split()[1])\n"
            f"a = rss(); s = Scorer.load(__import__('pathlib').Path({str(path)!r})); s.score(numpy.zeros((64, len("
            "s.contract.features)))); print((rss() - a) / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


@figure("score_us_per_window")
def score_us_per_window() -> Figure:
    """int8 scoring latency per window, one window per call as on the vehicle (normalise, onnxruntime, checks);
    baseline: the fp32 model, same session options, same windows, same run. Notes give batched throughput, load
    time and RSS added by loading the model, and what scoring costs at 50,000 frames/s."""
    import numpy as np

    from agent.scoring import Scorer

    fp32, int8 = _models()
    x = np.vstack([r.x for r in _model_runs()])
    out: dict[str, dict[str, float]] = {}
    for name, path in (("fp32", fp32), ("int8", int8)):
        t0 = time.perf_counter()
        sc = Scorer.load(path, batch=64)
        load_ms = (time.perf_counter() - t0) * 1e3
        rss = _model_rss_mb(path)
        sc.score(x[:64])
        best_single = best_batched = float("inf")
        for _ in range(3):  # best of three: the machine is shared
            t0 = time.perf_counter()
            for row in x[:500]:
                sc.score(row[None, :])
            best_single = min(best_single, (time.perf_counter() - t0) / 500)
            t0 = time.perf_counter()
            sc.score(x)
            best_batched = min(best_batched, (time.perf_counter() - t0) / len(x))
        out[name] = {"single_us": best_single * 1e6, "batched_us": best_batched * 1e6, "load_ms": load_ms,
                     "rss_mb": rss}
    i8, f32 = out["int8"], out["fp32"]
    # One window per hop (5 s) per model whatever the frame rate: the cost at 50,000 frames/s is the same as at
    # 1,500; compare it with what decoding 50,000 frames/s costs (ingest_frames_per_s).
    share = i8["single_us"] / 5e6 * 100
    # The network itself is ~1 µs a window (batched); a single call is mostly onnxruntime's per-call overhead and
    # our normalisation and checks, the same for both models.
    return Figure(i8["single_us"], "µs/window", f32["single_us"], i8["single_us"] / f32["single_us"],
                  f"batched by 64: int8 {i8['batched_us']:.1f} vs fp32 {f32['batched_us']:.1f} µs/window; "
                  f"load int8 {i8['load_ms']:.0f} ms vs fp32 {f32['load_ms']:.0f} ms; RSS added int8 "
                  f"{i8['rss_mb']:.1f} MB vs fp32 {f32['rss_mb']:.1f} MB; one window per 5 s hop = "
                  f"{share:.4f} % of a core at any frame rate")


@figure("model_int8_size_ratio")
def model_int8_size_ratio() -> Figure:
    """Size of the shipped int8 model over the fp32 one (target <= 0.35); baseline: the target."""
    fp32, int8 = _models()
    r = int8.stat().st_size / fp32.stat().st_size
    return Figure(r, "int8/fp32", 0.35, r / 0.35,
                  f"{int8.stat().st_size:,} vs {fp32.stat().st_size:,} bytes; baseline is the 0.35 target")


@figure("model_auc_loss_int8")
def model_auc_loss_int8() -> Figure:
    """ROC-AUC (fault vs healthy windows) of fp32 minus int8, on 25 held-out runs the build never saw (target
    <= 0.005); baseline: the fp32 ROC-AUC itself."""
    from models.build import POLICY, evaluate, int8_agreement, run_scores

    fp32, int8 = _models()
    runs = _model_runs()
    s32, s8 = run_scores(fp32, runs), run_scores(int8, runs)
    e32, e8 = evaluate(runs, s32, POLICY), evaluate(runs, s8, POLICY)
    q = int8_agreement(s32, s8, POLICY.threshold)
    loss = e32["roc_auc"] - e8["roc_auc"]
    return Figure(loss, "ROC-AUC", e32["roc_auc"], loss / e32["roc_auc"],
                  f"ROC-AUC fp32 {e32['roc_auc']:.4f}, int8 {e8['roc_auc']:.4f} on {q['windows']} windows; "
                  f"p99 |score diff| {q['p99_abs_score_diff']:.4f}; alert decisions agree on "
                  f"{q['alert_decision_agreement']:.4f}")


@figure("alert_latency_p99_ms")
def alert_latency_p99_ms() -> Figure:
    """From an alert written to the vehicle's store (the window's close) to cloud_sync's acknowledgement, which it
    sends only after the alert is committed in the cloud database, over 300 alerts with samples flowing;
    baseline: p99 of a bare MQTT QoS 1 round trip (publish, a subscriber echoes) on the same broker."""
    import threading

    import numpy as np

    from agent.config import MqttConfig, VehicleConfig
    from agent.store import Store
    from agent.uplink import Uplink
    from harvester_common import wire

    with tempfile.TemporaryDirectory() as d:
        cloud = _Cloud(Path(d))
        store = Store(Path(d) / "v.sqlite", 1 << 32)
        up = Uplink(MqttConfig(host=cloud.broker.host, port=cloud.broker.port, tls=False, batch_max_age_s=1.0),
                    VehicleConfig(fleet="bench", id="v1"), store)
        up.start()
        acked: dict[int, float] = {}
        lock = threading.Lock()
        watcher = _mqtt_client(cloud.broker, "watch")

        def on_ack(c: Any, u: Any, msg: Any) -> None:
            now = time.perf_counter()
            ack = wire.decode_ack(bytes(msg.payload))
            with lock:
                for lo, hi in ack.ranges:
                    for q in range(lo, hi + 1) if hi - lo < 10 else ():
                        acked.setdefault(q, now)

        watcher.on_message = on_ack
        watcher.subscribe("fleet/bench/vehicle/v1/ack", qos=1)
        time.sleep(0.5)
        written: dict[int, float] = {}
        for i in range(300):
            if i % 10 == 0:
                store.append_samples(_synthetic_cols(2000, 1_700_000_000_000_000 + i * 10**8))
            (seq,) = store.append_records([("alert", {"ts": float(i), "alert_id": str(i), "state": "open"})])
            written[seq] = time.perf_counter()
            time.sleep(0.02)
        end = time.monotonic() + 15
        while time.monotonic() < end and len([q for q in written if q in acked]) < len(written):
            time.sleep(0.05)
        # Every alert counts: one not acked within 15 s counts as infinitely late, so it cannot flatter the p99.
        lat = np.array([(acked[q] - t) * 1000 if q in acked else np.inf for q, t in written.items()])
        late = int(np.isinf(lat).sum())
        ours = float(np.percentile(lat, 99, method="higher"))
        up.stop()
        store.close()
        rtt: list[float] = []
        echo = _mqtt_client(cloud.broker, "echo")
        echo.on_message = lambda c, u, m: c.publish("rtt/back", m.payload, qos=1)
        echo.subscribe("rtt/go", qos=1)
        got = threading.Event()
        watcher.on_message = lambda c, u, m: got.set()
        watcher.subscribe("rtt/back", qos=1)
        time.sleep(0.3)
        for i in range(300):
            got.clear()
            t0 = time.perf_counter()
            watcher.publish("rtt/go", str(i), qos=1)
            if got.wait(5):
                rtt.append((time.perf_counter() - t0) * 1000)
        base = float(np.percentile(rtt, 99))
        for c in (watcher, echo):
            c.loop_stop()
            c.disconnect()
        cloud.close()
    return Figure(ours, "ms", base, ours / base,
                  f"over all {len(lat)} alerts, {late} not acked within 15 s (counted as infinite); ack sent after "
                  f"cloud commit; baseline bare QoS 1 round trip p99",
                  {"alerts": len(lat), "not_acked_in_15s": late})


@figure("ingest_cpu_percent_at_1500fps")
def ingest_cpu_percent_at_1500fps() -> Figure:
    """A live virtual bus carrying the simulator's J1939 traffic sped up to 1,500 frames/s for 45 s (timestamps
    preserved, so the agent's windows close at the data's pace and the model scores them), consumed by the whole
    agent (all its threads: source, pipeline with the model, store, uplink) in a child process; the consumer's
    CPU is the process's minus the sender thread's own. Baseline: the naive gateway (recv + cantools decode per
    frame) in the same harness. Both run with the allocator settings of the agent's systemd unit (jemalloc where
    libjemalloc2 is installed), as a vehicle runs the agent."""
    import subprocess

    from agent import allocator
    from tests.vehicle import unit_environment

    env = os.environ | {k: v for k, v in unit_environment().items()
                        if k in ("LD_PRELOAD", "MALLOC_CONF", "MALLOC_ARENA_MAX")}

    def run(mode: str) -> dict[str, Any]:
        out = subprocess.run([sys.executable, str(REPO / "bench" / "live_cpu.py"), mode, "1500", "45"],
                             capture_output=True, text=True, timeout=300, check=True, env=env).stdout
        r: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return r

    ours, base = run("agent"), run("naive")
    scored = f"{ours['windows_scored']} of {ours['windows']} windows scored"
    if not ours["windows_scored"]:
        scored += " (the model scored NOTHING in this run)"
    return Figure(ours["cpu_percent"], "% of one core", base["cpu_percent"], ours["cpu_percent"] / base["cpu_percent"],
                  f"{ours['sent']} frames at 1,500 frames/s (the simulator at {ours['speed']:.1f}x); the agent "
                  f"decodes, windows, scores and stores: {scored}",
                  {"frames": ours["sent"], "windows": ours["windows"], "windows_scored": ours["windows_scored"],
                   "allocator": ours.get("allocator", "unknown"), "naive_allocator": base.get("allocator", "unknown"),
                   "asked_allocator": allocator.asked(env.get("LD_PRELOAD", "")) or allocator.GLIBC})


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    return obj


FLEET_VEHICLES = 10
FLEET_SEGMENT = 10_000  # samples per received segment, a few seconds of a busy bus
FLEET_GAP_EVERY = 100  # one segment in 100 never arrived (its samples are stored; its range is not)


def _fleet_db(path: Path, n_samples: int, prefix: str = "harvester") -> float:
    """A cloud database as `cloud-sync serve` would have left it after storing `n_samples` samples from 10
    vehicles, filled straight into SQLite (generated rows, not through the wire): the current schema and its
    indexes, received ranges as ingest merges them (with a gap every FLEET_GAP_EVERY segments), the per-vehicle
    counts ingest keeps, 20 alerts and 5
    events per vehicle, a status each; vehicles `{prefix}-00`... Returns the seconds the fill took."""
    import sqlite3

    from cloud_sync.db_sqlite import CloudDB
    from harvester_common import wire
    from harvester_common.seqranges import merge_ranges

    t0 = time.perf_counter()
    db = CloudDB(path)  # the schema, at the current version
    per = n_samples // FLEET_VEHICLES
    for i in range(FLEET_VEHICLES):
        v = f"{prefix}-{i:02d}"
        alerts = [wire.Segment("alert", per + 1 + k, per + 1 + k, record={
            "alert_id": f"a{k // 2}", "state": "open" if k % 2 == 0 else "closed", "ts": 1.79e9 + k * 600,
            "score": 0.9, "model": "harvester-anomaly", "model_version": "1.0.0", "label": "coolant_leak"})
            for k in range(20)]
        events = [wire.Segment("event", per + 21 + k, per + 21 + k, record={"kind": "dtc_open", "ts": 1.79e9,
                                                                           "data": {"spn": k}}) for k in range(5)]
        db.ingest([wire.Batch("f1", v, 1, alerts + events)])
        db.set_status("f1", v, {"state": "online", "model_version": "1.0.0", "backlog": {"samples": 0, "records": 0},
                                "budget": {"used_today": 1048576, "daily_bytes": 50 * 1048576}})
    db.close()
    con = sqlite3.connect(path, isolation_level=None)
    # Bulk load as a restore would: no journal, the plot index built once at the end (same schema as ingest makes).
    con.execute("PRAGMA journal_mode=DELETE")
    con.execute("PRAGMA synchronous=OFF")
    con.execute("PRAGMA cache_size=-1000000")
    con.execute("BEGIN")
    con.execute("DROP INDEX samples_by_signal_time")
    con.executemany("INSERT INTO signals (id, name, source, unit) VALUES (?,?,?,?)",
                    [(k, f"MSG{k}.Signal{k}", "can0/00", "") for k in range(1, 65)])
    for i in range(FLEET_VEHICLES):
        v = f"{prefix}-{i:02d}"
        con.execute(
            "INSERT INTO samples SELECT ?, x, 1.79e9 + x * 0.01, x % 64 + 1, (x % 1000) * 0.1 FROM "
            "(WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?) SELECT x FROM c)",
            (v, per))
        # The received segments, merged as ingest merges them (one row per stretch without a hole): a gap every
        # FLEET_GAP_EVERY segments, so the gap report has something to find.
        segs = [(lo, min(lo + FLEET_SEGMENT - 1, per)) for lo in range(1, per + 1, FLEET_SEGMENT)]
        kept = [r for k, r in enumerate(segs) if k % FLEET_GAP_EVERY != FLEET_GAP_EVERY - 1] or segs
        con.executemany("INSERT INTO ranges VALUES (?,?,?,'merged')", [(v, lo, hi) for lo, hi in merge_ranges(kept)])
        con.execute("INSERT INTO counters VALUES (?, 'stored:samples', ?)", (v, per))
    con.execute("CREATE INDEX samples_by_signal_time ON samples (vehicle, signal_id, ts)")
    con.execute("COMMIT")
    con.execute("PRAGMA journal_mode=WAL")
    con.close()
    return time.perf_counter() - t0


def _fleet_api_ms(paths: list[Path], rounds: int = 200) -> tuple[list[float], list[Any]]:
    """Median ms of GET /api/fleet over HTTP from `cloud-sync web`'s server, one server per database in `paths`,
    requests alternating between them (so drift in the machine's load falls on all alike), after a warm-up; and
    each server's response."""
    import statistics
    import threading
    import urllib.request

    from cloud_sync.db_sqlite import CloudDB
    from cloud_sync.web import make_server

    dbs = [CloudDB(p) for p in paths]
    servers = [make_server(db, "127.0.0.1", 0) for db in dbs]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    urls = [f"http://127.0.0.1:{server.server_address[1]}/api/fleet" for server in servers]
    times: list[list[float]] = [[] for _ in urls]
    try:
        bodies = []
        for url in urls:
            with urllib.request.urlopen(url, timeout=600) as r:
                bodies.append(json.loads(r.read()))
        for _ in range(rounds):
            for url, ts in zip(urls, times, strict=True):
                t0 = time.perf_counter()
                with urllib.request.urlopen(url, timeout=600) as r:
                    r.read()
                ts.append((time.perf_counter() - t0) * 1000)
    finally:
        for server, db in zip(servers, dbs, strict=True):
            server.shutdown()
            server.server_close()
            db.close()
    return [statistics.median(ts) for ts in times], bodies


def _count_star_ms(path: Path) -> float:
    """What /api/fleet ran per request before the counts were kept: COUNT(*) of each vehicle's samples."""
    import sqlite3

    con = sqlite3.connect(path)
    t0 = time.perf_counter()
    for (v,) in con.execute("SELECT vehicle FROM vehicles").fetchall():
        con.execute("SELECT COUNT(*) FROM samples WHERE vehicle=?", (v,)).fetchone()
    ms = (time.perf_counter() - t0) * 1000
    con.close()
    return ms


@figure("fleet_api_ms_100m")
def fleet_api_ms_100m() -> Figure:
    """GET /api/fleet (median of 200, HTTP, `cloud-sync web`'s server) with 100,000,000 samples stored in SQLite
    from 10 vehicles; baseline: the same call with 1,000 samples stored, requests alternating between the two. The
    ratio is what the stored history costs a page load (1 = nothing). Note: the COUNT(*) per vehicle the endpoint
    ran before counts were kept, timed once on the same 100 M database."""
    n = int(os.environ.get("FLEET_BENCH_SAMPLES", 100_000_000))  # smaller for a trial run; the figure is at 100 M
    with tempfile.TemporaryDirectory() as d:
        small, big = Path(d) / "small.sqlite", Path(d) / "big.sqlite"
        _fleet_db(small, 1_000)
        fill_s = _fleet_db(big, n)
        (base, ours), (_, body) = _fleet_api_ms([small, big])
        assert sum(v["records"]["samples"] for v in body["vehicles"]) == n  # the page reports what is stored
        gaps = sum(v["gaps"] for v in body["vehicles"])
        old_ms = _count_star_ms(big)
        size_gb = big.stat().st_size / 1e9
    return Figure(ours, "ms", base, ours / base,
                  f"{n:,} samples from {FLEET_VEHICLES} vehicles ({n // FLEET_SEGMENT:,} segments, {gaps} gaps, "
                  f"{size_gb:.1f} GB, filled in {fill_s:.0f} s) vs 1,000; COUNT(*) per vehicle as before: "
                  f"{old_ms:,.0f} ms a request")


# --- model updates ------------------------------------------------------------------------------------------------


def _publish_packet_bytes(topic: str, payload: bytes) -> int:
    """An MQTT 5 QoS 1 PUBLISH as it crosses the wire (without TCP/TLS): fixed header, remaining length, topic,
    packet id, an empty property block, the payload."""
    rest = 2 + len(topic.encode()) + 2 + 1 + len(payload)
    varint = 1 if rest < 128 else 2 if rest < 16384 else 3 if rest < 2097152 else 4
    return 1 + varint + rest


def _new_version(src: Path, dst: Path, version: str) -> Path:
    """The shipped model with another version in its contract (as a retrained model of the same shape)."""
    import onnx

    from agent.contract import CONTRACT_KEY

    m = onnx.load(str(src))
    for p in m.metadata_props:
        if p.key == CONTRACT_KEY:
            c = json.loads(p.value)
            c["model"]["version"] = version
            p.value = json.dumps(c)
    onnx.save(m, str(dst))
    return dst


_PUSH: dict[str, Figure] = {}


def _push_run() -> dict[str, Figure]:
    """One vehicle (a real agent, the simulator at 10x, the shipped int8 model) takes the shipped model under a new
    version through the whole update (publish, rollout, download, verify, shadow, switch, watch), while a listener
    on the broker counts every model message to or from it."""
    if _PUSH:
        return _PUSH
    import threading

    from harvester_testing import modelkit
    from harvester_testing.broker import MosquittoBroker
    from harvester_testing.fleet import Fleet

    shadow, watch, speed = 10, 10, 10.0
    with tempfile.TemporaryDirectory() as d, MosquittoBroker() as broker:
        tmp = Path(d)
        key, pub, _ = modelkit.signing_key(tmp / "keys")
        shipped = REPO / "models" / "harvester-anomaly.int8.onnx"
        installed = _new_version(shipped, tmp / "installed.onnx", "1.0.0")
        candidate = _new_version(shipped, tmp / "candidate.onnx", "1.0.1")
        card = json.loads((REPO / "models" / "harvester-anomaly.card.json").read_text())
        pkg = modelkit.package(candidate, key, tmp / "p.pkg", card=card)
        fleet = Fleet(broker, tmp / "fleet", installed, pub, fleet="bench", speed=speed,
                      model={"shadow_windows": shadow, "watch_windows": watch, "chunk_timeout_s": 10.0},
                      chunk_bytes=64 * 1024)
        wire_bytes: dict[str, int] = {}
        lock = threading.Lock()
        sniff = _mqtt_client(broker, "sniff")

        def on_msg(c: Any, u: Any, m: Any) -> None:
            with lock:
                wire_bytes[m.topic] = wire_bytes.get(m.topic, 0) + _publish_packet_bytes(m.topic, bytes(m.payload))

        sniff.on_message = on_msg
        sniff.subscribe("fleet/bench/vehicle/+/model/#", qos=1)
        try:
            fleet.start_cloud()
            fleet.start_agent("b00")
            fleet.wait(lambda: "b00" in fleet.fleet_rows(), "the vehicle seen by the cloud")
            fleet.cli("model", "publish", str(tmp / "p.pkg"))
            fleet.cli("rollout", "start", "harvester-anomaly", "1.0.1", "--vehicles", "b00", "--waves", "100")
            took = fleet.wait(lambda: fleet.rollout_status()["state"] in ("done", "halted"), "the push", 600)
            st = fleet.rollout_status()
            assert st["state"] == "done", st
            time.sleep(1.0)
            fleet.stop_agent("b00")
            counters = fleet.agent_status("b00")["metrics"]["counters"]
        finally:
            sniff.loop_stop()
            sniff.disconnect()
            fleet.close()
    total = sum(wire_bytes.values())
    by_leaf = {t.rsplit("/", 1)[-1]: n for t, n in sorted(wire_bytes.items())}
    _PUSH["model_push_bytes_ratio"] = Figure(
        total / len(pkg), "ratio", 1.1, total / len(pkg) / 1.1,
        f"{total:,} bytes of MQTT PUBLISH packets on the model topics to and from one vehicle ({by_leaf}) for a "
        f"package of {len(pkg):,} bytes (the shipped int8 model and its card), the whole update from desired to "
        f"healthy; baseline: the target 1.1",
        {"wire_bytes": total, "package_bytes": len(pkg), "by_leaf": by_leaf})
    unscored = int(counters.get("pipeline.model_switch_unscored_windows", -1))
    switches = int(counters.get("pipeline.model_switches", 0))
    scored = int(counters.get("pipeline.windows_scored", 0))
    _PUSH["model_switch_unscored_windows"] = Figure(
        unscored, "windows", 0, 0.0 if unscored == 0 else math.inf,
        f"windows left unscored across {switches} switch(es) of the shipped model (hop 5 s) on a simulated "
        f"harvester, {scored} windows scored in the run ({shadow}-window shadow, {watch}-window watch, update "
        f"took {took:.0f} s at simulator speed {speed:g}); baseline: the target 0",
        {"switches": switches, "windows_scored": scored})
    return _PUSH


@figure("model_push_bytes_ratio")
def model_push_bytes_ratio() -> Figure:
    return _push_run()["model_push_bytes_ratio"]


@figure("model_switch_unscored_windows")
def model_switch_unscored_windows() -> Figure:
    return _push_run()["model_switch_unscored_windows"]


@figure("rollout_seconds_10")
def rollout_seconds_10() -> Figure:
    """Ten real agents (one process each, a simulated harvester at real time), `cloud-sync serve`, one broker: from
    `cloud-sync model publish` to the rollout `done` (all ten active and healthy) with a canary and waves 10,50,100
    (four waves one after another); baseline: what the waves must take by design, the shadow and watch windows of
    each wave in data time (one window a second)."""
    from harvester_testing import modelkit
    from harvester_testing.broker import MosquittoBroker
    from harvester_testing.fleet import Fleet

    shadow, watch, n = 10, 10, 10
    vehicles = [f"r{i:02d}" for i in range(n)]
    with tempfile.TemporaryDirectory() as d, MosquittoBroker() as broker:
        tmp = Path(d)
        key, pub, _ = modelkit.signing_key(tmp / "keys")
        installed = modelkit.sim_model(tmp / "installed.onnx", "1.0.0", "normal")
        modelkit.package(modelkit.sim_model(tmp / "new.onnx", "1.1.0", "normal"), key, tmp / "p.pkg")
        fleet = Fleet(broker, tmp / "fleet", installed, pub, fleet="bench",
                      model={"shadow_windows": shadow, "watch_windows": watch, "chunk_timeout_s": 5.0})
        try:
            fleet.start_cloud()
            for v in vehicles:
                fleet.start_agent(v)
            fleet.wait(lambda: set(vehicles) <= set(fleet.fleet_rows()), "ten vehicles seen by the cloud")
            t0 = time.monotonic()
            fleet.cli("model", "publish", str(tmp / "p.pkg"))
            fleet.cli("rollout", "start", "sim-anomaly", "1.1.0", "--vehicles", ",".join(vehicles), "--canary", "1",
                      "--waves", "10,50,100")
            fleet.wait(lambda: fleet.rollout_status()["state"] in ("done", "halted"), "the rollout", 900)
            took = time.monotonic() - t0
            st = fleet.rollout_status()
            assert st["state"] == "done", st
            waves = len(st["waves"])
            for v in vehicles:
                fleet.stop_agent(v)
            unscored = sum(int(fleet.agent_status(v)["metrics"]["counters"].get(
                "pipeline.model_switch_unscored_windows", 0)) for v in vehicles)
        finally:
            fleet.close()
    floor = float(waves * (shadow + watch))
    return Figure(took, "s", floor, took / floor,
                  f"{n} agents, {waves} waves (canary 1, then 10/50/100 %), each vehicle a {shadow}-window shadow "
                  f"and a {watch}-window watch at one window a second; baseline: {waves} x ({shadow} + {watch}) s, "
                  f"the shadow and watch time the waves include by design; {unscored} windows unscored across "
                  f"the {n} switches",
                  {"waves": waves, "shadow_windows": shadow, "watch_windows": watch, "unscored_windows": unscored})


def main(argv: list[str] | None = None) -> int:
    for topic in TOPICS:
        importlib.import_module(topic)
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("names", nargs="*", help=f"figures to run (default all): {', '.join(FIGURES)}")
    a = ap.parse_args(argv)
    names = a.names or list(FIGURES)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        print(f"bench/run: unknown figure(s): {', '.join(unknown)}; known: {', '.join(FIGURES)}", file=sys.stderr)
        return 2
    results: dict[str, Figure] = {}
    for name in names:
        if not a.json:
            print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = FIGURES[name]()
    if a.json:
        print(
            json.dumps(
                _finite_or_none({
                    k: {"value": v.value, "unit": v.unit, "baseline": v.baseline, "ratio": v.ratio, **v.extra}
                    for k, v in results.items()
                }),
                indent=2,
            )
        )
        return 0
    print(f"{'figure':38s} {'value':>14s} {'baseline':>14s} {'ratio':>8s}  unit")
    for k, v in results.items():
        print(f"{k:38s} {v.value:14.4g} {v.baseline:14.4g} {v.ratio:8.3f}  {v.unit}")
    for k, v in results.items():
        if v.note:
            print(f"  {k}: {v.note}")
    print(f"  machine: {os.cpu_count()} cores, {sys.platform}, Python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
