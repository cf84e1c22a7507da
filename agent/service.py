"""The running agent: sources in threads → one processing thread (the pipeline) → store → uplink thread.

Sources never block on a slow pipeline: a full queue drops the batch and counts it (the bus driver would drop
frames anyway; we would rather know). Every component counts into one metrics registry (agent/metrics.py), whose
snapshot goes into the status message and, every `[mqtt] status_interval_s`, into the store for
`harvester-agent status`.
SIGTERM stops the sources, drains the queue, writes every buffered sample, gives the uplink a bounded time to send,
and closes the store cleanly, well inside systemd's TimeoutStopSec.

The model it scores with comes from the model directory (agent/update/modeldir.py: the active package, else the
previous one, else `[model] path`); the model manager (agent/update/manager.py) takes `model/*` messages from the
uplink thread and hands candidates to the processing thread between batches.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent import __version__, allocator, numpy_memory
from agent.config import AgentConfig, model_dir
from agent.contract import ContractError
from agent.decode.base import Decoder
from agent.decode.j1939 import J1939Decoder
from agent.decode.lines import LineDecoder
from agent.decode.nmea import NmeaDecoder
from agent.frames import FrameBatch
from agent.metrics import Metrics, bounded
from agent.pipeline import Pipeline
from agent.records import Event
from agent.scoring import ModelLoadError, Scorer
from agent.signals import SignalRegistry
from agent.sources.can import CanSource
from agent.sources.serial import SerialSource
from agent.store import Store
from agent.systemd import notify, watchdog_interval_s
from agent.update.manager import start as start_models
from agent.uplink import Uplink
from agent.writer import StoreWriter
from harvester_common.modelpkg import load_public_keys

log = logging.getLogger("agent.service")


@dataclass(slots=True)
class Progress:
    uptime_s: float
    frames: int
    frames_per_s: float
    samples: int
    windows_scored: int
    windows_unfamiliar: int
    alerts_opened: int
    dtc_events: int
    backlog: int
    synced: int
    connected: bool
    last_score: float
    dropped_batches: int


def decoders_for(cfg: AgentConfig, registry: SignalRegistry) -> dict[str, Decoder[Any]]:
    """One decoder per source: each CAN bus, each serial device (NMEA unless its protocol says otherwise)."""
    # Names are unique across buses and devices (AgentConfig checks it): the name says where a batch came from.
    decoders: dict[str, Decoder[Any]] = {b.name: J1939Decoder(registry, b.dbc, b.name) for b in cfg.can}
    decoders.update(serial_decoders(cfg, registry))
    return decoders


def serial_decoders(cfg: AgentConfig, registry: SignalRegistry) -> dict[str, Decoder[Any]]:
    """Each serial device's decoder: NMEA unless its protocol says otherwise (`run --check-config` uses these too)."""
    return {s.name: (NmeaDecoder(registry, s.name) if s.protocol == "nmea"
                     else LineDecoder(s.name, s.protocol, s.fields, s.units, registry)) for s in cfg.serial}


def load_scorer(cfg: AgentConfig, decoders: Mapping[str, Decoder[Any]]) -> tuple[Scorer | None, str]:
    """Load the model and check its contract against what this vehicle can decode. Never raises."""
    try:
        scorer = Scorer.load(cfg.model.path, cfg.model.threads, cfg.model.batch_windows)
        scorer.check_signals(set().union(*(d.signals() for d in decoders.values())))
    except (ModelLoadError, ContractError) as e:
        return None, f"refused: {e}"
    c = scorer.contract
    return scorer, f"{c.model_name} {c.model_version}"


def trusted_keys(cfg: AgentConfig) -> dict[str, Any]:
    """The public keys packages must be signed with (`[model] trusted_keys`); none, said, if they do not load."""
    try:
        return load_public_keys(cfg.model.trusted_keys)
    except (OSError, ValueError) as e:  # PackageError is a ValueError
        log.error("model: trusted keys do not load, no package will be accepted: %s", e)
        return {}


