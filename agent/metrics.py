"""One registry for the agent's own counters and gauges: what every component counted, in one snapshot that goes
to the vehicle's status message, to `harvester-agent status` (through the store) and so to the fleet page.

Modelled on Telegraf's internal plugin (per-output `metrics_added`, `metrics_dropped`, `buffer_size`) and Vector's
internal events (a discarded event is one call that both counts, by reason, and logs, rate-limited):

- `inc(name, n, label)` and `gauge(name, value)`: a counter is a number or, with labels (a reason, a feature),
  a number per label. Names are dotted, component first: `source.can0.errors`, `uplink.ack_timeouts`.
- `drop(component, reason, n, detail)` / `error(...)`: count `<component>.dropped` / `<component>.errors` under
  `reason` AND log a warning, at most one line per `log_every_s` per (component, reason), saying how many happened
  since the last line. A flood of one failure costs one journal line a minute, and is still counted exactly.
- `collect(name, fn)`: a component that keeps its own counters on a hot path (a decoder's `errors` Counter, the
  pipeline's stats, the uplink's stats) registers a function read at snapshot time instead of paying a lock per
  frame. Its values appear under `name.<key>`: an int is a counter, a dict of ints a labelled counter, a float (or
  a bool) a gauge.
- `snapshot()`: everything, `{"counters": {...}, "gauges": {...}}`; `bounded(snapshot)` the same cut to a size
  that fits beside the rest of a status message (top labels per counter, the rest summed under `other`).

Thread-safe: sources, the pipeline and the uplink run in their own threads and all count here.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from agent.config import LogConfig

log = logging.getLogger("agent.metrics")

LOG_EVERY_S = LogConfig().warn_every_s  # the `[log] warn_every_s` default, for a registry made without a config
MAX_LABELS = 16  # labels kept per counter in a bounded snapshot; the rest summed under OTHER
MAX_NAME_CHARS = 96  # a counter name or label longer than this is cut (labels may carry text from outside)
MAX_SNAPSHOT_BYTES = 16 * 1024  # a bounded snapshot as JSON: a quarter of the status message's limit
OTHER = "other"

Value = int | dict[str, int]
Collector = Callable[[], Mapping[str, Any]]


def _cut(s: str) -> str:
    return s if len(s) <= MAX_NAME_CHARS else s[: MAX_NAME_CHARS - 1] + "…"


def counts(c: Mapping[str, Any]) -> dict[str, int]:
    """A copy of a counter that another thread may be adding a key to (a Counter read for a status)."""
    for _ in range(5):
        try:
            return {str(k): int(v) for k, v in list(c.items())}
        except RuntimeError:  # dictionary changed size during iteration: read again
            continue
    return {}


class Metrics:
    def __init__(self, log_every_s: float = LOG_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.log_every_s = log_every_s
        self.clock = clock
        self._lock = threading.Lock()
        self._counters: dict[str, int] = {}
        self._labelled: dict[str, dict[str, int]] = {}
        self._gauges: dict[str, float] = {}
        self._collectors: dict[str, Collector] = {}
        self._logged_at: dict[tuple[str, str], float] = {}
        self._unlogged: dict[tuple[str, str], int] = {}

    # --- counting --------------------------------------------------------------------------------------------

    def inc(self, name: str, n: int = 1, label: str | None = None) -> None:
        with self._lock:
            if label is None:
                self._counters[name] = self._counters.get(name, 0) + n
            else:
                by = self._labelled.setdefault(name, {})
                label = _cut(label)
                by[label] = by.get(label, 0) + n

    def gauge(self, name: str, value: float) -> None:
        with self._lock:
            self._gauges[name] = value

    def get(self, name: str, label: str | None = None) -> int:
        with self._lock:
            if label is None:
                return self._counters.get(name, 0)
            return self._labelled.get(name, {}).get(label, 0)

    def labels(self, name: str) -> dict[str, int]:
        """A labelled counter's values (a copy)."""
        with self._lock:
            return dict(self._labelled.get(name, {}))

    def collect(self, name: str, fn: Collector) -> None:
        """Read `fn()` at every snapshot: its ints are counters, its dicts labelled counters, under `name.key`.
        Registering a name again replaces the earlier function."""
        with self._lock:
            self._collectors[name] = fn

    # --- counting and telling --------------------------------------------------------------------------------

    def drop(self, component: str, reason: str, n: int = 1, detail: str = "") -> None:
        """Something was dropped: counted under `<component>.dropped{reason}` and logged (rate-limited)."""
        self.inc(f"{component}.dropped", n, reason)
        self._tell(component, reason, n, f"{component}: dropped {n} ({reason})" + (f": {detail}" if detail else ""))

    def error(self, component: str, reason: str, n: int = 1, detail: str = "") -> None:
        """Something failed: counted under `<component>.errors{reason}` and logged (rate-limited)."""
        self.inc(f"{component}.errors", n, reason)
        self._tell(component, reason, n, f"{component}: {reason}" + (f": {detail}" if detail else ""))

    def warn(self, component: str, reason: str, text: str) -> None:
        """Log only, rate-limited like `drop` and `error` (for what is counted elsewhere)."""
        self._tell(component, reason, 1, text)

    def _tell(self, component: str, reason: str, n: int, text: str) -> None:
        key = (component, reason)
        now = self.clock()
        with self._lock:
            self._unlogged[key] = self._unlogged.get(key, 0) + n
            last = self._logged_at.get(key)
            if last is not None and now - last < self.log_every_s:
                return
            since = self._unlogged.pop(key)
            self._logged_at[key] = now
        more = since - n
        log.warning("%s%s", text, f" ({more} more since the last report)" if more > 0 else "")

    # --- reading ---------------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Every counter and gauge: `{"counters": {name: int | {label: int}}, "gauges": {name: number}}`."""
        with self._lock:
            counters: dict[str, Value] = dict(self._counters)
            counters.update({k: dict(v) for k, v in self._labelled.items()})
            gauges: dict[str, float] = dict(self._gauges)
            collectors = list(self._collectors.items())
        for prefix, fn in collectors:
            try:
                values = fn()
            except Exception:  # a broken collector must not take the status message down with it
                log.exception("metrics collector %s failed", prefix)
                continue
            for k, v in values.items():
                name = f"{prefix}.{k}"
                if isinstance(v, Mapping):
                    counters[name] = _merged(counters.get(name), counts(v))
                elif isinstance(v, bool):
                    gauges[name] = int(v)
                elif isinstance(v, int):
                    counters[name] = _merged(counters.get(name), v)
                elif isinstance(v, float):
                    gauges[name] = v
        return {"counters": dict(sorted(counters.items())), "gauges": dict(sorted(gauges.items()))}


