"""NMEA 0183 GPS sentences → readings. Checksums verified; GGA, RMC and VTG from any talker (GP, GN, GL...).

Signals: GPS.Latitude, GPS.Longitude (degrees, south/west negative), GPS.Altitude (m), GPS.FixQuality (GGA
quality 0-8), GPS.Satellites, GPS.HDOP, GPS.SpeedKmh, GPS.Course (degrees true). A sentence without a fix gives
its fix quality and nothing else.

One value per signal and fix: a receiver reports one fix in several sentences (GGA and RMC both carry the position,
RMC and VTG both carry speed and course), so within one fix epoch, named by the UTC time field of GGA/RMC, a signal
is yielded by the first sentence that carries it and skipped (counted in `repeated`) in the others. VTG has no time
field and belongs to the epoch of the GGA/RMC before it. A GGA/RMC without a time, and anything before the first
timed sentence, has no epoch to go by and is yielded as it is: nothing a receiver reports is dropped for lack of a
time.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

SIGNALS = {
    "GPS.Latitude": "deg",
    "GPS.Longitude": "deg",
    "GPS.Altitude": "m",
    "GPS.FixQuality": "",
    "GPS.Satellites": "",
    "GPS.HDOP": "",
    "GPS.SpeedKmh": "km/h",
    "GPS.Course": "deg",
}
KNOT_KMH = 1.852


class NmeaError(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def checksum(body: str) -> int:
    c = 0
    for ch in body.encode("ascii"):
        c ^= ch
    return c


def _split(line: bytes) -> list[str]:
    try:
        text = line.decode("ascii").strip()
    except UnicodeDecodeError:
        raise NmeaError("not_ascii") from None
    if not text.startswith(("$", "!")):
        raise NmeaError("no_start")
    star = text.rfind("*")
    if star < 0:
        raise NmeaError("no_checksum")
    body, cs = text[1:star], text[star + 1 :]
    try:
        want = int(cs[:2], 16)
    except ValueError:
        raise NmeaError("bad_checksum") from None
    if len(cs) < 2 or checksum(body) != want:
        raise NmeaError("bad_checksum")
    fields = body.split(",")
    if len(fields[0]) < 5:
        raise NmeaError("malformed")
    return fields


def _coord(value: str, hemi: str, deg_digits: int) -> float | None:
    if not value or not hemi:
        return None
    try:
        deg = int(value[:deg_digits])
        minutes = float(value[deg_digits:])
    except ValueError:
        raise NmeaError("malformed") from None
    if not (0 <= minutes < 60):
        raise NmeaError("malformed")
    x = deg + minutes / 60.0
    if hemi in ("S", "W"):
        x = -x
    elif hemi not in ("N", "E"):
        raise NmeaError("malformed")
    limit = 90 if deg_digits == 2 else 180
    if abs(x) > limit:
        raise NmeaError("malformed")
    return x


def _num(s: str) -> float | None:
    if not s:
        return None
    try:
        v = float(s)
    except ValueError:
        raise NmeaError("malformed") from None
    if not math.isfinite(v):  # float() accepts "nan" and "inf"; a sensor never sends them
        raise NmeaError("malformed")
    return v


def _fix_time(s: str) -> float | None:
    """hhmmss(.ss) as a number, only to tell fixes apart; an empty or odd field is no time (not an error: the
    sentence's values stand)."""
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


@dataclass(slots=True)
class NmeaDecoder:
    errors: Counter[str]
    sentences: int = 0
    ignored: int = 0
    repeated: int = 0  # values skipped because an earlier sentence of the same fix gave them
    _epoch: float | None = None  # UTC time field of the last GGA/RMC (None: no time to go by)
    _emitted: dict[str, float] = field(default_factory=dict)  # signal → epoch it was last yielded in

    def __init__(self) -> None:
        self.errors = Counter()
        self.sentences = 0
        self.ignored = 0
        self.repeated = 0
        self._epoch = None
        self._emitted = {}

    def decode(self, line: bytes) -> list[tuple[str, float]]:
        """One line → [(signal, value)]. Bad lines count by reason and yield nothing; they never raise."""
        try:
            fields = _split(line)
            kind = fields[0][-3:]
            if kind == "GGA":
                out = self._gga(fields)
                self._epoch = _fix_time(fields[1])
            elif kind == "RMC":
                out = self._rmc(fields)
                self._epoch = _fix_time(fields[1])
            elif kind == "VTG":
                out = self._vtg(fields)
            else:
                self.ignored += 1
                return []
        except NmeaError as e:
            self.errors[e.reason] += 1
            return []
        except IndexError:
            self.errors["malformed"] += 1
            return []
        self.sentences += 1
        return self._once_per_fix(out)

    def _once_per_fix(self, out: list[tuple[str, float]]) -> list[tuple[str, float]]:
        epoch, emitted = self._epoch, self._emitted
        if epoch is None:
            return out
        kept: list[tuple[str, float]] = []
        for name, v in out:
            if emitted.get(name) == epoch:
                self.repeated += 1
                continue
            emitted[name] = epoch
            kept.append((name, v))
        return kept

    def _gga(self, f: list[str]) -> list[tuple[str, float]]:
        if len(f) < 10:
            raise NmeaError("malformed")
        q = _num(f[6])
        out: list[tuple[str, float]] = []
        if q is not None:
            out.append(("GPS.FixQuality", q))
        if not q:
            return out
        lat, lon = _coord(f[2], f[3], 2), _coord(f[4], f[5], 3)
        if lat is not None and lon is not None:
            out += [("GPS.Latitude", lat), ("GPS.Longitude", lon)]
        for name, idx in (("GPS.Satellites", 7), ("GPS.HDOP", 8), ("GPS.Altitude", 9)):
            v = _num(f[idx])
            if v is not None:
                out.append((name, v))
        return out

    def _rmc(self, f: list[str]) -> list[tuple[str, float]]:
        if len(f) < 9:
            raise NmeaError("malformed")
        if f[2] != "A":
            return []  # "V": receiver warning, no valid fix
        out: list[tuple[str, float]] = []
        lat, lon = _coord(f[3], f[4], 2), _coord(f[5], f[6], 3)
        if lat is not None and lon is not None:
            out += [("GPS.Latitude", lat), ("GPS.Longitude", lon)]
        sp, co = _num(f[7]), _num(f[8])
        if sp is not None:
            out.append(("GPS.SpeedKmh", sp * KNOT_KMH))
        if co is not None:
            out.append(("GPS.Course", co))
        return out

    def _vtg(self, f: list[str]) -> list[tuple[str, float]]:
        if len(f) < 8:
            raise NmeaError("malformed")
        out: list[tuple[str, float]] = []
        co, kmh = _num(f[1]), _num(f[7])
        if co is not None:
            out.append(("GPS.Course", co))
        if kmh is not None:
            out.append(("GPS.SpeedKmh", kmh))
        return out
