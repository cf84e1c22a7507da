"""The vehicle as docs/deploy.md sets it up, for tests: the wheel built from this tree and installed into a fresh
venv (dependencies from the package registry), and the systemd unit read as systemd reads it.

Shared by tests/test_vehicle_install.py and tests/test_systemd_unit.py; the venv is built once per test session.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "harvester-agent.service"
EXAMPLE_CONFIG = REPO / "systemd" / "harvester-agent.toml"
# Where docs/deploy.md installs the venv and the config; the unit's ExecStart names both.
INSTALLED_EXE = "/opt/harvester-agent/venv/bin/harvester-agent"
INSTALLED_CONFIG = "/etc/harvester-agent/agent.toml"

# Project folders (relative to the repository) whose wheels make a vehicle, installed together: the agent's
# distribution and the shared one it depends on; and the top-level packages those wheels may ship (README, "Layout").
WHEEL_PROJECTS = (".", "harvester_common")
VEHICLE_PACKAGES = frozenset({"agent", "harvester_common"})

# What a build must not pick up from a developer's tree: stale build output (setuptools builds in place and would
# package files deleted since), caches, virtualenvs, run folders.
_IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__",
                                 ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis", "run", "demo-run",
                                 "*.sqlite", "*.sqlite-wal", "*.sqlite-shm")


@dataclass(frozen=True, slots=True)
class VehicleVenv:
    root: Path
    wheels: tuple[Path, ...]
    seconds: float

    def exe(self, name: str) -> Path:
        return self.root / "bin" / name


def vehicle_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would make a venv's Python import this checkout instead of what
    the venv installed (the test command sets PYTHONPATH to the worktree)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return env | extra


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=900, env=vehicle_env())
    if r.returncode != 0:
        raise AssertionError(f"{what} failed ({r.returncode}): {' '.join(cmd)}\n{(r.stdout + r.stderr)[-4000:]}")


@functools.cache
def build_vehicle_venv(base: Path) -> VehicleVenv:
    """Wheels of WHEEL_PROJECTS built from a clean copy of this tree (`pip wheel --no-deps`: the build backend is
    fetched into pip's isolated build environment), installed into a fresh venv under `base`."""
    import time

    t0 = time.monotonic()
    src, wheels, venv = base / "src", base / "wheels", base / "venv"
    shutil.copytree(REPO, src, ignore=_IGNORE)
    for project in WHEEL_PROJECTS:
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src / project)],
             f"building the wheel of {project}")
    built = tuple(sorted(wheels.glob("*.whl")))
    # The base interpreter, not this venv's: a venv made from a venv would still be a fresh, empty one, but say so.
    _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], "creating the venv")
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *map(str, built)], "installing the wheels")
    return VehicleVenv(venv, built, time.monotonic() - t0)


def top_level_packages(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/", 1)[0] for n in z.namelist()}
    return {t for t in tops if not t.endswith((".dist-info", ".data"))}


def unit_settings(path: Path = UNIT, section: str = "Service") -> dict[str, list[str]]:
    """Every assignment in one section, in order, as systemd reads a unit: repeated keys accumulate, an empty
    assignment resets the list, `#` and `;` start comment lines, a trailing backslash continues a line."""
    out: dict[str, list[str]] = {}
    current = ""
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            continue
        if current != section or "=" not in line:
            continue
        key, value = (s.strip() for s in line.split("=", 1))
        if value == "":
            out[key] = []
        else:
            out.setdefault(key, []).append(value)
    return out


def unit_environment(path: Path = UNIT) -> dict[str, str]:
    """The variables the unit's `Environment=` lines set, as systemd reads them: each line holds one or more
    quoted or bare `NAME=value` words, later ones win."""
    env: dict[str, str] = {}
    for line in unit_settings(path).get("Environment", []):
        for word in shlex.split(line):
            name, _, value = word.partition("=")
            env[name] = value
    return env


def exec_start(path: Path = UNIT) -> list[str]:
    values = unit_settings(path)["ExecStart"]
    assert len(values) == 1, "the unit has one ExecStart"
    return shlex.split(values[0].lstrip("-@:+!"))


def unit_with_exec(path: Path, exe: Path) -> str:
    """The unit's text with ExecStart's program replaced by `exe`, everything else as it is."""
    text = path.read_text()
    new, n = re.subn(rf"^ExecStart={re.escape(INSTALLED_EXE)}(?= )", f"ExecStart={exe}", text, flags=re.M)
    assert n == 1, f"ExecStart does not start with {INSTALLED_EXE}"
    return new


DROPIN_NAME = "broker.conf"


def documented_dropin() -> str:
    """The broker drop-in as docs/deploy.md ships it (the ini block whose first line names its path)."""
    doc = (REPO / "docs" / "deploy.md").read_text()
    for block in re.findall(r"```ini\n(.*?)```", doc, flags=re.S):
        text = textwrap.dedent(block)
        if text.startswith(f"# /etc/systemd/system/{UNIT.name}.d/{DROPIN_NAME}\n"):
            return text
    raise AssertionError(f"docs/deploy.md has no ini block for {UNIT.name}.d/{DROPIN_NAME}")


def write_unit(folder: Path, exe: Path | None = None, dropin: bool = False) -> Path:
    """The unit (ExecStart's program replaced by `exe` if given) in `folder`, with the documented broker drop-in
    beside it if asked: systemd-analyze reads `<unit>.d/` next to the file it is given."""
    unit = folder / UNIT.name
    unit.write_text(unit_with_exec(UNIT, exe) if exe is not None else UNIT.read_text())
    if dropin:
        d = folder / f"{UNIT.name}.d"
        d.mkdir(exist_ok=True)
        (d / DROPIN_NAME).write_text(documented_dropin())
    return unit


def systemd_analyze() -> str | None:
    return shutil.which("systemd-analyze")


def syscall_sets() -> dict[str, list[str]]:
    """systemd's named system call sets (`systemd-analyze syscall-filter`), members as listed (names and @sets)."""
    out = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager"], capture_output=True, text=True,
                         check=True).stdout
    sets: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = sets.setdefault(line.split()[0], [])
        elif current is not None and line.startswith(" ") and line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
        elif not line.strip():
            current = None
    return sets


def expand(item: str, sets: dict[str, list[str]]) -> set[str]:
    if not item.startswith("@"):
        return {item}
    if item not in sets:
        raise KeyError(f"unknown system call set {item}")
    out: set[str] = set()
    for member in sets[item]:
        out |= expand(member, sets)
    return out


def allowed_syscalls(settings: dict[str, list[str]], sets: dict[str, list[str]]) -> set[str]:
    """The system calls SystemCallFilter= lets through, by systemd's rule: when the first assignment is an allow
    list, later plain assignments add to it and `~` assignments remove from it, in order."""
    lines = settings.get("SystemCallFilter", [])
    if not lines or lines[0].startswith("~"):
        raise AssertionError("the unit's SystemCallFilter= must start with an allow list")
    allowed: set[str] = set()
    for value in lines:
        deny = value.startswith("~")
        names: set[str] = set()
        for item in value.lstrip("~").split():
            names |= expand(item, sets)
        allowed = allowed - names if deny else allowed | names
    return allowed
