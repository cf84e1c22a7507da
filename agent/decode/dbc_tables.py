"""A DBC's extended-frame messages as plain data, and a decoder for the signals the vectorised path cannot do.

`DbcTables` is what the agent keeps of a parsed DBC: per message its name, frame id, length, cycle time and every
signal's layout (start bit, length, byte order, sign, float, scale, offset, unit, multiplexing). It is built from
cantools' parse (`from_cantools`) or read back from the disk cache (agent/decode/dbc_cache.py) through
`tables_from_json`, which trusts nothing: every field is type- and range-checked, and a file that fails is refused
with a reason.

`SlowMessage` decodes one message the way cantools' `Message.decode(data, decode_choices=False, scaling=True,
allow_truncated=..., allow_excess=True)` does, from these tables alone, so that a replay or a vehicle never has to
import cantools or parse a DBC to decode multiplexed, big-endian or float signals. It mirrors cantools' codec tree
(multiplexer → id → signals, nested) and its truncation and scaling rules. Layouts where cantools' bit packing does
something other than plain bit extraction (overlapping signals, signals past the message's length, containers,
odd float sizes) are `exotic`: those messages, and any call with other options, are handed to the real cantools
Message, which `real` loads on first use. tests/test_dbc_cache.py checks it against cantools on every message of
the shipped and the Vector J1939 DBC with random payloads.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FORMAT = 2  # bump when the layout below or what `from_cantools` extracts changes: older cache files are then stale

MAX_SIGNAL_BITS = 64
MAX_MESSAGE_BYTES = 1 << 16  # J1939 transport messages reach 1,785 bytes; far more is not a DBC of ours
_FLOATS = {16: ">e", 32: ">f", 64: ">d"}


class TablesError(ValueError):
    """Cache content that is not a valid description of a DBC; the text says what is wrong."""


@dataclass(frozen=True, slots=True)
class SignalSpec:
    name: str
    start: int  # DBC start bit: the LSB for little-endian, the MSB (sawtooth numbering) for big-endian
    length: int
    big_endian: bool
    signed: bool
    is_float: bool
    scale: int | float  # as cantools holds them: the type decides integer or float arithmetic, as in cantools
    offset: int | float
    unit: str
    is_multiplexer: bool
    multiplexer_ids: tuple[int, ...] | None
    multiplexer_signal: str | None
    choice_keys: tuple[int, ...]  # of a multiplexer only: cantools takes a named value as a valid multiplexer id
    spn: int = 0  # the DBC's `SPN` attribute (0: none): names DTCs in words (harvester_common/j1939_text.py)

    @property
    def network_start(self) -> int:
        """Bit index from the first byte's MSB (cantools' `start_bit` for big-endian, the start for little)."""
        return 8 * (self.start // 8) + (7 - self.start % 8) if self.big_endian else self.start


@dataclass(frozen=True, slots=True)
class MessageSpec:
    name: str
    frame_id: int  # 29 bits, without cantools' extended flag
    length: int  # bytes
    cycle_time: int | None
    signals: tuple[SignalSpec, ...]  # in cantools' order (by start bit)
    container: bool = False
    has_choices: bool = False  # some signal has a value table: decode_choices=True needs cantools


@dataclass(frozen=True, slots=True)
class DbcTables:
    sha256: str  # of the DBC file's bytes
    messages: tuple[MessageSpec, ...]  # extended-frame messages only (J1939)


def from_cantools(db: Any, sha256: str) -> DbcTables:
    out = []
    for m in getattr(db, "messages", []):
        if not m.is_extended_frame:
            continue
        sigs = []
        has_choices = False
        for s in m.signals:
            choices = s.conversion.choices
            has_choices = has_choices or bool(choices)
            sigs.append(SignalSpec(
                s.name, int(s.start), int(s.length), s.byte_order == "big_endian", bool(s.is_signed),
                bool(s.is_float), s.scale, s.offset, s.unit or "", bool(s.is_multiplexer),
                None if s.multiplexer_ids is None else tuple(int(i) for i in s.multiplexer_ids),
                s.multiplexer_signal,
                tuple(sorted(int(k) for k in choices)) if (s.is_multiplexer and choices) else (),
                _spn(s),
            ))
        out.append(MessageSpec(m.name, int(m.frame_id) & 0x1FFFFFFF, int(m.length), m.cycle_time, tuple(sigs),
                               bool(m.is_container), has_choices))
    return DbcTables(sha256, tuple(out))


def _spn(s: Any) -> int:
    """cantools reads the `SPN` attribute into `Signal.spn`; anything but a J1939 SPN (19 bits) names nothing."""
    v = getattr(s, "spn", None)
    return v if type(v) is int and 0 < v < 1 << 19 else 0


# --- JSON layout (the cache file's payload) -------------------------------------------------------------------
# {"format": FORMAT, "sha256": "<hex>", "messages": [[name, frame_id, length, cycle_time|null, container,
#   has_choices, [[name, start, length, big_endian, signed, is_float, scale, offset, unit, is_multiplexer,
#   multiplexer_ids|null, multiplexer_signal|null, choice_keys, spn], ...]], ...]}


def tables_to_json(t: DbcTables) -> dict[str, Any]:
    return {"format": FORMAT, "sha256": t.sha256, "messages": [
        [m.name, m.frame_id, m.length, m.cycle_time, m.container, m.has_choices,
         [[s.name, s.start, s.length, s.big_endian, s.signed, s.is_float, s.scale, s.offset, s.unit,
           s.is_multiplexer, None if s.multiplexer_ids is None else list(s.multiplexer_ids), s.multiplexer_signal,
           list(s.choice_keys), s.spn] for s in m.signals]] for m in t.messages]}


def _int(v: object, lo: int, hi: int, what: str) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise TablesError(f"{what}: expected an integer in {lo}..{hi}")
    return v


def _bool(v: object, what: str) -> bool:
    if type(v) is not bool:
        raise TablesError(f"{what}: expected true or false")
    return v


def _str(v: object, what: str) -> str:
    if type(v) is not str:
        raise TablesError(f"{what}: expected a string")
    return v


def _num(v: object, what: str) -> int | float:
    if type(v) is int or (type(v) is float and math.isfinite(v)):
        return v
    raise TablesError(f"{what}: expected a finite number")


def _list(v: object, what: str, size: int | None = None) -> list[Any]:
    if type(v) is not list or (size is not None and len(v) != size):
        raise TablesError(f"{what}: expected a list" + (f" of {size}" if size is not None else ""))
    return v


def _ids(v: object, what: str) -> tuple[int, ...]:
    return tuple(_int(i, -(1 << 63), (1 << 64) - 1, what) for i in _list(v, what))


def _signal(v: object, where: str) -> SignalSpec:
    f = _list(v, where, 14)
    name = _str(f[0], f"{where} name")
    w = f"{where} {name!r}"
    length = _int(f[2], 1, MAX_SIGNAL_BITS * 1024, f"{w} length")
    return SignalSpec(
        name, _int(f[1], 0, MAX_MESSAGE_BYTES * 8, f"{w} start"), length, _bool(f[3], f"{w} big_endian"),
        _bool(f[4], f"{w} signed"), _bool(f[5], f"{w} is_float"), _num(f[6], f"{w} scale"),
        _num(f[7], f"{w} offset"), _str(f[8], f"{w} unit"), _bool(f[9], f"{w} is_multiplexer"),
        None if f[10] is None else _ids(f[10], f"{w} multiplexer_ids"),
        None if f[11] is None else _str(f[11], f"{w} multiplexer_signal"), _ids(f[12], f"{w} choice_keys"),
        _int(f[13], 0, (1 << 19) - 1, f"{w} spn"),
    )


def tables_from_json(obj: object, sha256: str) -> DbcTables:
    """The tables in a decoded cache payload; `TablesError` for anything that is not exactly what
    `tables_to_json` writes for the DBC whose content hash is `sha256`."""
    if type(obj) is not dict or set(obj) != {"format", "sha256", "messages"}:
        raise TablesError("not a DBC tables object")
    if obj["format"] != FORMAT:
        raise TablesError(f"format {obj['format']!r}, this agent reads {FORMAT}")
    if obj["sha256"] != sha256:
        raise TablesError("tables of another DBC file")
    msgs = []
    for i, v in enumerate(_list(obj["messages"], "messages")):
        f = _list(v, f"message {i}", 7)
        name = _str(f[0], f"message {i} name")
        w = f"message {name!r}"
        cycle = None if f[3] is None else _int(f[3], 0, 1 << 31, f"{w} cycle_time")
        sigs = tuple(_signal(s, f"{w} signal {j}") for j, s in enumerate(_list(f[6], f"{w} signals")))
        if len({s.name for s in sigs}) != len(sigs):
            raise TablesError(f"{w}: two signals of one name")
        _check_mux_tree(sigs, w)
        msgs.append(MessageSpec(name, _int(f[1], 0, 0x1FFFFFFF, f"{w} frame_id"),
                                _int(f[2], 0, MAX_MESSAGE_BYTES, f"{w} length"), cycle, sigs,
                                _bool(f[4], f"{w} container"), _bool(f[5], f"{w} has_choices")))
    return DbcTables(sha256, tuple(msgs))


MAX_MUX_DEPTH = 16  # multiplexers within multiplexers; real DBCs nest one or two deep


def _check_mux_tree(sigs: tuple[SignalSpec, ...], where: str) -> None:
    """Each signal's chain of multiplexers ends, within MAX_MUX_DEPTH (cantools loads no DBC whose chain loops; a
    file that claims one would send the decoder's codec tree round in circles)."""
    parent = {s.name: s.multiplexer_signal for s in sigs}
    for s in sigs:
        name: str | None = s.name
        for _ in range(MAX_MUX_DEPTH + 1):
            name = parent.get(name) if name is not None else None
            if name is None:
                break
        else:
            raise TablesError(f"{where} signal {s.name!r}: multiplexed in a loop or deeper than {MAX_MUX_DEPTH}")


