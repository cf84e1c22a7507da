"""The wire format: lossless round trips, and a clear WireError (never a crash) for anything malformed."""

from __future__ import annotations

import contextlib
import json
import struct

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
        (b"HV\x01\x03abc", "unknown codec"),
        (b"HV\x01\x02not zstd at all", "corrupt zstd"),
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


@pytest.mark.parametrize("codec", [wire.CODEC_ZSTD, wire.CODEC_ZSTD_D1])
def test_decompression_bomb_is_capped(codec: int) -> None:
    body = wire._compress(b"\0" * (8 * 1024 * 1024), codec)
    with pytest.raises(wire.WireError, match="inflates past"):
        wire.decode_batch(b"HV\x01" + bytes([codec]) + body, max_bytes=1024 * 1024)


@pytest.mark.parametrize("codec", [wire.CODEC_ZSTD, wire.CODEC_ZSTD_D1])
def test_a_frame_that_asks_for_a_window_past_the_body_cap_is_refused(codec: int) -> None:
    """A few bytes declaring a 128 MiB window (zstd's default limit) must not make the receiver reserve it."""
    import zstandard

    fmt = zstandard.FORMAT_ZSTD1_MAGICLESS if codec == wire.CODEC_ZSTD_D1 else zstandard.FORMAT_ZSTD1
    params = zstandard.ZstdCompressionParameters(window_log=27, format=fmt, write_content_size=0)
    co = zstandard.ZstdCompressor(compression_params=params).compressobj()  # streaming: no content size
    frame = co.compress(b"x" * 1000) + co.flush()
    assert zstandard.get_frame_parameters(frame, format=fmt).window_size == 2**27
    with pytest.raises(wire.WireError, match="corrupt zstd"):
        wire.decode_batch(b"HV\x01" + bytes([codec]) + frame)


def test_sequence_range_must_match_segments() -> None:
    b = _batch(10)
    raw = wire.encode_batch(b, compress=False)
    tampered = raw.replace(b'"seq_hi":20', b'"seq_hi":99', 1)
    with pytest.raises(wire.WireError, match="sequence range"):
        wire.decode_batch(tampered)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    for payload in (data, b"HV\x01\x00" + data, b"HV\x01\x01" + data, b"HV\x01\x02" + data):
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


POISON["header length 2**32-1"] = b"HV\x01\x00" + b"\xff\xff\xff\xff" + b"{}"


@pytest.mark.parametrize("codec", [wire.CODEC_NONE, wire.CODEC_ZSTD, wire.CODEC_ZSTD_D1])
@pytest.mark.parametrize("name", sorted(POISON))
def test_poison_is_a_wire_error_with_a_reason(name: str, codec: int) -> None:
    """The same poisoned body under every codec: what the body checks refuse does not depend on how it came."""
    body = POISON[name][4:]
    with pytest.raises(wire.WireError) as e:
        wire.decode_batch(b"HV\x01" + bytes([codec]) + wire._compress(body, codec))
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
                        "kind", "n", "t0_us", "signals", "offset", "length", "record", "enc"]), _json)
def test_any_value_in_any_header_field_is_decoded_or_a_wire_error(key: str, value: object) -> None:
    """Only WireError, whatever a field holds; and what does decode stays within the limits."""
    import json

    raw = bytearray(wire.encode_batch(_batch(20), compress=False))
    hlen = int.from_bytes(raw[4:8], "little")
    header = json.loads(raw[8 : 8 + hlen])
    if key in ("kind", "n", "t0_us", "signals", "offset", "length", "enc"):
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
@given(st.binary(max_size=64), st.integers(min_value=0, max_value=10_000),
       st.sampled_from([wire.CODEC_NONE, wire.CODEC_ZSTD, wire.CODEC_ZSTD_D1]))
def test_mutated_messages_raise_only_wire_error(noise: bytes, pos: int, codec: int) -> None:
    raw = bytearray(wire.encode_batch(_batch(30), compress=codec != wire.CODEC_NONE, codec=codec))
    p = pos % len(raw)
    raw[p : p + len(noise)] = noise
    with contextlib.suppress(wire.WireError):
        wire.decode_batch(bytes(raw))
    peek = wire.peek_batch_id(bytes(raw))  # what the receiver reads from a refused message: never raises
    assert peek is None or 0 <= peek[0] <= wire.MAX_BATCH_ID


# --- ENC_V2: runs of a signal, raw scaled integers where exact, timestamps in a unit (docs/protocol.md). ---


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float64).view(np.uint64)


def _round_trip(cols: wire.SampleColumns, enc: int = wire.ENC_V2) -> tuple[dict[str, object], wire.SampleColumns]:
    """Through a whole message, as the uplink sends it; asserts every column comes back bit for bit."""
    head, blob = wire.encode_columns(cols, enc)
    n = len(cols)
    msg = wire.encode_batch(wire.Batch("f", "v", 1, [wire.Segment("samples", 7, 6 + n, encoded=(head, blob))]))
    out = wire.decode_batch(msg).segments[0].columns
    assert out is not None
    assert out.signals == cols.signals
    np.testing.assert_array_equal(out.sig, cols.sig)
    np.testing.assert_array_equal(out.ts_us, cols.ts_us)
    np.testing.assert_array_equal(_bits(out.value), _bits(cols.value))
    return head, out


