"""Figures `agent_rss_mb` and `agent_rss_growth_mb_1h`: the resident memory of `harvester-agent run` on a busy bus,
and how much it grows over an hour.

One run gives both. The agent is installed as a vehicle installs it (docs/deploy.md): the wheels of this tree in a
fresh venv, their dependencies from the package registry, no extras (tests/vehicle.py builds it; set
AGENT_RSS_VENV=PATH to reuse one built before). It runs `harvester-agent run` with the full J1939 DBC (545 PGNs),
the shipped int8 model and a trusted signing key (as a vehicle that takes model updates), sends to a real
Mosquitto on 127.0.0.1 where a client acks every batch as cloud_sync does (so the outbox is drained as on a vehicle
in coverage), and reads a socketcand server on 127.0.0.1 fed by `harvester-agent simulate --socketcand` sped up to
1,500 frames/s.

Baseline, in the same run from the same server and venv: the naive gateway, python-can's socketcand client and
cantools `decode` of every frame with the same DBC, nothing else.

VmRSS of both processes is read from /proc/PID/status every SAMPLE_S. `agent_rss_mb`: at AGENT_RSS_WARM_S (default
600: after 10 minutes). `agent_rss_growth_mb_1h`: at AGENT_RSS_END_S (default 4200: an hour later) minus at
AGENT_RSS_WARM_S. "At" a time is the median of the samples within STEADY_S of it (at the end, the last STEADY_S):
RSS moves by a few hundred kB between samples as the allocator hands pages back, and a single sample would make the
growth, a difference of two, a draw. The single samples and the spread are in the extra keys. Shorter durations make
a trial run, and the figures say which durations they measured.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchkit import REPO, Figure, _big_dbc, figure

FPS = 1500.0
SAMPLE_S = 5.0
STEADY_S = 60.0  # a steady RSS is the median of the samples this close to the time asked
TARGET_MB = 100.0  # issue 15's target for the agent's steady RSS
TARGET_GROWTH_MB = 1.0

NAIVE = r"""
import contextlib, signal, sys
import can, cantools

db = cantools.database.load_file(sys.argv[1], strict=False)
by_pgn = {}
for m in db.messages:
    pgn = (m.frame_id >> 8) & 0x3FFFF
    by_pgn[pgn & 0x3FF00 if ((pgn >> 8) & 0xFF) < 240 else pgn] = m
bus = can.Bus(interface="socketcand", channel="can0", host="127.0.0.1", port=int(sys.argv[2]))
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
n = decoded = 0
while not stop:
    msg = bus.recv(0.5)
    if msg is None:
        continue
    n += 1
    pgn = (msg.arbitration_id >> 8) & 0x3FFFF
    m = by_pgn.get(pgn & 0x3FF00 if ((pgn >> 8) & 0xFF) < 240 else pgn)
    if m is not None:
        with contextlib.suppress(Exception):
            m.decode(bytes(msg.data))
            decoded += 1
print(n, decoded, flush=True)
"""

# `harvester-agent run`'s progress line (agent/cli.py): frames so far, windows scored.
PROGRESS = re.compile(r"frames (\d+) \([0-9.]+/s\), windows (\d+),")


def _seconds(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} for process {pid}")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat, fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _vehicle_venv() -> Path:
    given = os.environ.get("AGENT_RSS_VENV")
    if given:
        return Path(given)
    from tests.vehicle import build_vehicle_venv

    return build_vehicle_venv(Path(tempfile.mkdtemp(prefix="vehicle-venv-"))).root


def _vehicle_env(home: Path) -> dict[str, str]:
    """The environment the systemd unit gives the agent (its Environment= lines), without what would make the
    venv's Python import this checkout (as tests/vehicle.py). Its caches (the DBC's decode tables, where the agent
    keeps them) in the run's folder, not the user's."""
    from tests.vehicle import unit_environment

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return env | unit_environment() | {"XDG_CACHE_HOME": str(home / "cache")}


class _Acker:
    """Acks every uplink batch as cloud_sync does after its commit (nothing stored), so the outbox drains."""

    def __init__(self, host: str, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from harvester_common import wire

        self.batches = 0
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-acker", protocol=mqtt.MQTTv5)

        def on_message(c: Any, userdata: Any, msg: Any) -> None:
            if msg.topic.rsplit("/", 1)[1] not in ("telemetry", "alerts", "events"):
                return
            b = wire.decode_batch(bytes(msg.payload))
            self.batches += 1
            ack = wire.Ack(b.vehicle, b.batch, [(s.seq_lo, s.seq_hi) for s in b.segments])
            c.publish(wire.vehicle_topic(b.fleet, b.vehicle, "ack"), wire.encode_ack(ack), qos=1)

        self.c.on_message = on_message
        self.c.on_connect = lambda c, *a: c.subscribe("fleet/+/vehicle/+/+", qos=1)
        self.c.connect(host, port)
        self.c.loop_start()

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def _config(path: Path, socketcand_port: int, mqtt_port: int) -> Path:
    path.write_text(f"""
