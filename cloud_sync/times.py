"""Times people type: one parser for every command and form that takes one (`breakdown add --at`, `--since`,
`--until`, the fleet page's breakdown form).

A time is either ISO 8601 (`2026-11-20`, `2026-11-20T14:05`, `2026-11-20 14:05:30+02:00`, `...Z`), UTC unless it
carries an offset, or Unix seconds (`1763647500`, `1763647500.25`) from 10^9 (September 2001) on. Digits are ASCII
only (`int()` would take Arabic-Indic digits), and the result lies in [1970, 3000). Typos are refused rather than
read as some other date: a 13-digit millisecond value (the year 57,000), or `20261120` (a compact date, which as
seconds would be August 1970).
"""

from __future__ import annotations

import datetime as dt
import re

MIN_TIME = 0.0
MIN_UNIX_SECONDS = 1e9
MAX_TIME = 32_503_680_000.0  # 3000-01-01T00:00:00Z
_UNIX = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")
_ISO = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9:.,+\-Z]{2,40})?")
HINT = "ISO 8601 such as 2026-11-20T14:05 (UTC unless it has an offset) or Unix seconds"


class TimeError(ValueError):
    """Text that is not a time we take; the message quotes it and says what is."""


def parse_time(text: str) -> float:
    """Unix seconds of `text` (module docstring); TimeError otherwise."""
    s = text.strip() if isinstance(text, str) else ""
    if _UNIX.fullmatch(s):
        t = float(s)
        if t < MIN_UNIX_SECONDS:
            raise TimeError(f"not a time: {_quote(text)} (Unix seconds have 10 digits since 2001; or {HINT})")
    elif _ISO.fullmatch(s):
        try:
            when = dt.datetime.fromisoformat(s[:-1] + "+00:00" if s.endswith("Z") else s)
        except ValueError:
            raise TimeError(f"not a time: {_quote(text)} ({HINT})") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        t = when.timestamp()
    else:
        raise TimeError(f"not a time: {_quote(text)} ({HINT})")
    if not MIN_TIME <= t < MAX_TIME:
        raise TimeError(f"time out of range: {_quote(text)} (1970 to 2999)")
    return t


def format_time(t: float) -> str:
    """`2026-11-20 14:05:00` (UTC), or `?` for a time the platform cannot show."""
    try:
        return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return "?"


def _quote(text: object) -> str:
    s = repr(text if isinstance(text, str) else str(text))
    return s if len(s) <= 60 else s[:57] + "...'"
