"""J1939 the way mechanics read it: DTC events in words (SPN and FMI text) with the lamps and occurrence count,
DM2 (previously active DTCs), and address claim (an ECU's 64-bit NAME as its signals' source, so that a new address
does not make it a new ECU). Crafted traces (python-can messages, some from the simulator's encoders, some written
byte by byte), the real tractor and truck traces in ../shared/data/can, and hypothesis for hostile bytes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import can
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.decode.j1939 import J1939Decoder
from agent.decode.j1939_addr import AddressBook, name_fields
from agent.decode.j1939_dtc import lamp_fields
from agent.decode.j1939_id import make_id
from agent.decode.j1939_tp import PGN_DM1, PGN_DM2, Dtc
from agent.frames import FrameBatch
from agent.records import Event
from agent.signals import SignalRegistry
from harvester_common.j1939_text import FMI_TEXT, DtcText, fmi_text, spn_names_from_signals, words_of
from harvester_sim import (
    SIM_ENGINE_NAME,
    Harvester,
    J1939Transmitter,
    address_claim_frame,
    bam_frames,
    dm_frames,
    encode_dm1,
    make_name,
)
from harvester_testing.data import SHARED_DATA, shared_file

ENGINE = make_name(identity=0x4242, manufacturer=0x123, function=0)
PUMP = make_name(identity=0x777, manufacturer=0x123, function=0x81)
ET1_ID = 0x18FEEE00  # Engine Temperature 1, coolant temperature in byte 0 (offset -40 degC)
DTC_KEYS = {"source", "sa", "spn", "fmi", "occurrence", "mil", "red_stop", "amber_warning", "protect", "spn_name",
            "fmi_text", "text"}


def et1(sa: int, t: float, coolant_c: int = 90) -> can.Message:
    return can.Message(arbitration_id=(ET1_ID & ~0xFF) | sa, timestamp=t, is_extended_id=True,
                       data=bytes([coolant_c + 40, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]))


def dm1(sa: int, t: float, dtcs: list[Dtc], lamps: int | None = None) -> list[can.Message]:
    return dm_frames(PGN_DM1, encode_dm1(dtcs, lamps), sa, t)


class Run:
    """One decoder fed batch after batch, keeping every sample as (signal, source, value) and every event."""

    def __init__(self, dbcs: tuple[Path, ...] = ()) -> None:
        self.reg = SignalRegistry()
        self.dec = J1939Decoder(self.reg, list(dbcs))
        self.samples: list[tuple[float, str, str, float]] = []  # (time, signal, source, value)
        self.events: list[Event] = []
        self.state_changes = 0

    def feed(self, msgs: list[can.Message]) -> list[Event]:
        res = self.dec.decode(FrameBatch.from_messages(msgs))
        for t, sid, v in zip(res.samples.ts.tolist(), res.samples.sid.tolist(), res.samples.value.tolist(),
                             strict=True):
            name, source, _ = self.reg.key(sid)
            self.samples.append((t, name, source, v))
        self.events += res.events
        self.state_changes += res.state_changed
        return res.events

    def sources(self, signal: str) -> list[str]:
        """The signal's source sample by sample, in time order."""
        return [s for _, n, s, _ in sorted(self.samples) if n == signal]


def kinds(events: list[Event]) -> list[tuple[str, int, int]]:
    return [(e.kind, e.data["spn"], e.data["fmi"]) for e in events]


# --- SPN and FMI text ------------------------------------------------------------------------------------------------

def test_the_32_fmis_and_the_text_a_mechanic_reads() -> None:
    assert len(FMI_TEXT) == 32 and len(set(FMI_TEXT[:22])) == 22  # 0..21 assigned, each its own meaning
    assert FMI_TEXT[22:31] == ("reserved",) * 9 and fmi_text(31) == "condition exists"
    assert fmi_text(32) == "invalid FMI 32"
    text = Run().dec.dtcs.text  # built from the default DBC's SPN attributes
    assert text.text(110, 0) == "SPN 110 Engine Coolant Temperature, FMI 0: above normal, most severe"
    assert DtcText().text(5246, 31) == "SPN 5246 (unknown), FMI 31: condition exists"
    assert text.fields(1638, 16) == {"spn_name": "Hydraulic Temperature", "fmi_text": "above normal, moderately severe",
                                     "text": "SPN 1638 Hydraulic Temperature, FMI 16: above normal, moderately severe"}
    assert text.fields(475711, 2)["spn_name"] is None


