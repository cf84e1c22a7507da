"""`python -m models.build --from-export DIR`: the next model from a fleet's export (docs/learning_loop.md, "The next
model"), on datasets in the export's layout made from simulated harvesters (harvester_testing/exportkit.py).

One build is shared by the module (a small fleet over two days: confirmed and false-alarm verdicts, an unknown
verdict, an alert nobody judged, breakdowns of a known fault and of one outside the model's classes), its base a
signed package verified with its public key: the candidate verifies as a package and loads in the agent's Scorer,
the card says what data was used and holds the held-out evaluation side by side. A second build, on the first's
simulated runs, is refused (exit 1) when the "healthy" traces it is checked on show a fault, with no package left.
The labelling, the held-out split and the decision are tested on hand-made timelines, edges included; bad input
is one line and exit status 2, with nothing written."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agent.contract import FeatureSpec
from agent.features import FeatureEngine
from agent.scoring import Scorer
from harvester_common import modelpkg
from harvester_testing import exportkit, modelkit
from harvester_testing.data import SHARED_DATA
from harvester_testing.exportkit import Breakdown, Session, Verdict
from models.build import main as build_main
from models.exportread import open_export, vehicle_windows
from models.fleeteval import AUC_TOLERANCE, HeldOutDay, compare, decide, run_model
from models.fleetlabels import (
    BAD_VERDICT,
    CONFLICT,
    LABEL_HORIZON_S,
    LEAD_S,
    NEAR,
    NO_VERDICT,
    OUTSIDE,
    STOPPED,
    UNKNOWN,
    WARMUP,
    AlertRecord,
    BreakdownRecord,
    Episode,
    VerdictRecord,
    clean_day,
    day_start,
    episodes,
    held_out,
    label_windows,
    timeline,
)
from models.fromexport import next_version

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "harvester-anomaly.int8.onnx"
NAME = "harvester-anomaly"
D1, D2 = "2026-11-18", "2026-11-19"
T1, T2 = day_start(D1) + 8 * 3600, day_start(D2) + 8 * 3600
CLASSES = ("healthy", "coolant_leak", "oil_pump_wear", "hydraulic_overheat", "fan_wear")
PROG = "python -m models.build: error: "


def opened(d: exportkit.VehicleData, after: float) -> list[dict[str, Any]]:
    return [a for a in d.opened() if a["ts"] >= after]


def small_fleet(out: Path) -> dict[str, Any]:
    """Five harvesters over two days, and what their mechanics said; returns what the test needs to know."""
    # Faults come on from the start of a session, in half a minute (as harvester_testing/agentproc.py's do).
    v1 = exportkit.simulate_vehicle("harvester-001", [Session(T1, 900, "coolant_leak", 0, 30, seed=11),
                                                      Session(T2, 600, seed=12)])
    v2 = exportkit.simulate_vehicle("harvester-002", [Session(T1, 600, seed=21),
                                                      Session(T2, 900, "oil_pump_wear", 0, 30, seed=22)])
    fa = exportkit.false_alarm(v2, T1 + 200, T1 + 300, "hydraulic_overheat")
    v3 = exportkit.simulate_vehicle("harvester-003", [Session(T1, 900, "fan_wear", 0, 30, seed=31),
                                                      Session(T2, 600, seed=32)])
    v4 = exportkit.simulate_vehicle("harvester-004", [Session(T1, 900, "hydraulic_overheat", 0, 30, seed=41),
                                                      Session(T2, 600, seed=42)])
    v5 = exportkit.simulate_vehicle("harvester-005", [Session(T1, 600, seed=51),
                                                      Session(T2, 900, "coolant_leak", 0, 30, seed=52)])
    verdicts = [Verdict("harvester-001", a["alert_id"], "confirmed", "", at=T1 + 3600) for a in opened(v1, T1)]
    # The mechanic first thought the pump fine, then found it worn: the latest verdict counts.
    verdicts += [Verdict("harvester-002", a["alert_id"], lab, "oil_pump_wear" if lab == "confirmed" else "",
                         at=T2 + 3600 + k) for a in opened(v2, T2) for k, lab in enumerate(["false_alarm",
                                                                                                  "confirmed"])]
    verdicts.append(Verdict("harvester-002", fa, "false_alarm", at=T1 + 3600))
    verdicts += [Verdict("harvester-003", a["alert_id"], "unknown", at=T1 + 3600) for a in opened(v3, T1)]
    verdicts += [Verdict("harvester-004", a["alert_id"], "confirmed", "hydraulic_overheat", at=T1 + 3600)
                 for a in opened(v4, T1)]
    verdicts.append(Verdict("harvester-009", "0" * 32, "confirmed", "coolant_leak", at=T1))  # an alert not exported
    breakdowns = [Breakdown("harvester-004", T1 + 900, "hydraulic_overheat"),
                  Breakdown("harvester-003", T2 + 600, "alternator_failure")]
    exportkit.write_export(out, [v1, v2, v3, v4, v5], verdicts, breakdowns, chunk_rows=200_000)
    return {"vehicles": [v1, v2, v3, v4, v5], "false_alarm": fa, "verdicts": verdicts}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    key, pub, _ = modelkit.signing_key(tmp_path_factory.mktemp("keys"))
    return key, pub


@pytest.fixture(scope="module")
def base_pkg(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    """The shipped model as a signed package, as the fleet runs it."""
    out = tmp_path_factory.mktemp("base") / f"{NAME}-2.0.0.pkg"
    modelkit.package(SHIPPED, keys[0], out, card={"model": {"name": NAME, "version": "2.0.0"}})
    return out


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    d = tmp_path_factory.mktemp("export") / "export"
    return d, small_fleet(d)


@pytest.fixture(scope="module")
def sim_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("simcache")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, fleet: tuple[Path, dict[str, Any]], base_pkg: Path,
          keys: tuple[Path, Path], sim_cache: Path) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("out")
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = build_main(["--from-export", str(fleet[0]), "--base", str(base_pkg), "--trusted-key", str(keys[1]),
                         "--key", str(keys[0]), "--out", str(out), "--quick", "--cache", str(sim_cache)])
    card = json.loads((out / f"{NAME}-2.1.0.card.json").read_text())
    return {"rc": rc, "out": out, "card": card, "stderr": err.getvalue()}


# --- the build ---------------------------------------------------------------------------------------------------


def test_a_candidate_at_least_as_good_is_signed_verifies_and_loads_in_the_agents_scorer(
        built: dict[str, Any], keys: tuple[Path, Path], fleet: tuple[Path, dict[str, Any]]) -> None:
    assert built["rc"] == 0, built["stderr"][-3000:]
    out = built["out"]
    assert sorted(p.name for p in out.iterdir()) == [f"{NAME}-2.1.0.{s}" for s in
                                                     ("card.json", "card.md", "int8.onnx", "onnx", "pkg")]
    pkg = modelpkg.verify_package((out / f"{NAME}-2.1.0.pkg").read_bytes(), modelpkg.load_public_keys([keys[1]]))
    assert (pkg.manifest.name, pkg.manifest.version) == (NAME, "2.1.0")
    assert pkg.model == (out / f"{NAME}-2.1.0.int8.onnx").read_bytes()
    assert json.loads(pkg.card) == built["card"]
    # Every check a vehicle makes before the model may score, with the signals the fleet's vehicles decode.
    from agent.update.verify import check_package

    signals = {str(x) for v in fleet[1]["vehicles"] for arr in v.signal for x in set(arr.tolist())}
    sc = check_package((out / f"{NAME}-2.1.0.pkg").read_bytes(), modelpkg.load_public_keys([keys[1]]),
                       signals).scorer
    base = Scorer.load(SHIPPED).contract
    c = sc.contract
    assert (c.model_name, c.model_version, c.classes, c.features, c.alert, c.required_features) == \
        (NAME, "2.1.0", base.classes, base.features, base.alert, base.required_features)
    assert c.training["base"] == {"name": NAME, "version": "2.0.0"} and c.training["feature_stats"]
    res = sc.score(np.array([base.mean]))  # a window at the base's training means: scored, a finite score
    assert res.scored[0] and 0.0 <= res.scores[0] <= 1.0
    dec = built["card"]["decision"]
    assert dec == {"at_least_as_good": True, "reasons": [], "signed": True, "package": f"{NAME}-2.1.0.pkg",
                   "key_id": modelpkg.key_id(modelpkg.load_private_key(keys[0]).public_key())}
    assert built["card"]["base"]["verified"] is True and built["card"]["base"]["kind"] == "package"
    assert "signed" in built["stderr"]


def test_the_card_says_what_data_was_used_and_why_the_rest_was_left_out(built: dict[str, Any]) -> None:
    d = built["card"]["data"]
    assert d["vehicles"] == [f"harvester-00{i}" for i in range(1, 6)] and d["days"] == [D1, D2]
    # Alerts by their verdict now: the oil pump's latest verdict is `confirmed`; harvester-005's nobody judged.
    assert d["alerts"]["unknown"] >= 1 and d["alerts"]["none"] >= 1 and d["alerts"]["false_alarm"] == 1
    assert d["verdicts_without_alert"] == 1
    assert d["faults_outside_classes"] == {"alternator_failure": {"alerts": 0, "breakdowns": 1}}
    for reason in (UNKNOWN, NO_VERDICT, OUTSIDE, NEAR):
        assert d["left_out"].get(reason, 0) > 0, (reason, d["left_out"])
    rows = {(r["vehicle"], r["day"]): r for r in d["vehicle_days"]}
    assert len(rows) == 10
    assert rows[("harvester-001", D2)]["clean"] and rows[("harvester-001", D2)]["labelled"] == {
        "healthy": rows[("harvester-001", D2)]["windows"]}
    assert not rows[("harvester-003", D2)]["clean"]  # the alternator broke that day
    assert rows[("harvester-002", D1)]["labelled"].get("healthy", 0) > 0  # the false alarm's span
    assert set(rows[("harvester-002", D2)]["labelled"]) == {"oil_pump_wear"}
    assert set(rows[("harvester-004", D1)]["labelled"]) == {"hydraulic_overheat"}
    assert not rows[("harvester-003", D1)]["labelled"]  # the unknown verdict's alert covers the whole session
    md = (built["out"] / f"{NAME}-2.1.0.card.md").read_text()
    for text in ("## Decision", "At least as good", "candidate beside base", "alternator_failure", UNKNOWN,
                 "signature verified", "Real healthy machines"):
        assert text in md, text


def test_held_out_vehicle_days_are_never_trained_on_and_both_models_are_scored_on_the_same_ones(
        built: dict[str, Any]) -> None:
    card = built["card"]
    rows = card["data"]["vehicle_days"]
    held = sorted(f"{r['vehicle']} {r['day']}" for r in rows if r["held_out"])
    assert held == card["held_out"]["vehicle_days"] == sorted(card["evaluation"]["vehicle_days"])
    labelled = {(r["vehicle"], r["day"]): set(r["labelled"]) for r in rows if r["labelled"]}
    assert set(held) == {f"{v} {d}" for v, d in held_out(labelled)}  # the split is the documented rule
    assert held and len(held) < len(labelled)
    train: dict[str, int] = {}
    test: dict[str, int] = {}
    for r in rows:
        for lab, n in r["labelled"].items():
            (test if r["held_out"] else train)[lab] = (test if r["held_out"] else train).get(lab, 0) + n
    assert card["data"]["windows_per_label"] == {"train": dict(sorted(train.items())),
                                                 "held_out": dict(sorted(test.items()))}
    assert card["build"]["fleet_windows"] == sum(train.values())
    ev = card["evaluation"]
    assert ev["windows_per_label"] == dict(sorted(test.items()))
    assert ev["windows_compared"] <= ev["windows"] == sum(r["windows"] for r in rows if r["held_out"])
    for row in ev["faults"].values():
        assert set(row) >= {"windows", "episodes", "candidate", "base"}
        for m in ("candidate", "base"):
            assert row[m]["detection_rate"] is None or 0 <= row[m]["detection_rate"] <= 1


def test_the_real_healthy_traces_are_replayed_through_both(built: dict[str, Any]) -> None:
    real = built["card"]["real_traces"]
    if not (SHARED_DATA / "can").is_dir():
        assert "skipped" in real["candidate"]
        pytest.skip(f"real traces absent: {SHARED_DATA / 'can'}")
    assert real["candidate"]["total"]["alerts"] == 0
    assert len(real["candidate"]["traces"]) == len(real["base"]["traces"]) >= 40
    assert real["candidate"]["total"]["windows"] == real["base"]["total"]["windows"] > 0


def faulty_trace(folder: Path) -> Path:
    """A candump log of a simulated harvester whose coolant is leaking: no healthy machine."""
    from harvester_sim import Harvester, J1939Transmitter

    folder.mkdir(parents=True, exist_ok=True)
    tx = J1939Transmitter(Harvester(seed=7, fault="coolant_leak", fault_onset_s=30, fault_ramp_s=60), seed=7)
    lines = [f"({1.79e9 + m.timestamp:.6f}) can0 {m.arbitration_id:08X}#{bytes(m.data).hex().upper()}"
             for m in tx.frames_until(600.0)]
    p = folder / "leaking_candumpL.log"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_a_candidate_that_alerts_on_the_healthy_traces_is_refused_with_reasons_and_no_package(
        tmp_path: Path, fleet: tuple[Path, dict[str, Any]], base_pkg: Path, keys: tuple[Path, Path],
        sim_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f"{NAME}-2.1.0.pkg"
    stale.write_bytes(b"a package from an earlier build")
    faulty_trace(tmp_path / "traces")
    rc = build_main(["--from-export", str(fleet[0]), "--base", str(base_pkg), "--key", str(keys[0]), "--out",
                     str(out), "--quick", "--cache", str(sim_cache), "--real-traces", str(tmp_path / "traces")])
    err = capsys.readouterr().err
    assert rc == 1, err[-3000:]
    assert not stale.exists()  # no package, not even one left from before
    assert sorted(p.name for p in out.iterdir()) == [f"{NAME}-2.1.0.{s}" for s in
                                                     ("card.json", "card.md", "int8.onnx", "onnx")]
    card = json.loads((out / f"{NAME}-2.1.0.card.json").read_text())
    dec = card["decision"]
    assert dec["at_least_as_good"] is False and dec["signed"] is False and dec["package"] is None
    assert any("leaking_candumpL.log" in r and "real healthy machines" in r for r in dec["reasons"])
    for r in dec["reasons"]:
        assert f"REFUSED: {r}" in err
    # Without --trusted-key the base package was only parsed: the card says so.
    assert card["base"]["verified"] is False
    assert "signature not verified" in (out / f"{NAME}-2.1.0.card.md").read_text()


def test_a_build_that_does_not_sign_leaves_no_package_of_an_earlier_build_beside_its_card(
        tmp_path: Path, built: dict[str, Any], fleet: tuple[Path, dict[str, Any]], base_pkg: Path,
        sim_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same build again without --key, into a folder holding the signed build's files: at least as good, not
    signed, and the earlier package is gone, so the files beside the card are all this build's."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(built["out"], out)
    assert (out / f"{NAME}-2.1.0.pkg").exists()
    rc = build_main(["--from-export", str(fleet[0]), "--base", str(base_pkg), "--out", str(out), "--quick",
                     "--cache", str(sim_cache), "--no-real-traces"])
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    assert not (out / f"{NAME}-2.1.0.pkg").exists() and "is not signed" in err
    dec = json.loads((out / f"{NAME}-2.1.0.card.json").read_text())["decision"]
    assert dec["at_least_as_good"] is True and dec["signed"] is False and dec["package"] is None


# --- bad input: one line, exit status 2, nothing written ----------------------------------------------------------


def run_bad(argv: list[str], out: Path, capsys: pytest.CaptureFixture[str], before_work: bool = True) -> str:
    """Exit status 2 and one error line, nothing written; `before_work`: the error is all stderr says (what can
    be checked before reading the samples is), else it ends the progress lines."""
    rc = build_main([*argv, "--out", str(out), "--quick", "--no-real-traces"])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert [ln for ln in lines if ln.startswith(PROG)] == lines[-1:], err
    assert len(lines) == 1 or not before_work, err
    assert not out.exists() or not any(out.iterdir())
    return lines[-1]


def copy_export(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two minutes of one healthy harvester: labelled (a clean day), enough for the checks that fail early."""
    d = tmp_path_factory.mktemp("tiny") / "export"
    exportkit.write_export(d, [exportkit.simulate_vehicle("harvester-001", [Session(T1, 120, seed=1)], None)])
    return d


