"""Benchmarks. Every figure is measured beside a baseline in the same run, and reported as a ratio too.

    bench/run                      # all figures, as a table
    bench/run --json NAME [NAME…]  # only the named figures, as {"name": {"value", "unit", "baseline", "ratio"}}

Machines here are noisy: compare ratios, not absolute numbers. Record results in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.testing.data import SHARED_DATA  # noqa: E402


@dataclass(slots=True)
class Figure:
    value: float
    unit: str
    baseline: float
    ratio: float
    note: str = ""


FIGURES: dict[str, Callable[[], Figure]] = {}


def figure(name: str) -> Callable[[Callable[[], Figure]], Callable[[], Figure]]:
    def deco(fn: Callable[[], Figure]) -> Callable[[], Figure]:
        FIGURES[name] = fn
        return fn

    return deco


def _trace_files() -> list[Path]:
    files = sorted((SHARED_DATA / "can" / "johndeere_5055e").glob("*_candumpL.log"))
    if not files:
        raise SystemExit(f"benchmarks need the real traces in {SHARED_DATA / 'can'}")
    return files


def _big_dbc() -> Path:
    return SHARED_DATA / "dbc" / "j1939_vector_v7.2__osu-cybercan__patched.dbc"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _baseline_decode(files: list[Path]) -> tuple[int, float]:
    """The naive gateway: python-can LogReader + cantools decode per frame, looked up by PGN, nothing else."""
    import can
    import cantools

    db: Any = cantools.database.load_file(str(_big_dbc()), strict=False)
    by_pgn = {}
    for m in db.messages:
        pgn = (m.frame_id >> 8) & 0x3FFFF
        by_pgn[pgn & 0x3FF00 if ((pgn >> 8) & 0xFF) < 240 else pgn] = m
    n = 0
    t0 = time.perf_counter()
    for f in files:
        for msg in can.LogReader(str(f)):
            pgn = (msg.arbitration_id >> 8) & 0x3FFFF
            m = by_pgn.get(pgn & 0x3FF00 if ((pgn >> 8) & 0xFF) < 240 else pgn)
            if m is not None:
                with contextlib.suppress(Exception):  # the baseline gateway ignores bad frames too
                    m.decode(bytes(msg.data))
            n += 1
    return n, time.perf_counter() - t0


def _pipeline_replay(files: list[Path], store_dir: Path) -> tuple[int, float, float]:
    """The whole on-vehicle pipeline on the same frames: read, decode, features, scoring, store."""
    import can

    from agent.decode.j1939 import J1939Decoder
    from agent.frames import FrameBatch
    from agent.pipeline import Pipeline
    from agent.scoring import Scorer
    from agent.signals import SignalRegistry
    from agent.store import Store

    reg = SignalRegistry()
    dec = J1939Decoder(reg, [_big_dbc()], "can0")
    model = REPO / "models" / "harvester-anomaly.int8.onnx"
    scorer = Scorer.load(model) if model.exists() else None
    store = Store(store_dir / "bench.sqlite", 1 << 30)
    p = Pipeline(reg, {"can0": dec}, scorer, store)
    n = 0
    c0 = _cpu()
    t0 = time.perf_counter()
    for f in files:
        batch: list[can.Message] = []
        for msg in can.LogReader(str(f)):
            batch.append(msg)
            if len(batch) == 2000:
                p.on_frames(FrameBatch.from_messages(batch, "can0"))
                n += len(batch)
                batch = []
                p.maybe_flush(1.0, 20_000)
        if batch:
            p.on_frames(FrameBatch.from_messages(batch, "can0"))
            n += len(batch)
    p.flush_samples()
    dt = time.perf_counter() - t0
    cpu = _cpu() - c0
    store.close()
    return n, dt, cpu


@figure("ingest_frames_per_s")
def ingest_frames_per_s() -> Figure:
    files = _trace_files()
    nb, tb = _baseline_decode(files)
    with tempfile.TemporaryDirectory() as d:
        n, t, _ = _pipeline_replay(files, Path(d))
    ours, base = n / t, nb / tb
    return Figure(
        ours,
        "frames/s",
        base,
        ours / base,
        f"{n} real frames (John Deere 5055E, 44 logs); baseline: LogReader + cantools decode per frame",
    )


def _decoded_trace_samples(files: list[Path]) -> list[tuple[Any, Any, Any, Any]]:
    """(registry, ts, sid, value) per log, decoded by the agent's own decoder and sorted by time."""
    import can
    import numpy as np

    from agent.decode.j1939 import J1939Decoder
    from agent.frames import FrameBatch
    from agent.signals import SignalRegistry

    reg = SignalRegistry()
    dec = J1939Decoder(reg, [_big_dbc()], "can0")
    out = []
    for f in files:
        r = dec.decode(FrameBatch.from_messages(list(can.LogReader(str(f))), "can0")).samples
        if len(r):
            o = np.argsort(r.ts, kind="stable")
            out.append((reg, r.ts[o], r.sid[o], r.value[o]))
    return out


