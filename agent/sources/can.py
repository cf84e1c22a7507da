"""CAN source: any python-can interface chosen by name in the config, read in batches.

One wake-up per read, not per frame: the source waits for a frame, then takes everything the interface has queued,
sleeps `read_interval_s` while more arrives and takes that, until the batch holds `batch_max_frames`, is
`batch_max_s` old, or a read finds the bus quiet; then it hands the batch over. How a read takes what is queued
depends on the interface (`open_reader`):

- `socketcan` (a vehicle's bus): a raw socket read with recvmmsg, up to 256 frames per system call, straight into
  columns (agent/sources/rawcan.py). With `options` set, python-can's socketcan bus instead (it knows them).
- `socketcand`: the agent's own client, every frame of a TCP read parsed at once
  (agent/sources/socketcand_reader.py). With options other than `host` and `port`, python-can's client.
- any other python-can interface: `recv(0)` until nothing is pending, then one FrameBatch of the messages
  (agent/sources/pycan.py).

Only that last case imports python-can: a vehicle reading SocketCAN does not load it.

What a reader has to refuse or learns was lost (the kernel's receive-queue overflows, records or elements that are
no frame) is counted under `source.<name>.dropped{reason}` (agent/sources/canframes.py lists the reasons).

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
from typing import TYPE_CHECKING, Any

from agent import numpy_memory
from agent.backoff import backoff_delay
from agent.config import CanBusConfig
from agent.frames import FrameBatch
from agent.metrics import Metrics
from agent.records import Event
from agent.sources.canframes import concat_batches
from agent.sources.canread import FrameReader
from agent.sources.health import SourceHealth

if TYPE_CHECKING:
    import can

log = logging.getLogger("agent.sources.can")


def open_bus(cfg: CanBusConfig) -> can.BusABC:
    """The configured bus as a python-can bus (for sending, as the simulator does, or reading message by message)."""
    import can

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


def open_reader(cfg: CanBusConfig) -> FrameReader:
    """The configured bus opened for the CAN source: the agent's own reader where it has one (module docstring)."""
    if cfg.interface == "socketcan" and not cfg.options:
        from agent.sources.rawcan import RawCanReader, open_socketcan

        return RawCanReader(open_socketcan(cfg.channel), cfg.name)
    if cfg.interface == "socketcand" and set(cfg.options) == {"host", "port"}:
        from agent.sources.socketcand_reader import SocketcandReader

        return SocketcandReader(str(cfg.options["host"]), int(cfg.options["port"]), cfg.channel, cfg.name,
                                cfg.connect_timeout_s)
    from agent.sources.pycan import MessageReader

    return MessageReader(open_bus(cfg), cfg.name)


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
                 metrics: Metrics | None = None, on_event: Callable[[Event], None] | None = None,
                 opener: Callable[[CanBusConfig], FrameReader] | None = None) -> None:
        self.cfg = cfg
        # How the bus is opened: `open_reader`, unless given (a test's reader on a socket standing in for SocketCAN).
        self._open = opener if opener is not None else open_reader
        self.sink = sink
        self.metrics = metrics if metrics is not None else Metrics()
        self.component = f"source.{cfg.name}"
        self.health = SourceHealth(cfg.name, "can", self.metrics, on_event)
        self.frames = 0
        self.reconnects = 0
        self.up = False
        self.metrics.collect(self.component, self._counters)
        self.bus: FrameReader | None = None
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def errors(self) -> Counter[str]:
        """Failures by reason (open_failed, bus_error), as the registry counts them."""
        return Counter(self.metrics.labels(f"{self.component}.errors"))

    def _counters(self) -> dict[str, Any]:
        return {"frames": self.frames, "reconnects": self.reconnects}

    def _read(self, reader: FrameReader) -> None:
        while not self._stop.is_set():
            if not reader.wait(self.cfg.receive_timeout_s):
                continue
            batch, failure = self._fill(reader)
            self._count(reader)
            if len(batch):
                self.frames += len(batch)
                self.sink(batch)
            if failure is not None:
                raise failure

    def _fill(self, reader: FrameReader) -> tuple[FrameBatch, Exception | None]:
        """One batch, and the failure that ended it early (after its frames are handed over, the bus is reopened).
        Between reads the thread sleeps: the interface queues what arrives meanwhile."""
        cfg = self.cfg
        deadline = time.monotonic() + cfg.batch_max_s
        parts = [reader.drain(cfg.batch_max_frames)]
        n = len(parts[0])
        failure: Exception | None = None
        while n < cfg.batch_max_frames:
            left = deadline - time.monotonic()
            if left <= 0 or self._stop.wait(min(left, cfg.read_interval_s)):
                break
            try:
                more = reader.drain(cfg.batch_max_frames - n)
            except (OSError, ValueError) as e:
                failure = e
                break
            if not len(more):  # the bus fell quiet: no reason to hold what we have
                break
            parts.append(more)
            n += len(more)
        return concat_batches(parts, cfg.name), failure

    def _count(self, reader: FrameReader) -> None:
        if reader.dropped:
            for reason, k in reader.dropped.items():
                self.metrics.drop(self.component, reason, k, f"CAN bus {self.cfg.name}")
            reader.dropped.clear()
        if reader.errors:
            for reason, k in reader.errors.items():
                self.metrics.error(self.component, reason, k, f"CAN bus {self.cfg.name}")
            reader.errors.clear()

    def run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                bus = self._open(self.cfg)
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
            except (OSError, ValueError) as e:
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
        self._thread = numpy_memory.thread(self.run, f"can-{self.cfg.name}")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
