"""`harvester-agent run --check-config`: the config read by `run`'s own loader, the files it names loaded the way the
agent loads them (DBC, model and its contract, TLS), one line per finding, exit 0 or 2 with a one-line reason, and
nothing started. Real files throughout: the repository's model, a throwaway PKI, hand-written DBC and TOML files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from agent.contract import FeatureSpec
from harvester_common.modelpkg import generate_keypair
from harvester_testing.onnx_models import linear_softmax_model, make_contract
from harvester_testing.tls import Pki

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "harvester-anomaly.int8.onnx"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


def _check(cfg: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return _run("run", "--config", str(cfg), "--check-config", *extra)


def _write(tmp_path: Path, *, model: Path = MODEL, tls: str = "", dbc: str = "[]", keys: str = "") -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[vehicle]
fleet = "f1"
id = "v1"

[[can]]
name = "can0"
interface = "socketcan"
channel = "can0"
dbc = {dbc}

[[serial]]
name = "gps"
port = "{tmp_path / 'ttyGPS'}"

[model]
path = "{model}"
{keys}

[store]
path = "{tmp_path / 'state' / 'buffer.sqlite'}"

[mqtt]
host = "127.0.0.1"
port = 8883
{tls or 'tls = false'}
""")
    return cfg


def _levels(out: str) -> list[tuple[str, str]]:
    return [(line.split()[0], line.split()[1]) for line in out.splitlines()[:-1]]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def _tls(pki: Pki, key: Path | None = None) -> str:
    veh = pki.issue("v1")
    return (f'tls = true\nca_file = "{pki.ca}"\ncert_file = "{veh.cert}"\n'
            f'key_file = "{key or veh.key}"')


