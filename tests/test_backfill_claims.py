"""The cloud's gap report while a vehicle backfills (harvester_common/backfill.py, cloud_sync/db.py `_backfill`), on
both database engines: holes at or above the position a vehicle's batches state are backfilling, below it gaps; an
older vehicle that states none keeps its gaps; and what a header claims, forged, replayed, oversized or not a number
at all, is believed only as far as the vehicle's own sequence numbers bear it out, so it never hides a gap for good.
The same through the real receiver and Mosquitto: a hostile claim never gets its batch refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_sync.db import FleetDB
from cloud_sync.db_sqlite import CloudDB
from cloud_sync.receiver import Receiver
from cloud_sync.reports import Reports, VehicleStats
from harvester_common import backfill, wire
from harvester_common.seqranges import holes, merge_ranges
from harvester_testing.broker import MosquittoBroker
from tests.test_cloud_db import event, samples
from tests.test_cloud_sync import Vehicle, cfg_for
from tests.test_uplink import wait_for

MAX_SEQ = 2**63 - 1


@pytest.fixture
def db(cloud_db: FleetDB) -> FleetDB:
    return cloud_db


def send(db: FleetDB, lo: int, n: int, position: Any = None, vid: str = "v1", bid: int = 1) -> None:
    extra = {} if position is None else {backfill.KEY: position}
    db.ingest([wire.Batch("f1", vid, bid, [samples(lo, n)], extra=extra)])


def stats(db: FleetDB, vid: str = "v1") -> VehicleStats:
    return next(v for v in Reports(db).stats() if v.vehicle == vid)


def test_holes_above_the_backfill_position_are_backfilling_and_below_it_gaps(db: FleetDB) -> None:
    send(db, 1, 10, position=11)  # before the outage: caught up
    send(db, 31, 10, position=11)  # after it, the live lane first: 11..30 still on the vehicle
    v = stats(db)
    assert v.gaps == [] and v.backfilling == [[11, 30]] and v.backfill_from == 11 and v.highest_seq == 40
    send(db, 11, 10, position=21)  # the backfill, oldest first
    assert (stats(db).gaps, stats(db).backfilling) == ([], [[21, 30]])
    send(db, 25, 6, position=41)  # the vehicle skipped 21..24: it does not hold them, so they are lost
    v = stats(db)
    assert v.gaps == [[21, 24]] and v.backfilling == [] and v.backfill_from == 41
    row = Reports(db).fleet()[0]
    assert (row["gaps"], row["backfilling"], row["backfilling_seqs"]) == (1, 0, 0)


def test_an_older_vehicle_that_states_no_position_keeps_its_gaps(db: FleetDB) -> None:
    send(db, 1, 10, vid="old")
    send(db, 31, 10, vid="old")
    v = stats(db, "old")
    assert v.gaps == [[11, 30]] and v.backfilling == [] and v.backfill_from is None


def test_evictions_and_quarantines_are_told_apart_from_backfilling(db: FleetDB) -> None:
    send(db, 1, 10, position=11)
    db.ingest([wire.Batch("f1", "v1", 2, [event(100, "evicted", {"ranges": [[11, 20]]})],
                          extra={backfill.KEY: 21})])  # eviction notices go first
    send(db, 91, 9, position=21)  # the live lane
    v = stats(db)
    assert v.evicted == [[11, 20]] and v.gaps == [] and v.backfilling == [[21, 90]]
    row = Reports(db).fleet()[0]
    assert (row["gaps"], row["backfilling"], row["backfilling_seqs"]) == (0, 1, 70)


def test_a_position_above_what_the_vehicle_sent_is_cut_to_it_and_reveals_rather_than_hides(db: FleetDB) -> None:
    send(db, 1, 10, position=11)
    send(db, 31, 10, position=MAX_SEQ)  # forged, or a bug: "I hold nothing below 2^63-1"
    v = stats(db)
    assert v.backfill_from == 41  # nothing above the highest number received is a hole: there it means nothing
    assert v.gaps == [[11, 30]] and v.backfilling == []  # nothing hidden; the hole shows as lost
    send(db, 41, 10, position=11)  # a lower position later never lowers it (it would hide what was let go)
    assert stats(db).backfill_from == 41 and stats(db).gaps == [[11, 30]]
    send(db, 11, 20, position=51)  # the real data arrives: the hole is filled, whatever was claimed
    assert stats(db).gaps == [] and stats(db).backfill_from == 51


def test_a_forged_low_position_hides_a_gap_only_until_the_vehicles_next_batch(db: FleetDB) -> None:
    send(db, 1, 10, position=1)  # first contact, forged: "I still hold everything from 1"
    send(db, 31, 10, position=1)
    assert stats(db).gaps == [] and stats(db).backfilling == [[11, 30]]
    send(db, 41, 10, position=51)  # the vehicle's own next batch: it holds nothing below 51
    assert stats(db).gaps == [[11, 30]] and stats(db).backfilling == []
    send(db, 1, 10, position=1, bid=99)  # the forged batch replayed: changes nothing now
    v = stats(db)
    assert v.gaps == [[11, 30]] and v.backfilling == [] and v.backfill_from == 51


@pytest.mark.parametrize("value, reason", [
    ("11", "not_an_integer"), (11.0, "not_an_integer"), (True, "not_an_integer"), ([[1, MAX_SEQ]], "not_an_integer"),
    ({"from": 1}, "not_an_integer"), (None, "not_an_integer"), (0, "out_of_range"), (-5, "out_of_range"),
])
def test_a_claim_that_is_not_a_sequence_number_is_counted_and_changes_nothing(db: FleetDB, value: Any,
                                                                              reason: str) -> None:
    send(db, 1, 10, position=11)
    db.ingest([wire.Batch("f1", "v1", 2, [samples(31, 10)], extra={backfill.KEY: value})])
    v = stats(db)
    assert v.records["samples"] == 20  # the batch is stored all the same
    assert v.backfill_from == 11 and v.backfill_ignored == 1 and v.backfilling == [[11, 30]]
    counters = dict(db.read("SELECT name, value FROM counters WHERE vehicle='v1' AND name LIKE ?", ("backfill%",)))
    assert counters == {f"backfill_ignored:{reason}": 1}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(1, 300), st.integers(1, 20),
                          st.one_of(st.none(), st.integers(-3, 400), st.just(MAX_SEQ), st.text(max_size=2))),
                min_size=1, max_size=12))
def test_whatever_the_claims_the_report_follows_the_rule_and_never_hides_below_a_stated_position(
    tmp_path_factory: pytest.TempPathFactory, sent: list[tuple[int, int, Any]]
) -> None:
    """Random batches with random claims, in any order: the report is the holes cut at the highest position ever
    believed, each position cut to one past the highest number received when it came; gaps and backfilling
    together are exactly the holes."""
    db = CloudDB(tmp_path_factory.mktemp("claims") / "cloud.sqlite")
    try:
        received: list[tuple[int, int]] = []
        position: int | None = None
        for i, (lo, n, claim) in enumerate(sent):
            db.ingest([wire.Batch("f1", "v1", i, [samples(lo, n)], extra={backfill.KEY: claim})])
            received.append((lo, lo + n - 1))
            if isinstance(claim, int) and not isinstance(claim, bool) and claim >= 1:
                top = merge_ranges(received)[-1][1]
                position = max(position or 0, min(claim, top + 1))
        covered = merge_ranges(received)
        expect = backfill.split(holes(covered, covered[-1][1]), position)
        v = stats(db)
        assert (v.gaps, v.backfilling, v.backfill_from) == (expect[0], expect[1], position)
        assert merge_ranges(tuple(r) for r in v.gaps + v.backfilling) == holes(covered, covered[-1][1])
    finally:
        db.close()


@pytest.fixture
def receiver(broker: MosquittoBroker, tmp_path: Path) -> Iterator[tuple[Receiver, CloudDB]]:
    cfg = cfg_for(broker, tmp_path)
    db = CloudDB(cfg.db.path)
    rx = Receiver(cfg, db)
    rx.start()
    assert rx.connected.wait(10)
    yield rx, db
    rx.stop()
    db.close()


def test_hostile_claims_over_the_real_receiver_are_stored_acked_and_counted(
    broker: MosquittoBroker, receiver: tuple[Receiver, CloudDB]
) -> None:
    rx, db = receiver
    veh = Vehicle(broker)
    try:
        claims: list[Any] = [11, "x" * 1000, [[1, MAX_SEQ]] * 100, MAX_SEQ, -1, {"a": [1, 2]}, 3.5, False, 1]
        for i, claim in enumerate(claims):
            veh.send(wire.Batch("f1", "v1", 100 + i, [samples(1 + 50 * i if i else 1, 10)],
                                extra={backfill.KEY: claim}))
        wait_for(lambda: len(veh.acks) == len(claims), what="an ack for every batch")
        assert {a.status for a in veh.acks} == {"ok"} and rx.stats["batches"] == len(claims)
        v = stats(db)
        assert v.backfill_ignored == 6  # the text, the list, -1, the object, 3.5, False
        # MAX_SEQ came with the batch holding 151..160: cut to 161, and the later 1 cannot lower it
        assert v.backfill_from == 161
        assert v.gaps == [[11, 50], [61, 100], [111, 150]]
        assert v.backfilling == [[161, 200], [211, 250], [261, 300], [311, 350], [361, 400]]
    finally:
        veh.close()
