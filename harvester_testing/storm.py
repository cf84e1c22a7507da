"""A DTC storm on a J1939 bus, as a fuzzer makes it: random 29-bit ids and bytes, random transport-protocol frames
(TP.CM and TP.DT, some of them whole BAM transfers of a DM1), and single-frame DM1s with random content from random
source addresses. Deterministic for a seed; timestamps at a fixed frame rate from an epoch.

Random DM1 content is the worst case for the DTC path: nearly every DM1 announces a DTC never seen before and
clears the one before it (two events per frame), from up to 256 sources at once. Tests and the
`dtc_storm_frames_per_s` figure replay it; `write_candump` puts it in a candump -L log for `harvester-agent replay`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import can

from agent.decode.j1939_id import make_id
from agent.decode.j1939_tp import CM_BAM, PGN_DM1, PGN_TP_CM, PGN_TP_DT

STORM_EPOCH = 1_700_000_000.0
STORM_FPS = 2000.0  # a busy 250 kbit/s J1939 bus


def storm_frames(n: int, seed: int = 0, fps: float = STORM_FPS, t0: float = STORM_EPOCH,
                 dm1_share: float = 0.08, tp_share: float = 0.1) -> Iterator[can.Message]:
    """`n` frames: `dm1_share` single-frame DM1s with random content, `tp_share` transport frames (random CM and
    DT frames, and whole BAM transfers of a random multi-DTC DM1), the rest random 29-bit ids with random bytes."""
    rng = random.Random(seed)
    dt = 1.0 / fps
    i = 0
    queued: list[tuple[int, bytes]] = []  # the rest of a BAM transfer in progress: sent before anything else
    while i < n:
        t = t0 + i * dt
        if queued:
            cid, data = queued.pop(0)
        else:
            r = rng.random()
            if r < dm1_share:
                cid = make_id(PGN_DM1, rng.randrange(256), rng.randrange(8))
                data = rng.randbytes(8)
            elif r < dm1_share + tp_share:
                cid, data, rest = _tp(rng)
                queued.extend(rest)
            else:
                cid = rng.getrandbits(29)
                data = rng.randbytes(rng.randrange(9))
        yield can.Message(timestamp=t, arbitration_id=cid, is_extended_id=True, data=data, channel="can0")
        i += 1


def _tp(rng: random.Random) -> tuple[int, bytes, list[tuple[int, bytes]]]:
    sa, da = rng.randrange(256), rng.randrange(256)
    kind = rng.random()
    if kind < 0.05:  # a whole BAM of a DM1 with up to 8 random DTCs
        dtcs = rng.randrange(2, 9)
        payload = bytes([rng.randrange(256), 0xFF]) + rng.randbytes(4 * dtcs)
        packets = (len(payload) + 6) // 7
        cm = bytes([CM_BAM, len(payload) & 0xFF, len(payload) >> 8, packets, 0xFF,
                    PGN_DM1 & 0xFF, (PGN_DM1 >> 8) & 0xFF, PGN_DM1 >> 16])
        dt_id = make_id(PGN_TP_DT, sa, 7, 0xFF)
        rest = [(dt_id, bytes([k + 1]) + payload[k * 7:(k + 1) * 7].ljust(7, b"\xff")) for k in range(packets)]
        return make_id(PGN_TP_CM, sa, 7, 0xFF), cm, rest
    if kind < 0.6:
        return make_id(PGN_TP_CM, sa, 7, da), rng.randbytes(rng.randrange(9)), []
    return make_id(PGN_TP_DT, sa, 7, da), rng.randbytes(rng.randrange(9)), []


def write_candump(path: Path, frames: Iterator[can.Message]) -> int:
    """The frames as a candump -L log (python-can's writer); returns how many."""
    n = 0
    with can.Logger(str(path)) as w:
        for m in frames:
            w.on_message_received(m)
            n += 1
    return n
