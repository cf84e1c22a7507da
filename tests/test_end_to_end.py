"""End to end on real parts: simulator (fault on) → python-can virtual bus + pty GPS → agent (decode, features,
int8 ONNX model, SQLite store) → Mosquitto → cloud_sync (a separate process) → the cloud's SQLite database.

The simulator runs 4x faster than real time; frames carry the simulated clock (preserve_timestamps), which is
the clock the agent's windows run on, so the physics the model sees is unchanged.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import can
import pytest

from agent.config import AgentConfig
from agent.service import Agent
from cloud_sync.db_sqlite import CloudDB
from cloud_sync.reports import Reports
from harvester_sim import Harvester, Simulator
from harvester_sim.pty import PtyPair
from harvester_testing.broker import MosquittoBroker
from tests.test_uplink import wait_for

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "harvester-anomaly.int8.onnx"


def _agent_config(tmp_path: Path, broker: MosquittoBroker, gps: str, channel: str) -> AgentConfig:
    return AgentConfig.model_validate({
        "vehicle": {"fleet": "e2e", "id": "harvester-7"},
        "can": [{"name": "can0", "interface": "virtual", "channel": channel}],
        "serial": [{"name": "gps", "port": gps}],
        "model": {"path": str(MODEL)},
        "store": {"path": str(tmp_path / "agent.sqlite"), "flush_interval_s": 0.5},
        "mqtt": {"host": broker.host, "port": broker.port, "tls": False, "batch_max_age_s": 1.0, "ack_timeout_s": 5.0,
                 "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
    })


@pytest.mark.slow
def test_fault_to_cloud_alert_and_every_sample_exactly_once(broker: MosquittoBroker, tmp_path: Path) -> None:
    assert MODEL.exists(), "the shipped model is missing: python -m models.build"
    cloud_db = tmp_path / "cloud.sqlite"
    cloud_cfg = tmp_path / "cloud.toml"
    cloud_cfg.write_text(f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nclient_id = "e2e-cloud"\n'
                         f'[db]\npath = "{cloud_db}"\n')
    cloud = subprocess.Popen([sys.executable, "-m", "cloud_sync", "serve", "--config", str(cloud_cfg)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    channel = f"e2e-{id(tmp_path)}"
    sim_bus = can.Bus(interface="virtual", channel=channel, preserve_timestamps=True)
    with PtyPair(link=tmp_path / "gps") as gps:
        agent = Agent(_agent_config(tmp_path, broker, gps.path, channel))
        assert agent.scorer is not None, agent.model_status
        agent.start()
        harvester = Harvester(seed=21, fault="coolant_leak", fault_onset_s=0, fault_ramp_s=20, duty="harvest",
                              ambient_c=30)
        stats = Simulator(harvester, sim_bus, gps.write, speed=4).run(80, threading.Event())
        wait_for(lambda: agent.pipeline.stats.frames >= stats.frames_sent, what="agent to read every frame")
        agent.stop(drain_s=20)
    sim_bus.shutdown()
    written = agent.store_status_at_stop["records_written"]
    try:
        db = CloudDB(cloud_db)
        reports = Reports(db)
        wait_for(lambda: reports.stats() and reports.stats()[0].records["samples"] >= written["samples"], timeout=30,
                 what="cloud to hold every sample")
        v = Reports(db).stats()[0]
        alerts = Reports(db).alerts()
    finally:
        cloud.send_signal(signal.SIGTERM)
        out = cloud.communicate(timeout=30)[0].decode()
    assert cloud.returncode == 0, out
    assert agent.pipeline.stats.frames == stats.frames_sent  # nothing lost between simulator and agent
    assert v.records["samples"] == written["samples"]  # every sample the agent wrote, exactly once
    assert v.gaps == [] and v.evicted == []
    assert any(a["state"] == "open" and a["label"] == "coolant_leak" for a in alerts), alerts
    assert agent.pipeline.stats.serial_lines > 0  # the GPS went through the pty too
    assert agent.store_status_at_stop["backlog_records"] == 0
