"""The wire format between vehicle and cloud (docs/protocol.md), shared by `agent` and `cloud_sync`.

A message is `MAGIC | version u8 | codec u8 | body`, where body is `header_len u32le | header JSON | blob`, sent as
the codec says: 0 as it is; 1 (CODEC_ZSTD, what agents before codec 2 sent) a zstd frame; 2 (CODEC_ZSTD_D1) a
magicless zstd frame made with the dictionary ZSTD_DICT_D1 (wiredict.py), whose bytes are part of the protocol.
A receiver decodes all three for ever and refuses any other codec (receivers that predate codec 2 refuse it as
unknown). The header carries schema version, fleet, vehicle, batch id and the sequence range; each segment in it
is either a JSON record (alert, event) or a columnar block of samples whose columns sit in the blob at the offset
the header gives.

A samples segment holds n samples in sequence order (sample i has sequence number seq_lo + i) and a `signals`
table; its header field `enc` names the layout of its columns. A receiver decodes both layouts below for ever
(vehicles in the field run older agents, and a store may hold segments written before an upgrade) and refuses any
other `enc`.

ENC_V1 (`enc` absent; what every agent before ENC_V2 wrote), `signals` entries [name, source, unit]:
  signal index u16[n] into `signals`, timestamp deltas int64[n] in microseconds (the first relative to `t0_us`),
  values float64[n] XOR-ed with the previous value (Gorilla-style: a repeated or slowly changing reading becomes
  mostly zero bits). Each column is byte-shuffled (all first bytes, then all second bytes…) so zstd sees like bytes
  together: 18 bytes a sample before compression.

ENC_V2 (`enc`: 2). `signals` entries are [name, source, unit], whose values are sent as float64 bits, or
[name, source, unit, scale, offset] (scale finite and > 0, offset finite), whose values are sent as raw integers:
each value is exactly float64(raw) * scale + offset, computed in that order (what a J1939 decoder does with a DBC
signal's factor and offset, so its readings go back to the integers they were on the bus). A *run* is a maximal
stretch of samples of one signal; every delta below starts again at each run. Integers are little-endian.
A *column of k* is `width u8` (0..8), then k * width bytes: the low `width` bytes of each of k unsigned 64-bit
numbers, byte-shuffled (all first bytes, then all second bytes…); higher bytes are 0. *zz* marks a column of
zigzag-coded signed numbers (0, -1, 1, -2… as 0, 1, 2, 3…). All sums are modulo 2^64. The blob, in order:
  r u32                          number of runs: 0 when n is 0, else 1..n
  run signals, zz column of r    each run's signal index, minus the previous run's, minus 1 (before the first
                                 run: -1), so a segment in signal order is all zeros
  references, column of r        run i: 0 when it has timestamps of its own; k (1..i) when it has run i-k's,
                                 which may refer on in turn (the signals of one CAN message share timestamps)
  lengths, column of R           length - 1 of each of the R runs with timestamps of their own; a run with a
                                 reference has its source's length; all lengths sum to n
  unit u64                       1..2^62: timestamp = t0_us + unit * t, t counted from t0_us
  firsts, zz column of R         each own run's first t, minus the previous own run's first t (the first: minus 0)
  periods, zz column of P        each own run of two or more samples (P of them): its period (the writer's choice:
                                 its most common step), minus the previous such run's period (the first: minus 0)
  jitter, zz column              each later sample of an own run: its step from the sample before minus the
                                 run's period
  value firsts, zz column        the first raw integer of each run of an integer signal
  value deltas, zz column        every later raw integer of such a run, minus the one before it
  float bits, column             the float64 bits of each sample of the other runs, XOR-ed with the previous
                                 sample's in its run (the first of a run: as it is)
The columns' lengths all follow from r, the references, the lengths and the table, and must fill the blob exactly.
Decoding is checked: signal indexes within the table, |timestamp| <= MAX_TS_US, |raw| <= MAX_RAW_INT, values
finite. The encoder sends a signal as raw integers only when every one of its values in the segment comes back bit
for bit (with the hint's scale and offset, else 1 and 0), so decoded values are bit-identical in either layout; it
never makes a blob of exactly 18 * n bytes, so a receiver that predates `enc` refuses the segment rather than
reading it as ENC_V1.

Everything here is pure: bytes in, typed objects out, `WireError` with a reason for anything malformed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard

from harvester_common import wiredict

MAGIC = b"HV"
WIRE_VERSION = 1
SCHEMA_VERSION = 1
CODEC_NONE = 0
CODEC_ZSTD = 1  # zstd at ZSTD_LEVEL: what agents before CODEC_ZSTD_D1 sent, and today's for a large body
CODEC_ZSTD_D1 = 2  # zstd at ZSTD_LEVEL_D1 with the dictionary ZSTD_DICT_D1, magicless frames: a small body
ZSTD_LEVEL = 3
# A body up to ZSTD_SMALL_BODY (the steady state: one 10 s segment, ~8 KiB) goes as CODEC_ZSTD_D1: the dictionary
# and level 19 take 20 % off CODEC_ZSTD on the real traces, for ~1 ms of the vehicle's CPU every 10 s. A larger
# one (a backlog drained in big batches) goes as CODEC_ZSTD, as before: there the dictionary no longer pays (about
# nothing at 200 KiB, +2 % at 450 KiB), and level 19 would cost ~0.1 s a MiB of the vehicle's CPU.
ZSTD_LEVEL_D1 = 19
ZSTD_SMALL_BODY = 64 * 1024
# CODEC_ZSTD_D1's dictionary: zstd's own trainer's output (entropy tables and content) from J1939 traces the
# benchmarks do not measure (bench/wire_dictionary.py). A 10 s batch is a few KiB, too small for zstd to learn the
# header's keys, the J1939 names of a signal table or the statistics of the columns from the message itself. Its
# bytes are part of the protocol: never edit them; a new dictionary is a new codec number.
ZSTD_DICT_D1 = wiredict.D1
# A samples segment's column layout, its header's `enc` (absent: ENC_V1, what agents before it wrote; a receiver
# decodes both, for ever, and refuses any other).
ENC_V1 = 1  # float64 bits XOR-ed, timestamp deltas, a signal index per sample
ENC_V2 = 2  # runs of a signal; raw scaled integers where exact, timestamps in a unit, delta-of-delta coded

# --- Limits: the ONE place for every cap on a batch (docs/protocol.md "Limits"). The decoder refuses anything past
# them; the encoder refuses to produce it (LimitError); the vehicle's config is validated against them and its store
# splits sample segments to fit; cloud_sync's `max_message_bytes` may only raise MAX_MESSAGE_BYTES. So a correctly
# configured vehicle cannot produce a batch the cloud refuses.
INT64_MAX = 2**63 - 1  # both backends store integers as signed 64-bit (SQLite INTEGER, PostgreSQL BIGINT)
MAX_SEQ = INT64_MAX  # sequence numbers are 1..MAX_SEQ
MAX_BATCH_ID = INT64_MAX  # batch ids are 0..MAX_BATCH_ID
MAX_TS_US = 2**62  # |timestamp| in µs (±146,000 years): a sum of in-range deltas then cannot overflow int64
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # one batch as published (compressed)
MAX_DECOMPRESSED_BYTES = 64 * 1024 * 1024  # what a decoder will inflate: no memory bomb from a small message
MAX_HEADER_BYTES = 8 * 1024 * 1024
MAX_SEGMENTS_PER_BATCH = 4096
MAX_SEGMENT_SAMPLES = 200_000  # samples in one segment (18 bytes each in an ENC_V1 blob, at most 41 in ENC_V2)
MAX_SIGNALS_PER_SEGMENT = 8192  # entries in one segment's signal table
MAX_RAW_INT = 2**53  # |raw integer| of a value sent as one (ENC_V2): float64 holds every integer up to it exactly
MAX_RECORD_BYTES = 256 * 1024  # one alert/event record, as JSON
MAX_JSON_DEPTH = 32  # nesting of the header (and so of a record); deeper JSON is refused before it is parsed
MAX_BATCH_BYTES = 4 * 1024 * 1024  # the highest `mqtt.batch_max_bytes` a vehicle may configure
MAX_STATUS_BYTES = 64 * 1024  # one retained status message (JSON)
# Active DTCs a status message lists (its `dtcs.active`; `dtcs.more` counts the rest): with the longest sources and
# words a vehicle makes (49 and 194 ASCII characters) they take under 24 KiB of MAX_STATUS_BYTES, beside the 16 KiB
# of counters (tests/test_status_dtcs.py measures the whole message).
MAX_STATUS_DTCS = 64
# An ack names one range per segment of its batch: "[seq,seq]," is at most 42 bytes with 19-digit numbers, plus the
# vehicle id, the batch id and a reason of up to 500 characters (6 bytes each once JSON-escaped). A vehicle must accept
# an ack this large (`mqtt.max_ack_bytes` may not go below it), or it would drop the ack of a legal batch as
# oversized and resend that batch for ever.
# An ack's `tables` names at most MAX_ACK_TABLES digests ("<32 hex>", is 35 bytes each): the vehicle remembers no
# more than that many confirmed tables anyway, so a longer list would only be cut.
MAX_ACK_TABLES = 256
MAX_ACK_BYTES = MAX_SEGMENTS_PER_BATCH * 42 + 4096 + MAX_ACK_TABLES * 35
MQTT_SESSION_EXPIRY_MAX = 2**32 - 1  # MQTT 5's Session Expiry Interval is a four-byte integer (both sides set one)
# Identifiers. Fleet and vehicle ids as agent/config.py requires them; signal names as our DBC (`ET1.EngCoolantTemp`),
# NMEA (`GPS.Latitude`) and serial (`vib.AccelRms`) decoders make them; sources like `can0/00`, `gps`; units are
# free text (DBC units such as `°C`, `km/h`) without control characters.
ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
SIGNAL_NAME_PATTERN = r"^[!-~]{1,128}$"  # printable ASCII, no spaces
SOURCE_PATTERN = r"^[A-Za-z0-9_./:-]{0,64}$"
UNIT_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]{0,32}$"
LABEL_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]{0,256}$"  # alert ids, states, model names and versions, labels, kinds

_PREFIX = struct.Struct("<2sBB")
_U32 = struct.Struct("<I")


class WireError(ValueError):
    """A message that cannot be decoded; the text says why."""


class LimitError(WireError):
    """A batch the encoder will not produce because the receiver would refuse it (a cap in Limits)."""


class UnknownTableError(WireError):
    """A segment names its signal table by a digest the receiver does not hold for this vehicle."""


UNKNOWN_TABLE_REASON = "unknown_signal_table"  # the ack reason of a batch refused for an UnknownTableError
_DIGEST = re.compile(r"^[0-9a-f]{32}$")


def table_digest(signals: list[Any]) -> str:
    """A signal table's digest: the first 16 bytes of sha256 of its canonical JSON (sorted keys, no spaces, ASCII
    with \\u escapes: Python's `json.dumps(t, sort_keys=True, separators=(",", ":"))`), as 32 lowercase hex.
    Computed on the table as parsed from (or about to be written to) a header, so both ends hash the same text."""
    text = json.dumps(signals, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).digest()[:16].hex()


_ID = re.compile(ID_PATTERN)
_SIGNAL_NAME = re.compile(SIGNAL_NAME_PATTERN)
_SOURCE = re.compile(SOURCE_PATTERN)
_UNIT = re.compile(UNIT_PATTERN)
_LABEL = re.compile(LABEL_PATTERN)


def valid_id(s: object) -> bool:
    return isinstance(s, str) and _ID.fullmatch(s) is not None


def valid_signal(key: tuple[str, str, str]) -> bool:
    name, source, unit = key
    return bool(_SIGNAL_NAME.fullmatch(name) and _SOURCE.fullmatch(source) and _UNIT.fullmatch(unit))


def valid_label(s: object) -> bool:
    return isinstance(s, str) and _LABEL.fullmatch(s) is not None


def conform_signal(key: tuple[str, str, str]) -> tuple[str, str, str]:
    """A signal key the cloud accepts: unchanged when it is valid already; otherwise each disallowed character
    becomes `_` and each part is cut to its length cap (a vehicle never sends what the receiver refuses)."""
    if valid_signal(key):
        return key
    name, source, unit = key
    name = re.sub(r"[^!-~]", "_", name)[:128] or "_"
    source = re.sub(r"[^A-Za-z0-9_./:-]", "_", source)[:64]
    unit = re.sub(r"[\x00-\x1f\x7f-\x9f]", "_", unit)[:32]
    return name, source, unit


def _is_int(v: object, lo: int, hi: int) -> bool:
    """An integer (not a bool) within [lo, hi]."""
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _reject_constant(name: str) -> Any:
    raise WireError(f"JSON constant {name} is not allowed")


def _check_json(value: Any, what: str) -> None:
    """Nesting at most MAX_JSON_DEPTH, every integer a signed 64-bit one (what both backends store), every string
    free of lone surrogates (PostgreSQL and UTF-8 files refuse them). Iterative: a hostile value cannot recurse."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            if depth > MAX_JSON_DEPTH:
                raise WireError(f"{what} nests deeper than {MAX_JSON_DEPTH}")
            stack.extend((k, depth) for k in v)
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            if depth > MAX_JSON_DEPTH:
                raise WireError(f"{what} nests deeper than {MAX_JSON_DEPTH}")
            stack.extend((x, depth + 1) for x in v)
        elif isinstance(v, int) and not isinstance(v, bool):
            if not -INT64_MAX - 1 <= v <= INT64_MAX:
                raise WireError(f"{what} holds an integer outside signed 64 bits")
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise WireError(f"{what} holds a string that is not valid Unicode") from None


