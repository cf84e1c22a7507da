"""`harvester-agent replay`: recorded CAN logs through the exact on-vehicle pipeline, as fast as it will go.

Any format python-can reads (candump -L, ASC, BLF, TRC, python-can CSV, SQLite; MF4 with asammdf installed), read as
columns a chunk at a time (candump -L and MF4 in bulk, agent/sources/logfile.py) and fed per bus label in batches
of BATCH frames. Frames of multi-channel logs keep their channel as the bus label. A log with no frame to give
(missing, empty, not that format, every record bad) is an error before any work, as is a `db` in a folder that
does not exist; bad lines of a text log are skipped and counted (`errors.log_bad_line`), as are damaged BLF
containers (`errors.log_bad_record`); a binary log cut or corrupt part-way gives what came before and is counted
(`errors.log_unreadable`) where the format tells. See agent/sources/logfile.py.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.decode import dbc_cache
from agent.decode.j1939 import J1939Decoder
from agent.frames import FrameBatch, LabelledFrames, Rebatcher
from agent.metrics import Metrics
from agent.pipeline import Pipeline
from agent.records import SampleArrays
from agent.scoring import Scorer
from agent.signals import SignalRegistry
from agent.sources.logfile import LogUnreadable, open_chunks
from agent.store import Store
from agent.writer import StoreWriter

BATCH = 5000


class ReplayError(ValueError):
    """A log that cannot be replayed at all; the text names it and says why."""


class _SignalStats:
    def __init__(self, registry: SignalRegistry) -> None:
        self.registry = registry
        self.count = np.zeros(0, np.int64)
        self.min = np.zeros(0)
        self.max = np.zeros(0)

    def __call__(self, s: SampleArrays) -> None:
        n = len(self.registry)
        if n > self.count.size:
            grow = n - self.count.size
            self.count = np.concatenate([self.count, np.zeros(grow, np.int64)])
            self.min = np.concatenate([self.min, np.full(grow, np.inf)])
            self.max = np.concatenate([self.max, np.full(grow, -np.inf)])
        np.add.at(self.count, s.sid, 1)
        np.minimum.at(self.min, s.sid, s.value)
        np.maximum.at(self.max, s.sid, s.value)

    def by_name(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for sid in np.flatnonzero(self.count).tolist():
            name = self.registry.name(sid)
            c, lo, hi = int(self.count[sid]), float(self.min[sid]), float(self.max[sid])
            if name in out:  # the same signal from several sources: one line per name
                o = out[name]
                o["count"] += c
                o["min"], o["max"] = min(o["min"], lo), max(o["max"], hi)
            else:
                out[name] = {"count": c, "min": lo, "max": hi}
        return dict(sorted(out.items()))


def _open(path: Path, errors: Counter[str]) -> Iterator[LabelledFrames]:
    try:
        return open_chunks(path, errors)
    except LogUnreadable as e:
        raise ReplayError(str(e)) from None


def batches(chunks: Iterator[LabelledFrames], errors: Counter[str]) -> Iterator[tuple[str, FrameBatch]]:
    """(bus label, FrameBatch) of one log in the order and sizes replay feeds them: per label, a batch every BATCH
    frames, the rest of each label at the end of the file (the batches a frame-by-frame loop would make)."""
    rb = Rebatcher(BATCH)
    while True:
        try:
            lf = next(chunks)
        except StopIteration:
            break
        except Exception:  # a reader meeting a truncated or corrupt record: keep what came before
            errors["log_unreadable"] += 1
            break
        yield from rb.feed(lf)
    yield from rb.flush()


def replay(
    logs: Sequence[Path],
    dbcs: Sequence[Path] = (),
    db: Path | None = None,
    model: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    errors: Counter[str] = Counter()
    cache_before = Counter(dbc_cache.STATS)
    if db is not None and not db.parent.is_dir():
        raise ReplayError(f"{db.parent}: no such folder (--db names a file in a folder that exists)")
    readers = [(p, _open(p, errors)) for p in logs]  # every file opens before any work: fail fast, fail whole
    registry = SignalRegistry()
    scorer = Scorer.load(model) if model is not None else None
    tmp = None
    if db is None:
        tmp = tempfile.TemporaryDirectory()
        db = Path(tmp.name) / "replay.sqlite"
    store = Store(db, 1 << 40)
    stats = _SignalStats(registry)
    metrics = Metrics()
    writer = StoreWriter(store, registry, metrics=metrics)
    # A decoder per bus label, as labels appear.
    pipe = Pipeline(registry, {}, scorer, writer, tap=stats, metrics=metrics)
    writer.resume(pipe)
    t0 = time.perf_counter()
    frames = 0
    for i, (path, chunks) in enumerate(readers):
        for label, fb in batches(chunks, errors):
            if label not in pipe.decoders:
                pipe.decoders[label] = J1939Decoder(registry, dbcs, label)
            pipe.feed(label, fb)
            frames += len(fb)
            if len(fb) < BATCH:
                continue  # the rest of a label at the end of its file
            pipe.heartbeat()
            writer.maybe_flush(1.0, 50_000)
            if progress:
                rate = frames / max(1e-9, time.perf_counter() - t0)
                print(
                    f"\rreplay [{i + 1}/{len(readers)}] {path.name[:40]:40s} {frames:10d} frames {rate:9.0f}/s",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
    pipe.drain_dtcs()  # what the DTC debouncers hold goes out with the rest
    writer.flush()
    seconds = time.perf_counter() - t0
    if progress:
        print(file=sys.stderr)
    seen: Counter[str] = Counter()
    for d in pipe.decoders.values():
        errors.update(d.errors)
        seen.update(d.counters())
    errors.update(pipe.stats.errors)
    errors.update(writer.errors)
    summary = {
        "frames": frames,
        "frames_decoded": seen["frames_decoded"],
        "frames_unknown": seen["frames_unknown"],
        "errors": dict(sorted(errors.items())),
        "samples": pipe.stats.samples,
        "dtc_events": pipe.stats.dtc_events,  # decoded
        # Of those: written as themselves or inside a summary that was (docs/delivery.md, "DTC storms").
        "dtc_events_merged": pipe.stats.dtc_events_merged,
        "dtc_events_written": pipe.stats.dtc_events_written,  # records: the events as themselves and summaries
        "store_transactions": store.transactions,  # write transactions (each one fsync), samples and records
        **pipe.scoring_status(),  # windows, scored, unfamiliar, and why the rest were not scored
        "required_features": list(scorer.contract.required_features) if scorer else [],
        "alerts": pipe.stats.alerts_opened,
        "seconds": round(seconds, 3),
        "frames_per_s": round(frames / seconds, 1) if seconds > 0 else 0.0,
        "buses": sorted(pipe.decoders),
        "store": str(db) if tmp is None else None,
        "model": (f"{scorer.contract.model_name} {scorer.contract.model_version}" if scorer else None),
        "signals": stats.by_name(),
        "metrics": metrics.snapshot(),  # the same registry the agent reports (its counters beside those above)
        # DBC loads of this replay: from this process's memory, the disk cache, or parsed (agent/decode/dbc_cache.py)
        "dbc_cache": dict(sorted((Counter(dbc_cache.STATS) - cache_before).items())),
    }
    store.close()
    if tmp is not None:
        tmp.cleanup()
    return summary
