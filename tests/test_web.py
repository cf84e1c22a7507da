"""The fleet page, served by `cloud_sync.web` from a seeded SQLite database: its JSON endpoints over real HTTP, and
the page itself in headless Chromium (Debian's chromium + chromedriver, driven by Selenium): the tables show the
seeded vehicles and alerts, and clicking an alert draws the signals around it."""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.config import load_config
from cloud_sync.db_sqlite import CloudDB
from cloud_sync.web import WebServer, make_server
from cloud_sync.web.signin import check_password, hash_password
from harvester_common import backfill, wire
from tests.test_cloud_db import T0, alert, event, samples, seed_fleet
from tests.test_cloud_rollouts_db import package, report

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
HOSTILE = "<script>window.pwned=1</script>"


@pytest.fixture
def site(tmp_path: Path) -> Iterator[str]:
    db = CloudDB(tmp_path / "cloud.sqlite")
    seed_fleet(db)
    # A vehicle whose id is markup: it must show as text, never run.
    db.ingest([wire.Batch("f1", HOSTILE, 1, [samples(1, 10), alert(11, "a9", "open", T0 + 5)])])
    # And a malformed alert record (stored as the vehicle sent it): it must not break the page for the fleet.
    # Its own "vehicle"/"seq" keys name another vehicle's alert: the row's key wins. Nesting past what the page
    # reads is cut, not a RecursionError for the whole list.
    deep: Any = 1
    for _ in range(600):
        deep = [deep]
    junk = {"alert_id": "a10", "state": "open", "ts": "yesterday", "score": math.nan, "top_features": "x",
            "label": {"x": 1}, "snapshot": [1], "vehicle": "v1", "seq": 1001, "extra": deep}
    db.ingest([wire.Batch("f1", HOSTILE, 2, [wire.Segment("alert", 12, 12, record=junk)])])
    # Its bus went down (the error text is the vehicle's: markup), its GPS came back; its status carries counters,
    # one labelled with markup, one zero (not shown), one not a number (not trusted).
    db.ingest([wire.Batch("f1", HOSTILE, 3, [
        event(13, "source_down", {"source": "can0", "reason": "bus_error", "error": HOSTILE}),
        event(14, "source_down", {"source": "gps", "reason": "device_lost", "error": "EIO"}),
        event(15, "source_up", {"source": "gps", "down_s": 2.0})])])
    # v1 is backfilling behind its live lane (1002..1499 still on the vehicle); v2 lost 210..299 for good.
    db.ingest([wire.Batch("f1", "v1", 7, [samples(1500, 10, T0 + 10_000)], extra={backfill.KEY: 1002})])
    db.ingest([wire.Batch("f1", "v2", 7, [samples(300, 5, T0 + 10_000)])])
    db.set_status("f1", HOSTILE, {"state": "online", "metrics": {"counters": {
        "source.can0.errors": {HOSTILE: 3, "open_failed": 0}, "uplink.ack_timeouts": 2, "writer.x": "9"}}})
    # A rollout halted by v1's rejection, whose reason (the vehicle's text) is markup; v2's wave never started.
    new, new_data = package("1.1.0")
    old, old_data = package("1.0.0")
    for info, data in ((old, old_data), (new, new_data)):
        db.publish_package(info, data)
    rid = db.create_rollout(new, [[("v1", "f1")], [("v2", "f1")]], mode="update", plan={"canary": 1},
                            success_threshold=0.9, error_threshold=0.2, by="alice")
    with db.rollout_tx() as tx:
        tx.mark_sent(rid, ["v1"])
        tx.set_state(rid, "halted", f"wave 1 of 2: 1 of 1 vehicles failed: v1 rejected ({HOSTILE})")
    db.set_model_status("f1", "v1", report(3, "rejected", new, active=old, reason=HOSTILE))
    # A name a reverse proxy forwards, allowed as `cloud-sync web --allow-host` allows it (which asks for sign-in:
    # turned off here, as only a caller on loopback may; the sign-in tests below have it on).
    server: WebServer = make_server(db, "127.0.0.1", 0, allowed_hosts=["Fleet.example"], sign_in=False)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    db.close()


