"""The scorer and the model contract, with real onnxruntime sessions on small hand-built models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from agent.contract import ContractError, Familiarity, FeatureSpec, contract_to_dict, parse_contract
from agent.scoring import ModelLoadError, Scorer
from harvester_testing.onnx_models import linear_softmax_model, make_contract

FEATS = [
    FeatureSpec("t_mean", "ET1.EngCoolantTemp", "mean", 30),
    FeatureSpec("p_mean", "EFL_P1.EngOilPress", "mean", 30),
]
# fault logit grows with coolant temperature; oil pressure pushes towards healthy.
W = np.array([[0.0, 1.0], [0.0, -1.0]])
B = np.array([0.0, 0.0])


def _model(tmp_path: Path, **kw) -> Path:  # type: ignore[no-untyped-def]
    return linear_softmax_model(tmp_path / "m.onnx", kw.pop("contract", make_contract(FEATS)), W, B, **kw)


def test_scores_are_one_minus_healthy_probability(tmp_path: Path) -> None:
    sc = Scorer.load(_model(tmp_path))
    res = sc.score(np.array([[3.0, 0.0], [-3.0, 0.0], [0.0, 0.0]]))
    expected = 1 / (1 + np.exp(-np.array([3.0, -3.0, 0.0])))
    np.testing.assert_allclose(res.scores, expected, rtol=1e-5)
    assert res.labels == ["fault", "fault", "fault"] and res.scored.all()


def test_missing_features_imputed_within_limit_else_skipped(tmp_path: Path) -> None:
    sc = Scorer.load(_model(tmp_path))
    res = sc.score(np.array([[math.nan, 0.0], [math.nan, math.nan]]))
    assert res.scored.tolist() == [True, False]
    assert res.scores[0] == pytest.approx(0.5) and math.isnan(res.scores[1])
    assert sc.windows_degraded == 1 and sc.windows_skipped == 1


def test_nan_model_output_is_never_a_score(tmp_path: Path) -> None:
    sc = Scorer.load(_model(tmp_path, nan_output=True))
    res = sc.score(np.array([[5.0, 0.0]]))
    assert not res.scored.any() and sc.invalid_outputs == 1


def test_explain_names_the_feature_that_drives_the_score(tmp_path: Path) -> None:
    sc = Scorer.load(_model(tmp_path))
    top = sc.explain(np.array([4.0, 0.0]))
    assert top[0][0] == "t_mean" and top[0][1] > 0


def test_model_needing_signals_we_cannot_decode_is_refused(tmp_path: Path) -> None:
    sc = Scorer.load(_model(tmp_path))
    sc.check_signals({"ET1.EngCoolantTemp", "EFL_P1.EngOilPress"})
    with pytest.raises(ContractError, match=r"EFL_P1\.EngOilPress"):
        sc.check_signals({"ET1.EngCoolantTemp"})


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d.pop("features"), "missing features"),
        (lambda d: d.update(contract_version=7), "unsupported contract version"),
        (lambda d: d["features"][0].update(stat="median"), "is not one of"),
        (lambda d: d["normalisation"].update(std=[1.0, 0.0]), "std must be positive"),
        (lambda d: d["normalisation"].update(mean=[1.0]), "normalisation has"),
        (lambda d: d["alert"].update(threshold=0.2), "clear_threshold <= alert.threshold"),
        (lambda d: d.update(healthy_class="fine"), "healthy_class"),
        (lambda d: d.update(input="x"), "no input named"),
        (lambda d: d.update(output="y"), "no output named"),
    ],
)
def test_broken_contracts_are_refused_with_the_reason(tmp_path: Path, mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    d = contract_to_dict(make_contract(FEATS))
    mutate(d)
    with pytest.raises(ContractError, match=reason):
        Scorer.load(_model(tmp_path, raw_contract=json.dumps(d)))


def test_model_without_contract_or_with_wrong_width(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match="not a harvester model"):
        Scorer.load(_model(tmp_path, contract=None))
    three = [*FEATS, FeatureSpec("x", "LFE.EngFuelRate", "mean", 30)]
    with pytest.raises(ContractError, match="does not take 3 features"):
        Scorer.load(_model(tmp_path, contract=make_contract(three)))
    with pytest.raises(ContractError, match="not JSON"):
        parse_contract({"harvester.contract": "{nope"})


@pytest.mark.parametrize("content", [b"", b"\x08\x01garbage", b"not onnx at all" * 100])
def test_corrupt_model_files_are_refused(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises((ModelLoadError, ContractError)):
        Scorer.load(p)


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such model"):
        Scorer.load(tmp_path / "nope.onnx")


def test_batched_scoring_equals_scoring_at_once(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(40, 2))
    whole = Scorer.load(_model(tmp_path), batch=4096).score(x).scores
    chunked = Scorer.load(_model(tmp_path), batch=7).score(x).scores
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)


# --- missing-feature mask, required features and the familiarity guard -------------------------------------------

MASKED = [
    FeatureSpec("t_mean", "ET1.EngCoolantTemp", "mean", 30),
    FeatureSpec("p_mean", "EFL_P1.EngOilPress", "mean", 30),
    FeatureSpec("f_mean", "FD.FanSpeed", "mean", 30),
]
# Inputs: 3 standardised features, then 3 missing flags. The fault logit reads coolant, and a missing fan adds 2.
W_MASKED = np.array([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 2.0]])


def _masked_model(tmp_path: Path, **over) -> Path:  # type: ignore[no-untyped-def]
    c = make_contract(MASKED, input_layout="features+missing_mask", required_features=("t_mean",),
                      familiarity=Familiarity(z_lo=(-2.0, -2.0, -2.0), z_hi=(2.0, 2.0, 2.0), margin=1.0),
                      max_missing_fraction=0.9, **over)
    return linear_softmax_model(tmp_path / "masked.onnx", c, W_MASKED, np.zeros(2))


def test_missing_mask_is_fed_to_the_model_and_required_features_gate_scoring(tmp_path: Path) -> None:
    sc = Scorer.load(_masked_model(tmp_path))
    nan = math.nan
    res = sc.score(np.array([[0.0, 0.0, 0.0], [0.0, nan, nan], [nan, 0.0, 0.0]]))
    assert res.scored.tolist() == [True, True, False]  # the last lacks its required coolant temperature
    assert res.scores[0] == pytest.approx(0.5)
    assert res.scores[1] == pytest.approx(1 / (1 + math.exp(-2.0)), rel=1e-5)  # the model saw the fan was missing
    assert res.present.tolist() == [[True, True, True], [True, False, False], [False, True, True]]
    assert res.missing_required.tolist() == [False, False, True]
    assert sc.windows_skipped == 1 and sc.windows_degraded == 1


def test_windows_outside_the_training_envelope_are_unfamiliar_not_scored(tmp_path: Path) -> None:
    sc = Scorer.load(_masked_model(tmp_path))
    # z within [-2, 2] + margin 1 is familiar; 3.5 is not (coolant), nor is -4 (oil pressure); a missing feature
    # can never be unfamiliar.
    res = sc.score(np.array([[2.9, 0.0, math.nan], [3.5, 0.0, 0.0], [0.0, -4.0, 0.0]]))
    assert res.unfamiliar.tolist() == [False, True, True]
    assert res.scored.tolist() == [True, False, False] and np.isnan(res.scores[1:]).all()
    assert res.outside.tolist() == [[False, False, False], [True, False, False], [False, True, False]]
    assert res.distance[:2].tolist() == pytest.approx([0.9, 1.5])  # the measure; the margin (1.0) is the threshold
    assert sc.windows_unfamiliar == 2 and sc.windows_scored == 1
    assert sc.unfamiliar_features(res.outside[1]) == ["t_mean"]


def test_guard_is_the_same_for_every_model_carrying_the_contract(tmp_path: Path) -> None:
    # The guard is computed by the agent from the contract, never by the network: fp32 and int8 cannot disagree.
    a = Scorer.load(_masked_model(tmp_path))
    x = np.random.default_rng(1).normal(scale=3, size=(200, 3))
    other = linear_softmax_model(tmp_path / "other.onnx", a.contract, -W_MASKED, np.ones(2))
    b = Scorer.load(other)
    assert a.score(x).unfamiliar.tolist() == b.score(x).unfamiliar.tolist()


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d.update(required_features=["nope"]), "required_features"),
        (lambda d: d["familiarity"].update(z_lo=[0.0]), "familiarity"),
        (lambda d: d["familiarity"].update(margin=-1), "familiarity.margin"),
        (lambda d: d["familiarity"].update(z_hi=[-9.0, -9.0, -9.0]), "z_lo <= z_hi"),
        (lambda d: d.update(input_layout="sideways"), "input_layout"),
    ],
)
def test_broken_guard_or_layout_is_refused(tmp_path: Path, mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    d = json.loads(Scorer.load(_masked_model(tmp_path)).contract.to_json())
    mutate(d)
    with pytest.raises(ContractError, match=reason):
        parse_contract({"harvester.contract": json.dumps(d)})


def test_mask_layout_needs_twice_the_features_as_input(tmp_path: Path) -> None:
    c = make_contract(MASKED, input_layout="features+missing_mask")
    with pytest.raises(ContractError, match="does not take"):
        Scorer.load(linear_softmax_model(tmp_path / "narrow.onnx", c, np.zeros((3, 2)), np.zeros(2)))


def test_explain_only_names_features_the_window_had(tmp_path: Path) -> None:
    sc = Scorer.load(_masked_model(tmp_path))
    top = sc.explain(np.array([1.5, math.nan, math.nan]))
    assert [n for n, _ in top] == ["t_mean"]
