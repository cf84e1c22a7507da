#!/usr/bin/env python3
"""Provision the fleet broker's dynamic-security plugin (Mosquitto 2.0): who may publish, receive and SUBSCRIBE what.

Standard library only: copy it to the broker host or an admin's machine. Tested as committed by
tests/test_broker_acl.py (a real Mosquitto 2.0.11 loads what `init` writes and applies what `add`/`remove` print).

    dynsec_provision.py init --vehicles vehicles.txt --out /var/lib/mosquitto/dynamic-security.json
    dynsec_provision.py add FLEET VEHICLE_ID      # JSON for $CONTROL/dynamic-security/v1, to send with mosquitto_rr
    dynsec_provision.py remove VEHICLE_ID         # likewise

`vehicles.txt`: one `FLEET VEHICLE_ID` per line; blank lines and `#` comments are skipped. `init --out` never
overwrites: once the broker runs, the plugin owns that file (it rewrites it on every `add` and `remove`), so a second
`init` over it would silently drop every vehicle added since. Without `--out`, `init` prints the file.

Identities are certificate CNs (`use_identity_as_username true`): Mosquitto skips the password check for them, so
no client here has a password, and none can log in with one (the plugin defers, Mosquitto refuses). The client
named by the CN carries that connection's rights; a CN with no client here gets none (every ACL check defers, which
Mosquitto treats as a denial), so a certificate alone gives a vehicle nothing until it is provisioned.

Why one role per vehicle: dynsec in Mosquitto 2.0 matches ACL topics as written, with no `%u`/`%c` substitution
(plugins/dynamic-security/acl.c at v2.0.11), so a rule naming "the vehicle's own subtree" must name the vehicle.
What dynsec adds over `acl_file`: it checks SUBSCRIBE against the filter as sent, `$share/<group>/` included, so a
vehicle cannot join the cloud receivers' shared subscription (SUBACK 0x87 instead).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# The agent's own rule for `vehicle.id` and `vehicle.fleet` (agent/config.py): never `/`, `+`, `#` or `$`, so an id
# can neither shift a topic's levels nor act as a wildcard.
ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
CLOUD_USER = "cloud-sync"  # the receivers' certificate CN
ADMIN_USER = "fleet-admin"  # the CN of whoever runs `add`/`remove` against a live broker
CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
UPLINK_LEAVES = ("telemetry", "alerts", "events", "status", "model/get", "model/status")
OWN_DOWNLINK_LEAVES = ("ack", "cmd/#", "model/desired", "model/chunk")  # the cloud writes them, the vehicle reads
CLOUD_ROLE = "cloud-receiver"
ADMIN_ROLE = "dynsec-admin"
VEHICLE_ROLE_PREFIX = "vehicle:"  # ':' is outside ID_PATTERN, so no vehicle's role can be named like another one

Acl = dict[str, Any]


class ProvisionError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Vehicle:
    fleet: str
    id: str

    @property
    def role(self) -> str:
        return VEHICLE_ROLE_PREFIX + self.id


def check_id(kind: str, value: str) -> str:
    if not ID_PATTERN.fullmatch(value):
        raise ProvisionError(f"{kind} {value!r} must match {ID_PATTERN.pattern}")
    return value


def check_vehicle_id(vehicle_id: str) -> str:
    check_id("vehicle id", vehicle_id)
    if vehicle_id in (CLOUD_USER, ADMIN_USER):
        raise ProvisionError(f"vehicle id {vehicle_id!r} is reserved (it would get that identity's rights)")
    return vehicle_id


def vehicle(fleet: str, vehicle_id: str) -> Vehicle:
    return Vehicle(check_id("fleet", fleet), check_vehicle_id(vehicle_id))


def parse_vehicles(lines: Iterable[str]) -> list[Vehicle]:
    """`FLEET VEHICLE_ID` per line. A vehicle id listed twice is an error: ids are unique across fleets, and the
    broker identifies a vehicle by its id alone (its certificate CN)."""
    out: list[Vehicle] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ProvisionError(f"line {n}: expected 'FLEET VEHICLE_ID', got {raw.strip()!r}")
        try:
            v = vehicle(parts[0], parts[1])
        except ProvisionError as e:
            raise ProvisionError(f"line {n}: {e}") from None
        if v.id in seen:
            raise ProvisionError(f"line {n}: vehicle id {v.id!r} already on line {seen[v.id]}")
        seen[v.id] = n
        out.append(v)
    return out


def _acl(acltype: str, topic: str) -> Acl:
    return {"acltype": acltype, "topic": topic, "allow": True, "priority": 0}


def vehicle_acls(v: Vehicle) -> list[Acl]:
    """Its own uplink leaves to publish; its own downlink (acks, commands, desired model, model chunks), and its
    fleet's cmd subtree, to subscribe to and receive. Nothing else, `$share/...` included: the default for every ACL
    type except unsubscribe is deny."""
    own = f"fleet/{v.fleet}/vehicle/{v.id}"
    down = (*(f"{own}/{leaf}" for leaf in OWN_DOWNLINK_LEAVES), f"fleet/{v.fleet}/cmd/#")
    return ([_acl("publishClientSend", f"{own}/{leaf}") for leaf in UPLINK_LEAVES]
            + [_acl("subscribePattern", t) for t in down]
            + [_acl("publishClientReceive", t) for t in down])


def cloud_acls() -> list[Acl]:
    """The receivers: every vehicle's uplink, through a shared subscription under any group name (`share_group` is
    theirs to choose) or directly (to read a retained status); they write every vehicle's downlink and commands."""
    acls: list[Acl] = []
    for leaf in UPLINK_LEAVES:
        acls += [_acl("subscribePattern", f"$share/+/fleet/+/vehicle/+/{leaf}"),
                 _acl("subscribePattern", f"fleet/+/vehicle/+/{leaf}"),
                 _acl("publishClientReceive", f"fleet/+/vehicle/+/{leaf}")]
    return acls + [_acl("publishClientSend", t)
                   for t in (*(f"fleet/+/vehicle/+/{leaf}" for leaf in OWN_DOWNLINK_LEAVES), "fleet/+/cmd/#")]


