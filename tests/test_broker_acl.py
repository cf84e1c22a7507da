"""Broker security as committed: a real Mosquitto runs docs/deploy/mosquitto.conf (only paths and the port swapped
for the test's) with docs/deploy/mosquitto.acl, TLS and certificates from a test CA. Vehicle A can neither publish
as vehicle B nor read B's acks and commands; strangers cannot connect at all."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.testing.broker import MosquittoBroker, free_port
from agent.testing.tls import CertFiles, Pki

DEPLOY = Path(__file__).resolve().parents[1] / "docs" / "deploy"
WAIT_S = 5.0


def committed_conf(port: int, pki: Pki, server: CertFiles, workdir: Path) -> str:
    """docs/deploy/mosquitto.conf with the test's port, certificates, ACL path and folders."""
    swap = {
        "listener": f"listener {port} 127.0.0.1",
        "cafile": f"cafile {pki.ca}",
        "certfile": f"certfile {server.cert}",
        "keyfile": f"keyfile {server.key}",
        "acl_file": f"acl_file {DEPLOY / 'mosquitto.acl'}",
        "persistence_location": f"persistence_location {workdir}/",
        "log_dest": "log_dest stderr",
    }
    out, seen = [], set()
    for line in (DEPLOY / "mosquitto.conf").read_text().splitlines():
        key = line.split(" ", 1)[0]
        if key in swap:
            seen.add(key)
            out.append(swap[key])
        elif line and not line.startswith("#"):
            out.append(line)
    assert seen == set(swap), f"docs/deploy/mosquitto.conf lacks {set(swap) - seen}"
    return "\n".join(out)  # MosquittoBroker puts its own lines first (the user to run as, log to stderr)


@dataclass
class Client:
    c: mqtt.Client
    got: list[tuple[str, bytes]] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)
    subacks: list[list[ReasonCode]] = field(default_factory=list)
    subscribed: threading.Event = field(default_factory=threading.Event)

    def publish(self, topic: str, payload: bytes) -> mqtt.MQTTMessageInfo:
        info = self.c.publish(topic, payload, qos=1)
        info.wait_for_publish(WAIT_S)
        return info

    def subscribe(self, *filters: str) -> list[ReasonCode]:
        self.subscribed.clear()
        self.c.subscribe([(f, 1) for f in filters])
        assert self.subscribed.wait(WAIT_S)
        return self.subacks[-1]

    def wait_for(self, payload: bytes) -> None:
        deadline = threading.Event()
        for _ in range(int(WAIT_S / 0.05)):
            if any(p == payload for _, p in self.got):
                return
            deadline.wait(0.05)
        raise AssertionError(f"{payload!r} never arrived; got {self.got}")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[MosquittoBroker, Pki]]:
    pki = Pki(tmp_path / "pki")
    port = free_port()
    b = MosquittoBroker(port=port, workdir=tmp_path / "mosq",
                        extra_conf=committed_conf(port, pki, pki.issue("localhost", server=True), tmp_path / "mosq"))
    b.start()
    yield b, pki
    b.close()


