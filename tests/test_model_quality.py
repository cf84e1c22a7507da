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
from agent.sim import DUTY_CYCLES, FAULTS
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
from models.dataset import RunSpec, RunWindows, simulate_run

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
        out = sc.score(np.zeros((2, len(sc.contract.features))))
        assert out.scored.all()
    card = json.loads((tmp_path / "a" / "harvester-anomaly.card.json").read_text())
    assert card["int8_vs_fp32"]["size_ratio"] < 0.5 and "floors_missed" in card
    assert (tmp_path / "a" / "harvester-anomaly.card.md").read_text().startswith("# Model card")
