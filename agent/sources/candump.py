"""candump -L logs: `read_candump` gives one can.Message per line, `read_candump_chunks` whole chunks of lines as
columns (replay's path: no Python object per frame). Both count a bad line (`log_bad_line`) and skip it instead of
ending the file (python-can's reader stops at the first line it cannot parse), and give the same frames.

Format: `(1600000000.123456) can0 18FEEE00#8C45FFFF20FFFFFF`; 3 hex digits = standard id, 8 = extended; `#R` remote;
`##<flags><data>` CAN FD; an id with 0x20000000 set is an error frame. Blank lines and `#` comments are skipped
without counting; a line of MAX_LINE bytes or more is bad.

The chunk reader matches the common shape (decimal timestamp, printable channel, `id#data` with up to 8 bytes) with
one regular expression over the whole chunk and converts the captured columns with numpy; every other line goes
through `parse_fields`, the same function `read_candump` uses, so the two agree line for line (tests/test_candump.py
fuzzes that).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, NamedTuple

import numpy as np
import numpy.typing as npt

from agent.frames import PAD, FrameBatch, LabelledFrames

if TYPE_CHECKING:
    import can

CAN_ERR_FLAG = 0x20000000
MAX_LINE = 1 << 16  # no candump line comes near this; a longer one is garbage, not a reason to fill memory
CHUNK = 1 << 20  # bytes read and parsed at a time


class Fields(NamedTuple):
    ts: float
    channel: str
    arbitration_id: int  # without the error flag
    extended: bool
    data: bytes
    error: bool
    remote: bool
    fd: bool


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


def parse_fields(line: bytes) -> Fields:
    """One stripped line → its fields; ValueError (or UnicodeDecodeError, OverflowError) with a short reason."""
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
        data = bytes.fromhex(rest.decode("ascii")) if rest else b""
        return Fields(ts, channel, arb & 0x1FFFFFFF, extended, data, True, False, False)
    if rest.startswith(b"R"):
        return Fields(ts, channel, arb, extended, b"", False, True, False)
    is_fd = rest.startswith(b"#")
    if is_fd:
        rest = rest[2:]  # one hex digit of FD flags
    data = bytes.fromhex(rest.decode("ascii"))
    if len(data) > (64 if is_fd else 8):
        raise ValueError("payload too long")
    return Fields(ts, channel, arb, extended, data, False, False, is_fd)


def parse_line(line: bytes) -> can.Message:
    """One line → Message; ValueError with a short reason otherwise."""
    import can

    f = parse_fields(line)
    if f.error:
        return can.Message(timestamp=f.ts, channel=f.channel, arbitration_id=f.arbitration_id,
                           is_extended_id=f.extended, is_error_frame=True, data=f.data)
    if f.remote:
        return can.Message(timestamp=f.ts, channel=f.channel, arbitration_id=f.arbitration_id,
                           is_extended_id=f.extended, is_remote_frame=True)
    return can.Message(timestamp=f.ts, channel=f.channel, arbitration_id=f.arbitration_id, is_extended_id=f.extended,
                       data=f.data, is_fd=f.fd)


_BAD = (ValueError, UnicodeDecodeError, OverflowError)


def read_candump(path: Path, errors: Counter[str]) -> Iterator[can.Message]:
    with path.open("rb") as f:
        for raw in f:
            if len(raw.rstrip(b"\n")) >= MAX_LINE:
                errors["log_bad_line"] += 1
                continue
            line = raw.strip()
            if not line or line.startswith(b"#"):
                continue
            try:
                yield parse_line(line)
            except _BAD:
                errors["log_bad_line"] += 1


# --- in bulk ------------------------------------------------------------------------------------------------------

_WS = rb"[ \t\r\x0b\x0c]"  # what bytes.split() splits on, newline aside
# A line of the common shape, captured as (timestamp, channel, id, data); any other line as a whole (5th group).
# Bounded everywhere, so a line of the first kind is short and a long line always falls to the second.
_LINE = re.compile(
    rb"^" + _WS + rb"*\((\d{1,20}\.\d{1,12})\)" + _WS + rb"+([!-~]{1,64})" + _WS
    + rb"+([0-9A-Fa-f]{3}|[0-9A-Fa-f]{8})#((?:[0-9A-Fa-f]{2}){0,8})(?:" + _WS + rb"[^\n]{0,256})?" + _WS + rb"*$"
    + rb"|^([^\n]*)$",
    re.M,
)
_NIBBLE = np.full(256, 0, np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _NIBBLE[_c] = _NIBBLE[bytes([_c]).upper()[0]] = _i


def _hex_ids(ids: list[bytes]) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.bool_]]:
    """3- or 8-digit hex identifiers → values, and which were 8 digits (extended)."""
    a = np.array(ids, dtype="S8").view(np.uint8).reshape(len(ids), 8)
    digits = (a != 0).sum(axis=1)
    nib = _NIBBLE[a].astype(np.uint32)
    value = np.zeros(len(ids), np.uint32)
    for k in range(8):
        value = np.where(k < digits, (value << np.uint32(4)) | nib[:, k], value)
    return value, digits == 8


def _hex_data(datas: list[bytes]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Up to 16 hex digits per frame → (n, 8) bytes padded with PAD, and the byte counts."""
    a = np.array(datas, dtype="S16").view(np.uint8).reshape(len(datas), 16)
    dlc = ((a != 0).sum(axis=1) // 2).astype(np.uint8)
    nib = _NIBBLE[a]
    data = ((nib[:, 0::2] << np.uint8(4)) | nib[:, 1::2]).astype(np.uint8)
    data[np.arange(8)[None, :] >= dlc[:, None]] = PAD
    return data, dlc


def parse_chunk(chunk: bytes, errors: Counter[str]) -> LabelledFrames:
    """Whole lines (the last one may lack its newline) → their frames as columns; bad lines counted."""
    rows = _LINE.findall(chunk)
    if not rows:
        return _columns([], [], [], [], [])
    ts_l, ch_l, id_l, data_l, other_l = zip(*rows, strict=True)
    if not any(other_l) and b"" not in ts_l:  # every line of the common shape
        return _columns(list(ts_l), list(ch_l), list(id_l), list(data_l), [])
    fast = np.array(ts_l, dtype="S1").view(np.uint8) != 0  # a captured timestamp: the common shape
    idx = np.flatnonzero(fast).tolist()
    slow: list[tuple[int, Fields]] = []
    for i in np.flatnonzero(~fast).tolist():
        line = other_l[i]
        if len(line) >= MAX_LINE:
            errors["log_bad_line"] += 1
            continue
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        try:
            slow.append((i, parse_fields(line)))
        except _BAD:
            errors["log_bad_line"] += 1
    return _columns([ts_l[i] for i in idx], [ch_l[i] for i in idx], [id_l[i] for i in idx],
                    [data_l[i] for i in idx], slow, idx)


def _columns(ts_l: list[bytes], ch_l: list[bytes], id_l: list[bytes], data_l: list[bytes],
             slow: list[tuple[int, Fields]], at: list[int] | None = None) -> LabelledFrames:
    """The common-shape lines' captures (at row positions `at`) and the other lines' parsed fields, merged back
    into line order."""
    n_fast, n = len(ts_l), len(ts_l) + len(slow)
    ts = np.empty(n, np.float64)
    can_id = np.empty(n, np.uint32)
    dlc = np.empty(n, np.uint8)
    data = np.empty((n, 8), np.uint8)
    extended = np.empty(n, np.bool_)
    bad = np.empty(n, np.bool_)
    if slow:  # positions in the merged order
        rows = np.array((at or []) + [i for i, _ in slow], np.int64)
        order = np.argsort(rows, kind="stable")
        where = np.empty(n, np.int64)
        where[order] = np.arange(n)
        fast_at, slow_at = where[:n_fast], where[n_fast:]
    else:
        fast_at, slow_at = np.arange(n_fast), np.zeros(0, np.int64)
    if n_fast:
        ts[fast_at] = np.array(ts_l, dtype="S").astype(np.float64)
        ident, ext = _hex_ids(id_l)
        err = ext & ((ident & np.uint32(CAN_ERR_FLAG)) != 0)
        can_id[fast_at] = ident & np.uint32(0x1FFFFFFF)
        extended[fast_at] = ext
        bad[fast_at] = err
        data[fast_at], dlc[fast_at] = _hex_data(data_l)
    for j, (_, f) in zip(slow_at.tolist(), slow, strict=True):
        ts[j] = f.ts
        can_id[j] = f.arbitration_id & 0x1FFFFFFF
        extended[j] = f.extended
        bad[j] = f.error or f.remote or len(f.data) > 8
        dlc[j] = min(len(f.data), 8)
        data[j] = np.frombuffer(f.data[:8].ljust(8, bytes([PAD])), np.uint8)
    # Channels: the common shape's are printable ASCII, so decoding them as the line parser does gives the same.
    raw_names: dict[bytes, int] = {}
    code = np.empty(n, np.int32)
    if n_fast and ch_l.count(ch_l[0]) == n_fast:  # one bus, as most logs
        raw_names[ch_l[0]] = 0
        code[fast_at] = 0
    elif n_fast:
        raw_names = {c: k for k, c in enumerate(dict.fromkeys(ch_l))}  # numbered in order of first appearance
        arr = np.array(ch_l, dtype="S64")
        for c, k in raw_names.items():
            code[fast_at[arr == c]] = k
    names = {c.decode("ascii"): k for c, k in raw_names.items()}
    for j, (_, f) in zip(slow_at.tolist(), slow, strict=True):
        code[j] = names.setdefault(f.channel, len(names))
    labels = list(names)
    if slow:  # numbered in the order first seen among the common-shape lines, then the others: renumber
        seen, first = np.unique(code, return_index=True)
        by_first = seen[np.argsort(first)]
        renumber = np.zeros(len(names), np.int32)
        renumber[by_first] = np.arange(by_first.size, dtype=np.int32)
        code = renumber[code]
        labels = [labels[int(c)] for c in by_first.tolist()]
    return LabelledFrames(FrameBatch(ts, can_id, dlc, data, extended, bad, ""), code, labels)


def read_candump_chunks(f: IO[bytes], errors: Counter[str], chunk: int = CHUNK) -> Iterator[LabelledFrames]:
    """The frames of an open candump -L file, a chunk of lines at a time (chunks with no frame are not given)."""
    carry = b""
    skipping = False  # inside a line already counted as too long
    while True:
        block = f.read(chunk)
        if skipping:
            i = block.find(b"\n")
            if i < 0:
                if not block:
                    return
                continue
            block, skipping = block[i + 1 :], False
        if not block:
            if carry:
                lf = parse_chunk(carry, errors)
                if len(lf):
                    yield lf
            return
        buf = carry + block
        cut = buf.rfind(b"\n")
        if cut < 0:
            carry = buf
        else:
            lf = parse_chunk(buf[: cut + 1], errors)
            if len(lf):
                yield lf
            carry = buf[cut + 1 :]
        if len(carry) >= MAX_LINE:
            errors["log_bad_line"] += 1
            carry, skipping = b"", True