def connect(broker: MosquittoBroker, certs: CertFiles | None, ca: Path, cid: str) -> Client | str:
    """A connected client, or the reason it could not connect."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
    c.tls_set(ca_certs=str(ca), certfile=str(certs.cert) if certs else None, keyfile=str(certs.key) if certs else None)
    cl = Client(c)
    ok, ended = threading.Event(), threading.Event()
    c.on_connect = lambda *a: ok.set() if not a[3].is_failure else ended.set()
    c.on_disconnect = lambda *a: ended.set()  # a stranger is cut off during or right after the handshake

    def on_message(_c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        cl.got.append((m.topic, bytes(m.payload)))
        cl.arrived.set()

    def on_subscribe(_c: mqtt.Client, _u: object, _mid: int, codes: list[ReasonCode], _p: object) -> None:
        cl.subacks.append(codes)
        cl.subscribed.set()

    c.on_message = on_message
    c.on_subscribe = on_subscribe
    try:
        c.connect("localhost", broker.port)
    except OSError as e:  # the TLS handshake itself failed
        return f"refused: {e}"
    c.loop_start()
    for _ in range(int(WAIT_S / 0.02)):
        if ok.is_set() or ended.is_set():
            break
        ended.wait(0.02)
    if not ok.is_set():
        c.loop_stop()
        return "refused: no CONNACK"
    return cl


def test_a_vehicle_is_confined_to_its_own_subtree(fleet: tuple[MosquittoBroker, Pki]) -> None:
    broker, pki = fleet
    cloud = connect(broker, pki.issue("cloud-sync"), pki.ca, "rx-1")
    a = connect(broker, pki.issue("veh-a"), pki.ca, "veh-a")
    b = connect(broker, pki.issue("veh-b"), pki.ca, "veh-b")
    assert isinstance(cloud, Client) and isinstance(a, Client) and isinstance(b, Client)
    try:
        codes = cloud.subscribe(*(f"$share/cloud/fleet/+/vehicle/+/{leaf}" for leaf in
                                  ("telemetry", "alerts", "events", "status")))
        assert all(not c.is_failure for c in codes)

        # A's own uplink arrives at the cloud through the shared subscription.
        a.publish("fleet/f1/vehicle/veh-a/telemetry", b"a-own-1")
        cloud.wait_for(b"a-own-1")

        # A publishing as B, on every leaf and in another fleet's tree: the broker drops it and the cloud receives
        # none of it. The control message after them proves delivery was still flowing.
        forged = [f"fleet/{fl}/vehicle/veh-b/{leaf}" for fl in ("f1", "f2")
                  for leaf in ("telemetry", "alerts", "events", "status")]
        for i, topic in enumerate(forged):
            a.publish(topic, f"forged-{i}".encode())
        a.publish("fleet/f1/vehicle/veh-a/alerts", b"a-own-2")
        cloud.wait_for(b"a-own-2")
        assert not [p for _, p in cloud.got if p.startswith(b"forged")]

        # A cannot write the cloud's side either: acks and commands to B, or to itself.
        for topic in ("fleet/f1/vehicle/veh-b/ack", "fleet/f1/vehicle/veh-b/cmd/model", "fleet/f1/vehicle/veh-a/ack"):
            a.publish(topic, b"fake-ack")

        # A subscribing to B's acks and commands, or to everything: whatever the SUBACK says, nothing of B's reaches
        # A, while B gets its own (positive control) and A gets its own.
        # (Mosquitto 2.0.11 grants these SUBACKs and filters at delivery, which is what is checked below.)
        a.subscribe("fleet/f1/vehicle/veh-b/ack", "fleet/f1/vehicle/veh-b/cmd/#", "fleet/#", "#")
        b.subscribe("fleet/f1/vehicle/veh-b/ack", "fleet/f1/vehicle/veh-b/cmd/#")
        assert all(not c.is_failure for c in a.subscribe("fleet/f1/vehicle/veh-a/ack"))
        assert not [p for _, p in b.got if p == b"fake-ack"]  # A's fake acks never reached B
        cloud.publish("fleet/f1/vehicle/veh-b/ack", b"ack-for-b")
        cloud.publish("fleet/f1/vehicle/veh-b/cmd/model", b"cmd-for-b")
        cloud.publish("fleet/f1/vehicle/veh-a/ack", b"ack-for-a")
        b.wait_for(b"ack-for-b")
        b.wait_for(b"cmd-for-b")
        a.wait_for(b"ack-for-a")
        assert {p for _, p in a.got} == {b"ack-for-a"}, a.got  # once per matching filter, nothing else
        # Nor can B read the cloud's uplink from A.
        assert not [p for _, p in b.got if p.startswith(b"a-own")]
    finally:
        for cl in (cloud, a, b):
            cl.c.loop_stop()
            cl.c.disconnect()


def test_strangers_cannot_connect(fleet: tuple[MosquittoBroker, Pki], tmp_path: Path) -> None:
    broker, pki = fleet
    assert isinstance(connect(broker, None, pki.ca, "no-cert"), str)
    other = Pki(tmp_path / "other-ca")
    assert isinstance(connect(broker, other.issue("veh-a"), pki.ca, "wrong-ca"), str)
    good = connect(broker, pki.issue("veh-c"), pki.ca, "veh-c")  # control: the same code path connects
    assert isinstance(good, Client)
    good.c.loop_stop()
    good.c.disconnect()
