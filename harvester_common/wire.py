"""The wire format between vehicle and cloud (docs/protocol.md), shared by `agent` and `cloud_sync`.

A message is `MAGIC | version u8 | codec u8 | body`, where body (zstd-compressed when codec is 1) is
`header_len u32le | header JSON | blob`. The header carries schema version, fleet, vehicle, batch id and the
sequence range; each segment in it is either a JSON record (alert, event) or a columnar block of samples whose
columns sit in the blob at the offset the header gives.

Sample columns (n samples, in sequence order, sample i has sequence number seq_lo + i):
  signal index u16[n] into the segment's `signals` table, timestamp deltas int64[n] in microseconds (the first
  relative to `t0_us`), values float64[n] XOR-ed with the previous value (Gorilla-style: a repeated or slowly
  changing reading becomes mostly zero bits). Each column is byte-shuffled (all first bytes, then all second
  bytes…) so zstd sees like bytes together. Writers order a segment by (signal, time), which makes every column
  smooth; decoded values round-trip bit for bit.

Everything here is pure: bytes in, typed objects out, `WireError` with a reason for anything malformed.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard

MAGIC = b"HV"
WIRE_VERSION = 1
SCHEMA_VERSION = 1
CODEC_NONE = 0
CODEC_ZSTD = 1
ZSTD_LEVEL = 3

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
MAX_SEGMENT_SAMPLES = 200_000  # samples in one segment (18 bytes each in the blob)
MAX_SIGNALS_PER_SEGMENT = 8192  # entries in one segment's signal table
MAX_RECORD_BYTES = 256 * 1024  # one alert/event record, as JSON
MAX_JSON_DEPTH = 32  # nesting of the header (and so of a record); deeper JSON is refused before it is parsed
MAX_BATCH_BYTES = 4 * 1024 * 1024  # the highest `mqtt.batch_max_bytes` a vehicle may configure
MAX_STATUS_BYTES = 64 * 1024  # one retained status message (JSON)
# An ack names one range per segment of its batch: "[seq,seq]," is at most 42 bytes with 19-digit numbers, plus the
# vehicle id, the batch id and a reason of up to 500 characters (6 bytes each once JSON-escaped). A vehicle must accept
# an ack this large (`mqtt.max_ack_bytes` may not go below it), or it would drop the ack of a legal batch as
# oversized and resend that batch for ever.
MAX_ACK_BYTES = MAX_SEGMENTS_PER_BATCH * 42 + 4096
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
    """A block of samples in columnar form. `signals` lists (name, source, unit) tuples."""

    signals: list[tuple[str, str, str]]
    sig: npt.NDArray[np.uint16]
    ts_us: npt.NDArray[np.int64]
    value: npt.NDArray[np.float64]

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


def encode_columns(cols: SampleColumns) -> tuple[dict[str, Any], bytes]:
    """Columns → (segment header fields, blob). Timestamps are delta-encoded against the first."""
    n = len(cols)
    t0 = int(cols.ts_us[0]) if n else 0
    deltas = np.diff(cols.ts_us, prepend=np.int64(t0)).astype("<i8")
    bits = cols.value.astype("<f8").view("<u8")
    xored = bits ^ np.concatenate([np.zeros(1, "<u8"), bits[:-1]]) if n else bits
    blob = _shuffle(cols.sig.astype("<u2")) + _shuffle(deltas) + _shuffle(xored)
    head = {"n": n, "t0_us": t0, "signals": [list(s) for s in cols.signals]}
    return head, blob


def decode_columns(head: dict[str, Any], blob: bytes) -> SampleColumns:
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
    sigs: list[tuple[str, str, str]] = []
    for s in signals:
        if not (isinstance(s, list) and len(s) == 3 and all(isinstance(x, str) for x in s)):
            raise WireError("signal table entries must be [name, source, unit] strings")
        sigs.append((s[0], s[1], s[2]))
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
                                 cols.ts_us[start:end].copy(), cols.value[start:end].copy()))
        start = end
    return out


def encode_batch(batch: Batch, compress: bool = True) -> bytes:
    segs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    offset = 0
    for s in batch.segments:
        entry: dict[str, Any] = {"kind": s.kind, "seq_lo": s.seq_lo, "seq_hi": s.seq_hi}
        if s.columns is not None or s.encoded is not None:
            head, blob = s.encoded if s.encoded is not None else encode_columns(s.columns)  # type: ignore[arg-type]
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
    if compress:
        out = _PREFIX.pack(MAGIC, WIRE_VERSION, CODEC_ZSTD) + zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(body)
    else:
        out = _PREFIX.pack(MAGIC, WIRE_VERSION, CODEC_NONE) + body
    if len(out) > MAX_MESSAGE_BYTES:
        raise LimitError(f"message of {len(out)} bytes, more than {MAX_MESSAGE_BYTES}")
    return out


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
    if codec != CODEC_ZSTD:
        raise WireError(f"unknown codec {codec}")
    try:
        # Stream in chunks so the size cap holds even when the frame does not declare its content size.
        reader = zstandard.ZstdDecompressor().stream_reader(data)
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


def decode_batch(payload: bytes, max_bytes: int = MAX_DECOMPRESSED_BYTES) -> Batch:
    """Decode and validate a message; raise WireError with the reason for anything malformed or past a limit.
    Never raises anything else, whatever the bytes (tests/test_wire.py fuzzes it)."""
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
    segments: list[Segment] = []
    for rs in raw_segs:
        segments.append(_decode_segment(rs, blob))
    sent_at = header.get("sent_at", 0.0)
    extra = header.get("extra", {})
    b = Batch(
        fleet,
        vehicle,
        batch_id,
        segments,
        float(sent_at) if isinstance(sent_at, float) or _is_int(sent_at, -MAX_TS_US, MAX_TS_US) else 0.0,
        extra=extra if isinstance(extra, dict) else {},
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


def _decode_segment(rs: Any, blob: bytes) -> Segment:
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


def encode_ack(ack: Ack) -> bytes:
    return json.dumps(
        {
            "schema": ack.schema,
            "vehicle": ack.vehicle,
            "batch": ack.batch,
            "ranges": [list(r) for r in ack.ranges],
            "status": ack.status,
            "reason": ack.reason,
        },
        separators=(",", ":"),
    ).encode()


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
    return Ack(vehicle, batch, out, status, reason if isinstance(reason, str) else "")


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
