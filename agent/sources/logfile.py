"""Recorded CAN logs, for replay: a file that cannot be read is one error, bad records are read around.

Formats: candump -L (`.log` whose first line looks like one; agent/sources/candump.py), MF4 bus logging (with
asammdf; agent/sources/mf4.py), and what else python-can reads (agent/sources/pylogs.py): ASC, TRC, python-can CSV,
python-can's canutils `.log` (text); BLF, SQLite `.db` (binary); `.gz` of any of them.

Two ways in, one contract: `open_log` gives can.Message objects; `open_chunks` gives the same frames as columns
(`LabelledFrames`), candump -L and MF4 parsed in bulk (no Python object per frame), the other formats through
their message readers converted a chunk at a time. Replay reads chunks.

Contract of `open_log` and `open_chunks`:
- It reads up to the first frame before returning, so a file with no frame to give fails at once, before a replay
  does any work: a missing or empty file, one no reader accepts (random bytes, another format under the name), or
  one whose every record is bad. `LogUnreadable` says which and why in one line.
- Text formats are read line by line: a line that is not UTF-8, too long (>= MAX_LINE bytes) or that the reader
  cannot parse is counted (`log_bad_line`) and skipped, and reading goes on after it (python-can's readers stop at
  the first bad line; here the reader is restarted after it, fed the header lines it saw before its first frame).
  candump -L lines are parsed by our own reader, which counts and skips the same way.
- BLF is read object by object: a damaged container (it does not decompress or parse) or object header is
  skipped, counted (`log_bad_record`), and reading resumes at the next object.
- Other binary formats have no records to resynchronise on: a record that cannot be read mid-file (truncated,
  corrupt) ends that file; the frames before it are kept and the cut is counted (`log_unreadable`) when the reader
  raises, or for BLF when the file is shorter than its header says. asammdf reads a cut MF4 up to the cut without saying
  so: fewer frames, nothing counted (a channel group asammdf fails on after others were read: counted, the groups
  before it kept). SQLite cut short is a malformed database, unreadable as a whole.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from agent.frames import LabelledFrames
from agent.sources.asc import read_asc_chunks
from agent.sources.blf import BlfReader
from agent.sources.candump import looks_like_candump, read_candump, read_candump_chunks
from agent.sources.logerror import LogUnreadable as LogUnreadable
from agent.sources.logerror import why
from agent.sources.mf4 import MF4Unreadable, NotMonotonic, read_mf4

if TYPE_CHECKING:
    import can

TEXT_SUFFIXES = (".asc", ".trc", ".csv", ".log")
CHUNK_FRAMES = 5000  # frames per chunk from the per-message readers and MF4
T = TypeVar("T")


def _check(path: Path) -> str:
    """The file's format suffix; `LogUnreadable` for a file that cannot be a log at all."""
    if not path.is_file():
        raise LogUnreadable(f"{path}: no such file")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise LogUnreadable(f"{path}: {why(e)}") from None
    if size == 0:
        raise LogUnreadable(f"{path}: empty file, no log in it")
    suffix = path.suffix.lower()
    if suffix not in (*TEXT_SUFFIXES, ".blf", ".mf4", ".db", ".gz"):
        raise LogUnreadable(f"{path}: unknown log format {suffix!r} (candump -L .log, .asc, .blf, .trc, .csv, "
                            ".mf4, .db, or one of them .gz)")
    return suffix


