"""The DTCs of one bus as events: DM1 (active DTCs, broadcast about once a second) becomes `dtc_open`, `dtc_update`
and `dtc_close` as codes come, change and go; DM2 (previously active DTCs, sent when someone requests it) becomes one
`dtc_previous`. Pure: parsed messages in, events out (docs/j1939.md has the event shapes).

The active set is kept per ECU, keyed by the ECU's identity: its NAME (16 hex digits) once it has claimed its address
(agent/decode/j1939_addr.py), else its source address (2 hex digits). So an ECU that moves to a new address keeps its
active set: nothing closes and reopens. When an address's first claim arrives, what was tracked under the bare
address moves to that NAME (`migrate`).

Each active DTC remembers the `source` it was opened under; its updates and its close carry the same one, so a
reader pairs them on (source, spn, fmi) even if the ECU's source changed in between (its NAME became known).

Events only on change, so their number is bounded by what the ECUs change: an ECU repeating its DM1 every second
makes no event. At most MAX_ECUS ECUs are tracked per bus; past that the one heard from least recently is forgotten
without a close (counted, `dtc_ecus_forgotten`): that takes more ECU identities than a bus has addresses, i.e. a
bus claiming ever new NAMEs.

`snapshot(limit)` is the active set as the status message names it (docs/protocol.md "Status"): immutable, so the
pipeline thread can hand it to the uplink's.
"""

from __future__ import annotations

import heapq
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent.decode.j1939_tp import Lamps
from agent.records import Event
from harvester_common.j1939_text import DtcText
from harvester_common.wire import SOURCE_PATTERN

MAX_ECUS = 256
_KEY = re.compile(r"[0-9A-F]{2}|[0-9A-F]{16}")
_SOURCE = re.compile(SOURCE_PATTERN)
LegacyState = dict[int, set[tuple[int, int]]]  # the state saved before NAMEs: SA -> active (SPN, FMI) pairs


@dataclass(slots=True)
class _Active:
    occurrence: int | None  # None: not known (restored from a state saved before counts were kept)
    source: str


@dataclass(slots=True)
class _Ecu:
    lamps: Lamps | None
    dtcs: dict[tuple[int, int], _Active]

    def saved(self) -> dict[str, Any]:
        return {"lamps": None if self.lamps is None else list(self.lamps),
                "dtcs": [[k[0], k[1], a.occurrence, a.source] for k, a in sorted(self.dtcs.items())]}


@dataclass(frozen=True, slots=True)
class ActiveDtc:
    """One active DTC as the status message names it (immutable: built on the pipeline thread, read on the
    uplink's)."""
    source: str  # what it was opened under (its updates and close carry the same)
    spn: int
    fmi: int
    occurrence: int | None  # None: not known (restored from a state saved before counts were kept)
    lamps: Lamps | None  # its ECU's lamps at its latest DM1; None: not heard since a restart from such a state
    text: str  # the vehicle's words for it (DtcText.text: this bus's DBC names)

    def to_dict(self) -> dict[str, Any]:
        # Not lamp_fields: this runs on the uplink's thread, and that cache is the pipeline thread's.
        lamps = dict(zip(_LAMP_KEYS, self.lamps or (None,) * 4, strict=True))
        return {"source": self.source, "spn": self.spn, "fmi": self.fmi, "occurrence": self.occurrence, **lamps,
                "text": self.text}


def status_order(source: str, spn: int, fmi: int, lamps: Lamps | None) -> tuple[int, str, int, int]:
    """The order the status lists active DTCs in: those whose ECU lights its red stop lamp first, then those whose
    ECU lights any other lamp, then the rest; within each, by source, SPN, FMI. So a bus with more active DTCs than
    the status carries still shows the ones a driver is told to stop for."""
    rank = 2 if lamps is None else 0 if lamps[1] == 1 else 1 if 1 in lamps else 2
    return rank, source, spn, fmi


_LAMP_KEYS = ("mil", "red_stop", "amber_warning", "protect")
# Every lamp state there is (four 2-bit fields): the dict each DTC event carries is built once, not per event (a
# DTC storm decodes ~100,000 events a minute; the dicts are only ever read, splatted into an event's data).
_LAMP_FIELDS: dict[Lamps, dict[str, int]] = {}


def lamp_fields(lamps: Lamps) -> dict[str, int]:
    """The lamps as an event's keys; the returned dict is shared: read it, never change it."""
    out = _LAMP_FIELDS.get(lamps)
    if out is None:
        out = dict(zip(_LAMP_KEYS, lamps, strict=True))
        if len(_LAMP_FIELDS) < 256:  # 4^4 states of 2-bit fields; anything else (never from dm1_fields) is not kept
            _LAMP_FIELDS[lamps] = out
    return out


