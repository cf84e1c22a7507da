"""A progress bar on stderr for the long commands: rows done of the total, and rows per second.

On a terminal the line is redrawn in place, at most ten times a second; elsewhere (a log, a pipe, systemd) a line
is printed at each tenth of the total, so a log gets ten lines, not a wall of carriage returns.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30  # characters of the bar itself
REDRAW_S = 0.1  # a terminal's line is redrawn at most this often


class Progress:
    """`add(n)` as rows are done, `finish()` at the end; a total of 0 draws nothing until `finish`."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, unit: str = "rows") -> None:
        self.label, self.total, self.unit = label, max(0, total), unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.done = 0
        self.started = time.monotonic()
        self._drawn_at = 0.0
        self._tenths = 0  # tenths of the total already printed (not a terminal)
        self._open = False  # a terminal's line drawn and not ended
        self._longest = 0

    def add(self, n: int) -> None:
        self.done += n
        if self.tty:
            now = time.monotonic()
            if now - self._drawn_at >= REDRAW_S:
                self._drawn_at = now
                self._draw("")
        elif self.total:
            tenths = min(10, self.done * 10 // self.total)
            if tenths > self._tenths:
                self._tenths = tenths
                self._draw("\n")

    def finish(self) -> None:
        if self.tty or self._tenths < 10:
            self._draw("\n")
        self._open = False

    def end_line(self) -> None:
        """End a terminal's line the bar was redrawn on (before an error is printed), unless `finish` did."""
        if self.tty and self._open:
            print(file=self.stream, flush=True)
            self._open = False

    def _draw(self, end: str) -> None:
        elapsed = max(1e-9, time.monotonic() - self.started)
        share = min(1.0, self.done / self.total) if self.total else 1.0
        bar = "#" * int(WIDTH * share)
        line = (f"{self.label} [{bar:{WIDTH}s}] {self.done:,}/{self.total:,} {self.unit} "
                f"{self.done / elapsed:,.0f} {self.unit}/s")
        if self.tty:  # padded to the longest line drawn, so a shorter one leaves no tail of the last
            self._longest = max(self._longest, len(line))
            line = "\r" + line.ljust(self._longest)
        print(line, end=end, file=self.stream, flush=True)
        self._open = end == ""
