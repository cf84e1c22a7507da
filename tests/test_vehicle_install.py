"""A vehicle set up as docs/deploy.md says: the wheel built from this tree, installed into a fresh venv with its
dependencies from the package registry, the unit's ExecStart run from that venv with `--check-config` against the
shipped example config, and `systemd-analyze verify` on the unit pointing at that venv.

The example config names /etc and /var/lib files that exist only on a vehicle: the check runs with
`--allow-absent`, which reports them as not present and checks everything else (docs/deploy.md)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent import __version__
from tests.vehicle import (
    EXAMPLE_CONFIG,
    INSTALLED_CONFIG,
    INSTALLED_EXE,
    UNIT,
    VEHICLE_PACKAGES,
    VehicleVenv,
    build_vehicle_venv,
    exec_start,
    systemd_analyze,
    top_level_packages,
    vehicle_env,
    write_unit,
)

pytestmark = pytest.mark.slow

# The files the example config names that a CI machine does not have; each must be reported, none checked.
EXAMPLE_ABSENT = [
    "/etc/harvester-agent/keys",
    "/etc/harvester-agent/tls/ca.pem",
    "/etc/harvester-agent/tls/vehicle.key",
    "/etc/harvester-agent/tls/vehicle.pem",
    "/var/lib/harvester-agent/models/current.onnx",
]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> VehicleVenv:
    return build_vehicle_venv(tmp_path_factory.getbasetemp() / "vehicle")


def test_the_wheel_ships_the_vehicle_packages_only(venv: VehicleVenv) -> None:
    tops: set[str] = set()
    for wheel in venv.wheels:
        tops |= top_level_packages(wheel)
    assert tops == VEHICLE_PACKAGES
    r = subprocess.run([str(venv.exe("harvester-agent")), "--version"], capture_output=True, text=True, timeout=60,
                       env=vehicle_env())
    assert r.returncode == 0 and r.stdout.strip() == f"harvester-agent {__version__}"
    # The agent comes from the venv, not from this checkout.
    where = subprocess.run([str(venv.exe("python")), "-c", "import agent; print(agent.__file__)"],
                           capture_output=True, text=True, timeout=60, cwd=venv.root, env=vehicle_env()).stdout.strip()
    assert where.startswith(str(venv.root)), where
    # The simulator and the demo are not on a vehicle; their commands still parse and say where they come from.
    for command, dist in (("demo", "harvester-demo"), ("simulate", "harvester-sim")):
        r = subprocess.run([str(venv.exe("harvester-agent")), command, "--config", "x.toml"], capture_output=True,
                           text=True, timeout=60, cwd=venv.root, env=vehicle_env())
        assert r.returncode == 2, r.stdout + r.stderr
        assert f"comes with the {dist} package, which is not installed here" in r.stderr
        assert "Traceback" not in r.stderr


def test_the_units_exec_start_checks_the_example_config(venv: VehicleVenv) -> None:
    argv = exec_start()
    assert argv[0] == INSTALLED_EXE
    # The unit reads the config where docs/deploy.md installs the example; here the example itself is read.
    i = argv.index("--config")
    assert argv[i + 1] == INSTALLED_CONFIG
    cmd = [str(venv.exe("harvester-agent")), *argv[1:i + 1], str(EXAMPLE_CONFIG), *argv[i + 2:],
           "--check-config", "--allow-absent"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=venv.root, env=vehicle_env())
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    absent = sorted(line.split()[2].rstrip(":") for line in lines if line.startswith("absent"))
    assert absent == EXAMPLE_ABSENT
    assert not [line for line in lines if line.startswith("error")]
    # The J1939 definitions are package data: a wheel without them would fail here.
    assert any(line.startswith("ok     dbc      bus can0: built-in J1939 definitions") for line in lines), r.stdout
    assert lines[-1].startswith("config OK; 5 file(s) it names are not present on this machine")

    # Without --allow-absent the same check refuses: on a vehicle, those files must be there.
    strict = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=120, cwd=venv.root, env=vehicle_env())
    assert strict.returncode == 2 and strict.stderr.startswith("harvester-agent: error: check failed: model: ")


def test_systemd_analyze_verify_accepts_the_unit_and_the_broker_dropin(venv: VehicleVenv, tmp_path: Path) -> None:
    if systemd_analyze() is None:
        pytest.skip("systemd-analyze is not installed (Debian: systemd); the unit cannot be verified here")
    unit = write_unit(tmp_path, venv.exe("harvester-agent"), dropin=True)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
    # verify warns (exit 0) about unknown keys and bad values, in the unit and in its drop-in, so any output is a
    # finding; a missing or non-executable ExecStart fails it. User= need not exist here: verify does not resolve it.
    assert (r.returncode, r.stdout + r.stderr) == (0, "")

    (tmp_path / f"{UNIT.name}.d" / "broker.conf").write_text("[Service]\nIPAddressAllow=not-an-address\n")
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert "broker.conf" in r.stderr, "verify must read the drop-in beside the unit"

    unit = write_unit(tmp_path, tmp_path / "no-such-venv" / "harvester-agent")
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "is not executable" in r.stderr
