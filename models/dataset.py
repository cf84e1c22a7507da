"""Labelled feature windows from simulated harvester runs, computed by the agent's own decode and feature code.

Each run drives the simulator's J1939 transmitter, decodes its frames with `agent.decode.j1939` and windows them
with `agent.features`: the model is trained on exactly what the vehicle will compute. A window is labelled with the
run's fault once the fault's severity at the window's end reaches `LABEL_SEVERITY`; before onset it is healthy;
in between it is ambiguous and left out of training (kept for detection-delay measurement). So is a fault run's
window with the engine stopped (a worn pump pumps nothing at standstill: nothing there to learn from).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agent.contract import FeatureSpec
from agent.decode.j1939 import J1939Decoder
from agent.features import FeatureEngine
from agent.frames import FrameBatch
from agent.signals import SignalRegistry

HEALTHY = "healthy"
LABEL_SEVERITY = 0.5
WINDOW_S = 30.0
HOP_S = 5.0

# Signal → statistics. Chosen from the physics of the four faults: temperatures and their trend, oil pressure
# (which must be read against engine speed and load), coolant level and pressure, fan speed against its demand.
SIGNAL_STATS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("EEC1.EngSpeed", ("mean", "std")),
    ("EEC2.EngPercentLoadAtCurrentSpeed", ("mean",)),
    ("ET1.EngCoolantTemp", ("mean", "slope")),
    ("ET1.EngOilTemp1", ("mean",)),
    ("EFL_P1.EngOilPress", ("mean", "min")),
    ("EFL_P1.EngCoolantLevel", ("mean",)),
    ("EFL_P1.EngCoolantPress", ("mean",)),
    ("VF.HydTemp", ("mean", "slope")),
    ("FD.FanSpeed", ("mean", "std")),
    ("FD.EstPercentFanSpeed", ("mean",)),
    ("AMB.AmbientAirTemp", ("mean",)),
    ("CCVS.WheelBasedVehicleSpeed", ("mean",)),
)


# The core engine signals nearly every engine controller sends (speed, load, coolant, oil pressure and
# temperature): the model must score on these alone. Of them, a window must have speed, load and coolant
# temperature to be scored at all (the real John Deere tractor sends no oil temperature, a truck in the CSS
# traces no oil pressure); every other feature may be missing, and the model is told which are.
CORE_SIGNALS = ("EEC1.EngSpeed", "EEC2.EngPercentLoadAtCurrentSpeed", "ET1.EngCoolantTemp", "EFL_P1.EngOilPress",
                "ET1.EngOilTemp1")
REQUIRED = ("EEC1.EngSpeed:mean", "EEC2.EngPercentLoadAtCurrentSpeed:mean", "ET1.EngCoolantTemp:mean")
# A fault can only be learned from a window that has at least one of the signals it shows in.
SIGNATURES: dict[str, tuple[str, ...]] = {
    "coolant_leak": ("EFL_P1.EngCoolantLevel", "EFL_P1.EngCoolantPress", "ET1.EngCoolantTemp"),
    "oil_pump_wear": ("EFL_P1.EngOilPress",),
    "hydraulic_overheat": ("VF.HydTemp", "FD.EstPercentFanSpeed"),
    "fan_wear": ("FD.FanSpeed",),
}
RUNNING_RPM = 400.0


def feature_specs(window_s: float = WINDOW_S) -> list[FeatureSpec]:
    return [
        FeatureSpec(f"{sig}:{stat}:{window_s:g}s", sig, stat, window_s) for sig, stats in SIGNAL_STATS for stat in stats
    ]


def required_features(specs: list[FeatureSpec]) -> tuple[str, ...]:
    return tuple(f.name for f in specs if f"{f.signal}:{f.stat}" in REQUIRED)


@dataclass(frozen=True, slots=True)
class RunSpec:
    seed: int
    fault: str | None
    duty: str
    ambient_c: float
    duration_s: float
    onset_s: float
    ramp_s: float
    start: str = "warm"
    vary_fit: bool = False
    absent: tuple[str, ...] = ()  # messages this machine does not send
    intermittent: tuple[str, ...] = ()  # messages that drop out now and then


@dataclass(slots=True)
class RunWindows:
    spec: RunSpec
    x: npt.NDArray[np.float64]  # (windows, features)
    end: npt.NDArray[np.float64]  # window end times (s since run start)
    severity: npt.NDArray[np.float64]  # fault severity at each window end
    running: npt.NDArray[np.bool_]  # the engine ran in the window

    def labels(self) -> list[str | None]:
        """Class per window; None for the ambiguous onset of a fault and a fault run's engine standing still."""
        out: list[str | None] = []
        for s, run in zip(self.severity.tolist(), self.running.tolist(), strict=True):
            if self.spec.fault is None or s <= 0.0:
                out.append(HEALTHY)
            elif not run:
                out.append(None)
            elif s >= LABEL_SEVERITY:
                out.append(self.spec.fault)
            else:
                out.append(None)
        return out


def simulate_run(spec: RunSpec, window_s: float = WINDOW_S, hop_s: float = HOP_S, chunk_s: float = 10.0,
                 features: Sequence[FeatureSpec] | None = None) -> RunWindows:
    """The run's windows: the standard features (`feature_specs(window_s)`), or `features` (another model's)."""
    from harvester_sim import Harvester, J1939Transmitter

    h = Harvester(
        seed=spec.seed,
        fault=spec.fault,
        fault_onset_s=spec.onset_s,
        fault_ramp_s=spec.ramp_s,
        duty=spec.duty,
        ambient_c=spec.ambient_c,
        start=spec.start,
        vary_fit=spec.vary_fit,
    )
    tx = J1939Transmitter(h, seed=spec.seed, absent=frozenset(spec.absent),
                          intermittent=frozenset(spec.intermittent))
    reg = SignalRegistry()
    dec = J1939Decoder(reg)
    specs = list(features) if features is not None else feature_specs(window_s)
    eng = FeatureEngine(specs, hop_s)
    sid_map: dict[int, int] = {}
    rows = []
    t = 0.0
    while t < spec.duration_s:
        t = min(spec.duration_s, t + chunk_s)
        frames = tx.frames_until(t)
        if not frames:
            continue
        res = dec.decode(FrameBatch.from_messages(frames))
        sid = res.samples.sid
        for s in np.unique(sid).tolist():
            if s not in sid_map:
                sid_map[s] = eng.signal_index.get(reg.name(s), -1)
        lut = np.full(max(sid_map) + 1, -1, np.int32)
        for s, i in sid_map.items():
            lut[s] = i
        rows += eng.feed(res.samples.ts, lut[sid], res.samples.value)
    x = np.stack([r.x for r in rows]) if rows else np.zeros((0, len(specs)))
    end = np.array([r.end for r in rows])
    sev = np.zeros(len(rows)) if spec.fault is None else np.clip((end - spec.onset_s) / spec.ramp_s, 0.0, 1.0)
    return RunWindows(spec, x, end, sev, engine_running(x, specs))


def engine_running(x: npt.NDArray[np.float64], specs: Sequence[FeatureSpec]) -> npt.NDArray[np.bool_]:
    """Per window, whether the engine ran (mean engine speed at least RUNNING_RPM); all True for features
    without a mean engine speed (nothing to tell by)."""
    col = next((j for j, f in enumerate(specs) if f.signal == "EEC1.EngSpeed" and f.stat == "mean"), None)
    if col is None:
        return np.ones(len(x), bool)
    return np.asarray(np.nan_to_num(x[:, col]) >= RUNNING_RPM, bool)