class DtcTracker:
    def __init__(self, text: DtcText, errors: Counter[str]) -> None:
        self.text = text
        self.errors = errors
        self._ecus: dict[str, _Ecu] = {}
        self._dm2_last: dict[str, tuple[Lamps, tuple[tuple[int, int, int], ...]]] = {}
        self.dm2_unchanged = 0

    def _data(self, source: str, sa: int, k: tuple[int, int], occurrence: int | None,
              lamps: Lamps) -> dict[str, Any]:
        """A DTC event's data (docs/j1939.md) for the DTC `k` (SPN, FMI); the caller adds `changed` to an update. The
        lamps' keys written out as `lamp_fields` names them, in its order: one dict built, not two merged."""
        spn, fmi = k
        name, failure, text = self.text.parts(spn, fmi)
        mil, red_stop, amber_warning, protect = lamps
        return {"source": source, "sa": sa, "spn": spn, "fmi": fmi, "occurrence": occurrence, "mil": mil,
                "red_stop": red_stop, "amber_warning": amber_warning, "protect": protect, "spn_name": name,
                "fmi_text": failure, "text": text}

    def dm1(self, ts: float, key: str, source: str, sa: int, lamps: Lamps,
            dtcs: Sequence[tuple[int, int, int]]) -> tuple[list[Event], bool]:
        """One DM1 (`dm1_fields`: its lamps, and (SPN, FMI, occurrence) of each DTC) from the ECU `key` (now at `sa`,
        its signals' source `source`): the events, and whether the saved state moved."""
        ecu = self._ecus.pop(key, None)  # re-inserted below: the dict's order is "least recently heard first"
        before = ecu.dtcs if ecu is not None else {}
        lamps_changed = ecu is not None and ecu.lamps is not None and ecu.lamps != lamps
        now = {(spn, fmi): occurrence for spn, fmi, occurrence in dtcs}
        events: list[Event] = []
        after: dict[tuple[int, int], _Active] = {}
        for k in sorted(now) if len(now) > 1 else now:
            occurrence = now[k]
            a = before.get(k)
            if a is None:
                after[k] = _Active(occurrence, source)
                events.append(Event("dtc_open", ts, self._data(source, sa, k, occurrence, lamps)))
                continue
            if a.occurrence is not None and a.occurrence != occurrence:
                changed = ["occurrence", "lamps"] if lamps_changed else ["occurrence"]
            else:
                changed = ["lamps"] if lamps_changed else []
            if changed:
                data = self._data(a.source, sa, k, occurrence, lamps)
                data["changed"] = changed
                events.append(Event("dtc_update", ts, data))
            after[k] = _Active(occurrence, a.source)
        if before:
            gone = before.keys() - now.keys()
            for k in sorted(gone) if len(gone) > 1 else gone:
                a = before[k]
                events.append(Event("dtc_close", ts, self._data(a.source, sa, k, a.occurrence, lamps)))
        if after:
            self._ecus[key] = _Ecu(lamps, after)
            if len(self._ecus) > MAX_ECUS:
                self._bound()
        # The saved state (`_Ecu.saved`) moved iff the lamps, a DTC, its count or its source did: compared directly,
        # not by building both states, which a storm of DM1s would pay for on every frame.
        if ecu is None or not after:
            moved = (ecu is None) != (not after)
        else:
            moved = ecu.lamps != lamps or before.keys() != after.keys() or any(
                (a.occurrence, a.source) != (before[k].occurrence, before[k].source) for k, a in after.items())
        return events, moved

    def dm2(self, ts: float, key: str, source: str, sa: int, lamps: Lamps,
            dtcs: Sequence[tuple[int, int, int]]) -> list[Event]:
        """One DM2 (previously active DTCs; `dm1_fields`): a `dtc_previous` event with the list, unless it is what
        this ECU answered last time (someone requesting it every second makes one event, not one a second)."""
        content = (lamps, tuple(dtcs))
        if self._dm2_last.pop(key, None) == content:
            self._dm2_last[key] = content
            self.dm2_unchanged += 1
            return []
        self._dm2_last[key] = content
        while len(self._dm2_last) > MAX_ECUS:
            del self._dm2_last[next(iter(self._dm2_last))]
        listed = [{"spn": spn, "fmi": fmi, "occurrence": occurrence, **self.text.fields(spn, fmi)}
                  for spn, fmi, occurrence in dtcs]
        return [Event("dtc_previous", ts, {"source": source, "sa": sa, **lamp_fields(lamps), "dtcs": listed})]

    def _bound(self) -> None:
        while len(self._ecus) > MAX_ECUS:
            del self._ecus[next(iter(self._ecus))]
            self.errors["dtc_ecus_forgotten"] += 1

    def migrate(self, old: str, new: str) -> bool:
        """What was tracked under `old` (a bare address) belongs to `new` (the NAME that just claimed it). An entry
        already under `new` wins for the DTCs both have. True if anything moved."""
        moved = False
        ecu = self._ecus.pop(old, None)
        if ecu is not None:
            into = self._ecus.pop(new, None)
            if into is not None:
                ecu.dtcs.update(into.dtcs)
                ecu.lamps = into.lamps if into.lamps is not None else ecu.lamps
            self._ecus[new] = ecu
            moved = True
        last = self._dm2_last.pop(old, None)
        if last is not None and new not in self._dm2_last:
            self._dm2_last[new] = last
        return moved

    def active(self) -> dict[str, list[tuple[int, int]]]:
        """Active DTCs by the source they were announced under."""
        out: dict[str, list[tuple[int, int]]] = {}
        for ecu in self._ecus.values():
            for k, a in ecu.dtcs.items():
                out.setdefault(a.source, []).append(k)
        return {s: sorted(v) for s, v in sorted(out.items())}

    def snapshot(self, limit: int) -> tuple[tuple[ActiveDtc, ...], int]:
        """The first `limit` active DTCs in `status_order`, and how many there are in all. Words are made for those
        kept only: a bus can hold many thousands."""
        keys = ((status_order(a.source, k[0], k[1], ecu.lamps), a.occurrence, ecu.lamps)
                for ecu in self._ecus.values() for k, a in ecu.dtcs.items())
        first = heapq.nsmallest(limit, keys, key=lambda t: t[0])
        total = sum(len(ecu.dtcs) for ecu in self._ecus.values())
        return tuple(ActiveDtc(src, spn, fmi, occ, lamps, self.text.text(spn, fmi))
                     for (_, src, spn, fmi), occ, lamps in first), total

    def state(self) -> dict[str, Any]:
        return {k: e.saved() for k, e in self._ecus.items()}

    def restore(self, saved: object) -> bool:
        """Take back a `state()`; False, and nothing changed, if it is damaged."""
        ecus = parse_state(saved)
        if ecus is None:
            return False
        self._ecus = ecus
        return True

    def restore_legacy(self, active: LegacyState, bus: str) -> None:
        """The state saved before NAMEs and counts were kept: per source address, the active (SPN, FMI) pairs."""
        self._ecus = {f"{sa:02X}": _Ecu(None, {k: _Active(None, f"{bus}/{sa:02X}") for k in keys})
                      for sa, keys in active.items() if keys}


