"""Logs read as columns (`open_chunks`, what replay reads) give exactly the frames the message readers give
(`open_log`, python-can's readers where it has them), in every format of ../shared/data/can; replay's batches are
the ones a frame-by-frame loop would make; and replaying a candump log imports neither python-can nor cantools."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.frames import FrameBatch, LabelledFrames, Rebatcher, bus_label
from agent.sources.logfile import open_chunks, open_log
from harvester_testing.data import SHARED_DATA, shared_file

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("ts", "can_id", "dlc", "data", "extended", "bad")


def _columns_equal(a: FrameBatch, b: FrameBatch) -> None:
    for c in COLUMNS:
        assert np.array_equal(getattr(a, c), getattr(b, c)), c


def _real_logs(tmp_path: Path) -> list[Path]:
    import can

    root = SHARED_DATA / "can"
    if not root.is_dir():
        pytest.skip(f"real CAN traces absent: {root} (tests read real data from ../shared/data)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".log", ".asc", ".blf", ".mf4")
                   and "johndeere" not in p.parts[-2])
    files.append(root / "johndeere_5055e" / "highRPM1_candumpL.log")
    for ext in (".trc", ".csv"):  # converted by python-can's writers
        out = tmp_path / f"converted{ext}"
        with can.Logger(str(out)) as w:
            for m in can.LogReader(str(files[-1])):
                w.on_message_received(m)
        files.append(out)
    return files


def test_chunks_are_the_message_readers_frames_in_every_format(tmp_path: Path) -> None:
    pytest.importorskip("asammdf", reason="MF4 needs the mf4 extra (asammdf); the dev extra installs it")
    for p in _real_logs(tmp_path):
        e1: Counter[str] = Counter()
        e2: Counter[str] = Counter()
        msgs = list(open_log(p, e1))
        chunks = list(open_chunks(p, e2))
        _columns_equal(FrameBatch.concat([c.frames for c in chunks], ""), FrameBatch.from_messages(msgs, ""))
        assert [c.labels[i] for c in chunks for i in c.label.tolist()] == [bus_label(m.channel) for m in msgs], p
        assert e1 == e2, p


def _loop_batches(labels: list[str], size: int) -> list[tuple[str, list[int]]]:
    """The frame-by-frame loop replay used to run: a list per bus, handed on when it reaches `size`, the rest at
    the end in order of first appearance. Frames are their positions."""
    held: dict[str, list[int]] = {}
    out = []
    for i, name in enumerate(labels):
        b = held.setdefault(name, [])
        b.append(i)
        if len(b) >= size:
            out.append((name, list(b)))
            b.clear()
    out += [(name, b) for name, b in held.items() if b]
    return out


@settings(max_examples=300, deadline=None)
@given(labels=st.lists(st.sampled_from(["can0", "can1", "can8", "x"]), max_size=120),
       size=st.integers(1, 17), cuts=st.lists(st.integers(0, 120), max_size=8))
def test_rebatcher_gives_the_frame_by_frame_batches_for_any_chunking(labels: list[str], size: int,
                                                                     cuts: list[int]) -> None:
    n = len(labels)
    ts = np.arange(n, dtype=np.float64)  # each frame's position, to tell them apart
    frames = FrameBatch(ts, np.zeros(n, np.uint32), np.zeros(n, np.uint8), np.zeros((n, 8), np.uint8),
                        np.ones(n, np.bool_), np.zeros(n, np.bool_), "")
    bounds = sorted({0, n, *(c for c in cuts if c < n)})
    rb = Rebatcher(size)
    got = []
    for a, b in itertools.pairwise(bounds):
        names = list(dict.fromkeys(labels[a:b]))
        code = np.array([names.index(x) for x in labels[a:b]], np.int32)
        got += rb.feed(LabelledFrames(frames.take(slice(a, b)), code, names))
    got += rb.flush()
    assert [(name, fb.ts.astype(int).tolist()) for name, fb in got] == _loop_batches(labels, size)
    assert all(fb.bus == name for name, fb in got)


def test_replaying_a_candump_log_imports_neither_python_can_nor_cantools(tmp_path: Path) -> None:
    """With the DBC tables cached, a candump replay parses no DBC and reads no frame through python-can: the start
    of a replay is the agent's own (checked by what is imported, not by a clock)."""
    log = shared_file("can/johndeere_5055e/highRPM1_candumpL.log")
    dbc = shared_file("dbc/j1939_vector_v7.2__osu-cybercan__patched.dbc")
    model = REPO / "models" / "harvester-anomaly.int8.onnx"
    code = ("import sys, json; from pathlib import Path; from agent.replay import replay; "
            f"o = replay([Path({str(log)!r})], [Path({str(dbc)!r})], model=Path({str(model)!r})); "
            "print(json.dumps({'frames': o['frames'], 'windows_scored': o['windows_scored'], "
            "'dbc_cache': o['dbc_cache'], 'mods': [m for m in ('can', 'cantools', 'asammdf', 'pandas') "
            "if m in sys.modules]}))")
    env = {**os.environ, "HARVESTER_DBC_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    runs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["dbc_cache"] == {"parsed": 2, "written": 2} and "cantools" in first["mods"]
    assert second["dbc_cache"] == {"hit_disk": 2}  # the built-in DBC and the given one, from the cache
    assert second["mods"] == [], second["mods"]
    assert second["frames"] == first["frames"] > 7000 and second["windows_scored"] == first["windows_scored"] > 0


def _both(p: Path) -> tuple[object, object]:
    """What each path makes of a file: (frames, labels, counts), or the LogUnreadable text."""
    from agent.sources.logfile import LogUnreadable

    out: list[object] = []
    for read in (open_log, open_chunks):
        errors: Counter[str] = Counter()
        try:
            items = list(read(p, errors))
        except LogUnreadable as e:
            out.append(str(e))
            continue
        if read is open_log:
            fb, labels = FrameBatch.from_messages(items, ""), [bus_label(m.channel) for m in items]
        else:
            fb = FrameBatch.concat([c.frames for c in items], "")
            labels = [c.labels[i] for c in items for i in c.label.tolist()]
        out.append(([getattr(fb, c).tolist() for c in COLUMNS], labels, dict(errors)))
    return out[0], out[1]


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=64)), max_size=5),
       st.one_of(st.none(), st.floats(0, 1)))
