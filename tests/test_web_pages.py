"""The fleet page's own pages and its live side, over real HTTP from uvicorn and in headless Chromium: a page per
vehicle (its history over a chosen period, DTCs in words) and per alert (the plots), live updates by server-sent
events (and their bound and shutdown), sign-in (hash, cookie, rate limit), and the wheel carrying the templates and
static files. A screenshot of each page is kept (tests/test_web.py `shoot`)."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_sync.config import WebConfig
from cloud_sync.db import FleetDB
from cloud_sync.db_sqlite import CloudDB
from cloud_sync.web import Api, SignInError, WebServer, make_server
from cloud_sync.web.api import dtc_row
from cloud_sync.web.signin import Sessions, Throttle, check_password
from harvester_common import backfill, wire
from tests import test_web
from tests.test_cloud_db import T0, alert, samples, seed_fleet
from tests.test_web import HOSTILE, PASSWORD, PASSWORD_HASH, check_alert_plot, shoot

browser = test_web.browser  # the same headless Chromium fixture
REPO = Path(__file__).resolve().parent.parent

# Words a vehicle sends for a DTC its DBC names with markup: about this DTC, so shown, as text.
HOSTILE_WORDS = f"SPN 5246 {HOSTILE}, FMI 31: condition exists"


def ev(seq: int, kind: str, ts: float, data: dict[str, Any]) -> wire.Segment:
    return wire.Segment("event", seq, seq, record={"kind": kind, "ts": ts, "data": data})


def seed_history(db: FleetDB) -> None:
    """seed_fleet, and for v1 the history its page shows: DTCs as today's vehicles send them (with their words) and
    as older ones did (numbers only), one whose text is markup, a DM2 answer, a drift report, an eviction report, and
    a DTC a month before (outside the period the tests choose); and a vehicle whose id is markup."""
    seed_fleet(db)
    db.ingest([wire.Batch("f1", "v1", 2, [
        ev(1002, "dtc_open", T0 + 30, {"source": "can0", "sa": 0, "spn": 110, "fmi": 0, "occurrence": 1, "mil": 1,
                                       "amber_warning": 1, "spn_name": "Engine Coolant Temperature",
                                       "fmi_text": "above normal, most severe",
                                       "text": "SPN 110 Engine Coolant Temperature, FMI 0: above normal, most severe"}),
        ev(1003, "dtc_close", T0 + 60, {"source": "can0", "sa": 0, "spn": 110, "fmi": 0, "occurrence": 1}),
        ev(1004, "dtc_open", T0 + 40, {"source": "can1", "sa": 3, "spn": 5246, "fmi": 31, "text": HOSTILE_WORDS}),
        ev(1005, "drift", T0 + 70, {"drift": True, "model": "harvester-anomaly", "model_version": "1.0.0",
                                    "drifted": ["AMB.AmbientAirTemp:mean:30s"]}),
        ev(1006, "evicted", T0 + 75, {"ranges": [[2000, 2009]], "count": 10, "samples": 10, "records": 0}),
        ev(1007, "dtc_previous", T0 + 80, {"source": "can0", "sa": 0, "dtcs": [{"spn": 100, "fmi": 1,
                                                                                "occurrence": 3}]}),
        ev(1008, "dtc_open", T0 - 30 * 86400, {"source": "can0", "sa": 0, "spn": 110, "fmi": 0}),
    ])])
    # What v1 says is active now (docs/protocol.md "Status"): one DTC with its lamps, one whose words are markup,
    # one not well typed (ignored), and more than it listed.
    db.set_status("f1", "v1", {"state": "online", "model_version": "1.0.0", "ts": T0 + 90,
                               "backlog": {"samples": 500, "records": 1}, "evicted": {"samples": 0, "records": 0},
                               "budget": {"used_today": 3 * 1048576, "daily_bytes": 50 * 1048576},
                               "drift": {"enabled": True, "drift": True, "features": ["AMB.AmbientAirTemp:mean:30s"]},
                               "dtcs": {"active": [
                                   {"source": "can0/00", "spn": 110, "fmi": 0, "occurrence": 2, "mil": 0,
                                    "red_stop": 1, "amber_warning": 0, "protect": 0},
                                   {"source": "can1/03", "spn": 5246, "fmi": 31, "occurrence": None,
                                    "text": HOSTILE_WORDS},
                                   {"source": "can0/00", "spn": 2**19, "fmi": 0}], "more": 3}})
    db.ingest([wire.Batch("f1", HOSTILE, 1, [samples(1, 10), alert(11, "a9", "open", T0 + 5),
                                             alert(12, "a10", "open", T0 + 6, label="overspeed",
                                                   top_features=[["EEC1.EngSpeed:max:30s", 0.7]])])])


@contextmanager
def serving(db: CloudDB, cfg: WebConfig | None = None, **kw: Any) -> Iterator[tuple[str, WebServer]]:
    server = make_server(db, "127.0.0.1", 0, cfg=cfg, **kw)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()
        server.server_close()
        t.join(timeout=30)
        assert not t.is_alive()


@pytest.fixture
def history(tmp_path: Path) -> Iterator[str]:
    db = CloudDB(tmp_path / "cloud.sqlite")
    seed_history(db)
    with serving(db) as (site, _):
        yield site
    db.close()


def request(site: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
            ) -> tuple[int, dict[str, str], bytes]:
    u = urllib.parse.urlsplit(site)
    conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=30)
    h = dict(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        h.setdefault("Content-Type", "application/json")
        h.setdefault("Origin", site)
    try:
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


PERIOD = f"since={int(T0 - 3600)}&until={int(T0 + 3600)}"


def test_vehicle_history_endpoint(history: str) -> None:
    status, _, body = request(history, "GET", "/api/vehicle/v1?" + PERIOD)
    assert status == 200 and b"<" not in body
    d = json.loads(body)
    assert d["vehicle"]["vehicle"] == "v1" and d["vehicle"]["online"] and d["period"] == [T0 - 3600, T0 + 3600]
    assert [(a["seq"], a["alert_id"], a["label"]) for a in d["alerts"]] == [(1001, "a1", "coolant_leak")]
    # Newest first; the month-old DTC is outside the period. An older event's words are made from its numbers.
    assert [(x["seq"], x["kind"], x["spn"], x["fmi"], x["text"]) for x in d["dtcs"]] == [
        (1007, "dtc_previous", None, None, "previously active: SPN 100 Engine Oil Pressure, FMI 1: below normal, "
                                           "most severe"),
        (1003, "dtc_close", 110, 0, "SPN 110 Engine Coolant Temperature, FMI 0: above normal, most severe"),
        (1004, "dtc_open", 5246, 31, HOSTILE_WORDS),  # the vehicle's own words, markup and all: shown as text
        (1002, "dtc_open", 110, 0, "SPN 110 Engine Coolant Temperature, FMI 0: above normal, most severe")]
    assert d["dtcs"][3]["lamps"] == ["mil", "amber_warning"] and d["dtcs"][1]["spn_name"] == \
        "Engine Coolant Temperature"
    # What the vehicle's status says is active now, whatever the period: its own set, words by the one rule.
    assert d["active_dtcs"] == {"from": "status", "more": 3, "ignored": 1, "reported": T0 + 90, "active": [
        {"source": "can0/00", "spn": 110, "fmi": 0, "occurrence": 2, "lamps": ["red_stop"],
         "text": "SPN 110 Engine Coolant Temperature, FMI 0: above normal, most severe"},
        {"source": "can1/03", "spn": 5246, "fmi": 31, "occurrence": None, "lamps": [], "text": HOSTILE_WORDS}]}
    status, _, body = request(history, "GET", "/api/vehicle/v2")
    assert status == 200 and json.loads(body)["active_dtcs"]["from"] == "events"  # its status lists none
    assert d["drift"] == [{"seq": 1005, "ts": T0 + 70, "drift": True, "model": "harvester-anomaly",
                           "model_version": "1.0.0", "drifted": ["AMB.AmbientAirTemp:mean:30s"]}]
    assert d["evictions"] == [{"seq": 1006, "ts": T0 + 75, "ranges": [[2000, 2009]], "seqs": 10, "samples": 10,
                               "records": 0}]
    assert d["models"] == [{"model": "harvester-anomaly", "version": "1.0.0", "first": T0 + 50, "last": T0 + 70,
                            "alerts": 1, "drift_reports": 1}]
    assert d["truncated"] == []
    # The whole history when no period is chosen: the week back from its last contact (now) reaches none of it.
    d = json.loads(request(history, "GET", "/api/vehicle/v1")[2])
    assert d["alerts"] == [] and d["period"][1] - d["period"][0] == pytest.approx(7 * 86400, abs=5)
    d = json.loads(request(history, "GET", f"/api/vehicle/v1?since={int(T0 - 40 * 86400)}&until={int(T0)}")[2])
    assert [x["seq"] for x in d["dtcs"]] == [1008]
    assert request(history, "GET", "/api/vehicle/nobody")[:1] == (404,)
    assert json.loads(request(history, "GET", "/api/vehicle/nobody")[2]) == {"error": "no such vehicle"}
    status, _, body = request(history, "GET", f"/api/vehicle/v1?since={int(T0)}&until={int(T0)}")
    assert (status, json.loads(body)) == (400, {"error": "the period is empty: since must be before until"})
    status, _, body = request(history, "GET", "/api/vehicle/v1?since=yesterday")
    assert status == 400 and json.loads(body)["error"].startswith("since: not a time: 'yesterday'")
    # Pages: one per vehicle and per alert, the ids as the client quoted them (a "/" in an id is %2F).
    for path in ("/vehicle/v1", "/vehicle/" + urllib.parse.quote(HOSTILE, safe=""), "/alert/v1/1001"):
        status, headers, body = request(history, "GET", path)
        assert status == 200 and headers["content-type"].startswith("text/html"), path
        assert b"<script>window" not in body  # the markup id is escaped in the page (data-vehicle, title)
    assert request(history, "GET", "/alert/v1/x")[0] == 400
    assert request(history, "GET", "/alert/v1")[0] == 404


def test_history_and_stream_queries_on_both_engines(cloud_db: FleetDB) -> None:
    """What the vehicle page and the live stream read, on SQLite and on PostgreSQL alike."""
    seed_history(cloud_db)
    api = Api(cloud_db, WebConfig())
    d = api.vehicle("v1", {"since": [str(T0 - 3600)], "until": [str(T0 + 3600)]})
    assert d is not None
    assert [x["seq"] for x in d["dtcs"]] == [1007, 1003, 1004, 1002] and [a["seq"] for a in d["alerts"]] == [1001]
    assert [x["seq"] for x in d["drift"]] == [1005] and [x["seq"] for x in d["evictions"]] == [1006]
    assert api.vehicle("nobody", {}) is None
    marks = api.alert_marks()
    assert marks == {"v1": (1, 1001), "v2": (2, 102), HOSTILE: (2, 12)}
    cloud_db.ingest([wire.Batch("f1", "v2", 2, [alert(103, "a3", "open", T0 + 200), alert(104, "a3", "closed",
                                                                                            T0 + 260)])])
    now = api.alert_marks()
    assert now["v2"] == (4, 104)
    assert [(a["seq"], a["state"]) for a in api.alerts_after(marks, now)] == [(104, "closed"), (103, "open")]
    assert api.alerts_after(now, now) == []
    # A record backfilled below the highest seq (v1 still holds 1002..1499): the marks change, so the stream says
    # so, though it is not among the ones above the old highest.
    cloud_db.ingest([wire.Batch("f1", "v1", 3, [samples(1500, 10, T0 + 10_000), alert(1600, "a7", "open", T0 + 300)],
                                extra={backfill.KEY: 1010})])
    before = api.alert_marks()
    cloud_db.ingest([wire.Batch("f1", "v1", 4, [alert(1010, "a8", "open", T0 + 250)], extra={backfill.KEY: 1011})])
    after = api.alert_marks()
    assert before["v1"] == (2, 1600) and after["v1"] == (3, 1600) and api.alerts_after(before, after) == []
    one = api.alert("v1", "1001")
    assert one is not None and one["units"] == {"ET1.EngCoolantTemp": "degC"} and one["top"] == ["ET1.EngCoolantTemp"]


def test_a_vehicles_words_about_another_dtc_are_not_shown_for_this_one() -> None:
    """The page's rule is the assistant's (DtcText.words): words that do not name this SPN and FMI are replaced by
    the table's, and the vehicle's SPN name and FMI text go with them."""
    row = dtc_row(1, "dtc_open", T0, {"spn": 110, "fmi": 0, "spn_name": "Fuel Level", "fmi_text": "fine",
                                      "text": "SPN 96 Fuel Level, FMI 0: above normal, most severe"})
    assert (row["text"], row["spn_name"], row["fmi_text"]) == (
        "SPN 110 Engine Coolant Temperature, FMI 0: above normal, most severe", "Engine Coolant Temperature",
        "above normal, most severe")
    own = dtc_row(1, "dtc_open", T0, {"spn": 520192, "fmi": 0, "spn_name": "Auger Bearing Temperature",
                                      "text": "SPN 520192 Auger Bearing Temperature, FMI 0: above normal, most severe"})
    assert (own["text"], own["spn_name"]) == ("SPN 520192 Auger Bearing Temperature, FMI 0: above normal, most "
                                              "severe", "Auger Bearing Temperature")


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["dtc_open", "dtc_close", "dtc_previous", "dtc_flapping", "dtc_storm", "dtc_update"]),
       data=st.dictionaries(st.sampled_from(["spn", "fmi", "text", "dtcs", "sa", "source", "occurrence", "mil",
                                             "events", "window_s", "transitions", "state", "spn_name"]),
                            st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                                         lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c,
                                                                                              max_size=3),
                                         max_leaves=8)))
def test_a_dtc_event_of_any_shape_gives_a_row(kind: str, data: dict[str, Any]) -> None:
    """A vehicle's DTC event is hostile input: whatever its data holds, the row is typed, never an exception."""
    row = dtc_row(1, kind, T0, data)
    assert isinstance(row["text"], str) and isinstance(row["lamps"], list)
    assert all(row[k] is None or (isinstance(row[k], int) and not isinstance(row[k], bool))
               for k in ("spn", "fmi", "sa", "occurrence"))
    json.dumps(row, allow_nan=False)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(vehicle=st.text(min_size=1, max_size=40), seq=st.text(max_size=25), since=st.text(max_size=30))
