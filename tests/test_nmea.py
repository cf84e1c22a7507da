"""NMEA decoding on real receiver captures, and hostile serial bytes."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.decode.nmea import NmeaDecoder, checksum
from agent.testing.data import SHARED_DATA, shared_file


def _line(body: str) -> bytes:
    return f"${body}*{checksum(body):02X}\r\n".encode()


def test_gga_rmc_vtg_any_talker() -> None:
    d = NmeaDecoder()
    gga = dict(d.decode(_line("GNGGA,123519,4807.038,N,01131.000,W,1,08,0.9,545.4,M,46.9,M,,")))
    assert abs(gga["GPS.Latitude"] - 48.1173) < 1e-4 and abs(gga["GPS.Longitude"] + 11.516666) < 1e-4
    assert gga["GPS.FixQuality"] == 1 and gga["GPS.Satellites"] == 8 and gga["GPS.Altitude"] == 545.4
    rmc = dict(d.decode(_line("GPRMC,123519,A,2803.000,N,08157.000,W,010.0,084.4,230394,003.1,W")))
    assert abs(rmc["GPS.SpeedKmh"] - 18.52) < 1e-9 and rmc["GPS.Course"] == 84.4
    vtg = dict(d.decode(_line("GLVTG,054.7,T,034.4,M,005.5,N,010.2,K")))
    assert vtg == {"GPS.Course": 54.7, "GPS.SpeedKmh": 10.2}
    assert d.sentences == 3 and not d.errors


def test_no_fix_gives_quality_only() -> None:
    d = NmeaDecoder()
    assert d.decode(_line("GPGGA,123519,,,,,0,00,,,M,,M,,")) == [("GPS.FixQuality", 0.0)]
    assert d.decode(_line("GPRMC,123519,V,,,,,,,230394,,")) == []


def test_bad_lines_are_counted_by_reason() -> None:
    d = NmeaDecoder()
    good = _line("GPVTG,054.7,T,034.4,M,005.5,N,010.2,K")
    bad_cs = good.replace(b"*", b"*0")[:-3] + b"\r\n"
    cases = [bad_cs, b"GPGGA,no,dollar*00", b"$GPGGA,123519,4807.038,N\r\n", b"\xff\xfe\x00garbage",
             _line("GPGGA,123519,9907.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,"), _line("GPGGA,1")]
    for c in cases:
        assert d.decode(c) == []
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
            lats += [v for k, v in d.decode(raw) if k == "GPS.Latitude"]
    assert d.sentences > 1000
    assert lats and all(-90 <= x <= 90 for x in lats)
    # Real captures carry many sentence types we do not use; those are ignored, not errors.
    assert sum(d.errors.values()) < 0.01 * lines


def test_pynmea2_example_with_deliberately_bad_lines() -> None:
    p = shared_file("nmea/pynmea2_examples_data.log")
    d = NmeaDecoder()
    for raw in p.read_bytes().splitlines():
        d.decode(raw)
    assert d.sentences + d.ignored + sum(d.errors.values()) == len(p.read_bytes().splitlines())


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120))
def test_random_bytes_never_crash(data: bytes) -> None:
    d = NmeaDecoder()
    out = d.decode(data)
    assert isinstance(out, list)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="0123456789.,NSEWAVKTM-nainf+e", max_size=12), min_size=1, max_size=16),
       st.sampled_from(["GPGGA", "GNRMC", "GPVTG"]))
def test_well_checksummed_garbage_fields_never_crash(fields: list[str], kind: str) -> None:
    d = NmeaDecoder()
    for name, v in d.decode(_line(",".join([kind, *fields]))):
        assert name.startswith("GPS.") and math.isfinite(v)
