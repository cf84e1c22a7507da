"""CAN frames in columnar form: what sources hand to decoders.

python-can gives one `can.Message` per frame; we convert once per batch into numpy arrays so that decoding works
on whole batches (one numpy operation per PGN and signal instead of per frame).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import can
import numpy as np
import numpy.typing as npt

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
