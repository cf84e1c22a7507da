"""Scores → alerts, with hysteresis and a minimum duration, so that a noisy score does not flap.

An alert opens after `min_windows` consecutive windows at or above `threshold`, and closes after `clear_windows`
consecutive windows at or below `clear_threshold`. Scores between the two thresholds hold the current state.
A score that is not a finite number in [0, 1] never counts towards either: it is rejected and counted.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from dataclasses import dataclass, field

from agent.contract import AlertPolicy
from agent.records import Alert


@dataclass(slots=True)
class AlertContext:
    window_start: float
    window_end: float
    label: str = ""
    top_features: list[tuple[str, float]] = field(default_factory=list)
    snapshot: dict[str, float] = field(default_factory=dict)
    features_present: list[str] = field(default_factory=list)  # what the model had to go on


class AlertTracker:
    def __init__(self, policy: AlertPolicy, model: str, model_version: str) -> None:
        self.policy = policy
        self.model = model
        self.model_version = model_version
        self.open: Alert | None = None
        self._above = 0
        self._below = 0
        self.invalid_scores = 0
        self.opened = 0
        self.closed = 0

    def update(self, score: float, ctx: AlertContext) -> Alert | None:
        """Feed one window's score; return an Alert record when one opens or closes."""
        if not (isinstance(score, float | int) and math.isfinite(score) and 0.0 <= score <= 1.0):
            self.invalid_scores += 1
            self._above = 0
            return None
        p = self.policy
        if self.open is None:
            self._above = self._above + 1 if score >= p.threshold else 0
            if self._above >= p.min_windows:
                self._above = 0
                self.opened += 1
                self.open = Alert(
                    alert_id=uuid.uuid4().hex,
                    state="open",
                    model=self.model,
                    model_version=self.model_version,
                    score=float(score),
                    threshold=p.threshold,
                    window_start=ctx.window_start,
                    window_end=ctx.window_end,
                    ts=ctx.window_end,
                    label=ctx.label,
                    top_features=ctx.top_features,
                    snapshot=ctx.snapshot,
                    features_present=ctx.features_present,
                )
                return self.open
            return None
        self._below = self._below + 1 if score <= p.clear_threshold else 0
        if self._below >= p.clear_windows:
            self._below = 0
            self.closed += 1
            opened = self.open
            self.open = None
            # The closing record is the same alert: same id, label and start; a new score, end and snapshot.
            return dataclasses.replace(opened, state="closed", score=float(score), window_end=ctx.window_end,
                                       ts=ctx.window_end, top_features=[], snapshot=ctx.snapshot)
        return None
