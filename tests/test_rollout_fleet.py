"""A staged rollout to ten real agents, end to end: one Mosquitto, `cloud-sync serve` (receiver and controller) and
ten `harvester-agent` processes, each scoring its own simulated harvester (harvester_testing/fleet.py), every step
through the commands a fleet engineer types.

1. A model that alerts on everything, signed and published, rolled out with a canary: the canary's shadow run
   rejects it, the rollout halts with the canary and its reason named, and no other vehicle is ever offered it.
2. A good model rolled out in waves to the same ten, one of which is offline until the last wave waits for it:
   every vehicle downloads, verifies, shadows, switches and passes its watch; the late one catches up from its
   retained desired model; no window goes unscored across any switch; the alert-everything model never scored a
   live window that raised an alert.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harvester_testing import modelkit
from harvester_testing.broker import MosquittoBroker
from harvester_testing.fleet import Fleet

VEHICLES = [f"h{i:02d}" for i in range(10)]
SHADOW_WINDOWS = 5  # one window a second of data time (modelkit's hop): short runs, as a test wants
WATCH_WINDOWS = 5


@pytest.fixture
def fleet(broker: MosquittoBroker, tmp_path: Path) -> Iterator[Fleet]:
    _, pub, _ = modelkit.signing_key(tmp_path / "keys")
    installed = modelkit.sim_model(tmp_path / "installed.onnx", "1.0.0", "normal")
    f = Fleet(broker, tmp_path / "fleet", installed, pub,
              model={"shadow_windows": SHADOW_WINDOWS, "watch_windows": WATCH_WINDOWS, "chunk_timeout_s": 5.0})
    try:
        f.start_cloud()
        yield f
    finally:
        f.close()


def _signed(tmp_path: Path, version: str, behaviour: str) -> Path:
    model = modelkit.sim_model(tmp_path / f"m-{version}.onnx", version, behaviour)
    out = tmp_path / f"sim-anomaly-{version}.pkg"
    modelkit.package(model, next((tmp_path / "keys").glob("*.key")), out)
    return out


def _model(row: dict[str, Any]) -> dict[str, Any]:
    m: dict[str, Any] = row.get("model") or {}
    return m


def test_canary_failure_halts_then_a_good_model_reaches_every_vehicle_including_a_late_one(
        fleet: Fleet, tmp_path: Path) -> None:
    bad = _signed(tmp_path, "2.0.0", "alert_all")
    good = _signed(tmp_path, "3.0.0", "normal")
    fleet.cli("model", "publish", str(bad))
    fleet.cli("model", "publish", str(good))
    late = VEHICLES[-1]
    for v in VEHICLES[:-1]:
        fleet.start_agent(v)
    fleet.wait(lambda: set(VEHICLES[:-1]) <= set(fleet.fleet_rows()), "nine vehicles seen by the cloud")

    # 1. The canary rejects the model that alerts on everything: the rollout halts, naming it and why.
    fleet.cli("rollout", "start", "sim-anomaly", "2.0.0", "--vehicles", ",".join(VEHICLES), "--canary", "1",
              "--waves", "50,100")
    fleet.wait(lambda: fleet.rollout_status()["state"] == "halted", "the canary's rejection to halt rollout 1")
    st = fleet.rollout_status()
    text = str(st)
    assert VEHICLES[0] in text and "alert" in text, st  # the failed vehicle, and a reason about its alert rate
    rows = fleet.fleet_rows()
    canary = _model(rows[VEHICLES[0]])
    assert canary["state"] == "rejected" and canary["active"]["version"] == "1.0.0", canary
    for v in VEHICLES[1:-1]:  # never offered: their desired model is not 2.0.0 and they still score with 1.0.0
        m = _model(rows[v])
        assert (m.get("desired") or {}).get("version") != "2.0.0", (v, m)
        assert (m.get("active") or {}).get("version", "1.0.0") == "1.0.0", (v, m)
    fleet.cli("rollout", "abort", "--id", str(st["id"]))

    # 2. The good model in waves; the last vehicle is offline, so the last wave waits for it.
    fleet.cli("rollout", "start", "sim-anomaly", "3.0.0", "--vehicles", ",".join(VEHICLES), "--canary", "1",
              "--waves", "50,100")

    def healthy(vs: list[str]) -> bool:
        states = {x["vehicle"]: x for w in fleet.rollout_status()["waves"] for x in w["vehicles"]}
        rows = fleet.fleet_rows()
        return all(states[v]["state"] == "active" and states[v]["healthy"] is True
                   and (_model(rows[v]).get("active") or {}).get("version") == "3.0.0" for v in vs)

    try:
        fleet.wait(lambda: healthy(VEHICLES[:-1]), "nine vehicles active and healthy on 3.0.0", timeout_s=240)
    except AssertionError:
        states = {x["vehicle"]: x for w in fleet.rollout_status()["waves"] for x in w["vehicles"]}
        stuck = {v: (states[v], fleet.agent_status(v).get("model")) for v in VEHICLES[:-1]
                 if states[v]["state"] != "active"}
        raise AssertionError(f"stuck: {stuck}") from None
    assert fleet.rollout_status()["state"] == "running"  # waiting for the one that is away
    fleet.start_agent(late)
    fleet.wait(lambda: fleet.rollout_status()["state"] == "done", "the late vehicle to finish the rollout")
    assert healthy(VEHICLES)

    for v in VEHICLES:
        fleet.stop_agent(v)
    # Each agent's own count, saved in its store at stop: no window went unscored across its switch.
    for v in VEHICLES:
        c = fleet.agent_status(v)["metrics"]["counters"]
        assert c["pipeline.model_switches"] >= 1, (v, c)
        assert c["pipeline.model_switch_unscored_windows"] == 0, (v, c)
        assert c["pipeline.alerts_opened"] == 0, (v, c)  # 2.0.0 never took over anywhere
