"""The model contract: everything the agent needs to feed a model and read its answer, stored in the ONNX file.

It lives in the model's `metadata_props` under the key `harvester.contract` as one JSON object (docs/models.md),
so a model is a single self-describing file. `parse_contract` validates it and says what is wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

CONTRACT_KEY = "harvester.contract"
CONTRACT_VERSION = 1
STATS = ("mean", "std", "min", "max", "last", "slope", "p2p")


class ContractError(ValueError):
    """A model whose contract is missing, malformed, or cannot be satisfied; the text says why."""


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    name: str
    signal: str
    stat: str
    window_s: float


@dataclass(frozen=True, slots=True)
class AlertPolicy:
    threshold: float
    clear_threshold: float
    min_windows: int
    clear_windows: int


INPUT_LAYOUTS = ("features", "features+missing_mask")


@dataclass(frozen=True, slots=True)
class Familiarity:
    """The out-of-distribution guard: per feature, the range of standardised values (z) seen in training.

    A window is unfamiliar when a present feature lies more than `margin` training standard deviations outside
    `[z_lo, z_hi]`: the model has never seen such a value, so its answer says nothing."""

    z_lo: tuple[float, ...]
    z_hi: tuple[float, ...]
    margin: float


@dataclass(frozen=True, slots=True)
class Contract:
    model_name: str
    model_version: str
    input_name: str
    output_name: str
    classes: tuple[str, ...]
    healthy_class: str
    hop_s: float
    features: tuple[FeatureSpec, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    alert: AlertPolicy
    max_missing_fraction: float
    training: dict[str, Any] = field(default_factory=dict)
    # "features": the model takes the standardised features (missing imputed with 0, the training mean);
    # "features+missing_mask": then one flag per feature, 1.0 where it was missing (width 2 x features).
    input_layout: str = "features"
    required_features: tuple[str, ...] = ()  # a window missing one of these is not scored
    familiarity: Familiarity | None = None

    @property
    def input_width(self) -> int:
        return len(self.features) * (2 if self.input_layout == "features+missing_mask" else 1)

    @property
    def signals(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f.signal for f in self.features))

    @property
    def max_window_s(self) -> float:
        return max(f.window_s for f in self.features)

    def to_json(self) -> str:
        return json.dumps(contract_to_dict(self), separators=(",", ":"))


def contract_to_dict(c: Contract) -> dict[str, Any]:
    return {
        "contract_version": CONTRACT_VERSION,
        "model": {"name": c.model_name, "version": c.model_version},
        "input": c.input_name,
        "output": c.output_name,
        "classes": list(c.classes),
        "healthy_class": c.healthy_class,
        "hop_s": c.hop_s,
        "features": [
            {"name": f.name, "signal": f.signal, "stat": f.stat, "window_s": f.window_s} for f in c.features
        ],
        "normalisation": {"kind": "standard", "mean": list(c.mean), "std": list(c.std)},
        "score": {"kind": "one_minus_class_probability", "class": c.healthy_class},
        "alert": {
            "threshold": c.alert.threshold,
            "clear_threshold": c.alert.clear_threshold,
            "min_windows": c.alert.min_windows,
            "clear_windows": c.alert.clear_windows,
        },
        "max_missing_fraction": c.max_missing_fraction,
        "input_layout": c.input_layout,
        "required_features": list(c.required_features),
        **({"familiarity": {"kind": "training_envelope", "z_lo": list(c.familiarity.z_lo),
                            "z_hi": list(c.familiarity.z_hi), "margin": c.familiarity.margin}}
           if c.familiarity is not None else {}),
        "training": c.training,
    }


def _req(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str = "") -> Any:
    if key not in d:
        raise ContractError(f"contract: missing {where}{key}")
    v = d[key]
    if not isinstance(v, typ) or (isinstance(v, bool) and typ is not bool):
        raise ContractError(f"contract: {where}{key} has the wrong type ({type(v).__name__})")
    return v


def _finite(xs: list[Any], what: str) -> tuple[float, ...]:
    out: list[float] = []
    for x in xs:
        if not isinstance(x, int | float) or isinstance(x, bool) or not math.isfinite(x):
            raise ContractError(f"contract: {what} must be finite numbers")
        out.append(float(x))
    return tuple(out)


def parse_contract(meta: dict[str, str]) -> Contract:
    raw = meta.get(CONTRACT_KEY)
    if raw is None:
        raise ContractError(f"model has no '{CONTRACT_KEY}' metadata: not a harvester model")
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ContractError(f"contract is not JSON: {e}") from None
    if not isinstance(d, dict):
        raise ContractError("contract is not a JSON object")
    if d.get("contract_version") != CONTRACT_VERSION:
        raise ContractError(f"unsupported contract version {d.get('contract_version')!r}; this agent reads 1")
    model = _req(d, "model", dict)
    classes = _req(d, "classes", list)
    healthy = _req(d, "healthy_class", str)
    if healthy not in classes or not all(isinstance(c, str) for c in classes):
        raise ContractError("contract: healthy_class must be one of classes")
    hop = _req(d, "hop_s", (int, float))
    if not 0 < hop <= 3600:
        raise ContractError("contract: hop_s must be in (0, 3600]")
    feats: list[FeatureSpec] = []
    for i, f in enumerate(_req(d, "features", list)):
        if not isinstance(f, dict):
            raise ContractError(f"contract: features[{i}] is not an object")
        stat = _req(f, "stat", str, f"features[{i}].")
        if stat not in STATS:
            raise ContractError(f"contract: features[{i}].stat {stat!r} is not one of {', '.join(STATS)}")
        w = _req(f, "window_s", (int, float), f"features[{i}].")
        if not 0 < w <= 3600:
            raise ContractError(f"contract: features[{i}].window_s must be in (0, 3600]")
        feats.append(
            FeatureSpec(_req(f, "name", str, f"features[{i}]."), _req(f, "signal", str, f"features[{i}]."), stat, w)
        )
    if not feats:
        raise ContractError("contract: no features")
    norm = _req(d, "normalisation", dict)
    mean = _finite(_req(norm, "mean", list, "normalisation."), "normalisation.mean")
    std = _finite(_req(norm, "std", list, "normalisation."), "normalisation.std")
    if len(mean) != len(feats) or len(std) != len(feats):
        raise ContractError(f"contract: normalisation has {len(mean)}/{len(std)} values for {len(feats)} features")
    if any(s <= 0 for s in std):
        raise ContractError("contract: normalisation.std must be positive")
    a = _req(d, "alert", dict)
    thr = _req(a, "threshold", (int, float), "alert.")
    clr = _req(a, "clear_threshold", (int, float), "alert.")
    if not 0 <= clr <= thr <= 1:
        raise ContractError("contract: need 0 <= alert.clear_threshold <= alert.threshold <= 1")
    policy = AlertPolicy(
        float(thr), float(clr), int(_req(a, "min_windows", int, "alert.")), int(_req(a, "clear_windows", int, "alert."))
    )
    if policy.min_windows < 1 or policy.clear_windows < 1:
        raise ContractError("contract: alert.min_windows and alert.clear_windows must be >= 1")
    mmf = d.get("max_missing_fraction", 0.25)
    if not isinstance(mmf, int | float) or not 0 <= mmf < 1:
        raise ContractError("contract: max_missing_fraction must be in [0, 1)")
    layout = d.get("input_layout", "features")
    if layout not in INPUT_LAYOUTS:
        raise ContractError(f"contract: input_layout must be one of {', '.join(INPUT_LAYOUTS)}")
    names = [f.name for f in feats]
    req = d.get("required_features", [])
    if not isinstance(req, list) or not all(isinstance(r, str) and r in names for r in req):
        raise ContractError("contract: required_features must be a list of feature names")
    return Contract(
        model_name=_req(model, "name", str, "model."),
        model_version=_req(model, "version", str, "model."),
        input_name=_req(d, "input", str),
        output_name=_req(d, "output", str),
        classes=tuple(classes),
        healthy_class=healthy,
        hop_s=float(hop),
        features=tuple(feats),
        mean=mean,
        std=std,
        alert=policy,
        max_missing_fraction=float(mmf),
        training=d.get("training", {}) if isinstance(d.get("training"), dict) else {},
        input_layout=layout,
        required_features=tuple(req),
        familiarity=_familiarity(d.get("familiarity"), len(feats)),
    )


def _familiarity(f: Any, n: int) -> Familiarity | None:
    if f is None:
        return None
    if not isinstance(f, dict) or f.get("kind") != "training_envelope":
        raise ContractError("contract: familiarity must be an object of kind 'training_envelope'")
    lo = _finite(_req(f, "z_lo", list, "familiarity."), "familiarity.z_lo")
    hi = _finite(_req(f, "z_hi", list, "familiarity."), "familiarity.z_hi")
    if len(lo) != n or len(hi) != n:
        raise ContractError(f"contract: familiarity has {len(lo)}/{len(hi)} bounds for {n} features")
    if any(a > b for a, b in zip(lo, hi, strict=True)):
        raise ContractError("contract: familiarity needs z_lo <= z_hi for every feature")
    margin = _req(f, "margin", (int, float), "familiarity.")
    if not (math.isfinite(margin) and margin >= 0):
        raise ContractError("contract: familiarity.margin must be a finite number >= 0")
    return Familiarity(lo, hi, float(margin))
