"""The store writer on a real store with a real full disk (SQLITE_FULL: the file may not grow past its pages): what
cannot be written is held in memory within its bounds, the oldest beyond them dropped and counted, retried once
per interval and not on every batch, and written with its state once space returns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.records import SampleArrays
from agent.signals import SignalRegistry
from agent.store import Store
from agent.writer import SampleBuffer, StoreWriter
from harvester_common import wire


def _fill_disk(store: Store) -> None:
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count={pages}")


def _space_returns(store: Store) -> None:
    store.db.execute("PRAGMA max_page_count=1073741823")


def _samples(reg: SignalRegistry, t0: float, n: int) -> SampleArrays:
    """`n` samples of two signals, one every 10 ms from `t0`; noisy values, so that a segment needs fresh pages."""
    sids = np.array([reg.intern("A", "can0/00"), reg.intern("B", "can0/00")], np.int32)
    rng = np.random.default_rng(int(t0))
    return SampleArrays(t0 + 0.01 * np.arange(n), sids[np.arange(n) % 2], rng.normal(size=n))


def _event(i: int) -> tuple[str, dict[str, object]]:
    return "event", {"kind": "x", "ts": float(i), "data": {"pad": "y" * 5000}}


def test_held_while_full_retried_once_per_interval_then_written(tmp_path: Path) -> None:
    reg = SignalRegistry()
    store = Store(tmp_path / "s.sqlite", first_seq=1)
    w = StoreWriter(store, reg, memory_max_samples=1000, memory_max_records=3)
    _fill_disk(store)
    w.append_samples(_samples(reg, 0.0, 1500))
    w.maybe_flush(1.0, max_samples=1, now=100.0)
    assert w.store_error is not None and "full" in w.store_error
    assert w.errors["store_write_failed"] == 1
    assert w.buffer.n == 1000 and w.errors["samples_dropped_store_unavailable"] == 500  # the oldest 500

    for i in range(5):  # not tried while the store is down; the oldest beyond the bound go
        w.append_records([_event(i)], {"k": i})
    assert [r[1]["ts"] for r in w.pending_records] == [2.0, 3.0, 4.0] and w.pending_state == {"k": 4}
    assert w.errors["records_dropped_store_unavailable"] == 2 and w.errors["store_write_failed"] == 1

    _space_returns(store)
    w.maybe_flush(1.0, max_samples=1, now=100.5)  # within the interval: not retried yet
    assert w.store_error is not None and w.errors["store_write_failed"] == 1
    assert store.status()["records_written"] == {"samples": 0, "records": 0}

    w.maybe_flush(1.0, max_samples=1, now=101.0)  # one interval on: retried, and everything held is written
    assert w.store_error is None and not w.pending_records and not w.pending_state and w.buffer.n == 0
    assert store.status()["records_written"] == {"samples": 1000, "records": 3}
    assert store.get_state("k") == 4  # in the records' transaction
    rows = store.pending(records=False, exclude=set(), max_bytes=1 << 30)
    ts = np.concatenate([wire.decode_columns(json.loads(r.head), r.body).ts_us for r in rows])
    assert ts.min() == 5_000_000 and ts.max() == 14_990_000  # the newest 1000 of 0.00 .. 14.99 s
    store.close()


def test_records_are_written_at_once_while_the_store_is_writable(tmp_path: Path) -> None:
    reg = SignalRegistry()
    store = Store(tmp_path / "s.sqlite", first_seq=1)
    w = StoreWriter(store, reg)
    w.append_records([_event(1)], {"k": [1]})
    assert store.status()["records_written"]["records"] == 1 and store.get_state("k") == [1]
    w.append_samples(_samples(reg, 0.0, 10))
    w.maybe_flush(60.0, max_samples=1000)  # neither enough samples nor old enough: they wait for their segment
    assert store.status()["records_written"]["samples"] == 0 and w.buffer.n == 10
    w.flush()
    assert store.status()["records_written"]["samples"] == 10
    store.close()


def test_state_alone_on_a_full_disk_is_refused_not_raised(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite", first_seq=1)
    w = StoreWriter(store, SignalRegistry())
    _fill_disk(store)
    assert w.set_state("drift/m/1", {"pad": "y" * 100_000}) is False
    assert store.get_state("drift/m/1") is None and w.store_error is None  # not a held write: nothing to retry
    _space_returns(store)
    assert w.set_state("drift/m/1", {"pad": "y"}) is True and store.get_state("drift/m/1") == {"pad": "y"}
    store.close()


def test_records_beyond_the_memory_bound_are_dropped_oldest_first_and_counted(tmp_path: Path) -> None:
    reg = SignalRegistry()
    store = Store(tmp_path / "s.sqlite", first_seq=1)
    w = StoreWriter(store, reg, memory_max_records=3)
    _fill_disk(store)
    w.pending_records = [_event(i) for i in range(5)]
    w.flush_records()
    assert [r[1]["ts"] for r in w.pending_records] == [2.0, 3.0, 4.0]
    assert w.errors["records_dropped_store_unavailable"] == 2
    store.close()


@pytest.mark.parametrize("n", [0, 1, 7])
def test_sample_buffer_round_trip(n: int) -> None:
    reg = SignalRegistry()
    b = SampleBuffer(reg)
    sids = np.array([reg.intern("A"), reg.intern("B")], np.int32)
    b.add(SampleArrays(np.arange(n, dtype=float), sids[np.arange(n) % 2], np.arange(n, dtype=float)))
    cols = b.take()
    if n == 0:
        assert cols is None
        return
    assert cols is not None and len(cols) == n
    assert b.put_back(cols, limit=n) == 0 and b.n == n


def test_a_signals_resolution_travels_with_its_samples(tmp_path: Path) -> None:
    """The J1939 decoder's (scale, offset) of a signal reaches the store's segment, through a failed write and
    back; a signal without one (NMEA, serial) has none."""
    reg = SignalRegistry()
    rpm = reg.intern("EEC1.EngSpeed", "can0/00", "rpm", (0.125, 0.0))
    lat = reg.intern("GPS.Latitude", "gps", "deg")
    assert reg.intern("EEC1.EngSpeed", "can0/00", "rpm") == rpm and reg.resolution(rpm) == (0.125, 0.0)
    assert reg.intern("EEC1.EngSpeed", "can0/00", "rpm", (1.0, 0.0)) == rpm and reg.resolution(rpm) == (0.125, 0.0)
    assert reg.resolution(lat) is None
    b = SampleBuffer(reg)
    b.add(SampleArrays(np.arange(6) * 0.02, np.array([rpm, lat] * 3, np.int32),
                       np.array([800.125, 28.51, 800.25, 28.52, 801.0, 28.53])))
    cols = b.take()
    assert cols is not None and cols.signals == [reg.key(rpm), reg.key(lat)] and cols.scales == [(0.125, 0.0), None]
    b.put_back(cols, limit=100)
    again = b.take()
    assert again is not None and again.scales == [(0.125, 0.0), None]
    store = Store(tmp_path / "s.sqlite", first_seq=1)
    store.append_samples(again)
    (row,) = store.pending(records=False, exclude=set(), max_bytes=1 << 30)
    head = json.loads(row.head)
    assert head["enc"] == wire.ENC_V2
    assert head["signals"] == [["EEC1.EngSpeed", "can0/00", "rpm", 0.125, 0], ["GPS.Latitude", "gps", "deg"]]
    out = wire.decode_columns(head, row.body)
    np.testing.assert_array_equal(out.value.view(np.uint64), again.value.view(np.uint64))
    store.close()


def test_a_resolution_given_later_fills_in_where_none_was() -> None:
    reg = SignalRegistry()
    sid = reg.intern("X", "can0/00", "")
    assert reg.resolution(sid) is None
    assert reg.intern("X", "can0/00", "", (0.5, -10.0)) == sid and reg.resolution(sid) == (0.5, -10.0)