def test_any_vehicle_seq_or_period_in_a_path_is_answered_not_failed(history: str, vehicle: str, seq: str,
                                                                     since: str) -> None:
    """Whatever a client puts in the page's paths and period, the answer is a page, 400 or 404 with a reason, never
    a 500 (the reason of which would be in the log) and never the text raw."""
    v, q = urllib.parse.quote(vehicle, safe=""), urllib.parse.quote(seq, safe="")
    for path in (f"/api/vehicle/{v}?since={urllib.parse.quote(since)}", f"/api/alert/{v}/{q}", f"/vehicle/{v}",
                 f"/alert/{v}/{q}"):
        status, headers, body = request(history, "GET", path)
        assert status in (200, 400, 404), (path, status, body)
        if headers["content-type"].startswith("application/json"):
            assert b"<" not in body and (status == 200 or "error" in json.loads(body))


def test_vehicle_and_alert_pages_in_a_browser(history: str, browser: Any) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 15, ignored_exceptions=(StaleElementReferenceException,))
    loaded = lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "1"  # noqa: E731

    def table(name: str) -> list[list[str]]:
        return [[td.text for td in r.find_elements(By.TAG_NAME, "td")]
                for r in browser.find_elements(By.CSS_SELECTOR, f"table#{name} tbody tr")]

    # From the fleet page, the vehicle's link opens its page.
    browser.get(history + "/")
    wait.until(loaded)
    browser.find_element(By.CSS_SELECTOR, "table#fleet tr[data-vehicle='v1'] td.vehicle a").click()
    wait.until(lambda d: d.current_url == history + "/vehicle/v1" and loaded(d))
    assert browser.find_element(By.ID, "v-title").text == "f1/v1"
    assert table("v-alerts")[0] == ["No alert in this period."]  # the week to now: the seeded history is older
    # A chosen period, set in the form: the address follows, so the link can be shared.
    browser.find_element(By.ID, "v-since").send_keys("2026-09-21T13:00")
    browser.find_element(By.ID, "v-until").send_keys("2026-09-21T15:00")
    browser.find_element(By.CSS_SELECTOR, "#period-form button[type=submit]").click()
    wait.until(lambda d: len(table("v-dtcs")) == 4)
    assert browser.current_url == history + "/vehicle/v1?since=2026-09-21T13%3A00&until=2026-09-21T15%3A00"
    assert [r[:2] + r[3:6] for r in table("v-dtcs")] == [
        ["2026-09-21 14:14:40", "previous", "", "", "previously active: SPN 100 Engine Oil Pressure, FMI 1: below "
                                                   "normal, most severe"],
        ["2026-09-21 14:14:20", "close", "110", "0", "SPN 110 Engine Coolant Temperature, FMI 0: above normal, most "
                                                    "severe"],
        ["2026-09-21 14:14:00", "open", "5246", "31", HOSTILE_WORDS],
        ["2026-09-21 14:13:50", "open", "110", "0", "SPN 110 Engine Coolant Temperature, FMI 0: above normal, most "
                                                   "severe"]]
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "table#v-dtcs tr:last-child span.lamp")] == [
        "mil", "amber warning"]
    assert table("v-active-dtcs") == [
        ["can0/00", "110", "0", "SPN 110 Engine Coolant Temperature, FMI 0: above normal, most severe", "red stop",
         "2"],
        ["can1/03", "5246", "31", HOSTILE_WORDS, "", ""]]
    assert browser.find_element(By.ID, "v-active-from").text == \
        "as the vehicle's status of 2026-09-21 14:14:50 UTC lists them; 3 more not listed; 1 malformed ignored"
    assert table("v-alerts") == [["2026-09-21 14:14:10", "open", "coolant_leak", "0.93", "harvester-anomaly 1.0.0",
                                  "-", "ET1.EngCoolantTemp:mean:30s"]]
    assert table("v-drift") == [["2026-09-21 14:14:30", "drifted", "harvester-anomaly 1.0.0",
                                 "AMB.AmbientAirTemp:mean:30s"]]
    assert table("v-models") == [["harvester-anomaly", "1.0.0", "2026-09-21 14:14:10", "2026-09-21 14:14:30", "1",
                                  "1"]]
    assert table("v-evictions") == [["2026-09-21 14:14:35", "2000\u20132009", "10", "10", "0"]]
    status = browser.find_element(By.ID, "v-status").text
    assert "1.0.0" in status and "3.0 / 50.0 MiB today" in status
    assert browser.execute_script("return window.pwned === undefined")
    shoot(browser, "vehicle")
    # Opened from its address alone, the same period shows.
    browser.get(history + "/vehicle/v1?since=2026-09-21T13:00&until=2026-09-21T15:00")
    wait.until(lambda d: loaded(d) and len(table("v-dtcs")) == 4)

    # The alert's own page, from the vehicle page's alert link: its plot as on the fleet page.
    browser.find_element(By.CSS_SELECTOR, "table#v-alerts td.time a").click()
    wait.until(lambda d: d.current_url == history + "/alert/v1/1001" and loaded(d))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#detail div.plot canvas"))
    assert browser.find_element(By.ID, "vehicle-link").get_attribute("href") == history + "/vehicle/v1"
    assert browser.find_element(By.CSS_SELECTOR, "#detail h2").text == \
        "Alert on v1: coolant_leak (open), score 0.93"
    shoot(browser, "alert")
    check_alert_plot(browser, T0)
    # The markup vehicle's pages: its id is text everywhere, nothing ran.
    browser.get(history + "/vehicle/" + urllib.parse.quote(HOSTILE, safe=""))
    wait.until(loaded)
    assert browser.find_element(By.ID, "v-title").text == "f1/" + HOSTILE
    assert table("v-active-dtcs") == [["Not reported by this vehicle."]]
    browser.get(history + "/alert/" + urllib.parse.quote(HOSTILE, safe="") + "/11")
    wait.until(lambda d: loaded(d) and d.find_elements(By.CSS_SELECTOR, "#detail div.plot canvas"))
    assert browser.execute_script("return window.pwned === undefined")
    # An alert whose top feature is one signal and whose snapshot names another: the top one first and marked,
    # each with its own unit.
    browser.get(history + "/alert/" + urllib.parse.quote(HOSTILE, safe="") + "/12")
    wait.until(lambda d: loaded(d) and len(d.find_elements(By.CSS_SELECTOR, "#detail div.plot canvas")) == 2)
    plots = browser.find_elements(By.CSS_SELECTOR, "#detail div.plot")
    assert [(p.get_attribute("data-signal"), p.get_attribute("data-unit"), "top" in p.get_attribute("class").split(),
             [b.text for b in p.find_elements(By.CSS_SELECTOR, ".badge")]) for p in plots] == [
        ("EEC1.EngSpeed", "rpm", True, ["top feature 1 · contribution 0.70"]),
        ("ET1.EngCoolantTemp", "degC", False, [])]
    shoot(browser, "alert-two-signals")
    errors = [e for e in browser.get_log("browser") if e.get("level") in ("SEVERE", "WARNING")]
    assert errors == [], errors


