"""How often each model version is right (docs/learning_loop.md, "Quality"): the figures per model version and per
fault over a period, from plain records. Pure: no I/O (an import contract keeps the database and the network out);
`Reports.quality` (cloud_sync/reports.py) runs the queries and hands the rows here.

The rules, each written once below:
- an alert counts for the period it **opened** in, for the version its opening record names, with its verdict now;
- which version a vehicle ran when (`stretches`): from the records that name one (alert openings and drift reports,
  in time order), a version runs from a record naming it until the next record naming another, the first one from
  the last such record before the period (else from its first record in it); the last one to the period's end.
  Closing records are left out: an alert closed because the model changed names the old version at a time the new
  one already ran;
- engine hours of a stretch (`hours_rise`): the rise of SPN 247 between its first and last sample there, trusted
  only when it is a counter's rise: not negative, not more than the time between the two samples (plus one step of
  the counter). A reset counter or a garbled sample makes the stretch's hours unknown, not wrong;
- false alarms per 100 engine hours count the false alarms of alerts that opened within stretches whose engine hours
  are known, over those hours: a vehicle that does not send SPN 247 is in neither, so a fleet that is partly
  without it is not judged by the others' hours;
- a breakdown is caught by its vehicle's alerts that opened at most `lead_window_h` before it (or at its time) and
  are not judged false alarms, and counts for the version of the earliest; otherwise it is missed and counts for
  the version the vehicle ran at its time (`unknown` if none is known).
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cloud_sync.config import QualityConfig
from cloud_sync.learning import Breakdown

UNKNOWN = "unknown"  # the model and version of what no record names
HOURS_SIGNAL = "HOURS.EngTotalHoursOfOperation"  # J1939 SPN 247, engine total hours of operation
HOURS_STEP_H = 0.05  # SPN 247's resolution: a rise may exceed the time between two samples by one step
VERDICT_KEYS = ("confirmed", "false_alarm", "unknown", "none")
DEFAULT_PERIOD_S = 30 * 86400.0
_NUMBERS = re.compile(r"([0-9]+)")
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True, slots=True)
class Period:
    """[since, until): Unix seconds."""

    since: float
    until: float

    def __contains__(self, t: float) -> bool:
        return self.since <= t < self.until


@dataclass(frozen=True, slots=True)
class Opened:
    """An alert's opening: whose, its id, when (its open record's `ts`) and what that record names."""

    vehicle: str
    alert_id: str
    ts: float
    model: str
    version: str
    label: str


@dataclass(frozen=True, slots=True)
class Mark:
    """A record naming the model version its vehicle ran at `ts` (an alert's opening, a drift report)."""

    ts: float
    model: str
    version: str


@dataclass(frozen=True, slots=True)
class Stretch:
    """[start, end): the time `vehicle` ran `model` `version` within the period."""

    vehicle: str
    model: str
    version: str
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class Drift:
    """One drift report: the version it is about, and whether it says drifted."""

    vehicle: str
    model: str
    version: str
    drifted: bool


def stretches(vehicle: str, marks: Iterable[Mark], period: Period) -> list[Stretch]:
    """The vehicle's stretches within `period` (module docstring), oldest first. `marks` may start before the
    period (only the last of those matters) and need not be sorted; marks at or after its end are ignored."""
    out: list[Stretch] = []
    current: Mark | None = None
    start = period.since
    for m in sorted(marks, key=lambda m: m.ts):  # stable: marks at one time keep the order given
        if m.ts >= period.until:
            break
        if current is not None and (m.model, m.version) == (current.model, current.version):
            continue
        t = max(m.ts, period.since)
        if current is not None and t > start:
            out.append(Stretch(vehicle, current.model, current.version, start, t))
        current, start = m, t
    if current is not None and period.until > start:
        out.append(Stretch(vehicle, current.model, current.version, start, period.until))
    return out


def hours_rise(first: tuple[float, float] | None, last: tuple[float, float] | None) -> float | None:
    """Engine hours between two (ts, SPN 247 value) samples, or None when there are none or the rise cannot be a
    counter's (module docstring)."""
    if first is None or last is None:
        return None
    (t0, h0), (t1, h1) = first, last
    rise, elapsed_h = h1 - h0, (t1 - t0) / 3600.0
    if not (math.isfinite(rise) and math.isfinite(elapsed_h)) or rise < 0 or rise > elapsed_h + HOURS_STEP_H:
        return None
    return rise


def version_at(runs: Sequence[Stretch], t: float) -> tuple[str, str] | None:
    """The (model, version) one vehicle ran at `t`, from its stretches."""
    for s in runs:
        if s.start <= t < s.end:
            return s.model, s.version
    return None


@dataclass(slots=True)
class _Figures:
    """What is counted per version, and per fault within a version."""

    alerts: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)
    caught: int = 0
    missed: int = 0
    leads_h: list[float] = field(default_factory=list)

    def precision(self) -> float | None:
        c, f = self.verdicts["confirmed"], self.verdicts["false_alarm"]
        return c / (c + f) if c + f else None

    def to_dict(self) -> dict[str, Any]:
        return {"alerts": self.alerts, "verdicts": {k: self.verdicts[k] for k in VERDICT_KEYS},
                "precision": _round(self.precision(), 4),
                "breakdowns": {"caught": self.caught, "missed": self.missed},
                "median_lead_time_h": _round(statistics.median(self.leads_h), 3) if self.leads_h else None}