def test_bad_export_folders_are_one_line_errors(tmp_path: Path, tiny: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert "no such directory" in run_bad(["--from-export", str(tmp_path / "nowhere")], out, capsys)
    (tmp_path / "file").write_text("x")
    assert "not a directory" in run_bad(["--from-export", str(tmp_path / "file")], out, capsys)
    (tmp_path / "empty").mkdir()
    assert "no manifest.json" in run_bad(["--from-export", str(tmp_path / "empty")], out, capsys)
    cut = copy_export(tiny, tmp_path / "cut")
    m = json.loads((cut / "manifest.json").read_text())
    (cut / "manifest.json").write_text(json.dumps({**m, "complete": False}))
    assert "incomplete" in run_bad(["--from-export", str(cut)], out, capsys)
    (cut / "manifest.json").write_text("{not json")
    assert "not JSON" in run_bad(["--from-export", str(cut)], out, capsys)
    (cut / "manifest.json").write_text("[1, 2]")
    assert "not a JSON object" in run_bad(["--from-export", str(cut)], out, capsys)


def test_an_unreadable_or_malformed_parquet_file_is_named(tmp_path: Path, tiny: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    bad = copy_export(tiny, tmp_path / "bad")
    part = next((bad / "samples").rglob("*.parquet"))
    part.write_bytes(part.read_bytes()[: 200])  # cut short
    assert part.name in run_bad(["--from-export", str(bad)], tmp_path / "o1", capsys)
    wrong = copy_export(tiny, tmp_path / "wrong")
    part = next((wrong / "samples").rglob("*.parquet"))
    pq.write_table(pa.table({"seq": [1], "ts": ["yesterday"], "signal": ["EEC1.EngSpeed"], "value": [1.0]}), part)
    assert "wrong types" in run_bad(["--from-export", str(wrong)], tmp_path / "o2", capsys)
    nocol = copy_export(tiny, tmp_path / "nocol")
    part = next((nocol / "samples").rglob("*.parquet"))
    pq.write_table(pa.table({"seq": [1], "ts": [T1]}), part)
    assert "no column signal, value" in run_bad(["--from-export", str(nocol)], tmp_path / "o3", capsys)


def test_an_export_without_labelled_data_is_refused_as_bad_input(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # The only vehicle-day carries an alert nobody has judged: not one window can be labelled.
    v = exportkit.simulate_vehicle("harvester-001", [Session(T1, 120, seed=1)], None)
    exportkit.false_alarm(v, T1 + 30, T1 + 60, "coolant_leak")
    d = exportkit.write_export(tmp_path / "export", [v])
    line = run_bad(["--from-export", str(d)], tmp_path / "out", capsys, before_work=False)
    assert "no labelled data" in line and "2 alert records, 0 verdicts" in line


def test_a_base_package_that_does_not_verify_or_parse_is_refused(
        tmp_path: Path, tiny: Path, base_pkg: Path, keys: tuple[Path, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    data = bytearray(base_pkg.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of the model
    tampered = tmp_path / "tampered.pkg"
    tampered.write_bytes(bytes(data))
    out = tmp_path / "out"
    args = ["--from-export", str(tiny)]
    assert "(bad_signature)" in run_bad([*args, "--base", str(tampered), "--trusted-key", str(keys[1])], out, capsys)
    # Without a key the hashes still catch it.
    assert "(hash_mismatch)" in run_bad([*args, "--base", str(tampered)], out, capsys)
    _, other_pub, _ = modelkit.signing_key(tmp_path / "other")
    assert "(unknown_key)" in run_bad([*args, "--base", str(base_pkg), "--trusted-key", str(other_pub)], out,
                                      capsys)
    (tmp_path / "junk.pkg").write_bytes(os.urandom(500))
    assert "(bad_magic)" in run_bad([*args, "--base", str(tmp_path / "junk.pkg")], out, capsys)
    assert "no such package file" in run_bad([*args, "--base", str(tmp_path / "none.pkg")], out, capsys)
    # A package whose model is no model at all: signed, but unusable as a base.
    body = modelpkg.build_package(b"not onnx", b"{}", modelpkg.load_private_key(keys[0]), name="x", version="1",
                                  contract={}, min_agent_version="0.1.0")
    (tmp_path / "notonnx.pkg").write_bytes(body)
    assert "cannot be used" in run_bad([*args, "--base", str(tmp_path / "notonnx.pkg")], out, capsys)


def test_bad_keys_versions_and_flags_are_one_line_errors(tmp_path: Path, tiny: Path, base_pkg: Path,
                                                         keys: tuple[Path, Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = ["--from-export", str(tiny)]
    assert "cannot read it" in run_bad([*args, "--key", str(tmp_path / "none.key")], out, capsys)
    (tmp_path / "bad.key").write_text("not a key")
    assert "not a PEM private key" in run_bad([*args, "--key", str(tmp_path / "bad.key")], out, capsys)
    assert "not a PEM private key" in run_bad([*args, "--key", str(keys[1])], out, capsys)  # the public half
    assert "not 1 to 4 dot-separated integers" in run_bad([*args, "--version", "2.x"], out, capsys)
    assert "the base's own version" in run_bad([*args, "--version", "2.0.0"], out, capsys)
    assert "give --base too" in run_bad([*args, "--trusted-key", str(keys[1])], out, capsys)
    rc = build_main([*args, "--out", str(base_pkg), "--quick"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"{PROG}{base_pkg}: not a directory"
    with pytest.raises(SystemExit) as e:
        build_main(["--key", str(keys[0]), "--quick"])
    assert e.value.code == 2 and "go(es) with --from-export" in capsys.readouterr().err


def test_next_version_raises_the_minor_part() -> None:
    assert [next_version(v) for v in ("2.0.0", "2.3.7", "1.2", "2", "0.9.9.9")] == \
        ["2.1.0", "2.4.0", "1.3", "2.1", "0.10.0.0"]


# --- reading the export --------------------------------------------------------------------------------------------


FEATS = (FeatureSpec("rpm", "EEC1.EngSpeed", "mean", 30.0), FeatureSpec("cool", "ET1.EngCoolantTemp", "slope", 30.0))


def test_windows_are_the_vehicles_own_across_files_batches_and_midnight(tmp_path: Path) -> None:
    # A session from 23:55 to 00:05: one engine runs through midnight, as on the vehicle.
    start = day_start(D2) - 300
    v = exportkit.simulate_vehicle("007", [Session(start, 600, seed=3)], None)
    d = exportkit.write_export(tmp_path / "e", [v], chunk_rows=10_000)
    ex = open_export(d)
    assert ex.vehicles == ["007"]  # a name that looks like a number stays a name
    assert [day for _, day in ex.days()] == [D1, D2]
    assert sum(len(ps) for ps in ex.files["007"].values()) > 2  # several files a day, read in seq order
    got = list(vehicle_windows(ex, "007", FEATS, 5.0))
    assert [g.day for g in got] == [D1, D2]
    assert got[0].end.max() < day_start(D2) <= got[1].end.min()
    assert ex.samples_read == sum(len(s) for s in v.seq)
    # What the vehicle computed: its decoded batches, one after another (the kit keeps them as they came).
    eng = FeatureEngine(FEATS, 5.0)
    rows = []
    for ts, sig, value in zip(v.ts, v.signal, v.value, strict=True):
        rows += eng.feed(ts, np.array([eng.signal_index.get(s, -1) for s in sig], np.int32), value)
    assert np.array_equal(np.concatenate([g.end for g in got]), [r.end for r in rows])
    assert np.array_equal(np.vstack([g.x for g in got]), np.stack([r.x for r in rows]), equal_nan=True)


def test_samples_with_a_time_no_calendar_has_are_counted_and_left_out(tmp_path: Path) -> None:
    v = exportkit.simulate_vehicle("harvester-001", [Session(T1, 60, seed=3)], None)
    d = exportkit.write_export(tmp_path / "e", [v])
    # A vehicle's clock gone wild, stored as received: in a file of their own beside the day's.
    bad = [1e300, -5.0, math.nan, math.inf, 2e11]
    pq.write_table(pa.table({"seq": pa.array(range(10**6, 10**6 + 5), pa.int64()), "ts": bad,
                             "signal": ["EEC1.EngSpeed"] * 5, "source": ["can0/00"] * 5, "unit": ["rpm"] * 5,
                             "value": [1000.0] * 5}),
                   d / "samples" / "vehicle=harvester-001" / f"day={D1}" / "part-1000000-1000004.parquet")
    ex = open_export(d)
    windows = list(vehicle_windows(ex, "harvester-001", FEATS, 5.0))
    assert ex.samples_out_of_range == 5 and ex.samples_read == sum(len(s) for s in v.seq) + 5
    assert [w.day for w in windows] == [D1] and T1 < windows[0].end.min() <= windows[0].end.max() <= T1 + 60


def test_an_export_by_cloud_sync_with_times_no_calendar_has_is_read_and_those_rows_counted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What `cloud-sync export` itself writes (not the kit): a vehicle's clock gone wild files its rows under
    `day=out-of-range`; the build counts them and reads the rest."""
    from cloud_sync.cli import main as cloud_main
    from cloud_sync.db_sqlite import CloudDB
    from harvester_common import wire
    from tests.test_export import config, sample_segment, seed

    db = CloudDB(tmp_path / "cloud.sqlite")
    try:
        seed(db)  # among its records an event of the year 1969 and one past 9999
        db.ingest([wire.Batch("f1", "hv-1", 2, [sample_segment(5000, 40, 5e12, 9)])])  # the year ~160,000
        cfg = config(db, tmp_path)
    finally:
        db.close()
    out = tmp_path / "export"
    assert cloud_main(["export", "--config", str(cfg), "--out", str(out)]) == 0
    assert (out / "samples" / "vehicle=hv-1" / "day=out-of-range").is_dir()
    ex = open_export(out)
    assert ex.samples_out_of_range == 40
    assert "out-of-range" not in ex.files["hv-1"] and len(ex.files["hv-1"]) == 4  # DAY0 - 1 to DAY0 + 2
    windows = list(vehicle_windows(ex, "hv-1", FEATS, 5.0))  # reads the rest without tripping on them
    assert ex.samples_read == 900 + 700 + 400 + 40 and all(w.day != "out-of-range" for w in windows)
    capsys.readouterr()


# --- labels, on hand-made timelines ----------------------------------------------------------------------------------


V = "v1"
DAY = D1
T = day_start(DAY) + 10 * 3600  # 10:00 UTC
H = "healthy"


def ends(lo: float, hi: float) -> np.ndarray:
    return np.arange(lo, hi + 0.1, 5.0)


def label_of(tl: Any, end: np.ndarray, running: bool = True, day: str = DAY) -> tuple[list[Any], list[str]]:
    return label_windows(tl, V, day, end, np.full(len(end), running), H)


def alert(aid: str, opened: float, closed: float | None, label: str = "coolant_leak") -> list[AlertRecord]:
    out = [AlertRecord(V, aid, "open", opened, label)]
    if closed is not None:
        out.append(AlertRecord(V, aid, "closed", closed, label, opened - 30))
    return out


def test_a_confirmed_alert_labels_its_span_from_lead_s_before_it_opened_to_its_close() -> None:
    tl = timeline(alert("a", T, T + 300), [VerdictRecord(1, V, "a", "confirmed", "coolant_leak")], [], CLASSES, H)
    e = np.array([T - LEAD_S - 5, T - LEAD_S, T, T + 300, T + 305])
    labels, reasons = label_of(tl, e)
    assert labels == [None, "coolant_leak", "coolant_leak", "coolant_leak", None]
    assert reasons == [NEAR, "", "", "", NEAR]  # the rest of an alert's day is nobody's evidence
    assert not clean_day(tl, V, DAY)


def test_the_latest_verdict_counts_and_confirmed_defaults_to_the_alerts_own_label() -> None:
    recs = alert("a", T, T + 100, "fan_wear") + alert("b", T + 1000, T + 1100, "oil_pump_wear")
    verdicts = [VerdictRecord(1, V, "a", "false_alarm"), VerdictRecord(5, V, "a", "confirmed", ""),
                VerdictRecord(2, V, "b", "confirmed", "oil_pump_wear"), VerdictRecord(3, V, "b", "false_alarm")]
    tl = timeline(recs, verdicts, [], CLASSES, H)
    labels, _ = label_of(tl, np.array([T + 50, T + 1050]))
    assert labels == ["fan_wear", H]  # a's latest is id 5 (confirmed, its own label), b's is id 3
    assert tl.alerts_by_verdict == {"confirmed": 1, "false_alarm": 1}


def test_alerts_without_a_usable_verdict_and_faults_outside_the_classes_are_left_out_with_the_reason() -> None:
    recs = (alert("u", T, T + 100) + alert("n", T + 1000, T + 1100) + alert("x", T + 2000, T + 2100)
            + alert("o", T + 3000, T + 3100))
    verdicts = [VerdictRecord(1, V, "u", "unknown"), VerdictRecord(2, V, "x", "maybe"),
                VerdictRecord(3, V, "o", "confirmed", "belt_slip"), VerdictRecord(4, "v2", "n", "confirmed")]
    tl = timeline(recs, verdicts, [BreakdownRecord(1, V, T + 5000, "alternator_failure")], CLASSES, H)
    labels, reasons = label_of(tl, np.array([T + 50, T + 1050, T + 2050, T + 3050, T + 4000]))
    assert labels == [None] * 5
    assert reasons == [UNKNOWN, NO_VERDICT, BAD_VERDICT, OUTSIDE, OUTSIDE]
    assert tl.outside_classes == {"belt_slip": {"alerts": 1, "breakdowns": 0},
                                  "alternator_failure": {"alerts": 0, "breakdowns": 1}}
    assert tl.verdicts_without_alert == 1  # v2's verdict names an alert of another vehicle


def test_records_with_no_id_or_time_are_counted_not_used(tmp_path: Path, tiny: Path) -> None:
    tl = timeline([AlertRecord(V, "", "open", T), AlertRecord(V, "a", "open", math.nan)], [],
                  [BreakdownRecord(1, V, math.inf, "fan_wear")], CLASSES, H)
    assert tl.unusable == {"alert records": 2, "breakdowns": 1} and not tl.spans
    d = copy_export(tiny, tmp_path / "e")
    pq.write_table(pa.table({"id": pa.array([None, 2], pa.int64()), "vehicle": ["v", "v"], "alert_id": ["a", "b"],
                             "label": ["confirmed"] * 2, "fault": [""] * 2, "note": [""] * 2, "by": ["m"] * 2,
                             "at": [T, T]}), d / "verdicts" / "part-0.parquet")
    ex = open_export(d)
    assert ex.unusable == {"verdicts": 1} and [v.id for v in ex.verdicts] == [2]


def test_a_breakdown_labels_the_horizon_before_it_inclusive_and_nothing_after() -> None:
    at = T + 4000
    tl = timeline([], [], [BreakdownRecord(1, V, at, "oil_pump_wear")], CLASSES, H)
    labels, reasons = label_of(tl, np.array([at - LABEL_HORIZON_S - 5, at - LABEL_HORIZON_S, at, at + 5]))
    assert labels == [None, "oil_pump_wear", "oil_pump_wear", None]
    assert reasons == [NEAR, "", "", NEAR]


def test_clean_days_are_those_clear_of_alert_spans_and_of_breakdowns_within_the_horizon() -> None:
    d0 = day_start(DAY)
    e = ends(d0 + 3600, d0 + 3620)
    near_next = timeline([], [], [BreakdownRecord(1, V, d0 + 86400 + LABEL_HORIZON_S - 1, "fan_wear")], CLASSES, H)
    assert not clean_day(near_next, V, DAY) and label_of(near_next, e)[1] == [NEAR] * len(e)
    far_next = timeline([], [], [BreakdownRecord(1, V, d0 + 86400 + LABEL_HORIZON_S + 1, "fan_wear")], CLASSES, H)
    assert clean_day(far_next, V, DAY) and label_of(far_next, e)[0] == [H] * len(e)
    # An alert of the evening before whose lead reaches past midnight makes today unclean; one of another vehicle
    # does not.
    evening = timeline([AlertRecord(V, "a", "open", d0 + LEAD_S / 2), AlertRecord("v2", "b", "open", d0)], [], [],
                       CLASSES, H)
    assert not clean_day(evening, V, "2026-11-17") and clean_day(evening, "v3", DAY)


def test_overlapping_spans_that_disagree_or_are_ambiguous_are_left_out() -> None:
    recs = alert("f", T, T + 600, "hydraulic_overheat") + alert("u", T + 5000, T + 5100)
    verdicts = [VerdictRecord(1, V, "f", "false_alarm"), VerdictRecord(2, V, "u", "unknown")]
    bds = [BreakdownRecord(1, V, T + 300, "hydraulic_overheat"), BreakdownRecord(2, V, T + 5100, "coolant_leak")]
    tl = timeline(recs, verdicts, bds, CLASSES, H)
    labels, reasons = label_of(tl, np.array([T + 100, T + 400, T + 5050]))
    # A false alarm during the half hour before the same machine broke down: the labels disagree. An unknown
    # verdict inside a breakdown's horizon: ambiguity wins.
    assert labels == [None, H, None] and reasons == [CONFLICT, "", UNKNOWN]


def test_a_fault_window_with_the_engine_stopped_is_left_out_a_healthy_one_is_kept() -> None:
    recs = alert("a", T, T + 100) + alert("f", T + 1000, T + 1100)
    tl = timeline(recs, [VerdictRecord(1, V, "a", "confirmed"), VerdictRecord(2, V, "f", "false_alarm")], [],
                  CLASSES, H)
    labels, reasons = label_of(tl, np.array([T + 50, T + 1050]), running=False)
    assert labels == [None, H] and reasons == [STOPPED, ""]


def test_a_fault_window_not_yet_full_of_data_is_left_out_a_healthy_one_is_kept() -> None:
    recs = alert("a", T, T + 100) + alert("f", T + 1000, T + 1100)
    tl = timeline(recs, [VerdictRecord(1, V, "a", "confirmed"), VerdictRecord(2, V, "f", "false_alarm")], [],
                  CLASSES, H)
    e = np.array([T + 45, T + 50, T + 1050])
    labels, reasons = label_windows(tl, V, DAY, e, np.ones(3, bool), H, np.array([False, True, False]))
    assert labels == [None, "coolant_leak", H] and reasons == [WARMUP, "", ""]


def test_windows_after_a_start_or_a_gap_are_marked_not_full(tmp_path: Path) -> None:
    # Two sessions ten minutes apart: the engine starts its windows afresh after the gap, as the vehicle did.
    v = exportkit.simulate_vehicle("harvester-001", [Session(T1, 120, seed=1), Session(T1 + 720, 120, seed=2)],
                                   None)
    (w,) = vehicle_windows(open_export(exportkit.write_export(tmp_path / "e", [v])), "harvester-001", FEATS, 5.0)
    ts = np.concatenate(v.ts)
    began = np.where(w.end < T1 + 720, ts[ts < T1 + 720].min(), ts[ts >= T1 + 720].min())
    assert np.array_equal(w.full, w.end - 30.0 >= began)
    assert (~w.full).sum() == 12  # six windows after each start


def test_an_alert_still_open_runs_to_the_end_and_one_opened_before_the_export_starts_at_its_window() -> None:
    recs = [AlertRecord(V, "open", "open", T + LEAD_S + 100, "fan_wear"),
            AlertRecord(V, "closed", "closed", T - 100, "coolant_leak", T - 500)]
    tl = timeline(recs, [VerdictRecord(1, V, "open", "confirmed"), VerdictRecord(2, V, "closed", "confirmed")], [],
                  CLASSES, H)
    labels, _ = label_of(tl, np.array([T - 505, T - 500, T - 100, T + 86400 * 3]), day=DAY)
    assert labels == [None, "coolant_leak", "coolant_leak", "fan_wear"]
    assert not clean_day(tl, V, "2026-12-25")


def test_episodes_merge_an_alert_and_the_breakdown_it_warned_of() -> None:
    recs = alert("a", T, T + 600, "fan_wear") + alert("b", T + 5000, T + 5100, "fan_wear")
    tl = timeline(recs, [VerdictRecord(1, V, "a", "confirmed"), VerdictRecord(2, V, "b", "confirmed")],
                  [BreakdownRecord(1, V, T + 900, "fan_wear")], CLASSES, H)
    e = ends(T - 200, T + 5200)
    labels, _ = label_of(tl, e)
    eps = episodes(tl, V, e, labels)
    # The breakdown's half hour reaches back past the data's first window, which starts the first episode.
    assert eps == [Episode("fan_wear", T - 200, T + 900), Episode("fan_wear", T + 5000 - LEAD_S, T + 5100)]
    assert episodes(tl, V, e[e > T + 1000], labels[-int((e > T + 1000).sum()):]) == [eps[1]]


def test_the_held_out_split_is_a_fixed_share_by_hash_with_every_class_seen_twice_tested() -> None:
    days = {(f"v{i:03d}", f"2026-11-{d:02d}"): {H} for i in range(40) for d in range(1, 26)}
    held = held_out(days)
    assert held == held_out(dict(reversed(list(days.items()))))  # order does not matter: the hash decides
    assert 0.25 < len(held) / len(days) < 0.35
    key = hashlib.sha256(b"v000\x002026-11-01").digest()
    assert (("v000", "2026-11-01") in held) == (int.from_bytes(key[:8], "big") / 2**64 < 0.3)
    # Every class found on two or more vehicle-days has one held out; a class found once may stay in training.
    few = {("a", D1): {H, "fan_wear"}, ("b", D1): {H, "fan_wear"}, ("c", D1): {"coolant_leak"}, ("d", D1): {H}}
    got = held_out(few, share=0.0)
    assert any(vd in got for vd in [("a", D1), ("b", D1)]) and ("c", D1) not in got
    assert all(any(vd in got for vd, cs in few.items() if c in cs) for c in (H, "fan_wear"))


# --- the evaluation and the decision ---------------------------------------------------------------------------------


def test_detection_false_alarms_and_roc_auc_with_real_models(tmp_path: Path) -> None:
    quiet = Scorer.load(modelkit.sim_model(tmp_path / "normal.onnx", "1.0.0", "normal", hop_s=5.0))
    loud = Scorer.load(modelkit.sim_model(tmp_path / "loud.onnx", "1.0.1", "alert_all", hop_s=5.0))
    e = ends(T, T + 595)
    x = np.column_stack([np.full(len(e), 1500.0), np.full(len(e), 85.0)])
    labels: list[str | None] = ["healthy"] * 60 + [None] * 20 + ["fault"] * 40
    day = HeldOutDay(V, DAY, e, x, labels, [Episode("fault", float(e[80]), float(e[-1]))])
    ev = compare([day], {"candidate": run_model(quiet, [day]), "base": run_model(loud, [day])}, ("healthy", "fault"),
                 "healthy", 5.0)
    row = ev["faults"]["fault"]
    assert (row["windows"], row["episodes"]) == (40, 1)
    assert row["base"]["detected"] == 1 and row["candidate"]["detected"] == 0
    # The loud model alerts once, at its second window (min_windows 2), on a healthy one: a false alarm.
    assert row["base"]["alerts"] == row["base"]["false_alarms"] == 1 and row["candidate"]["alerts"] == 0
    assert ev["healthy_hours"] == round(60 * 5 / 3600, 4)
    assert row["base"]["false_alarms_per_hour"] == round(1 / (60 * 5 / 3600), 4)
    assert ev["windows_compared"] == 100
    reasons = decide(ev, None)
    assert reasons == ["fault: the candidate detects 0 of 1 held-out episodes, the base 1"]


def table(cand: dict[str, Any], base: dict[str, Any], episodes_: int = 2,
          fa: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    row = {"roc_auc": 0.95, "alerts": 2, "detected": 2, "detection_rate": 1.0, "false_alarms": 0,
           "false_alarms_per_hour": 0.0}
    return {"windows_per_label": {"healthy": 100, "fan_wear": 50},
            "faults": {"fan_wear": {"windows": 50, "episodes": episodes_, "candidate": {**row, **cand},
                                    "base": {**row, **base}}},
            "models": {"candidate": {"false_alarms": fa[0], "false_alarms_per_hour": fa[0] / 2},
                       "base": {"false_alarms": fa[1], "false_alarms_per_hour": fa[1] / 2}}}


def test_the_decision_rule_and_its_edges() -> None:
    assert decide(table({}, {}), None) == []  # equal is at least as good
    assert decide(table({"roc_auc": 0.95 - AUC_TOLERANCE + 0.001}, {}), None) == []
    assert "ROC-AUC" in decide(table({"roc_auc": 0.95 - AUC_TOLERANCE - 0.001}, {}), None)[0]
    assert "detects 1 of 2" in decide(table({"detected": 1}, {}), None)[0]
    assert "false alarms" in decide(table({"false_alarms": 1}, {}), None)[0]
    # A fault without held-out episodes is not judged; with none at all, detection cannot be told: refused.
    assert decide(table({"detected": 0, "roc_auc": 0.5}, {}, episodes_=0), None) == [
        "no fault episode is held out, so whether the candidate detects faults as well as the base cannot be told (a "
        "fault is held out once verdicts or breakdowns show it on two or more vehicle-days)"]
    assert decide(table({"roc_auc": None}, {}), None) == []  # no ROC-AUC where a class is missing
    assert "in all" in decide(table({}, {}, fa=(2, 1)), None)[0]
    assert decide(table({}, {}, fa=(1, 2)), None) == []
    real = {"traces": {"a.log": {"alerts": 0}, "b.log": {"alerts": 2}}}
    assert decide(table({}, {}), real) == ["the candidate alerts on real healthy machines: b.log (2)"]
    assert decide(table({}, {}), {"skipped": "absent"}) == []
    assert "no labelled held-out data" in decide({**table({}, {}), "windows_per_label": {}}, None)[0]


def test_the_real_trace_replay_through_several_models_is_replays_own(tmp_path: Path) -> None:
    from models.realtraces import evaluate_real, evaluate_real_models

    can = SHARED_DATA / "can" / "johndeere_5055e"
    if not can.is_dir():
        pytest.skip(f"real traces absent: {can}")
    d = tmp_path / "traces"
    d.mkdir()
    for name in ("idle10sec_candumpL.log", "start1_candumpL.log"):
        (d / name).symlink_to(can / name)
    (d / "garbage.log").write_bytes(b"\x00\x01 not a log")
    model = SHIPPED.read_bytes()
    both = evaluate_real_models(d, {"a": model, "b": model})
    assert both["a"] == both["b"]
    (d / "garbage.log").unlink()
    assert evaluate_real_models(d, {"a": model})["a"] == evaluate_real(d, SHIPPED)
    assert any("garbage.log" in s for s in both["a"]["left_out"])


def test_exportkit_writes_the_documented_layout(fleet: tuple[Path, dict[str, Any]]) -> None:
    d, info = fleet
    m = json.loads((d / "manifest.json").read_text())
    assert m["complete"] is True and m["rows"]["verdicts"] == len(info["verdicts"])
    samples = pq.read_table(d / "samples" / "vehicle=harvester-001" / f"day={D1}")
    assert samples.schema.names == ["seq", "ts", "signal", "source", "unit", "value"]
    assert pa.types.is_dictionary(samples.schema.field("signal").type)
    for p in (d / "samples").rglob("*.parquet"):
        seq = pq.read_table(p, columns=["seq"]).column("seq").to_numpy()
        lo, hi = p.stem.removeprefix("part-").split("-")
        assert (int(lo), int(hi)) == (seq.min(), seq.max()) and np.all(np.diff(seq) > 0)
    alerts = pq.read_table(d / "alerts").to_pylist()
    fa = [a for a in alerts if a["alert_id"] == info["false_alarm"]]
    assert [a["state"] for a in fa] == ["open", "closed"] and json.loads(fa[0]["record"])["label"] == \
        "hydraulic_overheat"
    assert pq.read_table(d / "verdicts").schema.names == ["id", "vehicle", "alert_id", "label", "fault", "note",
                                                          "by", "at"]
    assert pq.read_table(d / "breakdowns").num_rows == 2
