"""`harvester-agent replay` on real recorded logs: every format reads the same frames, the JSON summary carries
the keys fleet tools rely on, and bad files are one-line errors or counted, never tracebacks."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.replay import ReplayError, replay
from harvester_testing.data import shared_file

KEYS = {
    "frames",
    "frames_decoded",
    "frames_unknown",
    "errors",
    "samples",
    "dtc_events",
    "windows",
    "alerts",
    "seconds",
    "frames_per_s",
    "signals",
}


def test_every_log_format_reads_the_same_frames() -> None:
    dbc = shared_file("dbc/j1939_vector_v7.2__osu-cybercan__patched.dbc")
    out = {}
    for rel in (
        "can/johndeere_5055e/highRPM1_candumpL.log",
        "can/formats/jd5055e_highRPM1.asc",
        "can/formats/jd5055e_highRPM1.blf",
    ):
        out[rel] = replay([shared_file(rel)], [dbc], model=None)
    first, *rest = out.values()
    for o in rest:
        assert (o["frames"], o["frames_decoded"], o["samples"]) == (
            first["frames"],
            first["frames_decoded"],
            first["samples"],
        )
        assert o["signals"].keys() == first["signals"].keys()
        for name, sig in o["signals"].items():
            assert sig["count"] == first["signals"][name]["count"]
            assert sig["min"] == pytest.approx(first["signals"][name]["min"])


def test_json_summary_contract(tmp_path: Path) -> None:
    log = shared_file("can/css_canedge/css_11111111_00000012_00000001_candumpL.log")
    dbc = shared_file("dbc/j1939_vector_v7.2__osu-cybercan__patched.dbc")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "replay",
            str(log),
            "--dbc",
            str(dbc),
            "--db",
            str(tmp_path / "out.sqlite"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= KEYS
    assert out["frames"] == out["frames_decoded"] + out["frames_unknown"] + sum(
        v for k, v in out["errors"].items() if k in ("error_or_remote_frame", "standard_id")
    )
    assert out["dtc_events"] > 0  # this trace carries DM1 over BAM
    rpm = out["signals"]["EEC1.EngSpeed"]
    assert rpm["count"] > 0 and 0 <= rpm["min"] <= rpm["max"] < 3000
    assert (tmp_path / "out.sqlite").exists()


def test_unreadable_logs_are_one_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "x.unknownext"
    bad.write_text("hello")
    for args in ([str(tmp_path / "missing.log")], [str(bad)]):
        r = subprocess.run(
            [sys.executable, "-m", "agent", "replay", *args, "--no-model"], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(ReplayError):
        replay([tmp_path / "missing.log"])


@pytest.mark.parametrize("cut", [0.3, 0.77])
def test_truncated_or_corrupt_logs_are_counted_not_fatal(tmp_path: Path, cut: float) -> None:
    src = shared_file("can/formats/jd5055e_highRPM1.blf")
    raw = src.read_bytes()
    truncated = tmp_path / "t.blf"
    truncated.write_bytes(raw[: int(len(raw) * cut)])
    candump = shared_file("can/johndeere_5055e/highRPM1_candumpL.log").read_bytes().splitlines()
    garbled = tmp_path / "g.log"
    k = int(len(candump) * cut)
    garbled.write_bytes(b"\n".join([*candump[:k], b"(12.5) can0 ZZZ#GARBAGE", b"\xff\xfe\x00", *candump[k:]]))
    whole = replay([src], model=None)["frames"]
    t = replay([truncated], model=None)
    assert 0 < t["frames"] < whole  # a truncated binary log gives what it holds, no crash
    g = replay([garbled], model=None)
    assert g["errors"]["log_bad_line"] == 2  # the two bad lines, counted...
    assert g["frames"] == len(candump)  # ...and every good line after them still replayed


def test_candump_parser_matches_python_can_on_real_logs() -> None:
    import can

    from agent.sources.candump import read_candump

    for rel in ("can/johndeere_5055e/start1_candumpL.log", "can/css_canedge/css_FCBF0606_candumpL.log"):
        p = shared_file(rel)
        from collections import Counter

        errs: Counter[str] = Counter()
        ours = [(m.timestamp, m.arbitration_id, bytes(m.data), m.channel) for m in read_candump(p, errs)]
        ref = [(m.timestamp, m.arbitration_id, bytes(m.data), m.channel) for m in can.LogReader(str(p))]
        assert ours == ref and not errs


@settings(max_examples=400, deadline=None)
@given(
    st.binary(max_size=80)
    | st.from_regex(rb"\A\([0-9.]{0,20}\) [a-z0-9]{0,5} [0-9A-Fa-f]{0,9}#{0,2}[0-9A-FRa-f]{0,40}\Z")
)
def test_hostile_log_lines_only_raise_value_error(line: bytes) -> None:
    from agent.sources.candump import parse_line

    try:
        m = parse_line(line)
    except (ValueError, UnicodeDecodeError, OverflowError):
        return
    assert len(m.data) <= 64


def test_mf4_replays_the_same_frames_as_its_candump_conversion() -> None:
    pytest.importorskip("asammdf", reason="MF4 needs the mf4 extra (asammdf); the dev extra installs it")
    dbc = shared_file("dbc/j1939_vector_v7.2__osu-cybercan__patched.dbc")
    mf4 = replay([shared_file("can/css_canedge/11111111_00000012_00000001.MF4")], [dbc], model=None)
    log = replay([shared_file("can/css_canedge/css_11111111_00000012_00000001_candumpL.log")], [dbc], model=None)
    assert mf4["frames"] == log["frames"] > 50_000
    assert mf4["dtc_events"] == log["dtc_events"] > 0
    assert {k: v["count"] for k, v in mf4["signals"].items()} == {k: v["count"] for k, v in log["signals"].items()}


@pytest.mark.parametrize("ext", [".trc", ".csv"])
def test_trc_and_csv_written_by_python_can_replay_the_same(tmp_path: Path, ext: str) -> None:
    import can

    src = shared_file("can/johndeere_5055e/highRPM1_candumpL.log")
    out = tmp_path / f"trace{ext}"
    with can.Logger(str(out)) as writer:
        for m in can.LogReader(str(src)):
            writer.on_message_received(m)
    a = replay([src], model=None)
    b = replay([out], model=None)
    assert (b["frames"], b["frames_decoded"], b["samples"]) == (a["frames"], a["frames_decoded"], a["samples"])


# --- hostile files for every format the replay reads: a one-line error, or read around the bad records -----------

EXTS = (".blf", ".mf4", ".asc", ".trc", ".log", ".csv", ".db")
NOISE = bytes(random.Random(10).randrange(256) for _ in range(8192))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "replay", *args, "--no-model", "--json"],
                          capture_output=True, text=True, timeout=180)


def _one_line_error(r: subprocess.CompletedProcess[str], name: str) -> None:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stdout[-300:], r.stderr[-300:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0], r.stderr
    assert r.stdout == ""


def _real_log(ext: str, tmp_path: Path) -> Path:
    """A real recording in this format: shared data as it is, or converted by python-can into tmp_path."""
    import can

    given_as = {".blf": "can/formats/jd5055e_highRPM1.blf", ".asc": "can/formats/jd5055e_highRPM1.asc",
                ".log": "can/johndeere_5055e/highRPM1_candumpL.log",
                ".mf4": "can/css_canedge/11111111_00000012_00000001.MF4"}
    if ext in given_as:
        if ext == ".mf4":
            pytest.importorskip("asammdf", reason="MF4 needs the mf4 extra (asammdf)")
        return shared_file(given_as[ext])
    out = tmp_path / f"converted{ext}"
    with can.Logger(str(out)) as w:
        for m in can.LogReader(str(shared_file(given_as[".log"]))):
            w.on_message_received(m)
    return out


@pytest.mark.parametrize("content", ["random", "empty"])
@pytest.mark.parametrize("ext", EXTS)
def test_unreadable_file_of_any_format_is_a_one_line_error(tmp_path: Path, ext: str, content: str) -> None:
    if ext == ".mf4":
        pytest.importorskip("asammdf", reason="MF4 needs the mf4 extra (asammdf)")
    bad = tmp_path / f"{content}{ext}"
    bad.write_bytes(NOISE if content == "random" else b"")
    good = shared_file("can/johndeere_5055e/highRPM1_candumpL.log")
    _one_line_error(_cli(str(bad)), bad.name)
    _one_line_error(_cli(str(good), str(bad)), bad.name)  # fail whole, before any work


@pytest.mark.parametrize("ext", EXTS)
def test_truncated_real_file_of_any_format_gives_what_it_holds(tmp_path: Path, ext: str) -> None:
    src = _real_log(ext, tmp_path)
    whole = json.loads(_cli(str(src)).stdout)["frames"]
    raw = src.read_bytes()
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(raw[: len(raw) * 2 // 3])
    r = _cli(str(cut))
    if ext == ".db":  # SQLite cut short is a malformed database: nothing of it reads, so it is an error
        _one_line_error(r, cut.name)
    else:
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        out = json.loads(r.stdout)
        assert 0 < out["frames"] < whole
        if ext == ".blf":  # the header's file size tells the cut, and it is counted (asammdf does not tell for MF4)
            assert out["errors"]["log_unreadable"] == 1
    # Cut inside the header: nothing to read, so it is an error, not "0 frames".
    stub = tmp_path / f"stub{ext}"
    stub.write_bytes(raw[:40])
    _one_line_error(_cli(str(stub)), stub.name)


BROKEN_RECORD = {  # a line each reader takes for a frame and cannot parse
    ".asc": b" 17.500000 1  ZZZZZZZZx       Rx   d 8 00 11 22 33 44 55 66 77\n",
    ".trc": b"   9999        17.500 DT  1 ZZZZZZZZ Rx -  8    00 11 22 33 44 55 66 77\n",
    ".csv": b"17.5,0xZZZZ,1,0,0,8,AAAAAAAAAAA=\n",
    ".log": b"(17.500000) can0 ZZZZZZZZ#0011223344556677\n",
}


@pytest.mark.parametrize("ext", [".asc", ".trc", ".csv", ".log"])
def test_bad_records_inside_a_text_log_are_read_around_and_counted(tmp_path: Path, ext: str) -> None:
    """python-can's text readers stop at the first bad line; replay skips it, counts it and reads on. (ASC and TRC
    readers pass over lines that are no frame at all, as they do over their event and comment lines.)"""
    src = _real_log(ext, tmp_path)
    lines = src.read_bytes().splitlines(keepends=True)
    whole = replay([src], model=None)
    bad = [BROKEN_RECORD[ext], b"\xff\xfe\x00 not text\n", BROKEN_RECORD[ext].replace(b"8", b"9", 1),
           b"0" * 70_000 + b"\n"]
    at = [len(lines) // 5, len(lines) * 2 // 5, len(lines) * 3 // 5, len(lines) * 4 // 5]
    for i, b in sorted(zip(at, bad, strict=True), reverse=True):
        lines.insert(i, b)
    g = tmp_path / f"garbled{ext}"
    g.write_bytes(b"".join(lines))
    out = replay([g], model=None)
    assert out["frames"] == whole["frames"] > 0  # every good record, before and after the bad ones
    assert out["errors"]["log_bad_line"] == len(bad)


def test_db_into_a_missing_folder_is_an_error_and_creates_nothing(tmp_path: Path) -> None:
    log = shared_file("can/johndeere_5055e/highRPM1_candumpL.log")
    target = tmp_path / "no" / "such" / "folder" / "out.sqlite"
    r = _cli(str(log), "--db", str(target))
    _one_line_error(r, str(target.parent))
    assert not (tmp_path / "no").exists()


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(EXTS), st.binary(max_size=600) | st.text(max_size=400).map(str.encode))
def test_fuzzed_files_are_an_error_or_a_summary(ext: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"fuzz{ext}"
        p.write_bytes(data)
        try:
            out = replay([p], model=None)
        except ReplayError as e:
            assert p.name in str(e) and "\n" not in str(e)
            return
        assert out["frames"] > 0


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([".asc", ".trc", ".csv"]),
       st.lists(st.tuples(st.floats(0, 1),
                          st.binary(min_size=1, max_size=60).map(lambda b: b"\xff" + b.replace(b"\n", b""))
                          | st.text("abcdefxyzRTd <>;:-_.", min_size=1, max_size=60).map(str.encode)),
                max_size=6))
def test_fuzzed_lines_inside_a_text_log_lose_no_frame(ext: str, junk: list[tuple[float, bytes]]) -> None:
    """Hostile lines anywhere after the header (not UTF-8, or text that is no frame: no digits, no commas): every
    real frame still comes out, identical and in order; each line a reader failed on is counted."""
    from collections import Counter

    from agent.sources.logfile import open_log

    with tempfile.TemporaryDirectory() as d:
        src = _real_log(ext, Path(d))
        lines = src.read_bytes().splitlines(keepends=True)[:400]
        head = 6  # past each format's header
        clean = Path(d) / f"clean{ext}"
        clean.write_bytes(b"".join(lines))
        for where, b in sorted(junk, reverse=True):
            lines.insert(head + int(where * (len(lines) - head)), b + b"\n")
        dirty = Path(d) / f"dirty{ext}"
        dirty.write_bytes(b"".join(lines))

        def frames(p: Path) -> list[tuple[float, int, bytes]]:
            errs: Counter[str] = Counter()
            out = [(m.timestamp, m.arbitration_id, bytes(m.data)) for m in open_log(p, errs)]
            not_text = sum(1 for _, b in junk if b.startswith(b"\xff"))
            assert (not_text, 0)[p == clean] <= errs["log_bad_line"] <= (len(junk), 0)[p == clean]
            return out

        assert frames(dirty) == frames(clean)


@pytest.mark.parametrize("where", [0.3, 0.6, -1.0])
def test_corrupt_bytes_inside_a_blf_are_read_around_and_counted(tmp_path: Path, where: float) -> None:
    """A damaged stretch mid-file (a bad disk sector, a bit flip in a compressed container) costs the container it
    hits, not the rest of the file: reading resumes at the next object and the damage is counted."""
    src = shared_file("can/formats/jd5055e_highRPM1.blf")
    raw = bytearray(src.read_bytes())
    whole = replay([src], model=None)["frames"]  # 7,736 frames in 3 zlib containers of about 2,700
    if where >= 0:
        at = int(len(raw) * where)
        raw[at : at + 200] = bytes(random.Random(at).randrange(256) for _ in range(200))
    else:  # the second container's header claims 4 GB: the size lies, the signature does not
        second = raw.find(b"LOBJ", raw.find(b"LOBJ") + 1)
        raw[second + 8 : second + 12] = (0xFFFFFFF0).to_bytes(4, "little")
    bad = tmp_path / "bad.blf"
    bad.write_bytes(raw)
    r = _cli(str(bad))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    out = json.loads(r.stdout)
    assert whole - 3000 < out["frames"] < whole  # the damaged container is lost (zlib cannot resume), no more
    assert out["errors"]["log_bad_record"] >= 1


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=64)), min_size=1, max_size=5))
def test_fuzzed_blf_never_raises_past_the_reader(patches: list[tuple[float, bytes]]) -> None:
    """Random damage anywhere in a real BLF: a one-line LogUnreadable, or frames with the damage counted."""
    from collections import Counter

    from agent.sources.logfile import LogUnreadable, open_log

    raw = bytearray(shared_file("can/formats/jd5055e_highRPM1.blf").read_bytes())
    for where, b in patches:
        at = int(where * (len(raw) - 1))
        raw[at : at + len(b)] = b
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "fuzz.blf"
        p.write_bytes(bytes(raw[: len(raw)]))
        errs: Counter[str] = Counter()
        try:
            n = sum(1 for _ in open_log(p, errs))
        except LogUnreadable as e:
            assert "\n" not in str(e)
            return
        assert n > 0 and n <= 7736 + 64 * len(patches)


def test_replay_says_why_windows_were_not_scored(tmp_path: Path) -> None:
    # A truck that sends no coolant temperature: no window can be scored, and replay names what was missing.
    log = shared_file("can/css_canedge/css_asammdf-basics_00000001_candumpL.log")
    r = subprocess.run([sys.executable, "-m", "agent", "replay", str(log), "--json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= KEYS | {"windows_scored", "windows_unfamiliar", "windows_not_scored", "windows_with_required",
                               "missing_features", "unfamiliar_features", "required_features"}
    assert out["windows_scored"] == 0 and out["windows_not_scored"]["missing_features"] == out["windows"] > 0
    assert out["missing_features"]["ET1.EngCoolantTemp:mean:30s"] == out["windows"]
    human = subprocess.run([sys.executable, "-m", "agent", "replay", str(log)], capture_output=True, text=True,
                           timeout=120)
    assert human.returncode == 0, human.stderr
    assert f"not scored, features missing: {out['windows']}" in human.stdout
    assert "ET1.EngCoolantTemp:mean:30s (required)" in human.stdout
