"""Verdicts and breakdowns (docs/learning_loop.md, "Records") on both engines (conftest `cloud_db`), through
`FleetDB.add_verdict` / `add_breakdown` and the `cloud-sync alerts verdict|history`, `breakdown add|list` commands:
every change of verdict is kept with who and when, the verdict now is the latest, unknown and ambiguous alert ids
are refused with a sentence, and a refused verdict or breakdown stores nothing. Alerts get into the database as
vehicles send them: `FleetDB.ingest` of `harvester_common.wire` batches."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_sync.cli import main as cloud_main
from cloud_sync.db import FleetDB, LearningError
from cloud_sync.db_sqlite import CloudDB
from cloud_sync.learning import MAX_NOTE_CHARS, fault_name
from cloud_sync.reports import Reports
from cloud_sync.times import TimeError, parse_time
from harvester_common import wire
from tests.test_cloud_db import T0, alert, seed_fleet


@pytest.fixture
def db(cloud_db: FleetDB) -> FleetDB:
    seed_fleet(cloud_db)  # v1 holds alert a1 (open), v2 alert a2 (opened and closed), v3 none
    return cloud_db


def rows(db: FleetDB) -> tuple[int, int]:
    """How many verdicts and breakdowns are stored: what a refusal must leave unchanged."""
    return (int(db.read("SELECT COUNT(*) FROM verdicts")[0][0]), int(db.read("SELECT COUNT(*) FROM breakdowns")[0][0]))


def test_every_change_of_verdict_is_kept_with_who_and_when(db: FleetDB) -> None:
    first = db.add_verdict("a1", "false_alarm", by="bob", note="nothing found", at=T0 + 100)
    assert (first.vehicle, first.label, first.fault, first.by, first.at) == ("v1", "false_alarm", "", "bob", T0 + 100)
    # Confirmed without a fault: the alert's own label (the model's class) is the fault found.
    second = db.add_verdict("a1", "confirmed", by="alice", at=T0 + 200)
    assert (second.label, second.fault) == ("confirmed", "coolant_leak")
    # A mechanic who found something else names it; the name is made a fault name.
    third = db.add_verdict("a1", "confirmed", fault="Water pump-seal", note="pump, not hose", by=" carol ",
                           at=T0 + 300)
    assert (third.fault, third.by) == ("water_pump_seal", "carol")
    db.add_verdict("a2", "unknown", by="bob", at=T0 + 150)
    vehicle, history = db.verdict_history("a1")
    assert vehicle == "v1" and history == [first, second, third]  # nothing updated, nothing lost
    assert [(h.label, h.by, h.at) for h in history] == [
        ("false_alarm", "bob", T0 + 100), ("confirmed", "alice", T0 + 200), ("confirmed", "carol", T0 + 300)]
    now = db.verdicts_now()
    assert set(now) == {("v1", "a1"), ("v2", "a2")} and now[("v1", "a1")] == third
    assert now[("v2", "a2")].label == "unknown" and now[("v2", "a2")].fault == ""
    # Every alert record listed carries its alert's verdict now (both of a2's records).
    listed = {(a["vehicle"], a["seq"]): a["verdict"] for a in Reports(db).alerts()}
    assert listed[("v1", 1001)] == {"label": "confirmed", "fault": "water_pump_seal", "note": "pump, not hose",
                                    "by": "carol", "at": T0 + 300, "id": third.id}
    assert listed[("v2", 101)] == listed[("v2", 102)] and listed[("v2", 101)]["label"] == "unknown"
    assert db.verdict_history("a2", vehicle="v2")[1][0].label == "unknown"


def test_unknown_and_ambiguous_alert_ids(db: FleetDB) -> None:
    with pytest.raises(LearningError, match=r"^no alert 'nope' \(cloud-sync alerts lists them\)$"):
        db.add_verdict("nope", "confirmed", by="bob")
    with pytest.raises(LearningError, match="no alert 'a1' on vehicle 'v2'"):
        db.add_verdict("a1", "confirmed", by="bob", vehicle="v2")
    # Only a forged id can be stored for two vehicles: v3 sends an alert under v1's id.
    db.ingest([wire.Batch("f2", "v3", 1, [alert(1, "a1", "open", T0 + 60, label="fan_belt")])])
    with pytest.raises(LearningError, match=r"alert 'a1' is stored for several vehicles \('v1', 'v3'\): say which "
                                            "with --vehicle"):
        db.add_verdict("a1", "confirmed", by="bob")
    with pytest.raises(LearningError, match="several vehicles"):
        db.verdict_history("a1")
    assert rows(db) == (0, 0)
    mine = db.add_verdict("a1", "confirmed", by="bob", vehicle="v3")
    assert (mine.vehicle, mine.fault) == ("v3", "fan_belt")  # v3's alert, with v3's own label
    assert db.verdict_history("a1", vehicle="v1") == ("v1", [])
    assert db.verdict_history("a1", vehicle="v3") == ("v3", [mine])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"label": "maybe"}, "label must be one of confirmed, false_alarm, unknown, not 'maybe'"),
    ({"label": "false_alarm", "fault": "coolant_leak"}, "a false alarm found no fault"),
    ({"fault": "coolant leak!"}, "not a fault name: 'coolant leak!'"),
    ({"fault": "x" * 65}, "not a fault name"),
    ({"fault": "fuite\u00e9"}, "not a fault name"),
    ({"note": "n" * (MAX_NOTE_CHARS + 1)}, f"the note is {MAX_NOTE_CHARS + 1} characters long: at most "
                                           f"{MAX_NOTE_CHARS}"),
    ({"note": "a\x00b"}, "the note holds a NUL character, which the database cannot store"),
    ({"note": "\x1b[2J"}, "the note holds a control character"),
    ({"note": "bad byte \udcff"}, "the note is not valid text"),
    ({"by": ""}, "say who records it"),
    ({"by": "   "}, "say who records it"),
    ({"by": "b" * 65}, "who \\(by\\) is 65 characters long"),
    ({"by": "bob\u202e"}, "not printable"),
    ({"alert_id": ""}, "alert id must be a non-empty text"),
    ({"alert_id": "a" * 257}, "alert id is 257 characters long"),
    ({"alert_id": "a1\x00"}, "NUL"),
    ({"vehicle": "v1\udcff"}, "vehicle is not valid text"),
])
def test_a_bad_verdict_is_refused_with_a_sentence_and_nothing_is_stored(db: FleetDB, kwargs: dict[str, str],
                                                                         message: str) -> None:
    args = {"alert_id": "a1", "label": "confirmed", "by": "bob", **kwargs}
    with pytest.raises(LearningError, match=message):
        db.add_verdict(args.pop("alert_id"), args.pop("label"), **args)
    assert rows(db) == (0, 0)


def test_confirmed_needs_a_fault_when_the_alerts_label_is_not_one(db: FleetDB) -> None:
    db.ingest([wire.Batch("f1", "v1", 2, [alert(2001, "a5", "open", T0, label="<b>leak</b>"),
                                          wire.Segment("alert", 2002, 2002, record={"alert_id": "a6",
                                                                                    "state": "open", "label": [1]})])])
    for aid, shown in (("a5", "'<b>leak</b>'"), ("a6", "'[1]'")):
        with pytest.raises(LearningError, match=f"the label of alert '{aid}', {re.escape(shown)}, is not a fault name: "
                                                "name the fault found"):
            db.add_verdict(aid, "confirmed", by="bob")
    assert rows(db) == (0, 0)
    assert db.add_verdict("a5", "confirmed", fault="coolant_leak", by="bob").fault == "coolant_leak"
    assert db.add_verdict("a6", "unknown", by="bob").fault == ""


def test_breakdowns_of_known_vehicles_are_kept_and_read_by_time(db: FleetDB) -> None:
    b1 = db.add_breakdown("v2", T0 + 500, "Coolant leak", by="bob", note="hose burst\non the left",
                          recorded_at=T0 + 900)
    b2 = db.add_breakdown("v1", T0 + 100, "fan_belt", by="alice", recorded_at=T0 + 900)
    assert (b1.fault, b1.note, b1.recorded_at) == ("coolant_leak", "hose burst\non the left", T0 + 900)
    assert db.breakdowns() == [b2, b1]  # by time
    assert db.breakdowns(vehicle="v2") == [b1]
    assert db.breakdowns(since=T0 + 100, until=T0 + 500) == [b2]  # half-open
    with pytest.raises(LearningError, match=r"no vehicle 'v9' in the database"):
        db.add_breakdown("v9", T0, "fan_belt", by="bob")
    for at, message in ((T0 + 2 * 86400 + 901, "in the future"), (-1.0, "before 1970"),
                        (math.nan, "finite"), (math.inf, "finite")):
        with pytest.raises(LearningError, match=message):
            db.add_breakdown("v1", at, "fan_belt", by="bob", recorded_at=T0 + 86400)
    with pytest.raises(LearningError, match="not a fault name"):
        db.add_breakdown("v1", T0, "", by="bob")
    assert rows(db) == (0, 2)


texts = st.text(st.characters(codec="utf-8") | st.sampled_from("\x00\x1b\n\t\ud800\u202e "), max_size=80)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(label=st.sampled_from(["confirmed", "false_alarm", "unknown"]) | texts, fault=st.none() | texts,
       note=texts | st.text(min_size=1990, max_size=2010), by=texts)
def test_any_verdict_input_is_stored_exactly_or_refused_whole(db: FleetDB, label: str, fault: str | None,
                                                              note: str, by: str) -> None:
    before = rows(db)
    try:
        v = db.add_verdict("a2", label, fault=fault, note=note, by=by)
    except LearningError as e:
        assert "\n" not in str(e) and str(e)  # one sentence, one line
        assert rows(db) == before
        return
    assert rows(db) == (before[0] + 1, before[1])
    assert db.verdict_history("a2")[1][-1] == v  # read back exactly as stored, on both engines
    assert (v.label, v.note, v.by) == (label, note, by.strip())
    assert v.fault == (fault_name(fault) if fault else "coolant_leak" if label == "confirmed" else "")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(vehicle=st.sampled_from(["v1", "v2"]) | texts, at=st.floats(allow_nan=True, allow_infinity=True),
       fault=texts, note=texts)
def test_any_breakdown_input_is_stored_exactly_or_refused_whole(db: FleetDB, vehicle: str, at: float, fault: str,
                                                                note: str) -> None:
    before = rows(db)
    try:
        b = db.add_breakdown(vehicle, at, fault, note=note, by="bob", recorded_at=T0)
    except LearningError as e:
        assert "\n" not in str(e) and str(e)
        assert rows(db) == before
        return
    assert db.breakdowns(vehicle=vehicle)[-1] == b and (b.at, b.note) == (at, note)


# --- times ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-20T14:05", dt.datetime(2026, 11, 20, 14, 5, tzinfo=dt.UTC).timestamp()),
    ("2026-11-20 14:05:30", dt.datetime(2026, 11, 20, 14, 5, 30, tzinfo=dt.UTC).timestamp()),
    ("2026-11-20T14:05Z", dt.datetime(2026, 11, 20, 14, 5, tzinfo=dt.UTC).timestamp()),
    ("2026-11-20T16:05+02:00", dt.datetime(2026, 11, 20, 14, 5, tzinfo=dt.UTC).timestamp()),
    ("2026-11-20", dt.datetime(2026, 11, 20, tzinfo=dt.UTC).timestamp()),
    (" 1763647500 ", 1763647500.0),
    ("1763647500.25", 1763647500.25),
    ("1000000000", 1e9),
])
def test_times_are_iso_8601_in_utc_or_unix_seconds(text: str, expected: float) -> None:
    assert parse_time(text) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "nan", "inf", "-5", "1e9", "1763647500000", "2026-13-01",
                                  "2026-11-20T25:00", "\u0661\u0667\u0666\u0663", "3000-01-01", "2026-11-20T14:05 UTC",
                                  "20261120", "999999999.9", "0", "2026-11-20T14:05\x00"])
def test_what_is_not_a_time_is_refused(text: str) -> None:
    with pytest.raises(TimeError, match=r"^(not a time|time out of range): "):
        parse_time(text)


@given(st.text(max_size=40))
def test_any_text_is_a_time_or_a_time_error(text: str) -> None:
    try:
        t = parse_time(text)
    except TimeError as e:
        assert "\n" not in str(e)
        return
    assert 0 <= t < 32_503_680_000


@given(st.datetimes(min_value=dt.datetime(1970, 1, 2), max_value=dt.datetime(2999, 12, 30)))
def test_an_iso_time_reads_back_as_the_same_instant(when: dt.datetime) -> None:
    assert parse_time(when.isoformat()) == when.replace(tzinfo=dt.UTC).timestamp()


# --- the commands -----------------------------------------------------------------------------------------------


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    db = CloudDB(tmp_path / "cloud.sqlite")
    seed_fleet(db)
    db.close()
    p = tmp_path / "cloud.toml"
    p.write_text('[db]\npath = "cloud.sqlite"\n')
    return p


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cloud_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_verdict_and_history_commands(cfg: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    c = str(cfg)
    monkeypatch.setenv("USER", "mechanic1")
    code, out, _ = run(capsys, "alerts", "verdict", "a1", "--config", c, "--label", "false_alarm", "--note", "ok")
    assert code == 0 and out.startswith("verdict 1 on alert a1 (v1): false_alarm, by mechanic1\n")
    code, out, _ = run(capsys, "alerts", "verdict", "a1", "--config", c, "--label", "confirmed", "--by", "alice",
                       "--vehicle", "v1")
    assert code == 0 and "confirmed, fault coolant_leak, by alice; it replaces false_alarm (by mechanic1, " in out
    code, out, _ = run(capsys, "alerts", "history", "a1", "--config", c)
    lines = out.splitlines()
    assert code == 0 and lines[0] == "alert a1 on v1: confirmed now (2 verdicts)" and len(lines) == 4
    assert lines[2].split()[3:6] == ["mechanic1", "false_alarm", "-"] and lines[2].endswith(" ok")
    assert lines[3].split()[3:6] == ["alice", "confirmed", "coolant_leak"]
    code, out, _ = run(capsys, "alerts", "history", "a1", "--config", c, "--json")
    doc = json.loads(out)
    assert (doc["vehicle"], doc["verdict"]["by"], [h["label"] for h in doc["history"]]) == (
        "v1", "alice", ["false_alarm", "confirmed"])
    code, out, _ = run(capsys, "alerts", "history", "a2", "--config", c)
    assert out == "alert a2 on v2: no verdict yet\n"
    # The listing keeps working as before, each row with its alert's verdict now.
    code, out, _ = run(capsys, "alerts", "--config", c, "--vehicle", "v1")
    assert code == 0 and out.splitlines()[0].split()[-3:] == ["verdict", "top", "features"]
    assert "confirmed" in out.splitlines()[1]
    assert "alert id" in out.splitlines()[0] and out.splitlines()[1].split()[3] == "a1"  # what `verdict` takes
    code, out, _ = run(capsys, "alerts", "--config", c, "--json")
    assert {a["alert_id"]: (a["verdict"] or {}).get("label") for a in json.loads(out)["alerts"]} == {
        "a1": "confirmed", "a2": None}


@pytest.mark.parametrize(("argv", "error"), [
    (["alerts", "verdict", "nope", "--label", "confirmed"], "no alert 'nope' (cloud-sync alerts lists them)"),
    (["alerts", "verdict", "a1", "--label", "false_alarm", "--fault", "x"], "a false alarm found no fault"),
    (["alerts", "verdict", "a1", "--label", "confirmed", "--fault", "!"], "not a fault name: '!'"),
    (["alerts", "verdict", "a1", "--label", "confirmed", "--note", "x" * 2001], "the note is 2001 characters long"),
    (["alerts", "verdict", "a1", "--label", "confirmed", "--vehicle", "v2"], "no alert 'a1' on vehicle 'v2'"),
    # The vehicle named before the subcommand counts as much as after it (it is not dropped by the subparser).
    (["alerts", "--vehicle", "v2", "verdict", "a1", "--label", "confirmed"], "no alert 'a1' on vehicle 'v2'"),
    (["alerts", "--vehicle", "v2", "history", "a1"], "no alert 'a1' on vehicle 'v2'"),
    (["alerts", "history", "nope"], "no alert 'nope'"),
    (["breakdown", "add", "--vehicle", "v9", "--at", "2026-11-20T14:05", "--fault", "x"], "no vehicle 'v9'"),
    (["breakdown", "add", "--vehicle", "v1", "--at", "2999-01-01", "--fault", "x"], "a breakdown's time is in the "
                                                                                    "future"),
    (["breakdown", "add", "--vehicle", "v1", "--at", "2026-11-20", "--fault", "x y z!"], "not a fault name"),
    (["quality", "--since", "2026-11-20", "--until", "2026-11-01"], "the period is empty"),
])
def test_refused_commands_say_why_in_one_line_and_store_nothing(cfg: Path, capsys: pytest.CaptureFixture[str],
                                                                argv: list[str], error: str) -> None:
    by = ["--by", "bob"] if argv[:2] in (["alerts", "verdict"], ["breakdown", "add"]) else []
    code, out, err = run(capsys, *argv, "--config", str(cfg), *by)
    assert (code, out) == (2, "") and err.startswith("cloud-sync: error: ") and err.count("\n") == 1
    assert error in err
    db = CloudDB(cfg.parent / "cloud.sqlite")
    try:
        assert rows(db) == (0, 0)
    finally:
        db.close()


@pytest.mark.parametrize(("argv", "error"), [
    (["alerts", "verdict", "a1", "--label", "maybe"], "argument --label: invalid choice: 'maybe'"),
    (["alerts", "verdict", "a1"], "the following arguments are required: --label"),
    (["breakdown", "add", "--vehicle", "v1", "--at", "yesterday", "--fault", "x"],
     "argument --at: not a time: 'yesterday' (ISO 8601"),
    (["breakdown", "list", "--since", "1e9"], "argument --since: not a time: '1e9'"),
    (["quality", "--until", "nan"], "argument --until: not a time: 'nan'"),
    (["alerts"], "the following arguments are required: --config"),
])
def test_bad_arguments_are_usage_errors(cfg: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                        error: str) -> None:
    with pytest.raises(SystemExit) as e:
        cloud_main([*argv, *(["--config", str(cfg)] if argv != ["alerts"] else [])])
    err = capsys.readouterr().err
    assert e.value.code == 2 and error in err.splitlines()[-1]


def test_breakdown_commands(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = str(cfg)
    code, out, _ = run(capsys, "breakdown", "add", "--config", c, "--vehicle", "v2", "--at", "2026-11-20T14:05",
                       "--fault", "Coolant leak", "--note", "hose", "--by", "bob")
    assert (code, out) == (0, "breakdown 1 recorded: v2 at 2026-11-20 14:05:00 UTC, coolant_leak, by bob\n")
    run(capsys, "breakdown", "add", "--config", c, "--vehicle", "v1", "--at", "1763000000", "--fault", "fan_belt",
        "--by", "alice")
    code, out, _ = run(capsys, "breakdown", "list", "--config", c)
    lines = out.splitlines()
    assert code == 0 and [ln.split()[0] for ln in lines[1:]] == ["2", "1"]  # by time
    assert lines[2].split()[1:6] == ["2026-11-20", "14:05:00", "v2", "coolant_leak", "bob"]
    code, out, _ = run(capsys, "breakdown", "list", "--config", c, "--vehicle", "v2", "--json")
    assert [(b["vehicle"], b["fault"], b["note"]) for b in json.loads(out)["breakdowns"]] == [
        ("v2", "coolant_leak", "hose")]
    code, out, _ = run(capsys, "breakdown", "list", "--config", c, "--since", "2026-11-20T14:05:01")
    assert out.splitlines()[-1] == "(no breakdowns match)"


def test_hostile_stored_text_is_escaped_in_the_tables(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = CloudDB(cfg.parent / "cloud.sqlite")
    evil = "a\x1b[2J\u202e"
    db.ingest([wire.Batch("f1", "v1", 9, [alert(5001, evil, "open", T0, label="coolant_leak")])])
    db.add_verdict(evil, "confirmed", by="bob", note="line one\nFAKE ROW")
    db.close()
    code, out, _ = run(capsys, "alerts", "history", evil, "--config", str(cfg))
    assert code == 0 and "a\\x1b[2J\\u202e" in out and "line one\\nFAKE ROW" in out
    assert len(out.splitlines()) == 3 and "\x1b" not in out


argv_texts = st.text(st.characters(codec="utf-8", exclude_characters="\x00") | st.sampled_from("\udcff\x1b\n"),
                     max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(label=st.sampled_from(["confirmed", "false_alarm", "unknown", "maybe", ""]), fault=st.none() | argv_texts,
       note=argv_texts, by=argv_texts, at=argv_texts | st.sampled_from(["2026-09-21T15:00", "1790000000"]))
def test_any_command_line_stores_what_it_says_or_fails_in_one_line(
        cfg: Path, capsys: pytest.CaptureFixture[str], label: str, fault: str | None, note: str, by: str,
        at: str) -> None:
    """What a shell can pass (argv never holds NUL; a byte that is not UTF-8 arrives as a lone surrogate): exit 0
    with the row stored, or exit 2 with one line and nothing stored. Never a traceback."""
    db = CloudDB(cfg.parent / "cloud.sqlite")
    before = rows(db)
    db.close()
    argv = ["alerts", "verdict", "a1", "--config", str(cfg), f"--label={label}", f"--note={note}", f"--by={by}",
            *([f"--fault={fault}"] if fault is not None else [])]
    for args, added in ((argv, (1, 0)), (["breakdown", "add", "--config", str(cfg), "--vehicle", "v1",
                                          f"--at={at}", f"--fault={fault or 'x'}", f"--by={by}"], (0, 1))):
        try:
            code = cloud_main(args)
        except SystemExit as e:  # argparse's own refusal (a label not among the choices, a time that is none)
            code = int(e.code or 0)
        err = capsys.readouterr().err
        db = CloudDB(cfg.parent / "cloud.sqlite")
        after = rows(db)
        db.close()
        assert code in (0, 2), err
        if code == 0:
            assert after == (before[0] + added[0], before[1] + added[1]) and err == ""
        else:
            lines = err.splitlines()
            assert after == before and "Traceback" not in err
            # Ours is one line; argparse's own refusals put their usage lines first.
            assert lines[-1].startswith("cloud-sync") and ": error: " in lines[-1]
            assert len(lines) == 1 or lines[0].startswith("usage: ")
        before = after
