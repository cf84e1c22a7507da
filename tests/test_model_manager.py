"""The model manager's state machine over a real model directory, real signed packages of real ONNX models and the
pure pipeline (the transport is test_model_transport.py): every step reported with a strictly increasing seq, also
across restarts; idempotent desired messages; cancel; rollback mode; a bad package never replaces the working model;
a restart in the watch watches again; a damaged active package falls back to the previous one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.config import ModelConfig
from agent.contract import AlertPolicy, FeatureSpec
from agent.decode.lines import LineDecoder
from agent.pipeline import Pipeline
from agent.signals import SignalRegistry
from agent.update.manager import ModelManager, start
from harvester_common import modelpkg
from harvester_common import modelwire as mw
from harvester_testing.modelserver import desired_of, signed_package
from harvester_testing.onnx_models import linear_softmax_model, make_contract
from tests.test_model_shadow import HEALTHY, T0, Recorder, feed

SIGNALS = {"s.a", "s.b"}
A = [FeatureSpec("a:mean:10s", "s.a", "mean", 10)]


def onnx_model(tmp: Path, version: str, **kw: object) -> Path:
    c = make_contract(A, model_name="test-model", model_version=version, alert=AlertPolicy(0.8, 0.4, 2, 2))
    return linear_softmax_model(tmp / f"m{version}.onnx", c, np.zeros((1, 2)), HEALTHY, **kw)  # type: ignore[arg-type]


class Keys:
    def __init__(self, tmp: Path) -> None:
        priv, self.pub, self.kid = modelpkg.generate_keypair(tmp)
        self.key = modelpkg.load_private_key(priv)
        self.trusted = modelpkg.load_public_keys([self.pub])


class Rig:
    """One vehicle's manager and pipeline; `restart()` builds them again from the same directory (a new process)."""

    def __init__(self, tmp: Path, keys: Keys, **cfg: object) -> None:
        self.tmp, self.keys = tmp, keys
        self.cfg = ModelConfig.model_validate({"path": onnx_model(tmp, "1"), "shadow_windows": 20, "watch_windows": 20,
                                               "progress_interval_s": 3600, **cfg})
        self.packages: dict[str, bytes] = {}
        self.statuses: list[mw.ModelStatus] = []
        self.gets: list[mw.GetRequest] = []
        self.t = T0
        self.restart()

    def restart(self) -> None:
        self.choice, mgr = start(self.cfg, self.tmp / "models", self.keys.trusted, SIGNALS)
        assert mgr is not None
        self.mgr: ModelManager = mgr
        reg = SignalRegistry()
        self.rec = Recorder()
        scorer = self.choice.loaded.scorer if self.choice.loaded else None
        self.p = Pipeline(reg, {"s": LineDecoder("s", "csv", ["a", "b"], {}, reg)}, scorer, self.rec,
                          on_update=self.mgr.on_update)

    def offer(self, pkg: bytes, **kw: object) -> mw.Desired:
        d = desired_of(pkg, chunk_bytes=700, **kw)  # type: ignore[arg-type]
        self.packages[d.package_sha256] = pkg
        self.mgr.on_desired(d)
        return d

    def pump(self, answer: bool = True) -> None:
        """Publish what the manager has; answer its requests as the cloud would (until it asks for nothing)."""
        while True:
            out = self.mgr.outgoing(True)
            gets = []
            for leaf, payload, _ in out:
                if leaf == mw.LEAF_STATUS:
                    self.statuses.append(mw.decode_status(payload))
                else:
                    gets.append(mw.decode_get(payload))
            self.gets += gets
            if not gets or not answer:
                return
            for g in gets:
                pkg = self.packages[g.package_sha256]
                for i in range(g.first, g.first + g.count):
                    self.mgr.on_chunk(mw.chunk_of(pkg, g.package_sha256, i, 700))

    def run(self, seconds: int, a: float = 1.0) -> None:
        for _ in range(0, seconds, 30):
            self.mgr.drive(self.p)
            self.t = feed(self.p, self.t, 30, a)
            self.pump()
        self.mgr.drive(self.p)
        self.pump()

    def states(self) -> list[str]:
        return [s.state + ("" if s.state != "active" else f":{s.healthy}") for s in self.statuses]

    def package(self, version: str, **kw: object) -> bytes:
        return signed_package(onnx_model(self.tmp, version, **kw), self.keys.key)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


