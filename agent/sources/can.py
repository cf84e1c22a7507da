"""CAN source: any python-can interface chosen by name in the config, read in batches.

A bus that fails to open or errors while running (bus-off, adapter unplugged) is shut down, counted and reopened
with exponential backoff; the agent never needs a restart for it. The outage is told to the cloud as a
`source_down` event and its end as `source_up` (agent/sources/health.py).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import can

from agent.backoff import backoff_delay
from agent.config import CanBusConfig
from agent.frames import FrameBatch
from agent.metrics import Metrics
from agent.records import Event
from agent.sources.health import SourceHealth

log = logging.getLogger("agent.sources.can")


def open_bus(cfg: CanBusConfig) -> can.BusABC:
    kwargs = dict(cfg.options)
    if cfg.bitrate is not None:
        kwargs["bitrate"] = cfg.bitrate
    if cfg.interface == "socketcand":
        from agent.sources.socketcand import SocketcandBus

        missing = [k for k in ("host", "port") if k not in kwargs]
        if missing:
            raise ValueError(f"interface socketcand needs options {{host = ..., port = ...}} (missing {missing})")
        bus: can.BusABC = SocketcandBus(cfg.channel, connect_timeout_s=cfg.connect_timeout_s, **kwargs)
        return bus
    return can.Bus(interface=cfg.interface, channel=cfg.channel, **kwargs)


def virtual_bus_warning(buses: list[CanBusConfig]) -> str | None:
    """python-can's `virtual` bus lives inside one process: `simulate` and `run` started apart never meet on it,
    and nothing says so. The line to log at start when a config uses it."""
    names = [b.name for b in buses if b.interface == "virtual"]
    if not names:
        return None
    return (f"CAN bus {', '.join(names)}: interface \"virtual\" only reaches buses in this same process; "
            "a simulator or agent in another process sees nothing. Across processes on one host use "
            "`harvester-agent simulate --socketcand PORT` and interface = \"socketcand\" with "
            "options = {host = \"127.0.0.1\", port = PORT} (docs/configuration.md)")


class CanSource:
    def __init__(self, cfg: CanBusConfig, sink: Callable[[FrameBatch], None], seed: int | None = None,
                 metrics: Metrics | None = None, on_event: Callable[[Event], None] | None = None) -> None:
        self.cfg = cfg
        self.sink = sink
        self.metrics = metrics if metrics is not None else Metrics()
        self.component = f"source.{cfg.name}"
        self.health = SourceHealth(cfg.name, "can", self.metrics, on_event)
        self.frames = 0
        self.reconnects = 0
        self.up = False
        self.metrics.collect(self.component, self._counters)
        self.bus: can.BusABC | None = None
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def errors(self) -> Counter[str]:
        """Failures by reason (open_failed, bus_error), as the registry counts them."""
        return Counter(self.metrics.labels(f"{self.component}.errors"))

    def _counters(self) -> dict[str, Any]:
        return {"frames": self.frames, "reconnects": self.reconnects}

    def _read(self, bus: can.BusABC) -> None:
        max_frames, max_s = self.cfg.batch_max_frames, self.cfg.batch_max_s
        msgs: list[can.Message] = []
        started = time.monotonic()
        while not self._stop.is_set():
            m = bus.recv(timeout=self.cfg.receive_timeout_s if not msgs else max_s)
            if m is not None:
                msgs.append(m)
            if msgs and (m is None or len(msgs) >= max_frames or time.monotonic() - started >= max_s):
                self.frames += len(msgs)
                self.sink(FrameBatch.from_messages(msgs, self.cfg.name))
                msgs = []
                started = time.monotonic()
            elif not msgs:
                started = time.monotonic()
        if msgs:
            self.frames += len(msgs)
            self.sink(FrameBatch.from_messages(msgs, self.cfg.name))

    def run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                bus = open_bus(self.cfg)
            except Exception as e:  # python-can raises CanError, OSError, ImportError... per interface
                delay = backoff_delay(attempt, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s, self._rng)
                attempt += 1
                self.metrics.error(self.component, "open_failed", detail=f"cannot open {self.cfg.interface} "
                                   f"{self.cfg.channel}: {e} (retrying, next in {delay:.1f}s)")
                self.health.failed("open_failed", e)
                self._stop.wait(delay)
                continue
            self.bus = bus  # visible for status and for tests that pull the plug on it
            self.up = True
            self.health.opened()
            if attempt:
                self.reconnects += 1
            attempt = 0
            try:
                self._read(bus)
            except (can.CanError, OSError, ValueError) as e:
                self.metrics.error(self.component, "bus_error", detail=f"{e}; reopening")
                if not self._stop.is_set():
                    self.health.failed("bus_error", e)
                attempt = 1
            finally:
                self.up = False
                try:
                    bus.shutdown()
                except Exception:
                    log.debug("shutdown failed", exc_info=True)
            if attempt:
                self._stop.wait(self.cfg.reconnect_min_s)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"can-{self.cfg.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
