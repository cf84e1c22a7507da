"""The vehicle's SQLite outbox: everything waits here until the cloud acknowledges it.

One file in WAL mode with `synchronous=FULL`, so a committed write survives a power cut. Every record gets the
next per-vehicle sequence number inside the transaction that writes it. Samples are written as *segments*
(a contiguous range of sequence numbers in the wire's columnar encoding, one row per flush), alerts and events as
one row each. Rows leave the table only when the cloud acknowledges their range, or when the size bound evicts
them: oldest samples first, records (alerts, DTC events) only when no sample is left. Every eviction is counted
in `meta` and announced upstream by an `evicted` event naming the ranges, so the cloud can tell it from a gap.
Alerts and events are also counted apart (written, acked, evicted), so each kind reconciles with the cloud.

Only a file whose content is damaged is quarantined (moved aside); a locked or unreachable one is an error, never
a reason to move a live store. `Store.open_readonly` reads a store another process may be writing (`status`).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import math
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import StoreConfig
from harvester_common import wire
from harvester_common.seqranges import merge_ranges

log = logging.getLogger("agent.store")

_STORE = StoreConfig()  # the defaults of `[store] max_bytes` and `evict_watermark`, for callers without a config

SCHEMA_VERSION = 3
PRIO_NOTICE = -1  # eviction notices: sent first, never evicted (they explain the gaps evictions leave)
PRIO_RECORD = 0  # alerts, DTC and other events: sent before samples, evicted last
PRIO_SAMPLES = 1
SEQ_MAX = 2**63 - 1  # SQLite's INTEGER
# The running agent's metrics snapshot ({"saved_at": unix time, "metrics": ...}, agent/metrics.py), saved at the
# status period by the store writer, for `harvester-agent status` (another process) to read.
METRICS_STATE_KEY = "metrics"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq_lo  INTEGER PRIMARY KEY,
    seq_hi  INTEGER NOT NULL,
    kind    TEXT    NOT NULL,
    prio    INTEGER NOT NULL,
    n       INTEGER NOT NULL,
    ts_lo   REAL,
    ts_hi   REAL,
    created REAL    NOT NULL,
    head    TEXT    NOT NULL,
    body    BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_prio ON outbox (prio, seq_lo);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

_COUNTERS = (
    "next_seq",
    "written_samples",
    "written_records",
    "acked_samples",
    "acked_records",
    "last_acked_seq",
    "evicted_samples",
    "evicted_records",
    "evictions",
)
# Per kind of record (schema 3 on): a user reconciles alerts and events with the cloud separately. Counted from
# `kind_counts_from_seq` on (a store that predates them starts with the rows it still holds as written).
_KIND_COUNTERS = tuple(f"{what}_{kind}" for kind in ("alerts", "events") for what in ("written", "acked", "evicted"))
BUSY_CODES = ("SQLITE_BUSY", "SQLITE_LOCKED")


# An `evicted` notice's ranges are at most 2 x 20 digits each: 4,000 of them stay well inside wire.MAX_RECORD_BYTES.
EVICTED_RANGES_PER_EVENT = 4000


class StoreError(RuntimeError):
    pass


class StoreLocked(StoreError):
    """Another connection holds a lock that keeps this one out (the agent in a long write): not damage."""


def _kind_key(kind: str) -> str:
    return "alerts" if kind == "alert" else "events"


def _busy(e: sqlite3.Error) -> bool:
    return getattr(e, "sqlite_errorname", "") in BUSY_CODES or "locked" in str(e) or "busy" in str(e)


def _damaged(e: sqlite3.DatabaseError) -> bool:
    """Does this error mean the file's content is unreadable (quarantine it), rather than that it cannot be
    reached right now (a lock, permissions, I/O: leave it where it is and fail)?"""
    if isinstance(e, StoreError):
        return False
    name = getattr(e, "sqlite_errorname", None)
    if name is None:  # raised by us (quick_check) or without a code: judge by the message
        return not _busy(e)
    return str(name).startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))


def finite_json(obj: Any) -> Any:
    """NaN and ±inf become null: the wire is strict JSON, and one record it cannot encode would otherwise sit at
    the head of the outbox and block everything behind it."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


