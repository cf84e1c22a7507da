"""Signal tables by reference (docs/protocol.md, "Signal tables by reference"), on real parts: the vehicle's store
and uplink, a real Mosquitto, the real cloud_sync receiver on both engines. A vehicle references only a table the
cloud confirmed storing for a batch that carried it; the cloud refuses a reference it cannot resolve for THAT
vehicle; the vehicle then sends full tables again, and every sequence number arrives once."""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import zstandard
from paho.mqtt.enums import CallbackAPIVersion

from agent.uplink import TABLES_STATE_KEY, Uplink
from cloud_sync.db import FleetDB
from harvester_common import wire
from harvester_testing.broker import MosquittoBroker
from tests.test_cloud_sync import Vehicle, cfg_for
from tests.test_delivery import Rig
from tests.test_uplink import wait_for


def header(payload: bytes) -> dict[str, object]:
    """A message's header JSON, read here without the wire module (what is really on the wire)."""
    if payload[3] == wire.CODEC_ZSTD:
        body = zstandard.ZstdDecompressor().decompressobj().decompress(payload[4:])
    elif payload[3] == wire.CODEC_ZSTD_D1:  # magicless zstd with the protocol's dictionary (its bytes)
        d = zstandard.ZstdCompressionDict(wire.ZSTD_DICT_D1)
        dz = zstandard.ZstdDecompressor(dict_data=d, format=zstandard.FORMAT_ZSTD1_MAGICLESS)
        body = dz.decompressobj().decompress(payload[4:])
    else:
        body = payload[4:]
    (n,) = struct.unpack_from("<I", body)
    h = json.loads(body[4 : 4 + n])
    assert isinstance(h, dict)
    return h


def sample_heads(payload: bytes) -> list[dict[str, object]]:
    return [s for s in header(payload)["segments"] if s["kind"] == "samples"]  # type: ignore[attr-defined,index]


