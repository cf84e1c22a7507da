"""MF4 bus logging (CSS CANedge, Vector) → frames as columns, a whole channel group per asammdf call.

The same frames, in the same order, as python-can's MF4Reader (which asammdf's bus-logging code inspired): every
channel group flagged as bus events from a CAN source, its `CAN_DataFrame`, `CAN_ErrorFrame` or `CAN_RemoteFrame`
records, timestamps offset by the file's start time, channel groups merged by timestamp (ties: the earlier group
first). Error and remote frames are kept as `bad` frames (counted by the decoder, never decoded). A channel number
n is bus `can<n>`; no channel column is `can0`.

What asammdf cannot read is reported as python-can's reader would meet it: `MF4Unreadable` before the first frame
(the caller makes that `LogUnreadable`), or, for a group that fails after frames were read, the frames read so far
and `log_unreadable` counted. A channel group whose timestamps go backwards is not merged here: the caller reads
such a file message by message instead (`NotMonotonic`), so that the order stays python-can's.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.frames import PAD, FrameBatch, LabelledFrames, bus_label
from agent.sources.logerror import no_cleanup_noise, why


class MF4Unreadable(ValueError):
    """The file does not open as MF4 bus logging; the text says why."""


class NotMonotonic(ValueError):
    """A channel group's timestamps go backwards: merge it as python-can does, message by message."""


_KINDS = ("CAN_DataFrame", "CAN_ErrorFrame", "CAN_RemoteFrame")
_NONE = np.iinfo(np.int64).min  # the channel of a group without a channel column


def _groups(mdf: Any) -> list[tuple[int, str]]:
    """(group index, record kind) of each CAN bus-event channel group with records, in file order."""
    from asammdf.blocks.source_utils import Source
    from asammdf.blocks.v4_constants import FLAG_CG_BUS_EVENT

    out = []
    for gi, group in enumerate(mdf.groups):
        cg = group.channel_group
        if not cg.flags & FLAG_CG_BUS_EVENT or cg.cycles_nr == 0:
            continue
        src = cg.acq_source
        if src is None or not src.source_type & Source.SOURCE_BUS or src.bus_type != Source.BUS_TYPE_CAN:
            continue
        names = [c.name for c in group.channels]
        kind = next((k for k in _KINDS if k in names), None)  # python-can's order of preference
        if kind is not None:
            out.append((gi, kind))
    return out


def _column(rec: Any, name: str) -> npt.NDArray[Any] | None:
    return rec[name] if name in (rec.dtype.names or ()) else None


def _ints(col: npt.NDArray[Any], what: str) -> npt.NDArray[np.int64]:
    """A column python-can reads with int(): a NaN or infinity there ends its reading, so it ends ours."""
    a = np.asarray(col)
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"{what} not a number")
    return a.astype(np.int64)


def _group_frames(mdf: Any, gi: int, kind: str, start: float) -> tuple[FrameBatch, npt.NDArray[Any] | None]:
    sig = mdf.get(kind, gi, raw=False)
    rec = sig.samples
    n = len(rec)
    ts = np.asarray(sig.timestamps, np.float64) + start
    ident = _column(rec, f"{kind}.ID")
    can_id = (np.zeros(n, np.uint32) if ident is None
              else (np.asarray(ident).astype(np.uint64) & 0x1FFFFFFF).astype(np.uint32))
    ide = _column(rec, f"{kind}.IDE")
    extended = np.ones(n, np.bool_) if ide is None else np.asarray(ide).astype(np.bool_)
    length = _column(rec, f"{kind}.DataLength")
    payload = _column(rec, f"{kind}.DataBytes")
    data = np.full((n, 8), PAD, np.uint8)
    dlc = np.zeros(n, np.uint8)
    too_long = np.zeros(n, np.bool_)
    if kind != "CAN_RemoteFrame" and length is not None and payload is not None:
        raw = np.ascontiguousarray(payload).view(np.uint8).reshape(n, -1)
        size = _ints(length, "DataLength")
        # python-can slices the payload with it: a negative length leaves that many bytes off the end
        size = np.where(size < 0, np.maximum(raw.shape[1] + size, 0), np.minimum(size, raw.shape[1]))
        too_long = size > 8
        dlc = np.minimum(size, 8).astype(np.uint8)
        width = min(8, raw.shape[1])
        keep = np.arange(width)[None, :] < dlc[:, None]
        data[:, :width] = np.where(keep, raw[:, :width], PAD)
    bad = too_long if kind == "CAN_DataFrame" else np.ones(n, np.bool_)
    bus = _column(rec, f"{kind}.BusChannel")
    channel = None if bus is None else _ints(bus, "BusChannel")
    return FrameBatch(ts, can_id, dlc, data, extended, bad, ""), channel


def read_mf4(path: Path, errors: Counter[str]) -> LabelledFrames:
    """Every frame of the file (MF4 files are read whole by asammdf anyway)."""
    try:
        from asammdf import MDF
    except ImportError:
        raise MF4Unreadable("MF4 needs asammdf (the package's mf4 extra)") from None
    reason = None
    with no_cleanup_noise():
        try:
            mdf: Any = MDF(str(path))
        except Exception as e:  # whatever asammdf raises on content it cannot take
            reason = why(e)
    if reason is not None:  # raised here, not in the except: the half-built MDF is gone, not kept as __context__
        raise MF4Unreadable(reason)
    try:
        try:
            start = float(mdf.header.start_time.timestamp())
            groups = _groups(mdf)
        except Exception as e:  # not MDF 4 bus logging (an MDF 3 file has no such channel groups)
            raise MF4Unreadable(why(e)) from None
        parts: list[tuple[FrameBatch, npt.NDArray[Any] | None]] = []
        for gi, kind in groups:
            try:
                fb, channel = _group_frames(mdf, gi, kind, start)
            except Exception as e:  # a group cut short or corrupt: what came before is kept
                if not parts:
                    raise MF4Unreadable(why(e)) from None
                errors["log_unreadable"] += 1
                break
            if len(fb) and bool((np.diff(fb.ts) < 0).any()):
                raise NotMonotonic(f"channel group {gi}: timestamps go backwards")
            parts.append((fb, channel))
    finally:
        mdf.close()
    return _merge(parts)


def _merge(parts: list[tuple[FrameBatch, npt.NDArray[Any] | None]]) -> LabelledFrames:
    frames = FrameBatch.concat([p for p, _ in parts], "")
    channels = [np.full(len(p), _NONE, np.int64) if c is None else c for p, c in parts]
    channel = np.concatenate(channels) if channels else np.zeros(0, np.int64)
    if len(parts) > 1:  # heapq.merge of sorted groups, ties to the earlier group: a stable sort of the whole
        order = np.argsort(frames.ts, kind="stable")
        frames, channel = frames.take(order), channel[order]
    values, first, code = np.unique(channel, return_index=True, return_inverse=True)
    by_first = np.argsort(first)
    renumber = np.empty(values.size, np.int32)
    renumber[by_first] = np.arange(values.size, dtype=np.int32)
    labels = [bus_label(None if v == _NONE else v) for v in values[by_first].tolist()]
    return LabelledFrames(frames, renumber[code.reshape(-1)], labels)
