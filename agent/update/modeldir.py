"""The model directory (`[model] dir`): packages the vehicle received, and which one scores.

```
packages/<package sha256>.hvmp   whole packages, each verified before it was kept (write, fsync, rename, fsync dir)
download/<package sha256>.part   the package being downloaded, pre-sized (agent/update/download.py)
active.json                      {"active": REF, "previous": REF or null}
state.json                       the update step and its report sequence (agent/update/manager.py)
REF = {"package": "<package sha256>", "name": ..., "version": ..., "sha256": "<model sha256>"}
      ("package": "" is the installed model at `[model] path`)
```

Every JSON file is written whole to a temporary file, fsynced, renamed over the old one, and the directory fsynced:
after a power cut it is the old file or the new one, never half of either. A package is kept only once verified
and a pointer names only a kept package or the installed model, so a bad package never replaces a working model.

At start (`choose`) the agent scores with the pointer's active package if it loads and verifies (signature
against `[model] trusted_keys`, hashes, agent version, contract, signals this vehicle decodes: the checks of
agent/update/verify.py), else the previous one, else the installed model; it says which and why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.contract import ContractError
from agent.scoring import ModelLoadError, Scorer
from agent.update.verify import check_package
from harvester_common.modelpkg import MAX_PACKAGE_BYTES, PackageError, PublicKey

log = logging.getLogger("agent.update")

POINTER = "active.json"
STATE = "state.json"
PACKAGE_SUFFIX = ".hvmp"
PART_SUFFIX = ".part"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ModelDirError(Exception):
    """The model directory cannot be used (created, read, written); the text says which file and why."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """`data` into `path`: a temporary file beside it, fsynced, renamed over it, and the directory fsynced."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ModelDirError(f"{path}: cannot write: {e.strerror or e}") from None


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, separators=(",", ":"), allow_nan=False).encode())


