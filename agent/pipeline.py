"""The on-vehicle pipeline without threads, sockets or files: batches from sources in, samples and records out to
a `Sink`.

Every source's batches go through its decoder (agent/decode/base.py), the samples through features and scoring to
alerts; samples, alerts and events go to the sink. A decoder's events go through that source's DTC debouncer
first (agent/dtcdebounce.py, on the batch's own data time): a flapping DTC becomes one event a period, as do a
DTC's updates, a source's storm one summary a minute, every decoded event counted. Alerts and a DTC's first open
are marked urgent (written at once); the decoder's other events may wait for the samples' flush. The live service
(agent/service.py) and log replay both drive this same object with the store writer (agent/writer.py) as the sink,
so what a fleet engineer replays is exactly what runs on the vehicle. When and how the sink writes, and what it
does when it cannot, is the writer's.

What is open survives a restart. The open alert and each decoder's state (a bus's DM1 active set) go to the sink
(state keys `alerts/open`, `dtc_active/<bus>`, and what the DTC debouncer holds, `dtc_debounce/<bus>`) with the
records that changed them, to be saved in the same transaction; the alert also every `alert_heartbeat_s` while
open (so that a restart knows how long its owner was gone); the drift statistics with each drift report. At start
the writer reads them back and hands them to `resume`: DTCs still active are not announced again, held DTC events
go out when their period ends, and the open alert is carried on or closed with a reason (agent/alerts.py).

A model update happens here, at window boundaries (after a batch, when every model has closed the windows its
samples end): a verified candidate (agent/update/manager.py hands it over) gets its own feature windows fed the
same samples (it may have other features or another hop) and scores beside the active model, its figures and the
decision in agent/update/shadow.py. It replaces the active model only when the decision passes and no alert is
open (it waits while one is). At the switch its windows, already warm, carry on; the new model gets a new alert
tracker and drift monitor; its windows that closed after the old model's last one (on another grid, up to a batch
before) are scored by it at once; and the old model stays in memory, its windows fed, until the watch ends, so
that a rollback is a swap too. Windows no model scored across a switch (a gap on the new model's grid, or a window
it started cold) are counted (`model_switch_unscored_windows`): zero by construction, and tested.

The status message's active DTCs (`dtc_status`, read on the uplink's thread) are an immutable snapshot made here, on
the pipeline thread, from every decoder that tracks DTCs (the J1939 ones), after a batch that changed a decoder's
state, at most every `dtc_snapshot_s` of wall time (and when idle, from `heartbeat`): a DTC storm changes the state
with every batch, and a snapshot walks a bus's whole active set. The uplink thread never reads a decoder's dicts.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sized
from dataclasses import dataclass, field
from typing import Any, Protocol, cast, runtime_checkable

import numpy as np
import numpy.typing as npt

from agent.alerts import AlertContext, AlertTracker, closed_for
from agent.config import ModelConfig, PipelineConfig
from agent.decode.base import Decoder, Lines
from agent.decode.j1939_dtc import ActiveDtc, status_order
from agent.drift import DriftMonitor, DriftPolicy
from agent.dtcdebounce import DtcDebouncer, DtcPolicy
from agent.features import FeatureEngine, FeatureRow
from agent.frames import FrameBatch
from agent.metrics import Metrics, counts
from agent.records import Event, SampleArrays
from agent.scoring import ScoreBatch, Scorer
from agent.signals import SignalRegistry
from agent.update.shadow import Figures, ShadowBounds, ShadowRun, UpdateEvent, decide, doomed
from harvester_common.wire import MAX_STATUS_DTCS

log = logging.getLogger("agent.pipeline")

ALERT_STATE_KEY = "alerts/open"
DTC_DEBOUNCE_STATE_KEY = "dtc_debounce/{source}"  # what a decoder's DTC debouncer holds (agent/dtcdebounce.py)
# The defaults of the keys the pipeline takes, for callers without a config (replay, tests, benchmarks).
_MODEL = ModelConfig()
_MODEL_DTC = PipelineConfig().dtc_policy()


@runtime_checkable
class DtcSnapshots(Protocol):
    """A decoder that tracks active DTCs (agent/decode/j1939.py)."""

    def active_snapshot(self, limit: int) -> tuple[tuple[ActiveDtc, ...], int]: ...


@dataclass(frozen=True, slots=True)
class DtcSnapshot:
    """Every source's active DTCs for the status message: the first MAX_STATUS_DTCS in `status_order`, and how many
    there are in all. Replaced whole, never changed: the uplink thread reads it while the pipeline makes the next."""
    active: tuple[ActiveDtc, ...] = ()
    total: int = 0

    def status(self) -> dict[str, Any]:
        return {"active": [d.to_dict() for d in self.active], "more": self.total - len(self.active)}


class Sink(Protocol):
    """Where the pipeline's output goes (agent/writer.py: the store)."""

    def append_samples(self, samples: SampleArrays) -> None: ...

    def append_records(self, records: list[tuple[str, dict[str, Any]]], state: dict[str, Any],
                       urgent: bool = True) -> None:
        """Alerts and events (kind, record), and the state they change (key → JSON value, None deletes): to be
        saved together. `urgent`: to be written at once (an alert, a DTC's first open); otherwise they may wait
        for the samples' flush, with their state."""
        ...

    def set_state(self, key: str, value: Any) -> bool:
        """State on its own; False if it was not saved (the pipeline counts that and saves it again later)."""
        ...


