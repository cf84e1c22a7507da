"""End to end on real parts: simulator (fault on) → python-can virtual bus + pty GPS → agent (decode, features,
int8 ONNX model, SQLite store) → Mosquitto → cloud_sync (a separate process) → the cloud's SQLite database.

The simulator runs 4x faster than real time; frames carry the simulated clock (preserve_timestamps), which is
the clock the agent's windows run on, so the physics the model sees is unchanged.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import can
import pytest

from agent.config import AgentConfig
from agent.service import Agent
from cloud_sync.config import WebConfig
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


@pytest.mark.slow
def test_source_down_and_up_reach_the_cloud_and_the_fleet_page(broker: MosquittoBroker, tmp_path: Path) -> None:
    """A dead bus must not look like an idle vehicle. Real parts: a socketcand server (the simulator's) stopped and
    started again under the agent's CAN source, a pty GPS whose other end closes and reopens; the agent's
    source_down/source_up events go through its store and Mosquitto to a cloud_sync receiver (a separate process),
    and the fleet API shows each source's last state and the vehicle's counters from its status message."""
    from cloud_sync.web import Api
    from harvester_sim.socketcand_server import SocketcandServer

    cloud_db = tmp_path / "cloud.sqlite"
    cloud_cfg = tmp_path / "cloud.toml"
    cloud_cfg.write_text(f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nclient_id = "e2e-cloud-src"\n'
                         f'[db]\npath = "{cloud_db}"\n')
    cloud = subprocess.Popen([sys.executable, "-m", "cloud_sync", "serve", "--config", str(cloud_cfg)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    srv = SocketcandServer(0, "can0")
    port = srv.address[1]
    link = tmp_path / "gps"
    gps = PtyPair(link=link)
    cfg = AgentConfig.model_validate({
        "vehicle": {"fleet": "e2e", "id": "harvester-8"},
        "can": [{"name": "can0", "interface": "socketcand", "channel": "can0",
                 "options": {"host": "127.0.0.1", "port": port}, "reconnect_min_s": 0.05, "reconnect_max_s": 0.2}],
        "serial": [{"name": "gps", "port": str(link), "reconnect_min_s": 0.05, "reconnect_max_s": 0.2}],
        "model": {"path": str(tmp_path / "none.onnx")},
        "store": {"path": str(tmp_path / "agent.sqlite"), "flush_interval_s": 0.2},
        "mqtt": {"host": broker.host, "port": broker.port, "tls": False, "batch_max_age_s": 0.5,
                 "ack_timeout_s": 5.0, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
    })
    agent = Agent(cfg)
    events = agent.metrics
    stopped = False
    try:
        agent.start()
        wait_for(lambda: all(s.up for s in agent._sources()), what="bus and GPS open")
        srv.shutdown()  # the bus dies
        wait_for(lambda: events.labels("source.can0.events") == {"source_down": 1}, what="can0 down")
        srv = SocketcandServer(port, "can0")
        wait_for(lambda: events.labels("source.can0.events").get("source_up") == 1, what="can0 back")
        gps.close()  # the GPS is unplugged
        wait_for(lambda: events.labels("source.gps.events") == {"source_down": 1}, what="gps down")
        gps = PtyPair(link=link)
        wait_for(lambda: events.labels("source.gps.events").get("source_up") == 1, what="gps back")
        wait_for(lambda: agent.pipeline.stats.source_events == 4, what="all four events through the pipeline")
        agent.stop(drain_s=20)
        stopped = True
        assert agent.store_status_at_stop["backlog_records"] == 0  # the cloud acked every event
        db = CloudDB(cloud_db)
        rows = Reports(db).fleet()
        # The status message the agent left (its last, at stop) carries its counters.
        wait_for(lambda: Reports(db).fleet()[0]["metrics"].get("source.gps.events{source_up}") == 1, timeout=30,
                 what="the vehicle's counters on the fleet page")
        row = Api(db, WebConfig()).fleet()["vehicles"][0]
        stored = db.read("SELECT kind, record FROM events WHERE vehicle=? ORDER BY seq", ("harvester-8",))
    finally:
        if not stopped:
            agent.stop(drain_s=0)
        srv.shutdown()
        gps.close()
        cloud.send_signal(signal.SIGTERM)
        out = cloud.communicate(timeout=30)[0].decode()
    assert cloud.returncode == 0, out
    assert rows and row["vehicle"] == "harvester-8"
    kinds = [(k, json.loads(r)["data"]["source"]) for k, r in stored]
    assert kinds == [("source_down", "can0"), ("source_up", "can0"), ("source_down", "gps"), ("source_up", "gps")]
    down_can = json.loads(stored[0][1])["data"]
    assert down_can["reason"] == "bus_error" and "closed the connection" in down_can["error"]
    assert row["sources"]["can0"]["up"] is True and row["sources"]["gps"]["up"] is True
    m = row["metrics"]
    assert m["source.can0.events{source_down}"] == 1 and m["source.gps.errors{device_lost}"] == 1
    assert m["pipeline.source_events"] == 4 and m["source.can0.errors{bus_error}"] == 1