def test_stored_words_are_the_vehicles_only_when_they_are_about_this_dtc() -> None:
    """One rule for every reader of stored DTC events (the fleet page, the assistant): a vehicle's words are shown
    when they name this SPN and FMI (its DBC may name an SPN the built-in table does not); otherwise, words about
    another DTC, an event from before vehicles sent words, a number, the words are made from the table."""
    table = DtcText()
    own = "SPN 520192 Auger Bearing Temperature, FMI 0: above normal, most severe"
    assert table.words(520192, 0, own) == own
    assert table.words(520192, 0, own + " " + "x" * 400) == (own + " " + "x" * 400)[:300]
    made = "SPN 110 Engine Coolant Temperature, FMI 0: above normal, most severe"
    for said in (None, 110, "", "SPN 111 Coolant Level, FMI 1: below normal, most severe",  # another SPN
                 "SPN 110 Engine Coolant Temperature, FMI 1: below normal, most severe",  # another FMI
                 "SPN 1100 x, FMI 0: y", "<script>x</script>", "SPN 110 " + "x" * 400 + ", FMI 0: y"):
        assert table.words(110, 0, said) == made, said
    for spn, fmi in ((None, 0), (110, None), (-1, 0), (1 << 19, 0), (110, 32), (110, -1)):
        assert table.words(spn, fmi, own) == "", (spn, fmi)


def test_spn_names_come_from_the_dbcs_signal_attributes(tmp_path: Path) -> None:
    assert words_of("EngOilTemp1") == "Engine Oil Temperature 1"
    assert words_of("AftrtrtmntSCROprtrIndcmntSvrity") == "Aftertreatment SCR Operator Inducement Severity"
    assert words_of("BatteryPotential_PowerInput1") == "Battery Potential Power Input 1"
    # Several signals carry one SPN: the least abbreviated wording wins, whatever the order.
    assert spn_names_from_signals([(110, "EngCoolantTemp"), (110, "EngineCoolantTemperatureX")])[110] == \
        "Engine Coolant Temperature X"
    assert spn_names_from_signals([(1 << 19, "TooBig"), (5, "")]) == {}
    user = tmp_path / "user.dbc"
    user.write_text(
        'VERSION ""\n\nNS_ :\n\nBS_:\n\nBU_:\n\n'
        "BO_ 2566848766 PUMP: 8 Vector__XXX\n"
        ' SG_ MainPumpPress : 0|8@1+ (4,0) [0|1000] "kPa" Vector__XXX\n\n'
        'BA_DEF_ SG_  "SPN" INT 0 524287;\nBA_DEF_DEF_  "SPN" 0;\n'
        'BA_ "SPN" SG_ 2566848766 MainPumpPress 520300;\n'
    )
    text = Run((user,)).dec.dtcs.text
    assert text.text(520300, 1) == "SPN 520300 Main Pump Pressure, FMI 1: below normal, most severe"
    assert text.spn_name(100) == "Engine Oil Pressure"  # the built-in DBC still names the rest


def test_vector_database_names_thousands_of_spns() -> None:
    dbc = shared_file("dbc/j1939_vector_v7.2__osu-cybercan__patched.dbc")
    text = Run((dbc,)).dec.dtcs.text
    assert len(text.spn_names) > 3000
    assert text.spn_name(110) == "Engine Coolant Temperature" and text.spn_name(190) == "Engine Speed"
    assert text.text(5246, 31) == ("SPN 5246 Aftertreatment SCR Operator Inducement Severity, FMI 31: "
                                   "condition exists")


# --- DM1: lamps, occurrence, text on every event -----------------------------------------------------------------

