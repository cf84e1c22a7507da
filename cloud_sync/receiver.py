"""The receiver: MQTT 5 shared subscription in, database commit, then acknowledgements out.

paho runs the network in its own thread and only queues messages; one worker thread decodes, validates and
stores them, a group per transaction, and only after the commit (1) publishes the end-to-end ack to each
vehicle and (2) PUBACKs the messages to the broker (`manual_ack`). A receiver killed before its commit has
acknowledged nothing: the broker redelivers to another member of the shared subscription (or to it, on
reconnect with its persistent session), and the vehicle resends on its own timeout anyway.

The same worker serves model updates (docs/model_updates.md): a `model/get` (shared subscription: one receiver
answers) is answered with the chunks it asks for, read from a bounded cache of recently used packages in front of
the registry; a `model/status` (plain subscription: every receiver keeps the latest) is stored if its `seq` is the
highest yet and folded into the vehicle's rollout. What is malformed, too large, about an unknown package, out of
range or stale is counted by reason like any refused message, and PUBACKed.
"""

from __future__ import annotations

import logging
import math
import queue
import socket
import ssl
import sys
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_sync.config import CloudConfig
from cloud_sync.db import CloudDBError, FleetDB, IngestResult, UnstorableError
from harvester_common import modelwire as mw
from harvester_common import wire

log = logging.getLogger("cloud_sync.receiver")

UPLINK_LEAVES = ("telemetry", "alerts", "events")


@dataclass(slots=True)
class _Msg:
    topic: str
    payload: bytes
    mid: int
    qos: int


