"""harvester_testing/modelkit.py: each simulated model does what it says on the simulator's own windows (the agent's
Pipeline and Scorer fed with simulated J1939 frames, the models run by onnxruntime), its packages pass the vehicle's
checks, and the config it writes runs a real agent (in this process, and as the process kill tests start) that
scores with the model and talks to a real Mosquitto."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import can
import numpy as np
import numpy.typing as npt
import pytest

from agent.config import ModelConfig, load_config
from agent.contract import contract_to_dict
from agent.decode.j1939 import J1939Decoder
from agent.frames import FrameBatch
from agent.pipeline import Pipeline
from agent.scoring import ScoreBatch, Scorer
from agent.signals import SignalRegistry
from agent.update.verify import check_package
from harvester_common import onnxmeta
from harvester_common.modelpkg import PackageError, load_public_keys, parse_package
from harvester_sim import Harvester, J1939Transmitter, Simulator
from harvester_testing.broker import MosquittoBroker
from harvester_testing.modelkit import (
    BEHAVIOURS,
    FORCED_RPM,
    NAN_ABOVE_RPM,
    DrivenHarvester,
    agent_config,
    package,
    signing_key,
    sim_model,
)
from tests.test_uplink import Acker, wait_for

REPO = Path(__file__).resolve().parents[1]


class Recording(Scorer):
    """A scorer that keeps every window it was given (raw features) and what it made of it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.x: list[npt.NDArray[np.float64]] = []
        self.s: list[npt.NDArray[np.float64]] = []

    def score(self, x: npt.NDArray[np.float64]) -> ScoreBatch:
        res = super().score(x)
        self.x.append(np.array(x, np.float64).reshape(len(x), -1))
        self.s.append(res.scores.copy())
        return res

    def windows(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        return np.concatenate(self.x), np.concatenate(self.s)


def _pipelines(tmp_path: Path, behaviours: list[str], **kw: Any) -> list[tuple[Pipeline, Recording]]:
    out = []
    for b in behaviours:
        scorer = Recording.load(sim_model(tmp_path / f"{b}-{len(out)}.onnx", "1.0.0", b, **kw))
        reg = SignalRegistry()
        out.append((Pipeline(reg, {"can0": J1939Decoder(reg)}, scorer, None), scorer))
    return out


def _feed(pipes: list[tuple[Pipeline, Recording]], h: Harvester, seconds: int,
          at: dict[int, float | None] | None = None) -> None:
    """`seconds` of the harvester's frames, a second of data per batch, into every pipeline. `at`: second ->
    engine speed forced from then on (a DrivenHarvester; None hands it back)."""
    tx = J1939Transmitter(h)
    for sec in range(1, seconds + 1):
        if at and sec - 1 in at:
            assert isinstance(h, DrivenHarvester)
            h.force_engine_speed(at[sec - 1])
        frames = tx.frames_until(float(sec))
        for p, _ in pipes:
            p.feed("can0", FrameBatch.from_messages(frames))


# --- the models ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
def test_a_valid_contract_on_signals_a_vehicle_decodes(tmp_path: Path, behaviour: str) -> None:
    path = sim_model(tmp_path / "m.onnx", "3.1.4", behaviour, name="kit-model", hop_s=1.0)
    scorer = Scorer.load(path)
    c = scorer.contract
    assert (c.model_name, c.model_version, c.hop_s) == ("kit-model", "3.1.4", 1.0)
    assert [(f.signal, f.stat, f.window_s) for f in c.features] == [
        ("EEC1.EngSpeed", "mean", 2.0), ("ET1.EngCoolantTemp", "mean", 3.0)]
    reg = SignalRegistry()
    scorer.check_signals(J1939Decoder(reg).signals())  # the built-in definitions: every vehicle decodes them
    # What the cloud reads without onnxruntime is the contract the agent parsed.
    assert onnxmeta.read_contract(path.read_bytes()) == json.loads(json.dumps(contract_to_dict(c)))
    assert c.training["behaviour"] == behaviour


@pytest.mark.parametrize(("seed", "duty", "start"), [(1, "harvest", "warm"), (2, "mixed", "warm"),
                                                     (3, "parked", "cold"), (4, "idle", "cold"),
                                                     (5, "road", "warm")])
def test_normal_scores_low_and_never_alerts_on_any_simulated_harvester(
        tmp_path: Path, seed: int, duty: str, start: str) -> None:
    [(p, scorer)] = _pipelines(tmp_path, ["normal"])
    _feed([(p, scorer)], Harvester(seed=seed, duty=duty, start=start, ambient_c=35.0 if seed % 2 else 5.0), 300)
    _, s = scorer.windows()
    assert p.stats.windows >= 298  # a window each second of data, from the first
    assert p.stats.windows_scored == p.stats.windows and scorer.invalid_outputs == 0
    assert float(s.max()) < 0.001 and p.stats.alerts_opened == 0


def test_alert_all_scores_one_and_alerts_within_seconds(tmp_path: Path) -> None:
    [(p, scorer)] = _pipelines(tmp_path, ["alert_all"])
    _feed([(p, scorer)], Harvester(seed=1, start="cold"), 4)
    assert p.stats.alerts_opened == 1  # the contract's min_windows (2) after the engine's first data
    _feed([(p, scorer)], Harvester(seed=2), 120)
    _, s = scorer.windows()
    assert p.stats.windows_scored == p.stats.windows and float(s.min()) > 0.999


def test_nan_is_never_a_score(tmp_path: Path) -> None:
    [(p, scorer)] = _pipelines(tmp_path, ["nan"])
    _feed([(p, scorer)], Harvester(seed=1), 120)
    assert p.stats.windows >= 118 and p.stats.windows_scored == 0
    assert scorer.invalid_outputs == p.stats.windows and p.stats.alerts_opened == 0


def test_nan_above_is_normal_until_the_engine_speed_is_driven_up(tmp_path: Path) -> None:
    pipes = _pipelines(tmp_path, ["normal", "nan_above"])
    h = DrivenHarvester(seed=7, duty="harvest")
    _feed(pipes, h, 240, at={120: FORCED_RPM, 180: None})
    (normal_p, normal), (above_p, above) = pipes
    x, s_above = above.windows()
    _, s_normal = normal.windows()
    ends = np.arange(1, len(x) + 1)  # hop 1 s from the first second: window k ends at k s
    before = ends <= 120
    # The shadow run's part: window for window the same scores as `normal`, never NaN.
    assert np.array_equal(s_above[before], s_normal[before]) and np.isfinite(s_above[before]).all()
    assert float(x[before, 0].max()) < NAN_ABOVE_RPM - 100  # the simulator alone stays well below
    # Driven up: NaN from at most 2 s after (the 2 s mean passes the threshold), for as long as it is held.
    forced = (ends >= 123) & (ends <= 180)
    assert np.isnan(s_above[forced]).all() and np.isfinite(s_normal[forced]).all()
    # Handed back: scored again once the window holds the physics' speed only.
    assert np.isfinite(s_above[ends >= 183]).all()
    assert above.invalid_outputs == int(np.isnan(s_above).sum()) and above_p.stats.alerts_opened == 0
    assert normal_p.stats.alerts_opened == 0


def test_nan_above_compares_the_windows_raw_engine_speed_with_the_threshold(tmp_path: Path) -> None:
    # Rows run at 2050-2250 rpm, turns at 1700-2000: a threshold of 2100 splits a harvest both ways.
    [(p, scorer)] = _pipelines(tmp_path, ["nan_above"], threshold_signal_value=2100.0)
    _feed([(p, scorer)], Harvester(seed=11, duty="harvest"), 900)
    x, s = scorer.windows()
    clear = np.abs(x[:, 0] - 2100.0) > 0.01  # float32 rounding at the threshold itself
    above = x[:, 0] > 2100.0
    assert (above & clear).sum() > 30 and (~above & clear).sum() > 30
    assert np.array_equal(np.isnan(s[clear]), above[clear])


@pytest.mark.parametrize(("hop_s", "windows"), [(0.5, 119), (1.0, 59), (2.0, 29)])
def test_windows_close_every_hop_of_data_time(tmp_path: Path, hop_s: float, windows: int) -> None:
    [(p, scorer)] = _pipelines(tmp_path, ["normal"], hop_s=hop_s)
    _feed([(p, scorer)], Harvester(seed=3), 60)
    assert scorer.contract.hop_s == hop_s
    assert windows <= p.stats.windows <= windows + 1


def test_what_the_kit_refuses(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown behaviour 'sometimes'"):
        sim_model(tmp_path / "m.onnx", "1", "sometimes")
    with pytest.raises(ValueError, match="with behaviour 'nan_above' only"):
        sim_model(tmp_path / "m.onnx", "1", "normal", threshold_signal_value=100.0)
    with pytest.raises(ValueError, match="finite"):
        sim_model(tmp_path / "m.onnx", "1", "nan_above", threshold_signal_value=float("nan"))
    with pytest.raises(ValueError, match="rpm must be in"):
        DrivenHarvester().force_engine_speed(9000.0)


# --- keys and packages ---------------------------------------------------------------------------------------


def test_packages_pass_the_checks_a_vehicle_makes(tmp_path: Path) -> None:
    key, pub, kid = signing_key(tmp_path / "keys")
    assert key.stat().st_mode & 0o777 == 0o600 and pub.name == f"{kid}.pub"
    trusted = load_public_keys([pub])
    signals = J1939Decoder(SignalRegistry()).signals()
    model = sim_model(tmp_path / "m.onnx", "2.0.0", "nan_above")
    data = package(model, key, tmp_path / "m.pkg")
    assert (tmp_path / "m.pkg").read_bytes() == data
    v = check_package(data, trusted, signals)
    m = v.package.manifest
    assert (m.name, m.version, m.key_id, m.min_agent_version) == ("sim-anomaly", "2.0.0", kid, "0.1.0")
    assert v.package.model == model.read_bytes() and v.scorer.contract.model_version == "2.0.0"
    card = json.loads(v.package.card)
    assert card["model"] == {"name": "sim-anomaly", "version": "2.0.0"} and card["behaviour"] == "nan_above"

    own = package(model, key, tmp_path / "own.pkg", card={"mine": True}, min_agent_version="0.0.9")
    assert json.loads(parse_package(own).card) == {"mine": True}
    with pytest.raises(PackageError) as e:
        check_package(package(model, key, tmp_path / "later.pkg", min_agent_version="99.0"), trusted, signals)
    assert e.value.code == "agent_too_old"
    other, _, _ = signing_key(tmp_path / "other")
    with pytest.raises(PackageError) as e:
        check_package(package(model, other, tmp_path / "other.pkg"), trusted, signals)
    assert e.value.code == "unknown_key"


# --- the agent's config --------------------------------------------------------------------------------------


def _loadable(cfg: Path) -> Path:
    """The config as this tree's agent reads it. `[model] dir` is written for the vehicle's update manager, whose
    branch adds the key; until ModelConfig has it, a copy without that line (the agent refuses unknown keys)."""
    if "dir" in ModelConfig.model_fields:
        return cfg
    out = cfg.with_name(f"{cfg.stem}.nodir.toml")
    out.write_text(re.sub(r"(?m)^dir = .*\n", "", cfg.read_text()))
    return out


def _kit_config(tmp_path: Path, broker: MosquittoBroker, behaviour: str, vehicle: str) -> tuple[Path, Path]:
    key, pub, _ = signing_key(tmp_path / "signer")
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / pub.name).write_bytes(pub.read_bytes())
    model = sim_model(tmp_path / "installed.onnx", "1.0.0", behaviour)
    package(sim_model(tmp_path / "next.onnx", "1.1.0", "normal"), key, tmp_path / "next.pkg")
    cfg = agent_config(tmp_path / "agent.toml", model=model, trusted_keys=[keys], model_dir=tmp_path / "models",
                       store=tmp_path / "state" / "buffer.sqlite", mqtt_host=broker.host, mqtt_port=broker.port,
                       vehicle_id=vehicle, overrides={"model": {"threads": 1}, "log": {"level": "DEBUG"}})
    return cfg, tmp_path / "next.pkg"


def test_the_config_is_what_the_agent_reads_and_its_checks_pass(tmp_path: Path, broker: MosquittoBroker) -> None:
    cfg_path, pkg = _kit_config(tmp_path, broker, "normal", "kit-7")
    text = cfg_path.read_text()
    assert f'dir = "{tmp_path / "models"}"' in text  # for the update manager (docs/model_updates.md, "Vehicle")
    cfg = load_config(_loadable(cfg_path))
    assert (cfg.vehicle.id, cfg.can[0].interface, cfg.can[0].channel) == ("kit-7", "virtual", "kit-kit-7")
    assert cfg.model.trusted_keys == [tmp_path / "keys"] and cfg.model.path == tmp_path / "installed.onnx"
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.tls) == (broker.host, broker.port, False)
    assert cfg.log.level == "DEBUG"

    def agent(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=120,
                              cwd=REPO)

    r = agent("run", "--config", str(_loadable(cfg_path)), "--check-config")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok     model    " in r.stdout and "sim-anomaly 1.0.0" in r.stdout
    assert re.search(rf"ok     keys     {tmp_path / 'keys'}: 1 Ed25519 public key\(s\): [0-9a-f]{{16}}", r.stdout)
    r = agent("model", "verify", str(pkg), "--config", str(_loadable(cfg_path)))
    assert r.returncode == 0 and r.stdout.startswith("ok: sim-anomaly 1.1.0 (package "), r.stdout + r.stderr


