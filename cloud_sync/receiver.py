"""The receiver: MQTT 5 shared subscription in, database commit, then acknowledgements out.

paho runs the network in its own thread and only queues messages; one worker thread decodes, validates and
stores them, a group per transaction, and only after the commit (1) publishes the end-to-end ack to each
vehicle and (2) PUBACKs the messages to the broker (`manual_ack`). A receiver killed before its commit has
acknowledged nothing: the broker redelivers to another member of the shared subscription (or to it, on
reconnect with its persistent session), and the vehicle resends on its own timeout anyway.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import wire
from cloud_sync.config import CloudConfig
from cloud_sync.db import CloudDBError, FleetDB

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


class Receiver:
    def __init__(self, cfg: CloudConfig, db: FleetDB) -> None:
        self.cfg = cfg
        self.db = db
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
        c.max_inflight_messages_set(100)
        c.reconnect_delay_set(1, 30)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self.client = c

    # --- MQTT callbacks (paho's thread) ----------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            log.error("broker refused the connection: %s", rc)
            return
        m = self.cfg.mqtt
        subs = [(f"$share/{m.share_group}/fleet/{m.fleet}/vehicle/+/{leaf}", 1) for leaf in UPLINK_LEAVES]
        subs.append((f"fleet/{m.fleet}/vehicle/+/status", 1))
        client.subscribe(subs)
        self.connected.set()
        log.info("connected to %s:%d, subscribed (group %s)", m.host, m.port, m.share_group)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connected.clear()
        if not self._stop.is_set():
            log.warning("disconnected from broker: %s (reconnecting)", rc)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # Blocks paho's thread when the worker is behind: back-pressure to the broker instead of unbounded memory.
        self.queue.put(_Msg(msg.topic, bytes(msg.payload), msg.mid, msg.qos))

    # --- worker ----------------------------------------------------------------------------------------------

    def _validate(self, m: _Msg) -> tuple[str, wire.Batch]:
        parts = wire.parse_vehicle_topic(m.topic)
        if parts is None or parts[2] not in UPLINK_LEAVES:
            raise Reject("bad_topic", m.topic)
        fleet, vehicle, _ = parts
        if len(m.payload) > self.cfg.mqtt.max_message_bytes:
            raise Reject("oversized", f"{len(m.payload)} bytes")
        try:
            b = wire.decode_batch(m.payload)
        except wire.WireError as e:
            raise Reject("malformed", str(e)) from None
        if b.fleet != fleet or b.vehicle != vehicle:
            raise Reject("vehicle_mismatch", f"topic {fleet}/{vehicle}, payload {b.fleet}/{b.vehicle}")
        return m.topic, b

    def _handle_status(self, m: _Msg) -> None:
        if len(m.payload) > self.cfg.mqtt.max_message_bytes:
            raise Reject("oversized", f"status of {len(m.payload)} bytes")
        parts = wire.parse_vehicle_topic(m.topic)
        try:
            status = json.loads(m.payload) if m.payload else {"state": "offline"}
            if not isinstance(status, dict) or parts is None:
                raise ValueError("not an object")
        except ValueError:
            self.db.count_rejected("bad_status")
            return
        self.db.set_status(parts[0], parts[1], status)

    def _process(self, msgs: list[_Msg]) -> None:
        good: list[tuple[_Msg, wire.Batch]] = []
        for m in msgs:
            try:
                if m.topic.endswith("/status"):
                    self._handle_status(m)
                    continue
                _, b = self._validate(m)
                good.append((m, b))
            except Reject as e:
                self.stats[f"rejected:{e.reason}"] += 1
                self.db.count_rejected(e.reason)
                log.warning("rejected a message on %s: %s", m.topic, e)
        if good:
            results = self.db.ingest([b for _, b in good])  # committed when this returns
            for (_, b), r in zip(good, results, strict=True):
                ack = wire.Ack(b.vehicle, b.batch, [(s.seq_lo, s.seq_hi) for s in b.segments])
                self.client.publish(wire.vehicle_topic(b.fleet, b.vehicle, "ack"), wire.encode_ack(ack), qos=1)
                self.stats["batches"] += 1
                self.stats["records_new"] += r.new
                self.stats["duplicates"] += r.duplicates
        for m in msgs:
            if m.qos > 0:
                self.client.ack(m.mid, m.qos)

    def _work(self) -> None:
        limit = self.cfg.receiver.commit_max_messages
        while not self._stop.is_set() or not self.queue.empty():
            try:
                first = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < limit:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._process(batch)
            except Exception as e:
                # Not acked, so the broker and the vehicles will deliver these again; keep serving.
                self.stats["store_failures"] += 1
                if isinstance(e, CloudDBError):  # the database is away: say so in one line, not a traceback each time
                    log.error("failed to store %d messages (they will be delivered again): %s", len(batch), e)
                else:
                    log.exception("failed to store %d messages; they will be delivered again", len(batch))
                time.sleep(1.0)

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

    def run_forever(self, stop: threading.Event, report_every_s: float = 60.0) -> None:
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
