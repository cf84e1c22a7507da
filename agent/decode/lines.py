"""Simple serial sensors: CSV lines (fields by position) or key=value lines, fields and units from the config.

Signals are named `{device}.{field}` (e.g. `vib.AccelRms`) with the device as source. Bad lines are counted by
reason and yield nothing: `not_ascii`, `field_count` (CSV with the wrong number of fields), `bad_number`,
`unknown_field` (key=value with a key the config does not list, when it lists any), `not_finite`.
"""

from __future__ import annotations

import math
from collections import Counter

from agent.decode.base import Decoded, Lines, NoState, decode_lines
from agent.signals import SignalRegistry


class LineDecoder(NoState):
    input_kind = "lines"

    def __init__(self, device: str, protocol: str, fields: list[str], units: dict[str, str],
                 registry: SignalRegistry | None = None) -> None:
        if protocol not in ("csv", "kv"):
            raise ValueError(f"unknown line protocol {protocol!r}")
        self.device = device
        self.protocol = protocol
        self.fields = fields
        self.units = units
        self.registry = registry if registry is not None else SignalRegistry()  # its own when it decodes alone
        self._unit_of = {self.signal(f): u for f, u in units.items()}
        self.errors: Counter[str] = Counter()
        self.sentences = 0

    def decode(self, lines: Lines) -> Decoded:
        return Decoded(decode_lines(lines, self.decode_line, self._sid))

    def _sid(self, name: str) -> int:
        return self.registry.intern(name, self.device, self._unit_of.get(name, ""))

    def signals(self) -> set[str]:
        return {self.signal(f) for f in self.fields if f}

    def counters(self) -> dict[str, int]:
        return {"sentences": self.sentences}

    def signal(self, field: str) -> str:
        return f"{self.device}.{field}"

    def unit(self, field: str) -> str:
        return self.units.get(field, "")

    def decode_line(self, line: bytes) -> list[tuple[str, float]]:
        try:
            text = line.decode("ascii").strip()
        except UnicodeDecodeError:
            self.errors["not_ascii"] += 1
            return []
        if not text or text.startswith("#"):
            return []
        out: list[tuple[str, float]] = []
        if self.protocol == "csv":
            parts = [p.strip() for p in text.split(",")]
            if len(parts) != len(self.fields):
                self.errors["field_count"] += 1
                return []
            pairs = [(f, p) for f, p in zip(self.fields, parts, strict=True) if f]
        else:
            pairs = []
            for tok in text.replace(",", " ").split():
                key, sep, val = tok.partition("=")
                if not sep or not key:
                    self.errors["bad_number"] += 1
                    return []
                if self.fields and key not in self.fields:
                    self.errors["unknown_field"] += 1
                    continue
                pairs.append((key, val))
        for field, raw in pairs:
            try:
                v = float(raw)
            except ValueError:
                self.errors["bad_number"] += 1
                return []
            if not math.isfinite(v):
                self.errors["not_finite"] += 1
                return []
            out.append((self.signal(field), v))
        self.sentences += 1
        return out
