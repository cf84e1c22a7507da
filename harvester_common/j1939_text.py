"""J1939 diagnostic trouble codes in words, as a mechanic reads them: "SPN 110 Engine Coolant Temperature, FMI 0:
above normal, most severe".

A DTC is an SPN (what: a parameter, a component) and an FMI (how it failed). The vehicle's agent puts this text on
every DTC event (agent/decode/j1939_dtc.py) and the cloud can word an older event that lacks it, so it lives here,
pure and shared.

- FMI: the 32 failure mode identifiers of SAE J1939-73 (0..21 assigned, 22..30 reserved, 31 "condition exists"),
  worded short. The table is public; e.g. Deep Sea Electronics' DSEE050 manual (057-300 issue 1.1, "Common SPNs"
  and "FMIs") and CRE Technology's GENSYS 2.0 manual print it.
- SPN names: from the loaded DBCs, where a signal carries the `SPN` attribute (`BA_ "SPN" SG_ <id> <signal> <spn>;`):
  the signal's name split into words with the common DBC abbreviations spelled out (`EngCoolantTemp` ->
  "Engine Coolant Temperature"). Where no DBC names an SPN, a small built-in table of common engine SPNs, each
  from the DSE manual's "Common SPNs" list above. Otherwise the SPN is "(unknown)".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

SPN_MAX = (1 << 19) - 1
SAID_MAX = 300  # a vehicle's words for one DTC, at most: longer is cut
FMI_MAX = 31
MAX_NAME_CHARS = 120  # a DBC signal name can be any length; the text stays one readable line

FMI_TEXT: tuple[str, ...] = (
    "above normal, most severe",  # 0: data valid but above normal operational range, most severe level
    "below normal, most severe",  # 1
    "erratic, intermittent or incorrect",  # 2
    "voltage above normal or shorted high",  # 3
    "voltage below normal or shorted low",  # 4
    "current below normal or open circuit",  # 5
    "current above normal or grounded circuit",  # 6
    "mechanical system not responding or out of adjustment",  # 7
    "abnormal frequency, pulse width or period",  # 8
    "abnormal update rate",  # 9
    "abnormal rate of change",  # 10
    "root cause not known",  # 11
    "bad intelligent device or component",  # 12
    "out of calibration",  # 13
    "special instructions",  # 14
    "above normal, least severe",  # 15
    "above normal, moderately severe",  # 16
    "below normal, least severe",  # 17
    "below normal, moderately severe",  # 18
    "received network data in error",  # 19
    "data drifted high",  # 20
    "data drifted low",  # 21
    *(["reserved"] * 9),  # 22..30: reserved for SAE assignment
    "condition exists",  # 31
)

# Common engine SPNs, as Deep Sea Electronics' DSEE050 manual lists them ("Common SPNs", 057-300 issue 1.1, p. 25;
# https://manualshive.com/ru/manual/deep-sea-electronics/dsecontrol-dsee050/2463070?page=25). Used only where no
# loaded DBC names the SPN.
BUILTIN_SPN_NAMES: Mapping[int, str] = {
    100: "Engine Oil Pressure",
    102: "Engine Intake Manifold 1 Pressure",
    105: "Engine Intake Manifold 1 Temperature",
    110: "Engine Coolant Temperature",
    173: "Engine Exhaust Temperature",
    175: "Engine Oil Temperature",
    190: "Engine Speed",
    3517: "Aftertreatment 1 DEF Level",
}

# Abbreviations of the Vector J1939 database's signal names (and so of ours, agent/data/harvester.dbc), spelled out.
# Only ones that cannot mean anything else; the rest of a name is kept as it is.
ABBREVIATIONS: Mapping[str, str] = {
    "Accel": "Accelerator", "Actv": "Active", "Acttr": "Actuator", "Addrss": "Address", "Aftrtrtmnt": "Aftertreatment",
    "Amb": "Ambient", "Aux": "Auxiliary", "Brk": "Brake", "Cmd": "Command", "Cntrl": "Control", "Ctrl": "Control",
    "Ctlyst": "Catalyst", "Cyl": "Cylinder", "Dsl": "Diesel", "Eng": "Engine", "Est": "Estimated", "Exhst": "Exhaust",
    "Fltr": "Filter", "Htr": "Heater", "Hyd": "Hydraulic", "Indcmnt": "Inducement", "Intk": "Intake",
    "Jystck": "Joystick", "Lvr": "Lever", "Malfunc": "Malfunction", "Nmbr": "Number", "Oprtr": "Operator",
    "Otlt": "Outlet", "Pos": "Position", "Press": "Pressure", "Prss": "Pressure", "Prtclt": "Particulate",
    "Rgnrtn": "Regeneration", "Snsr": "Sensor", "Spd": "Speed", "Src": "Source", "Stts": "Status",
    "Sttus": "Status", "Svrity": "Severity", "Temp": "Temperature", "Tmp": "Temperature", "Tnk": "Tank",
    "Trans": "Transmission", "Vlv": "Valve",
}

# Words in a CamelCase identifier: an acronym before a capitalised word (SCR in "SCROprtr"), a capitalised or lower
# word, an acronym, a number.
_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


def fmi_text(fmi: int) -> str:
    """The failure mode in words; an FMI outside 0..31 (which a 5-bit field cannot hold) says so."""
    return FMI_TEXT[fmi] if 0 <= fmi <= FMI_MAX else f"invalid FMI {fmi}"


def words_of(signal_name: str) -> str:
    """A DBC signal name as words: `EngCoolantTemp` -> "Engine Coolant Temperature", `EngOilTemp1` -> "Engine Oil
    Temperature 1". Underscores and other separators split words too."""
    out = [ABBREVIATIONS.get(w, w) for w in _WORD.findall(signal_name)]
    return " ".join(out)[:MAX_NAME_CHARS].strip()