def raw(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get(url: str) -> tuple[int, Any]:
    status, body = raw(url)
    return status, json.loads(body)


def test_json_endpoints_and_their_errors(site: str) -> None:
    status, body = raw(site + "/api/fleet")
    assert status == 200 and b"<" not in body and b"\\u003cscript\\u003e" in body  # markup never served raw
    assert [v["vehicle"] for v in json.loads(body)["vehicles"]] == [HOSTILE, "v1", "v2", "v3"]
    hostile_row = json.loads(body)["vehicles"][0]
    assert hostile_row["metrics"] == {f"source.can0.errors{{{HOSTILE}}}": 3, "uplink.ack_timeouts": 2}
    assert hostile_row["sources"] == {"can0": {"up": False, "ts": T0, "reason": "bus_error", "error": HOSTILE},
                                      "gps": {"up": True, "ts": T0, "reason": "", "error": ""}}
    assert all(v["metrics"] == {} and v["sources"] == {} for v in json.loads(body)["vehicles"][1:])
    holes = {v["vehicle"]: (v["gaps"], v["backfilling"], v["backfilling_seqs"]) for v in json.loads(body)["vehicles"]}
    assert holes == {HOSTILE: (0, 0, 0), "v1": (0, 1, 498), "v2": (1, 0, 0), "v3": (0, 0, 0)}
    models = {v["vehicle"]: v["model"] for v in json.loads(body)["vehicles"]}
    assert models["v1"] == {"active": {"name": "harvester-anomaly", "version": "1.0.0"},
                            "desired": {"name": "harvester-anomaly", "version": "1.1.0", "rollout": 1},
                            "state": "rejected", "reason": HOSTILE}
    status, body = raw(site + "/api/rollouts")
    assert status == 200 and b"<" not in body
    (r,) = json.loads(body)["rollouts"]
    assert (r["id"], r["state"], r["failed"]) == (1, "halted", [{"vehicle": "v1", "wave": 1, "state": "rejected",
                                                                 "reason": HOSTILE}])
    status, alerts = get(site + "/api/alerts?state=open")
    assert status == 200 and {a["alert_id"] for a in alerts["alerts"]} == {"a1", "a9", "a10"}
    assert {(a["vehicle"], a["seq"]) for a in alerts["alerts"]} == {("v1", 1001), (HOSTILE, 11), (HOSTILE, 12)}
    status, alerts = get(site + "/api/alerts?vehicle=v2")
    assert [a["seq"] for a in alerts["alerts"]] == [102, 101]  # newest first
    status, one = get(site + "/api/alert/v1/1001")
    assert status == 200 and one["alert"]["alert_id"] == "a1"
    # The window is T0+20..T0+50 with 120 s either side; v1's samples cover T0..T0+100: both signals, all of it.
    assert set(one["series"]) == {"ET1.EngCoolantTemp"} and len(one["series"]["ET1.EngCoolantTemp"]) == 500
    assert one["span"] == [T0 + 20 - 120, T0 + 50 + 120]
    hostile = urllib.parse.quote(HOSTILE, safe="")
    status, one = get(f"{site}/api/alert/{hostile}/11")
    assert status == 200 and one["alert"]["vehicle"] == HOSTILE and len(one["series"]["ET1.EngCoolantTemp"]) == 5
    # The malformed record comes back typed (valid JSON, no NaN), with nothing to plot.
    status, body = raw(f"{site}/api/alert/{hostile}/12")
    one = json.loads(body, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert status == 200 and one["series"] == {} and one["span"] is None
    assert {k: one["alert"][k] for k in ("ts", "score", "label", "top_features", "snapshot")} == {
        "ts": None, "score": None, "label": "", "top_features": [], "snapshot": {}}
    assert get(site + "/api/alert/v1/999") == (404, {"error": "no such alert"})
    assert get(f"{site}/api/alert/{hostile}/1001")[0] == 404  # another vehicle's seq
    assert get(f"{site}/api/alert/v1/{2**63 - 1}")[0] == 404  # the largest seq the database holds: just not there
    for bad in ("x", "-1", "1e3", " 1", "\u0663", str(2**63), "9" * 26, "9" * 40):
        status, err = get(f"{site}/api/alert/v1/{urllib.parse.quote(bad)}")
        assert (status, err) == (400, {"error": "seq must be a non-negative integer"}), bad
    assert get(site + "/api/alerts?state=maybe") == (400, {"error": "state must be open or closed"})
    for bad in ("yesterday", "nan"):
        assert get(site + "/api/alerts?since=" + bad) == (400, {"error": "since must be a Unix time"})
    assert get(site + "/api/alerts?vehicle=nobody")[1] == {"alerts": []}
    assert get(site + "/nope")[0] == 404
    with urllib.request.urlopen(site + "/", timeout=10) as r:
        page = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/html")
    assert "<table id=\"fleet\">" in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    # No inline code for the CSP to allow: the script and style are files of their own.
    assert "<style" not in page and re.findall(r"<script[^>]*>", page) == [
        '<script src="/static/vendor/uplot/uPlot.iife.min.js">', '<script src="/static/common.js">',
        '<script src="/static/chat.js">', '<script src="/static/page.js">']
    for path, ctype in (("/static/page.js", "text/javascript"), ("/static/page.css", "text/css"),
                        ("/static/chat.js", "text/javascript"),
                        ("/static/common.js", "text/javascript"), ("/static/vendor/uplot/uPlot.min.css", "text/css"),
                        ("/static/vendor/uplot/uPlot.iife.min.js", "text/javascript")):
        with urllib.request.urlopen(site + path, timeout=10) as r:
            assert r.headers["Content-Type"].startswith(ctype) and len(r.read()) > 500


CSP = {"default-src": "'none'", "script-src": "'self'", "style-src": "'self'", "connect-src": "'self'",
       "img-src": "'self' data:", "base-uri": "'none'", "form-action": "'none'", "frame-ancestors": "'none'"}


def test_every_response_has_a_strict_csp(site: str) -> None:
    for path in ("/", "/static/page.js", "/static/page.css", "/api/fleet", "/api/rollouts", "/api/alert/v1/x",
                 "/nope", "/vehicle/v1", "/alert/v1/1001", "/signin", "/api/vehicle/v1", "/api/vehicle/nobody",
                 "/static/vendor/uplot/uPlot.iife.min.js", "/static/nope.js", "/alert/v1/x"):
        try:
            r = urllib.request.urlopen(site + path, timeout=10)
        except urllib.error.HTTPError as e:
            r = e
        with r:
            csp = r.headers["Content-Security-Policy"]
            assert "unsafe" not in csp, (path, csp)
            assert dict(d.strip().split(" ", 1) for d in csp.split(";")) == CSP, (path, csp)
            assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["X-Frame-Options"] == "DENY"


def http_raw(site: str, head: str) -> tuple[int, bytes]:
    """One request written byte for byte (urllib would set Host itself): the status and the body."""
    host, port = urllib.parse.urlsplit(site).hostname, urllib.parse.urlsplit(site).port
    assert host and port
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(head.encode("latin-1") + b"\r\n")
        resp = http.client.HTTPResponse(s)
        resp.begin()
        return resp.status, resp.read()


def test_host_header_check_stops_dns_rebinding(site: str) -> None:
    """A page on evil.example whose name was re-pointed at 127.0.0.1 reaches this server with `Host: evil.example`:
    refused (421) before anything is read. Only the bound address, the loopback names with the port, and names
    allowed by --allow-host are served."""
    port = urllib.parse.urlsplit(site).port

    def status(*hosts: str, path: str = "/api/fleet", version: str = "HTTP/1.1") -> int:
        lines = [f"GET {path} {version}"] + [f"Host: {h}" for h in hosts] + ["Connection: close", ""]
        return http_raw(site, "\r\n".join(lines))[0]

    for ok in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}", "fleet.example"):
        assert status(ok) == 200, ok
    for forged in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", f"localhost:{port + 1}",
                   "localhost", "127.0.0.1", f"fleet.example:{port}", f"127.0.0.1:{port}@evil.example", "",
                   f"[::1]:{port}:1", "\u00e9vil:80"):
        for path in ("/", "/api/fleet", "/api/alert/v1/1001", "/static/page.js", "/nope", "/vehicle/v1", "/api/stream"):
            assert status(forged, path=path) == 421, (forged, path)
    code, body = http_raw(site, f"GET / HTTP/1.1\r\nHost: evil.example:{port}\r\nConnection: close\r\n")
    assert code == 421 and b"harvester" not in body.lower() and b"v1" not in body  # nothing of the fleet
    assert status(version="HTTP/1.0") == 400  # no Host at all
    assert status(f"127.0.0.1:{port}", "evil.example") == 400  # two: which one would a proxy have checked?


