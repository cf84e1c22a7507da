"""Child process for `ingest_cpu_percent_at_1500fps`: a live virtual bus at a given frame rate, consumed either by
the whole agent (`agent`) or by the naive gateway (`naive`: recv + cantools decode per frame). Prints JSON with
the consumer's CPU seconds (process CPU minus the sender thread's own CPU, over the measured interval) and, for
the agent, the windows it formed and scored.

The traffic is the simulator's (the model is built for it, so the agent really scores), sped up to the asked
frame rate (the simulator sends ~100 frames/s); frames keep the simulated clock (`preserve_timestamps`), so 30 s
windows close at the data's pace, as they would on a busy real bus."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import can

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent import allocator  # noqa: E402
from harvester_testing.data import SHARED_DATA  # noqa: E402


def _proc_cpu() -> float:
    t = os.times()
    return t.user + t.system


def main() -> None:
    mode, fps, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    from harvester_sim.j1939_tx import J1939Transmitter
    from harvester_sim.physics import Harvester

    probe = sum(1 for _ in J1939Transmitter(Harvester(seed=7)).frames_until(60.0)) / 60.0
    speed = fps / probe  # simulated seconds per wall second
    frames = list(J1939Transmitter(Harvester(seed=7)).frames_until((seconds + 5.0) * speed))
    channel = f"live-{os.getpid()}"
    stop = threading.Event()
    sender_cpu = [0.0]
    sent = [0]
    dbc = SHARED_DATA / "dbc" / "j1939_vector_v7.2__osu-cybercan__patched.dbc"
    consumer: Any
    if mode == "agent":
        from agent.config import AgentConfig
        from agent.service import Agent

        tmp = tempfile.mkdtemp()
        cfg = AgentConfig.model_validate({
            "can": [{"name": "can0", "interface": "virtual", "channel": channel, "dbc": [str(dbc)]}],
            "model": {"path": str(REPO / "models" / "harvester-anomaly.int8.onnx")},
            "store": {"path": f"{tmp}/s.sqlite"},
            "mqtt": {"port": 9, "tls": False, "reconnect_min_s": 30, "reconnect_max_s": 60},
            "log": {"level": "ERROR"},
        })
        consumer = Agent(cfg)
        consumer.start()
    else:
        import cantools

        db: Any = cantools.database.load_file(str(dbc), strict=False)
        by_pgn = {}
        for m in db.messages:
            pgn = (m.frame_id >> 8) & 0x3FFFF
            by_pgn[pgn & 0x3FF00 if ((pgn >> 8) & 0xFF) < 240 else pgn] = m
        bus = can.Bus(interface="virtual", channel=channel)

        def naive() -> None:
            while not stop.is_set():
                msg = bus.recv(0.1)
                if msg is None:
                    continue
                pgn = (msg.arbitration_id >> 8) & 0x3FFFF
                m = by_pgn.get(pgn & 0x3FF00 if ((pgn >> 8) & 0xFF) < 240 else pgn)
                if m is not None:
                    with contextlib.suppress(Exception):
                        m.decode(bytes(msg.data))

        consumer = threading.Thread(target=naive, daemon=True)
        consumer.start()
    tx = can.Bus(interface="virtual", channel=channel, preserve_timestamps=True)
    time.sleep(1.0)  # let start-up finish before measuring

    def sender() -> None:
        c0 = time.thread_time()
        period = 0.01
        per_tick = fps * period
        t_next = time.monotonic()
        i = 0.0
        k = 0
        wall0 = time.time()
        while not stop.is_set():
            i += per_tick
            while k < int(i) and k < len(frames):
                m = frames[k]
                m.timestamp += wall0  # the simulated clock, started now
                tx.send(m)
                k += 1
            t_next += period
            time.sleep(max(0.0, t_next - time.monotonic()))
        sent[0] = k
        sender_cpu[0] = time.thread_time() - c0

    th = threading.Thread(target=sender)
    p0 = _proc_cpu()
    w0 = time.monotonic()
    th.start()
    time.sleep(seconds)
    stop.set()
    th.join()
    wall = time.monotonic() - w0
    consumer_cpu = _proc_cpu() - p0 - sender_cpu[0]
    out: dict[str, Any] = {"mode": mode, "cpu_s": consumer_cpu, "wall_s": wall, "sent": sent[0],
                           "cpu_percent": 100 * consumer_cpu / wall, "speed": speed, "allocator": allocator.running()}
    if mode == "agent":
        time.sleep(0.5)  # the last batch through the pipeline before reading its counters
        st = consumer.pipeline.stats
        out.update(frames=st.frames, windows=st.windows, windows_scored=st.windows_scored)
    print(json.dumps(out), flush=True)
    os._exit(0)  # no orderly shutdown: the measurement is over


if __name__ == "__main__":
    main()
