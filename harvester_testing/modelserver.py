"""The cloud's part of a model update, for tests: signed packages of real ONNX models, and a real MQTT client that
publishes a vehicle's retained `model/desired`, answers its `model/get` requests with chunks of the packages it
holds, and records its `model/status` reports, with faults to inject: a chunk dropped, duplicated or corrupted the
first time it is asked for, no answer at all while `answering` is clear (a cloud that went away), answers held
back until `release()` after `hold()` (a cloud that answers late), and a delay before each chunk (a slow link)."""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path
from typing import Any

import onnx
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.contract import CONTRACT_KEY
from harvester_common import modelpkg, wire
from harvester_common import modelwire as mw


def contract_of(model_path: Path) -> dict[str, Any]:
    meta = {p.key: p.value for p in onnx.load(str(model_path)).metadata_props}
    c: dict[str, Any] = json.loads(meta[CONTRACT_KEY])
    return c


def with_version(model_path: Path, version: str, out: Path) -> Path:
    """A copy of a model whose contract names another version: a new release of the same network."""
    m = onnx.load(str(model_path))
    for p in m.metadata_props:
        if p.key == CONTRACT_KEY:
            c = json.loads(p.value)
            c["model"]["version"] = version
            p.value = json.dumps(c)
    onnx.save(m, str(out))
    return out


def signed_package(model_path: Path, key: Ed25519PrivateKey, card: bytes = b'{"card": "test"}',
                   min_agent_version: str = "0.1.0") -> bytes:
    """A package of the model as `cloud-sync model sign` makes one: name, version and contract from the model."""
    c = contract_of(model_path)
    return modelpkg.build_package(Path(model_path).read_bytes(), card, key, name=c["model"]["name"],
                                  version=c["model"]["version"], contract=c, min_agent_version=min_agent_version)


def desired_of(package: bytes, rollout: str = "1", mode: str = "update", chunk_bytes: int = mw.DEFAULT_CHUNK_BYTES,
               issued_at: float = 1.0) -> mw.Desired:
    m = modelpkg.parse_package(package).manifest
    return mw.desired_for(package, m.name, m.version, m.key_id, rollout, mode, chunk_bytes, issued_at)


