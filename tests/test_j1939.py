"""J1939 decoding: the vectorised fast path equals cantools, reserved codes are missing values, transport
sessions reassemble (and fail safely), real traces decode to physically sensible values."""

from __future__ import annotations

from collections import Counter

import can
import cantools
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.decode.j1939 import DbcError, J1939Decoder, default_dbc
from agent.decode.j1939_id import make_id, pgn_of, split_ids
from agent.decode.j1939_tp import TransportReassembler, parse_dm1
from agent.frames import FrameBatch
from agent.signals import SignalRegistry
from harvester_testing.data import shared_file

DB = cantools.database.load_file(str(default_dbc()))


def _decode(frames: list[can.Message], dbcs: tuple[str, ...] = ()) -> tuple[J1939Decoder, dict[str, list[float]]]:
    reg = SignalRegistry()
    from pathlib import Path

    dec = J1939Decoder(reg, [Path(p) for p in dbcs])
    res = dec.decode(FrameBatch.from_messages(frames))
    out: dict[str, list[float]] = {}
    for sid, v in zip(res.samples.sid.tolist(), res.samples.value.tolist(), strict=True):
        out.setdefault(reg.name(sid), []).append(v)
    dec.last_events = res.events  # type: ignore[attr-defined]
    return dec, out


def test_id_fields_pdu1_and_pdu2() -> None:
    ids = split_ids(np.array([0x0CF00400, 0x18EA00F9, 0x18FEEE00], np.uint32))
    assert ids.pgn.tolist() == [61444, 0xEA00, 65262]
    assert ids.da.tolist() == [0xFF, 0x00, 0xFF]
    assert ids.sa.tolist() == [0x00, 0xF9, 0x00]
    assert ids.priority.tolist() == [3, 6, 6]
    assert pgn_of(make_id(0xEA00, 0xF9, da=0x17)) == 0xEA00


@settings(max_examples=150, deadline=None)
@given(
    msg_index=st.integers(min_value=0, max_value=len(DB.messages) - 1),
    data=st.binary(min_size=8, max_size=8),
    sa=st.integers(min_value=0, max_value=253),
)
def test_fast_path_equals_cantools_for_any_payload_and_source(msg_index: int, data: bytes, sa: int) -> None:
    msg = DB.messages[msg_index]
    cid = (msg.frame_id & ~0xFF) | sa
    _, got = _decode([can.Message(arbitration_id=cid, data=data, is_extended_id=True, timestamp=1.0)])
    ref = msg.decode(data, decode_choices=False, scaling=True)
    for s in msg.signals:
        raw = int.from_bytes(data, "little") >> s.start & ((1 << s.length) - 1)
        top = raw >> (s.length - 8) if s.length >= 8 else raw
        reserved = top >= 0xFB if s.length >= 8 else (s.length >= 2 and raw >= (1 << s.length) - 2)
        name = f"{msg.name}.{s.name}"
        if reserved:
            assert name not in got, f"{name}: reserved raw {raw:#x} became a reading"
        else:
            assert got[name] == [pytest.approx(ref[s.name], abs=1e-9)]


def test_not_available_and_error_are_missing_and_counted() -> None:
    eec1 = DB.get_message_by_name("EEC1")
    values = {"EngTorqueMode": 1, "DriversDemandEngPercentTorque": 50, "ActualEngPercentTorque": 40,
              "EngSpeed": 1500, "SrcAddrssOfCtrllngDvcFrEngCntrl": 0}
    data = bytearray(eec1.encode(values))
    data[3:5] = b"\xff\xff"  # EngSpeed not available
    data[2] = 0xFE  # ActualEngPercentTorque error
    dec, got = _decode([can.Message(arbitration_id=eec1.frame_id, data=bytes(data), is_extended_id=True)])
    assert "EEC1.EngSpeed" not in got and "EEC1.ActualEngPercentTorque" not in got
    assert got["EEC1.DriversDemandEngPercentTorque"] == [50.0]
    assert dec.errors["value_not_available"] >= 1 and dec.errors["value_error"] == 1


def test_short_frame_signals_past_dlc_are_missing() -> None:
    et1 = DB.get_message_by_name("ET1")
    _, got = _decode([can.Message(arbitration_id=et1.frame_id, data=bytes([130, 70]), is_extended_id=True)])
    assert got["ET1.EngCoolantTemp"] == [90.0]
    assert "ET1.EngOilTemp1" not in got