# --- the slow-path decoder --------------------------------------------------------------------------------------


class DecodeError(ValueError):
    """The payload does not decode (as cantools' DecodeError: a multiplexer id the DBC does not define...)."""


@dataclass(slots=True)
class _Node:
    """One level of cantools' codec tree: its signals, then per multiplexer signal the node of each id."""

    signals: list[SignalSpec]
    muxes: list[tuple[str, dict[int, _Node]]]


def _codec(by_parent: dict[str | None, list[SignalSpec]], parent: str | None, mux_id: int | None) -> _Node:
    """cantools' Message._create_codec, on the specs."""
    node = _Node([], [])
    for s in by_parent.get(parent, []):
        if mux_id is not None and (s.multiplexer_ids is None or mux_id not in s.multiplexer_ids):
            continue
        if s.is_multiplexer:
            ids: set[int] = set(s.choice_keys)
            for c in by_parent.get(s.name, []):
                ids.update(c.multiplexer_ids or ())
            if ids:
                node.muxes.append((s.name, {i: _codec(by_parent, s.name, i) for i in ids}))
        node.signals.append(s)
    return node


def _packs_plainly(signals: list[SignalSpec], nbytes: int) -> bool:
    """Whether cantools' bitstruct formats for these signals (utils.create_encode_decode_formats) amount to plain
    bit extraction: no overlap in its packing order and nothing past the message's end."""
    end = 8 * nbytes
    for s in reversed(signals):
        if s.big_endian:
            continue
        if s.start + s.length > end:
            return False
        end = s.start
    pos = 0
    for s in sorted((s for s in signals if s.big_endian), key=lambda s: s.network_start):
        if s.network_start < pos:
            return False
        pos = s.network_start + s.length
    return pos <= 8 * nbytes


