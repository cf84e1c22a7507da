"""TLS with client certificates against a real Mosquitto (`require_certificate true`), PKI made by the test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import MqttConfig, VehicleConfig
from agent.store import Store
from agent.uplink import Uplink
from cloud_sync.config import CloudConfig
from cloud_sync.db_sqlite import CloudDB
from cloud_sync.receiver import Receiver
from cloud_sync.reports import Reports
from harvester_testing.broker import MosquittoBroker, free_port
from harvester_testing.tls import Pki
from tests.test_uplink import _cols, wait_for


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[MosquittoBroker, Pki]]:
    pki = Pki(tmp_path / "pki")
    port = free_port()
    b = MosquittoBroker(port=port, extra_conf=pki.mosquitto_listener(port, pki.issue("localhost", server=True)),
                        workdir=tmp_path / "mosq")
    b.start()
    yield b, pki
    b.close()


def test_vehicle_syncs_over_tls_with_its_certificate(tls_broker: tuple[MosquittoBroker, Pki],
                                                      tmp_path: Path) -> None:
    broker, pki = tls_broker
    cloud_cert = pki.issue("cloud-sync")
    cloud = CloudConfig.model_validate({
        "mqtt": {"host": "localhost", "port": broker.port, "tls": True, "ca_file": str(pki.ca),
                 "cert_file": str(cloud_cert.cert), "key_file": str(cloud_cert.key)},
        "db": {"path": str(tmp_path / "cloud.sqlite")}})
    db = CloudDB(cloud.db.path)
    rx = Receiver(cloud, db)
    rx.start()
    veh = pki.issue("v1")
    store = Store(tmp_path / "v.sqlite")
    store.append_samples(_cols(1000))
    cfg = MqttConfig(host="localhost", port=broker.port, tls=True, ca_file=pki.ca, cert_file=veh.cert,
                     key_file=veh.key, batch_max_age_s=0.1)
    up = Uplink(cfg, VehicleConfig(fleet="f1", id="v1"), store)
    up.start()
    try:
        assert rx.connected.wait(10)
        wait_for(lambda: store.status()["backlog_records"] == 0, what="drain over TLS")
        assert Reports(db).stats()[0].records["samples"] == 1000
    finally:
        up.stop()
        rx.stop()
        store.close()
        db.close()


def _connect_rc(port: int, **tls: str) -> object:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="probe", protocol=mqtt.MQTTv5)
    if tls:
        c.tls_set(**tls)
    try:
        c.connect("localhost", port, 5)
        rc = c.loop(timeout=2.0)
        for _ in range(20):
            if c.is_connected() or rc != mqtt.MQTT_ERR_SUCCESS:
                break
            rc = c.loop(timeout=0.2)
        return c.is_connected()
    except OSError as e:
        return e
    finally:
        c.disconnect()


def test_plain_tcp_and_certificateless_clients_are_refused(tls_broker: tuple[MosquittoBroker, Pki]) -> None:
    broker, pki = tls_broker
    assert _connect_rc(broker.port) is not True  # plain TCP to a TLS listener
    assert _connect_rc(broker.port, ca_certs=str(pki.ca)) is not True  # TLS, but no client certificate
    other = Pki(pki.folder / "other")  # a certificate from a CA the broker does not trust
    rogue = other.issue("v1")
    assert _connect_rc(broker.port, ca_certs=str(pki.ca), certfile=str(rogue.cert), keyfile=str(rogue.key)) is not True
    good = pki.issue("v2")
    assert _connect_rc(broker.port, ca_certs=str(pki.ca), certfile=str(good.cert), keyfile=str(good.key)) is True
