"""A whole agent in a child process, fed by the simulator on an in-process virtual bus, for kill -9 tests.
Run: python -m harvester_testing.agentproc CONFIG SPEED [FAULT_RAMP_S [FAULT]] (FAULT `none`: a healthy harvester).
Prints "ready" once started; runs until killed, or until SIGTERM/SIGINT, which stops the agent cleanly as
`harvester-agent run` does (then "stopped")."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import can

from agent.config import load_config
from agent.service import Agent
from harvester_sim import Harvester, Simulator


def main() -> None:
    cfg = load_config(sys.argv[1])
    speed = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    ramp = float(sys.argv[3]) if len(sys.argv) > 3 else 30.0
    fault: str | None = sys.argv[4] if len(sys.argv) > 4 else "oil_pump_wear"
    if fault == "none":
        fault = None
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent = Agent(cfg)
    agent.start()
    bus = can.Bus(interface="virtual", channel=cfg.can[0].channel, preserve_timestamps=True)
    print("ready", flush=True)
    Simulator(Harvester(seed=5, fault=fault, fault_ramp_s=ramp), bus, None, speed=speed).run(None, stop)
    agent.stop(drain_s=0.5)
    bus.shutdown()
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
