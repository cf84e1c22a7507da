"""`cloud-sync`: the cloud receiver and its reports, a thin face over cloud_sync's Python API."""

from __future__ import annotations

import argparse
import getpass
import io
import logging
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from cloud_sync import __version__, packaging
from cloud_sync.config import CloudConfig, ConfigError, load_config
from cloud_sync.database import existing_db, open_db, read_db
from cloud_sync.db import CloudDBError, LearningError, RolloutError
from cloud_sync.exportdir import DEFAULT_CHUNK_ROWS, MAX_CHUNK_ROWS
from cloud_sync.learning_cli import add_alert_commands, add_learning_commands
from cloud_sync.present import clean_alert, dumps, terminal
from cloud_sync.reports import Reports
from cloud_sync.rollout_cli import add_model_commands, add_rollout_commands
from cloud_sync.times import parse_time
from harvester_common.clirun import UserError, run_cli

T = TypeVar("T")


class TerminalSafeFormatter(logging.Formatter):
    """Log lines quote vehicle-supplied text (topics, ids, decode errors): escaped as the reports escape it, so a
    line can neither drive the terminal nor forge another line. A traceback keeps its line breaks."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return terminal(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return "\n".join(terminal(line) for line in super().formatException(ei).split("\n"))

    def formatStack(self, stack_info: str) -> str:
        return "\n".join(terminal(line) for line in super().formatStack(stack_info).split("\n"))


def _config_with_logging(args: argparse.Namespace) -> CloudConfig:
    """For the long-running commands: the config, and logs to stderr (journald) at its level."""
    cfg = load_config(args.config)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TerminalSafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, cfg.log.level), handlers=[handler])
    return cfg


def cmd_serve(args: argparse.Namespace) -> int:
    from cloud_sync.controller import Controller
    from cloud_sync.receiver import Receiver

    cfg = _config_with_logging(args)
    db = open_db(cfg.db.url, cfg.db.path, cfg.db.connect_timeout_s)
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    rx = Receiver(cfg, db)
    controller = Controller(cfg, db, rx.client, rx.connected)  # model rollouts, every [rollout] tick_s
    controller.start()
    try:
        rx.run_forever(stop, args.report_every_s)
    finally:
        controller.stop()
        db.close()
    logging.getLogger("cloud_sync").info("stopped: %s; rollouts: %s", dict(rx.stats), dict(controller.stats))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    vehicles, rejected = read_db(args.config, lambda db: (Reports(db).stats(), Reports(db).rejected()))
    if args.json:
        out = [{k: v for k, v in s.to_dict().items() if k != "status"} for s in vehicles]
        print(dumps({"vehicles": out, "rejected": rejected}))
        return 0
    print(
        f"{'vehicle':24s} {'samples':>10s} {'alerts':>7s} {'events':>7s} {'highest seq':>12s} {'dups':>6s} "
        f"{'gaps':>5s} {'backfilling':>11s} {'evicted':>8s}  online"
    )
    for s in vehicles:
        ev = sum(hi - lo + 1 for lo, hi in s.evicted)
        print(
            f"{terminal(s.fleet + '/' + s.vehicle):24s} {s.records['samples']:10d} {s.records['alerts']:7d} "
            f"{s.records['events']:7d} {s.highest_seq:12d} {s.duplicates:6d} {len(s.gaps):5d} "
            f"{len(s.backfilling):11d} {ev:8d}  {'yes' if s.online else 'no'}"
        )
    if rejected:
        print("rejected messages: " + ", ".join(f"{terminal(k)} {v}" for k, v in sorted(rejected.items())))
    return 0


def _ago(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s ago"
    if s < 7200:
        return f"{s / 60:.0f} min ago"
    if s < 172800:
        return f"{s / 3600:.0f} h ago"
    return f"{s / 86400:.0f} d ago"


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f}"


def cmd_fleet(args: argparse.Namespace) -> int:
    rows = read_db(args.config, lambda db: Reports(db).fleet())
    if args.json:
        print(dumps({"vehicles": rows}))
        return 0
    print(f"{'vehicle':24s} {'state':7s} {'last seen':>12s} {'backlog':>10s} {'active':>8s} {'desired':>8s} "
          f"{'model step':11s} {'open alerts':>11s} {'evicted':>8s} {'gaps':>5s} {'backfilling':>11s} "
          f"{'budget MiB':>13s}  drift")
    for r in rows:
        budget = r["budget"]
        used = _mib(budget["used_today"]) + ("/" + _mib(budget["daily_bytes"]) if budget["daily_bytes"] else "")
        evicted = sum(r["evicted"]["reported_by_vehicle"].values()) or r["evicted"]["ranges_received"]
        print(f"{terminal(r['fleet'] + '/' + r['vehicle']):24s} {'online' if r['online'] else 'offline':7s} "
              f"{_ago(r['last_seen_ago_s']):>12s} {r['backlog']['samples'] + r['backlog']['records']:10d} "
              f"{terminal(_active(r)):>8s} {terminal(_desired(r)):>8s} {r['model']['state'] or '-':11s} "
              f"{r['open_alerts']:11d} {evicted:8d} {r['gaps']:5d} {r['backfilling']:11d} {used:>13s}  "
              f"{'yes' if r['drift'] else 'no'}")
    if not rows:
        print("(no vehicle has reported yet)")
    return 0


def _active(row: dict[str, Any]) -> str:
    """The version a vehicle runs: from its model report, else its status message's `model_version`."""
    active = row["model"]["active"]
    return str(active["version"]) if active else str(row["model_version"] or "-")


