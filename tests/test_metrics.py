"""The metrics registry (agent/metrics.py): counts, labels, gauges and collectors in one snapshot; a drop or an error
counted and logged at most once per interval with the count since the last line; a snapshot bounded so that a flood
of distinct reasons never makes the vehicle's status message larger than the receiver takes; the running agent's
snapshot saved in its store and read by `harvester-agent status` (another process), with its age."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.config import MqttConfig, VehicleConfig
from agent.metrics import OTHER, Metrics, bounded
from agent.store import METRICS_STATE_KEY, Store
from agent.uplink import Uplink
from harvester_common import wire

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    """A clock the test turns: the rate limit is checked without waiting for it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_counters_labels_gauges_and_collectors_in_one_snapshot() -> None:
    m = Metrics()
    m.inc("uplink.ack_timeouts")
    m.inc("uplink.ack_timeouts", 2)
    m.inc("source.can0.errors", 3, "bus_error")
    m.gauge("source.can0.up", 1)
    seen = {"frames": 10}
    m.collect("pipeline", lambda: {"frames": seen["frames"], "errors": {"x": 2}, "queue": 0.5, "up": True})
    seen["frames"] = 12  # read at snapshot time, not at registration
    snap = m.snapshot()
    assert snap["counters"] == {"pipeline.errors": {"x": 2}, "pipeline.frames": 12,
                                "source.can0.errors": {"bus_error": 3}, "uplink.ack_timeouts": 3}
    assert snap["gauges"] == {"pipeline.queue": 0.5, "pipeline.up": 1, "source.can0.up": 1}
    assert m.get("uplink.ack_timeouts") == 3 and m.labels("source.can0.errors") == {"bus_error": 3}

    def broken() -> dict[str, int]:
        raise RuntimeError("collector bug")

    m.collect("broken", broken)
    assert m.snapshot()["counters"]["uplink.ack_timeouts"] == 3  # one broken collector costs only its own values


def test_a_counter_and_a_collector_of_the_same_name_are_both_kept() -> None:
    # The service counts `writer.errors{metrics_not_saved}` itself while the writer's collector reports its own
    # `errors`: neither may hide the other (it did, so the failure to save metrics was never seen).
    m = Metrics()
    m.error("writer", "metrics_not_saved")
    m.collect("writer", lambda: {"errors": {"store_write_failed": 2}, "held": 3})
    snap = m.snapshot()["counters"]
    assert snap["writer.errors"] == {"metrics_not_saved": 1, "store_write_failed": 2}
    assert snap["writer.held"] == 3


def test_counting_from_many_threads_loses_nothing() -> None:
    m = Metrics(log_every_s=1e9)

    def work() -> None:
        for _ in range(10_000):
            m.inc("c")
            m.drop("queue", "full")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.get("c") == 40_000 and m.labels("queue.dropped") == {"full": 40_000}


def test_drop_and_error_count_every_time_and_log_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    m = Metrics(log_every_s=60, clock=clock)
    with caplog.at_level(logging.WARNING, logger="agent.metrics"):
        m.drop("agent.queue", "can", 100, "the pipeline queue is full")  # the first is told at once
        for _ in range(999):
            m.drop("agent.queue", "can", 100)
        m.error("source.can0", "bus_error", detail="bus off")  # another (component, reason): its own limit
        clock.now += 59.9
        m.drop("agent.queue", "can", 100)
        assert len(caplog.records) == 2
        clock.now += 0.2  # the interval has passed: one line, with what happened since the last one
        m.drop("agent.queue", "can", 7, "the pipeline queue is full")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["agent.queue: dropped 100 (can): the pipeline queue is full",
                     "source.can0: bus_error: bus off",
                     "agent.queue: dropped 7 (can): the pipeline queue is full (100000 more since the last report)"]
    assert m.labels("agent.queue.dropped") == {"can": 100 * 1001 + 7}  # counted exactly, whatever was logged
    assert m.labels("source.can0.errors") == {"bus_error": 1}


def test_bounded_keeps_the_largest_labels_and_sums_the_rest() -> None:
    m = Metrics()
    for i in range(40):
        m.inc("decoder.can0.errors", i + 1, f"reason{i:02d}")
    m.inc("decoder.can0.errors", 0, "zero")
    snap = bounded(m.snapshot(), max_labels=5)
    labels = snap["counters"]["decoder.can0.errors"]
    assert list(labels)[:4] == ["reason39", "reason38", "reason37", "reason36"]
    assert labels[OTHER] == sum(range(1, 37))  # the other 36, summed; zeros left out
    assert sum(labels.values()) == sum(range(1, 41))  # nothing lost in the total


