"""The bulk candump -L reader against the line-by-line one as the oracle: for any lines (good, hostile, truncated,
garbage) and any chunking, the same frames in the same order, the same bus labels, the same bad-line count."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.frames import FrameBatch, LabelledFrames
from agent.sources.candump import MAX_LINE, read_candump, read_candump_chunks
from harvester_testing.data import shared_file

COLUMNS = ("ts", "can_id", "dlc", "data", "extended", "bad")


def _oracle(raw: bytes, tmp: Path) -> tuple[FrameBatch, list[str], Counter[str]]:
    p = tmp / "oracle.log"
    p.write_bytes(raw)
    errors: Counter[str] = Counter()
    msgs = list(read_candump(p, errors))
    return FrameBatch.from_messages(msgs, ""), [str(m.channel) for m in msgs], errors


def _bulk(raw: bytes, chunk: int) -> tuple[FrameBatch, list[str], Counter[str]]:
    errors: Counter[str] = Counter()
    parts: list[LabelledFrames] = list(read_candump_chunks(io.BytesIO(raw), errors, chunk))
    labels = [lf.labels[i] for lf in parts for i in lf.label.tolist()]
    for lf in parts:  # labels listed in order of first appearance, each used
        firsts = [int(np.flatnonzero(lf.label == k)[0]) for k in range(len(lf.labels))]
        assert firsts == sorted(firsts)
    return FrameBatch.concat([lf.frames for lf in parts], ""), labels, errors


def _assert_same(raw: bytes, chunk: int, tmp: Path) -> None:
    want, want_labels, want_err = _oracle(raw, tmp)
    got, got_labels, got_err = _bulk(raw, chunk)
    for c in COLUMNS:
        a, b = getattr(want, c), getattr(got, c)
        assert a.shape == b.shape and (np.array_equal(a, b, equal_nan=True) if c == "ts" else np.array_equal(a, b)), (
            c, a[:5], b[:5])
    assert got_labels == want_labels
    assert got_err == want_err


hexd = st.sampled_from("0123456789ABCDEFabcdef")


def _hex(n: int) -> st.SearchStrategy[str]:
    return st.text(hexd, min_size=n, max_size=n)


frame_line = st.builds(
    lambda lead, ts, sep1, ch, sep2, ident, body, tail, crlf: (
        f"{lead}({ts}){sep1}{ch}{sep2}{ident}#{body}{tail}{crlf}"),
    st.sampled_from(["", " ", "\t"]),
    st.one_of(st.builds(lambda a, b: f"{a}.{b}", st.integers(0, 10**12), st.integers(0, 10**6)),
              st.sampled_from(["1.5", "0001600000000.000001", "1e3", "inf", "nan", "-1.0", "1_0.5", "", "1.", ".5",
                               "12345678901234567890.123456789012"])),
    st.sampled_from([" ", "  ", "\t"]),
    st.sampled_from(["can0", "can1", "vcan0", "ch", "k\u00e9", "can#1", "(x)"]),
    st.sampled_from([" ", "\t "]),
    st.one_of(_hex(3), _hex(8), st.integers(0, 10).flatmap(_hex),
              st.sampled_from(["3FFFFFFF", "20000001", "0x1", "1_F", "+1F", "0x1234AB", "-1234567"])),
    st.one_of(st.integers(0, 9).flatmap(lambda n: _hex(2 * n)), _hex(3), st.sampled_from(
        ["R", "R8", "#1", "#0" + "AB" * 12, "#F" + "00" * 64, "#1" + "0" * 129, "zz", "11 22", "1"])),
    st.sampled_from(["", " R", " T", "\t junk", " " + "x" * 300]),
    st.sampled_from(["", "\r"]),
).map(lambda s: s.encode("utf-8"))

line = st.one_of(
    frame_line,
    frame_line.flatmap(lambda b: st.integers(0, len(b)).map(lambda k: b[:k])),  # cut anywhere
    st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")),
    st.sampled_from([b"", b"   ", b"# a comment", b"#(1.0) can0 123#00", b"(1.0)", b"(1.0) can0", b"\x00\xff"]),
)


@settings(max_examples=400, deadline=None)
@given(lines=st.lists(line, max_size=40), final_newline=st.booleans(), chunk=st.integers(1, 300))
def test_bulk_reader_equals_the_line_reader_on_any_lines(lines: list[bytes], final_newline: bool, chunk: int) -> None:
    import tempfile

    raw = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    with tempfile.TemporaryDirectory() as d:
        _assert_same(raw, chunk, Path(d))


def test_bulk_reader_equals_the_line_reader_on_real_logs(tmp_path: Path) -> None:
    for rel in ("can/johndeere_5055e/start1_candumpL.log", "can/css_canedge/css_FCBF0606_candumpL.log",
                "can/css_canedge/css_11111111_00000012_00000001_candumpL.log"):
        raw = shared_file(rel).read_bytes()
        for chunk in (4096, 1 << 20):
            _assert_same(raw, chunk, tmp_path)


def test_a_line_too_long_is_one_bad_line_whatever_the_chunks(tmp_path: Path) -> None:
    good = b"(1.000000) can0 18FEEE00#8C45FFFF20FFFFFF"
    exact = good + b" " + b"x" * (MAX_LINE - len(good) - 1)  # a frame, but a line of exactly MAX_LINE bytes
    for long in (b"0" * MAX_LINE, exact, good + b" " + b"x" * MAX_LINE, b"y" * (3 * MAX_LINE)):
        raw = b"\n".join([good, long, good, long]) + b"\n" + good  # the last without its newline
        for chunk in (1000, MAX_LINE - 1, MAX_LINE + 7, 1 << 20):
            _assert_same(raw, chunk, tmp_path)
            got, _, err = _bulk(raw, chunk)
            assert len(got) == 3 and err["log_bad_line"] == 2
