"""The simulator in real time: frames onto a python-can bus at their due time, NMEA onto a serial pty."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import can

from harvester_sim.j1939_tx import J1939Transmitter
from harvester_sim.nmea_tx import nmea_sentences
from harvester_sim.physics import DUTY_CYCLES, FAULTS, STARTS, Harvester

SIM_KEYS = ("seed", "fault", "fault_onset_s", "fault_ramp_s", "duty", "ambient_c", "start")


@dataclass(slots=True)
class SimStats:
    sim_seconds: float = 0.0
    frames_sent: int = 0
    send_errors: int = 0
    nmea_sentences: int = 0
    dtcs_active_at_end: int = 0


class FrameSink(Protocol):
    """Where the simulator sends frames: a python-can bus, or the socketcand server (socketcand_server)."""

    def send(self, msg: can.Message, timeout: float | None = None) -> None: ...


def sim_from_config(cfg: dict[str, Any]) -> Harvester:
    """A Harvester from a `[sim]` table; ValueError naming the bad key otherwise."""
    unknown = sorted(set(cfg) - set(SIM_KEYS))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (known: {', '.join(SIM_KEYS)})")
    fault = cfg.get("fault") or None
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"fault: unknown fault {fault!r} (known: {', '.join(FAULTS)})")
    duty = cfg.get("duty", "harvest")
    if duty not in DUTY_CYCLES:
        raise ValueError(f"duty: unknown duty cycle {duty!r} (known: {', '.join(DUTY_CYCLES)})")
    kw: dict[str, Any] = {}
    if "start" in cfg:
        if cfg["start"] not in STARTS:
            raise ValueError(f"start: unknown start {cfg['start']!r} (known: {', '.join(STARTS)})")
        kw["start"] = cfg["start"]
    for key, typ in (("seed", int), ("fault_onset_s", float), ("fault_ramp_s", float), ("ambient_c", float)):
        if key in cfg:
            v = cfg[key]
            if isinstance(v, bool) or not isinstance(v, int | float) or (typ is int and not isinstance(v, int)):
                raise ValueError(f"{key}: expected a {typ.__name__}, got {v!r}")
            kw[key] = typ(v)
    if kw.get("fault_ramp_s", 1.0) <= 0:
        raise ValueError("fault_ramp_s: must be positive")
    return Harvester(fault=fault, duty=duty, **kw)


class Simulator:
    def __init__(
        self,
        harvester: Harvester,
        bus: FrameSink | None,
        serial_write: Callable[[bytes], None] | None,
        speed: float = 1.0,
        nmea_period_s: float = 1.0,
    ) -> None:
        self.h = harvester
        self.tx = J1939Transmitter(harvester)
        self.bus = bus
        self.serial_write = serial_write
        self.speed = speed
        self.nmea_period_s = nmea_period_s
        self.stats = SimStats()

    def run(self, duration_s: float | None, stop: threading.Event, start_ts: float | None = None) -> SimStats:
        """Send until `duration_s` of simulated time (None: until `stop`). Frames carry `start + sim time` as
        their timestamp, so at speed > 1 the data's own clock stays physically right (a bus created with
        `preserve_timestamps=True` passes it on). `start_ts`: the data clock's start (Unix s; default now): a
        machine run again after a faster-than-life run goes on from where its data ended, not back in time."""
        t0 = time.monotonic()
        wall0 = time.time() if start_ts is None else start_ts
        next_nmea = 0.0
        while not stop.is_set():
            sim_t = (time.monotonic() - t0) * self.speed
            if duration_s is not None:
                sim_t = min(sim_t, duration_s)
            for msg in self.tx.frames_until(sim_t):
                if self.bus is None:
                    continue
                msg.timestamp += wall0
                try:
                    self.bus.send(msg)
                    self.stats.frames_sent += 1
                except can.CanError:
                    self.stats.send_errors += 1
            if self.serial_write is not None and sim_t >= next_nmea:
                lines = nmea_sentences(self.h.gps(), datetime.now(UTC))
                self.serial_write("".join(lines).encode())
                self.stats.nmea_sentences += len(lines)
                next_nmea += self.nmea_period_s
            self.stats.sim_seconds = sim_t
            if duration_s is not None and sim_t >= duration_s:
                break
            stop.wait(0.005)
        self.stats.dtcs_active_at_end = len(self.h.active_dtcs())
        return self.stats
