"""The maintenance assistant (docs/assistant.md) over the workshop fleet (harvester_testing/workshop.py: samples
from the simulator, alerts, DTCs and drift reports as the agent writes them, stored through `FleetDB.ingest`): the
question set (tests/assistant_questions.json) on SQLite and on PostgreSQL, the plans of the queries that touch
samples, the knowledge base's index and hostile documents, `cloud-sync ask`, and fuzzed questions."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cloud_sync.assistant as ac
from cloud_sync.assistant import INTENTS, Assistant, KnowledgeBase
from cloud_sync.assistant_understand import parse
from cloud_sync.cli import main as cloud_main
from cloud_sync.database import open_db
from cloud_sync.db import FleetDB
from cloud_sync.db_sqlite import CloudDB
from harvester_testing import postgres, workshop

CASES = workshop.questions()


@pytest.fixture(scope="module")
def fleet_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudDB]:
    db = CloudDB(tmp_path_factory.mktemp("workshop") / "cloud.sqlite")
    workshop.build(db)
    yield db
    db.close()


@pytest.fixture(scope="module")
def assistant(fleet_db: CloudDB) -> Iterator[Assistant]:
    kb = KnowledgeBase()
    yield Assistant(fleet_db, kb)
    kb.close()


def test_the_question_set_is_large_and_covers_every_intent() -> None:
    assert len(CASES) >= 60
    assert {c["intent"] for c in CASES} == set(INTENTS)


@pytest.mark.parametrize("case", CASES, ids=[f"{i:02d}-{c['q'][:40]}" for i, c in enumerate(CASES)])
def test_question_set_on_sqlite(assistant: Assistant, case: dict[str, Any]) -> None:
    out = assistant.ask(case["q"], now=workshop.NOW).to_dict()
    score = workshop.check(out, case)
    assert score.intent_ok and score.answer_ok, f"{case['q']!r}: {score.missing}\n{out['answer']}"


def test_question_set_on_postgres(pg_server: postgres.TempPostgres, tmp_path: Path) -> None:
    """The same questions, the same answers, on the other engine (the SQL is shared; its types are not)."""
    db: FleetDB = open_db(pg_server.new_database("assistant"), tmp_path / "unused.sqlite")
    kb = KnowledgeBase()
    try:
        workshop.build(db)
        a = Assistant(db, kb)
        failed = []
        for case in CASES:
            score = workshop.check(a.ask(case["q"], now=workshop.NOW).to_dict(), case)
            if not (score.intent_ok and score.answer_ok):
                failed.append((case["q"], score.missing))
        assert not failed
    finally:
        kb.close()
        db.close()


def test_an_alerts_window_is_told_to_the_second(assistant: Assistant) -> None:
    """A model's window is 30 s: to the minute, its start and end read the same ("07:39 UTC to 07:39 UTC")."""
    out = assistant.ask("why did the last alert on h-002 fire", now=workshop.NOW)
    assert out.intent == "alert_why"
    m = re.search(r"The window it scored: (\S+ \S+) UTC to (\S+ \S+) UTC\.", out.answer)
    assert m is not None, out.answer
    start, end = m.groups()
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", start) and start < end


def test_every_answer_names_its_sources(assistant: Assistant) -> None:
    for case in CASES:
        out = assistant.ask(case["q"], now=workshop.NOW)
        if out.intent != "unknown":
            assert out.sources, case["q"]
        assert json.loads(out.to_json())["answer"] == out.answer


HOT = {
    "latest value of a signal": (ac.Q_LAST_SAMPLE, ("H-007", 1, workshop.NOW), "samples_by_signal_time"),
    "a vehicle's alerts in a span": (ac.Q_OPENED_V, ("H-007", 0.0, workshop.NOW), "alerts_by_vehicle_state_time"),
    "a vehicle's last alert of a fault": (ac.Q_LAST_FAULT, ("H-007", "coolant_leak"), "alerts_by_vehicle_state_time"),
    "a vehicle's DTC events": (ac.Q_DTC, ("H-007", "dtc_open"), "events_by_vehicle_kind_time"),
    "DTCs opened in a span": (ac.Q_DTC_SINCE, ("H-007", 0.0, workshop.NOW), "events_by_vehicle_kind_time"),
    "drift reports": (ac.Q_MARKS_DRIFT, ("H-007",), "events_by_vehicle_kind_time"),
    "a vehicle's alert openings": (ac.Q_MARKS_ALERTS, ("H-007",), "alerts_by_vehicle_state_time"),
    "the fleet's alerts in a span": (ac.Q_OPENED, (0.0, workshop.NOW), "alerts_by_time"),
}


