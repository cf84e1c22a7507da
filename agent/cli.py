"""`harvester-agent`: a thin command-line face over the agent's Python API.

Errors the user can fix (bad config, missing file) are one line on stderr and exit status 2; no tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import AgentConfig, ConfigError, load_config
from agent.update.cli import add_commands as add_model_commands
from harvester_common import wire
from harvester_common.clirun import run_cli


class CliError(Exception):
    """A one-line error for the user."""


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def cmd_run(args: argparse.Namespace) -> int:
    from agent.keepout import keep_out

    late = keep_out()  # before anything below imports python-can
    from agent.decode.j1939 import DbcError
    from agent.service import Agent
    from agent.sources.can import virtual_bus_warning
    from agent.uplink import TlsError

    cfg = load_config(args.config)
    if args.check_config:
        return _check_config(cfg, Path(args.config), args.allow_absent)
    if args.allow_absent:
        raise CliError("--allow-absent goes with --check-config only")
    setup_logging(cfg.log.level)
    if late:
        logging.getLogger("agent").warning("replay-only modules were loaded before `run` started: %s", late)
    warning = virtual_bus_warning(cfg.can)
    if warning:
        logging.getLogger("agent").warning("%s", warning)
    try:
        agent = Agent(cfg)
    except (DbcError, TlsError) as e:
        raise CliError(str(e)) from None
    stop = stop_on_signals()
    agent.start()
    try:
        # Short waits: the kernel may hand SIGTERM to any thread, and Python runs the handler only when the main
        # thread wakes; a long wait could outlast systemd's TimeoutStopSec (seen under strace).
        next_report = time.monotonic() + cfg.log.report_every_s
        while not stop.wait(0.5):
            if time.monotonic() < next_report:
                continue
            next_report += cfg.log.report_every_s
            p = agent.progress()
            logging.getLogger("agent").info(
                "frames %d (%.0f/s), windows %d, alerts %d, backlog %d, synced %d, %s",
                p.frames, p.frames_per_s, p.windows_scored, p.alerts_opened, p.backlog, p.synced,
                "connected" if p.connected else "offline",
            )
    finally:
        agent.stop(drain_s=args.drain_s)
    return 0


def _check_config(cfg: AgentConfig, path: Path, allow_absent: bool) -> int:
    from agent.preflight import check

    # Loading the model and the DBCs may log (onnxruntime, cantools): at WARNING, so that findings stay readable.
    setup_logging("WARNING")
    report = check(cfg, path, allow_absent)
    for f in report.findings:
        print(f.line())
    if report.errors:
        sys.stdout.flush()
        raise CliError(report.verdict())
    print(report.verdict())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from agent.store import StoreError, StoreLocked, read_status

    cfg = load_config(args.config)
    if not cfg.store.path.exists():
        raise CliError(f"{cfg.store.path}: no store yet (the agent has not run with this config)")
    # Read-only: the agent may be running on this file. Never migrate, checkpoint or move it aside from here.
    try:
        st = read_status(cfg.store.path, cfg.store.max_bytes, args.wait_s)
    except StoreLocked as e:
        raise CliError(f"{e} (still locked after waiting {args.wait_s:g} s; try again)") from None
    except StoreError as e:
        raise CliError(str(e)) from None
    st["vehicle"] = cfg.vehicle.id
    st["fleet"] = cfg.vehicle.fleet
    st["model"] = _model_view(cfg)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"vehicle          {cfg.vehicle.fleet}/{cfg.vehicle.id}")
    print(f"store            {st['path']} ({st['used_bytes'] / 1e6:.1f} of {st['max_bytes'] / 1e6:.0f} MB)")
    w = st["records_written"]
    print(f"records written  {w['samples']} samples, {w['records']} alerts/events")
    for kind in ("alerts", "events"):
        if st[f"{kind}_written"] is None:
            print(f"{kind:17s}not counted apart by this store's schema ({st['schema_version']})")
        else:
            print(f"{kind:17s}{st[f'{kind}_written']} written, {st[f'{kind}_acked']} acked, "
                  f"{st[f'{kind}_evicted']} evicted (since seq {st['kind_counts_from_seq']})")
    print(f"highest seq      {st['highest_seq']}")
    print(f"last acked seq   {st['last_acked_seq']}")
    ev = st["evicted"]
    print(f"evicted          {ev['samples']} samples, {ev['records']} records in {ev['evictions']} evictions")
    print("backlog          " + (", ".join(f"{k}: {v['records']}" for k, v in sorted(st["backlog"].items()))
                                  or "empty"))
    print_model_view(st["model"])
    if st["metrics"] is None:
        print(f"counters         none saved yet (the agent saves them every {cfg.mqtt.status_interval_s:g} s and "
              "when it stops)")
    else:
        age = st["metrics_age_s"]
        nonzero = wire.status_counters(st["metrics"])
        saved = f"saved {age:.0f} s ago" if age is not None else "saved at an unknown time"
        print(f"counters         {saved}" + ("" if nonzero else ", all zero"))
        for name, n in sorted(nonzero.items()):
            print(f"  {name:56s} {n}")
    return 0


def _model_view(cfg: AgentConfig) -> dict[str, Any]:
    from agent.config import model_dir
    from agent.update.modeldir import read_view

    return read_view(model_dir(cfg))


def print_model_view(m: dict[str, Any]) -> None:
    """The model directory's pointer and the update's latest step (agent/update/modeldir.py, `read_view`)."""

    def name(ref: dict[str, Any] | None) -> str:
        if ref is None:
            return "none"
        where = f"package {ref['package'][:12]}" if ref["package"] else "the installed model"
        return f"{ref['name']} {ref['version']} ({where})"

    if m["active"] is None:
        print(f"model            the installed model ([model] path; no update in {m['dir']})")
    else:
        print(f"model            {name(m['active'])}, previous {name(m['previous'])}")
    step = m["step"]
    if step is not None:
        target = step.get("target") or {}
        what = f" {target.get('name', '')} {target.get('version', '')}" if target else ""
        health = {None: " (watched)", True: " (healthy)", False: " (unhealthy)"}.get(step.get("healthy")) \
            if step.get("state") == "active" else ""
        reason = f": {step['reason']}" if step.get("reason") else ""
        print(f"model step       {step.get('state')}{what}{health}, seq {step.get('seq')}{reason}")
    for e in m["errors"]:
        print(f"model dir        unreadable: {e}")


def cmd_replay(args: argparse.Namespace) -> int:
    from agent.contract import ContractError
    from agent.decode.j1939 import DbcError
    from agent.replay import ReplayError, replay
    from agent.scoring import ModelLoadError

    model = None if args.no_model else Path(args.model)
    try:
        out = replay([Path(p) for p in args.logs], [Path(d) for d in args.dbc], Path(args.db) if args.db else None,
                     model, progress=sys.stderr.isatty() and not args.json)
    except (ReplayError, DbcError, ModelLoadError, ContractError) as e:
        raise CliError(str(e)) from None
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{out['frames']} frames in {out['seconds']:.2f} s ({out['frames_per_s']:.0f} frames/s) on "
          f"{', '.join(out['buses']) or 'no bus'}")
    print(f"decoded {out['frames_decoded']}, unknown {out['frames_unknown']}, samples {out['samples']}, "
          f"DTC events {out['dtc_events']} ({out['dtc_events_merged']} merged into summaries), "
          f"windows {out['windows']} (scored {out['windows_scored']}), "
          f"alerts {out['alerts']}")
    _print_not_scored(out)
    if out["errors"]:
        print("counted: " + ", ".join(f"{k} {v}" for k, v in out["errors"].items()))
    for name, st in list(out["signals"].items())[:40]:
        print(f"  {name:48s} {st['count']:9d}  {st['min']:12.3f} .. {st['max']:.3f}")
    if len(out["signals"]) > 40:
        print(f"  ... {len(out['signals']) - 40} more signals (--json lists all)")
    return 0


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"port out of range 1..65535: {port}")
    return port


def _print_not_scored(out: dict[str, Any]) -> None:
    """Why windows were not scored (features missing) or not turned into alerts (unfamiliar)."""
    ns = out["windows_not_scored"]
    if not out["model"] or out["windows"] == out["windows_scored"]:
        return
    print(f"windows not scored, features missing: {ns['missing_features']}; unfamiliar (outside what the model "
          f"was trained on, never alerted on): {ns['unfamiliar']}")
    req = set(out["required_features"])
    missing = sorted(out["missing_features"].items(), key=lambda kv: (kv[0] not in req, -kv[1], kv[0]))
    if missing:
        print("  missing in windows: " + ", ".join(
            f"{k}{' (required)' if k in req else ''} {v}" for k, v in missing))
    if out["unfamiliar_features"]:
        print("  outside the training range in windows: " + ", ".join(
            f"{k} {v}" for k, v in out["unfamiliar_features"].items()))


def vehicle_signals(cfg: AgentConfig) -> set[str]:
    """The signals `run` would decode with this config: its sources' decoders, built as agent/service.py does."""
    from agent.decode.j1939 import DbcError
    from agent.service import decoders_for
    from agent.signals import SignalRegistry

    try:
        decoders = decoders_for(cfg, SignalRegistry())
    except DbcError as e:
        raise CliError(str(e)) from None
    return set().union(*(d.signals() for d in decoders.values()))