class _CallClock:
    """How long a scoring call took, for the shadow's latency figure: its wall time, but never more than the CPU
    the process spent meanwhile. A call the scheduler set aside on a busy machine took long without being slow, and
    must not reject a model; a model that computes across several threads still counts its wall time."""

    __slots__ = ("_cpu", "_wall")

    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._cpu = time.process_time()

    def seconds(self) -> float:
        return min(time.perf_counter() - self._wall, time.process_time() - self._cpu)


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
    dtc_events: int = 0  # decoded (DM1 transitions and any other dtc_* event a decoder gives)
    dtc_events_written: int = 0  # to the sink: as themselves, and the summaries of those merged
    dtc_events_merged: int = 0  # decoded events that went out inside another (a summary, a coalesced update, ...)
    dtc_events_held: int = 0  # decoded events the debouncers hold now (dtc_events = passed + merged + held)
    serial_lines: int = 0
    source_events: int = 0  # source_down / source_up passed on to the sink
    last_score: float = math.nan
    errors: Counter[str] = field(default_factory=Counter)
    model_switches: int = 0  # switches to another model (a candidate, or back to the previous one)
    model_switch_unscored_windows: int = 0  # windows no model scored across a switch: must stay 0


class ModelSlot:
    """One model with its own feature windows and alert logic: the active one, a candidate shadowing it, or the
    previous one kept warm while the new one is watched."""

    __slots__ = ("engine", "last_ts", "scorer", "sid_map", "switched_in", "t0", "tracker")

    def __init__(self, scorer: Scorer) -> None:
        c = scorer.contract
        self.scorer = scorer
        self.engine = FeatureEngine(c.features, c.hop_s)
        self.tracker = AlertTracker(c.alert, c.model_name, c.model_version)
        self.sid_map = np.zeros(0, np.int32)  # registry id -> the engine's signal index (-1: not used)
        self.t0 = math.nan  # data time of the first sample fed: a window that starts before it is warm-up
        self.last_ts = math.nan  # data time of the latest sample fed
        self.switched_in = False  # became the active model by a switch (its first windows are checked)

    def index(self, registry: SignalRegistry, sid: npt.NDArray[np.int32]) -> npt.NDArray[np.int32]:
        if len(registry) > self.sid_map.size:
            old = self.sid_map.size
            grown = np.full(len(registry), -1, np.int32)
            grown[:old] = self.sid_map
            for i in range(old, len(registry)):
                grown[i] = self.engine.signal_index.get(registry.name(i), -1)
            self.sid_map = grown
        return self.sid_map[sid]

    def feed(self, registry: SignalRegistry, s: SampleArrays, track: bool) -> list[FeatureRow]:
        """Its windows closed by these samples; `track`: keep the data time it has seen (needed while an update
        runs; the steady path skips it)."""
        idx = self.index(registry, s.sid)
        if track or math.isnan(self.t0):
            used = s.ts[idx >= 0]
            if used.size:
                if math.isnan(self.t0):
                    self.t0 = float(used.min())
                hi = float(used.max())
                self.last_ts = hi if math.isnan(self.last_ts) else max(self.last_ts, hi)
        return self.engine.feed(s.ts, idx, s.value)

    @property
    def warm(self) -> bool:
        """The next window it closes holds a full window of data (it has seen that much since its first sample)."""
        return self.last_ts - self.t0 >= self.engine.max_window_s

    def fresh_tracker(self) -> None:
        c = self.scorer.contract
        self.tracker = AlertTracker(c.alert, c.model_name, c.model_version)


