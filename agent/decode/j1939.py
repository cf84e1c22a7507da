"""J1939 decoding: DBC messages looked up by PGN, signals extracted for whole batches at once.

cantools parses the DBC (once; its tables are then cached on disk, agent/decode/dbc_cache.py) and is the reference
decoder; the hot path compiles each little-endian, non-multiplexed signal into (shift, mask, scale, offset) and
extracts it from every frame of that PGN in one numpy operation (tests check it against cantools frame by frame).
Anything the fast path cannot express (big-endian, multiplexed, floats) is decoded per frame as cantools does, from
the same tables (`SlowMessage`, agent/decode/dbc_tables.py).

J1939 reserves the top of each parameter's range: for a field of 8 bits or more, a top byte of 0xFB..0xFF is not a
reading (0xFE error, 0xFF not available); for 2..7-bit fields the two highest codes are. Those become missing
values, counted by reason, never samples.

A signal's source is `{bus}/{NAME}` (16 hex digits) once the ECU at that address has claimed it (PGN 60928,
agent/decode/j1939_addr.py), else `{bus}/{SA}` (2 hex digits): an ECU that moves to another address keeps its
signals' identity. Address claims, DM1 and DM2 (agent/decode/j1939_dtc.py) are not DBC signals: they are handled here
in arrival order, and a claim that changes an address's holder splits the batch there.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.decode import dbc_cache
from agent.decode.base import Decoded
from agent.decode.dbc_cache import DbcError as DbcError
from agent.decode.dbc_tables import MessageSpec, SlowMessage
from agent.decode.j1939_addr import PGN_ADDRESS_CLAIMED, AddressBook, AddressChange, name_hex
from agent.decode.j1939_dtc import ActiveDtc, DtcTracker, LegacyState, parse_legacy_state
from agent.decode.j1939_id import J1939Ids, split_ids
from agent.decode.j1939_tp import PGN_DM1, PGN_DM2, PGN_TP_CM, PGN_TP_DT, TransportReassembler, dm1_fields
from agent.frames import FrameBatch
from agent.records import Event, SampleArrays
from agent.signals import SignalRegistry
from harvester_common.j1939_text import DtcText, spn_names_from_signals

DTC_STATE_KEY = "dtc_active/{bus}"


def default_dbc() -> Path:
    return Path(str(importlib.resources.files("agent") / "data" / "harvester.dbc"))


@dataclass(slots=True)
class _FastSignal:
    name: str  # Message.Signal
    unit: str
    shift: int
    mask: int
    length: int
    signed: bool
    scale: float
    offset: float


@dataclass(slots=True)
class _CompiledMessage:
    name: str
    pgn: int
    message: Any  # SlowMessage (agent/decode/dbc_tables.py): decodes like cantools' Message, for the slow path
    fast: list[_FastSignal]
    slow: list[str]  # signal names the fast path cannot do
    sids: dict[tuple[str, int], npt.NDArray[np.int32]] = field(default_factory=dict)
    # The fast signals as columns, so that one 2-D operation extracts them all from a batch of frames.
    shifts: npt.NDArray[np.uint64] = field(default_factory=lambda: np.zeros(0, np.uint64))
    masks: npt.NDArray[np.uint64] = field(default_factory=lambda: np.zeros(0, np.uint64))
    na_lo: npt.NDArray[np.uint64] = field(default_factory=lambda: np.zeros(0, np.uint64))
    err_lo: npt.NDArray[np.uint64] = field(default_factory=lambda: np.zeros(0, np.uint64))
    err_hi: npt.NDArray[np.uint64] = field(default_factory=lambda: np.zeros(0, np.uint64))
    scales: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    offsets: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    signed: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, np.bool_))
    half: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))

    def columns(self) -> None:
        f = self.fast
        self.shifts = np.array([x.shift for x in f], np.uint64)
        self.masks = np.array([x.mask for x in f], np.uint64)
        na, elo, ehi = [], [], []
        for x in f:
            if x.length >= 8:  # top byte 0xFB..0xFF is reserved; 0xFE is "error"
                k = x.length - 8
                na.append(0xFB << k)
                elo.append(0xFE << k)
                ehi.append((0xFF << k) - 1)
            elif x.length >= 2:  # the two highest codes: error, not available
                na.append(x.mask - 1)
                elo.append(x.mask - 1)
                ehi.append(x.mask - 1)
            else:
                na.append(x.mask + 1)  # a single bit has no reserved code
                elo.append(x.mask + 1)
                ehi.append(x.mask + 1)
        self.na_lo = np.array(na, np.uint64)
        self.err_lo = np.array(elo, np.uint64)
        self.err_hi = np.array(ehi, np.uint64)
        self.scales = np.array([x.scale for x in f])
        self.offsets = np.array([x.offset for x in f])
        self.signed = np.array([x.signed for x in f], np.bool_)
        self.half = np.array([float(1 << (x.length - 1)) for x in f])


def _compile(msg: MessageSpec, slow_decoder: Any) -> _CompiledMessage:
    fast: list[_FastSignal] = []
    slow: list[str] = []
    for s in msg.signals:
        simple = (
            not s.big_endian
            and not s.is_float
            and s.multiplexer_ids is None
            and not s.is_multiplexer
            and s.start + s.length <= 64
        )
        full = f"{msg.name}.{s.name}"
        if simple:
            mask = (1 << s.length) - 1
            fast.append(
                _FastSignal(full, s.unit or "", s.start, mask, s.length, s.signed, float(s.scale), float(s.offset))
            )
        else:
            slow.append(s.name)
    pgn = (msg.frame_id >> 8) & 0x3FFFF
    if ((pgn >> 8) & 0xFF) < 240:
        pgn &= 0x3FF00
    cm = _CompiledMessage(msg.name, pgn, slow_decoder, fast, slow)
    cm.columns()
    return cm


# Compiled messages per DBC content (hash), built once per process. Decoders get copies: `sids` is per decoder.
_COMPILED: dict[str, list[_CompiledMessage]] = {}


def _compiled(path: Path) -> list[_CompiledMessage]:
    tables, parsed = dbc_cache.load(path)
    done = _COMPILED.get(tables.sha256)
    if done is None:
        def real(name: str) -> Any:
            return lambda: parsed().get_message_by_name(name)

        done = [_compile(m, SlowMessage(m, real(m.name))) for m in tables.messages]
        _COMPILED[tables.sha256] = done
    return done


def load_dbcs(paths: Sequence[Path]) -> dict[int, _CompiledMessage]:
    """Merge DBCs by PGN; a later file overrides an earlier one for the same PGN (users refine the defaults).
    Each DBC is parsed once per process and its tables cached on disk (agent/decode/dbc_cache.py); the slow-path
    signals decode from those tables too (`SlowMessage`), without cantools."""
    by_pgn: dict[int, _CompiledMessage] = {}
    for p in paths:
        for cm in _compiled(Path(p)):
            by_pgn[cm.pgn] = dataclasses.replace(cm, sids={})
    return by_pgn


def dbc_spns(messages: Mapping[int, _CompiledMessage]) -> list[tuple[int, str]]:
    """(SPN, signal name) of every signal with the DBC's `SPN` attribute (kept in the cached tables: no cantools parse
    for it); SPN 0, the attribute's usual default, names nothing."""
    return [(s.spn, s.name) for cm in messages.values() for s in cm.message.signals if s.spn]