# Commands that other packages add to `harvester-agent` when they are installed, through this entry-point group: the
# simulator's `simulate` (harvester-sim) and the demo's `demo` (harvester-demo). A vehicle's install ships neither,
# and the agent never imports them (import contracts in pyproject.toml); where one is missing its name still
# parses and says where it comes from, instead of argparse's "invalid choice".
COMMAND_GROUP = "harvester_agent.commands"
OPTIONAL_COMMANDS = {"simulate": "harvester-sim", "demo": "harvester-demo"}

def add_plugin_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser], command: str | None = None) -> None:
    """`command`: the one named on this command line (None: none yet, e.g. `--help`, so every plugin is loaded to
    list its help). Only that plugin is imported: `run` on a machine with the simulator installed must not load it,
    nor what it imports (python-can's file readers, asammdf and pandas with the MF4 extra)."""
    found: set[str] = set()
    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        found.add(ep.name)
        if command is not None and ep.name != command:
            _unavailable(sub, ep.name, "was not loaded (name it first on the command line)")
            continue
        try:
            register: Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None] = ep.load()
            register(sub)
        except Exception as e:  # a broken plugin must not take `run` or `status` down with it
            _unavailable(sub, ep.name, f"cannot be loaded ({ep.value}: {type(e).__name__}: {e})")
    for name, dist in OPTIONAL_COMMANDS.items():
        if name not in found:
            _unavailable(sub, name, f"comes with the {dist} package, which is not installed here (a vehicle's "
                         "install does not ship it; `.ci/quickstart demo` sets up a machine that has it)")


