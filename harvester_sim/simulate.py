"""`harvester-agent simulate`: the simulator alone, on the config's first CAN bus (or served over socketcand on
127.0.0.1, `--socketcand PORT`) and a pty for its GPS."""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import can

from agent.config import AgentConfig

log = logging.getLogger("harvester_sim.simulate")


class SimulateError(ValueError):
    pass


def run_simulator_from_config(
    cfg: AgentConfig, duration_s: float | None, fault: str | None, speed: float, stop: threading.Event,
    socketcand_port: int | None = None,
) -> dict[str, Any]:
    """`socketcand_port`: serve the bus on 127.0.0.1:PORT instead of opening the config's first bus. The bus name
    served is that bus's channel when it is a socketcand bus (one config for both processes), else "can0"."""
    from agent.sources.can import open_bus, virtual_bus_warning
    from harvester_sim import Simulator, sim_from_config
    from harvester_sim.pty import PtyPair
    from harvester_sim.socketcand_server import SocketcandServer

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
    bus: can.BusABC | None = None
    server: SocketcandServer | None = None
    if socketcand_port is not None:
        first = cfg.can[0] if cfg.can else None
        name = first.channel if first is not None and first.interface == "socketcand" else "can0"
        try:
            server = SocketcandServer(socketcand_port, name)
        except (OSError, OverflowError) as e:
            raise SimulateError(f"cannot serve socketcand on 127.0.0.1:{socketcand_port}: {e}") from None
        log.info("serving the simulated bus as %r over socketcand on 127.0.0.1:%d", name, socketcand_port)
    elif cfg.can:
        warning = virtual_bus_warning(cfg.can[:1])
        if warning:
            log.warning("%s", warning)
        try:
            bus = open_bus(cfg.can[0])
        except Exception as e:
            raise SimulateError(f"cannot open CAN bus {cfg.can[0].interface} {cfg.can[0].channel}: {e}") from None
    pty = PtyPair(link=Path(link)) if link else None
    try:
        sim = Simulator(harvester, server if server is not None else bus, pty.write if pty else None, speed=speed)
        stats = sim.run(duration_s, stop)
    finally:
        if bus is not None:
            bus.shutdown()
        if server is not None:
            server.shutdown()
        if pty is not None:
            pty.close()
    out = asdict(stats)
    if server is not None:
        out["socketcand"] = dict(sorted(server.stats.items()))
    if pty is not None:
        out["serial_dropped_bytes"] = pty.dropped_bytes
    return out
