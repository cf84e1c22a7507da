"""NMEA decoding on real receiver captures, and hostile serial bytes."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.decode.nmea import NmeaDecoder, checksum
from harvester_testing.data import SHARED_DATA, shared_file


def _line(body: str) -> bytes:
    return f"${body}*{checksum(body):02X}\r\n".encode()


def test_gga_rmc_vtg_any_talker() -> None:
    d = NmeaDecoder()
    gga = dict(d.decode_line(_line("GNGGA,123519,4807.038,N,01131.000,W,1,08,0.9,545.4,M,46.9,M,,")))
    assert abs(gga["GPS.Latitude"] - 48.1173) < 1e-4 and abs(gga["GPS.Longitude"] + 11.516666) < 1e-4
    assert gga["GPS.FixQuality"] == 1 and gga["GPS.Satellites"] == 8 and gga["GPS.Altitude"] == 545.4
    rmc = dict(d.decode_line(_line("GPRMC,123519,A,2803.000,N,08157.000,W,010.0,084.4,230394,003.1,W")))
    assert abs(rmc["GPS.SpeedKmh"] - 18.52) < 1e-9 and rmc["GPS.Course"] == 84.4
    assert d.sentences == 2 and not d.errors
    d = NmeaDecoder()  # on its own: the RMC above already gave speed and course for its fix
    vtg = dict(d.decode_line(_line("GLVTG,054.7,T,034.4,M,005.5,N,010.2,K")))
    assert vtg == {"GPS.Course": 54.7, "GPS.SpeedKmh": 10.2}


def test_no_fix_gives_quality_only() -> None:
    d = NmeaDecoder()
    assert d.decode_line(_line("GPGGA,123519,,,,,0,00,,,M,,M,,")) == [("GPS.FixQuality", 0.0)]
    assert d.decode_line(_line("GPRMC,123519,V,,,,,,,230394,,")) == []


def test_bad_lines_are_counted_by_reason() -> None:
    d = NmeaDecoder()
    good = _line("GPVTG,054.7,T,034.4,M,005.5,N,010.2,K")
    bad_cs = good.replace(b"*", b"*0")[:-3] + b"\r\n"
    cases = [bad_cs, b"GPGGA,no,dollar*00", b"$GPGGA,123519,4807.038,N\r\n", b"\xff\xfe\x00garbage",
             _line("GPGGA,123519,9907.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"), _line("GPGGA,1")]
    for c in cases:
        assert d.decode_line(c) == []
    assert sum(d.errors.values()) == len(cases)
    assert set(d.errors) <= {"bad_checksum", "no_start", "no_checksum", "not_ascii", "malformed"}


def test_real_receiver_captures() -> None:
    shared_file("nmea/gpsd_ublox-neo-m9n-nmea.log")
    d = NmeaDecoder()
    lats: list[float] = []
    lines = 0
    for f in sorted((SHARED_DATA / "nmea").glob("gpsd_*.log")):
        for raw in f.read_bytes().splitlines():
            if raw.startswith(b"#") or not raw.strip():
                continue
            lines += 1
            lats += [v for k, v in d.decode_line(raw) if k == "GPS.Latitude"]
    assert d.sentences > 1000
    assert lats and all(-90 <= x <= 90 for x in lats)
    # Real captures carry many sentence types we do not use; those are ignored, not errors.
    assert sum(d.errors.values()) < 0.01 * lines


def test_pynmea2_example_with_deliberately_bad_lines() -> None:
    p = shared_file("nmea/pynmea2_examples_data.log")
    d = NmeaDecoder()
    for raw in p.read_bytes().splitlines():
        d.decode_line(raw)
    assert d.sentences + d.ignored + sum(d.errors.values()) == len(p.read_bytes().splitlines())


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120))
def test_random_bytes_never_crash(data: bytes) -> None:
    d = NmeaDecoder()
    out = d.decode_line(data)
    assert isinstance(out, list)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="0123456789.,NSEWAVKTM-nainf+e", max_size=12), min_size=1, max_size=16),
       st.sampled_from(["GPGGA", "GNRMC", "GPVTG"]))
def test_well_checksummed_garbage_fields_never_crash(fields: list[str], kind: str) -> None:
    d = NmeaDecoder()
    for name, v in d.decode_line(_line(",".join([kind, *fields]))):
        assert name.startswith("GPS.") and math.isfinite(v)


# --- one sample per value and fix: GGA, RMC and VTG of one epoch overlap -------------------------------------


def _fix_time(raw: bytes) -> float | None:
    """The UTC time field of a GGA/RMC line (the fix epoch), None for any other line."""
    text = raw.decode("ascii", "replace").strip()
    if not text.startswith("$") or text[3:6] not in ("GGA", "RMC"):
        return None
    f = text.split("*")[0].split(",")
    try:
        return float(f[1]) if len(f) > 1 and f[1] else None
    except ValueError:
        return None


def test_one_value_per_signal_and_fix_from_gga_rmc_vtg() -> None:
    d = NmeaDecoder()
    epoch = [_line("GNGGA,123519.00,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"),
             _line("GNRMC,123519.00,A,4807.038,N,01131.000,E,010.0,084.4,230394,003.1,W"),
             _line("GNVTG,084.4,T,,M,010.0,N,018.5,K")]
    out = [kv for line in epoch for kv in d.decode_line(line)]
    names = [k for k, _ in out]
    assert sorted(names) == sorted(set(names))  # each signal once for this fix
    got = dict(out)
    assert set(got) == {"GPS.Latitude", "GPS.Longitude", "GPS.Altitude", "GPS.FixQuality", "GPS.Satellites",
                        "GPS.HDOP", "GPS.SpeedKmh", "GPS.Course"}
    assert got["GPS.Altitude"] == 545.4 and got["GPS.FixQuality"] == 1  # from GGA
    assert abs(got["GPS.SpeedKmh"] - 18.52) < 1e-9 and got["GPS.Course"] == 84.4  # from RMC, first of RMC/VTG
    assert d.sentences == 3 and not d.errors
    # The next fix yields everything again.
    nxt = [kv for line in (_line("GNGGA,123520.00,4807.039,N,01131.000,E,1,08,0.9,545.5,M,46.9,M,,"),
                           _line("GNRMC,123520.00,A,4807.039,N,01131.000,E,011.0,085.0,230394,003.1,W"))
           for kv in d.decode_line(line)]
    assert sorted(k for k, _ in nxt) == sorted(set(got))


def test_a_fix_only_one_sentence_reports_keeps_its_values() -> None:
    # RMC alone (a receiver configured without GGA): position, speed and course.
    d = NmeaDecoder()
    rmc = dict(d.decode_line(_line("GPRMC,010101.00,A,2803.000,N,08157.000,W,010.0,084.4,230394,003.1,W")))
    assert set(rmc) == {"GPS.Latitude", "GPS.Longitude", "GPS.SpeedKmh", "GPS.Course"}
    # GGA without a fix, then a valid RMC of the same epoch: the RMC's position is not lost.
    d = NmeaDecoder()
    assert d.decode_line(_line("GPGGA,010102.00,,,,,0,00,,,M,,M,,")) == [("GPS.FixQuality", 0.0)]
    assert {k for k, _ in d.decode_line(_line("GPRMC,010102.00,A,2803.000,N,08157.000,W,1.0,84.4,230394,,"))} == {
        "GPS.Latitude", "GPS.Longitude", "GPS.SpeedKmh", "GPS.Course"}
    # GGA + VTG, no RMC: VTG's speed and course after the GGA of its fix.
    d = NmeaDecoder()
    d.decode_line(_line("GPGGA,010103.00,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"))
    assert dict(d.decode_line(_line("GPVTG,054.7,T,034.4,M,005.5,N,010.2,K"))) == {"GPS.Course": 54.7,
                                                                            "GPS.SpeedKmh": 10.2}
    # VTG alone, no time anywhere: every sentence is its own reading.
    d = NmeaDecoder()
    for _ in range(3):
        assert len(d.decode_line(_line("GPVTG,054.7,T,034.4,M,005.5,N,010.2,K"))) == 2


def test_real_captures_one_value_per_signal_and_fix_and_none_lost() -> None:
    """On every real capture: no signal twice in one fix, and every (signal, fix) that any single sentence
    reports is still there (decoding each line on its own, without the de-duplication, is the reference)."""
    shared_file("nmea/gpsd_ublox-neo-m9n-nmea.log")
    files = sorted((SHARED_DATA / "nmea").glob("*.log"))
    fixes_with_both = 0
    for f in files:
        d = NmeaDecoder()
        epoch: float | None = None
        got: list[tuple[str, object]] = []
        want: set[tuple[str, object]] = set()
        kinds_per_epoch: dict[object, set[str]] = {}
        # Lines with no fix time to go by are each their own epoch, as the decoder treats them.
        for serial, raw in enumerate(f.read_bytes().splitlines()):
            ref = NmeaDecoder()
            alone = ref.decode_line(raw)
            if ref.sentences and raw[3:6] in (b"GGA", b"RMC"):
                epoch = _fix_time(raw)  # a GGA/RMC without a time starts an untimed stretch
            key: object = epoch if epoch is not None else ("untimed", serial)
            for name, _ in d.decode_line(raw):
                got.append((name, key))
            want.update((name, key) for name, _ in alone)
            if alone and raw[3:6] in (b"GGA", b"RMC"):
                kinds_per_epoch.setdefault(key, set()).add(raw[3:6].decode())
        assert len(got) == len(set(got)), f"{f.name}: a signal twice in one fix"
        assert set(got) == want, f"{f.name}: lost {sorted(want - set(got))[:5]}"
        fixes_with_both += sum(1 for k in kinds_per_epoch.values() if k == {"GGA", "RMC"})
    assert fixes_with_both > 500  # the captures really do carry both sentences per fix


def test_pipeline_one_sample_per_signal_and_time() -> None:
    """What the serial source hands over: one epoch's lines read in one chunk share a timestamp."""
    import numpy as np

    from agent.pipeline import Pipeline
    from agent.records import SampleArrays
    from agent.signals import SignalRegistry

    seen: list[SampleArrays] = []
    reg = SignalRegistry()
    p = Pipeline(reg, {"gps": NmeaDecoder(reg, "gps")}, None, None, tap=seen.append)
    p.feed("gps", [(100.0, _line("GNGGA,123519.00,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,")),
                       (100.0, _line("GNRMC,123519.00,A,4807.038,N,01131.000,E,010.0,084.4,230394,003.1,W")),
                       (100.0, _line("GNVTG,084.4,T,,M,010.0,N,018.5,K"))])
    p.feed("gps", [(101.0, _line("GNGGA,123520.00,4807.039,N,01131.000,E,1,08,0.9,545.5,M,46.9,M,,")),
                       (101.0, _line("GNRMC,123520.00,A,4807.039,N,01131.000,E,010.0,084.4,230394,003.1,W"))])
    sid = np.concatenate([s.sid for s in seen])
    ts = np.concatenate([s.ts for s in seen])
    pairs = list(zip(sid.tolist(), ts.tolist(), strict=True))
    assert len(pairs) == len(set(pairs)) == 16


def test_a_repeated_sentence_is_a_new_fix_even_with_a_stuck_clock() -> None:
    """Each sentence appears once per fix: a second GGA with the same time (a receiver whose clock is not running
    yet) is the next fix, not a duplicate; two constellations' GGA of one fix (GP, GL) are one."""
    d = NmeaDecoder()
    for _ in range(3):
        assert d.decode_line(_line("GPGGA,000000.00,,,,,0,00,,,M,,M,,")) == [("GPS.FixQuality", 0.0)]
    d = NmeaDecoder()
    gp = d.decode_line(_line("GPGGA,123519.00,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"))
    gl = d.decode_line(_line("GLGGA,123519.00,4807.038,N,01131.000,E,1,05,0.9,545.4,M,46.9,M,,"))
    assert len(gp) == 6 and gl == [] and d.repeated == 6
    vtg = _line("GPVTG,054.7,T,034.4,M,005.5,N,010.2,K")
    assert len(d.decode_line(vtg)) == 2 and len(d.decode_line(vtg)) == 2  # VTG twice after one GGA: two readings