def test_every_dtc_event_carries_lamps_occurrence_and_text() -> None:
    r = Run()
    amber_and_red = 0b00_01_01_00  # MIL off, red stop on, amber on, protect off
    (opened,) = r.feed(dm1(0x00, 1.0, [Dtc(110, 0, 3)], amber_and_red))
    assert opened.kind == "dtc_open" and set(opened.data) == DTC_KEYS
    assert opened.data == {
        "source": "can0/00", "sa": 0, "spn": 110, "fmi": 0, "occurrence": 3, "mil": 0, "red_stop": 1,
        "amber_warning": 1, "protect": 0, "spn_name": "Engine Coolant Temperature",
        "fmi_text": "above normal, most severe",
        "text": "SPN 110 Engine Coolant Temperature, FMI 0: above normal, most severe"}
    (closed,) = r.feed(dm1(0x00, 2.0, [], 0b00_00_00_00))
    assert closed.kind == "dtc_close" and set(closed.data) == DTC_KEYS
    # The lamps as they are when it closed; the last occurrence count it had.
    assert (closed.data["red_stop"], closed.data["amber_warning"], closed.data["occurrence"]) == (0, 0, 3)
    assert closed.data["text"] == opened.data["text"]
    # The keys in the order records have always been written in (the JSON's bytes), the lamps as lamp_fields has them.
    order = ["source", "sa", "spn", "fmi", "occurrence", *lamp_fields((0, 1, 1, 0)), "spn_name", "fmi_text", "text"]
    assert list(opened.data) == list(closed.data) == order


def test_occurrence_and_lamp_changes_of_an_active_dtc_are_updates_and_repeats_are_silent() -> None:
    r = Run()
    amber, red = 0b00_00_01_00, 0b00_01_00_00
    assert kinds(r.feed(dm1(0, 1.0, [Dtc(110, 0, 1), Dtc(100, 1, 5)], amber))) == [
        ("dtc_open", 100, 1), ("dtc_open", 110, 0)]
    changes = r.state_changes
    for t in (2.0, 3.0, 4.0):  # an ECU repeats its DM1 every second: nothing new, nothing to save
        assert r.feed(dm1(0, t, [Dtc(110, 0, 1), Dtc(100, 1, 5)], amber)) == []
    assert r.state_changes == changes
    (up,) = r.feed(dm1(0, 5.0, [Dtc(110, 0, 2), Dtc(100, 1, 5)], amber))
    assert (up.kind, up.data["spn"], up.data["occurrence"], up.data["changed"]) == ("dtc_update", 110, 2,
                                                                                      ["occurrence"])
    assert set(up.data) == DTC_KEYS | {"changed"} and list(up.data)[-2:] == ["text", "changed"]  # written last
    lamps = r.feed(dm1(0, 6.0, [Dtc(110, 0, 2), Dtc(100, 1, 5)], red))  # escalation: every active DTC says so
    assert [(e.kind, e.data["spn"], e.data["changed"], e.data["red_stop"]) for e in lamps] == [
        ("dtc_update", 100, ["lamps"], 1), ("dtc_update", 110, ["lamps"], 1)]
    both = r.feed(dm1(0, 7.0, [Dtc(110, 0, 3)], amber))
    assert [(e.kind, e.data["spn"], e.data.get("changed")) for e in both] == [
        ("dtc_update", 110, ["occurrence", "lamps"]), ("dtc_close", 100, None)]
    assert r.dec.counters()["dtc_events"] == len(r.events) == 7


def test_the_all_zero_no_active_faults_dm1_makes_no_event() -> None:
    r = Run()
    # As the John Deere tractor's ECUs send it: lamps off, SPN 0 FMI 0, padding.
    none = bytes.fromhex("00ff00000000ffff")
    frames = [can.Message(arbitration_id=make_id(PGN_DM1, sa, 6), data=none, is_extended_id=True, timestamp=t)
              for t in (1.0, 2.0) for sa in (0x00, 0x03, 0x17)]
    assert r.feed(frames) == [] and r.state_changes == 0 and r.dec.active_dtcs() == {}
    assert r.dec.errors == Counter()
    r.feed(dm1(0x03, 3.0, [Dtc(524020, 31, 0)]))
    (closed,) = r.feed([can.Message(arbitration_id=make_id(PGN_DM1, 0x03, 6), data=none, is_extended_id=True,
                                    timestamp=4.0)])
    assert kinds([closed]) == [("dtc_close", 524020, 31)]


