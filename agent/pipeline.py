"""The on-vehicle pipeline without threads, sockets or files: batches from sources in, samples and records out to
a `Sink`.

Every source's batches go through its decoder (agent/decode/base.py), the samples through features and scoring to
alerts; samples, alerts and events go to the sink. The live service (agent/service.py) and log replay both drive
this same object with the store writer (agent/writer.py) as the sink, so what a fleet engineer replays is exactly
what runs on the vehicle. When and how the sink writes, and what it does when it cannot, is the writer's.

What is open survives a restart. The open alert and each decoder's state (a bus's DM1 active set) go to the sink
(state keys `alerts/open`, `dtc_active/<bus>`) with the records that changed them, to be saved in the same
transaction; the alert also every `alert_heartbeat_s` while open (so that a restart knows how long its owner was
gone); the drift statistics with each drift report. At start the writer reads them back and hands them to
`resume`: DTCs still active are not announced again, and the open alert is carried on or closed with a reason
(agent/alerts.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sized
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from agent.alerts import AlertContext, AlertTracker, closed_for
from agent.config import ModelConfig
from agent.decode.base import Decoder
from agent.drift import DriftMonitor, DriftPolicy
from agent.features import FeatureEngine, FeatureRow
from agent.frames import FrameBatch
from agent.metrics import Metrics, counts
from agent.records import Event, SampleArrays
from agent.scoring import Scorer
from agent.signals import SignalRegistry

log = logging.getLogger("agent.pipeline")

ALERT_STATE_KEY = "alerts/open"
# The defaults of the keys the pipeline takes, for callers without a config (replay, tests, benchmarks).
_MODEL = ModelConfig()


class Sink(Protocol):
    """Where the pipeline's output goes (agent/writer.py: the store)."""

    def append_samples(self, samples: SampleArrays) -> None: ...

    def append_records(self, records: list[tuple[str, dict[str, Any]]], state: dict[str, Any]) -> None:
        """Alerts and events (kind, record), and the state they change (key → JSON value, None deletes): to be
        saved together."""
        ...

    def set_state(self, key: str, value: Any) -> bool:
        """State on its own; False if it was not saved (the pipeline counts that and saves it again later)."""
        ...


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
    source_events: int = 0  # source_down / source_up passed on to the sink
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


