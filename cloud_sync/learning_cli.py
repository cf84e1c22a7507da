"""`cloud-sync alerts verdict|history`, `cloud-sync breakdown add|list` and `cloud-sync quality`: the learning loop
for the mechanic and the fleet engineer (docs/cloud_sync.md, "The learning loop"; the design:
docs/learning_loop.md).

A verdict or breakdown refused for what it holds is one line and exit status 2 (LearningError); nothing is stored
then. Times are ISO 8601 or Unix seconds (cloud_sync/times.py), the same here as on the fleet page.
"""

from __future__ import annotations

import argparse
from typing import Any

from cloud_sync import learning as lr
from cloud_sync.config import load_config
from cloud_sync.database import read_db
from cloud_sync.db import Breakdown, FleetDB, Verdict
from cloud_sync.present import dumps, terminal
from cloud_sync.reports import Reports
from cloud_sync.rollout_cli import current_user
from cloud_sync.times import TimeError, format_time, parse_time


def _time(text: str) -> float:
    try:
        return parse_time(text)
    except TimeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# --- verdicts --------------------------------------------------------------------------------------------------


def cmd_verdict(args: argparse.Namespace) -> int:
    def record(db: FleetDB) -> tuple[Verdict, list[Verdict]]:
        v = db.add_verdict(args.alert_id, args.label, fault=args.fault, note=args.note or "",
                           by=args.by if args.by is not None else current_user(), vehicle=args.vehicle)
        return v, db.verdict_history(v.alert_id, v.vehicle)[1]

    v, history = read_db(args.config, record)
    before = [h for h in history if h.id < v.id]
    was = ""
    if before:
        p = before[-1]
        was = f"; it replaces {terminal(p.label)} (by {terminal(p.by)}, {format_time(p.at)} UTC)"
    print(f"verdict {v.id} on alert {terminal(v.alert_id)} ({terminal(v.vehicle)}): {_verdict_text(v)}{was}")
    return 0


def _verdict_text(v: Verdict) -> str:
    return terminal(v.label) + (f", fault {terminal(v.fault)}" if v.fault else "") + f", by {terminal(v.by)}"


def cmd_history(args: argparse.Namespace) -> int:
    vehicle, history = read_db(args.config, lambda db: db.verdict_history(args.alert_id, args.vehicle))
    if args.json:
        print(dumps({"vehicle": vehicle, "alert_id": args.alert_id,
                     "verdict": history[-1].to_dict() if history else None,
                     "history": [h.to_dict() for h in history]}))
        return 0
    what = f"alert {terminal(args.alert_id)} on {terminal(vehicle)}"
    if not history:
        print(f"{what}: no verdict yet")
        return 0
    print(f"{what}: {terminal(history[-1].label)} now ({len(history)} verdict{'s' if len(history) > 1 else ''})")
    print(f"{'#':>5s}  {'at (UTC)':19s}  {'by':16s} {'label':12s} {'fault':20s} note")
    for h in history:
        print(f"{h.id:5d}  {format_time(h.at):19s}  {terminal(h.by):16s} {terminal(h.label):12s} "
              f"{terminal(h.fault or '-'):20s} {terminal(h.note)}")
    return 0


# --- breakdowns ------------------------------------------------------------------------------------------------


def cmd_breakdown_add(args: argparse.Namespace) -> int:
    by = args.by if args.by is not None else current_user()
    b = read_db(args.config, lambda db: db.add_breakdown(args.vehicle, args.at, args.fault, note=args.note or "",
                                                         by=by))
    print(f"breakdown {b.id} recorded: {terminal(b.vehicle)} at {format_time(b.at)} UTC, {terminal(b.fault)}, by "
          f"{terminal(b.by)}")
    return 0


