"""Vector BLF → frames as columns, without python-can (importing it costs a replay more than reading a log).

The same frames, counts and order as the message path (agent/sources/pylogs.py: python-can's BLFReader, made to
read around damaged objects): a port of its file header, container and object parsing (CAN_MESSAGE, CAN_MESSAGE2,
CAN_ERROR_EXT, CAN_FD_MESSAGE, CAN_FD_MESSAGE_64; other objects skipped), with the same resynchronisation: a
container that does not decompress or parse is lost alone (`log_bad_record`), a damaged object header is skipped to
the next `LOBJ` signature, a file shorter than its header says ends where it is cut (`log_unreadable`).
tests/test_log_chunks.py checks it against the message path on the real file and on randomly damaged copies.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from agent.frames import FrameCollector, LabelledFrames

FILE_HEADER = struct.Struct("<4sLBBBBBBBBQQLL8H8H")
OBJ_HEADER_BASE = struct.Struct("<4sHHLL")
OBJ_HEADER_V1 = struct.Struct("<LHHQ")
OBJ_HEADER_V2 = struct.Struct("<LBxHQ8x")
LOG_CONTAINER_HEAD = struct.Struct("<H6xL4x")
CAN_MSG = struct.Struct("<HBBL8s")
CAN_FD_MSG = struct.Struct("<HBBLLBBB5x64s")
CAN_FD_MSG_64 = struct.Struct("<BBBBLLLLLLLHBBL")
CAN_ERROR_EXT = struct.Struct("<HHLBBBxLLH2x8s")

CAN_MESSAGE, LOG_CONTAINER, CAN_ERROR_EXT_TYPE, CAN_MESSAGE2 = 1, 10, 73, 86
CAN_FD_MESSAGE, CAN_FD_MESSAGE_64 = 100, 101
NO_COMPRESSION, ZLIB_DEFLATE = 0, 2
CAN_MSG_EXT, REMOTE_FLAG = 0x80000000, 0x80
CHUNK_FRAMES = 5000


class BLFParseError(Exception):
    """An object that is not where or what it should be (python-can's error of the same name)."""


def _systemtime(st: tuple[int, ...]) -> float:
    try:
        return datetime.datetime(st[0], st[1], st[3], st[4], st[5], st[6], st[7] * 1000,
                                 tzinfo=datetime.UTC).timestamp()
    except ValueError:
        return 0


def _add(out: FrameCollector, ts: float, channel: int, can_id: int, data: bytes, error: bool = False,
         remote: bool = False) -> None:
    # As can.Message keeps them: a remote frame has no data; the id's top bit says extended.
    out.add(ts, channel, can_id, bool(can_id & CAN_MSG_EXT), b"" if remote else data, error or remote)


class BlfReader:
    """Opens the file and reads its header (raising what python-can's reader raises on a bad one); `chunks`
    gives the frames."""

    def __init__(self, path: Path, errors: Counter[str]) -> None:
        self.file: IO[bytes] = path.open("rb")
        try:
            header = FILE_HEADER.unpack(self.file.read(FILE_HEADER.size))
            if header[0] != b"LOGG":
                raise BLFParseError("Unexpected file format")
            self.file_size = header[10]
            self.start_timestamp = _systemtime(header[14:22])
            self.file.read(header[1] - FILE_HEADER.size)
            self._size = os.fstat(self.file.fileno()).st_size
        except BaseException:
            self.file.close()
            raise
        self._errors = errors
        self._tail = b""
        self._pos = 0
        self._after_loss = False
        self._out = FrameCollector()

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

    def _lost(self) -> None:
        self._errors["log_bad_record"] += 1
        self._tail = b""  # an object split across the lost container is lost with it
        self._after_loss = True

    def chunks(self) -> Iterator[LabelledFrames]:
        """The frames, CHUNK_FRAMES at a time. An error the reader does not read around is raised after the frames
        before it are given (the caller keeps them and counts the cut)."""
        try:
            try:
                yield from self._objects()
            except Exception:
                if len(self._out):
                    yield self._out.take()
                raise
            if len(self._out):
                yield self._out.take()
            if isinstance(self.file_size, int) and self.file_size > self._size:
                self._errors["log_unreadable"] += 1  # the header says the file was longer: it is cut
        finally:
            self.file.close()

    def _objects(self) -> Iterator[LabelledFrames]:
        head = OBJ_HEADER_BASE
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
            if obj_type != LOG_CONTAINER:
                continue
            try:
                method, _ = LOG_CONTAINER_HEAD.unpack_from(obj_data)
                body = obj_data[LOG_CONTAINER_HEAD.size :]
                if method == ZLIB_DEFLATE:
                    body = zlib.decompressobj().decompress(body)
                elif method != NO_COMPRESSION:
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
                self._container(body)
            except (BLFParseError, struct.error, ValueError):
                self._lost()
            if len(self._out) >= CHUNK_FRAMES:
                yield self._out.take()

    def _container(self, data: bytes) -> None:
        if self._tail:
            data = b"".join((self._tail, data))
        with contextlib.suppress(struct.error):  # a struct cut by the container's end: the rest waits for the next
            self._parse(data)
        self._tail = data[self._pos :]

    def _parse(self, data: bytes) -> None:
        """python-can's BLFReader._parse_data, collecting values instead of making Messages."""
        out = self._out
        start_timestamp = self.start_timestamp
        max_pos = len(data)
        pos = 0
        while True:
            self._pos = pos
            try:
                pos = data.index(b"LOBJ", pos, pos + 8)
            except ValueError:
                if pos + 8 > max_pos:
                    return
                raise BLFParseError("Could not find next object") from None
            signature, header_size, header_version, obj_size, obj_type = OBJ_HEADER_BASE.unpack_from(data, pos)
            if signature != b"LOBJ":
                raise BLFParseError()
            next_pos = pos + obj_size
            if next_pos > max_pos:
                return  # this object continues in the next container
            pos += OBJ_HEADER_BASE.size
            if header_version == 1:
                flags, _, _, timestamp = OBJ_HEADER_V1.unpack_from(data, pos)
                pos += OBJ_HEADER_V1.size
            elif header_version == 2:
                flags, _, _, timestamp = OBJ_HEADER_V2.unpack_from(data, pos)
                pos += OBJ_HEADER_V2.size
            else:
                pos = next_pos
                continue
            # python-can: float(Decimal(timestamp) * factor); an int's true division is as exactly rounded
            ts = (timestamp / 100_000 if flags == 1 else timestamp / 1_000_000_000) + start_timestamp
            if obj_type in (CAN_MESSAGE, CAN_MESSAGE2):
                channel, mflags, dlc, can_id, can_data = CAN_MSG.unpack_from(data, pos)
                _add(out, ts, channel - 1, can_id, can_data[:dlc], remote=bool(mflags & REMOTE_FLAG))
            elif obj_type == CAN_ERROR_EXT_TYPE:
                m = CAN_ERROR_EXT.unpack_from(data, pos)
                _add(out, ts, m[0] - 1, m[7], m[9][: m[5]], error=True)
            elif obj_type == CAN_FD_MESSAGE:
                channel, mflags, _, can_id, _, _, _, valid_bytes, can_data = CAN_FD_MSG.unpack_from(data, pos)
                _add(out, ts, channel - 1, can_id, can_data[:valid_bytes], remote=bool(mflags & REMOTE_FLAG))
            elif obj_type == CAN_FD_MESSAGE_64:
                m = CAN_FD_MSG_64.unpack_from(data, pos)
                channel, valid_bytes, can_id, fd_flags, ext_data_offset = m[0], m[2], m[4], m[6], m[13]
                length = min(valid_bytes, (ext_data_offset or obj_size) - header_size - CAN_FD_MSG_64.size)
                at = pos + CAN_FD_MSG_64.size
                _add(out, ts, channel - 1, can_id, data[at : at + length].ljust(valid_bytes, b"\x00"),
                     remote=bool(fd_flags & 0x0010))
            pos = next_pos