def test_blf_without_python_can_reads_damaged_files_as_the_message_path(patches: list[tuple[float, bytes]],
                                                                        cut: float | None) -> None:
    """Random damage anywhere in the real BLF, and cuts: our BLF reader gives the frames, bus labels and counts
    (log_bad_record, log_unreadable) of python-can's reader as the message path drives it, or the same error."""
    import tempfile

    raw = bytearray(shared_file("can/formats/jd5055e_highRPM1.blf").read_bytes())
    for where, b in patches:
        at = int(where * (len(raw) - 1))
        raw[at : at + len(b)] = b
    if cut is not None:
        raw = raw[: int(cut * len(raw))]
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "damaged.blf"
        p.write_bytes(bytes(raw))
        want, got = _both(p)
        assert got == want


_asc_byte = st.one_of(st.integers(0, 255).map(lambda b: f"{b:02X}"), st.sampled_from(["100", "-1", "0x1F", "Z", "7"]))
asc_line = st.one_of(
    st.builds(lambda ts, ch, ident, x, d, n, data: f" {ts} {ch}  {ident}{x}  {d}   d {n} {' '.join(data)}",
              st.sampled_from(["0.000000", "12.500000", "1.5", "3", "x.1"]), st.sampled_from(["1", "2", "0", "A"]),
              st.sampled_from(["18FEEE00", "CF00400", "123", "1FFFFFFFF", "GG", "7FF"]),
              st.sampled_from(["x", "X", ""]), st.sampled_from(["Rx", "Tx", "Zx"]),
              st.sampled_from(["8", "3", "0", "F", "9", "-2", "-40", "Q"]), st.lists(_asc_byte, max_size=10)),
    st.builds(lambda ts, ch, ident, rest: f" {ts} {ch}  {ident}  Rx   r {rest}", st.sampled_from(["1.0", "2.25"]),
              st.sampled_from(["1", "3"]), st.sampled_from(["18FEEE00x", "12"]), st.sampled_from(["", "8", "x", "²"])),
    st.builds(lambda ts, ch: f" {ts} {ch}  ErrorFrame", st.sampled_from(["1.0", "4.5"]), st.sampled_from(["1", "2"])),
    st.builds(lambda ts, ch, ident, brs, dlc, ln, data: (
        f" {ts} CANFD {ch} Rx {ident} {brs} 0 {dlc} {ln} {' '.join(data)} 0 0 0 0 0 0 0 0"),
        st.sampled_from(["1.0", "2.5"]), st.sampled_from(["1", "2", "x"]),
        st.sampled_from(["18FEEE00x", "123", "ZZ"]), st.sampled_from(["1", "Name 1", "Name"]),
        st.sampled_from(["8", "f", "9", "1F", "-20"]), st.sampled_from(["8", "0", "12", "64", "-1"]),
        st.lists(_asc_byte, max_size=14)),
    st.sampled_from([" 1.0 CANFD 1 Rx ErrorFrame", "// a comment", "Begin Triggerblock Thu Jan 01 00:00:00.0 1970",
                     " 0.000000 Start of measurement", "End TriggerBlock", " 1.0 1 Statistic: D 0 R 0",
                     " 2.0 J1939TP FEE3p 6 0 0 - Rx d 23 ...", "", "   ", "base dec", "base HEX timestamps absolute",
                     "date Tue Nov 24 01:04:12.548 2026", "internal events logged", " 3.0 1  12  Rx",
                     " 1.0 CANFD 1 Rx 18FEEE00x 1 0 -20 8 01 02 03 04 05 06 07 08 0 0 0 0 0 0 0 0",
                     " 1.0 1  18FEEE00x  Rx   d -20 01 02"]),
    st.binary(min_size=1, max_size=30).map(lambda b: (b"\xff" + b.replace(b"\n", b"")).decode("latin-1")),
)
asc_header = st.lists(st.sampled_from(["date Tue Nov 24 01:04:12.548 2026", "base hex  timestamps absolute",
                                       "base dec", "base Hex", "// comment", "no internal events logged",
                                       "internal events logged", "Begin Triggerblock Thu Jan 01 00:00:00.0 1970"]),
                      max_size=5)


