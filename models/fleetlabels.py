"""What the fleet's people said, as labels of windows (docs/learning_loop.md, "The next model", step 2), and the
held-out split (step 3). Pure: records in, spans, labels and episodes out.

Every alert and breakdown of a vehicle becomes a **span** of time:

- an alert: from its open record's time minus `LEAD_S` to its close record's time (an alert still open at the end
  of the export runs to the end; one whose open record lies before the export starts at its close record's
  `window_start`), labelled by its verdict now (the verdict row with the highest id for that vehicle and alert):
  `confirmed` with a fault F of the model's classes → F (the verdict's fault, else the alert's own label);
  `false_alarm` → healthy; `confirmed` with a fault outside the classes, `unknown`, no verdict at all, or a label
  this code does not know → no label, with that reason;
- a breakdown of fault F at `at`: `[at - LABEL_HORIZON_S, at]` → F (outside the classes: no label).

A window takes, by its end time t:

- no label, with the reason of an unlabelled span that holds t (ambiguity wins: a window under an unverified
  alert or an unknown fault is nobody's evidence);
- no label (`CONFLICT`) when the labelled spans holding t disagree;
- else the one label of the spans holding t, except a fault with the engine stopped (`STOPPED`: a worn pump pumps
  nothing at standstill, as models/dataset.py leaves out of the simulator's fault runs) or in a window that does
  not yet hold its full length of data (`WARMUP`: the first windows after the agent starts, or after a gap, hold a
  few seconds; a fault from the start of a session looks healthy there, and the simulator's runs, whose faults
  start later, teach those windows as healthy);
- held by no span: healthy on a **clean** vehicle-day (no alert span meets that UTC day and no breakdown lies
  within `LABEL_HORIZON_S` of it), else no label (`NEAR`).

An **episode** (what detection is counted on) is one stretch of a fault's spans on a vehicle, overlapping spans of
the same fault merged (an alert and the breakdown it warned of are one failure), from its first labelled window to
its last on that vehicle-day.

**Held out**: whole vehicle-days whose hash of (vehicle, day) falls below `HELD_OUT_SHARE`, plus, for each class
found on two or more labelled vehicle-days none of which is held out so far, the one of them with the lowest hash:
the same export always gives the same split, and every class the fleet shows twice is tested.
"""

from __future__ import annotations

import calendar
import hashlib
import math
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

# The windows just before an alert opened belong to its verdict: the fault was there already, under the alert
# threshold (the base alerts after three windows at or above it). A minute (12 windows of a 5 s hop): longer takes in
# healthy windows before a fault that came on fast, which then count as the fault's in training and evaluation.
LEAD_S = 60.0
# Before a breakdown, this much of the vehicle's data is taken as showing its fault. A leak or a worn pump may show
# for longer, but how much longer differs from one failure to the next; a tight horizon keeps healthy operation
# out of the fault's labels (a failure the mechanic dates to the minute).
LABEL_HORIZON_S = 1800.0
HELD_OUT_SHARE = 0.3
DAY_S = 86400.0

# Why a window has no label (the card counts windows per reason).
NO_VERDICT = "alert without a verdict"
UNKNOWN = "alert with verdict unknown"
BAD_VERDICT = "verdict label not understood"
OUTSIDE = "fault outside the model's classes"
CONFLICT = "conflicting labels"
STOPPED = "fault with the engine stopped"
WARMUP = "fault in a window not yet full of data"
NEAR = "near an alert or a breakdown"
REASONS = (NO_VERDICT, UNKNOWN, BAD_VERDICT, OUTSIDE, CONFLICT, STOPPED, WARMUP, NEAR)
VERDICT_LABELS = ("confirmed", "false_alarm", "unknown")


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """One stored alert record (open or close) of an export's `alerts` table."""

    vehicle: str
    alert_id: str
    state: str
    ts: float
    label: str = ""
    window_start: float = math.nan  # from the stored record; used when the open record is not in the export


@dataclass(frozen=True, slots=True)
class VerdictRecord:
    id: int
    vehicle: str
    alert_id: str
    label: str
    fault: str = ""


@dataclass(frozen=True, slots=True)
class BreakdownRecord:
    id: int
    vehicle: str
    at: float
    fault: str


@dataclass(frozen=True, slots=True)
class Span:
    """A stretch of one vehicle's time and what it says: `label` a class, or None with `reason`."""

    vehicle: str
    start: float
    end: float
    label: str | None
    reason: str  # why it gives no label; for a labelled span what it is ("confirmed alert", "false alarm", ...)
    what: str  # "alert <id>" or "breakdown <id>"
    fault: str = ""  # the fault as named by the verdict or breakdown