class _Update:
    """What the pipeline is doing with a model update: `shadow` (a candidate scores beside the active model),
    `warmup` (a candidate is fed until warm, then switched to without a decision: an operator's rollback), or
    `watch` (the new model is watched; `slot` is the previous one, kept warm for a rollback)."""

    __slots__ = ("bounds", "kind", "last_rows", "rollback", "run", "slot", "tag")

    def __init__(self, kind: str, tag: Any, slot: ModelSlot | None, bounds: ShadowBounds) -> None:
        self.kind = kind
        self.tag = tag
        self.slot = slot
        self.bounds = bounds
        self.run = ShadowRun(bounds)  # watch: `cand` is the new model live, `base` the old one's shadow figures
        self.last_rows: list[FeatureRow] = []  # `slot`'s windows that close after the active model's latest
        self.rollback = ""  # watch: why a rollback is due (done once the previous model is warm)


def _invalid(res: ScoreBatch) -> npt.NDArray[np.bool_]:
    """Windows the network was run on (every required feature, familiar) whose output was not finite."""
    return ~res.missing_required & ~res.unfamiliar & ~res.scored


def _latest(batch: Sized) -> float | None:
    """The latest finite time a batch carries (a `FrameBatch`'s frames, or lines read at a time), or None."""
    if isinstance(batch, FrameBatch):
        ts = batch.ts[np.isfinite(batch.ts)]
        return float(ts.max()) if ts.size else None
    times = [t for t, _ in cast(Lines, batch) if isinstance(t, float | int) and math.isfinite(t)]
    return float(max(times)) if times else None


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
        on_update: Callable[[UpdateEvent], None] | None = None,
        dtc_policy: DtcPolicy | None = None,
        dtc_snapshot_s: float = 1.0,
    ) -> None:
        self.tap = tap  # sees every decoded sample batch (replay statistics)
        self.registry = registry
        self.decoders: dict[str, Decoder[Any]] = dict(decoders)  # per source: a CAN bus, a serial device
        self.sink = sink  # None: nothing is kept (a run for its statistics only)
        self.alert_resume_s = alert_resume_s
        self.alert_heartbeat_s = alert_heartbeat_s  # wall-clock seconds between saves of an open alert's sign of life
        self.stats = PipelineStats()
        self.dtc_policy = dtc_policy or _MODEL_DTC
        self.debouncers: dict[str, DtcDebouncer] = {}  # per source, as its first events come (or its state)
        self.dtc_snapshot_s = dtc_snapshot_s
        self._dtcs = DtcSnapshot()  # read by the uplink thread: only ever replaced (one reference store)
        self._dtcs_stale = False
        self._dtcs_at = -math.inf  # time.monotonic() of the last snapshot
        self._alert_saved_at = 0.0
        self.active = ModelSlot(scorer) if scorer is not None else None
        self.drift: DriftMonitor | None = None
        self.drift_policy = drift_policy or _MODEL.drift_policy()
        self.drift_interval_s = drift_interval_s
        self._drift_next = math.nan  # data time of the next periodic drift report
        self._drift_flag = False
        self._drift_key = ""
        self._drift_status: dict[str, Any] = {"enabled": False}  # read by the uplink thread: only ever replaced
        self._new_drift()
        self.on_update = on_update  # the model manager, told of every step of an update (on this thread)
        self._update: _Update | None = None
        self._last_end = math.nan  # end of the latest window the active model was given
        self._switch_mark: tuple[float, int] | None = None  # at a switch: that end, the new engine's empty closes
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.collect("pipeline", self._counters)
        self.metrics.collect("decoder", self._decoder_counters)

    @property
    def scorer(self) -> Scorer | None:
        return self.active.scorer if self.active is not None else None

    @property
    def engine(self) -> FeatureEngine | None:
        return self.active.engine if self.active is not None else None

    @property
    def tracker(self) -> AlertTracker | None:
        return self.active.tracker if self.active is not None else None

    def _new_drift(self) -> None:
        """A drift monitor for the active model (one whose contract carries training statistics)."""
        self.drift, self._drift_key, self._drift_flag, self._drift_next = None, "", False, math.nan
        if self.active is not None and isinstance(self.active.scorer.contract.training.get("feature_stats"), dict):
            c = self.active.scorer.contract
            self.drift = DriftMonitor([f.name for f in c.features], c.training["feature_stats"], self.drift_policy)
            self._drift_key = f"drift/{c.model_name}/{c.model_version}"
        self._snapshot_drift()

    def _snapshot_drift(self, drifted: Iterable[str] | None = None) -> None:
        """The status's view of drift (`drift_status`), made here on the pipeline thread after each change: the
        uplink thread reads the status while this thread folds windows into the monitor's arrays, and a status made
        from them then would mix two updates. `drifted`: the drifted features' names, when the caller has them."""
        if self.drift is None:
            self._drift_status = {"enabled": False}
            return
        names = sorted(self.drift.drifted() if drifted is None else drifted)
        self._drift_status = {"enabled": True, "drift": self._drift_flag, "windows": self.drift.rows,
                              "features": names}

    def _counters(self) -> dict[str, Any]:
        """For the metrics registry: read at each snapshot, so the hot path keeps its plain integers."""
        st = self.stats
        return {
            "frames": st.frames, "serial_lines": st.serial_lines, "samples": st.samples, "windows": st.windows,
            "windows_scored": st.windows_scored, "windows_unfamiliar": st.windows_unfamiliar,
            "windows_missing_features": st.windows_missing, "alerts_opened": st.alerts_opened,
            "alerts_closed": st.alerts_closed, "alerts_carried": st.alerts_carried, "dtc_events": st.dtc_events,
            "dtc_events_written": st.dtc_events_written, "dtc_events_merged": st.dtc_events_merged,
            "dtc_events_held": float(st.dtc_events_held),
            "source_events": st.source_events, "errors": counts(st.errors),
            "model_switches": st.model_switches, "model_switch_unscored_windows": st.model_switch_unscored_windows,
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
        keys += [DTC_DEBOUNCE_STATE_KEY.format(source=s) for s in self.decoders]
        return [*keys, ALERT_STATE_KEY]

    def resume(self, saved: Mapping[str, Any]) -> None:
        """Continue from what the previous run saved (key → value, as `state_keys` names them; absent or None:
        nothing saved): the drift statistics, each decoder's state (a bus's active DTCs), and the open alert."""
        drift = saved.get(self._drift_key)
        if self.drift is not None and isinstance(drift, dict) and self.drift.restore(drift):
            self._drift_flag = bool(self.drift.drifted())
            self._snapshot_drift()
        for dec in self.decoders.values():
            if dec.state_key is None:
                continue
            saved_dec = saved.get(dec.state_key)
            if saved_dec is not None and not dec.restore(saved_dec):
                self.stats.errors["dtc_state_unreadable"] += 1
        self._snapshot_dtcs()  # the first status after a restart names what is still active
        for source in self.decoders:
            held = saved.get(DTC_DEBOUNCE_STATE_KEY.format(source=source))
            if held is not None and not self._debouncer(source).restore(held):
                self.stats.errors["dtc_debounce_state_unreadable"] += 1
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
        self._refresh_dtcs()

    def _refresh_dtcs(self) -> None:
        if self._dtcs_stale and time.monotonic() - self._dtcs_at >= self.dtc_snapshot_s:
            self._snapshot_dtcs()

    def _snapshot_dtcs(self) -> None:
        """Every DTC-tracking decoder's active set, merged in the status message's order: each gives its first
        MAX_STATUS_DTCS, of which the first MAX_STATUS_DTCS of all are kept."""
        parts = [d.active_snapshot(MAX_STATUS_DTCS) for d in self.decoders.values() if isinstance(d, DtcSnapshots)]
        active = sorted((a for kept, _ in parts for a in kept),
                        key=lambda a: status_order(a.source, a.spn, a.fmi, a.lamps))[:MAX_STATUS_DTCS]
        self._dtcs = DtcSnapshot(tuple(active), sum(n for _, n in parts))
        self._dtcs_stale, self._dtcs_at = False, time.monotonic()

    def dtc_status(self) -> dict[str, Any]:
        """For the status message (any thread): the active DTCs of the latest snapshot, `{"active": [...], "more":
        n}` (docs/protocol.md "Status")."""
        return self._dtcs.status()

    def drain_dtcs(self) -> None:
        """Every DTC event the debouncers hold, out now (a stop, the end of a replay), with their emptied state."""
        for source, deb in self.debouncers.items():
            out = deb.drain()
            if out or deb.changed:
                self._dtc_out(out, {DTC_DEBOUNCE_STATE_KEY.format(source=source): deb.state()}, False)

    def shutdown(self, reason: str = "agent_stop") -> None:
        """A clean stop: the DTC events held go out, and the open alert is closed (its owner is going away)."""
        self.drain_dtcs()
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
        self._events(source, res.events, batch, state, res.state_urgent)
        if res.state_changed:  # the active set, its counts, lamps or sources moved
            self._dtcs_stale = True
            self._refresh_dtcs()

    def source_event(self, event: Event) -> None:
        """A source's own event (`source_down`, `source_up`: agent/sources/health.py), stored and synced like any
        other."""
        self.stats.source_events += 1
        log.info("%s %s", event.kind, event.data)
        self._emit([("event", event.to_dict())], {})

    # --- stages ----------------------------------------------------------------------------------------------

    def _samples(self, s: SampleArrays) -> None:
        if not len(s):
            return
        self.stats.samples += len(s)
        if self.tap is not None:
            self.tap(s)
        if self.sink is not None:
            self.sink.append_samples(s)
        up = self._update
        rows = self.active.feed(self.registry, s, up is not None) if self.active is not None else []
        other = up.slot.feed(self.registry, s, True) if up is not None and up.slot is not None else []
        if rows:
            self._score(rows)
        if up is not None:
            # Its windows that close after the active model's latest: if it takes over now, they are its first (on
            # another grid, one may have closed a batch before the active model's next one).
            last = self._last_end
            up.last_rows = [r for r in (*up.last_rows, *other) if math.isnan(last) or r.end > last]
            if other and up.kind == "shadow":
                self._shadow(up, other)
        if up is not None:
            self._update_step(up, bool(rows or other))

    def _score(self, rows: list[FeatureRow]) -> None:
        assert self.active is not None and self.scorer is not None and self.tracker is not None
        self.stats.windows += len(rows)
        if self._switch_mark is not None or self.active.switched_in:
            self._count_unscored(rows)
        self._last_end = rows[-1].end
        x = np.stack([r.x for r in rows])
        up = self._update
        # While a candidate shadows: the active model's figures over the same stretch as the candidate's counted
        # windows (from its first full window on). While the new model is watched: its own.
        figs: Figures | None = None
        counted = np.ones(len(rows), bool)
        if up is not None and up.kind == "watch":
            # Its windows that started before it had data (a watch resumed after a restart) are nobody's fault.
            counted = np.array([r.start >= self.active.t0 for r in rows])
            figs = up.run.cand if counted.any() else None
        elif up is not None and up.kind == "shadow" and up.slot is not None:
            counted = np.array([r.end >= up.slot.t0 + up.slot.engine.max_window_s for r in rows])
            figs = up.run.base if counted.any() else None
        t = _CallClock()
        try:
            res = self.scorer.score(x)
        except Exception:
            if figs is None or up is None or up.kind != "watch":
                raise
            # The new model raised: its watch has failed (rolled back at this boundary); nothing to act on here.
            figs.add_error(len(rows), t.seconds())
            self.stats.errors["model_scoring_raised"] += 1
            log.exception("the new model raised while scoring")
            return
        took = t.seconds()
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
        in_alert = np.zeros(len(rows), bool)  # the alert state after each window
        for i, row in enumerate(rows):
            self._act(i, row, res, names)
            in_alert[i] = self.tracker.open is not None
        if figs is not None and up is not None:
            ok = res.scored & counted
            figs.add(int(counted.sum()), int(ok.sum()), int((_invalid(res) & counted).sum()),
                     int((in_alert & counted).sum()), took)
            if up.kind == "shadow":
                up.run.scored_ends(1, [r.end for r, k in zip(rows, ok.tolist(), strict=True) if k])

    def _act(self, i: int, row: FeatureRow, res: ScoreBatch, names: list[str]) -> None:
        """One window's score into the active model's alert logic."""
        assert self.scorer is not None and self.tracker is not None
        if not res.scored[i]:
            return  # unfamiliar or lacking: no evidence either way, the alert state holds
        score = float(res.scores[i])
        self.stats.last_score = score
        present = [names[j] for j in np.flatnonzero(res.present[i]).tolist()]
        ctx = AlertContext(row.start, row.end, res.labels[i], snapshot=row.snapshot, features_present=present)
        was_open = self.tracker.open is not None
        alert = self.tracker.update(score, ctx)
        if alert is None:
            return
        if not was_open:
            alert.top_features = self.scorer.explain(row.x)
            self.stats.alerts_opened += 1
            log.warning("alert %s opened: %s score %.3f", alert.alert_id[:8], alert.label, score)
        else:
            self.stats.alerts_closed += 1
            log.info("alert %s closed", alert.alert_id[:8])
        # The open alert, or None once closed: in the record's transaction.
        self._emit([("alert", alert.to_dict())], self._alert_state())

    # --- model updates -----------------------------------------------------------------------------------------

    @property
    def update_kind(self) -> str | None:
        """`shadow`, `warmup`, `watch`, or None: what the pipeline is doing with a model update."""
        return self._update.kind if self._update is not None else None

    def shadow(self, scorer: Scorer, tag: Any, bounds: ShadowBounds) -> bool:
        """Score `scorer` beside the active model and switch to it if its figures pass (`bounds`); every step is
        told to `on_update` with `tag`. Replaces a candidate already shadowing; False (nothing done) while a watch
        runs."""
        return self._begin("shadow", scorer, tag, bounds)

    def switch_to(self, scorer: Scorer, tag: Any, bounds: ShadowBounds) -> bool:
        """Switch to `scorer` without a shadow run (an operator's rollback): its windows are fed until they hold a
        full window of data, then it replaces the active model at the next boundary, an open alert closed
        (`model_changed`). No watch follows."""
        return self._begin("warmup", scorer, tag, bounds)

    def _begin(self, kind: str, scorer: Scorer, tag: Any, bounds: ShadowBounds) -> bool:
        if self._update is not None and self._update.kind == "watch":
            return False
        self._update = _Update(kind, tag, ModelSlot(scorer), bounds)
        if kind == "shadow":
            self._tell(UpdateEvent("shadow", tag, figures=self._update.run.figures()))
        return True

    def cancel(self) -> bool:
        """Drop a candidate that shadows or warms up (not a watch: that model already scores)."""
        if self._update is None or self._update.kind == "watch":
            return False
        self._update = None
        return True

    def roll_back(self, reason: str) -> bool:
        """While the new model is watched: go back to the previous one at the next boundary where it is warm."""
        if self._update is None or self._update.kind != "watch" or self._update.slot is None:
            return False
        self._update.rollback = reason
        self._update_step(self._update, False)
        return True

    def watch(self, previous: Scorer | None, tag: Any, base: Figures, bounds: ShadowBounds) -> None:
        """Resume the watch of the active model after a restart: `previous` is fed from now on (a rollback waits
        until it is warm), and the active model is judged against `base`, the figures the previous model had in
        the shadow run."""
        up = _Update("watch", tag, ModelSlot(previous) if previous is not None else None, bounds)
        up.run.base = base
        self._update = up

    def _tell(self, ev: UpdateEvent) -> None:
        if self.on_update is not None:
            self.on_update(ev)

    def _shadow(self, up: _Update, rows: list[FeatureRow]) -> None:
        """The candidate's windows of one batch: scored, fed to its own alert logic, counted; nothing emitted."""
        assert up.slot is not None
        slot = up.slot
        warm = [r for r in rows if r.start >= slot.t0]
        if not warm:
            return
        x = np.stack([r.x for r in warm])
        t = _CallClock()
        try:
            res = slot.scorer.score(x)
        except Exception as e:
            up.run.cand.add_error(len(warm), t.seconds())
            self.stats.errors["candidate_scoring_raised"] += 1
            log.warning("the candidate model raised while scoring: %s", str(e)[:300])
            return
        took = t.seconds()
        in_alert = 0
        for i, r in enumerate(warm):
            if res.scored[i]:
                slot.tracker.update(float(res.scores[i]), AlertContext(r.start, r.end, res.labels[i]))
            in_alert += slot.tracker.open is not None
        up.run.cand.add(len(warm), int(res.scored.sum()), int(_invalid(res).sum()), in_alert, took)
        up.run.scored_ends(0, [r.end for r, k in zip(warm, res.scored.tolist(), strict=True) if k])

    def _update_step(self, up: _Update, progressed: bool) -> None:
        """At a window boundary: decide, switch, roll back, or carry on."""
        run, b = up.run, up.bounds
        if up.kind == "shadow":
            # A call that raised decides at once; the rest at the end (the active model's figures still move).
            if not run.cand.errors and not run.complete:
                if progressed:
                    self._tell(UpdateEvent("progress", up.tag, figures=run.figures()))
                return
            dec = run.decide()
            if not dec.ok:
                self._update = None
                self._tell(UpdateEvent("rejected", up.tag, dec.reason, dec.figures))
                return
            if self.tracker is not None and self.tracker.open is not None:
                if not run.waiting_for_alert:
                    run.waiting_for_alert = True
                    self._tell(UpdateEvent("waiting", up.tag, figures=run.figures()))
                return
            self._switch(up, watch=True)
        elif up.kind == "warmup":
            assert up.slot is not None
            if up.slot.warm:
                self._switch(up, watch=False)
        else:
            why = up.rollback or doomed(run.cand, run.base, b, b.watch_windows)
            if not why and run.cand.windows >= b.watch_windows:
                dec = decide(run.cand, run.base, b, "new model", "previous model in the shadow run", watch=True)
                if dec.ok:
                    self._update = None
                    self._tell(UpdateEvent("healthy", up.tag, figures=dec.figures))
                    return
                why = dec.reason
            if why and (up.slot is None or up.slot.warm):
                self._roll_back(up, why)
            elif why and not up.rollback:
                up.rollback = why  # the previous model is still warming up (after a restart): at its first boundary

    def _close_open_alert(self, reason: str) -> None:
        if self.tracker is None:
            return
        closing = self.tracker.close_now(reason, time.time())
        if closing is not None:
            log.info("alert %s closed (%s)", closing.alert_id[:8], reason)
            self.stats.alerts_closed += 1
            self._emit([("alert", closing.to_dict())], {ALERT_STATE_KEY: None})

    def _make_active(self, slot: ModelSlot | None) -> None:
        """`slot` scores from now on, with a new alert tracker and drift monitor (the caller hands it the windows it
        closed after the old model's last one: `_take_late`)."""
        self._close_open_alert("model_changed")  # only a rollback gets here with one open; a shadow run waits
        self._switch_mark = (self._last_end, slot.engine.windows_empty) if slot is not None else None
        self.active = slot
        self.stats.model_switches += 1
        if slot is not None:
            slot.fresh_tracker()
            slot.switched_in = True
        self._new_drift()

    def _switch(self, up: _Update, watch: bool) -> None:
        assert up.slot is not None
        old, new, last = self.active, up.slot, self._last_end
        c = new.scorer.contract
        log.warning("model: switching to %s %s at the window ending %.1f", c.model_name, c.model_version, last)
        self._make_active(new)
        base = up.run.base
        if watch:
            self._update = _Update("watch", up.tag, old, up.bounds)
            self._update.run.base = base
        else:
            self._update = None
        self._tell(UpdateEvent("switched", up.tag, figures=up.run.figures(), watch=watch, base=base.to_dict()))
        self._take_late(up.last_rows, last)

    def _roll_back(self, up: _Update, reason: str) -> None:
        prev, last = up.slot, self._last_end
        name = f"{prev.scorer.contract.model_name} {prev.scorer.contract.model_version}" if prev else "no model"
        log.error("model: rolling back to %s: %s", name, reason)
        self._make_active(prev)
        self._update = None
        self._tell(UpdateEvent("rolled_back", up.tag, reason,
                               figures=decide(up.run.cand, up.run.base, up.bounds, watch=True).figures))
        self._take_late(up.last_rows, last)

    def _take_late(self, rows: list[FeatureRow], last: float) -> None:
        """The new active model's windows that closed after the old model's last one: its first to act on (on
        another grid they would otherwise fall between the two models)."""
        late = [r for r in rows if math.isnan(last) or r.end > last]
        if late and self.active is not None:
            self._score(late)

    def _count_unscored(self, rows: list[FeatureRow]) -> None:
        """After a switch: windows of the new model's grid between the old model's last window and this one that
        closed with data and went to no model, and windows it started cold (before its first sample)."""
        assert self.active is not None
        eng = self.active.engine
        if self._switch_mark is not None:
            last, empty0 = self._switch_mark
            self._switch_mark = None
            gap = rows[0].end - last
            # A gap longer than a window is the data's (a bus down), not the switch's.
            if math.isfinite(gap) and gap <= eng.max_window_s + eng.hop_s:
                between = max(0, math.ceil(gap / eng.hop_s - 1e-6) - 1) - (eng.windows_empty - empty0)
                self.stats.model_switch_unscored_windows += max(0, between)
        cold = sum(r.start < self.active.t0 for r in rows)
        self.stats.model_switch_unscored_windows += cold
        if not cold:
            self.active.switched_in = False  # warm from here on

    def _check_drift(self, x: npt.NDArray[np.float64], now: float, outside: npt.NDArray[np.bool_]) -> None:
        """Running statistics per window; a report every `drift_interval_s` of data time and whenever the flag
        changes, as a `drift` event (stored, synced). The state is saved with each report."""
        assert self.drift is not None
        self.drift.update(x, outside)
        if math.isnan(self._drift_next):
            self._drift_next = now + self.drift_interval_s
        drifted = self.drift.drifted()
        flag = bool(drifted)
        if flag == self._drift_flag and now < self._drift_next:
            self._snapshot_drift(drifted)
            return
        assert self.scorer is not None
        c = self.scorer.contract
        # Named in the event: which model's training statistics these are (a switch starts a new monitor).
        report = {"model": c.model_name, "model_version": c.model_version} | self.drift.report()
        if flag != self._drift_flag:
            log.warning("feature drift %s: %s", "detected" if flag else "cleared",
                        "; ".join(f"{k}: {v}" for k, v in report["drifted"].items()) or "all features in range")
        self._drift_flag = flag
        self._snapshot_drift(drifted)
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
        """For the status message (any thread): the flag and the drifted features' names (the reasons travel in
        events), as of the last window the pipeline folded in."""
        out = self._drift_status
        return {**out, "features": list(out["features"])} if "features" in out else dict(out)

    def _debouncer(self, source: str) -> DtcDebouncer:
        deb = self.debouncers.get(source)
        if deb is None:
            deb = self.debouncers[source] = DtcDebouncer(self.dtc_policy)
        return deb

    def _events(self, source: str, events: list[Event], batch: Sized, state: dict[str, Any],
                state_urgent: bool = False) -> None:
        """A decoder's events through its DTC debouncer (agent/dtcdebounce.py), on the data's clock: the batch's
        latest time. `state_urgent`: the decoder's state must be written at once (Decoded.state_urgent)."""
        deb = self._debouncer(source)
        if events or deb.active:
            before = deb.decoded
            out, urgent = deb.feed(events, _latest(batch))
            self.stats.dtc_events += deb.decoded - before
            if deb.changed:
                state[DTC_DEBOUNCE_STATE_KEY.format(source=source)] = deb.state()
        else:
            out, urgent = [], False
        if out or state:
            self._dtc_out(out, state, urgent or state_urgent)

    def _dtc_out(self, out: list[Event], state: dict[str, Any], urgent: bool) -> None:
        """One transaction for what a batch lets out and the decoder and debouncer state it leaves."""
        st = self.stats
        info = log.isEnabledFor(logging.INFO)  # asked once, not per event of a storm
        for e in out:
            if e.kind.startswith("dtc_"):
                st.dtc_events_written += 1
                if info:
                    log.info("%s %s", e.kind, e.data)
        # Kept as plain numbers: the metrics collector reads them from another thread.
        st.dtc_events_merged = sum(d.merged for d in self.debouncers.values())
        st.dtc_events_held = sum(d.held for d in self.debouncers.values())
        self._emit([("event", e.to_dict()) for e in out], state, urgent)

    def _emit(self, records: list[tuple[str, dict[str, Any]]], state: dict[str, Any], urgent: bool = True) -> None:
        if self.sink is not None:
            self.sink.append_records(records, state, urgent)
