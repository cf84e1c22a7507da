"""`harvester-agent simulate`, added to the agent's command line by this package's entry point (pyproject.toml)."""

from __future__ import annotations

import argparse
import json

from agent.cli import CliError, port_number, setup_logging, stop_on_signals
from agent.config import load_config


def cmd_simulate(args: argparse.Namespace) -> int:
    from harvester_sim.simulate import SimulateError, run_simulator_from_config

    cfg = load_config(args.config)
    setup_logging(cfg.log.level)
    stop = stop_on_signals()
    try:
        stats = run_simulator_from_config(cfg, args.duration, args.fault, args.speed, stop, args.socketcand)
    except SimulateError as e:
        raise CliError(str(e)) from None
    print(json.dumps(stats, indent=2) if args.json else
          ", ".join(f"{k} {v}" for k, v in stats.items()))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("simulate", help="run the harvester simulator alone on the configured bus and serial pty",
                       description="Put simulated J1939 traffic on the config's first CAN bus (or serve it over "
                       "socketcand on 127.0.0.1 with --socketcand) and NMEA on a pty linked at [sim] serial_link "
                       "(default: the config's first serial port).")
    s.add_argument("--config", required=True, help="agent TOML config; its [sim] table sets the scenario")
    s.add_argument("--duration", type=float, default=None, help="seconds to run (default: until stopped)")
    s.add_argument("--fault", default=None, help="switch a fault on (overrides [sim] fault)")
    s.add_argument("--speed", type=float, default=1.0, help="time factor, 2 = twice real time (default 1)")
    s.add_argument("--socketcand", type=port_number, default=None, metavar="PORT",
                   help="serve the bus over the socketcand protocol on 127.0.0.1:PORT instead of opening the "
                   "config's bus (for an agent in another process: interface = \"socketcand\")")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(func=cmd_simulate)