@dataclass(frozen=True, slots=True)
class Episode:
    fault: str
    start: float  # end time of its first labelled window
    end: float  # end time of its last


@dataclass(slots=True)
class Timeline:
    """Every vehicle's spans, and what the records said that no window can use."""

    spans: dict[str, list[Span]] = field(default_factory=dict)
    breakdowns: dict[str, list[float]] = field(default_factory=dict)  # vehicle -> times of all its breakdowns
    alerts_by_verdict: dict[str, int] = field(default_factory=dict)  # verdict now -> alerts ("none": no verdict)
    verdicts_without_alert: int = 0  # verdicts on alerts the export does not hold (counted, not used)
    unusable: dict[str, int] = field(default_factory=dict)  # records with no id or time to place them by
    outside_classes: dict[str, dict[str, int]] = field(default_factory=dict)  # fault -> {"alerts", "breakdowns"}


def _outside(tl: Timeline, fault: str, kind: str) -> None:
    d = tl.outside_classes.setdefault(fault or "(none named)", {"alerts": 0, "breakdowns": 0})
    d[kind] += 1


def timeline(alerts: Iterable[AlertRecord], verdicts: Iterable[VerdictRecord],
             breakdowns: Iterable[BreakdownRecord], classes: Sequence[str], healthy: str) -> Timeline:
    """The spans of every alert and breakdown, labelled as the module's docstring says."""
    tl = Timeline()
    faults = {c for c in classes if c != healthy}
    by_alert: dict[tuple[str, str], list[AlertRecord]] = {}
    for a in alerts:
        if a.alert_id and math.isfinite(a.ts):
            by_alert.setdefault((a.vehicle, a.alert_id), []).append(a)
        else:
            tl.unusable["alert records"] = tl.unusable.get("alert records", 0) + 1
    now: dict[tuple[str, str], VerdictRecord] = {}
    for v in verdicts:
        key = (v.vehicle, v.alert_id)
        if key not in now or v.id > now[key].id:
            now[key] = v
    tl.verdicts_without_alert = sum(1 for k in now if k not in by_alert)
    for (vehicle, aid), recs in sorted(by_alert.items()):
        opens = [r.ts for r in recs if r.state == "open"]
        closes = [r.ts for r in recs if r.state == "closed"]
        if opens:
            start = min(opens) - LEAD_S
        else:
            ws = [r.window_start for r in recs if math.isfinite(r.window_start)]
            start = min(ws) if ws else min(closes)
        end = max(closes) if closes else math.inf
        own = next((r.label for r in sorted(recs, key=lambda r: r.state != "open") if r.label), "")
        vn = now.get((vehicle, aid))
        what = f"alert {aid}"
        verdict = vn.label if vn is not None else "none"
        tl.alerts_by_verdict[verdict] = tl.alerts_by_verdict.get(verdict, 0) + 1
        if vn is None:
            span = Span(vehicle, start, end, None, NO_VERDICT, what)
        elif vn.label == "false_alarm":
            span = Span(vehicle, start, end, healthy, "false alarm", what)
        elif vn.label == "unknown":
            span = Span(vehicle, start, end, None, UNKNOWN, what)
        elif vn.label == "confirmed":
            fault = vn.fault or own
            if fault in faults:
                span = Span(vehicle, start, end, fault, "confirmed alert", what, fault)
            else:
                _outside(tl, fault, "alerts")
                span = Span(vehicle, start, end, None, OUTSIDE, what, fault)
        else:
            span = Span(vehicle, start, end, None, BAD_VERDICT, what)
        tl.spans.setdefault(vehicle, []).append(span)
    for b in breakdowns:
        if not math.isfinite(b.at):
            tl.unusable["breakdowns"] = tl.unusable.get("breakdowns", 0) + 1
            continue
        tl.breakdowns.setdefault(b.vehicle, []).append(b.at)
        what = f"breakdown {b.id}"
        if b.fault in faults:
            span = Span(b.vehicle, b.at - LABEL_HORIZON_S, b.at, b.fault, "breakdown", what, b.fault)
        else:
            _outside(tl, b.fault, "breakdowns")
            span = Span(b.vehicle, b.at - LABEL_HORIZON_S, b.at, None, OUTSIDE, what, b.fault)
        tl.spans.setdefault(b.vehicle, []).append(span)
    return tl