def _j1939_like(n: int, seed: int = 0) -> wire.SampleColumns:
    """Three signals as a J1939 decoder makes them (raw * scale + offset), one unhinted integral, one GPS float;
    signal-major, 20 ms and 100 ms periods with 1 ms jitter."""
    rng = np.random.default_rng(seed)
    k = n // 5
    t = 1_700_000_000_000_000 + np.arange(k, dtype=np.int64) * 20_000 + rng.integers(-1, 2, k) * 1000
    rpm = np.cumsum(rng.integers(-40, 41, k)) + 12_000
    temp = rng.integers(100, 110, k)
    return wire.SampleColumns(
        [("EEC1.EngSpeed", "can0/00", "rpm"), ("ET1.EngCoolantTemp", "can0/00", "degC"),
         ("EEC1.ActualEngPercentTorque", "can0/00", "%"), ("vib.Count", "vib", ""), ("GPS.Latitude", "gps", "deg")],
        np.repeat(np.arange(5), k).astype(np.uint16),
        np.tile(t, 5),
        np.concatenate([rpm.astype(np.float64) * 0.125 + 0.0, temp.astype(np.float64) * 1.0 + -40.0,
                        rng.integers(0, 250, k).astype(np.float64) * 1.0 + -125.0,
                        rng.integers(0, 1000, k).astype(np.float64), 28.5 + np.cumsum(rng.normal(0, 1e-5, k))]),
        [(0.125, 0.0), (1.0, -40.0), (1.0, -125.0), None, None],
    )


def test_v2_sends_raw_integers_where_exact_and_float_bits_elsewhere() -> None:
    cols = _j1939_like(5000)
    head, out = _round_trip(cols)
    assert head["enc"] == wire.ENC_V2
    assert head["signals"] == [["EEC1.EngSpeed", "can0/00", "rpm", 0.125, 0], ["ET1.EngCoolantTemp", "can0/00", "degC",
                               1, -40], ["EEC1.ActualEngPercentTorque", "can0/00", "%", 1, -125],
                               ["vib.Count", "vib", "", 1, 0], ["GPS.Latitude", "gps", "deg"]]
    assert out.scales == [(0.125, 0.0), (1.0, -40.0), (1.0, -125.0), (1.0, 0.0), None]
    # smaller than the old layout even on these noisy values (the real traces: test_real_traces_round_trip...)
    v1 = len(wire.encode_batch(wire.Batch("f", "v", 1, [wire.Segment("samples", 1, 5000, encoded=wire.encode_columns(
        cols, wire.ENC_V1))])))
    v2 = len(wire.encode_batch(wire.Batch("f", "v", 1, [wire.Segment("samples", 1, 5000, columns=cols)])))
    assert v2 < v1


def test_v2_a_value_off_its_resolution_sends_that_signal_as_float_bits() -> None:
    cols = _j1939_like(500)
    cols.value[3] += 0.01  # EngSpeed, no longer a multiple of 0.125
    cols.value[350] = 1e17  # vib.Count: integral, but past ±2^53 as a raw integer it is not sent as one
    head, out = _round_trip(cols)
    table = head["signals"]
    assert isinstance(table, list) and len(table[0]) == 3 and len(table[1]) == 5 and len(table[3]) == 3
    assert out.scales[0] is None and out.scales[1] == (1.0, -40.0)


@pytest.mark.parametrize("hint", [(0.0, 0.0), (-1.0, 0.0), (float("nan"), 0.0), (1.0, float("inf")),
                                  (float("inf"), 0.0), (1.0, float("nan"))])
def test_v2_a_bad_hint_is_ignored_never_sent(hint: tuple[float, float]) -> None:
    """A scale that is not finite and positive, or an offset that is not finite, is never used (the receiver would
    refuse it): integral values then go with scale 1 and offset 0."""
    cols = wire.SampleColumns([("A", "", "")], np.zeros(4, np.uint16), np.arange(4, dtype=np.int64),
                              np.array([1.0, 2.0, 3.0, 4.0]), [hint])
    head, _ = _round_trip(cols)
    assert head["signals"] == [["A", "", "", 1, 0]]


def test_v2_a_hint_that_needs_raw_integers_past_the_bound_sends_float_bits() -> None:
    cols = wire.SampleColumns([("A", "", "")], np.zeros(4, np.uint16), np.arange(4, dtype=np.int64),
                              np.array([1.0, 2.0, 3.0, 4.0]), [(1e-300, 0.0)])
    head, _ = _round_trip(cols)
    assert head["signals"] == [["A", "", ""]]


EXTREMES = [
    np.array([-0.0, 0.0, -0.0, -0.0]),  # negative zero: integral in value, not in bits
    np.array([np.finfo(np.float64).max, -np.finfo(np.float64).max, 1.0, -1.0]),
    np.array([5e-324, -5e-324, np.finfo(np.float64).tiny, 0.0]),  # subnormals
    np.array([2.0**53, -(2.0**53), 2.0**53 - 1, 0.0]),  # the raw integer bound itself
    np.array([2.0**53 + 2, 1.0, 2.0, 3.0]),  # integral, but past the bound
    np.array([0.1, 0.2, 0.30000000000000004, 0.3]),
]


@pytest.mark.parametrize("values", EXTREMES, ids=["negzero", "max", "subnormal", "bound", "past_bound", "tenths"])
@pytest.mark.parametrize("hint", [None, (0.1, 0.0), (1.0, 0.0), (0.5, -0.0)])
def test_v2_extreme_values_round_trip_bit_for_bit(values: np.ndarray, hint: tuple[float, float] | None) -> None:
    n = len(values)
    cols = wire.SampleColumns([("A", "", ""), ("B", "x", "u")], np.array([0, 0, 1, 1], np.uint16)[:n],
                              np.array([0, 10, 0, 2**62], np.int64)[:n], values, [hint, hint])
    _round_trip(cols)


