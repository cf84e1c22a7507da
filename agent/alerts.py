"""Scores → alerts, with hysteresis and a minimum duration, so that a noisy score does not flap.

An alert opens after `min_windows` consecutive windows at or above `threshold`, and closes after `clear_windows`
consecutive windows at or below `clear_threshold`. Scores between the two thresholds hold the current state.
A score that is not a finite number in [0, 1] never counts towards either: it is rejected and counted.

An open alert outlives the process: the caller persists `saved()` and, at start, hands it to `resume()`, which
carries the alert on under the same id when the model is the same and the agent was gone for at most
`resume_s`, and otherwise returns its closing record, with the reason (`agent_restart`, `model_changed`).
A clean stop closes the open alert (`close_now("agent_stop")`): the cloud never holds an alert open that no
running agent owns for longer than a restart.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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
        self.carried = 0
        self._last: tuple[float, float, dict[str, float]] | None = None  # score, window end, snapshot while open

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
                self._last = (float(score), ctx.window_end, ctx.snapshot)
                return self.open
            return None
        self._last = (float(score), ctx.window_end, ctx.snapshot)
        self._below = self._below + 1 if score <= p.clear_threshold else 0
        if self._below >= p.clear_windows:
            self._below = 0
            self.closed += 1
            opened = self.open
            self.open = None
            self._last = None
            # The closing record is the same alert: same id, label and start; a new score, end and snapshot.
            return dataclasses.replace(opened, state="closed", score=float(score), window_end=ctx.window_end,
                                       ts=ctx.window_end, top_features=[], snapshot=ctx.snapshot)
        return None

    # --- across restarts -------------------------------------------------------------------------------------

    def saved(self, alive: float) -> dict[str, Any] | None:
        """What to persist: the open alert (None if none), its latest window, and `alive`, the wall-clock time
        the owning process was last known to be running."""
        if self.open is None:
            return None
        score, end, snap = self._last or (self.open.score, self.open.window_end, self.open.snapshot)
        return {"alert": self.open.to_dict(), "alive": alive, "score": score, "window_end": end, "snapshot": snap}

    def close_now(self, reason: str, ts: float) -> Alert | None:
        """Close the open alert for a reason other than the model's (the agent is stopping)."""
        if self.open is None:
            return None
        saved = self.saved(ts)
        assert saved is not None
        self.open = None
        self._last = None
        self._above = self._below = 0
        self.closed += 1
        return _closing(saved, reason, ts)

    def resume(self, saved: Mapping[str, Any], now: float, resume_s: float) -> Alert | None:
        """Take back an alert a previous process left open: carry it on (returns None) or return its closing
        record. Raises ValueError if `saved` is damaged."""
        alert = alert_from_dict(saved["alert"])
        alive = float(saved["alive"])
        if alert.state != "open" or not math.isfinite(alive):
            raise ValueError("saved alert is not an open alert")
        if (alert.model, alert.model_version) != (self.model, self.model_version):
            return _closing(saved, "model_changed", now)
        if not 0 <= now - alive <= resume_s:
            return _closing(saved, "agent_restart", now)
        self.open = alert
        self._last = (float(saved["score"]), float(saved["window_end"]), dict(saved["snapshot"]))
        self.carried += 1
        return None


def alert_from_dict(d: Mapping[str, Any]) -> Alert:
    """An Alert from its `to_dict()` form; ValueError if it is not one."""
    try:
        a = Alert(**{f.name: d[f.name] for f in dataclasses.fields(Alert) if f.name in d})
    except TypeError as e:
        raise ValueError(f"not an alert: {e}") from None
    if not isinstance(a.alert_id, str) or not a.alert_id:
        raise ValueError("not an alert: no id")
    a.top_features = [(str(k), float(v)) for k, v in a.top_features]
    return a


def closed_for(saved: Mapping[str, Any], reason: str, ts: float) -> Alert:
    """The closing record of a saved open alert whose owner is gone (`model_changed` when no model scores)."""
    return _closing(saved, reason, ts)


def _closing(saved: Mapping[str, Any], reason: str, ts: float) -> Alert:
    # Same id, label and start as the open record; the latest known score, window and snapshot; why it closed.
    opened = alert_from_dict(saved["alert"])
    return dataclasses.replace(opened, state="closed", score=float(saved["score"]),
                               window_end=float(saved["window_end"]), ts=ts, top_features=[],
                               snapshot=dict(saved["snapshot"]), reason=reason)
