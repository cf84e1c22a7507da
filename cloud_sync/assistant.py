"""The maintenance assistant (docs/assistant.md): a workshop's question in, an answer out, from the fleet database
and the maintenance knowledge base only, with the rows and documents it used. No cloud AI service.

    kb = KnowledgeBase(cfg.assistant.kb_dirs, cfg.assistant.index_path)
    answer = Assistant(db, kb, cfg.assistant.season_start).ask("what is wrong with harvester 7?")
    answer.answer, answer.intent, answer.slots, answer.sources, answer.clarify, answer.to_json()

Understanding is cloud_sync/assistant_understand.py (pure), the knowledge base cloud_sync/assistant_kb.py, the
answer's shape cloud_sync/assistant_answer.py; the intents' queries are here.

Every number in an answer comes from a query whose rows are named in the answer's sources; the knowledge base gives
words (what a code means, what to check first), never figures about the fleet. Nothing matched: "I don't know",
with what it can answer. A slot that matched several things: a question back, with the choices.

The queries go through indexes (tests/test_assistant.py checks the plans of the ones that touch samples): the
latest value of a signal is one descent of (vehicle, signal_id, ts); alerts are read by (vehicle, state, ts) or
(ts); DTC and drift events by (vehicle, kind, ts), newest first with a cap.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cloud_sync.assistant_answer import Answer, Source
from cloud_sync.assistant_kb import Hit, KnowledgeBase
from cloud_sync.assistant_understand import DAY, INTENTS, MAX_QUESTION_CHARS, Parsed, Span, parse, season_start
from cloud_sync.db import FleetDB
from cloud_sync.present import clean_alert, finite, status_dtcs
from harvester_common.j1939_text import DtcText, fmi_text

__all__ = ["INTENTS", "Answer", "Assistant", "KnowledgeBase", "Source"]

MAX_EVENTS_READ = 2000  # a vehicle's latest DTC events read to find the active ones (a storm is summarised anyway)
MAX_MARKS_READ = 200  # a vehicle's latest drift reports and openings read to find when its model last changed
MAX_LISTED = 10  # rows named one by one in an answer's text; the sources keep them all
ONLINE_S = 900.0  # a vehicle heard from this recently counts as synced "now"

CAN_ANSWER = (
    "which harvesters need attention today (and why); what is wrong with harvester 7; why did the alert on H-007 "
    "fire; what does SPN 110 FMI 0 mean and what to check first; when did H-007 last have a coolant alert, and how "
    "many this season; which vehicles have not synced since yesterday; what changed on H-007 since the last model "
    "update; the latest oil pressure of H-002; how to check a fan drive")

Q_VEHICLES = "SELECT vehicle, fleet, online, last_seen, status FROM vehicles ORDER BY vehicle"
Q_OPEN = ("SELECT a.vehicle, a.seq, a.alert_id, a.ts, a.record FROM alerts a WHERE a.state='open'{v} AND a.seq = "
          "(SELECT MAX(b.seq) FROM alerts b WHERE b.vehicle=a.vehicle AND b.alert_id=a.alert_id) ORDER BY a.ts")
# One kind at a time, newest first: each stops after its LIMIT rows of the (vehicle, kind, ts) index, where an IN over
# the kinds would sort all of a vehicle's DTC events (a storm's million) to find the latest.
DTC_KINDS = ("dtc_open", "dtc_update", "dtc_close")
Q_DTC = f"SELECT seq, kind, ts, record FROM events WHERE vehicle=? AND kind=? ORDER BY ts DESC LIMIT {MAX_EVENTS_READ}"
Q_LAST_SAMPLE = ("SELECT seq, ts, value FROM samples WHERE vehicle=? AND signal_id=? AND ts<=? "
                 "ORDER BY ts DESC LIMIT 1")
Q_OPENED_V = ("SELECT seq, alert_id, ts, record FROM alerts WHERE vehicle=? AND state='open' AND ts>=? AND ts<? "
              "ORDER BY ts, seq")
Q_OPENED = ("SELECT vehicle, seq, alert_id, ts, record FROM alerts WHERE state='open' AND ts>=? AND ts<? "
            "ORDER BY ts, seq")
Q_LAST_FAULT = ("SELECT seq, alert_id, ts, record FROM alerts WHERE vehicle=? AND state='open' AND label=? "
                "ORDER BY ts DESC LIMIT 1")
Q_NOT_SYNCED = "SELECT vehicle, fleet, last_seen FROM vehicles WHERE last_seen < ? ORDER BY last_seen, vehicle"
Q_MARKS_ALERTS = (f"SELECT seq, ts, record FROM alerts WHERE vehicle=? AND state='open' ORDER BY ts DESC "
                  f"LIMIT {MAX_MARKS_READ}")
Q_MARKS_DRIFT = (f"SELECT seq, ts, record FROM events WHERE vehicle=? AND kind='drift' ORDER BY ts DESC "
                 f"LIMIT {MAX_MARKS_READ}")
Q_DTC_SINCE = ("SELECT seq, ts, record FROM events WHERE vehicle=? AND kind='dtc_open' AND ts>=? AND ts<? "
               "ORDER BY ts")
Q_STATUS = "SELECT status FROM vehicles WHERE vehicle=?"
Q_BREAKDOWNS = "SELECT id, at, fault, note FROM breakdowns WHERE vehicle=? AND at>=? AND at<? ORDER BY at"


def when(ts: float | None, seconds: bool = False) -> str:
    """A time for people, in UTC; to the second where a span is short (a model's window is 30 s)."""
    try:
        fmt = "%Y-%m-%d %H:%M:%S UTC" if seconds else "%Y-%m-%d %H:%M UTC"
        return time.strftime(fmt, time.gmtime(ts)) if ts is not None else "?"
    except (OverflowError, OSError, ValueError):
        return "?"


def _rec(text: Any) -> dict[str, Any]:
    try:
        v = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return {}
    return v if isinstance(v, dict) else {}


def _n(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _fmt(v: float | None) -> str:
    return "?" if v is None else f"{v:.4g}" if abs(v) < 1e6 else f"{v:.6g}"


@dataclass(slots=True)
class Dtc:
    spn: int
    fmi: int
    text: str
    since: float | None  # when its event says it opened; None: from the vehicle's status, which does not say
    seq: int | None  # the event it was read from; None: from the vehicle's status
    occurrence: int | None = None
    reported: float | None = None  # the time of the status that listed it

    def told(self) -> str:
        """When, for people: since it opened (from its events), or when the vehicle last said it was active."""
        if self.seq is not None:
            return f"since {when(self.since)}"
        occ = f"{_n(self.occurrence, 'occurrence')}, " if self.occurrence else ""
        return f"({occ}active in the vehicle's status of {when(self.reported)})"


@dataclass(slots=True)
class ActiveDtcs:
    dtcs: list[Dtc]
    source: Source  # the rows they were read from: the vehicle's status, or its DTC events
    more: int = 0  # active DTCs the vehicle's status says it did not list


class Assistant:
    """`Assistant(db, kb).ask("what is wrong with harvester 7?")`; read-only over both."""

    def __init__(self, db: FleetDB, kb: KnowledgeBase, season_start: str = "10-01",
                 dtc_text: DtcText | None = None) -> None:
        self.db, self.kb, self.season_start = db, kb, season_start
        self.dtc_text = dtc_text or DtcText()

    # --- context: what a question may name -------------------------------------------------------------------

    def _vehicles(self) -> list[tuple[Any, ...]]:
        return self.db.read(Q_VEHICLES)

    def _signals(self) -> dict[str, list[tuple[int, str]]]:
        out: dict[str, list[tuple[int, str]]] = {}
        for sid, name, unit in self.db.read("SELECT id, name, unit FROM signals ORDER BY id"):
            out.setdefault(str(name), []).append((int(sid), str(unit)))
        return out

    def understand(self, question: str, now: float | None = None) -> Parsed:
        now = time.time() if now is None else now
        vehicles = [str(r[0]) for r in self._vehicles()]
        # Alert ids are only looked up when the question holds something that looks like one.
        ids: list[str] = []
        for tok in re.findall(r"\b[0-9a-fA-F]{6,64}\b", question[:MAX_QUESTION_CHARS]):
            ids += [str(r[0]) for r in self.db.read(
                "SELECT DISTINCT alert_id FROM alerts WHERE alert_id >= ? AND alert_id < ? LIMIT 5",
                (tok.lower(), tok.lower() + "\U0010ffff"))]
        return parse(question, vehicles, list(self._signals()), ids, now, self.season_start)

    def ask(self, question: str, now: float | None = None) -> Answer:
        now = time.time() if now is None else now
        p = self.understand(question, now)
        slots = p.slots()
        if p.vehicle_choices:
            return Answer(f"Which vehicle do you mean by \"{p.vehicle_mention}\": {', '.join(p.vehicle_choices)}?",
                          p.intent, slots, [self._vehicle_source(p.vehicle_choices)], clarify=p.vehicle_choices)
        if p.vehicle_mention and p.vehicle is None and p.intent not in ("dtc_meaning", "how_to"):
            known = [str(r[0]) for r in self._vehicles()]
            return Answer(f"I don't know a vehicle \"{p.vehicle_mention}\". The vehicles in the database are: "
                          f"{', '.join(known[:40]) or 'none yet'}.", p.intent, slots,
                          [self._vehicle_source(known)])
        handler = getattr(self, "_" + p.intent)
        out: Answer = handler(p, now)
        out.slots = slots
        return out

    # --- intents ---------------------------------------------------------------------------------------------

    def _unknown(self, p: Parsed, now: float) -> Answer:
        return Answer(f"I don't know how to answer that from the fleet's data. I can answer, for example: "
                      f"{CAN_ANSWER}.", "unknown")

    def _vehicle_source(self, vehicles: Sequence[str]) -> Source:
        return Source("db", "vehicles", [{"vehicle": v} for v in vehicles], Q_VEHICLES)

    def _open_alerts(self, vehicle: str | None) -> list[tuple[str, int, dict[str, Any]]]:
        sql = Q_OPEN.format(v=" AND a.vehicle=?" if vehicle else "")
        rows = self.db.read(sql, (vehicle,) if vehicle else ())
        return [(str(v), int(s), clean_alert({**_rec(r), "vehicle": v, "seq": s, "alert_id": a, "ts": ts}))
                for v, s, a, ts, r in rows]

    def _active_dtcs(self, vehicle: str, status: dict[str, Any]) -> ActiveDtcs:
        """The vehicle's active DTCs: the list its last status message carries when it has one (the vehicle's own
        set, however old the DTC or lost its events), else rebuilt from its newest DTC events (an agent from before
        the status carried them, or a vehicle whose last word was its Will)."""
        listed = status_dtcs(status)
        if listed is not None:
            at = finite(status.get("ts"))
            dtcs = [Dtc(d["spn"], d["fmi"], self.dtc_text.words(d["spn"], d["fmi"], d["text"]), None, None,
                        d["occurrence"], at) for d in listed.active]
            return ActiveDtcs(dtcs, Source("db", "vehicles", [{"vehicle": vehicle, "field": "status.dtcs"}],
                                           Q_STATUS), listed.more)
        latest: dict[tuple[str, int, int], tuple[str, float, int, dict[str, Any]]] = {}
        rows = [r for kind in DTC_KINDS for r in self.db.read(Q_DTC, (vehicle, kind))]
        rows.sort(key=lambda r: (float(r[2]), int(r[0])), reverse=True)
        for seq, kind, ts, rec in rows:
            d = _rec(rec).get("data")
            if not isinstance(d, dict) or not isinstance(d.get("spn"), int) or not isinstance(d.get("fmi"), int):
                continue
            key = (str(d.get("source", "")), int(d["spn"]), int(d["fmi"]))
            if key not in latest:
                latest[key] = (str(kind), float(ts), int(seq), d)
        out = []
        for (_, spn, fmi), (kind, ts, seq, d) in sorted(latest.items(), key=lambda kv: kv[1][1]):
            if kind != "dtc_close":
                out.append(Dtc(spn, fmi, self.dtc_text.words(spn, fmi, d.get("text")) or f"SPN {spn}, FMI {fmi}",
                               ts, seq))
        return ActiveDtcs(out, Source("db", "events", [{"vehicle": vehicle, "seq": d.seq} for d in out], Q_DTC))

    def _status(self, row: tuple[Any, ...]) -> dict[str, Any]:
        return _rec(row[4]) if row[4] else {}

    def _vehicle_findings(self, vehicle: str, row: tuple[Any, ...], span: Span | None, sources: list[Source],
                          fleet: tuple[list[tuple[str, int, dict[str, Any]]], list[tuple[Any, ...]]] | None = None,
                          ) -> list[str]:
        """Why a vehicle needs looking at, each reason with its rows added to `sources`. `fleet`: the fleet's open
        alerts and the alerts opened in `span`, read once for every vehicle (else they are read for this one)."""
        reasons: list[str] = []
        if fleet is not None:
            opened = [o for o in fleet[0] if o[0] == vehicle]
            in_span = [r[1:] for r in fleet[1] if r[0] == vehicle]
            q_open, q_span = Q_OPEN.format(v=""), Q_OPENED
        else:
            opened = self._open_alerts(vehicle)
            in_span = self.db.read(Q_OPENED_V, (vehicle, span.since, span.until)) if span is not None else []
            q_open, q_span = Q_OPEN.format(v=" AND a.vehicle=?"), Q_OPENED_V
        if opened:
            sources.append(Source("db", "alerts", [{"vehicle": v, "seq": s} for v, s, _ in opened], q_open))
            for _, _, a in opened[:MAX_LISTED]:
                reasons.append(f"open alert {a['label'] or '(no label)'} since {when(a['ts'])} (score "
                               f"{_fmt(a['score'])}, alert {a['alert_id'][:12]})")
        if span is not None:
            closed = [r for r in in_span if str(r[1]) not in {a["alert_id"] for _, _, a in opened}]
            if closed:
                sources.append(Source("db", "alerts", [{"vehicle": vehicle, "seq": int(r[0])} for r in closed],
                                      q_span))
                labels = Counter(str(_rec(r[3]).get("label") or "(no label)") for r in closed)
                reasons.append(f"{_n(len(closed), 'alert')} opened and closed {span.label}: "
                               + ", ".join(f"{k} {v}" for k, v in sorted(labels.items())))
        st = self._status(row)
        active = self._active_dtcs(vehicle, st)
        if active.dtcs or active.more:
            sources.append(active.source)
            for d in active.dtcs[:MAX_LISTED]:
                reasons.append(f"active DTC {d.text} {d.told()}")
            unlisted = len(active.dtcs[MAX_LISTED:]) + active.more
            if unlisted:
                reasons.append(f"{_n(unlisted, 'more active DTC')}")
        drift = st.get("drift")
        if isinstance(drift, dict) and drift.get("drift") is True:
            sources.append(Source("db", "vehicles", [{"vehicle": vehicle}], "SELECT status FROM vehicles WHERE "
                                  "vehicle=?"))
            feats = [f for f in drift.get("features", []) if isinstance(f, str)][:3] if isinstance(
                drift.get("features"), list) else []
            reasons.append("its data drifted from what the model was trained on"
                           + (f" ({', '.join(feats)})" if feats else ""))
        return reasons

    def _needs_attention(self, p: Parsed, now: float) -> Answer:
        span = p.span or Span(now - now % DAY, now, f"today ({time.strftime('%Y-%m-%d', time.gmtime(now))})")
        sources: list[Source] = []
        lines = []
        rows = self._vehicles()
        fleet = (self._open_alerts(None), self.db.read(Q_OPENED, (span.since, span.until)))
        for row in rows:
            v = str(row[0])
            reasons = self._vehicle_findings(v, row, span, sources, fleet)
            if reasons:
                lines.append(f"- {v}: " + "; ".join(reasons))
        silent = [str(r[0]) for r in rows if float(r[3]) < span.since]
        if silent:
            sources.append(Source("db", "vehicles", [{"vehicle": v} for v in silent], Q_NOT_SYNCED))
            lines.append(f"- not heard from {span.label}: {', '.join(silent)}")
        if not rows:
            return Answer("No vehicle has reported yet: nothing to look at.", "needs_attention",
                          sources=[self._vehicle_source([])])
        if not lines:
            sources.append(self._vehicle_source([str(r[0]) for r in rows]))
            return Answer(f"Nothing needs attention {span.label}: no open alert, no active DTC, no drift on "
                          f"{_n(len(rows), 'vehicle')}.", "needs_attention", sources=sources)
        n = len([ln for ln in lines if not ln.startswith("- not heard")])
        return Answer(f"{_n(n, 'vehicle')} need{'s' if n == 1 else ''} attention {span.label}:\n" + "\n".join(lines),
                      "needs_attention", sources=sources)

    def _row(self, vehicle: str) -> tuple[Any, ...] | None:
        rows = self.db.read("SELECT vehicle, fleet, online, last_seen, status FROM vehicles WHERE vehicle=?",
                            (vehicle,))
        return rows[0] if rows else None

    def _need_vehicle(self, p: Parsed, what: str) -> Answer:
        known = [str(r[0]) for r in self._vehicles()]
        return Answer(f"Which vehicle? Name one to {what}, e.g. \"{known[0] if known else 'H-007'}\". Known: "
                      f"{', '.join(known[:40]) or 'none yet'}.", p.intent, sources=[self._vehicle_source(known)],
                      clarify=known[:40])

    def _vehicle_status(self, p: Parsed, now: float) -> Answer:
        if p.vehicle is None:
            return self._need_vehicle(p, "look at")
        row = self._row(p.vehicle)
        assert row is not None
        sources: list[Source] = [Source("db", "vehicles", [{"vehicle": p.vehicle}],
                                        "SELECT vehicle, fleet, online, last_seen, status FROM vehicles WHERE "
                                        "vehicle=?")]
        reasons = self._vehicle_findings(p.vehicle, row, p.span, sources)
        st = self._status(row)
        seen = f"last heard from {when(float(row[3]))} ({'online' if row[2] else 'offline'})"
        model = st.get("model_version")
        model_txt = f"; model version {model}" if isinstance(model, str) and model else ""
        if not reasons:
            return Answer(f"Nothing is wrong with {p.vehicle} that the data shows: no open alert, no active DTC, "
                          f"no drift; {seen}{model_txt}.", "vehicle_status", sources=sources)
        docs = []
        for fault in {a[2]["label"] for a in self._open_alerts(p.vehicle) if a[2]["label"]}:
            first = self._check_first(fault=fault)
            if first is not None:
                sources.append(Source("kb", path=first.path, heading=first.heading))
                docs.append(f"For {fault}, check first ({first.title}):\n{first.body}")
        return Answer(f"{p.vehicle}: " + "; ".join(reasons) + f". It was {seen}{model_txt}."
                      + ("\n\n" + "\n\n".join(docs) if docs else ""), "vehicle_status", sources=sources)

    def _check_first(self, *, fault: str | None = None, spn: int | None = None) -> Hit | None:
        hits = self.kb.covering(fault=fault, spn=spn)
        if spn is not None:  # the document about the SPN alone before one about a fault that names it too
            hits = sorted(hits, key=lambda h: (not h.title.startswith(f"SPN {spn} "), h.spns != (spn,)))
        firsts = [h for h in hits if "check first" in h.heading.lower()]
        return firsts[0] if firsts else (hits[0] if hits else None)

    def _pick_alert(self, p: Parsed) -> tuple[str, int, dict[str, Any]] | list[str] | None:
        if p.alert_id is not None:
            rows = self.db.read("SELECT vehicle, seq, alert_id, ts, record FROM alerts WHERE alert_id=? "
                                "ORDER BY seq LIMIT 1", (p.alert_id,))
        elif p.vehicle is not None:
            opened = self._open_alerts(p.vehicle)
            if opened:
                return opened[-1]
            rows = self.db.read("SELECT vehicle, seq, alert_id, ts, record FROM alerts WHERE vehicle=? AND "
                                "state='open' ORDER BY ts DESC, seq DESC LIMIT 1", (p.vehicle,))
        else:
            opened = self._open_alerts(None)
            if len(opened) == 1:
                return opened[0]
            return [f"{v} {a['label']} {a['alert_id'][:12]}" for v, _, a in opened] or None
        if not rows:
            return None
        v, s, a, ts, r = rows[0]
        return str(v), int(s), clean_alert({**_rec(r), "vehicle": v, "seq": s, "alert_id": a, "ts": ts})

    def _alert_why(self, p: Parsed, now: float) -> Answer:
        picked = self._pick_alert(p)
        if picked is None:
            who = p.vehicle or "the fleet"
            return Answer(f"I found no alert for {who} to explain.", "alert_why",
                          sources=[Source("db", "alerts", [], Q_OPEN.format(v=" AND a.vehicle=?" if p.vehicle
                                                                              else ""))])
        if isinstance(picked, list):
            return Answer("Which alert? These are open: " + "; ".join(picked) + ". Name the vehicle or the alert id.",
                          "alert_why", sources=[Source("db", "alerts", [], Q_OPEN.format(v=""))], clarify=picked)
        vehicle, seq, a = picked
        sources = [Source("db", "alerts", [{"vehicle": vehicle, "seq": seq}],
                          "SELECT record FROM alerts WHERE vehicle=? AND seq=?")]
        text = [f"Alert {a['alert_id']} on {vehicle} opened {when(a['ts'])} ({a['state']}): the model "
                f"{a['model'] or '?'} version {a['model_version'] or '?'} scored {_fmt(a['score'])}"
                + (f" against a threshold of {_fmt(finite(a.get('threshold')))}" if finite(a.get("threshold"))
                   is not None else "")
                + f" and labelled it {a['label'] or '(no label)'}."]
        ws, we = finite(a.get("window_start")), finite(a.get("window_end"))
        if ws is not None and we is not None:
            text.append(f"The window it scored: {when(ws, seconds=True)} to {when(we, seconds=True)}.")
        feats = a["top_features"]
        if feats:
            text.append("Top features: " + ", ".join(f"{f} ({_fmt(c)})" for f, c in feats[:5]) + ".")
        at = we if we is not None else a["ts"]
        signals = self._signals()
        names = list(dict.fromkeys([f.split(":", 1)[0] for f, _ in feats[:5]] + list(a["snapshot"])[:5]))
        values, keys = [], []
        for name in names[:8]:
            best: tuple[float, int, float, str] | None = None
            for sid, unit in signals.get(name, []):
                rows = self.db.read(Q_LAST_SAMPLE, (vehicle, sid, at)) if at is not None else []
                if rows and (best is None or float(rows[0][1]) > best[0]):
                    best = (float(rows[0][1]), int(rows[0][0]), float(rows[0][2]), unit)
            if best is not None:
                keys.append({"vehicle": vehicle, "seq": best[1]})
                values.append(f"{name} = {_fmt(best[2])} {best[3]} at {when(best[0])}".rstrip())
            elif finite(a["snapshot"].get(name)) is not None:
                values.append(f"{name} = {_fmt(finite(a['snapshot'][name]))} (the alert's snapshot)")
        if values:
            text.append("Values at the time: " + "; ".join(values) + ".")
        if keys:
            sources.append(Source("db", "samples", keys, Q_LAST_SAMPLE))
        if a["label"]:
            first = self._check_first(fault=a["label"])
            if first is not None:
                sources.append(Source("kb", path=first.path, heading=first.heading))
                text.append(f"What to check first ({first.title}):\n{first.body}")
        return Answer("\n".join(text), "alert_why", sources=sources)

    def _dtc_meaning(self, p: Parsed, now: float) -> Answer:
        assert p.spn is not None
        name = self.dtc_text.spn_name(p.spn)
        first = self._check_first(spn=p.spn)
        if name is None and first is not None and first.title.startswith(f"SPN {p.spn} "):
            name = first.title.removeprefix(f"SPN {p.spn} ")  # the knowledge base's own document names it
        if p.fmi is not None:
            head = f"SPN {p.spn} {name or '(unknown)'}, FMI {p.fmi}: {fmi_text(p.fmi)}."
        else:
            head = f"SPN {p.spn} is {name or '(an SPN I have no name for)'}; name the FMI to know how it failed."
        sources: list[Source] = [Source("kb", path="harvester_common/j1939_text.py",
                                        heading="FMI_TEXT, BUILTIN_SPN_NAMES (SAE J1939-73)")]
        text = [head]
        if first is not None:
            sources.append(Source("kb", path=first.path, heading=first.heading))
            text.append(f"What to check first ({first.title}):\n{first.body}")
        else:
            text.append("The knowledge base has no procedure for this SPN.")
        # How often the fleet saw it: counted from the events, per vehicle through (vehicle, kind, ts).
        span = p.span or Span(now - 30 * DAY, now, "in the last 30 days")
        seen: dict[str, list[int]] = {}
        for row in self._vehicles():
            v = str(row[0])
            for seq, _ts, rec in self.db.read(Q_DTC_SINCE, (v, span.since, span.until)):
                d = _rec(rec).get("data")
                if isinstance(d, dict) and d.get("spn") == p.spn and (p.fmi is None or d.get("fmi") == p.fmi):
                    seen.setdefault(v, []).append(int(seq))
        if seen:
            sources.append(Source("db", "events", [{"vehicle": v, "seq": s} for v, ss in seen.items() for s in ss],
                                  Q_DTC_SINCE))
            text.append(f"On the fleet {span.label}: " + ", ".join(
                f"{v} {_n(len(ss), 'time')}" for v, ss in sorted(seen.items())) + ".")
        else:
            sources.append(Source("db", "events", [], Q_DTC_SINCE))
            text.append(f"No vehicle reported it {span.label}.")
        return Answer("\n".join(text), "dtc_meaning", sources=sources)

    def _fault_history(self, p: Parsed, now: float) -> Answer:
        assert p.fault is not None
        if p.span is not None:
            span = p.span
        else:
            s = season_start(now, self.season_start)
            span = Span(s, now, f"this season (since {time.strftime('%Y-%m-%d', time.gmtime(s))})")
        vehicles = [p.vehicle] if p.vehicle else [str(r[0]) for r in self._vehicles()]
        sources: list[Source] = []
        per: dict[str, list[tuple[int, float]]] = {}
        last: dict[str, tuple[int, float, dict[str, Any]]] = {}
        for v in vehicles:
            rows = [r for r in self.db.read(Q_OPENED_V, (v, span.since, span.until))
                    if _rec(r[3]).get("label") == p.fault]
            if rows:
                per[v] = [(int(r[0]), float(r[2])) for r in rows]
            lr = self.db.read(Q_LAST_FAULT, (v, p.fault))
            if lr:
                last[v] = (int(lr[0][0]), float(lr[0][2]), _rec(lr[0][3]))
        sources.append(Source("db", "alerts", [{"vehicle": v, "seq": s} for v, xs in per.items() for s, _ in xs],
                              Q_OPENED_V))
        total = sum(len(x) for x in per.values())
        bd = []
        for v in vehicles:
            bd += [(v, r) for r in self.db.read(Q_BREAKDOWNS, (v, span.since, span.until)) if r[2] == p.fault]
        if p.vehicle:
            v = p.vehicle
            if v in last:
                seq, ts, rec = last[v]
                sources.append(Source("db", "alerts", [{"vehicle": v, "seq": seq}], Q_LAST_FAULT))
                head = (f"{v} last had a {p.fault} alert on {when(ts)} (score {_fmt(finite(rec.get('score')))}, "
                        f"model version {rec.get('model_version', '?')}).")
            else:
                sources.append(Source("db", "alerts", [], Q_LAST_FAULT))
                head = f"{v} has never had a {p.fault} alert."
            text = [head, f"{p.fault} alerts on {v} {span.label}: {total}."]
        else:
            text = [f"{p.fault} alerts {span.label}: {total} on the fleet"
                    + (": " + ", ".join(f"{v} {len(x)}" for v, x in sorted(per.items())) if per else "") + "."]
            if last:
                v, (seq, ts, _r) = max(last.items(), key=lambda kv: kv[1][1])
                sources.append(Source("db", "alerts", [{"vehicle": v, "seq": seq}], Q_LAST_FAULT))
                text.append(f"The latest opened on {v} on {when(ts)}.")
        if bd:
            sources.append(Source("db", "breakdowns", [{"id": int(r[0])} for _, r in bd], Q_BREAKDOWNS))
            text.append(f"Breakdowns recorded as {p.fault} {span.label}: {len(bd)} ("
                        + ", ".join(f"{v} {when(float(r[1]))}" for v, r in bd[:MAX_LISTED]) + ").")
        return Answer(" ".join(text), "fault_history", sources=sources)

    def _not_synced(self, p: Parsed, now: float) -> Answer:
        if p.span is None:
            cut, label = now - DAY, "in the last 24 hours"
        elif p.span.after_since:
            cut, label = p.span.until, f"since {p.span.label}"
        else:
            cut, label = p.span.since, f"{p.span.label}"
        rows = self.db.read(Q_NOT_SYNCED, (cut,))
        src = [Source("db", "vehicles", [{"vehicle": str(r[0])} for r in rows], Q_NOT_SYNCED)]
        if not rows:
            return Answer(f"Every vehicle has synced {label} (since {when(cut)}).", "not_synced", sources=src)
        items = [f"{r[0]} (last {when(float(r[2]))})" for r in rows]
        return Answer(f"{_n(len(rows), 'vehicle')} {'has' if len(rows) == 1 else 'have'} not synced {label} "
                      f"(nothing since {when(cut)}): " + ", ".join(items) + ".", "not_synced", sources=src)

    def _model_update(self, vehicle: str) -> tuple[float, str, str, list[Source]] | None:
        """When the vehicle's model version last changed, from its alert openings and drift reports (which name
        the version that scored): (time of the first record naming the current version, current, previous)."""
        marks: list[tuple[float, str, str, int]] = []
        for table, sql in (("alerts", Q_MARKS_ALERTS), ("events", Q_MARKS_DRIFT)):
            for seq, ts, rec in self.db.read(sql, (vehicle,)):
                r = _rec(rec)
                if table == "events":  # a drift report: what it is about is in its data
                    data = r.get("data")
                    r = data if isinstance(data, dict) else {}
                version = r.get("model_version")
                if isinstance(version, str) and version:
                    marks.append((float(ts), version, table, int(seq)))
        marks.sort(reverse=True)
        if not marks:
            return None
        current = marks[0][1]
        first = marks[0]
        for m in marks:
            if m[1] != current:
                return first[0], current, m[1], [Source("db", first[2], [{"vehicle": vehicle, "seq": first[3]}],
                                                        Q_MARKS_ALERTS if first[2] == "alerts" else Q_MARKS_DRIFT),
                                                 Source("db", m[2], [{"vehicle": vehicle, "seq": m[3]}],
                                                        Q_MARKS_ALERTS if m[2] == "alerts" else Q_MARKS_DRIFT)]
            first = m
        return None

    def _model_changes(self, p: Parsed, now: float) -> Answer:
        if p.vehicle is None:
            return self._need_vehicle(p, "compare before and after its last model update")
        v = p.vehicle
        upd = self._model_update(v)
        if upd is None:
            return Answer(f"I see no model update on {v}: its alerts and drift reports name one version only (or "
                          f"none).", "model_changes",
                          sources=[Source("db", "alerts", [], Q_MARKS_ALERTS), Source("db", "events", [],
                                                                                        Q_MARKS_DRIFT)])
        t, cur, prev, sources = upd
        length = max(now - t, 1.0)
        before = Span(t - length, t, "before")
        after = Span(t, now, "since")
        text = [f"{v} moved from model version {prev} to {cur} around {when(t)} (the first record naming {cur}). "
                f"Since then ({length / DAY:.1f} days) compared with the same length before:"]
        for label, span in (("since", after), ("before", before)):
            al = self.db.read(Q_OPENED_V, (v, span.since, span.until))
            dt = self.db.read(Q_DTC_SINCE, (v, span.since, span.until))
            sources.append(Source("db", "alerts", [{"vehicle": v, "seq": int(r[0])} for r in al], Q_OPENED_V))
            sources.append(Source("db", "events", [{"vehicle": v, "seq": int(r[0])} for r in dt], Q_DTC_SINCE))
            labels = Counter(str(_rec(r[3]).get("label") or "(no label)") for r in al)
            text.append(f"- {label}: {_n(len(al), 'alert')}"
                        + (" (" + ", ".join(f"{k} {n}" for k, n in sorted(labels.items())) + ")" if al else "")
                        + f", {_n(len(dt), 'DTC')} opened")
        row = self._row(v)
        st = self._status(row) if row else {}
        drift = st.get("drift")
        if isinstance(drift, dict) and isinstance(drift.get("drift"), bool):
            sources.append(Source("db", "vehicles", [{"vehicle": v}], "SELECT status FROM vehicles WHERE vehicle=?"))
            text.append(f"Its latest status says drift: {'yes' if drift['drift'] else 'no'}.")
        return Answer("\n".join(text), "model_changes", sources=sources)

    def _signal_value(self, p: Parsed, now: float) -> Answer:
        assert p.signal is not None
        if p.vehicle is None:
            return self._need_vehicle(p, f"read {p.signal} of")
        best: tuple[float, int, float, str] | None = None
        for sid, unit in self._signals().get(p.signal, []):
            rows = self.db.read(Q_LAST_SAMPLE, (p.vehicle, sid, now))
            if rows and (best is None or float(rows[0][1]) > best[0]):
                best = (float(rows[0][1]), int(rows[0][0]), float(rows[0][2]), unit)
        if best is None:
            return Answer(f"{p.vehicle} has sent no {p.signal} sample.", "signal_value",
                          sources=[Source("db", "samples", [], Q_LAST_SAMPLE)])
        return Answer(f"The latest {p.signal} of {p.vehicle}: {_fmt(best[2])} {best[3]} at {when(best[0])}.",
                      "signal_value", sources=[Source("db", "samples", [{"vehicle": p.vehicle, "seq": best[1]}],
                                                      Q_LAST_SAMPLE)])

    def _how_to(self, p: Parsed, now: float) -> Answer:
        hits = self.kb.search(p.question, limit=3)
        generic = re.search(r"\b(procedure|check|steps|what should|what do we|look for)\b", p.question.lower())
        if p.fault is not None and (generic or not any(p.fault in h.faults for h in hits[:1])):
            first = self._check_first(fault=p.fault)  # a fault's procedure begins with what to check first
            hits = ([first] if first else []) + [h for h in hits if h != first]
        if not hits:
            return Answer(f"I don't know: the knowledge base has nothing on that. I can answer, for example: "
                          f"{CAN_ANSWER}.", "how_to")
        h = hits[0]
        text = f"{h.title}, \"{h.heading}\":\n{h.body}"
        more = [x for x in hits[1:3] if (x.path, x.heading) != (h.path, h.heading)]
        if more:
            text += "\n\nSee also: " + "; ".join(f"{x.title}, \"{x.heading}\"" for x in more)
        return Answer(text, "how_to", sources=[Source("kb", path=x.path, heading=x.heading) for x in [h, *more]])
