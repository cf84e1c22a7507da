"""Outbox → MQTT: batches of records and samples, deleted only on the cloud's end-to-end acknowledgement.

One thread owns the paho client and drives it with `loop()`, so no other thread touches it; it reconnects with
exponential backoff and full jitter (so a fleet coming back into coverage does not reconnect in lockstep).
Records (alerts, events) go before samples. Samples go in a live lane first (`live_lane_s`: the newest segments,
newest first, so that after an outage the cloud sees the present at once), the older backlog backfilling oldest
first behind them in the same batches; every batch tells the cloud where the backfill stands (`backfill_from` in its
header, harvester_common/backfill.py), so that the holes it leaves are not taken for losses. A batch stays
"in flight" until cloud_sync acks its ranges, which it does after its database commit; an unacknowledged batch is
resent after `ack_timeout_s`. The broker's PUBACK means nothing to the store: only the cloud's ack deletes.

A reconnect to the session the broker kept (clean_start false, within `session_expiry_s`) keeps the batches in
flight: the acks the cloud published while the vehicle was away are queued in that session and arrive now, and paho
sends again itself any batch the broker had not acknowledged; their ack timers stop while the vehicle is away, so an
outage longer than `ack_timeout_s` does not time them all out at once, and go on at the reconnect from where they
stood, so a batch whose ack never comes is still sent again on a link that drops more often than that. A reconnect
to a new session sends them again at once (under new batch ids): the acks queued for the old one were lost with it.

An ack is believed only for a batch this process has in flight (its batch id, this vehicle), and only for the rows
that batch carried: a row is deleted when it belongs to the batch and the ack's ranges cover it whole; whatever
else an ack names is ignored. Anything else on the ack topic is dropped and counted by reason (`acks_rejected`):
the broker ACL is the first line against forged acks, this is the second.

Model updates (docs/model_updates.md) travel on the same connection when a model manager is given: the uplink
subscribes `model/desired` and `model/chunk`, decodes them (harvester_common/modelwire.py) and hands them to the
manager; whatever does not decode is dropped and counted by reason (`model_rejected`), never raised out of the
loop. The manager's `model/status` reports and `model/get` requests are published ahead of every batch, so a
model never waits behind raw samples. On a reconnect the manager learns whether the broker resumed the session
(`session_present`): if it did, the chunks it asked for before are queued there and not asked for again. Model
bytes either way are counted (`model_bytes_in`, `model_bytes_out`) and, like batches, against the day's budget
(`daily_budget_bytes`); once it is spent, no chunk is requested until the next day (reports still go).
"""

from __future__ import annotations

import json
import logging
import math
import random
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import __version__, numpy_memory
from agent.backoff import backoff_delay
from agent.config import MqttConfig, VehicleConfig
from agent.metrics import Metrics, counts
from agent.store import OutboxRow, Store
from harvester_common import backfill, wire
from harvester_common import modelwire as mw
from harvester_common.seqranges import merge_ranges, subtract

log = logging.getLogger("agent.uplink")


class TlsError(ValueError):
    """TLS files that cannot be loaded: one line naming the files and the reason."""


def configure_tls(client: mqtt.Client, cfg: MqttConfig) -> None:
    """Load the configured CA, certificate and key into `client` (the uplink's and `--check-config`'s one way).

    paho reads the files here, not at connect, so a missing or bad file is known before anything starts."""
    named = [(k, p) for k, p in (("ca_file", cfg.ca_file), ("cert_file", cfg.cert_file), ("key_file", cfg.key_file))
             if p is not None]
    try:
        client.tls_set(
            ca_certs=str(cfg.ca_file) if cfg.ca_file else None,
            certfile=str(cfg.cert_file) if cfg.cert_file else None,
            keyfile=str(cfg.key_file) if cfg.key_file else None,
        )
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        files = ", ".join(f"{k} {p}" for k, p in named) or "the system's CA store"
        reason = e.strerror if isinstance(e, OSError) and not isinstance(e, ssl.SSLError) and e.strerror else str(e)
        raise TlsError(f"mqtt: TLS files do not load ({files}): {reason}") from None


