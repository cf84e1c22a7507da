"""How harvester_common/wiredict.py (codec 2's dictionary, D1) was made; kept so that the making can be checked.

    python bench/wire_dictionary.py           # train and print the dictionary's SHA-256 and size
    python bench/wire_dictionary.py --write   # (re)write harvester_common/wiredict.py: ONLY for a NEW codec number

Trained with zstd's own trainer (fastCover) on the bodies of steady-state messages made from the CSS Electronics
CANedge truck traces (../shared/data/can/css_canedge), never from the John Deere traces that wire_bytes_per_sample
measures: the figure is measured on data the dictionary has not seen. The traces are decoded with the J1939 DBC
the benchmarks use and cut into 10 s batches, sent as the uplink sends them (a table in full until confirmed, by
reference after) with header values shaped as a vehicle's (sequence numbers from a microsecond floor, batch ids
from a millisecond clock, `sent_at`, `backfill_from`) but ids that no benchmark uses. So the dictionary holds what
any J1939 vehicle's messages share: the header's keys, J1939 signal names and units of the standard DBC, and the
byte statistics of ENC_V2 columns (zstd's entropy tables), not one vehicle's or one trace's data.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import sys
import textwrap
from typing import Any

import numpy as np
from benchkit import REPO, SHARED_DATA, _big_dbc  # also puts the repository on sys.path

from harvester_common import wire

DICT_BYTES = 4096  # 2 KiB does as well on the held-out traces within 0.2 %, 1 KiB 4 % worse; 8 KiB no better
OUT = REPO / "harvester_common" / "wiredict.py"


def training_bodies() -> list[bytes]:
    import can

    from agent.decode.j1939 import J1939Decoder
    from agent.frames import FrameBatch
    from agent.records import SampleArrays
    from agent.signals import SignalRegistry
    from agent.writer import SampleBuffer

    files = sorted((SHARED_DATA / "can" / "css_canedge").glob("*_candumpL.log"))
    if not files:
        raise SystemExit(f"the dictionary is trained on {SHARED_DATA / 'can' / 'css_canedge'}, which is absent")
    reg = SignalRegistry()
    bodies: list[bytes] = []
    cloud: dict[str, list[Any]] = {}
    seq = 1_700_000_000_000_000
    for f in files:
        msgs = list(can.LogReader(str(f)))
        for ch in sorted({str(m.channel) for m in msgs}):
            dec = J1939Decoder(reg, [_big_dbc()], ch)
            r = dec.decode(FrameBatch.from_messages([m for m in msgs if str(m.channel) == ch], ch)).samples
            if not len(r):
                continue
            o = np.argsort(r.ts, kind="stable")
            ts, sid, val = r.ts[o], r.sid[o], r.value[o]
            for a, b in itertools.pairwise(np.arange(ts[0], ts[-1] + 10.0, 10.0)):
                sel = (ts >= a) & (ts < b)
                if not sel.any():
                    continue
                buf = SampleBuffer(reg)
                buf.add(SampleArrays(ts[sel], sid[sel], val[sel]))
                cols = buf.take()
                assert cols is not None
                seg = wire.Segment("samples", seq, seq + len(cols) - 1, columns=cols)
                i = len(bodies)
                batch = wire.Batch("training", "truck-css", 1_700_000_000_000 + 10_007 * i, [seg],
                                   1_700_000_000.0 + 10.003 * i, extra={"backfill_from": seq + len(cols)})
                msg = wire.encode_batch(batch, compress=False, known_tables=cloud)
                cloud.update(batch.tables)
                bodies.append(msg[4:])
                seq += len(cols)
    return bodies


def train() -> bytes:
    import zstandard

    bodies = training_bodies()
    # Fixed trainer parameters, one thread: the same bodies give the same dictionary.
    d = zstandard.train_dictionary(DICT_BYTES, bodies, k=200, d=8, level=wire.ZSTD_LEVEL_D1, threads=1)
    return d.as_bytes()


def module_text(data: bytes) -> str:
    b85 = base64.b85encode(data).decode()
    lines = "\n".join(f'    "{line}"' for line in textwrap.wrap(b85, 112))
    return f'''"""Codec 2's zstd dictionary, D1 (docs/protocol.md, "Codecs"): {len(data)} bytes, SHA-256
{hashlib.sha256(data).hexdigest()}.

Made by bench/wire_dictionary.py (trained on traces the benchmarks do not measure). Its bytes are part of the
protocol: a receiver decodes codec 2 with exactly these, for ever. Never edit or regenerate this file; a new
dictionary is a new module and a new codec number.
"""

import base64

D1 = base64.b85decode(
{lines}
)
'''


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/wire_dictionary.py", description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"write {OUT.relative_to(REPO)}")
    a = ap.parse_args(argv)
    data = train()
    print(f"{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    if a.write:
        OUT.write_text(module_text(data))
        print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
