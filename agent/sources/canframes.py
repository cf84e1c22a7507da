"""CAN frames that arrive as bytes, turned into a FrameBatch (agent/frames.py) a whole read at a time: no
`can.Message` per frame, no Python loop over a frame's fields.

Two wire forms:

- Linux `struct can_frame` (<linux/can.h>), what a SocketCAN raw socket gives (agent/sources/rawcan.py): 16 bytes,
  native byte order::

      u32 can_id   bits 0-28 the identifier; 0x80000000 EFF (29-bit), 0x40000000 RTR, 0x20000000 error frame
      u8  len      payload length 0..8 (the DLC)
      u8  __pad, __res0, len8_dlc
      u8  data[8]  bytes past `len` are whatever the driver left there

- socketcand's ASCII elements (linux-can/socketcand doc/protocol.md; state_raw.c writes them), what a socketcand
  server sends in raw mode (agent/sources/socketcand.py)::

      < frame ID SECS.USECS DATA >           ID 3 hex digits (11-bit) or 8 (29-bit); DATA hex, no spaces, 0-8 bytes
      < fdframe ID FLAGS SECS.USECS DATA >   CAN FD: DATA up to 64 bytes
      < error CLASS SECS.USECS >             an error frame (CLASS: the kernel's error class bits)

In the batch, as in `FrameBatch.from_messages`: error and remote frames and payloads longer than 8 bytes are `bad`
(kept, so the decoder counts them); bytes past the DLC are 0xFF (J1939 "not available").

What is not a frame is never one. A record of the wrong size (a datagram cut short, or longer than a can_frame)
is left out and counted (`short_record`, `long_record`). A socketcand element that is not one of the three above
or has a malformed field (an ID of other than 3 or 8 digits, an 11-bit ID above 0x7FF, a timestamp that is not
SECS.USECS, DATA of an odd length or over 64 bytes) is left out and counted (`bad_element`); an element still open
after MAX_ELEMENT_BYTES is a broken stream, dropped and counted (`element_too_long`). Bytes between elements
(socketcand sends none) are skipped.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from agent.frames import PAD, FrameBatch

CAN_EFF_FLAG = 0x80000000
CAN_RTR_FLAG = 0x40000000
CAN_ERR_FLAG = 0x20000000
CAN_EFF_MASK = 0x1FFFFFFF
CAN_SFF_MASK = 0x7FF
CAN_MTU = 16  # sizeof(struct can_frame)

CAN_FRAME = np.dtype([("can_id", "=u4"), ("len", "u1"), ("pad", "u1"), ("res0", "u1"), ("len8_dlc", "u1"),
                      ("data", "u1", (8,))])
assert CAN_FRAME.itemsize == CAN_MTU

# socketcand's elements are short (an FD frame with 64 bytes is ~160 characters); anything longer is no element.
MAX_ELEMENT_BYTES = 512

_ID = rb"([0-9A-Fa-f]{3}|[0-9A-Fa-f]{8})"
_ELEMENT = re.compile(
    rb"< (?:(frame|error) " + _ID + rb"|(fdframe) " + _ID + rb" [0-9A-Fa-f]{2}) ([0-9]{1,12}\.[0-9]{1,9})"
    rb"(?: ((?:[0-9A-Fa-f]{2}){0,64}))? ?>")
_BYTE_AS_HEX = 2


def _padded(data: npt.NDArray[np.uint8], dlc: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    out = np.ascontiguousarray(data, np.uint8).copy()
    out[np.arange(8)[None, :] >= dlc[:, None]] = PAD
    return out


def batch_from_can_frames(frames: npt.NDArray[np.void], ts: npt.NDArray[np.float64], bus: str) -> FrameBatch:
    """`frames`: records of CAN_FRAME (e.g. `np.frombuffer(buf, CAN_FRAME, n)`), `ts` their receive times."""
    raw_id = frames["can_id"].astype(np.uint32)
    extended = (raw_id & CAN_EFF_FLAG) != 0
    can_id = np.where(extended, raw_id & CAN_EFF_MASK, raw_id & CAN_SFF_MASK).astype(np.uint32)
    length = frames["len"].astype(np.uint8)
    bad = ((raw_id & (CAN_RTR_FLAG | CAN_ERR_FLAG)) != 0) | (length > 8)
    dlc = np.minimum(length, 8).astype(np.uint8)
    return FrameBatch(np.asarray(ts, np.float64), can_id, dlc, _padded(frames["data"], dlc), extended, bad, bus)


@dataclass(slots=True)
class Parsed:
    """What one pass over socketcand text gave: the frames, how many bytes it used up, what it refused."""

    batch: FrameBatch
    consumed: int
    refused: Counter[str] = field(default_factory=Counter)


def parse_socketcand(buf: bytes, bus: str) -> Parsed:
    """Every complete element in `buf`. `consumed`: bytes up to and including the last complete element (or all
    of them when the rest cannot become an element); the caller keeps `buf[consumed:]` for the next read."""
    refused: Counter[str] = Counter()
    end = buf.rfind(b">") + 1
    consumed = end
    if len(buf) - end > MAX_ELEMENT_BYTES:
        refused["element_too_long"] += 1
        consumed = len(buf)
    found = _ELEMENT.findall(buf, 0, end) if end else []
    # An element opened and never closed before the next one counts too: one more `<` than `>`.
    elements = max(buf.count(b"<", 0, end), buf.count(b">", 0, end))
    if elements > len(found):
        refused["bad_element"] += elements - len(found)
    if not found:
        return Parsed(FrameBatch.empty(bus), consumed, refused)
    kinds, ids, _fd_kinds, fd_ids, stamps, datas = zip(*found, strict=True)
    n = len(found)
    ids = tuple(i or f for i, f in zip(ids, fd_ids, strict=True))
    ident = np.fromiter((int(x, 16) for x in ids), np.uint32, n)
    extended = np.fromiter((len(x) == 8 for x in ids), np.bool_, n)
    length = np.fromiter((len(d) // _BYTE_AS_HEX for d in datas), np.int64, n)
    is_error = np.fromiter((k == b"error" for k in kinds), np.bool_, n)
    ts = np.fromiter((float(t) for t in stamps), np.float64, n)
    hex_data = b"".join(d[:16].ljust(16, b"F") for d in datas).decode("ascii")
    data = np.frombuffer(bytes.fromhex(hex_data), np.uint8).reshape(n, 8)
    dlc = np.minimum(length, 8).astype(np.uint8)
    bad = is_error | (length > 8)
    # An 11-bit identifier written with 3 digits can still say 0x800..0xFFF: no such frame exists. (An error
    # element's 3 digits are the kernel's error class bits, not an identifier.)
    impossible = ~extended & ~is_error & (ident > CAN_SFF_MASK)
    if impossible.any():
        refused["bad_element"] += int(impossible.sum())
        keep = ~impossible
        ts, ident, dlc, data, extended, bad = ts[keep], ident[keep], dlc[keep], data[keep], extended[keep], bad[keep]
    return Parsed(FrameBatch(ts, ident, dlc, _padded(data, dlc), extended, bad, bus), consumed, refused)


def concat_batches(parts: list[FrameBatch], bus: str) -> FrameBatch:
    """One batch of several reads, in order."""
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return FrameBatch.empty(bus)
    return FrameBatch(np.concatenate([p.ts for p in parts]), np.concatenate([p.can_id for p in parts]),
                      np.concatenate([p.dlc for p in parts]), np.concatenate([p.data for p in parts]),
                      np.concatenate([p.extended for p in parts]), np.concatenate([p.bad for p in parts]), bus)


def split_batch(fb: FrameBatch, n: int) -> tuple[FrameBatch, FrameBatch]:
    """The first `n` frames and the rest."""
    head = FrameBatch(fb.ts[:n], fb.can_id[:n], fb.dlc[:n], fb.data[:n], fb.extended[:n], fb.bad[:n], fb.bus)
    tail = FrameBatch(fb.ts[n:], fb.can_id[n:], fb.dlc[n:], fb.data[n:], fb.extended[n:], fb.bad[n:], fb.bus)
    return head, tail
