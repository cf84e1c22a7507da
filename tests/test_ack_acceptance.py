"""Which acks the vehicle believes: only one for a batch it has in flight, and only for the rows that batch
carried. Forged, replayed, oversized and malformed acks arrive through a real Mosquitto into a real store and must
delete nothing they should not; a hypothesis fuzz drives the handler with arbitrary payloads."""

from __future__ import annotations

import json
import sqlite3
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import MqttConfig
from agent.store import Store
from agent.uplink import Uplink, _InFlight
from harvester_common import wire
from harvester_testing.broker import MosquittoBroker
from tests.test_uplink import VEHICLE, Acker, _cols, wait_for

BIG = 2**63 - 1


def _rows(path: Path) -> set[tuple[int, int]]:
    con = sqlite3.connect(path)
    try:
        return {(int(a), int(b)) for a, b in con.execute("SELECT seq_lo, seq_hi FROM outbox")}
    finally:
        con.close()


def _ack(batch: int, ranges: list[tuple[int, int]], vehicle: str = "v1", status: str = "ok") -> bytes:
    return wire.encode_ack(wire.Ack(vehicle, batch, ranges, status, "test" if status == "rejected" else ""))


def test_forged_and_replayed_acks_delete_nothing_outside_the_batch_in_flight(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    store = Store(tmp_path / "out.sqlite", first_seq=1)
    acker = Acker(broker)
    acker.acking.clear()
    for _ in range(60):
        store.append_samples(_cols(20))  # seq 1..1200 in sixty segments of ~430 bytes
    store.append_records([("alert", {"ts": 1.0, "alert_id": "a1"})])  # seq 1201
    # One batch in flight at a time, two segments (~860 bytes) per batch: most of the store is not in flight.
    cfg = MqttConfig(host=broker.host, port=broker.port, tls=False, batch_max_age_s=0.1, reconnect_min_s=0.1,
                     reconnect_max_s=0.5, max_inflight_batches=1, batch_max_bytes=1024, ack_timeout_s=600)
    up = Uplink(cfg, VEHICLE, store, seed=1)
    up.start()
    topic = wire.vehicle_topic("f1", "v1", "ack")
    try:
        wait_for(lambda: len(acker.batches) >= 1, what="the first batch")
        leaf, first = acker.batches[0]
        assert leaf == "alerts" and [(s.seq_lo, s.seq_hi) for s in first.segments] == [(1201, 1201)]
        before = _rows(store.path)
        forged = [
            _ack(first.batch + 12345, [(1, BIG)]),  # a batch never sent, naming everything
            _ack(first.batch - 1, [(1, 1200)]),  # another unknown batch naming exactly the unsent samples
            _ack(first.batch, [(1, 1201)], vehicle="v2"),  # the right batch, another vehicle
            _ack(first.batch + 777, [(1, 1200)], status="rejected"),  # a rejection for a batch never sent
            b"[" * 5000 + b"]" * 5000,  # deep nesting: RecursionError inside json.loads
            b'{"schema": 1, "vehicle": "v1", "batch": ' + b"[" * 3000 + b"]" * 3000 + b', "ranges": []}',
            b"\xff\xfe not json",
            json.dumps({"schema": 1, "vehicle": "v1", "batch": first.batch, "ranges": [[0, 5]]}).encode(),
            json.dumps({"schema": 1, "vehicle": "v1", "batch": 2**80, "ranges": [[1, 2**80]]}).encode(),
            b"x" * 300_000,  # oversized (past the default max_ack_bytes, 256 KiB)
        ]
        for p in forged:
            acker.c.publish(topic, p, qos=1)
        wait_for(lambda: sum(up.stats.acks_rejected.values()) >= len(forged), what="forged acks counted")
        assert up._thread is not None and up._thread.is_alive()  # no payload killed the uplink
        assert _rows(store.path) == before  # nothing deleted
        assert store.status()["last_acked_seq"] == 0
        assert up.stats.acks == 0 and up.stats.rejected_batches == 0
        rej = up.stats.acks_rejected
        assert rej.get("not_in_flight", 0) == 3  # two forged ok acks and the forged rejection
        assert rej.get("wrong_vehicle", 0) == 1 and rej.get("oversized", 0) == 1
        assert rej.get("malformed", 0) == 5  # batch 2**80 among them: past 64 bits, refused by the decoder

        # The real batch acked with ranges far beyond what it carried: only its own row goes.
        acker.c.publish(topic, _ack(first.batch, [(1, BIG)]), qos=1)
        wait_for(lambda: up.stats.acks == 1, what="the real ack applied")
        assert _rows(store.path) == before - {(1201, 1201)}
        assert store.status()["last_acked_seq"] == 1201  # not 2**63-1
        assert up.stats.acks_trimmed == 1

        # The same ack again (a replay, or the broker redelivering): harmless and counted.
        wait_for(lambda: len(acker.batches) >= 2, what="the next batch")
        second = acker.batches[1][1]
        now = _rows(store.path)
        acker.c.publish(topic, _ack(first.batch, [(1, BIG)]), qos=1)
        wait_for(lambda: up.stats.acks_replayed >= 1, what="the replay counted")
        assert _rows(store.path) == now

        # The next batch, acked for only part of what it carried: only the rows wholly covered go.
        segs = [(s.seq_lo, s.seq_hi) for s in second.segments]
        assert len(segs) >= 2
        acker.c.publish(topic, _ack(second.batch, [segs[0]]), qos=1)
        wait_for(lambda: up.stats.acks == 2, what="the partial ack applied")
        assert _rows(store.path) == now - {segs[0]}

        # Everything still flows once the cloud acks honestly.
        acker.acking.set()
        for _, b in list(acker.batches[2:]):  # whatever went out while the peer was not acking
            acker.c.publish(topic, _ack(b.batch, [(g.seq_lo, g.seq_hi) for g in b.segments]), qos=1)
        up.flush()
        wait_for(lambda: store.status()["backlog_records"] == 0, timeout=60, what="drain")
        assert set(acker.seqs()) == set(range(1, 1202))
        st = store.status()
        assert st["acked"] == {"samples": 1200, "records": 1}
    finally:
        up.stop()
        acker.close()
        store.close()


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                       st.floats(allow_nan=True), st.text(max_size=8))
_json = st.recursive(_json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                     max_leaves=20)


