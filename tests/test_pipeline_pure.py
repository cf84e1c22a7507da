"""The pipeline on its own, with an in-memory sink (`MemorySink` below: a real class, no mock library, no store).
Every decoder (J1939 frames, NMEA and line-sensor lines) goes through the one entry point; everything decoded
reaches the sink; alerts and DTC events leave with the state they change; a restart continues from the state
handed back to `resume`; drift state the sink refuses is counted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from agent.config import ModelConfig
from agent.contract import FeatureSpec
from agent.decode.base import Decoder
from agent.decode.j1939 import J1939Decoder
from agent.decode.lines import LineDecoder
from agent.decode.nmea import NmeaDecoder, checksum
from agent.frames import FrameBatch
from agent.pipeline import ALERT_STATE_KEY, Pipeline
from agent.records import SampleArrays
from agent.scoring import Scorer
from agent.signals import SignalRegistry
from harvester_sim import Harvester, generate_frames
from harvester_testing.onnx_models import linear_softmax_model, make_contract

MODEL = Path(__file__).resolve().parents[1] / "models" / "harvester-anomaly.int8.onnx"

Records = list[tuple[str, dict[str, Any]]]


class MemorySink:
    """What a sink is given, kept in memory: sample batches, each records call (one transaction) with its state,
    whether it was urgent, and the state as a store would hold it."""

    def __init__(self, refuse_state: bool = False) -> None:
        self.samples: list[SampleArrays] = []
        self.transactions: list[tuple[Records, dict[str, Any]]] = []
        self.urgent: list[bool] = []
        self.saved: dict[str, Any] = {}
        self.refuse_state = refuse_state

    def append_samples(self, samples: SampleArrays) -> None:
        self.samples.append(samples)

    def append_records(self, records: Records, state: dict[str, Any], urgent: bool = True) -> None:
        self.transactions.append((list(records), dict(state)))
        self.urgent.append(urgent)
        for key, value in state.items():
            if value is None:
                self.saved.pop(key, None)
            else:
                self.saved[key] = value

    def set_state(self, key: str, value: Any) -> bool:
        if self.refuse_state:
            return False
        self.saved[key] = value
        return True

    def records(self) -> Records:
        return [r for recs, _ in self.transactions for r in recs]


def _nmea(body: str) -> bytes:
    return f"${body}*{checksum(body):02X}\r\n".encode()


def test_every_decoder_goes_through_the_one_entry_point() -> None:
    reg = SignalRegistry()
    decoders: dict[str, Decoder[Any]] = {
        "can0": J1939Decoder(reg),
        "gps": NmeaDecoder(reg, "gps"),
        "vib": LineDecoder("vib", "csv", ["AccelRms", "BearingTemp"], {"AccelRms": "g"}, reg),
    }
    assert all(isinstance(d, Decoder) for d in decoders.values())
    sink = MemorySink()
    p = Pipeline(reg, decoders, None, sink)
    fb = FrameBatch.from_messages(list(generate_frames(Harvester(seed=1), 5)))
    p.feed("can0", fb)
    p.feed("gps", [(100.0, _nmea("GNGGA,123519.00,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,")),
                   (100.0, b"garbage\r\n")])
    p.feed("vib", [(100.0, b"0.42,61.5\n"), (100.5, b"1,2,3\n")])
    p.feed("can9", fb)  # no decoder for it: counted, not raised

    assert p.stats.frames == len(fb) and p.stats.serial_lines == 4
    assert p.stats.errors == {"frames_from_unknown_bus": len(fb)}
    sid = np.concatenate([s.sid for s in sink.samples])
    assert len(sid) == p.stats.samples > 0  # everything decoded reached the sink
    keys = {reg.key(i) for i in sid.tolist()}
    assert {src.split("/")[0] for _, src, _ in keys} == {"can0", "gps", "vib"}
    for name, src, _ in keys:  # each signal is one its decoder says it can produce
        assert name in decoders[src.split("/")[0]].signals()
    assert ("vib.AccelRms", "vib", "g") in keys and ("GPS.Latitude", "gps", "deg") in keys
    assert decoders["gps"].errors == {"no_start": 1} and decoders["vib"].errors == {"field_count": 1}
    assert decoders["gps"].counters()["sentences"] == 1 and decoders["vib"].counters() == {"sentences": 1}
    assert decoders["can0"].counters()["frames"] == len(fb)
    assert [d.input_kind for d in decoders.values()] == ["frames", "lines", "lines"]


def _always_alarming_scorer(tmp_path: Path) -> Scorer:
    feats = [FeatureSpec("t", "ET1.EngCoolantTemp", "mean", 10)]
    # Huge positive weight on a standardised ~90 °C temperature: P(fault) ~ 1 on every window.
    path = linear_softmax_model(tmp_path / "m.onnx", make_contract(feats), np.array([[0.0, 5.0]]), np.zeros(2))
    return Scorer.load(path)


def _feed(p: Pipeline, frames: list[Any]) -> None:
    for i in range(0, len(frames), 500):
        p.feed("can0", FrameBatch.from_messages(frames[i : i + 500]))


def test_records_leave_with_their_state_and_a_restart_continues_from_it(tmp_path: Path) -> None:
    scorer = _always_alarming_scorer(tmp_path)
    frames = list(generate_frames(Harvester(seed=4, fault="coolant_leak", fault_onset_s=0, fault_ramp_s=10,
                                            ambient_c=38), 230))
    first = [m for m in frames if m.timestamp < 200]
    reg = SignalRegistry()
    sink = MemorySink()
    p = Pipeline(reg, {"can0": J1939Decoder(reg)}, scorer, sink)
    _feed(p, first)

    assert sum(len(s) for s in sink.samples) == p.stats.samples
    dtc = [(recs, st) for recs, st in sink.transactions if any(r.get("kind", "").startswith("dtc_") for _, r in recs)]
    # The decoder's active set and what its debouncer holds, with the events they go with.
    assert dtc and all(set(st) == {"dtc_active/can0", "dtc_debounce/can0"} for _, st in dtc)
    assert p.stats.dtc_events == p.stats.dtc_events_written == sum(len(recs) for recs, _ in dtc)  # nothing flaps
    assert any(r.get("kind") == "dtc_open" and r["data"]["spn"] == 111 for _, r in sink.records())
    assert sink.saved["dtc_active/can0"] == p.decoders["can0"].state()
    opened = [(recs, st) for recs, st in sink.transactions if recs and recs[0][0] == "alert"]
    assert p.stats.alerts_opened == 1 and len(opened) == 1
    (_, alert), = opened[0][0]
    assert alert["state"] == "open" and opened[0][1][ALERT_STATE_KEY]["alert"]["alert_id"] == alert["alert_id"]

    # A restart: a new pipeline handed what the first one left saved.
    reg2 = SignalRegistry()
    sink2 = MemorySink()
    p2 = Pipeline(reg2, {"can0": J1939Decoder(reg2)}, scorer, sink2)
    assert {"dtc_active/can0", ALERT_STATE_KEY} <= set(p2.state_keys())
    p2.resume(dict(sink.saved))
    assert p2.stats.alerts_carried == 1 and p2.stats.errors == {}
    ([], carried), = sink2.transactions  # the carried alert is saved again at once, as alive
    assert carried[ALERT_STATE_KEY]["alert"]["alert_id"] == alert["alert_id"]
    _feed(p2, [m for m in frames if m.timestamp >= 200])
    assert p2.stats.alerts_opened == 0  # carried on, not opened again
    assert not [r for _, r in sink2.records() if r.get("kind") == "dtc_open" and r["data"]["spn"] == 111]

    p2.shutdown("agent_stop")
    recs, st = sink2.transactions[-1]
    assert recs[0][1]["alert_id"] == alert["alert_id"] and recs[0][1]["reason"] == "agent_stop"
    assert st == {ALERT_STATE_KEY: None} and ALERT_STATE_KEY not in sink2.saved


def test_drift_state_the_sink_refuses_is_counted() -> None:
    frames = list(generate_frames(Harvester(seed=3, duty="harvest"), 150))
    for refuse in (True, False):
        reg = SignalRegistry()
        sink = MemorySink(refuse_state=refuse)
        p = Pipeline(reg, {"can0": J1939Decoder(reg)}, Scorer.load(MODEL), sink,
                     drift_policy=ModelConfig(drift_min_windows=5).drift_policy(), drift_interval_s=10.0)
        _feed(p, frames)
        reports = [r for k, r in sink.records() if k == "event" and r["kind"] == "drift"]
        assert reports
        key = next(k for k in p.state_keys() if k.startswith("drift/"))
        if refuse:
            assert p.stats.errors["drift_state_not_saved"] == len(reports) and key not in sink.saved
        else:
            assert "drift_state_not_saved" not in p.stats.errors
            again = Pipeline(reg, {}, Scorer.load(MODEL), MemorySink(),
                             drift_policy=ModelConfig(drift_min_windows=5).drift_policy())
            again.resume(sink.saved)
            assert again.drift is not None and again.drift.rows == sink.saved[key]["rows"] > 0