@pytest.mark.parametrize("name", sorted(HOT))
def test_hot_queries_use_their_index(fleet_db: CloudDB, name: str) -> None:
    sql, args, index = HOT[name]
    plan = " | ".join(str(r[-1]) for r in fleet_db.read("EXPLAIN QUERY PLAN " + sql, args))
    assert index in plan, plan
    assert "SCAN samples" not in plan and "SCAN s " not in plan, plan
    if "LIMIT" in sql:  # the newest rows straight off the index: no sort of everything that matches first
        assert "TEMP B-TREE" not in plan, plan


def test_understanding_tolerates_typos_and_phrasing() -> None:
    vehicles = ["H-001", "H-007", "H-017", "T-001", "picker-north"]
    now = workshop.NOW
    for q in ("harvester 7", "H-007", "h7", "h-07", "harvster 7", "HARVESTER #7", "machine no. 7", "H007"):
        assert parse(f"what is wrong with {q}", vehicles, [], [], now).vehicle == "H-007", q
    assert parse("status of piker north", vehicles, [], [], now).vehicle == "picker-north"
    assert parse("status of vehicle 1", vehicles, [], [], now).vehicle_choices == ["H-001", "T-001"]
    assert parse("status of harvester 1", vehicles, [], [], now).vehicle == "H-001"
    assert parse("spn 110 fmi 0 on harvester 17", vehicles, [], [], now).vehicle == "H-017"
    spans = {q: parse(q, [], [], [], now).span for q in ("today", "yesterday", "last week", "this season",
                                                         "last 3 days", "past 12 hours")}
    assert all(s is not None and s.since < s.until <= now for s in spans.values())
    assert spans["this season"] is not None and spans["this season"].label == "this season (since 2026-10-01)"


