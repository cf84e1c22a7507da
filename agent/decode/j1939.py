"""J1939 decoding: DBC messages looked up by PGN, signals extracted for whole batches at once.

cantools parses the DBC (once; its tables are then cached on disk, agent/decode/dbc_cache.py) and is the reference
decoder; the hot path compiles each little-endian, non-multiplexed signal into (shift, mask, scale, offset) and
extracts it from every frame of that PGN in one numpy operation (tests check it against cantools frame by frame).
Anything the fast path cannot express (big-endian, multiplexed, floats) is decoded per frame as cantools does, from
the same tables (`SlowMessage`, agent/decode/dbc_tables.py).

J1939 reserves the top of each parameter's range: for a field of 8 bits or more, a top byte of 0xFB..0xFF is not a
reading (0xFE error, 0xFF not available); for 2..7-bit fields the two highest codes are. Those become missing
values, counted by reason, never samples.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.decode import dbc_cache
from agent.decode.base import Decoded
from agent.decode.dbc_cache import DbcError as DbcError
from agent.decode.dbc_tables import MessageSpec, SlowMessage
from agent.decode.j1939_id import split_ids
from agent.decode.j1939_tp import PGN_DM1, PGN_TP_CM, PGN_TP_DT, TransportReassembler, parse_dm1
from agent.frames import FrameBatch
from agent.records import Event, SampleArrays
from agent.signals import SignalRegistry

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


class J1939Decoder:
    """Decodes batches from one bus. Keeps transport sessions and active DTCs between batches."""

    input_kind = "frames"

    def __init__(self, registry: SignalRegistry, dbcs: Sequence[Path] = (), bus: str = "can0") -> None:
        self.registry = registry
        self.bus = bus
        self.state_key: str | None = DTC_STATE_KEY.format(bus=bus)
        self.messages = load_dbcs([default_dbc(), *dbcs])
        self.errors: Counter[str] = Counter()
        self.frames = 0
        self.frames_decoded = 0
        self.frames_unknown = 0
        self.tp = TransportReassembler(self.errors)
        self._active_dtcs: dict[int, set[tuple[int, int]]] = {}
        self.dtc_events = 0

    def _sids(self, cm: _CompiledMessage, sa: int) -> npt.NDArray[np.int32]:
        key = (cm.name, sa)
        sids = cm.sids.get(key)
        if sids is None:
            src = f"{self.bus}/{sa:02X}"
            sids = np.array([self.registry.intern(f.name, src, f.unit) for f in cm.fast], np.int32)
            cm.sids[key] = sids
        return sids

    def decode(self, fb: FrameBatch) -> Decoded:
        n = len(fb)
        self.frames += n
        events: list[Event] = []
        empty = SampleArrays(np.zeros(0), np.zeros(0, np.int32), np.zeros(0))
        if n == 0:
            return Decoded(empty, events)
        ok = ~fb.bad & fb.extended
        if not ok.all():
            self.errors["error_or_remote_frame"] += int((fb.bad).sum())
            self.errors["standard_id"] += int((~fb.bad & ~fb.extended).sum())
        ids = split_ids(fb.can_id)
        ts_parts: list[npt.NDArray[np.float64]] = []
        sid_parts: list[npt.NDArray[np.int32]] = []
        val_parts: list[npt.NDArray[np.float64]] = []
        pgns = ids.pgn
        u64 = fb.data.view("<u8").reshape(n)
        # Transport and DM1 frames form sequences across PGNs (announce, packets, single-frame DM1s): handle them
        # together, in arrival order. They are a small share of a bus, so a Python loop is fine here.
        special = ok & ((pgns == PGN_TP_CM) | (pgns == PGN_TP_DT) | (pgns == PGN_DM1))
        if special.any():
            events += self._sequenced(fb, ids.sa, ids.da, pgns, np.flatnonzero(special).tolist())
            self.frames_decoded += int(special.sum())
        for pgn in np.unique(pgns[ok & ~special]).tolist():
            sel = ok & (pgns == pgn)
            cm = self.messages.get(pgn)
            if cm is None:
                self.frames_unknown += int(sel.sum())
                continue
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
        # The DM1 active set moves exactly when DTCs open or close.
        changed = any(e.kind.startswith("dtc_") for e in events)
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
        src = f"{self.bus}/{sa:02X}"
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
    ) -> list[Event]:
        events: list[Event] = []
        for i in indices:
            pgn = int(pgns[i])
            t = float(fb.ts[i])
            if pgn == PGN_DM1:
                events += self._dm1(t, int(sa[i]), bytes(fb.data[i, : fb.dlc[i]]))
                continue
            if fb.dlc[i] < 8:
                self.errors["tp_short_frame"] += 1
                continue
            data = bytes(fb.data[i])
            if pgn == PGN_TP_CM:
                self.tp.on_cm(t, int(sa[i]), int(da[i]), data)
                continue
            done = self.tp.on_dt(t, int(sa[i]), int(da[i]), data)
            if done is not None and done.pgn == PGN_DM1:
                events += self._dm1(done.ts, done.sa, done.payload)
        return events

    def _dm1(self, ts: float, sa: int, payload: bytes) -> list[Event]:
        try:
            dm1 = parse_dm1(payload)
        except ValueError:
            self.errors["dm1_malformed"] += 1
            return []
        now = {(d.spn, d.fmi): d for d in dm1.dtcs}
        before = self._active_dtcs.get(sa, set())
        src = f"{self.bus}/{sa:02X}"
        lamps = {"mil": dm1.mil, "red_stop": dm1.red_stop, "amber_warning": dm1.amber_warning, "protect": dm1.protect}
        events = [
            Event("dtc_open", ts, {"source": src, "spn": k[0], "fmi": k[1], "occurrence": now[k].occurrence, **lamps})
            for k in sorted(now.keys() - before)
        ]
        events += [
            Event("dtc_close", ts, {"source": src, "spn": k[0], "fmi": k[1]}) for k in sorted(before - now.keys())
        ]
        self._active_dtcs[sa] = set(now)
        self.dtc_events += len(events)
        return events

    def signals(self) -> set[str]:
        out: set[str] = set()
        for cm in self.messages.values():
            out.update(f.name for f in cm.fast)
            out.update(f"{cm.name}.{s}" for s in cm.slow)
        return out

    def counters(self) -> dict[str, int]:
        return {"frames": self.frames, "frames_decoded": self.frames_decoded, "frames_unknown": self.frames_unknown,
                "dtc_events": self.dtc_events}

    def active_dtcs(self) -> dict[str, list[tuple[int, int]]]:
        return {f"{self.bus}/{sa:02X}": sorted(v) for sa, v in self._active_dtcs.items() if v}

    def state(self) -> dict[str, list[list[int]]]:
        """The DM1 active set per source address, to persist: a restart continues from it instead of announcing
        every active DTC again as new."""
        return {f"{sa:02X}": [list(k) for k in sorted(v)] for sa, v in sorted(self._active_dtcs.items())}

    def restore(self, saved: object) -> bool:
        """Take back a `state()`; False (nothing changed) if it is damaged. The first DM1 after the restart
        then closes what cleared meanwhile and opens only what is new."""
        out: dict[int, set[tuple[int, int]]] = {}
        if not isinstance(saved, dict):
            return False
        for sa_hex, dtcs in saved.items():
            try:
                sa = int(sa_hex, 16)
            except (TypeError, ValueError):
                return False
            if not (0 <= sa <= 0xFF and isinstance(dtcs, list)):
                return False
            keys: set[tuple[int, int]] = set()
            for d in dtcs:
                if not (isinstance(d, list) and len(d) == 2 and all(type(x) is int for x in d)
                        and 0 <= d[0] < 1 << 19 and 0 <= d[1] < 32):
                    return False
                keys.add((d[0], d[1]))
            out[sa] = keys
        self._active_dtcs = out
        return True
