"""`harvester-agent run` loads only what a vehicle uses. The real command runs in a child process (with an exit hook
that writes down every module the process holds), reads a socketcand server fed with simulated J1939 traffic,
decodes, scores windows with the shipped model and sends to a real Mosquitto; then SIGTERM. Nothing that only
replay (asammdf, pandas), model building, the cloud, the simulator or the tests use may be among its modules, even
though this machine has them all installed (the simulator's and the demo's commands plug into the same CLI)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

from agent.keepout import REPLAY_ONLY
from harvester_common.modelpkg import generate_keypair
from harvester_sim import Harvester, J1939Transmitter
from harvester_sim.socketcand_server import SocketcandServer
from harvester_testing.broker import MosquittoBroker
from harvester_testing.data import SHARED_DATA
from tests.test_uplink import wait_for

REPO = Path(__file__).resolve().parents[1]
FULL_DBC = SHARED_DATA / "dbc" / "j1939_vector_v7.2__osu-cybercan__patched.dbc"

NOT_ON_A_VEHICLE = (*REPLAY_ONLY, "harvester_sim", "harvester_testing", "harvester_demo", "cloud_sync", "models",
                    "sklearn", "scipy", "pyarrow", "onnx", "psycopg", "selenium", "skl2onnx")

# The command as its console script runs it, plus a hook that lists sys.modules when the process exits.
WRAPPER = """
import atexit, json, runpy, sys
out = sys.argv[1]
atexit.register(lambda: json.dump(sorted(k for k, v in sys.modules.items() if v is not None), open(out, "w")))
sys.argv = ["harvester-agent", *sys.argv[2:]]
runpy.run_module("agent", run_name="__main__", alter_sys=True)
"""


def _samples(db: Path) -> int:
    """Samples written, as the agent's store says (read-only, beside the running agent)."""
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            row = con.execute("SELECT value FROM meta WHERE key = 'written_samples'").fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return 0
    return int(row[0]) if row else 0


def _windows_scored(log: Path) -> int:
    """From `run`'s latest progress line (agent/cli.py)."""
    found = re.findall(r"frames \d+ \([0-9.]+/s\), windows (\d+),", log.read_text())
    return int(found[-1]) if found else 0


def test_run_loads_nothing_only_replay_models_cloud_or_the_simulator_use(broker: MosquittoBroker,
                                                                         tmp_path: Path) -> None:
    srv = SocketcandServer(0, "can0")
    _, pub, _ = generate_keypair(tmp_path / "keys")  # a vehicle trusts a signing key, to take model updates
    dbc = f'dbc = ["{FULL_DBC}"]' if FULL_DBC.exists() else ""  # the built-in definitions otherwise
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[vehicle]
id = "imports-1"

[[can]]
name = "can0"
interface = "socketcand"
channel = "can0"
{dbc}
options = {{host = "127.0.0.1", port = {srv.address[1]}}}

[model]
path = "{REPO / 'models' / 'harvester-anomaly.int8.onnx'}"
trusted_keys = ["{pub}"]

[store]
path = "{tmp_path / 'agent.sqlite'}"
flush_interval_s = 0.2

[mqtt]
host = "{broker.host}"
port = {broker.port}
tls = false
batch_max_age_s = 0.5

[log]
level = "INFO"
report_every_s = 1
""")
    modules = tmp_path / "modules.json"
    log = tmp_path / "agent.log"
    with log.open("wb") as f:
        agent = subprocess.Popen([sys.executable, "-c", WRAPPER, str(modules), "run", "--config", str(cfg),
                                  "--drain-s", "1"], stdout=f, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    stop = threading.Event()

    def feed() -> None:  # five simulated minutes as fast as the server takes them, again and again
        frames = J1939Transmitter(Harvester(seed=3)).frames_until(300.0)
        while not stop.is_set():
            for m in frames:
                srv.send(m)
                if stop.is_set():
                    return
            stop.wait(0.5)

    feeder = threading.Thread(target=feed, daemon=True)
    try:
        wait_for(lambda: srv.clients == 1, timeout=120, what="the agent's connection")
        feeder.start()
        wait_for(lambda: _samples(tmp_path / "agent.sqlite") > 1000, timeout=120, what="samples stored")
        # A window scored: the model ran, so whatever scoring imports on first use is loaded too.
        wait_for(lambda: _windows_scored(log) > 0, timeout=120, what="a window scored")
    finally:
        stop.set()
        agent.send_signal(signal.SIGTERM)
        agent.wait(120)
        srv.shutdown()
    text = log.read_text()
    assert agent.returncode == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    loaded = set(json.loads(modules.read_text()))
    # What the command must have loaded: otherwise the list above would prove nothing.
    assert {"agent.service", "agent.sources.socketcand_reader", "agent.decode.j1939", "onnxruntime",
            "paho.mqtt.client"} <= loaded
    wrong = sorted(m for m in loaded if m.split(".")[0] in NOT_ON_A_VEHICLE)
    assert not wrong, f"`run` loaded {wrong[:20]}"
    # On a vehicle, but loaded only when a model package is checked (~7 MB resident; docs/model_updates.md,
    # "Memory"): the trusted key was read without it.
    assert "harvester_common.modelpkg" in loaded and "cryptography" not in loaded


def test_without_the_keep_out_python_can_would_load_asammdf_here() -> None:
    """The control for the test above: on this machine (asammdf installed, as with the `mf4` extra) a plain
    `import can` loads asammdf and pandas, so their absence from `run` is the keep-out's doing."""
    if importlib.util.find_spec("asammdf") is None:
        import pytest

        pytest.skip("asammdf is not installed here: python-can has no MF4 reader to load it (as on a vehicle)")
    code = "import sys, can; print(sorted({m.split('.')[0] for m in sys.modules} & {'asammdf', 'pandas'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "['asammdf', 'pandas']"
    code = ("import sys; from agent.keepout import keep_out; keep_out(); import can; "
            "print(sorted({m for m, v in sys.modules.items() if v is not None} & {'asammdf', 'pandas'}), "
            "can.io.mf4.asammdf)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[] None"