def loads_json(text: bytes | str, what: str) -> Any:
    """Strict JSON for anything read off the wire (headers, acks, status): WireError for any defect, never another
    exception: not JSON, nesting that would exhaust the parser's recursion, NaN/Infinity, out-of-range integers."""
    try:
        v = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise WireError(f"{what} nests too deeply") from None
    except WireError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"{what} is not JSON: {e}") from None
    except ValueError as e:  # int() of a number with too many digits (sys.int_info.default_max_str_digits)
        raise WireError(f"{what} is not acceptable JSON: {e}") from None
    _check_json(v, what)
    return v


@dataclass(slots=True)
class SampleColumns:
    """A block of samples in columnar form. `signals` lists (name, source, unit) tuples; `scales`, empty or one
    entry per signal, its resolution (scale, offset) when its values are `raw * scale + offset` of integers (a
    hint: the encoder sends raw integers only where every value is exactly that) or None."""

    signals: list[tuple[str, str, str]]
    sig: npt.NDArray[np.uint16]
    ts_us: npt.NDArray[np.int64]
    value: npt.NDArray[np.float64]
    scales: list[tuple[float, float] | None] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.sig.shape[0])


@dataclass(slots=True)
class Segment:
    """A run of consecutive sequence numbers of one kind: samples (columns) or one record (alert/event)."""

    kind: str
    seq_lo: int
    seq_hi: int
    record: dict[str, Any] | None = None
    columns: SampleColumns | None = None
    # Already-encoded columns (segment header fields, blob), as the store keeps them: sent without re-encoding.
    encoded: tuple[dict[str, Any], bytes] | None = None

    @property
    def n(self) -> int:
        return self.seq_hi - self.seq_lo + 1


