"""The figures of a candidate model against the active one on the same windows, and the decision (pure).

While a verified candidate shadows, the pipeline (agent/pipeline.py) feeds the same samples to both models' own
feature windows and counts, per model, over the same stretch of data:

- `windows`: windows closed with data (the candidate's only once its feature windows hold a full window of data:
  a window started before the candidate saw its first sample is warm-up, not counted);
- `scored`: windows with a finite score to act on; `invalid`: windows the network was run on whose output was not
  finite (NaN, infinity); `errors`: scoring calls that raised (their windows are counted, none scored);
- `alert_windows`: windows after which the model's own alert logic (an `AlertTracker` with its contract's policy)
  held an alert open;
- `p95_ms`: the 95th percentile of the time one scoring call took (a call scores the windows one batch closed;
  its wall time, capped by the CPU the process spent meanwhile: time the scheduler kept it waiting is not the model's);
  over fewer than `MIN_CALLS_FOR_P95` calls, the median instead: the 95th percentile of a handful of calls is their
  slowest, and one call delayed by the scheduler on a busy machine (seen with ten agents on two cores: 31 ms
  against 0.8 ms) would reject a model as slow that is not;
- `both_scored`: windows, by their end time, that both models scored.

The decision (`decide`) rejects the candidate when, against the active model's figures of the same run:
a call raised; its invalid share is more than `max_invalid_rate` above the active's; it scored no window; it
scored less than `min_scored_ratio` of the active's share; its alert share is more than `max_alert_rate_increase`
above the active's; its p95 latency is more than `max_latency_ratio` times the active's and above
`latency_floor_s`. The same decision, after the switch, judges the new model's live figures over `watch_windows`
against the figures the old model had in the shadow run (`doomed` says early when a run can no longer pass).
With no active model (the agent ran without scoring) the active's figures are all zero.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from agent.config import ModelConfig

MIN_CALLS_FOR_P95 = 20  # below this many timed calls the latency figure is their median (docstring)
LATENCY_SAMPLES = 4096  # the most recent call times kept per model: bounds memory whatever the run's length
_ENDS_KEPT = 4096  # window ends remembered per model to count `both_scored`


@dataclass(frozen=True, slots=True)
class ShadowBounds:
    """The decision's bounds. No defaults here: they are `[model] shadow_*` and `watch_windows` keys
    (agent/config.py; `ShadowBounds.of(cfg)`)."""

    windows: int  # candidate windows in a shadow run
    max_invalid_rate: float
    max_alert_rate_increase: float
    max_latency_ratio: float
    latency_floor_s: float
    min_scored_ratio: float
    watch_windows: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> ShadowBounds:
        return cls(cfg.shadow_windows, cfg.shadow_max_invalid_rate, cfg.shadow_max_alert_rate_increase,
                   cfg.shadow_max_latency_ratio, cfg.shadow_latency_floor_ms / 1000, cfg.shadow_min_scored_ratio,
                   cfg.watch_windows)


@dataclass(slots=True)
class Figures:
    """One model's counts over a run."""

    windows: int = 0
    scored: int = 0
    invalid: int = 0
    errors: int = 0
    alert_windows: int = 0
    calls: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    p95_saved: float = math.nan  # the p95 of a run read back from disk (its call times are not kept)

    def add(self, windows: int, scored: int, invalid: int, alert_windows: int, seconds: float) -> None:
        self.windows += windows
        self.scored += scored
        self.invalid += invalid
        self.alert_windows += alert_windows
        self.calls += 1
        self.latencies.append(seconds)

    def add_error(self, windows: int, seconds: float) -> None:
        self.windows += windows
        self.errors += 1
        self.calls += 1
        self.latencies.append(seconds)

    def rate(self, n: int) -> float:
        return n / self.windows if self.windows else 0.0

    @property
    def invalid_rate(self) -> float:
        return self.rate(self.invalid)

    @property
    def scored_rate(self) -> float:
        return self.rate(self.scored)

    @property
    def alert_rate(self) -> float:
        return self.rate(self.alert_windows)

    @property
    def p95_s(self) -> float:
        if not self.latencies:
            return self.p95_saved if math.isfinite(self.p95_saved) else 0.0
        xs = sorted(self.latencies)
        if len(xs) < MIN_CALLS_FOR_P95:
            return xs[(len(xs) - 1) // 2]
        return xs[min(len(xs) - 1, math.ceil(0.95 * len(xs)) - 1)]

    def to_dict(self) -> dict[str, float | int]:
        """Flat and JSON-safe: for a status's figures (with a prefix) and for `state.json` (`from_dict`)."""
        return {"windows": self.windows, "scored": self.scored, "invalid": self.invalid, "errors": self.errors,
                "alert_windows": self.alert_windows, "calls": self.calls,
                "invalid_rate": round(self.invalid_rate, 4), "scored_rate": round(self.scored_rate, 4),
                "alert_rate": round(self.alert_rate, 4), "p95_ms": round(self.p95_s * 1000, 3)}

    @classmethod
    def from_dict(cls, d: Any) -> Figures | None:
        """Figures saved with `to_dict`; None if `d` is not such a thing."""
        if not isinstance(d, dict):
            return None
        try:
            ints = {k: d[k] for k in ("windows", "scored", "invalid", "errors", "alert_windows", "calls")}
            p95_ms = d["p95_ms"]
        except KeyError:
            return None
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints.values()) \
                or not isinstance(p95_ms, int | float) or isinstance(p95_ms, bool) \
                or not (math.isfinite(p95_ms) and p95_ms >= 0):
            return None
        return cls(**ints, p95_saved=float(p95_ms) / 1000)


