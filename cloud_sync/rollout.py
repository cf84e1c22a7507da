"""How a rollout decides, without I/O: which vehicles go in which wave, what a vehicle's `model/status` means for a
rollout, and whether a wave lets the next one start, halts the rollout, or is waited for.

Waves (`plan_waves`). Vehicles are sorted by id, so the same list gives the same plan on any machine. With
`canary=N` the first wave is the first N vehicles. `percent` are cumulative percentages of the vehicles after the
canary (`10,50,100`: the first 10 % of them, then up to 50 %, then all), each wave ending at the percentage's
share rounded up; a wave that would be empty (few vehicles, close percentages) is left out, so every wave has at
least one vehicle and every vehicle is in exactly one wave.

A vehicle's step in a rollout (`fold_status`): its report names the rollout's package as its target (then its state
is the step: `downloading` .. `active`, or a failure), or it already runs the package's model (`active`, healthy as
it says). A report about anything else says nothing about this rollout.

A wave's verdict (`evaluate_wave`): `halt` when the share of its vehicles `rejected`, `rolled_back` or `failed`
passes (>) `error_threshold`, or when so many failed that the others can no longer reach `success_threshold` (a
failed step is final within a rollout: waiting would be for ever); else `advance` when the share `active` and
healthy reaches (>=) `success_threshold`; else `wait`. Halting is checked first: a wave that is both successful
enough and failing too much stops.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from harvester_common import modelwire as mw

ROLLOUT_STATES = ("running", "paused", "halted", "aborted", "done")
LIVE_STATES = ("running", "paused", "halted")  # not over: its vehicles belong to it
PENDING, SENT = "pending", "sent"  # a vehicle's step before the vehicle says anything: not sent yet / desired sent
VEHICLE_STATES = (PENDING, SENT, *mw.STATES)
FAILED_STATES = ("rejected", "rolled_back", "failed")
MAX_REASON_CHARS = 1000  # a halted rollout's reason (it names failed vehicles: a few, then how many more)


class PlanError(ValueError):
    """Wave options that make no plan; the message says why."""


def parse_waves(text: str) -> tuple[int, ...]:
    """`10,50,100` → (10, 50, 100): integers 1..100, strictly increasing, the last 100."""
    try:
        out = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise PlanError(f"waves must be comma-separated integer percentages, e.g. 10,50,100 (got {text!r})") from None
    check_percent(out)
    return out


def check_percent(percent: Sequence[int]) -> None:
    if not percent:
        raise PlanError("at least one wave percentage is needed (the last one 100)")
    if any(not 1 <= p <= 100 for p in percent):
        raise PlanError("wave percentages must be between 1 and 100")
    if any(b <= a for a, b in itertools.pairwise(percent)):
        raise PlanError("wave percentages are cumulative: each must be larger than the one before")
    if percent[-1] != 100:
        raise PlanError("the last wave percentage must be 100 (every vehicle)")


def plan_waves(vehicles: Iterable[str], canary: int = 0, percent: Sequence[int] = (100,)) -> list[list[str]]:
    """The waves, in order, each a list of vehicle ids (module docstring)."""
    if canary < 0:
        raise PlanError("canary must be 0 or more vehicles")
    check_percent(percent)
    order = sorted(set(vehicles))
    waves: list[list[str]] = []
    if canary:
        waves.append(order[:canary])
    rest = order[canary:]
    start = 0
    for p in percent:
        end = math.ceil(len(rest) * p / 100)
        waves.append(rest[start:end])
        start = end
    return [w for w in waves if w]


@dataclass(frozen=True, slots=True)
class Step:
    """A vehicle's step in a rollout, as `rollout_vehicles` keeps it."""

    vehicle: str
    state: str
    healthy: bool | None = None
    reason: str = ""
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return self.state == "active" and self.healthy is True

    @property
    def failed(self) -> bool:
        return self.state in FAILED_STATES


def fold_status(status: mw.ModelStatus, package_sha256: str, model_sha256: str) -> tuple[str, bool | None, str,
                                                                                         dict[str, Any]] | None:
    """What a vehicle's report says of its step in a rollout of `package_sha256` (whose model file hashes to
    `model_sha256`): (state, healthy, reason, figures), or None when the report is about something else."""
    if status.target is not None and status.target.get("package_sha256") == package_sha256:
        healthy = status.healthy if status.state == "active" else None
        return status.state, healthy, status.reason, dict(status.figures)
    if status.active is not None and status.active.get("sha256") == model_sha256:
        # Already runs the model (an earlier rollout, or it moved on to another target since): active here.
        return "active", status.healthy, "", {}
    return None


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Literal["advance", "halt", "wait"]
    total: int
    succeeded: int
    failed: tuple[Step, ...]
    counts: dict[str, int]
    reason: str  # one line for logs and a halted rollout's reason

    @property
    def failed_share(self) -> float:
        return len(self.failed) / self.total if self.total else 0.0

    @property
    def success_share(self) -> float:
        return self.succeeded / self.total if self.total else 1.0


def evaluate_wave(steps: Sequence[Step], success_threshold: float, error_threshold: float) -> Verdict:
    """The verdict on one wave from its vehicles' steps (module docstring). An empty wave advances."""
    total = len(steps)
    failed = tuple(s for s in steps if s.failed)
    succeeded = sum(s.succeeded for s in steps)
    counts = dict(sorted(Counter(s.state for s in steps).items()))
    if total and len(failed) / total > error_threshold:
        named = "; ".join(f"{s.vehicle} {s.state}" + (f" ({s.reason})" if s.reason else "") for s in failed[:5])
        more = f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
        reason = (f"{len(failed)} of {total} vehicles failed ({len(failed) / total:.0%} > error threshold "
                  f"{error_threshold:.0%}): {named}{more}")
        return Verdict("halt", total, succeeded, failed, counts, reason[:MAX_REASON_CHARS])
    if total and (total - len(failed)) / total < success_threshold:
        # A failed step is final for this rollout (its desired message is not issued anew), so such a wave would
        # wait for ever: seen when one vehicle of five was rejected (20 %, not past an error threshold of 20 %,
        # and 80 % can never reach a success threshold of 90 %).
        named = "; ".join(f"{s.vehicle} {s.state}" + (f" ({s.reason})" if s.reason else "") for s in failed[:5])
        more = f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
        reason = (f"{len(failed)} of {total} vehicles failed: the success threshold {success_threshold:.0%} can no "
                  f"longer be reached ({total - len(failed)} of {total} at most): {named}{more}")
        return Verdict("halt", total, succeeded, failed, counts, reason[:MAX_REASON_CHARS])
    if not total or succeeded / total >= success_threshold:
        return Verdict("advance", total, succeeded, failed, counts,
                       f"{succeeded} of {total} vehicles active and healthy (success threshold "
                       f"{success_threshold:.0%})")
    return Verdict("wait", total, succeeded, failed, counts,
                   f"{succeeded} of {total} vehicles active and healthy, {len(failed)} failed; waiting")
