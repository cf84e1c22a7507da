"""The rollout controller, run by `cloud-sync serve` in a thread of its own every `[rollout] tick_s`.

A tick: (1) publish, retained, the `model/desired` of each running rollout to its vehicles of the waves so far that
have not had it, and an empty retained payload (no desired model) to an aborted rollout's vehicles that are not
active on it; wait up to `[rollout] publish_timeout_s` for the broker to confirm them; (2) in ONE database
transaction, record what was confirmed (what was not is sent again next tick), then judge each running rollout's
current wave (cloud_sync/rollout.py) and start the next wave, halt the rollout, or finish it.

The publishing is done before the transaction, not inside it, so that waiting for the broker never keeps the
receiver's worker from the database (the worker, blocked, would in turn keep paho from reading the confirmations).
A desired message is the same bytes every time for a rollout (`issued_at` is the rollout's creation time), so
publishing it again, or from several receivers sharing a database, changes nothing for a vehicle; the transaction
holds the rollout lock, so only one of them moves a rollout on.

The commands (`cloud-sync rollout start|pause|resume|abort`, `model rollback`) only write the database; what they
ask for happens here, at the next tick: a paused or halted rollout sends nothing and does not move; an aborted one
has its vehicles' desired model cleared.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence

import paho.mqtt.client as mqtt

from cloud_sync import rollout as ro
from cloud_sync.config import CloudConfig
from cloud_sync.db import FleetDB, RolloutInfo, RolloutTx
from cloud_sync.errors import CloudDBError
from harvester_common import modelwire as mw
from harvester_common import wire

log = logging.getLogger("cloud_sync.controller")


class Controller:
    """`tick()` does one round (tests call it directly); `start()` runs it every `[rollout] tick_s` in a thread.
    `ready`: set while the client is connected and subscribed (the receiver's `connected`); a tick without it
    does nothing, so no publish is left waiting on a broker that is away."""

    def __init__(self, cfg: CloudConfig, db: FleetDB, client: mqtt.Client,
                 ready: threading.Event | None = None) -> None:
        self.cfg = cfg
        self.db = db
        self.client = client
        self.ready = ready
        self.stats: Counter[str] = Counter()
        self._desired: dict[tuple[int, int], bytes] = {}  # (rollout, chunk_bytes) → its desired message
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # --- one tick --------------------------------------------------------------------------------------------

    def tick(self) -> None:
        if self.ready is not None and not self.ready.is_set():
            self.stats["ticks_offline"] += 1
            return
        work, to_clear = self.db.rollout_work()
        if not work and not to_clear:  # no rollout running, nothing to clear: no write transaction either
            self._desired.clear()
            self.stats["ticks"] += 1
            return
        sent: dict[int, list[str]] = {}
        for r, vehicles in work:
            desired = self._desired_message(r)
            msgs = [(wire.vehicle_topic(v.fleet, v.vehicle, mw.LEAF_DESIRED), desired) for v in vehicles]
            confirmed = self._publish(msgs)
            sent[r.id] = [v.vehicle for v, ok in zip(vehicles, confirmed, strict=True) if ok]
            if vehicles:
                log.info("rollout %d (%s %s): desired model sent to %d of %d vehicles of waves 1..%d", r.id, r.name,
                         r.version, len(sent[r.id]), len(vehicles), r.wave + 1)
        cleared: dict[int, list[str]] = {}
        clear_now = [(rid, v, f) for rid, v, f, superseded in to_clear if not superseded]
        confirmed = self._publish([(wire.vehicle_topic(f, v, mw.LEAF_DESIRED), b"") for _, v, f in clear_now])
        for (rid, v, _), ok in zip(clear_now, confirmed, strict=True):
            if ok:
                cleared.setdefault(rid, []).append(v)
        for rid, v, _, superseded in to_clear:
            if superseded:  # a later rollout's desired model replaced ours: nothing of ours left to clear
                cleared.setdefault(rid, []).append(v)
        self.stats["desired_sent"] += sum(map(len, sent.values()))
        self.stats["desired_cleared"] += len(clear_now)
        with self.db.rollout_tx() as tx:
            for rid, names in sent.items():
                tx.mark_sent(rid, names)
            for rid, names in cleared.items():
                tx.mark_cleared(rid, names)
                log.info("rollout %d (aborted): desired model cleared on %d vehicles: %s", rid, len(names),
                         ", ".join(names[:20]) + (" ..." if len(names) > 20 else ""))
            running = tx.running()
            for r in running:
                self._judge(tx, r)
        self._desired = {k: v for k, v in self._desired.items() if k[0] in {r.id for r in running}}
        self.stats["ticks"] += 1

    def _judge(self, tx: RolloutTx, r: RolloutInfo) -> None:
        steps = [v.step() for v in tx.wave(r.id, r.wave)]
        if any(s.state == ro.PENDING for s in steps):
            return  # the wave is not all sent yet: judged once every vehicle had its chance
        v = ro.evaluate_wave(steps, r.success_threshold, r.error_threshold)
        where = f"rollout {r.id} ({r.name} {r.version}, {r.mode}): wave {r.wave + 1} of {r.waves}"
        if v.action == "halt":
            tx.set_state(r.id, "halted", f"wave {r.wave + 1} of {r.waves}: {v.reason}")
            self.stats["halted"] += 1
            log.warning("%s halted: %s", where, v.reason)
        elif v.action == "advance" and r.wave + 1 >= r.waves:
            tx.set_state(r.id, "done", "")
            self.stats["done"] += 1
            log.info("%s passed (%s): rollout done", where, v.reason)
        elif v.action == "advance":
            tx.set_wave(r.id, r.wave + 1)
            self.stats["waves_started"] += 1
            log.info("%s passed (%s): wave %d starts", where, v.reason, r.wave + 2)

    def _desired_message(self, r: RolloutInfo) -> bytes:
        chunk_bytes = self.cfg.rollout.chunk_bytes
        key = (r.id, chunk_bytes)
        if key not in self._desired:
            package = self.db.package_bytes(r.package_sha256)
            info = self.db.package_info(r.package_sha256)
            if package is None or info is None:  # the registry never deletes: a database edited by hand
                raise CloudDBError(f"rollout {r.id}: package {r.package_sha256} is not in the registry")
            d = mw.desired_for(package, r.name, r.version, info.key_id, rollout=str(r.id), mode=r.mode,
                               chunk_bytes=chunk_bytes, issued_at=r.created_at)
            self._desired[key] = mw.encode_desired(d)
        return self._desired[key]

    def _publish(self, msgs: Sequence[tuple[str, bytes]]) -> list[bool]:
        """Publish each (topic, payload) retained with QoS 1; which the broker confirmed within the timeout."""
        if not msgs:
            return []
        infos = [self.client.publish(topic, payload, qos=1, retain=True) for topic, payload in msgs]
        deadline = time.monotonic() + self.cfg.rollout.publish_timeout_s
        out = []
        for info in infos:
            # ValueError: not queued (paho's queue full); RuntimeError: failed. Either way: sent again next tick.
            with contextlib.suppress(ValueError, RuntimeError):
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            out.append(info.is_published())
        unconfirmed = out.count(False)
        if unconfirmed:
            self.stats["publishes_unconfirmed"] += unconfirmed
            log.warning("%d of %d model/desired publishes not confirmed by the broker within %gs; sent again next "
                        "tick", unconfirmed, len(msgs), self.cfg.rollout.publish_timeout_s)
        return out

    # --- the thread ------------------------------------------------------------------------------------------

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.cfg.rollout.tick_s):
            try:
                self.tick()
                if failing:
                    log.info("rollout controller: the database is back")
                failing = False
            except CloudDBError as e:
                self.stats["tick_failures"] += 1
                if not failing:  # said once per outage; the receiver's worker says it every retry already
                    log.error("rollout controller: database unavailable (%s); retrying every tick", e)
                failing = True
            except Exception:
                self.stats["tick_failures"] += 1
                log.exception("rollout controller: a tick failed; retrying next tick")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cloud-sync-rollouts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
