"""The directory `cloud-sync export` writes (docs/learning_loop.md, "The export"): its layout, the state file that
makes a run resumable, the manifest, and how a file is written so that a kill at any moment leaves the old file or
the new one, never half of one.

    DIR/.export-state.json   per table and vehicle, the last seq exported and the rows up to it; the arguments
    DIR/manifest.json        what was asked, what was written, complete or not (written last)
    DIR/.export.lock         held while a run writes (flock): two runs never write one DIR
    DIR/samples|alerts|events/vehicle=V/day=YYYY-MM-DD/part-<seq_lo>-<seq_hi>.parquet
    DIR/verdicts|breakdowns/part-0.parquet

A file is written as `.NAME.tmp` beside its final name (a dot: dataset readers skip it), flushed to disk and
renamed; the directory is flushed before the state that counts the file is written. So the state never counts a
file that is not there, and a file the state does not count is one renamed just before a kill: a resumed run
deletes it (`Layout.scan`). Nothing is deleted that does not have one of our names in one of our folders; a DIR
holding anything else is refused, whole, before anything is deleted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from harvester_common.clirun import UserError

DEFAULT_CHUNK_ROWS = 500_000  # rows read at once (`--chunk-rows`): what an export's memory is bounded by
MAX_CHUNK_ROWS = 10_000_000  # 10 M samples are ~0.5 GB in memory at once: past that, a chunk stops being small
FORMAT = "harvester-export"
FORMAT_VERSION = 1
STATE = ".export-state.json"
MANIFEST = "manifest.json"
LOCK = ".export.lock"
PARTITIONED = ("samples", "alerts", "events")  # by vehicle and day, each read in seq order
WHOLE = ("verdicts", "breakdowns")  # one file each, written whole by every run
TABLES = PARTITIONED + WHOLE
WHOLE_FILE = "part-0.parquet"
OUT_OF_RANGE_DAY = "out-of-range"  # the day of a ts outside years 1..9999 (only a forged record has one)

_PART = re.compile(r"part-(-?\d{1,19})-(-?\d{1,19})\.parquet")
_TMP_PART = re.compile(r"\.part-(-?\d{1,19})-(-?\d{1,19})\.parquet\.tmp")
_DAY = re.compile(r"day=(\d{4}-\d{2}-\d{2}|" + OUT_OF_RANGE_DAY + ")")


class ExportError(UserError):
    """An export refused or stopped for a reason the user can act on (one line, exit status 2). What was written
    before it is kept consistent: the same command again resumes."""


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], object], sync_dir: bool = True) -> None:
    """`write(tmp)` fills a temporary file beside `path`; it is flushed to disk and renamed to `path`. On any
    failure the temporary file is removed and `path` is as it was."""
    tmp = tmp_name(path)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync_dir:
        fsync_path(path.parent)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n"))


def makedirs(path: Path) -> None:
    """`mkdir -p`, each new directory's entry flushed to disk in its parent."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        fsync_path(d.parent)


@dataclass(slots=True)
class Position:
    """How far a (table, vehicle) is exported: the last seq written, and the rows up to it."""

    seq: int | None = None  # None: nothing yet
    rows: int = 0


@dataclass(slots=True)
class State:
    args: dict[str, Any]
    positions: dict[str, dict[str, Position]] = field(default_factory=lambda: {t: {} for t in PARTITIONED})

    def position(self, table: str, vehicle: str) -> Position:
        return self.positions[table].setdefault(vehicle, Position())

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "args": self.args,
                "tables": {t: {v: {"seq": p.seq, "rows": p.rows} for v, p in sorted(ps.items())}
                           for t, ps in self.positions.items()}}

    @classmethod
    def from_json(cls, d: Any, where: Path) -> State:
        bad = ExportError(f"{where}: not a state file of cloud-sync export (or a damaged one); use another DIR")
        if not isinstance(d, dict) or d.get("format") != FORMAT or not isinstance(d.get("args"), dict):
            raise bad
        if d.get("version") != FORMAT_VERSION:
            raise ExportError(f"{where}: an export of format version {d.get('version')!r}, not "
                              f"{FORMAT_VERSION}; use another DIR")
        state = cls(d["args"])
        tables = d.get("tables")
        if not isinstance(tables, dict):
            raise bad
        for t in PARTITIONED:
            by_vehicle = tables.get(t, {})
            if not isinstance(by_vehicle, dict):
                raise bad
            for v, p in by_vehicle.items():
                if not isinstance(p, dict):
                    raise bad
                seq, rows = p.get("seq"), p.get("rows")
                if not (seq is None or type(seq) is int) or type(rows) is not int or rows < 0:
                    raise bad
                state.positions[t][str(v)] = Position(seq, rows)
        return state


def vehicle_dir(vehicle: str) -> str:
    # Vehicle ids are [A-Za-z0-9_.-] (harvester_common/wire.py), which quote() leaves alone; a forged one with a
    # slash or a space is percent-encoded, as Hive partitioning readers (pyarrow, polars, DuckDB) decode it.
    return "vehicle=" + quote(vehicle, safe="")