@settings(max_examples=200, deadline=None)
@given(asc_header, st.lists(asc_line, max_size=30), st.booleans())
def test_asc_without_python_can_reads_any_lines_as_the_message_path(header: list[str], body: list[str],
                                                                    crlf: bool) -> None:
    """Headers and lines of every kind ASC holds (frames classic and FD, remote, error frames, events, comments),
    broken ones, and bytes that are not text: our ASC reader gives python-can's frames and counts, as the message
    path drives its reader (restarted after each line it cannot parse)."""
    import tempfile

    text = ("\r\n" if crlf else "\n").join([*header, *body]).encode("utf-8", "surrogateescape")
    text = text.replace("\xff".encode(), b"\xff")  # the junk lines' first byte: not UTF-8
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "fuzz.asc"
        p.write_bytes(text)
        if not text:
            return
        want, got = _both(p)
        assert got == want


def test_asc_without_python_can_reads_the_real_file_with_bad_lines_as_the_message_path(tmp_path: Path) -> None:
    lines = shared_file("can/formats/jd5055e_highRPM1.asc").read_bytes().splitlines(keepends=True)
    bad = [b" 17.500000 1  ZZZZZZZZx       Rx   d 8 00 11 22 33 44 55 66 77\n", b"\xff\xfe\x00 not text\n",
           b"0" * 70_000 + b"\n", b" 18.0 1  18FEEE00x Rx d 8 00 11 22 33 44 55 66 777\n"]
    for i, b in zip([len(lines) // 5, len(lines) // 3, len(lines) // 2, len(lines) - 3], bad, strict=True):
        lines.insert(i, b)
    p = tmp_path / "garbled.asc"
    p.write_bytes(b"".join(lines))
    want, got = _both(p)
    assert got == want
    assert isinstance(got, tuple) and got[2] == {"log_bad_line": 4}


@pytest.mark.parametrize("order", ["sorted", "backwards"])
def test_mf4_groups_merge_as_python_can_merges_them(tmp_path: Path, order: str) -> None:
    """Data, error and remote frames on two channels, written by python-can's MF4 writer (one channel group per
    kind): merged by timestamp as python-can's reader merges them. A group whose timestamps go backwards is read
    message by message instead (python-can's merge of unsorted input is its own), with the same result."""
    pytest.importorskip("asammdf", reason="MF4 needs the mf4 extra (asammdf); the dev extra installs it")
    import random

    import can

    from agent.sources import mf4

    rng = random.Random(3)
    t = 1000.0
    msgs = []
    for _ in range(400):
        t += rng.random() * 0.01 * (1 if order == "sorted" or rng.random() < 0.9 else -30)
        k, ch = rng.random(), rng.choice([0, 1])
        if k < 0.1:
            msgs.append(can.Message(timestamp=t, is_error_frame=True, channel=ch))
        elif k < 0.2:
            msgs.append(can.Message(timestamp=t, arbitration_id=0x123, is_remote_frame=True, is_extended_id=False,
                                    dlc=3, channel=ch))
        else:
            msgs.append(can.Message(timestamp=t, arbitration_id=rng.randrange(1 << 29), channel=ch,
                                    data=bytes(rng.randrange(256) for _ in range(rng.randrange(9)))))
    p = tmp_path / "written.mf4"
    with can.Logger(str(p)) as w:
        for m in msgs:
            w.on_message_received(m)
    if order == "backwards":
        with pytest.raises(mf4.NotMonotonic):
            mf4.read_mf4(p, Counter())
    want, got = _both(p)
    assert got == want
    assert isinstance(got, tuple) and len(got[1]) == 400 and set(got[1]) == {"can0", "can1"}
