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