class Reject(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class PackageCache:
    """Recently used packages, at most `max_bytes` of them, the least recently used dropped first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()

    def get(self, package_sha256: str) -> bytes | None:
        data = self._items.get(package_sha256)
        if data is not None:
            self._items.move_to_end(package_sha256)
        return data

    def put(self, package_sha256: str, data: bytes) -> None:
        if package_sha256 in self._items or len(data) > self.max_bytes:
            return
        self._items[package_sha256] = data
        self.bytes += len(data)
        while self.bytes > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self.bytes -= len(dropped)

    def __len__(self) -> int:
        return len(self._items)


class Receiver:
    def __init__(self, cfg: CloudConfig, db: FleetDB) -> None:
        self.cfg = cfg
        self.db = db
        self.packages = PackageCache(cfg.rollout.cache_bytes)  # the worker's alone: no lock
        self._chunks_in_flight: list[tuple[mqtt.MQTTMessageInfo, int]] = []
        self.queue: queue.Queue[_Msg] = queue.Queue(cfg.receiver.queue_max)
        self.stats: Counter[str] = Counter()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self.connected = threading.Event()
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=cfg.mqtt.client_id, protocol=mqtt.MQTTv5, manual_ack=True
        )
        if cfg.mqtt.tls:
            c.tls_set(
                ca_certs=str(cfg.mqtt.ca_file) if cfg.mqtt.ca_file else None,
                certfile=str(cfg.mqtt.cert_file) if cfg.mqtt.cert_file else None,
                keyfile=str(cfg.mqtt.key_file) if cfg.mqtt.key_file else None,
            )
        c.max_inflight_messages_set(cfg.mqtt.max_inflight_messages)
        c.reconnect_delay_set(cfg.mqtt.reconnect_min_s, cfg.mqtt.reconnect_max_s)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_connect_fail = self._on_connect_fail
        c.on_message = self._on_message
        self._last_unreachable_report = -math.inf
        self.client = c

    # --- MQTT callbacks (paho's thread) ----------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            log.error("broker refused the connection: %s", rc)
            return
        m = self.cfg.mqtt
        subs = [(f"$share/{m.share_group}/fleet/{m.fleet}/vehicle/+/{leaf}", 1) for leaf in UPLINK_LEAVES]
        subs.append((f"$share/{m.share_group}/fleet/{m.fleet}/vehicle/+/{mw.LEAF_GET}", 1))
        subs.append((f"fleet/{m.fleet}/vehicle/+/status", 1))
        subs.append((f"fleet/{m.fleet}/vehicle/+/{mw.LEAF_STATUS}", 1))
        client.subscribe(subs)
        self._last_unreachable_report = -math.inf  # a later outage is reported at once again
        log.info("connected to %s:%d, subscribing (group %s)", m.host, m.port, m.share_group)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: list[Any], props: Any) -> None:
        # `connected` means the broker has granted every filter: before its SUBACK a vehicle's message can reach the
        # broker with nobody subscribed yet, and a refused filter leaves this receiver deaf to a whole leaf.
        refused = [str(c) for c in codes if c.is_failure]
        if refused:
            self.stats["subscribe_refused"] += 1
            log.error("the broker refused %d of %d subscriptions (%s): this receiver gets nothing on them; check "
                      "the broker's rights for this identity (docs/deploy.md, 'The broker')", len(refused),
                      len(codes), ", ".join(sorted(set(refused))))
            return
        self.connected.set()
        log.info("subscribed to every uplink leaf")

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this from inside its `except OSError:` (refused, DNS, TLS handshake): the error is at hand.
        err = sys.exc_info()[1]
        self.stats["connect_failures"] += 1
        now = time.monotonic()
        if now - self._last_unreachable_report >= self.cfg.mqtt.unreachable_report_s:
            self._last_unreachable_report = now
            m = self.cfg.mqtt
            log.error("cannot reach the broker at %s:%d: %s (%d attempts so far; retrying, said again every %gs "
                      "until connected)", m.host, m.port, _why(err), self.stats["connect_failures"],
                      m.unreachable_report_s)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connected.clear()
        if not self._stop.is_set():
            log.warning("disconnected from broker: %s (reconnecting)", rc)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # Blocks paho's thread when the worker is behind: back-pressure to the broker instead of unbounded memory.
        self.queue.put(_Msg(msg.topic, bytes(msg.payload), msg.mid, msg.qos))

    # --- worker ----------------------------------------------------------------------------------------------
    #
    # Every message ends one of three ways. Stored: committed, `ok` ack, PUBACK. Rejected because of its content
    # (it cannot be decoded, breaks a limit or a pattern, or the database refuses what it holds): counted by reason
    # (receiver stats and the database's `rejected` counters), a `rejected` ack when it is a batch whose id can be
    # read, PUBACK, so it never comes back. Held: only while the database is away (CloudDBError); the worker retries
    # the same messages until it is back. A group that fails is retried message by message, so one bad message
    # never holds up another.

    def _validate(self, m: _Msg) -> wire.Batch:
        parts = wire.parse_vehicle_topic(m.topic)
        if parts is None or parts[2] not in UPLINK_LEAVES:
            raise Reject("bad_topic", m.topic[:200])
        fleet, vehicle, _ = parts
        if not wire.valid_id(fleet) or not wire.valid_id(vehicle):
            raise Reject("bad_id", f"fleet/vehicle in topic {m.topic[:200]!r}")
        if len(m.payload) > self.cfg.mqtt.max_message_bytes:
            raise Reject("oversized", f"{len(m.payload)} bytes")
        try:
            b = wire.decode_batch(m.payload, tables=lambda digest: self.db.signal_table(vehicle, digest))
        except wire.UnknownTableError as e:
            raise Reject(wire.UNKNOWN_TABLE_REASON, str(e)[:300]) from None
        except wire.WireError as e:
            raise Reject("malformed", str(e)[:300]) from None
        if b.fleet != fleet or b.vehicle != vehicle:
            raise Reject("vehicle_mismatch", f"topic {fleet}/{vehicle}, payload {b.fleet[:64]!r}/{b.vehicle[:64]!r}")
        for seg in b.segments:
            if seg.columns is not None:
                bad = next((k for k in seg.columns.signals if not wire.valid_signal(k)), None)
                if bad is not None:
                    raise Reject("bad_signal", repr(bad)[:300])
            elif seg.record is not None:
                why = _record_problem(seg.kind, seg.record)
                if why:
                    raise Reject("bad_record", f"seq {seg.seq_lo}: {why}")
        return b

    def _handle_status(self, m: _Msg) -> None:
        parts = wire.parse_vehicle_topic(m.topic)
        if parts is None or not wire.valid_id(parts[0]) or not wire.valid_id(parts[1]):
            raise Reject("bad_id", f"fleet/vehicle in topic {m.topic[:200]!r}")
        if len(m.payload) > wire.MAX_STATUS_BYTES:
            raise Reject("oversized", f"status of {len(m.payload)} bytes")
        try:
            status = wire.loads_json(m.payload, "status") if m.payload else {"state": "offline"}
        except wire.WireError as e:
            raise Reject("bad_status", str(e)[:300]) from None
        if not isinstance(status, dict):
            raise Reject("bad_status", "not a JSON object")
        if not wire.valid_label(status.get("state", "")):
            raise Reject("bad_status", "state is not a short text")
        try:
            self.db.set_status(parts[0], parts[1], status)
        except UnstorableError as e:
            raise Reject("unstorable", str(e)) from None

    @staticmethod
    def _vehicle_of(m: _Msg) -> tuple[str, str]:
        parts = wire.parse_vehicle_topic(m.topic)
        if parts is None or not wire.valid_id(parts[0]) or not wire.valid_id(parts[1]):
            raise Reject("bad_id", f"fleet/vehicle in topic {m.topic[:200]!r}")
        return parts[0], parts[1]

    def _handle_model_status(self, m: _Msg) -> None:
        fleet, vehicle = self._vehicle_of(m)
        if not m.payload:
            self.stats["model_status_cleared"] += 1  # the vehicle's retained report removed: nothing to learn
            return
        if len(m.payload) > mw.MAX_MODEL_STATUS_BYTES:
            raise Reject("oversized", f"model status of {len(m.payload)} bytes")
        try:
            status = mw.decode_status(m.payload)
        except mw.ModelWireError as e:
            raise Reject("bad_model_status", str(e)[:300]) from None
        try:
            outcome = self.db.set_model_status(fleet, vehicle, status)
        except UnstorableError as e:
            raise Reject("unstorable", str(e)) from None
        if outcome == "stale":
            raise Reject("stale_model_status", f"{vehicle}'s seq {status.seq} is older than the report stored")
        self.stats["model_statuses" if outcome == "stored" else "model_status_duplicates"] += 1

    def _package(self, package_sha256: str) -> bytes | None:
        data = self.packages.get(package_sha256)
        if data is None:
            data = self.db.package_bytes(package_sha256)  # a CloudDBError holds the request until the database is back
            if data is not None:
                self.packages.put(package_sha256, data)
        return data

    def _handle_get(self, m: _Msg) -> None:
        fleet, vehicle = self._vehicle_of(m)
        if len(m.payload) > mw.MAX_GET_BYTES:
            raise Reject("oversized", f"model/get of {len(m.payload)} bytes")
        try:
            g = mw.decode_get(m.payload)
        except mw.ModelWireError as e:
            raise Reject("bad_model_get", str(e)[:300]) from None
        package = self._package(g.package_sha256)
        if package is None:
            raise Reject("unknown_package", f"{vehicle} asked for {g.package_sha256}, which is not published")
        chunk_bytes = self.cfg.rollout.chunk_bytes
        total = mw.chunk_count(len(package), chunk_bytes)
        if g.first + g.count > total:
            raise Reject("chunk_out_of_range", f"{vehicle} asked for chunks {g.first}..{g.first + g.count - 1} of "
                         f"a package of {total} chunks of {chunk_bytes} bytes")
        # Chunks the broker has not confirmed yet stay in paho's memory: past the bound the vehicle asks again later.
        self._chunks_in_flight = [(i, n) for i, n in self._chunks_in_flight
                                  if not i.is_published() and i.rc != mqtt.MQTT_ERR_QUEUE_SIZE]
        in_flight = sum(n for _, n in self._chunks_in_flight)
        size = min(len(package), (g.first + g.count) * chunk_bytes) - g.first * chunk_bytes
        if in_flight and in_flight + size > self.cfg.rollout.chunks_in_flight_bytes:
            raise Reject("busy", f"{in_flight} chunk bytes not yet confirmed by the broker; {vehicle} asks again")
        topic = wire.vehicle_topic(fleet, vehicle, mw.LEAF_CHUNK)
        for index in range(g.first, g.first + g.count):
            c = mw.chunk_of(package, g.package_sha256, index, chunk_bytes)
            info = self.client.publish(topic, mw.encode_chunk(c), qos=1)
            self._chunks_in_flight.append((info, len(c.data)))
        self.stats["model_gets"] += 1
        self.stats["chunks_sent"] += g.count

    def _reject(self, m: _Msg, e: Reject, batch: wire.Batch | None = None) -> None:
        """Count a message refused for its content, tell its vehicle when it was a batch, and let it go."""
        self.db.count_rejected(e.reason)  # a CloudDBError here propagates: the message is held, not lost
        self.stats[f"rejected:{e.reason}"] += 1
        log.warning("rejected a message on %s: %s", m.topic[:200], e)
        parts = wire.parse_vehicle_topic(m.topic)
        if parts is not None and parts[2] in UPLINK_LEAVES and wire.valid_id(parts[0]) and wire.valid_id(parts[1]):
            peek = ((batch.batch, [(s.seq_lo, s.seq_hi) for s in batch.segments]) if batch is not None
                    else wire.peek_batch_id(m.payload))
            if peek is not None:
                ack = wire.Ack(parts[1], peek[0], peek[1], status="rejected", reason=f"{e.reason}: {e}"[:500])
                self.client.publish(wire.vehicle_topic(parts[0], parts[1], "ack"), wire.encode_ack(ack), qos=1)
                self.stats["rejected_acks"] += 1
        self._puback(m)

    def _puback(self, m: _Msg) -> None:
        if m.qos > 0:
            self.client.ack(m.mid, m.qos)

    def _stored(self, m: _Msg, b: wire.Batch, r: IngestResult) -> None:
        ack = wire.Ack(b.vehicle, b.batch, [(s.seq_lo, s.seq_hi) for s in b.segments], tables=r.tables)
        self.client.publish(wire.vehicle_topic(b.fleet, b.vehicle, "ack"), wire.encode_ack(ack), qos=1)
        self.stats["batches"] += 1
        self.stats["records_new"] += r.new
        self.stats["duplicates"] += r.duplicates
        self._puback(m)

    def _process(self, msgs: list[_Msg]) -> list[_Msg]:
        """Settle what can be settled; return the messages held because the database is away (none when it is
        up). Raises CloudDBError only after settling nothing more can be done."""
        good: list[tuple[_Msg, wire.Batch]] = []
        for i, m in enumerate(msgs):
            try:
                parts = wire.parse_vehicle_topic(m.topic)
                leaf = parts[2] if parts is not None else ""
                if leaf in _HANDLERS:
                    _HANDLERS[leaf](self, m)
                    self._puback(m)
                else:
                    good.append((m, self._validate(m)))
            except Reject as e:
                try:
                    self._reject(m, e)
                except CloudDBError:
                    # This one and the rest wait for the database, with the valid ones before it (re-validated
                    # then: cheap).
                    return [g for g, _ in good] + msgs[i:]
            except CloudDBError:
                return [g for g, _ in good] + msgs[i:]
        if not good:
            return []
        try:
            results = self.db.ingest([b for _, b in good])  # committed when this returns
            for (m, b), r in zip(good, results, strict=True):
                self._stored(m, b, r)
            return []
        except UnstorableError as e:
            log.warning("a group of %d batches could not be stored (%s); storing them one by one", len(good), e)
            self.stats["groups_split"] += 1
        except CloudDBError:
            return [m for m, _ in good]
        for j, (m, b) in enumerate(good):
            try:
                try:
                    (r,) = self.db.ingest([b])
                except UnstorableError as e:
                    self._reject(m, Reject("unstorable", str(e)), b)
                else:
                    self._stored(m, b, r)
            except CloudDBError:
                return [m for m, _ in good[j:]]
        return []

    def _work(self) -> None:
        limit = self.cfg.receiver.commit_max_messages
        held: list[_Msg] = []
        while not self._stop.is_set() or not self.queue.empty() or held:
            batch = held
            if not batch:
                try:
                    batch = [self.queue.get(timeout=0.2)]
                except queue.Empty:
                    continue
            while len(batch) < limit:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            try:
                held = self._process(batch)
            except Exception:
                # A defect of ours, not the data's nor the database's: say so loudly, keep the messages.
                log.exception("failed to process %d messages; retrying", len(batch))
                held = batch
            if held:
                # Not acked: they stay ours and are retried when the database is back (the vehicles resend too).
                self.stats["store_failures"] += 1
                log.error("database unavailable (%s); holding %d messages", self.db.where, len(held))
                if self._stop.wait(self.cfg.receiver.db_retry_s):
                    return  # stopping: unacked, so the broker delivers them again to whoever reconnects

    # --- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        m = self.cfg.mqtt
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = m.session_expiry_s
        self.client.connect_async(m.host, m.port, m.keepalive_s, clean_start=False, properties=props)
        self.client.loop_start()
        self._worker = threading.Thread(target=self._work, name="cloud-sync-worker", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.join(30)
        self.client.disconnect()
        self.client.loop_stop()

    def run_forever(self, stop: threading.Event, report_every_s: float | None = None) -> None:
        """Receive until `stop` is set, with a progress line every `report_every_s` (default: `[log]
        report_every_s`)."""
        if report_every_s is None:
            report_every_s = self.cfg.log.report_every_s
        self.start()
        last = time.monotonic()
        while not stop.wait(1.0):
            if time.monotonic() - last >= report_every_s:
                last = time.monotonic()
                log.info(
                    "batches %d, new records %d, duplicates %d, rejected %d",
                    self.stats["batches"],
                    self.stats["records_new"],
                    self.stats["duplicates"],
                    sum(v for k, v in self.stats.items() if k.startswith("rejected:")),
                )
        self.stop()


# Messages settled one by one, outside the batch groups: the leaf after `fleet/F/vehicle/V/`.
_HANDLERS = {"status": Receiver._handle_status, mw.LEAF_STATUS: Receiver._handle_model_status,
             mw.LEAF_GET: Receiver._handle_get}


def _record_problem(kind: str, r: dict[str, Any]) -> str:
    """What in an alert/event record the database columns or the fleet reports could not take, or ''."""
    fields = ("alert_id", "state", "model", "model_version", "label") if kind == "alert" else ("kind",)
    for f in fields:
        if f in r and not wire.valid_label(r[f]):
            return f"{f} must be text of at most 256 characters without control characters"
    for f in ("ts", "score"):
        v = r.get(f)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            return f"{f} must be a number"
    data = r.get("data")
    if kind == "event" and data is not None:
        if not isinstance(data, dict):
            return "data must be an object"
        rg = data.get("ranges")
        if rg is not None and not (isinstance(rg, list) and all(
                isinstance(x, list) and len(x) == 2 and all(isinstance(y, int) and not isinstance(y, bool)
                                                            for y in x) for x in rg)):
            return "data.ranges must be [lo, hi] integer pairs"
        fl = data.get("seq_floor")
        if fl is not None and (isinstance(fl, bool) or not isinstance(fl, int)):
            return "data.seq_floor must be an integer"
    return ""


def _why(err: BaseException | None) -> str:
    """A connection failure in words an operator acts on."""
    if isinstance(err, socket.gaierror):
        return f"the name does not resolve ({err.strerror or err})"
    if isinstance(err, ssl.SSLError | ssl.CertificateError):
        return f"TLS handshake failed ({getattr(err, 'reason', None) or err})"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused (nothing listens there?)"
    if isinstance(err, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(err, OSError):
        return err.strerror or str(err) or type(err).__name__
    return "unknown error"
