"""Recorded CAN logs → can.Message, for replay: a file that cannot be read is one error, bad records are read around.

Formats: candump -L (`.log` whose first line looks like one; agent/sources/candump.py), and what python-can reads:
ASC, TRC, python-can CSV, python-can's canutils `.log` (text); BLF, MF4 (with asammdf), SQLite `.db` (binary);
`.gz` of any of them.

Contract of `open_log`:
- It reads up to the first frame before returning, so a file with no frame to give fails at once, before a replay
  does any work: a missing or empty file, one no reader accepts (random bytes, another format under the name), or
  one whose every record is bad. `LogUnreadable` says which and why in one line.
- Text formats are read line by line: a line that is not UTF-8, too long (> MAX_LINE bytes) or that the reader
  cannot parse is counted (`log_bad_line`) and skipped, and reading goes on after it (python-can's readers stop at
  the first bad line; here the reader is restarted after it, fed the header lines it saw before its first frame).
- BLF is read object by object: a damaged container (it does not decompress or parse) or object header is
  skipped, counted (`log_bad_record`), and reading resumes at the next object.
- Other binary formats have no records to resynchronise on: a record that cannot be read mid-file (truncated,
  corrupt) ends that file; the frames before it are kept and the cut is counted (`log_unreadable`) when the reader
  raises, or for BLF when the file is shorter than its header says. asammdf reads a cut MF4 up to the cut without saying
  so: fewer frames, nothing counted. SQLite cut short is a malformed database, unreadable as a whole.
"""

from __future__ import annotations

import gc
import itertools
import os
import struct
import sys
import zlib
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import can
from can.io import blf

from agent.sources.candump import looks_like_candump, read_candump

MAX_LINE = 1 << 16  # no CAN log line comes near this; a longer one is garbage, not a reason to fill memory
HEADER_MAX = 1000  # lines kept to replay into a restarted reader (real headers are a handful)


class LogUnreadable(ValueError):
    """A log with no frame to give; the text names the file and says why, on one line."""


def _why(e: BaseException) -> str:
    name = type(e).__name__
    if name == "error":  # struct.error, zlib.error: say whose
        name = f"{type(e).__module__}.error"
    text = " ".join(str(e).split())
    return f"{name}: {text[:160]}" if text else name


class _StrictTRCReader(can.TRCReader):
    """python-can's TRC reader logs a warning and goes on for a line with too few columns; here that line is bad
    like any other (counted, and nothing printed past the one-line-error convention)."""

    def _parse_line(self, line: str) -> can.Message | None:
        try:
            cols = tuple(line.split(maxsplit=self._num_columns))
            return self._parse_cols(cols)
        except IndexError:
            raise ValueError("TRC line with too few columns") from None


