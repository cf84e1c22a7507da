"""CAN frames in columnar form: what sources hand to decoders.

python-can gives one `can.Message` per frame; we convert once per batch into numpy arrays so that decoding works
on whole batches (one numpy operation per PGN and signal instead of per frame).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # only for the annotation: importing python-can pulls in its MF4 reader (asammdf, pandas)
    import can

# Bytes past a frame's DLC are filled with 0xFF: J1939's "not available", so a signal that reaches past the end of a
# short frame decodes as missing rather than as a reading.
PAD = 0xFF


@dataclass(slots=True)
class FrameBatch:
    ts: npt.NDArray[np.float64]
    can_id: npt.NDArray[np.uint32]
    dlc: npt.NDArray[np.uint8]
    data: npt.NDArray[np.uint8]  # shape (n, 8)
    extended: npt.NDArray[np.bool_]
    bad: npt.NDArray[np.bool_]  # error frames, remote frames, FD frames longer than 8 bytes
    bus: str = "can0"

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    @classmethod
    def empty(cls, bus: str = "can0") -> FrameBatch:
        return cls(
            np.zeros(0, np.float64),
            np.zeros(0, np.uint32),
            np.zeros(0, np.uint8),
            np.zeros((0, 8), np.uint8),
            np.zeros(0, np.bool_),
            np.zeros(0, np.bool_),
            bus,
        )

    @classmethod
    def from_messages(cls, msgs: Sequence[can.Message], bus: str = "can0") -> FrameBatch:
        n = len(msgs)
        ts = np.fromiter((m.timestamp for m in msgs), np.float64, n)
        can_id = np.fromiter((m.arbitration_id & 0x1FFFFFFF for m in msgs), np.uint32, n)
        extended = np.fromiter((m.is_extended_id for m in msgs), np.bool_, n)
        bad = np.fromiter(
            (m.is_error_frame or m.is_remote_frame or len(m.data) > 8 for m in msgs), np.bool_, n
        )
        raw = b"".join(bytes(m.data[:8]).ljust(8, b"\xff") for m in msgs)
        data = np.frombuffer(raw, np.uint8).reshape(n, 8) if n else np.zeros((0, 8), np.uint8)
        dlc = np.fromiter((min(len(m.data), 8) for m in msgs), np.uint8, n)
        return cls(ts, can_id, dlc, data, extended, bad, bus)

    def take(self, idx: npt.NDArray[np.intp] | slice, bus: str | None = None) -> FrameBatch:
        """The frames at `idx`, in that order (copies for an index array, views for a slice)."""
        return FrameBatch(self.ts[idx], self.can_id[idx], self.dlc[idx], self.data[idx], self.extended[idx],
                          self.bad[idx], self.bus if bus is None else bus)

    @classmethod
    def concat(cls, parts: Sequence[FrameBatch], bus: str) -> FrameBatch:
        if len(parts) == 1:
            p = parts[0]
            return p if p.bus == bus else p.take(slice(None), bus)
        if not parts:
            return cls.empty(bus)
        return cls(
            np.concatenate([p.ts for p in parts]),
            np.concatenate([p.can_id for p in parts]),
            np.concatenate([p.dlc for p in parts]),
            np.concatenate([p.data for p in parts]),
            np.concatenate([p.extended for p in parts]),
            np.concatenate([p.bad for p in parts]),
            bus,
        )


def bus_label(channel: object) -> str:
    """A log's channel as the bus label replay decodes it under: candump's interface name as it is, a number n
    (ASC, BLF, MF4) as `can<n>`, none as `can0`."""
    if channel is None or channel == "":
        return "can0"
    return f"can{channel}" if isinstance(channel, int) else str(channel)


@dataclass(slots=True)
class LabelledFrames:
    """Frames of one or more buses in the order a log holds them: the columns, and each frame's bus label as an
    index into `labels`, which lists the labels in the order they first appear (what log readers give replay)."""

    frames: FrameBatch
    label: npt.NDArray[np.int32]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.frames)

    @classmethod
    def from_messages(cls, msgs: Sequence[can.Message]) -> LabelledFrames:
        names: dict[str, int] = {}
        label = np.fromiter((names.setdefault(bus_label(m.channel), len(names)) for m in msgs), np.int32, len(msgs))
        return cls(FrameBatch.from_messages(msgs, ""), label, list(names))


class FrameCollector:
    """Frames gathered one at a time as plain values (readers that parse record by record), turned into columns a
    chunk at a time: no can.Message per frame."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.ts: list[float] = []
        self.channel: list[object] = []
        self.can_id: list[int] = []
        self.extended: list[bool] = []
        self.bad: list[bool] = []
        self.payload: list[bytes] = []

    def add(self, ts: float, channel: object, can_id: int, extended: bool, data: bytes, bad: bool = False) -> None:
        """`bad`: an error or remote frame; a payload longer than 8 bytes is bad too (as in `from_messages`)."""
        self.ts.append(ts)
        self.channel.append(channel)
        self.can_id.append(can_id & 0x1FFFFFFF)
        self.extended.append(extended)
        self.bad.append(bad or len(data) > 8)
        self.payload.append(data[:8])

    def __len__(self) -> int:
        return len(self.ts)

    def take(self) -> LabelledFrames:
        n = len(self.ts)
        dlc = np.fromiter((len(p) for p in self.payload), np.uint8, n)
        raw = b"".join(p.ljust(8, bytes([PAD])) for p in self.payload)
        names: dict[str, int] = {}
        label = np.fromiter((names.setdefault(bus_label(c), len(names)) for c in self.channel), np.int32, n)
        data = np.frombuffer(raw, np.uint8).reshape(n, 8).copy() if n else np.zeros((0, 8), np.uint8)
        lf = LabelledFrames(FrameBatch(np.array(self.ts, np.float64), np.array(self.can_id, np.uint32), dlc, data,
                                       np.array(self.extended, np.bool_), np.array(self.bad, np.bool_), ""),
                            label, list(names))
        self.clear()
        return lf


