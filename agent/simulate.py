"""`harvester-agent simulate`: the simulator alone, on the config's first CAN bus and a pty for its GPS."""

from __future__ import annotations

import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from agent.config import AgentConfig


class SimulateError(ValueError):
    pass


def run_simulator_from_config(
    cfg: AgentConfig, duration_s: float | None, fault: str | None, speed: float, stop: threading.Event
) -> dict[str, Any]:
    from agent.sim import Simulator, sim_from_config
    from agent.sources.can import open_bus
    from agent.testing.pty import PtyPair

    sim_cfg = dict(cfg.sim)
    link = sim_cfg.pop("serial_link", None) or (cfg.serial[0].port if cfg.serial else None)
    if fault:
        sim_cfg["fault"] = fault
    try:
        harvester = sim_from_config(sim_cfg)
    except ValueError as e:
        raise SimulateError(f"[sim] {e}") from None
    if speed <= 0:
        raise SimulateError("--speed must be positive")
    bus = None
    if cfg.can:
        try:
            bus = open_bus(cfg.can[0])
        except Exception as e:
            raise SimulateError(f"cannot open CAN bus {cfg.can[0].interface} {cfg.can[0].channel}: {e}") from None
    pty = PtyPair(link=Path(link)) if link else None
    try:
        sim = Simulator(harvester, bus, pty.write if pty else None, speed=speed)
        stats = sim.run(duration_s, stop)
    finally:
        if bus is not None:
            bus.shutdown()
        if pty is not None:
            pty.close()
    out = asdict(stats)
    if pty is not None:
        out["serial_dropped_bytes"] = pty.dropped_bytes
    return out
