"""Serial source: lines from a serial device (NMEA GPS, line-protocol sensors) via pyserial.

A device that is missing or disappears (USB unplug) is retried with backoff; lines longer than the configured
maximum are cut off and counted, never allowed to grow memory. An outage is told to the cloud as a `source_down`
event and its end as `source_up` (agent/sources/health.py).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import serial

from agent import numpy_memory
from agent.backoff import backoff_delay
from agent.config import SerialConfig
from agent.metrics import Metrics
from agent.records import Event
from agent.sources.health import SourceHealth


class SerialSource:
    def __init__(
        self, cfg: SerialConfig, sink: Callable[[str, list[tuple[float, bytes]]], None], seed: int | None = None,
        metrics: Metrics | None = None, on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self._rng = random.Random(seed)
        self.cfg = cfg
        self.sink = sink
        self.metrics = metrics if metrics is not None else Metrics()
        self.component = f"source.{cfg.name}"
        self.health = SourceHealth(cfg.name, "serial", self.metrics, on_event)
        self.lines = 0
        self.reconnects = 0
        self.up = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.metrics.collect(self.component, self._counters)

    @property
    def errors(self) -> Counter[str]:
        """Failures by reason (open_failed, device_lost, line_too_long), as the registry counts them."""
        return Counter(self.metrics.labels(f"{self.component}.errors"))

    def _counters(self) -> dict[str, Any]:
        return {"lines": self.lines, "reconnects": self.reconnects}

    def _read(self, port: serial.Serial) -> None:
        buf = bytearray()
        while not self._stop.is_set():
            chunk = port.read(max(1, port.in_waiting))
            if not chunk:
                continue
            buf += chunk
            lines: list[tuple[float, bytes]] = []
            now = time.time()
            while True:
                i = buf.find(b"\n")
                if i < 0:
                    break
                line = bytes(buf[:i]).rstrip(b"\r")
                del buf[: i + 1]
                if len(line) > self.cfg.max_line_bytes:
                    self._too_long()
                    continue
                if line:
                    lines.append((now, line))
            if len(buf) > self.cfg.max_line_bytes:
                self._too_long()
                buf.clear()
            if lines:
                self.lines += len(lines)
                self.sink(self.cfg.name, lines)

    def _too_long(self) -> None:
        self.metrics.error(self.component, "line_too_long", detail=f"a line longer than {self.cfg.max_line_bytes} "
                           "bytes was cut off")

    def run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                port = serial.Serial(self.cfg.port, self.cfg.baudrate, timeout=self.cfg.read_timeout_s)
            except (serial.SerialException, OSError, ValueError) as e:
                self.metrics.error(self.component, "open_failed", detail=f"cannot open {self.cfg.port}: {e} (retrying)")
                self.health.failed("open_failed", e)
                delay = backoff_delay(attempt, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s, self._rng)
                attempt += 1
                self._stop.wait(delay)
                continue
            self.up = True
            self.health.opened()
            if attempt:
                self.reconnects += 1
            attempt = 0
            try:
                self._read(port)
            except (serial.SerialException, OSError) as e:
                self.metrics.error(self.component, "device_lost", detail=f"{e}; reopening")
                if not self._stop.is_set():
                    self.health.failed("device_lost", e)
                attempt = 1
            finally:
                self.up = False
                port.close()
            if attempt:
                self._stop.wait(self.cfg.reconnect_min_s)

    def start(self) -> None:
        self._thread = numpy_memory.thread(self.run, f"serial-{self.cfg.name}")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
