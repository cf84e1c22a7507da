"""A whole agent in a child process fed a flapping DTC on an in-process virtual bus, for kill -9 tests of the DTC
debouncer (tests/test_dtc_storm.py).
Run: python -m harvester_testing.flapproc CONFIG

Every `DM1_PERIOD_S` of wall time two controllers send a DM1 each (the frame's timestamp is the wall clock, so the
agent's data clock is the wall clock too): the engine (SA 0x00) with DTC `STEADY` always, the transmission (SA 0x03)
with DTC `FLAPPING` while `flapping_open(t)`, which toggles every `TOGGLE_S`. Being a function of the wall clock,
the flapping DTC's changes over any stretch of time are known to the test, whichever processes were alive. Prints
"ready" once started; runs until killed, or until SIGTERM, which stops the flapping (the DTC clears and stays
cleared for `SETTLE_S`) and then stops the agent cleanly as `harvester-agent run` does (then "stopped")."""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from typing import Any

import can

from agent.config import load_config
from agent.decode.j1939_id import make_id
from agent.decode.j1939_tp import PGN_DM1, Dtc
from agent.service import Agent
from harvester_sim import encode_dm1

DM1_PERIOD_S = 0.05
TOGGLE_S = 0.25
SETTLE_S = 0.6
STEADY = Dtc(111, 1, 1)
FLAPPING = Dtc(110, 0, 1)


def flapping_open(t: float) -> bool:
    return math.floor(t / TOGGLE_S) % 2 == 0


def transitions_between(t0: float, t1: float) -> int:
    """How often the flapping DTC changed state in [t0, t1]: the most any observer can see."""
    return math.floor(t1 / TOGGLE_S) - math.floor(t0 / TOGGLE_S)


def _dm1s(t: float, flapping: bool) -> list[can.Message]:
    """One single-frame DM1 per controller: the engine (SA 0x00) with the steady DTC, the transmission (SA 0x03)
    with the flapping one while it is active (an empty DM1 otherwise)."""
    sources = ((0x00, [STEADY]), (0x03, [FLAPPING] if flapping else []))
    return [can.Message(timestamp=t, arbitration_id=make_id(PGN_DM1, sa, 6), is_extended_id=True,
                        data=encode_dm1(dtcs)) for sa, dtcs in sources]


def main() -> None:
    cfg = load_config(sys.argv[1])
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent = Agent(cfg)
    agent.start()
    bus = can.Bus(interface="virtual", channel=cfg.can[0].channel, preserve_timestamps=True)
    print("ready", flush=True)
    while not stop.is_set():
        now = time.time()
        for m in _dm1s(now, flapping_open(now)):
            bus.send(m)
        stop.wait(DM1_PERIOD_S)
    settle = time.time() + SETTLE_S
    while time.time() < settle:
        for m in _dm1s(time.time(), False):
            bus.send(m)
        time.sleep(DM1_PERIOD_S)
    time.sleep(0.3)  # the last frames through the pipeline before the sources stop
    agent.stop(drain_s=0.5)
    bus.shutdown()
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
