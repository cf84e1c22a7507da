"""What the CAN source (agent/sources/can.py) reads from: an open bus that hands over everything it has queued in
one call. Readers: rawcan.py (SocketCAN, recvmmsg), socketcand_reader.py (socketcand over TCP), pycan.py (any
other python-can interface). None of this imports python-can: a vehicle on SocketCAN never loads it."""

from __future__ import annotations

from collections import Counter
from typing import Protocol

from agent.frames import FrameBatch


class BusError(OSError):
    """The bus failed while open (adapter gone, server closed the connection): the source reopens it."""


class FrameReader(Protocol):
    """An open bus. `wait` and `drain` raise OSError (BusError among them) or ValueError when the bus fails."""

    dropped: Counter[str]  # frames or input lost since the source last looked, by reason (the source clears it)
    errors: Counter[str]  # frames kept with a fault, by reason (likewise)

    def wait(self, timeout: float) -> bool:
        """Until a frame may be pending (True) or `timeout` passes (False)."""
        ...

    def drain(self, limit: int) -> FrameBatch:
        """What is pending now, at most `limit` frames, without blocking."""
        ...

    def shutdown(self) -> None: ...
