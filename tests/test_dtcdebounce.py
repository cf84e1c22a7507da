"""The DTC debouncer and per-minute bound on their own (agent/dtcdebounce.py: pure, events in and out, the data's
clock passed in). Hypothesis drives any sequence of opens and closes, from several sources, split into batches
anywhere, with a restart (the state through JSON, as the store keeps it) anywhere: every decoded event is out as
itself, inside a summary that went out, or still held, and nothing is out twice; the bound holds; a damaged saved
state is refused, never a crash."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.dtcdebounce import FLAPPING, HELD_MAX, STORM, STORM_OPEN_LISTED, WINDOW_S, DtcDebouncer, DtcPolicy, reserve
from agent.records import Event
from agent.store import finite_dumps


def _open(t: float, spn: int = 110, fmi: int = 0, source: str = "can0/00", **extra: Any) -> Event:
    return Event("dtc_open", t, {"source": source, "spn": spn, "fmi": fmi, "occurrence": 1, "mil": 0, **extra})


def _close(t: float, spn: int = 110, fmi: int = 0, source: str = "can0/00") -> Event:
    return Event("dtc_close", t, {"source": source, "spn": spn, "fmi": fmi})


def weight(e: Event) -> int:
    """How many decoded DTC events an event that went out stands for: a summary its `transitions` (a flapping one
    also the updates it superseded), a coalesced update its `updates`, a transition itself and the updates it
    superseded."""
    d = e.data
    if e.kind == STORM:
        return int(d["transitions"])
    if e.kind == FLAPPING:
        return int(d["transitions"]) + int(d.get("updates", 0))
    if e.kind == "dtc_update":
        return int(d.get("updates", 1))
    if e.kind in ("dtc_open", "dtc_close"):
        return 1 + int(d.get("updates", 0))
    return 1 if e.kind.startswith("dtc_") else 0


def _through_json(saved: dict[str, Any]) -> Any:
    return json.loads(finite_dumps(saved))  # as the store writes and reads it back


def test_first_open_and_its_close_go_out_at_once_then_flapping_is_one_event_per_period() -> None:
    d = DtcDebouncer(DtcPolicy(debounce_s=60, max_events_per_min=1000))
    out, urgent = d.feed([_open(0.0, extra="kept")], 0.0)
    assert [e.kind for e in out] == ["dtc_open"] and urgent  # a mechanic sees it at once
    out, urgent = d.feed([_close(1.0)], 1.0)
    assert [e.kind for e in out] == ["dtc_close"] and not urgent  # an open that clears is no storm
    # It keeps toggling every second for five minutes.
    got: list[Event] = []
    for i in range(2, 300):
        e = _open(float(i), extra="kept") if i % 2 == 0 else _close(float(i))
        got += d.feed([e], float(i))[0]
    got += d.drain()
    assert [e.kind for e in got] == [FLAPPING] * 5  # periods end at 60, 120, 180, 240; the drain lets out the last
    first = got[0].data
    assert first["transitions"] == 58 and first["opens"] == 29 and first["closes"] == 29  # t = 2 .. 59
    assert first["first_ts"] == 2.0 and first["last_ts"] == 59.0 and first["state"] == "closed"
    assert first["source"] == "can0/00" and first["spn"] == 110 and first["fmi"] == 0
    assert got[1].data["first_ts"] == 60.0 and got[1].data["last_ts"] == 119.0 and got[1].data["transitions"] == 60
    assert sum(e.data["transitions"] for e in got) == 298 and got[-1].data["state"] == "closed"
    assert d.counters() == {"decoded": 300, "passed": 2, "merged": 298, "held": 0, "flapping": 5, "coalesced": 0,
                            "storms": 0}


def test_one_late_transition_goes_out_as_itself_and_a_quiet_dtc_is_forgotten() -> None:
    d = DtcDebouncer(DtcPolicy(debounce_s=10, max_events_per_min=0))
    assert [e.kind for e in d.feed([_open(0.0), _close(1.0), _open(2.0)], 2.0)[0]] == ["dtc_open", "dtc_close"]
    out, _ = d.feed([], 10.0)  # the period ends: the one held open goes out late, as itself
    assert [(e.kind, e.ts) for e in out] == [("dtc_open", 2.0)] and d.held == 0
    assert d.feed([], 20.0)[0] == []  # the next period held nothing: forgotten
    out, urgent = d.feed([_close(30.0)], 30.0)
    assert [e.kind for e in out] == ["dtc_close"] and not d.held and not urgent  # out at once again


def test_a_source_past_its_bound_is_merged_into_one_storm_summary_per_minute() -> None:
    d = DtcDebouncer(DtcPolicy(debounce_s=60, max_events_per_min=5))
    events = [_open(0.1 * i, spn=1000 + i, source="can0/17") for i in range(100)]
    events.insert(50, _open(5.0, spn=7, source="can0/03"))  # another source is not held up
    out, _ = d.feed(events, 10.0)
    assert [e.data["spn"] for e in out] == [1000, 1001, 1002, 1003, 1004, 7]
    assert d.feed([], 59.9)[0] == []  # the summary waits for the window's end
    (storm,) = d.feed([], 60.0)[0]
    assert storm.kind == STORM and storm.data["source"] == "can0/17" and storm.data["events"] == 95
    assert storm.data["transitions"] == 95 and storm.data["kinds"] == {"dtc_open": 95}
    assert storm.data["first_ts"] == pytest.approx(0.5) and storm.data["last_ts"] == pytest.approx(9.9)
    assert storm.data["open"] == [[1005 + i, 0] for i in range(STORM_OPEN_LISTED)]  # what the storm left open
    assert storm.data["open_not_listed"] == 95 - STORM_OPEN_LISTED
    assert d.counters() == {"decoded": 101, "passed": 6, "merged": 95, "held": 0, "flapping": 0, "coalesced": 0,
                            "storms": 1}
    # The next minute starts afresh.
    assert [e.data["spn"] for e in d.feed([_open(61.0, spn=5000, source="can0/17")], 61.0)[0]] == [5000]


def test_held_transitions_join_the_storm_when_their_source_passes_its_bound() -> None:
    d = DtcDebouncer(DtcPolicy(debounce_s=60, max_events_per_min=4))  # 2 of the 4 kept for first opens
    out, _ = d.feed([_open(0.0), _close(1.0), _open(2.0), _close(3.0)], 3.0)  # two out, two held
    assert len(out) == 2 and d.held == 2
    out, _ = d.feed([_update(3.5, spn=7)], 3.5)  # the other events' second
    assert len(out) == 1
    out, _ = d.feed([_close(4.0, spn=9)], 4.0)  # past their share: merged, and the held ones with it
    assert out == [] and d.held == 3
    out, urgent = d.feed([_open(5.0, spn=10)], 5.0)  # a first open: the bound is not reached, out as itself
    assert [e.data["spn"] for e in out] == [10] and urgent
    out, _ = d.feed([_open(6.0, spn=11)], 6.0)  # the minute's fifth event: past the bound, merged
    assert out == [] and d.held == 4
    (storm,) = d.drain()
    assert storm.data["transitions"] == 4 and storm.data["kinds"] == {"dtc_open": 2, "dtc_close": 2}
    assert storm.data["open"] == [[11, 0]] and storm.data["first_ts"] == 2.0 and storm.data["last_ts"] == 6.0


def test_what_is_held_stays_bounded_however_many_dtcs_flap() -> None:
    d = DtcDebouncer(DtcPolicy(debounce_s=60, max_events_per_min=0))
    for spn in range(HELD_MAX + 50):  # each opens, closes and opens again: the third is held
        d.feed([_open(0.0, spn=spn), _close(0.5, spn=spn), _open(1.0, spn=spn)], 1.0)
    state = d.state()
    assert len(state["quiet"]) == HELD_MAX  # the next is merged into a storm summary, and the source's rest with it
    # (but for the first opens: a mechanic sees every new DTC)
    assert d.passed == 2 * (HELD_MAX + 1) + 49 and d.held == 3 * (HELD_MAX + 50) - d.passed
    out = d.drain()  # each held one goes out as itself; the summary stands for the rest
    assert sum(weight(e) for e in out) == 3 * (HELD_MAX + 50) - 2 * (HELD_MAX + 1) - 49
    assert out[-1].kind == STORM and out[-1].data["transitions"] == 1 + 2 * 49 and len(out) == HELD_MAX + 1


def test_a_clock_set_back_ends_every_period_and_loses_nothing() -> None:
    d = DtcDebouncer(DtcPolicy(debounce_s=60, max_events_per_min=10))
    d.feed([_open(1000.0), _close(1001.0), _open(1002.0), _close(1003.0)], 1003.0)
    assert d.held == 2
    out, _ = d.feed([_open(10.0, spn=6)], 10.0)  # a log from before: what was held goes out first
    assert [e.kind for e in out] == [FLAPPING, "dtc_open"] and d.held == 0
    assert sum(weight(e) for e in out) == 3 and d.clock == 10.0


def test_what_is_held_across_a_restart_goes_out_once_when_its_period_ends() -> None:
    policy = DtcPolicy(debounce_s=10, max_events_per_min=4)
    d = DtcDebouncer(policy)
    other = [_open(4.0 + 0.1 * i, spn=4 + i, source="can0/01") for i in range(5)]
    d.feed([_open(0.0), _close(1.0), _open(2.0), _close(3.0), *other], 5.0)
    assert d.held == 3  # the flapping DTC's two, and another source's open past its bound (in its storm summary)
    saved = _through_json(d.state())
    again = DtcDebouncer(policy)
    assert again.restore(saved) and again.held == 3 and again.clock == 5.0
    assert again.feed([], 9.9)[0] == []
    (flap,) = again.feed([], 10.0)[0]
    assert flap.kind == FLAPPING and flap.data["transitions"] == 2 and flap.data["state"] == "closed"
    assert again.feed([], 63.9)[0] == []  # its window opened at 4.0
    (storm,) = again.feed([], 64.0)[0]
    assert storm.kind == STORM and storm.data["transitions"] == 1 and storm.data["open"] == [[8, 0]]
    assert storm.data["source"] == "can0/01"
    assert again.held == 0 and again.drain() == []


@pytest.mark.parametrize("ts", [math.nan, math.inf, -math.inf])
def test_events_without_a_usable_time_are_still_counted(ts: float) -> None:
    d = DtcDebouncer(DtcPolicy(debounce_s=60, max_events_per_min=2))
    events = [_open(ts), _close(ts), _open(ts), Event("dtc_open", ts, {"spn": "x"}), _open(ts, spn=3)]
    out, _ = d.feed(events, None)
    out += d.drain()
    assert sum(weight(e) for e in out) == 5 and d.held == 0
    assert finite_dumps(d.state())  # saveable


# --- any sequence ------------------------------------------------------------------------------------------


def _assert_in_order(inputs: dict[tuple[str, int, int], list[int]], out: list[Event]) -> None:
    """Each DTC's order is kept: a record stands for a run of its DTC's events (their `x`, `inputs`) that ends with
    the one whose `data` it carries (a summary: the last; a transition: itself and the updates before it that it
    superseded), and the runs go out in the order of the events. So no update goes out before a transition that
    came before it (a held open). What no record covers went into a storm summary, whose counts must add up to
    exactly that."""
    covered: dict[tuple[str, int, int], int] = defaultdict(int)  # how many of the DTC's events records went past
    skipped = 0
    for e in out:
        if e.kind == STORM:
            continue
        key = (e.data["source"], e.data["spn"], e.data["fmi"])
        end = inputs[key].index(e.data["x"]) + 1
        start = end - weight(e)
        assert start >= covered[key], f"{e.kind} {e.data['x']} out of its DTC's order"
        skipped += start - covered[key]
        covered[key] = end
    skipped += sum(len(xs) - covered[key] for key, xs in inputs.items())
    assert skipped == sum(e.data["transitions"] for e in out if e.kind == STORM)


_step = st.tuples(
    st.one_of(st.just(0.0), st.floats(0.0, 3.0), st.floats(0.0, 40.0)),  # since the previous event (a burst, or
    # more than a period)
    st.just(0) | st.integers(0, 2),  # source (mostly one, so that a DTC's events meet within its periods)
    st.just(0) | st.integers(0, 3),  # DTC
    st.sampled_from(["dtc_open", "dtc_close", "dtc_update"]),
)


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(_step, max_size=250), debounce=st.sampled_from([0.0, 5.0, 30.0, 60.0]),
       limit=st.integers(0, 6), ticks=st.dictionaries(st.integers(0, 250), st.floats(0.0, 90.0), max_size=12),
       restart_at=st.floats(0.0, 1.0) | st.none(), back_at=st.floats(0.0, 1.0) | st.none())
def test_any_sequence_adds_up_and_respects_the_bound(steps: list[tuple[float, int, int, str]], debounce: float,
                                                      limit: int, ticks: dict[int, float], restart_at: float | None,
                                                      back_at: float | None) -> None:
    restart = -1 if restart_at is None else int(restart_at * len(steps))
    back = -1 if back_at is None else int(back_at * len(steps))
    policy = DtcPolicy(debounce, limit)
    d = DtcDebouncer(policy)
    t = 1000.0
    out: list[tuple[float, Event]] = []  # (the clock when it went out, the event)
    inputs: dict[tuple[str, int, int], list[int]] = defaultdict(list)  # each DTC's events (their `x`), in order
    for i, (dt, src, dtc, kind) in enumerate(steps):
        t += dt
        if i == back:
            t -= 500.0  # the clock set back by more than a period
        e = Event(kind, t, {"source": f"can0/{src:02X}", "spn": 100 + dtc, "fmi": dtc, "x": i})
        inputs[(f"can0/{src:02X}", 100 + dtc, dtc)].append(i)
        # One event a batch, so that the clock each goes out at is known; some batches carry a later data time
        # (samples after the event), which ends periods and windows without an event.
        now = None
        if i in ticks:
            now = t = t + ticks[i]
        got, urgent = d.feed([e], now)
        out += [(d.clock, g) for g in got]
        # Urgent: this batch's open let out at once. (With a later data time in the batch, it may also have been
        # held and let out late, when its period ended in the same batch: that is not urgent.)
        own_open_out = any(g.kind == "dtc_open" and g.data["x"] == i for g in got)
        assert urgent == own_open_out if now is None else (own_open_out or not urgent)
        assert d.decoded == d.passed + d.merged + d.held  # every decoded event accounted for, always
        held = d.state()  # nothing waits past its period or window
        assert all(until > d.clock for _, _, _, until, *_ in held["quiet"])
        # (an update whose period ended waits only behind its DTC's held transitions)
        assert all(until is None or until > d.clock for _, _, _, until, *_ in held["updates"])
        assert all(start + WINDOW_S > d.clock for _, start, *_ in held["windows"])
        if i == restart:  # a crash right after this batch was written with its state
            saved, counts = _through_json(d.state()), (d.decoded, d.passed, d.merged)
            d = DtcDebouncer(policy)
            assert d.restore(saved)
            d.decoded, d.passed, d.merged = counts
    out += [(d.clock, g) for g in d.drain()]
    assert d.held == 0 and d.decoded == len(steps)
    assert sum(weight(e) for _, e in out) == len(steps)  # nothing lost, nothing twice
    assert len({id(e) for _, e in out}) == len(out)
    _assert_in_order(inputs, [e for _, e in out])
    if limit and back < 0:
        # Windows are 60 s of data time from a source's first event: any 60 s holds parts of two at most, and one
        # summary ends in it (plus the drain's). A window lets out `limit` events, of which only first opens may
        # use the reserve.
        by_source: dict[str, list[tuple[float, str]]] = defaultdict(list)
        for clock, e in out:
            by_source[e.data["source"]].append((clock, e.kind))
        for seq in by_source.values():
            for at, _ in seq:
                near = [k for c, k in seq if at <= c < at + WINDOW_S]
                assert sum(k not in (STORM, "dtc_open") for k in near) <= 2 * (limit - reserve(limit))
                assert sum(k != STORM for k in near) <= 2 * limit and sum(k == STORM for k in near) <= 2


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6)),
                    lambda k: st.one_of(st.lists(k, max_size=12), st.dictionaries(st.text(max_size=8), k, max_size=5)),
                    max_leaves=40)
       | st.fixed_dictionaries({"v": st.just(1), "clock": st.floats() | st.none(),
                                "quiet": st.lists(st.lists(st.integers() | st.text(max_size=3) | st.floats(),
                                                           min_size=11, max_size=11), max_size=3),
                                "windows": st.lists(st.lists(st.integers() | st.none(), min_size=10, max_size=10),
                                                    max_size=3)})
       | st.fixed_dictionaries({"v": st.just(2), "clock": st.floats() | st.none(),
                                "quiet": st.lists(st.lists(st.integers() | st.text(max_size=3) | st.floats(),
                                                           min_size=12, max_size=12), max_size=3),
                                "updates": st.lists(st.lists(st.integers() | st.text(max_size=3) | st.none()
                                                             | st.lists(st.text(max_size=3), max_size=2),
                                                             min_size=9, max_size=9), max_size=3),
                                "windows": st.lists(st.lists(st.integers() | st.none(), min_size=11, max_size=11),
                                                    max_size=3)}))
def test_a_damaged_saved_state_is_refused_not_a_crash(saved: Any) -> None:
    d = DtcDebouncer()
    if d.restore(saved):
        d.feed([_open(1.0), _close(2.0), _open(3.0)], 3.0)
        d.drain()
        assert d.held == 0
    else:
        assert d.state()["quiet"] == [] and d.state()["updates"] == [] and d.state()["windows"] == []  # nothing taken


# --- dtc_update: debounced per DTC, never ahead of its DTC's held transitions -------------------------------


def _update(t: float, spn: int, occurrence: int = 1, amber: int = 1, changed: tuple[str, ...] = ("lamps",),
            source: str = "can0/00", fmi: int = 0) -> Event:
    return Event("dtc_update", t, {"source": source, "spn": spn, "fmi": fmi, "occurrence": occurrence,
                                   "amber_warning": amber, "changed": list(changed)})


def test_a_lamp_following_a_flapping_dtc_neither_storms_nor_hides_a_new_fault() -> None:
    """The ECU's lamp follows its flapping DTC 110: each flap is a `dtc_update` (changed: lamps) for each of its three
    steady DTCs. Those are debounced per DTC, so the source stays under its bound; an unrelated DTC's first open
    goes out as its own record, at once."""
    d = DtcDebouncer(DtcPolicy(debounce_s=60, max_events_per_min=30))
    steady = (111, 112, 113)
    got: list[Event] = []
    got += d.feed([_open(0.0, spn=s) for s in steady], 0.0)[0]
    new_fault_out: list[Event] = []
    for i in range(1, 180):  # three minutes, a flap a second
        t = float(i)
        lamp = i % 2
        batch = [_open(t) if lamp else _close(t)] + [_update(t, s, amber=lamp) for s in steady]
        if i == 90:
            batch.append(_open(t, spn=5000, fmi=3))
        out, urgent = d.feed(batch, t)
        if i == 90:
            new_fault_out = [e for e in out if e.data["spn"] == 5000]
            assert urgent
        got += out
    got += d.drain()
    assert [e.kind for e in new_fault_out] == ["dtc_open"]  # its own record, at once
    assert all(e.kind != STORM for e in got)
    updates = [e for e in got if e.kind == "dtc_update"]
    for s in steady:  # the first at once, then one per period (60, 120, 180 and the drain)
        mine = [e for e in updates if e.data["spn"] == s]
        assert 3 <= len(mine) <= 4, [e.ts for e in mine]
        assert mine[0].ts == 1.0 and "updates" not in mine[0].data
        later = mine[1:]
        assert all(e.data["updates"] >= 2 and e.data["first_ts"] <= e.data["last_ts"] == e.ts for e in later)
        assert later[-1].ts == 179.0 and later[-1].data["amber_warning"] == 179 % 2  # the last one's state
        assert sum(e.data.get("updates", 1) for e in mine) == 179
    assert sum(weight(e) for e in got) == d.decoded and d.held == 0
    assert d.counters()["decoded"] == d.counters()["passed"] + d.counters()["merged"]


def test_an_update_never_goes_out_before_its_dtcs_held_open() -> None:
    d = DtcDebouncer(DtcPolicy(debounce_s=10, max_events_per_min=100))
    out, _ = d.feed([_open(0.0), _close(1.0), _open(2.0)], 2.0)  # the third transition is held
    assert [e.kind for e in out] == ["dtc_open", "dtc_close"]
    out, _ = d.feed([_update(3.0, 110, occurrence=2, changed=("occurrence",))], 3.0)
    assert out == []  # behind the held open
    out, _ = d.feed([], 10.0)
    assert [(e.kind, e.ts) for e in out] == [("dtc_open", 2.0), ("dtc_update", 3.0)]
    assert d.held == 0 and d.decoded == d.passed + d.merged


def test_a_close_supersedes_its_dtcs_pending_updates() -> None:
    d = DtcDebouncer(DtcPolicy(debounce_s=10, max_events_per_min=100))
    d.feed([_open(0.0), _update(1.0, 110, occurrence=2, changed=("occurrence",))], 1.0)  # the update: at once
    out, _ = d.feed([_update(2.0, 110, occurrence=3, changed=("occurrence",)), _update(3.0, 110, occurrence=4)], 3.0)
    assert out == [] and d.held == 2  # coalesced, waiting for the period's end
    (close,), _ = d.feed([_close(4.0)], 4.0)
    assert close.kind == "dtc_close" and close.data["updates"] == 2  # it carries the final state
    assert d.held == 0 and d.passed == 3 and d.merged == 2
    assert d.feed([], 20.0)[0] == []


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.tuples(st.floats(0.0, 4.0), st.integers(0, 1), st.sampled_from(
           ["dtc_open", "dtc_close", "dtc_update", "dtc_update"])), max_size=120),
       limit=st.integers(0, 4), batch=st.integers(1, 5))
def test_one_ecus_dtcs_keep_their_order_whatever_they_do(steps: list[tuple[float, int, str]], limit: int,
                                                           batch: int) -> None:
    """One ECU's two DTCs opening, clearing and updating within each other's periods (the case the general
    sequence above meets too rarely): every record in its DTC's order, nothing lost or twice, the counters add up
    after every batch, and an update never precedes its DTC's transitions."""
    d = DtcDebouncer(DtcPolicy(debounce_s=10.0, max_events_per_min=limit))
    inputs: dict[tuple[str, int, int], list[int]] = defaultdict(list)
    events: list[Event] = []
    t = 0.0
    for i, (dt, dtc, kind) in enumerate(steps):
        t += dt
        events.append(Event(kind, t, {"source": "can0/00", "spn": 100 + dtc, "fmi": 0, "x": i,
                                      "changed": ["lamps"]}))
        inputs[("can0/00", 100 + dtc, 0)].append(i)
    out: list[Event] = []
    for j in range(0, len(events), batch):
        out += d.feed(events[j:j + batch], events[j + batch - 1].ts if j + batch <= len(events) else None)[0]
        assert d.decoded == d.passed + d.merged + d.held
    out += d.drain()
    assert d.held == 0 and sum(weight(e) for e in out) == len(steps) == d.decoded == d.passed + d.merged
    _assert_in_order(inputs, out)