def test_v2_negative_zero_is_never_sent_as_integer_zero() -> None:
    cols = wire.SampleColumns([("A", "", "")], np.zeros(3, np.uint16), np.arange(3, dtype=np.int64),
                              np.array([1.0, -0.0, 2.0]), [(1.0, 0.0)])
    head, out = _round_trip(cols)
    assert head["signals"] == [["A", "", ""]] and np.signbit(out.value[1])


def test_v2_any_order_of_signals_round_trips() -> None:
    """Writers sort by (signal, time), but the format does not rely on it: interleaved signals are runs of one."""
    rng = np.random.default_rng(5)
    n = 3000
    cols = wire.SampleColumns([("A", "", ""), ("B", "", ""), ("C", "", "")], rng.integers(0, 3, n).astype(np.uint16),
                              rng.integers(-(2**62), 2**62, n), np.round(rng.normal(0, 100, n)) * 0.25,
                              [(0.25, 0.0), None, (0.5, 1.0)])
    _round_trip(cols)


def test_v2_timestamps_shared_by_signals_of_one_message_are_sent_once() -> None:
    cols = _j1939_like(50_000)
    one = wire.SampleColumns(cols.signals[:1], cols.sig[:10_000], cols.ts_us[:10_000], cols.value[:10_000],
                             cols.scales[:1])
    zero = wire.SampleColumns(cols.signals[:2], cols.sig[:20_000], cols.ts_us[:20_000],
                              np.concatenate([cols.value[:10_000], np.full(10_000, 60.0)]), cols.scales[:2])
    # a second signal on the same timestamps with a constant value costs (next to) nothing
    def size(c: wire.SampleColumns) -> int:
        return len(wire.encode_batch(wire.Batch("f", "v", 1, [wire.Segment("samples", 1, len(c), columns=c)])))

    assert size(zero) - size(one) < 80
    # after the run count and signals (4 + 1 bytes), the timestamp references: width 1, [0, 1] (the run before)
    assert wire.encode_columns(zero)[1][5:8] == bytes([1, 0, 1])


def test_v2_empty_segment_round_trips() -> None:
    cols = wire.SampleColumns([("A", "", "")], np.zeros(0, np.uint16), np.zeros(0, np.int64), np.zeros(0))
    head, blob = wire.encode_columns(cols)
    out = wire.decode_columns(head, blob)
    assert len(out) == 0 and out.signals == [("A", "", "")]


def test_v1_still_decodes_and_is_written_as_before() -> None:
    """Agents before ENC_V2 write this, and their stores hold it after an upgrade: the receiver reads it for ever."""
    cols = _j1939_like(1000)
    head, blob = wire.encode_columns(cols, wire.ENC_V1)
    assert "enc" not in head and len(blob) == 18 * 1000
    assert head["signals"] == [list(s) for s in cols.signals]
    _, out = _round_trip(cols, wire.ENC_V1)
    assert out.scales == []
    head["enc"] = 1  # named explicitly: the same layout
    np.testing.assert_array_equal(_bits(wire.decode_columns(head, blob).value), _bits(cols.value))


def test_v2_is_refused_by_a_receiver_that_predates_enc() -> None:
    """Without `enc` (what a receiver that ignores it sees) a v2 segment must not pass as the old layout, not even
    when its blob happens to be 18 bytes a sample long (the encoder widens a column then)."""
    ts = np.array([7476016667, 207874794146, 786153503032, 1096895306288, 1098517914568], np.int64)
    v = np.array([float.fromhex(x) for x in ("-0x1.5a67e1e5a8117p-3", "0x1.7d77fa7ae8af0p+0", "0x1.6b60a763ebdb6p+0",
                                             "0x1.14aa13a805697p+1", "0x1.6c6eaad10783fp-1")])
    odd = wire.SampleColumns([("A", "", "")], np.zeros(5, np.uint16), ts, v)
    head, blob = wire.encode_columns(odd)
    assert len(blob) == 18 * 5 + 1  # one byte wider than it needed to be
    _round_trip(odd)
    for cols in (odd, _j1939_like(1000), _j1939_like(1000)):
        head, blob = wire.encode_columns(cols)
        del head["enc"]
        with pytest.raises(wire.WireError):
            wire.decode_columns(head, blob)


@pytest.mark.parametrize("enc", [0, 3, -1, "2", 2.0, True, None, [2], 2**70])
def test_unknown_enc_is_refused_with_a_reason(enc: object) -> None:
    head, blob = wire.encode_columns(_j1939_like(100))
    head["enc"] = enc
    with pytest.raises(wire.WireError, match="unknown sample encoding"):
        wire.decode_columns(head, blob)


@pytest.mark.parametrize("entry", [
    ["A", "", "", 0, 0], ["A", "", "", -0.5, 0], ["A", "", "", 1e999, 0], ["A", "", "", 1, 1e999], ["A", "", "", 1],
    ["A", "", "", True, 0], ["A", "", "", "1", 0], ["A", "", "", None, 0], ["A", "", "", 1, 0, 0],
    ["A", "", "", 0.0, 1], ["A", "", "", -1e-300, 0], ["A", ""], ["A", "", "", [1], 0],
    ["A", "", "", float("nan"), 0], ["A", "", "", 1, float("nan")], ["A", "", "", -0.0, 0],
])
def test_v2_bad_scale_or_table_entry_is_refused(entry: list[object]) -> None:
    head, blob = wire.encode_columns(wire.SampleColumns([("A", "", "")], np.zeros(3, np.uint16),
                                                        np.arange(3, dtype=np.int64), np.array([1.0, 2.0, 3.0])))
    head["signals"] = [entry]
    with pytest.raises(wire.WireError, match=r"scale|signal table"):
        wire.decode_columns(head, blob)