class _ResyncBLFReader(can.BLFReader):
    """python-can's BLF reader ends the file at the first damaged object. This one skips it: a container that does
    not decompress or parse is lost alone (counted `log_bad_record`), a damaged object header is skipped by
    scanning for the next `LOBJ` signature; a file cut short ends where the cut is."""

    def __init__(self, file: str, errors: Counter[str]) -> None:
        super().__init__(file)
        self._errors = errors
        self._after_loss = False
        self._size = os.fstat(self.file.fileno()).st_size

    def _resync(self) -> bool:
        """Move the file to the next object signature after the current position; False at end of file."""
        while True:
            pos = self.file.tell()
            chunk = self.file.read(1 << 16)
            if len(chunk) < 4:
                return False
            i = chunk.find(b"LOBJ", 1)
            if i > 0:
                self.file.seek(pos + i)
                return True
            self.file.seek(pos + len(chunk) - 3)  # a signature split across chunks is found next time

    def __iter__(self) -> Generator[can.Message, None, None]:
        head = blf.OBJ_HEADER_BASE_STRUCT
        while True:
            start = self.file.tell()
            data = self.file.read(head.size)
            if len(data) < head.size:
                break
            signature, _, _, obj_size, obj_type = head.unpack(data)
            if signature != b"LOBJ" or obj_size < head.size:
                self._lost()
                self.file.seek(start)
                if not self._resync():
                    break
                continue
            if start + obj_size > self._size:
                self.file.seek(start)
                if self._resync():  # another object follows: this header's size is wrong, not the file short
                    self._lost()
                    continue
                self.file.seek(start + head.size)
            obj_data = self.file.read(obj_size - head.size)  # short if the file is cut: what is there is read
            self.file.read(obj_size % 4)
            if obj_type != blf.LOG_CONTAINER:
                continue
            try:
                method, _ = blf.LOG_CONTAINER_STRUCT.unpack_from(obj_data)
                body = obj_data[blf.LOG_CONTAINER_STRUCT.size :]
                if method == blf.ZLIB_DEFLATE:
                    body = zlib.decompressobj().decompress(body)
                elif method != blf.NO_COMPRESSION:
                    raise ValueError(f"unknown compression method {method}")
            except (struct.error, zlib.error, ValueError):
                self._lost()
                continue
            if self._after_loss:  # the container may start with the rest of an object that was lost: skip to
                i = body.find(b"LOBJ")  # the first whole one
                if i < 0:
                    continue
                body, self._after_loss = body[i:], False
            try:
                yield from self._parse_container(body)
            except (blf.BLFParseError, struct.error, ValueError):
                self._lost()
        self.stop()

    def _lost(self) -> None:
        self._errors["log_bad_record"] += 1
        self._tail = b""  # an object split across the lost container is lost with it
        self._after_loss = True


TEXT_READERS: dict[str, Callable[[Any], can.io.generic.MessageReader]] = {
    ".asc": can.ASCReader,
    ".trc": _StrictTRCReader,
    ".csv": can.CSVReader,
    ".log": can.CanutilsLogReader,
}


