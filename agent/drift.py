"""Feature drift: are the windows this vehicle sees still like the ones the model was trained on?

Per feature we keep running statistics of the raw (un-normalised) window features — count, mean, std, min, max and
share missing — with Chan's parallel update, so a batch of rows costs a few numpy reductions and the state is six
numbers per feature, whatever the uptime. They are compared with the training statistics that the model build
embeds in the contract (`training.feature_stats`).

A feature has drifted when, with enough windows seen,
- its mean has moved more than `z_max` training standard deviations from the training mean, or
- its spread is more than `std_ratio_max` times training's (an erratic sensor; a *narrower* spread is normal: one
  vehicle in one field varies less than the whole simulated fleet the model was trained on), or
- it is missing far more often than in training (`missing_max` above the training share), or
- it lies outside the range the model was trained on (the contract's familiarity guard, agent/scoring.py) in more
  than `unfamiliar_max` of windows: those windows were not turned into alerts, and people should know how often.

Drift is a flag for people (retrain? sensor fault? new crop?), not an alert: the model keeps scoring. The state
is persisted by the caller (`state()`/`restore()`), so a restart does not forget a week of statistics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class DriftPolicy:
    """The thresholds above. No defaults here: they are `[model] drift_*` keys (agent/config.py,
    `ModelConfig.drift_policy()`), so that they live in one place."""

    z_max: float
    std_ratio_max: float
    missing_max: float
    min_windows: int  # windows before any verdict
    unfamiliar_max: float  # share of windows a feature may spend outside the training envelope


class DriftMonitor:
    def __init__(
        self, features: Sequence[str], training: Mapping[str, Mapping[str, float]], policy: DriftPolicy
    ) -> None:
        self.features = list(features)
        self.policy = policy
        f = len(self.features)

        def col(key: str) -> npt.NDArray[np.float64]:
            return np.array([float(training.get(n, {}).get(key, math.nan)) for n in self.features])

        self.train_mean, self.train_std, self.train_missing = col("mean"), col("std"), col("missing")
        self.train_missing[~np.isfinite(self.train_missing)] = 0.0
        self.rows = 0
        self.count = np.zeros(f, np.int64)
        self.mean = np.zeros(f)
        self.m2 = np.zeros(f)  # sum of squared deviations from the mean
        self.min = np.full(f, np.inf)
        self.max = np.full(f, -np.inf)
        self.outside = np.zeros(f, np.int64)  # windows in which each feature was outside the training envelope
        self.unfamiliar = 0  # windows with any feature outside it

    def update(self, x: npt.NDArray[np.float64], outside: npt.NDArray[np.bool_] | None = None) -> None:
        """Fold a batch of feature rows (rows by features, NaN = missing) into the running statistics; `outside`
        (same shape) marks the features the familiarity guard found outside the training envelope."""
        x = np.asarray(x, np.float64).reshape(-1, len(self.features))
        if not len(x):
            return
        if outside is not None:
            out = np.asarray(outside, bool).reshape(x.shape)
            self.outside += out.sum(axis=0)
            self.unfamiliar += int(out.any(axis=1).sum())
        ok = np.isfinite(x)
        nb = ok.sum(axis=0)
        self.rows += len(x)
        has = nb > 0
        if not has.any():
            return
        xz = np.where(ok, x, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mb = np.where(has, xz.sum(axis=0) / np.maximum(nb, 1), 0.0)
            m2b = np.where(ok, (x - mb) ** 2, 0.0).sum(axis=0)
        na = self.count
        n = na + nb
        delta = mb - self.mean
        safe_n = np.maximum(n, 1)
        self.mean = np.where(has, self.mean + delta * nb / safe_n, self.mean)
        self.m2 = np.where(has, self.m2 + m2b + delta**2 * na * nb / safe_n, self.m2)
        self.count = n
        self.min = np.minimum(self.min, np.where(ok, x, np.inf).min(axis=0))
        self.max = np.maximum(self.max, np.where(ok, x, -np.inf).max(axis=0))

    @property
    def std(self) -> npt.NDArray[np.float64]:
        return np.sqrt(self.m2 / np.maximum(self.count, 1))

    @property
    def missing(self) -> npt.NDArray[np.float64]:
        return 1.0 - self.count / max(self.rows, 1)

    def drifted(self) -> dict[str, str]:
        """Feature → the reason it counts as drifted (empty before `min_windows` rows)."""
        p = self.policy
        if self.rows < p.min_windows:
            return {}
        out: dict[str, str] = {}
        std = self.std
        missing = self.missing
        for j, name in enumerate(self.features):
            tm, ts = self.train_mean[j], self.train_std[j]
            if missing[j] > self.train_missing[j] + p.missing_max:
                out[name] = f"missing {missing[j]:.0%} (training {self.train_missing[j]:.0%})"
                continue
            share = self.outside[j] / self.rows
            if share > p.unfamiliar_max:
                out[name] = f"outside the training range in {share:.0%} of windows"
                continue
            if self.count[j] < p.min_windows or not (math.isfinite(tm) and math.isfinite(ts)):
                continue
            scale = ts if ts > 1e-9 else 1e-9
            z = (self.mean[j] - tm) / scale
            if abs(z) > p.z_max:
                out[name] = f"mean {self.mean[j]:.4g} is {z:+.1f} training std from {tm:.4g}"
            elif ts > 1e-9 and std[j] > p.std_ratio_max * ts:
                out[name] = f"std {std[j]:.4g} vs training {ts:.4g}"
        return out

    def report(self) -> dict[str, Any]:
        """What goes to the cloud: the flag, the reasons, and every feature's running statistics."""
        drifted = self.drifted()
        std = self.std
        missing = self.missing
        feats: dict[str, dict[str, float | int | None]] = {}
        for j, name in enumerate(self.features):
            seen = self.count[j] > 0
            ts = self.train_std[j]
            feats[name] = {
                "count": int(self.count[j]),
                "mean": _num(self.mean[j]) if seen else None,
                "std": _num(std[j]) if seen else None,
                "min": _num(self.min[j]) if seen else None,
                "max": _num(self.max[j]) if seen else None,
                "missing": round(float(missing[j]), 4),
                "z_mean": _num((self.mean[j] - self.train_mean[j]) / ts) if seen and ts > 1e-9 else None,
                "outside": int(self.outside[j]),
            }
        unfamiliar = {"windows": self.unfamiliar, "share": round(self.unfamiliar / max(self.rows, 1), 4)}
        return {"drift": bool(drifted), "windows": self.rows, "drifted": drifted, "unfamiliar": unfamiliar,
                "features": feats}

    def state(self) -> dict[str, Any]:
        return {"features": self.features, "rows": self.rows, "count": self.count.tolist(),
                "mean": self.mean.tolist(), "m2": self.m2.tolist(),
                "min": [_num(v) for v in self.min], "max": [_num(v) for v in self.max],
                "outside": self.outside.tolist(), "unfamiliar": self.unfamiliar}

    def restore(self, st: Mapping[str, Any]) -> bool:
        """Take back a saved state; False (and nothing changed) if it was for other features or is damaged."""
        f = len(self.features)
        try:
            if list(st["features"]) != self.features:
                return False
            count = np.array(st["count"], np.int64)
            mean = np.array(st["mean"], np.float64)
            m2 = np.array(st["m2"], np.float64)
            lo = np.array([np.inf if v is None else v for v in st["min"]], np.float64)
            hi = np.array([-np.inf if v is None else v for v in st["max"]], np.float64)
            rows = int(st["rows"])
            # States saved before the familiarity guard existed have no outside counts: start those at zero.
            outside = np.array(st.get("outside", [0] * f), np.int64)
            unfamiliar = int(st.get("unfamiliar", 0))
        except (KeyError, TypeError, ValueError):
            return False
        if any(a.shape != (f,) for a in (count, mean, m2, lo, hi, outside)) or rows < 0 or (count > rows).any() \
                or (count < 0).any() or not (np.isfinite(mean).all() and np.isfinite(m2).all()) \
                or (outside < 0).any() or (outside > rows).any() or not 0 <= unfamiliar <= rows:
            return False
        self.rows = rows
        self.count, self.mean, self.m2 = count, mean, m2
        self.min, self.max = lo, hi
        self.outside, self.unfamiliar = outside, unfamiliar
        return True


def _num(v: float) -> float | None:
    v = float(v)
    return round(v, 6) if math.isfinite(v) else None
