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


