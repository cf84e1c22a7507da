"""Replay ingest with start-up included: `ingest_frames_per_s`.

Each side is a child process from interpreter start to exit (bench/ingest_child.py), so everything a user waits for
is in: imports, DBC load, reading, decoding and, for the agent, features, scoring with the shipped int8 model and the
SQLite store. The agent runs `agent.replay.replay` (what `harvester-agent replay LOG --dbc DBC` runs, without the
CLI's argument parsing) with the Vector J1939 DBC, its tables in a DBC cache this figure warms first (the "second
run"; the cold first run is reported beside it). The naive side is python-can `LogReader` + cantools `decode` per
frame with the same DBC, parsed at start.

The value is the simulator's hour (352,800 frames, the traffic the model scores); in the same run every trace file
in ../shared/data/can (every format there: candump -L, MF4, ASC, BLF) is replayed on both sides, each file
separately, and the lowest ratio and its trace are reported. Each pair runs `BENCH_INGEST_REPEAT` times (default
2), alternating sides, best of each side kept: the machines are shared and noisy, and a trace's ratio is the figure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchkit import REPO, Figure, _big_dbc, _sim_log, figure

from harvester_testing.data import SHARED_DATA

CHILD = Path(__file__).with_name("ingest_child.py")
MODEL = REPO / "models" / "harvester-anomaly.int8.onnx"
SUFFIXES = {".log", ".asc", ".blf", ".trc", ".csv", ".mf4", ".db"}


def _traces() -> list[Path]:
    root = SHARED_DATA / "can"
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise SystemExit(f"ingest_frames_per_s needs the real traces in {root}")
    return files


def _run(mode: str, log: Path, env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(CHILD), mode, str(log), str(_big_dbc()), str(MODEL)],
                       capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{mode} {log}: exit {r.returncode}: {r.stderr.strip()[-800:]}")
    return wall, json.loads(r.stdout.strip().splitlines()[-1])


def _pair(log: Path, env: dict[str, str], repeat: int) -> dict[str, Any]:
    ours = base = float("inf")
    out: dict[str, Any] = {}
    for _ in range(repeat):
        t, naive = _run("naive", log, env)
        base = min(base, t)
        t, out = _run("replay", log, env)
        ours = min(ours, t)
    # The same frames on both sides, but for lines replay refuses and counts: candump lines with more than 8 bytes
    # of classic CAN payload, which python-can takes as frames (8 such lines in one John Deere log).
    if out["frames"] + out["log_bad_line"] != naive["frames"]:
        raise RuntimeError(f"{log}: replay read {out['frames']} frames ({out['log_bad_line']} bad lines), "
                           f"LogReader {naive['frames']}")
    return {"frames": out["frames"], "log_bad_line": out["log_bad_line"], "ours_s": round(ours, 3),
            "baseline_s": round(base, 3),
            "ratio": round(base / ours, 3), "frames_per_s": round(out["frames"] / ours, 1),
            "windows": out["windows"], "windows_scored": out["windows_scored"], "alerts": out["alerts"],
            "dbc_cache": out["dbc_cache"]}


@figure("ingest_frames_per_s")
def ingest_frames_per_s() -> Figure:
    repeat = int(os.environ.get("BENCH_INGEST_REPEAT", "2"))
    traces = _traces()
    with tempfile.TemporaryDirectory() as d:
        cache = Path(d) / "dbc-cache"
        env = {**os.environ, "HARVESTER_DBC_CACHE": str(cache), "ORT_DISABLE_TELEMETRY": "1"}
        sim = _sim_log(Path(d), 3600.0)
        for p in [sim, *traces]:  # both sides read from the page cache
            p.read_bytes()
        smallest = min(traces, key=lambda p: p.stat().st_size)
        cold_s, cold = _run("replay", smallest, env)  # empty cache: parses the DBCs and writes their tables
        warm_s, warm = _run("replay", smallest, env)
        head = _pair(sim, env, repeat)
        rows = {str(p.relative_to(SHARED_DATA / "can")): _pair(p, env, repeat) for p in traces}
    low_name, low = min(rows.items(), key=lambda kv: kv[1]["ratio"])
    frames = sum(r["frames"] for r in rows.values())
    ours_s = sum(r["ours_s"] for r in rows.values())
    base_s = sum(r["baseline_s"] for r in rows.values())
    ours, base = head["frames"] / head["ours_s"], head["frames"] / head["baseline_s"]
    scored = f"{head['windows_scored']} of {head['windows']} windows scored, {head['alerts']} alerts"
    return Figure(
        ours,
        "frames/s",
        base,
        ours / base,
        f"{head['frames']} frames (1 h of the simulator's J1939 traffic, candump -L; {scored}), each side a child "
        f"process from start to exit, best of {repeat}: agent replay (read, decode with the Vector J1939 DBC from "
        f"its cache, features, int8 scoring, SQLite store) vs LogReader + cantools decode per frame (DBC parsed at "
        f"start); every real trace the same way, each file apart: {len(rows)} files, {frames} frames, lowest ratio "
        f"{low['ratio']:.2f} on {low_name} ({low['frames']} frames, {low['ours_s']:.2f} s vs "
        f"{low['baseline_s']:.2f} s), all of them {frames / ours_s:.0f} vs {frames / base_s:.0f} frames/s; start-up "
        f"(a {cold['frames']}-frame trace): {cold_s:.2f} s with an empty DBC cache ({cold['dbc_cache']}), "
        f"{warm_s:.2f} s once cached ({warm['dbc_cache']})",
        {"frames": head["frames"], "windows": head["windows"], "windows_scored": head["windows_scored"],
         "alerts": head["alerts"], "lowest_ratio": low["ratio"], "lowest_ratio_trace": low_name,
         "traces": len(rows), "trace_frames": frames, "trace_frames_per_s": round(frames / ours_s, 1),
         "trace_baseline_frames_per_s": round(frames / base_s, 1), "startup_cold_s": round(cold_s, 3),
         "startup_cached_s": round(warm_s, 3), "per_trace": rows},
    )
