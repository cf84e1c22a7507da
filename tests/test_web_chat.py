"""The assistant's chat panel on the fleet page: `POST /api/ask` over real HTTP from uvicorn (the answer as
`cloud-sync ask --json` gives it; the POST checks; sign-in; the knowledge base refreshed without a restart; a slow
question holding up neither the live stream nor more than its share of threads), and the panel in headless Chromium
over the workshop fleet (harvester_testing/workshop.py), with a vehicle whose id is markup. A screenshot of the panel
is kept (tests/test_web.py `shoot`)."""

from __future__ import annotations

import http.client
import json
import sqlite3
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_sync.assistant import Q_VEHICLES, Assistant, KnowledgeBase
from cloud_sync.assistant_understand import MAX_QUESTION_CHARS
from cloud_sync.config import AssistantConfig, WebConfig
from cloud_sync.db_sqlite import CloudDB
from cloud_sync.web import MAX_POST_BYTES
from cloud_sync.web.chat import MAX_ASKING, Chat
from harvester_common import wire
from harvester_testing import workshop
from tests import test_web
from tests.test_cloud_db import alert
from tests.test_web import HOSTILE, PASSWORD, PASSWORD_HASH, shoot
from tests.test_web_pages import request, serving

browser = test_web.browser  # the same headless Chromium fixture
NEEDS = "which harvesters need attention today"
KB_DOC = """---
title: Sieve chain tension
---
# Sieve chain tension

## Check first
Measure the sieve chain sag at the middle sprocket: more than 25 mm means tighten it.
"""


def build(path: Path) -> CloudDB:
    """The workshop fleet, and a vehicle whose id is markup with a coolant alert open today (so that the answer to
    NEEDS quotes it)."""
    db = CloudDB(path)
    workshop.build(db)
    db.ingest([wire.Batch(workshop.FLEET, HOSTILE, 1, [alert(1, "b0", "open", workshop.NOW - 3600)])])
    with db._lock, db._transaction() as cur:
        cur.execute(db._sql("UPDATE vehicles SET last_seen=? WHERE vehicle=?"), (workshop.NOW - 60, HOSTILE))
    return db


@pytest.fixture(scope="module")
def fleet_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "cloud.sqlite"
    build(path).close()
    return path


@pytest.fixture
def chat_site(fleet_path: Path, tmp_path: Path) -> Iterator[str]:
    db = CloudDB(fleet_path)
    cfg = AssistantConfig(kb_dirs=[tmp_path / "kb"], index_path=tmp_path / "kb.sqlite", refresh_s=0)
    (tmp_path / "kb").mkdir()
    with serving(db, sign_in=False, assistant=cfg, clock=lambda: workshop.NOW) as (site, _):
        yield site
    db.close()


