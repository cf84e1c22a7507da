"""Serial source: lines from a serial device (NMEA GPS, line-protocol sensors) via pyserial.

A device that is missing or disappears (USB unplug) is retried with backoff; lines longer than the configured
maximum are cut off and counted, never allowed to grow memory.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable

import serial

from agent.backoff import backoff_delay
from agent.config import SerialConfig

log = logging.getLogger("agent.sources.serial")


class SerialSource:
    def __init__(
        self, cfg: SerialConfig, sink: Callable[[str, list[tuple[float, bytes]]], None], seed: int | None = None
    ) -> None:
        self._rng = random.Random(seed)
        self.cfg = cfg
        self.sink = sink
        self.errors: Counter[str] = Counter()
        self.lines = 0
        self.reconnects = 0
        self.up = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
                    self.errors["line_too_long"] += 1
                    continue
                if line:
                    lines.append((now, line))
            if len(buf) > self.cfg.max_line_bytes:
                self.errors["line_too_long"] += 1
                buf.clear()
            if lines:
                self.lines += len(lines)
                self.sink(self.cfg.name, lines)

    def run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                port = serial.Serial(self.cfg.port, self.cfg.baudrate, timeout=self.cfg.read_timeout_s)
            except (serial.SerialException, OSError, ValueError) as e:
                self.errors["open_failed"] += 1
                delay = backoff_delay(attempt, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s, self._rng)
                attempt += 1
                if attempt <= 3 or attempt % 20 == 0:
                    log.warning("%s: cannot open %s: %s (retrying)", self.cfg.name, self.cfg.port, e)
                self._stop.wait(delay)
                continue
            self.up = True
            if attempt:
                self.reconnects += 1
            attempt = 0
            try:
                self._read(port)
            except (serial.SerialException, OSError) as e:
                self.errors["device_lost"] += 1
                log.warning("%s: device lost: %s; reopening", self.cfg.name, e)
                attempt = 1
            finally:
                self.up = False
                port.close()
            if attempt:
                self._stop.wait(self.cfg.reconnect_min_s)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"serial-{self.cfg.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