def test_same_pgn_from_two_sources_kept_apart() -> None:
    reg = SignalRegistry()
    dec = J1939Decoder(reg)
    et1 = DB.get_message_by_name("ET1")
    frames = [
        can.Message(arbitration_id=(et1.frame_id & ~0xFF) | sa, data=bytes([t, 0xFF, 0, 0x2A, 0xFF, 0xFF, 0xFF, 0xFF]),
                    is_extended_id=True)
        for sa, t in ((0x00, 130), (0x01, 120))
    ]
    res = dec.decode(FrameBatch.from_messages(frames))
    keys = {reg.key(s)[:2]: v for s, v in zip(res.samples.sid.tolist(), res.samples.value.tolist(), strict=True)
            if reg.name(s) == "ET1.EngCoolantTemp"}
    assert keys == {("ET1.EngCoolantTemp", "can0/00"): 90.0, ("ET1.EngCoolantTemp", "can0/01"): 80.0}


def _bam(payload: bytes, sa: int = 0, pgn: int = 65226, t0: float = 0.0) -> list[can.Message]:
    n = (len(payload) + 6) // 7
    cm = bytes([32, len(payload) & 0xFF, len(payload) >> 8, n, 0xFF, pgn & 0xFF, (pgn >> 8) & 0xFF, pgn >> 16])
    out = [can.Message(arbitration_id=make_id(0xEC00, sa, 7, 0xFF), data=cm, is_extended_id=True, timestamp=t0)]
    for i in range(n):
        chunk = payload[i * 7 : i * 7 + 7].ljust(7, b"\xff")
        out.append(can.Message(arbitration_id=make_id(0xEB00, sa, 7, 0xFF), data=bytes([i + 1]) + chunk,
                               is_extended_id=True, timestamp=t0 + 0.05 * (i + 1)))
    return out


def _dm1_payload(dtcs: list[tuple[int, int, int]], lamps: int = 0x04) -> bytes:
    out = bytearray([lamps, 0xFF])
    for spn, fmi, oc in dtcs:
        out += bytes([spn & 0xFF, (spn >> 8) & 0xFF, ((spn >> 16) << 5) | fmi, oc])
    return bytes(out)


def test_dm1_over_bam_opens_and_closes_dtc_events() -> None:
    reg = SignalRegistry()
    dec = J1939Decoder(reg)
    two = _dm1_payload([(110, 0, 3), (100, 1, 1)])
    r1 = dec.decode(FrameBatch.from_messages(_bam(two, t0=1.0)))
    assert sorted((e.kind, e.data["spn"], e.data["fmi"]) for e in r1.events) == [
        ("dtc_open", 100, 1), ("dtc_open", 110, 0)]
    assert r1.events[0].data["amber_warning"] == 1
    one = _dm1_payload([(110, 0, 4)]) + b"\xff\xff"
    single = can.Message(arbitration_id=make_id(65226, 0), data=one, is_extended_id=True, timestamp=3.0)
    r2 = dec.decode(FrameBatch.from_messages([single]))
    # 110's occurrence count went from 3 to 4: still active, so an update, not a new open.
    assert [(e.kind, e.data["spn"]) for e in r2.events] == [("dtc_update", 110), ("dtc_close", 100)]
    assert r2.events[0].data["changed"] == ["occurrence"] and r2.events[0].data["occurrence"] == 4


def test_transport_out_of_order_duplicate_abort_timeout() -> None:
    errors: Counter[str] = Counter()
    tp = TransportReassembler(errors)
    payload = bytes(range(20))
    frames = _bam(payload, sa=5)
    cm, dts = frames[0], frames[1:]
    tp.on_cm(0.0, 5, 0xFF, bytes(cm.data))
    assert tp.on_dt(0.01, 5, 0xFF, bytes(dts[2].data)) is None
    assert tp.on_dt(0.02, 5, 0xFF, bytes(dts[0].data)) is None
    assert tp.on_dt(0.03, 5, 0xFF, bytes(dts[0].data)) is None  # retransmitted packet
    done = tp.on_dt(0.04, 5, 0xFF, bytes(dts[1].data))
    assert done is not None and done.payload == payload and done.pgn == 65226
    # Abort from the receiver side of a CMDT connection.
    rts = bytes([16, 20, 0, 3, 0xFF, 0xCA, 0xFE, 0x00])
    tp.on_cm(1.0, 5, 0x17, rts)
    tp.on_cm(1.1, 0x17, 5, bytes([255, 1, 0xFF, 0xFF, 0xFF, 0xCA, 0xFE, 0x00]))
    assert errors["tp_aborted"] == 1 and tp.open_sessions == 0
    # A session that goes quiet for longer than T1 is dropped.
    tp.on_cm(2.0, 5, 0xFF, bytes(cm.data))
    assert tp.on_dt(3.0, 5, 0xFF, bytes(dts[0].data)) is None
    assert errors["tp_timeout"] == 1
    # A packet without an announcement is an orphan, a bad announcement is refused.
    assert tp.on_dt(4.0, 9, 0xFF, bytes(dts[0].data)) is None
    tp.on_cm(5.0, 5, 0xFF, bytes([32, 200, 0, 2, 0xFF, 0xCA, 0xFE, 0]))
    assert errors["tp_orphan_packet"] == 1 and errors["tp_bad_announce"] == 1


