"""The workshop's fleet, for the assistant's question set (tests/assistant_questions.json) and its benchmarks.

`build(db, now)` fills a cloud database through `FleetDB.ingest`, as the receiver would: ten vehicles whose samples
come from the simulator (harvester_sim.physics.Harvester, seeded, with each alert's fault switched on around it),
alert records as the agent writes them (open, then closed, with model, version, score, top features and
snapshot), DTC events worded by harvester_common.j1939_text, drift reports naming the model version that ran, a
breakdown, and each vehicle's status; then when each was last heard from. Scripted, so the question set can say
what every answer must hold. `check(answer, case)` scores one answer against its case.
"""

from __future__ import annotations

import calendar
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloud_sync.db import FleetDB
from harvester_common import wire
from harvester_common.j1939_text import DtcText, spn_names_from_signals
from harvester_sim.physics import Harvester

NOW = float(calendar.timegm((2026, 11, 25, 12, 0, 0)))  # a Wednesday, in the season that began 2026-10-01
QUESTIONS = Path(__file__).resolve().parents[1] / "tests" / "assistant_questions.json"
FLEET = "grove"
SESSION_S = 300  # samples stored around each alert and before each vehicle's last sync, at 1 Hz
SIGNALS: tuple[tuple[str, str], ...] = (
    ("ET1.EngCoolantTemp", "degC"), ("EFL_P1.EngCoolantLevel", "%"), ("EFL_P1.EngCoolantPress", "kPa"),
    ("EFL_P1.EngOilPress", "kPa"), ("ET1.EngOilTemp1", "degC"), ("EEC1.EngSpeed", "rpm"), ("VF.HydTemp", "degC"),
    ("FD.FanSpeed", "rpm"), ("FD.EstPercentFanSpeed", "%"), ("AMB.AmbientAirTemp", "degC"),
)
TOP_FEATURES = {
    "coolant_leak": [("ET1.EngCoolantTemp:mean:30s", 0.41), ("EFL_P1.EngCoolantLevel:mean:30s", 0.33),
                     ("EFL_P1.EngCoolantPress:mean:30s", 0.12)],
    "oil_pump_wear": [("EFL_P1.EngOilPress:mean:30s", 0.47), ("ET1.EngOilTemp1:mean:30s", 0.18)],
    "hydraulic_overheat": [("VF.HydTemp:mean:30s", 0.52), ("FD.FanSpeed:mean:30s", 0.11)],
    "fan_wear": [("FD.FanSpeed:std:30s", 0.38), ("FD.FanSpeed:mean:30s", 0.29), ("ET1.EngCoolantTemp:mean:30s", 0.1)],
}


def at(month: int, day: int, hour: int, minute: int = 0, year: int = 2026) -> float:
    return float(calendar.timegm((year, month, day, hour, minute, 0)))


@dataclass(slots=True)
class Alert:
    label: str
    opened: float
    score: float
    version: str = "2.0.0"
    closed: float | None = None


@dataclass(slots=True)
class Vehicle:
    name: str
    seed: int
    last_seen: float
    alerts: list[Alert] = field(default_factory=list)
    dtcs: list[tuple[int, int, float, float | None]] = field(default_factory=list)  # spn, fmi, opened, closed
    drift: list[tuple[float, str, bool]] = field(default_factory=list)  # ts, model version, drifted
    status_drift: bool = False
    version: str = "2.0.0"