def _first(path: Path, suffix: str, errors: Counter[str], start: Callable[[], Iterator[T]]) -> Iterator[T]:
    """`start()`'s items, the first already read: a reader with nothing to give fails here, in one line."""
    bad_before = errors["log_bad_line"]
    try:
        it = start()
        first = next(it)
    except StopIteration:
        bad = errors["log_bad_line"] - bad_before
        lines = f" ({bad} unreadable line{'s' if bad != 1 else ''})" if bad else ""
        raise LogUnreadable(f"{path}: no CAN frames in it{lines}") from None
    except LogUnreadable as e:
        raise LogUnreadable(f"{path}: not a readable {suffix} log ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LogUnreadable(f"{path}: not a readable {suffix} log ({why(e)})") from None
    return itertools.chain([first], it)


def _messages(path: Path, suffix: str, errors: Counter[str]) -> Iterator[can.Message]:
    if suffix == ".log" and looks_like_candump(path):
        return read_candump(path, errors)
    from agent.sources import pylogs

    if suffix in pylogs.TEXT_READERS:
        return pylogs.read_text(path, pylogs.TEXT_READERS[suffix], errors)
    return pylogs.read_binary(path, errors)


def open_log(path: Path, errors: Counter[str]) -> Iterator[can.Message]:
    """Every frame of one log; `LogUnreadable` (raised here, not later) if it has none to give."""
    suffix = _check(path)
    return _first(path, suffix, errors, lambda: _messages(path, suffix, errors))


def _candump_chunks(path: Path, errors: Counter[str]) -> Iterator[LabelledFrames]:
    with path.open("rb") as f:
        yield from read_candump_chunks(f, errors)


def _mf4_chunks(path: Path, errors: Counter[str]) -> Iterator[LabelledFrames]:
    try:
        whole = read_mf4(path, errors)
    except MF4Unreadable as e:
        raise LogUnreadable(str(e)) from None
    except NotMonotonic:  # python-can's merge of unsorted groups, kept exactly: message by message
        from agent.sources import pylogs

        yield from _message_chunks(pylogs.read_binary(path, errors), errors)
        return
    for at in range(0, len(whole), CHUNK_FRAMES):
        end = min(at + CHUNK_FRAMES, len(whole))
        yield LabelledFrames(whole.frames.take(slice(at, end)), whole.label[at:end], whole.labels)


def _message_chunks(msgs: Iterator[can.Message], errors: Counter[str]) -> Iterator[LabelledFrames]:
    """A per-message reader's frames, CHUNK_FRAMES at a time as columns. A reader that raises part-way (a record
    truncated or corrupt) ends its file there: what came before is kept and the cut is counted."""
    while True:
        batch: list[can.Message] = []
        try:
            for msg in msgs:
                batch.append(msg)
                if len(batch) >= CHUNK_FRAMES:
                    break
        except LogUnreadable:
            if not batch:
                raise
            errors["log_unreadable"] += 1
            yield LabelledFrames.from_messages(batch)
            return
        except Exception:  # whatever a reader raises on a record it cannot read
            errors["log_unreadable"] += 1
            if batch:
                yield LabelledFrames.from_messages(batch)
            return
        if not batch:
            return
        yield LabelledFrames.from_messages(batch)


def _blf_chunks(path: Path, errors: Counter[str]) -> Iterator[LabelledFrames]:
    try:
        reader = BlfReader(path, errors)
    except Exception as e:  # what the reader raises on a header it cannot take (struct.error, BLFParseError)
        raise LogUnreadable(why(e)) from None
    given = False
    chunks = reader.chunks()
    while True:
        try:
            lf = next(chunks)
        except StopIteration:
            return
        except Exception as e:  # a record it cannot read around: what came before is kept, the cut counted
            if not given:
                raise LogUnreadable(why(e)) from None
            errors["log_unreadable"] += 1
            return
        given = True
        yield lf


def open_chunks(path: Path, errors: Counter[str]) -> Iterator[LabelledFrames]:
    """Every frame of one log as columns, a chunk at a time, under `open_log`'s contract (a log with no frame to
    give is `LogUnreadable` here; bad lines and records counted the same). candump -L and MF4 are read in bulk
    (no Python object per frame), BLF and ASC by our own ports of python-can's readers (no python-can import);
    the other formats through their per-message readers, converted per chunk."""
    suffix = _check(path)
    if suffix == ".log" and looks_like_candump(path):
        return _first(path, suffix, errors, lambda: _candump_chunks(path, errors))
    if suffix == ".mf4":
        return _first(path, suffix, errors, lambda: _mf4_chunks(path, errors))
    if suffix == ".blf":
        return _first(path, suffix, errors, lambda: _blf_chunks(path, errors))
    if suffix == ".asc":
        return _first(path, suffix, errors, lambda: read_asc_chunks(path, errors))
    return _first(path, suffix, errors, lambda: _message_chunks(_messages(path, suffix, errors), errors))
