"""DBC files parsed once per process, their tables cached on disk by content hash: a second start reads JSON in
milliseconds instead of parsing the DBC (0.8 s for the 545-PGN Vector J1939 database, plus importing cantools).

Contract of `load(path)`:
- The file is read and hashed (sha256) every time; tables are kept in memory per (path, hash), so a process that
  builds several decoders over one DBC parses it at most once, and an edited file is never served stale.
- On disk: `<folder>/<sha256>.v<FORMAT>.json`, one line of header
  `harvester-dbc-tables <FORMAT> <DBC sha256> <payload sha256> <payload bytes>` then the payload (the JSON of
  agent/decode/dbc_tables.py). The folder is `$HARVESTER_DBC_CACHE` if set (empty or `off`: no disk cache), else
  `$XDG_CACHE_HOME/harvester-agent/dbc`, else `~/.cache/harvester-agent/dbc` (for the systemd unit that is under
  the service user's home, /var/lib/harvester-agent/.cache). Deleting the folder clears it.
- A cache file is input like any other: one whose header, length, checksum, DBC hash, format or content does not
  check out (damaged, truncated, another DBC's, an older format, forged) is never used. It is counted
  (`STATS["rejected"]`, and by reason under `rejected:<reason>`), logged once, and the DBC is parsed and the file
  written again.
- Written atomically (a temp file in the folder, then rename), never fsynced: a file a power cut leaves empty or
  short fails its checks and is rewritten. A folder that cannot be created or written costs only the parse
  (counted `write_failed`, logged once per folder).
- cantools is imported only to parse (a miss), and by `SlowMessage` for the rare layouts it leaves to cantools.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.decode.dbc_tables import FORMAT, DbcTables, from_cantools, tables_from_json, tables_to_json

log = logging.getLogger(__name__)

ENV = "HARVESTER_DBC_CACHE"
MAGIC = b"harvester-dbc-tables"
MAX_PAYLOAD = 64 << 20  # the 1.5 MB Vector DBC gives ~0.5 MB; a larger "cache file" is not one of ours

# What happened, for this process: hits from memory or disk, DBCs parsed, cache files refused (also by reason),
# writes that failed. Replay reports it; tests read it.
STATS: Counter[str] = Counter()

_lock = threading.Lock()
_tables: dict[tuple[str, str], DbcTables] = {}
_parsed: dict[tuple[str, str], Any] = {}  # cantools databases parsed in this process, for SlowMessage's fallback
_warned: set[str] = set()


class DbcError(ValueError):
    """A DBC file that cannot be loaded or merged."""


def cache_dir() -> Path | None:
    env = os.environ.get(ENV)
    if env is not None:
        return None if env.strip() in ("", "off") else Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "harvester-agent" / "dbc"
    try:
        return Path.home() / ".cache" / "harvester-agent" / "dbc"
    except RuntimeError:  # no home directory to be found: no disk cache, only the parse
        return None


def _warn_once(key: str, text: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("%s", text)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DbcError(f"{path}: no such DBC file") from None
    except OSError as e:
        raise DbcError(f"{path}: not a usable DBC: {e}") from None


def _parse(path: Path, sha: str, keep: bool) -> Any:
    """cantools' parse of the file, checked to be the content that hashed to `sha` (else it changed meanwhile).
    `keep`: hold it for the rest of the process (SlowMessage's fallback); a parse only to make tables is not kept,
    so that an agent started without its cache does not carry cantools' objects of a large DBC from then on."""
    key = (str(path), sha)
    db = _parsed.get(key)
    if db is not None:
        return db
    import cantools  # here only: importing it costs more than reading a cached DBC

    try:
        db = cantools.database.load_file(str(path), strict=False)
    except FileNotFoundError:
        raise DbcError(f"{path}: no such DBC file") from None
    except Exception as e:  # cantools raises many types for bad files
        raise DbcError(f"{path}: not a usable DBC: {e}") from None
    if hashlib.sha256(_read(path)).hexdigest() != sha:
        raise DbcError(f"{path}: changed on disk while it was being loaded")
    STATS["parsed"] += 1
    if keep:
        _parsed[key] = db
    return db


def cache_file(folder: Path, sha: str) -> Path:
    return folder / f"{sha}.v{FORMAT}.json"


class _Refused(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _from_disk(file: Path, sha: str) -> DbcTables | None:
    """The tables in `file`, or None: absent (a miss) or refused (counted and logged with the reason)."""
    try:
        return _checked(file, sha)
    except FileNotFoundError:
        return None
    except _Refused as e:
        STATS["rejected"] += 1
        STATS[f"rejected:{e.reason}"] += 1
        _warn_once(f"reject:{file}", f"DBC cache file {file} not used ({e.reason}: {e}); parsing the DBC again")
        return None


def _checked(file: Path, sha: str) -> DbcTables:
    try:
        with file.open("rb") as f:
            head = f.readline(512)
            body = f.read(MAX_PAYLOAD + 1)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise _Refused("unreadable", str(e)) from None
    parts = head.split()
    if len(parts) != 5 or parts[0] != MAGIC or not head.endswith(b"\n"):
        raise _Refused("header", "not a DBC tables file")
    if parts[1] != str(FORMAT).encode():
        raise _Refused("stale", f"format {parts[1]!r}, this agent reads {FORMAT}")
    if parts[2] != sha.encode():
        raise _Refused("foreign", "tables of another DBC file")
    try:
        size = int(parts[4])
    except ValueError:
        raise _Refused("header", "bad payload length") from None
    if len(body) != size:
        raise _Refused("truncated" if len(body) < size else "length",
                       f"{len(body)} payload bytes, the header says {size}")
    if hashlib.sha256(body).hexdigest().encode() != parts[3]:
        raise _Refused("checksum", "payload checksum does not match")
    try:
        return tables_from_json(json.loads(body), sha)
    except (ValueError, RecursionError) as e:  # TablesError, JSON syntax, not UTF-8, nested beyond reason
        raise _Refused("content", str(e)[:200]) from None


def _to_disk(folder: Path, tables: DbcTables) -> None:
    try:
        payload = json.dumps(tables_to_json(tables), separators=(",", ":"), allow_nan=False).encode()
    except ValueError as e:  # a non-finite scale in the DBC: such tables are not cached, the DBC is parsed each time
        STATS["write_failed"] += 1
        _warn_once(f"encode:{tables.sha256}", f"DBC tables not cacheable ({e})")
        return
    head = b" ".join([MAGIC, str(FORMAT).encode(), tables.sha256.encode(),
                      hashlib.sha256(payload).hexdigest().encode(), str(len(payload)).encode()]) + b"\n"
    tmp: str | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=f".{tables.sha256[:16]}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(head + payload)
        os.replace(tmp, cache_file(folder, tables.sha256))
        tmp = None
        STATS["written"] += 1
    except OSError as e:
        STATS["write_failed"] += 1
        _warn_once(f"write:{folder}", f"DBC cache folder {folder} not writable ({e}); DBCs are parsed at each start")
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def load(path: Path) -> tuple[DbcTables, Callable[[], Any]]:
    """The DBC's tables, and a function giving cantools' parse of the same content (parsed on first call)."""
    data = _read(path)
    sha = hashlib.sha256(data).hexdigest()
    key = (str(path.resolve()), sha)

    def parsed() -> Any:
        with _lock:
            return _parse(path, sha, keep=True)

    with _lock:
        tables = _tables.get(key)
        if tables is not None:
            STATS["hit_memory"] += 1
            return tables, parsed
        folder = cache_dir()
        tables = _from_disk(cache_file(folder, sha), sha) if folder is not None else None
        if tables is not None:
            STATS["hit_disk"] += 1
        else:
            tables = from_cantools(_parse(path, sha, keep=False), sha)
            if folder is not None:
                _to_disk(folder, tables)
        _tables[key] = tables
        return tables, parsed


def forget() -> None:
    """Drop what this process holds in memory (tests: the next load goes to disk)."""
    with _lock:
        _tables.clear()
        _parsed.clear()
        _warned.clear()