# A state as the agent saved it before updates were debounced (version 1, in the store under dtc_debounce/<bus>):
# DTC 110/0 of can0/00 holding a close and an open, can0/00's window with 2 let out, can0/01's window past its bound
# of 4 with one open merged.
V1_STATE: dict[str, Any] = json.loads(
    '{"v": 1, "clock": 105.0, "quiet": [["can0/00", 110, 0, 110.0, 2, 1, 1, 102.0, "dtc_close", 103.0, '
    '{"source": "can0/00", "sa": 0, "spn": 110, "fmi": 0, "occurrence": 1, "amber_warning": 0}]], '
    '"windows": [["can0/00", 100.0, 2, 0, 0, {}, null, null, [], 0], '
    '["can0/01", 104.0, 4, 1, 1, {"dtc_open": 1}, 104.4, 104.4, [[8, 0]], 0]]}')


def test_a_version_1_state_is_taken_back_and_goes_out_once() -> None:
    d = DtcDebouncer(DtcPolicy(debounce_s=10, max_events_per_min=8))  # the bound raised since
    assert d.restore(json.loads(json.dumps(V1_STATE))) and d.held == 3 and d.clock == 105.0
    # can0/01 is in a storm: its close is merged, but a new DTC's first open still goes out, as itself.
    out, urgent = d.feed([_close(106.0, spn=8, source="can0/01"), _open(106.0, spn=9, source="can0/01")], 106.0)
    assert [(e.kind, e.data["spn"]) for e in out] == [("dtc_open", 9)] and urgent
    (flap,) = d.feed([], 110.0)[0]  # the held pair, when its period ends
    assert flap.kind == FLAPPING and flap.data["transitions"] == 2 and flap.data["state"] == "closed"
    (storm,) = d.feed([], 164.0)[0]
    assert storm.kind == STORM and storm.data["transitions"] == 2 and storm.data["open"] == []
    assert storm.data["kinds"] == {"dtc_open": 1, "dtc_close": 1}
    assert d.held == 0 and d.drain() == [] and d.state()["v"] == 2
    # What it saves now is taken back as it was.
    d.feed([_open(200.0), _update(201.0, 110), _update(202.0, 110)], 202.0)
    again = DtcDebouncer(DtcPolicy(debounce_s=10, max_events_per_min=8))
    assert again.restore(_through_json(d.state())) and again.state() == d.state() and again.held == 1