@dataclass(slots=True)
class Batch:
    fleet: str
    vehicle: str
    batch: int
    segments: list[Segment]
    sent_at: float = 0.0
    schema: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    # Filled by `decode_batch`: the signal tables this batch carried in full, by digest (what the cloud stores and
    # confirms in its ack), and whether any segment named its table by reference instead.
    tables: dict[str, list[Any]] = field(default_factory=dict)
    referenced: bool = False

    @property
    def seq_lo(self) -> int:
        return min(s.seq_lo for s in self.segments)

    @property
    def seq_hi(self) -> int:
        return max(s.seq_hi for s in self.segments)

    @property
    def n_samples(self) -> int:
        return sum(s.n for s in self.segments if s.kind == "samples")


def _shuffle(a: npt.NDArray[Any]) -> bytes:
    b = np.ascontiguousarray(a).view(np.uint8).reshape(len(a), a.itemsize)
    return b.T.tobytes()


def _unshuffle(buf: bytes, dtype: npt.DTypeLike, n: int) -> npt.NDArray[Any]:
    dt = np.dtype(dtype)
    raw = np.frombuffer(buf, dtype=np.uint8)
    if raw.size != n * dt.itemsize:
        raise WireError(f"column of {raw.size} bytes, expected {n * dt.itemsize}")
    return raw.reshape(dt.itemsize, n).T.copy().view(dt).reshape(n)


def encode_columns(cols: SampleColumns, enc: int = ENC_V2) -> tuple[dict[str, Any], bytes]:
    """Columns → (segment header fields, blob), in the layout `enc` names (ENC_V2 unless a test asks for the old
    one). The header's `enc` is absent for ENC_V1, so that it is byte for byte what agents before v2 wrote."""
    if cols.scales and len(cols.scales) != len(cols.signals):
        raise ValueError("SampleColumns.scales must be empty or have one entry per signal")
    n = len(cols)
    if n and int(cols.sig.max()) >= len(cols.signals):
        raise ValueError("signal index out of range of the signal table")
    if enc == ENC_V1:
        return _encode_v1(cols)
    if enc == ENC_V2:
        return _encode_v2(cols)
    raise ValueError(f"no encoder for sample encoding {enc}")


def decode_columns(head: dict[str, Any], blob: bytes) -> SampleColumns:
    """A samples segment's header fields and blob → columns, in the layout its `enc` names (absent: ENC_V1).
    WireError for anything malformed."""
    n = head.get("n")
    t0 = head.get("t0_us")
    signals = head.get("signals")
    if not isinstance(n, int) or not isinstance(t0, int) or not isinstance(signals, list):
        raise WireError("sample segment header needs n, t0_us and signals")
    if not _is_int(n, 0, MAX_SEGMENT_SAMPLES):
        raise WireError(f"sample segment n={n} outside 0..{MAX_SEGMENT_SAMPLES}")
    if not _is_int(t0, -MAX_TS_US, MAX_TS_US):
        raise WireError(f"t0_us outside ±{MAX_TS_US}")
    if len(signals) > MAX_SIGNALS_PER_SEGMENT:
        raise WireError(f"more than {MAX_SIGNALS_PER_SEGMENT} signals in one segment")
    enc = head.get("enc", ENC_V1)
    if not _is_int(enc, ENC_V1, ENC_V2):
        raise WireError(f"unknown sample encoding {str(enc)[:20]}")
    if enc == ENC_V1:
        return _decode_v1(n, t0, _signal_table(signals, hints=False), blob)
    sigs, scales = _signal_table(signals, hints=True)
    return _decode_v2(n, t0, sigs, scales, blob)


def _signal_table(signals: list[Any], hints: bool) -> Any:
    """The segment's signal table: [name, source, unit] entries, and with `hints` (ENC_V2) also
    [name, source, unit, scale, offset] for a signal sent as raw integers. Returns the keys, or (keys, scales)."""
    sigs: list[tuple[str, str, str]] = []
    scales: list[tuple[float, float] | None] = []
    for s in signals:
        if not (isinstance(s, list) and len(s) in ((3, 5) if hints else (3,))
                and all(isinstance(x, str) for x in s[:3])):
            raise WireError("signal table entries must be [name, source, unit] strings"
                            + (" or [name, source, unit, scale, offset]" if hints else ""))
        sigs.append((s[0], s[1], s[2]))
        if len(s) == 5:
            scale, offset = s[3], s[4]
            if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in (scale, offset)):
                raise WireError("a signal's scale and offset must be numbers")
            scale, offset = float(scale), float(offset)
            if not (math.isfinite(scale) and math.isfinite(offset) and scale > 0):
                raise WireError("a signal's scale must be finite and positive, its offset finite")
            scales.append((scale, offset))
        else:
            scales.append(None)
    return (sigs, scales) if hints else sigs


def _encode_v1(cols: SampleColumns) -> tuple[dict[str, Any], bytes]:
    n = len(cols)
    t0 = int(cols.ts_us[0]) if n else 0
    deltas = np.diff(cols.ts_us, prepend=np.int64(t0)).astype("<i8")
    bits = cols.value.astype("<f8").view("<u8")
    xored = bits ^ np.concatenate([np.zeros(1, "<u8"), bits[:-1]]) if n else bits
    blob = _shuffle(cols.sig.astype("<u2")) + _shuffle(deltas) + _shuffle(xored)
    head = {"n": n, "t0_us": t0, "signals": [list(s) for s in cols.signals]}
    return head, blob


