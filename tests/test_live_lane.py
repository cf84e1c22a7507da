"""The live lane in the vehicle's outbox (agent/store.py): which rows the next sample batch carries when the newest
minute goes ahead of the backlog, where the backfill stands, and that neither question reads a long backlog whole.
Real SQLite files; the delivery across a real broker and cloud is tests/test_live_lane_delivery.py."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.store import Store
from agent.uplink import LaneReference
from harvester_common import backfill, wire

T0 = 1_800_000_000.0


def seg(t_s: float, n: int = 100, span_s: float = 10.0) -> wire.SampleColumns:
    """`n` samples over `span_s` seconds of data starting at `T0 + t_s`."""
    ts = (np.linspace(0, span_s, n) * 1e6).astype(np.int64) + int((T0 + t_s) * 1e6)
    return wire.SampleColumns([("EEC1.EngSpeed", "can0/00", "rpm")], np.zeros(n, np.uint16), ts,
                              np.full(n, 1500.0))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "out.sqlite", first_seq=1)
    yield s
    s.close()


def since(store: Store, lane_s: float = 60.0) -> float:
    """Where a lane of `lane_s` starts, measured from the newest segment held (the uplink measures it from the newest
    it has seen: the same here, where nothing has been acked)."""
    newest = store.newest_sample()
    assert newest is not None
    return newest[1] - lane_s


def fill(store: Store, minutes: int, every_s: float = 10.0) -> list[int]:
    """A backlog of `minutes` of data, one 100-sample segment per `every_s`; returns each segment's seq_lo."""
    return [store.append_samples(seg(i * every_s, span_s=every_s))[0] for i in range(int(minutes * 60 / every_s))]


def test_the_newest_minute_goes_first_newest_first_then_the_oldest_fill_the_batch(store: Store) -> None:
    los = fill(store, 20)  # 120 segments, 10 s each
    size = store.pending(False, set(), 1 << 30)[0].nbytes
    rows = store.pending_live_first(set(), since(store), 9 * size)
    # The lane: segments ending within 60 s of the newest's end, i.e. the last 7 (their data ends at 1140 ... 1200 s)
    lane = los[-7:][::-1]
    assert [r.seq_lo for r in rows] == lane + los[:2]  # then the two oldest, as room allows
    # Once those are in flight, the rest of the backlog goes oldest first: the lane is all in flight.
    busy = {r.seq_lo for r in rows}
    assert [r.seq_lo for r in store.pending_live_first(busy, since(store), 3 * size)] == los[2:5]


def test_samples_written_during_the_backfill_go_ahead_of_the_remaining_history(store: Store) -> None:
    los = fill(store, 20)
    size = store.pending(False, set(), 1 << 30)[0].nbytes
    start = since(store)
    busy = {r.seq_lo for r in store.pending_live_first(set(), start, 20 * size)}  # lane + 13 oldest in flight
    store.ack([(lo, lo + 99) for lo in busy], only=busy)  # ...and acked
    # With the live minute gone, the newest row held is history: measured from the newest seen, no lane is left.
    assert [r.seq_lo for r in store.pending_live_first(set(), start, 2 * size)] == los[13:15]
    fresh = store.append_samples(seg(1210.0))[0]
    rows = store.pending_live_first(set(), since(store), 2 * size)
    assert [r.seq_lo for r in rows] == [fresh, los[13]]  # the new one first, then the oldest left


def test_a_stray_timestamp_deep_in_the_backlog_does_not_jump_the_queue(store: Store) -> None:
    """A segment stamped in the future (a clock that jumped) among old ones: the lane walks back from the newest
    row and ends at the first one too old, so the stray stays where its sequence number puts it."""
    los = [store.append_samples(seg(i * 10.0))[0] for i in range(2)]
    stray = store.append_samples(seg(1_000_000.0))[0]
    los += [store.append_samples(seg(i * 10.0))[0] for i in range(2, 30)]
    size = store.pending(False, set(), 1 << 30)[0].nbytes
    rows = [r.seq_lo for r in store.pending_live_first(set(), since(store), 9 * size)]
    assert rows == los[-7:][::-1] + los[:2]  # the lane (data ending at 240 s and after), then the oldest two
    assert stray not in rows
    assert store.pending_live_first(set(rows), since(store), size)[0].seq_lo == stray  # its turn comes in order


