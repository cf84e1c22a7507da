"""The pipeline with the store writer on a real store and a real model: scoring goes on while the store cannot be
written (a genuine SQLITE_FULL), alerts wait in a bounded memory queue, and everything held is written once space
returns."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.contract import FeatureSpec
from agent.decode.j1939 import J1939Decoder
from agent.frames import FrameBatch
from agent.pipeline import Pipeline
from agent.scoring import Scorer
from agent.signals import SignalRegistry
from agent.store import Store
from agent.writer import StoreWriter
from harvester_sim import Harvester, generate_frames
from harvester_testing.onnx_models import linear_softmax_model, make_contract

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
    w = StoreWriter(store, reg, memory_max_samples=5000, memory_max_records=3)
    p = Pipeline(reg, {"can0": J1939Decoder(reg)}, _always_alarming_scorer(tmp_path), w)
    frames = list(generate_frames(Harvester(seed=1), 120))
    _fill_disk(store)
    half = len(frames) // 2
    for i in range(0, half, 500):
        p.feed("can0", FrameBatch.from_messages(frames[i : i + 500]))
        w.flush_samples()
    assert w.store_error is not None and "full" in w.store_error
    assert p.stats.windows_scored > 0 and p.stats.alerts_opened == 1  # scoring went on
    assert len(w.pending_records) == 1  # the alert waits in memory
    assert w.buffer.n == 5000  # bounded: the oldest samples beyond the bound were dropped and counted
    dropped = w.errors["samples_dropped_store_unavailable"]
    assert dropped > 0
    assert store.status()["records_written"] == {"samples": 0, "records": 0}
    store.db.execute("PRAGMA max_page_count=1073741823")  # space returns
    for i in range(half, len(frames), 500):
        p.feed("can0", FrameBatch.from_messages(frames[i : i + 500]))
    w.flush()
    assert w.store_error is None and not w.pending_records
    st = store.status()
    assert st["records_written"]["records"] == 1
    assert st["records_written"]["samples"] + dropped == p.stats.samples  # every sample: written or counted
    store.close()


def _alarming_scorer_with_guard(tmp_path: Path, z_hi: float) -> Scorer:
    from agent.contract import Familiarity

    feats = [FeatureSpec("t", "ET1.EngCoolantTemp", "mean", 10), FeatureSpec("fan", "FD.FanSpeed", "mean", 10),
             FeatureSpec("gone", "LFE.NoSuchSignal", "mean", 10)]
    c = make_contract(feats, mean=(0.0, 0.0, 0.0), std=(1.0, 1e4, 1.0), max_missing_fraction=0.9,
                      input_layout="features+missing_mask", required_features=("t",),
                      familiarity=Familiarity((-z_hi, -z_hi, -z_hi), (z_hi, z_hi, z_hi), 0.0))
    w = np.zeros((6, 2))
    w[0, 1] = 5.0  # P(fault) ~ 1 on a ~90 °C coolant temperature
    return Scorer.load(linear_softmax_model(tmp_path / "g.onnx", c, w, np.zeros(2)))


def _feed(p: Pipeline, seconds: float) -> None:
    frames = list(generate_frames(Harvester(seed=1), seconds))
    for i in range(0, len(frames), 500):
        p.feed("can0", FrameBatch.from_messages(frames[i : i + 500]))


def test_unfamiliar_windows_never_alert_and_are_counted_with_the_features_responsible(tmp_path: Path) -> None:
    reg = SignalRegistry()
    # Coolant at ~90 °C is 90 training std from a training mean of 0: far outside an envelope of +-10.
    p = Pipeline(reg, {"can0": J1939Decoder(reg)}, _alarming_scorer_with_guard(tmp_path, 10.0), None)
    _feed(p, 120)
    assert p.stats.windows > 10 and p.stats.alerts_opened == 0 and p.stats.windows_scored == 0
    assert p.stats.windows_unfamiliar == p.stats.windows
    assert p.stats.unfamiliar_features == {"t": p.stats.windows}
    assert p.stats.missing_features["gone"] == p.stats.windows  # a feature never sent is counted as missing
    st = p.scoring_status()
    assert st["windows_unfamiliar"] == p.stats.windows and st["unfamiliar_features"] == {"t": p.stats.windows}


def test_alert_says_which_features_the_model_had(tmp_path: Path) -> None:
    reg = SignalRegistry()
    store = Store(tmp_path / "s.sqlite", first_seq=1)
    p = Pipeline(reg, {"can0": J1939Decoder(reg)}, _alarming_scorer_with_guard(tmp_path, 1000.0),
                 StoreWriter(store, reg))
    _feed(p, 60)
    assert p.stats.alerts_opened == 1 and p.stats.windows_unfamiliar == 0
    rows = store.pending(records=True, exclude=set(), max_bytes=1 << 30)
    import json

    alert = next(json.loads(r.head) for r in rows if r.kind == "alert")
    assert alert["features_present"] == ["t", "fan"]
    store.close()