class ModelChannel(Protocol):
    """The model manager as the uplink sees it (agent/update/manager.py); called on the uplink thread."""

    def on_connect(self, session_present: bool, away_s: float = 0.0) -> None:
        """`away_s`: how long the connection was down before this one (0 at the first)."""
        ...

    def on_desired(self, d: mw.Desired | None) -> None: ...

    def on_chunk(self, c: mw.Chunk) -> None: ...

    def outgoing(self, allow_get: bool) -> list[tuple[str, bytes, bool]]:
        """(leaf, payload, retain) to publish now."""
        ...

    def unsent(self, items: list[tuple[str, bytes, bool]]) -> None:
        """Of what `outgoing` gave, what never reached paho (the connection went meanwhile)."""
        ...


@dataclass(slots=True)
class _InFlight:
    batch: int
    seq_los: list[int]
    sent_at: float  # when its ack timer started: the send, moved later by the time away at a resumed session
    n_samples: int
    ranges: list[tuple[int, int]] = field(default_factory=list)  # [seq_lo, seq_hi] of each row carried
    tables: set[str] = field(default_factory=set)  # digests of the signal tables it carried in full
    referenced: bool = False  # whether it named any signal table by reference


# The store's state key of the signal tables the cloud confirmed it stores (digests, oldest first), and how many
# are kept: a restart keeps them, so a vehicle does not send full tables again after every reboot.
TABLES_STATE_KEY = "uplink.confirmed_tables"
MAX_CONFIRMED_TABLES = wire.MAX_ACK_TABLES


class LaneReference:
    """Where the live lane is measured from: the data time of the sample segment written last that this process
    has seen held (the highest sequence number), whatever the times of others say.

    Not the newest still held: once the live minute is acked, the history must not become the next "live" minute,
    so the reference stays with the last segment seen after it is gone. Not the largest time ever seen either: one
    segment stamped far in the future (a clock that jumped, a bad fix) would hold the reference there and turn the
    lane off until a restart; by sequence number, the next segment written puts it back where the data is (and a
    clock set back moves it back with the data). Pure."""

    def __init__(self) -> None:
        self.seq = -1
        self.ts = -math.inf

    def observe(self, newest: tuple[int, float] | None) -> float:
        """Note the newest segment held, (`seq_lo`, `ts_hi`) or None; returns the reference (-inf before any)."""
        if newest is not None and newest[0] > self.seq and math.isfinite(newest[1]):
            self.seq, self.ts = newest
        return self.ts


@dataclass(slots=True)
class UplinkStats:
    connected: bool = False
    connects: int = 0
    sessions_resumed: int = 0  # connects to which the broker resumed the session (what was queued for us arrives)
    inflight_kept: int = 0  # batches in flight at a reconnect to a resumed session: their acks still awaited
    inflight_forgotten: int = 0  # batches in flight at a reconnect to a new session: their rows sent again
    connect_failures: int = 0
    batches_sent: int = 0
    bytes_sent: int = 0
    samples_sent: int = 0
    records_sent: int = 0
    acks: int = 0  # `ok` acks applied (each for a batch in flight)
    ack_timeouts: int = 0
    acks_rejected: dict[str, int] = field(default_factory=dict)  # dropped, by reason; nothing deleted
    acks_replayed: int = 0  # a second ack for a batch already acked or rejected: harmless
    acks_trimmed: int = 0  # applied acks that also named numbers their batch did not carry (those ignored)
    tables_confirmed: int = 0  # signal tables the cloud confirmed storing (references sent for them from then on)
    tables_unproven: int = 0  # digests an ack listed that its batch did not carry in full: ignored
    tables_forgotten: int = 0  # times the cloud refused a reference and every confirmed table was forgotten
    rejected_batches: int = 0
    oversized_rows: int = 0  # outbox rows no batch within the wire's limits can carry: kept, not sent
    budget_held: bool = False
    model_bytes_in: int = 0  # model/desired and model/chunk payloads received
    model_bytes_out: int = 0  # model/get and model/status payloads sent
    model_rejected: dict[str, int] = field(default_factory=dict)  # model messages dropped, by reason