class Sniffer:
    """Records every telemetry message as published; with `ack` set, also answers it as a receiver would
    (`ack(batch_header)` gives the ack's `tables`, or None for a receiver that predates them)."""

    def __init__(self, broker: MosquittoBroker, ack: Callable[[dict[str, object]], list[str] | None] | None = None,
                 ) -> None:
        self.payloads: list[bytes] = []
        self.ack = ack
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="sniffer", protocol=mqtt.MQTTv5)
        ready = threading.Event()
        self.c.on_connect = lambda c, *a: c.subscribe("fleet/+/vehicle/+/telemetry", qos=1)
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.on_message = self._on_message
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        assert ready.wait(10)

    def _on_message(self, c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        self.payloads.append(bytes(m.payload))
        if self.ack is not None:
            h = header(bytes(m.payload))
            ranges = [(s["seq_lo"], s["seq_hi"]) for s in h["segments"]]  # type: ignore[attr-defined]
            tables = self.ack(h)
            ack = wire.Ack(str(h["vehicle"]), int(h["batch"]), ranges, tables=tables or [])  # type: ignore[call-overload]
            c.publish(wire.vehicle_topic(str(h["fleet"]), str(h["vehicle"]), "ack"), wire.encode_ack(ack), qos=1)

    def kinds(self) -> list[str]:
        """Per sample segment sent: 'full' or 'ref'."""
        return ["ref" if "table" in s else "full" for p in self.payloads for s in sample_heads(p)]

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture
def rig(broker: MosquittoBroker, tmp_path: Path, cloud_db: FleetDB) -> Iterator[Rig]:
    """The vehicle, and the real receiver on either engine (started by the test)."""
    r = Rig(broker, tmp_path)
    r.db.close()
    r.db = cloud_db  # type: ignore[assignment]
    yield r
    r.up.stop()
    r.stop_cloud()
    r.store.close()


@pytest.fixture
def vehicle(broker: MosquittoBroker, tmp_path: Path) -> Iterator[Rig]:
    """The vehicle alone: the test answers its batches itself."""
    r = Rig(broker, tmp_path)
    yield r
    r.close()


def send_one(rig: Rig, n: int = 2000) -> None:
    """One segment, drained before the next, so that each goes in a batch of its own."""
    rig.write(1, n)
    rig.up.flush()
    wait_for(rig.drained, timeout=60, what="the vehicle's backlog to drain")


def stored_values(db: FleetDB) -> np.ndarray:
    return np.array([v for (v,) in db.read("SELECT value FROM samples ORDER BY seq")]).view(np.uint64)


def written_values(rig: Rig, segments: int, n: int = 2000) -> np.ndarray:
    from tests.test_delivery import cols

    return np.concatenate([cols(n, i * n * 1000).value for i in range(segments)]).view(np.uint64)


def test_first_batch_full_later_ones_referenced_and_stored_bit_identical(broker: MosquittoBroker, rig: Rig) -> None:
    sniff = Sniffer(broker)
    rig.start_cloud()
    rig.up.start()
    for _ in range(4):
        send_one(rig)
    rig.check_exactly_once()
    assert sniff.kinds() == ["full", "ref", "ref", "ref"]
    assert rig.up.stats.tables_confirmed == 1
    assert np.array_equal(stored_values(rig.db), written_values(rig, 4))
    assert len(rig.db.read("SELECT digest FROM signal_tables")) == 1
    sniff.close()


def test_a_cloud_that_lost_its_tables_refuses_then_gets_full_tables_and_every_seq_once(
        broker: MosquittoBroker, rig: Rig) -> None:
    sniff = Sniffer(broker)
    rig.start_cloud()
    rig.up.start()
    send_one(rig)
    send_one(rig)
    assert sniff.kinds() == ["full", "ref"]
    with rig.db._transaction() as cur:  # a database restored from a backup older than the tables
        cur.execute("DELETE FROM signal_tables")
    send_one(rig)
    send_one(rig)
    rig.check_exactly_once()
    # The third segment: refused as a reference, then resent in full; the fourth referenced again.
    assert sniff.kinds() == ["full", "ref", "ref", "full", "ref"]
    assert rig.rx is not None and rig.rx.stats[f"rejected:{wire.UNKNOWN_TABLE_REASON}"] == 1
    assert rig.up.stats.tables_forgotten == 1 and rig.up.stats.rejected_batches == 0
    assert np.array_equal(stored_values(rig.db), written_values(rig, 4))


def test_confirmed_tables_survive_a_restart(broker: MosquittoBroker, rig: Rig) -> None:
    sniff = Sniffer(broker)
    rig.start_cloud()
    rig.up.start()
    send_one(rig)
    cfg = rig.up.cfg
    rig.up.stop()
    assert len(rig.store.get_state(TABLES_STATE_KEY)) == 1
    rig.up = Uplink(cfg, rig.up.vehicle, rig.store, seed=4)
    rig.up.start()
    send_one(rig)
    rig.check_exactly_once()
    assert sniff.kinds() == ["full", "ref"]


def test_forged_references_are_refused_with_the_reason_and_nothing_is_stored(
        broker: MosquittoBroker, tmp_path: Path, cloud_db: FleetDB) -> None:
    from cloud_sync.receiver import Receiver
    from tests.test_cloud_sync import samples

    rx = Receiver(cfg_for(broker, tmp_path), cloud_db)
    rx.start()
    assert rx.connected.wait(10)
    v1, v2 = Vehicle(broker, vid="v1"), Vehicle(broker, vid="v2")
    full = wire.Batch("f1", "v1", 1, [samples(1, 100)])
    v1.send(full)
    wait_for(lambda: len(v1.acks) == 1, what="v1's ack")
    (digest,) = full.tables
    assert v1.acks[0].status == "ok" and v1.acks[0].tables == [digest]
    for i, forged in enumerate([digest, "0123456789abcdef" * 2]):  # v1's table, a digest nobody sent
        b = wire.Batch("f1", "v2", 10 + i, [samples(1, 100)])
        payload = wire.encode_batch(b, compress=False, known_tables={digest}).replace(digest.encode(), forged.encode())
        v2.send(b, payload=payload)
        wait_for(lambda k=i + 1: len(v2.acks) == k, what="v2's ack")  # type: ignore[misc]
        assert v2.acks[i].status == "rejected"
        assert v2.acks[i].reason.startswith(wire.UNKNOWN_TABLE_REASON + ":")
    assert cloud_db.read("SELECT COUNT(*) FROM samples WHERE vehicle='v2'") == [(0,)]
    assert cloud_db.read("SELECT COUNT(*) FROM signal_tables WHERE vehicle='v2'") == [(0,)]
    assert rx.stats[f"rejected:{wire.UNKNOWN_TABLE_REASON}"] == 2
    v1.close()
    v2.close()
    rx.stop()


def test_an_ack_listing_a_table_its_batch_did_not_carry_is_ignored(broker: MosquittoBroker, vehicle: Rig) -> None:
    rig = vehicle
    # A receiver (forged, or buggy) that confirms a digest the batch never carried: the vehicle keeps sending full.
    sniff = Sniffer(broker, ack=lambda h: ["ab" * 16])
    rig.up.start()
    for _ in range(3):
        send_one(rig)
    assert sniff.kinds() == ["full", "full", "full"]
    assert rig.up.stats.tables_unproven == 3 and rig.up.stats.tables_confirmed == 0
    assert rig.store.get_state(TABLES_STATE_KEY) is None
    sniff.close()


def test_a_receiver_that_predates_tables_never_gets_a_reference(broker: MosquittoBroker, vehicle: Rig) -> None:
    rig = vehicle
    sniff = Sniffer(broker, ack=lambda h: None)
    rig.up.start()
    for _ in range(3):
        send_one(rig)
    assert sniff.kinds() == ["full", "full", "full"]
    assert rig.up.stats.tables_unproven == 0
    sniff.close()



def test_the_cloud_keeps_the_most_recent_tables_of_each_vehicle_and_no_more(cloud_db: FleetDB) -> None:
    from cloud_sync.db import MAX_TABLES_PER_VEHICLE

    def table_batch(vid: str, i: int) -> wire.Batch:
        cols = wire.SampleColumns([(f"S{i}.V", "can0/00", "")], np.zeros(3, np.uint16),
                                  np.arange(3, dtype=np.int64), np.ones(3))
        b = wire.Batch("f1", vid, i, [wire.Segment("samples", 3 * i + 1, 3 * i + 3, columns=cols)])
        return wire.decode_batch(wire.encode_batch(b))

    extra = 5
    batches = [table_batch("v1", i) for i in range(MAX_TABLES_PER_VEHICLE + extra)]
    for b in batches:  # one transaction each, in order: the later, the more recent
        (r,) = cloud_db.ingest([b])
        assert r.tables == list(b.tables)
    cloud_db.ingest([table_batch("v2", 0)])
    kept = {d for (d,) in cloud_db.read("SELECT digest FROM signal_tables WHERE vehicle='v1'")}
    assert kept == {d for b in batches[extra:] for d in b.tables}
    (first,) = batches[0].tables
    assert cloud_db.signal_table("v1", first) is None
    (last,) = batches[-1].tables
    assert cloud_db.signal_table("v1", last) == batches[-1].tables[last]
    assert cloud_db.signal_table("v2", last) is None  # another vehicle's table is not this one's
    assert cloud_db.read("SELECT COUNT(*) FROM signal_tables WHERE vehicle='v2'") == [(1,)]


def test_the_vehicle_remembers_the_most_recently_confirmed_tables_and_no_more(vehicle: Rig) -> None:
    from agent.uplink import MAX_CONFIRMED_TABLES, _InFlight

    digests = [f"{i:032x}" for i in range(MAX_CONFIRMED_TABLES + 3)]
    for i, d in enumerate(digests):  # each as the ack of a batch that carried it in full
        vehicle.up._confirm_tables([d], _InFlight(i, [], 0.0, 0, tables={d}))
    assert vehicle.store.get_state(TABLES_STATE_KEY) == digests[3:]
    assert vehicle.up.stats.tables_confirmed == len(digests)
