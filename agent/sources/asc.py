"""Vector ASC → frames as columns, without python-can (importing it costs a replay more than reading a log).

The frames and counts of the message path (agent/sources/pylogs.py: python-can's ASCReader, restarted after each
line it cannot parse, fed the header it saw) from a port of that reader's rules, line by line:
- lines go through the text-log rules first: not UTF-8, or MAX_LINE bytes or more: counted `log_bad_line`, unseen;
- the header (`date`, `base hex|dec`, `//` comments) runs to the first other line, which it swallows (python-can's
  reader does); `base` decides how ids and bytes parse;
- then a line that is a trigger block, "Start of measurement", or not a CAN frame (comments, statistics, J1939TP
  events...) is passed over; a CAN or CAN FD frame line that does not parse is counted `log_bad_line` and skipped.
Timestamps are the file's, relative (python-can's default when reading a log). A restarted python-can reader ends
in the same state (the header replayed), so skipping a line is what the restart amounts to.
tests/test_log_chunks.py checks it against the message path on the real file and on fuzzed lines.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from agent.frames import FrameCollector, LabelledFrames
from agent.sources.candump import MAX_LINE

CHUNK_FRAMES = 5000
CAN_FD_DLC = [0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64]

# python-can 4.6's can/io/asc.py, as they are
_TRIGGER = re.compile(r"begin\s+triggerblock\s+\w+\s+(?P<datetime_string>.+)", re.IGNORECASE)
_MESSAGE = re.compile(r"\d+\.\d+\s+(\d+\s+(\w+\s+(Tx|Rx)|ErrorFrame)|CANFD)", re.ASCII | re.IGNORECASE)
_START = re.compile(r"^\d+\.\d+\s+Start of measurement")
_DATE = re.compile(r"date\s+\w+\s+(?P<datetime_string>.+)", re.IGNORECASE)
_BASE = re.compile(r"base\s+(?P<base>hex|dec)(?:\s+timestamps\s+(?P<timestamp_format>absolute|relative))?",
                   re.IGNORECASE)
_COMMENT = re.compile(r"//.*")


def _lines(path: Path, errors: Counter[str]) -> Iterator[str]:
    """The file's lines as a python-can text reader is fed them (agent/sources/pylogs.py `_LineFeed`)."""
    with path.open("rb") as f:
        while True:
            raw = f.readline(MAX_LINE)
            if not raw:
                return
            if len(raw) == MAX_LINE and not raw.endswith(b"\n"):
                while (rest := f.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                    pass
                errors["log_bad_line"] += 1
                continue
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                errors["log_bad_line"] += 1


def _dlc2len(dlc: int) -> int:
    return CAN_FD_DLC[dlc] if dlc <= 15 else 64


class _Parser:
    def __init__(self) -> None:
        self.base = 16

    def header_line(self, line: str) -> bool:
        """One header line; False when the header ends (that line swallowed, as python-can's reader does)."""
        line = line.strip()
        if _DATE.match(line):
            return True
        m = _BASE.match(line)
        if m:
            base = m.group("base")
            if base not in ("hex", "dec"):  # the pattern ignores case, the check after it does not
                raise ValueError('base should be either "hex" or "dec"')
            self.base = 10 if base == "dec" else 16
            return True
        return bool(_COMMENT.match(line))  # "internal events logged" or anything else ends it

    def _can_id(self, s: str) -> tuple[int, bool]:
        if s[-1:].lower() == "x":
            return int(s[0:-1], self.base), True
        return int(s, self.base), False

    def _data(self, s: str, n: int) -> bytes:
        return bytes(bytearray(int(b, self.base) for b in s.split()[:n]))

    def body_line(self, line: str, out: FrameCollector) -> None:
        """One line after the header: a frame added, or nothing; raises for a frame line that does not parse."""
        line = line.strip()
        if _TRIGGER.match(line) or _START.match(line) or not _MESSAGE.match(line):
            return
        try:
            ts_str, channel, rest = line.split(None, 2)
            ts = float(ts_str)
            if channel == "CANFD":
                fd = True
                ch = 0
            elif channel.isdigit():
                fd = False
                ch = int(channel) - 1
            else:
                return  # not a CAN message: statistics, J1939TP...
        except ValueError:
            return
        if fd:
            self._fd(ts, rest, out)
        else:
            self._classic(ts, ch, rest, out)

    def _classic(self, ts: float, ch: int, line: str, out: FrameCollector) -> None:
        if line.strip()[0:10].lower() == "errorframe":
            out.add(ts, ch, 0, True, b"", True)
            return
        id_str, _direction, rest = line.split(None, 2)
        can_id, extended = self._can_id(id_str)
        if rest[0].lower() == "r":
            remote = rest.split()
            if len(remote) > 1 and remote[1].isdigit():
                int(remote[1], self.base)  # python-can parses the DLC: a digit it cannot take fails the line
            out.add(ts, ch, can_id, extended, b"", True)
            return
        try:
            _, dlc_str, data = rest.split(None, 2)
        except ValueError:
            _, dlc_str = rest.split(None, 1)
            data = ""
        dlc = _dlc2len(int(dlc_str, self.base))
        out.add(ts, ch, can_id, extended, self._data(data, min(8, dlc)))

    def _fd(self, ts: float, line: str, out: FrameCollector) -> None:
        channel, _direction, rest = line.split(None, 2)
        ch = int(channel) - 1
        if rest.strip()[:10].lower() == "errorframe":
            out.add(ts, ch, 0, True, b"", True)
            return
        id_str, name_or_brs, rest = rest.split(None, 2)
        if name_or_brs.isdigit():
            _esi, dlc_str, length_str, data = rest.split(None, 3)
        else:
            _brs, _esi, dlc_str, length_str, data = rest.split(None, 4)
        can_id, extended = self._can_id(id_str)
        dlc = int(dlc_str, self.base)
        length = int(length_str)
        if length != 0:
            _dlc2len(dlc)  # python-can compares it with the length (and warns): an index error fails the line
        payload = self._data(data, length)
        out.add(ts, ch, can_id, extended, b"" if length == 0 else payload, length == 0)


def read_asc_chunks(path: Path, errors: Counter[str]) -> Iterator[LabelledFrames]:
    parser = _Parser()
    out = FrameCollector()
    in_header = True
    for line in _lines(path, errors):
        try:
            if in_header:
                in_header = parser.header_line(line)
            else:
                parser.body_line(line, out)
        except Exception:  # what python-can's reader raises on the line (ValueError, IndexError...)
            errors["log_bad_line"] += 1
            continue
        if len(out) >= CHUNK_FRAMES:
            yield out.take()
    if len(out):
        yield out.take()
