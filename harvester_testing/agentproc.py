"""A whole agent in a child process, fed by the simulator on an in-process virtual bus, for kill -9 tests.
Run: python -m harvester_testing.agentproc CONFIG SPEED [FAULT_RAMP_S [FAULT [SEED [FAULT_ONSET_S [START_TS]]]]] (FAULT
`none`: a healthy harvester; SEED 5, onset 0 and the data clock starting now unless given).
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
    seed = int(sys.argv[5]) if len(sys.argv) > 5 else 5
    onset = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
    start_ts = float(sys.argv[7]) if len(sys.argv) > 7 else None
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent = Agent(cfg)
    agent.start()
    bus = can.Bus(interface="virtual", channel=cfg.can[0].channel, preserve_timestamps=True)
    print("ready", flush=True)
    harvester = Harvester(seed=seed, fault=fault, fault_ramp_s=ramp, fault_onset_s=onset)
    Simulator(harvester, bus, None, speed=speed).run(None, stop, start_ts)
    agent.stop(drain_s=0.5)
    bus.shutdown()
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