def _exotic(m: MessageSpec, root: _Node) -> str | None:
    if m.container:
        return "container message"
    if any(s.is_float and s.length not in _FLOATS for s in m.signals):
        return "float signal of an unusual size"
    stack = [root]
    while stack:
        n = stack.pop()
        if not _packs_plainly(n.signals, m.length):
            return "overlapping signals or signals past the message's length"
        for _, children in n.muxes:
            stack.extend(children.values())
    return None


class SlowMessage:
    """One DBC message decoded like cantools' Message, from its spec; `real` gives cantools' own Message for what
    this does not do (`exotic` layouts, other decode options, any other attribute)."""

    def __init__(self, spec: MessageSpec, real: Callable[[], Any]) -> None:
        self.spec = spec
        self.name = spec.name
        self.frame_id = spec.frame_id
        self.length = spec.length
        self.cycle_time = spec.cycle_time
        self.signals = spec.signals
        self._real = real
        self._by_name = {s.name: s for s in spec.signals}
        by_parent: dict[str | None, list[SignalSpec]] = {}
        for s in spec.signals:
            by_parent.setdefault(s.multiplexer_signal, []).append(s)
        self._root = _codec(by_parent, None, None)
        self.exotic = _exotic(spec, self._root)

    def get_signal_by_name(self, name: str) -> SignalSpec:
        return self._by_name[name]

    def __getattr__(self, name: str) -> Any:  # anything else cantools' Message has
        return getattr(self._real(), name)

    def decode(self, data: bytes, decode_choices: bool = True, scaling: bool = True, decode_containers: bool = False,
               allow_truncated: bool = False, allow_excess: bool = True) -> dict[str, int | float]:
        if (self.exotic is not None or not scaling or decode_containers
                or (decode_choices and self.spec.has_choices)):
            out: dict[str, int | float] = self._real().decode(
                data, decode_choices=decode_choices, scaling=scaling, decode_containers=decode_containers,
                allow_truncated=allow_truncated, allow_excess=allow_excess)
            return out
        size = self.length
        actual = len(data)
        if actual != size:
            if allow_truncated:
                data = data.ljust(size, b"\xff")
            if allow_excess:
                data = data[:size]
            if len(data) != size:
                raise DecodeError(f"Wrong data size: {actual} instead of {size} bytes")
        le = int.from_bytes(data, "little")
        be = int.from_bytes(data, "big")
        visible = actual * 8 if (actual < size and allow_truncated) else None
        decoded: dict[str, int | float] = {}
        self._node(self._root, le, be, visible, allow_truncated, decoded)
        return decoded

    def _node(self, node: _Node, le: int, be: int, visible: int | None, allow_truncated: bool,
              out: dict[str, int | float]) -> None:
        nbits = 8 * self.length
        for s in node.signals:
            if visible is not None and s.network_start + s.length > visible:
                continue  # past the bytes received (cantools drops these under allow_truncated)
            mask = (1 << s.length) - 1
            raw = (be >> (nbits - s.network_start - s.length)) & mask if s.big_endian else (le >> s.start) & mask
            value: int | float
            if s.is_float:
                value = struct.unpack(_FLOATS[s.length], raw.to_bytes(s.length // 8, "big"))[0]
            elif s.signed and raw >> (s.length - 1):
                value = raw - (1 << s.length)
            else:
                value = raw
            out[s.name] = _scaled(value, s)
        for mux_name, children in node.muxes:
            if allow_truncated and mux_name not in out:
                continue
            mux = int(out[mux_name])
            child = children.get(mux)
            if child is None:
                raise DecodeError(f"expected multiplexer id {sorted(children)}, but got {mux}")
            self._node(child, le, be, visible, allow_truncated, out)


def _is_integer(v: int | float) -> bool:
    return isinstance(v, int) or v.is_integer()


def _scaled(raw: int | float, s: SignalSpec) -> int | float:
    """cantools' BaseConversion.factory(scale, offset, is_float).raw_to_scaled(raw), choices aside."""
    if s.scale == 1 and s.offset == 0:
        return raw
    if _is_integer(s.scale) and _is_integer(s.offset) and not s.is_float:
        return raw * int(s.scale) + int(s.offset)
    return raw * s.scale + s.offset
