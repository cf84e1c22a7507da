"""cloud_sync/rollout.py, the rollout's pure decisions: wave plans (every vehicle in exactly one wave, sorted order
kept, canary first, percentages rounded up), what a vehicle's model report means for a rollout, and a wave's
verdict (advance, halt, wait) with the failed vehicles and their reasons."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud_sync import rollout as ro
from harvester_common import modelwire as mw

PKG, MODEL, OTHER = "a" * 64, "b" * 64, "c" * 64

ids = st.lists(st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), max_size=60)
percents = st.lists(st.integers(1, 99), max_size=5, unique=True).map(lambda p: (*sorted(p), 100))


@given(vehicles=ids, canary=st.integers(0, 70), percent=percents)
def test_every_vehicle_in_exactly_one_wave_in_sorted_order_canary_first(vehicles: list[str], canary: int,
                                                                        percent: tuple[int, ...]) -> None:
    waves = ro.plan_waves(vehicles, canary, percent)
    flat = [v for w in waves for v in w]
    assert flat == sorted(set(vehicles))  # each once, order kept across waves
    assert all(waves)  # no empty wave
    if canary and vehicles:
        assert waves[0] == sorted(set(vehicles))[:canary]
    # each wave after the canary ends at its percentage of the rest, rounded up
    rest = len(set(vehicles)) - min(canary, len(set(vehicles)))
    ends = sorted({math.ceil(rest * p / 100) for p in percent} - {0})
    sizes = [len(w) for w in waves[1 if canary and vehicles else 0:]]
    assert [sum(sizes[: i + 1]) for i in range(len(sizes))] == ends


def test_a_plan_the_brief_names() -> None:
    vs = [f"v{i:02d}" for i in range(10, 0, -1)]  # given in any order
    # 9 after the canary: 10 % → ceil(0.9) = 1, 50 % → ceil(4.5) = 5, 100 % → 9
    assert ro.plan_waves(vs, canary=1, percent=(10, 50, 100)) == [
        ["v01"], ["v02"], ["v03", "v04", "v05", "v06"], ["v07", "v08", "v09", "v10"]]
    assert ro.plan_waves(vs) == [sorted(vs)]


@pytest.mark.parametrize("text, why", [("", "integer"), ("10,x", "integer"), ("50,10,100", "larger"),
                                       ("10,50", "100"), ("0,100", "between"), ("10,10,100", "larger"),
                                       ("101", "between")])
def test_wave_options_that_make_no_plan_are_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(ro.PlanError, match=why):
        ro.parse_waves(text)


def test_parse_waves() -> None:
    assert ro.parse_waves("10,50,100") == (10, 50, 100)
    assert ro.parse_waves("100") == (100,)
    with pytest.raises(ro.PlanError):
        ro.plan_waves(["a"], canary=-1)


def status(state: str, target: str | None = PKG, active: str | None = None, healthy: bool | None = None,
           reason: str = "") -> mw.ModelStatus:
    return mw.ModelStatus(
        state=state, seq=1, ts=1.0,
        target={"name": "m", "version": "2", "package_sha256": target, "rollout": "1"} if target else None,
        active={"name": "m", "version": "1", "sha256": active} if active else None,
        healthy=healthy, reason=reason, figures={"windows": 3})


def test_what_a_report_says_of_a_rollout() -> None:
    assert ro.fold_status(status("shadow"), PKG, MODEL) == ("shadow", None, "", {"windows": 3})
    assert ro.fold_status(status("active", active=MODEL, healthy=True), PKG, MODEL)[:2] == ("active", True)
    assert ro.fold_status(status("rejected", reason="auc fell"), PKG, MODEL)[:3] == ("rejected", None, "auc fell")
    # another target: only whether it runs our model counts
    assert ro.fold_status(status("downloading", target=OTHER), PKG, MODEL) is None
    assert ro.fold_status(status("downloading", target=OTHER, active=MODEL, healthy=True), PKG, MODEL) == (
        "active", True, "", {})
    assert ro.fold_status(status("active", target=None, active=MODEL), PKG, MODEL) == ("active", None, "", {})
    assert ro.fold_status(status("active", target=None, active=OTHER, healthy=True), PKG, MODEL) is None


def steps(*states: str) -> list[ro.Step]:
    out = []
    for i, s in enumerate(states):
        state, _, healthy = s.partition("+")
        out.append(ro.Step(f"v{i}", state, True if healthy else None, f"why {i}" if state in ro.FAILED_STATES else ""))
    return out


def test_a_wave_advances_when_enough_are_active_and_healthy() -> None:
    v = ro.evaluate_wave(steps(*["active+h"] * 9, "sent"), 0.9, 0.2)
    assert v.action == "advance" and v.succeeded == 9 and v.total == 10
    assert ro.evaluate_wave(steps(*["active+h"] * 8, "active", "shadow"), 0.9, 0.2).action == "wait"  # not healthy yet
    assert ro.evaluate_wave([], 0.9, 0.2).action == "advance"


def test_a_wave_halts_when_too_many_fail_and_names_them() -> None:
    v = ro.evaluate_wave(steps("rejected"), 0.9, 0.2)
    assert v.action == "halt" and [s.vehicle for s in v.failed] == ["v0"]
    assert "v0 rejected (why 0)" in v.reason and "1 of 1" in v.reason
    # 2 of 10 is not past 20 %; 3 is
    assert ro.evaluate_wave(steps("failed", "rolled_back", *["active+h"] * 8), 0.8, 0.2).action == "advance"
    v = ro.evaluate_wave(steps("failed", "rolled_back", "rejected", *["active+h"] * 7), 0.5, 0.2)
    assert v.action == "halt"  # halting wins over a success share that is reached
    assert v.counts == {"active": 7, "failed": 1, "rejected": 1, "rolled_back": 1}
    # cancelled and sent are neither: waiting
    assert ro.evaluate_wave(steps("cancelled", "sent"), 0.9, 0.0).action == "wait"


@given(st.lists(st.sampled_from(["pending", "sent", *mw.STATES, "active+h"]), max_size=30),
       st.floats(0.01, 1.0), st.floats(0.0, 0.99))
def test_the_verdict_follows_the_shares(states: list[str], success: float, error: float) -> None:
    ss = steps(*states)
    v = ro.evaluate_wave(ss, success, error)
    failed = sum(s.failed for s in ss)
    ok = sum(s.succeeded for s in ss)
    if ss and failed / len(ss) > error:
        assert v.action == "halt" and len(v.failed) == failed
    elif ss and (len(ss) - failed) / len(ss) < success:  # the others can no longer make the success threshold
        assert v.action == "halt" and "can no longer be reached" in v.reason
    elif not ss or ok / len(ss) >= success:
        assert v.action == "advance"
    else:
        assert v.action == "wait"
    assert len(v.reason) <= ro.MAX_REASON_CHARS


def test_a_wave_that_can_no_longer_reach_the_success_threshold_halts_instead_of_waiting_for_ever() -> None:
    # One of five rejected: 20 % is not past an error threshold of 20 %, and the other four (80 %) can never make
    # 90 %: seen in the ten-agent rollout, which then waited for ever.
    wave = [ro.Step(f"v{i}", "active", True, "") for i in range(4)] + [ro.Step("v4", "rejected", None, "too slow")]
    v = ro.evaluate_wave(wave, 0.9, 0.2)
    assert v.action == "halt" and "can no longer be reached" in v.reason and "v4 rejected (too slow)" in v.reason
    # With one still on its way and none failed, all five could still make it: wait.
    wave[0] = ro.Step("v0", "shadow", None, "")
    wave[4] = ro.Step("v4", "active", True, "")
    assert ro.evaluate_wave(wave, 0.9, 0.2).action == "wait"
