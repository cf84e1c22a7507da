"""DTC storms tamed before they reach the store: a flapping DTC debounced into one event per period, a DTC's
updates coalesced into one per period, and each source's DTC events bounded per minute, the excess merged into one
summary. Pure: events in, events out, the clock passed in (the data's own timestamps, so a replay and the vehicle
behave alike). One `DtcDebouncer` per decoder (one bus), so that each has the one clock its data carries.

The rules, applied to a decoder's events in the order they arrive:

- A DTC is (`source`, `spn`, `fmi`), read from the event's `data`; `dtc_open` and `dtc_close` are its
  transitions. Its first transition goes out at once and starts a quiet period of `debounce_s`; so does the next
  one (a DTC that opens and clears is no storm). From the third within the period it flaps: those are held. When
  the period ends (the data clock passes it), one held transition goes out as itself, late; two or more go out as
  one `dtc_flapping` event: the last transition's `data`, plus `state` (where it ended: `open` or `closed`),
  `transitions` (how many it stands for), `opens`, `closes`, `first_ts`, `last_ts`; and a new period starts at
  once, in which every transition is held, so a DTC that keeps flapping gives one event per period. A period that
  ends holding nothing forgets the DTC.
- A DTC's `dtc_update`s (its occurrence count or its ECU's lamps changed) have a quiet period of their own: the
  first goes out at once and starts it; further ones within it are held, coalesced into one: the last one's `data`
  (its occurrence count and lamps, which are the DTC's state then). When the period ends, one held update goes out
  as itself; two or more as one `dtc_update` with the last one's `data`, `changed` the union of theirs, and
  `updates` (how many it stands for), `first_ts`, `last_ts`; and a new period starts, holding every update, so a
  DTC whose lamp follows another's flapping gives one update per period. An ECU whose lamps follow a flapping DTC
  thus makes one update per period for each of its steady DTCs, not one per flap.
- A DTC's order is kept: an update that arrives while its DTC holds transitions is held behind them, and goes out
  right after them (or at its own period's end, if later). A transition supersedes the DTC's held updates (it
  carries the DTC's state then: its count and lamps): they go out inside it, and it says how many (`updates`,
  present only when there were some; a `dtc_flapping` too). A transition that goes out at once also ends the
  DTC's update period (a DTC that opens again starts afresh).
- At most `HELD_MAX` DTCs hold transitions at a time, and at most `HELD_MAX` hold updates; a transition or update
  that would make one more is merged into its source's storm summary (below) at once, so that what is held, and
  saved with every batch, stays small.
- Other `dtc_*` kinds (what a decoder may add) go out unchanged, under the bound below; any other kind passes
  untouched, unbounded.
- At most `max_events_per_min` DTC events (summaries included) go out per `source` in a window of 60 s of data time,
  opened by that source's first event. Past it, the source's DTC events, and the transitions and updates its DTCs
  hold, are merged into one `dtc_storm` event emitted when the window ends: `events` (how many were merged),
  `transitions` (the decoded DTC events they stand for, updates included), `kinds` (count by kind), `first_ts`,
  `last_ts`, `open` (`[spn, fmi]` of up to `STORM_OPEN_LISTED` DTCs the merged events left open, in the order they
  opened) and `open_not_listed` (opens merged past that list). A storm summary is not itself bounded: one per source
  and window at most.
- A DTC's first open (one whose DTC has no quiet period running: it had not changed for a period; without
  debouncing, every open) is what a mechanic needs, so no other kind of event can crowd it out: `reserve(limit)`
  (half) of a window's bound is kept for first opens. Other events go out while the window has let out fewer than
  `limit - reserve` of them and fewer than `limit` in all (and nothing was merged yet); a first open goes out while
  the window has let out fewer than `limit` events of any kind, even while the source's other events are being
  merged. So, however noisy the rest, at least `reserve` first opens a minute go out as themselves; only a source
  announcing more new DTCs than the bound leaves room for (a truly random storm) has them merged, named in the
  summary's `open`; a first open merged starts no quiet period (the DTC's next open is a first open again). The
  bound on what a source writes stays `max_events_per_min`.
- Nothing is lost silently: every decoded DTC event goes out as itself (`passed`), inside an event that went out
  (`merged`: a summary's `transitions`, a coalesced update's `updates`, a transition's superseded `updates`), or is
  still held (`held`): decoded = passed + merged + held.
- `drain` lets out everything held (a stop, the end of a replay). `state`/`restore` carry what is held over a
  restart (held transitions and updates, each source's window), saved in the same transaction as the events it goes
  with. A restart forgets the periods that hold nothing: the next transition or update of such a DTC goes out at
  once. A state saved as version 1 (before updates were debounced) is read too: it holds no updates, and its windows
  no count of first opens (what they let out counts as other events).
- The clock is the latest data time seen (a time that is not a finite number is ignored). If the data's time
  steps back by more than a period (a log from before, a clock set back), every period and window ends at once,
  what they hold goes out, and the clock starts again from there.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from agent.records import Event

OPEN, CLOSE, UPDATE = "dtc_open", "dtc_close", "dtc_update"
FLAPPING, STORM = "dtc_flapping", "dtc_storm"
WINDOW_S = 60.0  # the bound is per minute of data time
HELD_MAX = 256  # DTCs holding transitions at a time, per bus (and as many holding updates)
STORM_OPEN_LISTED = 16  # DTCs a storm summary names as left open; the rest are counted
STATE_VERSION = 2  # 2: updates held, superseded updates, first opens per window; 1 is still read

Key = tuple[str, int, int]  # (source, spn, fmi)
_TRANSITION, _UPDATES = 0, 1  # which of a DTC's quiet periods a timer is for


@dataclass(frozen=True, slots=True)
class DtcPolicy:
    """`debounce_s` 0: no debouncing (every transition goes out as itself); `max_events_per_min` 0: no bound."""

    debounce_s: float = 60.0
    max_events_per_min: int = 30


@dataclass(slots=True)
class _Quiet:
    """A DTC in its quiet period: transitions let out at once in it, and those held."""

    until: float
    at_once: int = 1  # 2: the next transition is held (a continued period holds everything)
    n: int = 0
    opens: int = 0
    closes: int = 0
    first: float = math.nan
    last: Event | None = None
    updates: int = 0  # updates the held transitions superseded


@dataclass(slots=True)
class _Updates:
    """A DTC's updates in their quiet period: those held, coalesced into the last."""

    until: float | None  # None: the period ended while its DTC held transitions; out right after them
    n: int = 0
    first: float = math.nan
    last: Event | None = None
    changed: list[str] = field(default_factory=list)  # the union of the held ones' `changed`, in order seen


