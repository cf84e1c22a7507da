"""The on-vehicle pipeline without threads or sockets: frames and lines in, store writes out.

The live service (agent/service.py) and log replay both drive this same object, so what a fleet engineer replays
is exactly what runs on the vehicle.

What is open survives a restart. The open alert and each bus's DM1 active set are saved in the store (state keys
`alerts/open`, `dtc_active/<bus>`) in the same transaction as the records that changed them, the alert also every
`alert_heartbeat_s` while open (so that a restart knows how long its owner was gone). At start the pipeline
continues from them: DTCs still active are not announced again, and the open alert is carried on or closed with a
reason (agent/alerts.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.alerts import AlertContext, AlertTracker, closed_for
from agent.config import ModelConfig, StoreConfig
from agent.decode.j1939 import J1939Decoder
from agent.decode.lines import LineDecoder
from agent.decode.nmea import SIGNALS as NMEA_SIGNALS
from agent.decode.nmea import NmeaDecoder
from agent.drift import DriftMonitor, DriftPolicy
from agent.features import FeatureEngine, FeatureRow
from agent.frames import FrameBatch
from agent.records import Alert, Event, SampleArrays
from agent.scoring import Scorer
from agent.signals import SignalRegistry
from agent.store import Store
from harvester_common import wire

log = logging.getLogger("agent.pipeline")

ALERT_STATE_KEY = "alerts/open"
DTC_STATE_KEY = "dtc_active/{bus}"
# The defaults of the keys the pipeline takes, for callers without a config (replay, tests, benchmarks).
_MODEL = ModelConfig()
_STORE = StoreConfig()


@dataclass(slots=True)
class PipelineStats:
    frames: int = 0
    samples: int = 0
    windows: int = 0
    windows_scored: int = 0  # scores the alert logic acted on
    windows_unfamiliar: int = 0  # outside what the model was trained on: not turned into alerts
    windows_missing: int = 0  # not scored: a required feature (or too many) missing
    windows_with_required: int = 0  # windows that had every required feature
    missing_features: Counter[str] = field(default_factory=Counter)  # feature -> windows it was missing in
    unfamiliar_features: Counter[str] = field(default_factory=Counter)  # feature -> unfamiliar windows it caused
    alerts_opened: int = 0
    alerts_closed: int = 0
    alerts_carried: int = 0  # open alerts taken over from the previous run
    dtc_events: int = 0
    serial_lines: int = 0
    last_score: float = math.nan
    errors: Counter[str] = field(default_factory=Counter)


def _copy(c: Counter[str]) -> dict[str, int]:
    """A counter the pipeline thread may be adding a key to while the uplink thread reads it for a status."""
    for _ in range(5):
        try:
            return dict(c.most_common())
        except RuntimeError:  # dictionary changed size during iteration: read again
            continue
    return {}


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
        ts_us = np.rint(ts * 1e6).astype(np.int64)
        return wire.SampleColumns(signals, local.astype(np.uint16), ts_us, value)

    def put_back(self, cols: wire.SampleColumns, limit: int) -> int:
        """Return a segment that could not be written (disk full, I/O error), to retry later. Keeps at most
        `limit` samples, dropping the oldest; returns how many were dropped."""
        sid = np.array([self.registry.intern(*k) for k in cols.signals], np.int32)[cols.sig]
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


class Pipeline:
    def __init__(
        self,
        registry: SignalRegistry,
        decoders: dict[str, J1939Decoder],
        scorer: Scorer | None,
        store: Store | None,
        memory_max_samples: int = _STORE.memory_max_samples,
        memory_max_records: int = _STORE.memory_max_records,
        tap: Callable[[SampleArrays], None] | None = None,
        drift_policy: DriftPolicy | None = None,
        drift_interval_s: float = _MODEL.drift_interval_s,
        alert_resume_s: float = _MODEL.alert_resume_s,
        alert_heartbeat_s: float = _MODEL.alert_heartbeat_s,
    ) -> None:
        self.tap = tap  # sees every decoded sample batch (replay statistics)
        self.memory_max_samples = memory_max_samples
        self.memory_max_records = memory_max_records
        self.alert_heartbeat_s = alert_heartbeat_s  # wall-clock seconds between saves of an open alert's sign of life
        self.store_error: str | None = None  # set while the store cannot be written
        self._retry_at = 0.0
        self.registry = registry
        self.decoders = decoders
        self.line_decoders: dict[str, NmeaDecoder | LineDecoder] = {}  # per serial device; NMEA unless configured
        self.scorer = scorer
        self.store = store
        self.stats = PipelineStats()
        self.buffer = SampleBuffer(registry)
        self.pending_records: list[tuple[str, dict[str, Any]]] = []
        self.pending_state: dict[str, Any] = {}  # saved with the next records (same transaction)
        self._alert_saved_at = 0.0
        self.engine: FeatureEngine | None = None
        self.tracker: AlertTracker | None = None
        self._sid_map = np.zeros(0, np.int32)
        if scorer is not None:
            c = scorer.contract
            self.engine = FeatureEngine(c.features, c.hop_s)
            self.tracker = AlertTracker(c.alert, c.model_name, c.model_version)
        self.drift: DriftMonitor | None = None
        self.drift_interval_s = drift_interval_s
        self._drift_next = math.nan  # data time of the next periodic drift report
        self._drift_flag = False
        if scorer is not None and isinstance(scorer.contract.training.get("feature_stats"), dict):
            c = scorer.contract
            self.drift = DriftMonitor([f.name for f in c.features], c.training["feature_stats"],
                                      drift_policy or _MODEL.drift_policy())
            self._drift_key = f"drift/{c.model_name}/{c.model_version}"
            saved = store.get_state(self._drift_key) if store is not None else None
            if isinstance(saved, dict) and self.drift.restore(saved):
                self._drift_flag = bool(self.drift.drifted())
        if store is not None:
            self._resume(store, alert_resume_s)

    def _resume(self, store: Store, resume_s: float) -> None:
        """Continue what the previous run left open: each bus's active DTCs, and the open alert."""
        for bus, dec in self.decoders.items():
            saved_dtcs = store.get_state(DTC_STATE_KEY.format(bus=bus))
            if saved_dtcs is not None and not dec.restore_dtcs(saved_dtcs):
                self.stats.errors["dtc_state_unreadable"] += 1
        saved = store.get_state(ALERT_STATE_KEY)
        if saved is None:
            return
        now = time.time()
        try:
            if not isinstance(saved, dict):
                raise ValueError("not an object")
            if self.tracker is not None:
                closing = self.tracker.resume(saved, now, resume_s)
            else:  # no model scores now: nobody can close it later
                closing = closed_for(saved, "model_changed", now)
        except (KeyError, TypeError, ValueError) as e:
            self.stats.errors["alert_state_unreadable"] += 1
            log.error("saved open alert unreadable, dropped: %s", e)
            self.pending_state[ALERT_STATE_KEY] = None
            self.flush_records()
            return
        if closing is None:
            assert self.tracker is not None and self.tracker.open is not None
            self.stats.alerts_carried += 1
            log.warning("alert %s still open from before the restart: carried on", self.tracker.open.alert_id[:8])
            self._save_alert()
            self.flush_records()
            return
        log.warning("alert %s left open by the previous run: closed (%s)", closing.alert_id[:8], closing.reason)
        self.stats.alerts_closed += 1
        self.pending_state[ALERT_STATE_KEY] = None
        self._record("alert", closing)

    def _save_alert(self) -> None:
        assert self.tracker is not None
        self._alert_saved_at = time.time()
        self.pending_state[ALERT_STATE_KEY] = self.tracker.saved(self._alert_saved_at)

    def shutdown(self, reason: str = "agent_stop") -> None:
        """A clean stop: close the open alert (its owner is going away), and write everything held."""
        if self.tracker is not None:
            closing = self.tracker.close_now(reason, time.time())
            if closing is not None:
                log.info("alert %s closed (%s)", closing.alert_id[:8], reason)
                self.stats.alerts_closed += 1
                self.pending_state[ALERT_STATE_KEY] = None
                self.pending_records.append(("alert", closing.to_dict()))
        self.flush_samples()
        self.flush_records()

    # --- inputs ----------------------------------------------------------------------------------------------

    def on_frames(self, fb: FrameBatch) -> None:
        dec = self.decoders.get(fb.bus)
        if dec is None:
            self.stats.errors["frames_from_unknown_bus"] += len(fb)
            return
        self.stats.frames += len(fb)
        res = dec.decode(fb)
        self._samples(res.samples)
        if any(e.kind.startswith("dtc_") for e in res.events):
            # Saved with the events, in their transaction: a restart continues from exactly what was announced.
            self.pending_state[DTC_STATE_KEY.format(bus=fb.bus)] = dec.dtc_state()
        self._events(res.events)

    def on_lines(self, device: str, lines: list[tuple[float, bytes]]) -> None:
        dec = self.line_decoders.setdefault(device, NmeaDecoder())
        units: dict[str, str] = NMEA_SIGNALS if isinstance(dec, NmeaDecoder) else {
            dec.signal(f): u for f, u in dec.units.items()}
        ts: list[float] = []
        sid: list[int] = []
        val: list[float] = []
        for t, line in lines:
            self.stats.serial_lines += 1
            for name, v in dec.decode(line):
                ts.append(t)
                sid.append(self.registry.intern(name, device, units.get(name, "")))
                val.append(v)
        if ts:
            self._samples(SampleArrays(np.array(ts), np.array(sid, np.int32), np.array(val)))

    # --- stages ----------------------------------------------------------------------------------------------

    def _feature_index(self, sid: npt.NDArray[np.int32]) -> npt.NDArray[np.int32]:
        """Registry ids → the feature engine's signal index (-1: not used by the model)."""
        assert self.engine is not None
        if len(self.registry) > self._sid_map.size:
            old = self._sid_map.size
            grown = np.full(len(self.registry), -1, np.int32)
            grown[:old] = self._sid_map
            for i in range(old, len(self.registry)):
                grown[i] = self.engine.signal_index.get(self.registry.name(i), -1)
            self._sid_map = grown
        return self._sid_map[sid]

    def _samples(self, s: SampleArrays) -> None:
        if not len(s):
            return
        self.stats.samples += len(s)
        if self.tap is not None:
            self.tap(s)
        if self.store is not None:
            self.buffer.add(s)
        if self.engine is not None:
            rows = self.engine.feed(s.ts, self._feature_index(s.sid), s.value)
            if rows:
                self._score(rows)

    def _score(self, rows: list[FeatureRow]) -> None:
        assert self.scorer is not None and self.tracker is not None
        self.stats.windows += len(rows)
        x = np.stack([r.x for r in rows])
        res = self.scorer.score(x)
        if self.drift is not None:
            self._check_drift(x, rows[-1].end, res.outside)
        st = self.stats
        st.windows_scored += int(res.scored.sum())
        st.windows_unfamiliar += int(res.unfamiliar.sum())
        st.windows_missing += int(res.missing_required.sum())
        st.windows_with_required += int((~res.missing_required).sum())
        names = [f.name for f in self.scorer.contract.features]
        for j in np.flatnonzero((~res.present).any(axis=0)).tolist():
            st.missing_features[names[j]] += int((~res.present[:, j]).sum())
        for j in np.flatnonzero(res.outside.any(axis=0)).tolist():
            st.unfamiliar_features[names[j]] += int(res.outside[:, j].sum())
        for i, row in enumerate(rows):
            score = float(res.scores[i])
            if not res.scored[i]:
                continue  # unfamiliar or lacking: no evidence either way, the alert state holds
            self.stats.last_score = score
            present = [names[j] for j in np.flatnonzero(res.present[i]).tolist()]
            ctx = AlertContext(row.start, row.end, res.labels[i], snapshot=row.snapshot, features_present=present)
            was_open = self.tracker.open is not None
            alert = self.tracker.update(score, ctx)
            if alert is None:
                continue
            if not was_open:
                alert.top_features = self.scorer.explain(row.x)
                self.stats.alerts_opened += 1
                log.warning("alert %s opened: %s score %.3f", alert.alert_id[:8], alert.label, score)
            else:
                self.stats.alerts_closed += 1
                log.info("alert %s closed", alert.alert_id[:8])
            self._save_alert()  # the open alert, or None once closed: in the record's transaction
            self._record("alert", alert)

    def _check_drift(self, x: npt.NDArray[np.float64], now: float, outside: npt.NDArray[np.bool_]) -> None:
        """Running statistics per window; a report every `drift_interval_s` of data time and whenever the flag
        changes, as a `drift` event (stored, synced). The state is saved with each report."""
        assert self.drift is not None
        self.drift.update(x, outside)
        if math.isnan(self._drift_next):
            self._drift_next = now + self.drift_interval_s
        flag = bool(self.drift.drifted())
        if flag == self._drift_flag and now < self._drift_next:
            return
        report = self.drift.report()
        if flag != self._drift_flag:
            log.warning("feature drift %s: %s", "detected" if flag else "cleared",
                        "; ".join(f"{k}: {v}" for k, v in report["drifted"].items()) or "all features in range")
        self._drift_flag = flag
        self._drift_next = now + self.drift_interval_s
        self._record("event", Event("drift", now, report))
        if self.store is not None:
            try:
                self.store.set_state(self._drift_key, self.drift.state())
            except Exception as e:  # the statistics live on in memory; the next report tries again
                self.stats.errors["drift_state_not_saved"] += 1
                log.debug("drift state not saved: %s", e)

    def scoring_status(self) -> dict[str, Any]:
        """For the status message and replay: what was scored, and why the rest was not."""
        st = self.stats
        return {
            "windows": st.windows,
            "windows_scored": st.windows_scored,
            "windows_unfamiliar": st.windows_unfamiliar,
            "windows_with_required": st.windows_with_required,
            "windows_not_scored": {"missing_features": st.windows_missing, "unfamiliar": st.windows_unfamiliar},
            "missing_features": _copy(st.missing_features),
            "unfamiliar_features": _copy(st.unfamiliar_features),
        }

    def drift_status(self) -> dict[str, Any]:
        """For the status message: the flag and the drifted features' names (the reasons travel in events)."""
        if self.drift is None:
            return {"enabled": False}
        return {"enabled": True, "drift": self._drift_flag, "windows": self.drift.rows,
                "features": sorted(self.drift.drifted())}

    def _events(self, events: list[Event]) -> None:
        if not events:
            return
        for e in events:
            if e.kind.startswith("dtc_"):
                self.stats.dtc_events += 1
                log.info("%s %s", e.kind, e.data)
            self._record("event", e, flush=False)
        self._record_flush()  # one transaction for the batch's events and the DTC state they leave

    def _record(self, kind: str, rec: Alert | Event, flush: bool = True) -> None:
        self.pending_records.append((kind, rec.to_dict()))
        if flush:
            self._record_flush()

    def _record_flush(self) -> None:
        if self.store_error is None:
            self.flush_records()
        elif len(self.pending_records) > self.memory_max_records:
            over = len(self.pending_records) - self.memory_max_records
            del self.pending_records[:over]
            self.stats.errors["records_dropped_store_unavailable"] += over

    # --- output ----------------------------------------------------------------------------------------------

    def _store_failed(self, what: str, e: Exception) -> None:
        self.stats.errors["store_write_failed"] += 1
        if self.store_error is None:
            log.error("cannot write %s to the store (held in memory, retrying): %s", what, e)
        self.store_error = str(e)

    def _store_ok(self) -> None:
        if self.store_error is not None:
            log.warning("store writable again; %d records and %d samples held in memory are being written",
                        len(self.pending_records), self.buffer.n)
            self.store_error = None

    def flush_records(self) -> None:
        """Alerts and events are written at once: they are what must never wait in memory."""
        if self.store is None or not (self.pending_records or self.pending_state):
            return
        try:
            self.store.append_records(self.pending_records, self.pending_state)
            self.pending_records = []
            self.pending_state = {}
            self._store_ok()
        except Exception as e:
            self._store_failed("alerts/events", e)
            over = len(self.pending_records) - self.memory_max_records
            if over > 0:
                del self.pending_records[:over]
                self.stats.errors["records_dropped_store_unavailable"] += over

    def flush_samples(self) -> None:
        if self.store is None:
            return
        cols = self.buffer.take()
        if cols is None:
            return
        try:
            self.store.append_samples(cols)
            self._store_ok()
        except Exception as e:
            self._store_failed("samples", e)
            dropped = self.buffer.put_back(cols, self.memory_max_samples)
            if dropped:
                self.stats.errors["samples_dropped_store_unavailable"] += dropped

    def maybe_flush(self, interval_s: float, max_samples: int) -> None:
        now = time.monotonic()
        if self.store_error is not None and now < self._retry_at:
            return  # store down: retry once per interval, not on every batch
        due = self.buffer.n >= max_samples or (self.buffer.n and now - self.buffer.since >= interval_s)
        if due:
            self.flush_samples()
        if self.tracker is not None and self.tracker.open is not None \
                and time.time() - self._alert_saved_at >= self.alert_heartbeat_s:
            self._save_alert()  # the owner is alive: a restart within `alert_resume_s` of this carries it on
        if self.pending_records or self.pending_state:
            self.flush_records()
        if self.store_error is not None:
            self._retry_at = now + interval_s
