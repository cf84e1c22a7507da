"""`cloud-sync model publish|list|rollback` and `cloud-sync rollout start|status|pause|resume|abort`: the registry
and rollouts, for the fleet engineer (docs/cloud_sync.md, "Model rollouts").

These commands only write the database. The controller inside `cloud-sync serve` (cloud_sync/controller.py) does
the publishing at its next tick: it sends the desired model wave by wave, moves a rollout on, clears an aborted
one's desired models. A refused request is one line and exit status 2; nothing is changed then.
"""

from __future__ import annotations

import argparse
import getpass
import os
import time
from pathlib import Path
from typing import Any

from cloud_sync import rollout as ro
from cloud_sync.config import CloudConfig, load_config
from cloud_sync.database import existing_db, open_db
from cloud_sync.db import FleetDB, PackageInfo
from cloud_sync.errors import RolloutError
from cloud_sync.present import dumps, terminal
from cloud_sync.reports import Reports
from harvester_common import modelwire as mw
from harvester_common import wire

DEFAULT_WAVES = "100"


def current_user() -> str:
    """Who runs the command: $USER, else the login name, else "unknown"."""
    name = os.environ.get("USER", "")
    if not name:
        try:
            name = getpass.getuser()
        except (KeyError, OSError):
            name = ""
    return name if wire.valid_label(name) and name else "unknown"


def _open(args: argparse.Namespace, create: bool = False) -> tuple[CloudConfig, FleetDB]:
    cfg = load_config(args.config)
    return cfg, (open_db(cfg.db.url, cfg.db.path, cfg.db.connect_timeout_s) if create else existing_db(cfg))


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts is not None else "-"


# --- the registry --------------------------------------------------------------------------------------------


def publish(db: FleetDB, cfg: CloudConfig, data: bytes, by: str) -> tuple[PackageInfo, bool]:
    """Verify a package against `[rollout] trusted_keys` and add it to the registry; (entry, whether it is new).
    RolloutError naming the check that failed (modelpkg's reason code), or a version published as another
    package."""
    from harvester_common import modelpkg  # cryptography: only for the commands that need it

    try:
        keys = modelpkg.load_public_keys(cfg.rollout.trusted_keys)
        pkg = modelpkg.verify_package(data, keys)
    except modelpkg.PackageError as e:
        hint = "; name the signing key's .pub file in [rollout] trusted_keys" if e.code == "unknown_key" else ""
        raise RolloutError(f"refused ({e.code}): {e}{hint}") from None
    m = pkg.manifest
    info = PackageInfo(pkg.package_sha256, m.name, m.version, m.sha256, m.key_id, len(data), m.to_dict(), by,
                       time.time())
    return info, db.publish_package(info, data)


def cmd_publish(args: argparse.Namespace) -> int:
    path = Path(args.package)
    try:
        with path.open("rb") as f:
            data = f.read(mw.MAX_PACKAGE_BYTES + 1)  # one byte past the limit is enough to refuse it
    except OSError as e:
        raise RolloutError(f"{path}: cannot read: {e.strerror}") from None
    cfg, db = _open(args, create=True)
    try:
        info, new = publish(db, cfg, data, args.by or current_user())
    except RolloutError as e:
        raise RolloutError(f"{path}: {e}") from None
    finally:
        db.close()
    what = (f"{terminal(info.name)} {terminal(info.version)} (package sha256 {info.package_sha256}, "
            f"{info.size} bytes, key {info.key_id})")
    print(f"published {what}" if new else f"{what} is published already: nothing changed")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    _, db = _open(args)
    try:
        packages = db.packages()
    finally:
        db.close()
    if args.json:
        print(dumps({"packages": [p.to_dict() for p in packages]}))
        return 0
    print(f"{'name':24s} {'version':10s} {'bytes':>10s} {'key':16s} {'published (UTC)':19s} {'by':12s} package sha256")
    for p in packages:
        print(f"{terminal(p.name):24s} {terminal(p.version):10s} {p.size:10d} {p.key_id:16s} "
              f"{_when(p.published_at):19s} {terminal(p.published_by):12s} {p.package_sha256}")
    if not packages:
        print("(no package published yet: cloud-sync model publish PKG)")
    return 0


