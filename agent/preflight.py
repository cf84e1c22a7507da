"""`harvester-agent run --check-config`: what `run` would load, loaded the same way, without starting anything.

The config has already been read by `load_config`, as `run` reads it. Here the DBC files go through the decoder the
agent builds, the model through the agent's own `load_scorer` (load, contract, signals this vehicle can decode),
the public keys of `[model] trusted_keys` through `modelpkg.load_public_keys` (what model packages are checked
against), and the TLS files through the uplink's `configure_tls`. Nothing is opened that would have an effect: no
bus, no serial port, no store, no connection.

Each finding is one line. `error` means the agent would not run as configured: it would not start (a DBC or TLS
file that does not load) or would start without what the config asks for (a model that is missing or refused:
the agent then runs without scoring, a fallback for the field, not a state to deploy into). A file the config
names that does not exist is an `error` too, unless `allow_absent` is set (checking a config on a machine it is
not installed on, such as CI): then it is `absent`, named, not checked, and does not fail the check. `info` lines
never fail it: a serial device or CAN interface that is missing here (the agent waits for it), plain TCP, no
trusted key at all (model updates are refused until one is: a choice, not a fault), a key its reader could replace.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import AgentConfig
from agent.decode.base import Decoder
from agent.decode.j1939 import DbcError, J1939Decoder
from agent.service import load_scorer, serial_decoders
from agent.signals import SignalRegistry
from agent.sources.can import virtual_bus_warning
from agent.uplink import TlsError, configure_tls
from harvester_common.modelpkg import PackageError, load_public_keys

Level = Literal["ok", "info", "absent", "error"]


@dataclass(frozen=True, slots=True)
class Finding:
    level: Level
    subject: str
    text: str

    def line(self) -> str:
        return f"{self.level:<6s} {self.subject:<8s} {self.text}"


@dataclass(frozen=True, slots=True)
class Report:
    findings: list[Finding]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def absent(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "absent"]

    def verdict(self) -> str:
        """The last line: why the check failed, or what it passed with."""
        if self.errors:
            first = self.errors[0]
            more = f" ({len(self.errors) - 1} more error(s) above)" if len(self.errors) > 1 else ""
            return f"check failed: {first.subject}: {first.text}{more}"
        if self.absent:
            return (f"config OK; {len(self.absent)} file(s) it names are not present on this machine and were not "
                    "checked (--allow-absent)")
        return "config OK: the agent would start with everything this config asks for"


def _missing(path: Path, subject: str, allow_absent: bool, consequence: str) -> Finding:
    if allow_absent:
        return Finding("absent", subject, f"{path}: not present on this machine (not checked)")
    return Finding("error", subject, f"{path}: not present on this machine ({consequence})")


def _can(cfg: AgentConfig, allow_absent: bool) -> tuple[list[Finding], dict[str, J1939Decoder]]:
    out: list[Finding] = []
    decoders: dict[str, J1939Decoder] = {}
    registry = SignalRegistry()
    for b in cfg.can:
        present = []
        for p in b.dbc:
            if p.exists():
                present.append(p)
            else:
                out.append(_missing(p, "dbc", allow_absent, f"bus {b.name}: the agent would not start"))
        try:
            # Built as the agent builds it (agent/service.py): the built-in definitions, then the config's files.
            dec = J1939Decoder(registry, present, b.name)
        except DbcError as e:
            out.append(Finding("error", "dbc", f"bus {b.name}: {e} (the agent would not start)"))
            continue
        decoders[b.name] = dec
        extra = f" + {len(present)} file(s)" if present else ""
        out.append(Finding("ok", "dbc", f"bus {b.name}: built-in J1939 definitions{extra}, "
                                        f"{len(dec.messages)} messages"))
        if b.interface == "socketcan" and not Path("/sys/class/net", b.channel).exists():
            out.append(Finding("info", "can", f"bus {b.name}: interface {b.channel} not present on this machine "
                                              "(the agent retries it with backoff)"))
    warning = virtual_bus_warning(cfg.can)
    if warning:
        out.append(Finding("info", "can", warning))
    return out, decoders


def _serial(cfg: AgentConfig) -> list[Finding]:
    out = []
    for s in cfg.serial:
        if Path(s.port).exists():
            out.append(Finding("ok", "serial", f"{s.name}: {s.port} present"))
        else:
            out.append(Finding("info", "serial", f"{s.name}: {s.port} not present on this machine "
                                                 "(the agent waits for it)"))
    return out


def _model(cfg: AgentConfig, decoders: Mapping[str, Decoder[Any]], allow_absent: bool,
           dbc_absent: bool = False) -> list[Finding]:
    path = cfg.model.path
    if not path.exists():
        return [_missing(path, "model", allow_absent, "the agent would start without scoring")]
    scorer, status = load_scorer(cfg, decoders)
    if scorer is None:
        if dbc_absent and "needs signals" in status:
            # The signals may be in a DBC that is not on this machine: not a verdict either way.
            return [Finding("absent", "model", f"{path}: {status} (not conclusive: a DBC file it may need is not "
                                               "present on this machine)")]
        return [Finding("error", "model", f"{path}: {status} (the agent would start without scoring)")]
    c = scorer.contract
    return [Finding("ok", "model", f"{path}: {status}, {len(c.features)} features from {len(c.signals)} "
                                   "signals this config decodes")]


_NO_KEY = "model packages are refused until a key is trusted (docs/models.md, \"Signed packages\")"


def _writable(p: Path) -> bool:
    # Root may write anything; the service runs as its own user, which is whom the check is run as (docs/deploy.md).
    return os.geteuid() != 0 and os.access(p, os.W_OK)


def _key_entry(p: Path, allow_absent: bool, trusted: set[str]) -> list[Finding]:
    """One `trusted_keys` entry (a key file or a folder of them); adds the ids it holds to `trusted`."""
    if not p.exists():
        return [_missing(p, "keys", allow_absent, "no model package would be accepted")]
    try:
        keys = load_public_keys([p])
    except PackageError as e:
        # The message names the file: the entry itself, or the bad *.pub inside a folder.
        return [Finding("error", "keys", f"{e} (no model package would be accepted)")]
    trusted |= set(keys)
    if keys:
        out = [Finding("ok", "keys", f"{p}: {len(keys)} Ed25519 public key(s): {', '.join(sorted(keys))}")]
    else:
        out = [Finding("info", "keys", f"{p}: a directory with no *.pub file: trusts no key")]
    # Whoever may change a trusted key, or the folder it is in, may sign the models this vehicle runs.
    files = sorted(f for f in p.glob("*.pub") if not f.is_dir()) if p.is_dir() else [p]
    exposed = [f for f in [p if p.is_dir() else p.parent, *files] if _writable(f)]
    if exposed:
        out.append(Finding("info", "keys", f"{', '.join(map(str, exposed))}: writable by this user (uid "
                                           f"{os.geteuid()}): whoever runs as it could make this vehicle trust "
                                           "another key; keep keys root-owned and read-only to the agent"))
    return out


def _keys(cfg: AgentConfig, allow_absent: bool) -> list[Finding]:
    """Each `[model] trusted_keys` entry on its own, so that a bad one is named; then what is trusted in all."""
    paths = cfg.model.trusted_keys
    if not paths:
        return [Finding("info", "keys", f"[model] trusted_keys is empty: {_NO_KEY}")]
    out: list[Finding] = []
    trusted: set[str] = set()
    for p in paths:
        try:
            out += _key_entry(p, allow_absent, trusted)
        except OSError as e:  # a folder on the way this user may not enter (stat itself refused)
            out.append(Finding("error", "keys", f"{p}: cannot be read: {e.strerror or e} (no model package would be "
                                                "accepted)"))
    if not any(f.level in ("error", "absent") for f in out) and not trusted:
        out.append(Finding("info", "keys", f"no key is trusted: {_NO_KEY}"))
    return out


def _tls(cfg: AgentConfig, allow_absent: bool) -> list[Finding]:
    m = cfg.mqtt
    if not m.tls:
        return [Finding("info", "mqtt", f"{m.host}:{m.port} over plain TCP (mqtt.tls = false): for a lab only")]
    out: list[Finding] = []
    named = [p for p in (m.ca_file, m.cert_file, m.key_file) if p is not None]
    missing = [p for p in named if not p.exists()]
    out += [_missing(p, "tls", allow_absent, "the agent would not start") for p in missing]
    if m.ca_file is None:
        out.append(Finding("info", "tls", "no ca_file: the broker's certificate is checked against the system's "
                                          "CA store"))
    if m.cert_file is None:
        out.append(Finding("info", "tls", "no cert_file: the agent presents no client certificate (a broker that "
                                          "requires one refuses it)"))
    if missing:
        return out
    try:
        configure_tls(mqtt.Client(CallbackAPIVersion.VERSION2), m)
    except TlsError as e:
        return [*out, Finding("error", "tls", f"{e} (the agent would not start)")]
    return [*out, Finding("ok", "tls", f"{m.host}:{m.port}: {len(named)} TLS file(s) load")]


def check(cfg: AgentConfig, config_path: Path, allow_absent: bool = False) -> Report:
    """Everything `run` would load from `cfg`, loaded and judged; see the module's docstring for the levels."""
    findings = [Finding("ok", "config", f"{config_path}: valid (vehicle {cfg.vehicle.fleet}/{cfg.vehicle.id}, "
                                        f"{len(cfg.can)} CAN bus(es), {len(cfg.serial)} serial device(s))")]
    can, decoders = _can(cfg, allow_absent)
    findings += can
    findings += _serial(cfg)
    # The model is checked against every source's decoder, as `run` does (agent/service.py decoders_for): the
    # buses' and the serial devices' signals.
    dbc_absent = any(f.level == "absent" and f.subject == "dbc" for f in can)
    findings += _model(cfg, {**decoders, **serial_decoders(cfg, SignalRegistry())}, allow_absent, dbc_absent)
    findings += _keys(cfg, allow_absent)
    findings += _tls(cfg, allow_absent)
    return Report(findings)