def pointer(rig: Rig) -> dict[str, str | None]:
    d = json.loads((rig.tmp / "models" / "active.json").read_text())
    return {k: (v or {}).get("version") for k, v in d.items()}


def test_a_good_package_goes_through_every_step_and_survives_a_restart(tmp_path: Path, keys: Keys) -> None:
    rig = Rig(tmp_path, keys)
    rig.run(60)
    d = rig.offer(rig.package("2"), rollout="7")
    rig.pump()
    assert rig.states() == ["downloading", "verified"]
    rig.run(400)
    assert rig.states() == ["downloading", "verified", "shadow", "active:None", "active:True"]
    seqs = [s.seq for s in rig.statuses]
    assert seqs == sorted(set(seqs))
    last = rig.statuses[-1]
    assert last.target == {"name": "test-model", "version": "2", "package_sha256": d.package_sha256, "rollout": "7"}
    assert last.active is not None and last.active["version"] == "2"
    assert last.previous is not None and last.previous["version"] == "1"
    assert last.figures["new.windows"] >= 20 and rig.statuses[-2].figures["candidate.windows"] >= 20
    assert rig.p.scorer is not None and rig.p.scorer.contract.model_version == "2"
    assert pointer(rig) == {"active": "2", "previous": "1"}
    assert rig.p.stats.model_switch_unscored_windows == 0
    sent = sum(min(700, d.size - i * 700) for g in rig.gets for i in range(g.first, g.first + g.count))
    assert sent == d.size  # every chunk asked for once
    rig.restart()  # a new process: it scores with the package and reports on from a higher seq
    assert rig.p.scorer is not None and rig.p.scorer.contract.model_version == "2"
    rig.mgr.on_desired(d)  # the retained desired message again: nothing to do
    rig.mgr.on_connect(session_present=False)
    rig.pump()
    assert rig.statuses[-1].seq == last.seq and rig.statuses[-1].state == "active"
    rig.offer(rig.package("3"))
    rig.pump()
    assert rig.statuses[-1].seq > last.seq


def test_requests_survive_a_resumed_session_and_go_again_after_a_new_one_or_when_never_sent(
    tmp_path: Path, keys: Keys
) -> None:
    """What the uplink tells the manager: a reconnect that resumed the session (the answers are queued for us: not
    asked again), one that did not (asked again at once), and requests it could not publish (asked again, not
    paid for)."""
    rig = Rig(tmp_path, keys, download_window=2)
    d = rig.offer(rig.package("2"))
    assert d.chunks > 2

    def gets() -> list[mw.GetRequest]:
        return [mw.decode_get(p) for leaf, p, _ in rig.mgr.outgoing(True) if leaf == mw.LEAF_GET]

    assert gets() == [mw.GetRequest(d.package_sha256, 0, 2)]
    dl = rig.mgr._download
    assert dl is not None and dl.chunks_requested == 2
    rig.mgr.on_connect(session_present=True)
    assert gets() == []
    rig.mgr.on_connect(session_present=False)
    assert gets() == [mw.GetRequest(d.package_sha256, 0, 2)] and dl.chunks_requested == 4
    rig.mgr.unsent([(mw.LEAF_STATUS, b"{}", True), (mw.LEAF_GET, mw.encode_get(mw.GetRequest(d.package_sha256, 0, 2)),
                                                    False)])
    assert dl.chunks_requested == 2 and dl.bytes_requested == 2 * 700  # not sent: not asked, not paid for
    assert gets() == [mw.GetRequest(d.package_sha256, 0, 2)] and dl.chunks_requested == 4