def spn_names_from_signals(signals: Iterable[tuple[int, str]]) -> dict[int, str]:
    """SPN -> name from (SPN, signal name) pairs of the loaded DBCs. Several signals may carry one SPN (the Vector
    database has `ET1.EngCoolantTemp` and `DM4.EngineCoolantTemperature` for 110): the longest wording, the least
    abbreviated, wins; on a tie, the first. SPNs outside 0..2^19-1 and names without a word are left out."""
    out: dict[int, str] = {}
    for spn, name in signals:
        if not (isinstance(spn, int) and 0 <= spn <= SPN_MAX):
            continue
        text = words_of(name)
        if text and len(text) > len(out.get(spn, "")):
            out[spn] = text
    return out


class DtcText:
    """Words for DTCs, from the DBCs' SPN names (built-in names only where no DBC has one)."""

    def __init__(self, spn_names: Mapping[int, str] | None = None) -> None:
        self.spn_names: dict[int, str] = {**BUILTIN_SPN_NAMES, **(spn_names or {})}

    def spn_name(self, spn: int) -> str | None:
        return self.spn_names.get(spn)

    def text(self, spn: int, fmi: int) -> str:
        """ "SPN 110 Engine Coolant Temperature, FMI 0: above normal, most severe"; "SPN 5246 (unknown), FMI 31:
        condition exists" for an SPN nobody named."""
        return self.parts(spn, fmi)[2]

    def parts(self, spn: int, fmi: int) -> tuple[str | None, str, str]:
        """`fields`' values, (`spn_name`, `fmi_text`, `text`), each looked up once: a decoder makes them for every
        DTC event, ~100,000 a minute in a storm."""
        name = self.spn_names.get(spn)
        failure = fmi_text(fmi)
        return name, failure, f"SPN {spn} {'(unknown)' if name is None else name}, FMI {fmi}: {failure}"

    def words(self, spn: int | None, fmi: int | None, said: object) -> str:
        """A stored DTC event's words for people, one rule for every reader (the fleet page, the assistant): the
        vehicle's own `said` when they are about this DTC (a string that starts "SPN <spn> " and names ", FMI <fmi>: ";
        a vehicle's DBCs name more SPNs than the built-in table), cut to SAID_MAX characters; else made here for a
        valid SPN and FMI; else "". Anything else a vehicle sent (words about another DTC, an event from before
        vehicles sent words, not a string) is not shown as this DTC's words."""
        if spn is None or fmi is None or not (0 <= spn <= SPN_MAX and 0 <= fmi <= FMI_MAX):
            return ""
        if isinstance(said, str) and said.startswith(f"SPN {spn} ") and f", FMI {fmi}: " in said[:SAID_MAX]:
            return said[:SAID_MAX]
        return self.text(spn, fmi)

    def fields(self, spn: int, fmi: int) -> dict[str, str | None]:
        """The keys every DTC event carries: `spn_name` (None when unknown), `fmi_text`, `text`."""
        name, failure, text = self.parts(spn, fmi)
        return {"spn_name": name, "fmi_text": failure, "text": text}
