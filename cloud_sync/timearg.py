"""Times given on a command line: an ISO 8601 time or Unix seconds, always read as a Unix time (float seconds).

    2026-11-20               midnight UTC that day
    2026-11-20T14:05         UTC, since it carries no offset
    2026-11-20T14:05+01:00   13:05 UTC
    1763647500  1763647500.25   Unix seconds

A text that is neither, or a time that is not finite, raises ValueError with a sentence that names it.
"""

from __future__ import annotations

import datetime as dt
import math
import re

_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def parse_time(text: str) -> float:
    """`text` (ISO 8601, UTC unless it carries an offset; or Unix seconds) as Unix seconds."""
    s = text.strip()
    if _NUMBER.fullmatch(s):
        v = float(s)
        if not math.isfinite(v):
            raise ValueError(f"not a finite time: {text!r}")
        return v
    try:
        when = dt.datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(f"not an ISO 8601 time (2026-11-20T14:05, UTC unless it carries an offset) nor Unix "
                         f"seconds: {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()
