"""NMEA 0183 GPS sentences → readings. Checksums verified; GGA, RMC and VTG from any talker (GP, GN, GL...).

Signals: GPS.Latitude, GPS.Longitude (degrees, south/west negative), GPS.Altitude (m), GPS.FixQuality (GGA
quality 0-8), GPS.Satellites, GPS.HDOP, GPS.SpeedKmh, GPS.Course (degrees true). A sentence without a fix gives
its fix quality and nothing else.

One value per signal and fix: a receiver reports one fix in several sentences (GGA and RMC both carry the position,
RMC and VTG both carry speed and course), so within one fix a signal is yielded by the first sentence that carries
it and skipped (counted in `repeated`) in the others. A fix is the run of sentences with the same UTC time field
(GGA/RMC); VTG has no time and belongs to the fix before it. A sentence id (talker + type, e.g. GNGGA) seen again
starts the next fix even at the same time, so a receiver whose clock is not running yet loses nothing. A GGA/RMC
without a time, and anything before the first timed sentence, has no fix to go by and is yielded as it is.
"""

from __future__ import annotations

import math
from collections import Counter

from agent.decode.base import Decoded, Lines, NoState, decode_lines
from agent.signals import SignalRegistry

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


def _time_field(s: str) -> float | None:
    """hhmmss(.ss) as a number, only to tell fixes apart; an empty or odd field is no time (not an error: the
    sentence's values stand)."""
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


class NmeaDecoder(NoState):
    """One GPS receiver's lines; signals are interned with the device as their source."""

    input_kind = "lines"

    def __init__(self, registry: SignalRegistry | None = None, device: str = "gps") -> None:
        self.registry = registry if registry is not None else SignalRegistry()  # its own when it decodes alone
        self.device = device
        self.errors: Counter[str] = Counter()
        self.sentences = 0
        self.ignored = 0
        self.repeated = 0  # values skipped because an earlier sentence of the same fix gave them
        self._fix_time: float | None = None  # UTC time field of the current fix (None: no time to go by)
        self._fix_ids: set[str] = set()  # sentence ids seen in the current fix
        self._fix_signals: set[str] = set()  # signals yielded in the current fix

    def decode(self, lines: Lines) -> Decoded:
        return Decoded(decode_lines(lines, self.decode_line, self._sid))

    def _sid(self, name: str) -> int:
        return self.registry.intern(name, self.device, SIGNALS.get(name, ""))

    def signals(self) -> set[str]:
        return set(SIGNALS)

    def counters(self) -> dict[str, int]:
        return {"sentences": self.sentences, "ignored": self.ignored, "repeated": self.repeated}

    def decode_line(self, line: bytes) -> list[tuple[str, float]]:
        """One line → [(signal, value)]. Bad lines count by reason and yield nothing; they never raise."""
        try:
            fields = _split(line)
            kind = fields[0][-3:]
            if kind == "GGA":
                out = self._gga(fields)
            elif kind == "RMC":
                out = self._rmc(fields)
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
        timed = kind != "VTG"
        return self._once_per_fix(fields[0], _time_field(fields[1]) if timed else self._fix_time, timed, out)

    def _once_per_fix(self, sid: str, t: float | None, timed: bool,
                      out: list[tuple[str, float]]) -> list[tuple[str, float]]:
        if t is None:  # no time to go by: everything stands, and no later sentence joins this one
            self._fix_time, self._fix_ids, self._fix_signals = None, set(), set()
            return out
        if (timed and t != self._fix_time) or sid in self._fix_ids:
            self._fix_time, self._fix_ids, self._fix_signals = t, set(), set()
        self._fix_ids.add(sid)
        kept: list[tuple[str, float]] = []
        for name, v in out:
            if name in self._fix_signals:
                self.repeated += 1
                continue
            self._fix_signals.add(name)
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
