"""`harvester-agent replay` on real recorded logs: every format reads the same frames, the JSON summary carries
the keys fleet tools rely on, and bad files are one-line errors or counted, never tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.replay import ReplayError, replay
from agent.testing.data import shared_file

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
