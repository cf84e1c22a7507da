"""`cloud-sync export`: the cloud's data as a Parquet dataset, the raw data a model is retrained from
(docs/learning_loop.md, "The export", is the contract; cloud_sync/exportdir.py the directory and its state files).

- **Lossless**: every stored column of every selected row. Samples carry their signal's name, source and unit
  (from `signals`) and their float64 values bit for bit; alerts and events their stored `record` text.
- **Selection**: `Selection.vehicles` (None: every vehicle the database knows), `since`/`until` on `ts`,
  half-open. Verdicts and breakdowns of the selected vehicles are exported whole.
- **Streaming**: each (vehicle, table) is read in seq order by key ranges (`seq > last ORDER BY seq LIMIT n`):
  samples `chunk_rows` at a time, straight into numpy (`FleetDB.read_array`: binary COPY on PostgreSQL); records
  at most `chunk_rows` and about RECORD_CHUNK_CHARS characters of text at a time (a probe of their lengths comes
  first), so memory is bounded by one chunk however long the period. A chunk becomes one file per UTC day.
- **Resumable**: after a chunk's files are on disk the state records its last seq. A run into a DIR with a state
  resumes there; rows stored since below a recorded seq (a gap the vehicle filled late) are noticed by their count
  and that (vehicle, table) is exported again from its start, so nothing stored is ever missed.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO, TypeVar

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from cloud_sync import __version__
from cloud_sync.errors import CloudDBError
from cloud_sync.exportdir import (
    DEFAULT_CHUNK_ROWS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MAX_CHUNK_ROWS,
    OUT_OF_RANGE_DAY,
    PARTITIONED,
    STATE,
    TABLES,
    WHOLE,
    WHOLE_FILE,
    ExportError,
    Layout,
    Position,
    State,
    fsync_path,
    is_disk_full,
    makedirs,
    part_name,
    write_atomic,
    write_json,
)
from cloud_sync.migrations import SCHEMA_VERSION
from cloud_sync.progress import Progress

RECORD_CHUNK_CHARS = 32 * 1024 * 1024  # text of alerts, events, verdicts, breakdowns read at once (at least a row)
COMPRESSION = "zstd"
# The days a file name can carry: years 1..9999. A ts outside them (a forged record) goes to day=out-of-range.
_MIN_TS, _MAX_TS = -62_135_596_800.0, 253_402_300_800.0
_OUT_OF_RANGE = np.iinfo(np.int64).max
_DAY_S = 86_400.0

_SAMPLE_DTYPE = np.dtype([("seq", "<i8"), ("ts", "<f8"), ("signal_id", "<i8"), ("value", "<f8")])
_PROBE_DTYPE = np.dtype([("key", "<i8"), ("chars", "<i8")])
_DICT = pa.dictionary(pa.int32(), pa.string())
T = TypeVar("T")


class Source(Protocol):
    """What an export reads the database through (a FleetDB)."""

    where: str

    def read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def read_array(self, sql: str, args: Sequence[Any], dtype: np.dtype[Any]) -> npt.NDArray[Any]: ...


@dataclass(frozen=True, slots=True)
class Selection:
    """What to export: vehicles (None: all the database knows), and `[since, until)` on `ts` (None: open)."""

    vehicles: tuple[str, ...] | None = None
    since: float | None = None
    until: float | None = None

    def __post_init__(self) -> None:
        for name, v in (("since", self.since), ("until", self.until)):
            if v is not None and not math.isfinite(v):
                raise ExportError(f"--{name} must be a finite time")
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ExportError(f"--since ({self.since}) must be before --until ({self.until}): the period is empty")
        if self.vehicles is not None and not self.vehicles:
            raise ExportError("--vehicles names no vehicle")

    def args(self) -> dict[str, Any]:
        """The arguments as the state and the manifest record them: a rerun must give the same ones."""
        return {"vehicles": None if self.vehicles is None else sorted(set(self.vehicles)),
                "since": self.since, "until": self.until}

    def ts_where(self) -> tuple[str, list[float]]:
        sql, args = "", list[float]()
        if self.since is not None:
            sql, args = sql + " AND ts>=?", [*args, self.since]
        if self.until is not None:
            sql, args = sql + " AND ts<?", [*args, self.until]
        return sql, args


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: pa.DataType
    dictionary: bool = False  # few distinct values: dictionary-encoded
    text: bool = False  # long free text: its length bounds a chunk


def _cols(*spec: tuple[str, str]) -> tuple[Column, ...]:
    types = {"int64": pa.int64(), "float64": pa.float64(), "string": pa.string(), "dict": pa.string(),
             "text": pa.string()}
    return tuple(Column(n, types[t], t == "dict", t in ("text", "string")) for n, t in spec)


# The columns of each record table, in file order (docs/learning_loop.md); the first is the key read in order.
RECORD_COLUMNS: dict[str, tuple[Column, ...]] = {
    "alerts": _cols(("seq", "int64"), ("alert_id", "string"), ("state", "dict"), ("ts", "float64"),
                    ("score", "float64"), ("model", "dict"), ("model_version", "dict"), ("label", "dict"),
                    ("record", "text")),
    "events": _cols(("seq", "int64"), ("kind", "dict"), ("ts", "float64"), ("record", "text")),
    "verdicts": _cols(("id", "int64"), ("vehicle", "string"), ("alert_id", "string"), ("label", "string"),
                      ("fault", "string"), ("note", "text"), ("by", "string"), ("at", "float64")),
    "breakdowns": _cols(("id", "int64"), ("vehicle", "string"), ("at", "float64"), ("fault", "string"),
                        ("note", "text"), ("by", "string"), ("recorded_at", "float64")),
}
SAMPLE_SCHEMA = pa.schema([("seq", pa.int64()), ("ts", pa.float64()), ("signal", _DICT), ("source", _DICT),
                           ("unit", _DICT), ("value", pa.float64())])


def schema(table: str) -> pa.Schema:
    if table == "samples":
        return SAMPLE_SCHEMA
    return pa.schema([(c.name, _DICT if c.dictionary else c.type) for c in RECORD_COLUMNS[table]])


@dataclass(slots=True)
class ExportResult:
    out: Path
    vehicles: list[str]
    rows: dict[str, int]  # per table: rows in the export now
    written: dict[str, int]  # per table: rows written by this run
    files: int  # files written by this run
    removed: int  # files of an interrupted run removed before resuming


def _q(name: str) -> str:
    return f'"{name}"'  # `by`, `at`: quoted, keywords or not, in both engines


class _Signals:
    """signal_id → dictionary positions of its name, source and unit; read again when a chunk names an id added
    after the last read (a receiver may be storing while we export)."""

    def __init__(self, db: Source) -> None:
        self.db = db
        self._load()

    def _load(self) -> None:
        rows = sorted(self.db.read("SELECT id, name, source, unit FROM signals"))
        self.ids = np.array([int(r[0]) for r in rows], np.int64)
        self.dicts: list[pa.Array] = []
        self.index: list[npt.NDArray[np.int32]] = []
        for k in (1, 2, 3):
            values = sorted({str(r[k]) for r in rows})
            pos = {v: i for i, v in enumerate(values)}
            self.dicts.append(pa.array(values, pa.string()))
            self.index.append(np.array([pos[str(r[k])] for r in rows], np.int32))

    def columns(self, sid: npt.NDArray[np.int64], where: str) -> list[pa.DictionaryArray]:
        at = self._positions(sid)
        if at is None:
            self._load()
            at = self._positions(sid)
        if at is None:
            missing = sorted(set(sid.tolist()) - set(self.ids.tolist()))
            raise ExportError(f"{where}: samples name signal id {missing[0]}, which the signals table does not hold "
                              "(a damaged database); nothing of this chunk was written")
        return [pa.DictionaryArray.from_arrays(pa.array(ix[at]), d) for ix, d in zip(self.index, self.dicts,
                                                                                     strict=True)]

    def _positions(self, sid: npt.NDArray[np.int64]) -> npt.NDArray[np.intp] | None:
        at = np.searchsorted(self.ids, sid)
        ok = at < len(self.ids)
        if not ok.all() or not (self.ids[at] == sid).all():
            return None
        return at


def day_groups(ts: npt.NDArray[np.float64]) -> Iterator[tuple[str, npt.NDArray[np.intp]]]:
    """(UTC day of `ts`, the positions of its rows in their order), day by day."""
    inside = (ts >= _MIN_TS) & (ts < _MAX_TS)
    # floor_divide, not floor(ts / 86400): the quotient's rounding would put the last instant of a day in the next.
    days = np.where(inside, np.floor_divide(np.where(inside, ts, 0.0), _DAY_S), 0).astype(np.int64)
    days[~inside] = _OUT_OF_RANGE
    order = np.argsort(days, kind="stable")  # stable: rows stay in seq order within a day
    sorted_days = days[order]
    starts = np.flatnonzero(np.diff(sorted_days)) + 1
    for group in np.split(order, starts):
        d = int(days[group[0]])
        yield (OUT_OF_RANGE_DAY if d == _OUT_OF_RANGE else str(np.datetime64(d, "D"))), group


class Exporter:
    """One run of an export into one DIR (`run()`); `notes` (stderr by default) gets the progress bar and what a
    resumed run did."""

    state: State
    signals: _Signals

    def __init__(self, db: Source, out: Path, selection: Selection, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                 notes: TextIO | None = None, chunk_chars: int = RECORD_CHUNK_CHARS) -> None:
        if not 1 <= chunk_rows <= MAX_CHUNK_ROWS:
            raise ExportError(f"--chunk-rows must be 1 to {MAX_CHUNK_ROWS:,}")
        self.db, self.sel, self.chunk_rows, self.chunk_chars = db, selection, chunk_rows, chunk_chars
        self.layout = Layout(out)
        self.notes = notes if notes is not None else sys.stderr
        self.files = 0
        self.written = dict.fromkeys(TABLES, 0)
        self.writing = self.layout.root  # the file being written, for an error's message
        self.bar = Progress("export", 0, self.notes)  # replaced once the rows to write are counted

    # --- the run ---------------------------------------------------------------------------------------------

    def run(self) -> ExportResult:
        vehicles = self._vehicles()
        state = self.layout.open()
        try:
            return self._run(vehicles, state)
        except OSError as e:
            raise self._write_error(e) from None
        finally:
            self.layout.close()
            self.bar.end_line()  # an error or ^C starts on a line of its own, not after a redrawn bar

    def _run(self, vehicles: list[str], state: State | None) -> ExportResult:
        root = self.layout.root
        removed = 0
        if state is None:
            state = State(self.sel.args())
            write_json(root / STATE, state.to_json())
        elif state.args != self.sel.args():
            raise ExportError(f"{root}: holds an export with other arguments ({_describe(state.args)}); give the same "
                              "ones to resume or update it, or export into another DIR")
        else:
            scan = self.layout.scan(state)
            self.layout.delete(scan.delete)
            removed = len(scan.delete)
            if removed:
                print(f"resuming: removed {removed} file(s) written after the last recorded position",
                      file=self.notes)
        self.state = state
        self._manifest(vehicles, complete=False)
        for table in TABLES:
            makedirs(self.layout.table_dir(table))
        todo = self._plan(vehicles)
        self.bar = Progress("export", sum(todo.values()), self.notes)
        self.signals = _Signals(self.db)
        for vehicle in vehicles:
            self._samples(vehicle)
            for table in ("alerts", "events"):
                self._records(table, vehicle)
        for table in WHOLE:
            self._whole(table, set(vehicles))
        self.bar.finish()
        rows = self._manifest(vehicles, complete=True)
        return ExportResult(root, vehicles, rows, dict(self.written), self.files, removed)

    def _vehicles(self) -> list[str]:
        known = [str(r[0]) for r in self._read("SELECT vehicle FROM vehicles ORDER BY vehicle")]
        if self.sel.vehicles is None:
            return known
        unknown = sorted(set(self.sel.vehicles) - set(known))
        if unknown:
            raise ExportError(f"unknown vehicle{'s' if len(unknown) > 1 else ''} (not in the database "
                              f"{self.db.where}): {', '.join(unknown)}")
        return sorted(set(self.sel.vehicles))

    def _plan(self, vehicles: list[str]) -> dict[tuple[str, str], int]:
        """Rows to write per (table, vehicle), for the progress bar. A (table, vehicle) whose rows up to its recorded
        seq are no longer the rows it exported (some were stored late, below that seq) starts again from nothing:
        its position is reset in the state first, so its files count as past the position if we are killed."""
        ts_sql, ts_args = self.sel.ts_where()
        todo: dict[tuple[str, str], int] = {}
        reset = []
        for vehicle in vehicles:
            for table in PARTITIONED:
                pos = self.state.position(table, vehicle)
                if pos.seq is None:
                    ((past,),) = self._read(f"SELECT COUNT(*) FROM {table} WHERE vehicle=?{ts_sql}",
                                            [vehicle, *ts_args])
                    todo[table, vehicle] = int(past)
                    continue
                ((upto, past),) = self._read(
                    f"SELECT COUNT(*), COALESCE(SUM(CASE WHEN seq>? THEN 1 ELSE 0 END), 0) FROM {table} "
                    f"WHERE vehicle=?{ts_sql}", [pos.seq, vehicle, *ts_args])
                upto, past = int(upto), int(past)
                if upto - past != pos.rows:
                    print(f"{table} of {vehicle}: {upto - past - pos.rows:+,} rows stored below the last exported "
                          f"seq since the export was written: exporting them again from the start", file=self.notes)
                    reset.append((table, vehicle))
                    past = upto
                todo[table, vehicle] = past
        if reset:
            for table, vehicle in reset:
                self.state.positions[table][vehicle] = Position()
            write_json(self.layout.root / STATE, self.state.to_json())
            self.layout.delete([f for table, vehicle in reset for f in self.layout.files(table, vehicle)])
        for table in WHOLE:
            ((n,),) = self._read(f"SELECT COUNT(*) FROM {table}")
            todo[table, ""] = int(n)
        return todo

    # --- reading ---------------------------------------------------------------------------------------------

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._guard(lambda: self.db.read(sql, args))

    def _read_array(self, sql: str, args: Sequence[Any], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
        return self._guard(lambda: self.db.read_array(sql, args, dtype))

    def _guard(self, read: Callable[[], T]) -> T:
        try:
            return read()
        except (CloudDBError, ExportError):
            raise
        except Exception as e:  # the driver's own error: the database, since the SQL is ours
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise CloudDBError(f"{self.db.where}: {type(e).__name__}: {first}; the export so far is kept: run the "
                               "same command again to resume") from None

    def _after(self, table: str, vehicle: str) -> tuple[str, list[Any]]:
        """The WHERE clause of a (table, vehicle)'s rows after its position, in the period."""
        pos = self.state.position(table, vehicle)
        ts_sql, ts_args = self.sel.ts_where()
        # No `seq > -2**63` for a start: a literal below BIGINT's range would keep PostgreSQL off the key's index.
        if pos.seq is None:
            return f"vehicle=?{ts_sql}", [vehicle, *ts_args]
        return f"vehicle=? AND seq>?{ts_sql}", [vehicle, pos.seq, *ts_args]

    def _samples(self, vehicle: str) -> None:
        while True:
            where, args = self._after("samples", vehicle)
            chunk = self._read_array(
                f"SELECT seq, ts, CAST(signal_id AS BIGINT), value FROM samples WHERE {where} ORDER BY seq LIMIT ?",
                [*args, self.chunk_rows], _SAMPLE_DTYPE)
            if not len(chunk):
                return
            seq = np.ascontiguousarray(chunk["seq"])
            ts = np.ascontiguousarray(chunk["ts"])
            where = f"samples of {vehicle} seq {int(seq[0])}..{int(seq[-1])}"
            names = self.signals.columns(np.ascontiguousarray(chunk["signal_id"]), where)
            table = pa.Table.from_arrays([pa.array(seq), pa.array(ts), *names,
                                          pa.array(np.ascontiguousarray(chunk["value"]))], schema=SAMPLE_SCHEMA)
            del chunk
            self._write_chunk("samples", vehicle, table, seq, ts)

    def _records(self, table: str, vehicle: str) -> None:
        cols = RECORD_COLUMNS[table]
        at_ts = [c.name for c in cols].index("ts")
        while True:
            where, args = self._after(table, vehicle)
            hi = self._chunk_end(table, "seq", cols, where, args)
            if hi is None:
                return
            rows = self._read(f"SELECT {', '.join(_q(c.name) for c in cols)} FROM {table} "
                              f"WHERE {where} AND seq<=? ORDER BY seq", [*args, hi])
            if not rows:
                return  # nothing left in the period (the probe saw the same rows: only a vacuum could differ)
            arrow = self._arrow(table, cols, rows, f"{table} of {vehicle} seq {rows[0][0]}..{hi}")
            seq = np.array([r[0] for r in rows], np.int64)
            ts = np.array([r[at_ts] for r in rows], np.float64)
            del rows
            self._write_chunk(table, vehicle, arrow, seq, ts)

    def _chunk_end(self, table: str, key: str, cols: Sequence[Column], where: str, args: list[Any]) -> int | None:
        """The key of the last row of the next chunk of a record table: at most chunk_rows rows and about
        `chunk_chars` (RECORD_CHUNK_CHARS) characters of text, but at least one row; None when nothing is left."""
        chars = " + ".join(f"COALESCE(LENGTH({_q(c.name)}), 0)" for c in cols if c.text)
        probe = self._read_array(f"SELECT {key}, CAST({chars} AS BIGINT) FROM {table} WHERE {where} "
                                 f"ORDER BY {key} LIMIT ?", [*args, self.chunk_rows], _PROBE_DTYPE)
        if not len(probe):
            return None
        fits = int(np.searchsorted(np.cumsum(probe["chars"]), self.chunk_chars, side="right"))
        return int(probe["key"][max(1, fits) - 1])

    def _arrow(self, table: str, cols: Sequence[Column], rows: list[tuple[Any, ...]], where: str) -> pa.Table:
        arrays = []
        try:
            for i, c in enumerate(cols):
                a = pa.array([r[i] for r in rows], c.type)
                arrays.append(a.dictionary_encode() if c.dictionary else a)
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
            raise ExportError(f"{where}: a stored value that is not of its column's type ({cols[i].name}: "
                              f"{str(e)[:200]}); nothing of this chunk was written") from None
        return pa.Table.from_arrays(arrays, schema=schema(table))

    # --- writing ---------------------------------------------------------------------------------------------

    def _write_chunk(self, table: str, vehicle: str, arrow: pa.Table, seq: npt.NDArray[np.int64],
                     ts: npt.NDArray[np.float64]) -> None:
        """One file per day of the chunk, each on disk before the state records the chunk's last seq."""
        dirs = set()
        for day, rows in day_groups(ts):
            d = self.layout.partition(table, vehicle, day)
            makedirs(d)
            part = arrow.take(pa.array(rows))
            self.writing = d / part_name(int(seq[rows[0]]), int(seq[rows[-1]]))
            write_atomic(self.writing, functools.partial(_write_parquet, part), sync_dir=False)
            dirs.add(d)
            self.files += 1
        for d in dirs:
            fsync_path(d)
        pos = self.state.position(table, vehicle)
        pos.seq, pos.rows = int(seq[-1]), pos.rows + len(seq)
        write_json(self.layout.root / STATE, self.state.to_json())
        self.written[table] += len(seq)
        self.bar.add(len(seq))

    def _whole(self, table: str, vehicles: set[str]) -> None:
        """A table exported whole (its rows of the selected vehicles), streamed by id into one file."""
        cols = RECORD_COLUMNS[table]
        path = self.writing = self.layout.table_dir(table) / WHOLE_FILE
        n = 0

        def write(tmp: Path) -> None:
            nonlocal n
            with pq.ParquetWriter(tmp, schema(table), compression=COMPRESSION) as w:
                where, args = "1=1", list[Any]()
                while (hi := self._chunk_end(table, "id", cols, where, args)) is not None:
                    rows = self._read(f"SELECT {', '.join(_q(c.name) for c in cols)} FROM {table} "
                                      f"WHERE {where} AND id<=? ORDER BY id", [*args, hi])
                    self.bar.add(len(rows))
                    mine = [r for r in rows if str(r[1]) in vehicles]
                    if mine:
                        w.write_table(self._arrow(table, cols, mine, f"{table} id {rows[0][0]}..{hi}"))
                    n += len(mine)
                    where, args = "id>?", [hi]

        write_atomic(path, write)
        self.files += 1
        self.written[table] = n

    def _manifest(self, vehicles: list[str], complete: bool) -> dict[str, int]:
        by_vehicle = {v: {t: self.state.position(t, v).rows for t in PARTITIONED} for v in vehicles}
        rows = {t: sum(c[t] for c in by_vehicle.values()) for t in PARTITIONED}
        rows.update({t: self.written[t] for t in WHOLE})  # written whole by each run
        write_json(self.layout.root / MANIFEST, {
            "format": FORMAT, "version": FORMAT_VERSION, "complete": complete, "args": self.state.args,
            "vehicles": vehicles, "rows": rows, "rows_by_vehicle": by_vehicle, "database": self.db.where,
            "schema_version": SCHEMA_VERSION, "cloud_sync_version": __version__, "written_at": time.time(),
            "chunk_rows": self.chunk_rows})
        return rows

    def _write_error(self, e: OSError) -> ExportError:
        where = e.filename or self.writing  # pyarrow's errors name no file
        kept = "the export so far is kept: run the same command again to resume"
        if is_disk_full(e):
            return ExportError(f"{where}: no space left on the device ({e.strerror or str(e)[:200]}); {kept} "
                               "once there is room")
        return ExportError(f"{where}: cannot write: {e.strerror or str(e)[:200]}; {kept}")


def _write_parquet(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, compression=COMPRESSION)


def export(db: Source, out: Path, selection: Selection, chunk_rows: int = DEFAULT_CHUNK_ROWS,
           notes: TextIO | None = None) -> ExportResult:
    """Export the selection into `out` (a new or empty folder, or one this export was written into before: then
    it resumes, or brings it up to date). ExportError for what the user can fix; CloudDBError for the database."""
    return Exporter(db, out, selection, chunk_rows, notes).run()


def _describe(args: dict[str, Any]) -> str:
    return json.dumps(args, sort_keys=True)
