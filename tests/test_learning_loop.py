"""The learning loop end to end (docs/learning_loop.md): real agents on simulated harvesters with faults, the cloud
(`cloud-sync serve`), a mechanic's verdicts and breakdowns through the CLI, `cloud-sync export` into Parquet,
`python -m models.build --from-export` building and signing the next model from it, that model rolled out through
the rollout machinery, and `cloud-sync quality` showing both versions side by side.

1. Four agents score with the shipped model (harvester-anomaly 2.0.0), ten times faster than life: h00 and h01
   develop coolant leaks (a fault on two vehicle-days, so the build holds one out), h02 and h03 stay healthy. Both
   leaks raise alerts that reach the cloud.
2. The machines are repaired (run again healthy, their data going on from where it ended). A mechanic records
   verdicts (one changed: every change kept), a breakdown the alert warned of and one nobody was warned of.
3. The export feeds the build: a candidate, evaluated beside 2.0.0 on held-out vehicle-days, signed.
4. It is published and rolled out (canary, then the rest); every vehicle runs it.
5. h01 leaks again: the alert now carries the new version, a mechanic confirms it, and `quality` shows
   2.0.0 and the new version each with its own alerts, verdicts and precision.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harvester_testing import modelkit
from harvester_testing.broker import MosquittoBroker
from harvester_testing.fleet import Fleet

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "harvester-anomaly.int8.onnx"
SPEED = 10.0  # data seconds per wall second
VEHICLES = ("h00", "h01", "h02", "h03")
FAULTS = {"h00": "coolant_leak", "h01": "coolant_leak"}
SEEDS = {"h00": 11, "h01": 12, "h02": 13, "h03": 14}
ONSET_S, RAMP_S = 60.0, 30.0
RUN_S = 360.0  # data seconds per vehicle in the first phase
# The data clock starts this long before now, so that ten times faster than life it stays in the past, as a fleet's
# records are (the quality report's default period ends now).
PAST_S = 3 * 3600.0


@pytest.fixture
def loop(broker: MosquittoBroker, tmp_path: Path) -> Iterator[tuple[Fleet, Path]]:
    key, pub, _ = modelkit.signing_key(tmp_path / "keys")
    f = Fleet(broker, tmp_path / "fleet", SHIPPED, pub, speed=SPEED,
              model={"shadow_windows": 6, "watch_windows": 6, "chunk_timeout_s": 5.0,
                     "drift_interval_s": 60.0})
    try:
        f.start_cloud()
        yield f, key
    finally:
        f.close()


def _db(fleet: Fleet, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(fleet.cloud_db, timeout=30)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def _data_end(fleet: Fleet, vehicle: str) -> float:
    rows = _db(fleet, "SELECT MAX(ts) FROM samples WHERE vehicle=?", (vehicle,))
    return float(rows[0][0] or 0.0)


def _span(fleet: Fleet, vehicle: str) -> float:
    lo, hi = _db(fleet, "SELECT MIN(ts), MAX(ts) FROM samples WHERE vehicle=?", (vehicle,))[0]
    return 0.0 if lo is None else float(hi) - float(lo)


def _alerts(fleet: Fleet) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(fleet.cli("alerts", "--json").stdout)["alerts"]
    return out


def _opened(fleet: Fleet, vehicle: str, version: str) -> list[dict[str, Any]]:
    return [a for a in _alerts(fleet) if a["vehicle"] == vehicle and a["state"] == "open"
            and a["model_version"] == version]


def _restart_all(fleet: Fleet, faults: dict[str, str] | None = None, onset_s: float = 0.0) -> None:
    for v in VEHICLES:
        fleet.start_agent(v, seed=SEEDS[v] + 100, fault=(faults or {}).get(v), ramp_s=RAMP_S, onset_s=onset_s,
                          start_ts=_data_end(fleet, v) + 30.0)


def _stop_all(fleet: Fleet) -> None:
    for v in VEHICLES:
        fleet.stop_agent(v)


def test_verdicts_export_build_rollout_and_quality_per_version(loop: tuple[Fleet, Path], tmp_path: Path) -> None:
    fleet, key = loop
    base_pkg = tmp_path / "harvester-anomaly-2.0.0.pkg"
    modelkit.package(SHIPPED, key, base_pkg, card=json.loads((REPO / "models" / "harvester-anomaly.card.json")
                                                                  .read_text()))
    fleet.cli("model", "publish", str(base_pkg))

    # 1. Faults develop on two machines; both alerts reach the cloud.
    start = time.time() - PAST_S
    for v in VEHICLES:
        fleet.start_agent(v, seed=SEEDS[v], fault=FAULTS.get(v), ramp_s=RAMP_S, onset_s=ONSET_S, start_ts=start)
    fleet.wait(lambda: all(_opened(fleet, v, "2.0.0") for v in FAULTS), "alerts of both faults in the cloud",
               timeout_s=120)
    fleet.wait(lambda: all(_span(fleet, v) >= RUN_S for v in VEHICLES), f"{RUN_S:.0f} s of data from each",
               timeout_s=120)
    _stop_all(fleet)
    first = {v: _opened(fleet, v, "2.0.0")[0] for v in FAULTS}
    assert first["h00"]["label"] == first["h01"]["label"] == "coolant_leak", first
    assert not [a for a in _alerts(fleet) if a["vehicle"] in ("h02", "h03")]

    # 2. Repaired: run again healthy; what the stores still held (the alerts' closing records) follows.
    _restart_all(fleet)
    fleet.wait(lambda: {a["alert_id"] for a in _alerts(fleet) if a["state"] == "closed"}
               >= {a["alert_id"] for a in first.values()}, "the first alerts' closing records")
    a0, a1 = first["h00"]["alert_id"], first["h01"]["alert_id"]
    fleet.cli("alerts", "verdict", a0, "--label", "unknown", "--by", "ana")
    fleet.cli("alerts", "verdict", a0, "--label", "confirmed", "--fault", "coolant_leak", "--by", "ana",
              "--note", "coolant hose cracked at the clamp")
    fleet.cli("alerts", "verdict", a1, "--label", "confirmed", "--by", "ben")  # fault: the alert's own label
    history = fleet.cli("alerts", "history", a0).stdout
    assert "unknown" in history and "confirmed" in history and "ana" in history, history
    broke_at = float(first["h00"]["ts"]) + 120.0
    fleet.cli("breakdown", "add", "--vehicle", "h00", "--at", repr(broke_at), "--fault", "coolant_leak",
              "--note", "hose replaced")
    fleet.cli("breakdown", "add", "--vehicle", "h02", "--at", repr(_data_end(fleet, "h02") - 60.0),
              "--fault", "alternator", "--note", "no warning: not a fault the model knows")
    _stop_all(fleet)

    # 3. Export, and the next model built from it.
    export = tmp_path / "export"
    fleet.cli("export", "--out", str(export))
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["complete"] is True, manifest
    out = tmp_path / "candidate"
    r = subprocess.run([sys.executable, "-m", "models.build", "--from-export", str(export), "--base", str(base_pkg),
                        "--key", str(key), "--out", str(out), "--quick"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    packages = sorted(out.glob("*.pkg"))
    assert len(packages) == 1, (packages, r.stderr[-2000:])
    card = json.loads(next(out.glob("*card.json")).read_text())
    version = packages[0].stem.rsplit("-", 1)[-1]
    assert version != "2.0.0", packages

    # 4. Published and rolled out to every vehicle.
    fleet.cli("model", "publish", str(packages[0]))
    _restart_all(fleet)
    fleet.cli("rollout", "start", "harvester-anomaly", version, "--vehicles", ",".join(VEHICLES), "--canary", "1",
              "--waves", "100")
    fleet.wait(lambda: fleet.rollout_status()["state"] == "done", f"the rollout of {version}", timeout_s=300)
    rows = fleet.fleet_rows()
    assert all((rows[v]["model"]["active"] or {}).get("version") == version for v in VEHICLES), rows

    # 5. h01 leaks again: the alert carries the new version; confirmed; quality per version.
    fleet.stop_agent("h01")
    fleet.start_agent("h01", seed=SEEDS["h01"] + 200, fault="coolant_leak", ramp_s=RAMP_S, onset_s=30.0,
                      start_ts=_data_end(fleet, "h01") + 30.0)
    fleet.wait(lambda: bool(_opened(fleet, "h01", version)), f"an alert of {version} on h01", timeout_s=120)
    _stop_all(fleet)
    new = _opened(fleet, "h01", version)[0]
    assert new["label"] == "coolant_leak", new
    fleet.cli("alerts", "verdict", new["alert_id"], "--label", "confirmed", "--by", "ben")

    q = json.loads(fleet.cli("quality", "--json").stdout)
    by_version = {m["version"]: m for m in q["models"] if m["model"] == "harvester-anomaly"}
    assert set(by_version) >= {"2.0.0", version}, q
    old, cand = by_version["2.0.0"], by_version[version]
    assert old["alerts"] == 2 and old["verdicts"]["confirmed"] == 2 and old["precision"] == 1.0, old
    assert old["breakdowns"] == {"caught": 1, "missed": 1}, old
    assert old["median_lead_time_h"] is not None and old["median_lead_time_h"] > 0, old
    assert cand["alerts"] >= 1 and cand["verdicts"]["confirmed"] >= 1 and cand["precision"] == 1.0, cand
    # The card put both models side by side, per fault, on the same held-out data, and the held-out leak decided.
    assert card["decision"]["signed"] is True and card["decision"]["reasons"] == [], card["decision"]
    faults = card["evaluation"]["faults"]
    assert faults["coolant_leak"]["episodes"] >= 1, faults
    for row in faults.values():
        assert {"candidate", "base"} <= set(row), row
    assert faults["coolant_leak"]["candidate"]["detected"] >= faults["coolant_leak"]["base"]["detected"] >= 1
