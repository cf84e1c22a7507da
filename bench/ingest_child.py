"""Child process for `ingest_frames_per_s`: one log, from interpreter start to exit, either through the agent's
replay (`replay`: agent.replay.replay, what `harvester-agent replay LOG --dbc DBC` runs: read, decode, features,
scoring with the shipped model, store) or through the naive gateway (`naive`: python-can `LogReader` + cantools
`decode` per frame, looked up by PGN). Each mode imports only what it uses; prints one JSON line.

    python bench/ingest_child.py replay|naive LOG DBC [MODEL]
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def naive(log: str, dbc: str) -> dict[str, Any]:
    import can
    import cantools

    db: Any = cantools.database.load_file(dbc, strict=False)
    by_pgn = {}
    for m in db.messages:
        pgn = (m.frame_id >> 8) & 0x3FFFF
        by_pgn[pgn & 0x3FF00 if ((pgn >> 8) & 0xFF) < 240 else pgn] = m
    n = decoded = 0
    for msg in can.LogReader(log):
        pgn = (msg.arbitration_id >> 8) & 0x3FFFF
        m = by_pgn.get(pgn & 0x3FF00 if ((pgn >> 8) & 0xFF) < 240 else pgn)
        if m is not None:
            with contextlib.suppress(Exception):  # the baseline gateway ignores bad frames too
                m.decode(bytes(msg.data))
                decoded += 1
        n += 1
    return {"frames": n, "decoded": decoded}


def replay(log: str, dbc: str, model: str) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from agent.replay import replay as run

    out = run([Path(log)], [Path(dbc)], model=Path(model) if model else None)
    return {**{k: out[k] for k in ("frames", "frames_decoded", "windows", "windows_scored", "alerts", "dbc_cache",
                                   "seconds")}, "log_bad_line": out["errors"].get("log_bad_line", 0)}


if __name__ == "__main__":
    mode, log, dbc = sys.argv[1:4]
    result = naive(log, dbc) if mode == "naive" else replay(log, dbc, sys.argv[4] if len(sys.argv) > 4 else "")
    print(json.dumps(result))
