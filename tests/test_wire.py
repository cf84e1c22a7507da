"""The wire format: lossless round trips, and a clear WireError (never a crash) for anything malformed."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harvester_common import wire


def _cols(n: int, seed: int = 0) -> wire.SampleColumns:
    rng = np.random.default_rng(seed)
    return wire.SampleColumns(
        [("EEC1.EngSpeed", "can0/00", "rpm"), ("ET1.EngCoolantTemp", "can0/00", "degC")],
        rng.integers(0, 2, n).astype(np.uint16),
        np.sort(rng.integers(1_700_000_000_000_000, 1_700_000_100_000_000, n)).astype(np.int64),
        rng.normal(1500, 300, n),
    )


def _batch(n: int = 100) -> wire.Batch:
    return wire.Batch(
        "demo", "v1", 42,
        [wire.Segment("samples", 10, 9 + n, columns=_cols(n)),
         wire.Segment("alert", 10 + n, 10 + n, record={"alert_id": "a", "score": 0.9})],
        sent_at=123.5,
    )


@pytest.mark.parametrize("compress", [True, False])
def test_round_trip_is_lossless(compress: bool) -> None:
    b = _batch(1000)
    out = wire.decode_batch(wire.encode_batch(b, compress=compress))
    assert (out.fleet, out.vehicle, out.batch, out.seq_lo, out.seq_hi) == ("demo", "v1", 42, 10, 1010)
    c_in, c_out = b.segments[0].columns, out.segments[0].columns
    assert c_in is not None and c_out is not None
    assert c_out.signals == c_in.signals
    np.testing.assert_array_equal(c_out.sig, c_in.sig)
    np.testing.assert_array_equal(c_out.ts_us, c_in.ts_us)
    np.testing.assert_array_equal(c_out.value, c_in.value)  # bit-exact, not approximately
    assert out.segments[1].record == {"alert_id": "a", "score": 0.9}


def test_compression_pays_for_itself_on_periodic_signals() -> None:
    n = 20_000
    t = np.arange(n, dtype=np.int64) * 20_000 + 1_700_000_000_000_000
    v = np.round(1500 + 50 * np.sin(np.arange(n) / 200)) / 8 * 8  # rpm at 0.125 resolution
    cols = wire.SampleColumns([("EEC1.EngSpeed", "can0/00", "rpm")], np.zeros(n, np.uint16), t, v)
    msg = wire.encode_batch(wire.Batch("f", "v", 1, [wire.Segment("samples", 1, n, columns=cols)]))
    assert len(msg) < n * 18 / 4


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "too short"),
        (b"XX\x01\x01abc", "bad magic"),
        (b"HV\x09\x01abc", "unsupported wire version"),
        (b"HV\x01\x07abc", "unknown codec"),
        (b"HV\x01\x01not zstd at all", "corrupt zstd"),
        (b"HV\x01\x00\x05\x00\x00\x00{}", "header length"),
        (b"HV\x01\x00\x02\x00\x00\x00[]", "not an object"),
    ],
)
def test_malformed_messages_say_why(payload: bytes, reason: str) -> None:
    with pytest.raises(wire.WireError, match=reason):
        wire.decode_batch(payload)


def test_truncated_message_is_rejected() -> None:
    msg = wire.encode_batch(_batch(500), compress=False)
    for cut in (len(msg) - 1, len(msg) // 2, 20):
        with pytest.raises(wire.WireError):
            wire.decode_batch(msg[:cut])


def test_decompression_bomb_is_capped() -> None:
    import zstandard

    body = zstandard.ZstdCompressor().compress(b"\0" * (8 * 1024 * 1024))
    with pytest.raises(wire.WireError, match="inflates past"):
        wire.decode_batch(b"HV\x01\x01" + body, max_bytes=1024 * 1024)


def test_sequence_range_must_match_segments() -> None:
    b = _batch(10)
    raw = wire.encode_batch(b, compress=False)
    tampered = raw.replace(b'"seq_hi":20', b'"seq_hi":99', 1)
    with pytest.raises(wire.WireError, match="sequence range"):
        wire.decode_batch(tampered)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    for payload in (data, b"HV\x01\x00" + data, b"HV\x01\x01" + data):
        with contextlib.suppress(wire.WireError):
            wire.decode_batch(payload)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=60), st.integers(min_value=4, max_value=2000))
def test_corrupted_valid_messages_never_crash(noise: bytes, pos: int) -> None:
    raw = bytearray(wire.encode_batch(_batch(50), compress=False))
    p = pos % len(raw)
    raw[p : p + len(noise)] = noise
    with contextlib.suppress(wire.WireError):
        wire.decode_batch(bytes(raw))


def test_ack_round_trip_and_validation() -> None:
    a = wire.Ack("v1", 7, [(1, 10), (12, 12)])
    assert wire.decode_ack(wire.encode_ack(a)) == a
    for bad in (b"{}", b"nope", b'{"schema":1,"vehicle":"v","batch":1,"ranges":[[5,2]]}',
                b'{"schema":1,"vehicle":"v","batch":1,"ranges":[],"status":"maybe"}'):
        with pytest.raises(wire.WireError):
            wire.decode_ack(bad)


def test_topics() -> None:
    t = wire.vehicle_topic("f1", "v9", "telemetry")
    assert t == "fleet/f1/vehicle/v9/telemetry"
    assert wire.parse_vehicle_topic(t) == ("f1", "v9", "telemetry")
    assert wire.parse_vehicle_topic("fleet/f1/car/v9/x") is None


# --- Poison: content that once escaped the decoder or passed it and failed at the database. ---


def _raw(header: dict[str, object], blob: bytes = b"", old: bytes = b"", new: bytes = b"") -> bytes:
    """An uncompressed message with `header`; `old` → `new` in its JSON text (for what json.dumps cannot write)."""
    import json
    import struct

    hj = json.dumps(header).encode()
    if old:
        assert old in hj
        hj = hj.replace(old, new, 1)
    return b"HV\x01\x00" + struct.pack("<I", len(hj)) + hj + blob


def _header(**changes: object) -> dict[str, object]:
    h: dict[str, object] = {"schema": 1, "fleet": "f", "vehicle": "v", "batch": 1, "seq_lo": 5, "seq_hi": 5,
                            "segments": [{"kind": "alert", "seq_lo": 5, "seq_hi": 5, "record": {"a": 1}}]}
    h.update(changes)
    return h


def _seg_header(**seg: object) -> dict[str, object]:
    s: dict[str, object] = {"kind": "alert", "seq_lo": 5, "seq_hi": 5, "record": {"a": 1}}
    s.update(seg)
    lo, hi = s["seq_lo"], s["seq_hi"]
    return _header(seq_lo=lo, seq_hi=hi, segments=[s])


def _samples_raw(n: int, t0: int, deltas: np.ndarray, values: np.ndarray, lo: int = 1) -> bytes:
    blob = (np.zeros(n, "<u2").tobytes() + wire._shuffle(deltas.astype("<i8")) +
            wire._shuffle(values.astype("<f8").view("<u8") ^ np.concatenate([np.zeros(1, "<u8"),
                                                                              values.astype("<f8").view("<u8")[:-1]])))
    # the sig column is all zeros, so its shuffled and plain forms agree
    seg = {"kind": "samples", "seq_lo": lo, "seq_hi": lo + n - 1, "n": n, "t0_us": t0,
           "signals": [["A.b", "can0/00", "u"]], "offset": 0, "length": len(blob)}
    return _raw(_header(seq_lo=lo, seq_hi=lo + n - 1, segments=[seg]), blob)


POISON = {
    "deep nesting (RecursionError in json.loads)": b"HV\x01\x00" + (20_002).to_bytes(4, "little")
    + b"[" * 5000 + b"]" * 5000 + b" " * 10_002,
    "deep nesting, short": _raw(_header(extra=eval("[" * 36 + "1" + "]" * 36))),
    "seq_lo 2**64": _raw(_seg_header(seq_lo=2**64, seq_hi=2**64)),
    "seq_hi 2**63": _raw(_seg_header(seq_lo=5, seq_hi=2**63)),
    "seq 0": _raw(_seg_header(seq_lo=0, seq_hi=0)),
    "batch 2**64": _raw(_header(batch=2**64)),
    "batch negative": _raw(_header(batch=-1)),
    "batch true": _raw(_header(batch=True)),
    "record int 2**70": _raw(_seg_header(record={"ts": 2**70})),
    "record int 10**400": _raw(_header(), old=b'{"a": 1}', new=b'{"ts": 1' + b"0" * 400 + b"}"),
    "record NaN": _raw(_header(), old=b'{"a": 1}', new=b'{"score": NaN}'),
    "record too big": _raw(_seg_header(record={"x": "y" * (wire.MAX_RECORD_BYTES + 1)})),
    "unknown kind": _raw(_seg_header(kind="bogus")),
    "sent_at 10**400": _raw(_header(), old=b'"batch": 1', new=b'"batch": 1, "sent_at": 1' + b"0" * 400),
    "n huge": _raw(_seg_header(kind="samples", n=2**70, t0_us=0, signals=[], offset=0, length=0, seq_hi=5)),
    "offset 2**64": _raw(_seg_header(kind="samples", n=1, t0_us=0, signals=[["a", "b", "c"]], offset=2**64,
                                     length=18)),
    "t0_us 2**63": _samples_raw(1, 2**63 - 1, np.zeros(1, np.int64), np.zeros(1)),
    "timestamp deltas overflow int64": _samples_raw(3, 0, np.array([2**62, 2**62, 2**62]), np.zeros(3)),
    "NaN sample": _samples_raw(2, 0, np.zeros(2, np.int64), np.array([1.0, np.nan])),
    "lone surrogate": _raw(_header(), old=b'"f"', new=b'"\\ud800"'),
}


@pytest.mark.parametrize("name", sorted(POISON))
def test_poison_is_a_wire_error_with_a_reason(name: str) -> None:
    with pytest.raises(wire.WireError) as e:
        wire.decode_batch(POISON[name])
    assert str(e.value)


def test_good_samples_still_decode_with_the_poison_helpers() -> None:
    b = wire.decode_batch(_samples_raw(3, 1_700_000_000_000_000, np.array([0, 10, 10]), np.array([1.0, 2.0, 3.0])))
    assert b.segments[0].columns is not None and b.segments[0].columns.value.tolist() == [1.0, 2.0, 3.0]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["schema", "fleet", "vehicle", "batch", "seq_lo", "seq_hi", "sent_at", "extra", "segments",
                        "kind", "n", "t0_us", "signals", "offset", "length", "record"]), _json)
def test_any_value_in_any_header_field_is_decoded_or_a_wire_error(key: str, value: object) -> None:
    """Only WireError, whatever a field holds; and what does decode stays within the limits."""
    import json

    raw = bytearray(wire.encode_batch(_batch(20), compress=False))
    hlen = int.from_bytes(raw[4:8], "little")
    header = json.loads(raw[8 : 8 + hlen])
    if key in ("kind", "n", "t0_us", "signals", "offset", "length"):
        header["segments"][0][key] = value
    elif key == "record":
        header["segments"][1][key] = value
    else:
        header[key] = value
    try:
        b = wire.decode_batch(_raw(header, bytes(raw[8 + hlen :])))
    except wire.WireError:
        return
    assert 0 <= b.batch <= wire.MAX_BATCH_ID
    assert all(1 <= s.seq_lo <= s.seq_hi <= wire.MAX_SEQ for s in b.segments)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.integers(min_value=0, max_value=10_000), st.sampled_from([True, False]))
def test_mutated_messages_raise_only_wire_error(noise: bytes, pos: int, compress: bool) -> None:
    raw = bytearray(wire.encode_batch(_batch(30), compress=compress))
    p = pos % len(raw)
    raw[p : p + len(noise)] = noise
    with contextlib.suppress(wire.WireError):
        wire.decode_batch(bytes(raw))
    peek = wire.peek_batch_id(bytes(raw))  # what the receiver reads from a refused message: never raises
    assert peek is None or 0 <= peek[0] <= wire.MAX_BATCH_ID
