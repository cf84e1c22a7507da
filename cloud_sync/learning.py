"""What a verdict and a breakdown may hold (docs/learning_loop.md, "Records"): the rules, checked before anything is
written, the same for the CLI and the fleet page. Pure: `FleetDB.add_verdict` / `add_breakdown` call these.

- `label`: `confirmed`, `false_alarm` or `unknown`.
- a fault name: `[a-z0-9_]{1,64}` once lower-cased with spaces and dashes made `_` (`Coolant leak` → `coolant_leak`).
- a note: at most MAX_NOTE_CHARS characters; line breaks and tabs are kept, other control characters refused.
- `by`: 1 to MAX_BY_CHARS printable characters (a login or a person's name).
- every text must be storable on both engines: PostgreSQL's `text` cannot hold NUL, and a lone surrogate (what
  Python makes of a command-line byte that is not UTF-8) cannot be encoded; both are refused with a sentence
  rather than failing inside the database.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from cloud_sync.errors import LearningError

LABELS = ("confirmed", "false_alarm", "unknown")
FAULT_PATTERN = r"[a-z0-9_]{1,64}"
MAX_NOTE_CHARS = 2000
MAX_BY_CHARS = 64
MAX_KEY_CHARS = 256  # alert ids and vehicle ids as a vehicle may have sent them (wire.LABEL_PATTERN's cap)
MAX_FUTURE_S = 86400.0  # a breakdown is in the past; a day of slack for clocks and time zones typed wrong

_FAULT = re.compile(FAULT_PATTERN)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


@dataclass(frozen=True, slots=True)
class Verdict:
    """One row of `verdicts`: a mechanic's word on an alert. The row with the highest id is the verdict now."""

    id: int
    vehicle: str
    alert_id: str
    label: str
    fault: str
    note: str
    by: str
    at: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Breakdown:
    """One row of `breakdowns`: a failure at `at`, whether or not an alert warned of it."""

    id: int
    vehicle: str
    at: float
    fault: str
    note: str
    by: str
    recorded_at: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_label(label: object) -> str:
    if label not in LABELS:
        raise LearningError(f"label must be one of {', '.join(LABELS)}, not {_shown(label)}")
    assert isinstance(label, str)
    return label


def fault_name(text: object) -> str:
    """The stored form of a fault name (module docstring); LearningError when it cannot be one."""
    if not isinstance(text, str):
        raise LearningError(f"a fault name must be text, not {_shown(text)}")
    name = re.sub(r"[\s-]+", "_", text.strip().lower())
    if not _FAULT.fullmatch(name):
        raise LearningError(f"not a fault name: {_shown(text)} (letters, digits and _, at most 64, e.g. coolant_leak)")
    return name


def check_note(note: object) -> str:
    if not isinstance(note, str):
        raise LearningError(f"a note must be text, not {_shown(note)}")
    if len(note) > MAX_NOTE_CHARS:
        raise LearningError(f"the note is {len(note)} characters long: at most {MAX_NOTE_CHARS}")
    _storable("the note", note)
    if _CONTROL.search(note):
        raise LearningError("the note holds a control character (only line breaks and tabs are kept)")
    return note


def check_by(by: object) -> str:
    if not isinstance(by, str):
        raise LearningError(f"who (by) must be text, not {_shown(by)}")
    name = by.strip()
    if not name:
        raise LearningError("say who records it (by: a login or a name)")
    if len(name) > MAX_BY_CHARS:
        raise LearningError(f"who (by) is {len(name)} characters long: at most {MAX_BY_CHARS}")
    _storable("who (by)", name)
    if not name.isprintable():
        raise LearningError(f"who (by) holds a character that is not printable: {_shown(name)}")
    return name


def check_key(what: str, value: object) -> str:
    """An alert or vehicle id to look up: any stored text may be one, so only what no database could hold, or no
    vehicle could have sent, is refused here; whether it exists is the database's question."""
    if not isinstance(value, str) or not value:
        raise LearningError(f"{what} must be a non-empty text, not {_shown(value)}")
    if len(value) > MAX_KEY_CHARS:
        raise LearningError(f"{what} is {len(value)} characters long: no {what} is longer than {MAX_KEY_CHARS}")
    _storable(what, value)
    return value


def check_at(at: object, now: float) -> float:
    """When a breakdown happened: a finite time in [1970, now + MAX_FUTURE_S]."""
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
        raise LearningError(f"a breakdown's time must be a finite number of Unix seconds, not {_shown(at)}")
    if at < 0:
        raise LearningError("a breakdown's time is before 1970")
    if at > now + MAX_FUTURE_S:
        raise LearningError("a breakdown's time is in the future (more than a day ahead of this machine's clock)")
    return float(at)


def _storable(what: str, text: str) -> None:
    if "\x00" in text:
        raise LearningError(f"{what} holds a NUL character, which the database cannot store")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise LearningError(f"{what} is not valid text (a byte that is not UTF-8?)") from None


def _shown(v: object) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."
