"""What end-to-end tests and benchmarks of model updates need to ship models (docs/model_updates.md): tiny real
ONNX models that do a known thing on the simulator's data, signing keys, signed packages, and the config of an
agent that reads the simulator on a virtual CAN bus and takes updates from a broker.

The models (`sim_model`) have a valid harvester contract on two signals the simulator (harvester_sim) sends on a
healthy harvester whatever its duty, both decoded by the agent's built-in J1939 definitions:

    engine_speed   EEC1.EngSpeed        (every 20 ms)  mean over the last 2 s
    coolant_temp   ET1.EngCoolantTemp   (every 1 s)    mean over the last 3 s

with a hop of `hop_s` (default 1 s: a window closes every second of data time; the windows stay 2 and 3 s
whatever the hop), so that an engine that has just started is scored within its first few seconds. The graph is
softmax(z @ W + b) over the classes ("healthy", "fault"), z the standardised features (the agent standardises
them with the contract's mean and std); the score is P(fault). What each behaviour does on the simulator's
windows (tests/test_modelkit.py checks each with the agent's own Pipeline and Scorer on simulated frames):

    normal      P(fault) < 0.001 on any window a simulated harvester gives (running, parked, cold or warm, at
                any duty): never alerts
    alert_all   P(fault) > 0.999 on every window: alerts after the contract's `min_windows` (2)
    nan         NaN on every window: never scored (counted as invalid outputs), never alerts
    nan_above   as `normal`, until a window's engine speed (the raw 2 s mean, rpm) is above
                `threshold_signal_value` (default NAN_ABOVE_RPM); then NaN, for as long as it stays above

`nan_above` is a model that passes a shadow run on a healthy harvester and fails after the switch once the test
drives the engine speed up. A simulated harvester never goes much above 2300 rpm (rated speed 2200, free revs at
idle to 2300), so NAN_ABOVE_RPM = 2600 is never reached by itself. The test drives it with `DrivenHarvester`, a
simulated harvester whose reported engine speed it can force from any thread at any moment
(`force_engine_speed(3000.0)`; `None` hands it back to the physics): run it in `harvester_sim.Simulator` onto the
virtual bus the agent reads (an agent in the test's process: a python-can virtual bus is per process), or through
a `J1939Transmitter` for a Pipeline fed directly. Forced to FORCED_RPM, the 2 s mean passes 2600 rpm within two
seconds of data time, and every window after that is NaN until the speed is handed back.
(`harvester_testing.agentproc` runs a plain Harvester: a test that kills the agent process cannot drive it.)
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent.contract import CONTRACT_KEY, AlertPolicy, FeatureSpec, contract_to_dict
from harvester_common import modelpkg, onnxmeta
from harvester_sim import Harvester
from harvester_testing import tomlw
from harvester_testing.onnx_models import make_contract

BEHAVIOURS = ("normal", "alert_all", "nan", "nan_above")
ENGINE_SPEED = "EEC1.EngSpeed"
COOLANT_TEMP = "ET1.EngCoolantTemp"
FEATURES = (FeatureSpec("engine_speed", ENGINE_SPEED, "mean", 2.0),
            FeatureSpec("coolant_temp", COOLANT_TEMP, "mean", 3.0))
# Standardisation: z = (x - MEAN) / STD, so that the simulator's values land within a few units of 0.
MEAN = (1500.0, 85.0)
STD = (700.0, 10.0)
ALERT = AlertPolicy(threshold=0.8, clear_threshold=0.4, min_windows=2, clear_windows=2)
NAN_ABOVE_RPM = 2600.0  # above any engine speed the simulator reaches on its own
FORCED_RPM = 3000.0  # what a test forces the engine speed to, to make `nan_above` fail

# Logits (healthy, fault). normal: fault 8 below healthy, moved by at most ~0.9 over every z the simulator gives
# (engine off: z0 = -2.1; a cold start's coolant at -15 °C: z1 = -10; forced to 8000 rpm: z0 = 9.3).
_WEIGHTS = {
    "normal": (np.array([[0.0, 0.05], [0.0, 0.05]]), np.array([4.0, -4.0])),
    "alert_all": (np.zeros((2, 2)), np.array([-5.0, 5.0])),
}


def _graph(behaviour: str) -> list[onnx.NodeProto] | None:
    """The nodes after `logits` that poison it with NaN (None: none)."""
    if behaviour == "nan":
        # log(-1) is NaN: added to every row's logits.
        return [helper.make_node("Log", ["minus_one"], ["poison"]),
                helper.make_node("Add", ["logits", "poison"], ["logits_out"])]
    if behaviour == "nan_above":
        # NaN added to the rows whose standardised engine speed (column 0 of the model's input) is above the
        # threshold; 0 to the others.
        return [helper.make_node("Gather", ["features", "col0"], ["speed_z"], axis=1),
                helper.make_node("Greater", ["speed_z", "threshold_z"], ["above"]),
                helper.make_node("Where", ["above", "nan", "zero"], ["poison"]),
                helper.make_node("Add", ["logits", "poison"], ["logits_out"])]
    return None


def sim_model(path: Path, version: str, behaviour: str = "normal", name: str = "sim-anomaly", hop_s: float = 1.0,
              threshold_signal_value: float | None = None) -> Path:
    """Write a tiny ONNX model with a harvester contract at `path` (see the module's docstring for what each
    `behaviour` does on the simulator's data); returns `path`. `threshold_signal_value`: `nan_above` only, the
    engine speed (rpm) above which it outputs NaN (default NAN_ABOVE_RPM)."""
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"unknown behaviour {behaviour!r}; known: {', '.join(BEHAVIOURS)}")
    if threshold_signal_value is not None and behaviour != "nan_above":
        raise ValueError("threshold_signal_value goes with behaviour 'nan_above' only")
    threshold = NAN_ABOVE_RPM if threshold_signal_value is None else float(threshold_signal_value)
    if not math.isfinite(threshold):
        raise ValueError("threshold_signal_value must be finite")
    contract = make_contract(
        list(FEATURES), model_name=name, model_version=version, hop_s=float(hop_s), mean=MEAN, std=STD, alert=ALERT,
        classes=("healthy", "fault"), healthy_class="healthy", max_missing_fraction=0.5,
        training={"kit": "harvester_testing.modelkit", "behaviour": behaviour,
                  **({"nan_above": {"signal": ENGINE_SPEED, "value": threshold}} if behaviour == "nan_above" else {})})
    w, b = _WEIGHTS["alert_all" if behaviour == "alert_all" else "normal"]
    threshold_z = (threshold - MEAN[0]) / STD[0]
    inits = [numpy_helper.from_array(w.astype(np.float32), "W"), numpy_helper.from_array(b.astype(np.float32), "b"),
             numpy_helper.from_array(np.array([-1.0], np.float32), "minus_one"),
             numpy_helper.from_array(np.array([0], np.int64), "col0"),
             numpy_helper.from_array(np.array([threshold_z], np.float32), "threshold_z"),
             numpy_helper.from_array(np.array([np.nan], np.float32), "nan"),
             numpy_helper.from_array(np.array([0.0], np.float32), "zero")]
    poison = _graph(behaviour)
    nodes = [helper.make_node("MatMul", ["features", "W"], ["xw"]),
             helper.make_node("Add", ["xw", "b"], ["logits"]),
             *(poison or []),
             helper.make_node("Softmax", ["logits_out" if poison else "logits"], ["probabilities"], axis=1)]
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(
        nodes, f"sim_{behaviour}",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, len(FEATURES)])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])],
        [t for t in inits if t.name in used],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what onnxruntime's oldest supported release here reads (as harvester_testing.onnx_models)
    helper.set_model_props(model, {CONTRACT_KEY: json.dumps(contract_to_dict(contract))})
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


class DrivenHarvester(Harvester):
    """A simulated harvester whose reported engine speed (EEC1.EngSpeed) a test may force. The physics runs on
    untouched: only the value sent on the bus changes, from the transmitter's next physics step (50 ms of data
    time). Thread-safe enough for its purpose: one attribute, read by the simulator's thread."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.forced_rpm: float | None = None

    def force_engine_speed(self, rpm: float | None) -> None:
        """Report `rpm` from now on (at most 8031.875, the J1939 signal's range); None: the physics' again."""
        if rpm is not None and not 0 <= rpm <= 8031.875:
            raise ValueError("rpm must be in 0 .. 8031.875 (EEC1.EngSpeed's range)")
        self.forced_rpm = rpm

    def values(self) -> dict[str, float]:
        v = super().values()
        forced = self.forced_rpm
        if forced is not None:
            v[ENGINE_SPEED] = forced
        return v


