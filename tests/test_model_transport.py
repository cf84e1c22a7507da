"""Model updates over a real Mosquitto: a whole agent downloads a signed package of the shipped model from a test
server that drops a chunk, duplicates one, corrupts one and goes away mid-download with the broker (the download
resumes from the chunks it has, not from zero); hostile model messages are counted and never hold up a good one;
model bytes count against the day's budget, which holds chunk requests back once spent."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import AgentConfig, ModelConfig, MqttConfig
from agent.service import Agent
from agent.store import Store
from agent.update.manager import start
from agent.uplink import Uplink
from harvester_common import modelpkg, wire
from harvester_common import modelwire as mw
from harvester_testing.broker import MosquittoBroker
from harvester_testing.modelserver import ModelServer, signed_package, with_version
from tests.test_uplink import VEHICLE, wait_for

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "harvester-anomaly.int8.onnx"
CARD = (REPO / "models" / "harvester-anomaly.card.json").read_bytes()


@pytest.fixture
def keyfiles(tmp_path: Path) -> tuple[Path, Any]:
    priv, pub, _ = modelpkg.generate_keypair(tmp_path / "keys")
    return pub, modelpkg.load_private_key(priv)


def agent_config(tmp: Path, broker: MosquittoBroker, pub: Path, **model: Any) -> AgentConfig:
    return AgentConfig.model_validate({
        "vehicle": {"fleet": "f1", "id": "v1"},
        # A bus nobody sends on: the agent decodes J1939 (the model's signals), and no window ever closes here.
        "can": [{"name": "can0", "interface": "virtual", "channel": f"transport-{tmp.name}"}],
        "model": {"path": str(MODEL), "trusted_keys": [str(pub)], "chunk_timeout_s": 1.0, **model},
        "store": {"path": str(tmp / "vehicle.sqlite")},
        "mqtt": {"host": broker.host, "port": broker.port, "tls": False, "reconnect_min_s": 0.1,
                 "reconnect_max_s": 0.5, "status_interval_s": 1},
    })


def test_download_survives_drops_duplicates_corruption_and_a_lost_link(
    broker: MosquittoBroker, tmp_path: Path, keyfiles: tuple[Path, Any]
) -> None:
    pub, key = keyfiles
    pkg = signed_package(with_version(MODEL, "2.0.1", tmp_path / "v2.onnx"), key, CARD)
    server = ModelServer(broker.host, broker.port, "f1", "v1", chunk_bytes=4096)
    server.drop_once = {2}
    server.duplicate_once = {3}
    server.corrupt_once = {5}
    agent = Agent(agent_config(tmp_path, broker, pub, download_window=2))
    assert agent.updates is not None
    agent.start()
    try:
        d = server.offer(pkg, rollout="9")
        assert d.chunks > 30
        wait_for(lambda: agent.updates is not None and agent.updates._download is not None
                 and agent.updates._download.n_have >= 12, what="a third of the chunks")
        server.answering.clear()  # the cloud goes away, and the link with it
        broker.kill()
        wait_for(lambda: not agent.uplink.connected, what="the vehicle to notice")
        dl = agent.updates._download
        assert dl is not None
        had = {i for i in range(d.chunks) if dl.have[i]}
        mark = len(server.requests)
        broker.start()
        server.answering.set()
        wait_for(lambda: "verified" in server.states(), timeout=60, what="the package downloaded and verified")
        wait_for(lambda: server.states()[-1:] == ["shadow"], what="the shadow run to begin")
        after = server.requested(d.package_sha256, mark)
        assert after and not had & set(after)  # resumed from what it had, not from zero
        assert server.bytes_requested(d.package_sha256, d.size, mark) <= d.size - 4096 * len(had) + 4096
        assert server.bad_messages == 0
        ev = agent.updates.counters
        assert ev["chunks_duplicate"] >= 1 and ev["chunks_hash_mismatch"] == 1
        every = server.requested(d.package_sha256)
        assert every.count(2) >= 2 and every.count(5) >= 2  # the dropped one and the corrupted one: asked again
        st = agent.uplink.stats
        assert st.model_bytes_in >= d.size and st.model_bytes_out > 0 and st.model_rejected == {}
        summary = agent._status_extra()["model"]
        assert summary["desired"] == {"name": "harvester-anomaly", "version": "2.0.1", "mode": "update"}
        assert summary["state"] == "shadow" and summary["active"]["name"] == "harvester-anomaly"
        kept = tmp_path / "models" / "packages" / f"{d.package_sha256}.hvmp"
        assert kept.read_bytes() == pkg
        assert list((tmp_path / "models" / "download").iterdir()) == []
    finally:
        agent.stop(drain_s=0)
        server.close()


def test_hostile_model_messages_are_counted_and_never_hold_up_a_good_one(
    broker: MosquittoBroker, tmp_path: Path, keyfiles: tuple[Path, Any]
) -> None:
    pub, key = keyfiles
    pkg = signed_package(with_version(MODEL, "2.0.2", tmp_path / "v2.onnx"), key, CARD)
    server = ModelServer(broker.host, broker.port, "f1", "v1", chunk_bytes=16384)
    agent = Agent(agent_config(tmp_path, broker, pub))
    agent.start()
    junk = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="junk", protocol=mqtt.MQTTv5)
    junk.connect(broker.host, broker.port)
    junk.loop_start()
    rng = random.Random(11)
    try:
        wait_for(lambda: agent.uplink.connected, what="the agent connected")
        t_desired = wire.vehicle_topic("f1", "v1", mw.LEAF_DESIRED)
        t_chunk = wire.vehicle_topic("f1", "v1", mw.LEAF_CHUNK)
        # Connected is not yet subscribed (the SUBACK comes later on a busy machine, and a message published
        # before it reaches nobody): a stray chunk, sent until one is counted, shows the subscription is live.
        stray = mw.encode_chunk(mw.Chunk("cd" * 32, 0, 1, b"x"))

        def strays() -> int:
            return agent.updates.counters["chunks_not_downloading"] if agent.updates is not None else 0

        def probe() -> bool:
            junk.publish(t_chunk, stray, qos=1).wait_for_publish(10)
            time.sleep(0.1)
            return strays() > 0

        wait_for(probe, what="the agent subscribed to its model topics")
        before = strays()
        bad = [rng.randbytes(rng.randint(1, 300)) for _ in range(40)]
        bad += [b"{" * 5000, b'{"schema": 1, "size": -1}', b'{"schema": 2}', b"[]", b"HVCK" + bytes(40)]
        bad += [mw.encode_chunk(mw.Chunk("ab" * 32, 0, 1, b"x"))[:44], b"\x00" * (mw.MAX_CHUNK_BYTES + 100)]
        for i, b in enumerate(bad):
            junk.publish(t_desired if i % 2 else t_chunk, b, qos=1).wait_for_publish(10)
        server.offer(pkg)
        wait_for(lambda: "verified" in server.states(), timeout=60, what="the good package after the junk")
        rejected = agent.uplink.stats.model_rejected
        assert sum(rejected.values()) >= len(bad) - 3 and set(rejected) == {"malformed"}
        # A chunk that decodes but belongs to no download: dropped by the manager, counted.
        junk.publish(t_chunk, stray, qos=1).wait_for_publish(10)
        wait_for(lambda: strays() == before + 1, what="the stray chunk counted")
        snap = agent.metrics.snapshot()["counters"]
        assert snap["uplink.model_rejected"]["malformed"] == rejected["malformed"]
    finally:
        junk.loop_stop()
        junk.disconnect()
        agent.stop(drain_s=0)
        server.close()


def test_model_bytes_count_against_the_budget_which_holds_chunk_requests_back(
    broker: MosquittoBroker, tmp_path: Path, keyfiles: tuple[Path, Any]
) -> None:
    pub, key = keyfiles
    pkg = signed_package(with_version(MODEL, "2.0.3", tmp_path / "v2.onnx"), key, CARD)
    server = ModelServer(broker.host, broker.port, "f1", "v1", chunk_bytes=16384)
    cfg = ModelConfig(path=MODEL, trusted_keys=[pub], progress_interval_s=1)
    _, mgr = start(cfg, tmp_path / "models", modelpkg.load_public_keys([pub]), {"unused"})
    assert mgr is not None
    store = Store(tmp_path / "s.sqlite", first_seq=1)
    day = [20_000.0 * 86400]
    budget = 40_000
    up = Uplink(MqttConfig(host=broker.host, port=broker.port, tls=False, reconnect_min_s=0.1, reconnect_max_s=0.5,
                           daily_budget_bytes=budget), VEHICLE, store, seed=1, clock=lambda: day[0], model=mgr)
    up.start()
    window = cfg.download_window
    try:
        d = server.offer(pkg)

        def diag(n: int) -> str:
            """What the download and the uplink had done, for an assertion's message."""
            dl = mgr._download
            got = "no download (the package is complete, being checked)" if dl is None else (
                f"have {dl.n_have}/{d.chunks}, asked {sorted(dl.asked)}, {dl.chunks_requested} chunks and "
                f"{dl.bytes_requested} bytes requested, {dl.timeouts} timeouts, dropped {dict(dl.dropped)}")
            return (f"day {n}: used {up.budget_used()} of {budget}; {got}; manager {dict(mgr.counters)}, step "
                    f"{mgr.summary()['state']}; model bytes in {up.stats.model_bytes_in} out "
                    f"{up.stats.model_bytes_out}; server got requests for {server.requested(d.package_sha256)}, "
                    f"states {server.states()}")

        def wait(cond: Callable[[], bool], what: str) -> None:
            try:
                wait_for(cond, timeout=60, what=what)
            except AssertionError as e:
                raise AssertionError(f"{e}; {diag(days)}") from None

        days = 0
        asked_before = 0  # chunk bytes the download asked for on the days before this one
        while True:
            # Each day: chunks until the budget is spent (at most a window of requests past it), then none.
            wait(lambda: up.budget_spent() or "rejected" in server.states(), "a day's budget")
            dl = mgr._download
            if dl is None or dl.complete:
                # The last chunks are in. They may have spent this day's budget too: the package's own report
                # (rejected, below) comes after they are checked, not before the budget is seen spent.
                break
            # Only model bytes were sent or received here: they are what spent it, at most a window past it.
            used = up.budget_used()
            assert budget <= used <= budget + window * (16384 + mw.CHUNK_HEADER_BYTES) + 4096, diag(days)
            # Spent, and only the test turns the day: nothing more is asked for today, so what the download has
            # asked for is final. Every request went out with the budget not yet spent, so a day asks at most for
            # what came in under it and a window past it (a chunk asked again after its timeout, twice).
            asked_today = dl.bytes_requested - asked_before
            assert asked_today <= budget + (window + dl.timeouts) * 16384, diag(days)
            if days == 0:  # held back: not the whole package on the first day
                assert len(set(server.requested(d.package_sha256))) < d.chunks, diag(days)
            asked_before = dl.bytes_requested
            day[0] += 86400  # the next UTC day
            days += 1
        wait(lambda: "rejected" in server.states(), "the package checked and rejected")
        assert days >= 1, diag(days)  # the package took more than one day's budget (days counts from 0)
        assert up.stats.model_bytes_in >= d.size
        latest = server.latest()
        assert latest is not None and "incompatible_contract" in latest.reason  # this vehicle decodes none of it
    finally:
        up.stop()
        server.close()
        store.close()
