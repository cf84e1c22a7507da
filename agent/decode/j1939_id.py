"""SAE J1939 29-bit identifier fields, vectorised."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

PDU2_MIN_PF = 240  # PF < 240: PDU1 (PS is a destination address); PF >= 240: PDU2 (PS is a group extension)
GLOBAL_ADDRESS = 0xFF


@dataclass(slots=True)
class J1939Ids:
    priority: npt.NDArray[np.uint8]
    pgn: npt.NDArray[np.uint32]
    da: npt.NDArray[np.uint8]
    sa: npt.NDArray[np.uint8]


def split_ids(can_id: npt.NDArray[np.uint32]) -> J1939Ids:
    cid = can_id.astype(np.uint32)
    sa = (cid & 0xFF).astype(np.uint8)
    ps = (cid >> 8) & 0xFF
    pf = (cid >> 16) & 0xFF
    dp = (cid >> 24) & 0x3  # extended data page + data page
    prio = ((cid >> 26) & 0x7).astype(np.uint8)
    pdu1 = pf < PDU2_MIN_PF
    pgn = ((dp << 16) | (pf << 8) | np.where(pdu1, 0, ps)).astype(np.uint32)
    da = np.where(pdu1, ps, GLOBAL_ADDRESS).astype(np.uint8)
    return J1939Ids(prio, pgn, da, sa)


def pgn_of(can_id: int) -> int:
    pf = (can_id >> 16) & 0xFF
    pgn = (can_id >> 8) & 0x3FFFF
    return pgn & 0x3FF00 if pf < PDU2_MIN_PF else pgn


def make_id(pgn: int, sa: int, priority: int = 6, da: int = GLOBAL_ADDRESS) -> int:
    pf = (pgn >> 8) & 0xFF
    if pf < PDU2_MIN_PF:
        pgn = (pgn & 0x3FF00) | da
    return ((priority & 0x7) << 26) | ((pgn & 0x3FFFF) << 8) | (sa & 0xFF)
