"""The outbox: sequence numbers, acknowledgement, the size bound's eviction order, durability across reopen."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.store import Store, StoreError, finite_dumps, time_seq_floor
from harvester_common import wire


def _cols(n: int, t0: float = 1_700_000_000.0) -> wire.SampleColumns:
    rng = np.random.default_rng(n)
    return wire.SampleColumns(
        [("EEC1.EngSpeed", "can0/00", "rpm")],
        np.zeros(n, np.uint16),
        (np.arange(n) * 20_000 + int(t0 * 1e6)).astype(np.int64),
        rng.normal(1500, 100, n),
    )


def test_sequence_numbers_are_contiguous_across_kinds_and_reopen(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.sqlite", first_seq=1)
    assert s.append_samples(_cols(100)) == (1, 100)
    assert s.append_records([("alert", {"ts": 1.0}), ("event", {"kind": "dtc_open", "ts": 2.0})]) == [101, 102]
    s.close()
    s = Store(tmp_path / "a.sqlite", first_seq=1)
    assert s.append_samples(_cols(10)) == (103, 112)
    st = s.status()
    assert st["highest_seq"] == 112
    assert st["records_written"] == {"samples": 110, "records": 2}
    s.close()


def test_records_are_pending_before_samples_and_ack_deletes(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.sqlite", first_seq=1)
    s.append_samples(_cols(50))
    s.append_records([("alert", {"ts": 1.0, "score": 0.9})])
    recs = s.pending(True, set(), 1 << 20)
    assert [(r.kind, r.seq_lo) for r in recs] == [("alert", 51)]
    samples = s.pending(False, set(), 1 << 20)
    seg = samples[0].segment()
    assert seg.encoded is not None
    cols = wire.decode_columns(*seg.encoded)
    assert len(cols) == 50
    assert s.ack([(51, 51)]) == 1
    assert s.ack([(51, 51)]) == 0  # idempotent: a duplicate ack is harmless
    assert s.ack([(1, 49)]) == 0  # a partial range does not delete a segment it does not cover
    assert s.ack([(1, 50)]) == 1
    st = s.status()
    assert st["backlog_records"] == 0 and st["last_acked_seq"] == 51
    assert st["acked"] == {"samples": 50, "records": 1}
    s.close()


def test_in_flight_rows_are_skipped(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.sqlite", first_seq=1)
    for _ in range(3):
        s.append_samples(_cols(10))
    rows = s.pending(False, {1}, 1 << 20)
    assert [r.seq_lo for r in rows] == [11, 21]
    size, oldest = s.pending_samples({1, 11, 21})
    assert size == 0 and oldest is None
    s.close()


def test_bound_evicts_oldest_samples_first_keeps_alerts_and_reports(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.sqlite", max_bytes=1024 * 1024, first_seq=1)
    s.append_records([("alert", {"ts": 0.0, "alert_id": "first"})])
    for i in range(60):
        s.append_samples(_cols(5000, t0=1_700_000_000.0 + i * 100))
    s.append_records([("alert", {"ts": 1.0, "alert_id": "last"})])
    st = s.status()
    assert st["used_bytes"] <= 1024 * 1024
    assert st["evicted"]["samples"] > 0 and st["evicted"]["records"] == 0
    kept = {json.loads(r.head).get("alert_id") for r in s.pending(True, set(), 1 << 30) if r.kind == "alert"}
    assert kept == {"first", "last"}
    notices = [json.loads(r.head) for r in s.pending(True, set(), 1 << 30) if r.kind == "event"]
    evicted_n = sum(n["data"]["samples"] for n in notices)
    assert evicted_n == st["evicted"]["samples"]
    # Every sequence number is accounted for: still here, or named in an eviction notice.
    here = {q for r in s.pending(False, set(), 1 << 30) for q in range(r.seq_lo, r.seq_hi + 1)}
    named = {q for n in notices for lo, hi in n["data"]["ranges"] for q in range(lo, hi + 1)}
    assert here.isdisjoint(named)
    assert len(here) + len(named) == 60 * 5000
    s.close()


def test_records_are_evicted_only_when_no_samples_are_left(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.sqlite", max_bytes=1024 * 1024, first_seq=1)
    big = "x" * 20_000
    s.append_samples(_cols(1000))
    s.append_records([("event", {"ts": float(i), "kind": "note", "data": {"pad": big}}) for i in range(80)])
    st = s.status()
    assert st["evicted"]["samples"] == 1000 and st["evicted"]["records"] > 0
    assert st["used_bytes"] <= 1024 * 1024
    s.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.sqlite", first_seq=1)
    s.db.execute("PRAGMA user_version=99")
    s.close()
    with pytest.raises(StoreError, match="newer"):
        Store(tmp_path / "a.sqlite", first_seq=1)


@pytest.mark.parametrize("damage", ["garbage", "truncated_header", "torn_page"])
def test_corrupt_store_is_quarantined_not_deleted(tmp_path: Path, damage: str) -> None:
    p = tmp_path / "a.sqlite"
    s = Store(p, first_seq=1)
    for _ in range(20):
        s.append_samples(_cols(2000))
    s.close()
    raw = bytearray(p.read_bytes())
    if damage == "garbage":
        raw = bytearray(b"this is not a database" * 100)
    elif damage == "truncated_header":
        raw = raw[:50]
    else:
        raw[4096 * 3 : 4096 * 3 + 2048] = b"\xa5" * 2048  # a page torn mid-write
    p.write_bytes(bytes(raw))
    before = time_seq_floor()
    s = Store(p)
    assert s.quarantined is not None and s.quarantined.exists()
    assert s.quarantined.read_bytes() == bytes(raw)  # kept exactly as found
    notices = [json.loads(r.head) for r in s.pending(True, set(), 1 << 20)]
    assert notices[0]["kind"] == "store_quarantined" and notices[0]["data"]["moved_to"] == str(s.quarantined)
    # The new store numbers on from a time floor, far above the old store's numbers, never from 1 again.
    floor = notices[0]["data"]["seq_floor"]
    assert floor >= before > 20 * 2000
    lo, hi = s.append_samples(_cols(10))
    assert (lo, hi) == (floor + 1, floor + 10)
    s.close()


def test_migrations_cover_every_version_and_run_in_order(tmp_path: Path) -> None:
    from agent.store import MIGRATIONS, SCHEMA_VERSION

    assert len(MIGRATIONS) == SCHEMA_VERSION
    s = Store(tmp_path / "a.sqlite", first_seq=1)
    assert s.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    tables = {r[0] for r in s.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"outbox", "meta"} <= tables
    s.close()


@pytest.mark.parametrize("obj", [
    {"kind": "dtc_open", "ts": 1700000123.4565, "data": {"source": "can0/3F", "sa": 63, "spn": 412345, "fmi": 17,
                                                          "occurrence": None, "spn_name": None, "ok": True,
                                                          "text": "SPN 412345 (unknown), FMI 17: é ✓ \"q\"\n"}},
    {"v": 2, "clock": None, "quiet": [["can0/00", 110, 0, 61.5, 2, 1, 1, 1.0, "dtc_open", None, {}, 0]],
     "windows": [["can0/00", 0.0, 30, 5, 7, {"dtc_open": 5}, 1.0, 2.0, [[110, 0], (111, 1)], 0, 3]]},
    [1, -2.5, 1e300, 5e-324, 0.1, "x", [], {}, False], "a string", 3, 2.0, None,
])
def test_finite_dumps_writes_what_json_dumps_writes(obj: object) -> None:
    # The store's encoder is made once (agent/store.py, _strict_json): byte for byte what json.dumps would write.
    assert finite_dumps(obj) == json.dumps(obj, allow_nan=False)


def test_finite_dumps_writes_non_finite_numbers_as_null_and_refuses_what_is_not_json() -> None:
    nan, inf = float("nan"), float("inf")
    assert finite_dumps({"x": nan, "y": [inf, -inf, 2.0]}) == '{"x": null, "y": [null, null, 2.0]}'
    assert finite_dumps({"x": 1}) == '{"x": 1}'  # an error before leaves nothing behind for the next record
    with pytest.raises(TypeError):
        finite_dumps({"x": object()})
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises((ValueError, RecursionError)):
        finite_dumps(loop)