def test_a_desired_model_already_active_is_reported_active(tmp_path: Path, keys: Keys) -> None:
    rig = Rig(tmp_path, keys)
    d = rig.offer(rig.package("2"))
    rig.run(400)
    n, gets = len(rig.statuses), len(rig.gets)
    again = desired_of(rig.packages[d.package_sha256], chunk_bytes=700, issued_at=99.0)  # issued anew
    rig.mgr.on_desired(again)
    rig.pump()
    assert rig.states()[n:] == ["active:True"] and rig.statuses[-1].seq == rig.statuses[n - 1].seq  # sent again
    (tmp_path / "models" / "state.json").unlink()  # no step on record: a new report says so
    rig.restart()
    rig.mgr.on_desired(again)
    rig.pump()
    assert rig.states()[-1] == "active:True" and rig.statuses[-1].reason == "already active"
    assert rig.statuses[-1].seq > rig.statuses[n - 1].seq and len(rig.gets) == gets  # nothing downloaded


def test_an_empty_desired_cancels_a_download_and_a_new_one_replaces_it(tmp_path: Path, keys: Keys) -> None:
    rig = Rig(tmp_path, keys)
    d2 = rig.offer(rig.package("2"))
    rig.pump(answer=False)
    part = rig.tmp / "models" / "download" / f"{d2.package_sha256}.part"
    assert part.exists()
    rig.mgr.on_desired(None)
    rig.pump()
    assert rig.states() == ["downloading", "cancelled"] and not part.exists()
    assert rig.statuses[-1].reason == "the desired model was cleared"
    rig.offer(rig.package("2"))
    rig.pump(answer=False)
    rig.offer(rig.package("3"))
    rig.pump()
    assert rig.states()[2:] == ["downloading", "cancelled", "downloading", "verified"]
    assert "changed to test-model 3" in rig.statuses[3].reason
    rig.mgr.on_desired(None)  # cancels the shadow run too
    rig.run(60)
    assert rig.states()[-1] == "cancelled" and rig.p.update_kind is None
    assert rig.p.scorer is not None and rig.p.scorer.contract.model_version == "1"
    assert list((rig.tmp / "models" / "packages").iterdir()) == []  # nothing kept that nothing uses


def test_a_download_failed_by_a_chunk_that_never_matches_keeps_what_it_verified(tmp_path: Path, keys: Keys) -> None:
    """`chunk_max_bad` wrong answers for one chunk fail the download, but the chunks it holds passed their hashes:
    the cloud's next desired message for the package (a new rollout) asks only for the rest."""
    rig = Rig(tmp_path, keys, chunk_max_bad=2, download_window=4)
    pkg = rig.package("2")
    d = rig.offer(pkg)
    rig.pump(answer=False)
    assert d.chunks >= 3
    asked_first = [i for g in rig.gets for i in range(g.first, g.first + g.count)]
    assert asked_first == list(range(min(4, d.chunks)))
    for i in (0, 1):
        rig.mgr.on_chunk(mw.chunk_of(pkg, d.package_sha256, i, 700))
    bad = mw.Chunk(d.package_sha256, 2, d.chunks, bytes(len(mw.chunk_of(pkg, d.package_sha256, 2, 700).data)))
    rig.mgr.on_chunk(bad)
    rig.pump(answer=False)  # chunk 2 asked again at once
    rig.mgr.on_chunk(bad)
    rig.pump(answer=False)
    assert rig.states()[-1] == "failed" and "chunk_never_matches" in (rig.statuses[-1].reason or "")
    part = rig.tmp / "models" / "download" / f"{d.package_sha256}.part"
    assert part.exists()
    rig.gets.clear()
    rig.offer(pkg, rollout="2")
    rig.pump()
    assert rig.statuses[-2].state == "downloading" and rig.states()[-1] == "verified"
    asked_again = sorted(i for g in rig.gets for i in range(g.first, g.first + g.count))
    assert asked_again == list(range(2, d.chunks))  # chunks 0 and 1 were kept