def _slice(fb: FrameBatch, ids: J1939Ids, lo: int, hi: int) -> tuple[FrameBatch, J1939Ids]:
    return (FrameBatch(fb.ts[lo:hi], fb.can_id[lo:hi], fb.dlc[lo:hi], fb.data[lo:hi], fb.extended[lo:hi],
                       fb.bad[lo:hi], fb.bus),
            J1939Ids(ids.priority[lo:hi], ids.pgn[lo:hi], ids.da[lo:hi], ids.sa[lo:hi]))


def _empty() -> SampleArrays:
    return SampleArrays(np.zeros(0), np.zeros(0, np.int32), np.zeros(0))


class J1939Decoder:
    """Decodes batches from one bus. Keeps transport sessions, who holds which address, and active DTCs between
    batches."""

    input_kind = "frames"

    def __init__(self, registry: SignalRegistry, dbcs: Sequence[Path] = (), bus: str = "can0") -> None:
        self.registry = registry
        self.bus = bus
        self.state_key: str | None = DTC_STATE_KEY.format(bus=bus)
        self.messages = load_dbcs([default_dbc(), *dbcs])
        self._known_pgns = np.array(sorted(self.messages), np.uint32)
        self.errors: Counter[str] = Counter()
        self.frames = 0
        self.frames_decoded = 0
        self.frames_unknown = 0
        self.tp = TransportReassembler(self.errors)
        self.addresses = AddressBook(self.errors)
        self.dtcs = DtcTracker(DtcText(spn_names_from_signals(dbc_spns(self.messages))), self.errors)
        # (key, source) of an ECU at each address that has not claimed it (`AddressBook.key`, `source`)
        self._bare = [(f"{sa:02X}", f"{bus}/{sa:02X}") for sa in range(256)]
        self.dtc_events = 0

    def source(self, sa: int) -> str:
        """The source of what the ECU at `sa` sends: `{bus}/{NAME}` once it claimed the address, else `{bus}/{SA}`."""
        name = self.addresses.name_of(sa)
        return f"{self.bus}/{sa:02X}" if name is None else f"{self.bus}/{name_hex(name)}"

    def _sids(self, cm: _CompiledMessage, sa: int) -> npt.NDArray[np.int32]:
        key = (cm.name, sa)
        sids = cm.sids.get(key)
        if sids is None:
            src = self.source(sa)
            # Each value is computed as raw * scale + offset (decode below): the wire sends the raw integers.
            sids = np.array([self.registry.intern(f.name, src, f.unit, (f.scale, f.offset)) for f in cm.fast],
                            np.int32)
            cm.sids[key] = sids
        return sids

    def decode(self, fb: FrameBatch) -> Decoded:
        n = len(fb)
        self.frames += n
        if n == 0:
            return Decoded(_empty(), [])
        ids = split_ids(fb.can_id)
        claims = np.flatnonzero(~fb.bad & fb.extended & (ids.pgn == PGN_ADDRESS_CLAIMED)).tolist()
        if not claims:
            return self._decode(fb, ids)
        # Frames before a claim that changes an address's holder are the old holder's, those after it the new one's.
        parts: list[Decoded] = []
        lo = 0
        moved = False
        for i in claims:
            self.frames_decoded += 1
            sa = int(ids.sa[i])
            name = self.addresses.parse(sa, bytes(fb.data[i, : fb.dlc[i]]))
            if name is None:
                continue
            if not self.addresses.would_change(sa, name):
                self.addresses.apply(sa, name)  # a repeated claim: counted, nothing moves
                continue
            if i > lo:
                parts.append(self._decode(*_slice(fb, ids, lo, i)))
            lo = i + 1
            self._address_changed(self.addresses.apply(sa, name))
            moved = True
        if lo < n:
            parts.append(self._decode(*_slice(fb, ids, lo, n)))
        samples = [p.samples for p in parts if len(p.samples)]
        return Decoded(
            SampleArrays(np.concatenate([s.ts for s in samples]), np.concatenate([s.sid for s in samples]),
                         np.concatenate([s.value for s in samples])) if samples else _empty(),
            [e for p in parts for e in p.events],
            moved or any(p.state_changed for p in parts),
            state_urgent=moved,
        )

    def _address_changed(self, change: AddressChange | None) -> None:
        if change is None:
            return
        for sa in change.moved:  # their signals get their new source at the next frame
            for cm in self.messages.values():
                cm.sids.pop((cm.name, sa), None)
        if change.first_holder:
            self.dtcs.migrate(f"{change.sa:02X}", name_hex(change.name))

    def _decode(self, fb: FrameBatch, ids: J1939Ids) -> Decoded:
        """Frames between address changes; claims among them are repeats, counted by `decode` already."""
        n = len(fb)
        events: list[Event] = []
        empty = _empty()
        ok = ~fb.bad & fb.extended
        if not ok.all():
            self.errors["error_or_remote_frame"] += int((fb.bad).sum())
            self.errors["standard_id"] += int((~fb.bad & ~fb.extended).sum())
        ts_parts: list[npt.NDArray[np.float64]] = []
        sid_parts: list[npt.NDArray[np.int32]] = []
        val_parts: list[npt.NDArray[np.float64]] = []
        pgns = ids.pgn
        u64 = fb.data.view("<u8").reshape(n)
        # Transport and DM frames form sequences across PGNs (announce, packets, single-frame DM1s): handle them
        # together, in arrival order. They are a small share of a bus, so a Python loop is fine here.
        special = ok & ((pgns == PGN_TP_CM) | (pgns == PGN_TP_DT) | (pgns == PGN_DM1) | (pgns == PGN_DM2))
        changed = False
        if special.any():
            seq_events, changed = self._sequenced(fb, ids.sa, ids.da, pgns, np.flatnonzero(special).tolist())
            events += seq_events
            self.frames_decoded += int(special.sum())
        # Unknown PGNs counted in one go: a pass over the batch per distinct PGN was quadratic in random traffic.
        rest = ok & ~special & (pgns != PGN_ADDRESS_CLAIMED)
        known = rest & np.isin(pgns, self._known_pgns)
        self.frames_unknown += int(rest.sum()) - int(known.sum())
        for pgn in np.unique(pgns[known]).tolist():
            sel = known & (pgns == pgn)
            cm = self.messages[pgn]
            self.frames_decoded += int(sel.sum())
            sas = ids.sa[sel]
            raw_all = u64[sel]
            ts_all = fb.ts[sel]
            for sa in np.unique(sas).tolist():
                same = sas == sa
                raw64 = raw_all[same] if not same.all() else raw_all
                ts = ts_all[same] if not same.all() else ts_all
                sids = self._sids(cm, sa)
                if cm.fast:
                    raw = (raw64[:, None] >> cm.shifts) & cm.masks  # frames x signals
                    missing = raw >= cm.na_lo
                    values = raw.astype(np.float64)
                    if cm.signed.any():
                        neg = cm.signed & (values >= cm.half)
                        values = np.where(neg, values - 2 * cm.half, values)
                    values = values * cm.scales + cm.offsets
                    nmiss = int(missing.sum())
                    if nmiss:
                        nerr = int(((raw >= cm.err_lo) & (raw <= cm.err_hi)).sum())
                        self.errors["value_error"] += nerr
                        self.errors["value_not_available"] += nmiss - nerr
                        keep = ~missing
                        ts_parts.append(np.broadcast_to(ts[:, None], raw.shape)[keep])
                        sid_parts.append(np.broadcast_to(sids[None, :], raw.shape)[keep])
                        val_parts.append(values[keep])
                    else:
                        ts_parts.append(np.repeat(ts, raw.shape[1]))
                        sid_parts.append(np.tile(sids, raw.shape[0]))
                        val_parts.append(values.reshape(-1))
                if cm.slow:
                    self._slow(cm, sa, ts, raw64, ts_parts, sid_parts, val_parts)
        if not ts_parts:
            return Decoded(empty, events, changed)
        return Decoded(
            SampleArrays(np.concatenate(ts_parts), np.concatenate(sid_parts), np.concatenate(val_parts)), events,
            changed,
        )

    def _slow(
        self,
        cm: _CompiledMessage,
        sa: int,
        ts: npt.NDArray[np.float64],
        raw64: npt.NDArray[np.uint64],
        ts_parts: list[npt.NDArray[np.float64]],
        sid_parts: list[npt.NDArray[np.int32]],
        val_parts: list[npt.NDArray[np.float64]],
    ) -> None:
        src = self.source(sa)
        for t, r in zip(ts.tolist(), raw64.tolist(), strict=True):
            try:
                decoded = cm.message.decode(int(r).to_bytes(8, "little"), decode_choices=False, allow_truncated=True)
            except Exception:
                self.errors["dbc_decode_failed"] += 1
                continue
            for sname in cm.slow:
                v = decoded.get(sname)
                if isinstance(v, float) and not math.isfinite(v):
                    # An IEEE float signal's NaN/inf is no reading (and the wire refuses it): counted, not sent.
                    self.errors["value_not_finite"] += 1
                    continue
                if isinstance(v, int | float):
                    sig = cm.message.get_signal_by_name(sname)
                    sid = self.registry.intern(f"{cm.name}.{sname}", src, sig.unit or "")
                    ts_parts.append(np.array([t]))
                    sid_parts.append(np.array([sid], np.int32))
                    val_parts.append(np.array([float(v)]))

    def _sequenced(
        self,
        fb: FrameBatch,
        sa: npt.NDArray[np.uint8],
        da: npt.NDArray[np.uint8],
        pgns: npt.NDArray[np.uint32],
        indices: list[int],
    ) -> tuple[list[Event], bool]:
        """The events, and whether the DTC state moved."""
        events: list[Event] = []
        moved = False
        # The frames' columns as Python values in one go: indexing numpy arrays a scalar at a time cost more than
        # the DM1 handling itself in a storm (~100,000 such frames in 500,000).
        sel = np.array(indices, np.intp)
        rows = fb.data[sel].tobytes()  # 8 bytes a frame
        for j, (pgn, t, s, d, dlc) in enumerate(zip(pgns[sel].tolist(), fb.ts[sel].tolist(), sa[sel].tolist(),
                                                    da[sel].tolist(), fb.dlc[sel].tolist(), strict=True)):
            at = 8 * j
            if pgn in (PGN_DM1, PGN_DM2):
                ev, m = self._dm(pgn, t, s, rows[at : at + dlc])
                events += ev
                moved |= m
                continue
            if dlc < 8:
                self.errors["tp_short_frame"] += 1
                continue
            data = rows[at : at + 8]
            if pgn == PGN_TP_CM:
                self.tp.on_cm(t, s, d, data)
                continue
            done = self.tp.on_dt(t, s, d, data)
            if done is not None and done.pgn in (PGN_DM1, PGN_DM2):
                ev, m = self._dm(done.pgn, done.ts, done.sa, done.payload)
                events += ev
                moved |= m
        return events, moved

    def _dm(self, pgn: int, ts: float, sa: int, payload: bytes) -> tuple[list[Event], bool]:
        try:
            lamps, dtcs = dm1_fields(payload)
        except ValueError:
            self.errors["dm1_malformed" if pgn == PGN_DM1 else "dm2_malformed"] += 1
            return [], False
        name = self.addresses.name_of(sa)
        if name is None:  # what `addresses.key` and `source` say, from a table: a storm formats them per DM1
            key, src = self._bare[sa]
        else:
            key = name_hex(name)
            src = f"{self.bus}/{key}"
        if pgn == PGN_DM2:
            events, moved = self.dtcs.dm2(ts, key, src, sa, lamps, dtcs), False
        else:
            events, moved = self.dtcs.dm1(ts, key, src, sa, lamps, dtcs)
        self.dtc_events += len(events)
        return events, moved

    def signals(self) -> set[str]:
        out: set[str] = set()
        for cm in self.messages.values():
            out.update(f.name for f in cm.fast)
            out.update(f"{cm.name}.{s}" for s in cm.slow)
        return out

    def counters(self) -> dict[str, int]:
        a = self.addresses
        return {"frames": self.frames, "frames_decoded": self.frames_decoded, "frames_unknown": self.frames_unknown,
                "dtc_events": self.dtc_events, "address_claims": a.claims, "address_changes": a.changes,
                "address_cannot_claim": a.cannot_claim, "dm2_unchanged": self.dtcs.dm2_unchanged}

    def active_dtcs(self) -> dict[str, list[tuple[int, int]]]:
        """Active DTCs by the source they were announced under."""
        return self.dtcs.active()

    def active_snapshot(self, limit: int) -> tuple[tuple[ActiveDtc, ...], int]:
        """The first `limit` active DTCs in the status message's order, and how many there are (DtcTracker.snapshot);
        call it on the thread that feeds this decoder."""
        return self.dtcs.snapshot(limit)

    def state(self) -> dict[str, Any]:
        """What a restart continues from: who holds which address (`names`: SA -> NAME) and the DM1 active set per
        ECU (`ecus`), so that it neither announces every active DTC again nor renames an ECU's signals."""
        return {"names": self.addresses.state(), "ecus": self.dtcs.state()}

    def restore(self, saved: object) -> bool:
        """Take back a `state()`, or one saved before NAMEs were kept (per source address, the active (SPN, FMI)
        pairs); False (nothing changed) if it is damaged. The first DM1 after the restart then closes what cleared
        meanwhile and opens only what is new."""
        if isinstance(saved, dict) and "ecus" in saved:
            names = AddressBook.parse_state(saved.get("names"))
            if names is None or set(saved) != {"names", "ecus"} or not self.dtcs.restore(saved["ecus"]):
                return False
            self.addresses.names = names
        else:
            legacy: LegacyState | None = parse_legacy_state(saved)
            if legacy is None:
                return False
            self.addresses.names = {}
            self.dtcs.restore_legacy(legacy, self.bus)
        for cm in self.messages.values():  # sources follow the restored addresses
            cm.sids.clear()
        return True