def test_a_complete_config_passes_and_starts_nothing(tmp_path: Path, pki: Pki) -> None:
    dbc = tmp_path / "extra.dbc"
    dbc.write_text((REPO / "agent" / "data" / "harvester.dbc").read_text())
    cfg = _write(tmp_path, tls=_tls(pki), dbc=f'["{dbc}"]')
    r = _check(cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == "config OK: the agent would start with everything this config asks for"
    levels = _levels(r.stdout)
    assert ("ok", "config") in levels and ("ok", "dbc") in levels and ("ok", "model") in levels
    assert ("ok", "tls") in levels and not any(lv in ("error", "absent") for lv, _ in levels)
    assert "+ 1 file(s)" in r.stdout and "harvester-anomaly" in r.stdout
    # The serial device is missing here: said, but the agent would wait for it, so it does not fail the check.
    assert any(line.startswith("info   serial") and "not present on this machine" in line for line in lines)
    assert not (tmp_path / "state").exists(), "the check must not create the store"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("this is = = not toml", "not valid TOML"),
        ('[mqtt]\nhots = "x"\n', "mqtt.hots: Extra inputs are not permitted"),
        ('[mqtt]\nport = "x"\n', "mqtt.port"),
        ('[model]\nthreads = 0\n', "model.threads"),
    ],
)
def test_an_invalid_config_fails_with_the_same_line_as_run(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    checked = _check(cfg)
    ran = _run("run", "--config", str(cfg))
    assert checked.returncode == ran.returncode == 2
    assert checked.stderr == ran.stderr, "the check must read the config exactly as run does"
    assert checked.stderr.startswith("harvester-agent: error: ") and needle in checked.stderr
    assert len(checked.stderr.splitlines()) == 1 and checked.stdout == ""


def test_missing_files_fail_unless_allowed_absent(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    cfg = _write(tmp_path, model=gone / "model.onnx", dbc=f'["{gone / "x.dbc"}"]',
                 tls=f'tls = true\nca_file = "{gone / "ca.pem"}"\ncert_file = "{gone / "v.pem"}"\n'
                     f'key_file = "{gone / "v.key"}"')
    r = _check(cfg)
    assert r.returncode == 2
    assert r.stderr.startswith("harvester-agent: error: check failed: dbc: ") and len(r.stderr.splitlines()) == 1
    assert "(4 more error(s) above)" in r.stderr
    assert sorted(s for lv, s in _levels(r.stdout + "\n") if lv == "error") == ["dbc", "model", "tls", "tls", "tls"]

    r = _check(cfg, "--allow-absent")
    assert r.returncode == 0, r.stderr
    absent = [line for line in r.stdout.splitlines() if line.startswith("absent")]
    assert len(absent) == 5 and all("not present on this machine (not checked)" in a for a in absent)
    assert r.stdout.splitlines()[-1].startswith("config OK; 5 file(s) it names are not present on this machine")


def test_files_that_exist_are_checked_even_when_absent_ones_are_allowed(tmp_path: Path, pki: Pki) -> None:
    other = pki.issue("someone-else")
    cfg = _write(tmp_path, tls=_tls(pki, key=other.key))  # a key that is not the certificate's
    r = _check(cfg, "--allow-absent")
    assert r.returncode == 2
    assert "tls: mqtt: TLS files do not load" in r.stderr and "KEY_VALUES_MISMATCH" in r.stderr

    bad_dbc = tmp_path / "bad.dbc"
    bad_dbc.write_text("BO_ this is not a dbc\n")
    r = _check(_write(tmp_path, dbc=f'["{bad_dbc}"]'), "--allow-absent")
    assert r.returncode == 2 and "check failed: dbc: bus can0: " in r.stderr and str(bad_dbc) in r.stderr



def test_a_model_fed_by_the_serial_gps_is_checked_against_it_as_run_does(tmp_path: Path) -> None:
    # `run` checks a model against every source's signals, the GPS's too; the check must say what `run` would.
    contract = make_contract([FeatureSpec("f0", "GPS.SpeedKmh", "mean", 10.0)])
    model = linear_softmax_model(tmp_path / "m.onnx", contract, np.ones((1, 2)), np.zeros(2))
    r = _check(_write(tmp_path, model=model))
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("ok", "model") in _levels(r.stdout)


def test_two_sources_of_one_name_fail_the_check_as_they_fail_run(tmp_path: Path) -> None:
    cfg = _write(tmp_path)
    cfg.write_text(cfg.read_text().replace('name = "gps"', 'name = "can0"'))
    checked, ran = _check(cfg), _run("run", "--config", str(cfg))
    assert checked.returncode == ran.returncode == 2
    assert "used twice" in checked.stderr and checked.stderr == ran.stderr

def test_a_model_whose_contract_this_config_cannot_feed_fails(tmp_path: Path) -> None:
    contract = make_contract([FeatureSpec("f0", "NoSuchMessage.NoSuchSignal", "mean", 10.0)])
    model = linear_softmax_model(tmp_path / "m.onnx", contract, np.ones((1, 2)), np.zeros(2))
    r = _check(_write(tmp_path, model=model))
    assert r.returncode == 2
    assert "check failed: model: " in r.stderr and "NoSuchMessage.NoSuchSignal" in r.stderr
    assert "the agent would start without scoring" in r.stderr

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    r = _check(_write(tmp_path, model=broken), "--allow-absent")
    assert r.returncode == 2 and "onnxruntime cannot load it" in r.stderr


def test_the_shipped_vehicle_config_is_valid_with_its_files_absent() -> None:
    cfg = REPO / "systemd" / "harvester-agent.toml"
    r = _check(cfg, "--allow-absent")
    assert r.returncode == 0, r.stderr
    absent = sorted(line.split()[2].rstrip(":") for line in r.stdout.splitlines() if line.startswith("absent"))
    assert absent == ["/etc/harvester-agent/keys", "/etc/harvester-agent/tls/ca.pem",
                      "/etc/harvester-agent/tls/vehicle.key", "/etc/harvester-agent/tls/vehicle.pem",
                      "/var/lib/harvester-agent/models/current.onnx"]


def test_run_itself_refuses_tls_files_that_do_not_load_in_one_line(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    cfg = _write(tmp_path, tls=f'tls = true\nca_file = "{gone / "ca.pem"}"')
    r = _run("run", "--config", str(cfg))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[-1] == ("harvester-agent: error: mqtt: TLS files do not load "
                                         f"(ca_file {gone / 'ca.pem'}): No such file or directory")


def test_allow_absent_without_check_config_is_refused(tmp_path: Path) -> None:
    r = _run("run", "--config", str(_write(tmp_path)), "--allow-absent")
    assert r.returncode == 2
    assert r.stderr.strip() == "harvester-agent: error: --allow-absent goes with --check-config only"
    assert not (tmp_path / "state").exists()


# --- [model] trusted_keys ------------------------------------------------------------------------------------------


def ec_key(path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pub = ec.generate_private_key(ec.SECP256R1()).public_key()
    path.write_bytes(pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def _keys_line(paths: list[Path]) -> str:
    return "trusted_keys = [" + ", ".join(f'"{p}"' for p in paths) + "]"


def _findings(out: str, subject: str) -> list[tuple[str, str]]:
    """(level, text) of each finding about `subject`."""
    rows = [line.split(None, 2) for line in out.splitlines()[:-1]]
    return [(r[0], r[2]) for r in rows if len(r) == 3 and r[1] == subject]


def test_trusted_keys_are_loaded_and_listed_by_key_id(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    ids = [generate_keypair(folder)[2] for _ in range(2)]
    for key in folder.glob("*.key"):
        key.unlink()  # a vehicle holds public keys only; the private ones are the signer's
    _, single, single_id = generate_keypair(tmp_path / "other")
    r = _check(_write(tmp_path, keys=_keys_line([folder, single])))
    assert r.returncode == 0, r.stdout + r.stderr
    keys = _findings(r.stdout, "keys")
    assert keys == [("ok", f"{folder}: 2 Ed25519 public key(s): {', '.join(sorted(ids))}"),
                    ("ok", f"{single}: 1 Ed25519 public key(s): {single_id}")]


def test_a_bad_key_file_fails_the_check_and_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    _, good, _ = generate_keypair(folder)
    (folder / "zz-garbled.pub").write_text(good.read_text().replace("MCow", "xCow"))
    # An EC key is a public key, but not one packages can be signed with.
    ec = ec_key(tmp_path / "ec.pub")
    private = generate_keypair(tmp_path / "private")[0]  # a private key where a public one belongs
    r = _check(_write(tmp_path, keys=_keys_line([folder, ec, private])))
    assert r.returncode == 2
    errors = [text for level, text in _findings(r.stdout, "keys") if level == "error"]
    assert len(errors) == 3 and all(e.endswith(" (no model package would be accepted)") for e in errors)
    assert errors[0].startswith(f"{folder / 'zz-garbled.pub'}: not a PEM public key")
    assert errors[1].startswith(f"{ec}: a ") and "not an Ed25519 public key" in errors[1]
    assert errors[2].startswith(f"{private}: not a PEM public key")
    assert r.stderr.startswith(f"harvester-agent: error: check failed: keys: {folder / 'zz-garbled.pub'}: ")
    assert "(2 more error(s) above)" in r.stderr and len(r.stderr.splitlines()) == 1


def test_no_trusted_key_is_a_note_not_an_error(tmp_path: Path) -> None:
    r = _check(_write(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert _findings(r.stdout, "keys") == [("info", "[model] trusted_keys is empty: model packages are refused until "
                                                    'a key is trusted (docs/models.md, "Signed packages")')]
    empty = tmp_path / "keys"
    empty.mkdir()
    (empty / "README").write_text("public keys go here as KEY_ID.pub\n")  # not a *.pub: not read
    r = _check(_write(tmp_path, keys=_keys_line([empty])))
    assert r.returncode == 0, r.stdout + r.stderr
    assert [lv for lv, _ in _findings(r.stdout, "keys")] == ["info", "info"]
    assert "a directory with no *.pub file: trusts no key" in r.stdout
    assert "no key is trusted: model packages are refused until a key is trusted" in r.stdout


def test_a_missing_key_path_fails_unless_allowed_absent(tmp_path: Path) -> None:
    gone = tmp_path / "gone" / "keys"
    cfg = _write(tmp_path, keys=_keys_line([gone]))
    r = _check(cfg)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"harvester-agent: error: check failed: keys: {gone}: not present on this machine "
                                "(no model package would be accepted)")
    r = _check(cfg, "--allow-absent")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _findings(r.stdout, "keys") == [("absent", f"{gone}: not present on this machine (not checked)")]


def test_keys_the_agents_user_could_replace_are_said(tmp_path: Path) -> None:
    """Run as a user other than root (as the service's user on a vehicle): a key folder that user may write is an
    `info` line (the check still passes: a lab may do this), one owned by root and read-only to it is not."""
    if os.geteuid() != 0:
        as_user: list[str] = []
        uid = os.geteuid()
    elif subprocess.run(["setpriv", "--version"], capture_output=True).returncode == 0:
        uid = 4242
        as_user = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
    else:
        pytest.skip("running as root without setpriv: cannot run the check as another user")
    # Outside pytest's own temp folder, which is its owner's alone.
    base = Path(tempfile.mkdtemp(prefix="check-keys-"))
    try:
        base.chmod(0o755)
        owned, locked = base / "owned", base / "locked"
        for folder in (owned, locked):
            generate_keypair(folder)[0].unlink()
            folder.chmod(0o755)
            for f in folder.iterdir():
                f.chmod(0o644)
        if as_user:
            for f in [owned, *owned.iterdir()]:
                os.chown(f, uid, uid)
        else:
            locked.chmod(0o555)
            for f in locked.iterdir():
                f.chmod(0o444)
        cfg = _write(base, keys=_keys_line([owned, locked]))
        r = subprocess.run([*as_user, sys.executable, "-m", "agent", "run", "--config", str(cfg), "--check-config"],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
        assert r.returncode == 0, r.stdout + r.stderr
        info = [text for level, text in _findings(r.stdout, "keys") if level == "info"]
        assert len(info) == 1 and info[0].startswith(f"{owned}, {next(owned.glob('*.pub'))}: writable by this user "
                                                     f"(uid {uid}): ")
        assert str(locked) not in info[0]
    finally:
        for folder in base.rglob("*"):
            if folder.is_dir():
                folder.chmod(0o755)
        shutil.rmtree(base)