PASSWORD = "orange grove 7"
PASSWORD_HASH = hash_password(PASSWORD, salt=b"fixed salt tests")  # scrypt once per run, not per test


def test_cli_web_checks_host_with_allow_host(tmp_path: Path) -> None:
    """`cloud-sync web --allow-host` as run from a shell: the name a proxy forwards is served, another is not; and
    with a name to answer to, the page asks for sign-in (the config holds the password's hash)."""
    db = CloudDB(tmp_path / "cloud.sqlite")
    seed_fleet(db)
    db.close()
    (tmp_path / "cloud.toml").write_text(f'[db]\npath = "cloud.sqlite"\n[web]\npassword_hash = "{PASSWORD_HASH}"\n')
    env = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PATH": "/usr/bin:/bin"}
    p = subprocess.Popen([sys.executable, "-m", "cloud_sync", "web", "--config", str(tmp_path / "cloud.toml"),
                          "--port", "0", "--allow-host", "fleet.example", "--allow-host", "fleet.example:8443"],
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stderr is not None
        line = p.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/ \(.*; sign-in required\)", line)
        assert m, line
        site = f"http://127.0.0.1:{m.group(1)}"

        def status(host: str, path: str = "/api/session") -> int:
            return http_raw(site, f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n")[0]

        assert [status(h) for h in ("fleet.example", "fleet.example:8443", f"127.0.0.1:{m.group(1)}")] == [200] * 3
        assert status("fleet.example", "/api/fleet") == 401  # not signed in
        assert [status(h) for h in ("fleet.example:80", "evil.example", "other.example:8443")] == [421] * 3
    finally:
        p.terminate()
        p.communicate(timeout=30)
    assert p.returncode == 0


@pytest.mark.parametrize("args", [["--allow-host", "fleet.example"], ["--host", "0.0.0.0"], ["--host", "::"],
                                  ["--host", "fleet.example"]])
def test_cli_web_refuses_to_serve_off_loopback_without_a_password(tmp_path: Path, args: list[str]) -> None:
    """Off loopback (or answering a name a proxy forwards) without `[web] password_hash`: one line, exit 2, and
    nothing listens (the refusal comes before the bind, so no address here is ever opened)."""
    CloudDB(tmp_path / "cloud.sqlite").close()
    (tmp_path / "cloud.toml").write_text('[db]\npath = "cloud.sqlite"\n')
    r = subprocess.run([sys.executable, "-m", "cloud_sync", "web", "--config", str(tmp_path / "cloud.toml"),
                        "--port", "0", *args], capture_output=True, text=True, timeout=60,
                       env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and r.stdout == "", r
    (line,) = r.stderr.splitlines()
    assert line.startswith("cloud-sync: error: ") and "[web] password_hash is empty" in line, line
    assert "hash-password" in line


def test_hash_password_command_makes_a_hash_that_signs_in(tmp_path: Path) -> None:
    """`cloud-sync hash-password` reads the password from a pipe and prints the config line; the hash checks the
    password and no other, and a short password is refused in one line."""
    env = {"PYTHONPATH": str(Path(__file__).resolve().parent.parent), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "cloud_sync", "hash-password"], input=PASSWORD + "\n",
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    m = re.fullmatch(r'password_hash = "(scrypt\$[^"]+)"\n', r.stdout)
    assert m, r.stdout
    assert PASSWORD not in r.stdout and check_password(PASSWORD, m.group(1))
    assert not check_password(PASSWORD + " ", m.group(1)) and not check_password("", m.group(1))
    assert m.group(1) != hash_password(PASSWORD)  # salted: the same password never gives the same hash
    (tmp_path / "cloud.toml").write_text(f'[web]\n{r.stdout}')
    assert load_config(tmp_path / "cloud.toml").web.password_hash == m.group(1)  # the line is valid config
    r = subprocess.run([sys.executable, "-m", "cloud_sync", "hash-password"], input="short\n",
                       capture_output=True, text=True, timeout=60, env=env)
    assert (r.returncode, r.stderr) == (2, "cloud-sync: error: the password must be 10 to 1024 characters long\n")


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists() and shutil.which(CHROMEDRIVER)):
        pytest.skip("headless browser test needs Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver; the test command installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    # Selenium Manager is what would download a driver or browser: with both paths given it must never run.
    manager_calls: list[Any] = []

    def no_manager(self: Any, args: list[str]) -> dict[str, str]:
        manager_calls.append(args)
        raise AssertionError(f"Selenium Manager invoked: {args}")

    monkeypatch.setattr(SeleniumManager, "binary_paths", no_manager)
    monkeypatch.setenv("SE_OFFLINE", "true")  # and if it ran anyway, offline

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1200,1600"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    d = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    assert manager_calls == []
    try:
        yield d
    finally:
        d.quit()


def check_alert_plot(browser: Any, t0: float) -> None:
    """v1's alert a1 as plotted: its one signal (a top feature: marked, first) with the unit from the vehicle's
    signal table on the axis, all 500 points, the x axis fitted to the samples there are (T0+0.1..T0+99.9) around the
    window the model saw (T0+20..T0+50, shaded on the canvas), and zooming by dragging across it."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    (plot,) = browser.find_elements(By.CSS_SELECTOR, "#detail div.plot")
    assert (plot.get_attribute("data-signal"), plot.get_attribute("data-unit"), plot.get_attribute("data-points")) \
        == ("ET1.EngCoolantTemp", "degC", "500")
    assert "top" in plot.get_attribute("class").split()
    assert plot.find_element(By.CSS_SELECTOR, ".plot-title").text.split("\n") == [
        "ET1.EngCoolantTemp", "degC", "top feature 1 · contribution 0.40"]
    lo, hi = map(float, plot.get_attribute("data-xrange").split(","))
    assert (round(lo - t0, 1), round(hi - t0, 1)) == (0.1, 99.9)  # its samples are every other one from T0
    x0, x1, top, _ = map(float, plot.get_attribute("data-window").split(","))
    over = plot.find_element(By.CSS_SELECTOR, ".u-over")
    width = over.size["width"]
    assert width > 500 and over.size["height"] > 100  # rendered, not just in the DOM
    # The window's place on the canvas follows the time axis: 20 s and 50 s into 99.9 s.
    left = float(browser.execute_script("return arguments[0].getBoundingClientRect().left - "
                                        "arguments[0].closest('.uplot').querySelector('canvas')"
                                        ".getBoundingClientRect().left", over))
    assert abs((x0 - left) / width - 20 / 99.9) < 0.01 and abs((x1 - left) / width - 50 / 99.9) < 0.01
    # Shaded on the canvas inside the window, not outside it (pixels read back from the canvas).
    rgb = browser.execute_script(  # one read of the row between both points (each read back costs a warning)
        "const c = arguments[0].querySelector('canvas'), r = window.devicePixelRatio || 1;"
        "const a = Math.round(arguments[1] * r), b = Math.round(arguments[2] * r);"
        "const d = c.getContext('2d').getImageData(a, Math.round((arguments[3] + 3) * r), b - a + 1, 1).data;"
        "return [Array.from(d.slice(0, 4)), Array.from(d.slice((b - a) * 4, (b - a) * 4 + 4))];",
        plot, (x0 + x1) / 2, x1 + (x1 - x0), top)
    inside, outside = rgb
    assert inside[0] - inside[2] > 15 and abs(outside[0] - outside[2]) < 10, rgb
    # Drag across the middle third: the x axis zooms in to it.
    ActionChains(browser).move_to_element_with_offset(over, int(-width / 6), 0).click_and_hold() \
        .move_by_offset(int(width / 3), 0).release().perform()
    WebDriverWait(browser, 10).until(lambda d: plot.get_attribute("data-xrange") != f"{lo},{hi}")
    zlo, zhi = map(float, plot.get_attribute("data-xrange").split(","))
    assert lo + 25 < zlo < zhi < hi - 25 and 25 < zhi - zlo < 40, (zlo - t0, zhi - t0)


def shoot(browser: Any, name: str) -> Path:
    """A screenshot of the page as it stands, kept as a test artefact: $HARVESTER_TEST_ARTIFACTS, else
    /tmp/harvester-test-artifacts (its path printed)."""
    out = Path(os.environ.get("HARVESTER_TEST_ARTIFACTS", "/tmp/harvester-test-artifacts")) / "web"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    browser.save_screenshot(str(path))
    assert path.stat().st_size > 10_000  # a page, not a blank
    print(f"screenshot: {path}")
    return path


def test_page_shows_fleet_and_alerts_and_plots_an_alert(site: str, browser: Any, tmp_path: Path) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    # The page redraws its tables from each response: a row read while it is being replaced is stale, which is a
    # reason to look again, not a failure (it failed ~1 run in 8 on a busy machine).
    wait = WebDriverWait(browser, 15, ignored_exceptions=(StaleElementReferenceException,))
    browser.get(site + "/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "1")
    rows = browser.find_elements(By.CSS_SELECTOR, "table#fleet tbody tr")
    texts = [r.text for r in rows]
    assert [t.split()[0] for t in texts] == [f"f1/{HOSTILE}", "f1/v1", "f1/v2", "f2/v3"]
    assert "online" in texts[1] and "offline" in texts[2] and "3.0 / 50.0 MiB" in texts[1]
    # The vehicle's sources and counters, its markup shown as text.
    assert "can0 down (bus_error), gps up" in texts[0]
    assert f"source.can0.errors{{{HOSTILE}}} 3, uplink.ack_timeouts 2" in texts[0]
    src_cell = rows[0].find_element(By.CSS_SELECTOR, "td.sources")
    assert "open" in src_cell.get_attribute("class") and HOSTILE in src_cell.get_attribute("title")
    # Gaps (lost) beside the ranges still backfilling, the sequence numbers to come on hover.
    assert [(r.find_element(By.CSS_SELECTOR, "td.gaps").text, r.find_element(By.CSS_SELECTOR, "td.backfilling").text)
            for r in rows] == [("0", "0"), ("0", "1"), ("1", "0"), ("0", "0")]
    assert rows[1].find_element(By.CSS_SELECTOR, "td.backfilling").get_attribute("title") == \
        "498 sequence numbers still to come"
    assert "open" in rows[2].find_element(By.CSS_SELECTOR, "td.gaps").get_attribute("class")
    # v1's model: it runs 1.0.0, was asked for 1.1.0 and rejected it (the reason on hover, as text).
    assert "1.0.0 → 1.1.0 rejected" in texts[1]
    assert rows[1].find_element(By.CSS_SELECTOR, "td.step").get_attribute("title") == HOSTILE
    # The rollout: halted with v1's reason, shown as text; a line per wave.
    (ro_row,) = browser.find_elements(By.CSS_SELECTOR, "table#rollouts tbody tr")
    assert f"halted: wave 1 of 2: 1 of 1 vehicles failed: v1 rejected ({HOSTILE})" in ro_row.text
    assert "wave 1: 0/1 active, 1 failed, 1 sent" in ro_row.text and "wave 2: 0/1 active, 0 failed, 0 sent" in \
        ro_row.text
    assert f"v1 rejected ({HOSTILE})" in ro_row.find_element(By.CSS_SELECTOR, "td.failed").text
    # The markup id stayed text: shown verbatim, no element made of it, nothing ran.
    assert browser.execute_script("return window.pwned === undefined && document.scripts.length === 4")
    assert not browser.find_elements(By.CSS_SELECTOR, "table#fleet script, table#rollouts script")
    alerts = browser.find_elements(By.CSS_SELECTOR, "table#alerts tbody tr")
    by_id = {(r.get_attribute("data-vehicle"), r.get_attribute("data-seq")): r.text for r in alerts}
    assert set(by_id) == {("v1", "1001"), ("v2", "101"), ("v2", "102"), (HOSTILE, "11"), (HOSTILE, "12")}
    assert "coolant_leak" in by_id[("v1", "1001")] and "closed" in by_id[("v2", "102")]
    assert by_id[(HOSTILE, "12")].startswith("?")  # the malformed record's row is there, its time unknown

    next(r for r in alerts if r.get_attribute("data-vehicle") == "v1").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#detail div.plot canvas"))
    check_alert_plot(browser, T0)
    shoot(browser, "fleet")

    # The malformed alert opens too, with a message instead of plots.
    next(r for r in browser.find_elements(By.CSS_SELECTOR, "table#alerts tbody tr")
         if r.get_attribute("data-seq") == "12").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#detail p.empty"))
    assert not browser.find_elements(By.CSS_SELECTOR, "#detail div.plot")

    # Filtering goes back to the server and redraws.
    Select(browser.find_element(By.ID, "f-state")).select_by_visible_text("closed")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "table#alerts tbody tr")) == 1)
    Select(browser.find_element(By.ID, "f-state")).select_by_visible_text("all")
    Select(browser.find_element(By.ID, "f-vehicle")).select_by_value("v2")
    alert_rows = (By.CSS_SELECTOR, "table#alerts tbody tr")
    wait.until(lambda d: [r.get_attribute("data-seq") for r in d.find_elements(*alert_rows)] == ["102", "101"])

    # Nothing fetched from anywhere but this server (no CDN), and no error on the console.
    urls = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert urls and all(u.startswith(site + "/") for u in urls), urls
    assert browser.find_element(By.ID, "error").text == ""
    errors = [e for e in browser.get_log("browser") if e.get("level") in ("SEVERE", "WARNING")]
    assert errors == [], errors  # no CSP violation either: the page needs nothing the policy forbids

    # The policy is enforced, and a violation is what the log above would have shown: markup that got into the
    # page as HTML could not run an inline script.
    browser.execute_script("const s = document.createElement('script'); s.textContent = 'window.inlineRan = 1';"
                           "document.head.appendChild(s);")
    assert browser.execute_script("return window.inlineRan === undefined")
    logs = [e["message"] for e in browser.get_log("browser")]
    assert any("Content Security Policy" in m for m in logs), logs


# --- the learning loop: verdicts, breakdowns, quality ----------------------------------------------------------


def post(site: str, path: str, body: bytes | str | dict[str, Any], headers: dict[str, str] | None = None,
         origin: str | None = "same") -> tuple[int, Any]:
    """One POST with exactly these headers (http.client adds only Host and Content-Length)."""
    u = urllib.parse.urlsplit(site)
    data = json.dumps(body).encode() if isinstance(body, dict) else body.encode() if isinstance(body, str) else body
    h = {"Content-Type": "application/json", **(headers or {})}
    if origin is not None:
        h["Origin"] = site if origin == "same" else origin
    conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=10)
    try:
        conn.request("POST", path, body=data, headers=h)
        resp = conn.getresponse()
        raw_body = resp.read()
    finally:
        conn.close()
    return resp.status, json.loads(raw_body)


def stored(tmp_path: Path) -> tuple[list[Any], list[Any]]:
    """Verdicts and breakdowns as the database holds them, read through a connection of its own."""
    db = CloudDB(tmp_path / "cloud.sqlite")
    try:
        verdicts = [r for r in db.read("SELECT vehicle, alert_id, label, fault, note, by FROM verdicts ORDER BY id")]
        breakdowns = [r for r in db.read("SELECT vehicle, at, fault, note, by FROM breakdowns ORDER BY id")]
        return verdicts, breakdowns
    finally:
        db.close()


def test_verdict_and_breakdown_posts_and_their_refusals(site: str, tmp_path: Path) -> None:
    verdict = {"alert_id": "a1", "label": "false_alarm", "note": "sensor cable loose", "by": "alice"}
    status, body = post(site, "/api/verdict", verdict)
    assert status == 200 and (body["verdict"]["vehicle"], body["verdict"]["label"]) == ("v1", "false_alarm")
    status, body = post(site, "/api/breakdown", {"vehicle": "v2", "at": "2026-09-21T15:00", "fault": "Fan belt",
                                                 "by": "bob"})
    assert status == 200 and body["breakdown"]["fault"] == "fan_belt"
    # Without an Origin, a Referer from this server's page will do (what some browsers send).
    status, _ = post(site, "/api/verdict", {**verdict, "label": "confirmed"}, {"Referer": site + "/"}, origin=None)
    assert status == 200
    verdicts, breakdowns = stored(tmp_path)
    assert [v[2] for v in verdicts] == ["false_alarm", "confirmed"] and verdicts[1][3] == "coolant_leak"
    assert [(b[0], b[2], b[4]) for b in breakdowns] == [("v2", "fan_belt", "bob")]
    assert breakdowns[0][1] == 1790002800.0  # 2026-09-21T15:00 UTC
    status, body = get(f"{site}/api/verdicts?vehicle=v1&alert_id=a1")
    assert status == 200 and [h["label"] for h in body["history"]] == ["false_alarm", "confirmed"]
    status, body = get(site + "/api/quality?since=1789000000&until=1791000000")
    # a1 (confirmed now), a2 and the hostile vehicle's a9 opened under 1.0.0; a10's `ts` was not a time (stored as
    # its arrival, outside the period).
    assert status == 200 and [(m["version"], m["alerts"], m["verdicts"]["confirmed"]) for m in body["models"]] == [
        ("1.0.0", 3, 1)]
    assert body["models"][0]["breakdowns"] == {"caught": 1, "missed": 0}  # a2 opened 50 min before v2's breakdown

    forged: list[tuple[dict[str, str], str | None, int, str]] = [
        ({}, "http://evil.example", 403, "refused: a change is taken only from this server's own page"),
        ({}, "null", 403, "refused"),  # a sandboxed frame or a privacy-stripped origin
        ({}, None, 403, "refused"),  # neither Origin nor Referer
        ({"Referer": "http://evil.example/page"}, None, 403, "refused"),
        ({"Referer": site + "/"}, "http://evil.example", 403, "refused"),  # the Origin decides
        ({}, site.replace("http://", "ftp://"), 403, "refused"),
        ({}, f"{site}@evil.example", 403, "refused"),
        ({"Content-Type": "text/plain"}, "same", 415, "the body must be application/json"),
        ({"Content-Type": "application/x-www-form-urlencoded"}, "same", 415, "the body must be application/json"),
    ]
    for headers, origin, code, error in forged:
        status, body = post(site, "/api/verdict", verdict, headers, origin=origin)
        assert status == code and body["error"].startswith(error), (headers, origin, body)
    bad: list[tuple[str, Any, str]] = [
        ("/api/verdict", {**verdict, "label": "maybe"}, "label must be one of confirmed, false_alarm, unknown"),
        ("/api/verdict", {**verdict, "alert_id": "nope"}, "no alert 'nope'"),
        ("/api/verdict", {**verdict, "fault": "x"}, "a false alarm found no fault"),
        ("/api/verdict", {**verdict, "note": "x" * 2001}, "the note is 2001 characters long"),
        ("/api/verdict", {**verdict, "by": ""}, "say who records it"),
        ("/api/verdict", {**verdict, "by": 5}, "by must be text"),
        ("/api/verdict", {**verdict, "admin": "1"}, "unknown field 'admin'"),
        ("/api/verdict", [verdict], "the body must be a JSON object"),
        ("/api/verdict", "{not json", "the body is not JSON"),
        ("/api/verdict", b"\xff\xfe", "the body is not JSON"),
        ("/api/verdict", "[" * 30_000, "the body is not JSON"),  # nested past what the parser takes
        ("/api/breakdown", {"vehicle": "v9", "at": "2026-09-21T15:00", "fault": "x", "by": "bob"},
         "no vehicle 'v9'"),
        ("/api/breakdown", {"vehicle": "v1", "at": "yesterday", "fault": "x", "by": "bob"}, "at: not a time"),
        ("/api/breakdown", {"vehicle": "v1", "at": "2026-09-21T15:00", "fault": "", "by": "bob"},
         "not a fault name"),
    ]
    for path, body_in, error in bad:
        status, body = post(site, path, body_in if not isinstance(body_in, list) else json.dumps(body_in))
        assert (status, body["error"][:len(error)]) == (400, error), (path, body_in, body)
    assert post(site, "/api/verdict", "x" * (32 * 1024 + 1))[0] == 413
    assert post(site, "/api/rollout", verdict)[0] == 404
    assert get(site + "/api/quality?since=yesterday") == (400, {"error": "since: not a time: 'yesterday' (ISO 8601 "
                                                                "such as 2026-11-20T14:05 (UTC unless it has an "
                                                                "offset) or Unix seconds)"})
    assert get(site + "/api/quality?since=1791000000&until=1789000000")[0] == 400
    assert get(site + "/api/verdicts?alert_id=nope") == (400, {"error": "no alert 'nope' (cloud-sync alerts lists "
                                                                        "them)"})
    # A request with no Content-Length, and one that names another Host, never reach the database either.
    code, _ = http_raw(site, f"POST /api/verdict HTTP/1.1\r\nHost: {urllib.parse.urlsplit(site).netloc}\r\n"
                             f"Origin: {site}\r\nContent-Type: application/json\r\nConnection: close\r\n")
    assert code == 411
    code, _ = http_raw(site, "POST /api/verdict HTTP/1.1\r\nHost: evil.example\r\nOrigin: http://evil.example\r\n"
                             "Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    assert code == 421
    # A body cut short (the client went away): no answer, nothing stored, and the server serves on.
    u = urllib.parse.urlsplit(site)
    with socket.create_connection((u.hostname or "", u.port or 0), timeout=10) as s:
        s.sendall(f"POST /api/verdict HTTP/1.1\r\nHost: {u.netloc}\r\nOrigin: {site}\r\nContent-Type: "
                  f"application/json\r\nContent-Length: 100\r\n\r\n{{}}".encode())
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1000) == b""
    assert get(site + "/api/fleet")[0] == 200
    assert [len(x) for x in stored(tmp_path)] == [2, 1]  # nothing refused was stored


def test_page_records_a_verdict_and_a_breakdown_and_shows_quality(site: str, browser: Any, tmp_path: Path) -> None:
    """The mechanic's and the engineer's side of the page, in a real browser: the verdict form on an alert and the
    breakdown form write the database (read back through a connection of its own), a refused one shows the
    server's reason and stores nothing, and the quality section shows the figures over a chosen period."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 15, ignored_exceptions=(StaleElementReferenceException,))
    browser.get(site + "/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "1")

    def quality_rows() -> list[list[str]]:
        return [[td.text for td in r.find_elements(By.TAG_NAME, "td")]
                for r in browser.find_elements(By.CSS_SELECTOR, "table#quality tbody tr")]

    browser.find_element(By.ID, "q-since").send_keys("2026-09-01")
    browser.find_element(By.ID, "q-until").send_keys("2026-10-01T00:00Z")
    browser.find_element(By.CSS_SELECTOR, "#quality-form button").click()
    # a1 and a2 (and the markup vehicle's a9) opened under 1.0.0; no verdict yet, no engine hours (no SPN 247).
    wait.until(lambda d: quality_rows()[:2] == [
        ["harvester-anomaly", "1.0.0", "3", "0", "0", "0", "3", "-", "-", "-", "0", "0", "-", "-", "no"],
        ["coolant_leak", "", "3", "0", "0", "0", "3", "-", "", "", "0", "0", "-", "", ""]])
    assert browser.find_element(By.ID, "q-due").text == "no retraining due"

    # A verdict on v1's alert, through its form.
    next(r for r in browser.find_elements(By.CSS_SELECTOR, "table#alerts tbody tr")
         if r.get_attribute("data-vehicle") == "v1").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#detail form.verdict-form"))
    assert browser.find_element(By.CSS_SELECTOR, "#detail div.verdict p.now").text == "no verdict yet"
    form = browser.find_element(By.CSS_SELECTOR, "#detail form.verdict-form")
    Select(form.find_element(By.NAME, "label")).select_by_value("false_alarm")
    form.find_element(By.NAME, "note").send_keys("sensor cable loose")
    form.find_element(By.NAME, "by").send_keys("alice")
    form.find_element(By.TAG_NAME, "button").click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#detail .form-msg").text == "recorded: false_alarm")
    assert stored(tmp_path)[0] == [("v1", "a1", "false_alarm", "", "sensor cable loose", "alice")]
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#detail div.verdict p.now").text ==
               "now: false_alarm by alice")
    wait.until(lambda d: [r.find_element(By.CSS_SELECTOR, "td.verdict").text
                          for r in d.find_elements(By.CSS_SELECTOR, "table#alerts tbody tr[data-vehicle='v1']")]
               == ["false_alarm"])
    wait.until(lambda d: quality_rows()[0][2:8] == ["3", "0", "1", "0", "2", "0.00"])
    # Changed: confirmed, with the fault found. Both are kept.
    form = browser.find_element(By.CSS_SELECTOR, "#detail form.verdict-form")
    Select(form.find_element(By.NAME, "label")).select_by_value("confirmed")
    form.find_element(By.NAME, "fault").send_keys("Water pump")
    form.find_element(By.TAG_NAME, "button").click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#detail .form-msg").text == "recorded: confirmed "
               "(water_pump)")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#detail ol.history li")) == 2)
    assert [v[2:4] for v in stored(tmp_path)[0]] == [("false_alarm", ""), ("confirmed", "water_pump")]
    # Refused: a false alarm names no fault. The server's reason is shown; nothing is stored.
    form = browser.find_element(By.CSS_SELECTOR, "#detail form.verdict-form")
    Select(form.find_element(By.NAME, "label")).select_by_value("false_alarm")
    form.find_element(By.TAG_NAME, "button").click()  # the fault field still says water_pump
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#detail .form-msg").text.startswith(
        "not recorded: a false alarm found no fault"))
    assert len(stored(tmp_path)[0]) == 2

    # A breakdown of v2, through the breakdown form ("by" remembered from the verdict).
    Select(browser.find_element(By.ID, "b-vehicle")).select_by_value("v2")
    browser.find_element(By.ID, "b-at").send_keys("2026-09-21T15:00")
    browser.find_element(By.ID, "b-fault").send_keys("Fan belt")
    assert browser.find_element(By.ID, "b-by").get_attribute("value") == "alice"
    browser.find_element(By.CSS_SELECTOR, "#breakdown-form button").click()
    wait.until(lambda d: d.find_element(By.ID, "b-msg").text.startswith("recorded: breakdown 1 of v2 at "
                                                                        "2026-09-21 15:00:00 UTC (fan_belt)"))
    assert stored(tmp_path)[1] == [("v2", 1790002800.0, "fan_belt", "", "alice")]
    wait.until(lambda d: quality_rows()[0][10:13] == ["1", "0", "0.8"])  # caught by a2, opened 50 min before
    browser.find_element(By.ID, "b-at").clear()
    browser.find_element(By.ID, "b-at").send_keys("yesterday")
    browser.find_element(By.CSS_SELECTOR, "#breakdown-form button").click()
    wait.until(lambda d: d.find_element(By.ID, "b-msg").text.startswith("not recorded: at: not a time: 'yesterday'"))
    assert len(stored(tmp_path)[1]) == 1
    # A bad period is the server's 400, shown by the form.
    browser.find_element(By.ID, "q-until").clear()
    browser.find_element(By.ID, "q-until").send_keys("soon")
    browser.find_element(By.CSS_SELECTOR, "#quality-form button").click()
    wait.until(lambda d: d.find_element(By.ID, "q-msg").text.startswith("until: not a time: 'soon'"))

    # The page's POSTs carried its Origin (they were taken); the only console errors are the refusals' 400s.
    errors = [e["message"] for e in browser.get_log("browser") if e.get("level") in ("SEVERE", "WARNING")]
    assert errors and all("status of 400" in m for m in errors), errors
    shoot(browser, "learning")