class Agent:
    def __init__(self, cfg: AgentConfig, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics if metrics is not None else Metrics(log_every_s=cfg.log.warn_every_s)
        self.registry = SignalRegistry()
        self.decoders = decoders_for(cfg, self.registry)
        signals: set[str] = set().union(*(d.signals() for d in self.decoders.values()))
        trusted = trusted_keys(cfg)
        choice, self.updates = start_models(cfg.model, model_dir(cfg), trusted, signals)
        self._model_refused = choice.status if choice.loaded is None else ""
        if choice.loaded is None:
            log.error("model %s %s: the agent runs without scoring (data is still stored and synced)",
                      cfg.model.path, self._model_refused)
        self.store = Store(cfg.store.path, cfg.store.max_bytes, evict_watermark=cfg.store.evict_watermark)
        self.writer = StoreWriter(self.store, self.registry, cfg.store.memory_max_samples,
                                  cfg.store.memory_max_records, metrics=self.metrics)
        self.pipeline = Pipeline(self.registry, self.decoders, choice.loaded.scorer if choice.loaded else None,
                                 self.writer, drift_policy=cfg.model.drift_policy(),
                                 drift_interval_s=cfg.model.drift_interval_s, alert_resume_s=cfg.model.alert_resume_s,
                                 alert_heartbeat_s=cfg.model.alert_heartbeat_s, metrics=self.metrics,
                                 on_update=self.updates.on_update if self.updates is not None else None,
                                 dtc_policy=cfg.pipeline.dtc_policy())
        self.writer.resume(self.pipeline)
        # (kind, source, batch)
        self.queue: queue.Queue[tuple[str, str, Any]] = queue.Queue(cfg.pipeline.queue_max_batches)
        self.events: queue.Queue[tuple[str, str, Any]] = queue.Queue(cfg.pipeline.queue_max_batches)
        self.can_sources = [CanSource(b, self._on_frames, metrics=self.metrics, on_event=self._on_source_event)
                            for b in cfg.can]
        self.serial_sources = [SerialSource(s, self._on_lines, metrics=self.metrics, on_event=self._on_source_event)
                               for s in cfg.serial]
        self.allocator = allocator.running()  # what the status names; fixed for the process's life
        self.uplink = Uplink(cfg.mqtt, cfg.vehicle, self.store, self._status_extra, metrics=self.metrics,
                             model=self.updates)
        self._stop = threading.Event()
        self._notify_lock = threading.Lock()  # orders the pipeline thread's watchdog pings with STOPPING=1
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()
        self._rate_mark = (time.monotonic(), 0)
        self._fps = 0.0
        self.store_status_at_stop: dict[str, Any] = {}
        self._metrics_saved = 0.0
        self.metrics.collect("agent", lambda: {"queue_size": float(self.queue.qsize()),
                                               "uptime_s": round(time.monotonic() - self._started, 1)})
        self.metrics.collect("store", self._store_counters)
        if self.updates is not None:
            self.metrics.collect("model", self.updates.metrics)

    @property
    def scorer(self) -> Scorer | None:
        """The model scoring now (a model update may switch it)."""
        return self.pipeline.scorer

    @property
    def model_status(self) -> str:
        s = self.pipeline.scorer
        return f"{s.contract.model_name} {s.contract.model_version}" if s is not None else self._model_refused

    def model_summary(self) -> dict[str, Any]:
        """The status message's `model`: active name/version, desired, the update's step."""
        if self.updates is not None:
            return self.updates.summary()
        s = self.pipeline.scorer
        return {"active": {"name": s.contract.model_name, "version": s.contract.model_version} if s else None,
                "desired": None, "state": "disabled"}

    def _store_counters(self) -> dict[str, Any]:
        c = self.store.counters()
        return {k: c.get(k, 0) for k in ("written_samples", "written_records", "acked_samples", "acked_records",
                                         "evicted_samples", "evicted_records", "evictions")} \
            | {"used_bytes": float(self.store.used_bytes())}

    @property
    def dropped(self) -> Counter[str]:
        """Batches (frames, lines, source events) dropped because the pipeline queue was full, by kind."""
        return Counter(self.metrics.labels("agent.queue.dropped"))

    def _status_extra(self) -> dict[str, Any]:
        st = self.store.status()
        return {
            "model_version": self.scorer.contract.model_version if self.scorer else "",
            "model_status": self.model_status,
            "allocator": self.allocator,
            "model": self.model_summary(),
            "drift": self.pipeline.drift_status(),
            "scoring": self.pipeline.scoring_status(),
            "dtcs": self.pipeline.dtc_status(),
            "backlog": {"samples": st["backlog"].get("samples", {}).get("records", 0),
                        "records": st["backlog_records"] - st["backlog"].get("samples", {}).get("records", 0)},
            "evicted": st["evicted"],
            "store_error": self.writer.store_error,
            "budget": {"used_today": self.uplink.budget_used(), "daily_bytes": self.cfg.mqtt.daily_budget_bytes,
                       "samples_held": self.uplink.stats.budget_held},
            "dropped": dict(self.pipeline.stats.errors) | dict(self.writer.errors)
            | {f"queue_full_{k}": v for k, v in self.dropped.items()},
            "acks_rejected": dict(self.uplink.stats.acks_rejected),
            "acks_replayed": self.uplink.stats.acks_replayed,
            "acks_trimmed": self.uplink.stats.acks_trimmed,
            "metrics": bounded(self.metrics.snapshot()),
        }

    # --- source callbacks (source threads) -------------------------------------------------------------------

    def _offer(self, item: tuple[str, str, Any], n: int) -> None:
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self.metrics.drop("agent.queue", item[0], n, "the pipeline queue is full")

    def _on_frames(self, fb: FrameBatch) -> None:
        self._offer(("can", fb.bus, fb), len(fb))

    def _on_lines(self, device: str, lines: list[tuple[float, bytes]]) -> None:
        self._offer(("serial", device, lines), len(lines))

    def _on_source_event(self, event: Event) -> None:
        # To the pipeline thread (it alone writes to the store), but in a queue of their own, drained before data:
        # a data queue full because the pipeline is behind must not drop the one record that says a bus went down.
        try:
            self.events.put_nowait(("event", str(event.data.get("source", "")), event))
        except queue.Full:  # thousands of outages waiting: a source flapping faster than the pipeline runs
            self.metrics.drop("agent.queue", "event", 1, "the source-event queue is full")

    # --- processing thread -----------------------------------------------------------------------------------

    def _process(self, item: tuple[str, str, Any]) -> None:
        kind, source, batch = item
        if kind == "event":
            self.pipeline.source_event(batch)
        else:
            self.pipeline.feed(source, batch)

    def save_metrics(self) -> None:
        """The registry's snapshot into the store, for `harvester-agent status` (another process)."""
        self._metrics_saved = time.monotonic()
        if not self.writer.save_metrics(bounded(self.metrics.snapshot())):
            self.metrics.error("writer", "metrics_not_saved", detail="the store did not take the metrics snapshot")

    def _drain_events(self) -> None:
        while True:
            try:
                self._process(self.events.get_nowait())
            except queue.Empty:
                return

    def _run(self) -> None:
        wd = watchdog_interval_s()
        last_wd = 0.0
        s = self.cfg.store
        while not self._stop.is_set():
            try:
                item = self.queue.get(timeout=0.1)
            except queue.Empty:
                item = None
            try:
                self._drain_events()
                if item is not None:
                    self._process(item)
                if self.updates is not None:
                    self.updates.drive(self.pipeline)  # between batches: a window boundary for every model
                self.pipeline.heartbeat()
                self.writer.maybe_flush(s.flush_interval_s, s.flush_max_samples)
                if time.monotonic() - self._metrics_saved >= self.cfg.mqtt.status_interval_s:
                    self.save_metrics()
            except Exception:
                # A bug in one batch must not stop the vehicle's agent; it is logged with its traceback.
                log.exception("pipeline failed on a batch; continuing")
                self.pipeline.stats.errors["pipeline_exception"] += 1
            if wd is not None and time.monotonic() - last_wd >= wd:
                with self._notify_lock:  # never a ping after STOPPING=1, which stop() may have sent since
                    if not self._stopping:
                        notify("WATCHDOG=1")
                last_wd = time.monotonic()
        self._drain_events()
        while True:  # drain what the sources already handed over
            try:
                self._process(self.queue.get_nowait())
            except queue.Empty:
                break
        self._drain_events()
        # Every sample held, then the open alert closed (its owner is going away), then whatever is still held.
        self.writer.flush_samples()
        self.pipeline.shutdown("agent_stop")
        self.writer.flush_records()

    # --- lifecycle -------------------------------------------------------------------------------------------

    def _sources(self) -> list[CanSource | SerialSource]:
        return [*self.can_sources, *self.serial_sources]

    def start(self) -> None:
        self._thread = numpy_memory.thread(self._run, "pipeline")
        self._thread.start()
        self.uplink.start()
        for src in self._sources():
            src.start()
        notify("READY=1")
        notify(f"STATUS=running; model {self.model_status}")
        log.info("agent %s started: vehicle %s/%s, %d CAN bus(es), %d serial device(s), model %s, %s, %s",
                 __version__, self.cfg.vehicle.fleet, self.cfg.vehicle.id, len(self.can_sources),
                 len(self.serial_sources), self.model_status, self.allocator, numpy_memory.status())
        wrong = allocator.problem(self.allocator, allocator.asked())
        if wrong:
            log.warning("%s", wrong)

    def stop(self, drain_s: float | None = None) -> None:
        """Stop cleanly; the uplink sends the backlog for up to `drain_s` first (default: `[mqtt] stop_drain_s`)."""
        with self._notify_lock:
            self._stopping = True
            notify("STOPPING=1")
        for src in self._sources():
            src.stop()
        self._stop.set()  # after the sources: the pipeline thread then drains all they handed over
        if self._thread is not None:
            self._thread.join(30)
        self.uplink.stop(drain_s=self.cfg.mqtt.stop_drain_s if drain_s is None else drain_s)
        if self.updates is not None:
            self.updates.close()
        self.save_metrics()  # the final counts, every thread stopped
        self.store_status_at_stop = self.store.status()
        self.store.close()
        log.info("agent stopped")

    def progress(self) -> Progress:
        now = time.monotonic()
        st = self.pipeline.stats
        t0, f0 = self._rate_mark
        if now - t0 >= 1.0:
            self._fps = (st.frames - f0) / (now - t0)
            self._rate_mark = (now, st.frames)
        c = self.store.counters()
        backlog = (c["written_samples"] + c["written_records"]) - (
            c["acked_samples"] + c["acked_records"] + c["evicted_samples"] + c["evicted_records"]
        )
        return Progress(
            uptime_s=now - self._started,
            frames=st.frames,
            frames_per_s=self._fps,
            samples=st.samples,
            windows_scored=st.windows_scored,
            windows_unfamiliar=st.windows_unfamiliar,
            alerts_opened=st.alerts_opened,
            dtc_events=st.dtc_events,
            backlog=backlog,
            synced=c["acked_samples"] + c["acked_records"],
            connected=self.uplink.connected,
            last_score=st.last_score,
            dropped_batches=sum(self.dropped.values()),
        )
