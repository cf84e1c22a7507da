"""What a question asks: an intent and its slots (vehicle, fault, signal, SPN/FMI, alert, time span). Pure: the
vehicles and signals it may name are handed in; no database, no clock (`now` is an argument).

Tolerant of typos and phrasing, with the standard library only: words close to the vocabulary are corrected first
(difflib, ratio >= 0.8, words of 4 letters or more), then patterns decide. A vehicle is matched by its id ("H-007"),
by its letters and number ("h7", "h-07", "harvester 7": "harvester" and "truck" narrow the letters, "vehicle",
"machine", "unit", "#" do not), or by a close spelling of a name ("piker-north"). A mention that matches several
vehicles is ambiguous (the answer asks which), one that matches none is unknown (the answer says so).
"""

from __future__ import annotations

import calendar
import difflib
import itertools
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from harvester_common.j1939_text import FMI_MAX, SPN_MAX, words_of

INTENTS = ("needs_attention", "vehicle_status", "alert_why", "dtc_meaning", "fault_history", "not_synced",
           "model_changes", "signal_value", "how_to", "unknown")
MAX_QUESTION_CHARS = 500  # a question longer than this is cut: no one types more, and matching stays cheap
DAY = 86400.0
_UNIT = {"hr": "hour", "h": "hour", "d": "day", "wk": "week"}

FAULT_WORDS: dict[str, tuple[str, ...]] = {
    # The faults the model knows (harvester_sim/physics.py FAULTS, the model card's classes), most specific first.
    "hydraulic_overheat": ("hydraulic", "hydraulics", "hyd"),
    "oil_pump_wear": ("oil pump", "oil pressure", "oil"),
    "fan_wear": ("fan", "fan belt", "fan drive"),
    "coolant_leak": ("coolant", "radiator", "leak", "leaking", "overheating", "overheat"),
}
# Words a vehicle mention begins with, and the letters of the ids they narrow to ("" = any).
VEHICLE_WORDS = {"harvester": "h", "harvesters": "h", "harvestor": "h", "truck": "t", "tractor": "t",
                 "vehicle": "", "machine": "", "unit": "", "number": "", "no": "", "#": ""}
SIGNAL_SYNONYMS = {"temp": "temperature", "temps": "temperature", "press": "pressure", "rpm": "speed",
                   "revs": "speed"}
VOCABULARY = sorted({
    "attention", "today", "yesterday", "week", "season", "month", "alert", "alerts", "fire", "fired", "trigger",
    "triggered", "flagged", "raised", "wrong", "problem", "problems", "status", "synced", "sync", "reported",
    "offline", "model", "update", "updated", "changed", "change", "since", "mean", "means", "check", "first",
    "coolant", "hydraulic", "pressure", "temperature", "harvester", "harvesters", "vehicle", "vehicles", "machine",
    "machines", "truck", "tractor", "procedure", "leak", "pump", "last", "many", "times", "value", "reading",
    "current", "latest", "which", "what", "when", "explain", "fault", "faults", "radiator", "overheat", "replace",
    "repair", "inspect", "should", "needs", "issues", "trouble", "heard", "contact", "rollout", "version",
}) + list(VEHICLE_WORDS)


@dataclass(frozen=True, slots=True)
class Span:
    since: float
    until: float
    label: str  # as the answer says it: "today", "this season (since 2026-10-01)"
    after_since: bool = False  # "since yesterday": the period named is the one before the answer's


