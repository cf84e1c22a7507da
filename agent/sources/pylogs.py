"""The formats python-can reads, message by message, made to read around bad records (agent/sources/logfile.py
has the contract): text logs restarted after a line their reader cannot parse, BLF resynchronised after a damaged
object, the binary readers' mid-file failures counted. Imported only for these formats: importing python-can pulls
in its MF4 reader (asammdf, pandas), which a candump or MF4 replay does without."""

from __future__ import annotations

import os
import struct
import zlib
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import IO, Any

import can
from can.io import blf

from agent.sources.candump import MAX_LINE
from agent.sources.logerror import LogUnreadable, no_cleanup_noise, why

HEADER_MAX = 1000  # lines kept to replay into a restarted reader (real headers are a handful)


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


def read_text(path: Path, make: Callable[[Any], can.io.generic.MessageReader],
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
                        raise LogUnreadable(why(e)) from None
                    errors["log_unreadable"] += 1
                    return
                errors["log_bad_line"] += 1
                if not produced:
                    header = _header(feed)


def read_binary(path: Path, errors: Counter[str]) -> Iterator[can.Message]:
    reason = None
    with no_cleanup_noise():
        try:
            reader = (_ResyncBLFReader(str(path), errors) if path.suffix.lower() == ".blf"
                      else can.LogReader(str(path)))
        except Exception as e:  # whatever a reader raises on content it cannot take (struct.error, MdfException...)
            reason = why(e)
    if reason is not None:  # raised here, not in the except: the failed reader is gone, not kept as __context__
        raise LogUnreadable(reason)

    def frames() -> Iterator[can.Message]:
        with reader:
            it = iter(reader)
            first = True
            while True:
                reason = None
                try:
                    msg = next(it)
                except StopIteration:
                    declared = getattr(reader, "file_size", 0) if isinstance(reader, can.BLFReader) else 0
                    if isinstance(declared, int) and declared > path.stat().st_size:
                        errors["log_unreadable"] += 1  # python-can ends a cut BLF quietly; its header tells
                    return
                except Exception as e:  # a truncated or corrupt record: keep what came before
                    reason = why(e)
                if reason is not None:
                    if first:
                        raise LogUnreadable(reason)
                    errors["log_unreadable"] += 1
                    return
                first = False
                yield msg

    return frames()
