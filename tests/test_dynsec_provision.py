"""docs/deploy/dynsec_provision.py: the vehicle list it accepts, the rules it writes, the errors it gives.

What a real Mosquitto makes of its output (the file loaded at start, the commands sent to a running broker) is
tested in tests/test_broker_acl.py; this file covers the script's own contract, hostile vehicle lists included.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "deploy" / "dynsec_provision.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dynsec_provision", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["dynsec_provision"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


dp = _load()
IDS = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True).filter(lambda s: s not in ("cloud-sync", "fleet-admin"))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)


def test_a_vehicle_list_with_comments_and_blank_lines() -> None:
    vs = dp.parse_vehicles(["# fleet vehicle", "", "f1 veh-a", "  f2\tveh-b  # the new one", "f1 veh.c_1"])
    assert [(v.fleet, v.id) for v in vs] == [("f1", "veh-a"), ("f2", "veh-b"), ("f1", "veh.c_1")]


@pytest.mark.parametrize(("line", "why"), [
    ("f1 veh/a", "must match"),  # would shift the topic levels
    ("f1 veh+", "must match"),
    ("f1 veh#", "must match"),  # `#` starts a comment: what is left, `f1 veh`, is a valid pair; see below
    ("f1 $SYS", "must match"),
    ("f/1 veh-a", "must match"),
    ("f1 " + "v" * 65, "must match"),
    ("f1 cloud-sync", "reserved"),
    ("f1 fleet-admin", "reserved"),
    ("f1", "expected 'FLEET VEHICLE_ID'"),
    ("f1 veh-a extra", "expected 'FLEET VEHICLE_ID'"),
    ("f1 veh\x00a", "must match"),
    ("f1 vé", "must match"),
])
def test_a_bad_line_is_refused_with_its_number(line: str, why: str) -> None:
    if line == "f1 veh#":
        assert [v.id for v in dp.parse_vehicles([line])] == ["veh"]  # the comment rule, not a wildcard
        return
    with pytest.raises(dp.ProvisionError, match=f"line 2: .*{why}"):
        dp.parse_vehicles(["f1 veh-ok", line])


def test_a_vehicle_id_listed_twice_is_refused_even_in_another_fleet() -> None:
    """The broker knows a vehicle by its certificate CN alone: two entries would be two roles for one identity."""
    with pytest.raises(dp.ProvisionError, match="line 3: vehicle id 'veh-a' already on line 1"):
        dp.parse_vehicles(["f1 veh-a", "f1 veh-b", "f2 veh-a"])


def test_the_file_denies_by_default_and_names_every_identity() -> None:
    conf = dp.initial_config(dp.parse_vehicles(["f1 veh-a", "f2 veh-b"]))
    assert conf["defaultACLAccess"] == {"publishClientSend": False, "publishClientReceive": False,
                                        "subscribe": False, "unsubscribe": True}
    assert {c["username"]: [r["rolename"] for r in c["roles"]] for c in conf["clients"]} == {
        "cloud-sync": ["cloud-receiver"], "fleet-admin": ["dynsec-admin"],
        "veh-a": ["vehicle:veh-a"], "veh-b": ["vehicle:veh-b"]}
    assert not [c for c in conf["clients"] if "password" in c]  # certificate identities only
    roles = {r["rolename"]: {(a["acltype"], a["topic"]) for a in r["acls"]} for r in conf["roles"]}
    assert roles["vehicle:veh-b"] == {
        *(("publishClientSend", f"fleet/f2/vehicle/veh-b/{leaf}") for leaf in ("telemetry", "alerts", "events",
                                                                              "status", "model/get", "model/status")),
        *((kind, t) for kind in ("subscribePattern", "publishClientReceive")
          for t in ("fleet/f2/vehicle/veh-b/ack", "fleet/f2/vehicle/veh-b/cmd/#",
                    "fleet/f2/vehicle/veh-b/model/desired", "fleet/f2/vehicle/veh-b/model/chunk", "fleet/f2/cmd/#")),
    }
    assert all(a["allow"] for r in conf["roles"] for a in r["acls"])  # deny is the default, never a rule
    assert ("subscribePattern", "$share/+/fleet/+/vehicle/+/telemetry") in roles["cloud-receiver"]
    assert {("subscribePattern", "$share/+/fleet/+/vehicle/+/model/get"),
            ("subscribePattern", "fleet/+/vehicle/+/model/status"),
            ("publishClientSend", "fleet/+/vehicle/+/model/desired"),
            ("publishClientSend", "fleet/+/vehicle/+/model/chunk")} <= roles["cloud-receiver"]


def test_commands_for_a_running_broker() -> None:
    add = dp.add_commands(dp.vehicle("f1", "veh-n"))
    assert [c["command"] for c in add["commands"]] == ["createRole", "createClient"]
    assert add["commands"][1] == {"command": "createClient", "username": "veh-n",
                                  "roles": [{"rolename": "vehicle:veh-n", "priority": 0}]}
    assert dp.remove_commands("veh-n") == {"commands": [{"command": "deleteClient", "username": "veh-n"},
                                                         {"command": "deleteRole", "rolename": "vehicle:veh-n"}]}
    for bad in ("veh/n", "#", "cloud-sync"):
        with pytest.raises(dp.ProvisionError):
            dp.remove_commands(bad)


@settings(max_examples=300, deadline=None)
@given(st.tuples(IDS, IDS), st.tuples(IDS, IDS))
def test_no_vehicle_role_reaches_another_vehicles_topics(a: tuple[str, str], b: tuple[str, str]) -> None:
    """Whatever two valid ids are provisioned, A's rules match none of B's topics (up or down), while they match
    A's own: the confinement rests on ids never acting as wildcards or level separators."""
    va, vb = dp.vehicle(*a), dp.vehicle(*b)
    if va.id == vb.id:
        return
    rules = dp.vehicle_acls(va)
    leaves = ("telemetry", "alerts", "events", "status", "ack", "cmd/model")
    for v, expect in ((vb, False), (va, True)):
        for leaf in leaves:
            topic = f"fleet/{v.fleet}/vehicle/{v.id}/{leaf}"
            kinds = ("publishClientSend",) if leaf in leaves[:4] else ("subscribePattern", "publishClientReceive")
            for kind in kinds:
                hit = any(topic_matches_sub(r["topic"], topic) for r in rules if r["acltype"] == kind)
                assert hit is expect, (kind, topic, rules)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=80), max_size=20))