@dataclass(slots=True)
class Parsed:
    question: str
    intent: str = "unknown"
    vehicle: str | None = None
    vehicle_mention: str | None = None  # the words that named a vehicle (matched or not)
    vehicle_choices: list[str] = field(default_factory=list)  # several matched: ask which
    fault: str | None = None
    signal: str | None = None
    spn: int | None = None
    fmi: int | None = None
    alert_id: str | None = None
    span: Span | None = None
    words: list[str] = field(default_factory=list)

    def slots(self) -> dict[str, object]:
        out: dict[str, object] = {}
        for k in ("vehicle", "fault", "signal", "spn", "fmi", "alert_id"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        if self.span is not None:
            out["span"] = {"label": self.span.label, "since": self.span.since, "until": self.span.until}
        if self.vehicle_choices:
            out["vehicle_choices"] = list(self.vehicle_choices)
        if self.vehicle_mention and self.vehicle is None and not self.vehicle_choices:
            out["vehicle_unknown"] = self.vehicle_mention
        return out


_TOKEN = re.compile(r"#?[a-z0-9]+(?:[-_.][a-z0-9]+)*")


def _edits(a: str, b: str) -> int:
    """Levenshtein distance (the words are short)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def _correct(words: list[str], extra: Sequence[str]) -> list[str]:
    """Each word of 4 letters or more that is not in the vocabulary, replaced by the closest one that is (difflib
    finds the candidates; the fewest edits, then the same length, picks: "sinced" is "synced", not "since")."""
    vocab = VOCABULARY + list(extra)
    known = set(vocab)
    out = []
    for w in words:
        if len(w) >= 4 and w.isalpha() and w not in known:
            close = difflib.get_close_matches(w, vocab, n=4, cutoff=0.8)
            if close:
                w = min(close, key=lambda c: (_edits(w, c), abs(len(c) - len(w))))
        out.append(w)
    return out


def vehicle_key(vehicle: str) -> tuple[str, int | None]:
    """An id's letters and number: "H-007" -> ("h", 7), "picker-north" -> ("pickernorth", None)."""
    m = re.fullmatch(r"([A-Za-z]*)[-_ ]?0*(\d+)", vehicle.strip())
    if m:
        return m.group(1).lower(), int(m.group(2))
    return re.sub(r"[^a-z0-9]", "", vehicle.lower()), None


def match_vehicle(text: str, vehicles: Sequence[str]) -> tuple[str | None, list[str], str | None]:
    """(the vehicle, the choices when several match, the words that named one) for a lower-cased question."""
    by_lower = {v.lower(): v for v in vehicles}
    for tok in _TOKEN.findall(text):  # an id as it is written
        if tok in by_lower:
            return by_lower[tok], [], tok
    keys = {v: vehicle_key(v) for v in vehicles}
    mentions: list[tuple[str, str, int]] = []  # (words, letters or "", number)
    words_re = "|".join(re.escape(w) for w in sorted(VEHICLE_WORDS, key=len, reverse=True))
    for m in re.finditer(rf"(?<![a-z0-9])({words_re})\s*(?:no\.?\s*|number\s*|#\s*)?-?\s*#?0*(\d{{1,6}})\b", text):
        mentions.append((m.group(0), VEHICLE_WORDS[m.group(1)], int(m.group(2))))
    if not mentions:
        for m in re.finditer(r"(?<![a-z0-9])([a-z]{1,3})-?0*(\d{1,6})\b", text):
            if m.group(1) in ("spn", "fmi") or not any(lt.startswith(m.group(1)) for lt, n in keys.values() if n):
                continue
            mentions.append((m.group(0), m.group(1), int(m.group(2))))
    for said, letters, number in mentions:
        found = [v for v, (lt, n) in keys.items() if n == number and lt.startswith(letters)]
        if len(found) == 1:
            return found[0], [], said
        return None, sorted(found), said
    named = {k[0]: v for v, k in keys.items() if k[1] is None and len(k[0]) >= 4}
    if named:
        toks = _TOKEN.findall(text)
        grams = toks + [a + b for a, b in itertools.pairwise(toks)]
        for g in grams:
            close = difflib.get_close_matches(re.sub(r"[^a-z0-9]", "", g), list(named), n=2, cutoff=0.8)
            if close:
                return (named[close[0]], [], g) if len(close) == 1 else (None, sorted(named[c] for c in close), g)
    return None, [], None


def _day0(t: float) -> float:
    return t - t % DAY


def season_start(now: float, month_day: str) -> float:
    month, day = (int(x) for x in month_day.split("-"))
    y = time.gmtime(now).tm_year
    for year in (y, y - 1):
        d = min(day, calendar.monthrange(year, month)[1])
        t = float(calendar.timegm((year, month, d, 0, 0, 0)))
        if t <= now:
            return t
    return float(calendar.timegm((y - 1, month, 1, 0, 0, 0)))


def _date(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


def parse_span(text: str, now: float, month_day: str) -> Span | None:
    since_word = re.search(r"\bsince\s+(?:the\s+)?(yesterday|last week|today|this week|this month)", text)
    after = since_word is not None
    m = re.search(r"\b(?:last|past|previous)\s+(\d{1,4})\s*(hour|hr|h|day|d|week|wk|month)s?\b", text)
    if m:
        n, unit = int(m.group(1)), m.group(2)
        sec = {"hour": 3600.0, "hr": 3600.0, "h": 3600.0, "day": DAY, "d": DAY, "week": 7 * DAY, "wk": 7 * DAY,
               "month": 30 * DAY}[unit]
        return Span(now - n * sec, now, f"in the last {n} {_UNIT.get(unit, unit)}{'s' if n != 1 else ''}")
    d0 = _day0(now)
    if re.search(r"\byesterday\b", text):
        return Span(d0 - DAY, d0, f"yesterday ({_date(d0 - DAY)})", after)
    if re.search(r"\b(today|this morning|tonight|now)\b", text):
        return Span(d0, now, f"today ({_date(d0)})", after)
    if re.search(r"\b(last|past|previous) week\b", text):
        return Span(now - 7 * DAY, now, f"in the last 7 days (since {_date(now - 7 * DAY)})", after)
    if re.search(r"\bthis week\b", text):
        monday = d0 - time.gmtime(now).tm_wday * DAY
        return Span(monday, now, f"this week (since {_date(monday)})", after)
    if re.search(r"\b(last|past) month\b", text):
        return Span(now - 30 * DAY, now, f"in the last 30 days (since {_date(now - 30 * DAY)})", after)
    if re.search(r"\bthis month\b", text):
        first = d0 - (time.gmtime(now).tm_mday - 1) * DAY
        return Span(first, now, f"this month (since {_date(first)})", after)
    if re.search(r"\b(this|the) season\b|\bseason\b", text):
        s = season_start(now, month_day)
        return Span(s, now, f"this season (since {_date(s)})")
    return None


def _fault(text: str) -> str | None:
    for name in FAULT_WORDS:
        if name in text or name.replace("_", " ") in text:
            return name
    for name, words in FAULT_WORDS.items():
        if any(re.search(rf"\b{re.escape(w)}\b", text) for w in words):
            return name
    return None


def signal_words(name: str) -> set[str]:
    """The words of a signal name that tell it apart ("Engine" says nothing on an engine's bus)."""
    field_name = name.rsplit(".", 1)[-1]
    return {w for w in words_of(field_name).lower().split() if w not in ("engine", "1", "percent", "est")}


def match_signal(words: Sequence[str], signals: Sequence[str]) -> str | None:
    said = {SIGNAL_SYNONYMS.get(w, w) for w in words}
    best: tuple[int, int, str] | None = None
    for s in signals:
        sw = signal_words(s)
        if not sw:
            continue
        hit = len(sw & said)
        if hit >= 2 or (hit == 1 and len(sw) == 1):
            score = (hit, -len(sw - said), s)
            if best is None or score[:2] > best[:2]:
                best = score
    return best[2] if best else None


def _has(text: str, *patterns: str) -> bool:
    return any(re.search(p, text) for p in patterns)


def parse(question: str, vehicles: Sequence[str], signals: Sequence[str], alert_ids: Sequence[str], now: float,
          month_day: str = "10-01") -> Parsed:
    q = question[:MAX_QUESTION_CHARS]
    p = Parsed(question=q)
    lowered = re.sub(r"'s\b", "", q.lower().replace("\u2019", "'"))
    vocab_extra = [w for v in vehicles for w in _TOKEN.findall(v.lower()) if w.isalpha()]
    words = _correct(_TOKEN.findall(lowered.replace("'", "")), vocab_extra)
    p.words = words
    text = " ".join(words)
    spn = re.search(r"\bspn\s*[-:#]?\s*(\d{1,7})\b", text)
    fmi = re.search(r"\bfmi\s*[-:#]?\s*(\d{1,3})\b", text)
    if spn and int(spn.group(1)) <= SPN_MAX:
        p.spn = int(spn.group(1))
    if fmi and int(fmi.group(1)) <= FMI_MAX:
        p.fmi = int(fmi.group(1))
    for tok in re.findall(r"\b[0-9a-f]{6,64}\b", lowered):
        found = [a for a in alert_ids if a.lower().startswith(tok)]
        if len(found) == 1:
            p.alert_id = found[0]
            break
    # Numbers of SPNs and FMIs are not vehicle numbers.
    vtext = re.sub(r"\b(spn|fmi)\s*[-:#]?\s*\d+", " ", text)
    p.vehicle, p.vehicle_choices, p.vehicle_mention = match_vehicle(vtext, vehicles)
    p.fault = _fault(text)
    p.signal = match_signal(words, signals)
    p.span = parse_span(text, now, month_day)
    p.intent = _intent(text, p)
    return p


# What each intent's questions say, tried in this order (the first that matches wins; an SPN in the question is a
# DTC question whatever else it says). Patterns run on the corrected, lower-cased words without apostrophes.
WHY = (r"\bwhy\b.*\b(alert|alerts|alerting|alarm|alarming|fire|fired|firing|flag|flagged|trigger|triggered|raised|"
       r"go off|went off)\b", r"\bexplain\b.*\balert", r"\bwhat (caused|triggered|set off)\b")
MODEL = (r"\bmodel\b.*\b(update|updated|rollout|change|changed|switch|switched|version)\b",
         r"\b(since|after)\b.*\b(new|last) model\b", r"\bchanged\b.*\bmodel\b")
SILENT = (r"\b(not|never|havent|hasnt|stopped|no)\b.*\b(sync|synced|syncing|report|reported|reporting|heard|connect|"
          r"connected|uploaded|contact|sent|phoned|called|checked in)\b", r"\b(offline|silent|gone quiet|quiet)\b",
          r"\bnot (been )?(seen|online)\b", r"\blast (sync|synced|seen|contact)\b.*\bwhich\b")
HISTORY = (r"\bhow many\b", r"\bhow often\b", r"\bwhen\b", r"\blast\b.*\balerts?\b", r"\bcount\b",
           r"\bnumber of\b", r"\bhistory\b", r"\bever\b")
WRONG = (r"\bwrong\b", r"\bproblems?\b", r"\bissues?\b", r"\btrouble\b", r"\bstatus\b", r"\bhow is\b",
         r"\bhows\b", r"\bhealth\b", r"\bdoing\b", r"\bstate of\b", r"\bwhat about\b", r"\bok\b", r"\bbroken\b",
         r"\bfaults?\b", r"\bgoing on\b", r"\bdiagnos")
ATTENTION = (r"\battention\b", r"\b(look at|check on|worry|worried|priority|priorities|urgent|needs?)\b",
             r"\bwhich\b.*\b(harvesters|machines|vehicles|trucks)\b.*\b(wrong|problem|alert|fault)",
             r"\b(anything|any|something|what)\b.*\b(wrong|problems?|alerts?)\b.*\b(today|fleet|now)\b",
             r"\bopen alerts\b", r"\b(problem|issue|fault|alert|trouble)s? (list|report)\b",
             r"\btoday (problems?|issues?|alerts?|faults?)\b")
HOW_TO = (r"\bhow (do|to|should|can|would)\b", r"\bprocedure\b", r"\bsteps?\b", r"\bcheck\b", r"\breplace\b",
          r"\brepair\b", r"\bfix\b", r"\binspect\b", r"\bbleed\b", r"\btest\b", r"\bwhat (should|do) we\b",
          r"\bsafety\b", r"\bcauses?\b")


def _intent(t: str, p: Parsed) -> str:
    has_vehicle = p.vehicle is not None or bool(p.vehicle_choices) or p.vehicle_mention is not None
    if p.spn is not None:
        return "dtc_meaning"
    if _has(t, *WHY) or (p.alert_id is not None and not _has(t, r"\bhow many\b")):
        return "alert_why"
    if _has(t, *MODEL):
        return "model_changes"
    if _has(t, *SILENT):
        return "not_synced"
    if p.fault is not None and ((p.span is not None and _has(t, r"\balerts?\b")) or _has(t, *HISTORY)):
        return "fault_history"
    if p.signal is not None and has_vehicle and not _has(t, *WRONG):
        return "signal_value"
    if has_vehicle and _has(t, *WRONG):
        return "vehicle_status"
    if _has(t, *ATTENTION) and not _has(t, r"\bhow (do|to|should|can)\b", r"\bprocedure\b"):
        return "needs_attention"
    if _has(t, *HOW_TO) or (p.fault is not None and not has_vehicle):
        return "how_to"
    return "vehicle_status" if has_vehicle else "unknown"