def _doc(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_site_adds_documents_and_the_index_follows_them(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    doc = _doc(site / "picking-head.md", "---\ntitle: Picking head shaker\nfaults: shaker_wear\n---\n"
               "## Check first\nShaker bearings: grease them every 50 hours.\n")
    index = tmp_path / "kb.sqlite"
    kb = KnowledgeBase([site], index)
    hits = kb.search("shaker bearings")
    assert hits and hits[0].path == str(doc) and hits[0].heading == "Check first"
    assert kb.covering(fault="shaker_wear")[0].title == "Picking head shaker"
    kb.close()
    _doc(doc, "## Check first\nThe shaker's eccentric weights.\n")
    os.utime(doc, ns=(1, 1))  # a different mtime whatever the clock's resolution
    kb = KnowledgeBase([site], index)
    assert not [h for h in kb.search("shaker bearings") if h.path == str(doc) and "grease" in h.body]
    assert kb.search("eccentric weights")[0].path == str(doc)
    kb.close()
    doc.unlink()
    kb = KnowledgeBase([site], index)
    assert not kb.search("eccentric") and kb.search("coolant")  # the shipped documents stay
    kb.close()


def test_hostile_documents_are_skipped_and_said(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "huge.md").write_bytes(b"# big\n" + b"x" * (300 * 1024))
    (site / "binary.md").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    (site / "latin1.md").write_bytes("## Check first\nTempérature".encode("latin-1"))
    (site / "empty.md").write_bytes(b"")
    (site / "nofront.md").write_text("---\ntitle: never closed\nno body\n")
    _doc(site / "good.md", "## Check first\nThe auger chain tension.\n")
    kb = KnowledgeBase([site, tmp_path / "missing"], tmp_path / "kb.sqlite")
    why = dict(kb.skipped)
    assert set(why) == {str(site / "huge.md"), str(site / "binary.md"), str(site / "latin1.md"),
                        str(tmp_path / "missing")}
    assert "larger than" in why[str(site / "huge.md")] and "binary" in why[str(site / "binary.md")]
    assert "not UTF-8" in why[str(site / "latin1.md")]
    assert kb.search("auger chain")[0].path == str(site / "good.md")
    kb.close()
    kb = KnowledgeBase([site], tmp_path / "kb.sqlite")  # unchanged: not read again, still reported
    assert {str(site / "huge.md"), str(site / "binary.md")} <= set(dict(kb.skipped))
    kb.close()


def _config(tmp_path: Path, fleet_db: CloudDB, extra: str = "") -> Path:
    cfg = tmp_path / "cloud.toml"
    cfg.write_text(f'[db]\npath = "{fleet_db.path}"\n[assistant]\nindex_path = "kb.sqlite"\n{extra}')
    return cfg


def test_ask_command_json_and_text(tmp_path: Path, fleet_db: CloudDB, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, fleet_db)
    assert cloud_main(["ask", "what does spn 110 fmi 0 mean?", "--config", str(cfg), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["intent"] == "dtc_meaning" and "Engine Coolant Temperature" in out["answer"]
    assert {"answer", "intent", "sources"} <= set(out)
    assert any(s.get("path", "").endswith("spn-110-coolant-temperature.md") for s in out["sources"])
    assert cloud_main(["ask", "how do I check the fan belt", "--config", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "Belt tension" in text and "sources:" in text and "fan_wear.md" in text


def test_ask_command_bad_input_is_one_line_and_exit_2(tmp_path: Path, fleet_db: CloudDB,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[assistant]\nseason_start = \"13-45\"\n")
    nodb = tmp_path / "nodb.toml"
    nodb.write_text('[db]\npath = "nothing-here.sqlite"\n')
    for cfg in (bad, nodb, tmp_path / "missing.toml"):
        assert cloud_main(["ask", "which harvesters need attention today", "--config", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("cloud-sync: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "nothing-here.sqlite").exists()  # a question never creates a database


def test_ask_command_reports_a_sites_bad_document(tmp_path: Path, fleet_db: CloudDB,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "bad.md").write_bytes(b"\xff\xfe\x00junk")
    cfg = _config(tmp_path, fleet_db, f'kb_dirs = ["{site}"]\n')
    assert cloud_main(["ask", "spn 100 fmi 1", "--config", str(cfg)]) == 0
    captured = capsys.readouterr()
    assert "Engine Oil Pressure" in captured.out
    assert f"skipped {site / 'bad.md'}" in captured.err


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=300) | st.lists(st.sampled_from(
    ["why", "alert", "h7", "harvester", "7", "spn", "110", "fmi", "99", "since", "yesterday", "not", "synced",
     "model", "update", "coolant", "how", "many", "season", "#", "'s", "-", "vehicle", "1", "\x00", "\u202e",
     "a684caa9", "ffffff", "last", "3", "days", "what", "wrong"]), max_size=20).map(" ".join))
def test_any_question_gets_an_answer_not_a_traceback(assistant: Assistant, question: str) -> None:
    out = assistant.ask(question, now=workshop.NOW)
    assert out.intent in INTENTS and out.answer
    assert out.intent == "unknown" or out.sources or out.clarify is not None or out.intent == "how_to"
    json.loads(out.to_json())


def test_numbers_come_from_queries_not_from_documents(fleet_db: CloudDB, tmp_path: Path) -> None:
    """A document that states fleet figures (a site's notes, an old report) changes no figure in an answer."""
    site = tmp_path / "site"
    site.mkdir()
    _doc(site / "notes.md", "---\nfaults: coolant_leak\nspns: 110\n---\n## Check first\nH-007 had 99 coolant_leak "
         "alerts this season; SPN 110 was reported 42 times.\n")
    kb = KnowledgeBase([site], tmp_path / "kb.sqlite")
    a = Assistant(fleet_db, kb)
    history = a.ask("how many coolant alerts has h7 had this season", now=workshop.NOW)
    assert "this season (since 2026-10-01): 4." in history.answer and "99" not in history.answer
    meaning = a.ask("spn 110 fmi 0", now=workshop.NOW)
    assert "H-007 2 times" in meaning.answer and "42" not in meaning.answer
    kb.close()


def test_a_vehicles_dtc_words_follow_the_pages_rule(tmp_path: Path) -> None:
    """The assistant reads a stored DTC's words by the page's rule (DtcText.words): the vehicle's own when they name
    this SPN and FMI, else the table's; words about another DTC never stand for this one."""
    from harvester_common import wire

    db = CloudDB(tmp_path / "cloud.sqlite")
    t = workshop.NOW - 3600
    db.ingest([wire.Batch(workshop.FLEET, "H-900", 1, [
        wire.Segment("event", 1, 1, record={"kind": "dtc_open", "ts": t, "data": {
            "source": "can0/00", "sa": 0, "spn": 110, "fmi": 0, "text": "SPN 96 Fuel Level, FMI 0: fine"}}),
        wire.Segment("event", 2, 2, record={"kind": "dtc_open", "ts": t + 1, "data": {
            "source": "can0/00", "sa": 0, "spn": 520192, "fmi": 0,
            "text": "SPN 520192 Auger Bearing Temperature, FMI 0: above normal, most severe"}})])])
    kb = KnowledgeBase(index_path=tmp_path / "kb.sqlite")
    out = Assistant(db, kb).ask("how is H-900", now=workshop.NOW)
    kb.close()
    db.close()
    assert out.intent == "vehicle_status", out.answer
    assert "active DTC SPN 110 Engine Coolant Temperature, FMI 0: above normal, most severe" in out.answer
    assert "active DTC SPN 520192 Auger Bearing Temperature, FMI 0: above normal, most severe" in out.answer
    assert "Fuel Level" not in out.answer