@dataclass(frozen=True, slots=True)
class Decision:
    ok: bool
    reason: str  # empty when ok: otherwise one line naming the figure and the bound it broke
    figures: dict[str, Any]


def figures_of(cand: Figures, base: Figures, cand_prefix: str = "candidate", base_prefix: str = "active",
               **extra: Any) -> dict[str, Any]:
    """The flat figures a status carries (mw.ModelStatus.figures: at most 64 short keys)."""
    out: dict[str, Any] = {f"{cand_prefix}.{k}": v for k, v in cand.to_dict().items()}
    out |= {f"{base_prefix}.{k}": v for k, v in base.to_dict().items()}
    return out | extra


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def decide(cand: Figures, base: Figures, b: ShadowBounds, cand_name: str = "candidate",
           base_name: str = "active model", watch: bool = False, **extra: Any) -> Decision:
    """Pass or reject `cand` against `base` with the bounds `b` (see the module's docstring). `watch`: the figures
    are the new model's (`new.*`) against the old one's in the shadow run (`previous.*`)."""
    figs = figures_of(cand, base, "new", "previous", **extra) if watch else figures_of(cand, base, **extra)
    reason = ""
    if cand.errors:
        reason = f"{cand_name}: scoring raised in {cand.errors} of {cand.calls} calls"
    elif cand.invalid_rate > base.invalid_rate + b.max_invalid_rate:
        reason = (f"{cand_name}: non-finite output in {_pct(cand.invalid_rate)} of windows, above the {base_name}'s "
                  f"{_pct(base.invalid_rate)} + {_pct(b.max_invalid_rate)}")
    elif cand.scored == 0:
        reason = f"{cand_name} scored none of its {cand.windows} windows"
    elif cand.scored_rate < b.min_scored_ratio * base.scored_rate:
        reason = (f"{cand_name} scored {_pct(cand.scored_rate)} of windows, below {b.min_scored_ratio:g} x the "
                  f"{base_name}'s {_pct(base.scored_rate)}")
    elif cand.alert_rate > base.alert_rate + b.max_alert_rate_increase:
        reason = (f"{cand_name} was in alert in {_pct(cand.alert_rate)} of windows, above the {base_name}'s "
                  f"{_pct(base.alert_rate)} + {_pct(b.max_alert_rate_increase)}")
    elif cand.p95_s > max(b.max_latency_ratio * base.p95_s, b.latency_floor_s):
        reason = (f"{cand_name}: p95 scoring call {cand.p95_s * 1000:.2f} ms, above {b.max_latency_ratio:g} x the "
                  f"{base_name}'s {base.p95_s * 1000:.2f} ms and the floor of {b.latency_floor_s * 1000:g} ms")
    return Decision(not reason, reason, figs)


def doomed(cand: Figures, base: Figures, b: ShadowBounds, planned: int) -> str:
    """Why a run of `planned` windows can no longer pass against `base` (fixed: the watch's, from the shadow run),
    already (empty: it still can). Only what more windows cannot undo: a call that raised, or more invalid windows
    than the whole run may have."""
    if cand.errors:
        return f"scoring raised in {cand.errors} of {cand.calls} calls"
    allowed = (base.invalid_rate + b.max_invalid_rate) * max(planned, cand.windows)
    if cand.invalid > allowed:
        return (f"non-finite output in {cand.invalid} of {cand.windows} windows: more than the "
                f"{_pct(base.invalid_rate + b.max_invalid_rate)} of {planned} windows allowed")
    return ""


class ShadowRun:
    """Both models' figures over one shadow run, and the windows both scored."""

    def __init__(self, bounds: ShadowBounds) -> None:
        self.bounds = bounds
        self.cand = Figures()
        self.base = Figures()
        self.both_scored = 0
        self.waiting_for_alert = False  # passed, but the active model's alert is open: the switch waits
        self._ends: tuple[deque[float], deque[float]] = (deque(maxlen=_ENDS_KEPT), deque(maxlen=_ENDS_KEPT))
        self._sets: tuple[set[float], set[float]] = (set(), set())

    def scored_ends(self, which: int, ends: list[float]) -> None:
        """Window ends a model scored (0: candidate, 1: active), to count those both scored."""
        mine, theirs = self._sets[which], self._sets[1 - which]
        q = self._ends[which]
        for e in ends:
            if e in mine:
                continue
            if e in theirs:
                self.both_scored += 1
            if len(q) == q.maxlen:
                mine.discard(q[0])
            q.append(e)
            mine.add(e)

    @property
    def complete(self) -> bool:
        return self.cand.windows >= self.bounds.windows

    def decide(self) -> Decision:
        return decide(self.cand, self.base, self.bounds, both_scored=self.both_scored,
                      waiting_for_alert=self.waiting_for_alert)

    def figures(self) -> dict[str, Any]:
        return figures_of(self.cand, self.base, both_scored=self.both_scored,
                          waiting_for_alert=self.waiting_for_alert, windows_planned=self.bounds.windows)


@dataclass(frozen=True, slots=True)
class UpdateEvent:
    """What the pipeline tells the model manager, on the pipeline thread, about the candidate it was handed.

    kind: `shadow` (the run began), `progress` (figures grew; the manager reports at its own pace), `waiting`
    (passed, the switch waits for the open alert to close), `rejected`, `switched` (the candidate scores now; the
    watch begins unless `watch` is False), `healthy` (the watch passed), `rolled_back` (the watch failed, or a
    rollback was asked: the previous model scores again)."""

    kind: str
    tag: Any  # the manager's identity of the candidate, handed back as given
    reason: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    watch: bool = True
    base: dict[str, Any] | None = None  # `switched`: the old model's shadow figures (Figures.to_dict), to persist