@figure("wire_bytes_per_sample")
def wire_bytes_per_sample() -> Figure:
    """Real traces, decoded, cut into batches of 10 s (the age bound), encoded by agent.wire as the uplink
    sends them; baseline: the common gateway style, one JSON message per sample."""
    import numpy as np

    from agent import wire
    from agent.pipeline import SampleBuffer
    from agent.records import SampleArrays

    ours = json_bytes = n = 0
    for reg, ts, sid, val in _decoded_trace_samples(_trace_files()):
        edges = np.arange(ts[0], ts[-1] + 10.0, 10.0)
        for a, b in itertools.pairwise(edges):
            sel = (ts >= a) & (ts < b)
            if not sel.any():
                continue
            buf = SampleBuffer(reg)
            buf.add(SampleArrays(ts[sel], sid[sel], val[sel]))
            cols = buf.take()
            assert cols is not None
            seg = wire.Segment("samples", n + 1, n + len(cols), columns=cols)
            ours += len(wire.encode_batch(wire.Batch("fleet-1", "harvester-0001", 1, [seg])))
            for i in range(len(cols)):
                name, source, _ = cols.signals[int(cols.sig[i])]
                json_bytes += len(json.dumps({"vehicle": "harvester-0001", "ts": int(cols.ts_us[i]) / 1e6,
                                              "signal": name, "source": source, "value": float(cols.value[i])}))
            n += len(cols)
    v, base = ours / n, json_bytes / n
    return Figure(v, "bytes/sample", base, v / base,
                  f"{n} decoded samples from the real traces in 10 s batches; lossless; baseline one JSON per sample")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("names", nargs="*", help=f"figures to run (default all): {', '.join(FIGURES)}")
    a = ap.parse_args(argv)
    names = a.names or list(FIGURES)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        print(f"bench/run: unknown figure(s): {', '.join(unknown)}; known: {', '.join(FIGURES)}", file=sys.stderr)
        return 2
    results: dict[str, Figure] = {}
    for name in names:
        if not a.json:
            print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = FIGURES[name]()
    if a.json:
        print(
            json.dumps(
                {
                    k: {"value": v.value, "unit": v.unit, "baseline": v.baseline, "ratio": v.ratio}
                    for k, v in results.items()
                },
                indent=2,
            )
        )
        return 0
    print(f"{'figure':38s} {'value':>14s} {'baseline':>14s} {'ratio':>8s}  unit")
    for k, v in results.items():
        print(f"{k:38s} {v.value:14.4g} {v.baseline:14.4g} {v.ratio:8.3f}  {v.unit}")
    for k, v in results.items():
        if v.note:
            print(f"  {k}: {v.note}")
    print(f"  machine: {os.cpu_count()} cores, {sys.platform}, Python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
