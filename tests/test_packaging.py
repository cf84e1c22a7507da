"""The repository's shape: one distribution per role, the agent's plugged-in commands, where the shared data is.

The import rules themselves are import-linter contracts (pyproject.toml, `lint-imports` in CI); a vehicle's install
(the wheel alone, in a fresh venv) is tested in test_vehicle_install.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from harvester_testing.data import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
ROLE_DIRS = ["harvester_common", "cloud_sync", "models", "harvester_sim", "harvester_testing", "harvester_demo"]


def test_the_shared_data_is_looked_for_beside_the_repository() -> None:
    # A wrong default would turn every real-data test into a skip, and a green run would prove nothing.
    if "HARVESTER_SHARED_DATA" in os.environ:
        pytest.skip("HARVESTER_SHARED_DATA overrides the default here")
    assert REPO.parent / "shared" / "data" == SHARED_DATA


def test_every_role_folder_packages_itself_and_the_vehicle_package_holds_only_the_agent() -> None:
    root = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert root["tool"]["setuptools"]["packages"]["find"]["include"] == ["agent", "agent.*"]
    for d in ROLE_DIRS:
        meta = tomllib.loads((REPO / d / "pyproject.toml").read_text())
        assert meta["tool"]["setuptools"]["package-dir"] == {d: "."}, d
        # A subpackage not listed would be left out of the wheel (setuptools installs only what `packages` names).
        found = sorted(".".join((d, *p.parent.relative_to(REPO / d).parts)) for p in (REPO / d).rglob("__init__.py"))
        listed = sorted(meta["tool"]["setuptools"].get("packages", [d]))
        assert found == listed, f"{d} has packages {found}, its pyproject.toml lists {listed}"
    assert "harvester-common==0.1.0" in root["project"]["dependencies"]


def test_the_simulator_and_the_demo_add_their_commands_to_the_agents_command_line() -> None:
    out = subprocess.run([sys.executable, "-m", "agent", "--help"], capture_output=True, text=True, check=True,
                         cwd="/").stdout
    assert "simulate" in out and "demo" in out
    assert "not available here" not in out
    sim = subprocess.run([sys.executable, "-m", "agent", "simulate", "--help"], capture_output=True, text=True,
                         cwd="/")
    assert sim.returncode == 0 and "--socketcand PORT" in sim.stdout