def test_dm1_with_several_dtcs_over_bam() -> None:
    r = Run()
    dtcs = [Dtc(110, 0, 2), Dtc(100, 1, 1), Dtc(111, 1, 4), Dtc(1638, 16, 1), Dtc(524287, 31, 126)]
    payload = encode_dm1(dtcs, 0b01_00_01_00)
    assert len(payload) == 22
    frames = bam_frames(PGN_DM1, payload, 0x00, 1.0)
    assert len(frames) == 5  # the announcement and 4 packets
    events = r.feed(frames)
    assert sorted(kinds(events)) == sorted(("dtc_open", d.spn, d.fmi) for d in dtcs)
    assert all(e.data["mil"] == 1 and e.data["amber_warning"] == 1 for e in events)
    by_spn = {e.data["spn"]: e.data for e in events}
    assert by_spn[111]["text"] == "SPN 111 Engine Coolant Level, FMI 1: below normal, most severe"
    assert by_spn[524287]["occurrence"] == 126 and by_spn[524287]["spn_name"] is None
    # The same DM1 again, its packets split over two batches: nothing new.
    again = bam_frames(PGN_DM1, payload, 0x00, 2.0)
    assert r.feed(again[:2]) == [] and r.feed(again[2:]) == []


# --- DM2 -----------------------------------------------------------------------------------------------------------

def test_dm2_single_frame_and_over_bam_and_cmdt_is_one_dtc_previous_event() -> None:
    r = Run()
    (prev,) = r.feed(dm_frames(PGN_DM2, encode_dm1([Dtc(100, 1, 7)], 0), 0x00, 1.0))
    assert prev.kind == "dtc_previous"
    assert prev.data == {"source": "can0/00", "sa": 0, "mil": 0, "red_stop": 0, "amber_warning": 0, "protect": 0,
                         "dtcs": [{"spn": 100, "fmi": 1, "occurrence": 7, "spn_name": "Engine Oil Pressure",
                                   "fmi_text": "below normal, most severe",
                                   "text": "SPN 100 Engine Oil Pressure, FMI 1: below normal, most severe"}]}
    assert r.dec.active_dtcs() == {}  # history, not what is active
    many = encode_dm1([Dtc(110, 0, 2), Dtc(111, 1, 1), Dtc(5246, 31, 9)], 0)
    (bam,) = r.feed(bam_frames(PGN_DM2, many, 0x00, 2.0))
    assert [(d["spn"], d["fmi"], d["occurrence"]) for d in bam.data["dtcs"]] == [(110, 0, 2), (111, 1, 1),
                                                                                  (5246, 31, 9)]
    # The same answer to a service tool's repeated request: no new event, counted.
    assert r.feed(bam_frames(PGN_DM2, many, 0x00, 3.0)) == [] and r.dec.counters()["dm2_unchanged"] == 1
    # Over CMDT to the tool at 0xF9: announce (RTS), the tool's CTS, the packets.
    packets = (len(many) + 6) // 7
    rts = bytes([16, len(many), 0, packets, 0xFF, PGN_DM2 & 0xFF, PGN_DM2 >> 8, 0])
    cts = bytes([17, packets, 1, 0xFF, 0xFF, PGN_DM2 & 0xFF, PGN_DM2 >> 8, 0])
    cmdt = [can.Message(arbitration_id=make_id(0xEC00, 0x03, 7, 0xF9), data=rts, is_extended_id=True, timestamp=4.0),
            can.Message(arbitration_id=make_id(0xEC00, 0xF9, 7, 0x03), data=cts, is_extended_id=True, timestamp=4.01)]
    cmdt += [can.Message(arbitration_id=make_id(0xEB00, 0x03, 7, 0xF9), is_extended_id=True, timestamp=4.02 + i / 100,
                         data=bytes([i + 1]) + many[i * 7 : i * 7 + 7].ljust(7, b"\xff")) for i in range(packets)]
    (tool,) = r.feed(cmdt)
    assert tool.data["source"] == "can0/03" and len(tool.data["dtcs"]) == 3
    (empty,) = r.feed(dm_frames(PGN_DM2, encode_dm1([], 0), 0x00, 5.0))  # history cleared (DM3): an empty list
    assert empty.data["dtcs"] == []
    assert r.dec.errors == Counter()


