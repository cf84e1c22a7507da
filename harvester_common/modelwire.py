"""The model topics: how a signed package travels from the cloud to a vehicle, and how the vehicle reports back.

Inside each vehicle's tree, `fleet/{fleet}/vehicle/{vehicle}/` (docs/protocol.md, "Model topics"):

| leaf | direction | QoS | retained | payload |
| --- | --- | --- | --- | --- |
| `model/desired` | down | 1 | yes | JSON `Desired`; an empty payload clears it (no desired model) |
| `model/get` | up | 1 | no | JSON `GetRequest`: chunks `first .. first+count-1` of a package |
| `model/chunk` | down | 1 | no | binary `Chunk` (below) |
| `model/status` | up | 1 | yes | JSON `ModelStatus`: the vehicle's latest step |

Desired (the cloud's word on what a vehicle should run; retained, so a vehicle away for weeks gets it on return):

```json
{"schema": 1, "name": "harvester-anomaly", "version": "1.1.0", "package_sha256": "<64 hex>", "size": 57871,
 "chunk_bytes": 65536, "chunk_sha256": ["<64 hex>"], "key_id": "<16 hex>", "rollout": "3", "mode": "update",
 "issued_at": 1764000000.0}
```

Every chunk is `chunk_bytes` long except the last; `chunk_sha256` holds each chunk's hash in order, so a vehicle
checks a chunk the moment it arrives, and after a restart finds which chunks of a partial download are good by
hashing them again. `mode` `rollback` asks for a switch without a shadow run (an operator's decision).

Chunk (binary, so a package is not inflated by base64; 45 bytes of header):

```
offset  size  field
0       4     magic "HVCK"
4       1     version (1)
5       32    package SHA-256, raw
37      4     u32le index (0-based)
41      4     u32le total chunks
45      ...   data (1 .. MAX_CHUNK_BYTES bytes)
```

Status (retained, so the cloud learns a vehicle's latest step even if no receiver ran when it was sent):

```json
{"schema": 1, "state": "shadow", "seq": 42, "ts": 1764000000.0,
 "target": {"name": "harvester-anomaly", "version": "1.1.0", "package_sha256": "<64 hex>", "rollout": "3"},
 "active": {"name": "harvester-anomaly", "version": "1.0.0", "sha256": "<64 hex>"}, "previous": null,
 "healthy": null, "reason": "", "figures": {"windows": 37}, "progress": {"chunks_have": 1, "chunks": 1}}
```

`seq` increases strictly per vehicle across restarts: a receiver keeps the highest and drops older (stale,
replayed) reports. `healthy` goes with `active`: null while the vehicle watches the new model, true once the watch
passed. `figures` and `progress` are flat objects of short names to numbers, booleans or short texts.

Every decoder raises `ModelWireError` (a `wire.WireError`) with a reason, never another exception, whatever the
bytes (fuzzed in tests/test_modelwire.py): a size past its limit, JSON that is not an object (or nests too
deeply, or holds NaN or an integer outside signed 64 bits), a missing or mistyped field, a hash that is not 64
lowercase hex digits, a text that breaks `wire.valid_label`, counts and indexes out of range, a chunk list that
does not match the package's size.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from harvester_common import wire

SCHEMA = 1
LEAF_DESIRED = "model/desired"
LEAF_GET = "model/get"
LEAF_CHUNK = "model/chunk"
LEAF_STATUS = "model/status"
LEAVES = (LEAF_DESIRED, LEAF_GET, LEAF_CHUNK, LEAF_STATUS)

DEFAULT_CHUNK_BYTES = 64 * 1024  # small enough that a dropped cellular link loses little; 45 bytes of header each
MAX_CHUNK_BYTES = 1024 * 1024
MAX_CHUNKS = 4096  # with 64-hex hashes the desired message stays under MAX_DESIRED_BYTES
MAX_PACKAGE_BYTES = 64 * 1024 * 1024  # as harvester_common/modelpkg.py
MAX_GET_COUNT = 16
MAX_DESIRED_BYTES = 512 * 1024
MAX_GET_BYTES = 4096
MAX_MODEL_STATUS_BYTES = 64 * 1024
MAX_REASON_CHARS = 500
MAX_FIGURES = 64

CHUNK_MAGIC = b"HVCK"
CHUNK_VERSION = 1
_CHUNK_HEAD = struct.Struct("<4sB32sII")
CHUNK_HEADER_BYTES = _CHUNK_HEAD.size  # 45

STATES = ("downloading", "verified", "shadow", "active", "rejected", "rolled_back", "cancelled", "failed")
MODES = ("update", "rollback")

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_FIGURE_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class ModelWireError(wire.WireError):
    """A model message that is malformed or past a limit; the text says which."""


def _json(payload: bytes, limit: int, what: str) -> dict[str, Any]:
    if len(payload) > limit:
        raise ModelWireError(f"{what} of {len(payload)} bytes is over the limit of {limit}")
    try:
        d = wire.loads_json(payload, what)
    except ModelWireError:
        raise
    except wire.WireError as e:
        raise ModelWireError(str(e)) from None
    if not isinstance(d, dict):
        raise ModelWireError(f"{what} is not a JSON object")
    if d.get("schema") != SCHEMA:
        raise ModelWireError(f"{what} has schema {str(d.get('schema'))[:20]!r}; this side reads {SCHEMA}")
    return d


def _text(d: dict[str, Any], key: str, what: str, empty: bool = False) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not wire.valid_label(v) or (not empty and not v):
        raise ModelWireError(f"{what}.{key} must be a {'' if empty else 'non-empty '}text of at most 256 characters "
                             "without control characters")
    return v


def _int(d: dict[str, Any], key: str, what: str, lo: int, hi: int) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ModelWireError(f"{what}.{key} must be an integer in [{lo}, {hi}]")
    return v


def _number(d: dict[str, Any], key: str, what: str) -> float:
    v = d.get(key, 0.0)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or abs(v) > 1e12:
        raise ModelWireError(f"{what}.{key} must be a finite number (a Unix time)")
    return float(v)


def _hex64(v: Any, what: str) -> str:
    if not isinstance(v, str) or not _HEX64.match(v):
        raise ModelWireError(f"{what} must be 64 lowercase hex digits")
    return v


def _dumps(d: dict[str, Any]) -> bytes:
    return json.dumps(d, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


# --- desired ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Desired:
    name: str
    version: str
    package_sha256: str
    size: int
    chunk_bytes: int
    chunk_sha256: tuple[str, ...]
    key_id: str
    rollout: str
    mode: str = "update"
    issued_at: float = 0.0

    @property
    def chunks(self) -> int:
        return len(self.chunk_sha256)

    def chunk_range(self, index: int) -> tuple[int, int]:
        """Byte offsets [start, end) of chunk `index` in the package."""
        start = index * self.chunk_bytes
        return start, min(start + self.chunk_bytes, self.size)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "name": self.name, "version": self.version, "package_sha256": self.package_sha256,
                "size": self.size, "chunk_bytes": self.chunk_bytes, "chunk_sha256": list(self.chunk_sha256),
                "key_id": self.key_id, "rollout": self.rollout, "mode": self.mode, "issued_at": self.issued_at}


def chunk_count(size: int, chunk_bytes: int) -> int:
    return max(1, -(-size // chunk_bytes))


def desired_for(
    package: bytes, name: str, version: str, key_id: str, rollout: str, mode: str = "update",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES, issued_at: float | None = None,
) -> Desired:
    """The desired message for `package`, its chunk hashes computed; validated as a decoder would."""
    hashes = tuple(hashlib.sha256(package[i : i + chunk_bytes]).hexdigest()
                   for i in range(0, max(len(package), 1), chunk_bytes))
    d = Desired(name, version, hashlib.sha256(package).hexdigest(), len(package), chunk_bytes, hashes, key_id,
                rollout, mode, time.time() if issued_at is None else issued_at)
    return decode_desired(encode_desired(d)) or d


def encode_desired(d: Desired) -> bytes:
    return _dumps(d.to_dict())


def decode_desired(payload: bytes) -> Desired | None:
    """None for an empty payload: the retained desired message was cleared."""
    if not payload:
        return None
    d = _json(payload, MAX_DESIRED_BYTES, "desired")
    w = "desired"
    size = _int(d, "size", w, 1, MAX_PACKAGE_BYTES)
    chunk_bytes = _int(d, "chunk_bytes", w, 1, MAX_CHUNK_BYTES)
    hashes = d.get("chunk_sha256")
    if not isinstance(hashes, list) or not 1 <= len(hashes) <= MAX_CHUNKS:
        raise ModelWireError(f"desired.chunk_sha256 must be a list of 1 to {MAX_CHUNKS} hashes")
    if len(hashes) != chunk_count(size, chunk_bytes):
        raise ModelWireError(f"desired.chunk_sha256 has {len(hashes)} hashes; {size} bytes in chunks of "
                             f"{chunk_bytes} make {chunk_count(size, chunk_bytes)}")
    key_id = d.get("key_id")
    if not isinstance(key_id, str) or not _HEX16.match(key_id):
        raise ModelWireError("desired.key_id must be 16 lowercase hex digits")
    mode = d.get("mode", "update")
    if mode not in MODES:
        raise ModelWireError(f"desired.mode must be one of {', '.join(MODES)}")
    return Desired(
        name=_text(d, "name", w), version=_text(d, "version", w),
        package_sha256=_hex64(d.get("package_sha256"), "desired.package_sha256"), size=size,
        chunk_bytes=chunk_bytes, chunk_sha256=tuple(_hex64(h, "desired.chunk_sha256[]") for h in hashes),
        key_id=key_id, rollout=_text(d, "rollout", w, empty=True), mode=mode,
        issued_at=_number(d, "issued_at", w),
    )


# --- chunk requests ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GetRequest:
    package_sha256: str
    first: int
    count: int


def encode_get(g: GetRequest) -> bytes:
    return _dumps({"schema": SCHEMA, "package_sha256": g.package_sha256, "first": g.first, "count": g.count})


def decode_get(payload: bytes) -> GetRequest:
    d = _json(payload, MAX_GET_BYTES, "get")
    return GetRequest(_hex64(d.get("package_sha256"), "get.package_sha256"),
                      _int(d, "first", "get", 0, MAX_CHUNKS - 1), _int(d, "count", "get", 1, MAX_GET_COUNT))


# --- chunks ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Chunk:
    package_sha256: str
    index: int
    total: int
    data: bytes


def chunk_of(package: bytes, package_sha256: str, index: int, chunk_bytes: int) -> Chunk:
    total = chunk_count(len(package), chunk_bytes)
    if not 0 <= index < total:
        raise ModelWireError(f"chunk {index} is outside the package's {total} chunks")
    return Chunk(package_sha256, index, total, package[index * chunk_bytes : (index + 1) * chunk_bytes])


def encode_chunk(c: Chunk) -> bytes:
    if not 1 <= len(c.data) <= MAX_CHUNK_BYTES:
        raise ModelWireError(f"chunk data of {len(c.data)} bytes; 1 to {MAX_CHUNK_BYTES} allowed")
    return _CHUNK_HEAD.pack(CHUNK_MAGIC, CHUNK_VERSION, bytes.fromhex(_hex64(c.package_sha256, "chunk.package_sha256")),
                            c.index, c.total) + c.data


def decode_chunk(payload: bytes) -> Chunk:
    if len(payload) <= CHUNK_HEADER_BYTES:
        raise ModelWireError(f"chunk of {len(payload)} bytes is shorter than its header and one byte of data")
    if len(payload) > CHUNK_HEADER_BYTES + MAX_CHUNK_BYTES:
        raise ModelWireError(f"chunk of {len(payload)} bytes is over the limit of "
                             f"{CHUNK_HEADER_BYTES + MAX_CHUNK_BYTES}")
    magic, version, sha, index, total = _CHUNK_HEAD.unpack_from(payload)
    if magic != CHUNK_MAGIC:
        raise ModelWireError("chunk has a bad magic")
    if version != CHUNK_VERSION:
        raise ModelWireError(f"chunk version {version}; this side reads {CHUNK_VERSION}")
    if not 1 <= total <= MAX_CHUNKS or index >= total:
        raise ModelWireError(f"chunk {index} of {total}: need 0 <= index < total <= {MAX_CHUNKS}")
    return Chunk(sha.hex(), index, total, bytes(payload[CHUNK_HEADER_BYTES:]))


# --- status ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelStatus:
    state: str
    seq: int
    ts: float
    target: dict[str, str] | None = None
    active: dict[str, str] | None = None
    previous: dict[str, str] | None = None
    healthy: bool | None = None
    reason: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "state": self.state, "seq": self.seq, "ts": self.ts, "target": self.target,
                "active": self.active, "previous": self.previous, "healthy": self.healthy,
                "reason": self.reason[:MAX_REASON_CHARS], "figures": self.figures, "progress": self.progress}


_TARGET_KEYS = ("name", "version", "package_sha256", "rollout")
_MODEL_KEYS = ("name", "version", "sha256")


def _model_ref(v: Any, what: str, keys: tuple[str, ...]) -> dict[str, str] | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise ModelWireError(f"{what} must be an object or null")
    out: dict[str, str] = {}
    for k in keys:
        if k.endswith("sha256"):
            out[k] = _hex64(v.get(k), f"{what}.{k}")
        else:
            out[k] = _text(v, k, what, empty=(k == "rollout"))
    return out


def _flat(v: Any, what: str) -> dict[str, Any]:
    if not isinstance(v, dict) or len(v) > MAX_FIGURES:
        raise ModelWireError(f"{what} must be an object of at most {MAX_FIGURES} entries")
    for k, x in v.items():
        if not _FIGURE_KEY.match(k):
            raise ModelWireError(f"{what} key {k[:40]!r} must be 1-64 of A-Z a-z 0-9 _ . : -")
        if isinstance(x, float) and not math.isfinite(x):
            raise ModelWireError(f"{what}.{k} is not finite")
        if not (x is None or isinstance(x, bool | int | float) or (isinstance(x, str) and wire.valid_label(x))):
            raise ModelWireError(f"{what}.{k} must be a number, a boolean, null or a short text")
    return dict(v)


def encode_status(s: ModelStatus) -> bytes:
    return _dumps(s.to_dict())


def decode_status(payload: bytes) -> ModelStatus:
    d = _json(payload, MAX_MODEL_STATUS_BYTES, "model status")
    w = "model status"
    state = d.get("state")
    if state not in STATES:
        raise ModelWireError(f"model status.state must be one of {', '.join(STATES)}")
    healthy = d.get("healthy")
    if healthy is not None and not isinstance(healthy, bool):
        raise ModelWireError("model status.healthy must be true, false or null")
    reason = d.get("reason", "")
    if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS or not wire.valid_label(reason[:256]) \
            or not wire.valid_label(reason[256:]):
        raise ModelWireError(f"model status.reason must be a text of at most {MAX_REASON_CHARS} characters without "
                             "control characters")
    return ModelStatus(
        state=state, seq=_int(d, "seq", w, 0, wire.INT64_MAX), ts=_number(d, "ts", w),
        target=_model_ref(d.get("target"), "model status.target", _TARGET_KEYS),
        active=_model_ref(d.get("active"), "model status.active", _MODEL_KEYS),
        previous=_model_ref(d.get("previous"), "model status.previous", _MODEL_KEYS),
        healthy=healthy, reason=reason, figures=_flat(d.get("figures", {}), "model status.figures"),
        progress=_flat(d.get("progress", {}), "model status.progress"),
    )