def _merged(had: Value | None, new: Value) -> Value:
    """A collector's value added to a counter of the same name counted directly (`error("writer", ...)` beside the
    writer's own `errors`): both kept, never one hiding the other."""
    if had is None:
        return new
    a = had if isinstance(had, dict) else {"": had} if had else {}
    b = new if isinstance(new, dict) else {"": new} if new else {}
    if not a or not b:
        return new if not a else had
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def _top(values: dict[str, int], n: int) -> dict[str, int]:
    """The `n` largest labels, the rest summed under OTHER (zeros left out)."""
    items = sorted(((k, v) for k, v in values.items() if v), key=lambda kv: (-kv[1], kv[0]))
    if len(items) <= n:
        return dict(items)
    kept = dict(items[: max(0, n - 1)])
    kept[OTHER] = kept.get(OTHER, 0) + sum(v for _, v in items[max(0, n - 1):])
    return kept


def bounded(snapshot: Mapping[str, Any], max_labels: int = MAX_LABELS,
            max_bytes: int = MAX_SNAPSHOT_BYTES) -> dict[str, Any]:
    """`snapshot` cut to at most `max_bytes` of JSON: names and labels cut to MAX_NAME_CHARS, at most `max_labels`
    labels per counter (the largest; the rest summed under `other`), and if that is still too big fewer labels,
    then the counters with the smallest totals left out (their number in `"omitted"`)."""
    counters: dict[str, Value] = {}
    for k, v in dict(snapshot.get("counters", {})).items():
        counters[_cut(str(k))] = {_cut(str(a)): int(b) for a, b in v.items()} if isinstance(v, Mapping) else int(v)
    gauges = {_cut(str(k)): v for k, v in dict(snapshot.get("gauges", {})).items()}
    n = max_labels
    while True:
        cut: dict[str, Value] = {k: _top(v, n) if isinstance(v, dict) else v for k, v in counters.items()}
        out: dict[str, Any] = {"counters": cut, "gauges": gauges}
        size = len(json.dumps(out, separators=(",", ":")))
        if size <= max_bytes or n <= 1:
            break
        n //= 2
    if size > max_bytes:
        # Still too big with one label each: keep the counters with the largest totals.
        def total(v: Value) -> int:
            return sum(v.values()) if isinstance(v, dict) else v

        names = sorted(cut, key=lambda k: (-total(cut[k]), k))
        budget = max_bytes - len(json.dumps({"counters": {}, "gauges": gauges, "omitted": 10**9},
                                            separators=(",", ":")))
        kept: dict[str, Value] = {}
        used = 0
        for k in names:
            cost = len(json.dumps({k: cut[k]}, separators=(",", ":")))
            if used + cost > budget:
                break
            kept[k] = cut[k]
            used += cost
        out = {"counters": dict(sorted(kept.items())), "gauges": gauges if budget > 0 else {},
               "omitted": len(cut) - len(kept)}
    return out