def _int(v: object, hi: int) -> bool:
    return type(v) is int and 0 <= v <= hi


def parse_state(saved: object) -> dict[str, _Ecu] | None:
    if not isinstance(saved, dict) or len(saved) > MAX_ECUS:
        return None
    out: dict[str, _Ecu] = {}
    for key, e in saved.items():
        if not (isinstance(key, str) and _KEY.fullmatch(key) and isinstance(e, dict)):
            return None
        lamps, dtcs = e.get("lamps"), e.get("dtcs")
        if lamps is not None and not (isinstance(lamps, list) and len(lamps) == 4 and all(_int(x, 3) for x in lamps)):
            return None
        if not isinstance(dtcs, list):
            return None
        active: dict[tuple[int, int], _Active] = {}
        for d in dtcs:
            if not (isinstance(d, list) and len(d) == 4 and _int(d[0], (1 << 19) - 1) and _int(d[1], 31)
                    and (d[2] is None or _int(d[2], 127)) and isinstance(d[3], str) and _SOURCE.fullmatch(d[3])):
                return None
            active[(d[0], d[1])] = _Active(d[2], d[3])
        out[key] = _Ecu(None if lamps is None else (lamps[0], lamps[1], lamps[2], lamps[3]), active)
    return out


def parse_legacy_state(saved: object) -> LegacyState | None:
    """The state saved before NAMEs and counts were kept: {"00": [[spn, fmi], ...], ...}; None if damaged."""
    if not isinstance(saved, dict):
        return None
    out: LegacyState = {}
    for sa_hex, dtcs in saved.items():
        if not (isinstance(sa_hex, str) and _KEY.fullmatch(sa_hex) and len(sa_hex) == 2 and isinstance(dtcs, list)):
            return None
        keys: set[tuple[int, int]] = set()
        for d in dtcs:
            if not (isinstance(d, list) and len(d) == 2 and _int(d[0], (1 << 19) - 1) and _int(d[1], 31)):
                return None
            keys.add((d[0], d[1]))
        out[int(sa_hex, 16)] = keys
    return out