def cmd_breakdown_list(args: argparse.Namespace) -> int:
    rows = read_db(args.config, lambda db: db.breakdowns(args.vehicle, args.since, args.until))
    if args.json:
        print(dumps({"breakdowns": [b.to_dict() for b in rows]}))
        return 0
    print(f"{'#':>5s}  {'at (UTC)':19s}  {'vehicle':16s} {'fault':20s} {'by':16s} note")
    for b in rows:
        print(_breakdown_line(b))
    if not rows:
        print("(no breakdowns match)")
    return 0


def _breakdown_line(b: Breakdown) -> str:
    return (f"{b.id:5d}  {format_time(b.at):19s}  {terminal(b.vehicle):16s} {terminal(b.fault):20s} "
            f"{terminal(b.by):16s} {terminal(b.note)}")


# --- quality ---------------------------------------------------------------------------------------------------


def cmd_quality(args: argparse.Namespace) -> int:
    thresholds = load_config(args.config).quality
    report = read_db(args.config, lambda db: Reports(db).quality(thresholds, args.since, args.until, args.model))
    print(dumps(report) if args.json else quality_text(report))
    return 0


def quality_text(r: dict[str, Any]) -> str:
    """The report as a table: a line per model version, a line per fault under it, then what is due and why."""
    p, t = r["period"], r["thresholds"]
    lines = [f"model quality from {format_time(p['since'])} to {format_time(p['until'])} UTC (a breakdown is caught "
             f"by an alert up to {t['lead_window_h']:g} h before it)",
             f"{'model / fault':28s} {'version':10s} {'alerts':>6s} {'conf':>5s} {'false':>5s} {'unkn':>5s} "
             f"{'none':>5s} {'precision':>9s} {'engine h':>9s} {'FA/100h':>8s} {'caught':>6s} {'missed':>6s} "
             f"{'lead h':>7s}  drift (highest)"]
    for m in r["models"]:
        lines.append(_quality_line(m["model"], m["version"], m, hours=True))
        for fault, f in m["per_fault"].items():
            lines.append(_quality_line("  " + (fault or "(no label)"), "", f, hours=False))
    if not r["models"]:
        lines.append("(no alert, breakdown or drift report in this period)")
    due = r["retraining_reasons"]
    lines.append("retraining due: " + ("; ".join(terminal(x) for x in due) if due else "no"))
    return "\n".join(lines)


def _quality_line(name: str, version: str, f: dict[str, Any], *, hours: bool) -> str:
    v, b = f["verdicts"], f["breakdowns"]
    drift = ""
    if hours and f["drift_share"]:
        vehicle, share = max(f["drift_share"].items(), key=lambda kv: kv[1])
        drift = f"{share:.0%} {terminal(vehicle)}"
    return (f"{terminal(name):28s} {terminal(version):10s} {f['alerts']:6d} {v['confirmed']:5d} "
            f"{v['false_alarm']:5d} {v['unknown']:5d} {v['none']:5d} {_num(f['precision'], 2):>9s} "
            f"{_num(f['engine_hours'], 1) if hours else '':>9s} "
            f"{_num(f['false_alarms_per_100_engine_hours'], 2) if hours else '':>8s} {b['caught']:6d} "
            f"{b['missed']:6d} {_num(f['median_lead_time_h'], 1):>7s}  {drift}").rstrip()


