"""Windows, features and the alert state machine: pure logic, checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.alerts import AlertContext, AlertTracker
from agent.contract import AlertPolicy, FeatureSpec
from agent.features import FeatureEngine, window_stat

SPECS = [
    FeatureSpec("rpm_mean", "EEC1.EngSpeed", "mean", 10),
    FeatureSpec("rpm_std", "EEC1.EngSpeed", "std", 10),
    FeatureSpec("temp_slope", "ET1.EngCoolantTemp", "slope", 20),
    FeatureSpec("temp_last", "ET1.EngCoolantTemp", "last", 20),
]


def _feed(engine: FeatureEngine, ts: np.ndarray, sig: np.ndarray, val: np.ndarray) -> list:  # type: ignore[type-arg]
    return engine.feed(ts.astype(float), sig.astype(np.int32), val.astype(float))


def test_stats_by_hand() -> None:
    t = np.array([0.0, 1.0, 2.0, 3.0])
    v = np.array([1.0, 3.0, 5.0, 7.0])
    assert window_stat("mean", t, v) == 4.0
    assert window_stat("slope", t, v) == pytest.approx(2.0)
    assert window_stat("p2p", t, v) == 6.0
    assert window_stat("last", t, v) == 7.0
    assert math.isnan(window_stat("mean", t[:0], v[:0]))
    assert math.isnan(window_stat("slope", t[:1], v[:1]))


def test_windows_close_on_hop_boundaries_with_per_feature_lengths() -> None:
    eng = FeatureEngine(SPECS, hop_s=5)
    t = np.arange(0, 30, 0.5)
    rpm = np.full(t.size, 1500.0)
    temp_t = np.arange(0, 30, 1.0)
    temp = 80 + 0.1 * temp_t
    ts = np.concatenate([t, temp_t])
    sig = np.concatenate([np.zeros(t.size), np.ones(temp_t.size)])
    val = np.concatenate([rpm, temp])
    rows = _feed(eng, ts, sig, val)
    assert [r.end for r in rows] == [5, 10, 15, 20, 25]  # the window ending at 30 is still open
    last = rows[-1]
    assert last.x[0] == 1500 and last.x[1] == 0
    assert last.x[2] == pytest.approx(0.1)  # °C per second over the 20 s window
    assert last.x[3] == pytest.approx(80 + 2.4)
    assert last.snapshot["EEC1.EngSpeed"] == 1500


def test_feeding_in_pieces_equals_feeding_at_once() -> None:
    rng = np.random.default_rng(1)
    ts = np.sort(rng.uniform(0, 60, 3000))
    sig = rng.integers(0, 2, ts.size)
    val = rng.normal(size=ts.size)
    whole = _feed(FeatureEngine(SPECS, 5), ts, sig, val)
    eng = FeatureEngine(SPECS, 5)
    pieces = []
    for chunk in np.array_split(np.arange(ts.size), 37):
        pieces += _feed(eng, ts[chunk], sig[chunk], val[chunk])
    assert [r.end for r in pieces] == [r.end for r in whole]
    for a, b in zip(pieces, whole, strict=True):
        np.testing.assert_allclose(a.x, b.x, equal_nan=True)


def test_missing_signal_gives_nan_and_long_gap_restarts_schedule() -> None:
    eng = FeatureEngine(SPECS, hop_s=5)
    rows = _feed(eng, np.arange(0, 12, 1.0), np.zeros(12), np.full(12, 900.0))
    assert rows and math.isnan(rows[0].x[2]) and rows[0].x[0] == 900
    later = _feed(eng, np.array([10_000.0, 10_006.0]), np.zeros(2), np.array([1.0, 2.0]))
    assert [r.end for r in later] == [10_005]  # not two thousand empty windows


def test_non_finite_inputs_are_ignored() -> None:
    eng = FeatureEngine(SPECS, hop_s=5)
    rows = _feed(eng, np.array([1.0, 2.0, 3.0, 6.0]), np.zeros(4), np.array([1.0, np.nan, np.inf, 1.0]))
    assert rows[0].x[0] == 1.0


POLICY = AlertPolicy(threshold=0.8, clear_threshold=0.4, min_windows=3, clear_windows=2)


def _ctx(i: int) -> AlertContext:
    return AlertContext(i * 5.0 - 30, i * 5.0, "coolant_leak")


def test_alert_needs_min_windows_and_clears_with_hysteresis() -> None:
    tr = AlertTracker(POLICY, "m", "1")
    scores = [0.9, 0.9, 0.5, 0.9, 0.9, 0.9, 0.6, 0.3, 0.9, 0.3, 0.2]
    out = [tr.update(s, _ctx(i)) for i, s in enumerate(scores)]
    states = [(i, a.state) for i, a in enumerate(out) if a is not None]
    assert states == [(5, "open"), (10, "closed")]
    assert out[5] is not None and out[10] is not None and out[5].alert_id == out[10].alert_id


@pytest.mark.parametrize("bad", [math.nan, math.inf, -0.1, 1.5])
def test_invalid_scores_never_alert(bad: float) -> None:
    tr = AlertTracker(POLICY, "m", "1")
    assert all(tr.update(bad, _ctx(i)) is None for i in range(10))
    assert tr.invalid_scores == 10 and tr.open is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=80))
def test_alerts_alternate_open_close(scores: list[float]) -> None:
    tr = AlertTracker(POLICY, "m", "1")
    states = [a.state for i, s in enumerate(scores) if (a := tr.update(s, _ctx(i))) is not None]
    assert all(s == ("open" if k % 2 == 0 else "closed") for k, s in enumerate(states))
