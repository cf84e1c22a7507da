"""candump -L log lines → can.Message, one line at a time, so that a bad line is counted and skipped instead of
ending the file (python-can's reader stops at the first line it cannot parse).

Format: `(1600000000.123456) can0 18FEEE00#8C45FFFF20FFFFFF`; 3 hex digits = standard id, 8 = extended; `#R` remote;
`##<flags><data>` CAN FD; an id with 0x20000000 set is an error frame.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import can

CAN_ERR_FLAG = 0x20000000


def looks_like_candump(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            for line in f:
                line = line.strip()
                if line:
                    return line.startswith(b"(") and b"#" in line
    except OSError:
        return False
    return False


def parse_line(line: bytes) -> can.Message:
    """One line → Message; ValueError with a short reason otherwise."""
    parts = line.split()
    if len(parts) < 3 or not (parts[0].startswith(b"(") and parts[0].endswith(b")")):
        raise ValueError("not a candump -L line")
    ts = float(parts[0][1:-1])
    channel = parts[1].decode("ascii", "replace")
    ident, sep, rest = parts[2].partition(b"#")
    if not sep or len(ident) not in (3, 8):
        raise ValueError("bad identifier")
    arb = int(ident, 16)
    extended = len(ident) == 8
    if arb & CAN_ERR_FLAG:
        return can.Message(
            timestamp=ts,
            channel=channel,
            arbitration_id=arb & 0x1FFFFFFF,
            is_extended_id=extended,
            is_error_frame=True,
            data=bytes.fromhex(rest.decode("ascii")) if rest else b"",
        )
    if rest.startswith(b"R"):
        return can.Message(
            timestamp=ts, channel=channel, arbitration_id=arb, is_extended_id=extended, is_remote_frame=True
        )
    is_fd = rest.startswith(b"#")
    if is_fd:
        rest = rest[2:]  # one hex digit of FD flags
    data = bytes.fromhex(rest.decode("ascii"))
    if len(data) > (64 if is_fd else 8):
        raise ValueError("payload too long")
    return can.Message(
        timestamp=ts, channel=channel, arbitration_id=arb, is_extended_id=extended, data=data, is_fd=is_fd
    )


def read_candump(path: Path, errors: Counter[str]) -> Iterator[can.Message]:
    with path.open("rb") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(b"#"):
                continue
            try:
                yield parse_line(line)
            except (ValueError, UnicodeDecodeError, OverflowError):
                errors["log_bad_line"] += 1
