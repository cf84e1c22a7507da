"""Feature drift: running statistics are exact, the flag follows the policy, the state survives a restart, and the
pipeline reports drift as a stored event when a vehicle runs outside what the shipped model was trained on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from agent.config import ModelConfig
from agent.decode.j1939 import J1939Decoder
from agent.drift import DriftMonitor, DriftPolicy
from agent.frames import FrameBatch
from agent.pipeline import Pipeline
from agent.scoring import Scorer
from agent.signals import SignalRegistry
from agent.store import Store
from agent.writer import StoreWriter
from harvester_sim import Harvester, generate_frames

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "harvester-anomaly.int8.onnx"
DEFAULT = ModelConfig().drift_policy()  # the `[model] drift_*` defaults
TRAIN = {"a": {"mean": 10.0, "std": 2.0, "missing": 0.0}, "b": {"mean": -5.0, "std": 1.0, "missing": 0.1}}


def _policy(**keys: float) -> DriftPolicy:
    return ModelConfig.model_validate(keys).drift_policy()


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float64, st.tuples(st.integers(1, 40), st.just(2)),
           elements=st.one_of(st.floats(-1e6, 1e6), st.just(float("nan")))),
    st.integers(1, 7),
)
def test_running_statistics_equal_statistics_of_everything_seen(x: np.ndarray, pieces: int) -> None:  # type: ignore[type-arg]
    m = DriftMonitor(["a", "b"], TRAIN, DEFAULT)
    for part in np.array_split(x, pieces):
        m.update(part)
    r = m.report()["features"]
    for j, name in enumerate(["a", "b"]):
        col = x[:, j][np.isfinite(x[:, j])]
        assert r[name]["count"] == col.size
        assert r[name]["missing"] == pytest.approx(1 - col.size / len(x), abs=1e-4)
        if col.size:
            assert r[name]["mean"] == pytest.approx(col.mean(), rel=1e-6, abs=1e-3)
            assert r[name]["std"] == pytest.approx(col.std(), rel=1e-5, abs=1e-3)
            assert (r[name]["min"], r[name]["max"]) == pytest.approx((col.min(), col.max()), abs=1e-5)
        else:
            assert r[name]["mean"] is None


def _rows(rng: np.random.Generator, n: int, a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:  # type: ignore[type-arg]
    return np.column_stack([rng.normal(*a, n), rng.normal(*b, n)])


def test_no_verdict_before_min_windows_then_each_kind_of_drift_is_named() -> None:
    rng = np.random.default_rng(0)
    pol = _policy(drift_min_windows=50)
    same = DriftMonitor(["a", "b"], TRAIN, pol)
    same.update(_rows(rng, 500, (10, 2), (-5, 1)))
    assert same.drifted() == {} and same.report()["drift"] is False

    shifted = DriftMonitor(["a", "b"], TRAIN, pol)
    shifted.update(_rows(rng, 49, (30, 2), (-5, 1)))
    assert shifted.drifted() == {}  # 49 windows: too few to say
    shifted.update(_rows(rng, 1, (30, 2), (-5, 1)))
    assert list(shifted.drifted()) == ["a"] and "+10.0 training std" in shifted.drifted()["a"]

    wide = DriftMonitor(["a", "b"], TRAIN, pol)
    wide.update(_rows(rng, 500, (10, 2), (-5, 5)))
    assert list(wide.drifted()) == ["b"] and wide.drifted()["b"].startswith("std")

    # One vehicle in one field varies less than the whole training fleet: a narrow spread is not drift.
    steady = DriftMonitor(["a", "b"], TRAIN, pol)
    steady.update(_rows(rng, 500, (11, 0.01), (-5, 0.0)))
    assert steady.drifted() == {}

    gone = DriftMonitor(["a", "b"], TRAIN, pol)
    x = _rows(rng, 500, (10, 2), (-5, 1))
    x[:200, 0] = np.nan  # 40 % missing where training had none
    gone.update(x)
    assert list(gone.drifted()) == ["a"] and gone.drifted()["a"].startswith("missing 40%")
    rep = gone.report()
    assert rep["drift"] is True and rep["windows"] == 500
    json.dumps(rep, allow_nan=False)  # what is synced is strict JSON


def test_state_round_trip_and_damaged_state_is_refused() -> None:
    rng = np.random.default_rng(1)
    m = DriftMonitor(["a", "b"], TRAIN, DEFAULT)
    m.update(_rows(rng, 100, (10, 2), (-5, 1)))
    saved = json.loads(json.dumps(m.state()))
    back = DriftMonitor(["a", "b"], TRAIN, DEFAULT)
    assert back.restore(saved)
    assert back.report() == m.report()
    for bad in ({**saved, "features": ["a", "c"]}, {**saved, "mean": [1.0]}, {**saved, "count": [10**9, 1]},
                {**saved, "m2": "x"}, {}, {**saved, "rows": -1}):
        fresh = DriftMonitor(["a", "b"], TRAIN, DEFAULT)
        assert not fresh.restore(bad)
        assert fresh.rows == 0


def _run(store: Store, ambient_c: float, seconds: float) -> Pipeline:
    reg = SignalRegistry()
    w = StoreWriter(store, reg)
    p = Pipeline(reg, {"can0": J1939Decoder(reg)}, Scorer.load(MODEL), w,
                 drift_policy=_policy(drift_min_windows=24), drift_interval_s=60.0)
    w.resume(p)
    frames = list(generate_frames(Harvester(seed=3, duty="harvest", ambient_c=ambient_c), seconds))
    for i in range(0, len(frames), 2000):
        p.feed("can0", FrameBatch.from_messages(frames[i : i + 2000]))
    w.flush_samples()
    return p


def _drift_events(store: Store) -> list[dict]:  # type: ignore[type-arg]
    rows = store.pending(records=True, exclude=set(), max_bytes=1 << 30)
    return [e for e in (json.loads(r.head) for r in rows if r.kind == "event") if e["kind"] == "drift"]


def test_pipeline_reports_drift_as_events_and_keeps_statistics_across_restart(tmp_path: Path) -> None:
    # Training ambient temperatures were -15 to 45 °C: 24 °C is home ground, a 75 °C "ambient" is a broken sensor
    # or a climate the model never saw; both must be reported, only the second flagged (outside the training range
    # in every window, and 3 training std off). No verdict before two minutes: a simulated run's first windows
    # carry a start-up transient of the fan (the warm start's fixed point overshoots) that is not drift.
    home = Store(tmp_path / "home.sqlite", first_seq=1)
    p = _run(home, 24.0, 360)
    ev = _drift_events(home)
    assert ev and all(not e["data"]["drift"] for e in ev)  # periodic reports, no flag
    assert p.drift_status() == {"enabled": True, "drift": False, "windows": p.drift.rows, "features": []}  # type: ignore[union-attr]

    hot = Store(tmp_path / "hot.sqlite", first_seq=1)
    p = _run(hot, 75.0, 240)
    flagged = [e for e in _drift_events(hot) if e["data"]["drift"]]
    assert flagged, "a 75 °C ambient must be flagged"
    assert "AMB.AmbientAirTemp:mean:30s" in flagged[0]["data"]["drifted"]
    assert flagged[0]["data"]["unfamiliar"]["share"] == 1.0  # and none of those windows was turned into an alert
    assert p.stats.windows_unfamiliar == p.stats.windows and p.stats.alerts_opened == 0
    seen = p.drift.rows  # type: ignore[union-attr]
    hot.close()

    # A restart takes the saved statistics back: the windows counted before are still counted.
    again = Store(tmp_path / "hot.sqlite")
    reg = SignalRegistry()
    w = StoreWriter(again, reg)
    p2 = Pipeline(reg, {}, Scorer.load(MODEL), w, drift_policy=_policy(drift_min_windows=24))
    w.resume(p2)
    assert p2.drift is not None and p2.drift.rows > 0 and p2.drift.rows <= seen
    assert p2.drift_status()["drift"] is True


def test_the_status_reads_drift_as_of_the_last_window_folded_in(tmp_path: Path) -> None:
    """The uplink thread builds the status while the pipeline thread folds windows into the monitor's arrays: the
    status must come from what the pipeline finished, not from arrays half way through an update."""
    store = Store(tmp_path / "s.sqlite", first_seq=1)
    p = _run(store, 75.0, 240)
    assert p.drift is not None
    done = p.drift_status()
    assert done["enabled"] and done["drift"] and done["windows"] == p.drift.rows
    # An update in progress on the pipeline thread: rows counted, outside-range shares not yet.
    p.drift.rows += 1_000
    p.drift.outside[:] = 0
    assert p.drift_status() == done
    p.drift_status()["features"].append("changed by a reader")  # a reader's copy is its own
    assert p.drift_status() == done
    store.close()


def test_windows_outside_the_training_envelope_feed_drift_with_the_features_responsible() -> None:
    rng = np.random.default_rng(2)
    m = DriftMonitor(["a", "b"], TRAIN, _policy(drift_min_windows=50, drift_unfamiliar_max=0.05))
    x = _rows(rng, 100, (10, 2), (-5, 1))
    outside = np.zeros((100, 2), bool)
    outside[:4, 1] = True  # 4 % of windows: below the policy's share
    m.update(x, outside)
    assert m.drifted() == {} and m.report()["unfamiliar"] == {"windows": 4, "share": 0.04}
    outside[:, 1] = False
    outside[:20, 1] = True
    m.update(x, outside)
    assert list(m.drifted()) == ["b"] and "outside the training range in 12%" in m.drifted()["b"]
    rep = m.report()
    assert rep["features"]["b"]["outside"] == 24 and rep["features"]["a"]["outside"] == 0
    back = DriftMonitor(["a", "b"], TRAIN, _policy(drift_min_windows=50, drift_unfamiliar_max=0.05))
    assert back.restore(json.loads(json.dumps(m.state())))
    assert back.report() == rep
    old = {k: v for k, v in m.state().items() if k not in ("outside", "unfamiliar")}  # a state saved before
    assert DriftMonitor(["a", "b"], TRAIN, DEFAULT).restore(old)