def _decode_v1(n: int, t0: int, sigs: list[tuple[str, str, str]], blob: bytes) -> SampleColumns:
    if len(blob) != n * 18:
        raise WireError(f"sample blob of {len(blob)} bytes, expected {n * 18} for {n} samples")
    sig = _unshuffle(blob[: 2 * n], "<u2", n).astype(np.uint16)
    deltas = _unshuffle(blob[2 * n : 10 * n], "<i8", n)
    xored = _unshuffle(blob[10 * n :], "<u8", n)
    value = np.bitwise_xor.accumulate(xored).view("<f8").astype(np.float64) if n else np.zeros(0)
    if n and int(sig.max()) >= len(sigs):
        raise WireError("signal index out of range of the segment's signal table")
    # deltas[0] is relative to t0, every other delta to the previous timestamp. Checked in float64 first (exact
    # enough at this scale) so that the int64 sum below cannot wrap around silently.
    if n and (np.abs(deltas).max() > MAX_TS_US
              or np.abs(np.cumsum(deltas.astype(np.float64)) + float(t0)).max() > MAX_TS_US):
        raise WireError(f"sample timestamps outside ±{MAX_TS_US} µs")
    ts = np.cumsum(deltas, dtype=np.int64) + np.int64(t0)
    if n and not np.isfinite(value).all():
        raise WireError("sample values must be finite")
    return SampleColumns(sigs, sig, ts, value)


# --- ENC_V2 (the layout is in the module docstring). All integer arithmetic is modulo 2^64 (numpy's uint64 wraps
# silently), so a forged column can make any value but never an error or an overflow; the decoded values are then
# checked against the limits. ---

_U64 = np.uint64
_ONE = np.uint64(1)


