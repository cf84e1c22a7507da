"""What every benchmark module shares: the `Figure` record, the registry `bench/run` runs, and the helpers several
figures use. A topic's figures live in their own module (bench/<topic>.py) and register with `@figure(NAME)`;
bench/benchmarks.py imports them all."""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# As agent/__init__.py does, before anything here (or a child process, which inherits it) loads onnxruntime: no
# usage telemetry from a benchmark either.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from harvester_testing.data import SHARED_DATA  # noqa: E402


@dataclass(slots=True)
class Figure:
    value: float
    unit: str
    baseline: float
    ratio: float
    note: str = ""
    # Keys printed beside value/baseline/ratio in --json (e.g. windows_scored: what a pipeline figure really did).
    extra: dict[str, Any] = field(default_factory=dict)


FIGURES: dict[str, Callable[[], Figure]] = {}


def figure(name: str) -> Callable[[Callable[[], Figure]], Callable[[], Figure]]:
    def deco(fn: Callable[[], Figure]) -> Callable[[], Figure]:
        FIGURES[name] = fn
        return fn

    return deco


def _trace_files() -> list[Path]:
    files = sorted((SHARED_DATA / "can" / "johndeere_5055e").glob("*_candumpL.log"))
    if not files:
        raise SystemExit(f"benchmarks need the real traces in {SHARED_DATA / 'can'}")
    return files


def _big_dbc() -> Path:
    return SHARED_DATA / "dbc" / "j1939_vector_v7.2__osu-cybercan__patched.dbc"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime



def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


SIM_EPOCH = 1_700_000_000.0


def _sim_frames(sim_seconds: float, seed: int = 7) -> list[Any]:
    """The simulator's J1939 traffic (a healthy harvester at harvest duty), timestamps on a wall-clock epoch: the
    traffic the shipped model is built for, so a pipeline figure measured on it really scores windows."""
    from harvester_sim.j1939_tx import J1939Transmitter
    from harvester_sim.physics import Harvester

    frames = list(J1939Transmitter(Harvester(seed=seed)).frames_until(sim_seconds))
    for m in frames:
        m.timestamp += SIM_EPOCH
        m.channel = "can0"
    return frames


def _sim_log(folder: Path, sim_seconds: float) -> Path:
    """`_sim_frames` written as a candump -L log, so both sides of a figure read it with python-can's LogReader."""
    import can

    path = folder / "sim_candumpL.log"
    with can.Logger(str(path)) as w:
        for m in _sim_frames(sim_seconds):
            w.on_message_received(m)
    return path
