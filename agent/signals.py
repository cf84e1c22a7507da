"""The registry that turns (signal name, source, unit) into small integer ids for the columnar hot path, and keeps
each signal's resolution (the DBC's scale and offset) for the wire's integer coding (harvester_common/wire.py)."""

from __future__ import annotations

import threading


class SignalRegistry:
    """Interns signal keys. Ids are dense (0, 1, 2...) so arrays can be indexed by them. Thread-safe."""

    def __init__(self) -> None:
        self._ids: dict[tuple[str, str, str], int] = {}
        self._keys: list[tuple[str, str, str]] = []
        self._resolutions: list[tuple[float, float] | None] = []
        self._lock = threading.Lock()

    def intern(self, name: str, source: str = "", unit: str = "",
               resolution: tuple[float, float] | None = None) -> int:
        """The id of (name, source, unit). `resolution` is (scale, offset) when the decoder computes the values as
        `raw * scale + offset` from integers (J1939's fast path); None when it does not know (NMEA, serial). It is
        only a hint to the wire's encoder, which checks every value against it: the first one given stays."""
        key = (name, source, unit)
        sid = self._ids.get(key)
        if sid is not None and (resolution is None or self._resolutions[sid] is not None):
            return sid
        with self._lock:
            sid = self._ids.get(key)
            if sid is None:
                sid = len(self._keys)
                self._keys.append(key)
                self._resolutions.append(resolution)
                self._ids[key] = sid
            elif self._resolutions[sid] is None:
                self._resolutions[sid] = resolution
            return sid

    def key(self, sid: int) -> tuple[str, str, str]:
        return self._keys[sid]

    def resolution(self, sid: int) -> tuple[float, float] | None:
        """(scale, offset) given for the signal, or None."""
        return self._resolutions[sid]

    def name(self, sid: int) -> str:
        return self._keys[sid][0]

    def __len__(self) -> int:
        return len(self._keys)
