"""Reading a `cloud-sync export` dataset (docs/learning_loop.md, "The export") for the model build: the manifest
checked, the small tables (alerts, verdicts, breakdowns) read whole, and each vehicle's samples streamed day by
day, in seq order, through the agent's own `FeatureEngine` with a model's features, so that memory holds one
record batch of samples and the windows, whatever the export's size.

Of the manifest the build relies on `complete` alone (true: the export finished). Samples are matched to
features by signal name; the source is ignored. A vehicle's days run through one engine, as the vehicle's own
windows ran across midnight; a window belongs to the UTC day of its end. Anything unreadable (a file that is not
Parquet, a column missing) is an `ExportError` naming the file: one line, exit status 2 in the command.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.contract import FeatureSpec
from agent.features import FeatureEngine
from models.fleetlabels import AlertRecord, BreakdownRecord, VerdictRecord, day_of, day_start

BATCH_ROWS = 65_536  # samples per record batch: the engine is fed what a vehicle's reader hands over, roughly
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
_PART = re.compile(r"part-(\d+)-(\d+)\.parquet")
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
# Where `cloud-sync export` files rows whose time lies outside years 1..9999 (cloud_sync/exportdir.py's
# OUT_OF_RANGE_DAY: a vehicle's clock gone wild, or a forged record). Their samples are counted and left out.
OUT_OF_RANGE_DAY = "out-of-range"
# Sample times the build takes: Unix seconds from 1970 to the year 5138 (as model packages' `created`); a stored
# time outside (a vehicle's clock gone wild) is counted and left out, never a crash on a date no calendar has.
MAX_TS = 1e11
# How far out of time order a vehicle's stored samples may be (a decoded batch's span, seconds): the reader holds
# back this much of each record batch until the next is read (`_in_time_order`).
REORDER_S = 30.0
SAMPLE_COLUMNS = ("ts", "signal", "value")


class ExportError(ValueError):
    """A folder that is not a complete, readable export; the text says which file and why, in one line."""


@dataclass(slots=True)
class DayWindows:
    """One vehicle-day's windows: end times, features (NaN: missing), and whether the engine ran."""

    vehicle: str
    day: str
    end: npt.NDArray[np.float64]
    x: npt.NDArray[np.float64]
    full: npt.NDArray[np.bool_]  # the window had data over all its length (not the warm-up after a start or gap)


@dataclass(slots=True)
class Export:
    root: Path
    manifest: dict[str, Any]
    files: dict[str, dict[str, list[Path]]]  # vehicle -> day -> sample files in seq order
    alerts: list[AlertRecord]
    verdicts: list[VerdictRecord]
    breakdowns: list[BreakdownRecord]
    unusable: dict[str, int] = field(default_factory=dict)  # verdict and breakdown rows without an integer id
    samples_read: int = 0
    samples_out_of_range: int = 0  # a time that is not a number in [0, MAX_TS): left out

    @property
    def vehicles(self) -> list[str]:
        return sorted(self.files)

    def days(self) -> list[tuple[str, str]]:
        return [(v, d) for v in sorted(self.files) for d in sorted(self.files[v])]


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _partitioning() -> Any:
    import pyarrow as pa
    import pyarrow.dataset as ds

    # Both keys as text, whatever they look like ("007" stays a name, not a number).
    return ds.partitioning(pa.schema([("vehicle", pa.string()), ("day", pa.string())]), flavor="hive")


def _read_manifest(root: Path) -> dict[str, Any]:
    if not root.exists():
        raise ExportError(f"{root}: no such directory")
    if not root.is_dir():
        raise ExportError(f"{root}: not a directory (give the folder `cloud-sync export --out` wrote)")
    path = root / "manifest.json"
    if not path.is_file():
        raise ExportError(f"{root} is not an export: it has no manifest.json (`cloud-sync export` writes it last)")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise ExportError(f"{path}: cannot read it: {e.strerror or e}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ExportError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes: not an export's manifest")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: not JSON: {_one_line(str(e))}") from None
    if not isinstance(manifest, dict):
        raise ExportError(f"{path}: not a JSON object")
    if manifest.get("complete") is not True:
        raise ExportError(f"the export in {root} is incomplete (manifest.json does not say \"complete\": true): "
                          "run the same `cloud-sync export` again to finish it")
    return manifest