# --- keys and packages ----------------------------------------------------------------------------------------


def signing_key(folder: Path) -> tuple[Path, Path, str]:
    """A new Ed25519 key pair in `folder` (created if missing): (private key file, public key file, key id)."""
    return modelpkg.generate_keypair(Path(folder))


def default_card(model: bytes) -> dict[str, Any]:
    """A small card for a model: its name, version and behaviour, and what it is."""
    contract = onnxmeta.read_contract(model)
    training = contract.get("training")
    return {"model": {"name": contract["model"]["name"], "version": contract["model"]["version"]},
            "behaviour": training.get("behaviour") if isinstance(training, dict) else None,
            "model_sha256": hashlib.sha256(model).hexdigest(),
            "note": "a hand-built test model (harvester_testing/modelkit.py), not trained on anything"}


def package(model: Path, key: Path, out: Path, card: dict[str, Any] | None = None,
            min_agent_version: str = "0.1.0") -> bytes:
    """A signed package of the model file `model` with the private key file `key`, named and versioned by the
    model's own contract (as `cloud-sync model sign` does), written to `out` and returned. `card` defaults to
    `default_card`. modelpkg.PackageError for anything a reader would refuse."""
    data = Path(model).read_bytes()
    contract = onnxmeta.read_contract(data)
    card_bytes = json.dumps(default_card(data) if card is None else card, sort_keys=True).encode()
    pkg = modelpkg.build_package(data, card_bytes, modelpkg.load_private_key(Path(key)),
                                 name=contract["model"]["name"], version=contract["model"]["version"],
                                 contract=contract, min_agent_version=min_agent_version)
    Path(out).write_bytes(pkg)
    return pkg