def read_json(path: Path) -> tuple[Any, str]:
    """(the JSON value, "") or (None, why it could not be read); a missing file is (None, "")."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, ""
    except OSError as e:
        return None, f"{path}: cannot read: {e.strerror or e}"
    if len(raw) > 1024 * 1024:
        return None, f"{path}: {len(raw)} bytes, not one of ours"
    try:
        return json.loads(raw), ""
    except (ValueError, RecursionError):
        return None, f"{path}: not JSON"


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A model the vehicle can score with: a kept package, or the installed model (`package` empty)."""

    package: str
    name: str
    version: str
    sha256: str

    @property
    def installed(self) -> bool:
        return not self.package

    def to_dict(self) -> dict[str, str]:
        return {"package": self.package, "name": self.name, "version": self.version, "sha256": self.sha256}

    def status(self) -> dict[str, str]:
        """As model/status names it (mw.ModelStatus.active, .previous)."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    def label(self) -> str:
        where = f"package {self.package[:12]}" if self.package else "the installed model"
        return f"{self.name} {self.version} ({where})"

    @classmethod
    def from_dict(cls, d: Any) -> ModelRef | None:
        if not isinstance(d, dict):
            return None
        pkg, name, version, sha = (d.get(k) for k in ("package", "name", "version", "sha256"))
        if not (isinstance(pkg, str) and (pkg == "" or _HEX64.match(pkg)) and isinstance(sha, str)
                and _HEX64.match(sha) and isinstance(name, str) and isinstance(version, str)
                and 0 < len(name) <= 256 and 0 < len(version) <= 256):
            return None
        return cls(pkg, name, version, sha)


@dataclass(frozen=True, slots=True)
class Pointer:
    active: ModelRef | None
    previous: ModelRef | None
    error: str = ""  # why active.json could not be read (then both are None)


class ModelDir:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.packages = self.root / "packages"
        self.downloads = self.root / "download"
        try:
            for d in (self.root, self.packages, self.downloads):
                d.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as e:
            raise ModelDirError(f"model directory {self.root}: {e.strerror or e}") from None

    def package_path(self, sha: str) -> Path:
        return self.packages / f"{sha}{PACKAGE_SUFFIX}"

    def part_path(self, sha: str) -> Path:
        return self.downloads / f"{sha}{PART_SUFFIX}"

    def has_package(self, sha: str) -> bool:
        return self.package_path(sha).is_file()

    def read_package(self, sha: str) -> bytes:
        path = self.package_path(sha)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_PACKAGE_BYTES + 1)
        except OSError as e:
            raise ModelDirError(f"{path}: cannot read: {e.strerror or e}") from None
        return data

    def keep(self, data: bytes) -> str:
        """Keep a verified package; returns its hash."""
        sha = hashlib.sha256(data).hexdigest()
        write_atomic(self.package_path(sha), data)
        return sha

    def keep_part(self, part: Path, sha: str) -> None:
        """A finished, verified download becomes a kept package (its bytes were fsynced by the downloader)."""
        try:
            os.replace(part, self.package_path(sha))
            fsync_dir(self.packages)
        except OSError as e:
            raise ModelDirError(f"{part}: cannot keep it: {e.strerror or e}") from None

    def pointer(self) -> Pointer:
        d, err = read_json(self.root / POINTER)
        if err:
            return Pointer(None, None, err)
        if d is None:
            return Pointer(None, None)
        if not isinstance(d, dict):
            return Pointer(None, None, f"{self.root / POINTER}: not an object")
        active = ModelRef.from_dict(d.get("active"))
        previous = ModelRef.from_dict(d.get("previous"))
        if active is None and d.get("active") is not None:
            return Pointer(None, previous, f"{self.root / POINTER}: its active entry is damaged")
        return Pointer(active, previous)

    def set_pointer(self, active: ModelRef | None, previous: ModelRef | None) -> None:
        write_json(self.root / POINTER, {"active": active.to_dict() if active else None,
                                         "previous": previous.to_dict() if previous else None})

    def read_state(self) -> tuple[Any, str]:
        return read_json(self.root / STATE)

    def write_state(self, state: dict[str, Any]) -> None:
        write_json(self.root / STATE, state)

    def prune(self, keep: set[str]) -> list[str]:
        """Delete kept packages and partial downloads whose hash is not in `keep`; returns what went."""
        gone: list[str] = []
        for folder, suffix in ((self.packages, PACKAGE_SUFFIX), (self.downloads, PART_SUFFIX)):
            try:
                entries = list(folder.iterdir())
            except OSError:
                continue
            for p in entries:
                if p.name.endswith(suffix) and p.name[: -len(suffix)] not in keep:
                    with contextlib.suppress(OSError):
                        p.unlink()
                        gone.append(p.name)
        return gone


def read_view(root: Path) -> dict[str, Any]:
    """What `harvester-agent status` shows, read without creating or writing anything (the agent may be running):
    the pointer's active and previous model and the update's latest step (`state.json`'s status), each None when
    absent, and `errors` for files that could not be read."""
    errors: list[str] = []
    pointer, err = read_json(root / POINTER)
    if err:
        errors.append(err)
    state, err = read_json(root / STATE)
    if err:
        errors.append(err)
    pointer = pointer if isinstance(pointer, dict) else {}
    active, previous = ModelRef.from_dict(pointer.get("active")), ModelRef.from_dict(pointer.get("previous"))
    step = state.get("status") if isinstance(state, dict) and isinstance(state.get("status"), dict) else None
    return {"dir": str(root), "active": active.to_dict() if active else None,
            "previous": previous.to_dict() if previous else None, "step": step, "errors": errors}


# --- loading a model ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Loaded:
    scorer: Scorer
    ref: ModelRef


class LoadError(Exception):
    """A model that cannot score here; the text says why."""


def load_installed(path: Path, signals: set[str], threads: int, batch: int) -> Loaded:
    """The installed model (`[model] path`), checked as the agent always did: loads, contract, signals."""
    try:
        scorer = Scorer.load(path, threads, batch)
        scorer.check_signals(signals)
        sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except (ModelLoadError, ContractError) as e:
        raise LoadError(str(e)) from None
    except OSError as e:
        raise LoadError(f"{path}: {e.strerror or e}") from None
    c = scorer.contract
    return Loaded(scorer, ModelRef("", c.model_name, c.model_version, sha))


def load_package(mdir: ModelDir, sha: str, trusted: Mapping[str, PublicKey], signals: set[str],
                 threads: int, batch: int) -> Loaded:
    """A kept package, verified again (a key no longer trusted, a file damaged on disk: refused)."""
    try:
        v = check_package(mdir.read_package(sha), trusted, signals, threads, batch)
    except PackageError as e:
        raise LoadError(f"package {sha[:12]}: {e.code}: {e}") from None
    except ModelDirError as e:
        raise LoadError(str(e)) from None
    m = v.package.manifest
    return Loaded(v.scorer, ModelRef(v.package.package_sha256, m.name, m.version, m.sha256))


def load_ref(mdir: ModelDir, ref: ModelRef, installed_path: Path, trusted: Mapping[str, PublicKey],
             signals: set[str], threads: int, batch: int) -> Loaded:
    if ref.installed:
        loaded = load_installed(installed_path, signals, threads, batch)
        if loaded.ref.sha256 != ref.sha256:
            # The installed file was replaced since (a new agent install): still the installed model.
            log.info("the installed model changed since it was last active: %s", loaded.ref.label())
        return loaded
    loaded = load_package(mdir, ref.package, trusted, signals, threads, batch)
    if loaded.ref.sha256 != ref.sha256:
        raise LoadError(f"package {ref.package[:12]} holds model {loaded.ref.sha256[:12]}, not the "
                        f"{ref.sha256[:12]} it was kept as")
    return loaded


@dataclass(slots=True)
class Choice:
    loaded: Loaded | None  # None: nothing loads; the agent runs without scoring
    pointer: Pointer
    notes: list[str]  # why each earlier choice was passed over

    @property
    def status(self) -> str:
        """For the status message's `model_status` (and `run`'s log)."""
        if self.loaded is None:
            return "refused: " + "; ".join(self.notes)
        c = self.loaded.scorer.contract
        return f"{c.model_name} {c.model_version}"


def choose(mdir: ModelDir | None, installed_path: Path, trusted: Mapping[str, PublicKey], signals: set[str],
           threads: int, batch: int) -> Choice:
    """The model to start with: the pointer's active package, else its previous one, else the installed model."""
    notes: list[str] = []
    pointer = mdir.pointer() if mdir is not None else Pointer(None, None)
    if pointer.error:
        notes.append(pointer.error)
    for role, ref in (("active", pointer.active), ("previous", pointer.previous)):
        if ref is None or mdir is None:
            continue
        if ref.installed:
            break  # the installed model, below
        try:
            loaded = load_ref(mdir, ref, installed_path, trusted, signals, threads, batch)
        except LoadError as e:
            notes.append(f"{role} {ref.label()} refused: {e}")
            log.error("model: the %s model %s does not load: %s", role, ref.label(), e)
            continue
        if notes:
            log.warning("model: scoring with the %s model %s (%s)", role, ref.label(), "; ".join(notes))
        else:
            log.info("model: scoring with the %s model %s", role, ref.label())
        return Choice(loaded, pointer, notes)
    try:
        loaded = load_installed(installed_path, signals, threads, batch)
    except LoadError as e:
        notes.append(f"installed model: {e}")
        return Choice(None, pointer, notes)
    if notes:
        log.warning("model: scoring with %s (%s)", loaded.ref.label(), "; ".join(notes))
    return Choice(loaded, pointer, notes)