def _zigzag(x: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
    """0, -1, 1, -2 … → 0, 1, 2, 3 …: small magnitudes of either sign become small unsigned numbers."""
    return (x.view(_U64) << _ONE) ^ (x >> np.int64(63)).view(_U64)


def _unzigzag(u: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The inverse of `_zigzag`, left as uint64 (two's complement) for modular sums."""
    return (u >> _ONE) ^ (_U64(0) - (u & _ONE))


def _column(u: npt.NDArray[np.uint64], min_width: int = 0) -> bytes:
    """k unsigned integers as `width u8` + their low `width` bytes, byte-shuffled; width fits the largest."""
    top = int(u.max()) if len(u) else 0
    w = max(min_width, (top.bit_length() + 7) // 8)
    planes = np.ascontiguousarray(u, dtype="<u8").view(np.uint8).reshape(len(u), 8)[:, :w]
    return bytes([w]) + planes.T.tobytes()


def _seg_cumsum(x: npt.NDArray[np.uint64], lens: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
    """Running sums (mod 2^64) that start again at each run of `lens` (a sum of `lens` equal to len(x))."""
    c = np.cumsum(x, dtype=_U64)
    if not len(x):
        return c
    starts = np.cumsum(lens) - lens
    return c - np.repeat(c[starts] - x[starts], lens)  # type: ignore[no-any-return]


def _run_diff(x: npt.NDArray[np.int64], starts: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Each element minus the one before it in its run; a run's first element as it is (wrapping int64)."""
    d = x.copy()
    d[1:] -= x[:-1]
    d[starts] = x[starts]
    return d


def _json_number(x: float) -> int | float:
    """An integral scale or offset written as an integer (`1`, not `1.0`): JSON reads it back as the same float."""
    if x.is_integer() and abs(x) < 2**53 and not (x == 0 and math.copysign(1.0, x) < 0):  # -0.0 stays -0.0
        return int(x)
    return x


def _integer_coding(cols: SampleColumns) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64],
                                                  npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Which signals go as raw integers, and the raw integers of every sample (meaningful where its signal does).
    A signal qualifies when, with its hint (scale, offset), or else (1, 0), float64(raw) * scale + offset gives back
    every one of its values bit for bit, with |raw| <= MAX_RAW_INT."""
    m = len(cols.signals)
    scale = np.ones(m)
    offset = np.zeros(m)
    for i, h in enumerate(cols.scales or ()):
        if h is not None and math.isfinite(h[0]) and math.isfinite(h[1]) and h[0] > 0:
            scale[i], offset[i] = h
    v = cols.value
    sc, off = scale[cols.sig], offset[cols.sig]
    with np.errstate(all="ignore"):
        raw = np.rint((v - off) / sc)
        ok = np.isfinite(raw) & (np.abs(raw) <= MAX_RAW_INT)
        raw = np.where(ok, raw, 0.0)
        ok &= (raw * sc + off).view(_U64) == v.view(_U64)
    failed = np.bincount(cols.sig[~ok], minlength=m)
    used = np.bincount(cols.sig, minlength=m) > 0
    return used & (failed == 0), raw.astype(np.int64), scale, offset


def _run_modes(values: npt.NDArray[np.int64], run: npt.NDArray[np.int64], runs: int) -> npt.NDArray[np.int64]:
    """The most common value of each run (`run` numbers each value's run, ascending; the smallest on a tie; 0 for
    a run without values), without a Python loop over runs."""
    out = np.zeros(runs, np.int64)
    if not len(values):
        return out
    order = np.lexsort((values, run))
    v, g = values[order], run[order]
    new = np.ones(len(v), np.bool_)
    new[1:] = (v[1:] != v[:-1]) | (g[1:] != g[:-1])
    first = np.flatnonzero(new)
    count = np.diff(np.append(first, len(v)))
    best = np.lexsort((-count, g[first]))  # by run, the most frequent (then the smallest value) first
    keep = best[np.unique(g[first][best], return_index=True)[1]]
    out[g[first][keep]] = v[first][keep]
    return out


def _same_timestamps(q: npt.NDArray[np.int64], starts: npt.NDArray[np.int64],
                     lens: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """For each run, how far back the latest earlier run with the very same timestamps is (0: none). The signals
    of one CAN message share their frames' timestamps and sit side by side, so it is mostly 1. Runs are matched by
    length and a hash of their timestamps, then compared in full (a hash collision just leaves a run its own)."""
    r = len(starts)
    ref = np.zeros(r, np.int64)
    if r < 2:
        return ref
    pos = np.arange(len(q)) - np.repeat(starts, lens)
    weight = np.cumprod(np.full(int(lens.max()), 0x9E3779B97F4A7C15, _U64), dtype=_U64)  # odd: a bijection
    h = np.add.reduceat(q.view(_U64) * weight[pos], starts, dtype=_U64)
    order = np.lexsort((np.arange(r), h, lens))
    same = (lens[order][1:] == lens[order][:-1]) & (h[order][1:] == h[order][:-1])
    cand = np.zeros(r, np.int64)  # the candidate: the run before in (length, hash, index) order
    cand[order[1:][same]] = order[:-1][same]
    has = np.zeros(r, np.bool_)
    has[order[1:][same]] = True
    # Compare every candidate pair in full.
    idx = np.flatnonzero(has)
    if len(idx):
        k = lens[idx]
        a = np.repeat(starts[idx], k) + np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)
        b = a + np.repeat(starts[cand[idx]] - starts[idx], k)
        differ = np.add.reduceat(q[a] != q[b], np.cumsum(k) - k) > 0
        has[idx[differ]] = False
    ref[has] = np.flatnonzero(has) - cand[has]
    return ref


def _encode_v2(cols: SampleColumns) -> tuple[dict[str, Any], bytes]:
    n = len(cols)
    sig = cols.sig.astype(np.int64)
    ts = cols.ts_us.astype(np.int64)
    t0 = int(ts[0]) if n else 0
    # Runs: maximal stretches of one signal (a writer's signal-major order makes one run per signal).
    starts = np.flatnonzero(np.diff(sig, prepend=np.int64(-1))) if n else np.zeros(0, np.int64)
    lens = np.diff(np.append(starts, n))
    r = len(starts)
    run_sig = sig[starts]
    # Timestamps in the segment's unit (the largest that divides every offset from t0: CAN logs often tick in ms).
    rel = ts - np.int64(t0)  # wraps for timestamps past the limits, which the unit and the sums below undo mod 2^64
    unit = int(np.gcd.reduce(rel)) if n else 1
    if not 1 <= unit <= MAX_TS_US:
        unit = 1
    q = rel // np.int64(unit)
    ref = _same_timestamps(q, starts, lens)
    own = ref == 0
    own_lens = lens[own]
    qo = q[np.repeat(own, lens)]
    own_starts = np.cumsum(own_lens) - own_lens
    rid = np.repeat(np.arange(len(own_lens)), own_lens)
    later = np.ones(len(qo), np.bool_)
    later[own_starts] = False
    d1 = _run_diff(qo, own_starts)[later]
    # Each run's period is its most common step; what goes is each step's difference from it (the jitter).
    period = _run_modes(d1, rid[later], len(own_lens))[own_lens >= 2]
    jitter = d1 - np.repeat(period, own_lens[own_lens >= 2] - 1)
    ts_first = np.diff(qo[own_starts], prepend=np.int64(0))
    ts_period = np.diff(period, prepend=np.int64(0))
    # Values: raw integers where a signal allows, delta-coded within each run; float bits XOR-ed otherwise.
    is_int, raw, scale, offset = _integer_coding(cols)
    int_run = is_int[run_sig]
    int_sample = np.repeat(int_run, lens)
    ri = raw[int_sample]
    ilens = lens[int_run]
    istarts = np.cumsum(ilens) - ilens
    vd = _run_diff(ri, istarts)
    vfirst = vd[istarts]
    vdelta = np.delete(vd, istarts)
    bits = cols.value[~int_sample].astype("<f8").view(_U64)
    flens = lens[~int_run]
    fstarts = np.cumsum(flens) - flens
    xored = bits.copy()
    xored[1:] ^= bits[:-1]
    xored[fstarts] = bits[fstarts]
    before = (_U32.pack(r) + _column(_zigzag(np.diff(run_sig, prepend=np.int64(-1)) - 1))
              + _column(ref.view(_U64)))
    after = (struct.pack("<Q", unit) + _column(_zigzag(ts_first)) + _column(_zigzag(ts_period))
             + _column(_zigzag(jitter)) + _column(_zigzag(vfirst)) + _column(_zigzag(vdelta)) + _column(xored))
    run_len = (own_lens - 1).view(_U64)
    blob = before + _column(run_len) + after
    if n and len(blob) == n * 18:
        # Exactly the length of an ENC_V1 blob: widen the run lengths (3 bytes hold any length up to 200,000), so
        # that a receiver that predates `enc` refuses this segment rather than read it as the old layout.
        blob = before + _column(run_len, blob[len(before)] + 1) + after
    signals: list[list[Any]] = []
    for i, name in enumerate(cols.signals):
        entry: list[Any] = list(name)
        if is_int[i]:
            entry += [_json_number(float(scale[i])), _json_number(float(offset[i]))]
        signals.append(entry)
    return {"enc": ENC_V2, "n": n, "t0_us": t0, "signals": signals}, blob


class _Reader:
    """Reads a blob front to back; every read checked against what is left."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.at = 0

    def take(self, k: int, what: str) -> bytes:
        if k > len(self.blob) - self.at:
            raise WireError(f"sample blob ends inside its {what}")
        out = self.blob[self.at : self.at + k]
        self.at += k
        return out

    def column(self, k: int, what: str) -> npt.NDArray[np.uint64]:
        w = self.take(1, f"{what} width")[0]
        if w > 8:
            raise WireError(f"{what} column width {w} (at most 8)")
        planes = np.frombuffer(self.take(k * w, what), np.uint8).reshape(w, k)
        full = np.zeros((k, 8), np.uint8)
        full[:, :w] = planes.T
        return full.view("<u8").reshape(k).astype(_U64)


def _decode_v2(n: int, t0: int, sigs: list[tuple[str, str, str]], scales: list[tuple[float, float] | None],
               blob: bytes) -> SampleColumns:
    rd = _Reader(blob)
    (r,) = _U32.unpack(rd.take(4, "run count"))
    if not (r == 0 if n == 0 else 1 <= r <= n):
        raise WireError(f"{r} runs for {n} samples")
    run_sig = (np.cumsum(_unzigzag(rd.column(r, "run signals")) + _ONE, dtype=_U64) - _ONE).view(np.int64)
    if r and (run_sig.min() < 0 or run_sig.max() >= len(sigs)):
        raise WireError("signal index out of range of the segment's signal table")
    ref = rd.column(r, "timestamp references")
    idx = np.arange(r, dtype=_U64)
    if (ref > idx).any():
        raise WireError("a run's timestamps refer to a run after it")
    src = (idx - ref).astype(np.int64)
    own = ref == 0
    # Follow references to the run that has the timestamps: pointer doubling, so at most log2(r) + 1 rounds.
    for _ in range(max(r, 1).bit_length() + 1):
        nxt = src[src]
        if (nxt == src).all():
            break
        src = nxt
    own_len1 = rd.column(int(own.sum()), "run lengths")  # each length - 1
    if (own_len1 >= _U64(n)).any():
        raise WireError("a run longer than the segment")
    own_lens = own_len1.astype(np.int64) + 1
    own_index = np.cumsum(own) - 1
    lens = own_lens[own_index[src]]
    if int(lens.sum()) != n:
        raise WireError(f"runs of {int(lens.sum())} samples in a segment of {n}")
    (unit,) = struct.unpack("<Q", rd.take(8, "timestamp unit"))
    if not 1 <= unit <= MAX_TS_US:
        raise WireError(f"timestamp unit {unit} outside 1..{MAX_TS_US}")
    periodic = own_lens >= 2
    ts_first = rd.column(len(own_lens), "timestamp firsts")
    ts_period = rd.column(int(periodic.sum()), "timestamp periods")
    jitter = rd.column(int(own_lens.sum()) - len(own_lens), "timestamp jitter")
    is_int = np.array([s is not None for s in scales], np.bool_)
    int_run = is_int[run_sig] if r else np.zeros(0, np.bool_)
    ilens = lens[int_run]
    vfirst = rd.column(len(ilens), "value firsts")
    vdelta = rd.column(int(ilens.sum()) - len(ilens), "value deltas")
    xored = rd.column(n - int(ilens.sum()), "float values")
    if rd.at != len(blob):
        raise WireError(f"sample blob has {len(blob) - rd.at} bytes past its columns")

    sig = np.repeat(run_sig, lens).astype(np.uint16)
    # The runs with timestamps of their own: first, then period + jitter per step, summed back (mod 2^64).
    own_starts = np.cumsum(own_lens) - own_lens
    steps = np.zeros(int(own_lens.sum()), _U64)
    later = np.ones(len(steps), np.bool_)
    later[own_starts] = False
    steps[own_starts] = np.cumsum(_unzigzag(ts_first), dtype=_U64)
    steps[later] = np.repeat(np.cumsum(_unzigzag(ts_period), dtype=_U64), own_lens[periodic] - 1) + _unzigzag(jitter)
    q_own = _seg_cumsum(steps, own_lens)
    # Every run reads its source run's timestamps (its own when it has them).
    starts = np.cumsum(lens) - lens
    q = q_own[np.repeat(own_starts[own_index[src]] - starts, lens) + np.arange(n)]
    ts = (_U64(t0 % 2**64) + _U64(unit) * q).view(np.int64)
    if ((ts > MAX_TS_US) | (ts < -MAX_TS_US)).any():
        raise WireError(f"sample timestamps outside ±{MAX_TS_US} µs")
    # Values: raw integers summed back per run and scaled; float bits XOR-ed back per run.
    value = np.zeros(n)
    int_sample = np.repeat(int_run, lens)
    istarts = np.cumsum(ilens) - ilens
    d = np.zeros(int(ilens.sum()), _U64)
    later = np.ones(len(d), np.bool_)
    later[istarts] = False
    d[istarts] = _unzigzag(vfirst)
    d[later] = _unzigzag(vdelta)
    raw = _seg_cumsum(d, ilens).view(np.int64)
    if ((raw > MAX_RAW_INT) | (raw < -MAX_RAW_INT)).any():
        raise WireError(f"a raw integer value outside ±{MAX_RAW_INT}")
    scale = np.array([s[0] if s else 1.0 for s in scales])
    offset = np.array([s[1] if s else 0.0 for s in scales])
    isig = sig[int_sample]
    with np.errstate(all="ignore"):
        value[int_sample] = raw.astype(np.float64) * scale[isig] + offset[isig]
    flens = lens[~int_run]
    fstarts = np.cumsum(flens) - flens
    acc = np.bitwise_xor.accumulate(xored) if len(xored) else xored
    before = np.zeros(len(flens), _U64)
    nz = fstarts > 0
    before[nz] = acc[fstarts[nz] - 1]
    value[~int_sample] = (acc ^ np.repeat(before, flens)).view(np.float64)
    if not np.isfinite(value).all():
        raise WireError("sample values must be finite")
    return SampleColumns(sigs, sig, ts, value, scales if any(s is not None for s in scales) else [])


def split_columns(cols: SampleColumns) -> list[SampleColumns]:
    """Cut columns into pieces within MAX_SEGMENT_SAMPLES and MAX_SIGNALS_PER_SEGMENT, in order, each with only
    the signals it uses, named as the receiver accepts (`conform_signal`): what a vehicle's store writes, so every
    segment it sends fits the receiver's caps."""
    n = len(cols)
    out: list[SampleColumns] = []
    start = 0
    while start < n:
        end = min(n, start + MAX_SEGMENT_SAMPLES)
        used = np.unique(cols.sig[start:end])
        if len(used) > MAX_SIGNALS_PER_SEGMENT:
            # Too many distinct signals in this stretch: end it where the signal count reaches the cap.
            seen: set[int] = set()
            for i in range(start, end):
                seen.add(int(cols.sig[i]))
                if len(seen) > MAX_SIGNALS_PER_SEGMENT:
                    end = i
                    break
            used = np.unique(cols.sig[start:end])
        remap = np.zeros(len(cols.signals), np.uint16)
        remap[used] = np.arange(len(used), dtype=np.uint16)
        out.append(SampleColumns([conform_signal(cols.signals[int(k)]) for k in used], remap[cols.sig[start:end]],
                                 cols.ts_us[start:end].copy(), cols.value[start:end].copy(),
                                 [cols.scales[int(k)] for k in used] if cols.scales else []))
        start = end
    return out


def encode_batch(batch: Batch, compress: bool = True, known_tables: Container[str] = (),
                 codec: int | None = None) -> bytes:
    """The message of `batch`, its body compressed as `codec` says (none without `compress`; by default the codec
    for its size, `body_codec`). A samples segment whose signal table's digest is in `known_tables` (tables the
    receiver confirmed it stores) carries `table: digest` instead of the table; `batch.tables` and
    `batch.referenced` are set to what the message carries."""
    if codec not in (None, CODEC_NONE, CODEC_ZSTD, CODEC_ZSTD_D1):
        raise ValueError(f"no encoder for codec {codec}")
    segs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    offset = 0
    batch.tables, batch.referenced = {}, False
    for s in batch.segments:
        entry: dict[str, Any] = {"kind": s.kind, "seq_lo": s.seq_lo, "seq_hi": s.seq_hi}
        if s.columns is not None or s.encoded is not None:
            head, blob = s.encoded if s.encoded is not None else encode_columns(s.columns)  # type: ignore[arg-type]
            signals = head.get("signals")
            if isinstance(signals, list):
                digest = table_digest(signals)
                if digest in known_tables:
                    head = {k: v for k, v in head.items() if k != "signals"}
                    head["table"] = digest
                    batch.referenced = True
                else:
                    batch.tables[digest] = signals
            entry.update(head, offset=offset, length=len(blob))
            blobs.append(blob)
            offset += len(blob)
        else:
            if len(json.dumps(s.record, separators=(",", ":"))) > MAX_RECORD_BYTES:
                raise LimitError(f"{s.kind} record {s.seq_lo} larger than {MAX_RECORD_BYTES} bytes")
            entry["record"] = s.record
        segs.append(entry)
    header = {
        "schema": batch.schema,
        "fleet": batch.fleet,
        "vehicle": batch.vehicle,
        "batch": batch.batch,
        "seq_lo": batch.seq_lo,
        "seq_hi": batch.seq_hi,
        "sent_at": batch.sent_at,
        "segments": segs,
        **({"extra": batch.extra} if batch.extra else {}),
    }
    if len(segs) > MAX_SEGMENTS_PER_BATCH:
        raise LimitError(f"{len(segs)} segments, more than {MAX_SEGMENTS_PER_BATCH}")
    hj = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if len(hj) > MAX_HEADER_BYTES:
        raise LimitError(f"header of {len(hj)} bytes, more than {MAX_HEADER_BYTES}")
    body = _U32.pack(len(hj)) + hj + b"".join(blobs)
    if len(body) > MAX_DECOMPRESSED_BYTES:
        raise LimitError(f"body of {len(body)} bytes, more than {MAX_DECOMPRESSED_BYTES}")
    if not compress:
        codec = CODEC_NONE
    elif codec is None:
        codec = body_codec(len(body))
    out = _PREFIX.pack(MAGIC, WIRE_VERSION, codec) + _compress(body, codec)
    if len(out) > MAX_MESSAGE_BYTES:
        raise LimitError(f"message of {len(out)} bytes, more than {MAX_MESSAGE_BYTES}")
    return out


_DICT_D1 = zstandard.ZstdCompressionDict(ZSTD_DICT_D1, dict_type=zstandard.DICT_TYPE_FULLDICT)


def body_codec(body_len: int) -> int:
    """The codec a body of `body_len` bytes is sent with (ZSTD_SMALL_BODY says why)."""
    return CODEC_ZSTD_D1 if body_len <= ZSTD_SMALL_BODY else CODEC_ZSTD


def _compress(body: bytes, codec: int) -> bytes:
    if codec == CODEC_NONE:
        return body
    if codec == CODEC_ZSTD:
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(body)
    # Magicless (the prefix says it is zstd already) and without a checksum (MQTT runs over TCP/TLS, and the
    # decoded columns are checked); the content size stays, so that a decoder's window is the body's size.
    params = zstandard.ZstdCompressionParameters.from_level(
        ZSTD_LEVEL_D1, source_size=len(body), format=zstandard.FORMAT_ZSTD1_MAGICLESS,
        write_content_size=1, write_checksum=0, write_dict_id=0)
    return zstandard.ZstdCompressor(dict_data=_DICT_D1, compression_params=params).compress(body)


def _inflate(payload: bytes, max_bytes: int, truncate: bool = False) -> bytes:
    """The body of a message, at most `max_bytes` of it (past that: WireError, or with `truncate` the first
    `max_bytes`, enough to read a header)."""
    if len(payload) < _PREFIX.size:
        raise WireError("message too short")
    magic, version, codec = _PREFIX.unpack_from(payload)
    if magic != MAGIC:
        raise WireError("not a harvester wire message (bad magic)")
    if version != WIRE_VERSION:
        raise WireError(f"unsupported wire version {version}")
    data = payload[_PREFIX.size :]
    if codec == CODEC_NONE:
        if len(data) > max_bytes:
            if truncate:
                return data[:max_bytes]
            raise WireError(f"message body past {max_bytes} bytes")
        return data
    if codec == CODEC_ZSTD:
        dz = zstandard.ZstdDecompressor(max_window_size=MAX_DECOMPRESSED_BYTES)
    elif codec == CODEC_ZSTD_D1:
        dz = zstandard.ZstdDecompressor(dict_data=_DICT_D1, max_window_size=MAX_DECOMPRESSED_BYTES,
                                        format=zstandard.FORMAT_ZSTD1_MAGICLESS)
    else:
        raise WireError(f"unknown codec {codec}")
    try:
        # Stream in chunks so the size cap holds even when the frame does not declare its content size; the
        # window cap keeps a forged frame from making the decoder reserve more than the body could be.
        reader = dz.stream_reader(data)
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = reader.read(1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                if truncate:
                    chunks.append(chunk)
                    break
                raise WireError(f"message inflates past {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    except zstandard.ZstdError as e:
        raise WireError(f"corrupt zstd body: {e}") from None


def decode_batch(payload: bytes, max_bytes: int = MAX_DECOMPRESSED_BYTES,
                 tables: Callable[[str], list[Any] | None] | None = None) -> Batch:
    """Decode and validate a message; raise WireError with the reason for anything malformed or past a limit.
    Never raises anything else, whatever the bytes (tests/test_wire.py fuzzes it). A segment's `table` reference
    is looked up among the full tables the same batch carries, then with `tables` (the receiver's store for this
    vehicle); UnknownTableError when neither has it."""
    body = _inflate(payload, max_bytes)
    if len(body) < 4:
        raise WireError("body too short for a header")
    (hlen,) = _U32.unpack_from(body)
    if hlen > MAX_HEADER_BYTES or 4 + hlen > len(body):
        raise WireError("header length out of range")
    header = loads_json(body[4 : 4 + hlen], "header")
    if not isinstance(header, dict):
        raise WireError("header is not an object")
    if header.get("schema") != SCHEMA_VERSION:
        raise WireError(f"unsupported schema version {str(header.get('schema'))[:20]}")
    fleet, vehicle, batch_id = header.get("fleet"), header.get("vehicle"), header.get("batch")
    if not isinstance(fleet, str) or not isinstance(vehicle, str) or not isinstance(batch_id, int):
        raise WireError("header needs fleet, vehicle (strings) and batch (integer)")
    if not _is_int(batch_id, 0, MAX_BATCH_ID):
        raise WireError(f"batch id outside 0..{MAX_BATCH_ID}")
    raw_segs = header.get("segments")
    if not isinstance(raw_segs, list) or not raw_segs:
        raise WireError("header needs a non-empty segments list")
    if len(raw_segs) > MAX_SEGMENTS_PER_BATCH:
        raise WireError(f"more than {MAX_SEGMENTS_PER_BATCH} segments")
    blob = body[4 + hlen :]
    carried: dict[str, list[Any]] = {}
    for rs in raw_segs:
        if isinstance(rs, dict) and rs.get("kind") == "samples" and isinstance(rs.get("signals"), list):
            carried[table_digest(rs["signals"])] = rs["signals"]
    referenced = False

    def resolve(digest: str) -> list[Any]:
        nonlocal referenced
        referenced = True
        found = carried.get(digest)
        if found is None and tables is not None:
            found = tables(digest)
        # A stored table is trusted only if it still hashes to its key (a corrupted or edited row is unknown).
        if found is None or table_digest(found) != digest:
            raise UnknownTableError(f"no signal table {digest} for this vehicle")
        return found

    segments: list[Segment] = []
    for rs in raw_segs:
        segments.append(_decode_segment(rs, blob, resolve))
    sent_at = header.get("sent_at", 0.0)
    extra = header.get("extra", {})
    b = Batch(
        fleet,
        vehicle,
        batch_id,
        segments,
        float(sent_at) if isinstance(sent_at, float) or _is_int(sent_at, -MAX_TS_US, MAX_TS_US) else 0.0,
        extra=extra if isinstance(extra, dict) else {},
        tables=carried,
        referenced=referenced,
    )
    if header.get("seq_lo") != b.seq_lo or header.get("seq_hi") != b.seq_hi:
        raise WireError("header sequence range does not match its segments")
    return b


SEGMENT_KINDS = ("samples", "alert", "event")


def peek_batch_id(payload: bytes) -> tuple[int, list[tuple[int, int]]] | None:
    """The batch id and segment ranges of a message `decode_batch` refused, when its header still names them, so
    the receiver can answer a `rejected` ack the vehicle can match. None when it cannot tell. Never raises."""
    try:
        body = _inflate(payload, 4 + MAX_HEADER_BYTES, truncate=True)
        (hlen,) = _U32.unpack_from(body)
        if hlen > MAX_HEADER_BYTES:
            return None
        # Lenient on purpose (the message is refused already): only the batch id must be sound.
        header = json.loads(body[4 : 4 + hlen])
        bid = header.get("batch") if isinstance(header, dict) else None
        if not isinstance(bid, int) or not _is_int(bid, 0, MAX_BATCH_ID):
            return None
        ranges: list[tuple[int, int]] = []
        segs = header.get("segments")
        for rs in segs if isinstance(segs, list) else []:
            lo, hi = (rs.get("seq_lo"), rs.get("seq_hi")) if isinstance(rs, dict) else (None, None)
            if (isinstance(lo, int) and isinstance(hi, int) and _is_int(lo, 1, MAX_SEQ) and _is_int(hi, lo, MAX_SEQ)
                    and len(ranges) < MAX_SEGMENTS_PER_BATCH):
                ranges.append((lo, hi))
        return bid, ranges
    except (WireError, struct.error, RecursionError, ValueError):  # JSONDecodeError, UnicodeDecodeError are these
        return None


def _decode_segment(rs: Any, blob: bytes, resolve: Callable[[str], list[Any]]) -> Segment:
    if not isinstance(rs, dict):
        raise WireError("segment is not an object")
    kind, lo, hi = rs.get("kind"), rs.get("seq_lo"), rs.get("seq_hi")
    if not isinstance(kind, str) or not isinstance(lo, int) or not isinstance(hi, int):
        raise WireError("segment needs kind, seq_lo, seq_hi")
    if kind not in SEGMENT_KINDS:
        raise WireError(f"unknown segment kind {kind[:32]!r}")
    if not _is_int(lo, 1, MAX_SEQ) or not _is_int(hi, lo, MAX_SEQ):
        raise WireError(f"bad sequence range {lo}..{hi} (1 <= seq_lo <= seq_hi <= {MAX_SEQ})")
    if kind == "samples":
        off, length = rs.get("offset"), rs.get("length")
        if (not isinstance(off, int) or not isinstance(length, int) or not _is_int(off, 0, MAX_DECOMPRESSED_BYTES)
                or not _is_int(length, 0, MAX_DECOMPRESSED_BYTES)):
            raise WireError("sample segment needs offset and length within the message")
        if off + length > len(blob):
            raise WireError("sample segment points past the end of the message")
        if hi - lo + 1 > MAX_SEGMENT_SAMPLES:
            raise WireError(f"sample segment of more than {MAX_SEGMENT_SAMPLES} samples")
        if ("signals" in rs) == ("table" in rs):
            raise WireError("sample segment needs exactly one of signals and table")
        if "table" in rs:
            digest = rs["table"]
            if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
                raise WireError("a segment's table must be 32 lowercase hex digits")
            rs = {**rs, "signals": resolve(digest)}
        cols = decode_columns(rs, blob[off : off + length])
        if len(cols) != hi - lo + 1:
            raise WireError(f"sample segment has {len(cols)} samples for range {lo}..{hi}")
        return Segment(kind, lo, hi, columns=cols)
    record = rs.get("record")
    if not isinstance(record, dict):
        raise WireError(f"{kind} segment needs a record object")
    if hi != lo:
        raise WireError("a record segment holds exactly one sequence number")
    if len(json.dumps(record, separators=(",", ":"))) > MAX_RECORD_BYTES:
        raise WireError(f"{kind} record larger than {MAX_RECORD_BYTES} bytes")
    return Segment(kind, lo, hi, record=record)


# --- Acknowledgements (cloud → vehicle), small JSON: readable on the wire and in broker logs. ---


@dataclass(slots=True)
class Ack:
    vehicle: str
    batch: int
    ranges: list[tuple[int, int]]
    status: str = "ok"  # "ok": committed (new or duplicate); "rejected": will never be accepted (reason says why)
    reason: str = ""
    schema: int = SCHEMA_VERSION
    # Digests of the full signal tables of this batch the cloud has stored (at most MAX_ACK_TABLES); absent from
    # the JSON when empty, as receivers before table references never sent it.
    tables: list[str] = field(default_factory=list)


def encode_ack(ack: Ack) -> bytes:
    d: dict[str, Any] = {
        "schema": ack.schema,
        "vehicle": ack.vehicle,
        "batch": ack.batch,
        "ranges": [list(r) for r in ack.ranges],
        "status": ack.status,
        "reason": ack.reason,
    }
    if ack.tables:
        d["tables"] = ack.tables[:MAX_ACK_TABLES]
    return json.dumps(d, separators=(",", ":")).encode()


def decode_ack(payload: bytes, max_bytes: int = 1024 * 1024) -> Ack:
    if len(payload) > max_bytes:
        raise WireError("ack too large")
    d = loads_json(payload, "ack")
    if not isinstance(d, dict) or d.get("schema") != SCHEMA_VERSION:
        raise WireError("ack has no supported schema version")
    vehicle, batch, ranges, status = d.get("vehicle"), d.get("batch"), d.get("ranges"), d.get("status", "ok")
    if not isinstance(vehicle, str) or not isinstance(batch, int) or not isinstance(ranges, list):
        raise WireError("ack needs vehicle, batch and ranges")
    if status not in ("ok", "rejected"):
        raise WireError(f"unknown ack status {status!r}")
    out: list[tuple[int, int]] = []
    for r in ranges:
        if not (isinstance(r, list) and len(r) == 2 and _is_int(r[0], 1, MAX_SEQ) and _is_int(r[1], r[0], MAX_SEQ)):
            raise WireError("ack ranges must be [lo, hi] integer pairs with 1 <= lo <= hi")
        out.append((r[0], r[1]))
    reason = d.get("reason", "")
    tables = d.get("tables", [])
    if not (isinstance(tables, list) and len(tables) <= MAX_ACK_TABLES
            and all(isinstance(t, str) and _DIGEST.fullmatch(t) for t in tables)):
        raise WireError(f"ack tables must be a list of at most {MAX_ACK_TABLES} digests of 32 lowercase hex")
    return Ack(vehicle, batch, out, status, reason if isinstance(reason, str) else "", tables=list(tables))


# --- Topics: one tree per vehicle so a broker ACL can confine each vehicle to its subtree. ---


def vehicle_topic(fleet: str, vehicle: str, leaf: str) -> str:
    return f"fleet/{fleet}/vehicle/{vehicle}/{leaf}"


def parse_vehicle_topic(topic: str) -> tuple[str, str, str] | None:
    """`fleet/F/vehicle/V/leaf...` → (F, V, leaf) or None."""
    parts = topic.split("/")
    if len(parts) < 5 or parts[0] != "fleet" or parts[2] != "vehicle":
        return None
    return parts[1], parts[3], "/".join(parts[4:])


def status_counters(metrics: object, limit: int = 200) -> dict[str, int]:
    """The non-zero counters of a status message's `metrics` (agent/metrics.py: `{"counters": {name: int |
    {label: int}}}`), flat: `name` or `name{label}` → count, at most `limit`, largest first. Both sides read it
    with this: the agent for `status`, the cloud for the fleet page, where the message is a vehicle's and anything
    not of the expected shape is left out."""
    out: dict[str, int] = {}
    counters = metrics.get("counters") if isinstance(metrics, dict) else None
    if not isinstance(counters, dict):
        return out
    for k, v in counters.items():
        if _is_int(v, 1, INT64_MAX):
            out[str(k)] = v
        elif isinstance(v, dict):
            for a, b in v.items():
                if _is_int(b, 1, INT64_MAX):
                    out[f"{k}{{{a}}}"] = b
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0]))[:limit])