def test_a_service_tools_request_for_dm2_is_only_a_frame_seen() -> None:
    """The agent listens only (docs/j1939.md): DM2 is decoded when another tool requests it, and the request itself
    is a frame no DBC message describes."""
    r = Run()
    request = can.Message(arbitration_id=make_id(0xEA00, 0xF9, 6, 0x00), data=PGN_DM2.to_bytes(3, "little"),
                          is_extended_id=True, timestamp=1.0)
    assert r.feed([request]) == [] and r.dec.counters()["frames_unknown"] == 1


# --- address claim -----------------------------------------------------------------------------------------------

def test_an_ecu_that_moves_to_a_new_address_keeps_one_source_and_its_dtcs() -> None:
    r = Run()
    first = [et1(0x00, 0.1), *dm1(0x00, 0.2, [Dtc(110, 0, 1)])]  # the agent started mid-stream: no claim yet
    claim = [address_claim_frame(ENGINE, 0x00, 0.3), et1(0x00, 0.4), et1(0x05, 0.45, 70)]  # 0x05: someone else
    moved = [address_claim_frame(ENGINE, 0x05, 1.0), et1(0x05, 1.1), *dm1(0x05, 1.2, [Dtc(110, 0, 1)]),
             et1(0x05, 1.3)]
    r.feed(first + claim + moved)  # one batch: the claims split it where they change an address's holder
    src = f"can0/{ENGINE:016X}"
    assert r.sources("ET1.EngCoolantTemp") == ["can0/00", src, "can0/05", src, src]
    assert [v for _, n, s, v in r.samples if n == "ET1.EngCoolantTemp" and s == src] == [90.0, 90.0, 90.0]
    (opened,) = r.events  # announced once under the address; the claim and the move open and close nothing
    assert opened.kind == "dtc_open" and opened.data["source"] == "can0/00"
    (closed,) = r.feed(dm1(0x05, 2.0, []))
    # It closes under the source it was announced under, so (source, spn, fmi) pairs it with its open.
    assert closed.kind == "dtc_close" and closed.data["source"] == "can0/00" and closed.data["sa"] == 0x05
    (again,) = r.feed(dm1(0x05, 3.0, [Dtc(110, 0, 2)]))
    assert again.data["source"] == src  # a new open: the ECU's NAME now
    assert r.dec.counters()["address_claims"] == 2 and r.dec.counters()["address_changes"] == 2


def test_the_same_move_batch_by_batch_gives_the_same_sources() -> None:
    one, many = Run(), Run()
    frames = [address_claim_frame(ENGINE, 0x00, 0.0), et1(0x00, 0.1), *dm1(0x00, 0.15, [Dtc(100, 1, 1)]),
              address_claim_frame(ENGINE, 0x05, 0.2), et1(0x05, 0.3), et1(0x00, 0.35),
              address_claim_frame(ENGINE, 0x05, 0.4), *dm1(0x05, 0.5, [Dtc(100, 1, 1)]), et1(0x05, 0.6)]
    one.feed(frames)
    for m in frames:
        many.feed([m])
    assert sorted(one.samples) == sorted(many.samples)
    assert kinds(one.events) == kinds(many.events) == [("dtc_open", 100, 1)]
    src = f"can0/{ENGINE:016X}"
    assert one.sources("ET1.EngCoolantTemp") == [src, src, "can0/00", src]  # 0x00 is nobody's after the move