def part_name(seq_lo: int, seq_hi: int) -> str:
    return f"part-{seq_lo}-{seq_hi}.parquet"


@dataclass(slots=True)
class Scan:
    """What a resumed run found in DIR: files past their table's recorded seq and leftover temporary files (both
    ours, to delete), with the rows they hold not counted anywhere."""

    delete: list[Path] = field(default_factory=list)


class Layout:
    """One export directory. `open` checks it and takes its lock; `scan` plans what a resumed run deletes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock_fd: int | None = None

    def table_dir(self, table: str) -> Path:
        return self.root / table

    def partition(self, table: str, vehicle: str, day: str) -> Path:
        return self.root / table / vehicle_dir(vehicle) / f"day={day}"

    def open(self) -> State | None:
        """Check DIR and lock it; the state of the export it holds, or None for a new export (DIR missing or
        empty). ExportError for a file, a folder holding anything else, or one another run is writing."""
        if self.root.exists() and not self.root.is_dir():
            raise ExportError(f"{self.root}: not a directory")
        state_file = self.root / STATE
        if self.root.is_dir() and not state_file.exists():
            # A new export: DIR must hold nothing but what a run killed before its first state write leaves. Checked
            # before the lock file is made: a folder that is not ours gets nothing written into it.
            others = sorted(p.name for p in self.root.iterdir() if p.name not in (LOCK, tmp_name(state_file).name))
            if others:
                raise ExportError(f"{self.root}: holds files that are not an export of cloud-sync ({others[0]}"
                                  f"{', ...' if len(others) > 1 else ''}): choose an empty or new directory")
        try:
            makedirs(self.root)
            self._lock_fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ExportError(f"{self.root}: cannot write: {e.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise ExportError(f"{self.root}: another export is writing this directory") from None
        if not state_file.exists():
            return None
        try:
            return State.from_json(json.loads(state_file.read_text()), state_file)
        except (OSError, ValueError) as e:
            self.close()
            raise ExportError(f"{state_file}: unreadable ({e}); use another DIR") from None
        except ExportError:
            self.close()
            raise

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def scan(self, state: State) -> Scan:
        """Walk DIR: every entry must be one of ours (ExportError naming the first that is not, before anything is
        deleted). Files past their (table, vehicle)'s recorded seq, and temporary files, are to be deleted."""
        out = Scan()
        root_tmp = {tmp_name(self.root / n).name for n in (STATE, MANIFEST)}
        for p in self.root.iterdir():
            if p.name in root_tmp:
                out.delete.append(p)
            elif p.name not in (STATE, MANIFEST, LOCK, *TABLES) or (p.name in TABLES) != p.is_dir():
                raise self._foreign(p)
        for table in WHOLE:
            for p in self._entries(self.table_dir(table)):
                if p.name == tmp_name(p.with_name(WHOLE_FILE)).name:
                    out.delete.append(p)
                elif p.name != WHOLE_FILE or not p.is_file():
                    raise self._foreign(p)
        for table in PARTITIONED:
            for vdir in self._entries(self.table_dir(table)):
                if not vdir.name.startswith("vehicle=") or not vdir.is_dir():
                    raise self._foreign(vdir)
                pos = state.positions[table].get(unquote(vdir.name.removeprefix("vehicle=")), Position())
                for ddir in self._entries(vdir):
                    if not _DAY.fullmatch(ddir.name) or not ddir.is_dir():
                        raise self._foreign(ddir)
                    for f in self._entries(ddir):
                        m = _PART.fullmatch(f.name)
                        if _TMP_PART.fullmatch(f.name):
                            out.delete.append(f)
                        elif m is None or not f.is_file():
                            raise self._foreign(f)
                        elif pos.seq is None or int(m.group(2)) > pos.seq:
                            out.delete.append(f)
        return out

    def files(self, table: str, vehicle: str) -> Iterator[Path]:
        """The part files of one (table, vehicle)."""
        vdir = self.table_dir(table) / vehicle_dir(vehicle)
        for ddir in self._entries(vdir):
            for f in self._entries(ddir):
                if _PART.fullmatch(f.name):
                    yield f

    def delete(self, paths: list[Path]) -> None:
        """Delete files of ours, then the day and vehicle folders they leave empty; flushed to disk."""
        dirs = set()
        for p in paths:
            p.unlink(missing_ok=True)
            dirs.add(p.parent)
        for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
            fsync_path(d)
            for x in (d, d.parent):
                if x.name.startswith(("day=", "vehicle=")) and x.is_dir() and not any(x.iterdir()):
                    x.rmdir()
                    fsync_path(x.parent)

    def _entries(self, d: Path) -> list[Path]:
        try:
            return sorted(d.iterdir())
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            raise self._foreign(d) from None

    def _foreign(self, p: Path) -> ExportError:
        return ExportError(f"{p}: not a file of this export (cloud-sync export deletes nothing it did not write): "
                           f"move it away, or export into another DIR")


def is_disk_full(e: OSError) -> bool:
    """ENOSPC/EDQUOT/EFBIG, also as pyarrow reports them (in the text, without an errno)."""
    codes = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    return e.errno in codes or any(os.strerror(c) in str(e) for c in codes)
