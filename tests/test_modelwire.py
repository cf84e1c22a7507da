"""The model topics' messages: round trips, and every decoder refusing hostile bytes with ModelWireError only."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harvester_common import modelwire as mw
from harvester_common import wire

PKG = os.urandom(150_000)
SHA = hashlib.sha256(PKG).hexdigest()


def _desired(**over: object) -> dict[str, object]:
    d = mw.desired_for(PKG, "harvester-anomaly", "1.1.0", "0123456789abcdef", "7", chunk_bytes=65536).to_dict()
    d.update(over)
    return d


def test_desired_round_trip_and_chunks_cover_the_package() -> None:
    d = mw.desired_for(PKG, "harvester-anomaly", "1.1.0", "0123456789abcdef", "7", chunk_bytes=65536)
    assert d.chunks == 3 and d.package_sha256 == SHA and d.size == len(PKG)
    assert mw.decode_desired(mw.encode_desired(d)) == d
    parts = [mw.decode_chunk(mw.encode_chunk(mw.chunk_of(PKG, SHA, i, d.chunk_bytes))) for i in range(d.chunks)]
    assert b"".join(p.data for p in parts) == PKG
    for i, p in enumerate(parts):
        assert (p.index, p.total, p.package_sha256) == (i, 3, SHA)
        assert hashlib.sha256(p.data).hexdigest() == d.chunk_sha256[i]
        lo, hi = d.chunk_range(i)
        assert PKG[lo:hi] == p.data
    assert mw.decode_desired(b"") is None  # a cleared retained message


@pytest.mark.parametrize("over, why", [
    ({"schema": 2}, "schema"),
    ({"size": 0}, "size"),
    ({"size": 2**40}, "size"),
    ({"chunk_bytes": mw.MAX_CHUNK_BYTES + 1}, "chunk_bytes"),
    ({"chunk_sha256": []}, "chunk_sha256"),
    ({"chunk_sha256": ["00" * 32]}, "has 1 hashes"),  # too few for the size
    ({"chunk_sha256": ["zz" * 32] * 3}, "hex"),
    ({"package_sha256": "ABC"}, "package_sha256"),
    ({"key_id": "not-hex"}, "key_id"),
    ({"name": ""}, "name"),
    ({"name": "a\x1bb"}, "name"),
    ({"version": 3}, "version"),
    ({"mode": "yolo"}, "mode"),
    ({"issued_at": "now"}, "issued_at"),
])
def test_desired_refusals_say_why(over: dict[str, object], why: str) -> None:
    with pytest.raises(mw.ModelWireError, match=why):
        mw.decode_desired(json.dumps(_desired(**over)).encode())


def test_oversized_and_deep_messages_are_refused_before_parsing() -> None:
    with pytest.raises(mw.ModelWireError, match="over the limit"):
        mw.decode_desired(b" " * (mw.MAX_DESIRED_BYTES + 1))
    with pytest.raises(mw.ModelWireError, match="nests too deeply"):
        mw.decode_status(b"[" * 5000 + b"]" * 5000)
    with pytest.raises(mw.ModelWireError, match="not a JSON object"):
        mw.decode_get(b"[1, 2]")
    with pytest.raises(mw.ModelWireError, match="over the limit"):
        mw.decode_chunk(b"x" * (mw.CHUNK_HEADER_BYTES + mw.MAX_CHUNK_BYTES + 1))


def test_get_bounds() -> None:
    g = mw.GetRequest(SHA, 2, mw.MAX_GET_COUNT)
    assert mw.decode_get(mw.encode_get(g)) == g
    for first, count in ((-1, 1), (0, 0), (0, mw.MAX_GET_COUNT + 1), (mw.MAX_CHUNKS, 1)):
        with pytest.raises(mw.ModelWireError):
            mw.decode_get(mw.encode_get(mw.GetRequest(SHA, first, count)))


def test_chunk_header_checks() -> None:
    good = mw.encode_chunk(mw.chunk_of(PKG, SHA, 1, 65536))
    assert len(good) == mw.CHUNK_HEADER_BYTES + 65536
    with pytest.raises(mw.ModelWireError, match="magic"):
        mw.decode_chunk(b"XXXX" + good[4:])
    with pytest.raises(mw.ModelWireError, match="version"):
        mw.decode_chunk(good[:4] + b"\x02" + good[5:])
    bad_index = good[:37] + struct.pack("<II", 3, 3) + good[45:]
    with pytest.raises(mw.ModelWireError, match="index < total"):
        mw.decode_chunk(bad_index)
    with pytest.raises(mw.ModelWireError, match="shorter"):
        mw.decode_chunk(good[: mw.CHUNK_HEADER_BYTES])
    with pytest.raises(mw.ModelWireError, match="outside"):
        mw.chunk_of(PKG, SHA, 3, 65536)


def test_status_round_trip_and_refusals() -> None:
    s = mw.ModelStatus("active", 12, 1764000000.0,
                       target={"name": "m", "version": "2", "package_sha256": SHA, "rollout": "4"},
                       active={"name": "m", "version": "2", "sha256": SHA}, previous=None, healthy=True,
                       reason="", figures={"windows": 120, "alert_rate": 0.0, "note": "ok", "ok": True},
                       progress={"chunks_have": 3, "chunks": 3})
    assert mw.decode_status(mw.encode_status(s)) == s
    base = s.to_dict()
    cases: list[tuple[dict[str, object], str]] = [
                      ({"state": "exploded"}, "state"), ({"seq": -1}, "seq"), ({"seq": 2**63}, "64 bits"),
                      ({"healthy": "yes"}, "healthy"), ({"reason": "x" * 501}, "reason"),
                      ({"reason": "a\nb"}, "reason"), ({"figures": {"a b": 1}}, "key"),
                      ({"figures": {"x": [1]}}, "number"), ({"figures": {str(i): i for i in range(65)}}, "entries"),
                      ({"target": {"name": "m"}}, "target"), ({"active": []}, "active")]
    for over, why in cases:
        with pytest.raises(mw.ModelWireError, match=why):
            mw.decode_status(json.dumps(base | over).encode())
    with pytest.raises(mw.ModelWireError, match="NaN"):
        mw.decode_status(b'{"schema": 1, "state": "active", "seq": 1, "ts": NaN}')


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_decoders_raise_only_their_error_on_random_bytes(b: bytes) -> None:
    for dec in (mw.decode_desired, mw.decode_get, mw.decode_chunk, mw.decode_status):
        with contextlib.suppress(mw.ModelWireError):
            dec(b)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["schema", "state", "seq", "ts", "target", "active", "figures", "size",
                                        "chunk_bytes", "chunk_sha256", "name", "version", "package_sha256",
                                        "key_id", "first", "count", "mode", "rollout", "reason", "healthy"]),
                       _json_values, max_size=12))
def test_decoders_on_json_objects_with_the_right_keys_and_wrong_values(d: dict[str, object]) -> None:
    payload = json.dumps(d | {"schema": 1}).encode()
    for dec in (mw.decode_desired, mw.decode_get, mw.decode_status):
        with contextlib.suppress(mw.ModelWireError):
            dec(payload)


def test_model_wire_error_is_a_wire_error() -> None:
    # The receiver's one `except wire.WireError` covers the model topics too.
    assert issubclass(mw.ModelWireError, wire.WireError)