def test_a_package_that_fails_verification_never_replaces_the_working_model(tmp_path: Path, keys: Keys) -> None:
    rig = Rig(tmp_path, keys)
    stranger = Keys(tmp_path / "other-keys")
    d = rig.offer(signed_package(onnx_model(tmp_path, "2"), stranger.key))
    rig.run(60)
    assert rig.states() == ["downloading", "rejected"]
    assert rig.statuses[-1].reason.startswith("unknown_key")
    assert rig.p.scorer is not None and rig.p.scorer.contract.model_version == "1"
    assert list((rig.tmp / "models" / "packages").iterdir()) == []
    assert not (rig.tmp / "models" / "active.json").exists()
    # The same desired message again (a reconnect): its outcome again, not a second download.
    n = len(rig.gets)
    rig.mgr.on_desired(d)
    rig.mgr.on_connect(session_present=True)
    rig.pump()
    assert len(rig.gets) == n and rig.statuses[-1].state == "rejected"
    # A tampered package whose chunk hashes match its bytes: refused by its signature.
    good = bytearray(rig.package("3"))
    good[len(good) // 2] ^= 1
    rig.offer(bytes(good))
    rig.run(30)
    assert rig.states()[-1] == "rejected" and rig.statuses[-1].reason.startswith(("bad_signature", "hash_mismatch"))
    # The cloud issues the first one anew (a new issued_at) with a key the vehicle now trusts: tried again.
    rig.keys.trusted = rig.mgr.trusted = dict(keys.trusted) | stranger.trusted
    rig.mgr.on_desired(desired_of(rig.packages[d.package_sha256], chunk_bytes=700, issued_at=2.0))
    rig.run(400)
    assert rig.states()[-1] == "active:True"


def test_a_model_failing_after_the_switch_is_rolled_back_and_stays_refused(tmp_path: Path, keys: Keys) -> None:
    rig = Rig(tmp_path, keys)
    d = rig.offer(rig.package("2", nan_above=(0, 5.0)))
    rig.run(150)
    assert rig.states()[-1] == "active:None"
    rig.run(60, a=9.0)
    assert rig.states()[-1] == "rolled_back"
    rb = rig.statuses[-1]
    assert "non-finite" in rb.reason and rb.active is not None and rb.active["version"] == "1"
    assert rb.previous is None and pointer(rig) == {"active": "1", "previous": None}
    assert rig.p.scorer is not None and rig.p.scorer.contract.model_version == "1"
    rig.mgr.on_desired(d)  # still desired: not tried again
    rig.run(60)
    assert rig.states()[-1] == "rolled_back"


def test_rollback_mode_switches_without_a_shadow_run(tmp_path: Path, keys: Keys) -> None:
    rig = Rig(tmp_path, keys)
    p2, p3 = rig.package("2"), rig.package("3")
    rig.offer(p2)
    rig.run(400)
    rig.offer(p3)
    rig.run(150)
    assert rig.states()[-1] == "active:None"  # 3 is watched, 2 kept warm
    rig.offer(p2, mode="rollback")  # an operator's rollback to 2 in the watch: immediate
    rig.run(30)
    assert rig.states()[-1] == "active:True" and rig.statuses[-1].target is not None
    assert rig.statuses[-1].target["version"] == "2" and rig.p.scorer is not None
    assert rig.p.scorer.contract.model_version == "2"
    rig.offer(p3, issued_at=5.0)
    rig.run(400)
    assert rig.p.scorer.contract.model_version == "3"  # type: ignore[union-attr]
    n = len(rig.statuses)
    rig.offer(p2, mode="rollback", issued_at=6.0)  # 2 is kept (the previous model): no download
    rig.run(120)
    assert rig.states()[n:] == ["verified", "active:True"]
    assert rig.p.scorer.contract.model_version == "2"  # type: ignore[union-attr]
    assert rig.p.stats.model_switch_unscored_windows == 0


def test_a_restart_in_the_watch_watches_again_and_can_still_roll_back(tmp_path: Path, keys: Keys) -> None:
    rig = Rig(tmp_path, keys)
    rig.offer(rig.package("2", nan_above=(0, 5.0)))
    rig.run(150)
    assert rig.states()[-1] == "active:None"
    seq = rig.statuses[-1].seq
    rig.restart()
    assert rig.p.scorer is not None and rig.p.scorer.contract.model_version == "2"
    rig.mgr.drive(rig.p)
    assert rig.p.update_kind == "watch"
    rig.run(90, a=9.0)
    assert rig.states()[-1] == "rolled_back" and rig.statuses[-1].seq > seq
    assert rig.p.scorer.contract.model_version == "1"


def test_a_damaged_active_package_falls_back_to_the_previous_model_and_says_so(tmp_path: Path, keys: Keys) -> None:
    rig = Rig(tmp_path, keys)
    d2 = rig.offer(rig.package("2"))
    rig.run(400)
    d3 = rig.offer(rig.package("3"))
    rig.run(400)
    assert pointer(rig) == {"active": "3", "previous": "2"}
    path = rig.tmp / "models" / "packages" / f"{d3.package_sha256}.hvmp"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    rig.restart()
    assert rig.choice.loaded is not None and rig.choice.loaded.ref.package == d2.package_sha256
    assert any("refused" in n for n in rig.choice.notes)
    rig.pump()
    assert rig.states()[-1] == "rolled_back" and "did not load at start" in rig.statuses[-1].reason
    # And with the key no longer trusted at all: the installed model.
    (tmp_path / "models" / "packages" / f"{d2.package_sha256}.hvmp").write_bytes(b"junk")
    rig.restart()
    assert rig.choice.loaded is not None and rig.choice.loaded.ref.installed


def test_seq_is_above_the_clock_even_when_the_state_file_is_lost(tmp_path: Path, keys: Keys) -> None:
    rig = Rig(tmp_path, keys)
    rig.offer(rig.package("2"))
    rig.pump()
    top = rig.statuses[-1].seq
    (tmp_path / "models" / "state.json").write_text("{not json")
    rig.restart()
    rig.offer(rig.package("3"))
    rig.pump()
    assert rig.statuses[-1].seq > top


def test_status_shows_the_model_and_the_step_read_only(tmp_path: Path, keys: Keys,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import main
    from agent.store import Store

    rig = Rig(tmp_path, keys)
    rig.offer(rig.package("2"), rollout="5")
    rig.run(150)  # switched, being watched
    Store(tmp_path / "s.sqlite", first_seq=1).close()
    cfg = tmp_path / "a.toml"
    cfg.write_text('[store]\npath = "s.sqlite"\n')  # the model directory beside the store, as the rig's
    before = sorted(p.name for p in (tmp_path / "models").rglob("*"))
    capsys.readouterr()
    assert main(["status", "--config", str(cfg), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["model"]
    assert m["active"]["version"] == "2" and m["previous"]["package"] == "" and m["errors"] == []
    assert m["step"]["state"] == "active" and m["step"]["healthy"] is None
    assert main(["status", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "model            test-model 2 (package " in out and "previous test-model 1 (the installed model)" in out
    assert "model step       active test-model 2 (watched), seq " in out
    assert sorted(p.name for p in (tmp_path / "models").rglob("*")) == before  # nothing written


def test_any_sequence_of_model_messages_leaves_the_manager_standing(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Desired messages (good, for a package nobody serves, cleared) and chunks (right, wrong, stray) in any order:
    the manager never raises, every report it makes decodes, and its seq only increases."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    tmp = tmp_path_factory.mktemp("fuzz")
    keys = Keys(tmp / "keys")
    base = Rig(tmp, keys)
    good = base.package("2")
    d_good = desired_of(good, chunk_bytes=700)
    d_ghost = mw.Desired("ghost", "9", "ab" * 32, 1400, 700, ("cd" * 32, "ef" * 32), keys.kid, "1")
    n = d_good.chunks

    op = st.one_of(
        st.sampled_from([("desired", d_good), ("desired", d_ghost), ("desired", None), ("connect", False),
                         ("connect", True)]),
        st.tuples(st.just("chunk"), st.integers(0, n - 1)),
        st.tuples(st.just("junk"), st.tuples(st.sampled_from([d_good.package_sha256, "ab" * 32]),
                                             st.integers(0, 3), st.binary(min_size=1, max_size=800))),
    )

    @settings(max_examples=40, deadline=None)
    @given(st.lists(op, max_size=40))
    def run(ops: list[tuple[str, object]]) -> None:
        rig = Rig(tmp_path_factory.mktemp("r"), keys)
        rig.packages[d_good.package_sha256] = good
        for kind, arg in ops:
            if kind == "desired":
                rig.mgr.on_desired(arg)  # type: ignore[arg-type]
            elif kind == "connect":
                rig.mgr.on_connect(bool(arg))
            elif kind == "chunk":
                rig.mgr.on_chunk(mw.chunk_of(good, d_good.package_sha256, int(arg), 700))  # type: ignore[call-overload]
            else:
                sha, i, data = arg  # type: ignore[misc]
                rig.mgr.on_chunk(mw.Chunk(sha, min(i, n - 1), n, data))
            rig.mgr.drive(rig.p)
            rig.pump(answer=False)
        seqs = [s.seq for s in rig.statuses]
        assert seqs == sorted(seqs)

    run()


def test_a_restart_between_the_pointer_and_the_report_carries_the_step_to_its_end(tmp_path: Path, keys: Keys) -> None:
    """Killed after the switch rewrote the pointer and before its report: an update is watched, an operator's
    rollback is reported done."""
    rig = Rig(tmp_path, keys)
    p2, p3 = rig.package("2"), rig.package("3")
    rig.offer(p2)
    rig.run(400)
    state_file = tmp_path / "models" / "state.json"
    rig.offer(p3)
    rig.pump()
    assert rig.states()[-1] == "verified"
    saved = state_file.read_bytes()
    rig.run(150)
    assert rig.states()[-1] == "active:None"
    state_file.write_bytes(saved)  # the report after the pointer never made it to disk
    rig.restart()
    rig.mgr.drive(rig.p)
    rig.pump()
    assert rig.states()[-1] == "active:None" and rig.p.update_kind == "watch"
    rig.run(150)
    assert rig.states()[-1] == "active:True"
    rig.offer(p2, mode="rollback")
    rig.pump()
    saved = state_file.read_bytes()  # "verified", about the rollback
    rig.run(60)
    assert rig.states()[-1] == "active:True" and rig.p.scorer.contract.model_version == "2"  # type: ignore[union-attr]
    state_file.write_bytes(saved)
    rig.restart()
    rig.mgr.drive(rig.p)
    rig.pump()
    assert rig.states()[-1] == "active:True" and rig.p.update_kind is None
    assert rig.statuses[-1].target is not None and rig.statuses[-1].target["version"] == "2"


def test_a_watch_resumed_after_a_restart_does_not_count_the_cold_start_against_the_new_model(
    tmp_path: Path, keys: Keys
) -> None:
    """The first windows after a start hold less than a window of data (required features missing): the shadow
    run never counted such windows for the old model, so the resumed watch does not count them for the new one."""
    rig = Rig(tmp_path, keys, watch_windows=6)
    slope = [FeatureSpec("a:slope:10s", "s.a", "slope", 10)]  # NaN on a window with one sample
    c = make_contract(slope, model_name="test-model", model_version="2", alert=AlertPolicy(0.8, 0.4, 2, 2),
                      required_features=("a:slope:10s",), max_missing_fraction=0.0)
    rig.offer(signed_package(linear_softmax_model(tmp_path / "slope.onnx", c, np.zeros((1, 2)), HEALTHY), keys.key))
    rig.run(150)
    assert rig.states()[-1] == "active:None"
    rig.restart()
    rig.t += 1004  # the new process's data starts afresh, a second before a window closes: one sample in it
    rig.run(60)
    assert rig.p.stats.windows_missing >= 1  # that window was not scored ...
    assert rig.states()[-1] == "active:True", rig.statuses[-1].reason  # ... and not held against the new model
