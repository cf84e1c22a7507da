"""A small fleet on one machine, for end-to-end tests and benchmarks of model rollouts: one Mosquitto, the cloud
(`cloud-sync serve` in a child process, trusting a signing key, its controller ticking) and N real agents
(`harvester_testing.agentproc`: each its own process with its own simulated harvester on its own virtual bus,
scoring with a model from harvester_testing/modelkit.py and taking updates from the broker).

Everything the fleet engineer does goes through the real commands (`cloud-sync model publish`, `rollout start`,
`rollout status --json`); what the vehicles did is read from the cloud's database (their retained `model/status`
and `status`, as `cloud-sync fleet --json` shows them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harvester_testing import modelkit, tomlw
from harvester_testing.broker import MosquittoBroker
from harvester_testing.cloudproc import start_receiver, stop_receiver


@dataclass
class FleetAgent:
    vehicle: str
    config: Path
    proc: subprocess.Popen[str] | None = None
    log: list[str] = field(default_factory=list)


class Fleet:
    """`installed`: the model every agent starts with (`[model] path`); `public_key`: the key vehicles and the
    cloud trust; `model`: extra `[model]` keys of every agent (shadow and watch lengths); `speed`: the simulators'
    speed (data seconds per wall second)."""

    def __init__(self, broker: MosquittoBroker, folder: Path, installed: Path, public_key: Path, *,
                 fleet: str = "kit", model: Mapping[str, Any] | None = None, speed: float = 1.0,
                 tick_s: float = 0.2, chunk_bytes: int = 16384) -> None:
        self.broker, self.folder, self.installed, self.public_key = broker, Path(folder), installed, public_key
        self.fleet, self.model, self.speed = fleet, dict(model or {}), speed
        self.folder.mkdir(parents=True, exist_ok=True)
        self.cloud_db = self.folder / "cloud.sqlite"
        self.cloud_config = self.folder / "cloud.toml"
        self.cloud_config.write_text(tomlw.dumps({
            "mqtt": {"host": broker.host, "port": broker.port, "client_id": "fleet-cloud", "fleet": fleet},
            "db": {"path": self.cloud_db},
            "rollout": {"trusted_keys": [public_key], "tick_s": tick_s, "chunk_bytes": chunk_bytes},
        }))
        self.cloud: subprocess.Popen[str] | None = None
        self.agents: dict[str, FleetAgent] = {}

    # --- processes -------------------------------------------------------------------------------------------

    def start_cloud(self) -> None:
        self.cloud = start_receiver(self.cloud_config)

    def agent(self, vehicle: str) -> FleetAgent:
        if vehicle not in self.agents:
            d = self.folder / vehicle
            d.mkdir(exist_ok=True)
            cfg = modelkit.agent_config(d / "agent.toml", model=self.installed, trusted_keys=[self.public_key],
                                        model_dir=d / "models", store=d / "buffer.sqlite", mqtt_host=self.broker.host,
                                        mqtt_port=self.broker.port, vehicle_id=vehicle, fleet=self.fleet,
                                        overrides={"model": self.model})
            self.agents[vehicle] = FleetAgent(vehicle, cfg)
        return self.agents[vehicle]

    def start_agent(self, vehicle: str, timeout_s: float = 60.0, *, fault: str | None = None, ramp_s: float = 30.0,
                    onset_s: float = 0.0, seed: int = 5, start_ts: float | None = None) -> FleetAgent:
        """Start the vehicle's agent process with its simulated harvester: healthy, or with `fault` starting
        `onset_s` into the run and reaching full severity `ramp_s` later (data seconds). `start_ts`: where the
        data clock starts (default now; a vehicle run again at speed > 1 goes on after its last data)."""
        a = self.agent(vehicle)
        p = subprocess.Popen([sys.executable, "-m", "harvester_testing.agentproc", str(a.config), str(self.speed),
                              str(ramp_s), fault or "none", str(seed), str(onset_s)]
                             + ([] if start_ts is None else [repr(start_ts)]),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        a.proc = p
        ready = threading.Event()

        def drain() -> None:
            assert p.stdout is not None
            for line in p.stdout:
                if len(a.log) < 2000:
                    a.log.append(line)
                if line.strip() == "ready":
                    ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(timeout_s):
            p.kill()
            raise RuntimeError(f"agent {vehicle} did not start: {''.join(a.log)[-3000:]}")
        return a

    def stop_agent(self, vehicle: str, kill: bool = False) -> None:
        a = self.agents[vehicle]
        if a.proc is None or a.proc.poll() is not None:
            return
        a.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            a.proc.wait(60)
        except subprocess.TimeoutExpired:
            a.proc.kill()
            a.proc.wait()

    def close(self) -> None:
        for v in list(self.agents):
            self.stop_agent(v)
        if self.cloud is not None:
            stop_receiver(self.cloud)

    # --- the fleet engineer's commands ------------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`cloud-sync ARGS --config <the cloud's config>`."""
        r = subprocess.run([sys.executable, "-m", "cloud_sync", *args, "--config", str(self.cloud_config)],
                           capture_output=True, text=True, timeout=120, env={**os.environ, "USER": "fleet-test"})
        if check and r.returncode != 0:
            raise AssertionError(f"cloud-sync {' '.join(args)} exited {r.returncode}: {r.stderr[-2000:]}")
        return r

    def rollout_status(self, rollout: int | None = None) -> dict[str, Any]:
        args = ["rollout", "status", "--json"] + (["--id", str(rollout)] if rollout is not None else [])
        out: dict[str, Any] = json.loads(self.cli(*args).stdout)
        return out

    def fleet_rows(self) -> dict[str, dict[str, Any]]:
        """`cloud-sync fleet --json`, by vehicle."""
        rows = json.loads(self.cli("fleet", "--json").stdout)["vehicles"]
        return {r["vehicle"]: r for r in rows}

    def agent_status(self, vehicle: str) -> dict[str, Any]:
        """`harvester-agent status --json` of a vehicle (its store; the counters it saved last, at the latest when
        it stopped)."""
        r = subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(self.agents[vehicle].config),
                            "--json"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise AssertionError(f"harvester-agent status for {vehicle} exited {r.returncode}: {r.stderr[-2000:]}")
        out: dict[str, Any] = json.loads(r.stdout)
        return out

    def wait(self, cond: Callable[[], bool], what: str, timeout_s: float = 180.0, every_s: float = 0.5) -> float:
        """Wait until `cond()` holds; the seconds it took. AssertionError naming `what` (and the agents' last log
        lines) past the timeout."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if cond():
                return time.monotonic() - t0
            time.sleep(every_s)
        tails = {v: "".join(a.log[-5:]) for v, a in self.agents.items()}
        raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}; agents' last lines: {tails}")
