"""Model rollouts end to end, with a real Mosquitto and both database engines: packages signed with real Ed25519
keys and published through the command (refused when tampered, signed by an unknown key, or a version already
published as another package); rollouts to simulated vehicles (harvester_testing/fakevehicle.py: real paho clients
that read their retained desired model, fetch the chunks, check every hash and report their steps) driven by the
controller's ticks: a canary's failure halts the rollout and names the vehicle and its reason, waves advance on
success, pause/resume/abort (abort clears the desired model), a vehicle offline during the rollout gets its
retained desired model when it connects; and hostile `model/get` / `model/status` messages counted by reason,
never holding up a good one."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from cloud_sync.cli import main as cloud_main
from cloud_sync.config import CloudConfig
from cloud_sync.controller import Controller
from cloud_sync.db import FleetDB
from cloud_sync.db_sqlite import CloudDB
from cloud_sync.receiver import Receiver, _Msg
from cloud_sync.reports import Reports
from harvester_common import modelpkg, wire
from harvester_common import modelwire as mw
from harvester_testing.broker import MosquittoBroker
from harvester_testing.fakevehicle import FakeVehicle
from harvester_testing.tomlw import dumps as toml_dumps

ROOT = Path(__file__).resolve().parents[1]
MODEL = (ROOT / "models" / "harvester-anomaly.int8.onnx").read_bytes()
CARD = (ROOT / "models" / "harvester-anomaly.card.json").read_bytes()
NAME = "harvester-anomaly"
CHUNK_BYTES = 8192  # the shipped model and card make a package of ~20 chunks: two requests of 16 at most
OLD_ACTIVE = {"name": NAME, "version": "1.0.0", "sha256": hashlib.sha256(b"the model before").hexdigest()}


def signed(key: Ed25519PrivateKey, version: str, model: bytes = MODEL) -> bytes:
    return modelpkg.build_package(model, CARD, key, name=NAME, version=version, contract={"model_version": version},
                                  min_agent_version="0.1.0", created=1_790_000_000.0)


def drive(ctl: Controller, cond: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Tick the controller until `cond` holds (the test is the controller's clock)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        ctl.tick()
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_for(cond: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Cloud:
    broker: MosquittoBroker
    db: FleetDB
    cfg: CloudConfig
    config: Path
    rx: Receiver
    ctl: Controller
    key: Ed25519PrivateKey
    tmp: Path

    def cli(self, *args: str) -> int:
        return cloud_main([*args, "--config", str(self.config)])

    def publish(self, version: str, model: bytes = MODEL) -> Path:
        path = self.tmp / f"{NAME}-{version}.hvmp"
        path.write_bytes(signed(self.key, version, model))
        assert self.cli("model", "publish", str(path), "--by", "alice") == 0
        return path

    def vehicles(self, n: int, **kw: Any) -> list[FakeVehicle]:
        return [FakeVehicle(self.broker.host, self.broker.port, "f1", f"v{i:02d}", active=dict(OLD_ACTIVE), **kw)
                for i in range(1, n + 1)]

    def status(self, capsys: pytest.CaptureFixture[str], rollout: int | None = None) -> dict[str, Any]:
        capsys.readouterr()
        assert self.cli("rollout", "status", "--json", *(["--id", str(rollout)] if rollout else [])) == 0
        out: dict[str, Any] = json.loads(capsys.readouterr().out)
        return out

    def state(self, rollout: int) -> str:
        info = self.db.rollout(rollout)
        assert info is not None
        return info.state


@pytest.fixture
def cloud(broker: MosquittoBroker, cloud_db: FleetDB, tmp_path: Path) -> Iterator[Cloud]:
    priv, pub, _ = modelpkg.generate_keypair(tmp_path / "keys")
    db_section = ({"url": cloud_db.url} if not isinstance(cloud_db, CloudDB)  # type: ignore[attr-defined]
                  else {"path": str(cloud_db.path)})
    raw = {"mqtt": {"host": broker.host, "port": broker.port, "client_id": "cs-rollouts", "fleet": "f1"},
           "db": db_section, "rollout": {"trusted_keys": [str(pub)], "chunk_bytes": CHUNK_BYTES}}
    config = tmp_path / "cloud.toml"
    config.write_text(toml_dumps(raw))
    cfg = CloudConfig.model_validate(raw)
    rx = Receiver(cfg, cloud_db)
    rx.start()
    assert rx.connected.wait(10)
    ctl = Controller(cfg, cloud_db, rx.client, rx.connected)
    try:
        yield Cloud(broker, cloud_db, cfg, config, rx, ctl, modelpkg.load_private_key(priv), tmp_path)
    finally:
        rx.stop()


def close_all(vs: list[FakeVehicle]) -> None:
    for v in vs:
        v.close()


def retained_desired(broker: MosquittoBroker, vehicles: list[str]) -> dict[str, mw.Desired | None]:
    """What a vehicle connecting now would get on `model/desired`: a fresh client's view of the retained messages."""
    got: dict[str, mw.Desired | None] = {}
    done = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="retained-reader", protocol=mqtt.MQTTv5)

    def on_message(cl: mqtt.Client, u: Any, m: mqtt.MQTTMessage) -> None:
        got[m.topic.split("/")[3]] = mw.decode_desired(bytes(m.payload))

    c.on_message = on_message
    c.on_subscribe = lambda *a: done.set()
    c.on_connect = lambda cl, *a: cl.subscribe([(wire.vehicle_topic("f1", v, mw.LEAF_DESIRED), 1) for v in vehicles])
    c.connect(broker.host, broker.port)
    c.loop_start()
    assert done.wait(10)
    time.sleep(0.5)  # retained messages follow the SUBACK at once; a vehicle without one gets nothing at all
    c.disconnect()
    c.loop_stop()
    return got


