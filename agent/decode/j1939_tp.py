"""J1939-21 transport protocol (TP.BAM and TP.CMDT) reassembly, as a passive listener, and DM1/DM2 parsing.

Sessions are keyed by (source, destination). A session that sees no packet for T1 (750 ms) is dropped and counted;
an abort ends it; a new announcement replaces an unfinished one (counted). Packets may arrive out of order or twice
(CMDT retransmits): they are stored by sequence number and the message completes when every packet is present.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

PGN_TP_CM = 0xEC00
PGN_TP_DT = 0xEB00
PGN_DM1 = 65226  # active DTCs
PGN_DM2 = 65227  # previously active DTCs: the same layout as DM1
CM_RTS = 16
CM_CTS = 17
CM_EOM_ACK = 19
CM_BAM = 32
CM_ABORT = 255
T1_S = 0.75  # J1939-21: maximum time between packets of a message
MAX_TP_BYTES = 1785  # 255 packets * 7 bytes


@dataclass(slots=True)
class Reassembled:
    ts: float
    pgn: int
    sa: int
    da: int
    payload: bytes


@dataclass(slots=True)
class _Session:
    pgn: int
    size: int
    packets: int
    started: float
    last: float
    parts: dict[int, bytes] = field(default_factory=dict)


class TransportReassembler:
    def __init__(self, errors: Counter[str]) -> None:
        self._sessions: dict[tuple[int, int], _Session] = {}
        self.errors = errors

    def on_cm(self, ts: float, sa: int, da: int, data: bytes) -> None:
        self.expire(ts)
        ctrl = data[0]
        if ctrl in (CM_BAM, CM_RTS):
            size = data[1] | (data[2] << 8)
            packets = data[3]
            pgn = data[5] | (data[6] << 8) | (data[7] << 16)
            if not (9 <= size <= MAX_TP_BYTES) or packets != (size + 6) // 7:
                self.errors["tp_bad_announce"] += 1
                return
            key = (sa, da if ctrl == CM_RTS else 0xFF)
            if key in self._sessions:
                self.errors["tp_replaced"] += 1
            self._sessions[key] = _Session(pgn, size, packets, ts, ts)
        elif ctrl == CM_ABORT:
            # An abort travels from either side of a CMDT connection.
            for key in ((sa, da), (da, sa)):
                if self._sessions.pop(key, None) is not None:
                    self.errors["tp_aborted"] += 1
        elif ctrl in (CM_CTS, CM_EOM_ACK):
            return
        else:
            self.errors["tp_unknown_control"] += 1

    def on_dt(self, ts: float, sa: int, da: int, data: bytes) -> Reassembled | None:
        key = (sa, da)
        s = self._sessions.get(key)
        if s is None:
            self.errors["tp_orphan_packet"] += 1
            return None
        if ts - s.last > T1_S:
            del self._sessions[key]
            self.errors["tp_timeout"] += 1
            return None
        seq = data[0]
        if not 1 <= seq <= s.packets:
            self.errors["tp_bad_sequence"] += 1
            return None
        s.parts[seq] = bytes(data[1:8]).ljust(7, b"\xff")
        s.last = ts
        if len(s.parts) < s.packets:
            return None
        del self._sessions[key]
        payload = b"".join(s.parts[i] for i in range(1, s.packets + 1))[: s.size]
        return Reassembled(ts, s.pgn, sa, da, payload)

    def expire(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if now - s.last > T1_S]:
            del self._sessions[key]
            self.errors["tp_timeout"] += 1

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)


@dataclass(frozen=True, slots=True)
class Dtc:
    spn: int
    fmi: int
    occurrence: int


@dataclass(frozen=True, slots=True)
class Dm1:
    mil: int
    red_stop: int
    amber_warning: int
    protect: int
    dtcs: tuple[Dtc, ...]


Lamps = tuple[int, int, int, int]  # malfunction indicator, red stop, amber warning, protect: 0 off, 1 on, 3 n/a


def parse_dm1(payload: bytes) -> Dm1:
    """DM1 or DM2 (J1939-73): 2 lamp bytes then 4-byte DTCs (SPN 19 bits, FMI 5 bits, CM 1 bit, OC 7 bits). Bytes
    after the last whole DTC are ignored (single-frame DM1s pad to 8 bytes with 0xFF)."""
    lamps, dtcs = dm1_fields(payload)
    return Dm1(*lamps, tuple(Dtc(*d) for d in dtcs))


def dm1_fields(payload: bytes) -> tuple[Lamps, list[tuple[int, int, int]]]:
    """`parse_dm1`'s content as plain tuples: the lamps, and (SPN, FMI, occurrence) of each DTC. What the decoder
    takes: making the frozen dataclasses cost twice the parsing, paid for every DM1 of a storm."""
    if len(payload) < 6:
        raise ValueError(f"DM1 of {len(payload)} bytes, need at least 6")
    lamps = payload[0]
    dtcs: list[tuple[int, int, int]] = []
    for i in range(2, len(payload) - 3, 4):
        b0, b1, b2, b3 = payload[i : i + 4]
        if b0 == b1 == b2 == b3 == 0xFF:
            continue  # padding
        spn = b0 | (b1 << 8) | ((b2 >> 5) << 16)
        fmi = b2 & 0x1F
        if spn == 0 and fmi == 0:
            continue  # "no active DTC"
        dtcs.append((spn, fmi, b3 & 0x7F))
    return ((lamps >> 6) & 3, (lamps >> 4) & 3, (lamps >> 2) & 3, lamps & 3), dtcs