@dataclass(slots=True)
class _Version:
    total: _Figures = field(default_factory=_Figures)
    per_fault: dict[str, _Figures] = field(default_factory=dict)
    hours: float = 0.0
    hours_known: bool = False
    false_alarms_with_hours: int = 0
    drift: dict[str, list[int]] = field(default_factory=dict)  # vehicle → [reports, drifted]

    def fault(self, name: str) -> _Figures:
        return self.per_fault.setdefault(name, _Figures())


def report(period: Period, thresholds: QualityConfig, opened: Iterable[Opened],
           verdicts: Mapping[tuple[str, str], str], breakdowns: Iterable[Breakdown], runs: Sequence[Stretch],
           hours: Sequence[float | None], drift: Iterable[Drift], model: str | None = None) -> dict[str, Any]:
    """The quality report (docs/learning_loop.md's JSON object). `opened`: alert openings from `lead_window_h`
    before the period to its end (the earlier ones can only catch breakdowns); `verdicts`: the verdict now
    (label) per (vehicle, alert id); `breakdowns` in the period; `runs` every vehicle's stretches in the period and
    `hours` their engine hours (None: unknown), in the same order; `drift`: the period's drift reports. `model`:
    only the versions of this model."""
    rows: dict[tuple[str, str], _Version] = {}

    def row(key: tuple[str, str]) -> _Version:
        return rows.setdefault(key, _Version())

    by_vehicle: dict[str, list[tuple[Stretch, float | None]]] = {}
    for s, h in zip(runs, hours, strict=True):
        by_vehicle.setdefault(s.vehicle, []).append((s, h))
        r = row((s.model, s.version))
        if h is not None:
            r.hours += h
            r.hours_known = True

    alerts_of: dict[str, list[Opened]] = {}
    for a in sorted(opened, key=lambda a: (a.ts, a.alert_id)):
        alerts_of.setdefault(a.vehicle, []).append(a)
        if a.ts not in period:
            continue
        label = verdicts.get((a.vehicle, a.alert_id), "none")
        r = row((a.model, a.version))
        for fig in (r.total, r.fault(a.label)):
            fig.alerts += 1
            fig.verdicts[label] += 1
        if label == "false_alarm" and any(s.version == a.version and s.model == a.model and s.start <= a.ts < s.end
                                          and h is not None for s, h in by_vehicle.get(a.vehicle, [])):
            r.false_alarms_with_hours += 1

    lead_s = thresholds.lead_window_h * 3600.0
    for b in breakdowns:
        if b.at not in period:
            continue
        catching = [a for a in alerts_of.get(b.vehicle, []) if b.at - lead_s <= a.ts <= b.at
                    and verdicts.get((a.vehicle, a.alert_id)) != "false_alarm"]
        if catching:
            first = catching[0]  # alerts_of is in time order
            r = row((first.model, first.version))
            for fig in (r.total, r.fault(b.fault)):
                fig.caught += 1
                fig.leads_h.append((b.at - first.ts) / 3600.0)
        else:
            ran = version_at([s for s, _ in by_vehicle.get(b.vehicle, [])], b.at) or (UNKNOWN, UNKNOWN)
            r = row(ran)
            for fig in (r.total, r.fault(b.fault)):
                fig.missed += 1

    for d in drift:
        counts = row((d.model, d.version)).drift.setdefault(d.vehicle, [0, 0])
        counts[0] += 1
        counts[1] += int(d.drifted)

    models = [_version_dict(k, rows[k], thresholds) for k in sorted(rows, key=_order)
              if model is None or k[0] == model]
    return {
        "period": {"since": period.since, "until": period.until},
        "thresholds": thresholds.model_dump(),
        "models": models,
        "retraining_due": any(m["retraining_due"] for m in models),
        "retraining_reasons": [f"{m['model']} {m['version']}: {why}" for m in models
                               for why in m["retraining_reasons"]],
    }