[vehicle]
fleet = "bench"
id = "rss-1"

[[can]]
name = "can0"
interface = "socketcand"
channel = "can0"
dbc = ["{_big_dbc()}"]
options = {{host = "127.0.0.1", port = {socketcand_port}}}

[model]
path = "{REPO / 'models' / 'harvester-anomaly.int8.onnx'}"
trusted_keys = ["{_public_key(path.parent)}"]

[store]
path = "{path.parent / 'agent.sqlite'}"

[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
tls = false

[log]
level = "INFO"
report_every_s = 10

[sim]
seed = 7
""")
    return path


def _public_key(folder: Path) -> Path:
    """A signing key the agent trusts, as every vehicle that takes model updates has."""
    from harvester_common.modelpkg import generate_keypair

    return generate_keypair(folder / "keys")[1]


def _sim_speed() -> float:
    """The simulator's time factor for FPS frames per wall second (it sends ~100 frames per simulated second)."""
    from harvester_sim.j1939_tx import J1939Transmitter
    from harvester_sim.physics import Harvester

    per_s = len(J1939Transmitter(Harvester(seed=7)).frames_until(60.0)) / 60.0
    return FPS / per_s


@dataclass(slots=True)
class Soak:
    warm_s: float
    end_s: float
    agent: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, VmRSS MB)
    naive: list[tuple[float, float]] = field(default_factory=list)
    agent_peak_mb: float = 0.0
    naive_peak_mb: float = 0.0
    # CPU, % of one core, from AGENT_RSS_WARM_S to the end: the same live load over socketcand, across processes
    agent_cpu_percent: float = 0.0
    naive_cpu_percent: float = 0.0
    frames: int = 0
    windows_scored: int = 0
    naive_frames: int = 0
    acked_batches: int = 0
    # numpy's small-block cache in the agent (harvester_testing/numpy_cache.py), at AGENT_RSS_WARM_S and at the end:
    # {"bytes", "blocks", "sizes"}, or {"error": why it could not be read}
    numpy_cache: dict[str, dict[str, Any]] = field(default_factory=dict)

    def at(self, series: list[tuple[float, float]], t: float) -> float:
        """The sample nearest to `t` seconds."""
        return min(series, key=lambda s: abs(s[0] - t))[1]

    @staticmethod
    def near(series: list[tuple[float, float]], t: float) -> list[float]:
        """The samples within STEADY_S of `t` seconds, none from the first STEADY_S (the process starting: a trial
        run's short warm-up would otherwise take the exec's first megabytes into its median)."""
        return [v for s, v in series if abs(s - t) <= STEADY_S and s >= STEADY_S]

    def steady(self, series: list[tuple[float, float]], t: float) -> float:
        """The median of the samples within STEADY_S of `t` seconds (at the soak's end: the last STEADY_S; the one
        nearest where there are none): an
        allocator that hands pages back on a timer moves RSS up and down by a few hundred kB between two samples,
        and one sample is a random point of that."""
        near = self.near(series, t)
        return statistics.median(near) if near else self.at(series, t)

    def spread(self, series: list[tuple[float, float]], t: float) -> float:
        """Max minus min of the samples `steady` takes the median of."""
        near = self.near(series, t)
        return max(near) - min(near) if near else 0.0