def test_parse_dm1_rejects_short_and_skips_padding() -> None:
    with pytest.raises(ValueError):
        parse_dm1(b"\x00\xff")
    dm1 = parse_dm1(bytes([0x40, 0xFF, 0, 0, 0, 0, 0xFF, 0xFF]))
    assert dm1.dtcs == () and dm1.mil == 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0x1FFFFFFF), st.binary(max_size=8), st.booleans(), st.booleans()),
                max_size=40))
def test_hostile_frames_never_crash(frames: list[tuple[int, bytes, bool, bool]]) -> None:
    msgs = [can.Message(arbitration_id=i if ext else i & 0x7FF, data=d, is_extended_id=ext, is_error_frame=err,
                        timestamp=k * 0.01)
            for k, (i, d, ext, err) in enumerate(frames)]
    # Hostile transport traffic too: announcements and packets with random contents from one source.
    msgs += [can.Message(arbitration_id=make_id(0xEC00 if k % 3 == 0 else 0xEB00, 7, 7, 0xFF),
                         data=d.ljust(8, b"\0"), is_extended_id=True, timestamp=1 + k * 0.01)
             for k, (_, d, _, _) in enumerate(frames)]
    dec = J1939Decoder(SignalRegistry())
    res = dec.decode(FrameBatch.from_messages(msgs))
    assert len(res.samples.ts) == len(res.samples.value)
    assert np.isfinite(res.samples.value).all()


def test_missing_or_bad_dbc_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DbcError, match="no such DBC"):
        J1939Decoder(SignalRegistry(), [tmp_path / "nope.dbc"])
    bad = tmp_path / "bad.dbc"
    bad.write_text("BO_ this is not a dbc")
    with pytest.raises(DbcError, match="not a usable DBC"):
        J1939Decoder(SignalRegistry(), [bad])


def test_real_tractor_trace_decodes_to_physical_ranges() -> None:
    dbc = shared_file("dbc/j1939_vector_v7.2__osu-cybercan__patched.dbc")
    log = shared_file("can/johndeere_5055e/highRPM1_candumpL.log")
    frames = list(can.LogReader(str(log)))
    dec, got = _decode(frames, (str(dbc),))
    assert dec.frames == len(frames)
    assert dec.frames_decoded / dec.frames > 0.45  # ~45 % of this bus is Deere-proprietary
    rpm = np.array(got["EEC1.EngSpeed"])
    # Cranking, idle and run-up: never negative, a diesel's run-up well under 3000 rpm.
    assert rpm.min() >= 0 and 800 < rpm.max() < 3000
    assert min(got["EFL_P1.EngOilPress"]) >= 0 and max(got["EFL_P1.EngOilPress"]) < 1000
    assert min(got["ET1.EngCoolantTemp"]) >= -40 and max(got["ET1.EngCoolantTemp"]) < 120


def test_real_canedge_trace_dm1_reassembly() -> None:
    dbc = shared_file("dbc/j1939_vector_v7.2__osu-cybercan__patched.dbc")
    log = shared_file("can/css_canedge/css_11111111_00000012_00000001_candumpL.log")
    dec, _ = _decode(list(can.LogReader(str(log))), (str(dbc),))
    events = dec.last_events  # type: ignore[attr-defined]
    opened = [e for e in events if e.kind == "dtc_open"]
    assert opened, "this trace carries DM1 over BAM with active DTCs"
    for e in opened:
        assert 0 < e.data["spn"] < 2**19 and 0 <= e.data["fmi"] < 32


def test_an_ieee_float_signal_that_is_nan_is_counted_not_a_sample(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A user DBC with a float signal: NaN/inf is no reading, and the wire (harvester_common/wire.py) refuses non-finite
    values, so the decoder counts it (`value_not_finite`) instead of emitting a sample."""
    import struct

    dbc = tmp_path / "float.dbc"
    dbc.write_text(
        'VERSION ""\n\nNS_ :\n\nBS_:\n\nBU_:\n\n'
        "BO_ 2566848766 FLT: 8 Vector__XXX\n"
        ' SG_ Reading : 0|32@1- (1,0) [0|0] "bar" Vector__XXX\n\n'
        "SIG_VALTYPE_ 2566848766 Reading : 1;\n"
    )
    frames = [can.Message(arbitration_id=0x18FF00FE, is_extended_id=True, timestamp=float(i),
                          data=struct.pack("<f", v) + b"\xff" * 4)
              for i, v in enumerate([1.5, float("nan"), float("inf"), 2.5])]
    dec, got = _decode(frames, (str(dbc),))
    assert got["FLT.Reading"] == [1.5, 2.5]
    assert dec.errors["value_not_finite"] == 2
