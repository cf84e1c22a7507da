"""Windows of samples → feature rows, on the data's own clock.

Windows close at multiples of the model's hop (aligned on sample time, so replaying a log gives the same rows as
living through it). At each close, every feature is computed over its own window length ending at the close.
A signal with no sample in a window gives NaN for its features: the scorer decides what missing data means.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agent.contract import FeatureSpec


@dataclass(slots=True)
class FeatureRow:
    start: float  # earliest window start among the features
    end: float
    x: npt.NDArray[np.float64]  # one value per feature, NaN where a signal had no data
    snapshot: dict[str, float]  # last value of each signal in the window (for alerts)


def window_stat(stat: str, t: npt.NDArray[np.float64], v: npt.NDArray[np.float64]) -> float:
    if v.size == 0:
        return math.nan
    if stat == "mean":
        return float(v.mean())
    if stat == "std":
        return float(v.std())
    if stat == "min":
        return float(v.min())
    if stat == "max":
        return float(v.max())
    if stat == "last":
        return float(v[-1])
    if stat == "p2p":
        return float(v.max() - v.min())
    if stat == "slope":  # least-squares slope, units per second
        if v.size < 2:
            return math.nan
        tc = t - t.mean()
        den = float((tc * tc).sum())
        return float((tc * (v - v.mean())).sum() / den) if den > 0 else math.nan
    raise ValueError(f"unknown statistic {stat!r}")


class _Buffer:
    """Samples of one signal, kept for the longest window any feature needs."""

    __slots__ = ("t", "v")

    def __init__(self) -> None:
        self.t: list[npt.NDArray[np.float64]] = []
        self.v: list[npt.NDArray[np.float64]] = []

    def add(self, t: npt.NDArray[np.float64], v: npt.NDArray[np.float64]) -> None:
        if t.size:
            self.t.append(t)
            self.v.append(v)

    def arrays(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        if len(self.t) > 1:
            self.t = [np.concatenate(self.t)]
            self.v = [np.concatenate(self.v)]
        if not self.t:
            return np.zeros(0), np.zeros(0)
        return self.t[0], self.v[0]

    def prune(self, before: float) -> None:
        t, v = self.arrays()
        if t.size and t[0] < before:
            k = int(np.searchsorted(t, before, "left"))
            self.t, self.v = [t[k:]], [v[k:]]


class FeatureEngine:
    """Feeds on (ts, signal index, value) arrays; returns the rows of every window closed by them."""

    def __init__(self, features: Sequence[FeatureSpec], hop_s: float) -> None:
        self.features = tuple(features)
        self.hop_s = float(hop_s)
        self.signals = tuple(dict.fromkeys(f.signal for f in self.features))
        self.signal_index = {s: i for i, s in enumerate(self.signals)}
        self._feat_sig = [self.signal_index[f.signal] for f in self.features]
        self.max_window_s = max(f.window_s for f in self.features)
        self._buffers = [_Buffer() for _ in self.signals]
        self._next_close: float | None = None
        self.windows_closed = 0
        self.windows_empty = 0

    def feed(
        self, ts: npt.NDArray[np.float64], sig: npt.NDArray[np.int32], value: npt.NDArray[np.float64]
    ) -> list[FeatureRow]:
        """`sig` indexes `self.signals`; entries < 0 are ignored."""
        keep = (sig >= 0) & np.isfinite(value) & np.isfinite(ts)
        if not keep.all():
            ts, sig, value = ts[keep], sig[keep], value[keep]
        if ts.size == 0:
            return []
        order = np.argsort(ts, kind="stable")
        ts, sig, value = ts[order], sig[order], value[order]
        rows: list[FeatureRow] = []
        pos = 0
        n = ts.size
        while pos < n:
            if self._next_close is None or ts[pos] >= self._next_close + self.max_window_s:
                # First data, or a gap longer than any window: restart the schedule at the next hop boundary.
                self._next_close = (math.floor(ts[pos] / self.hop_s) + 1) * self.hop_s
            split = int(np.searchsorted(ts, self._next_close, "left"))
            if split > pos:
                self._append(ts[pos:split], sig[pos:split], value[pos:split])
            pos = split
            if pos >= n:
                break
            row = self._close(self._next_close)
            if row is not None:
                rows.append(row)
            self._next_close += self.hop_s
        return rows

    def _append(
        self, ts: npt.NDArray[np.float64], sig: npt.NDArray[np.int32], value: npt.NDArray[np.float64]
    ) -> None:
        if len(self.signals) == 1:
            self._buffers[0].add(ts, value)
            return
        order = np.argsort(sig, kind="stable")
        s_sorted = sig[order]
        bounds = np.searchsorted(s_sorted, np.arange(len(self.signals) + 1))
        for i, buf in enumerate(self._buffers):
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            if hi > lo:
                idx = order[lo:hi]
                buf.add(ts[idx], value[idx])

    def _close(self, end: float) -> FeatureRow | None:
        self.windows_closed += 1
        for b in self._buffers:
            b.prune(end - self.max_window_s)
        arrays = [b.arrays() for b in self._buffers]
        if not any(t.size for t, _ in arrays):
            self.windows_empty += 1
            return None
        x = np.empty(len(self.features))
        for j, f in enumerate(self.features):
            t, v = arrays[self._feat_sig[j]]
            k = int(np.searchsorted(t, end - f.window_s, "left"))
            x[j] = window_stat(f.stat, t[k:], v[k:])
        snapshot = {s: float(v[-1]) for s, (_, v) in zip(self.signals, arrays, strict=True) if v.size}
        return FeatureRow(end - self.max_window_s, end, x, snapshot)
