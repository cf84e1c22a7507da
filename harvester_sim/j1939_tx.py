"""The simulated ECUs: every DBC message at its standard period, and DM1 (single frame or TP.BAM) once a second;
optionally the engine's address claim (PGN 60928) before anything else, as J1939-81 has an ECU do at power-up.

Frames are encoded with the same compiled signal layouts the decoder uses (little-endian J1939 fields; unused bits
all ones, as J1939 requires), and tests check them against cantools.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator
from pathlib import Path

import can

from agent.decode.j1939 import _CompiledMessage, default_dbc, load_dbcs
from agent.decode.j1939_addr import PGN_ADDRESS_CLAIMED
from agent.decode.j1939_id import make_id
from agent.decode.j1939_tp import PGN_DM1, PGN_TP_CM, PGN_TP_DT, Dtc
from harvester_sim.physics import Harvester

STEP_S = 0.05  # physics step; frames in between carry the latest values
DM1_PERIOD_S = 1.0
BAM_PACKET_GAP_S = 0.05  # J1939-21: 50-200 ms between BAM packets
ENGINE_SA = 0x00


def encode_signals(cm: _CompiledMessage, values: dict[str, float]) -> bytes:
    word = (1 << 64) - 1
    for f in cm.fast:
        v = values.get(f.name)
        if v is None:
            continue  # not provided: stays all ones, "not available"
        raw = round((v - f.offset) / f.scale)
        top = (1 << f.length) - 1
        # Keep clear of J1939's reserved codes at the top of the range.
        hi = ((0xFA + 1) << (f.length - 8)) - 1 if f.length >= 8 else (top - 2 if f.length >= 2 else top)
        if f.signed:
            half = 1 << (f.length - 1)
            raw = max(-half, min(half - 1, raw)) & top
        else:
            raw = max(0, min(hi, raw))
        word &= ~(top << f.shift)
        word |= raw << f.shift
    return word.to_bytes(8, "little")


def encode_dm1(dtcs: list[Dtc], lamps: int | None = None) -> bytes:
    """DM1 payload (J1939-73): lamp bytes, then SPN (19 bits), FMI (5), CM (1), OC (7) per DTC."""
    if lamps is None:
        lamps = 0x04 if dtcs else 0x00  # amber warning lamp on while a DTC is active
    out = bytearray([lamps, 0xFF])
    if not dtcs:
        out += b"\x00\x00\x00\x00"
    for d in dtcs:
        out += bytes(
            [d.spn & 0xFF, (d.spn >> 8) & 0xFF, ((d.spn >> 16) & 0x7) << 5 | (d.fmi & 0x1F), d.occurrence & 0x7F]
        )
    if len(out) < 8:
        out += b"\xff" * (8 - len(out))
    return bytes(out)


def make_name(identity: int, manufacturer: int, function: int, function_instance: int = 0, ecu_instance: int = 0,
              vehicle_system: int = 0, vehicle_system_instance: int = 0, industry_group: int = 2,
              arbitrary_address_capable: bool = True) -> int:
    """A 64-bit J1939-81 NAME from its fields (industry group 2: agricultural and forestry equipment)."""
    return ((identity & 0x1FFFFF) | (manufacturer & 0x7FF) << 21 | (ecu_instance & 0x7) << 32
            | (function_instance & 0x1F) << 35 | (function & 0xFF) << 40 | (vehicle_system & 0x7F) << 49
            | (vehicle_system_instance & 0xF) << 56 | (industry_group & 0x7) << 60
            | int(arbitrary_address_capable) << 63)


SIM_ENGINE_NAME = make_name(identity=0x1234, manufacturer=0x7FF, function=0)  # function 0: engine


def address_claim_frame(name: int, sa: int, ts: float) -> can.Message:
    """Address Claimed: the NAME in 8 bytes, little-endian, to the global address; from 254 it is Cannot Claim."""
    return can.Message(arbitration_id=make_id(PGN_ADDRESS_CLAIMED, sa, 6), data=name.to_bytes(8, "little"),
                       is_extended_id=True, timestamp=ts)


def dm_frames(pgn: int, payload: bytes, sa: int, ts: float) -> list[can.Message]:
    """A DM1 or DM2 as it travels: one frame when the payload fits 8 bytes, else TP.BAM."""
    if len(payload) <= 8:
        return [can.Message(arbitration_id=make_id(pgn, sa, 6), data=payload, is_extended_id=True, timestamp=ts)]
    return bam_frames(pgn, payload, sa, ts)


def bam_frames(pgn: int, payload: bytes, sa: int, t0: float) -> list[can.Message]:
    """A TP.BAM transfer: the announcement, then numbered 7-byte packets 50 ms apart."""
    n = (len(payload) + 6) // 7
    cm = bytes([32, len(payload) & 0xFF, len(payload) >> 8, n, 0xFF, pgn & 0xFF, (pgn >> 8) & 0xFF, pgn >> 16])
    frames = [can.Message(arbitration_id=make_id(PGN_TP_CM, sa, 7, 0xFF), data=cm, is_extended_id=True, timestamp=t0)]
    for i in range(n):
        chunk = payload[i * 7 : i * 7 + 7].ljust(7, b"\xff")
        frames.append(
            can.Message(
                arbitration_id=make_id(PGN_TP_DT, sa, 7, 0xFF),
                data=bytes([i + 1]) + chunk,
                is_extended_id=True,
                timestamp=t0 + BAM_PACKET_GAP_S * (i + 1),
            )
        )
    return frames


class J1939Transmitter:
    """`absent`: messages this machine does not send at all (no such sensor or controller); `intermittent`:
    messages that drop out now and then (a loose connector, a controller that resets): sent for spells of
    ~2 minutes, silent for ~20 s, both drawn from exponential distributions."""

    def __init__(
        self,
        harvester: Harvester,
        dbc_path: Path | None = None,
        jitter_s: float = 0.0,
        seed: int = 0,
        absent: frozenset[str] = frozenset(),
        intermittent: frozenset[str] = frozenset(),
        engine_name: int | None = None,
    ) -> None:
        """`engine_name`: the engine ECU claims its address with this NAME at time 0 (e.g. SIM_ENGINE_NAME), so
        that its signals' source is `bus/NAME`; None (the default) sends no claim, and the source is `bus/00`."""
        self.h = harvester
        self.jitter_s = jitter_s
        self.rng = random.Random(seed)
        self.absent = absent
        self._outage_rng = random.Random(seed + 1)
        # Per intermittent message: (silent from, silent until) of its next outage.
        self._outage = {m: self._next_outage(m, 0.0) for m in intermittent}
        self.messages = list(load_dbcs([dbc_path or default_dbc()]).values())
        self._ids = {}
        self._heap: list[tuple[float, int, str]] = []
        for i, cm in enumerate(self.messages):
            period = (cm.message.cycle_time or 1000) / 1000.0
            self._ids[cm.name] = (cm.message.frame_id & 0x1FFFFFFF, period, i)
            # Stagger start phases as real ECUs do, so that not every message lands on the same instant.
            heapq.heappush(self._heap, (self.rng.uniform(0, period), i, cm.name))
        heapq.heappush(self._heap, (self.rng.uniform(0, DM1_PERIOD_S), len(self.messages), "DM1"))
        self.engine_name = engine_name
        if engine_name is not None:
            heapq.heappush(self._heap, (0.0, -1, "CLAIM"))  # before anything the engine sends
        self._by_name = {cm.name: cm for cm in self.messages}
        self._sim_t = 0.0
        self._values = harvester.values()
        self.frames_sent = 0

    def _next_outage(self, name: str, after: float) -> tuple[float, float]:
        start = after + self._outage_rng.expovariate(1 / 120.0)
        return start, start + 2.0 + self._outage_rng.expovariate(1 / 20.0)

    def _silent(self, name: str, t: float) -> bool:
        span = self._outage.get(name)
        if span is None:
            return False
        while t >= span[1]:
            span = self._outage[name] = self._next_outage(name, span[1])
        return t >= span[0]

    def _advance(self, t: float) -> None:
        while self._sim_t + STEP_S <= t:
            self.h.step(STEP_S)
            self.h.sensor_noise(STEP_S)
            self._sim_t += STEP_S
            self._values = self.h.values()

    def frames_until(self, t_end: float) -> list[can.Message]:
        """Advance the harvester to `t_end` (sim seconds) and return every frame due by then, in time order."""
        out: list[can.Message] = []
        while self._heap and self._heap[0][0] <= t_end:
            due, idx, name = heapq.heappop(self._heap)
            self._advance(due)
            if name == "CLAIM":
                assert self.engine_name is not None
                out.append(address_claim_frame(self.engine_name, ENGINE_SA, due))
                continue
            if name == "DM1":
                out += dm_frames(PGN_DM1, encode_dm1(self.h.active_dtcs()), ENGINE_SA, due)
                heapq.heappush(self._heap, (due + DM1_PERIOD_S, idx, name))
                continue
            cid, period, _ = self._ids[name]
            if name not in self.absent and not self._silent(name, due):
                data = encode_signals(self._by_name[name], self._values)
                out.append(can.Message(arbitration_id=cid, data=data, is_extended_id=True, timestamp=due))
            nxt = due + period + (self.rng.uniform(-self.jitter_s, self.jitter_s) if self.jitter_s else 0.0)
            heapq.heappush(self._heap, (max(due + 1e-4, nxt), idx, name))
        self._advance(t_end)
        out.sort(key=lambda m: m.timestamp)
        self.frames_sent += len(out)
        return out


def generate_frames(harvester: Harvester, duration_s: float, step_s: float = 1.0) -> Iterator[can.Message]:
    """Frames in simulated time, as fast as they can be made (replay tests, training, benchmarks)."""
    tx = J1939Transmitter(harvester)
    t = 0.0
    while t < duration_s:
        t = min(duration_s, t + step_s)
        yield from tx.frames_until(t)
