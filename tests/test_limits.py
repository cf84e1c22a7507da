"""The vehicle's batch limits against the receiver's caps (harvester_common/wire.py Limits, docs/protocol.md): a vehicle
configured at the edge of what its config allows sends only batches the real receiver accepts, whatever it is given
to send: segments past the sample cap, more signals than one segment's table holds, names the receiver's patterns
refuse, a record past the record cap."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from agent.config import AgentConfig, ConfigError, MqttConfig, VehicleConfig, load_config
from agent.store import Store
from agent.uplink import Uplink
from cloud_sync.config import CloudConfig
from cloud_sync.db_sqlite import CloudDB
from cloud_sync.receiver import Receiver
from cloud_sync.reports import Reports
from harvester_common import wire
from harvester_testing.broker import MosquittoBroker
from tests.test_uplink import wait_for

T0_US = 1_790_000_000_000_000


def test_config_refuses_batch_limits_past_the_wire_caps(tmp_path: Path) -> None:
    ok = AgentConfig.model_validate({"mqtt": {"batch_max_bytes": wire.MAX_BATCH_BYTES},
                                     "store": {"flush_max_samples": wire.MAX_SEGMENT_SAMPLES}})
    assert ok.mqtt.batch_max_bytes == wire.MAX_BATCH_BYTES
    for section, key, value in (("mqtt", "batch_max_bytes", wire.MAX_BATCH_BYTES + 1),
                                ("store", "flush_max_samples", wire.MAX_SEGMENT_SAMPLES + 1),
                                ("vehicle", "id", "bad id with spaces")):
        p = tmp_path / f"{key}.toml"
        p.write_text(f"[{section}]\n{key} = {value!r}\n".replace("'", '"'))
        with pytest.raises(ConfigError, match=key):
            load_config(p)
    with pytest.raises(ValueError):
        CloudConfig.model_validate({"mqtt": {"max_message_bytes": wire.MAX_MESSAGE_BYTES - 1}})


def _cols(signals: list[tuple[str, str, str]], n: int, seed: int) -> wire.SampleColumns:
    rng = np.random.default_rng(seed)
    sig = (np.arange(n) % len(signals)).astype(np.uint16)
    return wire.SampleColumns(signals, sig, T0_US + np.arange(n, dtype=np.int64) * 1000, rng.normal(0, 1, n))


@pytest.fixture
def receiver(broker: MosquittoBroker, tmp_path: Path) -> Iterator[tuple[Receiver, CloudDB]]:
    """A real cloud_sync receiver on the test's broker, subscribed, with its SQLite database."""
    cfg = CloudConfig.model_validate({"mqtt": {"host": broker.host, "port": broker.port, "client_id": "cs-limits"},
                                      "db": {"path": str(tmp_path / "cloud.sqlite")}})
    db = CloudDB(cfg.db.path)
    rx = Receiver(cfg, db)
    rx.start()
    assert rx.connected.wait(10)
    yield rx, db
    rx.stop()
    db.close()