def _col(values: list[int], width: int = 8) -> bytes:
    u = np.array(values, np.uint64)
    return bytes([width]) + u.astype("<u8").view(np.uint8).reshape(len(u), 8)[:, :width].T.tobytes()


def _v2_blob(runs: int = 1, sig: list[int] | None = None, ref: list[int] | None = None,
             lens: list[int] | None = None, unit: int = 1, first: list[int] | None = None,
             period: list[int] | None = None, jitter: list[int] | None = None, vfirst: list[int] | None = None,
             vdelta: list[int] | None = None, floats: list[int] | None = None) -> bytes:
    """A hand-made ENC_V2 blob; the defaults are one run of 3 samples of signal 0 (an integer signal)."""
    return (struct.pack("<I", runs) + _col(sig if sig is not None else [0]) + _col(ref if ref is not None else [0])
            + _col(lens if lens is not None else [2]) + struct.pack("<Q", unit)
            + _col(first if first is not None else [0]) + _col(period if period is not None else [2])
            + _col(jitter if jitter is not None else [0, 0]) + _col(vfirst if vfirst is not None else [2])
            + _col(vdelta if vdelta is not None else [2, 2]) + _col(floats or []))


def _v2_head(n: int = 3, signals: list[list[object]] | None = None, t0: int = 0) -> dict[str, object]:
    return {"enc": 2, "n": n, "t0_us": t0, "signals": signals or [["A", "", "", 1, 0]]}


def test_the_hand_made_v2_blob_is_valid() -> None:
    """The helper below builds what the format says: so the forgeries that follow differ in one thing only."""
    out = wire.decode_columns(_v2_head(), _v2_blob())
    assert out.ts_us.tolist() == [0, 1, 2] and out.value.tolist() == [1.0, 2.0, 3.0]  # zigzag: 2 → +1


V2_FORGERIES = {
    "huge n": (_v2_head(n=2**40), _v2_blob(), "outside"),
    "more runs than samples": (_v2_head(), _v2_blob(runs=4), "runs for"),
    "no runs": (_v2_head(), _v2_blob(runs=0, sig=[], ref=[], lens=[], first=[], period=[], jitter=[], vfirst=[],
                                      vdelta=[]), "runs for"),
    "run count 2^32-1": (_v2_head(), struct.pack("<I", 2**32 - 1), "runs for"),
    "width 9": (_v2_head(), _v2_blob()[:4] + b"\x09" + b"\0" * 9 + _v2_blob()[13:], "width"),
    "width 255": (_v2_head(), _v2_blob()[:4] + b"\xff", "width"),
    "signal past the table": (_v2_head(), _v2_blob(sig=[2]), "out of range"),
    "signal index wraps": (_v2_head(), _v2_blob(sig=[2**64 - 1]), "out of range"),
    "run longer than the segment": (_v2_head(), _v2_blob(lens=[3]), "longer"),
    "run length 2^64-1": (_v2_head(), _v2_blob(lens=[2**64 - 1]), "longer"),
    "runs shorter than n": (_v2_head(), _v2_blob(lens=[1], jitter=[0], vdelta=[2]), "runs of"),
    "reference ahead": (_v2_head(), _v2_blob(ref=[1]), "after it"),
    "reference 2^64-1": (_v2_head(), _v2_blob(ref=[2**64 - 1]), "after it"),
    "unit 0": (_v2_head(), _v2_blob(unit=0), "unit"),
    "unit 2^64-1": (_v2_head(), _v2_blob(unit=2**64 - 1), "unit"),
    "timestamps overflow": (_v2_head(), _v2_blob(unit=2**62, first=[2], period=[2]), "timestamps outside"),
    "timestamps wrap around": (_v2_head(t0=2**62), _v2_blob(period=[2**63]), "timestamps outside"),
    "raw integer past 2^53": (_v2_head(), _v2_blob(vfirst=[2**54 + 2]), "raw integer"),
    "raw sum overflows int64": (_v2_head(), _v2_blob(vfirst=[2**63], vdelta=[2**63, 2**63]), "raw integer"),
    "values overflow to inf": (_v2_head(signals=[["A", "", "", 1e300, 0]]), _v2_blob(vfirst=[2**53]), "finite"),
    "NaN float": (_v2_head(signals=[["A", "", ""]]), _v2_blob(vfirst=[], vdelta=[], floats=[0x7FF8000000000000, 0, 0]),
                  "finite"),
    "column cut short": (_v2_head(), _v2_blob()[:-3], "ends inside"),
    "trailing bytes": (_v2_head(), _v2_blob() + b"\0", "past its columns"),
    "floats missing": (_v2_head(signals=[["A", "", ""]]), _v2_blob(), "ends inside|past its columns"),
    "empty blob": (_v2_head(), b"", "ends inside"),
}


@pytest.mark.parametrize("name", sorted(V2_FORGERIES))
def test_forged_v2_segments_are_a_wire_error_with_a_reason(name: str) -> None:
    head, blob, reason = V2_FORGERIES[name]
    with pytest.raises(wire.WireError, match=reason):
        wire.decode_columns(head, blob)


