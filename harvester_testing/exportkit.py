"""Datasets in the layout of `cloud-sync export` (docs/learning_loop.md, "The export"), made from simulated
harvesters with pyarrow directly: what tests of `python -m models.build --from-export` read, without a cloud.

A vehicle is a list of `Session`s (the simulator from a fresh start at a Unix time, with or without a fault). Each
session's J1939 frames go through the agent's own `Pipeline` (the built-in DBC, the vehicle's model scoring and
alerting on the data's own clock), so samples, alerts and drift events are what a vehicle would have sent: signal
names, sources and units as decoded, timestamps at the wire's microsecond resolution, one sequence per vehicle
across samples, alerts and events (as the agent's store numbers them). At the end of a session an open alert is
closed as a stopping agent closes it (`agent_stop`), at the session's last data time.

What a test needs beyond that is added by hand: `false_alarm` (an alert the model raised on a healthy stretch,
written as the agent writes its open and close records), and the mechanics' `Verdict`s and `Breakdown`s.
`write_export` writes the tables, partitioned by vehicle and UTC day, with `manifest.json` last
(`complete` false makes an export cut short).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from agent.decode.j1939 import J1939Decoder
from agent.frames import FrameBatch
from agent.pipeline import Pipeline
from agent.records import Alert, SampleArrays
from agent.scoring import Scorer
from agent.signals import SignalRegistry

SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "models" / "harvester-anomaly.int8.onnx"
DAY_S = 86400.0
CHUNK_S = 10.0  # seconds of frames per pipeline batch, as a vehicle's reader hands them over


@dataclass(frozen=True, slots=True)
class Session:
    """The simulator from a fresh start: `start` (Unix seconds, data time of its first frame) for `duration_s`,
    with `fault` starting `onset_s` into the session and reaching full severity `ramp_s` later."""

    start: float
    duration_s: float
    fault: str | None = None
    onset_s: float = 0.0
    ramp_s: float = 60.0
    duty: str = "harvest"
    ambient_c: float = 25.0
    seed: int = 0
    start_kind: str = "warm"


@dataclass(frozen=True, slots=True)
class Verdict:
    vehicle: str
    alert_id: str
    label: str
    fault: str = ""
    note: str = ""
    by: str = "mechanic"
    at: float = 0.0


@dataclass(frozen=True, slots=True)
class Breakdown:
    vehicle: str
    at: float
    fault: str
    note: str = ""
    by: str = "mechanic"
    recorded_at: float = 0.0


@dataclass(slots=True)
class VehicleData:
    """What one vehicle sent: samples as columns, alert and event rows as the cloud stores them."""

    vehicle: str
    seq: list[np.ndarray[Any, Any]] = field(default_factory=list)
    ts: list[np.ndarray[Any, Any]] = field(default_factory=list)
    signal: list[np.ndarray[Any, Any]] = field(default_factory=list)
    source: list[np.ndarray[Any, Any]] = field(default_factory=list)
    unit: list[np.ndarray[Any, Any]] = field(default_factory=list)
    value: list[np.ndarray[Any, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    next_seq: int = 1

    def alert_ids(self, state: str = "open") -> list[str]:
        return [a["alert_id"] for a in self.alerts if a["state"] == state]

    def opened(self) -> list[dict[str, Any]]:
        """The alert rows with state `open`, in time order."""
        return sorted((a for a in self.alerts if a["state"] == "open"), key=lambda a: a["ts"])

    def add_record(self, kind: str, record: dict[str, Any]) -> None:
        seq = self.next_seq
        self.next_seq += 1
        ts = float(record.get("ts", math.nan))
        if kind == "alert":
            self.alerts.append({"seq": seq, "alert_id": str(record.get("alert_id", "")),
                                "state": str(record.get("state", "")), "ts": ts,
                                "score": record.get("score"), "model": str(record.get("model", "")),
                                "model_version": str(record.get("model_version", "")),
                                "label": str(record.get("label", "")), "record": json.dumps(record)})
        else:
            self.events.append({"seq": seq, "kind": str(record.get("kind", kind)), "ts": ts,
                                "record": json.dumps(record)})


class _Sink:
    """The pipeline's sink: samples and records into a VehicleData, numbered as they arrive."""

    def __init__(self, data: VehicleData, registry: SignalRegistry) -> None:
        self.data, self.registry = data, registry

    def append_samples(self, s: SampleArrays) -> None:
        n = len(s)
        d = self.data
        keys = [self.registry.key(int(i)) for i in range(len(self.registry))]
        sid = np.asarray(s.sid)
        d.seq.append(np.arange(d.next_seq, d.next_seq + n, dtype=np.int64))
        d.next_seq += n
        # The wire carries microseconds (harvester_common/wire.py): what the cloud stores.
        d.ts.append(np.round(np.asarray(s.ts, np.float64) * 1e6) / 1e6)
        for col, k in ((d.signal, 0), (d.source, 1), (d.unit, 2)):
            col.append(np.array([key[k] for key in keys], object)[sid])
        d.value.append(np.asarray(s.value, np.float64))

    def append_records(self, records: list[tuple[str, dict[str, Any]]], state: dict[str, Any],
                       urgent: bool = True) -> None:
        for kind, rec in records:
            self.data.add_record(kind, rec)

    def set_state(self, key: str, value: Any) -> bool:
        return True