# --- an agent's config --------------------------------------------------------------------------------------


def agent_config(path: Path, *, model: Path, trusted_keys: Sequence[Path], model_dir: Path, store: Path,
                 mqtt_host: str, mqtt_port: int, vehicle_id: str, fleet: str = "kit", channel: str | None = None,
                 overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Write the TOML config of an agent that reads one virtual CAN bus (channel `channel`, default
    `kit-{vehicle_id}`: distinct per vehicle, since virtual buses of one process share a channel's frames), scores
    with `model` (`[model] path`, the installed model), trusts the public keys `trusted_keys`, keeps received
    models in `model_dir` (`[model] dir`), stores into `store`, and talks MQTT to `mqtt_host:mqtt_port` without TLS
    as `fleet/vehicle_id`, with the short timeouts a test wants. `overrides`: keys per section, merged over these
    (`{"model": {"shadow_windows": 10}}`; "can" is the one bus). Returns `path`.

    Run it in the test's own process (agent.service.Agent, with harvester_sim.Simulator sending onto
    `can.Bus(interface="virtual", channel=..., preserve_timestamps=True)`), or as a process with
    `python -m harvester_testing.agentproc PATH SPEED`, which runs the simulator on that bus itself."""
    doc: dict[str, Any] = {
        "vehicle": {"fleet": fleet, "id": vehicle_id},
        "can": [{"name": "can0", "interface": "virtual", "channel": channel or f"kit-{vehicle_id}"}],
        "model": {"path": Path(model), "trusted_keys": [Path(k) for k in trusted_keys], "dir": Path(model_dir)},
        "store": {"path": Path(store), "flush_interval_s": 0.2},
        "mqtt": {"host": mqtt_host, "port": int(mqtt_port), "tls": False, "batch_max_age_s": 0.5,
                 "ack_timeout_s": 5.0, "reconnect_min_s": 0.1, "reconnect_max_s": 1.0, "status_interval_s": 2.0},
    }
    for section, values in (overrides or {}).items():
        target = doc["can"][0] if section == "can" else doc.setdefault(section, {})
        target.update(values)
    path = Path(path)
    path.write_text(tomlw.dumps(doc))
    return path