def admin_acls() -> list[Acl]:
    """Only the plugin's control topic: an admin changes rules, it does not read or write fleet traffic."""
    t = "$CONTROL/dynamic-security/#"
    return [_acl("publishClientSend", t), _acl("subscribePattern", t), _acl("publishClientReceive", t)]


def _client(username: str, role: str) -> dict[str, Any]:
    return {"username": username, "roles": [{"rolename": role, "priority": 0}]}


def initial_config(vehicles: Sequence[Vehicle]) -> dict[str, Any]:
    """The whole plugin file (`plugin_opt_config_file`), as the plugin itself reads and writes it."""
    ids = [v.id for v in vehicles]
    if len(set(ids)) != len(ids):
        raise ProvisionError("a vehicle id is listed twice")
    return {
        # Written out in full: a key missing from this object means deny, and the plugin's built-in defaults
        # (used when the object is absent) let every client receive whatever it is subscribed to.
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                             "subscribe": False, "unsubscribe": True},
        "clients": [_client(CLOUD_USER, CLOUD_ROLE), _client(ADMIN_USER, ADMIN_ROLE)]
                   + [_client(v.id, v.role) for v in vehicles],
        "groups": [],
        "roles": [{"rolename": CLOUD_ROLE, "acls": cloud_acls()}, {"rolename": ADMIN_ROLE, "acls": admin_acls()}]
                 + [{"rolename": v.role, "acls": vehicle_acls(v)} for v in vehicles],
    }


def add_commands(v: Vehicle) -> dict[str, Any]:
    """For a running broker. Role first: a client created with a role that does not exist yet is refused."""
    return {"commands": [
        {"command": "createRole", "rolename": v.role, "acls": vehicle_acls(v)},
        {"command": "createClient", "username": v.id, "roles": [{"rolename": v.role, "priority": 0}]},
    ]}


def remove_commands(vehicle_id: str) -> dict[str, Any]:
    """Deleting the client disconnects it; reconnecting with its certificate then gets no rights at all. Disabling
    would not do: the plugin checks `disabled` only in its password check, which certificate clients skip."""
    check_vehicle_id(vehicle_id)
    return {"commands": [
        {"command": "deleteClient", "username": vehicle_id},
        {"command": "deleteRole", "rolename": VEHICLE_ROLE_PREFIX + vehicle_id},
    ]}


def write_new(path: str, text: str) -> None:
    """Create `path` (mode 0600: it lists the fleet) with `text`, all or nothing; refuse if it exists."""
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # unlike rename, fails if `path` appeared meanwhile
    except FileExistsError:
        raise ProvisionError(f"{path} exists: the plugin keeps it up to date; change it with add/remove") from None
    finally:
        os.unlink(tmp)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = p.add_subparsers(dest="cmd", required=True)
    init = sub.add_parser("init", help="write (or print) the plugin's config file for these vehicles")
    init.add_argument("--vehicles", metavar="FILE", help="'FLEET VEHICLE_ID' per line (default: none)")
    init.add_argument("--out", metavar="PATH", help="create this file (never overwritten) instead of printing")
    add = sub.add_parser("add", help=f"print the {CONTROL_TOPIC} command that provisions one vehicle")
    add.add_argument("fleet")
    add.add_argument("vehicle_id")
    rm = sub.add_parser("remove", help=f"print the {CONTROL_TOPIC} command that removes one vehicle")
    rm.add_argument("vehicle_id")
    a = p.parse_args(argv)
    try:
        if a.cmd == "init":
            vs: list[Vehicle] = []
            if a.vehicles:
                with open(a.vehicles, encoding="utf-8") as f:
                    vs = parse_vehicles(f)
            text = json.dumps(initial_config(vs), indent=1) + "\n"
            if a.out:
                write_new(a.out, text)
                print(f"dynsec_provision: wrote {a.out} ({len(vs)} vehicles)", file=sys.stderr)
                return 0
        elif a.cmd == "add":
            text = json.dumps(add_commands(vehicle(a.fleet, a.vehicle_id))) + "\n"
        else:
            text = json.dumps(remove_commands(a.vehicle_id)) + "\n"
    except (ProvisionError, OSError, UnicodeDecodeError) as e:
        print(f"dynsec_provision: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