def day_start(day: str) -> float:
    """`"2026-11-20"` → its first second, Unix time (UTC)."""
    return float(calendar.timegm(time.strptime(day, "%Y-%m-%d")))


def day_of(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def clean_day(tl: Timeline, vehicle: str, day: str) -> bool:
    """No alert span of `vehicle` meets `day` and no breakdown of it lies within LABEL_HORIZON_S of the day."""
    d0 = day_start(day)
    d1 = d0 + DAY_S
    for s in tl.spans.get(vehicle, []):
        if s.what.startswith("alert") and s.start < d1 and s.end >= d0:
            return False
    return not any(d0 - LABEL_HORIZON_S <= at < d1 + LABEL_HORIZON_S for at in tl.breakdowns.get(vehicle, []))


def label_windows(tl: Timeline, vehicle: str, day: str, end: npt.NDArray[np.float64],
                  running: npt.NDArray[np.bool_], healthy: str,
                  full: npt.NDArray[np.bool_] | None = None) -> tuple[list[str | None], list[str]]:
    """Per window of `vehicle` on `day` (by its end time): its label (None: left out) and, when left out, why
    (empty otherwise). `running`: the engine ran in the window; `full`: the window had data over all its length
    (default: all did)."""
    n = len(end)
    label = np.full(n, None, object)
    has = np.zeros(n, bool)
    conflict = np.zeros(n, bool)
    ambiguous = np.full(n, "", object)
    for s in tl.spans.get(vehicle, []):
        m = (end >= s.start) & (end <= s.end)
        if not m.any():
            continue
        if s.label is None:
            ambiguous[m & (ambiguous == "")] = s.reason
            continue
        conflict |= m & has & (label != s.label)
        label[m & ~has] = s.label
        has |= m
    clean = clean_day(tl, vehicle, day)
    labels: list[str | None] = []
    reasons: list[str] = []
    for i in range(n):
        if ambiguous[i]:
            labels.append(None)
            reasons.append(str(ambiguous[i]))
        elif conflict[i]:
            labels.append(None)
            reasons.append(CONFLICT)
        elif has[i]:
            if label[i] != healthy and not running[i]:
                labels.append(None)
                reasons.append(STOPPED)
            elif label[i] != healthy and full is not None and not full[i]:
                labels.append(None)
                reasons.append(WARMUP)
            else:
                labels.append(str(label[i]))
                reasons.append("")
        elif clean:
            labels.append(healthy)
            reasons.append("")
        else:
            labels.append(None)
            reasons.append(NEAR)
    return labels, reasons


def episodes(tl: Timeline, vehicle: str, end: npt.NDArray[np.float64],
             labels: Sequence[str | None]) -> list[Episode]:
    """The fault episodes among these windows of `vehicle` (one vehicle-day's): per fault, its spans merged where
    they overlap, each with at least one window labelled with that fault."""
    out: list[Episode] = []
    by_fault: dict[str, list[tuple[float, float]]] = {}
    for s in tl.spans.get(vehicle, []):
        if s.label is not None and s.reason in ("confirmed alert", "breakdown"):
            by_fault.setdefault(s.label, []).append((s.start, s.end))
    for fault, ivs in sorted(by_fault.items()):
        merged: list[list[float]] = []
        for a, b in sorted(ivs):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        mine = np.array([lab == fault for lab in labels], bool)
        for a, b in merged:
            m = mine & (end >= a) & (end <= b)
            if m.any():
                out.append(Episode(fault, float(end[m].min()), float(end[m].max())))
    return out


def _unit(vehicle: str, day: str) -> float:
    """A number in [0, 1) fixed by (vehicle, day)."""
    h = hashlib.sha256(f"{vehicle}\x00{day}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def held_out(day_classes: Mapping[tuple[str, str], Collection[str]],
             share: float = HELD_OUT_SHARE) -> set[tuple[str, str]]:
    """The held-out (vehicle, day)s among labelled ones (`day_classes`: the classes each has windows of)."""
    u = {vd: _unit(*vd) for vd in day_classes}
    out = {vd for vd, x in u.items() if x < share}
    for c in sorted({c for cs in day_classes.values() for c in cs}):
        days = [vd for vd, cs in day_classes.items() if c in cs]
        if len(days) >= 2 and not any(vd in out for vd in days):
            out.add(min(days, key=lambda vd: (u[vd], vd)))
    return out
