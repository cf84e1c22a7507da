"""The pipeline with a real store and a real model: scoring goes on while the store cannot be written (a genuine
SQLITE_FULL), alerts wait in a bounded memory queue, and everything held is written once space returns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.contract import FeatureSpec
from agent.decode.j1939 import J1939Decoder
from agent.frames import FrameBatch
from agent.pipeline import Pipeline
from agent.records import SampleArrays
from agent.scoring import Scorer
from agent.signals import SignalRegistry
from agent.sim import Harvester, generate_frames
from agent.store import Store
from agent.testing.onnx_models import linear_softmax_model, make_contract

REPO = Path(__file__).resolve().parents[1]


def _always_alarming_scorer(tmp_path: Path) -> Scorer:
    feats = [FeatureSpec("t", "ET1.EngCoolantTemp", "mean", 10)]
    # Huge positive weight on a standardised ~90 °C temperature: P(fault) ~ 1 on every window.
    path = linear_softmax_model(tmp_path / "m.onnx", make_contract(feats), np.array([[0.0, 5.0]]), np.zeros(2))
    return Scorer.load(path)


def _fill_disk(store: Store) -> None:
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count={pages}")


def test_store_full_then_back(tmp_path: Path) -> None:
    reg = SignalRegistry()
    store = Store(tmp_path / "s.sqlite", first_seq=1)
    p = Pipeline(reg, {"can0": J1939Decoder(reg)}, _always_alarming_scorer(tmp_path), store,
                 memory_max_samples=5000, memory_max_records=3)
    frames = list(generate_frames(Harvester(seed=1), 120))
    _fill_disk(store)
    half = len(frames) // 2
    for i in range(0, half, 500):
        p.on_frames(FrameBatch.from_messages(frames[i : i + 500]))
        p.flush_samples()
    assert p.store_error is not None and "full" in p.store_error
    assert p.stats.windows_scored > 0 and p.stats.alerts_opened == 1  # scoring went on
    assert len(p.pending_records) == 1  # the alert waits in memory
    assert p.buffer.n == 5000  # bounded: the oldest samples beyond the bound were dropped and counted
    dropped = p.stats.errors["samples_dropped_store_unavailable"]
    assert dropped > 0
    assert store.status()["records_written"] == {"samples": 0, "records": 0}
    store.db.execute("PRAGMA max_page_count=1073741823")  # space returns
    for i in range(half, len(frames), 500):
        p.on_frames(FrameBatch.from_messages(frames[i : i + 500]))
    p.flush_samples()
    p.flush_records()
    assert p.store_error is None and not p.pending_records
    st = store.status()
    assert st["records_written"]["records"] == 1
    assert st["records_written"]["samples"] + dropped == p.stats.samples  # every sample: written or counted
    store.close()


def test_records_beyond_the_memory_bound_are_dropped_oldest_first_and_counted(tmp_path: Path) -> None:
    reg = SignalRegistry()
    store = Store(tmp_path / "s.sqlite", first_seq=1)
    p = Pipeline(reg, {}, None, store, memory_max_records=3)
    _fill_disk(store)
    p.pending_records = [("event", {"kind": "x", "ts": float(i), "data": {"pad": "y" * 5000}}) for i in range(5)]
    p.flush_records()
    assert [r[1]["ts"] for r in p.pending_records] == [2.0, 3.0, 4.0]
    assert p.stats.errors["records_dropped_store_unavailable"] == 2
    store.close()


@pytest.mark.parametrize("n", [0, 1, 7])
def test_sample_buffer_round_trip(n: int) -> None:
    reg = SignalRegistry()
    from agent.pipeline import SampleBuffer

    b = SampleBuffer(reg)
    sids = np.array([reg.intern("A"), reg.intern("B")], np.int32)
    b.add(SampleArrays(np.arange(n, dtype=float), sids[np.arange(n) % 2], np.arange(n, dtype=float)))
    cols = b.take()
    if n == 0:
        assert cols is None
        return
    assert cols is not None and len(cols) == n
    assert b.put_back(cols, limit=n) == 0 and b.n == n