def _unavailable(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, why: str) -> None:
    def fail(args: argparse.Namespace) -> int:
        raise CliError(f"`{name}` {why}")

    # No option prefix: whatever follows the command (`--config x.toml`...) is taken as words, not refused as
    # options, so the user sees why the command is missing rather than a usage error.
    p = sub.add_parser(name, help=f"(not available here: {why.split(' (')[0]})", add_help=False, prefix_chars="\x00")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=fail)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="harvester-agent",
        description="Edge agent for orange harvesters: reads CAN (J1939) and serial sensors, scores windows with "
        "an ONNX model, buffers everything in SQLite and syncs it to the cloud over MQTT.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run the agent in the foreground (as systemd does)",
                       description="Run the agent until SIGTERM/SIGINT; then flush the store and stop cleanly.")
    r.add_argument("--config", required=True, help="agent TOML config (docs/configuration.md)")
    r.add_argument("--drain-s", type=float, default=None,
                   help="at stop, how long to keep sending the backlog before closing (default: the config's "
                   "[mqtt] stop_drain_s)")
    r.add_argument("--check-config", action="store_true",
                   help="load and check the config and the files it names (DBCs, model and its contract, TLS) as "
                   "run would, print one line per finding, and exit: 0 if the agent would run as configured, 2 "
                   "with the reason otherwise. Starts nothing")
    r.add_argument("--allow-absent", action="store_true",
                   help="with --check-config: files the config names that do not exist on this machine are "
                   "reported as not present and not checked, and do not fail the check (a config checked before "
                   "it is installed)")
    r.set_defaults(func=cmd_run)

    st = sub.add_parser("status", help="report what the store holds",
                        description="Records written and acknowledged (alerts and events apart), highest sequence "
                        "number, backlog by kind, last acknowledged; the model scoring and the model update's latest "
                        "step. Reads the store and the model directory read-only, beside a running agent."
                        )
    st.add_argument("--config", required=True, help="agent TOML config")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.add_argument("--wait-s", type=float, default=5.0,
                    help="while the running agent holds the store locked, retry this long (default 5)")
    st.set_defaults(func=cmd_status)

    rp = sub.add_parser("replay", help="run recorded CAN logs through the on-vehicle pipeline, as fast as it goes",
                        description="Decode, window, score and store recorded logs (candump -L, ASC, BLF, TRC, CSV; "
                        "MF4 with asammdf) exactly as the vehicle would, and print a summary.")
    rp.add_argument("logs", nargs="+", metavar="LOG", help="log files")
    rp.add_argument("--dbc", action="append", default=[], help="extra DBC, merged by PGN over the built-in one "
                    "(repeatable)")
    rp.add_argument("--db", default=None, help="keep the resulting store here (default: a temporary one)")
    rp.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "models" /
                                          "harvester-anomaly.int8.onnx"), help="model to score with")
    rp.add_argument("--no-model", action="store_true", help="decode and store only")
    rp.add_argument("--json", action="store_true", help="print one JSON object")
    rp.set_defaults(func=cmd_replay)

    m = sub.add_parser("model", help="signed model packages: check one as this vehicle would",
                       description="Signed model packages (docs/models.md, \"Signed packages\").")
    add_model_commands(m.add_subparsers(dest="model_command", required=True, metavar="MODEL_COMMAND"),
                       vehicle_signals)

    add_plugin_commands(sub, command)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    command = next((w for w in words if not w.startswith("-")), None)  # the top level has options only before it
    return run_cli(build_parser(command), argv, (ConfigError, CliError))


if __name__ == "__main__":
    sys.exit(main())