def _fragments(root: Path, table: str) -> list[tuple[str, str, Path]]:
    """(vehicle, day, file) of a partitioned table; none if the table is absent."""
    import pyarrow.dataset as ds

    folder = root / table
    if not folder.is_dir():
        return []
    try:
        dset = ds.dataset(str(folder), format="parquet", partitioning=_partitioning())
        out = []
        for frag in dset.get_fragments():
            keys = ds.get_partition_keys(frag.partition_expression)
            vehicle, day = keys.get("vehicle"), keys.get("day")
            if not isinstance(vehicle, str) or not isinstance(day, str) or not vehicle or not (
                    _is_day(day) or day == OUT_OF_RANGE_DAY):
                raise ExportError(f"{frag.path}: not under {table}/vehicle=V/day=YYYY-MM-DD/ (or "
                                  f"day={OUT_OF_RANGE_DAY})")
            out.append((vehicle, day, Path(frag.path)))
    except ExportError:
        raise
    except Exception as e:  # pyarrow's own exception types: a file that is not Parquet, mixed schemas
        raise ExportError(f"{folder}: cannot be read as a Parquet dataset: {_one_line(str(e))}") from None
    return out


def _is_day(text: str) -> bool:
    try:
        day_start(text)
    except ValueError:
        return False
    return bool(_DAY.fullmatch(text))


def _seq_order(p: Path) -> tuple[float, str]:
    m = _PART.fullmatch(p.name)
    return (float(m.group(1)) if m else math.inf, p.name)


def _table(path: Path | str, columns: Sequence[str], partitioned: bool) -> Any:
    """A whole table (small ones: alerts, verdicts, breakdowns), `columns` required."""
    import pyarrow.dataset as ds

    try:
        dset = ds.dataset(str(path), format="parquet", partitioning=_partitioning() if partitioned else None)
        missing = [c for c in columns if c not in dset.schema.names]
        if missing:
            raise ExportError(f"{path}: no column {', '.join(missing)} (an export's table has them)")
        return dset.to_table(columns=list(columns))
    except ExportError:
        raise
    except Exception as e:  # pyarrow's own exception types
        raise ExportError(f"{path}: cannot be read: {_one_line(str(e))}") from None


def _texts(table: Any, name: str) -> list[str]:
    return ["" if v is None else str(v) for v in table.column(name).to_pylist()]


def _floats(table: Any, name: str) -> list[float]:
    return [math.nan if v is None else float(v) for v in table.column(name).to_pylist()]


def _window_start(record: str) -> float:
    try:
        v = json.loads(record).get("window_start")
    except (ValueError, AttributeError):
        return math.nan
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan


def open_export(root: Path) -> Export:
    """The export in `root`, checked and indexed (samples are read later, by `vehicle_windows`)."""
    root = Path(root)
    manifest = _read_manifest(root)
    files: dict[str, dict[str, list[Path]]] = {}
    out_of_range = 0
    for vehicle, day, path in _fragments(root, "samples"):
        check_samples_file(path)
        if day == OUT_OF_RANGE_DAY:  # no calendar day: no window can hold them
            out_of_range += _rows(path)
            continue
        files.setdefault(vehicle, {}).setdefault(day, []).append(path)
    for days in files.values():
        for paths in days.values():
            paths.sort(key=_seq_order)
    alerts: list[AlertRecord] = []
    if _fragments(root, "alerts"):
        t = _table(root / "alerts", ("vehicle", "alert_id", "state", "ts", "label", "record"), True)
        for v, aid, st, ts, lab, rec in zip(_texts(t, "vehicle"), _texts(t, "alert_id"), _texts(t, "state"),
                                           _floats(t, "ts"), _texts(t, "label"), _texts(t, "record"), strict=True):
            # The open record's window start matters only when the open record is not in the export.
            alerts.append(AlertRecord(v, aid, st, ts, lab, _window_start(rec) if st != "open" else math.nan))
    unusable: dict[str, int] = {}
    verdicts: list[VerdictRecord] = []
    if (root / "verdicts").is_dir() and any((root / "verdicts").glob("*.parquet")):
        t = _table(root / "verdicts", ("id", "vehicle", "alert_id", "label", "fault"), False)
        for i, v, aid, lab, fault in zip(t.column("id").to_pylist(), _texts(t, "vehicle"), _texts(t, "alert_id"),
                                         _texts(t, "label"), _texts(t, "fault"), strict=True):
            if isinstance(i, int):
                verdicts.append(VerdictRecord(i, v, aid, lab, fault))
            else:
                unusable["verdicts"] = unusable.get("verdicts", 0) + 1
    breakdowns: list[BreakdownRecord] = []
    if (root / "breakdowns").is_dir() and any((root / "breakdowns").glob("*.parquet")):
        t = _table(root / "breakdowns", ("id", "vehicle", "at", "fault"), False)
        for i, v, at, fault in zip(t.column("id").to_pylist(), _texts(t, "vehicle"), _floats(t, "at"),
                                   _texts(t, "fault"), strict=True):
            if isinstance(i, int):
                breakdowns.append(BreakdownRecord(i, v, at, fault))
            else:
                unusable["breakdowns"] = unusable.get("breakdowns", 0) + 1
    export = Export(root, manifest, files, alerts, verdicts, breakdowns, unusable)
    export.samples_read += out_of_range
    export.samples_out_of_range += out_of_range
    return export


def _rows(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return int(pq.ParquetFile(str(path)).metadata.num_rows)
    except Exception as e:  # pyarrow's own exception types: not Parquet, truncated
        raise ExportError(f"{path}: cannot be read: {_one_line(str(e))}") from None


def check_samples_file(path: Path) -> None:
    """ExportError unless `path` is a Parquet file (its footer read) with the sample columns the build reads, of
    types it can read: so that a damaged or foreign file fails before any work, not in the middle of it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(str(path))
    except Exception as e:  # pyarrow's own exception types: not Parquet, truncated
        raise ExportError(f"{path}: cannot be read: {_one_line(str(e))}") from None
    missing = [c for c in SAMPLE_COLUMNS if c not in schema.names]
    if missing:
        raise ExportError(f"{path}: no column {', '.join(missing)} (an export's samples have them)")
    for name in ("ts", "value"):
        t = schema.field(name).type
        if not (pa.types.is_floating(t) or pa.types.is_integer(t)):
            raise ExportError(f"{path}: samples of the wrong types: {name} is {t}, not a number")
    t = schema.field("signal").type
    if pa.types.is_dictionary(t):
        t = t.value_type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise ExportError(f"{path}: samples of the wrong types: signal is {t}, not text")


def _batches(path: Path) -> Iterator[Any]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(path))
        yield from pf.iter_batches(batch_size=BATCH_ROWS, columns=list(SAMPLE_COLUMNS))
    except ExportError:
        raise
    except Exception as e:  # pyarrow's own exception types: a truncated or corrupt file
        raise ExportError(f"{path}: cannot be read: {_one_line(str(e))}") from None


def _signal_index(column: Any, index: dict[str, int]) -> npt.NDArray[np.int32]:
    """Per row, the engine's index of its signal (-1: not a feature's signal)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not pa.types.is_dictionary(column.type):
        column = pc.dictionary_encode(column)
    lut = np.array([index.get(s, -1) if isinstance(s, str) else -1 for s in column.dictionary.to_pylist()] + [-1],
                   np.int32)
    codes = column.indices.to_numpy(zero_copy_only=False)
    if column.null_count:
        codes = np.where(column.is_valid().to_numpy(zero_copy_only=False), codes, len(lut) - 1)
    return lut[np.asarray(codes, np.int64)]