@st.composite
def _columns(draw: st.DrawFn) -> wire.SampleColumns:
    m = draw(st.integers(1, 6))
    n = draw(st.integers(1, 300))
    sig = np.array(draw(st.lists(st.integers(0, m - 1), min_size=n, max_size=n)), np.uint16)
    if draw(st.booleans()):
        sig = np.sort(sig)
    base = draw(st.integers(-(2**62), 2**62))
    step = draw(st.sampled_from([1, 1000, 20_000, 2**40]))
    ts = np.clip(base + np.array(draw(st.lists(st.integers(-50, 50), min_size=n, max_size=n)), np.int64) * step,
                 -(2**62), 2**62)
    scales: list[tuple[float, float] | None] = [
        draw(st.one_of(st.none(), st.tuples(st.sampled_from([0.125, 0.1, 1.0, 0.05, 1e-9, 3.0, 0.0, -1.0]),
                                           st.sampled_from([0.0, -40.0, -0.0, 0.5, -125.0, 1e6]))))
        for _ in range(m)]
    kind = draw(st.sampled_from(["raw", "floats", "mixed"]))
    raw = np.array(draw(st.lists(st.integers(-(2**20), 2**20), min_size=n, max_size=n)), np.float64)
    sc = np.array([s[0] if s else 1.0 for s in scales])[sig]
    off = np.array([s[1] if s else 0.0 for s in scales])[sig]
    hinted = raw * sc + off
    floats = np.array(draw(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=n, max_size=n)))
    value = {"raw": hinted, "floats": floats, "mixed": np.where(sig % 2 == 0, hinted, floats)}[kind]
    if not np.isfinite(value).all():
        value = floats
    return wire.SampleColumns([(f"S{i}", "can0/00", "") for i in range(m)], sig, ts, value, scales)


@settings(max_examples=300, deadline=None)
@given(_columns())
def test_v2_round_trips_any_columns_bit_for_bit(cols: wire.SampleColumns) -> None:
    head, blob = wire.encode_columns(cols)
    assert len(blob) != 18 * len(cols)
    _, out = _round_trip(cols)
    for i, entry in enumerate(head["signals"]):  # type: ignore[attr-defined]
        if len(entry) == 5:  # sent as raw integers: with exactly the resolution the decoder applied
            assert out.scales[i] == (float(entry[3]), float(entry[4]))


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=1, max_size=48), st.integers(min_value=0, max_value=100_000), st.booleans())
def test_v2_mutated_blobs_raise_only_wire_error(noise: bytes, pos: int, insert: bool) -> None:
    head, blob = wire.encode_columns(_j1939_like(200, seed=pos))
    b = bytearray(blob)
    p = pos % len(b)
    if insert:
        b[p:p] = noise
    else:
        b[p : p + len(noise)] = noise
    try:
        out = wire.decode_columns(head, bytes(b))
    except wire.WireError:
        return
    assert len(out) == 200 and np.isfinite(out.value).all()
    assert (np.abs(out.ts_us) <= wire.MAX_TS_US).all() and int(out.sig.max()) < len(out.signals)


_u64 = st.one_of(st.integers(0, 3), st.integers(0, 2**64 - 1), st.sampled_from([2**53 * 2, 2**63, 2**64 - 1, 2**62]))


@st.composite
def _forged_v2(draw: st.DrawFn) -> tuple[dict[str, object], bytes]:
    """A blob with the format's structure (every count as the decoder will derive it, mostly) and hostile numbers
    in it: any width, values that overflow, wrap, or go past the limits, references anywhere, lengths off by one."""
    signals = draw(st.sampled_from([[["A", "", "", 0.5, 1]], [["A", "", ""]], [["A", "", "", 1e300, 0], ["B", "", ""]],
                                    [["A", "", "", 1, 0], ["B", "", "", 5e-324, -1]]]))
    r = draw(st.integers(1, 5))
    sigs = [draw(st.integers(0, len(signals) - 1)) for _ in range(r)]
    run_sig = [((d << 1) ^ (d >> 63)) % 2**64 for d in (np.diff(sigs, prepend=-1) - 1).tolist()]
    if draw(st.integers(0, 9)) == 0:
        run_sig[draw(st.integers(0, r - 1))] = draw(_u64)
    ref = [draw(st.integers(0, i)) if draw(st.booleans()) else 0 for i in range(r)]
    if draw(st.integers(0, 9)) == 0:
        ref[draw(st.integers(0, r - 1))] = draw(_u64)
    own = [i for i in range(r) if ref[i] == 0]
    own_len = [draw(st.integers(0, 6)) for _ in own]  # length - 1
    lens = {}
    for i in range(r):  # the decoder's rule, where the references are sound
        j = i
        while 0 < ref[j] <= j:
            j -= ref[j]
        lens[i] = own_len[own.index(j)] + 1 if j in own else 1
    n = sum(lens.values()) + draw(st.sampled_from([0, 0, 0, 1, -1]))
    sig_of_run = []
    acc = -1
    for d in run_sig:  # zigzag-decoded running sum, as the decoder does
        acc = (acc + 1 + ((d >> 1) ^ -(d & 1))) % 2**64
        sig_of_run.append(acc)
    is_int = [i < len(signals) and len(signals[i]) == 5 for i in sig_of_run]
    int_runs = [lens[i] for i in range(r) if is_int[i]]

    def col(k: int, given: list[int] | None = None) -> bytes:
        w = draw(st.sampled_from([8, 8, 8, 8, 8, 0, 1, 2, 9]))
        vals = given if given is not None else [draw(_u64) for _ in range(max(k, 0))]
        return bytes([w]) + np.array(vals, np.uint64).astype("<u8").view(np.uint8).reshape(len(vals), 8)[
            :, : min(w, 8)].T.tobytes()

    unit = draw(st.one_of(st.integers(1, 1000), _u64))
    blob = (struct.pack("<I", r) + col(r, run_sig) + col(r, ref) + col(len(own), own_len) + struct.pack("<Q", unit)
            + col(len(own)) + col(sum(1 for x in own_len if x >= 1)) + col(sum(own_len)) + col(len(int_runs))
            + col(sum(int_runs) - len(int_runs)) + col(max(n, 0) - sum(int_runs)))
    return {"enc": 2, "n": max(n, 0), "t0_us": draw(st.integers(-(2**62), 2**62)), "signals": signals}, blob