# --- rollouts ------------------------------------------------------------------------------------------------


def _vehicle_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if not wire.valid_id(v)]
    if bad:
        raise RolloutError(f"not a vehicle id: {terminal(bad[0])!s} (ids match {wire.ID_PATTERN})")
    return names


def _with_fleets(db: FleetDB, cfg: CloudConfig, names: list[str] | None) -> list[tuple[str, str]]:
    """(vehicle, fleet) of the named vehicles, or of every vehicle the database knows in the config's fleet."""
    fleet = cfg.mqtt.fleet
    if names is None:
        known = db.known_vehicles(fleet)
        if not known:
            raise RolloutError(f"the database knows no vehicle{'' if fleet == '+' else ' in fleet ' + fleet}: name "
                               "them with --vehicles")
        return known
    if not names:
        raise RolloutError("--vehicles names no vehicle")
    fleets = dict(db.known_vehicles("+"))
    out = []
    for v in names:
        f = fleets.get(v)
        if f is None and fleet == "+":
            raise RolloutError(f"vehicle {v} has never reported and [mqtt] fleet is '+': its fleet, and so its "
                               "topics, are unknown")
        if f is not None and fleet != "+" and f != fleet:
            raise RolloutError(f"vehicle {v} is in fleet {terminal(f)}, not in this config's fleet {fleet}")
        out.append((v, f or fleet))
    return out


def _package(db: FleetDB, name: str | None, version: str) -> PackageInfo:
    found = db.packages(name, version)
    if not found and name is not None:
        raise RolloutError(f"no package {terminal(name)} {terminal(version)} in the registry (cloud-sync model list)")
    if not found:
        raise RolloutError(f"no package of version {terminal(version)} in the registry (cloud-sync model list)")
    if len(found) > 1:
        raise RolloutError(f"several models have version {terminal(version)} "
                           f"({', '.join(terminal(p.name) for p in found)}): say which with --name")
    return found[0]


def _start(db: FleetDB, pkg: PackageInfo, vehicles: list[tuple[str, str]], *, mode: str, canary: int,
           percent: tuple[int, ...], success: float, error: float) -> tuple[int, list[list[str]]]:
    fleet_of = dict(vehicles)
    try:
        waves = ro.plan_waves(fleet_of, canary, percent)
    except ro.PlanError as e:
        raise RolloutError(str(e)) from None
    plan = {"canary": canary, "percent": list(percent), "sizes": [len(w) for w in waves]}
    rid = db.create_rollout(pkg, [[(v, fleet_of[v]) for v in w] for w in waves], mode=mode, plan=plan,
                            success_threshold=success, error_threshold=error, by=current_user())
    return rid, waves


def cmd_start(args: argparse.Namespace) -> int:
    cfg, db = _open(args)
    try:
        try:
            percent = ro.parse_waves(args.waves)
        except ro.PlanError as e:
            raise RolloutError(str(e)) from None
        pkg = _package(db, args.name, args.version)
        vehicles = _with_fleets(db, cfg, _vehicle_list(args.vehicles) if args.vehicles is not None else None)
        rid, waves = _start(db, pkg, vehicles, mode="update", canary=args.canary, percent=percent,
                            success=args.success_threshold, error=args.error_threshold)
    finally:
        db.close()
    print(f"rollout {rid} started: {terminal(pkg.name)} {terminal(pkg.version)} to {sum(map(len, waves))} vehicles "
          f"in {len(waves)} waves ({', '.join(str(len(w)) for w in waves)}); `cloud-sync serve` sends it")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    cfg, db = _open(args)
    try:
        pkg = _package(db, args.name, args.to)
        vehicles = _with_fleets(db, cfg, _vehicle_list(args.vehicles))
        rid, _ = _start(db, pkg, vehicles, mode="rollback", canary=0, percent=(100,), success=1.0, error=0.0)
    finally:
        db.close()
    print(f"rollout {rid} started: roll {len(vehicles)} vehicles back to {terminal(pkg.name)} "
          f"{terminal(pkg.version)} (one wave, mode rollback); `cloud-sync serve` sends it")
    return 0


