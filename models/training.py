"""The learning primitives every model here is made with: the feature normaliser and the MLP, shared by the anomaly
model's build (models/build.py) and the public-data check of the same recipe (models/public.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(slots=True)
class Normaliser:
    mean: npt.NDArray[np.float64]
    std: npt.NDArray[np.float64]

    @classmethod
    def fit(cls, x: npt.NDArray[np.float64]) -> Normaliser:
        mean = np.nanmean(x, axis=0)
        std = np.nanstd(x, axis=0)
        std[~(std > 1e-6)] = 1.0
        return cls(np.nan_to_num(mean), std)

    def plain(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
        """Standardised features with missing ones at 0 and no flags (the public data sets: nothing is missing)."""
        z = self.z(x)
        z[~np.isfinite(z)] = 0.0
        return z.astype(np.float32)

    def z(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        with np.errstate(invalid="ignore"):
            return (x - self.mean) / self.std

    def __call__(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
        """The model's input, exactly as agent/scoring.py builds it: standardised features with missing ones at 0
        (the training mean), then one flag per feature, 1 where it was missing."""
        z = self.z(x)
        bad = ~np.isfinite(z)
        z[bad] = 0.0
        return np.hstack([z, bad.astype(np.float64)]).astype(np.float32)


def mlp(seed: int, max_iter: int = 150, patience: int = 8) -> Any:
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier(hidden_layer_sizes=(256, 128), alpha=1e-3, max_iter=max_iter, early_stopping=True,
                         n_iter_no_change=patience, random_state=seed)


def train_plain(x: npt.NDArray[np.float32], y: npt.NDArray[np.int64], seed: int) -> Any:
    """The MLP on standardised rows, with copies of 15 % of rows missing one feature (models/public.py)."""
    rng = np.random.default_rng(seed)
    k = len(x) * 15 // 100
    idx = rng.choice(len(x), k, replace=False)
    xa = x[idx].copy()
    xa[np.arange(k), rng.integers(0, x.shape[1], k)] = 0.0
    clf = mlp(seed, 300, 15)
    clf.fit(np.vstack([x, xa]), np.concatenate([y, y[idx]]))
    return clf
