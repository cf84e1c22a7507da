"""A source's up/down state, told to the cloud: `source_down` when a bus or port fails (or cannot be opened at
start), `source_up` when it is back. Both are events on the normal record path (stored, synced), so a vehicle
whose bus died does not look idle to the cloud, and both are counted (`source.<name>.events{kind}`), with the gauge
`source.<name>.up`. One `source_down` per outage, however many reopen attempts fail in it."""

from __future__ import annotations

import errno as errno_names
import time
from collections.abc import Callable
from typing import Any

from agent.metrics import Metrics
from agent.records import Event

MAX_ERROR_CHARS = 300


def error_detail(e: BaseException) -> dict[str, Any]:
    """What an event says about a failure: the text, and the errno where there is one (OSError, pyserial's
    SerialException; python-can's CanError carries `error_code`), with its symbolic name."""
    code = getattr(e, "errno", None)
    if not isinstance(code, int):
        code = getattr(e, "error_code", None)
    if not isinstance(code, int) and isinstance(e.__cause__, OSError):
        code = e.__cause__.errno
    out: dict[str, Any] = {"error": f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS],
                           "errno": code if isinstance(code, int) else None}
    if isinstance(code, int) and code in errno_names.errorcode:
        out["errno_name"] = errno_names.errorcode[code]
    return out


class SourceHealth:
    def __init__(self, name: str, kind: str, metrics: Metrics, on_event: Callable[[Event], None] | None) -> None:
        self.name = name
        self.kind = kind  # "can" or "serial"
        self.metrics = metrics
        self.on_event = on_event
        self.down_since: float | None = None  # wall clock of the failure that began the current outage
        self._failures = 0
        metrics.gauge(f"source.{name}.up", 0)

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        self.metrics.inc(f"source.{self.name}.events", 1, kind)
        if self.on_event is not None:
            self.on_event(Event(kind, time.time(), {"source": self.name, "source_kind": self.kind, **data}))

    def failed(self, reason: str, e: BaseException) -> None:
        """The source failed (`reason`: open_failed, bus_error, device_lost). The first failure of an outage is a
        `source_down` event; the reopen attempts after it are only counted."""
        self.metrics.gauge(f"source.{self.name}.up", 0)
        self._failures += 1
        if self.down_since is not None:
            return
        self.down_since = time.time()
        self._emit("source_down", {"reason": reason, **error_detail(e)})

    def opened(self) -> None:
        """The source is open and reading: after an outage, a `source_up` event."""
        self.metrics.gauge(f"source.{self.name}.up", 1)
        if self.down_since is not None:
            self._emit("source_up", {"down_s": round(time.time() - self.down_since, 3),
                                     "failed_attempts": self._failures})
        self.down_since = None
        self._failures = 0
