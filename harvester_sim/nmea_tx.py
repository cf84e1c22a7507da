"""NMEA 0183 sentences for a simulated fix: GGA, RMC, VTG with checksums."""

from __future__ import annotations

from datetime import datetime

from agent.decode.nmea import checksum
from harvester_sim.physics import GpsFix

KMH_PER_KNOT = 1.852


def _dm(value: float, deg_digits: int) -> str:
    v = abs(value)
    deg = int(v)
    minutes = (v - deg) * 60
    return f"{deg:0{deg_digits}d}{minutes:07.4f}"


def _sentence(body: str) -> str:
    return f"${body}*{checksum(body):02X}\r\n"


def nmea_sentences(fix: GpsFix, utc: datetime, talker: str = "GN") -> list[str]:
    hms = utc.strftime("%H%M%S") + f".{utc.microsecond // 10000:02d}"
    lat = _dm(fix.lat, 2) + "," + ("N" if fix.lat >= 0 else "S")
    lon = _dm(fix.lon, 3) + "," + ("E" if fix.lon >= 0 else "W")
    knots = fix.speed_kmh / KMH_PER_KNOT
    gga = (
        f"{talker}GGA,{hms},{lat},{lon},{fix.fix_quality},{fix.satellites:02d},{fix.hdop:.1f},"
        f"{fix.altitude_m:.1f},M,-30.0,M,,"
    )
    rmc = f"{talker}RMC,{hms},A,{lat},{lon},{knots:.2f},{fix.course_deg:.1f},{utc.strftime('%d%m%y')},,,A"
    vtg = f"{talker}VTG,{fix.course_deg:.1f},T,,M,{knots:.2f},N,{fix.speed_kmh:.2f},K,A"
    return [_sentence(gga), _sentence(rmc), _sentence(vtg)]