class Uplink:
    def __init__(
        self,
        cfg: MqttConfig,
        vehicle: VehicleConfig,
        store: Store,
        status_extra: Callable[[], dict[str, Any]] | None = None,
        seed: int | None = None,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
        model: ModelChannel | None = None,
    ) -> None:
        self.clock = clock
        self.model = model  # wall clock for the daily budget (UTC days); a parameter so tests can turn the day
        self.cfg = cfg
        self.vehicle = vehicle
        self.store = store
        self.status_extra = status_extra or (lambda: {})
        self.stats = UplinkStats()
        self._rng = random.Random(seed)
        self._inflight: dict[int, _InFlight] = {}
        self._parked: set[int] = set()  # seq_lo of rows the cloud rejected for good: kept, not resent
        self._lane = LaneReference()
        # The last `recent_batches` acked/rejected batch ids: a replayed ack is told from a forged one by these.
        self._done: OrderedDict[int, None] = OrderedDict()
        saved = store.get_state(TABLES_STATE_KEY)
        self._tables: OrderedDict[str, None] = OrderedDict.fromkeys(
            t for t in (saved if isinstance(saved, list) else []) if isinstance(t, str))
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.collect("uplink", self._counters)
        self._next_batch = int(time.time() * 1000)
        self._stop = threading.Event()
        self._flush = threading.Event()
        self._thread: threading.Thread | None = None
        self._connected = False
        self._lost_at: float | None = None  # time.monotonic() when the connection last went; None while up
        self._last_status = 0.0
        self._client = self._make_client()

    # --- topics ----------------------------------------------------------------------------------------------

    def topic(self, leaf: str) -> str:
        return wire.vehicle_topic(self.vehicle.fleet, self.vehicle.id, leaf)

    def _status_payload(self, state: str, extra: bool = True) -> bytes:
        body = {"state": state, "ts": time.time(), "agent_version": __version__}
        if extra:
            body |= self.status_extra()
        return json.dumps(body, separators=(",", ":")).encode()

    # --- client ----------------------------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.cfg.client_id or f"{self.vehicle.fleet}.{self.vehicle.id}",
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
        )
        c.max_inflight_messages_set(max(20, self.cfg.max_inflight_batches * 2))
        # The Will is fixed at connect time and only has to say "offline".
        c.will_set(self.topic("status"), self._status_payload("offline", extra=False), qos=1, retain=True)
        if self.cfg.tls:
            configure_tls(c, self.cfg)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        return c

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            log.warning("broker refused the connection: %s", rc)
            self.stats.connect_failures += 1
            return
        self._connected = True
        self.stats.connected = True
        self.stats.connects += 1
        away_s = time.monotonic() - self._lost_at if self._lost_at is not None else 0.0
        self._lost_at = None
        if flags.session_present:
            self.stats.sessions_resumed += 1
            self._keep_in_flight(away_s)
        else:
            self._forget_in_flight()
        subs = [(self.topic("ack"), 1)]
        if self.model is not None:
            # A retained desired message arrives on every subscribe: the manager takes it again idempotently.
            subs += [(self.topic(mw.LEAF_DESIRED), 1), (self.topic(mw.LEAF_CHUNK), 1)]
            # Resumed (clean_start false, within session_expiry_s): chunks answering requests made before the
            # outage are queued in the session and arrive now; the manager must not ask for them again.
            self.model.on_connect(bool(flags.session_present), away_s)
        client.subscribe(subs)
        self._publish_status("online")
        log.info("connected to %s:%d", self.cfg.host, self.cfg.port)

    def _keep_in_flight(self, away_s: float) -> None:
        """The session resumed: the acks for the batches in flight are queued in it (or come for paho's own resend
        of a batch the broker had not acknowledged). Their timers stop for the time away, which was no time to
        answer, and go on from where they stood: restarted at every reconnect, a batch whose ack never comes would
        never be sent again on a link that drops more often than `ack_timeout_s`."""
        now = time.monotonic()
        for inf in self._inflight.values():
            inf.sent_at = min(now, inf.sent_at + away_s)
        self.stats.inflight_kept += len(self._inflight)

    def _forget_in_flight(self) -> None:
        """A new session: the acks queued for the old one are lost with it, so the batches in flight go again now
        under new ids (the cloud dedups) rather than after `ack_timeout_s`; a late ack for an old id is dropped."""
        self.stats.inflight_forgotten += len(self._inflight)
        self._inflight.clear()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        # The batches in flight stay: the next CONNACK says whether their acks can still come (_on_connect).
        if self._connected:
            log.warning("disconnected from broker: %s", rc)
        self._went()

    def _went(self) -> None:
        """The connection is down (paho said so, or the loop gave up on it): the time away counts from the first."""
        if self._connected or self._lost_at is None:
            self._lost_at = time.monotonic()
        self._connected = False
        self.stats.connected = False

    def _counters(self) -> dict[str, Any]:
        """For the metrics registry: every UplinkStats field (flags as gauges), and the in-flight count."""
        out: dict[str, Any] = {}
        for f in fields(UplinkStats):
            v = getattr(self.stats, f.name)
            out[f.name] = counts(v) if isinstance(v, dict) else v
        return out | {"in_flight": float(len(self._inflight))}

    def _warn(self, reason: str, text: str) -> None:
        """A warning per reason at most once per `[log] warn_every_s`, saying how many were not logged in between:
        a flood of bad acks must not flood the log (the registry's rate limit)."""
        self.metrics.warn("uplink", reason, text)

    def _reject(self, reason: str, text: str) -> None:
        self.stats.acks_rejected[reason] = self.stats.acks_rejected.get(reason, 0) + 1
        self._warn(reason, f"dropped an ack ({reason}): {text}")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # paho lets a callback's exception out of loop(), which would end the uplink thread: one bad message must
        # never do that, so anything unexpected is counted and logged, and the loop goes on.
        if msg.topic in (self.topic(mw.LEAF_DESIRED), self.topic(mw.LEAF_CHUNK)):
            try:
                self._handle_model(msg)
            except Exception as e:
                self._model_reject("handler_error", f"{type(e).__name__}: {e}")
                log.exception("model message handling failed")
            return
        try:
            self._handle_ack(msg)
        except Exception as e:
            self.stats.acks_rejected["handler_error"] = self.stats.acks_rejected.get("handler_error", 0) + 1
            log.exception("ack handling failed (the batch stays in flight and is resent after its timeout): %s", e)

    def _model_reject(self, reason: str, text: str) -> None:
        self.stats.model_rejected[reason] = self.stats.model_rejected.get(reason, 0) + 1
        self._warn(f"model_{reason}", f"dropped a model message ({reason}): {text[:200]}")

    def _publish_status(self, state: str) -> mqtt.MQTTMessageInfo:
        """The retained status message; its bytes count towards the day's budget like everything else sent
        (it always goes: a spent budget holds back samples only)."""
        payload = self._status_payload(state)
        info = self._client.publish(self.topic("status"), payload, qos=1, retain=True)
        self._last_status = time.monotonic()
        if self.cfg.daily_budget_bytes:
            self._spend(len(payload))
        return info

    def _model_bytes(self, n: int, incoming: bool) -> None:
        if incoming:
            self.stats.model_bytes_in += n
        else:
            self.stats.model_bytes_out += n
        if self.cfg.daily_budget_bytes:
            self._spend(n)

    def _handle_model(self, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        self._model_bytes(len(payload), incoming=True)
        if self.model is None:  # never subscribed: a broker's stray delivery
            self._model_reject("unexpected_topic", msg.topic)
            return
        try:
            if msg.topic == self.topic(mw.LEAF_DESIRED):
                desired = mw.decode_desired(payload)
                self.model.on_desired(desired)
            else:
                chunk = mw.decode_chunk(payload)
                self.model.on_chunk(chunk)
        except mw.ModelWireError as e:
            self._model_reject("malformed", str(e))
        except RecursionError:  # json.loads on deep nesting (the wire's own depth check comes first)
            self._model_reject("malformed", "nested too deeply")

    def _publish_model(self) -> bool:
        """The manager's reports and chunk requests, ahead of any batch; False if paho would not queue one."""
        assert self.model is not None
        items = self.model.outgoing(not self.budget_spent())
        for n, (leaf, payload, retain) in enumerate(items):
            info = self._client.publish(self.topic(leaf), payload, qos=1, retain=retain)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                # The connection went. paho keeps a QoS 1 message it could not send for lack of one (NO_CONN) and
                # sends it after the reconnect; the rest never reached it: back to the manager, which asks for
                # their chunks again (its latest report goes again on every connect).
                kept = info.rc == mqtt.MQTT_ERR_NO_CONN
                if kept:
                    self._model_bytes(len(payload), incoming=False)  # it will go, and count then
                self.model.unsent(items[n + 1 if kept else n :])
                return False
            self._model_bytes(len(payload), incoming=False)
        return True

    def _handle_ack(self, msg: mqtt.MQTTMessage) -> None:
        if msg.topic != self.topic("ack"):
            self._reject("unexpected_topic", msg.topic[:200])
            return
        if len(msg.payload) > self.cfg.max_ack_bytes:
            self._reject("oversized", f"{len(msg.payload)} bytes")
            return
        try:
            ack = wire.decode_ack(bytes(msg.payload))
        except (wire.WireError, RecursionError) as e:  # json.loads raises RecursionError on deep nesting
            self._reject("malformed", str(e)[:200] if isinstance(e, wire.WireError) else "nested too deeply")
            return
        if ack.vehicle != self.vehicle.id:
            self._reject("wrong_vehicle", f"for vehicle {ack.vehicle[:64]!r}")
            return
        inf = self._inflight.get(ack.batch)
        if inf is None:
            if ack.batch in self._done:
                self.stats.acks_replayed += 1
                log.debug("ack for batch %d again (already applied)", ack.batch)
            else:
                # Never sent, or no longer in flight (timed out, or sent before a reconnect to a new session:
                # resent under a new id, which its own ack will cover).
                self._reject("not_in_flight", f"batch {ack.batch} is not in flight")
            return
        if ack.status == "rejected" and inf.referenced and ack.reason.split(":")[0] == wire.UNKNOWN_TABLE_REASON:
            # The cloud lost (or never had) a table we referenced: forget them all, and resend this batch with full
            # tables (a batch without references never gets this reason, so this cannot loop).
            del self._inflight[ack.batch]
            self._remember(ack.batch)
            self._tables.clear()
            self.store.set_state(TABLES_STATE_KEY, [])
            self.stats.tables_forgotten += 1
            self._warn("unknown_table", f"cloud holds no longer a signal table batch {ack.batch} referenced; "
                       "sending full tables again")
            return
        if ack.status == "rejected":
            # The cloud will never take these: keep them (nothing is deleted without a commit) but stop resending.
            self.stats.rejected_batches += 1
            del self._inflight[ack.batch]
            self._remember(ack.batch)
            self._parked.update(inf.seq_los)
            log.error("cloud rejected batch %d: %s", ack.batch, ack.reason[:500])
            return
        named = merge_ranges(ack.ranges)
        if inf.ranges and subtract(named, merge_ranges(inf.ranges)):
            self.stats.acks_trimmed += 1
            self._warn("trimmed", f"ack for batch {ack.batch} named numbers the batch did not carry; ignored those")
        # Only this batch's rows, and only those the ack covers whole: nothing outside what was sent goes.
        self.store.ack(named, only=inf.seq_los)
        self._confirm_tables(ack.tables, inf)
        del self._inflight[ack.batch]
        self._remember(ack.batch)
        self.stats.acks += 1

    def _confirm_tables(self, listed: list[str], inf: _InFlight) -> None:
        """Believe an ack's `tables` only for tables its batch carried in full; keep the most recent ones."""
        proven = [t for t in listed if t in inf.tables]
        if len(proven) < len(listed):
            self.stats.tables_unproven += len(listed) - len(proven)
            self._warn("unproven_tables", f"ack for batch {inf.batch} listed signal tables it did not carry; ignored")
        if not proven:
            return
        for t in proven:
            if t not in self._tables:
                self.stats.tables_confirmed += 1
            self._tables[t] = None
            self._tables.move_to_end(t)
        while len(self._tables) > MAX_CONFIRMED_TABLES:
            self._tables.popitem(last=False)
        self.store.set_state(TABLES_STATE_KEY, list(self._tables))

    def _remember(self, batch: int) -> None:
        self._done[batch] = None
        while len(self._done) > self.cfg.recent_batches:
            self._done.popitem(last=False)

    # --- sending ---------------------------------------------------------------------------------------------

    def _in_flight_seqs(self) -> set[int]:
        s = set(self._parked)
        for inf in self._inflight.values():
            s.update(inf.seq_los)
        return s

    # --- daily data budget ------------------------------------------------------------------------------------

    def budget_used(self) -> int:
        """Bytes sent today (UTC), persisted in the store so a restart does not reset the day's budget."""
        day = int(self.clock() // 86400)
        if self.store.get_meta("budget_day", -1) != day:
            self.store.set_meta({"budget_day": day, "budget_used": 0})
        return self.store.get_meta("budget_used")

    def _spend(self, n: int) -> None:
        self.budget_used()  # rolls the day over first if needed
        self.store.set_meta({"budget_used": self.store.get_meta("budget_used") + n})

    def budget_spent(self) -> bool:
        b = self.cfg.daily_budget_bytes
        return b > 0 and self.budget_used() >= b

    def _encode(self, rows: list[OutboxRow]) -> tuple[wire.Batch, bytes, list[OutboxRow]] | None:
        """The batch of the longest prefix of `rows` within the wire's limits (halving until it fits); None when
        not even the first row fits alone. Config validation and the store's segment splitting make that
        impossible for what the agent writes itself; it is a backstop, not a path."""
        while rows:
            # Where the backfill stands once this batch is out: the lowest row neither in it, nor in flight, nor
            # kept unsent. Read per attempt: halving leaves rows behind.
            position = self.store.next_unsent(self._in_flight_seqs() | {r.seq_lo for r in rows})
            b = wire.Batch(self.vehicle.fleet, self.vehicle.id, self._next_batch, [r.segment() for r in rows],
                           time.time(), extra={backfill.KEY: position})
            try:
                return b, wire.encode_batch(b, known_tables=self._tables), rows
            except wire.LimitError as e:
                if len(rows) == 1:
                    # Kept in the store (nothing is deleted without an ack), never sent: the cloud would refuse it.
                    self._parked.add(rows[0].seq_lo)
                    self.stats.oversized_rows += 1
                    log.error("outbox row %d cannot be sent within the wire's limits (%s); kept, not sent",
                              rows[0].seq_lo, e)
                    return None
                rows = rows[: len(rows) // 2]
        return None

    def _publish(self, leaf: str, rows: list[OutboxRow]) -> bool:
        """Queue one batch with paho; False when it could not (connection just lost, paho's queue full)."""
        enc = self._encode(rows)
        if enc is None:
            return True  # the row is parked; carry on with the rest
        b, payload, rows = enc
        batch_id = b.batch
        self._next_batch += 1
        info = self._client.publish(self.topic(leaf), payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            log.debug("publish not queued: %s", mqtt.error_string(info.rc))
            return False
        n_samples = sum(r.n for r in rows if r.kind == "samples")
        self._inflight[batch_id] = _InFlight(batch_id, [r.seq_lo for r in rows], time.monotonic(), n_samples,
                                             [(r.seq_lo, r.seq_hi) for r in rows], set(b.tables), b.referenced)
        self.stats.batches_sent += 1
        self.stats.bytes_sent += len(payload)
        if self.cfg.daily_budget_bytes:
            self._spend(len(payload))
        self.stats.samples_sent += n_samples
        self.stats.records_sent += sum(r.n for r in rows if r.kind != "samples")
        return True

    def _pump(self) -> None:
        now = time.monotonic()
        for bid, inf in list(self._inflight.items()):
            if now - inf.sent_at > self.cfg.ack_timeout_s:
                del self._inflight[bid]
                self.stats.ack_timeouts += 1
        if now - self._last_status > self.cfg.status_interval_s:
            self._publish_status("online")
        if self.model is not None and not self._publish_model():
            return
        while len(self._inflight) < self.cfg.max_inflight_batches:
            busy = self._in_flight_seqs()
            records = self.store.pending(True, busy, self.cfg.batch_max_bytes)
            if records:
                kind = records[0].kind
                same = [r for r in records if r.kind == kind]
                if not self._publish("alerts" if kind == "alert" else "events", same):
                    return  # back to the network loop, which notices the lost connection
                continue
            if self.budget_spent():
                self.stats.budget_held = True  # samples wait for tomorrow's budget; records above still go
                break
            self.stats.budget_held = False
            size, oldest = self.store.pending_samples(busy, self.cfg.batch_max_bytes)
            if oldest is None:
                break
            due = (
                size >= self.cfg.batch_max_bytes
                or time.time() - oldest >= self.cfg.batch_max_age_s
                or self._flush.is_set()
            )
            if not due:
                break
            if self.cfg.live_lane_s > 0:
                since = self._lane.observe(self.store.newest_sample()) - self.cfg.live_lane_s
                rows = self.store.pending_live_first(busy, since, self.cfg.batch_max_bytes)
            else:
                rows = self.store.pending(False, busy, self.cfg.batch_max_bytes)
            if not self._publish("telemetry", rows):
                return

    # --- lifecycle -------------------------------------------------------------------------------------------

    def _connect(self) -> bool:
        if not self.cfg.tls and self.stats.connect_failures == 0 and self.stats.connects == 0:
            log.warning("MQTT over plain TCP to %s:%d (mqtt.tls = false): for a lab only", self.cfg.host, self.cfg.port)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.cfg.session_expiry_s
        try:
            self._client.connect(
                self.cfg.host, self.cfg.port, self.cfg.keepalive_s, clean_start=False, properties=props
            )
            return True
        except (OSError, ValueError) as e:
            self.stats.connect_failures += 1
            log.debug("connect to %s:%d failed: %s", self.cfg.host, self.cfg.port, e)
            return False

    def run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            if not self._connect():
                delay = backoff_delay(attempt, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s, self._rng)
                attempt += 1
                self._stop.wait(delay)
                continue
            deadline = time.monotonic() + self.cfg.connack_timeout_s
            while not self._stop.is_set():
                rc = self._client.loop(timeout=0.05)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    break
                if self._connected:
                    attempt = 0
                    try:
                        self._pump()
                    except Exception:
                        log.exception("uplink pump failed; retrying")
                        self._stop.wait(1.0)
                elif time.monotonic() > deadline:
                    break  # no CONNACK: start over
            if self._stop.is_set():
                break
            self._went()
            if not self._stop.is_set():
                delay = backoff_delay(attempt, self.cfg.reconnect_min_s, self.cfg.reconnect_max_s, self._rng)
                attempt += 1
                self._stop.wait(delay)
        self._goodbye()

    def _goodbye(self) -> None:
        try:
            if self._connected:
                info = self._publish_status("offline")
                end = time.monotonic() + 2
                while not info.is_published() and time.monotonic() < end:
                    self._client.loop(timeout=0.05)
                self._client.disconnect()
                self._client.loop(timeout=0.1)
        except Exception:
            log.debug("error while saying goodbye", exc_info=True)

    def start(self) -> None:
        self._thread = numpy_memory.thread(self.run, "uplink")
        self._thread.start()

    def flush(self) -> None:
        """Send sample segments now instead of waiting for a batch to fill or age (shutdown, tests)."""
        self._flush.set()

    def stop(self, drain_s: float = 0.0) -> None:
        """Stop; first, for up to `drain_s`, keep sending what is pending and wait for acks."""
        if drain_s > 0 and self._thread is not None:
            self.flush()
            end = time.monotonic() + drain_s
            while time.monotonic() < end and (self.store.status()["backlog_records"] > 0):
                if not self._thread.is_alive():
                    break
                time.sleep(0.05)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    @property
    def connected(self) -> bool:
        return self._connected