def _in_time_order(export: Export, vehicle: str,
                   index: dict[str, int]) -> Iterator[tuple[npt.NDArray[np.float64], npt.NDArray[np.int32],
                                                            npt.NDArray[np.float64]]]:
    """`vehicle`'s samples (time, engine index, value) in time order, a record batch at a time. Rows are stored in
    seq order, which is the order the vehicle decoded them in, not quite time order (a decoded batch holds its
    messages' signals one after another); the last REORDER_S of each batch wait for the next, so that what the
    engine is fed is in time order as the vehicle fed it, whatever the file and batch boundaries."""
    import pyarrow as pa

    held: tuple[npt.NDArray[np.float64], npt.NDArray[np.int32], npt.NDArray[np.float64]] | None = None
    for day in sorted(export.files.get(vehicle, {})):
        for path in export.files[vehicle][day]:
            for batch in _batches(path):
                try:
                    ts = batch.column("ts").cast(pa.float64()).to_numpy(zero_copy_only=False)
                    value = batch.column("value").cast(pa.float64()).to_numpy(zero_copy_only=False)
                    sig = _signal_index(batch.column("signal"), index)
                except (pa.ArrowException, TypeError, ValueError) as e:  # columns of the wrong types
                    raise ExportError(f"{path}: samples of the wrong types: {_one_line(str(e))}") from None
                export.samples_read += len(ts)
                with np.errstate(invalid="ignore"):
                    ok = (ts >= 0) & (ts < MAX_TS)
                if not ok.all():
                    export.samples_out_of_range += int((~ok).sum())
                    ts, sig, value = ts[ok], sig[ok], value[ok]
                keep = sig >= 0  # signals no feature reads are no part of any window
                ts, sig, value = ts[keep], sig[keep], value[keep]
                if held is not None:
                    ts, sig, value = (np.concatenate([held[0], ts]), np.concatenate([held[1], sig]),
                                      np.concatenate([held[2], value]))
                if not len(ts):
                    held = None
                    continue
                order = np.argsort(ts, kind="stable")
                ts, sig, value = ts[order], sig[order], value[order]
                cut = int(np.searchsorted(ts, ts[-1] - REORDER_S, "left"))
                held = (ts[cut:], sig[cut:], value[cut:])
                if cut:
                    yield ts[:cut], sig[:cut], value[:cut]
    if held is not None and len(held[0]):
        yield held


def vehicle_windows(export: Export, vehicle: str, features: Sequence[FeatureSpec],
                    hop_s: float) -> Iterator[DayWindows]:
    """`vehicle`'s windows, one DayWindows per UTC day of window ends, in day order (days without a window are
    not given)."""
    eng = FeatureEngine(features, hop_s)
    ends: list[float] = []
    rows: list[npt.NDArray[np.float64]] = []
    full: list[bool] = []
    current = ""
    # Where each stretch of data begins: the first sample, and each one after a gap longer than any window (where
    # the engine starts its windows afresh, as the vehicle's did after a restart).
    starts: list[float] = []
    last = -math.inf

    def flush(day: str) -> DayWindows:
        x = np.stack(rows) if rows else np.zeros((0, len(features)))
        out = DayWindows(vehicle, day, np.array(ends, np.float64), x, np.array(full, bool))
        ends.clear()
        rows.clear()
        full.clear()
        return out

    for ts, sig, value in _in_time_order(export, vehicle, eng.signal_index):
        gaps = np.flatnonzero(np.diff(np.concatenate([[last], ts])) > eng.max_window_s)
        starts += ts[gaps].tolist()
        last = float(ts[-1])
        for r in eng.feed(ts, sig, value):
            d = day_of(r.end)
            if d != current and ends:
                yield flush(current)
            current = d
            ends.append(r.end)
            rows.append(r.x)
            began = starts[bisect.bisect_right(starts, r.end) - 1]
            full.append(r.end - eng.max_window_s >= began)
    if ends:
        yield flush(current)