def simulate_vehicle(vehicle: str, sessions: Sequence[Session], model: Path | None = SHIPPED_MODEL) -> VehicleData:
    """Everything `vehicle` sends over `sessions` (in time order, not overlapping), scored by `model` (None: no
    model, no alerts) through the agent's own pipeline."""
    from harvester_sim import Harvester, J1939Transmitter

    data = VehicleData(vehicle)
    registry = SignalRegistry()
    sink = _Sink(data, registry)
    scorer = Scorer.load(model) if model is not None else None
    pipe = Pipeline(registry, {"can0": J1939Decoder(registry, (), "can0")}, scorer, sink)
    last_end = -math.inf
    for s in sorted(sessions, key=lambda s: s.start):
        if s.start < last_end:
            raise ValueError(f"{vehicle}: sessions overlap at {s.start}")
        last_end = s.start + s.duration_s
        h = Harvester(seed=s.seed, fault=s.fault, fault_onset_s=s.onset_s, fault_ramp_s=s.ramp_s, duty=s.duty,
                      ambient_c=s.ambient_c, start=s.start_kind)
        tx = J1939Transmitter(h, seed=s.seed)
        t = 0.0
        while t < s.duration_s:
            t = min(s.duration_s, t + CHUNK_S)
            frames = tx.frames_until(t)
            for m in frames:
                m.timestamp += s.start
            if frames:
                pipe.feed("can0", FrameBatch.from_messages(frames, "can0"))
        pipe.drain_dtcs()  # a session ends as the agent stops: what the DTC debouncer holds goes out
        if pipe.tracker is not None:
            closing = pipe.tracker.close_now("agent_stop", s.start + s.duration_s)
            if closing is not None:
                data.add_record("alert", closing.to_dict())
    return data


def false_alarm(data: VehicleData, opened: float, closed: float, label: str, model: str = "harvester-anomaly",
                model_version: str = "2.0.0", score: float = 0.93) -> str:
    """Add an alert `data`'s model raised from `opened` to `closed` (Unix seconds) on what was healthy operation:
    its open and close records as the agent writes them. Returns its id."""
    aid = uuid.uuid4().hex
    base = Alert(alert_id=aid, state="open", model=model, model_version=model_version, score=score, threshold=0.8,
                 window_start=opened - 30.0, window_end=opened, ts=opened, label=label)
    data.add_record("alert", base.to_dict())
    close = Alert(alert_id=aid, state="closed", model=model, model_version=model_version, score=0.1, threshold=0.8,
                  window_start=opened - 30.0, window_end=closed, ts=closed, label=label)
    data.add_record("alert", close.to_dict())
    return aid


def day_of(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def _part(folder: Path, table: pa.Table) -> None:
    seq = table.column("seq").to_numpy()
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / f"part-{int(seq.min())}-{int(seq.max())}.parquet")


def _dict(values: Sequence[Any] | np.ndarray[Any, Any]) -> pa.Array:
    return pa.array(list(values), pa.string()).dictionary_encode()