def test_a_lane_larger_than_a_batch_is_sent_newest_first_and_one_row_always_goes(store: Store) -> None:
    los = fill(store, 2, every_s=5.0)  # 24 segments, all within the last 2 minutes
    size = store.pending(False, set(), 1 << 30)[0].nbytes
    rows = store.pending_live_first(set(), since(store, 600.0), 3 * size)
    assert [r.seq_lo for r in rows] == los[::-1][:3]
    assert [r.seq_lo for r in store.pending_live_first(set(), since(store, 600.0), 1)] == [los[-1]]  # alone


def test_the_backfill_position_is_the_lowest_row_neither_sent_nor_kept(store: Store) -> None:
    los = fill(store, 2)
    rec = store.append_records([("alert", {"ts": T0, "alert_id": "a"})])[0]
    assert store.next_unsent(set()) == los[0]
    assert store.next_unsent(set(los[:3])) == los[3]
    assert store.next_unsent(set(los)) == rec
    assert store.next_unsent(set(los) | {rec}) == rec + 1  # nothing else held: the next number the store gives


def _steps(store: Store, call: Callable[[], object]) -> int:
    """SQLite virtual-machine steps one call takes: how much of the file it reads, without timing anything."""
    n = [0]

    def tick() -> int:
        n[0] += 1
        return 0

    db: sqlite3.Connection = store.db
    db.set_progress_handler(tick, 1)
    try:
        call()
    finally:
        db.set_progress_handler(None, 1)
    return n[0]


def test_choosing_a_batch_never_reads_the_whole_backlog(tmp_path: Path) -> None:
    """A long outage's backlog: the uplink asks every tick what to send next and where the backfill stands.
    The work must not grow with the backlog: the same questions over 10 times the rows take about the same steps."""
    work = []
    for k, minutes in enumerate((20, 200)):
        s = Store(tmp_path / f"{k}.sqlite", first_seq=1)
        los = fill(s, minutes)
        busy = set(los[:8]) | set(los[-3:])  # in flight at both ends, as during a backfill
        size = s.pending(False, set(), 1 << 30)[0].nbytes

        def ask(s: Store = s, busy: set[int] = busy, size: int = size) -> None:
            s.pending_live_first(busy, since(s), 8 * size)
            s.next_unsent(busy)
            s.pending_samples(busy, 8 * size)

        work.append(_steps(s, ask))
        s.close()
    small, big = work
    assert big < 1.5 * small, f"{small} steps over 120 segments, {big} over 1,200"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 10**6), st.integers(0, 1000)), max_size=20),
       st.one_of(st.none(), st.integers(1, 2 * 10**6)))
def test_split_cuts_the_missing_ranges_at_the_position_and_loses_nothing(
    raw: list[tuple[int, int]], position: int | None
) -> None:
    from harvester_common.seqranges import merge_ranges

    missing = merge_ranges((lo, lo + d) for lo, d in raw)
    gaps, filling = backfill.split(missing, position)
    assert merge_ranges(tuple(r) for r in gaps + filling) == missing  # nothing lost, nothing added
    assert sum(hi - lo + 1 for lo, hi in gaps + filling) == sum(hi - lo + 1 for lo, hi in missing)
    if position is None:
        assert filling == []
    else:
        assert all(hi < position for _, hi in gaps) and all(lo >= position for lo, _ in filling)


@given(st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=5),
                 st.integers(-2**70, 2**70), st.lists(st.lists(st.integers(), max_size=2), max_size=2),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
def test_a_claim_is_a_sequence_number_or_ignored_with_a_reason(value: object) -> None:
    position, why = backfill.claim({backfill.KEY: value})
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 2**63 - 1:
        assert (position, why) == (value, "")
    else:
        assert position is None and why in ("not_an_integer", "out_of_range")
    assert backfill.claim({}) == (None, "")


def test_the_lane_reference_follows_the_segment_written_last_not_the_largest_time() -> None:
    ref = LaneReference()
    assert ref.observe(None) == -math.inf
    assert ref.observe((10, 1_000.0)) == 1_000.0
    assert ref.observe((11, 1e12)) == 1e12  # a clock that jumped: the newest written, so the reference, for now
    assert ref.observe((12, 1_010.0)) == 1_010.0  # the next segment puts it back where the data is
    assert ref.observe((12, 5.0)) == 1_010.0  # the same segment again (nothing new written)
    assert ref.observe((9, 2_000.0)) == 1_010.0  # an older segment (the newest was acked): history stays history
    assert ref.observe(None) == 1_010.0  # all acked: the last segment seen still holds it
    assert ref.observe((13, math.nan)) == 1_010.0  # a time that is no number is not a reference
    assert ref.observe((14, 900.0)) == 900.0  # a clock set back: the lane moves back with the data
