"""The wire format: lossless round trips, and a clear WireError (never a crash) for anything malformed."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import wire


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
