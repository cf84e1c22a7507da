"""The candidate and its base on the same held-out vehicle-days (docs/learning_loop.md, "The next model", steps 3
to 5): scored with the agent's Scorer, alerts from the agent's AlertTracker over each vehicle-day's windows in
time order (a window not scored holds the alert state, as on the vehicle), and the decision.

Per model and fault:
- `windows`: held-out windows labelled with the fault;
- `roc_auc`: the score (1 - P(healthy)) of the fault's windows against the healthy ones, over the windows every
  model compared scored (the same windows for each), when both kinds are there;
- `alerts`: alerts the model opened with that label; `false_alarms`: those that opened on a healthy window, per
  hour of healthy windows (windows x hop);
- `detected` of `episodes`: an episode is detected when an alert of the model (of any label: a mechanic is called
  either way) is open at some time between its first and last labelled window.

The candidate is **at least as good** (`decide`) when, for every fault with held-out episodes, it detects at least
the base's share of them, raises no more false alarms with that label, and its ROC-AUC is at most
`AUC_TOLERANCE` below the base's; when over all labels it raises no more false alarms; and when it raises no alert
on the real healthy traces. Each failed condition is a sentence.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.alerts import AlertContext, AlertTracker
from agent.scoring import Scorer
from models.fleetlabels import Episode

AUC_TOLERANCE = 0.01
CANDIDATE, BASE = "candidate", "base"


@dataclass(slots=True)
class HeldOutDay:
    vehicle: str
    day: str
    end: npt.NDArray[np.float64]
    x: npt.NDArray[np.float64]
    labels: list[str | None]
    episodes: list[Episode]


@dataclass(slots=True)
class ModelRun:
    """One model over the held-out days: per day its scores (NaN: not scored), the alerts it opened (window
    index, label) and the time each was open (open window's end to close window's end, inf: still open)."""

    scores: list[npt.NDArray[np.float64]] = field(default_factory=list)
    opened: list[list[tuple[int, str]]] = field(default_factory=list)
    open_spans: list[list[tuple[float, float]]] = field(default_factory=list)
    windows_unfamiliar: int = 0
    windows_missing_features: int = 0


def run_model(scorer: Scorer, days: Sequence[HeldOutDay]) -> ModelRun:
    c = scorer.contract
    out = ModelRun()
    for d in days:
        if not len(d.x):
            out.scores.append(np.zeros(0))
            out.opened.append([])
            out.open_spans.append([])
            continue
        res = scorer.score(d.x)
        out.windows_unfamiliar += int(res.unfamiliar.sum())
        out.windows_missing_features += int(res.missing_required.sum())
        tracker = AlertTracker(c.alert, c.model_name, c.model_version)
        opened: list[tuple[int, str]] = []
        spans: list[tuple[float, float]] = []
        since = math.nan
        for i, end in enumerate(d.end.tolist()):
            if not res.scored[i]:
                continue
            a = tracker.update(float(res.scores[i]), AlertContext(end - c.max_window_s, end, res.labels[i]))
            if a is None:
                continue
            if a.state == "open":
                opened.append((i, a.label))
                since = end
            else:
                spans.append((since, end))
        if tracker.open is not None:
            spans.append((since, math.inf))
        out.scores.append(res.scores)
        out.opened.append(opened)
        out.open_spans.append(spans)
    return out


def _auc(y: list[int], s: list[float]) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(set(y)) < 2:
        return None
    return round(float(roc_auc_score(y, s)), 5)


def compare(days: Sequence[HeldOutDay], runs: Mapping[str, ModelRun], classes: Sequence[str], healthy: str,
            hop_s: float) -> dict[str, Any]:
    """The evaluation table: per fault and per model (see the module's docstring), and the totals."""
    faults = [c for c in classes if c != healthy]
    windows_per_label: dict[str, int] = {}
    for d in days:
        for lab in d.labels:
            if lab is not None:
                windows_per_label[lab] = windows_per_label.get(lab, 0) + 1
    healthy_hours = windows_per_label.get(healthy, 0) * hop_s / 3600
    both = [np.all([np.isfinite(r.scores[k]) for r in runs.values()], axis=0) if len(d.x) else np.zeros(0, bool)
            for k, d in enumerate(days)]
    table: dict[str, Any] = {f: {"windows": windows_per_label.get(f, 0),
                                 "episodes": sum(1 for d in days for e in d.episodes if e.fault == f)}
                             for f in faults}
    models: dict[str, Any] = {}
    for name, r in runs.items():
        alerts = {f: 0 for f in faults}
        false_alarms = {f: 0 for f in faults}
        detected = {f: 0 for f in faults}
        ys: dict[str, list[int]] = {f: [] for f in ["all", *faults]}
        ss: dict[str, list[float]] = {f: [] for f in ["all", *faults]}
        for k, d in enumerate(days):
            for i, lab in r.opened[k]:
                alerts[lab] = alerts.get(lab, 0) + 1
                if d.labels[i] == healthy:
                    false_alarms[lab] = false_alarms.get(lab, 0) + 1
            for e in d.episodes:
                if any(a <= e.end and b >= e.start for a, b in r.open_spans[k]):
                    detected[e.fault] += 1
            for i, lab in enumerate(d.labels):
                if lab is None or not both[k][i]:
                    continue
                s = float(r.scores[k][i])
                y = 0 if lab == healthy else 1
                for f in ("all", lab) if lab != healthy else ("all", *faults):
                    if f in ys:
                        ys[f].append(y)
                        ss[f].append(s)
        for f in faults:
            n = table[f]["episodes"]
            table[f][name] = {
                "roc_auc": _auc(ys[f], ss[f]),
                "alerts": alerts[f],
                "detected": detected[f],
                "detection_rate": round(detected[f] / n, 4) if n else None,
                "false_alarms": false_alarms[f],
                "false_alarms_per_hour": round(false_alarms[f] / healthy_hours, 4) if healthy_hours else None,
            }
        fa = sum(false_alarms.values())
        models[name] = {
            "windows_scored": int(sum(int(np.isfinite(s).sum()) for s in r.scores)),
            "windows_unfamiliar": r.windows_unfamiliar,
            "windows_missing_features": r.windows_missing_features,
            "roc_auc": _auc(ys["all"], ss["all"]),
            "alerts": sum(alerts.values()),
            "false_alarms": fa,
            "false_alarms_per_hour": round(fa / healthy_hours, 4) if healthy_hours else None,
        }
    return {
        "vehicle_days": [f"{d.vehicle} {d.day}" for d in days],
        "windows": sum(len(d.end) for d in days),
        "windows_per_label": dict(sorted(windows_per_label.items())),
        "windows_compared": int(sum(int((b & np.array([lab is not None for lab in d.labels], bool)).sum())
                                    for b, d in zip(both, days, strict=True) if len(d.labels))),
        "healthy_hours": round(healthy_hours, 4),
        "models": models,
        "faults": table,
    }


def decide(evaluation: Mapping[str, Any], real: Mapping[str, Any] | None) -> list[str]:
    """Why the candidate is not at least as good as the base (empty: it is). `real`: the candidate's real-trace
    figures (models/realtraces.py), None when there were none to replay."""
    reasons: list[str] = []
    if not evaluation["windows_per_label"]:
        reasons.append("there is no labelled held-out data to compare the candidate and the base on")
    for f, row in evaluation["faults"].items():
        n = row["episodes"]
        if not n:
            continue
        c, b = row[CANDIDATE], row[BASE]
        if c["detected"] < b["detected"]:
            reasons.append(f"{f}: the candidate detects {c['detected']} of {n} held-out episodes, the base "
                           f"{b['detected']}")
        if c["false_alarms"] > b["false_alarms"]:
            reasons.append(f"{f}: the candidate raises {c['false_alarms']} false alarms on held-out healthy windows "
                           f"({c['false_alarms_per_hour']}/h), the base {b['false_alarms']} "
                           f"({b['false_alarms_per_hour']}/h)")
        if c["roc_auc"] is not None and b["roc_auc"] is not None and c["roc_auc"] < b["roc_auc"] - AUC_TOLERANCE:
            reasons.append(f"{f}: the candidate's ROC-AUC {c['roc_auc']:.4f} is more than {AUC_TOLERANCE} below the "
                           f"base's {b['roc_auc']:.4f}")
    if evaluation["windows_per_label"] and not any(row["episodes"] for row in evaluation["faults"].values()):
        # Then only false alarms would be compared: a candidate that detects nothing would pass.
        reasons.append("no fault episode is held out, so whether the candidate detects faults as well as the base "
                       "cannot be told (a fault is held out once verdicts or breakdowns show it on two or more "
                       "vehicle-days)")
    cm, bm = evaluation["models"][CANDIDATE], evaluation["models"][BASE]
    if cm["false_alarms"] > bm["false_alarms"]:
        reasons.append(f"the candidate raises {cm['false_alarms']} false alarms in all on held-out healthy windows "
                       f"({cm['false_alarms_per_hour']}/h), the base {bm['false_alarms']} "
                       f"({bm['false_alarms_per_hour']}/h)")
    if real is not None and "traces" in real:
        alarms = {t: v["alerts"] for t, v in real["traces"].items() if v["alerts"]}
        if alarms:
            reasons.append("the candidate alerts on real healthy machines: "
                           + ", ".join(f"{t} ({n})" for t, n in sorted(alarms.items())))
    return reasons