def fleet(now: float = NOW) -> list[Vehicle]:
    """The scripted fleet (times are fixed dates; `now` is where "today" is for the question set)."""
    return [
        Vehicle("H-001", 1, now - 300),
        Vehicle("H-002", 2, now - 120, [Alert("oil_pump_wear", at(11, 25, 7, 40), 0.88)],
                [(100, 1, at(11, 25, 7, 35), None)]),
        Vehicle("H-003", 3, at(11, 24, 15), [Alert("hydraulic_overheat", at(11, 24, 13, 10), 0.83,
                                                   closed=at(11, 24, 14, 5))],
                [(1638, 0, at(11, 24, 13, 5), at(11, 24, 14))]),
        Vehicle("H-004", 4, now - 60, [Alert("fan_wear", at(11, 25, 10, 5), 0.79)], status_drift=True),
        Vehicle("H-005", 5, at(11, 16, 9), [Alert("coolant_leak", at(10, 20, 11), 0.74, "1.0.0",
                                                  closed=at(10, 20, 12))], version="1.0.0"),
        Vehicle("H-006", 6, now - 600, [Alert("coolant_leak", at(3, 10, 10), 0.77, "1.0.0", closed=at(3, 10, 11)),
                                        Alert("coolant_leak", at(5, 2, 16), 0.8, "1.0.0", closed=at(5, 2, 17))]),
        Vehicle("H-007", 7, now - 30,
                [Alert("coolant_leak", at(10, 14, 9), 0.81, "1.0.0", closed=at(10, 14, 10)),
                 Alert("coolant_leak", at(11, 3, 15, 20), 0.86, "1.0.0", closed=at(11, 3, 16)),
                 Alert("coolant_leak", at(11, 18, 11), 0.84, "2.0.0", closed=at(11, 18, 11, 45)),
                 Alert("coolant_leak", at(11, 25, 9, 12), 0.93, "2.0.0")],
                [(110, 0, at(11, 3, 15, 15), at(11, 3, 16)), (110, 0, at(11, 25, 9, 5), None),
                 (111, 1, at(11, 25, 9, 8), None)],
                [(at(11, 1, 6), "1.0.0", False), (at(11, 5, 6), "1.0.0", False), (at(11, 9, 6), "1.0.0", True),
                 (at(11, 10, 8), "2.0.0", False), (at(11, 15, 6), "2.0.0", False), (at(11, 20, 6), "2.0.0", False),
                 (at(11, 24, 6), "2.0.0", False)]),
        Vehicle("H-008", 8, now - 200, [Alert("hydraulic_overheat", at(11, 20, 14), 0.82, closed=at(11, 20, 15))]),
        Vehicle("T-001", 11, now - 100),
        Vehicle("picker-north", 12, now - 1000, [Alert("fan_wear", at(11, 21, 14), 0.76, closed=at(11, 21, 14, 40))]),
    ]


BREAKDOWNS = [("H-007", at(11, 4, 8), "coolant_leak", "hose clamp on the bottom radiator hose")]


def _samples(seq: int, t_end: float, seed: int, fault: str | None) -> tuple[wire.Segment, dict[str, float]]:
    """SESSION_S seconds of the simulator at 1 Hz ending at `t_end`, the fault (if any) ramping in over the first
    120 s; and the last values."""
    h = Harvester(seed=seed, fault=fault, fault_onset_s=0.0, fault_ramp_s=120.0, ambient_c=30.0)
    names = [n for n, _ in SIGNALS]
    ts, sig, val = [], [], []
    last: dict[str, float] = {}
    for k in range(SESSION_S):
        h.sensor_noise(1.0)
        h.step(1.0)
        vals = h.values()
        t = t_end - (SESSION_S - 1 - k)
        for i, n in enumerate(names):
            ts.append(round(t * 1e6))
            sig.append(i)
            val.append(float(vals[n]))
            last[n] = float(vals[n])
    cols = wire.SampleColumns([(n, "can0/00", u) for n, u in SIGNALS], np.array(sig, np.uint16),
                              np.array(ts, np.int64), np.array(val, np.float64))
    return wire.Segment("samples", seq, seq + len(ts) - 1, columns=cols), last


def _next(segs: list[wire.Segment]) -> int:
    return segs[-1].seq_hi + 1 if segs else 1


def alert_id(vehicle: str, opened: float) -> str:
    return hashlib.sha256(f"{vehicle}/{opened}".encode()).hexdigest()[:32]


def dtc_text() -> DtcText:
    """Words for DTCs as the simulated vehicles' agent has them: from the project DBC's SPN attributes."""
    from agent.decode.j1939 import dbc_spns, default_dbc, load_dbcs

    return DtcText(spn_names_from_signals(dbc_spns(load_dbcs([default_dbc()]))))


