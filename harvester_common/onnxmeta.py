"""The `metadata_props` of an ONNX model, read straight from its protobuf bytes: what the cloud's `model sign` and
`publish` need (the model's contract) without onnx or onnxruntime, which the cloud does not install.

An ONNX file is a serialized `ModelProto`. Protobuf's encoding is a sequence of fields, each a varint key
`field_number << 3 | wire_type` then its value: wire type 0 a varint, 1 eight bytes, 2 a varint length then that
many bytes, 5 four bytes (3 and 4, groups, are not used by ONNX and are refused). `metadata_props` is field 14 of
ModelProto, repeated, each a length-delimited `StringStringEntryProto` whose field 1 is the key and field 2 the
value (UTF-8 strings). Every other field, the graph included, is skipped by its length without being read.

Bounded: at most MAX_MODEL_BYTES of input, MAX_FIELDS top-level fields, MAX_ENTRIES metadata entries; no
recursion. Anything malformed raises modelpkg.PackageError with code `bad_model` and the reason, never anything
else (tests/test_modelpkg.py fuzzes it). A key that appears twice is refused too: onnxruntime keeps the last one,
another reader might keep the first, and the cloud must read what the vehicle reads.
"""

from __future__ import annotations

from typing import Any

from harvester_common import wire
from harvester_common.modelpkg import MAX_PACKAGE_BYTES, PackageError

CONTRACT_KEY = "harvester.contract"  # the key agent/contract.py reads (docs/models.md)
METADATA_FIELD = 14
MAX_MODEL_BYTES = MAX_PACKAGE_BYTES
MAX_FIELDS = 100_000  # a model has a dozen top-level fields and a few hundred functions at most
MAX_ENTRIES = 1024


def _bad(why: str) -> PackageError:
    return PackageError("bad_model", f"not an ONNX model: {why}")


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(pos, min(pos + 10, end)):
        b = data[i]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            if value >= 1 << 64:
                raise _bad(f"varint at byte {pos} is larger than 64 bits")
            return value, i + 1
        shift += 7
    raise _bad(f"varint at byte {pos} does not end" + (" (truncated)" if pos + 10 > end else ""))


def _fields(data: bytes, start: int, end: int, limit: int) -> list[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end) of each field in data[start:end]. A varint's value
    is in the "start" slot for wire type 0."""
    out: list[tuple[int, int, int, int]] = []
    pos = start
    while pos < end:
        if len(out) >= limit:
            raise _bad(f"more than {limit} fields")
        key, pos = _varint(data, pos, end)
        number, wt = key >> 3, key & 7
        if number == 0:
            raise _bad(f"field number 0 at byte {pos}")
        if wt == 0:
            value, pos = _varint(data, pos, end)
            out.append((number, wt, value, pos))
            continue
        if wt == 1:
            length = 8
        elif wt == 5:
            length = 4
        elif wt == 2:
            length, pos = _varint(data, pos, end)
        else:
            raise _bad(f"wire type {wt} (field {number}) at byte {pos}")
        if pos + length > end:
            raise _bad(f"field {number} runs past the end (truncated)")
        out.append((number, wt, pos, pos + length))
        pos += length
    return out


def _text(data: bytes, start: int, end: int, what: str) -> str:
    try:
        return bytes(data[start:end]).decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(f"metadata {what} is not UTF-8") from None


def read_metadata(data: bytes) -> dict[str, str]:
    """The model's `metadata_props` as a dict. PackageError(bad_model) for bytes that are not a model's protobuf
    (empty bytes are a model with no fields at all: no metadata)."""
    if len(data) > MAX_MODEL_BYTES:
        raise PackageError("bad_model", f"{len(data)} bytes, more than the {MAX_MODEL_BYTES} a model may have")
    out: dict[str, str] = {}
    for number, wt, start, end in _fields(data, 0, len(data), MAX_FIELDS):
        if number != METADATA_FIELD:
            continue
        if wt != 2:
            raise _bad(f"metadata_props with wire type {wt}")
        key = value = ""
        for n2, wt2, s2, e2 in _fields(data, start, end, MAX_FIELDS):
            if n2 in (1, 2):
                if wt2 != 2:
                    raise _bad(f"a metadata {'key' if n2 == 1 else 'value'} with wire type {wt2}")
                if n2 == 1:
                    key = _text(data, s2, e2, "key")
                else:
                    value = _text(data, s2, e2, "value")
        if key in out:
            raise _bad(f"metadata key {key[:80]!r} appears twice")
        if len(out) >= MAX_ENTRIES:
            raise _bad(f"more than {MAX_ENTRIES} metadata entries")
        out[key] = value
    return out


def read_contract(data: bytes) -> dict[str, Any]:
    """The model's contract (the JSON object under CONTRACT_KEY), with `model.name` and `model.version` as
    non-empty labels. PackageError(bad_model) when the model has none, or one that is not such an object. The
    rest of the contract is the vehicle's to judge (agent/contract.py)."""
    meta = read_metadata(data)
    raw = meta.get(CONTRACT_KEY)
    if raw is None:
        raise PackageError("bad_model", f"the model has no {CONTRACT_KEY!r} metadata: not a harvester model")
    try:
        contract = wire.loads_json(raw, "the model's contract")
    except wire.WireError as e:
        raise PackageError("bad_model", str(e)) from None
    model = contract.get("model") if isinstance(contract, dict) else None
    if not isinstance(contract, dict) or not isinstance(model, dict):
        raise PackageError("bad_model", "the model's contract is not a JSON object with a \"model\" object")
    for k in ("name", "version"):
        v = model.get(k)
        if not isinstance(v, str) or not v or not wire.valid_label(v):
            raise PackageError("bad_model", f"the model's contract has no usable model.{k} (non-empty text of at "
                                            "most 256 characters without control characters)")
    return contract
