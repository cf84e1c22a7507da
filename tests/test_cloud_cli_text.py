"""`cloud-sync stats/fleet/alerts` over a database holding hostile vehicle text, run as the engineer runs them: the
real command in a subprocess, a real SQLite file. A vehicle id, label or model name carrying terminal escapes
(`ESC [2J` clears the screen, `ESC ]0;` retitles the window, C1 `CSI`), a bidi override (U+202E reverses what
follows), a carriage return or a line separator (a fake row), or a lone surrogate (which the terminal's encoder
cannot even print) must reach the terminal as visible escapes; `--json` stays valid, ASCII-only JSON that gives
the stored text back exactly."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud_sync.db_sqlite import CloudDB
from cloud_sync.reports import Reports
from harvester_common import wire
from harvester_testing.broker import MosquittoBroker
from harvester_testing.cloudproc import write_config
from tests.test_cloud_db import T0, alert, samples
from tests.test_uplink import wait_for

# Vehicle ids and fleet names are validated at the receiver now, but a database written before that (or by hand)
# still holds whatever came: these go in by SQL, the way such a row would be there.
VEHICLE = "v\x1b[2J\x1b[Hfake\u202eevil"
FLEET = "f\x9b31mred"
# Free text that passes any id check: labels, model versions, feature names.
LABEL = "fuite d'eau \u00e9\x1b]0;pwned\x07\r\nFAKE ROW\x7f\u2028\u2066x"
# A lone surrogate is valid JSON text ("\\ud800") but no terminal encoding can print it. (The receiver cannot store
# one in its indexed columns either; this record holds it in its JSON.)
SURROGATE_LABEL = LABEL + "\ud800"
MODEL_VERSION = "1.0\x1b[31m"
FEATURE = "ET1.EngCoolantTemp\x1b[2K:mean:30s"
ROOT = Path(__file__).resolve().parent.parent


def _seed(path: Path) -> None:
    db = CloudDB(path)
    db.ingest([wire.Batch("f1", "v1", 1, [
        samples(1, 10),
        alert(11, "a1", "open", T0, label=LABEL, model_version=MODEL_VERSION, top_features=[[FEATURE, 0.4]]),
        # A malformed record as a vehicle could send it: wrong types and a NaN must not crash the report.
        wire.Segment("alert", 12, 12, record={"alert_id": "a2", "state": 5, "ts": "yesterday", "score": math.nan,
                                              "label": ["x"], "model": None, "top_features": "x"}),
    ])])
    db.set_status("f1", "v1", {"state": "online", "model_version": MODEL_VERSION})
    db.close()
    con = sqlite3.connect(path)
    rec = json.dumps({"alert_id": "a\x1b[1A", "state": "open", "ts": T0 + 1, "score": 0.5, "label": SURROGATE_LABEL})
    with con:
        con.execute("INSERT INTO vehicles (vehicle, fleet, first_seen, last_seen, online, status) "
                    "VALUES (?,?,?,?,1,?)", (VEHICLE, FLEET, T0, T0, json.dumps({"model_version": MODEL_VERSION})))
        con.execute("INSERT INTO alerts VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (VEHICLE, 5, "a\x1b[1A", "open", T0 + 1, 0.5, "m", MODEL_VERSION, "leak", rec))
    con.close()


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    _seed(tmp_path / "cloud.sqlite")
    p = tmp_path / "cloud.toml"
    p.write_text('[db]\npath = "cloud.sqlite"\n')
    return p


def cloud_sync(*args: str, **env_extra: str) -> bytes:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    r = subprocess.run([sys.executable, "-m", "cloud_sync", *args], capture_output=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stderr == b"", r.stderr.decode(errors="replace")
    return r.stdout


def _visible(out: bytes) -> str:
    text = out.decode("utf-8")  # strict: a lone surrogate could not have been encoded
    bad = sorted({f"U+{ord(c):04X}" for c in text if c != "\n" and not c.isprintable()})
    assert bad == [], f"unescaped control/format characters reached the terminal: {bad}"
    return text


@pytest.mark.parametrize("command", ["stats", "fleet", "alerts"])
def test_human_output_shows_hostile_text_escaped(cfg: Path, command: str) -> None:
    text = _visible(cloud_sync(command, "--config", str(cfg)))
    lines = text.splitlines()
    # One line per vehicle (stats, fleet) or alert, after the header: no injected line break made a fake row.
    assert len(lines) == 1 + (2 if command != "alerts" else 3), text
    # Escaped, not dropped: the engineer can see what the vehicle sent.
    assert "\\x1b[2J\\x1b[Hfake\\u202eevil" in text
    if command != "alerts":
        assert "f\\x9b31mred/" in text  # the fleet goes before the vehicle id
    if command == "fleet":
        assert "1.0\\x1b[31m" in text
    if command == "alerts":
        assert "\\x1b]0;pwned\\x07\\r\\nFAKE ROW\\x7f\\u2028\\u2066x\\ud800" in text  # a label, in full
        assert "\\x1b[2K" in text  # a feature name


def test_a_terminal_that_cannot_show_unicode_gets_escapes_not_a_traceback(cfg: Path) -> None:
    text = cloud_sync("alerts", "--config", str(cfg), PYTHONIOENCODING="ascii").decode("ascii")
    assert "fuite d'eau \\xe9\\x1b]0;pwned" in text


@pytest.mark.parametrize("command", ["stats", "fleet", "alerts"])
def test_json_output_is_ascii_and_gives_the_text_back(cfg: Path, command: str) -> None:
    out = cloud_sync(command, "--config", str(cfg), "--json")
    assert max(out) < 0x80  # every non-ASCII character escaped: C1 and bidi controls included

    def no_constant(c: str) -> Any:
        raise AssertionError(f"{c} is not JSON")

    doc = json.loads(out, parse_constant=no_constant)
    if command in ("stats", "fleet"):
        assert {(v["fleet"], v["vehicle"]) for v in doc["vehicles"]} == {("f1", "v1"), (FLEET, VEHICLE)}
    else:
        by_key = {(a["vehicle"], a["seq"]): a for a in doc["alerts"]}
        assert set(by_key) == {("v1", 11), ("v1", 12), (VEHICLE, 5)}
        assert by_key[("v1", 11)]["label"] == LABEL and by_key[(VEHICLE, 5)]["label"] == SURROGATE_LABEL
        assert by_key[("v1", 11)]["top_features"] == [[FEATURE, 0.4]]
        assert by_key[("v1", 12)]["score"] is None  # the NaN the vehicle sent, as JSON can say it


def test_serve_log_escapes_vehicle_text(broker: MosquittoBroker, tmp_path: Path) -> None:
    """`cloud-sync serve` logs to stderr (journald): a topic a vehicle chose, quoted in a log line, is escaped there
    too. (Mosquitto refuses C0/C1 controls in topics; a bidi override passes it.)"""
    cfg = write_config(tmp_path / "cloud.toml", broker, "rx-text", db_path=str(tmp_path / "cloud.sqlite"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rx = subprocess.Popen([sys.executable, "-m", "cloud_sync", "serve", "--config", str(cfg)],
                          stderr=subprocess.PIPE, env=env)
    try:
        wait_for(lambda: (tmp_path / "cloud.sqlite").exists(), what="the receiver's database")
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="veh-text", protocol=mqtt.MQTTv5)
        c.connect(broker.host, broker.port)
        c.loop_start()
        db = CloudDB(tmp_path / "cloud.sqlite")
        try:
            # Sent until counted: the receiver may not have subscribed yet when the first one goes.
            def rejected() -> bool:
                c.publish("fleet/f1/vehicle/v\u202eevil\u2066/telemetry", b"junk", qos=1).wait_for_publish(10)
                return sum(Reports(db).rejected().values()) > 0

            wait_for(rejected, what="the hostile message rejected")
        finally:
            db.close()
            c.loop_stop()
            c.disconnect()
    finally:
        rx.terminate()
        _, err = rx.communicate(timeout=30)
    assert rx.returncode == 0
    text = _visible(err)
    assert "v\\u202eevil\\u2066" in text, text  # quoted, escaped
