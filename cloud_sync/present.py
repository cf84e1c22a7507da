"""What the reports show people: vehicle-supplied values made safe to print or serve.

Everything in the database came from a vehicle and is hostile until shown otherwise: a string may carry terminal
escapes or bidi overrides, a number may be NaN or a string, a record may be nested deep. The CLI's tables, its
`--json`, and the web page's JSON all pass through here, so each rule is written once:

- `terminal(s)`: every character `str.isprintable()` rejects — C0 controls (ESC, CR, LF, BEL, ...), DEL, C1
  controls (U+0080..U+009F, e.g. the one-byte CSI U+009B), format characters (bidi overrides U+202A..U+202E and
  isolates U+2066..U+2069, zero-width characters), line and paragraph separators, non-ASCII spaces, lone
  surrogates and unassigned code points — is shown as a Python-style escape (`\\n`, `\\x1b`, `\\u202e`, `\\U000e0001`).
  The text stays readable and nothing is dropped; it can no longer move the cursor, clear the screen, retitle the
  window, reorder what follows it or start a new line.
- `plain(v)`: JSON without NaN/Infinity (not JSON; a browser's `JSON.parse` rejects the whole response), nesting
  past MAX_DEPTH cut to null (a deep record would end a request in a RecursionError).
- `dumps(v)`: JSON for a terminal or a file, ASCII only (every non-ASCII character, C1 and bidi controls
  included, as `\\uXXXX`), from `plain(v)`.
- `clean_alert(a)`: an alert record with the fields people see typed, whatever the vehicle put in them.
- `status_dtcs(status)`: the active DTCs a vehicle's status message lists (docs/protocol.md "Status"), only the
  well-typed entries, the rest counted.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from harvester_common.j1939_text import FMI_MAX, SAID_MAX, SPN_MAX
from harvester_common.wire import MAX_STATUS_DTCS, SOURCE_PATTERN

MAX_DEPTH = 32  # nesting kept from a vehicle's record; the reports read two levels
LAMPS = ("mil", "red_stop", "amber_warning", "protect")
OCCURRENCE_MAX = 127  # a DM1's occurrence count is 7 bits (126: 126 or more; 127: not available)
MORE_MAX = 2**31 - 1  # `more` past this is not a count a vehicle can have (256 ECUs per bus): ignored
_SOURCE = re.compile(SOURCE_PATTERN)
_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(c: str) -> str:
    n = ord(c)
    if c in _SHORT:
        return _SHORT[c]
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def terminal(v: Any) -> str:
    """`v` as text that cannot control a terminal (module docstring)."""
    s = v if isinstance(v, str) else str(v)
    if s.isprintable():  # the common case: one C-level scan
        return s
    return "".join(c if c.isprintable() else _escape(c) for c in s)


def finite(v: Any) -> float | None:
    """A real number, or None for anything else (bool, str, NaN, infinity)."""
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def plain(v: Any, depth: int = 0) -> Any:
    """`v` as strict JSON can carry it (module docstring)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict | list | tuple) and depth >= MAX_DEPTH:
        return None
    if isinstance(v, dict):
        return {str(k): plain(x, depth + 1) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [plain(x, depth + 1) for x in v]
    return v


def dumps(v: Any, indent: int | None = 2) -> str:
    return json.dumps(plain(v), indent=indent, ensure_ascii=True, allow_nan=False, default=str)


def clean_alert(a: dict[str, Any]) -> dict[str, Any]:
    """An alert record with the fields people see typed. The record is the vehicle's JSON, stored as sent: one
    malformed field (a string `ts`, `top_features` not a list) must not break a report for the whole fleet."""
    out: dict[str, Any] = plain(a)
    seq = out.get("seq")
    out["seq"] = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
    for k in ("vehicle", "alert_id", "state", "model", "model_version", "label"):
        out[k] = out[k] if isinstance(out.get(k), str) else ""
    for k in ("ts", "score", "window_start", "window_end"):
        out[k] = finite(out.get(k))
    feats = out.get("top_features")
    out["top_features"] = [[f[0], finite(f[1]) if len(f) > 1 else None] for f in feats
                           if isinstance(f, list) and f and isinstance(f[0], str)] if isinstance(feats, list) else []
    if not isinstance(out.get("snapshot"), dict):
        out["snapshot"] = {}
    return out


def _small_int(v: Any, hi: int) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= hi else None


@dataclass(slots=True)
class StatusDtcs:
    """A status message's `dtcs`, checked: each entry in `active` has `source` (str), `spn` (0..2^19-1), `fmi`
    (0..31), `occurrence` (0..127 or None), the four lamps (0..3 or None each) and `text` (the vehicle's words, at
    most SAID_MAX characters, or None)."""

    active: list[dict[str, Any]] = field(default_factory=list)
    more: int = 0  # active DTCs the vehicle says it left out of its list (0 when it said nothing usable)
    ignored: int = 0  # entries left out here: not well typed, a repeat of one kept, or past MAX_STATUS_DTCS


def status_dtcs(status: object) -> StatusDtcs | None:
    """The active DTCs a vehicle's stored status lists, or None when it lists none: no `dtcs` (an agent from before
    it was sent, a Will's "offline"), or one that is not `{"active": [...]}` at all. Hostile input, never raises: an
    entry whose `source`, `spn` or `fmi` is not well typed (a bool, a float, out of range, a source outside the wire's
    pattern) is left out and counted in `ignored`, as are repeats of a (source, SPN, FMI) already kept and entries
    past MAX_STATUS_DTCS (more than a vehicle sends); an ill-typed `occurrence`, lamp or `text` is None, the DTC kept
    (that it is active matters more than its count)."""
    dtcs = status.get("dtcs") if isinstance(status, dict) else None
    active = dtcs.get("active") if isinstance(dtcs, dict) else None
    if not isinstance(dtcs, dict) or not isinstance(active, list):
        return None
    out = StatusDtcs(more=_small_int(dtcs.get("more"), MORE_MAX) or 0, ignored=max(0, len(active) - MAX_STATUS_DTCS))
    seen: set[tuple[str, int, int]] = set()
    for d in active[:MAX_STATUS_DTCS]:
        source = d.get("source") if isinstance(d, dict) else None
        spn = _small_int(d.get("spn"), SPN_MAX) if isinstance(d, dict) else None
        fmi = _small_int(d.get("fmi"), FMI_MAX) if isinstance(d, dict) else None
        if not (isinstance(d, dict) and isinstance(source, str) and _SOURCE.fullmatch(source) and spn is not None
                and fmi is not None and (source, spn, fmi) not in seen):
            out.ignored += 1
            continue
        seen.add((source, spn, fmi))
        text = d.get("text")
        out.active.append({"source": source, "spn": spn, "fmi": fmi,
                           "occurrence": _small_int(d.get("occurrence"), OCCURRENCE_MAX),
                           **{k: _small_int(d.get(k), 3) for k in LAMPS},
                           "text": text[:SAID_MAX] if isinstance(text, str) else None})
    return out
