"""The store writer: the I/O edge between the pure pipeline (agent/pipeline.py) and the SQLite store.

The pipeline says what to write (its `Sink`); this decides when, and what happens when it cannot be written:

- samples gather into one segment, written when `max_samples` have gathered or `interval_s` has passed since the
  first of them (`maybe_flush`);
- records (alerts, events) are written with the state they change, in one transaction. Urgent ones (alerts, a
  DTC's first open, source and drift events: what the pipeline does not mark otherwise) are written at once,
  with every record held before them; the rest (a decoder's other events: DTC closes, flapping and storm
  summaries) wait with the samples and are written when the samples are, or `interval_s` after the first of them,
  whichever comes first. A DTC storm thus costs at most one records transaction per batch that lets out a first
  open, and one per flush otherwise, never one per event. On a kill -9 what waits is lost with the state that
  goes with it, so a restart continues from what was written (docs/delivery.md, "DTC storms");
- when the store cannot be written (disk full, I/O error) what failed is held in memory and retried once per
  `interval_s`, not on every batch; held samples are bounded by `memory_max_samples` and records by
  `memory_max_records`, the oldest dropped first and counted (`samples_dropped_store_unavailable`,
  `records_dropped_store_unavailable`; every failed write is `store_write_failed`), and `store_error` says why
  while it lasts;
- at start it reads back the state the previous run saved and hands it to the pipeline (`resume`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

import numpy as np

from agent.config import StoreConfig
from agent.metrics import Metrics, counts
from agent.pipeline import Pipeline
from agent.records import SampleArrays
from agent.signals import SignalRegistry
from agent.store import METRICS_STATE_KEY, Store
from harvester_common import wire

_STORE = StoreConfig()  # the defaults of the keys the writer takes, for callers without a config

log = logging.getLogger("agent.writer")


class SampleBuffer:
    """Decoded samples waiting to become one store segment."""

    def __init__(self, registry: SignalRegistry) -> None:
        self.registry = registry
        self._parts: list[SampleArrays] = []
        self.n = 0
        self.since = time.monotonic()

    def add(self, s: SampleArrays) -> None:
        if len(s):
            if not self._parts:
                self.since = time.monotonic()
            self._parts.append(s)
            self.n += len(s)

    def take(self) -> wire.SampleColumns | None:
        if not self._parts:
            return None
        ts = np.concatenate([p.ts for p in self._parts])
        sid = np.concatenate([p.sid for p in self._parts])
        value = np.concatenate([p.value for p in self._parts])
        self._parts, self.n = [], 0
        # Signal-major order: each signal's run is periodic in time and smooth in value, which is what the wire's
        # delta and XOR columns compress best (sequence numbers follow this order; any order is valid).
        order = np.lexsort((ts, sid))
        ts, sid, value = ts[order], sid[order], value[order]
        uniq, local = np.unique(sid, return_inverse=True)
        signals = [self.registry.key(int(u)) for u in uniq.tolist()]
        # Each signal's resolution, so that the wire can send J1939 values as the raw integers they were.
        scales = [self.registry.resolution(int(u)) for u in uniq.tolist()]
        ts_us = np.rint(ts * 1e6).astype(np.int64)
        return wire.SampleColumns(signals, local.astype(np.uint16), ts_us, value, scales)

    def put_back(self, cols: wire.SampleColumns, limit: int) -> int:
        """Return a segment that could not be written (disk full, I/O error), to retry later. Keeps at most
        `limit` samples, dropping the oldest; returns how many were dropped."""
        hints = cols.scales or [None] * len(cols.signals)
        sid = np.array([self.registry.intern(*k, h) for k, h in zip(cols.signals, hints, strict=True)],
                       np.int32)[cols.sig]
        ts, value = cols.ts_us / 1e6, cols.value
        dropped = max(0, len(cols) + self.n - limit)
        if dropped:
            # Oldest first: the segment is signal-major, so order by time before cutting.
            keep = np.argsort(ts, kind="stable")[min(dropped, len(cols)):]
            keep.sort()
            ts, sid, value = ts[keep], sid[keep], value[keep]
        self._parts.insert(0, SampleArrays(ts, sid, value))
        self.n += len(ts)
        return dropped


class StoreWriter:
    """The pipeline's `Sink` on a `Store`. One thread (the pipeline's) calls it; `store_error` and `errors` may be
    read from another for a status."""

    def __init__(self, store: Store, registry: SignalRegistry, memory_max_samples: int = _STORE.memory_max_samples,
                 memory_max_records: int = _STORE.memory_max_records, metrics: Metrics | None = None) -> None:
        self.store = store
        self.memory_max_samples = memory_max_samples
        self.memory_max_records = memory_max_records
        self.buffer = SampleBuffer(registry)
        self.pending_records: list[tuple[str, dict[str, Any]]] = []
        self.pending_state: dict[str, Any] = {}  # saved with the next records (same transaction)
        self._records_since = 0.0  # time.monotonic() when the oldest record or state now waiting came
        self.store_error: str | None = None  # set while the store cannot be written
        self.errors: Counter[str] = Counter()
        self._retry_at = 0.0
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.collect("writer", lambda: {"errors": counts(self.errors), "samples_held": float(self.buffer.n),
                                                "records_held": float(len(self.pending_records))})

    def resume(self, pipeline: Pipeline) -> None:
        """Hand the pipeline what the previous run saved (open alert, DTC active sets, drift statistics)."""
        pipeline.resume({key: self.store.get_state(key) for key in pipeline.state_keys()})

    # --- the pipeline's sink ---------------------------------------------------------------------------------

    def append_samples(self, samples: SampleArrays) -> None:
        self.buffer.add(samples)

    def append_records(self, records: list[tuple[str, dict[str, Any]]], state: dict[str, Any],
                       urgent: bool = True) -> None:
        if not (self.pending_records or self.pending_state):
            self._records_since = time.monotonic()
        self.pending_records.extend(records)
        self.pending_state.update(state)
        if self.store_error is None:
            if urgent:
                self.flush_records()
        elif len(self.pending_records) > self.memory_max_records:
            over = len(self.pending_records) - self.memory_max_records
            del self.pending_records[:over]
            self.errors["records_dropped_store_unavailable"] += over

    def set_state(self, key: str, value: Any) -> bool:
        try:
            self.store.set_state(key, value)
        except Exception as e:  # the caller keeps it in memory and saves it again later
            log.debug("state %s not saved: %s", key, e)
            return False
        return True

    def save_metrics(self, snapshot: dict[str, Any]) -> bool:
        """The metrics registry's (bounded) snapshot, for `harvester-agent status`, which runs as another process
        and reads it from the store with the time it was saved. False if the store could not take it."""
        return self.set_state(METRICS_STATE_KEY, {"saved_at": time.time(), "metrics": snapshot})

    # --- writing ---------------------------------------------------------------------------------------------

    def _failed(self, what: str, e: Exception) -> None:
        self.errors["store_write_failed"] += 1
        if self.store_error is None:
            log.error("cannot write %s to the store (held in memory, retrying): %s", what, e)
        self.store_error = str(e)

    def _ok(self) -> None:
        if self.store_error is not None:
            log.warning("store writable again; %d records and %d samples held in memory are being written",
                        len(self.pending_records), self.buffer.n)
            self.store_error = None

    def flush_records(self) -> None:
        """Every record and state waiting, in one transaction."""
        if not (self.pending_records or self.pending_state):
            return
        try:
            self.store.append_records(self.pending_records, self.pending_state)
            self.pending_records = []
            self.pending_state = {}
            self._ok()
        except Exception as e:
            self._failed("alerts/events", e)
            over = len(self.pending_records) - self.memory_max_records
            if over > 0:
                del self.pending_records[:over]
                self.errors["records_dropped_store_unavailable"] += over

    def flush_samples(self) -> None:
        cols = self.buffer.take()
        if cols is None:
            return
        try:
            self.store.append_samples(cols)
            self._ok()
        except Exception as e:
            self._failed("samples", e)
            dropped = self.buffer.put_back(cols, self.memory_max_samples)
            if dropped:
                self.errors["samples_dropped_store_unavailable"] += dropped

    def flush(self) -> None:
        """Everything held, now (a stop, the end of a replay)."""
        self.flush_samples()
        self.flush_records()

    def maybe_flush(self, interval_s: float, max_samples: int, now: float | None = None) -> None:
        """Called after every batch and when idle. `now`: time.monotonic() unless given."""
        now = time.monotonic() if now is None else now
        if self.store_error is not None and now < self._retry_at:
            return  # store down: retry once per interval, not on every batch
        due = self.buffer.n >= max_samples or (self.buffer.n and now - self.buffer.since >= interval_s)
        if due:
            self.flush_samples()
        if (self.pending_records or self.pending_state) and (
                due or self.store_error is not None or now - self._records_since >= interval_s):
            self.flush_records()
        if self.store_error is not None:
            self._retry_at = now + interval_s