def _desired(row: dict[str, Any]) -> str:
    desired = row["model"]["desired"]
    return str(desired["version"]) if desired else "-"


def _when(ts: float | None) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts is not None else "?"
    except (OverflowError, OSError, ValueError):  # a time far outside what the platform's gmtime takes
        return "?"


def cmd_alerts(args: argparse.Namespace) -> int:
    if args.config is None:  # not required by argparse: `alerts verdict ... --config` comes after the subcommand
        args.alerts_parser.error("the following arguments are required: --config")
    since = None
    if args.since is not None:
        since = args.since if args.since >= 1e9 else time.time() - args.since * 3600  # an epoch or hours back
    rows = read_db(args.config, lambda db: Reports(db).alerts(args.vehicle, args.state, since))
    if args.json:
        print(dumps({"alerts": rows}))
        return 0
    print(f"{'time (UTC)':19s} {'vehicle':16s} {'alert id':36s} {'state':6s} {'label':20s} {'score':>5s}  "
          f"{'model':24s} {'verdict':12s} top features")
    for a in map(clean_alert, rows):  # fields typed: one malformed record does not end the report
        top = ", ".join(f[0] for f in a["top_features"][:3])
        score = "?" if a["score"] is None else f"{a['score']:.2f}"
        verdict = a["verdict"]["label"] if isinstance(a.get("verdict"), dict) else "-"
        # The id in full: what `alerts verdict` and `alerts history` take.
        print(f"{_when(a['ts']):19s} {terminal(a['vehicle']):16s} {terminal(a['alert_id']):36s} "
              f"{terminal(a['state']):6s} "
              f"{terminal(a['label']):20s} {score:>5s}  {terminal(a['model'] + ' ' + a['model_version']):24s} "
              f"{terminal(verdict):12s} {terminal(top)}")
    if not rows:
        print("(no alerts match)")
    return 0


_HOST_VALUE = re.compile(r"([a-z0-9.-]{1,253}|\[[0-9a-f:.]{2,45}\])(:[0-9]{1,5})?", re.IGNORECASE)


def _host_value(s: str) -> str:
    if not _HOST_VALUE.fullmatch(s):
        raise argparse.ArgumentTypeError(f"not a Host header value (name or [IPv6], optional :port): {s!r}")
    return s