def test_any_vehicle_list_gives_valid_vehicles_or_one_error(lines: list[str]) -> None:
    try:
        vs = dp.parse_vehicles(lines)
    except dp.ProvisionError as e:
        assert str(e).startswith("line ")
        return
    assert len({v.id for v in vs}) == len(vs)
    for v in vs:
        assert dp.ID_PATTERN.fullmatch(v.id) and dp.ID_PATTERN.fullmatch(v.fleet)
    json.dumps(dp.initial_config(vs))  # whatever was accepted can be written


def test_the_command_line(tmp_path: Path) -> None:
    good = tmp_path / "vehicles.txt"
    good.write_text("f1 veh-a\nf1 veh-b\n")
    out = run("init", "--vehicles", str(good))
    assert out.returncode == 0, out.stderr
    assert [c["username"] for c in json.loads(out.stdout)["clients"]][2:] == ["veh-a", "veh-b"]
    assert json.loads(run("add", "f1", "veh-c").stdout)["commands"][1]["username"] == "veh-c"

    bad = tmp_path / "bad.txt"
    bad.write_text("f1 veh-a\nf1 veh/b\n")
    for args, msg in ((("init", "--vehicles", str(bad)), "line 2: vehicle id 'veh/b' must match"),
                      (("init", "--vehicles", str(tmp_path / "absent.txt")), "No such file"),
                      (("add", "f1", "veh+"), "vehicle id 'veh+' must match"),
                      (("remove", "fleet-admin"), "reserved")):
        out = run(*args)
        assert out.returncode == 2 and out.stdout == "", out
        assert out.stderr.startswith("dynsec_provision: ") and msg in out.stderr and out.stderr.count("\n") == 1


def test_init_out_creates_the_file_once_and_never_overwrites_it(tmp_path: Path) -> None:
    """Once the broker runs, the plugin owns the file: a second `init` over it would drop every vehicle added
    since, so it is refused and the file keeps every byte; a refused list leaves no file at all."""
    vehicles = tmp_path / "vehicles.txt"
    vehicles.write_text("f1 veh-a\n")
    target = tmp_path / "dynamic-security.json"
    out = run("init", "--vehicles", str(vehicles), "--out", str(target))
    assert out.returncode == 0 and out.stdout == "", out
    assert target.stat().st_mode & 0o777 == 0o600
    first = target.read_bytes()
    assert [c["username"] for c in json.loads(first)["clients"]] == ["cloud-sync", "fleet-admin", "veh-a"]

    vehicles.write_text("f1 veh-b\n")
    out = run("init", "--vehicles", str(vehicles), "--out", str(target))
    assert out.returncode == 2 and "exists" in out.stderr, out
    assert target.read_bytes() == first

    vehicles.write_text("f1 veh-a\nf1 veh-a\n")
    other = tmp_path / "other.json"
    assert run("init", "--vehicles", str(vehicles), "--out", str(other)).returncode == 2
    vehicles.write_bytes(b"f1 veh-\xff\n")
    out = run("init", "--vehicles", str(vehicles), "--out", str(other))
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dynamic-security.json", "vehicles.txt"]  # no leftovers
