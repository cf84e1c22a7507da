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
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 32  # nesting kept from a vehicle's record; the reports read two levels
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
