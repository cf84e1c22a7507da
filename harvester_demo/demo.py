"""`harvester-agent demo`: the whole system on one machine for a minute.

A Mosquitto broker and cloud_sync run as child processes; the simulator and the agent share this process because
python-can's `virtual` bus is in-process (as separate processes: `simulate --socketcand PORT` and `run` with a
`socketcand` bus on 127.0.0.1; on a bench with vcan0 or a real adapter, `socketcan`). Progress shows live; the
summary reads the cloud's database, and the exit status says whether an alert made it all the way there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import can

from agent.config import AgentConfig, load_config
from agent.service import Agent
from harvester_sim.pty import PtyPair
from harvester_testing.broker import MosquittoBroker
from harvester_testing.tomlw import dumps

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "docs" / "examples" / "demo-agent.toml"


class DemoError(ValueError):
    """A demo that cannot start (bad scenario); the text says why."""


def _say(msg: str) -> None:
    print(msg, flush=True)


def _agent_config(base: AgentConfig, workdir: Path, port: int, gps: Path) -> AgentConfig:
    can_cfg = [b.model_copy(update={"interface": "virtual", "channel": f"harvester-demo-{os.getpid()}"})
               for b in base.can]
    serial_cfg = [s.model_copy(update={"port": str(gps)}) for s in base.serial[:1]]
    return base.model_copy(
        update={
            "can": can_cfg,
            "serial": serial_cfg,
            "store": base.store.model_copy(update={"path": workdir / "agent.sqlite"}),
            "mqtt": base.mqtt.model_copy(update={"host": "127.0.0.1", "port": port, "tls": False}),
        }
    )


def _write_configs(cfg: AgentConfig, workdir: Path, port: int) -> Path:
    (workdir / "agent.toml").write_text(
        "# Effective config of the last demo run (generated).\n" + dumps(cfg.model_dump(mode="json"))
    )
    cloud = workdir / "cloud.toml"
    cloud.write_text(dumps({
        "mqtt": {"host": "127.0.0.1", "port": port, "client_id": "cloud-sync-demo"},
        "db": {"path": str(workdir / "cloud.sqlite")},
        "log": {"level": "INFO"},
    }))
    return cloud


class _Progress:
    def __init__(self, agent: Agent, duration_s: float) -> None:
        self.agent = agent
        self.duration_s = duration_s
        self.tty = sys.stdout.isatty()
        self._last_line = 0.0

    def show(self, final: bool = False) -> None:
        p = self.agent.progress()
        score = "-" if p.last_score != p.last_score else f"{p.last_score:.2f}"
        line = (
            f"[{min(p.uptime_s, self.duration_s):5.1f}/{self.duration_s:.0f}s] {p.frames_per_s:6.0f} frames/s  "
            f"windows {p.windows_scored:3d}  score {score:>4}  alerts {p.alerts_opened}  dtc {p.dtc_events}  "
            f"backlog {p.backlog:6d}  synced {p.synced:7d}  {'online' if p.connected else 'OFFLINE'}"
        )
        if self.tty:
            print("\r" + line, end="\n" if final else "", flush=True)
        elif final or time.monotonic() - self._last_line >= 5:
            print(line, flush=True)
            self._last_line = time.monotonic()


def _cloud_summary(db_path: Path) -> dict[str, Any]:
    from cloud_sync.db_sqlite import CloudDB
    from cloud_sync.reports import Reports

    db = CloudDB(db_path)
    try:
        return {"vehicles": [v.to_dict() for v in Reports(db).stats()], "alerts": Reports(db).alerts()}
    finally:
        db.close()


def run_demo(config: Path | None, duration_s: float, fault: str | None, workdir: Path) -> int:
    from harvester_sim import Simulator, sim_from_config

    base = load_config(config or DEFAULT_CONFIG)
    workdir = workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    sim_cfg = dict(base.sim)
    sim_cfg.pop("serial_link", None)  # the demo makes its own pty
    if fault:
        sim_cfg["fault"] = fault
    try:
        harvester = sim_from_config(sim_cfg)  # validates the scenario before anything starts
    except ValueError as e:
        raise DemoError(f"[sim] {e}") from None

    _say(f"demo: work folder {workdir}")
    # The agent's log goes to a file so that it does not tear the progress line; alerts show in the progress.
    handler = logging.FileHandler(workdir / "agent.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    broker = MosquittoBroker(workdir=workdir / "mosquitto")
    broker.start()
    _say(f"demo: mosquitto listening on 127.0.0.1:{broker.port}")
    gps = PtyPair(link=workdir / "gps")
    cfg = _agent_config(base, workdir, broker.port, workdir / "gps")
    cloud_cfg = _write_configs(cfg, workdir, broker.port)
    cloud_log = (workdir / "cloud-sync.log").open("wb")
    cloud = subprocess.Popen([sys.executable, "-m", "cloud_sync", "serve", "--config", str(cloud_cfg)],
                             stdout=cloud_log, stderr=subprocess.STDOUT)
    _say(f"demo: cloud_sync started (log {workdir / 'cloud-sync.log'})")
    agent = Agent(cfg)
    _say(f"demo: agent for {cfg.vehicle.fleet}/{cfg.vehicle.id}, model {agent.model_status}")
    bus = can.Bus(interface="virtual", channel=cfg.can[0].channel, preserve_timestamps=True) if cfg.can else None
    stop = threading.Event()
    sim = Simulator(harvester, bus, gps.write)
    sim_thread = threading.Thread(target=sim.run, args=(duration_s, stop), name="simulator", daemon=True)
    _say(f"demo: simulator on, fault {sim_cfg.get('fault') or 'none'}; running {duration_s:.0f} s (Ctrl-C stops)")
    old = signal.signal(signal.SIGINT, lambda *_: stop.set())
    progress = _Progress(agent, duration_s)
    agent.start()
    sim_thread.start()
    try:
        while sim_thread.is_alive() and not stop.wait(0.5):
            progress.show()
        progress.show(final=True)
    finally:
        stop.set()
        signal.signal(signal.SIGINT, old)
        sim_thread.join(10)
        if bus is not None:
            bus.shutdown()
        _say("demo: stopping the agent; sending what is left")
        agent.stop(drain_s=20.0)
        cloud.send_signal(signal.SIGTERM)
        try:
            cloud.wait(20)
        except subprocess.TimeoutExpired:
            cloud.kill()
        cloud_log.close()
        broker.close()
        gps.close()
    status = agent.store_status_at_stop
    summary = _cloud_summary(workdir / "cloud.sqlite")
    return _report(status, summary, workdir)


def _report(status: dict[str, Any], summary: dict[str, Any], workdir: Path) -> int:
    written = status["records_written"]
    _say("")
    _say("What reached the cloud database:")
    for v in summary["vehicles"]:
        rec = v["records"]
        _say(f"  {v['fleet']}/{v['vehicle']}: {rec['samples']} samples (agent wrote {written['samples']}), "
             f"{rec['alerts']} alert records, {rec['events']} events; highest seq {v['highest_seq']}, "
             f"duplicates dropped {v['duplicates']}, gaps {len(v['gaps'])}")
    alerts = summary["alerts"]
    for a in alerts:
        top = ", ".join(f"{n} ({c:+.2f})" for n, c in a.get("top_features", [])[:3])
        _say(f"  alert {a['state']:6s} {a['label'] or '?':20s} score {a['score']:.2f}  "
             f"model {a['model']} {a['model_version']}  top features: {top or '-'}")
    (workdir / "summary.json").write_text(json.dumps({"agent": status, "cloud": summary}, indent=2))
    _say(f"  (full summary in {workdir / 'summary.json'}, agent log in {workdir / 'agent.log'}; inspect with "
         f"`harvester-agent status --config {workdir / 'agent.toml'}` and "
         f"`cloud-sync stats --config {workdir / 'cloud.toml'}`)")
    if not any(a["state"] == "open" for a in alerts):
        _say("demo: FAILED: no alert reached the cloud database")
        return 1
    _say("demo: OK: the fault was detected on the vehicle and its alert reached the cloud")
    return 0