def _version_dict(key: tuple[str, str], r: _Version, t: QualityConfig) -> dict[str, Any]:
    total = r.total.to_dict()
    hours = r.hours if r.hours_known else None
    share = {v: n[1] / n[0] for v, n in sorted(r.drift.items())}
    reasons: list[str] = []
    precision, judged = r.total.precision(), r.total.verdicts["confirmed"] + r.total.verdicts["false_alarm"]
    if precision is not None and judged >= t.min_verdicts and precision < t.min_precision:
        reasons.append(f"precision {precision:.2f} is below min_precision {t.min_precision:.2f} "
                       f"({r.total.verdicts['confirmed']} confirmed, {r.total.verdicts['false_alarm']} false alarms)")
    for vehicle, (n, drifted) in sorted(r.drift.items()):
        if n >= t.min_drift_reports and drifted / n > t.max_drift_share:
            reasons.append(f"{vehicle}: {drifted} of {n} drift reports say drifted ({drifted / n:.0%}), above "
                           f"max_drift_share {t.max_drift_share:.0%}")
    return {
        "model": key[0], "version": key[1], "alerts": total["alerts"], "verdicts": total["verdicts"],
        "precision": total["precision"],
        "engine_hours": _round(hours, 3),
        "false_alarms_per_100_engine_hours":
            _round(r.false_alarms_with_hours * 100.0 / hours, 4) if hours else None,
        "breakdowns": total["breakdowns"], "median_lead_time_h": total["median_lead_time_h"],
        "drift_share": {v: _round(s, 4) for v, s in share.items()},
        "drift_reports": {v: n[0] for v, n in sorted(r.drift.items())},
        "per_fault": {f: r.per_fault[f].to_dict() for f in sorted(r.per_fault)},
        "retraining_due": bool(reasons), "retraining_reasons": reasons,
    }


def _order(key: tuple[str, str]) -> tuple[Any, ...]:
    """Model, then version by its numbers (1.10.0 after 1.9.0); unknown last."""
    # Numbers compare by length then digits: int() of a hostile 5,000-digit version would raise.
    parts = tuple((0, len(p.lstrip("0")), p.lstrip("0")) if _DIGITS.fullmatch(p) else (1, 0, p)
                  for p in _NUMBERS.split(key[1]) if p)
    return key == (UNKNOWN, UNKNOWN), key[0], parts


def _round(v: float | None, digits: int) -> float | None:
    return None if v is None else round(v, digits)