@pytest.mark.slow
def test_an_agent_on_the_config_scores_the_simulator_within_seconds(tmp_path: Path, broker: MosquittoBroker) -> None:
    from agent.service import Agent

    cfg, _ = _kit_config(tmp_path, broker, "normal", "kit-8")
    config = load_config(_loadable(cfg))
    agent = Agent(config)
    assert agent.scorer is not None and agent.scorer.contract.model_name == "sim-anomaly", agent.model_status
    bus = can.Bus(interface="virtual", channel=config.can[0].channel, preserve_timestamps=True)
    stop = threading.Event()
    sim = threading.Thread(target=Simulator(DrivenHarvester(seed=3, start="cold"), bus, None, speed=4).run,
                           args=(None, stop), daemon=True)
    acker = Acker(broker)  # the cloud's part: acks what reaches the broker
    agent.start()
    sim.start()
    try:
        wait_for(lambda: agent.pipeline.stats.windows_scored >= 5, timeout=30, what="five scored windows")
        wait_for(lambda: agent.progress().synced > 0, timeout=30, what="the uplink to sync through the broker")
    finally:
        stop.set()
        sim.join(10)
        agent.stop(drain_s=1.0)
        bus.shutdown()
        acker.close()
    assert {b.vehicle for _, b in acker.batches} == {"kit-8"}
    assert agent.pipeline.stats.alerts_opened == 0 and agent.scorer.invalid_outputs == 0


def _alerts(db: Path) -> list[dict[str, Any]]:
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = con.execute("SELECT head FROM outbox WHERE kind = 'alert'").fetchall()
    except sqlite3.OperationalError:  # the agent has not created its tables yet
        return []
    finally:
        con.close()
    return [json.loads(h) for (h,) in rows]


@pytest.mark.slow
def test_the_agent_process_the_kill_tests_start_runs_on_the_config(tmp_path: Path, broker: MosquittoBroker) -> None:
    cfg, _ = _kit_config(tmp_path, broker, "alert_all", "kit-9")
    p = subprocess.Popen([sys.executable, "-m", "harvester_testing.agentproc", str(_loadable(cfg)), "5"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
        db = tmp_path / "state" / "buffer.sqlite"
        wait_for(lambda: any(a.get("model") == "sim-anomaly" for a in _alerts(db)), timeout=60,
                 what="an alert from the kit's model")
        p.send_signal(signal.SIGTERM)
        assert p.stdout.readline().strip() == b"stopped"
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