class Rebatcher:
    """Frames of several buses in, batches of `size` frames of one bus out: each batch when it fills, in the order
    they fill across buses, then (`flush`) what is left of each bus, buses in order of first appearance. These are
    exactly the batches a frame-by-frame loop keeping a list per bus hands on, whatever the chunks read."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._held: dict[str, list[FrameBatch]] = {}
        self._count: dict[str, int] = {}

    def feed(self, lf: LabelledFrames) -> list[tuple[str, FrameBatch]]:
        if len(lf.labels) == 1:  # one bus: no index to build
            return [(name, fb) for _, name, fb in self._one(lf.labels[0], lf.frames, None)]
        done: list[tuple[int, str, FrameBatch]] = []
        for k, name in enumerate(lf.labels):
            done += self._one(name, lf.frames, np.flatnonzero(lf.label == k))
        done.sort(key=lambda d: d[0])
        return [(name, fb) for _, name, fb in done]

    def _one(self, name: str, frames: FrameBatch,
             pos: npt.NDArray[np.intp] | None) -> list[tuple[int, str, FrameBatch]]:
        n = len(frames) if pos is None else int(pos.size)
        held = self._held.setdefault(name, [])
        count = self._count.get(name, 0)
        out = []
        start = 0
        for end in range(self.size - count, n + 1, self.size):  # frame index (exclusive) where a batch fills
            part = frames.take(slice(start, end) if pos is None else pos[start:end], name)
            out.append((end - 1 if pos is None else int(pos[end - 1]), name, FrameBatch.concat([*held, part], name)))
            held.clear()
            count = 0
            start = end
        if start < n:
            held.append(frames.take(slice(start, n) if pos is None else pos[start:], name))
            count += n - start
        self._count[name] = count
        return out

    def flush(self) -> list[tuple[str, FrameBatch]]:
        out = [(name, FrameBatch.concat(parts, name)) for name, parts in self._held.items() if parts]
        self._held = {name: [] for name in self._held}
        self._count = dict.fromkeys(self._held, 0)
        return out