_pos = st.one_of(st.integers(min_value=1, max_value=260), st.sampled_from([50, 51, 100, 101, 150, 151, BIG, 2**64]))
_valid_ranges = st.lists(st.tuples(_pos, _pos).map(sorted), min_size=1, max_size=4)


@st.composite
def _ack_payloads(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "mutated", "mutated", "well_formed", "well_formed", "well_formed"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "json":
        return json.dumps(draw(_json)).encode()
    # Well formed: right vehicle and schema, batch 7 (in flight) or another, any ranges; the decoder accepts it.
    d: dict[str, object] = {"schema": 1, "vehicle": "v1", "batch": draw(st.sampled_from([7, 7, 7, 8, 2**70])),
                            "ranges": draw(_valid_ranges), "status": draw(st.sampled_from(["ok", "ok", "rejected"]))}
    if kind == "mutated":  # one field made wrong, or dropped
        key = draw(st.sampled_from(sorted(d)))
        if draw(st.booleans()):
            del d[key]
        else:
            d[key] = draw(st.one_of(_json, st.sampled_from(["v2", "", 0, -1, [[0, 5]], [[5, 1]], "nope"])))
    return json.dumps(d).encode()


def _covered(payload: bytes, lo: int, hi: int) -> bool:
    """Did this payload name [lo, hi] whole, in ranges that are well-formed pairs? (the test's own oracle)"""
    d = json.loads(payload)
    pairs = [r for r in d["ranges"] if isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r)]
    covered = set()
    for a, b in pairs:
        covered.update(range(max(a, lo), min(b, hi) + 1))
    return covered == set(range(lo, hi + 1))


def test_fuzzed_acks_never_delete_outside_the_batch_in_flight() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "fuzz.sqlite", first_seq=1)
        for _ in range(4):
            store.append_samples(_cols(50))  # 1..50, 51..100, 101..150, 151..200
        outside = {(1, 50), (151, 200)}
        original = store.db.execute("SELECT * FROM outbox WHERE seq_lo IN (51, 101)").fetchall()
        up = Uplink(MqttConfig(host="127.0.0.1", port=1, tls=False), VEHICLE, store, seed=1)  # never started
        topic = up.topic("ack")
        applied: list[int] = []

        @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(_ack_payloads())
        def one(payload: bytes) -> None:
            # Batch 7 carries rows 51..100 and 101..150, put back if an earlier example's ack deleted them.
            store.db.executemany("INSERT OR IGNORE INTO outbox VALUES (?,?,?,?,?,?,?,?,?,?)", original)
            up._inflight = {7: _InFlight(7, [51, 101], time.monotonic(), 100, [(51, 100), (101, 150)])}
            msg = mqtt.MQTTMessage(topic=topic.encode())
            msg.payload = payload
            s = up.stats
            before = s.acks + s.rejected_batches + s.acks_replayed + sum(s.acks_rejected.values())
            up._on_message(up._client, None, msg)  # must not raise, whatever the payload
            after = s.acks + s.rejected_batches + s.acks_replayed + sum(s.acks_rejected.values())
            assert after == before + 1  # every message is accounted for exactly once
            rows = _rows(store.path)
            assert outside <= rows  # never a row the batch in flight did not carry
            gone = {(51, 100), (101, 150)} - rows
            for lo, hi in gone:  # and only rows the ack named whole
                assert _covered(payload, lo, hi)
            if gone:
                applied.append(len(gone))
            assert store.status()["last_acked_seq"] <= 150

        one()
        store.close()
        assert len(applied) >= 20  # the fuzz reached the deleting path often, not only the rejections