def _strict_json() -> Callable[[Any], str]:
    """`json.dumps(obj, allow_nan=False)`, its C encoder made once. json.dumps makes an encoder object and then a C
    encoder per call: a third of encoding a DTC event (a storm writes ~35,000 records and two ~25 kB states per
    batch). Without circular-reference markers (the C encoder's only state, left behind by an error): records and
    states are built from JSON values, and one that contained itself would still fail (RecursionError, as
    `finite_json` did on it)."""
    strict = json.JSONEncoder(allow_nan=False)
    make = getattr(json.encoder, "c_make_encoder", None)  # not in the type stubs
    if make is None:  # a Python without the C accelerator
        return strict.encode
    encode = make(None, strict.default, json.encoder.encode_basestring_ascii, None, strict.key_separator,
                  strict.item_separator, False, False, False)
    return lambda obj: "".join(encode(obj, 0))


_dumps_strict = _strict_json()


def finite_dumps(obj: Any) -> str:
    """Strict JSON of `obj` (what `json.dumps(obj, allow_nan=False)` gives), NaN and ±inf as null (`finite_json`);
    the C encoder first, since nearly every record is finite already and walking it in Python was much of a DTC
    storm's cost."""
    try:
        return _dumps_strict(obj)
    except ValueError:
        return _dumps_strict(finite_json(obj))


@dataclass(slots=True)
class OutboxRow:
    seq_lo: int
    seq_hi: int
    kind: str
    prio: int
    n: int
    created: float
    head: str
    body: bytes

    def segment(self) -> wire.Segment:
        if self.kind == "samples":
            return wire.Segment("samples", self.seq_lo, self.seq_hi, encoded=(json.loads(self.head), self.body))
        return wire.Segment(self.kind, self.seq_lo, self.seq_hi, record=json.loads(self.head))

    @property
    def nbytes(self) -> int:
        return len(self.head) + len(self.body)


def time_seq_floor() -> int:
    """First sequence number of a brand-new store: microseconds since the epoch.

    A vehicle may lose its store (corruption, a replaced SD card). If a new store started again at 1, the cloud
    would take its records for duplicates of old ones and drop them. Starting at the current time in µs keeps
    numbers increasing across stores as long as a store averages under a million records per second."""
    return int(time.time() * 1_000_000)


