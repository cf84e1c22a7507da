"""`cloud-sync`: the cloud receiver and its reports, a thin face over cloud_sync's Python API."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from agent.clirun import run_cli
from cloud_sync import __version__
from cloud_sync.config import ConfigError, load_config
from cloud_sync.db import CloudDB, CloudDBError


def cmd_serve(args: argparse.Namespace) -> int:
    from cloud_sync.receiver import Receiver

    cfg = load_config(args.config)
    logging.basicConfig(
        level=getattr(logging, cfg.log.level),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    db = CloudDB(cfg.db.path)
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    rx = Receiver(cfg, db)
    try:
        rx.run_forever(stop, args.report_every_s)
    finally:
        db.close()
    logging.getLogger("cloud_sync").info("stopped: %s", dict(rx.stats))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if not cfg.db.path.exists():
        raise CloudDBError(f"{cfg.db.path}: no database yet (cloud-sync serve has not run with this config)")
    db = CloudDB(cfg.db.path)
    try:
        vehicles = db.stats()
        rejected = db.rejected()
    finally:
        db.close()
    if args.json:
        out = [{k: v for k, v in s.to_dict().items() if k != "status"} for s in vehicles]
        print(json.dumps({"vehicles": out, "rejected": rejected}, indent=2))
        return 0
    print(
        f"{'vehicle':24s} {'samples':>10s} {'alerts':>7s} {'events':>7s} {'highest seq':>12s} {'dups':>6s} "
        f"{'gaps':>5s} {'evicted':>8s}  online"
    )
    for s in vehicles:
        ev = sum(hi - lo + 1 for lo, hi in s.evicted)
        print(
            f"{s.fleet + '/' + s.vehicle:24s} {s.records['samples']:10d} {s.records['alerts']:7d} "
            f"{s.records['events']:7d} {s.highest_seq:12d} {s.duplicates:6d} {len(s.gaps):5d} {ev:8d}  "
            f"{'yes' if s.online else 'no'}"
        )
    if rejected:
        print("rejected messages: " + ", ".join(f"{k} {v}" for k, v in sorted(rejected.items())))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cloud-sync",
        description="Receive the harvester fleet's data over MQTT, "
        "store each record exactly once, acknowledge after commit, report on the fleet.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("serve", help="run the receiver until SIGTERM/SIGINT")
    s.add_argument("--config", required=True, help="cloud_sync TOML config (docs/cloud_sync.md)")
    s.add_argument("--report-every-s", type=float, default=60.0, help="progress log period (default 60)")
    s.set_defaults(func=cmd_serve)
    st = sub.add_parser("stats", help="per vehicle: records by kind, highest seq, duplicates dropped, gaps")
    st.add_argument("--config", required=True, help="cloud_sync TOML config")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.set_defaults(func=cmd_stats)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv, (ConfigError, CloudDBError))


if __name__ == "__main__":
    sys.exit(main())
