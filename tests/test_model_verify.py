"""The vehicle's checks of a model package (agent/update/verify.py) and `harvester-agent model verify`: real keys,
the shipped model, tiny models built with onnx, configs whose decoders do or do not produce a model's signals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import __version__
from agent.contract import FeatureSpec, contract_to_dict
from agent.update.verify import Verified, agent_version, check_package
from harvester_common import modelpkg as mp
from harvester_common import onnxmeta
from harvester_testing.onnx_models import linear_softmax_model, make_contract

REPO = Path(__file__).resolve().parents[1]
MODEL_PATH = REPO / "models" / "harvester-anomaly.int8.onnx"
MODEL = MODEL_PATH.read_bytes()
CARD = (REPO / "models" / "harvester-anomaly.card.json").read_bytes()
CONTRACT = onnxmeta.read_contract(MODEL)
KEY = Ed25519PrivateKey.generate()
TRUSTED = {mp.key_id(KEY.public_key()): KEY.public_key()}


def shipped_signals() -> set[str]:
    from agent.contract import parse_contract

    return set(parse_contract({onnxmeta.CONTRACT_KEY: json.dumps(CONTRACT)}).signals)


def package(model: bytes = MODEL, contract: dict[str, Any] | None = None, key: Ed25519PrivateKey = KEY,
            **over: Any) -> bytes:
    c = CONTRACT if contract is None else contract
    named = c.get("model", {})
    kw: dict[str, Any] = {"name": named.get("name", "m"), "version": named.get("version", "1"), "contract": c,
                          "min_agent_version": "0.1.0"}
    kw.update(over)
    return mp.build_package(model, b"{}", key, **kw)


def tiny(tmp_path: Path, signals: tuple[str, ...] = ("EEC1.EngSpeed",), *, raw_contract: str | None = None,
         no_contract: bool = False, inputs: int | None = None, **over: Any) -> tuple[bytes, dict[str, Any]]:
    """A tiny model from harvester_testing with one feature per signal, and its contract as a dict."""
    feats = [FeatureSpec(f"f{i}", s, "mean", 10.0) for i, s in enumerate(signals)]
    contract = make_contract(feats, **over)
    n = len(feats) if inputs is None else inputs
    path = linear_softmax_model(tmp_path / "tiny.onnx", None if no_contract else contract, np.ones((n, 2)),
                                np.zeros(2), raw_contract=raw_contract)
    return path.read_bytes(), json.loads(json.dumps(contract_to_dict(contract)))


def refusal(data: bytes, signals: set[str] | None = None, **kw: Any) -> mp.PackageError:
    with pytest.raises(mp.PackageError) as e:
        check_package(data, TRUSTED, shipped_signals() if signals is None else signals, **kw)
    assert e.value.code in mp.REFUSALS and "\n" not in e.value.detail
    return e.value


def test_the_shipped_model_is_accepted_and_scores() -> None:
    v = check_package(package(), TRUSTED, shipped_signals())
    assert isinstance(v, Verified)
    assert v.package.manifest.name == "harvester-anomaly" and v.scorer.contract.model_version == "2.0.0"
    rows = np.full((2, len(v.scorer.contract.features)), np.nan)
    rows[:, :] = v.scorer.contract.mean
    out = v.scorer.score(rows)
    assert out.scored.all() and np.isfinite(out.scores).all()


def test_package_checks_come_first() -> None:
    data = bytearray(package())
    data[-1] ^= 1
    assert refusal(bytes(data)).code == "bad_signature"
    assert refusal(package(key=Ed25519PrivateKey.generate())).code == "unknown_key"
    with pytest.raises(mp.PackageError, match="no key is trusted"):
        check_package(package(), {}, shipped_signals())


def test_agent_too_old() -> None:
    e = refusal(package(min_agent_version="99.0"))
    assert e.code == "agent_too_old" and "99.0" in e.detail and __version__ in e.detail
    assert check_package(package(min_agent_version="0.1"), TRUSTED, shipped_signals(), version="0.1.0")
    assert refusal(package(min_agent_version="0.1.0"), version="0.0.9").code == "agent_too_old"
    assert agent_version("0.2.0.dev1") == "0.2.0" and agent_version("dev") == "0"


def test_a_model_that_is_not_onnx_is_unloadable() -> None:
    e = refusal(package(model=b"this is not an ONNX model"))
    assert e.code == "model_unloadable" and "onnxruntime cannot load it" in e.detail


def test_the_embedded_contract_must_be_the_manifests(tmp_path: Path) -> None:
    model, contract = tiny(tmp_path)
    signals = {"EEC1.EngSpeed"}
    assert check_package(package(model, contract), TRUSTED, signals).scorer.contract.model_name == "test-model"
    changed = {**contract, "alert": {**contract["alert"], "threshold": 0.5}}
    e = refusal(package(model, changed), signals)
    assert e.code == "contract_mismatch" and "not the manifest's" in e.detail
    # JSON value for JSON value: 5 is not 5.0.
    assert refusal(package(model, {**contract, "hop_s": 5}), signals).code == "contract_mismatch"
    # The same contract under another name or version in the manifest.
    assert refusal(package(model, contract, version="0.0.2"), signals).code == "contract_mismatch"
    bare, _ = tiny(tmp_path, no_contract=True)
    e = refusal(package(bare, contract), signals)
    assert e.code == "contract_mismatch" and "no 'harvester.contract' metadata" in e.detail
    garbled, _ = tiny(tmp_path, raw_contract="{not json")
    assert refusal(package(garbled, contract), signals).code == "contract_mismatch"


def test_a_contract_this_agent_cannot_use_is_incompatible(tmp_path: Path) -> None:
    _, contract = tiny(tmp_path)
    future = {**contract, "contract_version": 2}
    model, _ = tiny(tmp_path, raw_contract=json.dumps(future))
    e = refusal(package(model, future), {"EEC1.EngSpeed"})
    assert e.code == "incompatible_contract" and "unsupported contract version" in e.detail


def test_a_model_that_does_not_take_its_contracts_input_is_unloadable(tmp_path: Path) -> None:
    model, contract = tiny(tmp_path, ("EEC1.EngSpeed", "ET1.EngCoolantTemp"), inputs=3)
    e = refusal(package(model, contract), {"EEC1.EngSpeed", "ET1.EngCoolantTemp"})
    assert e.code == "model_unloadable" and "does not take what its contract says" in e.detail


def test_signals_this_vehicle_does_not_decode_are_incompatible(tmp_path: Path) -> None:
    model, contract = tiny(tmp_path, ("EEC1.EngSpeed", "LIDAR.Range", "VIB.Rms"))
    e = refusal(package(model, contract), {"EEC1.EngSpeed", "VIB.Rms"})
    assert e.code == "incompatible_contract" and "LIDAR.Range" in e.detail and "VIB.Rms" not in e.detail


# --- `harvester-agent model verify`, as an engineer or an installer runs it ---


def agent(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def write_config(tmp_path: Path, trusted: str = '["keys"]', serial: bool = True) -> Path:
    cfg = tmp_path / "agent.toml"
    gps = f'[[serial]]\nname = "gps"\nport = "{tmp_path / "ttyGPS"}"\n' if serial else ""
    cfg.write_text(f'[[can]]\nname = "can0"\ninterface = "virtual"\nchannel = "verify"\n{gps}'
                   f'[model]\ntrusted_keys = {trusted}\n')
    return cfg


def subdir(parent: Path, name: str) -> Path:
    (parent / name).mkdir()
    return parent / name


@pytest.fixture
def keyed(tmp_path: Path) -> tuple[Path, Ed25519PrivateKey]:
    key_path, _, _ = mp.generate_keypair(tmp_path / "keys")
    return write_config(tmp_path), mp.load_private_key(key_path)


def test_verify_accepts_a_package_the_vehicle_would_run(tmp_path: Path,
                                                        keyed: tuple[Path, Ed25519PrivateKey]) -> None:
    cfg, key = keyed
    pkg = tmp_path / "m.pkg"
    pkg.write_bytes(package(key=key))
    sha, kid = mp.package_sha256(pkg.read_bytes()), mp.key_id(key.public_key())
    r = agent("model", "verify", str(pkg), "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"ok: harvester-anomaly 2.0.0 (package {sha}, key {kid})"
    r = agent("model", "verify", str(pkg), "--config", str(cfg), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {k: out[k] for k in ("ok", "reason", "name", "version", "package_sha256", "key_id",
                                "min_agent_version")} == {
        "ok": True, "reason": "", "name": "harvester-anomaly", "version": "2.0.0", "package_sha256": sha,
        "key_id": kid, "min_agent_version": "0.1.0"}
    assert "signals this config decodes" in out["detail"]


def test_verify_refusals_exit_1_with_the_reason(tmp_path: Path, keyed: tuple[Path, Ed25519PrivateKey]) -> None:
    cfg, key = keyed
    stranger = tmp_path / "stranger.pkg"
    stranger.write_bytes(package(key=Ed25519PrivateKey.generate()))
    r = agent("model", "verify", str(stranger), "--config", str(cfg))
    assert r.returncode == 1, r.stderr
    assert r.stdout.startswith("refused (unknown_key): signed with key ") and len(r.stdout.splitlines()) == 1

    # A model on GPS speed: accepted where the config has a GPS receiver, refused where it has none (the signals
    # are the config's decoders', as `run` builds them).
    model, contract = tiny(tmp_path, ("EEC1.EngSpeed", "GPS.SpeedKmh"))
    gps = tmp_path / "gps.pkg"
    gps.write_bytes(package(model, contract, key=key))
    assert agent("model", "verify", str(gps), "--config", str(cfg)).returncode == 0
    no_gps = write_config(subdir(tmp_path, "nogps"), trusted=f'["{tmp_path / "keys"}"]', serial=False)
    r = agent("model", "verify", str(gps), "--config", str(no_gps), "--json")
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is False and out["reason"] == "incompatible_contract"
    assert "GPS.SpeedKmh" in out["detail"] and "EEC1" not in out["detail"]
    assert (out["name"], out["version"], out["key_id"]) == ("test-model", "0.0.1", mp.key_id(key.public_key()))

    too_new = tmp_path / "new.pkg"
    too_new.write_bytes(package(key=key, min_agent_version="99"))
    r = agent("model", "verify", str(too_new), "--config", str(cfg))
    assert r.returncode == 1 and r.stdout.startswith("refused (agent_too_old): ")

    junk = tmp_path / "junk.pkg"
    junk.write_bytes(b"PK\x03\x04 a zip file")
    r = agent("model", "verify", str(junk), "--config", str(cfg), "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 1 and out["reason"] == "bad_magic" and out["name"] is None
    assert out["package_sha256"] == mp.package_sha256(junk.read_bytes())

    nobody = write_config(subdir(tmp_path, "nokeys"), trusted="[]")
    ok = tmp_path / "ok.pkg"
    ok.write_bytes(package(key=key))
    assert agent("model", "verify", str(ok), "--config", str(cfg)).returncode == 0
    r = agent("model", "verify", str(ok), "--config", str(nobody))
    assert r.returncode == 1 and "no key is trusted" in r.stdout


def test_verify_cannot_judge_exit_2(tmp_path: Path, keyed: tuple[Path, Ed25519PrivateKey]) -> None:
    cfg, key = keyed
    pkg = tmp_path / "m.pkg"
    pkg.write_bytes(package(key=key))
    bad_key = tmp_path / "bad"
    bad_key.mkdir()
    (bad_key / "x.pub").write_text("not a key")
    cases = [
        (["model", "verify", str(tmp_path / "absent.pkg"), "--config", str(cfg)], "absent.pkg: cannot read"),
        (["model", "verify", str(pkg), "--config", str(tmp_path / "absent.toml")], "no such file"),
        (["model", "verify", str(pkg), "--config", str(write_config(bad_key, trusted='["."]'))],
         "trusted_keys: " + str(bad_key / "x.pub")),
        (["model", "verify", str(pkg), "--config", str(write_config(subdir(tmp_path, "k2"), trusted='["gone"]'))],
         "no such key file"),
    ]
    for args, match in cases:
        r = agent(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith("harvester-agent: error: ") and match in r.stderr, r.stderr
    r = agent("model", "--help")
    assert r.returncode == 0 and "verify" in r.stdout