# --- the registry --------------------------------------------------------------------------------------------


def test_publish_verifies_and_a_version_stands_for_one_package(cloud: Cloud, capsys: pytest.CaptureFixture[str]
                                                               ) -> None:
    path = cloud.publish("1.1.0")
    assert "published harvester-anomaly 1.1.0" in capsys.readouterr().out
    assert cloud.cli("model", "publish", str(path)) == 0  # the same package again: nothing changes
    assert "is published already: nothing changed" in capsys.readouterr().out

    tampered = bytearray(path.read_bytes())
    tampered[len(tampered) // 2] ^= 1
    (cloud.tmp / "tampered.hvmp").write_bytes(tampered)
    assert cloud.cli("model", "publish", str(cloud.tmp / "tampered.hvmp")) == 2
    assert "refused (bad_signature)" in capsys.readouterr().err

    stranger = Ed25519PrivateKey.generate()
    (cloud.tmp / "stranger.hvmp").write_bytes(signed(stranger, "1.2.0"))
    assert cloud.cli("model", "publish", str(cloud.tmp / "stranger.hvmp")) == 2
    assert "refused (unknown_key)" in capsys.readouterr().err

    (cloud.tmp / "again.hvmp").write_bytes(signed(cloud.key, "1.1.0", MODEL + b"\0"))  # same version, other bytes
    assert cloud.cli("model", "publish", str(cloud.tmp / "again.hvmp")) == 2
    assert "1.1.0 is published already as another package" in capsys.readouterr().err

    assert cloud.cli("model", "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)["packages"]
    assert [(p["name"], p["version"], p["published_by"]) for p in listed] == [(NAME, "1.1.0", "alice")]
    assert listed[0]["package_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert listed[0]["model_sha256"] == hashlib.sha256(MODEL).hexdigest()
    assert cloud.rx.stats["rejected:unknown_package"] == 0


# --- rollouts ------------------------------------------------------------------------------------------------


def test_a_failing_canary_halts_the_rollout_and_names_the_vehicle(cloud: Cloud,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cloud.publish("1.1.0")
    vs = cloud.vehicles(10)
    vs[0].outcome, vs[0].reason = "reject", "shadow: 40% more alerts than the active model"
    try:
        ids = ",".join(v.vehicle for v in vs)
        assert cloud.cli("rollout", "start", NAME, "1.1.0", "--vehicles", ids, "--canary", "1",
                         "--waves", "50,100") == 0
        assert "in 3 waves (1, 5, 4)" in capsys.readouterr().out
        drive(cloud.ctl, lambda: cloud.state(1) == "halted", "the rollout to halt")
        r = cloud.status(capsys)
        assert r["state"] == "halted" and "v01 rejected (shadow: 40% more alerts" in r["reason"]
        assert r["failed"] == [{"vehicle": "v01", "wave": 1, "state": "rejected",
                                "reason": "shadow: 40% more alerts than the active model"}]
        assert [w["progress"]["sent"] for w in r["waves"]] == [1, 0, 0]
        for _ in range(3):
            cloud.ctl.tick()  # halted: nothing more is sent
        assert all(v.desired_seen == [] for v in vs[1:])
        capsys.readouterr()
        assert cloud.cli("rollout", "status") == 0
        text = capsys.readouterr().out
        assert "halted" in text and "v01" in text and "shadow: 40% more alerts" in text
        assert vs[0].errors == [] and hashlib.sha256(next(iter(vs[0].packages.values()))).hexdigest() == \
            vs[0].desired_seen[0].package_sha256  # type: ignore[union-attr]
    finally:
        close_all(vs)


def test_waves_advance_on_success_until_done(cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    path = cloud.publish("1.1.0")
    vs = cloud.vehicles(10)
    try:
        for v in vs:  # known to the database: the rollout's default is every vehicle of the config's fleet
            cloud.db.set_status("f1", v.vehicle, {"state": "online"})
        assert cloud.cli("rollout", "start", NAME, "1.1.0", "--canary", "1", "--waves", "50,100") == 0
        drive(cloud.ctl, lambda: cloud.state(1) == "done", "the rollout to finish")
        r = cloud.status(capsys, 1)
        assert [w["progress"] for w in r["waves"]] == [
            {"total": n, "sent": n, "active_healthy": n, "failed": 0} for n in (1, 5, 4)]
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        for v in vs:
            assert v.errors == [] and list(v.packages) == [sha]
            assert [d.rollout for d in v.desired_seen if d] == ["1"]  # sent once; the retained copy is the same
            assert v.active is not None and v.active["version"] == "1.1.0"
        rows = {row["vehicle"]: row["model"] for row in Reports(cloud.db).fleet()}
        wait_for(lambda: all(
            m["active"] == {"name": NAME, "version": "1.1.0"} for m in
            ({row["vehicle"]: row["model"] for row in Reports(cloud.db).fleet()}).values()), "every report stored")
        rows = {row["vehicle"]: row["model"] for row in Reports(cloud.db).fleet()}
        assert rows["v05"] == {"active": {"name": NAME, "version": "1.1.0"},
                               "desired": {"name": NAME, "version": "1.1.0", "rollout": 1},
                               "state": "active", "reason": ""}
        capsys.readouterr()
        assert cloud.cli("model", "rollback", "--vehicles", "v01,v02", "--to", "1.1.0") == 0
        r = cloud.status(capsys)
        assert (r["id"], r["mode"], r["success_threshold"], len(r["waves"])) == (2, "rollback", 1.0, 1)
        drive(cloud.ctl, lambda: cloud.state(2) == "done", "a rollback to a version they run to finish")
    finally:
        close_all(vs)


def test_pause_resume_and_abort_which_clears_the_desired_model(cloud: Cloud,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    cloud.publish("1.1.0")
    vs = cloud.vehicles(4)
    vs[1].outcome = "ignore"  # downloads, then says nothing: its wave waits
    try:
        ids = ",".join(v.vehicle for v in vs)
        assert cloud.cli("rollout", "start", NAME, "1.1.0", "--vehicles", ids, "--canary", "2") == 0
        assert cloud.cli("rollout", "pause") == 0
        assert "running -> paused" in capsys.readouterr().out
        for _ in range(3):
            cloud.ctl.tick()
        assert all(v.desired_seen == [] for v in vs)  # paused: nothing sent
        assert cloud.cli("rollout", "resume", "--id", "1") == 0
        drive(cloud.ctl, lambda: vs[0].statuses[-1:] != [] and vs[0].statuses[-1].healthy is True
              and len(vs[1].packages) == 1, "the canary wave to run")
        drive(cloud.ctl, lambda: {v["vehicle"]: v["state"] for v in cloud.status(capsys)["waves"][0]["vehicles"]}
              == {"v01": "active", "v02": "verified"}, "the reports to be folded")
        assert cloud.state(1) == "running"  # 1 of 2 healthy: below 0.9, waiting
        assert cloud.cli("rollout", "abort") == 0
        assert "running -> aborted" in capsys.readouterr().out
        drive(cloud.ctl, lambda: vs[1].desired_seen[-1:] == [None], "v02's desired model to be cleared")
        assert cloud.cli("rollout", "resume") == 2
        assert "is aborted: it cannot resume" in capsys.readouterr().err
        retained = retained_desired(cloud.broker, ["v01", "v02", "v03", "v04"])
        # v01 runs it: its desired model stays; v02's is cleared (nothing retained); v03, v04 were never sent one
        assert set(retained) == {"v01"} and retained["v01"] is not None and retained["v01"].version == "1.1.0"
        assert vs[2].desired_seen == [] and vs[3].desired_seen == []
        r = cloud.status(capsys)
        assert r["state"] == "aborted" and r["reason"].startswith("aborted by")
        # the vehicles are free again: a new rollout may take them
        assert cloud.cli("rollout", "start", NAME, "1.1.0", "--vehicles", "v02,v03") == 0
    finally:
        close_all(vs)


def test_a_vehicle_offline_during_the_rollout_gets_its_desired_model_when_it_connects(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    path = cloud.publish("1.1.0")
    vs = cloud.vehicles(2)
    late = FakeVehicle(cloud.broker.host, cloud.broker.port, "f1", "v03", active=dict(OLD_ACTIVE), connect=False)
    try:
        assert cloud.cli("rollout", "start", NAME, "1.1.0", "--vehicles", "v01,v02,v03",
                         "--success-threshold", "1.0") == 0
        drive(cloud.ctl, lambda: sum(w["progress"]["active_healthy"] for w in cloud.status(capsys)["waves"]) == 2,
              "the two online vehicles")
        assert cloud.state(1) == "running"  # waiting for v03
        late.connect()
        drive(cloud.ctl, lambda: cloud.state(1) == "done", "the late vehicle to finish the rollout")
        assert late.errors == [] and list(late.packages) == [hashlib.sha256(path.read_bytes()).hexdigest()]
    finally:
        close_all([*vs, late])


def test_a_second_rollout_over_the_same_vehicles_and_bad_requests_are_refused(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    cloud.publish("1.1.0")
    assert cloud.cli("rollout", "start", NAME, "9.9.9", "--vehicles", "v01") == 2
    assert "no package harvester-anomaly 9.9.9" in capsys.readouterr().err
    assert cloud.cli("rollout", "start", NAME, "1.1.0") == 2  # the database knows no vehicle yet
    assert "knows no vehicle in fleet f1" in capsys.readouterr().err
    assert cloud.cli("rollout", "start", NAME, "1.1.0", "--vehicles", "v01,v02") == 0
    assert cloud.cli("rollout", "start", NAME, "1.1.0", "--vehicles", "v02,v03") == 2
    assert "1 of these vehicles are in rollout 1 (running): v02" in capsys.readouterr().err
    assert cloud.cli("rollout", "start", NAME, "1.1.0", "--vehicles", "v03", "--waves", "50") == 2
    assert "the last wave percentage must be 100" in capsys.readouterr().err
    assert cloud.cli("model", "rollback", "--vehicles", "v01", "--to", "1.0.0") == 2
    assert "no package of version 1.0.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cloud.cli("rollout", "start", NAME, "1.1.0", "--error-threshold", "1.0")


# --- hostile messages ----------------------------------------------------------------------------------------


class Listener:
    """Records what arrives on some topics."""

    def __init__(self, broker: MosquittoBroker, topics: list[str]) -> None:
        self.got: list[tuple[str, bytes]] = []
        ready = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="listener", protocol=mqtt.MQTTv5)
        self.c.on_connect = lambda cl, *a: cl.subscribe([(t, 1) for t in topics])
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.on_message = lambda cl, u, m: self.got.append((m.topic, bytes(m.payload)))
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        assert ready.wait(10)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_hostile_model_messages_are_counted_and_never_hold_up_a_good_one(cloud: Cloud) -> None:
    path = cloud.publish("1.1.0")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    chunks = mw.chunk_count(path.stat().st_size, CHUNK_BYTES)
    good = wire.vehicle_topic("f1", "good", mw.LEAF_CHUNK)
    ls = Listener(cloud.broker, ["fleet/f1/vehicle/+/model/chunk"])
    get, status = (wire.vehicle_topic("f1", "bad", leaf) for leaf in (mw.LEAF_GET, mw.LEAF_STATUS))

    def g(**over: Any) -> bytes:
        return json.dumps({"schema": 1, "package_sha256": sha, "first": 0, "count": 1, **over}).encode()

    def s(seq: int, **over: Any) -> bytes:
        return json.dumps({"schema": 1, "state": "downloading", "seq": seq, "ts": 1.0, **over}).encode()

    hostile = [
        (get, b"\x00\xffHVCK not json", "bad_model_get"),
        (get, g(schema=2), "bad_model_get"),
        (get, g(count=mw.MAX_GET_COUNT + 1), "bad_model_get"),
        (get, g(first=-1), "bad_model_get"),
        (get, b'{"schema": 1, "package_sha256": "' + b"[" * 5000 + b'"}', "oversized"),
        (get, g(package_sha256="f" * 64), "unknown_package"),
        (get, g(first=chunks - 1, count=2), "chunk_out_of_range"),
        (get, g(first=mw.MAX_CHUNKS - 1), "chunk_out_of_range"),
        (status, b"[" * 100 + b"]" * 100, "bad_model_status"),
        (status, s(1, state="exploded"), "bad_model_status"),
        (status, s(1, schema=0), "bad_model_status"),
        (status, s(10), None),  # a good one...
        (status, s(5), "stale_model_status"),  # ...then an older one: a replay, dropped
        (status, s(10), None),  # the same again (a retained copy delivered anew): a duplicate, not a refusal
        (wire.vehicle_topic("f1", "b@d", mw.LEAF_GET), g(), "bad_id"),
    ]
    try:
        for topic, payload, _ in hostile:
            ls.publish(topic, payload)
        for first in range(0, chunks, mw.MAX_GET_COUNT):
            ls.publish(wire.vehicle_topic("f1", "good", mw.LEAF_GET),
                       g(first=first, count=min(mw.MAX_GET_COUNT, chunks - first)))
        wait_for(lambda: sum(t == good for t, _ in ls.got) == chunks, "the good request's chunks")
        data = b"".join(mw.decode_chunk(p).data for t, p in sorted(
            ((t, p) for t, p in ls.got if t == good), key=lambda x: mw.decode_chunk(x[1]).index))
        assert data == path.read_bytes()
        assert {t for t, _ in ls.got} == {good}  # nothing was sent to the bad vehicle
        expected: dict[str, int] = {}
        for _, _, reason in hostile:
            if reason:
                expected[reason] = expected.get(reason, 0) + 1
        wait_for(lambda: Reports(cloud.db).rejected() == expected, "every refusal counted")
        assert {k.split(":", 1)[1]: n for k, n in cloud.rx.stats.items() if k.startswith("rejected:")} == expected
        assert cloud.rx.stats["model_statuses"] == 1 and cloud.rx.stats["model_status_duplicates"] == 1
        assert cloud.db.vehicle_models()["bad"].seq == 10
    finally:
        ls.close()


def test_a_flood_of_requests_is_refused_past_the_bound_not_queued_without_end(cloud: Cloud) -> None:
    """With the broker not confirming (the receiver's connection is paused in paho), chunks stay in memory: past
    `chunks_in_flight_bytes` a request is refused as busy."""
    path = cloud.publish("1.1.0")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    chunks = mw.chunk_count(path.stat().st_size, CHUNK_BYTES)
    rx = cloud.rx
    rx.cfg = rx.cfg.model_copy(update={"rollout": rx.cfg.rollout.model_copy(update={
        "chunks_in_flight_bytes": mw.MAX_GET_COUNT * mw.MAX_CHUNK_BYTES})})
    req = mw.encode_get(mw.GetRequest(sha, 0, min(chunks, mw.MAX_GET_COUNT)))
    rx.client.loop_stop()  # nothing is confirmed while paho's network loop is stopped
    try:
        msgs = [_Msg(wire.vehicle_topic("f1", f"v{i}", mw.LEAF_GET), req, 0, 0) for i in range(200)]
        assert rx._process(msgs) == []
        assert 0 < rx.stats["rejected:busy"] < 200 and rx.stats["model_gets"] + rx.stats["rejected:busy"] == 200
        in_flight = sum(n for _, n in rx._chunks_in_flight)
        assert in_flight <= mw.MAX_GET_COUNT * mw.MAX_CHUNK_BYTES + mw.MAX_GET_COUNT * CHUNK_BYTES
    finally:
        rx.client.loop_start()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=400),
                      st.builds(lambda d: json.dumps(d).encode(),
                                st.dictionaries(st.sampled_from(["schema", "package_sha256", "first", "count",
                                                                 "state", "seq", "ts", "target", "active",
                                                                 "healthy", "reason", "figures", "progress"]),
                                                st.one_of(st.integers(-2, 2**64), st.text(max_size=70),
                                                          st.none(), st.booleans(),
                                                          st.lists(st.integers(), max_size=3),
                                                          st.dictionaries(st.text(max_size=5), st.integers(),
                                                                          max_size=3)),
                                                max_size=8))),
       leaf=st.sampled_from([mw.LEAF_GET, mw.LEAF_STATUS]))
def test_fuzzed_model_messages_never_break_the_worker(tmp_path: Path, data: bytes, leaf: str) -> None:
    cfg = CloudConfig.model_validate({"db": {"path": str(tmp_path / "fuzz.sqlite")}})
    db = CloudDB(cfg.db.path)
    rx = Receiver(cfg, db)
    rx.client.ack = lambda mid, qos: None  # type: ignore[method-assign]  # no broker in this unit test
    try:
        assert rx._process([_Msg(f"fleet/f1/vehicle/v1/{leaf}", data, 1, 1)]) == []
        settled = sum(v for k, v in rx.stats.items() if k.startswith("rejected:")) + rx.stats["model_statuses"] \
            + rx.stats["model_status_cleared"] + rx.stats["model_gets"]
        assert settled == 1  # every message ends one way, counted
    finally:
        db.close()