def read_events(resp: http.client.HTTPResponse, n: int) -> list[tuple[str, Any]]:
    """The next `n` events of a text/event-stream (comments and `retry:` lines skipped)."""
    out: list[tuple[str, Any]] = []
    name, data = "", ""
    while len(out) < n:
        line = resp.readline().decode()
        assert line, "the stream ended"
        line = line.rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and name:
            out.append((name, json.loads(data)))
            name, data = "", ""
    return out


def open_stream(site: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    u = urllib.parse.urlsplit(site)
    conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=30)
    conn.request("GET", "/api/stream")
    return conn, conn.getresponse()


def test_live_stream_sends_the_fleet_and_new_alerts_and_is_bounded(tmp_path: Path) -> None:
    """/api/stream over real HTTP: the fleet at once, then each alert stored afterwards (read by the server from the
    database, written here through a connection of its own) with the fleet's new open-alert count; no more streams
    than `max_streams` (503, and one freed is one taken again); and shutdown ends open streams cleanly instead of
    waiting on them."""
    db = CloudDB(tmp_path / "cloud.sqlite")
    seed_fleet(db)
    writer = CloudDB(tmp_path / "cloud.sqlite")
    cfg = WebConfig(stream_poll_s=0.2, max_streams=2)
    with serving(db, cfg) as (site, server):
        c1, r1 = open_stream(site)
        assert r1.status == 200 and r1.getheader("Content-Type", "").startswith("text/event-stream")
        assert r1.getheader("Content-Security-Policy")  # the Guard's headers on the stream too
        ((name, first),) = read_events(r1, 1)
        assert name == "fleet" and [v["vehicle"] for v in first["vehicles"]] == ["v1", "v2", "v3"]
        c2, r2 = open_stream(site)
        assert r2.status == 200
        status, _, body = request(site, "GET", "/api/stream")
        assert status == 503 and json.loads(body)["error"].startswith("2 live pages are open already")
        c2.close()
        for _ in range(100):  # the server notices the closed stream at once (the client's disconnect)
            if server.hub.open < 2:
                break
            time.sleep(0.1)
        c3, r3 = open_stream(site)  # a third page is taken once the second left
        assert r3.status == 200
        c3.close()

        writer.ingest([wire.Batch("f1", "v2", 2, [alert(103, "a3", "open", T0 + 200, label="fan_belt")])])
        got = read_events(r1, 2)
        kinds = dict(got)
        assert set(kinds) == {"fleet", "alerts"}, got
        assert [(a["vehicle"], a["seq"], a["label"]) for a in kinds["alerts"]["new"]] == [("v2", 103, "fan_belt")]
        assert {v["vehicle"]: v["open_alerts"] for v in kinds["fleet"]["vehicles"]}["v2"] == 1
        assert server.hub.open >= 1
    # serving() returned: shutdown ended the open stream itself rather than waiting for its client (which never
    # left) or cutting it off: its body is complete (a chunked body cut off is IncompleteRead here).
    r1.read()
    c1.close()
    assert server.hub.open == 0
    writer.close()
    db.close()