def _rollout_id(db: FleetDB, given: int | None) -> int:
    if given is not None:
        return given
    latest = db.read("SELECT MAX(id) FROM rollouts")[0][0]
    if latest is None:
        raise RolloutError("no rollout yet (cloud-sync rollout start)")
    return int(latest)


def cmd_status(args: argparse.Namespace) -> int:
    _, db = _open(args)
    try:
        report = Reports(db).rollout(_rollout_id(db, args.id))
    finally:
        db.close()
    if report is None:
        raise RolloutError(f"no rollout {args.id}")
    if args.json:
        print(dumps(report))
        return 0
    print(_status_text(report))
    return 0


def _status_text(r: dict[str, Any]) -> str:
    lines = [f"rollout {r['id']}: {terminal(r['name'])} {terminal(r['version'])} ({r['mode']}), {r['state']}"
             + (f": {terminal(r['reason'])}" if r["reason"] else ""),
             f"  thresholds: success {r['success_threshold']:.0%}, error {r['error_threshold']:.0%}; started "
             f"{_when(r['created_at'])} UTC by {terminal(r['created_by'])}; package {r['package_sha256']}"]
    for w in r["waves"]:
        p = w["progress"]
        counts = ", ".join(f"{k} {n}" for k, n in w["counts"].items())
        lines.append(f"wave {w['number']}{' (current)' if w['current'] else ''}: {p['total']} vehicles, "
                     f"{p['sent']} sent, {p['active_healthy']} active and healthy, {p['failed']} failed ({counts})")
        for v in w["vehicles"]:
            health = {True: " healthy", False: " unhealthy", None: ""}[v["healthy"]]
            lines.append(f"  {terminal(v['vehicle']):24s} {v['state']}{health}"
                         + (f": {terminal(v['reason'])}" if v["reason"] else ""))
    if r["failed"]:
        lines.append("failed: " + "; ".join(f"{terminal(f['vehicle'])} (wave {f['wave']}) {f['state']}"
                                            + (f": {terminal(f['reason'])}" if f["reason"] else "")
                                            for f in r["failed"]))
    return "\n".join(lines)


def cmd_change(args: argparse.Namespace) -> int:
    _, db = _open(args)
    try:
        rid = _rollout_id(db, args.id)
        before, info = db.change_rollout(rid, args.action, current_user())
    finally:
        db.close()
    after = {"abort": "; the desired model of its vehicles not active on it is cleared by `cloud-sync serve`",
             "resume": "; `cloud-sync serve` judges its current wave again",
             "pause": ": nothing is sent and no wave starts until it resumes"}[args.action]
    print(f"rollout {rid} ({terminal(info.name)} {terminal(info.version)}): {before} -> {info.state}{after}")
    return 0


# --- the parsers ---------------------------------------------------------------------------------------------


def _share(lo_open: bool, hi_open: bool) -> Any:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        above_lo = v > 0 if lo_open else v >= 0
        below_hi = v < 1 if hi_open else v <= 1
        if not (above_lo and below_hi):  # NaN is neither
            raise argparse.ArgumentTypeError(
                f"must be in {'(' if lo_open else '['}0, 1{')' if hi_open else ']'} (a share of a wave's vehicles)")
        return v
    return parse


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return v


def _id(text: str) -> int:
    v = _count(text)
    if v > wire.INT64_MAX:
        raise argparse.ArgumentTypeError("not a rollout id")
    return v


