"""Any python-can bus as a FrameReader (agent/sources/canread.py): the message `wait` got, then `recv(0)` until
none is pending, made one FrameBatch. For the interfaces the agent has no reader of its own for (slcan, pcan,
virtual...); python-can's errors become BusError, so the source needs no python-can to tell a failed bus."""

from __future__ import annotations

from collections import Counter

import can

from agent.frames import FrameBatch
from agent.sources.canread import BusError


def _bus_error(e: can.CanError) -> BusError:
    """Keeps python-can's `error_code` (an errno where the interface has one) as the error's errno."""
    code = getattr(e, "error_code", None)
    return BusError(code, str(e)) if isinstance(code, int) else BusError(str(e))


class MessageReader:
    def __init__(self, bus: can.BusABC, name: str) -> None:
        self.bus = bus
        self.name = name
        self.dropped: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self._first: can.Message | None = None
        self._failed: BusError | None = None  # a failure after frames that were still handed over

    def _raise_failure(self) -> None:
        if self._failed is not None:
            e, self._failed = self._failed, None
            raise e

    def wait(self, timeout: float) -> bool:
        self._raise_failure()
        if self._first is None:
            try:
                self._first = self.bus.recv(timeout)
            except can.CanError as e:
                raise _bus_error(e) from e
        return self._first is not None

    def drain(self, limit: int) -> FrameBatch:
        self._raise_failure()
        msgs: list[can.Message] = []
        if self._first is not None:
            msgs.append(self._first)
            self._first = None
        recv = self.bus.recv
        try:
            while len(msgs) < limit and (m := recv(0)) is not None:
                msgs.append(m)
        except can.CanError as e:
            failure = _bus_error(e)
            failure.__cause__ = e
            if not msgs:
                raise failure from e
            self._failed = failure  # what came before is handed over; the next call reports the failure
        return FrameBatch.from_messages(msgs, self.name)

    def shutdown(self) -> None:
        self.bus.shutdown()
