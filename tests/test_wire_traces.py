"""The wire's integer coding on real J1939 traffic: the John Deere traces decoded by the agent's own decoder, cut
into segments as the store writes them, sent and decoded back bit for bit, and mostly as raw integers."""

from __future__ import annotations

import itertools

import can
import numpy as np

from agent.decode.j1939 import J1939Decoder
from agent.frames import FrameBatch
from agent.records import SampleArrays
from agent.signals import SignalRegistry
from agent.writer import SampleBuffer
from harvester_common import wire
from harvester_testing.data import shared_file

TRACES = ("highRPM1_candumpL.log", "transmision123inGear20Seconds_candumpL.log", "start1_candumpL.log")


def _segments() -> list[wire.SampleColumns]:
    """10 s of each trace per segment, through the decoder and the store's SampleBuffer, as the agent does."""
    dbc = shared_file("dbc/j1939_vector_v7.2__osu-cybercan__patched.dbc")
    reg = SignalRegistry()
    dec = J1939Decoder(reg, [dbc], "can0")
    out: list[wire.SampleColumns] = []
    for name in TRACES:
        log = shared_file(f"can/johndeere_5055e/{name}")
        s = dec.decode(FrameBatch.from_messages(list(can.LogReader(str(log))), "can0")).samples
        for a, b in itertools.pairwise(np.arange(s.ts.min(), s.ts.max() + 10.0, 10.0)):
            sel = (s.ts >= a) & (s.ts < b)
            buf = SampleBuffer(reg)
            buf.add(SampleArrays(s.ts[sel], s.sid[sel], s.value[sel]))
            cols = buf.take()
            if cols is not None:
                out += wire.split_columns(cols)
    return out


def test_real_traces_round_trip_bit_for_bit_as_raw_integers() -> None:
    segments = _segments()
    assert sum(len(c) for c in segments) > 30_000
    v1 = v2 = ints = total = 0
    for i, cols in enumerate(segments):
        head, blob = wire.encode_columns(cols)
        msg = wire.encode_batch(wire.Batch("f", "v", i, [wire.Segment("samples", 1, len(cols), encoded=(head, blob))]))
        back = wire.decode_batch(msg).segments[0].columns
        assert back is not None and back.signals == cols.signals
        np.testing.assert_array_equal(back.sig, cols.sig)
        np.testing.assert_array_equal(back.ts_us, cols.ts_us)
        np.testing.assert_array_equal(back.value.view(np.uint64), cols.value.view(np.uint64))
        table = head["signals"]
        assert isinstance(table, list)
        as_int = np.array([len(e) == 5 for e in table])
        ints += int(as_int[cols.sig].sum())
        total += len(cols)
        v2 += len(msg)
        v1 += len(wire.encode_batch(wire.Batch("f", "v", i, [wire.Segment(
            "samples", 1, len(cols), encoded=wire.encode_columns(cols, wire.ENC_V1))])))
    # The fast path's signals carry their DBC resolution to the encoder, and every value of them is exact in it.
    assert ints == total
    assert v2 < 0.75 * v1


def test_the_decoders_resolution_reaches_the_segment() -> None:
    cols = _segments()[0]
    # By name and unit: the tractor's engine claims its address, so its source is its NAME (docs/j1939.md).
    scales = {(name, unit): hint for (name, _, unit), hint in zip(cols.signals, cols.scales, strict=True)}
    assert scales[("EEC1.EngSpeed", "rpm")] == (0.125, 0.0)
    head, _ = wire.encode_columns(cols)
    assert any(s[0] == "EEC1.EngSpeed" and s[2:] == ["rpm", 0.125, 0] for s in head["signals"])  # type: ignore[union-attr]