def ask(site: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """POST `body` (any JSON value, null included) to /api/ask from the page's origin, unless `headers` say else."""
    u = urllib.parse.urlsplit(site)
    conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=30)
    try:
        conn.request("POST", "/api/ask", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", "Origin": site, **(headers or {})})
        r = conn.getresponse()
        status, raw = r.status, r.read()
    finally:
        conn.close()
    assert b"<" not in raw and b"Traceback" not in raw
    return status, json.loads(raw)


def test_ask_answers_as_the_cli_does_with_its_sources(chat_site: str, fleet_path: Path) -> None:
    status, got = ask(chat_site, {"question": NEEDS})
    assert status == 200 and set(got) == {"answer", "intent", "slots", "sources", "clarify"}
    db = CloudDB(fleet_path)
    kb = KnowledgeBase()
    try:
        want = json.loads(json.dumps(Assistant(db, kb).ask(NEEDS, now=workshop.NOW).to_dict()))
    finally:
        kb.close()
        db.close()
    assert got == want  # the same object `cloud-sync ask --json` prints, for the server's "now"
    assert got["intent"] == "needs_attention" and got["answer"].startswith("4 vehicles need attention today")
    assert HOSTILE in got["answer"]  # quoted as stored: the page must show it as text
    alerts = [k for s in got["sources"] if s["table"] == "alerts" for k in s["keys"]]
    assert {"vehicle": "H-007", "seq": 12007} in alerts and {"vehicle": HOSTILE, "seq": 1} in alerts
    # A question back, with the choices; "I don't know" when nothing matches; the knowledge base's sections.
    status, got = ask(chat_site, {"question": "what is wrong with vehicle 1"})
    assert status == 200 and got["clarify"] == ["H-001", "T-001"]
    status, got = ask(chat_site, {"question": "what is wrong with vehicle 1 (T-001)"})
    assert got["slots"]["vehicle"] == "T-001" and got["clarify"] is None
    status, got = ask(chat_site, {"question": "  what's the weather in Valencia?  "})
    assert status == 200 and got["intent"] == "unknown" and got["answer"].startswith("I don't know")
    status, got = ask(chat_site, {"question": "what does SPN 110 FMI 0 mean and what do we check first"})
    assert {"kind": "kb", "path": "cloud_sync/kb/spn-110-coolant-temperature.md", "heading": "Check first"} in \
        got["sources"]


def test_ask_is_checked_like_every_post(chat_site: str) -> None:
    assert ask(chat_site, {"question": "x" * MAX_QUESTION_CHARS})[0] == 200
    assert ask(chat_site, {"question": "x" * (MAX_QUESTION_CHARS + 1)}) == (
        400, {"error": f"the question is {MAX_QUESTION_CHARS + 1} characters: at most {MAX_QUESTION_CHARS} are read"})
    for body, error in (({"question": "  "}, "the question is empty"), ({"question": 7}, "question must be text"),
                        ({}, "question must be text"), (["why"], "the body must be a JSON object"),
                        ({"question": "why", "now": 0}, "unknown field 'now' (a question has only \"question\")")):
        assert ask(chat_site, body) == (400, {"error": error}), body
    assert ask(chat_site, {"question": "why"}, {"Content-Type": "text/plain"}) == (
        415, {"error": "the body must be application/json"})
    forged = "refused: a change is taken only from this server's own page (Origin or Referer)"
    assert ask(chat_site, {"question": "why"}, {"Origin": "http://evil.example"}) == (403, {"error": forged})
    assert ask(chat_site, {"question": "why"}, {"Origin": "null"}) == (403, {"error": forged})
    u = urllib.parse.urlsplit(chat_site)
    for data, status in ((b"{", 400), (b"\xff", 400), (b" " * (MAX_POST_BYTES + 1), 413)):
        conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=30)
        try:
            conn.request("POST", "/api/ask", body=data, headers={"Content-Type": "application/json",
                                                                   "Origin": chat_site})
            r = conn.getresponse()
            assert (r.status, json.loads(r.read())["error"]) == (status, {
                400: "the body is not JSON", 413: f"the body is over {MAX_POST_BYTES} bytes"}[status])
        finally:
            conn.close()
    status, _, raw = request(chat_site, "GET", "/api/ask")
    assert (status, json.loads(raw)) == (405, {"error": "method not allowed"})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.text(max_size=600).map(lambda q: {"question": q}),
                      st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                               lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=9), c,
                                                                                   max_size=3), max_leaves=8)))
def test_any_body_is_answered_or_refused_with_a_reason(chat_site: str, body: Any) -> None:
    status, got = ask(chat_site, body)
    if status == 200:
        assert isinstance(got["answer"], str) and got["answer"] and isinstance(got["sources"], list)
    else:
        assert status == 400 and set(got) == {"error"} and "\n" not in got["error"]


def test_ask_needs_sign_in_when_the_page_does(fleet_path: Path) -> None:
    db = CloudDB(fleet_path)
    try:
        with serving(db, WebConfig(require_sign_in=True, password_hash=PASSWORD_HASH),
                     clock=lambda: workshop.NOW) as (site, _):
            assert ask(site, {"question": NEEDS}) == (401, {"error": "sign in first (/signin)"})
            status, headers, _ = request(site, "POST", "/api/signin", {"password": PASSWORD})
            assert status == 200
            cookie = headers["set-cookie"].split(";")[0]
            status, got = ask(site, {"question": NEEDS}, {"Cookie": cookie})
            assert status == 200 and got["intent"] == "needs_attention"
            # The sign-in page has no panel: nothing can be asked there.
            _, _, page = request(site, "GET", "/signin")
            assert b'id="assistant"' not in page and b"chat.js" not in page
    finally:
        db.close()


def test_a_document_added_is_found_without_a_restart(chat_site: str, tmp_path: Path, fleet_path: Path) -> None:
    q = {"question": "how do I check the sieve chain tension"}
    assert "Sieve chain" not in ask(chat_site, q)[1]["answer"]
    (tmp_path / "kb" / "sieve.md").write_text(KB_DOC)
    status, got = ask(chat_site, q)  # [assistant] refresh_s = 0: looked at before every question
    assert status == 200 and "more than 25 mm means tighten it" in got["answer"]
    assert {"kind": "kb", "path": str(tmp_path / "kb" / "sieve.md"), "heading": "Check first"} in got["sources"]
    # With the default 30 s, a question right after the start does not walk the folders again.
    db = CloudDB(fleet_path)
    chat = Chat(db, AssistantConfig(kb_dirs=[tmp_path / "kb2"], index_path=tmp_path / "kb2.sqlite"))
    try:
        (tmp_path / "kb2").mkdir()
        (tmp_path / "kb2" / "sieve.md").write_text(KB_DOC)
        assert "Sieve chain" not in chat.ask(q["question"])["answer"]
        chat.refresh_s = 0
        assert "Sieve chain" in chat.ask(q["question"])["answer"]
    finally:
        chat.close()
        db.close()