@pytest.mark.parametrize("saved", [
    V1_STATE | {"v": 3},  # a version this agent does not know (saved by a newer one)
    V1_STATE | {"v": 2},  # version 2 without its updates
    {**V1_STATE, "v": 2, "updates": [], "quiet": V1_STATE["quiet"]},  # version 2 rows are longer
    {"v": 2, "clock": 1.0, "quiet": [], "windows": [],  # an update waiting behind transitions that are not held
     "updates": [["can0/00", 110, 0, None, 1, 1.0, 1.0, {}, ["lamps"]]]},
])
def test_an_unknown_or_damaged_state_is_refused(saved: Any) -> None:
    d = DtcDebouncer()
    assert not d.restore(saved) and d.held == 0 and d.clock == -math.inf


def test_update_noise_past_the_bound_never_merges_a_first_open() -> None:
    """An ECU with eight active DTCs whose lamp changes: eight first updates at once, past the share of the bound
    other events may use. The source storms, yet a new DTC's first open goes out as itself: half the bound is kept
    for first opens. Only first opens past the whole bound are merged (and named in the summary)."""
    d = DtcDebouncer(DtcPolicy(debounce_s=60, max_events_per_min=10))  # 5 for any event, 5 more for first opens
    assert len(d.feed([_open(0.0, spn=100 + i) for i in range(8)], 0.0)[0]) == 8
    out, _ = d.feed([_update(61.0, 100 + i) for i in range(8)], 61.0)  # a new window
    assert len(out) == 5 and d.held == 3  # the rest merged into the storm summary
    out, urgent = d.feed([_open(62.0, spn=5000, fmi=3), _update(62.0, 101)], 62.0)
    assert [(e.kind, e.data["spn"]) for e in out] == [("dtc_open", 5000)] and urgent
    out, _ = d.feed([_open(63.0, spn=5001 + i) for i in range(5)], 63.0)
    assert [e.data["spn"] for e in out] == [5001, 5002, 5003, 5004]  # the bound: 10 events in the window
    (storm,) = d.feed([], 121.0)[0]
    assert storm.data["kinds"] == {"dtc_update": 4, "dtc_open": 1} and storm.data["open"] == [[5005, 0]]
    assert d.decoded == d.passed + d.merged + d.held and d.held == 0