def _num(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


# --- the parsers -----------------------------------------------------------------------------------------------


def add_alert_commands(alerts: argparse.ArgumentParser) -> None:
    """`alerts verdict` and `alerts history`, under the `alerts` listing (which runs when neither is named)."""
    sub = alerts.add_subparsers(dest="alerts_command", metavar="{verdict,history}",
                                help="record a verdict on an alert, or show its verdicts (without one: list alerts)")
    v = sub.add_parser("verdict", help="record a mechanic's verdict on an alert (every change is kept)",
                       description="Record whether an alert was right: a new verdict row, kept with who and when; "
                       "the latest is the alert's verdict now (docs/learning_loop.md, \"Records\").")
    v.add_argument("alert_id", metavar="ALERT_ID", help="the alert's id (cloud-sync alerts --json: alert_id)")
    v.add_argument("--config", required=True, help="cloud_sync TOML config")
    v.add_argument("--label", required=True, choices=lr.LABELS,
                   help="confirmed: the alert was right; false_alarm: nothing was wrong; unknown: could not tell")
    v.add_argument("--fault", metavar="NAME", help="what was found, e.g. coolant_leak (default for confirmed: the "
                   "alert's own label; none for false_alarm)")
    v.add_argument("--note", metavar="TEXT", help=f"free text, at most {lr.MAX_NOTE_CHARS} characters")
    v.add_argument("--by", metavar="NAME", help="who (default: $USER, else the login name)")
    v.add_argument("--vehicle", metavar="V", help="the alert's vehicle (needed only when its id is stored for two)",
                   default=argparse.SUPPRESS)  # else `alerts --vehicle V verdict ...` would lose V
    v.set_defaults(func=cmd_verdict)
    h = sub.add_parser("history", help="an alert's verdicts, oldest first: who said what, and when")
    h.add_argument("alert_id", metavar="ALERT_ID", help="the alert's id")
    h.add_argument("--config", required=True, help="cloud_sync TOML config")
    h.add_argument("--vehicle", metavar="V", help="the alert's vehicle (needed only when its id is stored for two)",
                   default=argparse.SUPPRESS)  # else `alerts --vehicle V verdict ...` would lose V
    h.add_argument("--json", action="store_true", help="print one JSON object")
    h.set_defaults(func=cmd_history)


def add_learning_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`breakdown add|list` and `quality`."""
    b = sub.add_parser("breakdown", help="record breakdowns (warned of or not) and list them",
                       description="Breakdowns, so that misses count as well as false alarms "
                       "(docs/learning_loop.md).")
    bs = b.add_subparsers(dest="breakdown_command", required=True, metavar="BREAKDOWN_COMMAND")
    a = bs.add_parser("add", help="record a breakdown of a vehicle")
    a.add_argument("--config", required=True, help="cloud_sync TOML config")
    a.add_argument("--vehicle", required=True, metavar="V", help="the vehicle (known to the database)")
    a.add_argument("--at", required=True, type=_time, metavar="TIME",
                   help="when it broke down: ISO 8601 (2026-11-20T14:05, UTC unless it has an offset) or Unix seconds")
    a.add_argument("--fault", required=True, metavar="NAME", help="what failed, e.g. coolant_leak")
    a.add_argument("--note", metavar="TEXT", help=f"free text, at most {lr.MAX_NOTE_CHARS} characters")
    a.add_argument("--by", metavar="NAME", help="who (default: $USER, else the login name)")
    a.set_defaults(func=cmd_breakdown_add)
    ls = bs.add_parser("list", help="breakdowns by time")
    ls.add_argument("--config", required=True, help="cloud_sync TOML config")
    ls.add_argument("--vehicle", metavar="V", help="only this vehicle")
    ls.add_argument("--since", type=_time, metavar="T", help="only at or after T (ISO 8601 or Unix seconds)")
    ls.add_argument("--until", type=_time, metavar="T", help="only before T")
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    ls.set_defaults(func=cmd_breakdown_list)
    q = sub.add_parser("quality", help="how often each model version is right: precision, false alarms per 100 "
                       "engine hours, breakdowns caught and missed, lead time, drift; retraining due",
                       description="Quality per model version and fault over a period (docs/learning_loop.md, "
                       "\"Quality\"); thresholds in the config's [quality] section.")
    q.add_argument("--config", required=True, help="cloud_sync TOML config")
    q.add_argument("--model", metavar="NAME", help="only this model's versions")
    q.add_argument("--since", type=_time, metavar="T", help="period start (default: 30 days before --until)")
    q.add_argument("--until", type=_time, metavar="T", help="period end, excluded (default: now)")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=cmd_quality)