class ModelServer:
    """`session_expiry_s` > 0: the server's own MQTT session outlives a disconnect (as cloud_sync's does), so the
    requests a vehicle makes while the server reconnects are queued for it by a broker that kept the session."""

    def __init__(self, host: str, port: int, fleet: str, vehicle: str, chunk_bytes: int = 4096,
                 session_expiry_s: int = 0) -> None:
        self.fleet, self.vehicle = fleet, vehicle
        self.chunk_bytes = chunk_bytes
        self.packages: dict[str, bytes] = {}
        self.requests: list[mw.GetRequest] = []
        # Of those, the broker's redeliveries (DUP set): QoS 1 is at least once, and a broker restarted from its saved
        # sessions delivers again what it had not recorded as acknowledged. Answered like any other.
        self.redelivered: list[mw.GetRequest] = []
        self.statuses: list[mw.ModelStatus] = []
        self.bad_messages = 0  # get/status messages that did not decode (the vehicle must never send one)
        self.drop_once: set[int] = set()
        self.duplicate_once: set[int] = set()
        self.corrupt_once: set[int] = set()
        self.answering = threading.Event()
        self.answering.set()
        # Before each chunk: a slow link. Such answers leave from a thread of their own, one chunk at a time (sent
        # from paho's callback, they would all leave together when it returns: a burst after a silence).
        self.delay_s = 0.0
        self._slow: queue.Queue[mw.GetRequest | None] = queue.Queue()
        threading.Thread(target=self._answer_slowly, name="model-server-slow", daemon=True).start()
        self.desired: mw.Desired | None = None
        self._held: list[mw.GetRequest] | None = None  # requests kept unanswered until release(), while holding
        self._hold_from = 0
        self._lock = threading.Lock()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"model-server-{vehicle}", protocol=mqtt.MQTTv5)
        self.subscribed = threading.Event()  # requests reach it: one made before would be lost (no session yet)
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = session_expiry_s
        self.c.connect(host, port, clean_start=session_expiry_s == 0, properties=props)
        self.c.loop_start()

    def topic(self, leaf: str) -> str:
        return wire.vehicle_topic(self.fleet, self.vehicle, leaf)

    def _on_connect(self, c: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags, *a: Any) -> None:
        c.subscribe([(self.topic(mw.LEAF_GET), 1), (self.topic(mw.LEAF_STATUS), 1)])
        # A broker restarted without persistence forgot the retained message; one that kept our session kept it.
        if self.desired is not None and not flags.session_present:
            c.publish(self.topic(mw.LEAF_DESIRED), mw.encode_desired(self.desired), qos=1, retain=True)

    def _on_message(self, c: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            if msg.topic == self.topic(mw.LEAF_STATUS):
                if msg.payload:
                    with self._lock:
                        self.statuses.append(mw.decode_status(bytes(msg.payload)))
                return
            g = mw.decode_get(bytes(msg.payload))
        except mw.ModelWireError:
            self.bad_messages += 1
            return
        with self._lock:
            self.requests.append(g)
            if msg.dup:
                self.redelivered.append(g)
            if self._held is not None and g.first >= self._hold_from:
                self._held.append(g)
                return
        if not self.answering.is_set():
            return
        if self.delay_s:
            self._slow.put(g)
        else:
            self._answer(g)

    def _answer_slowly(self) -> None:
        while (g := self._slow.get()) is not None:
            self._answer(g)

    def hold(self, from_chunk: int = 0) -> None:
        """Keep the requests that arrive from now on, from chunk `from_chunk` on, unanswered until `release()`."""
        with self._lock:
            self._held = []
            self._hold_from = from_chunk

    def held(self) -> set[int]:
        """The chunk indexes asked for by the requests held now."""
        with self._lock:
            return {i for g in self._held or [] for i in range(g.first, g.first + g.count)}

    def release(self) -> None:
        """Answer the held requests (in the order they came), and answer at once from now on."""
        with self._lock:
            held, self._held = self._held or [], None
        for g in held:
            self._answer(g)

    def _answer(self, g: mw.GetRequest) -> None:
        c = self.c
        pkg = self.packages.get(g.package_sha256)
        if pkg is None:
            return
        total = mw.chunk_count(len(pkg), self.chunk_bytes)
        for i in range(g.first, min(g.first + g.count, total)):
            ch = mw.chunk_of(pkg, g.package_sha256, i, self.chunk_bytes)
            if self.delay_s:
                time.sleep(self.delay_s)
            if i in self.drop_once:
                self.drop_once.discard(i)
                continue
            if i in self.corrupt_once:
                self.corrupt_once.discard(i)
                ch = mw.Chunk(ch.package_sha256, i, total, bytes(b ^ 0xFF for b in ch.data))
            payload = mw.encode_chunk(ch)
            c.publish(self.topic(mw.LEAF_CHUNK), payload, qos=1)
            if i in self.duplicate_once:
                self.duplicate_once.discard(i)
                c.publish(self.topic(mw.LEAF_CHUNK), payload, qos=1)

    def offer(self, package: bytes, rollout: str = "1", mode: str = "update", issued_at: float = 1.0) -> mw.Desired:
        """Hold `package` and publish it as the vehicle's retained desired model."""
        d = desired_of(package, rollout, mode, self.chunk_bytes, issued_at)
        self.packages[d.package_sha256] = package
        self.desired = d
        self.c.publish(self.topic(mw.LEAF_DESIRED), mw.encode_desired(d), qos=1, retain=True).wait_for_publish(10)
        return d

    def clear(self) -> None:
        """No desired model: the retained message cleared (an empty payload)."""
        self.desired = None
        self.c.publish(self.topic(mw.LEAF_DESIRED), b"", qos=1, retain=True).wait_for_publish(10)

    def requested(self, sha: str, since: int = 0) -> list[int]:
        """Chunk indexes asked for, in order, from request number `since` on."""
        with self._lock:
            return [i for g in self.requests[since:] if g.package_sha256 == sha
                    for i in range(g.first, g.first + g.count)]

    def bytes_requested(self, sha: str, size: int, since: int = 0) -> int:
        return sum(min(self.chunk_bytes, size - i * self.chunk_bytes) for i in self.requested(sha, since))

    def latest(self) -> mw.ModelStatus | None:
        with self._lock:
            return max(self.statuses, key=lambda s: s.seq) if self.statuses else None

    def states(self) -> list[str]:
        with self._lock:
            return [s.state for s in self.statuses]

    def close(self) -> None:
        self._slow.put(None)
        self.c.loop_stop()
        self.c.disconnect()