class Pipeline:
    def __init__(
        self,
        registry: SignalRegistry,
        decoders: Mapping[str, Decoder[Any]],
        scorer: Scorer | None,
        sink: Sink | None,
        tap: Callable[[SampleArrays], None] | None = None,
        drift_policy: DriftPolicy | None = None,
        drift_interval_s: float = _MODEL.drift_interval_s,
        alert_resume_s: float = _MODEL.alert_resume_s,
        alert_heartbeat_s: float = _MODEL.alert_heartbeat_s,
        metrics: Metrics | None = None,
    ) -> None:
        self.tap = tap  # sees every decoded sample batch (replay statistics)
        self.registry = registry
        self.decoders: dict[str, Decoder[Any]] = dict(decoders)  # per source: a CAN bus, a serial device
        self.scorer = scorer
        self.sink = sink  # None: nothing is kept (a run for its statistics only)
        self.alert_resume_s = alert_resume_s
        self.alert_heartbeat_s = alert_heartbeat_s  # wall-clock seconds between saves of an open alert's sign of life
        self.stats = PipelineStats()
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
        self._drift_key = ""
        if scorer is not None and isinstance(scorer.contract.training.get("feature_stats"), dict):
            c = scorer.contract
            self.drift = DriftMonitor([f.name for f in c.features], c.training["feature_stats"],
                                      drift_policy or _MODEL.drift_policy())
            self._drift_key = f"drift/{c.model_name}/{c.model_version}"
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.collect("pipeline", self._counters)
        self.metrics.collect("decoder", self._decoder_counters)

    def _counters(self) -> dict[str, Any]:
        """For the metrics registry: read at each snapshot, so the hot path keeps its plain integers."""
        st = self.stats
        return {
            "frames": st.frames, "serial_lines": st.serial_lines, "samples": st.samples, "windows": st.windows,
            "windows_scored": st.windows_scored, "windows_unfamiliar": st.windows_unfamiliar,
            "windows_missing_features": st.windows_missing, "alerts_opened": st.alerts_opened,
            "alerts_closed": st.alerts_closed, "alerts_carried": st.alerts_carried, "dtc_events": st.dtc_events,
            "source_events": st.source_events, "errors": counts(st.errors),
            "missing_features": counts(st.missing_features), "unfamiliar_features": counts(st.unfamiliar_features),
        }

    def _decoder_counters(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for source, dec in list(self.decoders.items()):
            out[f"{source}.errors"] = counts(dec.errors)
            out |= {f"{source}.{k}": v for k, v in dec.counters().items()}
        return out

    # --- a restart -------------------------------------------------------------------------------------------

    def state_keys(self) -> list[str]:
        """The saved state `resume` continues from."""
        keys = [self._drift_key] if self.drift is not None else []
        keys += [d.state_key for d in self.decoders.values() if d.state_key is not None]
        return [*keys, ALERT_STATE_KEY]

    def resume(self, saved: Mapping[str, Any]) -> None:
        """Continue from what the previous run saved (key → value, as `state_keys` names them; absent or None:
        nothing saved): the drift statistics, each decoder's state (a bus's active DTCs), and the open alert."""
        drift = saved.get(self._drift_key)
        if self.drift is not None and isinstance(drift, dict) and self.drift.restore(drift):
            self._drift_flag = bool(self.drift.drifted())
        for dec in self.decoders.values():
            if dec.state_key is None:
                continue
            saved_dec = saved.get(dec.state_key)
            if saved_dec is not None and not dec.restore(saved_dec):
                self.stats.errors["dtc_state_unreadable"] += 1
        alert = saved.get(ALERT_STATE_KEY)
        if alert is None:
            return
        now = time.time()
        try:
            if not isinstance(alert, dict):
                raise ValueError("not an object")
            if self.tracker is not None:
                closing = self.tracker.resume(alert, now, self.alert_resume_s)
            else:  # no model scores now: nobody can close it later
                closing = closed_for(alert, "model_changed", now)
        except (KeyError, TypeError, ValueError) as e:
            self.stats.errors["alert_state_unreadable"] += 1
            log.error("saved open alert unreadable, dropped: %s", e)
            self._emit([], {ALERT_STATE_KEY: None})
            return
        if closing is None:
            assert self.tracker is not None and self.tracker.open is not None
            self.stats.alerts_carried += 1
            log.warning("alert %s still open from before the restart: carried on", self.tracker.open.alert_id[:8])
            self._emit([], self._alert_state())
            return
        log.warning("alert %s left open by the previous run: closed (%s)", closing.alert_id[:8], closing.reason)
        self.stats.alerts_closed += 1
        self._emit([("alert", closing.to_dict())], {ALERT_STATE_KEY: None})

    def _alert_state(self) -> dict[str, Any]:
        """The open alert with its owner's "alive" time now (None once closed), to be saved."""
        assert self.tracker is not None
        self._alert_saved_at = time.time()
        return {ALERT_STATE_KEY: self.tracker.saved(self._alert_saved_at)}

    def heartbeat(self) -> None:
        """Called after every batch and when idle: while an alert is open, its owner is alive; saved every
        `alert_heartbeat_s`, so that a restart within `alert_resume_s` of the last save carries it on."""
        if self.tracker is not None and self.tracker.open is not None \
                and time.time() - self._alert_saved_at >= self.alert_heartbeat_s:
            self._emit([], self._alert_state())

    def shutdown(self, reason: str = "agent_stop") -> None:
        """A clean stop: close the open alert (its owner is going away)."""
        if self.tracker is not None:
            closing = self.tracker.close_now(reason, time.time())
            if closing is not None:
                log.info("alert %s closed (%s)", closing.alert_id[:8], reason)
                self.stats.alerts_closed += 1
                self._emit([("alert", closing.to_dict())], {ALERT_STATE_KEY: None})

    # --- inputs ----------------------------------------------------------------------------------------------

    def feed(self, source: str, batch: Sized) -> None:
        """The one entry point: a batch from a source (a `FrameBatch` from a CAN bus, lines from a serial device)
        through that source's decoder."""
        dec = self.decoders.get(source)
        if dec is None:
            # Every configured source has its decoder from the start: this is a wiring fault, counted.
            kind = "frames_from_unknown_bus" if isinstance(batch, FrameBatch) else "lines_from_unknown_device"
            self.stats.errors[kind] += len(batch)
            return
        if dec.input_kind == "frames":
            self.stats.frames += len(batch)
        else:
            self.stats.serial_lines += len(batch)
        res = dec.decode(batch)
        self._samples(res.samples)
        # Saved with the events, in their transaction: a restart continues from exactly what was announced.
        state = {dec.state_key: dec.state()} if res.state_changed and dec.state_key is not None else {}
        self._events(res.events, state)

    def source_event(self, event: Event) -> None:
        """A source's own event (`source_down`, `source_up`: agent/sources/health.py), stored and synced like any
        other."""
        self.stats.source_events += 1
        log.info("%s %s", event.kind, event.data)
        self._emit([("event", event.to_dict())], {})

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
        if self.sink is not None:
            self.sink.append_samples(s)
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
            # The open alert, or None once closed: in the record's transaction.
            self._emit([("alert", alert.to_dict())], self._alert_state())

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
        self._emit([("event", Event("drift", now, report).to_dict())], {})
        if self.sink is not None and not self.sink.set_state(self._drift_key, self.drift.state()):
            self.stats.errors["drift_state_not_saved"] += 1  # the statistics live on; the next report saves them

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

    def _events(self, events: list[Event], state: dict[str, Any]) -> None:
        for e in events:
            if e.kind.startswith("dtc_"):
                self.stats.dtc_events += 1
                log.info("%s %s", e.kind, e.data)
        if events or state:
            # One transaction for the batch's events and the decoder state they leave.
            self._emit([("event", e.to_dict()) for e in events], state)

    def _emit(self, records: list[tuple[str, dict[str, Any]]], state: dict[str, Any]) -> None:
        if self.sink is not None:
            self.sink.append_records(records, state)