@dataclass(slots=True)
class _Window:
    """A source's minute: events let out, and those merged into its storm summary."""

    start: float
    sent: int = 0  # events let out, first opens included
    merged: int = 0  # events merged (a flapping summary is one)
    weight: int = 0  # decoded DTC events they stand for
    kinds: Counter[str] = field(default_factory=Counter)
    first: float = math.nan
    last: float = math.nan
    open: dict[tuple[int, int], None] = field(default_factory=dict)  # (spn, fmi) left open, in order
    open_not_listed: int = 0
    opened: int = 0  # first opens let out


def _key(e: Event) -> Key | None:
    d = e.data
    source, spn, fmi = d.get("source"), d.get("spn"), d.get("fmi")
    if isinstance(source, str) and type(spn) is int and type(fmi) is int:
        return source, spn, fmi
    return None


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(x)
    except TypeError:  # a time that is not a number at all
        return False


def _add_changed(into: list[str], changed: Any) -> None:
    if isinstance(changed, list):
        into.extend(c for c in changed if isinstance(c, str) and c not in into)


class DtcDebouncer:
    def __init__(self, policy: DtcPolicy | None = None) -> None:
        self.policy = policy or DtcPolicy()
        self.clock = -math.inf
        self._quiet: dict[Key, _Quiet] = {}
        self._updates: dict[Key, _Updates] = {}
        # (until, tiebreak, which period, key), both kinds in one heap so that they end in time order; stale
        # entries (a period since ended or moved) are skipped.
        self._due: list[tuple[float, int, int, Key]] = []
        self._holding: dict[str, set[Key]] = {}  # source -> its DTCs holding transitions
        self._n_holding = 0
        self._holding_updates: dict[str, set[Key]] = {}  # source -> its DTCs holding updates
        self._n_holding_updates = 0
        self._windows: dict[str, _Window] = {}
        self._windows_due: list[tuple[float, int, str]] = []
        self._tie = 0
        self._out: list[Event] = []
        self._urgent = False
        self.changed = False  # `state()` moved since it was last taken
        self.decoded = 0  # DTC events in
        self.passed = 0  # ... gone out as themselves
        self.merged = 0  # ... gone out inside another (a summary, a coalesced update, a superseding transition)
        self.flapping = 0  # `dtc_flapping` summaries out
        self.coalesced = 0  # `dtc_update`s out standing for more than one
        self.storms = 0  # `dtc_storm` summaries out

    # --- the one entry point ---------------------------------------------------------------------------------

    def feed(self, events: Iterable[Event], now: float | None = None) -> tuple[list[Event], bool]:
        """A decoder's events of one batch, in order, and the batch's data time (None: only the events' own).
        Returns what goes out now, in order, and whether any of it is urgent: a `dtc_open` let out at once."""
        self._out, self._urgent = [], False
        debounce = self.policy.debounce_s > 0
        for e in events:
            kind = e.kind
            if not kind.startswith("dtc_"):
                self._out.append(e)
                continue
            self.decoded += 1
            self.changed = True
            t = e.ts
            if type(t) is float and math.isfinite(t) and t >= self.clock:
                # `_advance`'s common case, inline: it runs for every event, ~100,000 a minute in a storm
                self.clock = t
                if (self._due and self._due[0][0] <= t) or (self._windows_due and self._windows_due[0][0] <= t):
                    self._expire()
            else:
                self._advance(t)
            key = _key(e)
            if not debounce or key is None or (kind != OPEN and kind != CLOSE and kind != UPDATE):
                self._bounded(e, 1, urgent=kind == OPEN, first=kind == OPEN)
            elif kind == UPDATE:
                self._update(key, e)
            else:
                self._transition(key, e)
        if now is not None:
            self._advance(now)
        return self._out, self._urgent

    def drain(self) -> list[Event]:
        """Everything held, now: quiet periods end, then windows (a stop, the end of a replay)."""
        self._out, self._urgent = [], False
        self._end_all()
        return self._out

    @property
    def held(self) -> int:
        """Decoded DTC events not out yet (held in a quiet period, or merged into a storm summary not out yet)."""
        return (sum(self._quiet[k].n + self._quiet[k].updates for keys in self._holding.values() for k in keys)
                + sum(self._updates[k].n for keys in self._holding_updates.values() for k in keys)
                + sum(w.weight for w in self._windows.values()))

    @property
    def active(self) -> bool:
        """A period or window is running: the clock should be fed even without events."""
        return bool(self._quiet or self._updates or self._windows)

    def counters(self) -> dict[str, int]:
        return {"decoded": self.decoded, "passed": self.passed, "merged": self.merged, "held": self.held,
                "flapping": self.flapping, "coalesced": self.coalesced, "storms": self.storms}

    # --- time ------------------------------------------------------------------------------------------------

    def _time(self, t: float) -> float:
        """An event's time for periods and windows: its own, or the clock's if it has none usable."""
        if _finite(t):
            return t
        return self.clock if _finite(self.clock) else 0.0

    def _advance(self, t: float) -> None:
        if not _finite(t):
            return
        if t >= self.clock:
            self.clock = t
            if (self._due and self._due[0][0] <= t) or (self._windows_due and self._windows_due[0][0] <= t):
                self._expire()
        elif t < self.clock - max(self.policy.debounce_s, WINDOW_S):
            self._end_all()  # the clock stepped back: nothing it holds would end in time
            self.clock = t

    def _expire(self) -> None:
        """Quiet periods and windows the clock has passed, oldest first."""
        while self._due and self._due[0][0] <= self.clock:
            until, _, which, key = heapq.heappop(self._due)
            if which == _TRANSITION:
                q = self._quiet.get(key)
                if q is not None and q.until == until:
                    self._end_quiet(key, q, restart=True)
            else:
                u = self._updates.get(key)
                if u is not None and u.until == until:
                    self._end_updates(key, u, restart=True)
        while self._windows_due and self._windows_due[0][0] <= self.clock:
            end, _, source = heapq.heappop(self._windows_due)
            w = self._windows.get(source)
            if w is not None and w.start + WINDOW_S == end:
                self._end_window(source, w)

    def _end_all(self) -> None:
        for key, q in list(self._quiet.items()):
            self._end_quiet(key, q, restart=False)
        for key, u in list(self._updates.items()):
            if self._updates.get(key) is u:  # not merged into a storm that an earlier one began
                self._end_updates(key, u, restart=False)
        self._due.clear()
        for source, w in list(self._windows.items()):
            self._end_window(source, w)
        self._windows_due.clear()
        self.changed = True

    def _push(self, until: float, which: int, key: Key) -> None:
        self._tie += 1
        heapq.heappush(self._due, (until, self._tie, which, key))

    # --- transitions -----------------------------------------------------------------------------------------

    def _transition(self, key: Key, e: Event) -> None:
        kind = e.kind
        q = self._quiet.get(key)
        first = kind == OPEN and q is None
        source = key[0]
        w = self._windows.get(source)  # `_window`, inline: a storm's every transition asks
        if w is not None and self.clock >= w.start + WINDOW_S:
            self._end_window(source, w)
            w = None
        if w is not None and w.merged and not first:
            # The source is past its bound: merged at once (with its held updates; a storm of transitions has none)
            self._merge(w, e, 1 + self._take_updates(key) if self._updates else 1)
            return
        if q is None or q.at_once < 2:
            superseded = self._take_updates(key) if self._updates else 0
            out = Event(kind, e.ts, e.data | {"updates": superseded}) if superseded else e
            if not self._bounded(out, 1 + superseded, urgent=kind == OPEN, first=first) and first:
                return  # merged, as what a storming source sends is: no period (a random storm makes many DTCs)
            if q is None:
                # From the clock, which an event late in its batch (or a batch behind another source's time) may
                # be behind: a period must not end before it starts.
                until = self._time(self.clock) + self.policy.debounce_s
                self._quiet[key] = _Quiet(until)
                self._push(until, _TRANSITION, key)
            else:
                q.at_once = 2
            return
        if not q.n:
            if self._n_holding >= HELD_MAX:
                self._merge(self._open_window(key[0]), e, 1 + self._take_updates(key))
                return
            q.first = self._time(e.ts)
            self._holding.setdefault(key[0], set()).add(key)
            self._n_holding += 1
        q.n += 1
        if kind == OPEN:
            q.opens += 1
        else:
            q.closes += 1
        q.last = e
        q.updates += self._take_updates(key)

    def _release(self, key: Key, q: _Quiet) -> None:
        """`key` holds no transitions any more."""
        q.n = q.opens = q.closes = q.updates = 0
        q.last = None
        keys = self._holding.get(key[0])
        if keys is not None and key in keys:
            keys.discard(key)
            self._n_holding -= 1
            if not keys:
                del self._holding[key[0]]

    def _end_quiet(self, key: Key, q: _Quiet, restart: bool) -> None:
        if q.n == 0:
            del self._quiet[key]
            return
        assert q.last is not None
        self.changed = True
        n, last, superseded = q.n, q.last, q.updates
        extra = {"updates": superseded} if superseded else {}
        if n == 1:
            out = Event(last.kind, last.ts, last.data | extra) if extra else last
        else:
            out = Event(FLAPPING, last.ts, last.data | {
                "state": "open" if last.kind == OPEN else "closed", "transitions": n, "opens": q.opens,
                "closes": q.closes, "first_ts": q.first, "last_ts": last.ts, **extra})
        self._release(key, q)
        del self._quiet[key]
        if restart:  # it flapped: the next period starts now and holds everything
            self._quiet[key] = _Quiet(q.until + self.policy.debounce_s, at_once=2)
            self._push(q.until + self.policy.debounce_s, _TRANSITION, key)
        self._bounded(out, n + superseded, urgent=False, summary=n > 1)
        u = self._updates.get(key)
        if u is not None and u.until is None:  # updates held behind these transitions, their own period over
            self._end_updates(key, u, restart=restart, base=q.until)

    # --- updates ---------------------------------------------------------------------------------------------

    def _update(self, key: Key, e: Event) -> None:
        w = self._window(key[0])
        if w is not None and w.merged:
            self._merge(w, e, 1)  # the source is past its bound: merged at once
            return
        q = self._quiet.get(key)
        behind = q is not None and q.n > 0
        u = self._updates.get(key)
        if u is None and not behind:
            self._bounded(e, 1, urgent=False)
            until = self._time(self.clock) + self.policy.debounce_s
            self._updates[key] = _Updates(until)
            self._push(until, _UPDATES, key)
            return
        if u is None or not u.n:
            if self._n_holding_updates >= HELD_MAX:
                self._merge(self._open_window(key[0]), e, 1)
                return
            if u is None:  # behind held transitions, no period of its own: out right after them
                u = self._updates[key] = _Updates(None)
            u.first = self._time(e.ts)
            self._holding_updates.setdefault(key[0], set()).add(key)
            self._n_holding_updates += 1
        u.n += 1
        u.last = e
        _add_changed(u.changed, e.data.get("changed"))

    def _take_updates(self, key: Key) -> int:
        """A transition of `key` supersedes its held updates, and ends its update period: how many it took."""
        u = self._updates.pop(key, None)
        if u is None:
            return 0
        n = u.n
        self._release_updates(key)
        return n

    def _release_updates(self, key: Key) -> None:
        keys = self._holding_updates.get(key[0])
        if keys is not None and key in keys:
            keys.discard(key)
            self._n_holding_updates -= 1
            if not keys:
                del self._holding_updates[key[0]]

    def _end_updates(self, key: Key, u: _Updates, restart: bool, base: float | None = None) -> None:
        """`key`'s update period ended (`base`: when, if its own `until` no longer says)."""
        if u.n == 0:
            del self._updates[key]
            return
        q = self._quiet.get(key)
        if q is not None and q.n:  # its DTC holds transitions that came before: they go first
            u.until = None
            return
        assert u.last is not None
        self.changed = True
        n, last = u.n, u.last
        out = last if n == 1 else Event(UPDATE, last.ts, last.data | {
            "changed": u.changed, "updates": n, "first_ts": u.first, "last_ts": last.ts})
        self._release_updates(key)
        del self._updates[key]
        if restart:  # its updates went on: the next period starts now and holds everything
            at = (u.until if u.until is not None else base if base is not None else self._time(self.clock))
            self._updates[key] = _Updates(at + self.policy.debounce_s)
            self._push(at + self.policy.debounce_s, _UPDATES, key)
        self._bounded(out, n, urgent=False, summary=n > 1)

    # --- the per-minute bound --------------------------------------------------------------------------------

    def _window(self, source: str) -> _Window | None:
        """The source's current window (None: none open; the one that ended is closed first)."""
        w = self._windows.get(source)
        if w is not None and self.clock >= w.start + WINDOW_S:
            self._end_window(source, w)
            return None
        return w

    def _open_window(self, source: str) -> _Window:
        w = self._window(source)
        if w is None:
            start = self._time(self.clock)
            w = self._windows[source] = _Window(start)
            self._tie += 1
            heapq.heappush(self._windows_due, (start + WINDOW_S, self._tie, source))
        return w

    def _bounded(self, e: Event, weight: int, urgent: bool, first: bool = False, summary: bool = False) -> bool:
        """Out (True), unless its source has had its minute's worth: then merged into the source's storm summary.
        Part of the minute's worth is kept for first opens (`first`), which nothing else can use up."""
        limit = self.policy.max_events_per_min
        source = e.data.get("source")
        if not limit or not isinstance(source, str):
            self._let_out(e, weight, urgent, summary)
            return True
        w = self._windows.get(source)  # `_open_window`, without its calls for a window still running
        if w is None or self.clock >= w.start + WINDOW_S:
            w = self._open_window(source)
        if first:
            allowed = w.sent < limit
        else:
            allowed = not w.merged and w.sent < limit and w.sent - w.opened < limit - reserve(limit)
        if allowed:
            w.sent += 1
            w.opened += first
            self._let_out(e, weight, urgent, summary)
            return True
        if not w.merged:
            # The source's storm begins: what its DTCs hold would most likely end up here too, so it goes now.
            for key in list(self._holding.get(source, ())):
                self._merge_held(w, key, self._quiet[key])
            for key in list(self._holding_updates.get(source, ())):
                self._merge_updates(w, key)
        self._merge(w, e, weight)
        return False

    def _let_out(self, e: Event, weight: int, urgent: bool, summary: bool) -> None:
        """`summary`: `e` stands for `weight` events (a flapping summary, a coalesced update); else it is one,
        carrying `weight - 1` updates it superseded."""
        self._out.append(e)
        self._urgent |= urgent
        if summary:
            self.merged += weight
            if e.kind == FLAPPING:
                self.flapping += 1
            else:
                self.coalesced += 1
        else:
            self.passed += 1
            self.merged += weight - 1

    def _merge(self, w: _Window, e: Event, weight: int) -> None:
        w.merged += 1
        w.weight += weight
        kind = e.kind
        w.kinds[kind] += 1
        t = e.ts
        if not (type(t) is float and math.isfinite(t)):
            t = self._time(t)
        if w.merged == 1:
            w.first = w.last = t
        elif t > w.last:
            w.last = t
        if kind in (OPEN, CLOSE, FLAPPING):
            d = e.data
            self._track_open(w, d.get("spn"), d.get("fmi"),
                             kind == OPEN or (kind == FLAPPING and d.get("state") == "open"))

    def _merge_held(self, w: _Window, key: Key, q: _Quiet) -> None:
        """A DTC's held transitions into the storm summary (each counts as an event merged)."""
        assert q.last is not None
        t_last = self._time(q.last.ts)
        w.first = q.first if not w.merged else min(w.first, q.first)
        w.last = t_last if not w.merged else max(w.last, t_last)
        w.merged += q.n + q.updates
        w.weight += q.n + q.updates
        w.kinds[OPEN] += q.opens
        w.kinds[CLOSE] += q.closes
        if q.updates:
            w.kinds[UPDATE] += q.updates
        self._track_open(w, key[1], key[2], q.last.kind == OPEN)
        self._release(key, q)

    def _merge_updates(self, w: _Window, key: Key) -> None:
        """A DTC's held updates into the storm summary (each counts as an event merged); its period ends."""
        u = self._updates.pop(key)
        assert u.last is not None
        t_last = self._time(u.last.ts)
        w.first = u.first if not w.merged else min(w.first, u.first)
        w.last = t_last if not w.merged else max(w.last, t_last)
        w.merged += u.n
        w.weight += u.n
        w.kinds[UPDATE] += u.n
        u.n, u.last = 0, None
        self._release_updates(key)

    @staticmethod
    def _track_open(w: _Window, spn: Any, fmi: Any, is_open: bool) -> None:
        if type(spn) is not int or type(fmi) is not int:
            return
        k = (spn, fmi)
        if not is_open:
            w.open.pop(k, None)
        elif k not in w.open:
            if len(w.open) < STORM_OPEN_LISTED:
                w.open[k] = None
            else:
                w.open_not_listed += 1

    def _end_window(self, source: str, w: _Window) -> None:
        del self._windows[source]
        self.changed = True
        if not w.merged:
            return
        self.storms += 1
        self.merged += w.weight
        self._out.append(Event(STORM, w.last, {
            "source": source, "events": w.merged, "transitions": w.weight, "kinds": dict(w.kinds),
            "first_ts": w.first, "last_ts": w.last, "window_s": WINDOW_S,
            "open": [[spn, fmi] for spn, fmi in w.open], "open_not_listed": w.open_not_listed}))

    # --- a restart -------------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What is held, as JSON, to be saved with the events of the same batch; taking it clears `changed`."""
        self.changed = False
        # Taken after every batch that changed it: only the DTCs holding something (at most HELD_MAX), never all
        # those in a quiet period (a storm makes many), in an order that does not depend on set iteration.
        quiet = [(k, self._quiet[k]) for k in sorted(k for keys in self._holding.values() for k in keys)]
        updates = [(k, self._updates[k]) for k in sorted(k for keys in self._holding_updates.values() for k in keys)]
        return {
            "v": STATE_VERSION,
            "clock": self.clock if _finite(self.clock) else None,
            "quiet": [[k[0], k[1], k[2], q.until, q.n, q.opens, q.closes, q.first, q.last.kind,
                       q.last.ts if _finite(q.last.ts) else None, q.last.data, q.updates]
                      for k, q in quiet if q.n and q.last is not None],
            "updates": [[k[0], k[1], k[2], u.until, u.n, u.first, u.last.ts if _finite(u.last.ts) else None,
                         u.last.data, list(u.changed)]
                        for k, u in updates if u.n and u.last is not None],
            "windows": [[s, w.start, w.sent, w.merged, w.weight, dict(w.kinds), w.first if w.merged else None,
                         w.last if w.merged else None, [list(k) for k in w.open], w.open_not_listed, w.opened]
                        for s, w in self._windows.items()],
        }

    def restore(self, saved: object) -> bool:
        """Take back a `state()` (this version's or version 1's); False, and nothing changed, if it is damaged."""
        try:
            quiet, updates, windows, clock = _parse(saved)
        except (KeyError, TypeError, ValueError, IndexError):
            return False
        self.clock = clock
        self._quiet, self._due, self._holding, self._n_holding = {}, [], {}, 0
        for key, q in quiet:
            self._quiet[key] = q
            self._push(q.until, _TRANSITION, key)
            self._holding.setdefault(key[0], set()).add(key)
            self._n_holding += 1
        self._updates, self._holding_updates, self._n_holding_updates = {}, {}, 0
        for key, u in updates:
            self._updates[key] = u
            if u.until is not None:
                self._push(u.until, _UPDATES, key)
            self._holding_updates.setdefault(key[0], set()).add(key)
            self._n_holding_updates += 1
        self._windows, self._windows_due = {}, []
        for source, w in windows:
            self._windows[source] = w
            self._tie += 1
            heapq.heappush(self._windows_due, (w.start + WINDOW_S, self._tie, source))
        return True