def test_an_address_taken_by_another_name_remaps_it() -> None:
    r = Run()
    r.feed([address_claim_frame(ENGINE, 0x00, 0.0), et1(0x00, 0.1), *dm1(0x00, 0.2, [Dtc(110, 0, 1)])])
    # The pump wins address 0x00 (lower NAME wins arbitration): the engine lost it and says it cannot claim.
    r.feed([address_claim_frame(PUMP, 0x00, 1.0), address_claim_frame(ENGINE, 254, 1.01), et1(0x00, 1.1),
            *dm1(0x00, 1.2, [])])
    assert r.sources("ET1.EngCoolantTemp") == [f"can0/{ENGINE:016X}", f"can0/{PUMP:016X}"]
    assert kinds(r.events) == [("dtc_open", 110, 0)]  # the pump's empty DM1 says nothing of the engine's DTCs
    assert r.dec.active_dtcs() == {f"can0/{ENGINE:016X}": [(110, 0)]}
    assert r.dec.addresses.names == {0x00: PUMP} and r.dec.counters()["address_cannot_claim"] == 1
    # The engine claims a free address: its DTCs and its source come with it.
    r.feed([address_claim_frame(ENGINE, 0x20, 2.0), et1(0x20, 2.1), *dm1(0x20, 2.2, [Dtc(110, 0, 1)])])
    assert r.sources("ET1.EngCoolantTemp")[-1] == f"can0/{ENGINE:016X}" and len(r.events) == 1


def test_bad_claims_are_counted_and_change_nothing() -> None:
    r = Run()
    short = can.Message(arbitration_id=make_id(0xEE00, 0x00, 6), data=ENGINE.to_bytes(8, "little")[:7],
                        is_extended_id=True, timestamp=0.0)
    from_global = address_claim_frame(ENGINE, 0xFF, 0.1)
    r.feed([short, from_global, et1(0x00, 0.2)])
    assert r.dec.errors["address_claim_malformed"] == 1 and r.dec.errors["address_claim_bad_source"] == 1
    assert r.dec.addresses.names == {} and r.sources("ET1.EngCoolantTemp") == ["can0/00"]
    assert r.dec.counters()["frames_decoded"] == 3 and r.dec.counters()["frames_unknown"] == 0


def test_the_simulated_engine_can_claim_its_address_first() -> None:
    frames = J1939Transmitter(Harvester(seed=1), engine_name=SIM_ENGINE_NAME).frames_until(3.0)
    assert frames[0].arbitration_id == make_id(0xEE00, 0x00, 6) and bytes(frames[0].data) == bytes.fromhex(
        f"{SIM_ENGINE_NAME:016x}")[::-1]
    r = Run()
    r.feed(frames)
    assert set(r.sources("EEC1.EngSpeed")) == {f"can0/{SIM_ENGINE_NAME:016X}"}
    assert set(r.sources("CCVS.WheelBasedVehicleSpeed")) == {"can0/17"}  # that ECU claimed nothing
    assert name_fields(SIM_ENGINE_NAME).function == 0 and name_fields(SIM_ENGINE_NAME).industry_group == 2


def test_name_fields() -> None:
    f = name_fields(make_name(identity=0x1ABCDE, manufacturer=0x5A5, function=0x81, function_instance=3,
                              ecu_instance=5, vehicle_system=0x2A, vehicle_system_instance=9, industry_group=2))
    assert (f.identity, f.manufacturer, f.function, f.function_instance, f.ecu_instance) == (
        0x1ABCDE, 0x5A5, 0x81, 3, 5)
    assert (f.vehicle_system, f.vehicle_system_instance, f.industry_group, f.arbitrary_address_capable) == (
        0x2A, 9, 2, True)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=8), st.booleans()), max_size=40))
