"""A vehicle's side of model updates, reduced to the protocol, for tests of the cloud (and any test that needs many
vehicles without running many agents): a real paho client that reads its retained `model/desired`, asks for the
chunks on `model/get`, checks every chunk against the desired message's hashes and the whole package against its
SHA-256, and reports its steps on `model/status` (retained, `seq` increasing) as the real agent does:
`downloading` → `verified` → then, as told by `outcome`, `active` (and `active` healthy), `rejected`, or `failed`.

It does not verify signatures nor run the model: what it knows of the package is its bytes and the model's hash
(`model_sha256_of`, by default from the package's manifest through harvester_common/modelpkg.py). It asks for each
chunk once and never again (docs/protocol.md has a vehicle ask again later), so a request the cloud refuses (`busy`)
or loses shows in a test as a download that never ends rather than being papered over.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from harvester_common import modelwire as mw
from harvester_common import wire

log = logging.getLogger("harvester_testing.fakevehicle")

Outcome = Literal["accept", "reject", "fail", "ignore"]


def manifest_model_sha256(package: bytes) -> str:
    from harvester_common import modelpkg

    return modelpkg.parse_package(package).manifest.sha256


class FakeVehicle:
    """`outcome`: what the vehicle does with a verified package: `accept` (active, then active and healthy),
    `reject` or `fail` (with `reason`), `ignore` (download it, say nothing). `active`: the model it runs at the
    start ({"name", "version", "sha256"}). `seq`: its first report's sequence number (a restart keeps counting)."""

    def __init__(self, host: str, port: int, fleet: str, vehicle: str, *, outcome: Outcome = "accept",
                 reason: str = "", active: dict[str, str] | None = None, seq: int = 1, connect: bool = True,
                 model_sha256_of: Callable[[bytes], str] = manifest_model_sha256) -> None:
        self.host, self.port, self.fleet, self.vehicle = host, port, fleet, vehicle
        self.outcome, self.reason = outcome, reason
        self.active = active
        self.previous: dict[str, str] | None = None
        self.seq = seq
        self.model_sha256_of = model_sha256_of
        self.lock = threading.Lock()
        self.desired: mw.Desired | None = None
        self.desired_seen: list[mw.Desired | None] = []  # every desired message, None for a cleared one
        self.packages: dict[str, bytes] = {}  # package sha256 → bytes, checked
        self.statuses: list[mw.ModelStatus] = []
        self.errors: list[str] = []  # what this vehicle found wrong in what it was sent
        self._chunks: dict[int, bytes] = {}
        self.subscribed = threading.Event()
        self.client: mqtt.Client | None = None
        if connect:
            self.connect()

    def topic(self, leaf: str) -> str:
        return wire.vehicle_topic(self.fleet, self.vehicle, leaf)

    # --- connection ------------------------------------------------------------------------------------------

    def connect(self, timeout_s: float = 10.0) -> None:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fake-{self.fleet}-{self.vehicle}",
                        protocol=mqtt.MQTTv5)
        c.on_connect = lambda cl, *a: cl.subscribe([(self.topic(mw.LEAF_DESIRED), 1), (self.topic(mw.LEAF_CHUNK), 1)])
        c.on_subscribe = lambda *a: self.subscribed.set()
        c.on_message = self._on_message
        # Set before paho's thread exists: the retained desired message follows the SUBACK at once, and its callback
        # publishes through `self.client`, often before `loop_start()` has even returned to this thread.
        self.client = c
        try:
            c.connect(self.host, self.port)
        except OSError:
            self.client = None
            raise
        c.loop_start()
        if not self.subscribed.wait(timeout_s):
            raise TimeoutError(f"{self.vehicle}: not subscribed within {timeout_s}s")

    def close(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None
        self.subscribed.clear()

    # --- what the vehicle does -------------------------------------------------------------------------------

    def report(self, state: str, healthy: bool | None = None, reason: str = "", **figures: Any) -> None:
        d = self.desired
        target = ({"name": d.name, "version": d.version, "package_sha256": d.package_sha256, "rollout": d.rollout}
                  if d is not None else None)
        s = mw.ModelStatus(state=state, seq=self.seq, ts=time.time(), target=target, active=self.active,
                           previous=self.previous, healthy=healthy, reason=reason, figures=figures,
                           progress={"chunks_have": len(self._chunks), "chunks": d.chunks if d else 0})
        assert self.client is not None, "report() on a vehicle that is not connected"
        self.seq += 1
        self.statuses.append(s)
        self.client.publish(self.topic(mw.LEAF_STATUS), mw.encode_status(s), qos=1, retain=True)

    def _on_message(self, c: mqtt.Client, u: Any, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            try:
                if m.topic.endswith(mw.LEAF_DESIRED):
                    self._on_desired(bytes(m.payload))
                else:
                    self._on_chunk(mw.decode_chunk(bytes(m.payload)))
            except mw.ModelWireError as e:
                self.errors.append(str(e))
            except Exception as e:
                # A defect of this fake: escaping, it would end paho's thread and leave a vehicle that hears nothing
                # more, which a test sees only as a timeout far away. Kept where the test looks instead.
                self.errors.append(f"{m.topic}: {type(e).__name__}: {e}")
                log.exception("fake vehicle %s: handling a message on %s failed", self.vehicle, m.topic)

    def _on_desired(self, payload: bytes) -> None:
        d = mw.decode_desired(payload)
        self.desired_seen.append(d)
        self.desired = d
        self._chunks = {}
        if d is None:
            return
        if self.active is not None and self.packages.get(d.package_sha256) is not None \
                and self.active["sha256"] == self.model_sha256_of(self.packages[d.package_sha256]):
            return  # runs it already
        self.report("downloading")
        assert self.client is not None
        for first in range(0, d.chunks, mw.MAX_GET_COUNT):
            g = mw.GetRequest(d.package_sha256, first, min(mw.MAX_GET_COUNT, d.chunks - first))
            self.client.publish(self.topic(mw.LEAF_GET), mw.encode_get(g), qos=1)

    def _on_chunk(self, c: mw.Chunk) -> None:
        d = self.desired
        if d is None or c.package_sha256 != d.package_sha256 or c.total != d.chunks:
            self.errors.append(f"chunk {c.index} of a package not desired")
            return
        if hashlib.sha256(c.data).hexdigest() != d.chunk_sha256[c.index]:
            self.errors.append(f"chunk {c.index} does not match its hash")
            return
        self._chunks[c.index] = c.data
        if len(self._chunks) < d.chunks:
            return
        package = b"".join(self._chunks[i] for i in range(d.chunks))
        if hashlib.sha256(package).hexdigest() != d.package_sha256 or len(package) != d.size:
            self.errors.append("the assembled package does not match its hash")
            self.report("failed", reason="package hash mismatch")
            return
        self.packages[d.package_sha256] = package
        self.report("verified")
        if self.outcome == "accept":
            self.previous = self.active
            self.active = {"name": d.name, "version": d.version, "sha256": self.model_sha256_of(package)}
            self.report("active", windows=0)
            self.report("active", healthy=True, windows=10)
        elif self.outcome in ("reject", "fail"):
            self.report("rejected" if self.outcome == "reject" else "failed", reason=self.reason)