@settings(max_examples=1000, deadline=None)
@given(_forged_v2())
def test_v2_forged_columns_decode_within_the_limits_or_raise_wire_error(
        forged: tuple[dict[str, object], bytes]) -> None:
    head, blob = forged
    try:
        out = wire.decode_columns(head, blob)
    except wire.WireError:
        return
    assert len(out) == head["n"] and np.isfinite(out.value).all()
    assert (np.abs(out.ts_us) <= wire.MAX_TS_US).all() and (len(out) == 0 or int(out.sig.max()) < len(out.signals))


def test_v2_runs_whose_timestamps_only_hash_alike_keep_their_own() -> None:
    """Runs are matched by a hash of their timestamps, then compared in full: two that collide stay apart."""
    w = 0x9E3779B97F4A7C15  # the hash's weight: (w, 0) and (0, 1) hash alike
    q = np.array([w - 2**64, 0, 0, 1, 0, 1], np.int64)
    ref = wire._same_timestamps(q, np.array([0, 2, 4]), np.array([2, 2, 2]))
    assert ref.tolist() == [0, 0, 1]  # the third run is the second's timestamps; the first is not


# --- Signal tables by reference (docs/protocol.md, "Signal tables by reference") ---


def _table_batch(batch_id: int = 1, lo: int = 7) -> wire.Batch:
    cols = _j1939_like(1000)
    return wire.Batch("f", "v", batch_id, [wire.Segment("samples", lo, lo + 999, encoded=wire.encode_columns(cols))])


def test_table_digest_is_sha256_of_canonical_json_cut_to_16_bytes() -> None:
    import hashlib

    table = [["B", "can0/00", "°C", 0.5, -40], ["A", "gps", "deg"]]
    text = '[["B","can0/00","\\u00b0C",0.5,-40],["A","gps","deg"]]'
    assert wire.table_digest(table) == hashlib.sha256(text.encode()).hexdigest()[:32]
    assert wire.table_digest(table) != wire.table_digest(table[::-1])


def test_a_known_table_is_sent_as_a_reference_and_decodes_bit_identical_with_the_stored_table() -> None:
    full = _table_batch()
    first = wire.encode_batch(full)
    digest, table = next(iter(full.tables.items()))
    assert not full.referenced and wire.table_digest(table) == digest
    ref = _table_batch()
    second = wire.encode_batch(ref, known_tables={digest})
    assert ref.referenced and ref.tables == {}
    assert len(second) < len(first)
    held = {("v", digest): table}
    a = wire.decode_batch(first)
    b = wire.decode_batch(second, tables=lambda d: held.get(("v", d)))
    assert a.tables == {digest: table} and not a.referenced
    assert b.tables == {} and b.referenced
    ca, cb = a.segments[0].columns, b.segments[0].columns
    assert ca is not None and cb is not None
    assert ca.signals == cb.signals and ca.scales == cb.scales
    np.testing.assert_array_equal(ca.ts_us, cb.ts_us)
    np.testing.assert_array_equal(_bits(ca.value), _bits(cb.value))


def test_a_reference_nobody_holds_or_to_a_table_that_does_not_hash_to_it_is_an_unknown_table() -> None:
    ref = _table_batch()
    digest = wire.table_digest(wire.encode_columns(_j1939_like(1000))[0]["signals"])
    msg = wire.encode_batch(ref, known_tables={digest})
    with pytest.raises(wire.UnknownTableError):
        wire.decode_batch(msg)
    with pytest.raises(wire.UnknownTableError):
        wire.decode_batch(msg, tables=lambda d: None)
    with pytest.raises(wire.UnknownTableError):  # a different table stored under that digest
        wire.decode_batch(msg, tables=lambda d: [["X", "can0/00", ""]])


def test_a_reference_to_a_table_the_same_batch_carries_in_full_decodes() -> None:
    cols = _j1939_like(1000)
    head, blob = wire.encode_columns(cols)
    digest = wire.table_digest(head["signals"])
    referenced = {k: v for k, v in head.items() if k != "signals"} | {"table": digest}
    b = wire.Batch("f", "v", 1, [wire.Segment("samples", 1, 1000, encoded=(referenced, blob)),
                                 wire.Segment("samples", 1001, 2000, encoded=(head, blob))])
    out = wire.decode_batch(wire.encode_batch(b))
    assert out.tables == {digest: head["signals"]} and out.referenced


