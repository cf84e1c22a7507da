"""The registry that turns (signal name, source, unit) into small integer ids for the columnar hot path."""

from __future__ import annotations

import threading


class SignalRegistry:
    """Interns signal keys. Ids are dense (0, 1, 2...) so arrays can be indexed by them. Thread-safe."""

    def __init__(self) -> None:
        self._ids: dict[tuple[str, str, str], int] = {}
        self._keys: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()

    def intern(self, name: str, source: str = "", unit: str = "") -> int:
        key = (name, source, unit)
        sid = self._ids.get(key)
        if sid is not None:
            return sid
        with self._lock:
            sid = self._ids.get(key)
            if sid is None:
                sid = len(self._keys)
                self._keys.append(key)
                self._ids[key] = sid
            return sid

    def key(self, sid: int) -> tuple[str, str, str]:
        return self._keys[sid]

    def name(self, sid: int) -> str:
        return self._keys[sid][0]

    def __len__(self) -> int:
        return len(self._keys)
