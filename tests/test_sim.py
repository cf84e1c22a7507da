"""The simulator: frames that decode (by cantools and by our decoder), standard periods, fault signatures,
determinism, NMEA that verifies, DM1 that round-trips, and the real-time runner on a real bus and pty."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime

import can
import cantools
import numpy as np
import pytest
import serial

from agent.decode.j1939 import J1939Decoder, default_dbc
from agent.decode.j1939_tp import parse_dm1
from agent.decode.nmea import NmeaDecoder
from agent.frames import FrameBatch
from agent.signals import SignalRegistry
from harvester_sim import (
    FAULTS,
    Dtc,
    Harvester,
    J1939Transmitter,
    Simulator,
    encode_dm1,
    generate_frames,
    nmea_sentences,
    sim_from_config,
)
from harvester_sim.pty import PtyPair

DB = cantools.database.load_file(str(default_dbc()))


def _means(fault: str | None, duty: str = "harvest", seconds: float = 150) -> dict[str, float]:
    h = Harvester(seed=11, fault=fault, fault_onset_s=0, fault_ramp_s=30, duty=duty, ambient_c=28)
    reg = SignalRegistry()
    res = J1939Decoder(reg).decode(FrameBatch.from_messages(list(generate_frames(h, seconds))))
    names = np.array([reg.name(s) for s in res.samples.sid])
    late = res.samples.ts > seconds - 60
    return {n: float(res.samples.value[(names == n) & late].mean()) for n in set(names.tolist())}


def test_frames_decode_with_cantools_to_physical_ranges() -> None:
    h = Harvester(seed=1)
    frames = list(generate_frames(h, 30))
    assert frames
    for m in frames[:2000]:
        if (m.arbitration_id >> 8) & 0xFFFF in (0xFECA, 0xEC00, 0xEBFF):
            continue
        msg = DB.get_message_by_frame_id(m.arbitration_id)
        vals = msg.decode(m.data)
        for s in msg.signals:
            assert s.minimum <= vals[s.name] <= s.maximum, (msg.name, s.name, vals[s.name])
    v = _means(None)
    assert 1900 < v["EEC1.EngSpeed"] < 2300
    assert 80 <= v["ET1.EngCoolantTemp"] <= 100
    assert 250 < v["EFL_P1.EngOilPress"] < 450
    assert 2 <= v["CCVS.WheelBasedVehicleSpeed"] <= 6


def test_periods_match_the_dbc() -> None:
    frames = list(generate_frames(Harvester(seed=2), 20))
    counts = Counter(m.arbitration_id for m in frames)
    for msg in DB.messages:
        expected = 20 / (msg.cycle_time / 1000)
        assert abs(counts[msg.frame_id] - expected) <= 1, msg.name
    assert {m.arbitration_id & 0xFF for m in frames} >= {0x00, 0x17, 0x27}  # several ECUs
    ts = [m.timestamp for m in frames]
    assert ts == sorted(ts)


def test_same_seed_same_frames() -> None:
    a = [(m.arbitration_id, bytes(m.data)) for m in generate_frames(Harvester(seed=5, fault="fan_wear"), 20)]
    b = [(m.arbitration_id, bytes(m.data)) for m in generate_frames(Harvester(seed=5, fault="fan_wear"), 20)]
    c = [(m.arbitration_id, bytes(m.data)) for m in generate_frames(Harvester(seed=6, fault="fan_wear"), 20)]
    assert a == b and a != c


@pytest.mark.parametrize(
    ("fault", "signal", "direction", "at_least"),
    [
        ("coolant_leak", "EFL_P1.EngCoolantLevel", -1, 20),
        ("coolant_leak", "ET1.EngCoolantTemp", +1, 4),
        ("oil_pump_wear", "EFL_P1.EngOilPress", -1, 80),
        ("hydraulic_overheat", "VF.HydTemp", +1, 15),
        ("fan_wear", "FD.FanSpeed", -1, 200),
    ],
)
def test_each_fault_moves_its_signature(fault: str, signal: str, direction: int, at_least: float) -> None:
    healthy, faulty = _means(None), _means(fault)
    assert direction * (faulty[signal] - healthy[signal]) >= at_least


def test_faults_raise_engine_dtcs_over_dm1_and_bam() -> None:
    h = Harvester(seed=4, fault="coolant_leak", fault_onset_s=0, fault_ramp_s=10, ambient_c=38)
    reg = SignalRegistry()
    dec = J1939Decoder(reg)
    events = dec.decode(FrameBatch.from_messages(list(generate_frames(h, 200)))).events
    opened = {(e.data["spn"], e.data["fmi"]) for e in events if e.kind == "dtc_open"}
    assert (111, 1) in opened  # coolant level low


def test_dm1_encoding_round_trips() -> None:
    one = encode_dm1([Dtc(110, 0, 3)])
    assert len(one) == 8
    assert parse_dm1(one).dtcs == (parse_dm1(one).dtcs[0],) and parse_dm1(one).dtcs[0].spn == 110
    many = encode_dm1([Dtc(110, 0, 3), Dtc(524287, 31, 126)])
    d = parse_dm1(many)
    assert [(x.spn, x.fmi, x.occurrence) for x in d.dtcs] == [(110, 0, 3), (524287, 31, 126)]
    assert parse_dm1(encode_dm1([])).dtcs == ()


def test_nmea_sentences_verify_and_decode() -> None:
    h = Harvester(seed=1)
    h.step(10)
    fix = h.gps()
    dec = NmeaDecoder()
    out: dict[str, float] = {}
    for line in nmea_sentences(fix, datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)):
        assert line.endswith("\r\n")
        out.update(dec.decode_line(line.encode()))
    assert not dec.errors and dec.sentences == 3
    assert abs(out["GPS.Latitude"] - fix.lat) < 1e-5 and abs(out["GPS.Longitude"] - fix.lon) < 1e-5
    assert abs(out["GPS.SpeedKmh"] - fix.speed_kmh) < 0.02


def test_sim_from_config_validates() -> None:
    assert sim_from_config({"seed": 3, "fault": "fan_wear", "duty": "road"}).fault == "fan_wear"
    assert sim_from_config({"start": "cold", "ambient_c": 2.0}).coolant == 2.0
    for bad, needle in (({"fault": "flat_tyre"}, "known: coolant_leak"), ({"color": 1}, "unknown key 'color'"),
                        ({"seed": "x"}, "seed"), ({"duty": "sleep"}, "duty"), ({"fault_ramp_s": 0}, "positive"),
                        ({"start": "lukewarm"}, "known: warm, cold")):
        with pytest.raises(ValueError, match=needle):
            sim_from_config(bad)
    assert set(FAULTS) == {"coolant_leak", "oil_pump_wear", "hydraulic_overheat", "fan_wear"}


def test_runner_on_a_virtual_bus_and_a_pty() -> None:
    channel = "test-sim-runner"
    rx = can.Bus(interface="virtual", channel=channel)
    tx_bus = can.Bus(interface="virtual", channel=channel)
    with PtyPair() as pty:
        port = serial.Serial(pty.slave_path, timeout=0.5)
        sim = Simulator(Harvester(seed=1), tx_bus, pty.write, speed=20)
        stats = sim.run(2.0, threading.Event())
        got = 0
        while rx.recv(timeout=0.1) is not None:
            got += 1
        data = port.read(4096)
        port.close()
    rx.shutdown()
    tx_bus.shutdown()
    reference = len(list(J1939Transmitter(Harvester(seed=1)).frames_until(2.0)))
    assert stats.frames_sent == got == reference
    assert stats.nmea_sentences >= 3 and data.count(b"\r\n") == stats.nmea_sentences


# --- real operation: cold starts, engine off, key on, machines with other fits, sensors that are not there -----

def _series(h: Harvester, seconds: float, step: float = 1.0) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    t = 0.0
    while t < seconds:
        h.step(step)
        t += step
        for k, v in h.values().items():
            out.setdefault(k, []).append(v)
    return out


def test_a_cold_start_warms_up_slowly_from_the_ambient_temperature() -> None:
    h = Harvester(seed=3, duty="idle", ambient_c=-5.0, start="cold")
    first = h.values()
    assert first["ET1.EngCoolantTemp"] <= 0 and first["VF.HydTemp"] <= 0  # everything at ambient
    s = _series(h, 1200)
    coolant = np.array(s["ET1.EngCoolantTemp"])
    assert coolant[60] < 15  # a minute in, still cold: an engine warms in tens of minutes, not seconds
    assert coolant[-1] > coolant[300] > coolant[60]  # warming all along
    assert min(s["EEC1.EngSpeed"]) < 300  # it was cranked: the start is in the data


def test_engine_off_with_the_key_on_sends_zero_speed_and_pressure_and_cools_down() -> None:
    h = Harvester(seed=4, duty="parked", ambient_c=20.0)
    s = _series(h, 1800)
    rpm = np.array(s["EEC1.EngSpeed"])
    off = rpm < 50
    assert off.mean() > 0.3 and (~off).mean() > 0.1  # parked: mostly off, started now and then
    assert np.array(s["EFL_P1.EngOilPress"])[off].max() < 20
    assert np.percentile(np.array(s["FD.FanSpeed"])[off], 90) < 50  # the fan spins down in seconds
    assert np.array(s["EEC2.EngPercentLoadAtCurrentSpeed"])[off].max() == 0


def test_machines_differ_in_idle_speed_and_fan_and_hydraulic_fits() -> None:
    idles = set()
    fans = set()
    for seed in range(8):
        h = Harvester(seed=seed, duty="idle", vary_fit=True)
        idles.add(round(h.idle_rpm, -1))
        fans.add(round(h.fan_max_rpm, -1))
    assert min(idles) < 700 and max(idles) > 850 and len(fans) > 4
    assert Harvester(seed=1).fan_max_rpm == 2400.0  # the default machine is the one the demo always drove


def test_absent_and_intermittent_messages() -> None:
    h = Harvester(seed=5)
    tx = J1939Transmitter(h, absent=frozenset({"FD", "VF"}), intermittent=frozenset({"EFL_P1"}), seed=5)
    frames = tx.frames_until(900.0)
    pgns = Counter((m.arbitration_id >> 8) & 0x3FFFF for m in frames)
    assert DB.get_message_by_name("FD").frame_id >> 8 & 0x3FFFF not in pgns
    assert DB.get_message_by_name("VF").frame_id >> 8 & 0x3FFFF not in pgns
    efl = DB.get_message_by_name("EFL_P1").frame_id & 0x1FFFFFFF
    ts = np.array([m.timestamp for m in frames if m.arbitration_id == efl])
    period = DB.get_message_by_name("EFL_P1").cycle_time / 1000
    assert 0.2 * 900 / period < ts.size < 0.98 * 900 / period  # some sent, some not...
    assert np.diff(ts).max() > 5  # ...in outages of seconds, as a loose connector does