class Store:
    def __init__(self, path: Path, max_bytes: int = _STORE.max_bytes, first_seq: int | None = None,
                 evict_watermark: float = _STORE.evict_watermark) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.evict_watermark = evict_watermark
        self._first_seq = first_seq
        self._lock = threading.RLock()
        self.transactions = 0  # write transactions committed by this process: what a storm costs in fsyncs
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.quarantined: Path | None = None
        self.readonly = False
        try:
            self.db = self._open()
        except sqlite3.DatabaseError as e:
            if not _damaged(e):
                # Locked, unreachable or unwritable is not damage: moving the file aside would lose a live store.
                raise StoreError(f"{self.path}: cannot open the store: {e}") from e
            # Corrupt or not a database: keep it for forensics (never delete data), start afresh, and say so.
            self.quarantined = self._quarantine()
            self.db = self._open()
            floor = self.counters()["first_seq"]
            self.append_records([("event", {"kind": "store_quarantined", "ts": time.time(),
                                            "data": {"moved_to": str(self.quarantined), "reason": str(e),
                                                     "seq_floor": floor}})])

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            ok = db.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {ok}")
            self.db = db
            self._migrate()
            self._page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _quarantine(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        dest = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                src.rename(Path(str(dest) + suffix))
        log.error("store %s is unreadable; moved aside to %s and started a new one", self.path, dest)
        return dest

    def _migrate(self) -> None:
        """Bring the file to SCHEMA_VERSION, one step per transaction; `PRAGMA user_version` records the step."""
        with self._lock:
            version = int(self.db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path}: schema version {version} is newer than this agent ({SCHEMA_VERSION})")
            for step in range(version, SCHEMA_VERSION):
                with self._tx():
                    MIGRATIONS[step](self)
                    self.db.execute(f"PRAGMA user_version={step + 1}")

    def _create_v1(self) -> None:
        for stmt in _SCHEMA.split(";"):
            if stmt.strip():
                self.db.execute(stmt)
        first = self._first_seq if self._first_seq is not None else time_seq_floor()
        for k in _COUNTERS:
            self.db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (k, first if k == "next_seq" else 0))
        self.db.execute("INSERT OR IGNORE INTO meta VALUES ('first_seq', ?)", (first,))

    # --- writing ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        """One write transaction. SQLite may already have rolled back on its own (SQLITE_FULL, I/O errors):
        roll back only what is still open, and let the original error through."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
            self.transactions += 1
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    def _take_seq(self, n: int) -> int:
        lo = int(self.db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()[0])
        self.db.execute("UPDATE meta SET value=? WHERE key='next_seq'", (lo + n,))
        return lo

    def _bump(self, key: str, by: int) -> None:
        self.db.execute("UPDATE meta SET value=value+? WHERE key=?", (by, key))

    def append_samples(self, cols: wire.SampleColumns) -> tuple[int, int]:
        """Write samples; returns their sequence range. Durable when this returns. Written as one or more
        segments, each within the wire's caps (samples, signals, signal names: `wire.split_columns`), so the
        cloud never refuses one."""
        n = len(cols)
        if n == 0:
            raise ValueError("empty segment")
        pieces = [(p, wire.encode_columns(p)) for p in wire.split_columns(cols)]
        with self._lock:
            with self._tx():
                lo = self._take_seq(n)
                at = lo
                for piece, (head, body) in pieces:
                    k = len(piece)
                    self.db.execute(
                        "INSERT INTO outbox VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (at, at + k - 1, "samples", PRIO_SAMPLES, k, float(piece.ts_us.min()) / 1e6,
                         float(piece.ts_us.max()) / 1e6, time.time(), json.dumps(head), body),
                    )
                    at += k
                self._bump("written_samples", n)
            self._enforce_bound()
        return lo, lo + n - 1

    def append_records(
        self, records: Iterable[tuple[str, dict[str, Any]]], state: dict[str, Any] | None = None
    ) -> list[int]:
        """Write alert/event records (kind, JSON object) in one transaction; returns their sequence numbers.
        `state` (key → JSON value, None deletes) is saved in the same transaction, so that component state that
        says what the records announced (an open alert, the active DTCs) can never disagree with them."""
        items = list(records)
        if not items and not state:
            return []
        now = time.time()
        with self._lock:
            with self._tx():
                for key, value in (state or {}).items():
                    if value is None:
                        self.db.execute("DELETE FROM state WHERE key=?", (key,))
                    else:
                        self.db.execute("INSERT OR REPLACE INTO state VALUES (?, ?)",
                                        (key, finite_dumps(value)))
                if not items:
                    return []
                lo = self._take_seq(len(items))
                rows = []
                alerts = 0  # counted here: a pass over the records per kind cost a storm's batch as much again
                for i, (kind, rec) in enumerate(items):
                    ts = rec.get("ts")
                    ts_f = float(ts) if isinstance(ts, int | float) and math.isfinite(ts) else now
                    body = finite_dumps(rec)
                    rows.append((lo + i, lo + i, kind, PRIO_RECORD, 1, ts_f, ts_f, now, body, b""))
                    alerts += _kind_key(kind) == "alerts"
                self.db.executemany("INSERT INTO outbox VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
                self._bump("written_records", len(items))
                self._bump("written_alerts", alerts)
                self._bump("written_events", len(items) - alerts)
            self._enforce_bound()
        return list(range(lo, lo + len(items)))

    # --- size bound ------------------------------------------------------------------------------------------

    def used_bytes(self) -> int:
        """Bytes in use by live pages (freed pages are reused, so the file's own size only grows)."""
        with self._lock:  # also read by the metrics collector, from the uplink's thread
            pages = int(self.db.execute("PRAGMA page_count").fetchone()[0])
            free = int(self.db.execute("PRAGMA freelist_count").fetchone()[0])
        return (pages - free) * self._page_size

    def _enforce_bound(self) -> None:
        if self.used_bytes() <= self.max_bytes:
            return
        evicted: list[tuple[int, int]] = []
        n_samples = n_records = 0
        with self._tx():
            # Down to the watermark so that a store at its bound does not evict on every single write.
            while self.used_bytes() > self.max_bytes * self.evict_watermark:
                # Oldest samples first; records only once no samples remain; notices never.
                row = self.db.execute(
                    "SELECT seq_lo, seq_hi, prio, n, kind FROM outbox WHERE prio >= 0 ORDER BY prio DESC, seq_lo "
                    "LIMIT 1"
                ).fetchone()
                if row is None:
                    break
                lo, hi, prio, n, kind = row
                self.db.execute("DELETE FROM outbox WHERE seq_lo=?", (lo,))
                evicted.append((lo, hi))
                if prio == PRIO_SAMPLES:
                    n_samples += n
                else:
                    n_records += n
                    self._bump(f"evicted_{_kind_key(kind)}", n)
            if evicted:
                self._bump("evicted_samples", n_samples)
                self._bump("evicted_records", n_records)
                self._bump("evictions", 1)
                merged = merge_ranges(evicted)
                # One notice per EVICTED_RANGES_PER_EVENT ranges, so each stays within wire.MAX_RECORD_BYTES; the
                # counts ride on the first.
                for i in range(0, len(merged), EVICTED_RANGES_PER_EVENT):
                    first = i == 0
                    seq = self._take_seq(1)
                    rec = {
                        "kind": "evicted",
                        "ts": time.time(),
                        "data": {"ranges": merged[i : i + EVICTED_RANGES_PER_EVENT],
                                 "count": n_samples + n_records if first else 0,
                                 "samples": n_samples if first else 0, "records": n_records if first else 0},
                    }
                    now = time.time()
                    self.db.execute(
                        "INSERT INTO outbox VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (seq, seq, "event", PRIO_NOTICE, 1, now, now, now, json.dumps(rec), b""),
                    )
                    self._bump("written_records", 1)
                    self._bump("written_events", 1)

    # --- reading for the uplink ------------------------------------------------------------------------------

    def pending(self, records: bool, exclude: set[int], max_bytes: int) -> list[OutboxRow]:
        """Unacknowledged records (alerts, events) or samples, oldest first, skipping those in flight."""
        out: list[OutboxRow] = []
        total = 0
        with self._lock:
            cur = self.db.execute(
                "SELECT seq_lo, seq_hi, kind, prio, n, created, head, body FROM outbox "
                + ("WHERE prio<=0 ORDER BY prio, seq_lo" if records else "WHERE prio>0 ORDER BY seq_lo")
            )
            for r in cur:
                if r[0] in exclude:
                    continue
                row = OutboxRow(*r)
                if out and total + row.nbytes > max_bytes:
                    break
                out.append(row)
                total += row.nbytes
            cur.close()
        return out

    def newest_sample(self) -> tuple[int, float] | None:
        """(`seq_lo`, data time `ts_hi` in Unix seconds) of the newest sample segment held, by sequence number: the
        one written last, whatever its time says; None when none is held or it has no time. Through the
        (prio, seq_lo) index: one row read."""
        with self._lock:
            row = self.db.execute("SELECT seq_lo, ts_hi FROM outbox WHERE prio=? ORDER BY seq_lo DESC LIMIT 1",
                                  (PRIO_SAMPLES,)).fetchone()
        return None if row is None or row[1] is None else (int(row[0]), float(row[1]))

    def pending_live_first(self, exclude: set[int], since: float, max_bytes: int) -> list[OutboxRow]:
        """The sample segments of the next batch when a live lane is kept: first the lane, newest first (walking
        back from the newest segment, in sequence order, while its data ends at `since` or later: the first older
        one ends the lane, so a stray timestamp deep in the backlog cannot jump the queue); then, while the batch
        has room, the backlog oldest first. Rows in `exclude` (in flight) are skipped. At least one row when any
        is pending, however large; otherwise at most `max_bytes`.

        Both walks read sizes only (SQLite answers `LENGTH` of a blob from its record header) and stop as soon as
        the batch is full, one from each end of the (prio, seq_lo) order: a long outage's backlog is never read
        whole; only the chosen rows' bodies are."""
        picked: list[int] = []
        total = 0

        def take(lo: int, size: int) -> bool:
            nonlocal total
            if picked and total + size > max_bytes:
                return False
            picked.append(lo)
            total += size
            return True

        with self._lock:
            full = False
            cur = self.db.execute("SELECT seq_lo, ts_hi, LENGTH(head)+LENGTH(body) FROM outbox WHERE prio=? "
                                  "ORDER BY seq_lo DESC", (PRIO_SAMPLES,))
            for lo, ts_hi, size in cur:
                if ts_hi is None or float(ts_hi) < since:
                    break
                if lo not in exclude and not take(int(lo), int(size)):
                    full = True
                    break
            cur.close()
            if not full:
                lane = set(picked)
                cur = self.db.execute("SELECT seq_lo, LENGTH(head)+LENGTH(body) FROM outbox WHERE prio=? "
                                      "ORDER BY seq_lo", (PRIO_SAMPLES,))
                for lo, size in cur:
                    if lo in lane:
                        break  # reached the lane from below: nothing older is left to send
                    if lo not in exclude and not take(int(lo), int(size)):
                        break
                cur.close()
            return [self._row(lo) for lo in picked]

    def _row(self, seq_lo: int) -> OutboxRow:
        r = self.db.execute("SELECT seq_lo, seq_hi, kind, prio, n, created, head, body FROM outbox WHERE seq_lo=?",
                            (seq_lo,)).fetchone()
        return OutboxRow(*r)

    def next_unsent(self, exclude: set[int]) -> int:
        """The lowest sequence number of a row not in `exclude` (in flight, in the batch being made, kept unsent),
        or, when there is none, the next number the store will give: what the uplink tells the cloud as its
        backfill position (docs/protocol.md, `backfill_from`). Walks up from the oldest row past the excluded
        ones only (a few batches' worth)."""
        with self._lock:
            cur = self.db.execute("SELECT seq_lo FROM outbox ORDER BY seq_lo")
            try:
                for (lo,) in cur:
                    if lo not in exclude:
                        return int(lo)
            finally:
                cur.close()
            return int(self.db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()[0])

    def pending_samples(self, exclude: set[int], enough: int | None = None) -> tuple[int, float | None]:
        """(bytes, creation time of the oldest) of sample segments not in flight: when to close a batch. Stops
        counting at `enough` bytes: the uplink asks this every tick, and a long outage's backlog is large."""
        total = 0
        oldest: float | None = None
        with self._lock:
            cur = self.db.execute(
                "SELECT seq_lo, LENGTH(body)+LENGTH(head), created FROM outbox WHERE prio>0 ORDER BY seq_lo"
            )
            for lo, size, created in cur:
                if lo not in exclude:
                    total += int(size)
                    oldest = float(created) if oldest is None else oldest
                    if enough is not None and total >= enough:
                        break
            cur.close()
        return total, oldest

    def ack(self, ranges: Iterable[tuple[int, int]] | Iterable[list[int]], only: Iterable[int] | None = None) -> int:
        """Delete rows wholly inside the acknowledged ranges; with `only`, just the rows whose `seq_lo` is listed
        (the rows of the batch being acknowledged), so that an ack can never reach beyond what it answers.
        Returns how many rows went. Idempotent. `last_acked_seq` moves to the highest row actually deleted."""
        merged = merge_ranges((int(lo), int(hi)) for lo, hi in ranges)
        los = [r[0] for r in merged]
        gone = 0
        top = 0
        with self._lock, self._tx():
            if only is None:
                found = [r for lo, hi in merged if lo <= SEQ_MAX for r in self.db.execute(
                    "SELECT seq_lo, seq_hi, prio, n, kind FROM outbox WHERE seq_lo>=? AND seq_hi<=?",
                    (lo, min(hi, SEQ_MAX))).fetchall()]
            else:
                found = []
                for seq_lo in sorted(set(only)):
                    row = self.db.execute(
                        "SELECT seq_lo, seq_hi, prio, n, kind FROM outbox WHERE seq_lo=?", (seq_lo,)
                    ).fetchone() if 0 < seq_lo <= SEQ_MAX else None
                    i = bisect.bisect_right(los, seq_lo) - 1
                    if row is not None and i >= 0 and merged[i][1] >= row[1]:
                        found.append(row)
            for seq_lo, seq_hi, prio, n, kind in found:
                self.db.execute("DELETE FROM outbox WHERE seq_lo=?", (seq_lo,))
                self._bump("acked_samples" if prio == PRIO_SAMPLES else "acked_records", n)
                if prio != PRIO_SAMPLES:
                    self._bump(f"acked_{_kind_key(kind)}", n)
                gone += 1
                top = max(top, int(seq_hi))
            if gone:
                self.db.execute("UPDATE meta SET value=MAX(value, ?) WHERE key='last_acked_seq'", (top,))
        return gone

    # --- small persistent settings (data budget...) ------------------------------------------------------------

    def _create_v2(self) -> None:
        # Component state that must outlive a restart (drift statistics) and is not a counter.
        self.db.execute("CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    def _create_v3(self) -> None:
        # Alerts and events counted apart. Rows still held count as written, so that from here on each kind
        # reconciles: written = acked + evicted + backlog.
        nxt = int(self.db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()[0])
        self.db.execute("INSERT OR IGNORE INTO meta VALUES ('kind_counts_from_seq', ?)", (nxt,))
        held = dict(self.db.execute("SELECT kind, COALESCE(SUM(n), 0) FROM outbox WHERE kind != 'samples' "
                                    "GROUP BY kind").fetchall())
        for k in _KIND_COUNTERS:
            start = int(held.get(k.split("_")[1][:-1], 0)) if k.startswith("written_") else 0
            self.db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (k, start))

    def get_state(self, key: str) -> Any:
        """A JSON value saved with `set_state`, or None (also when what was saved cannot be parsed)."""
        with self._lock:
            row = self.db.execute("SELECT value FROM state WHERE key=?", (key,)).fetchone()
        try:
            return json.loads(row[0]) if row else None
        except ValueError:
            return None

    def set_state(self, key: str, value: Any) -> None:
        text = json.dumps(value, allow_nan=False)
        with self._lock, self._tx():
            self.db.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", (key, text))

    def get_meta(self, key: str, default: int = 0) -> int:
        with self._lock:
            row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else default

    def set_meta(self, items: dict[str, int]) -> None:
        with self._lock, self._tx():
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(items.items()))

    # --- status ----------------------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        with self._lock:
            c = {k: int(v) for k, v in self.db.execute("SELECT key, value FROM meta")}
        return {k: c.get(k, 0) for k in (*_COUNTERS, "first_seq")} | c

    def backlog(self) -> dict[str, dict[str, int]]:
        with self._lock:
            rows = self.db.execute(
                "SELECT kind, COUNT(*), COALESCE(SUM(n),0), COALESCE(SUM(LENGTH(body)+LENGTH(head)),0) "
                "FROM outbox GROUP BY kind"
            ).fetchall()
        return {k: {"rows": int(c), "records": int(n), "bytes": int(b)} for k, c, n, b in rows}

    def status(self) -> dict[str, Any]:
        c = self.counters()
        backlog = self.backlog()
        version = self.file_version()
        # Per-kind counts exist from schema 3; a file an older agent wrote (read-only here, never migrated) has
        # none, and says so with nulls rather than zeros.
        kinds: dict[str, int | None] = {
            f"{kind}_{what}": (c.get(f"{what}_{kind}", 0) if version >= 3 else None)
            for kind in ("alerts", "events") for what in ("written", "acked", "evicted")
        }
        return {
            "path": str(self.path),
            "schema_version": version,
            "records_written": {"samples": c["written_samples"], "records": c["written_records"]},
            "first_seq": c.get("first_seq", 1),
            "highest_seq": c["next_seq"] - 1,
            "last_acked_seq": c["last_acked_seq"],
            "acked": {"samples": c["acked_samples"], "records": c["acked_records"]},
            "evicted": {"samples": c["evicted_samples"], "records": c["evicted_records"], "evictions": c["evictions"]},
            "backlog": backlog,
            "backlog_records": sum(v["records"] for v in backlog.values()),
            "used_bytes": self.used_bytes(),
            "max_bytes": self.max_bytes,
            **kinds,
            "kind_counts_from_seq": c.get("kind_counts_from_seq") if version >= 3 else None,
        }

    def file_version(self) -> int:
        with self._lock:
            return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if not self.readonly:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.db.close()

    # --- reading someone else's live store ---------------------------------------------------------------------

    @classmethod
    def open_readonly(cls, path: Path, max_bytes: int) -> Store:
        """Open for reading only (`mode=ro`): no WAL set-up, no migration, no quarantine, no checkpoint on close.
        For `harvester-agent status` beside a running agent. Raises StoreLocked or StoreError, never moves or
        writes the file."""
        self = cls.__new__(cls)
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.evict_watermark = _STORE.evict_watermark  # never used: a read-only store evicts nothing
        self._first_seq = None
        self._lock = threading.RLock()
        self.transactions = 0
        self.quarantined = None
        self.readonly = True
        uri = "file:" + urllib.parse.quote(str(self.path.resolve())) + "?mode=ro"
        try:
            db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=0.5)
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: cannot open: {e}") from None
        try:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version == 0 or db.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone() is None:
                raise StoreError(f"{self.path}: not an agent store")
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path}: schema version {version} is newer than this agent ({SCHEMA_VERSION})")
            self._page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        except sqlite3.Error as e:
            db.close()
            if _busy(e):
                raise StoreLocked(f"{self.path}: locked by another process") from None
            raise StoreError(f"{self.path}: unreadable: {e}") from None
        except StoreError:
            db.close()
            raise
        self.db = db
        return self


