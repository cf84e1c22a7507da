"""`harvester-agent demo`, added to the agent's command line by this package's entry point (pyproject.toml)."""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.cli import CliError


def cmd_demo(args: argparse.Namespace) -> int:
    from harvester_demo.demo import DemoError, run_demo

    try:
        return run_demo(
            config=Path(args.config) if args.config else None,
            duration_s=args.duration,
            fault=args.fault,
            workdir=Path(args.workdir),
        )
    except DemoError as e:
        raise CliError(str(e)) from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = sub.add_parser("demo", help="run the whole system locally for a minute: broker, cloud, simulator, agent",
                       description="Start Mosquitto, cloud_sync, the simulator with a fault and the agent; show "
                       "progress; print what reached the cloud database. Exits 1 if no alert reached it.")
    d.add_argument("--duration", type=float, default=60.0, help="seconds of simulated driving (default 60)")
    d.add_argument("--fault", default=None, help="fault scenario (default: the demo config's, coolant_leak)")
    d.add_argument("--config", default=None, help="agent config to start from (default docs/examples/demo-agent.toml)")
    d.add_argument("--workdir", default="demo-run", help="folder for the demo's databases, logs and configs")
    d.set_defaults(func=cmd_demo)