def test_hostile_claims_and_dm2s_are_counted_never_a_crash(frames: list[tuple[int, bytes, bool]]) -> None:
    msgs = [can.Message(arbitration_id=make_id(0xEE00 if claim else PGN_DM2, sa, 6), data=d, is_extended_id=True,
                        timestamp=k * 0.01) for k, (sa, d, claim) in enumerate(frames)]
    # Random DM2 payloads over BAM too, and a signal frame after each so sources are exercised.
    msgs += [m for k, (sa, d, _) in enumerate(frames)
             for m in (*bam_frames(PGN_DM2, d * 3 + b"\0" * 3, sa % 254, 1 + k * 0.5), et1(sa, 1.2 + k * 0.5))]
    r = Run()
    r.feed(msgs)
    c, e = r.dec.counters(), r.dec.errors
    claims = sum(1 for _, _, claim in frames if claim)
    assert c["address_claims"] + e["address_claim_malformed"] + e["address_claim_bad_source"] == claims
    assert e["address_claim_malformed"] == sum(1 for _, d, claim in frames if claim and len(d) != 8)
    names = r.dec.addresses.names
    assert len(set(names.values())) == len(names) and all(sa < 254 for sa in names)  # one SA per NAME
    assert all(ev.kind == "dtc_previous" for ev in r.events)
    assert {s for _, _, s, _ in r.samples} <= {r.dec.source(sa) for sa in range(256)} | {
        f"can0/{sa:02X}" for sa in range(256)}
    assert json.loads(json.dumps(r.dec.state())) == r.dec.state()
    back = Run()
    assert back.dec.restore(json.loads(json.dumps(r.dec.state())))
    assert back.dec.addresses.names == names


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=12), st.integers(0, 255))
def test_address_book_parse_never_raises(data: bytes, sa: int) -> None:
    errors: Counter[str] = Counter()
    book = AddressBook(errors)
    name = book.parse(sa, data)
    assert (name is None) == (len(data) != 8 or sa == 255) and sum(errors.values()) == (name is None)


# --- a restart -----------------------------------------------------------------------------------------------------

def test_a_restart_keeps_the_name_map_and_the_dtcs() -> None:
    r = Run()
    r.feed([address_claim_frame(ENGINE, 0x00, 0.0), *dm1(0x00, 0.1, [Dtc(110, 0, 1), Dtc(100, 1, 2)], 0x04)])
    saved = json.loads(json.dumps(r.dec.state()))
    assert saved == {"names": {"00": f"{ENGINE:016X}"},
                     "ecus": {f"{ENGINE:016X}": {"lamps": [0, 0, 1, 0], "dtcs": [
                         [100, 1, 2, f"can0/{ENGINE:016X}"], [110, 0, 1, f"can0/{ENGINE:016X}"]]}}}
    back = Run()
    assert back.dec.restore(saved)
    # No claim since the restart: the address is still known to be the engine's; nothing is announced again.
    assert back.feed([et1(0x00, 10.0), *dm1(0x00, 10.1, [Dtc(110, 0, 1), Dtc(100, 1, 2)], 0x04)]) == []
    assert back.sources("ET1.EngCoolantTemp") == [f"can0/{ENGINE:016X}"]
    # It moved while the agent was down: the claim from the new address, then its DM1 with one DTC cleared.
    ev = back.feed([address_claim_frame(ENGINE, 0x07, 11.0), *dm1(0x07, 11.1, [Dtc(110, 0, 1)], 0x04)])
    assert kinds(ev) == [("dtc_close", 100, 1)] and ev[0].data["source"] == f"can0/{ENGINE:016X}"


def test_the_state_saved_before_names_is_still_accepted() -> None:
    r = Run()
    assert r.dec.restore({"00": [[110, 0]], "03": []})  # as the decoder saved it before this change
    assert r.feed(dm1(0x00, 1.0, [Dtc(110, 0, 4)])) == []  # still active: not announced again
    r.feed([address_claim_frame(ENGINE, 0x00, 2.0)])
    assert r.feed(dm1(0x00, 3.0, [Dtc(110, 0, 4)])) == []  # the address's first claim takes its DTCs along
    (closed,) = r.feed(dm1(0x00, 4.0, []))
    assert closed.data["source"] == "can0/00" and closed.data["occurrence"] == 4