def reserve(limit: int) -> int:
    """How much of a window's bound of `limit` events only first opens may use."""
    return limit // 2


def _num(x: Any) -> float:
    if isinstance(x, bool) or not _finite(x):
        raise ValueError("not a finite number")
    return float(x)


def _count(x: Any) -> int:
    if type(x) is not int or x < 0:
        raise ValueError("not a count")
    return x


_Parsed = tuple[list[tuple[Key, _Quiet]], list[tuple[Key, _Updates]], list[tuple[str, _Window]], float]


def _parse(saved: object) -> _Parsed:
    if not isinstance(saved, dict) or saved.get("v") not in (1, STATE_VERSION):
        raise ValueError("not a saved debouncer state")
    v1 = saved["v"] == 1  # before updates were debounced: no updates held, no first opens counted
    clock = -math.inf if saved["clock"] is None else _num(saved["clock"])
    quiet: list[tuple[Key, _Quiet]] = []
    seen: set[Key] = set()
    for row in saved["quiet"]:
        if v1:
            source, spn, fmi, until, n, opens, closes, first, kind, ts, data = row
            superseded = 0
        else:
            source, spn, fmi, until, n, opens, closes, first, kind, ts, data, superseded = row
        if not (isinstance(source, str) and type(spn) is int and type(fmi) is int and kind in (OPEN, CLOSE)
                and isinstance(data, dict) and _count(n) > 0 and _count(opens) + _count(closes) == n
                and (source, spn, fmi) not in seen):
            raise ValueError("a held DTC that does not add up")
        seen.add((source, spn, fmi))
        event_ts = math.nan if ts is None else _num(ts)  # an event without a usable time of its own
        quiet.append(((source, spn, fmi), _Quiet(_num(until), 2, n, opens, closes, _num(first),
                                                Event(kind, event_ts, data), _count(superseded))))
    if len(quiet) > HELD_MAX:
        raise ValueError("more held DTCs than a debouncer holds")
    updates: list[tuple[Key, _Updates]] = []
    seen_updates: set[Key] = set()
    for row in [] if v1 else saved["updates"]:
        source, spn, fmi, until, n, first, ts, data, changed = row
        key = (source, spn, fmi)
        if not (isinstance(source, str) and type(spn) is int and type(fmi) is int and isinstance(data, dict)
                and _count(n) > 0 and isinstance(changed, list) and all(isinstance(c, str) for c in changed)
                and key not in seen_updates and (until is not None or key in seen)):
            # An update waiting with no period of its own waits for its DTC's held transitions: they must be there.
            raise ValueError("held updates that do not add up")
        seen_updates.add(key)
        event_ts = math.nan if ts is None else _num(ts)
        updates.append((key, _Updates(None if until is None else _num(until), n, _num(first),
                                      Event(UPDATE, event_ts, data), list(changed))))
    if len(updates) > HELD_MAX:
        raise ValueError("more DTCs holding updates than a debouncer holds")
    windows: list[tuple[str, _Window]] = []
    for row in saved["windows"]:
        if v1:
            source, start, sent, merged, weight, kinds, first, last, opened, open_not_listed = row
            first_opens = 0
        else:
            source, start, sent, merged, weight, kinds, first, last, opened, open_not_listed, first_opens = row
        if not (isinstance(source, str) and isinstance(kinds, dict) and isinstance(opened, list)
                and _count(weight) >= _count(merged) and _count(first_opens) <= _count(sent)):
            raise ValueError("a window that does not add up")
        w = _Window(_num(start), sent, merged, weight,
                    Counter({str(k): _count(v) for k, v in kinds.items()}),
                    _num(first) if merged else math.nan, _num(last) if merged else math.nan,
                    {}, _count(open_not_listed), first_opens)
        for spn, fmi in opened:
            if type(spn) is not int or type(fmi) is not int:
                raise ValueError("a listed DTC that is not one")
            w.open[(spn, fmi)] = None
        windows.append((source, w))
    return quiet, updates, windows, clock
