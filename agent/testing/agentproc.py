"""A whole agent in a child process, fed by the simulator on an in-process virtual bus, for kill -9 tests.
Run: python -m agent.testing.agentproc CONFIG SPEED. Prints "ready" once started; runs until killed."""

from __future__ import annotations

import sys
import threading

import can

from agent.config import load_config
from agent.service import Agent
from agent.sim import Harvester, Simulator


def main() -> None:
    cfg = load_config(sys.argv[1])
    speed = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    agent = Agent(cfg)
    agent.start()
    bus = can.Bus(interface="virtual", channel=cfg.can[0].channel, preserve_timestamps=True)
    print("ready", flush=True)
    Simulator(Harvester(seed=5, fault="oil_pump_wear", fault_ramp_s=30), bus, None, speed=speed).run(
        None, threading.Event())


if __name__ == "__main__":
    main()
