"""The fleet page, served by `cloud_sync.web` from a seeded SQLite database: its JSON endpoints over real HTTP, and
the page itself in headless Chromium (Debian's chromium + chromedriver, driven by Selenium): the tables show the
seeded vehicles and alerts, and clicking an alert draws the signals around it."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import wire
from cloud_sync.db import CloudDB
from cloud_sync.web import WebServer, make_server
from tests.test_cloud_db import T0, alert, samples, seed_fleet

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
HOSTILE = "<script>window.pwned=1</script>"


@pytest.fixture
def site(tmp_path: Path) -> Iterator[str]:
    db = CloudDB(tmp_path / "cloud.sqlite")
    seed_fleet(db)
    # A vehicle whose id is markup: it must show as text, never run.
    db.ingest([wire.Batch("f1", HOSTILE, 1, [samples(1, 10), alert(11, "a9", "open", T0 + 5)])])
    server: WebServer = make_server(db, "127.0.0.1", 0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    db.close()


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_json_endpoints_and_their_errors(site: str) -> None:
    status, fleet = get(site + "/api/fleet")
    assert status == 200 and [v["vehicle"] for v in fleet["vehicles"]] == [HOSTILE, "v1", "v2", "v3"]
    status, alerts = get(site + "/api/alerts?state=open")
    assert status == 200 and {a["alert_id"] for a in alerts["alerts"]} == {"a1", "a9"}
    status, alerts = get(site + "/api/alerts?vehicle=v2")
    assert [a["seq"] for a in alerts["alerts"]] == [102, 101]  # newest first
    status, one = get(site + "/api/alert/v1/1001")
    assert status == 200 and one["alert"]["alert_id"] == "a1"
    # The window is T0+20..T0+50 with 120 s either side; v1's samples cover T0..T0+100: both signals, all of it.
    assert set(one["series"]) == {"ET1.EngCoolantTemp"} and len(one["series"]["ET1.EngCoolantTemp"]) == 500
    assert one["span"] == [T0 + 20 - 120, T0 + 50 + 120]
    hostile = urllib.request.quote(HOSTILE, safe="")
    assert get(f"{site}/api/alert/{hostile}/11")[0] == 200
    assert get(site + "/api/alert/v1/999") == (404, {"error": "no such alert"})
    assert get(site + "/api/alert/v1/x")[0] == 400
    assert get(site + "/api/alerts?state=maybe") == (400, {"error": "state must be open or closed"})
    assert get(site + "/api/alerts?since=yesterday")[0] == 400
    assert get(site + "/nope")[0] == 404
    with urllib.request.urlopen(site + "/", timeout=10) as r:
        page = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/html") and "Content-Security-Policy" in r.headers
    assert "<table id=\"fleet\">" in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists() and shutil.which(CHROMEDRIVER)):
        pytest.skip("headless browser test needs Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver; the test command installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1200,1600"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    d = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        yield d
    finally:
        d.quit()


def test_page_shows_fleet_and_alerts_and_plots_an_alert(site: str, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 15)
    browser.get(site + "/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "1")
    rows = browser.find_elements(By.CSS_SELECTOR, "table#fleet tbody tr")
    texts = [r.text for r in rows]
    assert [t.split()[0] for t in texts] == [f"f1/{HOSTILE}", "f1/v1", "f1/v2", "f2/v3"]
    assert "online" in texts[1] and "offline" in texts[2] and "3.0 / 50.0 MiB" in texts[1]
    assert browser.execute_script("return window.pwned === undefined")  # the markup id stayed text
    alerts = browser.find_elements(By.CSS_SELECTOR, "table#alerts tbody tr")
    assert len(alerts) == 4 and "coolant_leak" in alerts[0].text

    v1_alert = next(r for r in alerts if r.get_attribute("data-vehicle") == "v1")
    v1_alert.click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#detail svg.plot polyline"))
    plot = browser.find_element(By.CSS_SELECTOR, "#detail svg.plot")
    assert plot.get_attribute("data-signal") == "ET1.EngCoolantTemp"
    points = browser.find_element(By.CSS_SELECTOR, "#detail svg.plot polyline").get_attribute("points").split()
    assert len(points) == 500
    xs = [float(p.split(",")[0]) for p in points]
    assert xs == sorted(xs) and xs[-1] - xs[0] > 100  # a real line across the plot, in time order
    shade = browser.find_element(By.CSS_SELECTOR, "#detail svg.plot rect.window")
    assert float(shade.get_attribute("width")) > 10
    assert plot.size["width"] > 500 and plot.size["height"] > 100  # rendered, not just in the DOM

    # Filtering by state goes back to the server and redraws.
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, "f-state")).select_by_visible_text("closed")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "table#alerts tbody tr")) == 1)
    browser.save_screenshot(str(tmp_path / "fleet.png"))
    assert (tmp_path / "fleet.png").stat().st_size > 10_000
    errors = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    assert errors == [], errors
