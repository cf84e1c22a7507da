"""The registry, rollouts and vehicles' model reports in the cloud database, on both engines (conftest `cloud_db`):
a name and version stand for one package, a vehicle is in one live rollout at a time, the highest `seq` wins and a
stored report is folded into the vehicle's rollout, state changes follow their rules."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from cloud_sync import rollout as ro
from cloud_sync.db import FleetDB, PackageInfo, RolloutError
from cloud_sync.reports import Reports
from harvester_common import modelwire as mw


def package(version: str, body: bytes = b"", name: str = "harvester-anomaly") -> tuple[PackageInfo, bytes]:
    """A registry entry over arbitrary bytes: the database stores what `model publish` verified, it does not verify."""
    data = f"{name} {version}".encode() + body
    return PackageInfo(hashlib.sha256(data).hexdigest(), name, version, hashlib.sha256(b"model " + data).hexdigest(),
                       "0123456789abcdef", len(data), {"name": name, "version": version}, "alice", 1.0), data


def report(seq: int, state: str, pkg: PackageInfo | None, active: PackageInfo | None = None,
           healthy: bool | None = None, reason: str = "") -> mw.ModelStatus:
    return mw.ModelStatus(
        state=state, seq=seq, ts=float(seq),
        target={"name": pkg.name, "version": pkg.version, "package_sha256": pkg.package_sha256, "rollout": "1"}
        if pkg else None,
        active={"name": active.name, "version": active.version, "sha256": active.model_sha256} if active else None,
        healthy=healthy, reason=reason)


def vehicles(n: int, fleet: str = "f1") -> list[tuple[str, str]]:
    return [(f"v{i:02d}", fleet) for i in range(1, n + 1)]


def test_a_version_stands_for_one_package(cloud_db: FleetDB) -> None:
    info, data = package("1.0.0")
    assert cloud_db.publish_package(info, data) is True
    assert cloud_db.publish_package(info, data) is False  # the same again: nothing changes
    other, other_data = package("1.0.0", b"retrained")
    with pytest.raises(RolloutError, match="published already as another package"):
        cloud_db.publish_package(other, other_data)
    assert cloud_db.packages() == [info]
    assert cloud_db.package_bytes(info.package_sha256) == data
    assert cloud_db.package_bytes(other.package_sha256) is None
    big, big_data = package("2.0.0", bytes(range(256)) * 4096)  # binary, 1 MiB: BLOB / BYTEA round trip
    cloud_db.publish_package(big, big_data)
    assert cloud_db.package_bytes(big.package_sha256) == big_data
    assert [p.version for p in cloud_db.packages(version="2.0.0")] == ["2.0.0"]


def test_a_vehicle_is_in_one_live_rollout_at_a_time(cloud_db: FleetDB) -> None:
    info, data = package("1.1.0")
    cloud_db.publish_package(info, data)
    kw: dict[str, Any] = {"mode": "update", "plan": {}, "success_threshold": 0.9, "error_threshold": 0.2,
                          "by": "alice"}
    r1 = cloud_db.create_rollout(info, [vehicles(3)], **kw)
    with pytest.raises(RolloutError, match=f"in rollout {r1} \\(running\\): v03.*rollout abort --id {r1}"):
        cloud_db.create_rollout(info, [[("v03", "f1"), ("v04", "f1")]], **kw)
    r2 = cloud_db.create_rollout(info, [[("v04", "f1")]], **kw)
    assert r2 > r1
    for action, state in (("pause", "paused"), ("resume", "running")):
        assert cloud_db.change_rollout(r1, action, "bob")[1].state == state
    with pytest.raises(RolloutError, match="is running: it cannot resume"):
        cloud_db.change_rollout(r1, "resume", "bob")
    before, after = cloud_db.change_rollout(r1, "abort", "bob")
    assert (before, after.state, after.reason) == ("running", "aborted", "aborted by bob")
    with pytest.raises(RolloutError, match="is aborted: it cannot pause"):
        cloud_db.change_rollout(r1, "pause", "bob")
    with pytest.raises(RolloutError, match="no rollout 999"):
        cloud_db.change_rollout(999, "abort", "bob")
    r3 = cloud_db.create_rollout(info, [[("v03", "f1")]], **kw)  # r1 is over
    assert [v.vehicle for v in cloud_db.rollout_vehicles(r3)] == ["v03"]
    with pytest.raises(RolloutError, match="at least one vehicle"):
        cloud_db.create_rollout(info, [[]], **kw)


def test_the_highest_seq_wins_and_is_folded_into_the_rollout(cloud_db: FleetDB) -> None:
    old, old_data = package("1.0.0")
    new, new_data = package("1.1.0")
    for i, d in ((old, old_data), (new, new_data)):
        cloud_db.publish_package(i, d)
    rid = cloud_db.create_rollout(new, [vehicles(2)], mode="update", plan={}, success_threshold=1.0,
                                  error_threshold=0.0, by="alice")
    assert cloud_db.set_model_status("f1", "v01", report(5, "shadow", new, active=old)) == "stored"
    assert cloud_db.set_model_status("f1", "v01", report(5, "shadow", new, active=old)) == "duplicate"
    assert cloud_db.set_model_status("f1", "v01", report(4, "downloading", new, active=old)) == "stale"
    steps = {v.vehicle: v for v in cloud_db.rollout_vehicles(rid)}
    assert steps["v01"].state == "shadow" and steps["v02"].state == ro.PENDING
    assert cloud_db.set_model_status("f1", "v01", report(6, "active", new, active=new, healthy=True)) == "stored"
    assert cloud_db.set_model_status("f1", "v02", report(1, "rejected", new, active=old, reason="auc fell")) == \
        "stored"
    steps = {v.vehicle: v for v in cloud_db.rollout_vehicles(rid)}
    assert (steps["v01"].state, steps["v01"].healthy) == ("active", True)
    assert (steps["v02"].state, steps["v02"].reason) == ("rejected", "auc fell")
    # a report about another package says nothing of this rollout
    assert cloud_db.set_model_status("f1", "v02", report(2, "downloading", old, active=old)) == "stored"
    assert {v.vehicle: v.state for v in cloud_db.rollout_vehicles(rid)}["v02"] == "rejected"
    assert cloud_db.vehicle_models()["v02"].state == "downloading"  # but it is the vehicle's latest
    # a vehicle the database did not know is known now (its fleet from the topic)
    assert ("v02", "f1") in cloud_db.known_vehicles("f1")


def test_a_vehicle_already_running_the_model_starts_active(cloud_db: FleetDB) -> None:
    info, data = package("1.1.0")
    cloud_db.publish_package(info, data)
    cloud_db.set_model_status("f1", "v01", report(3, "active", None, active=info, healthy=True))
    cloud_db.set_model_status("f1", "v02", report(3, "rejected", info, reason="old news"))
    rid = cloud_db.create_rollout(info, [vehicles(2)], mode="update", plan={}, success_threshold=1.0,
                                  error_threshold=0.0, by="alice")
    steps = {v.vehicle: (v.state, v.healthy) for v in cloud_db.rollout_vehicles(rid)}
    # only "already runs it" carries over: an old rejection is the vehicle's to repeat for this rollout or not
    assert steps == {"v01": ("active", True), "v02": (ro.PENDING, None)}


def test_status_report_and_fleet_model_objects(cloud_db: FleetDB) -> None:
    old, old_data = package("1.0.0")
    new, new_data = package("1.1.0")
    for i, d in ((old, old_data), (new, new_data)):
        cloud_db.publish_package(i, d)
    cloud_db.set_status("f1", "v01", {"state": "online"})
    cloud_db.set_status("f1", "v02", {"state": "online"})
    rid = cloud_db.create_rollout(new, [vehicles(1), [("v02", "f1")]], mode="update", plan={"canary": 1},
                                  success_threshold=1.0, error_threshold=0.0, by="alice")
    with cloud_db.rollout_tx() as tx:
        tx.mark_sent(rid, ["v01"])
    cloud_db.set_model_status("f1", "v01", report(1, "rejected", new, active=old, reason="auc fell"))
    r = Reports(cloud_db).rollout()
    assert r is not None and r["id"] == rid and r["current_wave"] == 1
    assert [w["progress"] for w in r["waves"]] == [{"total": 1, "sent": 1, "active_healthy": 0, "failed": 1},
                                                  {"total": 1, "sent": 0, "active_healthy": 0, "failed": 0}]
    assert r["failed"] == [{"vehicle": "v01", "wave": 1, "state": "rejected", "reason": "auc fell"}]
    rows = {row["vehicle"]: row["model"] for row in Reports(cloud_db).fleet()}
    assert rows["v01"] == {"active": {"name": old.name, "version": "1.0.0"},
                           "desired": {"name": new.name, "version": "1.1.0", "rollout": rid},
                           "state": "rejected", "reason": "auc fell"}
    assert rows["v02"] == {"active": None, "desired": None, "state": "", "reason": ""}  # not sent yet
    assert [x["id"] for x in Reports(cloud_db).rollouts()] == [rid]


def test_an_aborted_rollout_clears_only_what_is_still_its_own(cloud_db: FleetDB) -> None:
    """The controller's work list: an aborted rollout's sent, not active vehicles are to be cleared, unless a later
    rollout has sent its own desired model since (clearing would erase that one)."""
    a, a_data = package("1.1.0")
    b, b_data = package("1.2.0")
    for info, data in ((a, a_data), (b, b_data)):
        cloud_db.publish_package(info, data)
    kw: dict[str, Any] = {"mode": "update", "plan": {}, "success_threshold": 1.0, "error_threshold": 0.5,
                          "by": "alice"}
    r1 = cloud_db.create_rollout(a, [vehicles(3)], **kw)
    with cloud_db.rollout_tx() as tx:
        tx.mark_sent(r1, ["v01", "v02", "v03"])
    cloud_db.set_model_status("f1", "v03", report(1, "active", a, active=a, healthy=True))
    cloud_db.change_rollout(r1, "abort", "bob")
    r2 = cloud_db.create_rollout(b, [[("v02", "f1")]], **kw)
    work, to_clear = cloud_db.rollout_work()
    assert [(r.id, [v.vehicle for v in vs]) for r, vs in work] == [(r2, ["v02"])]
    assert to_clear == [(r1, "v01", "f1", False), (r1, "v02", "f1", False)]  # v03 runs it: its desired stays
    with cloud_db.rollout_tx() as tx:
        tx.mark_sent(r2, ["v02"])
    assert cloud_db.rollout_work()[1] == [(r1, "v01", "f1", False), (r1, "v02", "f1", True)]
    with cloud_db.rollout_tx() as tx:
        tx.mark_cleared(r1, ["v01", "v02"])
    assert cloud_db.rollout_work()[1] == []
    desired = cloud_db.desired_models()
    assert {v: (r.id, r.version) for v, r in desired.items()} == {"v02": (r2, "1.2.0"), "v03": (r1, "1.1.0")}