def test_page_updates_live_without_reload(tmp_path: Path, browser: Any) -> None:
    """A new alert stored while the fleet page is open shows in its alerts table (marked new) and in the vehicle's
    open-alert count, without a reload (a marker set in the page survives)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    db = CloudDB(tmp_path / "cloud.sqlite")
    seed_fleet(db)
    writer = CloudDB(tmp_path / "cloud.sqlite")
    with serving(db, WebConfig(stream_poll_s=0.3)) as (site, _):
        wait = WebDriverWait(browser, 20, ignored_exceptions=(StaleElementReferenceException,))
        browser.get(site + "/")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "1")
        wait.until(lambda d: d.find_element(By.ID, "live").text == "live")
        browser.execute_script("window.notReloaded = 1")
        writer.ingest([wire.Batch("f1", "v2", 2, [alert(103, "a3", "open", T0 + 200, label="fan_belt")])])
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "table#alerts tr.fresh[data-seq='103']"))
        wait.until(lambda d: d.find_element(By.ID, "alerts-new").text == "1 new since the page opened")
        wait.until(lambda d: d.find_element(
            By.CSS_SELECTOR, "table#fleet tr[data-vehicle='v2'] td:nth-child(7)").text == "1")
        assert browser.execute_script("return window.notReloaded === 1")
        shoot(browser, "fleet-live")
    writer.close()
    db.close()


@pytest.fixture
def signin_site(tmp_path: Path) -> Iterator[str]:
    db = CloudDB(tmp_path / "cloud.sqlite")
    seed_fleet(db)
    with serving(db, WebConfig(require_sign_in=True, password_hash=PASSWORD_HASH)) as (site, _):
        yield site
    db.close()


def test_sign_in_over_http(signin_site: str) -> None:
    site = signin_site
    # Without a session: pages go to the sign-in page (and back after), the API is 401; the sign-in page, its
    # scripts and styles are served.
    status, headers, _ = request(site, "GET", "/vehicle/v1?since=x")
    assert status == 303 and headers["location"] == "/signin?next=%2Fvehicle%2Fv1"
    assert request(site, "GET", "/api/fleet")[:1] == (401,)
    assert request(site, "GET", "/api/stream")[:1] == (401,)
    assert request(site, "POST", "/api/verdict", {"alert_id": "a1", "label": "confirmed", "by": "x"})[0] == 401
    for path in ("/signin", "/static/signin.js", "/static/page.css", "/api/session"):
        assert request(site, "GET", path)[0] == 200, path
    assert json.loads(request(site, "GET", "/api/session")[2]) == {"required": True, "signed_in": False}
    # The sign-in POST passes the same checks as every change: this page's Origin, JSON.
    assert request(site, "POST", "/api/signin", {"password": PASSWORD}, {"Origin": "http://evil.example"})[0] == 403
    assert request(site, "POST", "/api/signin", {"password": PASSWORD}, {"Content-Type": "text/plain"})[0] == 415
    # Signed in: a cookie the page's scripts cannot read, sent only to this site, for the session's length.
    status, headers, body = request(site, "POST", "/api/signin", {"password": PASSWORD})
    assert status == 200 and json.loads(body) == {"signed_in": True, "required": True}
    cookie = headers["set-cookie"]
    attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert cookie.startswith("harvester_session=") and attrs >= {"httponly", "samesite", "path", "max-age"}
    assert "samesite=strict" in cookie.lower() and "secure" not in attrs  # plain http here
    session = cookie.split(";")[0]
    assert request(site, "GET", "/api/fleet", headers={"Cookie": session})[0] == 200
    assert request(site, "GET", "/vehicle/v1", headers={"Cookie": session})[0] == 200
    assert request(site, "GET", "/api/fleet", headers={"Cookie": "harvester_session=forged"})[0] == 401
    # Behind an https proxy on this machine (X-Forwarded-Proto from 127.0.0.1): the cookie is Secure.
    _, headers, _ = request(site, "POST", "/api/signin", {"password": PASSWORD}, {"X-Forwarded-Proto": "https",
                                                                                  "Origin": site})
    assert "secure" in {a.strip().lower() for a in headers["set-cookie"].split(";")}
    # Signing out ends the session on the server, not just in the browser, and the live stream it had open.
    u = urllib.parse.urlsplit(site)
    conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=30)
    conn.request("GET", "/api/stream", headers={"Cookie": session})
    stream = conn.getresponse()
    assert stream.status == 200 and read_events(stream, 1)[0][0] == "fleet"
    assert request(site, "POST", "/api/signout", {}, {"Cookie": session})[0] == 200
    assert request(site, "GET", "/api/fleet", headers={"Cookie": session})[0] == 401
    stream.read()  # the stream ends, complete, at its next poll
    conn.close()
    # Wrong passwords: 401 each, then the address waits (429, Retry-After), the right password included.
    for _ in range(5):
        status, _, body = request(site, "POST", "/api/signin", {"password": "guess"})
        assert (status, json.loads(body)) == (401, {"error": "wrong password"})
    for pw in ("guess", PASSWORD):
        status, headers, body = request(site, "POST", "/api/signin", {"password": pw})
        assert status == 429 and 0 < int(headers["retry-after"]) <= 60
        assert json.loads(body)["error"].startswith("too many failed attempts")
    assert request(site, "POST", "/api/signin", {"password": 5})[0] == 429


def test_sign_in_rules_without_waiting() -> None:
    """The rate limit's window and the sessions' expiry, on a clock given to them."""
    t = Throttle(per_client=2, overall=3, window_s=60)
    t.failed("a", now=0)
    assert t.wait_s("a", now=1) == 0
    t.failed("a", now=10)
    assert t.wait_s("a", now=11) == 49 and t.wait_s("b", now=11) == 0  # another address is not held up ...
    t.failed("b", now=20)
    assert t.wait_s("c", now=21) == 39  # ... until all of them together failed `overall` times
    assert t.wait_s("a", now=60.5) == 0  # the first failure left the window
    s = Sessions(ttl_s=100)
    tok = s.new(now=0)
    assert s.valid(tok, now=99) and not s.valid(tok, now=100) and not s.valid(tok, now=50)  # expired, then gone
    assert not s.valid("", now=0) and not s.valid("x" * 1000, now=0)
    assert not check_password("anything", "scrypt$1$1$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44)  # n=1: invalid, False


def test_a_hash_that_cannot_sign_anyone_in_is_refused_at_start(tmp_path: Path) -> None:
    db = CloudDB(tmp_path / "cloud.sqlite")
    try:
        for bad, why in ((PASSWORD_HASH[:-8], "not of the form"),
                         (PASSWORD_HASH.replace("$16384$", "$1000$"), "scrypt parameters N=1000")):
            with pytest.raises(SignInError, match=r"\[web\] password_hash is " + why):
                make_server(db, "127.0.0.1", 0, cfg=WebConfig(require_sign_in=True, password_hash=bad))
    finally:
        db.close()


def test_sign_in_in_a_browser(signin_site: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 15)
    browser.get(signin_site + "/vehicle/v1")
    wait.until(lambda d: d.current_url == signin_site + "/signin?next=%2Fvehicle%2Fv1")
    shoot(browser, "signin")
    browser.find_element(By.ID, "password").send_keys("not it")
    browser.find_element(By.CSS_SELECTOR, "#signin-form button").click()
    wait.until(lambda d: d.find_element(By.ID, "s-msg").text == "wrong password")
    browser.find_element(By.ID, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "#signin-form button").click()
    wait.until(lambda d: d.current_url == signin_site + "/vehicle/v1")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "1")
    assert browser.execute_script("return document.cookie") == ""  # HttpOnly: not the scripts'
    browser.find_element(By.ID, "sign-out").click()
    wait.until(lambda d: d.current_url.startswith(signin_site + "/signin"))
    browser.get(signin_site + "/")
    wait.until(lambda d: d.current_url == signin_site + "/signin?next=%2F")


def test_the_wheel_carries_the_templates_and_static_files(tmp_path: Path) -> None:
    """`pip wheel` of the cloud package (from a clean copy) holds the page's templates, scripts, styles, and uPlot
    with its licence: an installed `cloud-sync web` has everything it serves."""
    src = tmp_path / "cloud_sync"
    shutil.copytree(REPO / "cloud_sync", src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "w"), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp_path / "w").glob("harvester_cloud_sync-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    web = REPO / "cloud_sync" / "web"
    wanted = {"cloud_sync/web/" + str(p.relative_to(web)) for p in web.rglob("*")
              if p.is_file() and p.parent.name != "__pycache__" and p.suffix != ".pyc"}
    assert wanted - names == set()
    assert {"cloud_sync/web/templates/base.html", "cloud_sync/web/static/vendor/uplot/uPlot.iife.min.js",
            "cloud_sync/web/static/vendor/uplot/LICENSE", "cloud_sync/web/static/page.js"} <= names