def test_a_forged_cross_origin_post_from_another_site_is_refused(site: str, browser: Any, tmp_path: Path) -> None:
    """What CSRF looks like: a page on another origin the engineer happens to open posts to the fleet page, as a
    form (no permission needed; `text/plain` so that its body reads as JSON) and as a no-cors fetch. The browser
    sends them with the other origin, the server refuses both (403), and nothing is stored."""
    import http.server

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    evil = (f'<!doctype html><html><body><form id="f" method="POST" action="{site}/api/verdict" '
            'enctype="text/plain"><input name=\'{"alert_id": "a1", "label": "confirmed", "by": "mallory", "x": "\' '
            'value=\'"}\'></form><script>'
            f'fetch("{site}/api/verdict", {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}},'
            ' body: JSON.stringify({alert_id: "a1", label: "false_alarm", by: "mallory"})})'
            '.finally(() => document.getElementById("f").submit());</script></body></html>').encode()

    class Evil(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(evil)))
            self.end_headers()
            self.wfile.write(evil)

        def log_message(self, *args: Any) -> None:
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Evil)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://127.0.0.1:{other.server_address[1]}/")
        # The form's response is what the browser shows next: the server's refusal.
        WebDriverWait(browser, 15).until(lambda d: d.current_url.startswith(site))
        WebDriverWait(browser, 15).until(lambda d: "refused" in d.find_element(By.TAG_NAME, "body").text)
        assert "a change is taken only from this server's own page" in browser.find_element(By.TAG_NAME, "body").text
    finally:
        other.shutdown()
        other.server_close()
    assert stored(tmp_path) == ([], [])