def test_a_flood_of_distinct_reasons_never_makes_the_status_message_oversized(tmp_path: Path) -> None:
    """Labels can come from outside (a reason per bad input): 100,000 distinct ones, long, on many counters, and the
    status message the uplink would publish still fits the receiver's limit, with every total kept."""
    m = Metrics(log_every_s=1e9)
    for c in range(200):
        for i in range(500):
            m.error(f"component{c:03d}-" + "x" * 80, f"reason {i} " + "y" * 200)
    big = m.snapshot()
    assert len(json.dumps(big)) > 10 * wire.MAX_STATUS_BYTES  # what an unbounded snapshot would have sent
    store = Store(tmp_path / "s.sqlite")
    try:
        up = Uplink(MqttConfig(port=1, tls=False), VehicleConfig(fleet="f1", id="v1"), store,
                    lambda: {"metrics": bounded(m.snapshot())}, metrics=m)
        payload = up._status_payload("online")
    finally:
        store.close()
    assert len(payload) <= wire.MAX_STATUS_BYTES
    status = json.loads(payload)
    assert status["metrics"]["omitted"] > 0  # what did not fit is said, not silently missing
    kept = status["metrics"]["counters"]
    assert kept and all(sum(v.values()) == 500 for v in kept.values() if isinstance(v, dict))


def test_status_counters_reads_only_what_has_the_expected_shape() -> None:
    metrics = {"counters": {"a": 3, "b": {"x": 2, "y": 0, "z": "7", "w": True}, "c": 0, "d": -1, "e": [1]}}
    assert wire.status_counters(metrics) == {"a": 3, "b{x}": 2}
    for junk in (None, "x", {"counters": "x"}, {"counters": [1, 2]}):
        assert wire.status_counters(junk) == {}


def _status(conf: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(conf), *extra],
                          capture_output=True, text=True, timeout=120, env=env)


def test_status_shows_the_counters_the_running_agent_saved(tmp_path: Path) -> None:
    """A real agent with a serial device that is not there: its failures are counted in the registry; the agent
    saves the snapshot in its store (at the status period and when it stops), and `status` reads it from another
    process, --json and as text."""
    from agent.config import AgentConfig
    from agent.service import Agent
    from tests.test_uplink import wait_for

    db = tmp_path / "agent.sqlite"
    conf = tmp_path / "agent.toml"
    conf.write_text(f'[vehicle]\nfleet = "f1"\nid = "v1"\n[store]\npath = "{db}"\n')
    cfg = AgentConfig.model_validate({
        "vehicle": {"fleet": "f1", "id": "v1"},
        "serial": [{"name": "gps", "port": str(tmp_path / "no-such-tty"), "reconnect_min_s": 0.05,
                    "reconnect_max_s": 0.1}],
        "model": {"path": str(tmp_path / "none.onnx")},
        "store": {"path": str(db), "flush_interval_s": 0.1},
        "mqtt": {"port": 1, "tls": False, "reconnect_min_s": 5},
    })
    agent = Agent(cfg)
    r = _status(conf)  # a store the agent has not yet saved counters into
    assert r.returncode == 0, r.stderr
    assert "none saved yet" in r.stdout
    agent.start()
    try:
        wait_for(lambda: agent.serial_sources[0].errors["open_failed"] >= 2, what="open failures counted")
        wait_for(lambda: agent.pipeline.stats.source_events >= 1, what="the source_down event through the pipeline")
    finally:
        agent.stop(drain_s=0)
    failures = agent.metrics.labels("source.gps.errors")["open_failed"]
    r = _status(conf, "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    counters = st["metrics"]["counters"]
    assert counters["source.gps.errors"] == {"open_failed": failures}  # the final count, saved at stop
    assert counters["source.gps.events"] == {"source_down": 1}  # one event per outage, not per attempt
    assert counters["pipeline.source_events"] == 1 and "uplink.ack_timeouts" in counters
    assert counters["store.written_records"] == 1 and st["metrics"]["gauges"]["store.used_bytes"] > 0
    assert st["metrics"]["gauges"]["source.gps.up"] == 0
    assert st["metrics_age_s"] is not None and st["metrics_age_s"] >= 0
    # Beside the store's own keys, which stay as they were.
    assert st["records_written"]["records"] == 1 and st["events_written"] == 1
    text = _status(conf).stdout
    assert "source.gps.errors{open_failed}" in text and str(failures) in text
    assert "uplink.ack_timeouts" not in text  # zero: only the non-zero ones are printed
    s = Store(db)
    try:
        assert s.get_state(METRICS_STATE_KEY)["metrics"]["counters"]["source.gps.errors"] == {"open_failed": failures}
    finally:
        s.close()