def test_a_vehicle_at_the_edge_sends_only_batches_the_receiver_accepts(
    receiver: tuple[Receiver, CloudDB], broker: MosquittoBroker, tmp_path: Path
) -> None:
    store = Store(tmp_path / "out.sqlite", first_seq=1)
    # More than one segment's worth of samples in one write (a store outage's backlog flushed at once)...
    store.append_samples(_cols([("EEC1.EngSpeed", "can0/00", "rpm"), ("ET1.EngCoolantTemp", "can0/00", "°C")],
                               2 * wire.MAX_SEGMENT_SAMPLES + 5_000, 1))
    # ...more distinct signals than one segment's table holds, with names at their length cap...
    many = [(f"M{i:05d}." + "x" * 121, "can1/3F", "km/h") for i in range(wire.MAX_SIGNALS_PER_SEGMENT + 1500)]
    store.append_samples(_cols(many, 20_000, 2))
    # ...and names the receiver's patterns refuse (a serial device's key with a control character, a long unit).
    store.append_samples(_cols([("vib.Accel\x01 Rms", "ser 0", "m/s²" * 20)], 100, 3))
    written = 2 * wire.MAX_SEGMENT_SAMPLES + 5_000 + 20_000 + 100
    # Records: one as large as the cap allows, one past it (kept on the vehicle, never sent), one ordinary.
    big = {"alert_id": "big", "state": "open", "ts": 1.0, "snapshot": {"s": "y" * (wire.MAX_RECORD_BYTES - 200)}}
    huge = {"alert_id": "huge", "state": "open", "ts": 1.0, "snapshot": {"s": "y" * (wire.MAX_RECORD_BYTES + 1)}}
    seqs = store.append_records([("alert", big), ("alert", huge), ("event", {"kind": "dtc_open", "ts": 2.0,
                                                                               "data": {}})])

    rx, db = receiver
    edge = AgentConfig.model_validate({"mqtt": {"batch_max_bytes": wire.MAX_BATCH_BYTES}}).mqtt
    up = Uplink(MqttConfig(**{**edge.model_dump(), "host": broker.host, "port": broker.port, "tls": False,
                              "batch_max_age_s": 0.1, "reconnect_min_s": 0.1, "ack_timeout_s": 120}),
                VehicleConfig(fleet="f1", id="edge-1"), store, seed=1)
    up.start()
    try:
        wait_for(lambda: store.status()["backlog_records"] == 1, timeout=120, what="all but the oversized row acked")
        assert Reports(db).rejected() == {} and up.stats.rejected_batches == 0 and rx.stats["rejected_acks"] == 0
        assert up.stats.oversized_rows == 1  # counted, kept in the store, never offered to the cloud
        v = Reports(db).stats()[0]
        # the unsendable record is the one gap the cloud reports, as it should: it never arrived
        assert v.records == {"samples": written, "alerts": 1, "events": 1} and v.gaps == [[seqs[1], seqs[1]]]
        assert Reports(db).alerts()[0]["alert_id"] == "big"
        names = {r[0] for r in db.read("SELECT name FROM signals")}
        assert "vib.Accel__Rms" in names and len(names) == 2 + len(many) + 1
    finally:
        up.stop()
        store.close()


def test_the_ack_of_the_largest_batch_fits_what_the_vehicle_accepts() -> None:
    """An ack names one range per segment: for a batch of MAX_SEGMENTS_PER_BATCH segments at the highest sequence
    numbers, with the longest vehicle id and reason, it is still within MAX_ACK_BYTES, and a vehicle's
    `mqtt.max_ack_bytes` can never be set below that (else it would drop the ack as oversized and resend for ever)."""
    worst = wire.Ack("v" * 64, wire.MAX_BATCH_ID, [(wire.MAX_SEQ - 1, wire.MAX_SEQ)] * wire.MAX_SEGMENTS_PER_BATCH,
                     status="rejected", reason="\x01" * 500, tables=["f" * 32] * wire.MAX_ACK_TABLES)
    assert len(wire.encode_ack(worst)) <= wire.MAX_ACK_BYTES
    assert MqttConfig().max_ack_bytes >= wire.MAX_ACK_BYTES
    with pytest.raises(ValidationError, match="max_ack_bytes"):
        AgentConfig.model_validate({"mqtt": {"max_ack_bytes": wire.MAX_ACK_BYTES - 1}})


def test_a_batch_of_many_small_records_is_acked_and_not_resent_for_ever(
    receiver: tuple[Receiver, CloudDB], broker: MosquittoBroker, tmp_path: Path
) -> None:
    # Thousands of small events at 19-digit sequence numbers: one batch carries them as thousands of segments, and
    # the receiver's ack names a range for each (~42 bytes apiece: ~170 KB for 4,000).
    store = Store(tmp_path / "out.sqlite", first_seq=10**18)
    n = 6_000
    store.append_records([("event", {"kind": "dtc_open", "ts": float(i), "data": {}}) for i in range(n)])
    _, db = receiver
    up = Uplink(MqttConfig(host=broker.host, port=broker.port, tls=False, batch_max_age_s=0.1, ack_timeout_s=120),
                VehicleConfig(fleet="f1", id="many-1"), store, seed=1)
    up.start()
    try:
        wait_for(lambda: store.status()["backlog_records"] == 0, timeout=60, what="every record acked")
        assert up.stats.acks_rejected == {} and Reports(db).stats()[0].records["events"] == n
    finally:
        up.stop()
        store.close()