class _LineFeed:
    """The file object a python-can text reader iterates: first the header lines replayed on a restart, then the
    file's next lines. Lines that are not UTF-8 or too long are counted here and never reach the reader."""

    def __init__(self, f: IO[bytes], errors: Counter[str]) -> None:
        self._f = f
        self._errors = errors
        self._pre: deque[str] = deque()
        self.handed: list[str] = []  # what this attempt handed out, while still looking for the header
        self.recording = True
        self.fresh = 0  # lines taken from the file in this attempt

    def restart(self, prefix: list[str]) -> None:
        self._pre = deque(prefix)
        self.handed = []
        self.fresh = 0

    def _from_file(self) -> str:
        while True:
            raw = self._f.readline(MAX_LINE)
            if not raw:
                raise StopIteration
            if len(raw) == MAX_LINE and not raw.endswith(b"\n"):
                while (rest := self._f.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                    pass
                self._errors["log_bad_line"] += 1
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                self._errors["log_bad_line"] += 1
                continue
            return line[:-2] + "\n" if line.endswith("\r\n") else line

    def __iter__(self) -> _LineFeed:
        return self

    def __next__(self) -> str:
        if self._pre:
            line = self._pre.popleft()
        else:
            line = self._from_file()
            self.fresh += 1
        if self.recording and len(self.handed) <= HEADER_MAX:
            self.handed.append(line)
        return line

    def readline(self) -> str:
        try:
            return next(self)
        except StopIteration:
            return ""

    def close(self) -> None:
        """Readers close their file when they finish; the file outlives a restarted reader, so not here."""


def _header(feed: _LineFeed) -> list[str]:
    """The lines before the one the reader just acted on (its first frame, or the line it failed on)."""
    return feed.handed[:-1] if len(feed.handed) <= HEADER_MAX else feed.handed[:HEADER_MAX]


def _read_text(path: Path, make: Callable[[Any], can.io.generic.MessageReader],
               errors: Counter[str]) -> Iterator[can.Message]:
    with path.open("rb") as f:
        feed = _LineFeed(f, errors)
        header: list[str] = []
        produced = False
        while True:
            feed.restart(header)
            try:
                for msg in make(feed):
                    if not produced:
                        produced, feed.recording = True, False
                        header = _header(feed)
                    yield msg
                return
            except Exception as e:  # the line the reader could not parse: skip it, restart after it
                if feed.fresh == 0:  # failed on the header alone: nothing after it will read either
                    if not produced:
                        raise LogUnreadable(_why(e)) from None
                    errors["log_unreadable"] += 1
                    return
                errors["log_bad_line"] += 1
                if not produced:
                    header = _header(feed)


@contextmanager
def _no_cleanup_noise() -> Iterator[None]:
    """asammdf's MDF4.__del__ fails on an object whose __init__ failed and prints that as "Exception ignored ...
    Traceback": the file's failure is already reported (LogUnreadable), its half-built reader's is not news."""
    old = sys.unraisablehook
    sys.unraisablehook = lambda _: None
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = old


def _read_binary(path: Path, errors: Counter[str]) -> Iterator[can.Message]:
    why = None
    with _no_cleanup_noise():
        try:
            reader = (_ResyncBLFReader(str(path), errors) if path.suffix.lower() == ".blf"
                      else can.LogReader(str(path)))
        except Exception as e:  # whatever a reader raises on content it cannot take (struct.error, MdfException...)
            why = _why(e)
    if why is not None:  # raised here, not in the except: the failed reader is gone, not kept as __context__
        raise LogUnreadable(why)

    def frames() -> Iterator[can.Message]:
        with reader:
            it = iter(reader)
            first = True
            while True:
                why = None
                try:
                    msg = next(it)
                except StopIteration:
                    declared = getattr(reader, "file_size", 0) if isinstance(reader, can.BLFReader) else 0
                    if isinstance(declared, int) and declared > path.stat().st_size:
                        errors["log_unreadable"] += 1  # python-can ends a cut BLF quietly; its header tells
                    return
                except Exception as e:  # a truncated or corrupt record: keep what came before
                    why = _why(e)
                if why is not None:
                    if first:
                        raise LogUnreadable(why)
                    errors["log_unreadable"] += 1
                    return
                first = False
                yield msg

    return frames()


def open_log(path: Path, errors: Counter[str]) -> Iterator[can.Message]:
    """Every frame of one log; `LogUnreadable` (raised here, not later) if it has none to give."""
    if not path.is_file():
        raise LogUnreadable(f"{path}: no such file")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise LogUnreadable(f"{path}: {_why(e)}") from None
    if size == 0:
        raise LogUnreadable(f"{path}: empty file, no log in it")
    suffix = path.suffix.lower()
    if suffix not in (*TEXT_READERS, ".blf", ".mf4", ".db", ".gz"):
        raise LogUnreadable(f"{path}: unknown log format {suffix!r} (candump -L .log, .asc, .blf, .trc, .csv, "
                            ".mf4, .db, or one of them .gz)")
    bad_before = errors["log_bad_line"]
    try:
        if suffix == ".log" and looks_like_candump(path):
            it = read_candump(path, errors)
        elif suffix in TEXT_READERS:
            it = _read_text(path, TEXT_READERS[suffix], errors)
        else:
            it = _read_binary(path, errors)
        first = next(it)
    except StopIteration:
        bad = errors["log_bad_line"] - bad_before
        lines = f" ({bad} unreadable line{'s' if bad != 1 else ''})" if bad else ""
        raise LogUnreadable(f"{path}: no CAN frames in it{lines}") from None
    except LogUnreadable as e:
        raise LogUnreadable(f"{path}: not a readable {suffix} log ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LogUnreadable(f"{path}: not a readable {suffix} log ({_why(e)})") from None
    return itertools.chain([first], it)