def build(db: FleetDB, now: float = NOW) -> list[Vehicle]:
    text = dtc_text()
    vehicles = fleet(now)
    for v in vehicles:
        segs: list[wire.Segment] = []
        add = segs.append

        for a in v.alerts:
            seg, last = _samples(_next(segs), a.opened, v.seed, a.label)
            add(seg)
            aid = alert_id(v.name, a.opened)
            feats = TOP_FEATURES[a.label]
            snap = {f.split(":")[0]: round(last[f.split(":")[0]], 2) for f, _ in feats}
            rec = {"alert_id": aid, "state": "open", "ts": a.opened, "score": a.score, "threshold": 0.7,
                   "model": "harvester-anomaly", "model_version": a.version, "label": a.label,
                   "window_start": a.opened - 30, "window_end": a.opened, "top_features": [list(f) for f in feats],
                   "snapshot": snap, "reason": "", "features_present": [f for f, _ in feats]}
            add(wire.Segment("alert", _next(segs), _next(segs), record=rec))
            if a.closed is not None:
                closing = {**rec, "state": "closed", "ts": a.closed, "score": 0.2, "window_end": a.closed,
                           "top_features": []}
                add(wire.Segment("alert", _next(segs), _next(segs), record=closing))
        for spn, fmi, opened, closed in v.dtcs:
            for kind, ts in (("dtc_open", opened), ("dtc_close", closed)):
                if ts is not None:
                    add(wire.Segment("event", _next(segs), _next(segs), record={"kind": kind, "ts": ts, "data": {
                        "source": "can0/00", "sa": 0, "spn": spn, "fmi": fmi, "occurrence": 1,
                        **text.fields(spn, fmi)}}))
        for ts, version, drifted in v.drift:
            add(wire.Segment("event", _next(segs), _next(segs), record={"kind": "drift", "ts": ts, "data": {
                "model": "harvester-anomaly", "model_version": version, "drift": drifted, "windows": 600}}))
        seg, _ = _samples(_next(segs), v.last_seen, v.seed + 100, None)
        add(seg)
        db.ingest([wire.Batch(FLEET, v.name, 1, segs)])
        db.set_status(FLEET, v.name, {
            "state": "online" if now - v.last_seen < 900 else "offline", "model_version": v.version,
            "drift": {"enabled": True, "drift": v.status_drift,
                      "features": ["FD.FanSpeed:mean:30s"] if v.status_drift else []}})
    for vehicle, ts, fault, note in BREAKDOWNS:
        db.add_breakdown(vehicle, ts, fault, by="workshop", note=note, recorded_at=now)
    with db._lock, db._transaction() as cur:  # when each was last heard from, as the script says
        for v in vehicles:
            cur.execute(db._sql("UPDATE vehicles SET last_seen=? WHERE vehicle=?"), (v.last_seen, v.name))
    return vehicles


def questions() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads(QUESTIONS.read_text())["questions"]
    return cases


@dataclass(slots=True)
class Score:
    intent_ok: bool
    answer_ok: bool
    missing: list[str]


def check(out: dict[str, Any], case: dict[str, Any]) -> Score:
    """One answer (`Answer.to_dict()`) against its case: the intent and slots it must have understood; the facts
    its text must hold (case-insensitive) and the sources it must cite (a KB path, or a table and a vehicle among
    the rows); the choices, when it must ask back."""
    missing: list[str] = []
    intent_ok = out.get("intent") == case["intent"]
    slots = out.get("slots") or {}
    for k, v in case.get("slots", {}).items():
        if slots.get(k) != v:
            intent_ok = False
            missing.append(f"slot {k}={v!r} (got {slots.get(k)!r})")
    text = str(out.get("answer", "")).lower()
    for fact in case.get("facts", []):
        if fact.lower() not in text:
            missing.append(f"fact {fact!r}")
    for absent in case.get("absent", []):
        if absent.lower() in text:
            missing.append(f"should not say {absent!r}")
    sources = out.get("sources") or []
    for want in case.get("sources", []):
        if not any(_cites(s, want) for s in sources):
            missing.append(f"source {want}")
    if "clarify" in case and sorted(out.get("clarify") or []) != sorted(case["clarify"]):
        missing.append(f"clarify {case['clarify']} (got {out.get('clarify')})")
    answer_ok = not [m for m in missing if not m.startswith("slot ")]
    return Score(intent_ok, answer_ok, missing)


def _cites(s: dict[str, Any], want: dict[str, Any]) -> bool:
    if "path" in want:
        return str(s.get("path", "")).endswith(want["path"]) and ("heading" not in want
                                                                  or s.get("heading") == want["heading"])
    if s.get("table") != want.get("table"):
        return False
    return "vehicle" not in want or any(k.get("vehicle") == want["vehicle"] for k in s.get("keys", []))
