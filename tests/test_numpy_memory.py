"""numpy's small-block cache stays empty in the agent's threads (agent/numpy_memory.py).

numpy keeps up to 7 freed data blocks of every size under 1,024 bytes; a bus's batches of every length filled it
slowly for an hour in the memory soak (docs/benchmarks.md). The cache is read from memory through numpy's symbol
table (harvester_testing/numpy_cache.py), in child processes: numpy's cache is one per process, and pytest's own
numpy use would fill it."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from agent import numpy_memory
from harvester_testing.numpy_cache import fill

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "harvester-anomaly.int8.onnx"

# A real agent on a virtual bus with the shipped model. The frames are made before the first reading (the simulator
# uses numpy in this, the main, thread); then bursts of 1 to 300 of them, each processed before the next is sent, so
# the pipeline decodes batches of many lengths, as on a vehicle. argv: config-dict JSON, "on" to leave numpy's cache
# on in the agent's threads (the default numpy gives every thread) or "off" (what the agent does).
AGENT = textwrap.dedent("""
    import json, sys, time
    import can
    from agent import numpy_memory
    from agent.config import AgentConfig
    from agent.service import Agent
    from harvester_sim import Harvester, J1939Transmitter
    from harvester_testing.numpy_cache import fill

    if sys.argv[2] == "on":
        numpy_memory._set_handler = lambda: None
    cfg = AgentConfig.model_validate(json.loads(sys.argv[1]))
    frames = J1939Transmitter(Harvester(seed=3)).frames_until(120.0)
    agent = Agent(cfg)
    agent.start()
    bus = can.Bus(interface="virtual", channel=cfg.can[0].channel, preserve_timestamps=True)
    end = time.monotonic() + 60
    while not agent.can_sources[0].up and time.monotonic() < end:
        time.sleep(0.05)
    before = fill()
    sent = 0
    burst = 1
    while sent < len(frames):
        for m in frames[sent:sent + burst]:
            bus.send(m)
        sent = min(len(frames), sent + burst)
        while agent.pipeline.stats.frames < sent and time.monotonic() < end + 120:
            time.sleep(0.002)
        burst = burst % 300 + 7
    after = fill()
    bus.shutdown()
    agent.stop(drain_s=0)
    print(json.dumps({"before": before.to_dict(), "after": after.to_dict(), "sent": sent,
                      "frames": agent.pipeline.stats.frames, "windows": agent.pipeline.stats.windows_scored}))
""")


def _agent_run(tmp_path: Path, cache: str) -> dict[str, dict[str, int] | int]:
    cfg = {"can": [{"name": "can0", "interface": "virtual", "channel": f"np-{cache}"}],
           "model": {"path": str(MODEL)},
           "store": {"path": str(tmp_path / f"{cache}.sqlite"), "flush_interval_s": 0.1},
           "mqtt": {"port": 1, "tls": False, "reconnect_min_s": 5}}
    out = subprocess.run([sys.executable, "-c", AGENT, json.dumps(cfg), cache], capture_output=True, text=True,
                         timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, dict[str, int] | int] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _grown(run: dict[str, dict[str, int] | int], key: str) -> int:
    before, after = run["before"], run["after"]
    assert isinstance(before, dict) and isinstance(after, dict)
    return after[key] - before[key]


def test_the_agents_threads_leave_numpys_small_block_cache_empty(tmp_path: Path) -> None:
    default = _agent_run(tmp_path, "on")
    ours = _agent_run(tmp_path, "off")
    for run in (default, ours):
        assert run["frames"] == run["sent"], run  # every frame decoded
        assert isinstance(run["windows"], int) and run["windows"] > 0, run  # and the model scored
    # The same traffic under numpy's default fills the cache in many sizes (this test can see what it guards) ...
    assert _grown(default, "sizes") >= 100, default
    # ... and in the agent's threads, as the agent starts them, it does not grow. What may still go in is what the
    # agent made under numpy's default before its threads started (in the caller's thread: model, decode tables,
    # buffers) and a thread frees later: a handful of blocks, once (6 blocks in 1 new size when this was written).
    assert _grown(ours, "sizes") <= 3, ours
    assert _grown(ours, "bytes") * 100 <= _grown(default, "bytes"), (ours, default)


def test_a_thread_made_by_numpy_memory_allocates_without_the_cache() -> None:
    """In-process, the handler numpy reports: the agent's threads get it, the caller's own context keeps numpy's."""
    seen: list[tuple[str, str]] = []

    def work() -> None:
        a = np.arange(10) > 3
        seen.append((numpy_memory.current(), str(np._core.multiarray.get_handler_name(a))))

    t = numpy_memory.thread(work, "numpy-memory-test")
    t.start()
    t.join()
    assert numpy_memory.reason is None
    assert seen == [(numpy_memory.NAME, numpy_memory.NAME)]
    # Its functions are Python's raw allocator's (a handler that leaked or never freed would pass the cache tests).
    raw = numpy_memory._Allocator()
    numpy_memory._capi("PyMem_GetAllocator", None, ctypes.c_int, ctypes.POINTER(numpy_memory._Allocator))(
        0, ctypes.byref(raw))
    made = numpy_memory._handler
    assert made is not None
    assert [getattr(made.allocator, f) for f, _ in raw._fields_] == [getattr(raw, f) for f, _ in raw._fields_]
    assert numpy_memory.current() == "default_allocator"  # pytest's thread untouched
    assert "cache off" in numpy_memory.status()


def test_the_cache_reader_sees_numpys_cache_fill_and_empty() -> None:
    """The reader itself, in a child: numpy's default caches what a thread frees, our handler does not."""
    script = textwrap.dedent("""
        import json, threading
        import numpy as np
        from agent import numpy_memory
        from harvester_testing.numpy_cache import fill

        def work():
            for n in range(1, 512):
                x = np.ones(n, np.uint8) & np.zeros(n, np.uint8)
                del x
        out = {"start": fill().to_dict()}
        t = numpy_memory.thread(work, "ours"); t.start(); t.join()
        out["ours"] = fill().to_dict()
        t = threading.Thread(target=work); t.start(); t.join()
        out["numpys"] = fill().to_dict()
        print(json.dumps(out))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert got["ours"] == got["start"]
    # Two blocks of each size 1..511 are freed per iteration (the result and a temporary); numpy keeps both.
    assert got["numpys"]["sizes"] - got["start"]["sizes"] >= 500
    assert got["numpys"]["bytes"] - got["start"]["bytes"] >= 2 * sum(range(1, 511))


def test_the_reader_refuses_what_is_not_numpys_cache() -> None:
    with subprocess.Popen(["sleep", "30"]) as p:
        try:
            with pytest.raises(LookupError, match="not loaded numpy"):
                fill(p.pid)
        finally:
            p.kill()
