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
# A cap on what a decoder will inflate, so a small malicious message cannot become a memory bomb.
MAX_DECOMPRESSED_BYTES = 64 * 1024 * 1024
MAX_HEADER_BYTES = 8 * 1024 * 1024
MAX_SIGNALS_PER_SEGMENT = 65535
ZSTD_LEVEL = 3

_PREFIX = struct.Struct("<2sBB")
_U32 = struct.Struct("<I")


class WireError(ValueError):
    """A message that cannot be decoded; the text says why."""


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
    if not isinstance(n, int) or n < 0 or not isinstance(t0, int) or not isinstance(signals, list):
        raise WireError("sample segment header needs n, t0_us and signals")
    if len(signals) > MAX_SIGNALS_PER_SEGMENT:
        raise WireError("too many signals in one segment")
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
    # deltas[0] is relative to t0, every other delta to the previous timestamp.
    ts = np.cumsum(deltas, dtype=np.int64) + np.int64(t0)
    return SampleColumns(sigs, sig, ts, value)


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
    hj = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    body = _U32.pack(len(hj)) + hj + b"".join(blobs)
    if compress:
        return _PREFIX.pack(MAGIC, WIRE_VERSION, CODEC_ZSTD) + zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(body)
    return _PREFIX.pack(MAGIC, WIRE_VERSION, CODEC_NONE) + body


def _inflate(payload: bytes, max_bytes: int) -> bytes:
    if len(payload) < _PREFIX.size:
        raise WireError("message too short")
    magic, version, codec = _PREFIX.unpack_from(payload)
    if magic != MAGIC:
        raise WireError("not a harvester wire message (bad magic)")
    if version != WIRE_VERSION:
        raise WireError(f"unsupported wire version {version}")
    data = payload[_PREFIX.size :]
    if codec == CODEC_NONE:
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
                raise WireError(f"message inflates past {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    except zstandard.ZstdError as e:
        raise WireError(f"corrupt zstd body: {e}") from None


def decode_batch(payload: bytes, max_bytes: int = MAX_DECOMPRESSED_BYTES) -> Batch:
    """Decode and validate a message; raise WireError with the reason for anything malformed."""
    body = _inflate(payload, max_bytes)
    if len(body) < 4:
        raise WireError("body too short for a header")
    (hlen,) = _U32.unpack_from(body)
    if hlen > MAX_HEADER_BYTES or 4 + hlen > len(body):
        raise WireError("header length out of range")
    try:
        header = json.loads(body[4 : 4 + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise WireError("header is not an object")
    if header.get("schema") != SCHEMA_VERSION:
        raise WireError(f"unsupported schema version {header.get('schema')!r}")
    fleet, vehicle, batch_id = header.get("fleet"), header.get("vehicle"), header.get("batch")
    if not isinstance(fleet, str) or not isinstance(vehicle, str) or not isinstance(batch_id, int):
        raise WireError("header needs fleet, vehicle (strings) and batch (integer)")
    raw_segs = header.get("segments")
    if not isinstance(raw_segs, list) or not raw_segs:
        raise WireError("header needs a non-empty segments list")
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
        float(sent_at) if isinstance(sent_at, int | float) else 0.0,
        extra=extra if isinstance(extra, dict) else {},
    )
    if header.get("seq_lo") != b.seq_lo or header.get("seq_hi") != b.seq_hi:
        raise WireError("header sequence range does not match its segments")
    return b


def _decode_segment(rs: Any, blob: bytes) -> Segment:
    if not isinstance(rs, dict):
        raise WireError("segment is not an object")
    kind, lo, hi = rs.get("kind"), rs.get("seq_lo"), rs.get("seq_hi")
    if not isinstance(kind, str) or not isinstance(lo, int) or not isinstance(hi, int):
        raise WireError("segment needs kind, seq_lo, seq_hi")
    if lo < 1 or hi < lo:
        raise WireError(f"bad sequence range {lo}..{hi}")
    if kind == "samples":
        off, length = rs.get("offset"), rs.get("length")
        if not isinstance(off, int) or not isinstance(length, int) or off < 0 or length < 0:
            raise WireError("sample segment needs offset and length")
        if off + length > len(blob):
            raise WireError("sample segment points past the end of the message")
        cols = decode_columns(rs, blob[off : off + length])
        if len(cols) != hi - lo + 1:
            raise WireError(f"sample segment has {len(cols)} samples for range {lo}..{hi}")
        return Segment(kind, lo, hi, columns=cols)
    record = rs.get("record")
    if not isinstance(record, dict):
        raise WireError(f"{kind} segment needs a record object")
    if hi != lo:
        raise WireError("a record segment holds exactly one sequence number")
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
    try:
        d = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"ack is not JSON: {e}") from None
    if not isinstance(d, dict) or d.get("schema") != SCHEMA_VERSION:
        raise WireError("ack has no supported schema version")
    vehicle, batch, ranges, status = d.get("vehicle"), d.get("batch"), d.get("ranges"), d.get("status", "ok")
    if not isinstance(vehicle, str) or not isinstance(batch, int) or not isinstance(ranges, list):
        raise WireError("ack needs vehicle, batch and ranges")
    if status not in ("ok", "rejected"):
        raise WireError(f"unknown ack status {status!r}")
    out: list[tuple[int, int]] = []
    for r in ranges:
        if not (isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r) and 1 <= r[0] <= r[1]):
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
