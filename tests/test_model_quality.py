"""The shipped model against the floors its card states, on simulator runs it has never seen (seeds outside the
build's), and the int8 model against the fp32 one on the same windows. Accuracy only: timing is bench/run's job.

Also the build pipeline itself: a quick build writes both models with their contract and a card, and is
deterministic."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.contract import Contract
from agent.scoring import Scorer
from harvester_sim import DUTY_CYCLES, FAULTS
from models.build import (
    FLOORS,
    INT8_TOLERANCE,
    POLICY,
    check_floors,
    check_int8,
    evaluate,
    int8_agreement,
    run_scores,
)
from models.dataset import CORE_SIGNALS, RunSpec, RunWindows, simulate_run

MODELS = Path(__file__).resolve().parents[1] / "models"
FP32, INT8 = MODELS / "harvester-anomaly.onnx", MODELS / "harvester-anomaly.int8.onnx"
CARD = MODELS / "harvester-anomaly.card.json"


@pytest.fixture(scope="module")
def fresh_runs() -> list[RunWindows]:
    """Five runs per fault and ten healthy ones, 20 minutes each, every duty cycle; seeds the build never used."""
    rng = random.Random(4242)
    specs = []
    for fault in (None, *FAULTS):
        for i in range(10 if fault is None else 5):
            specs.append(RunSpec(seed=700_000 + len(specs), fault=fault, duty=DUTY_CYCLES[i % len(DUTY_CYCLES)],
                                 ambient_c=round(rng.uniform(8, 40), 1), duration_s=1200.0,
                                 onset_s=round(rng.uniform(30, 400), 1) if fault else 0.0,
                                 ramp_s=round(rng.uniform(20, 600), 1) if fault else 1.0))
    return [simulate_run(s) for s in specs]


def test_the_card_states_floors_and_the_shipped_model_met_them() -> None:
    card = json.loads(CARD.read_text())
    assert card["floors"] == FLOORS and card["int8_tolerance"] == INT8_TOLERANCE
    assert card["floors_missed"] == []
    assert check_floors(card["evaluation"]["int8"]) == [] and check_int8(card["int8_vs_fp32"]) == []
    md = (MODELS / "harvester-anomaly.card.md").read_text()
    assert "All floors met." in md and "## Floors" in md


def test_floor_check_names_each_missed_floor() -> None:
    ev: dict[str, Any] = {"roc_auc": 0.5, "false_alarms_per_hour": 9.0,
                          "per_fault": {f: {"detection_rate": 1.0} for f in FAULTS}}
    ev["per_fault"]["fan_wear"]["detection_rate"] = 0.1
    missed = check_floors(ev)
    assert len(missed) == 3 and any("fan_wear" in m for m in missed) and any("ROC-AUC" in m for m in missed)
    del ev["per_fault"]["coolant_leak"]  # a fault never evaluated is a missed floor, not a pass
    assert any("coolant_leak" in m for m in check_floors(ev))


def test_shipped_int8_model_meets_its_floors_on_fresh_runs(fresh_runs: list[RunWindows]) -> None:
    ev = evaluate(fresh_runs, run_scores(INT8, fresh_runs), POLICY)
    assert set(ev["per_fault"]) == set(FAULTS)
    assert check_floors(ev) == [], ev


def test_int8_and_fp32_agree_within_the_stated_tolerance(fresh_runs: list[RunWindows]) -> None:
    s32, s8 = run_scores(FP32, fresh_runs), run_scores(INT8, fresh_runs)
    q = int8_agreement(s32, s8, POLICY.threshold)
    assert q["windows"] > 2000
    assert q["p99_abs_score_diff"] <= INT8_TOLERANCE["p99_abs_score_diff_max"], q
    assert q["alert_decision_agreement"] >= INT8_TOLERANCE["alert_decision_agreement_min"], q
    assert INT8.stat().st_size <= INT8_TOLERANCE["size_ratio_max"] * FP32.stat().st_size


def test_quick_build_writes_models_with_contract_and_card_and_is_deterministic(tmp_path: Path) -> None:
    from models.build import build

    a = build(tmp_path / "a", seed=3, quick=True, jobs=1, public_data=tmp_path / "no-such-folder")
    b = build(tmp_path / "b", seed=3, quick=True, jobs=1, public_data=None)
    assert a["evaluation"] == b["evaluation"]  # same seed, same numbers
    assert all(v == {"skipped": v["skipped"]} for v in a["public_data"].values())  # absent data: said, not fatal
    for name in ("harvester-anomaly.onnx", "harvester-anomaly.int8.onnx"):
        sc = Scorer.load(tmp_path / "a" / name)
        assert isinstance(sc.contract, Contract)
        assert sc.contract.training["feature_stats"] == a["feature_stats"]  # what drift checks compare against
        out = sc.score(np.tile(np.array(sc.contract.mean), (2, 1)))  # the training mean: familiar, scored
        assert out.scored.all()
        assert sc.contract.familiarity is not None and sc.contract.required_features
        assert sc.contract.input_layout == "features+missing_mask"
    card = json.loads((tmp_path / "a" / "harvester-anomaly.card.json").read_text())
    assert card["int8_vs_fp32"]["size_ratio"] < 0.5 and "floors_missed" in card
    assert (tmp_path / "a" / "harvester-anomaly.card.md").read_text().startswith("# Model card")


@pytest.fixture(scope="module")
def warmup_runs() -> list[RunWindows]:
    """Faults that start while a cold engine warms up (ambient -10 to 10 °C), on machines with other fits."""
    rng = random.Random(99)
    specs = []
    for fault in ("coolant_leak", "oil_pump_wear", "fan_wear"):
        for i in range(4):
            specs.append(RunSpec(seed=800_000 + len(specs), fault=fault, duty=("harvest", "mixed")[i % 2],
                                 ambient_c=round(rng.uniform(-10, 10), 1), duration_s=1500.0,
                                 onset_s=round(rng.uniform(60, 240), 1), ramp_s=round(rng.uniform(60, 300), 1),
                                 start="cold", vary_fit=True))
    return [simulate_run(s) for s in specs]


def test_a_fault_that_starts_during_warm_up_is_caught(warmup_runs: list[RunWindows]) -> None:
    col = [f.name for f in Scorer.load(INT8).contract.features].index("ET1.EngCoolantTemp:mean:30s")
    for r in warmup_runs:  # the fault did start before the engine was warm
        at_onset = r.x[int(np.searchsorted(r.end, r.spec.onset_s)), col]
        assert at_onset < 70, (r.spec, at_onset)
    ev = evaluate(warmup_runs, run_scores(INT8, warmup_runs), POLICY)
    assert {f: v["detection_rate"] for f, v in ev["per_fault"].items()} == {
        "coolant_leak": 1.0, "oil_pump_wear": 1.0, "fan_wear": 1.0}, ev
    assert all(v["early_alarms"] == 0 for v in ev["per_fault"].values()), ev


@pytest.fixture(scope="module")
def healthy_real_operation() -> list[RunWindows]:
    """Healthy machines as they really run: cold mornings, parked with the key on, long idling, the road,
    sensors that are not there or drop out; ambient -15 to 45 °C; seeds the build never used."""
    rng = random.Random(7)
    specs = []
    for i in range(12):
        specs.append(RunSpec(seed=900_000 + i, fault=None, duty=DUTY_CYCLES[i % len(DUTY_CYCLES)],
                             ambient_c=round(rng.uniform(-15, 45), 1), duration_s=1800.0, onset_s=0.0, ramp_s=1.0,
                             start=("cold", "warm")[i % 2], vary_fit=True,
                             absent=(("FD", "VF"), (), ("AMB",), ())[i % 4],
                             intermittent=((), ("EFL_P1",), (), ("FD", "ET1"))[i % 4]))
    return [simulate_run(s) for s in specs]


def test_healthy_real_operation_stays_under_the_false_alarm_floor(healthy_real_operation: list[RunWindows]) -> None:
    ev = evaluate(healthy_real_operation, run_scores(INT8, healthy_real_operation), POLICY)
    assert ev["healthy_hours"] == pytest.approx(6.0)
    assert ev["false_alarms_per_hour"] <= FLOORS["false_alarms_per_hour_max"], ev
    unscored = sum(int(np.isnan(s).sum()) for s in run_scores(INT8, healthy_real_operation))
    assert unscored <= 0.02 * sum(len(r.x) for r in healthy_real_operation)  # familiar, and scored


def test_core_signals_alone_are_scored_and_still_catch_a_worn_oil_pump(fresh_runs: list[RunWindows]) -> None:
    sc = Scorer.load(INT8)
    drop = [j for j, f in enumerate(sc.contract.features) if f.signal not in CORE_SIGNALS]
    core = []
    for r in fresh_runs:
        x = r.x.copy()
        x[:, drop] = np.nan
        core.append(RunWindows(r.spec, x, r.end, r.severity, r.running))
    res = [sc.score(r.x) for r in core]
    assert sum(int(b.scored.sum()) for b in res) >= 0.99 * sum(len(r.x) for r in core)
    ev = evaluate(core, [b.scores for b in res], POLICY)
    assert ev["per_fault"]["oil_pump_wear"]["detection_rate"] >= 0.8, ev
    assert ev["false_alarms_per_hour"] <= FLOORS["false_alarms_per_hour_max"], ev


def test_fp32_and_int8_agree_on_the_familiarity_guard(fresh_runs: list[RunWindows]) -> None:
    a, b = Scorer.load(FP32), Scorer.load(INT8)
    assert a.contract.familiarity == b.contract.familiarity is not None
    for r in fresh_runs[:10]:
        x = r.x * 1.5  # push some windows outside
        assert a.score(x).unfamiliar.tolist() == b.score(x).unfamiliar.tolist()