def add_model_commands(model_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = model_sub.add_parser("publish", help="verify a signed package and add it to the registry",
                             description="Verify PKG against [rollout] trusted_keys (structure, key, signature, "
                             "hashes) and add it to the registry in the database. A name and version stand for one "
                             "package: another package with the same ones is refused; the same package again "
                             "changes nothing.")
    p.add_argument("package", metavar="PKG", help="the package file (cloud-sync model sign)")
    p.add_argument("--config", required=True, help="cloud_sync TOML config")
    p.add_argument("--by", help="who publishes it (default: $USER, else \"unknown\")")
    p.set_defaults(func=cmd_publish)
    ls = model_sub.add_parser("list", help="the packages in the registry")
    ls.add_argument("--config", required=True, help="cloud_sync TOML config")
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    ls.set_defaults(func=cmd_list)
    rb = model_sub.add_parser("rollback", help="send vehicles back to a published version (a one-wave rollout)",
                              description="A rollout of mode rollback: one wave, every named vehicle, success "
                              "threshold 1.0; vehicles switch to the version without a shadow run.")
    rb.add_argument("--vehicles", required=True, metavar="V,...", help="the vehicles to roll back")
    rb.add_argument("--to", required=True, metavar="VERSION", help="the published version to go back to")
    rb.add_argument("--name", help="the model's name (needed only when several models have that version)")
    rb.add_argument("--config", required=True, help="cloud_sync TOML config")
    rb.set_defaults(func=cmd_rollback)


def add_rollout_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = sub.add_parser("rollout", help="send a published model to vehicles in waves; watch, pause, resume, abort",
                       description="Rollouts of published packages (docs/cloud_sync.md, \"Model rollouts\"). These "
                       "commands write the database; `cloud-sync serve` does the sending.")
    rs = r.add_subparsers(dest="rollout_command", required=True, metavar="ROLLOUT_COMMAND")
    s = rs.add_parser("start", help="start a rollout of a published model version",
                      description="Plan the waves and start the rollout. Vehicles sorted by id; --canary N makes "
                      "the first wave N vehicles; --waves are cumulative percentages of the rest, rounded up. A "
                      "wave passes when the share of its vehicles active and healthy reaches the success threshold; "
                      "the rollout halts when the share rejected, rolled back or failed passes the error threshold.")
    s.add_argument("name", metavar="NAME", help="the model's name")
    s.add_argument("version", metavar="VERSION", help="its published version")
    s.add_argument("--config", required=True, help="cloud_sync TOML config")
    s.add_argument("--vehicles", metavar="V,...", help="these vehicles (default: every vehicle the database knows "
                   "in the config's [mqtt] fleet)")
    s.add_argument("--canary", type=_count, default=0, metavar="N", help="a first wave of N vehicles (default 0: none)")
    s.add_argument("--waves", default=DEFAULT_WAVES, metavar="P,...",
                   help=f"cumulative percentages of the vehicles after the canary, the last 100 (default "
                   f"{DEFAULT_WAVES}: one wave), e.g. 10,50,100")
    s.add_argument("--success-threshold", type=_share(True, False), default=0.9, metavar="S",
                   help="share of a wave active and healthy for the next wave to start (default 0.9)")
    s.add_argument("--error-threshold", type=_share(False, True), default=0.2, metavar="E",
                   help="share of a wave rejected, rolled back or failed past which the rollout halts (default 0.2)")
    s.set_defaults(func=cmd_start)
    st = rs.add_parser("status", help="a rollout's waves, each vehicle's step, the failures and their reasons")
    st.add_argument("--config", required=True, help="cloud_sync TOML config")
    st.add_argument("--id", type=_id, metavar="N", help="the rollout (default: the latest)")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.set_defaults(func=cmd_status)
    for action, text in (("pause", "stop sending and advancing until resumed"),
                         ("resume", "continue a paused or halted rollout (its current wave is judged again)"),
                         ("abort", "end a rollout; the desired model of its vehicles not active on it is cleared")):
        a = rs.add_parser(action, help=text)
        a.add_argument("--config", required=True, help="cloud_sync TOML config")
        a.add_argument("--id", type=_id, metavar="N", help="the rollout (default: the latest)")
        a.set_defaults(func=cmd_change, action=action)