def _saved_metrics(store: Store) -> dict[str, Any]:
    """The metrics the agent last saved, and how old they are (None: none saved; an older agent, or a store from
    before it first reached the status period)."""
    saved = store.get_state(METRICS_STATE_KEY) if store.file_version() >= 2 else None
    if not isinstance(saved, dict) or not isinstance(saved.get("metrics"), dict):
        return {"metrics": None, "metrics_saved_at": None, "metrics_age_s": None}
    at = saved.get("saved_at")
    at = float(at) if isinstance(at, int | float) and not isinstance(at, bool) else None
    return {"metrics": saved["metrics"], "metrics_saved_at": at,
            "metrics_age_s": round(max(0.0, time.time() - at), 1) if at is not None else None}


def read_status(path: Path, max_bytes: int, wait_s: float) -> dict[str, Any]:
    """`Store.status()` of a store that may be live, read-only, retrying for up to `wait_s` while it is locked, with
    the metrics the agent last saved (`metrics`, `metrics_saved_at`, `metrics_age_s`)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            store = Store.open_readonly(path, max_bytes)
            try:
                return store.status() | _saved_metrics(store)
            except sqlite3.Error as e:
                if not _busy(e):
                    raise StoreError(f"{path}: unreadable: {e}") from None
                raise StoreLocked(f"{path}: locked by another process") from None
            finally:
                store.close()
        except StoreLocked:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


# MIGRATIONS[v] takes a store from schema version v to v + 1. Append, never edit: vehicles in the field run every
# step in order the first time a newer agent opens their store.
MIGRATIONS: list[Callable[[Store], None]] = [Store._create_v1, Store._create_v2, Store._create_v3]