def _write_samples(root: Path, d: VehicleData, chunk_rows: int) -> int:
    if not d.seq:
        return 0
    seq, ts, value = np.concatenate(d.seq), np.concatenate(d.ts), np.concatenate(d.value)
    signal, source, unit = np.concatenate(d.signal), np.concatenate(d.source), np.concatenate(d.unit)
    order = np.argsort(seq, kind="stable")
    days = (np.floor(ts[order] / DAY_S)).astype(np.int64)
    for day in np.unique(days).tolist():
        idx = order[days == day]
        for lo in range(0, len(idx), chunk_rows):
            k = idx[lo: lo + chunk_rows]
            table = pa.table({"seq": pa.array(seq[k], pa.int64()), "ts": pa.array(ts[k], pa.float64()),
                              "signal": _dict(signal[k]), "source": _dict(source[k]), "unit": _dict(unit[k]),
                              "value": pa.array(value[k], pa.float64())})
            _part(root / "samples" / f"vehicle={d.vehicle}" / f"day={day_of(day * DAY_S)}", table)
    return len(seq)


def _write_rows(root: Path, name: str, vehicle: str, rows: list[dict[str, Any]], schema: pa.Schema) -> int:
    by_day: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: r["seq"]):
        by_day.setdefault(day_of(r["ts"]), []).append(r)
    for day, part in by_day.items():
        cols = {}
        for f in schema:
            vals = [r[f.name] for r in part]
            cols[f.name] = _dict(vals) if pa.types.is_dictionary(f.type) else pa.array(vals, f.type)
        _part(root / name / f"vehicle={vehicle}" / f"day={day}", pa.table(cols))
    return len(rows)


ALERTS = pa.schema([("seq", pa.int64()), ("alert_id", pa.string()),
                    ("state", pa.dictionary(pa.int32(), pa.string())), ("ts", pa.float64()),
                    ("score", pa.float64()), ("model", pa.dictionary(pa.int32(), pa.string())),
                    ("model_version", pa.dictionary(pa.int32(), pa.string())),
                    ("label", pa.dictionary(pa.int32(), pa.string())), ("record", pa.string())])
EVENTS = pa.schema([("seq", pa.int64()), ("kind", pa.dictionary(pa.int32(), pa.string())), ("ts", pa.float64()),
                    ("record", pa.string())])
VERDICTS = pa.schema([("id", pa.int64()), ("vehicle", pa.string()), ("alert_id", pa.string()),
                      ("label", pa.string()), ("fault", pa.string()), ("note", pa.string()), ("by", pa.string()),
                      ("at", pa.float64())])
BREAKDOWNS = pa.schema([("id", pa.int64()), ("vehicle", pa.string()), ("at", pa.float64()), ("fault", pa.string()),
                        ("note", pa.string()), ("by", pa.string()), ("recorded_at", pa.float64())])


def write_export(out: Path, vehicles: Sequence[VehicleData], verdicts: Sequence[Verdict] = (),
                 breakdowns: Sequence[Breakdown] = (), *, chunk_rows: int = 500_000, complete: bool = True) -> Path:
    """Write the dataset into `out` (created; it must not hold an export yet): every vehicle's samples, alerts and
    events by vehicle and UTC day, files of at most `chunk_rows` rows named by their seq range; verdicts and
    breakdowns whole, numbered in the order given; `manifest.json` last. Returns `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "manifest.json").exists():
        raise FileExistsError(f"{out} holds an export already")
    rows = {"samples": 0, "alerts": 0, "events": 0}
    for d in vehicles:
        rows["samples"] += _write_samples(out, d, chunk_rows)
        rows["alerts"] += _write_rows(out, "alerts", d.vehicle, d.alerts, ALERTS)
        rows["events"] += _write_rows(out, "events", d.vehicle, d.events, EVENTS)
    vt = [{"id": i + 1, "vehicle": v.vehicle, "alert_id": v.alert_id, "label": v.label, "fault": v.fault,
           "note": v.note, "by": v.by, "at": v.at} for i, v in enumerate(verdicts)]
    bt = [{"id": i + 1, "vehicle": b.vehicle, "at": b.at, "fault": b.fault, "note": b.note, "by": b.by,
           "recorded_at": b.recorded_at or b.at} for i, b in enumerate(breakdowns)]
    for name, table_rows, schema in (("verdicts", vt, VERDICTS), ("breakdowns", bt, BREAKDOWNS)):
        (out / name).mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(table_rows, schema), out / name / "part-0.parquet")
        rows[name] = len(table_rows)
    manifest = {"format": 1, "complete": complete,
                "arguments": {"vehicles": sorted(d.vehicle for d in vehicles), "since": None, "until": None},
                "rows": rows, "written_by": "harvester_testing.exportkit", "written_at": time.time()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out