class StalledDB(CloudDB):
    """The workshop database, where each question's first read (the vehicle list) waits for `go`: a question that
    takes as long as a test wants, while every other read runs as usual."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.go = threading.Event()
        self.waiting = threading.Semaphore(0)

    def read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if sql == Q_VEHICLES:
            self.waiting.release()
            assert self.go.wait(60)
        return super().read(sql, args)


def test_slow_questions_hold_up_neither_the_stream_nor_the_other_requests(fleet_path: Path) -> None:
    db = StalledDB(fleet_path)
    try:
        with serving(db, sign_in=False, clock=lambda: workshop.NOW) as (site, server):
            results: list[tuple[int, dict[str, Any]]] = []
            askers = [threading.Thread(target=lambda: results.append(ask(site, {"question": NEEDS})))
                      for _ in range(MAX_ASKING)]
            for t in askers:
                t.start()
            for _ in askers:
                assert db.waiting.acquire(timeout=60)  # every one of them is inside a stalled read
            # One more question is told to come back; the page's own requests and its live stream go on.
            status, headers, raw = request(site, "POST", "/api/ask", {"question": NEEDS})
            assert (status, headers["retry-after"]) == (503, "2")
            assert json.loads(raw) == {"error": f"{MAX_ASKING} questions are being answered: ask again in a moment"}
            status, _, raw = request(site, "GET", "/api/fleet")
            assert status == 200 and len(json.loads(raw)["vehicles"]) == 11
            u = urllib.parse.urlsplit(site)
            conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=30)
            try:
                conn.request("GET", "/api/stream")
                r = conn.getresponse()
                assert r.status == 200 and r.readline() == b"retry: 5000\n" and r.readline() == b"event: fleet\n"
            finally:
                conn.close()
            db.go.set()
            for t in askers:
                t.join(timeout=60)
            assert [s for s, _ in results] == [200] * MAX_ASKING
            assert ask(site, {"question": NEEDS})[0] == 200  # the places were given back
            assert server.chat.asking == 0
    finally:
        db.go.set()
        db.close()


class FailingDB(CloudDB):
    """The workshop database, where the assistant's vehicle list fails as a database gone wrong would."""

    def read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if sql == Q_VEHICLES:
            raise sqlite3.OperationalError("disk I/O error at /srv/secret/path")
        return super().read(sql, args)