def _stop(p: subprocess.Popen[Any]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def soak(warm_s: float, end_s: float) -> Soak:
    from harvester_testing.broker import MosquittoBroker, free_port

    venv = _vehicle_venv()
    out = Soak(warm_s, end_s)
    tmp = Path(tempfile.mkdtemp(prefix="agent-rss-"))
    broker = MosquittoBroker()
    broker.start()
    acker = _Acker(broker.host, broker.port)
    port = free_port()
    cfg = _config(tmp / "agent.toml", port, broker.port)
    procs: list[subprocess.Popen[Any]] = []
    try:
        sim_log = (tmp / "sim.log").open("wb")
        sim = subprocess.Popen([sys.executable, "-m", "agent", "simulate", "--config", str(cfg), "--socketcand",
                                str(port), "--speed", f"{_sim_speed():.3f}"], stdout=sim_log, stderr=sim_log,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
        procs.append(sim)
        names = {sim.pid: "the simulator"}
        _wait_port(port, sim)
        agent_log = (tmp / "agent.log").open("wb")
        exe = str(venv / "bin" / "harvester-agent")
        # A vehicle's agent restarts far more often than it starts on a new install: what its first start may
        # leave for the next (the DBC's decode tables, where the agent caches them) is there when measured.
        subprocess.run([exe, "run", "--config", str(cfg), "--check-config"], stdout=agent_log, stderr=agent_log,
                       env=_vehicle_env(tmp), cwd=tmp, timeout=300, check=True)
        agent = subprocess.Popen([exe, "run", "--config", str(cfg)], stdout=agent_log, stderr=agent_log,
                                 env=_vehicle_env(tmp), cwd=tmp)
        procs.append(agent)
        names[agent.pid] = "harvester-agent run"
        naive = subprocess.Popen([str(venv / "bin" / "python"), "-c", NAIVE, str(_big_dbc()), str(port)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_vehicle_env(tmp),
                                 cwd=tmp)
        procs.append(naive)
        names[naive.pid] = "the naive gateway"
        t0 = time.monotonic()
        cpu0: tuple[float, float, float] | None = None
        while (now := time.monotonic() - t0) < end_s:
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{names[p.pid]} exited ({p.returncode}); logs in {tmp}")
            out.agent.append((now, rss_mb(agent.pid)))
            out.naive.append((now, rss_mb(naive.pid)))
            if cpu0 is None and now >= warm_s:
                cpu0 = (time.monotonic(), cpu_s(agent.pid), cpu_s(naive.pid))
                out.numpy_cache["warm"] = _numpy_cache(agent.pid)
            time.sleep(SAMPLE_S)
        out.numpy_cache["end"] = _numpy_cache(agent.pid)
        if cpu0 is not None:
            wall = time.monotonic() - cpu0[0]
            out.agent_cpu_percent = 100 * (cpu_s(agent.pid) - cpu0[1]) / wall
            out.naive_cpu_percent = 100 * (cpu_s(naive.pid) - cpu0[2]) / wall
        out.agent_peak_mb = rss_mb(agent.pid, "VmHWM")
        out.naive_peak_mb = rss_mb(naive.pid, "VmHWM")
        _stop(naive)
        assert naive.stdout is not None
        counts = naive.stdout.read().split()
        out.naive_frames = int(counts[0]) if counts else 0
        _stop(agent)
        progress = PROGRESS.findall((tmp / "agent.log").read_text())
        if progress:
            out.frames, out.windows_scored = int(progress[-1][0]), int(progress[-1][1])
        out.acked_batches = acker.batches
    finally:
        for p in reversed(procs):
            _stop(p)
        acker.close()
        broker.stop()
    return out


def _numpy_cache(pid: int) -> dict[str, Any]:
    from harvester_testing.numpy_cache import fill

    try:
        return fill(pid).to_dict()
    except (OSError, LookupError, ValueError) as e:  # no ptrace access, a stripped or changed numpy
        return {"error": str(e)}


def _wait_port(port: int, p: subprocess.Popen[Any]) -> None:
    import socket

    end = time.monotonic() + 60
    while time.monotonic() < end:
        if p.poll() is not None:
            raise RuntimeError(f"the simulator exited ({p.returncode}) before serving port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the simulator did not serve port {port} within 60 s")


_RESULT: list[Soak] = []


def _run_once() -> Soak:
    """Both figures from one soak (bench/run asks for them one after the other)."""
    if not _RESULT:
        _RESULT.append(soak(_seconds("AGENT_RSS_WARM_S", 600.0), _seconds("AGENT_RSS_END_S", 4200.0)))
    return _RESULT[0]


def _extra(s: Soak) -> dict[str, Any]:
    return {"warm_s": s.warm_s, "end_s": s.end_s, "frames": s.frames, "windows_scored": s.windows_scored,
            "naive_frames": s.naive_frames, "acked_batches": s.acked_batches,
            "agent_cpu_percent": round(s.agent_cpu_percent, 2), "naive_cpu_percent": round(s.naive_cpu_percent, 2),
            "agent_peak_mb": round(s.agent_peak_mb, 1), "naive_peak_mb": round(s.naive_peak_mb, 1),
            # one sample each (what the figures took before they took medians) and how far the medians' samples spread
            "agent_sample_mb_at_warm": round(s.at(s.agent, s.warm_s), 2),
            "agent_sample_mb_at_end": round(s.at(s.agent, s.end_s), 2),
            "agent_spread_mb_at_warm": round(s.spread(s.agent, s.warm_s), 2),
            "agent_spread_mb_at_end": round(s.spread(s.agent, s.end_s), 2),
            # what numpy's small-block cache held in the agent (agent/numpy_memory.py turns it off in its threads)
            "numpy_cache_at_warm": s.numpy_cache.get("warm"), "numpy_cache_at_end": s.numpy_cache.get("end")}


def _naive(s: Soak) -> str:
    """What the baseline did: a gateway that read nothing is an idle process, and its figures say so."""
    if s.naive_frames:
        return f"the naive gateway read {s.naive_frames:,} frames"
    return ("the naive gateway read NO frames (python-can's socketcand client stalled on this stream, logging 'Got "
            "incomplete message'): its RSS is an idle gateway's (imports and the DBC), its CPU means nothing")


def _scored(s: Soak) -> str:
    note = f"{s.windows_scored} windows scored"
    return note + (" (the model scored NOTHING in this run)" if not s.windows_scored else "")


@figure("agent_rss_mb")
def agent_rss_mb() -> Figure:
    """Steady VmRSS of `harvester-agent run` (vehicle install, full DBC, int8 model, 1,500 frames/s over socketcand,
    batches acked through Mosquitto) at AGENT_RSS_WARM_S; baseline: the naive gateway at the same moment."""
    s = _run_once()
    ours, base = s.steady(s.agent, s.warm_s), s.steady(s.naive, s.warm_s)
    return Figure(ours, "MB", base, ours / base,
                  f"at {s.warm_s:.0f} s of 1,500 frames/s ({s.frames:,} frames in {s.end_s:.0f} s); target "
                  f"{TARGET_MB:.0f} MB; peak {s.agent_peak_mb:.1f} MB (naive {s.naive_peak_mb:.1f}); {_scored(s)}; "
                  f"{_naive(s)}",
                  _extra(s))


@figure("agent_rss_growth_mb_1h")
def agent_rss_growth_mb_1h() -> Figure:
    """VmRSS at AGENT_RSS_END_S minus at AGENT_RSS_WARM_S, same run; baseline: the naive gateway's growth."""
    s = _run_once()
    ours = s.steady(s.agent, s.end_s) - s.steady(s.agent, s.warm_s)
    base = s.steady(s.naive, s.end_s) - s.steady(s.naive, s.warm_s)
    span = s.end_s - s.warm_s
    return Figure(ours, "MB", base, ours / base if base else float("nan"),
                  f"from {s.warm_s:.0f} s to {s.end_s:.0f} s ({span / 60:.0f} min"
                  f"{'' if span >= 3600 else ', a trial: the figure is defined over 60 min'}); target "
                  f"{TARGET_GROWTH_MB:.0f} MB; {_scored(s)}; {_naive(s)}", _extra(s))


def main() -> None:
    """`python bench/agent_memory.py`: the soak alone, its RSS series as JSON (for plotting growth)."""
    s = _run_once()
    print(json.dumps({"agent": s.agent, "naive": s.naive, **_extra(s)}))

if __name__ == "__main__":
    main()