def cmd_web(args: argparse.Namespace) -> int:
    from cloud_sync.web import SignInError, make_server

    cfg = _config_with_logging(args)
    db = existing_db(cfg)
    try:
        server = make_server(db, args.host, args.port, args.allow_host, cfg.web, cfg.quality,
                             assistant=cfg.assistant)
    except UserError:  # the knowledge base's index cannot be opened: said in one line by main
        db.close()
        raise
    except OSError as e:
        db.close()
        raise CloudDBError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    except SignInError as e:
        db.close()
        raise ConfigError(f"{args.config}: {e}") from None
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    host, port = str(server.server_address[0]), int(server.server_address[1])
    signed = "sign-in required" if server.sessions is not None else "no sign-in: loopback only"
    print(f"fleet page on http://{host}:{port}/ (database {db.where}; {signed}); Ctrl-C stops it", file=sys.stderr,
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        db.close()
    return 0


MIN_PASSWORD_CHARS = 10  # a shared workshop password: short ones fall to the rate limit's patience


def cmd_hash_password(args: argparse.Namespace) -> int:
    from cloud_sync.web.signin import MAX_PASSWORD_CHARS, hash_password

    # From a terminal, asked for twice without echo; from a pipe, its first line (`... < secret.txt`).
    if sys.stdin.isatty():
        first, again = getpass.getpass("password: "), getpass.getpass("again: ")
        if first != again:
            raise UserError("the two passwords differ")
    else:
        first = sys.stdin.readline().rstrip("\r\n")
    if len(first) < MIN_PASSWORD_CHARS or len(first) > MAX_PASSWORD_CHARS:
        raise UserError(f"the password must be {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters long")
    print(f'password_hash = "{hash_password(first)}"')
    return 0


def _time(text: str) -> float:
    try:
        return parse_time(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _names(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise argparse.ArgumentTypeError("names no vehicle")
    return names


def _chunk_rows(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= v <= MAX_CHUNK_ROWS:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_CHUNK_ROWS:,}")
    return v


def cmd_export(args: argparse.Namespace) -> int:
    from cloud_sync.export import Selection, export  # pyarrow: only for this command

    selection = Selection(args.vehicles, args.since, args.until)
    r = read_db(args.config, lambda db: export(db, args.out, selection, args.chunk_rows))
    counts = ", ".join(f"{n:,} {t}" for t, n in r.rows.items())
    print(f"{terminal(str(r.out))}: {counts} of {len(r.vehicles)} vehicle{'' if len(r.vehicles) == 1 else 's'} "
          f"({sum(r.written.values()):,} rows written by this run in {r.files} files)")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from cloud_sync.assistant import Assistant, KnowledgeBase

    cfg = load_config(args.config)
    db = existing_db(cfg)
    try:
        kb = KnowledgeBase(cfg.assistant.kb_dirs, cfg.assistant.index_path)
    except BaseException:
        db.close()
        raise
    for doc, why in kb.skipped:  # a site's bad document is said, once per run, and costs only itself
        print(f"cloud-sync ask: knowledge base: skipped {terminal(doc)}: {why}", file=sys.stderr)
    try:
        answer = Assistant(db, kb, cfg.assistant.season_start).ask(args.question)
    finally:
        db.close()
        kb.close()
    if args.json:
        print(dumps(answer.to_dict()))
        return 0
    print("\n".join(terminal(line) for line in answer.answer.splitlines()))
    if answer.sources:
        print("\nsources:")
        for s in answer.sources:
            print(f"  - {terminal(s.cite())}")
    return 0


def model_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]
                   ) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """The `model` group: each module with model commands adds its own to what this returns."""
    m = sub.add_parser("model", help="model packages: signing keys, signing, the registry, rollbacks",
                       description="Signed model packages (docs/models.md, \"Signed packages\") and the registry "
                       "(docs/cloud_sync.md, \"Model rollouts\").")
    return m.add_subparsers(dest="model_command", required=True, metavar="MODEL_COMMAND")


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
    s.add_argument("--report-every-s", type=float, default=None,
                   help="progress log period (default: the config's [log] report_every_s)")
    s.set_defaults(func=cmd_serve)
    st = sub.add_parser("stats", help="per vehicle: records by kind, highest seq, duplicates dropped, gaps, "
                        "ranges still backfilling")
    st.add_argument("--config", required=True, help="cloud_sync TOML config")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.set_defaults(func=cmd_stats)
    fl = sub.add_parser("fleet", help="every vehicle: online, last seen, backlog, model, open alerts, evictions, "
                        "gaps, ranges backfilling, data budget, drift")
    fl.add_argument("--config", required=True, help="cloud_sync TOML config")
    fl.add_argument("--json", action="store_true", help="print one JSON object")
    fl.set_defaults(func=cmd_fleet)
    al = sub.add_parser("alerts", help="alerts, oldest first, with filters and each one's verdict; `alerts verdict` "
                        "and `alerts history` record and show verdicts")
    al.add_argument("--config", help="cloud_sync TOML config (required)")
    al.add_argument("--vehicle", help="only this vehicle")
    al.add_argument("--state", choices=("open", "closed"),
                    help="open: alerts still open now; closed: alerts that have closed")
    al.add_argument("--since", type=float, metavar="HOURS_OR_EPOCH",
                    help="only alerts at or after this time: hours back (e.g. 24), or a Unix time")
    al.add_argument("--json", action="store_true", help="print one JSON object")
    al.set_defaults(func=cmd_alerts, alerts_parser=al)
    add_alert_commands(al)
    w = sub.add_parser("web", help="serve the fleet page: vehicles, alerts, and the signals around an alert")
    w.add_argument("--config", required=True, help="cloud_sync TOML config")
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other "
                   "address needs [web] password_hash: the page then asks for sign-in; docs/cloud_sync.md, "
                   "\"Sign-in\")")
    w.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    w.add_argument("--allow-host", action="append", default=[], type=_host_value, metavar="HOST[:PORT]",
                   help="also answer requests whose Host header is exactly this (the name a reverse proxy "
                   "forwards); repeatable. Without it only 127.0.0.1, localhost, [::1] and --host, with the port, "
                   "are answered: a check against DNS rebinding")
    w.set_defaults(func=cmd_web)
    hp = sub.add_parser("hash-password", help="read the fleet page's sign-in password (from the terminal, or a "
                        "pipe's first line) and print the `[web] password_hash` line that holds its scrypt hash")
    hp.set_defaults(func=cmd_hash_password)
    ex = sub.add_parser("export", help="the data as a Parquet dataset (samples, alerts, events, verdicts, "
                        "breakdowns) for retraining",
                        description="Write the selected data into DIR as a Parquet dataset partitioned by vehicle "
                        "and UTC day (docs/cloud_sync.md, \"Export\"), streaming, with a progress bar on stderr. "
                        "Into a DIR it wrote before, with the same arguments, it resumes (or adds what was stored "
                        "since); other arguments are refused.")
    ex.add_argument("--config", required=True, help="cloud_sync TOML config")
    ex.add_argument("--out", required=True, type=Path, metavar="DIR", help="the dataset's folder: new, empty, or "
                    "an earlier export with the same arguments")
    ex.add_argument("--vehicles", type=_names, metavar="V1,V2", help="only these vehicles (default: all)")
    ex.add_argument("--since", type=_time, metavar="T", help="rows with ts at or after T: ISO 8601 "
                    "(2026-11-20T14:05, UTC unless it carries an offset) or Unix seconds")
    ex.add_argument("--until", type=_time, metavar="T", help="rows with ts before T (same forms)")
    ex.add_argument("--chunk-rows", type=_chunk_rows, default=DEFAULT_CHUNK_ROWS, metavar="N",
                    help=f"rows read at once: what memory is bounded by (default {DEFAULT_CHUNK_ROWS:,})")
    ex.set_defaults(func=cmd_export)
    ak = sub.add_parser("ask", help="the maintenance assistant: a workshop's question answered from the fleet "
                        "database and the knowledge base, with its sources",
                        description="Answer QUESTION from the fleet database and the maintenance knowledge base "
                        "(docs/assistant.md): which vehicles need attention, what is wrong with one, why an alert "
                        "fired, what a DTC means, a fault's history, who has not synced, what changed since a model "
                        "update. Every answer names the rows and documents it used; nothing is made up.")
    ak.add_argument("question", help="the question, in quotes")
    ak.add_argument("--config", required=True, help="cloud_sync TOML config")
    ak.add_argument("--json", action="store_true", help="print one JSON object: answer, intent, slots, sources, "
                    "clarify")
    ak.set_defaults(func=cmd_ask)
    model_sub = model_commands(sub)
    packaging.add_commands(model_sub)
    add_model_commands(model_sub)
    add_rollout_commands(sub)
    add_learning_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # A terminal whose encoding cannot show a vehicle's (printable) text gets escapes, not a traceback.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    return run_cli(build_parser(), argv, (ConfigError, CloudDBError, RolloutError, LearningError))


if __name__ == "__main__":
    sys.exit(main())