def test_a_failing_question_is_a_clean_500_and_frees_its_place(fleet_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    db = FailingDB(fleet_path)
    try:
        with serving(db, sign_in=False, clock=lambda: workshop.NOW) as (site, server):
            for _ in range(MAX_ASKING + 1):  # more than the places: each failure gave its place back
                assert ask(site, {"question": NEEDS}) == (500, {"error": "internal error"})
            assert server.chat.asking == 0
            assert request(site, "GET", "/api/fleet")[0] == 200  # the rest of the page goes on
    finally:
        db.close()
    assert any("disk I/O error" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)  # said in the log


def test_the_panel_in_a_browser(chat_site: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(chat_site + "/")
    box = browser.find_element(By.ID, "chat-q")
    box.send_keys(NEEDS + Keys.ENTER)  # the keyboard alone: Enter asks
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-log li.answer:not(.pending)"))
    (answer,) = browser.find_elements(By.CSS_SELECTOR, "#chat-log li.answer")
    assert browser.find_element(By.CSS_SELECTOR, "#chat-log li.question").text == NEEDS
    text = answer.find_element(By.CSS_SELECTOR, ".text").text
    assert text.startswith("4 vehicles need attention today (2026-11-25):") and "H-007: open alert coolant_leak" in text
    # The vehicle whose id is markup is quoted as text; its script never ran.
    assert HOSTILE + ": open alert coolant_leak" in text
    assert browser.execute_script("return window.pwned") is None
    assert not browser.find_elements(By.CSS_SELECTOR, "#chat-log script")
    # Its sources: each table with the rows used, an alert's row linking to the alert's page, a vehicle's to its own.
    links = {a.text: a.get_attribute("href") for a in answer.find_elements(By.CSS_SELECTOR, ".sources a")}
    assert links["vehicle H-007, seq 12007"] == chat_site + "/alert/H-007/12007"
    assert links[f"vehicle {HOSTILE}, seq 1"] == chat_site + "/alert/" + urllib.parse.quote(HOSTILE, safe="") + "/1"
    assert links["vehicle H-004"] == chat_site + "/vehicle/H-004"
    tables = [e.text for e in answer.find_elements(By.CSS_SELECTOR, ".sources li.db > .table")]
    assert set(tables) == {"alerts", "events", "vehicles"}
    assert answer.find_element(By.CSS_SELECTOR, ".intent").text == "understood as needs_attention"

    # A question back: its choices are buttons that ask again with the choice.
    box.send_keys("what is wrong with vehicle 1" + Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat-log li.answer:not(.pending)")) == 2)
    buttons = browser.find_elements(By.CSS_SELECTOR, "#chat-log li.answer .choices button")
    assert [b.text for b in buttons] == ["H-001", "T-001"]
    buttons[1].click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat-log li.answer:not(.pending)")) == 3)
    questions = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#chat-log li.question")]
    assert questions[-1] == "what is wrong with vehicle 1 (T-001)"
    last = browser.find_elements(By.CSS_SELECTOR, "#chat-log li.answer")[-1]
    assert "T-001" in last.find_element(By.CSS_SELECTOR, ".text").text and "H-001" not in last.text

    # "I don't know" is shown as such; the knowledge base's sources name the document and the heading.
    box.send_keys("what's the weather in Valencia?" + Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat-log li.answer:not(.pending)")) == 4)
    last = browser.find_elements(By.CSS_SELECTOR, "#chat-log li.answer")[-1]
    assert "unknown" in last.get_attribute("class").split()
    assert last.find_element(By.CSS_SELECTOR, ".badge").text == "I don't know"
    box.send_keys("what does SPN 110 FMI 0 mean and what do we check first" + Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat-log li.answer:not(.pending)")) == 5)
    last = browser.find_elements(By.CSS_SELECTOR, "#chat-log li.answer")[-1]
    kb = [e.text for e in last.find_elements(By.CSS_SELECTOR, ".sources li.kb")]
    assert "document cloud_sync/kb/spn-110-coolant-temperature.md “Check first”" in kb
    # A refusal is said in the conversation, not thrown away.
    browser.execute_script("document.getElementById('chat-q').removeAttribute('maxlength')")
    box.send_keys("x" * 501 + Keys.ENTER)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-log li.answer.error"))
    assert browser.find_element(By.CSS_SELECTOR, "#chat-log li.answer.error").text == \
        "Not answered: the question is 501 characters: at most 500 are read"
    browser.execute_script("document.getElementById('assistant').scrollTop = 0")
    shoot(browser, "assistant")
    severe = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [chat_site + "/api/ask - Failed to load resource: the server responded with a status of 400 "
                      "(Bad Request)"]  # the refusal just asked for; no script error

    # A source's link leads to the vehicle's page, where the panel still holds the conversation.
    answer = browser.find_elements(By.CSS_SELECTOR, "#chat-log li.answer")[0]
    answer.find_element(By.LINK_TEXT, "vehicle H-004").click()
    wait.until(lambda d: d.current_url == chat_site + "/vehicle/H-004")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat-log li.answer")) == 6)
    assert browser.find_elements(By.CSS_SELECTOR, "#chat-log li.question")[0].text == NEEDS

    # On a narrow screen the panel starts folded above the page, and its button opens it.
    browser.set_window_size(600, 1000)
    browser.refresh()
    panel = browser.find_element(By.ID, "assistant")
    toggle = browser.find_element(By.ID, "chat-toggle")
    wait.until(lambda d: "collapsed" in panel.get_attribute("class").split())
    assert not browser.find_element(By.ID, "chat-q").is_displayed() and toggle.text == "Ask"
    assert toggle.get_attribute("aria-expanded") == "false"
    assert panel.location["y"] < browser.find_element(By.ID, "main").location["y"]
    toggle.click()
    assert browser.find_element(By.ID, "chat-q").is_displayed() and toggle.get_attribute("aria-expanded") == "true"
    shoot(browser, "assistant-narrow")
    browser.set_window_size(1200, 1600)


def test_cli_web_with_an_unusable_index_says_so_in_one_line(tmp_path: Path) -> None:
    """`cloud-sync web` opens the knowledge base before it listens: an index path holding something else is one
    line and exit 2, nothing served."""
    CloudDB(tmp_path / "cloud.sqlite").close()
    (tmp_path / "kb.sqlite").write_bytes(b"not a database, but the notes someone kept here" * 100)
    (tmp_path / "cloud.toml").write_text('[db]\npath = "cloud.sqlite"\n[assistant]\nindex_path = "kb.sqlite"\n')
    env = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "cloud_sync", "web", "--config", str(tmp_path / "cloud.toml"),
                        "--port", "0"], capture_output=True, text=True, timeout=120, env=env)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == (f"cloud-sync: error: {tmp_path / 'kb.sqlite'}: cannot use it as the knowledge base index: "
                        "file is not a database\n")