@pytest.mark.parametrize("change, reason", [
    ({"table": "0" * 32}, "exactly one of signals and table"),  # both
    ({"signals": None}, "exactly one of signals and table"),  # neither (None drops the key below)
    ({"signals": None, "table": "0" * 31}, "32 lowercase hex"),
    ({"signals": None, "table": "G" * 32}, "32 lowercase hex"),
    ({"signals": None, "table": 5}, "32 lowercase hex"),
])
def test_a_segment_header_with_both_neither_or_a_bad_table_says_why(change: dict[str, object], reason: str) -> None:
    head, blob = wire.encode_columns(_cols(10))
    seg = {"kind": "samples", "seq_lo": 5, "seq_hi": 14, **head, "offset": 0, "length": len(blob), **change}
    seg = {k: v for k, v in seg.items() if v is not None}
    with pytest.raises(wire.WireError, match=reason):
        wire.decode_batch(_raw(_header(seq_lo=5, seq_hi=14, segments=[seg]), blob))


_DIGEST_10 = wire.table_digest(wire.encode_columns(_cols(10))[0]["signals"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.just(_DIGEST_10), st.text(max_size=40), st.from_regex(r"\A[0-9a-f]{32}\Z"), st.integers(),
                 st.none(), st.lists(st.text(max_size=3), max_size=3)),
       st.booleans(), st.sampled_from([None, "same", "other"]))
def test_fuzzed_table_headers_decode_or_raise_only_wire_error(value: object, keep_signals: bool,
                                                              store: str | None) -> None:
    head, blob = wire.encode_columns(_cols(10))
    seg = {"kind": "samples", "seq_lo": 5, "seq_hi": 14, **head, "offset": 0, "length": len(blob), "table": value}
    if not keep_signals:
        del seg["signals"]
    table = head["signals"] if store == "same" else [["X", "s", "u", 2, 0]]

    def lookup(d: str) -> list[object] | None:
        return table if store is not None else None

    try:
        b = wire.decode_batch(_raw(_header(seq_lo=5, seq_hi=14, segments=[seg]), blob), tables=lookup)
    except wire.WireError:
        return
    # Decoded only with a well-formed reference to a table that really hashes to it.
    assert not keep_signals and value == wire.table_digest(head["signals"]) and store == "same"
    assert b.referenced


def test_ack_tables_round_trip_and_a_bad_list_is_refused() -> None:
    ack = wire.Ack("v", 3, [(1, 2)], tables=["ab" * 16])
    assert wire.decode_ack(wire.encode_ack(ack)).tables == ["ab" * 16]
    assert b"tables" not in wire.encode_ack(wire.Ack("v", 3, [(1, 2)]))  # as receivers before references wrote
    for bad in (["AB" * 16], ["ab"], "ab" * 16, [1], ["ab" * 16] * (wire.MAX_ACK_TABLES + 1)):
        payload = json.dumps({"schema": 1, "vehicle": "v", "batch": 3, "ranges": [], "tables": bad}).encode()
        with pytest.raises(wire.WireError, match="tables"):
            wire.decode_ack(payload)


# --- Codecs: CODEC_ZSTD (agents before the dictionary) and CODEC_ZSTD_D1 (zstd with the shipped dictionary). ---

# A message exactly as the agent on main before CODEC_ZSTD_D1 wrote it (codec 1, zstd level 3; an ENC_V2 and an
# ENC_V1 segment of the same 12 samples, and a DTC event), made by that code: vehicles in the field send this, and
# their stores hold rows that become it after an upgrade.
CODEC_1_MESSAGE = bytes.fromhex(
    "4856010128b52ffd60c9023d0d00f617503560679b0e68230856c10ae6a597ac4120001ce2ea1fed7690de1499889050db8dc050"
    "a1cb869d8b3c866fdb8afe1c609033f0b05f063d003d004100af99b1e13e49ccdcdc2bd83cb4fc3696c68e8780e62e39f3357cdf"
    "9813ae9eb229d793eeded099a4a67c5f51fddc7d7643e8dbdc1fd592231fa1ba38107bcababe670ec0f139df3fdd16812846180d"
    "12897c025f8c26f995100dcfefd2dce3777177627f5be376d9d0a29ebcfb132787474cdce58c4d450a8c19f2cdf7b4ef635b55e3"
    "ccc7fdb92aa7afc68c4de9475b161ecbb2d8c2c35d9a516cf8650941d59761d891b06d0f89fab1a86698f1c1aa8230443e598657"
    "61690c0e03b22c33f000623a1a0e2ad743632bcb54225165261a4830a82c98502091a08260a1ba58a8423593a822a82a54150086"
    "35aabaa006c20972705ec3350bf497c1308cdd270afa72b3022b20a0820906e73c188213f1d7140408d463410cbfe66ae170a924"
    "6cc99437a4fb049ab9596c60099e7bc35d1ea7e668883b3712a3833603c8863f71b15809d71cc1c279b0d58f9a87d5ca6f9ac169"
    "926d60c3321c0e4b0d18bdb63b7f91df608071b928"
)
CODEC_1_VALUES = [1500.0, 81.0, 1500.25, 80.0, 1500.5, 82.0, 1500.75, 81.0, 1501.0, 80.0, 1501.25, 82.0]


