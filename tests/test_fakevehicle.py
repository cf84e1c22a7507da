"""The fake vehicle (harvester_testing/fakevehicle.py) against a real Mosquitto and a stand-in for the cloud that
answers `model/get` with the package's chunks: a vehicle that connects while its desired model is retained
downloads it and reports each step, however early paho's thread delivers that retained message (before `connect()`
has returned included: it follows the SUBACK at once, and paho's thread may well run ahead of the caller)."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from harvester_common import modelwire as mw
from harvester_common import wire
from harvester_testing.broker import MosquittoBroker
from harvester_testing.fakevehicle import FakeVehicle

CHUNK_BYTES = 1024
PACKAGE = os.urandom(40 * CHUNK_BYTES + 17)  # 41 chunks: three requests of at most 16


def wait_for(cond: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class ChunkServer:
    """The cloud's part reduced to what the fake needs: the retained desired message, and chunks on request."""

    def __init__(self, broker: MosquittoBroker, package: bytes) -> None:
        self.package = package
        self.gets: list[mw.GetRequest] = []
        ready = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="chunk-server", protocol=mqtt.MQTTv5)
        self.c.on_connect = lambda cl, *a: cl.subscribe(f"fleet/+/vehicle/+/{mw.LEAF_GET}", qos=1)
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.on_message = self._on_get
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        assert ready.wait(10)

    def _on_get(self, c: mqtt.Client, u: Any, m: mqtt.MQTTMessage) -> None:
        fleet, vehicle, _ = wire.parse_vehicle_topic(m.topic) or ("", "", "")
        g = mw.decode_get(bytes(m.payload))
        self.gets.append(g)
        for index in range(g.first, g.first + g.count):
            chunk = mw.chunk_of(self.package, g.package_sha256, index, CHUNK_BYTES)
            c.publish(wire.vehicle_topic(fleet, vehicle, mw.LEAF_CHUNK), mw.encode_chunk(chunk), qos=1)

    def retain_desired(self, fleet: str, vehicle: str) -> mw.Desired:
        d = mw.desired_for(self.package, "m", "2.0.0", "0123456789abcdef", rollout="1", chunk_bytes=CHUNK_BYTES,
                           issued_at=1.0)
        self.c.publish(wire.vehicle_topic(fleet, vehicle, mw.LEAF_DESIRED), mw.encode_desired(d), qos=1,
                       retain=True).wait_for_publish(10)
        return d

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_a_retained_desired_model_delivered_before_connect_returns_is_downloaded(
        broker: MosquittoBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    server = ChunkServer(broker, PACKAGE)
    d = server.retain_desired("f1", "v03")
    v = FakeVehicle(broker.host, broker.port, "f1", "v03", connect=False,
                    model_sha256_of=lambda p: hashlib.sha256(p).hexdigest())
    loop_start = mqtt.Client.loop_start

    def loop_start_then_yield(c: mqtt.Client) -> Any:
        # The caller's thread loses the CPU as soon as paho's thread exists, until the retained message is handled:
        # what a loaded machine does now and then (the late vehicle's rollout test failed ~1 run in 10 so).
        rc = loop_start(c)
        wait_for(lambda: bool(v.desired_seen), "the retained desired message", 10)
        return rc

    monkeypatch.setattr(mqtt.Client, "loop_start", loop_start_then_yield)
    try:
        v.connect()
        monkeypatch.undo()
        wait_for(lambda: [s.state for s in v.statuses][-1:] == ["active"] and v.statuses[-1].healthy is True,
                 f"the download and the switch (statuses so far {[s.state for s in v.statuses]}, errors {v.errors})")
        assert v.errors == []
        assert v.desired_seen == [d] and v.packages == {d.package_sha256: PACKAGE}
        assert [s.state for s in v.statuses] == ["downloading", "verified", "active", "active"]
        assert sum(g.count for g in server.gets) == d.chunks
    finally:
        v.close()
        server.close()