_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=18)),
                     lambda k: st.one_of(st.lists(k, max_size=4), st.dictionaries(st.text(max_size=18), k, max_size=4)),
                     max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_json, st.fixed_dictionaries({"names": _json, "ecus": _json}),
                 st.fixed_dictionaries({"names": st.dictionaries(st.sampled_from(["00", "FE", "0g", "01"]),
                                                                 st.sampled_from([f"{ENGINE:016X}", "x" * 16])),
                                        "ecus": st.dictionaries(st.sampled_from(["00", f"{ENGINE:016X}"]), _json)})))
def test_a_damaged_saved_state_is_refused_and_changes_nothing(saved: Any) -> None:
    r = Run()
    r.feed([address_claim_frame(ENGINE, 0x00, 0.0), *dm1(0x00, 0.1, [Dtc(110, 0, 1)])])
    before = r.dec.state()
    if not r.dec.restore(saved):
        assert r.dec.state() == before
    else:  # what it took must save back as it came
        assert r.dec.restore(json.loads(json.dumps(r.dec.state())))


# --- the real traces -----------------------------------------------------------------------------------------------

def _real(path: Path, dbc: Path | None = None) -> Run:
    r = Run((dbc,) if dbc else ())
    msgs = list(can.LogReader(str(path)))
    for i in range(0, len(msgs), 2000):
        r.feed(msgs[i : i + 2000])
    return r


def test_real_tractor_traces_claim_addresses_and_send_dm1() -> None:
    """The John Deere 5055E logs: five ECUs claim their addresses (again whenever one requests it), the engine at
    0x00; DM1s say "no active faults" except for one proprietary SPN from the ECU at 0x03 in some logs."""
    folder = SHARED_DATA / "can" / "johndeere_5055e"
    if not folder.is_dir():
        pytest.skip(f"real CAN traces absent: {folder} (tests read real data from ../shared/data)")
    opened: Counter[tuple[str, int, int]] = Counter()
    for log in sorted(folder.glob("*.log")):
        r = _real(log)
        opened.update((e.data["source"], e.data["spn"], e.data["fmi"]) for e in r.events)
        assert {e.kind for e in r.events} <= {"dtc_open"}, log.name  # nothing closes or changes in seconds
        assert len(r.events) == len({(e.data["source"], e.data["spn"]) for e in r.events}), log.name
        assert r.dec.counters()["address_changes"] <= 5 and not r.dec.errors["address_claim_malformed"], log.name
        names = r.dec.addresses.names
        if len(names) == 5:  # the logs with the engine running
            assert sorted(names) == [0x00, 0x03, 0x06, 0x17, 0x47]
            fields = [name_fields(n) for n in names.values()]
            assert {f.industry_group for f in fields} == {2}  # agricultural and forestry equipment
            assert len({f.manufacturer for f in fields}) == 1
            engine = f"can0/{names[0x00]:016X}"
            rpm = [v for _, n, _, v in r.samples if n == "EEC1.EngSpeed"]
            assert rpm and set(r.sources("EEC1.EngSpeed")) == {engine}
            assert min(rpm) >= 0 and max(rpm) < 3000
    transmission = f"can0/{0x200203000430744D:016X}"  # the NAME that holds 0x03 in every log
    assert set(opened) == {(transmission, 524020, 31)} and opened[(transmission, 524020, 31)] == 5


def test_real_truck_trace_dm1_over_bam_reads_in_words() -> None:
    dbc = shared_file("dbc/j1939_vector_v7.2__osu-cybercan__patched.dbc")
    r = _real(shared_file("can/css_canedge/css_11111111_00000012_00000001_candumpL.log"), dbc)
    assert r.dec.addresses.names == {}  # this logger caught no address claim
    assert {e.kind for e in r.events} == {"dtc_open"}
    texts = sorted(e.data["text"] for e in r.events)
    assert "SPN 980 Engine PTO Governor Enable Switch, FMI 9: abnormal update rate" in texts
    assert all(set(e.data) == DTC_KEYS and e.data["source"] == "can0/00" for e in r.events)
    assert len(texts) == len(set(texts))  # each opened once though the DM1 repeats over a hundred times