def test_a_codec_1_message_from_before_the_dictionary_decodes_for_ever() -> None:
    assert CODEC_1_MESSAGE[3] == wire.CODEC_ZSTD
    b = wire.decode_batch(CODEC_1_MESSAGE)
    assert (b.fleet, b.vehicle, b.batch, b.sent_at, b.extra) == ("demo", "harvester-001", 1764000000123,
                                                                 1764000000.5, {"backfill_from": 3001})
    v2, v1, event = b.segments
    for seg in (v2, v1):
        assert seg.columns is not None and seg.n == 12
        np.testing.assert_array_equal(seg.columns.ts_us, 1_764_000_000_000_000 + np.arange(12) * 50_000)
        np.testing.assert_array_equal(_bits(seg.columns.value), _bits(np.array(CODEC_1_VALUES)))
    assert event.record == {"kind": "dtc_open", "ts": 1.5, "data": {"spn": 110, "fmi": 0}}
    # Re-encoding it as that agent did gives the very same bytes: codec 1 is still what it was.
    same = wire.Batch(b.fleet, b.vehicle, b.batch, [wire.Segment(s.kind, s.seq_lo, s.seq_hi, record=s.record,
                      encoded=wire.encode_columns(s.columns, wire.ENC_V2 if i == 0 else wire.ENC_V1)
                      if s.columns is not None else None) for i, s in enumerate(b.segments)],
                      b.sent_at, extra=b.extra)
    assert same.segments[0].encoded is not None
    same.segments[0].encoded[0]["signals"] = [["EEC1.EngSpeed", "can0/00", "rpm", 0.125, 0],
                                              ["ET1.EngCoolantTemp", "can0/00", "degC", 1, -40]]
    assert wire.encode_batch(same, codec=wire.CODEC_ZSTD) == CODEC_1_MESSAGE


def test_the_dictionary_is_frozen() -> None:
    """Its bytes are part of the protocol: a receiver decodes codec 2 with exactly these. A new one is a new codec."""
    import hashlib

    assert hashlib.sha256(wire.ZSTD_DICT_D1).hexdigest() == (
        "07e2edd069b43c43dbf3203ac5763a90436fbf734593722c6aa37690c54bbc8a")


@pytest.mark.parametrize("n", [0, 1, 3000, 60_000])
def test_a_small_body_goes_as_codec_2_a_large_one_as_codec_1_both_bit_for_bit(n: int) -> None:
    cols = _j1939_like(n) if n >= 5 else _cols(n)
    b = wire.Batch("demo", "v1", 7, [wire.Segment("samples", 5, 4 + n, columns=cols)] if n else
                   [wire.Segment("event", 5, 5, record={"kind": "x", "ts": 0.0, "data": {}})], 12.5)
    large = len(wire.encode_batch(b, compress=False)) - 4 > wire.ZSTD_SMALL_BODY
    assert large == (n == 60_000)
    msg = wire.encode_batch(b)
    assert msg[:4] == b"HV\x01" + bytes([wire.CODEC_ZSTD if large else wire.CODEC_ZSTD_D1])
    out = wire.decode_batch(msg)
    assert (out.fleet, out.vehicle, out.batch, out.sent_at) == ("demo", "v1", 7, 12.5)
    if n:
        c = out.segments[0].columns
        assert c is not None
        np.testing.assert_array_equal(c.sig, cols.sig)
        np.testing.assert_array_equal(c.ts_us, cols.ts_us)
        np.testing.assert_array_equal(_bits(c.value), _bits(cols.value))
    assert wire.peek_batch_id(msg) == (7, [(5, 4 + max(n, 1))])


def test_codec_2_is_smaller_than_codec_1_on_a_small_batch() -> None:
    b = wire.Batch("demo", "harvester-001", 1764000000123, [wire.Segment("samples", 1, 3000,
                   columns=_j1939_like(3000))], 1764000000.5, extra={"backfill_from": 3001})
    assert len(wire.encode_batch(b)) < len(wire.encode_batch(b, codec=wire.CODEC_ZSTD))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_any_body_in_a_valid_codec_2_frame_is_decoded_or_a_wire_error(body: bytes) -> None:
    """Well-formed zstd (made with the dictionary) around a forged body: the header and blob checks still hold."""
    with contextlib.suppress(wire.WireError):
        wire.decode_batch(b"HV\x01\x02" + wire._compress(body, wire.CODEC_ZSTD_D1))
    with contextlib.suppress(wire.WireError):
        raw = wire.encode_batch(_batch(20), compress=False)[4:]  # a real body, cut or extended with the bytes
        wire.decode_batch(b"HV\x01\x02" + wire._compress(raw[: len(body)] + body, wire.CODEC_ZSTD_D1))


def test_a_truncated_codec_2_message_is_a_wire_error() -> None:
    msg = wire.encode_batch(_batch(500))
    for cut in range(4, len(msg), max(1, len(msg) // 50)):
        with pytest.raises(wire.WireError):
            wire.decode_batch(msg[:cut])


@settings(max_examples=200, deadline=None)
@given(_columns(), st.sampled_from([None, wire.CODEC_ZSTD, wire.CODEC_ZSTD_D1]))
def test_any_columns_round_trip_bit_for_bit_through_a_message_of_any_codec(cols: wire.SampleColumns,
                                                                           codec: int | None) -> None:
    b = wire.Batch("demo", "v1", 3, [wire.Segment("samples", 10, 9 + len(cols), columns=cols)], 5.5)
    msg = wire.encode_batch(b, codec=codec)
    assert msg[3] == (codec if codec is not None else wire.CODEC_ZSTD_D1)  # a small body: codec 2 by default
    out = wire.decode_batch(msg).segments[0].columns
    assert out is not None
    np.testing.assert_array_equal(out.sig, cols.sig)
    np.testing.assert_array_equal(out.ts_us, cols.ts_us)
    np.testing.assert_array_equal(_bits(out.value), _bits(cols.value))
