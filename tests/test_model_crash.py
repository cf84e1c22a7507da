"""kill -9 through a model update: a real agent process (the simulator on a virtual bus, the shipped model) is
SIGKILLed at random instants while it downloads a signed package of the next version, shadows it, switches and
watches it, and restarted on the same model directory each time. After every restart a working model scores; the
update resumes or is reported, with `seq` only ever increasing; in the end the new model is active and healthy,
and the pointer names it."""

from __future__ import annotations

import itertools
import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from harvester_common import modelpkg, wire
from harvester_testing.broker import MosquittoBroker
from harvester_testing.modelserver import ModelServer, signed_package, with_version
from tests.test_uplink import wait_for

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "harvester-anomaly.int8.onnx"


def _config(tmp: Path, broker: MosquittoBroker, pub: Path) -> Path:
    conf = tmp / "agent.toml"
    conf.write_text(f"""
[vehicle]
fleet = "f1"
id = "v1"
[[can]]
interface = "virtual"
channel = "model-crash"
[model]
path = "{MODEL}"
trusted_keys = ["{pub}"]
shadow_windows = 6
watch_windows = 6
chunk_timeout_s = 1.0
download_window = 2
progress_interval_s = 1
[store]
path = "{tmp / 'vehicle.sqlite'}"
flush_interval_s = 0.2
[mqtt]
host = "{broker.host}"
port = {broker.port}
tls = false
reconnect_min_s = 0.1
reconnect_max_s = 0.5
status_interval_s = 1
""")
    return conf


class VehicleStatus:
    """The vehicle's retained `status` messages as they arrive."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.latest: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="status-watch", protocol=mqtt.MQTTv5)
        self.c.on_connect = lambda c, *a: c.subscribe(wire.vehicle_topic("f1", "v1", "status"), qos=1)
        self.c.on_message = self._on_message
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()

    def _on_message(self, c: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.latest = json.loads(msg.payload)

    def scoring_since(self, t: float) -> bool:
        """A status sent after `t` by a process that has scored windows."""
        with self.lock:
            st = self.latest
        scored = st.get("scoring", {}).get("windows_scored", 0)
        return st.get("state") == "online" and st.get("ts", 0) > t and scored > 0

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def _start(conf: Path) -> subprocess.Popen[bytes]:
    # Speed 5, a healthy harvester: no alert holds the switch back.
    p = subprocess.Popen([sys.executable, "-m", "harvester_testing.agentproc", str(conf), "5", "30", "none"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
    return p


@pytest.mark.slow
def test_kill_9_through_download_shadow_and_switch(broker: MosquittoBroker, tmp_path: Path) -> None:
    priv, pub, _ = modelpkg.generate_keypair(tmp_path / "keys")
    pkg = signed_package(with_version(MODEL, "2.1.0", tmp_path / "next.onnx"), modelpkg.load_private_key(priv),
                         (REPO / "models" / "harvester-anomaly.card.json").read_bytes())
    conf = _config(tmp_path, broker, pub)
    server = ModelServer(broker.host, broker.port, "f1", "v1", chunk_bytes=2048)
    server.delay_s = 0.03  # ~80 chunks: a few seconds of download to cut into
    status = VehicleStatus(broker)
    rng = random.Random(13)
    killed_in: list[str] = []
    p = _start(conf)
    try:
        d = server.offer(pkg, rollout="4")
        # Each kill at a random instant inside a step: while it downloads, while it shadows, while it watches the
        # new model (the step reported since the restart before; a step already over is killed in the next).
        order = ["downloading", "verified", "shadow", "active"]
        for step, within in [("downloading", 1.0), ("downloading", 1.0), ("shadow", 5.0), ("shadow", 5.0),
                             ("active", 3.0), ("active", 3.0)]:
            # The step, or one past it (a resumed download may finish between two looks).
            wait_for(lambda step=step: (s := server.latest()) is not None  # type: ignore[misc]
                     and s.state in order and order.index(s.state) >= order.index(step), timeout=90, what=step)
            time.sleep(rng.uniform(0.0, within))
            p.send_signal(signal.SIGKILL)
            p.wait(10)
            last = server.latest()
            assert last is not None
            killed_in.append(last.state if last.state != "active" else f"active:{last.healthy}")
            restarted = time.time()
            p = _start(conf)
            wait_for(lambda t=restarted: status.scoring_since(t), timeout=90,  # type: ignore[misc]
                     what="a working model scoring after the restart")
        wait_for(lambda: (s := server.latest()) is not None and s.state == "active" and s.healthy is True,
                 timeout=180, what="the new model active and healthy")
        p.send_signal(signal.SIGTERM)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        server.close()
        status.close()
    seqs = [s.seq for s in server.statuses]
    assert all(b >= a for a, b in itertools.pairwise(seqs)), seqs  # a report again keeps its seq
    states = server.states()
    assert {"downloading", "shadow", "active:None"} <= set(killed_in), killed_in  # the watch is active:None
    assert any(s.figures.get("resumed_chunks") for s in server.statuses)  # a download went on from its file
    assert not {"rejected", "failed", "rolled_back"} & set(states), states
    last = server.latest()
    assert last is not None and last.target is not None and last.target["package_sha256"] == d.package_sha256
    assert last.active is not None and last.active["version"] == "2.1.0"
    pointer = json.loads((tmp_path / "models" / "active.json").read_text())
    assert pointer["active"]["package"] == d.package_sha256 and pointer["previous"]["package"] == ""
